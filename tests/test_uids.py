"""Each job's uid is its own on this host (slave/uids.py), and jobs start with no signal ignored."""
import os
import signal
import subprocess
import sys

import pytest

from distexec_kernel import Cluster, protocol as P
from slave import uids

from conftest import HOLD, UNTIL_RELEASED, held_jobs, wait_for

JOB_UIDS = range(uids.FIRST, uids.FIRST + uids.COUNT)
SAY_UID = HOLD + "import os\nprint(os.getuid(), os.getgid(), flush=True)\n" + UNTIL_RELEASED


def test_a_uid_is_held_by_one_holder_until_it_lets_go_or_dies(tmp_path):
    locks = str(tmp_path / "locks")
    first, second = uids.take(locks, 61000, 3), uids.take(locks, 61000, 3)
    assert (first.uid, second.uid) == (61000, 61001)
    first.release()
    again = uids.take(locks, 61000, 3)
    assert again.uid == 61000
    # Another process (another slave on this host) holds the next one: skipped while it lives.
    with subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.getcwd()!r})\n"
                           f"from slave import uids\nh = uids.take({locks!r}, 61000, 3)\n"
                           "print(h.uid, flush=True)\nsys.stdin.read()"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "61002\n"
            with pytest.raises(uids.UidsGone, match="every uid from 61000 to 61002 is taken"):
                uids.take(locks, 61000, 3)
        finally:
            holder.kill()
    assert uids.take(locks, 61000, 3).uid == 61002  # its holder died: the kernel let go of it
    for held in (second, again):
        held.release()


def test_an_account_is_never_taken_and_the_lock_folder_must_be_roots_alone(tmp_path):
    locks = tmp_path / "locks"
    with pytest.raises(uids.UidsGone):
        uids.take(str(locks), 65534, 1)  # nobody
    os.chmod(locks, 0o777)
    with pytest.raises(OSError, match="only it may write"):
        uids.take(str(locks), 61000, 1)
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(OSError, match="only it may write"):
        uids.take(str(tmp_path / "link"), 61000, 1)


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "fresh"])
def test_jobs_running_at_once_have_uids_no_other_holder_has(make_cluster, warm):
    # Fresh jobs all ran as nobody, and two slaves on one host gave their slots the same uids: jobs of
    # different users shared RLIMIT_NPROC, inotify and message queue quotas while they ran.
    lc = make_cluster(1, slots=2, languages="python", slave_args=[] if warm else ["--no-warm"])
    outside = uids.take()  # as another slave on this host would hold it
    try:
        with Cluster(lc.url, token=lc.token) as c:
            jobs = [c.submit(SAY_UID) for _ in range(2)]
            held = wait_for(lambda: len(found := held_jobs(lc.slaves[0].pid)) == 2 and found,
                            60, "both jobs to run at once")
            for p in held:
                p.send_signal(signal.SIGUSR1)
            seen = [tuple(map(int, j.wait(60).stdout.split())) for j in jobs]
    finally:
        outside.release()
    assert [j.status for j in jobs] == [P.SUCCEEDED] * 2, [j.record for j in jobs]
    assert all(uid == gid and uid in JOB_UIDS for uid, gid in seen), seen
    assert len({uid for uid, _ in seen} | {outside.uid}) == 3, (seen, outside.uid)


def test_a_job_ignores_no_signal_the_slave_was_started_ignoring(make_cluster):
    # Under nohup the slave starts with SIGHUP ignored, and an ignored signal stays ignored through exec.
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        lc = make_cluster(1, slots=1, languages="python,bash")
    finally:
        signal.signal(signal.SIGHUP, before)
    ignored = "grep SigIgn /proc/self/status"
    with Cluster(lc.url, token=lc.token) as c:
        jobs = {"warm bash": c.submit(ignored, language="bash"),
                "warm python": c.submit(f"import os\nos.system({ignored!r})"),
                # Collecting files is served fresh (warm.py).
                "fresh bash": c.submit(ignored, language="bash", collect=["none"])}
        for what, job in jobs.items():
            job.wait(60)
            assert job.status == P.SUCCEEDED, (what, job.record)
            mask = int(job.stdout.split()[1], 16)
            assert not mask & (1 << (signal.SIGHUP - 1)), (what, job.stdout)
        job = c.submit("import os, signal\nos.kill(os.getpid(), signal.SIGHUP)").wait(60)
        assert job.error["code"] == P.SIGNAL and "SIGHUP" in job.error["message"], job.record
