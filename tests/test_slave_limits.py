"""The slave's own limits (issue 10): sessions inside the limits, a kernel that
floods, the disk quota, the slave's folder of job directories.

Each test is an attack an ordinary user could make, run through a real master
and real slaves; each failed on the code before the fix.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from distexec_kernel import Cluster, protocol as P

from conftest import wait_for

WAIT = 90


def run(c: Cluster, source: str, **kw):
    return c.submit(source, **kw).wait(WAIT)


def _procs_with(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if any(marker in a for a in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(path.rstrip("/") + "/")]


def _kernel(child) -> psutil.Process:
    """The Python process of the (one) session kernel a slave started (not its sandbox wrappers)."""
    for p in psutil.Process(child.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if cmd and "python" in os.path.basename(cmd[0]) and "ipykernel_launcher" in cmd:
                return p
        except psutil.Error:
            pass
    raise AssertionError("no kernel process")


def _cgroup_file(pid: int, ctrl: str, name: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if ctrl in ctrls.split(","):
                with open(f"/sys/fs/cgroup/{ctrl}{path}/{name}") as g:
                    return g.read().strip()
    raise AssertionError(f"no {ctrl} cgroup for {pid}")


# -- finding 4: sessions inside the limits -------------------------------------------

def test_what_a_cell_leaves_running_is_stopped_when_it_ends(make_cluster):
    lc = make_cluster(1, slots=1, languages="python")
    marker = "distexec-stray-7f3a"
    spin = (f"import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'b = bytearray(200 << 20)\\nwhile True: pass', "
            f"'{marker}'])\nprint('started')")
    with Cluster(lc.url, token=lc.token) as c:
        assert run(c, "kept = 'here'", session="s").status == P.SUCCEEDED
        job = run(c, spin, session="s")
        assert job.status == P.SUCCEEDED and job.stdout == "started\n", job.stderr
        # Gone before the job's end was told (and its slot counted free), not at the idle timeout.
        assert _procs_with(marker) == []
        assert "stopped 1 process(es) this job left running" in job.stderr
        after = run(c, "print(kept, p.poll())", session="s")
        assert after.status == P.SUCCEEDED and after.stdout == "here -9\n", after.stderr
        assert all(s["running"] == 0 for s in c.slaves())


def test_a_session_kernel_has_a_cpu_cap_that_drops_between_cells(make_cluster):
    lc = make_cluster(1, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        # Inside, the cell reads its own cgroup (the only one it can see): one core while it runs.
        job = run(c, textwrap.dedent("""
            path = [l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup") if ":cpu:" in l or ":cpu," in l][0]
            print(open(f"/sys/fs/cgroup/cpu{path}/cpu.cfs_quota_us").read().strip())
        """), session="cpu")
        assert job.status == P.SUCCEEDED and job.stdout == "100000\n", (job.stdout, job.stderr)
        # Between cells, a tenth of a core: what a cell's threads do then cannot take a free slot's CPU.
        kernel = _kernel(lc.slaves[0])
        assert _cgroup_file(kernel.pid, "cpu", "cpu.cfs_quota_us") == "10000"
        assert _cgroup_file(kernel.pid, "cpu", "cpu.cfs_period_us") == "100000"


def test_a_user_past_max_sessions_gets_session_limit(make_cluster):
    lc = make_cluster(2, slots=1, languages="python", slave_args=["--max-sessions-per-user", "2"])
    with Cluster(lc.url, token=lc.token) as c:
        assert run(c, "x = 1", session="one").status == P.SUCCEEDED
        assert run(c, "x = 2", session="two").status == P.SUCCEEDED
        # Counted across both slaves, refused at submission: never queued.
        third = c.submit("x = 3", session="three").wait(WAIT)
        assert third.status == P.REJECTED and third.error["code"] == P.SESSION_LIMIT, third.error
        msg = third.error["message"]
        assert "at most 2" in msg and "one" in msg and "two" in msg and "--max-sessions-per-user" in msg
        # The open ones still run; ending one makes room.
        assert run(c, "print(x)", session="two").stdout == "2\n"
        c.end_session("one")
        assert run(c, "print('three')", session="three").stdout == "three\n"


# -- finding 5: a kernel floods the slave --------------------------------------------

# Chunks of 64 KiB: the kernel's iopub socket queues up to 1,000 messages (zmq's default high-water
# mark) while the slave drains them, so 1 MiB ones could fill the session's own memory limit and end it
# (its memory, counted against its user: not the slave's, which is what this measures).
FLOOD = textwrap.dedent("""
    import sys, threading
    sent = [0]
    def flood():
        chunk = "z" * (1 << 16)
        while True:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            sent[0] += len(chunk)
    threading.Thread(target=flood, daemon=True).start()
    print("flooding")
""")


def test_a_thread_flooding_after_its_cell_returned_does_not_grow_the_slave(make_cluster):
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--output-limit", "32"])
    slave = psutil.Process(lc.slaves[0].pid)
    with Cluster(lc.url, token=lc.token) as c:
        assert run(c, "print('warm')", session="f").status == P.SUCCEEDED
        base = slave.memory_info().rss
        first = run(c, FLOOD, session="f")
        assert first.status == P.SUCCEEDED and "flooding" in first.stdout, first.stderr
        peak = [base]

        def flooded_enough() -> bool:
            peak[0] = max(peak[0], slave.memory_info().rss)
            job = run(c, "print(f'\\nsent={sent[0]}')", session="f")
            peak[0] = max(peak[0], slave.memory_info().rss)
            # Later cells work (what the thread prints while one runs is its output, as in Jupyter).
            assert job.status == P.SUCCEEDED, (job.error, job.stderr[-500:])
            return int(re.search(r"sent=(\d+)", job.stdout).group(1)) >= 200 << 20

        # 200 MiB sent after the cell that started the thread returned: twice what the slave may grow by.
        wait_for(flooded_enough, 120, "the thread to send 200 MiB", interval=0.5)
        grown = (peak[0] - base) >> 20
        assert grown < 100, f"the slave grew by {grown} MiB"


BACKLOG = textwrap.dedent("""
    import sys, threading
    def flood():
        chunk = "z" * (1 << 20)
        for _ in range(400):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    threading.Thread(target=flood, daemon=True).start()
""")


def test_a_cell_behind_an_earlier_threads_backlog_still_gets_its_own_output(make_cluster):
    """400 MiB printed by a thread of an earlier cell queue on iopub ahead of the next cell's output and
    its idle status, for longer than a second: the cell's reply comes first, and its output is waited
    for while iopub still flows (it ended after a fixed second, with no output at all)."""
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--output-limit", "32"])
    with Cluster(lc.url, token=lc.token) as c:
        assert run(c, "print('warm')", session="b").status == P.SUCCEEDED
        assert run(c, BACKLOG, session="b").status == P.SUCCEEDED
        job = run(c, "print('mine')", session="b")
        assert job.status == P.SUCCEEDED, (job.error, job.stderr[-500:])
        assert "mine" in job.stdout, (len(job.stdout), job.stdout[-200:])


def test_output_is_counted_as_sent_so_a_job_of_control_characters_cannot_cost_its_slave(make_cluster):
    """12 MiB of \\x01 is under the default 16 MiB by bytes, and 72 MiB as JSON (\\u0001 each): sent
    whole, its job_finished passed the master's message limit, the master closed the slave's connection
    at each try, and the slave was lost to everyone.  Counted as sent, it ends output_limit."""
    lc = make_cluster(1, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        flood = run(c, "import sys\nsys.stdout.write('\\x01' * (12 << 20))")
        assert flood.status == P.FAILED and flood.error["code"] == P.OUTPUT_LIMIT, flood.error
        assert 0 < len(flood.stdout) * 6 <= 16 << 20
        after = run(c, "print('after')")
        assert after.status == P.SUCCEEDED and after.stdout == "after\n", after.error
        assert after.slave_uid == flood.slave_uid


@pytest.mark.parametrize("warm", ["--warm", "--no-warm"])
def test_a_job_past_its_output_limit_is_stopped_there_and_does_not_read_as_exit_0(make_cluster, tmp_path, warm):
    """The limit was polled each half second: a program writing 3 MiB at once past a 1 MiB limit ran
    on to its end and the job recorded ``exit_code: 0`` beside ``output_limit``, a clean success to
    whoever reads the exit code. Stopped where its output crosses the limit, it ends as a timeout or
    a memory limit does: the slave's SIGKILL, -9."""
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--output-limit", "1", warm])
    flood = "import sys\nsys.stdout.write('x' * (3 << 20))\nsys.stdout.flush()\nsys.exit(0)\n"
    with Cluster(lc.url, token=lc.token) as c:
        job = run(c, flood)
        assert job.status == P.FAILED and job.error["code"] == P.OUTPUT_LIMIT, job.error
        assert job.exit_code == -signal.SIGKILL, (job.exit_code, job.error)
        assert len(job.stdout) == 1 << 20
        timed_out = run(c, "import time\ntime.sleep(60)\n", timeout=1)
        assert (timed_out.error["code"], timed_out.exit_code) == (P.TIMEOUT, job.exit_code)
    prog = tmp_path / "flood.py"
    prog.write_text(flood)
    env = dict(os.environ, DISTEXEC_URL=lc.url, DISTEXEC_TOKEN=lc.token)
    done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "submit", str(prog)], capture_output=True,
                          env=env, timeout=WAIT)
    assert done.returncode == 128 + signal.SIGKILL, done.stderr[-500:]  # as a shell reports a SIGKILL
    assert b"output_limit" in done.stderr
    shown = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "show", str(job.id)], capture_output=True,
                           text=True, env=env, timeout=WAIT)
    assert "exit code: -9 (SIGKILL)" in shown.stdout, shown.stdout[:500]


# -- --disk-limit ----------------------------------------------------------------------

WRITE = textwrap.dedent("""
    import os, sys
    where, mib = sys.argv[1], int(sys.argv[2])
    with open(os.path.join(where, "big"), "wb") as f:
        for _ in range(mib):
            f.write(b"0" * (1 << 20))
    print("wrote", mib)
""")


@pytest.fixture
def disk_lc(make_cluster):
    return make_cluster(1, slots=2, languages="python", slave_args=["--disk-limit", "16"])


@pytest.fixture
def fresh_disk_lc(make_cluster):
    """Jobs in fresh processes, whose directories are on the host (a warm job's tmpfs is in its own
    mount namespace: tests/test_warm.py)."""
    return make_cluster(1, slots=2, languages="python", slave_args=["--disk-limit", "16", "--no-warm"])


def test_a_job_writing_twice_its_disk_limit_fails_disk_limit(disk_lc):
    with Cluster(disk_lc.url, token=disk_lc.token) as c:
        for where in (".", "/tmp", "/dev/shm"):
            job = run(c, WRITE, args=[where, "32"])
            assert job.status == P.FAILED and job.error["code"] == P.DISK_LIMIT, (where, job.error, job.stderr)
            assert "disk limit of 16 MiB" in job.error["message"]
            assert "No space left on device" in job.stderr
        # Under it, in the directory and /tmp together: fine.
        job = run(c, WRITE + "\nwith open('/tmp/more', 'wb') as f:\n    f.write(b'1' * (6 << 20))\n", args=[".", "8"])
        assert job.status == P.SUCCEEDED and job.stdout == "wrote 8\n", (job.error, job.stderr)
        # The directory and /tmp share one budget: 10 + 10 MiB does not fit in 16.
        both = run(c, WRITE + "\nwith open('/tmp/more', 'wb') as f:\n    f.write(b'1' * (10 << 20))\n", args=[".", "10"])
        assert both.status == P.FAILED and both.error["code"] == P.DISK_LIMIT, (both.error, both.stderr)


@pytest.mark.parametrize("warm", ["--warm", "--no-warm"])
def test_files_that_fill_a_jobs_memory_are_its_disk_limit(make_cluster, warm):
    """The defaults give memory and disk 1024 MiB each, and a job's files are in memory: a big file
    meets the memory limit just before the disk limit.  What the job must change is what it writes."""
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--memory-limit", "64", "--disk-limit", "64", warm])
    with Cluster(lc.url, token=lc.token) as c:
        job = run(c, WRITE, args=[".", "100"])
        assert job.status == P.FAILED and job.error["code"] == P.DISK_LIMIT, (job.error, job.stderr)
        message = job.error["message"]
        assert "filled its memory" in message and "memory limit of 64 MiB" in message, message
        assert int(re.search(r"its files \((\d+) MiB", message).group(1)) >= 32, message
        # Memory the program itself holds is still its memory limit.
        hog = run(c, "x = bytearray(100 << 20)\nx[::4096] = b'1' * len(x[::4096])\nprint('held')")
        assert hog.status == P.FAILED and hog.error["code"] == P.MEMORY_LIMIT, (hog.error, hog.stderr)


CAUGHT = textwrap.dedent("""
    import os, sys
    try:
        with open("big", "wb") as f:
            for _ in range(32):
                f.write(b"0" * (1 << 20))
    except OSError as exc:
        print("caught", exc.strerror, flush=True)
    if sys.argv[1:] == ["free"]:
        os.remove("big")
""")


@pytest.mark.parametrize("cluster", ["disk_lc", "fresh_disk_lc"])
def test_a_job_that_exits_0_with_its_disk_full_fails_disk_limit(request, cluster):
    """Past its disk limit a job fails, also when it caught the error: what it wrote is short."""
    lc = request.getfixturevalue(cluster)
    with Cluster(lc.url, token=lc.token) as c:
        job = run(c, CAUGHT)
        assert job.status == P.FAILED and job.error["code"] == P.DISK_LIMIT and job.exit_code == 0, job.record
        assert job.stdout == "caught No space left on device\n"
        # One that freed the space before it ended is judged by its exit.
        freed = run(c, CAUGHT, args=["free"])
        assert freed.status == P.SUCCEEDED and freed.stdout == job.stdout, freed.record


def test_the_disk_limit_is_a_tmpfs_not_the_hosts_disk(fresh_disk_lc):
    with Cluster(fresh_disk_lc.url, token=fresh_disk_lc.token) as c:
        job = c.submit(WRITE.replace('print("wrote", mib)', textwrap.dedent("""
            st = os.statvfs(".")
            print(os.getcwd(), st.f_blocks * st.f_frsize >> 20, flush=True)
            import time; time.sleep(60)
        """)), args=[".", "8"], timeout=90)
        wait_for(lambda: c.job(job.id).stdout, 30, "the job to write")
        cwd, size = c.job(job.id).stdout.split()
        assert size == "16"
        # On the host, the job's directory is on a tmpfs of its own, mounted by the slave.
        top = os.path.dirname(cwd)
        with open("/proc/self/mountinfo") as f:
            fstypes = [line.split(" - ")[1].split()[0] for line in f if line.split()[4] == top]
        assert fstypes == ["tmpfs"]
        assert os.path.getsize(os.path.join(cwd, "big")) == 8 << 20
        job.cancel().wait(WAIT)
        # Unmounted with the job, its files gone; the empty mount point stays for a later job
        # (removing it would break the bwrap of a job starting at that moment: jobdirs.remove).
        wait_for(lambda: not _mounts_under(os.path.dirname(top)), 15, "the job's tmpfs to be unmounted")
        assert os.listdir(top) == []


def test_a_session_has_the_same_disk_limit(disk_lc):
    with Cluster(disk_lc.url, token=disk_lc.token) as c:
        job = run(c, "with open('big', 'wb') as f:\n    for _ in range(32):\n        f.write(b'0' * (1 << 20))",
                  session="d")
        assert job.status == P.FAILED and job.error["code"] == P.DISK_LIMIT, (job.error, job.stderr)
        # The session lives on; freeing the space makes writing work again.
        again = run(c, "import os\nos.remove('big')\nopen('small', 'wb').write(b'1' * (1 << 20))\nprint('ok')",
                    session="d")
        assert again.status == P.SUCCEEDED and again.stdout == "ok\n", again.stderr


def test_what_a_job_plants_in_its_directory_never_reaches_the_host(disk_lc, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    source = textwrap.dedent(f"""
        import errno, os
        os.symlink({str(victim)!r}, "link-to-host-dir")
        os.mkfifo("fifo")
        try:
            os.link("/etc/hostname", "hard")   # another filesystem: refused by the kernel
        except OSError as exc:
            print("link", errno.errorcode[exc.errno])
        with open("huge", "wb") as f:
            try:
                f.truncate(1 << 40)   # past RLIMIT_FSIZE (the disk limit)
            except OSError as exc:
                print("truncate", errno.errorcode[exc.errno], flush=True)
            while True:               # then really fill it
                f.write(b"0" * (1 << 20))
    """)
    with Cluster(disk_lc.url, token=disk_lc.token) as c:
        job = run(c, source)
        assert job.status == P.FAILED and job.error["code"] == P.DISK_LIMIT, (job.error, job.stderr)
        assert "link EXDEV" in job.stdout and "truncate EFBIG" in job.stdout
        assert run(c, "print('serving')").stdout == "serving\n"
    # Clean-up removed the link, never what it pointed to.
    assert (victim / "keep.txt").read_text() == "keep"


# A program whose compile leaves 150 MiB in the job's tmpfs (non-zero data: no sparse file), then
# touches HEAP MiB.  Each size is its own source, so no run finds the program in the compile cache.
BIG_BINARY = textwrap.dedent("""
    #include <stdio.h>
    #include <stdlib.h>
    __asm__(".data\\n.globl big\\nbig: .fill 157286400,1,1\\n.text\\n");
    extern char big[];
    int main(void) {
        size_t n = (size_t)HEAP << 20;
        volatile char *p = malloc(n);
        for (size_t i = 0; i < n; i += 4096) p[i] = 1;
        printf("%d\\n", big[0]);
        return 0;
    }
""")


def test_what_the_compiler_leaves_counts_against_the_programs_memory(make_cluster):
    lc = make_cluster(1, slots=1, languages="c", slave_args=["--memory-limit", "512", "--no-warm"])
    with Cluster(lc.url, token=lc.token) as c:
        # 150 MiB of program + 300 MiB of heap: under 512.
        fits = run(c, BIG_BINARY.replace("HEAP", "300"), language="c")
        assert fits.status == P.SUCCEEDED and fits.stdout == "1\n", (fits.error, fits.stderr)
        # 150 + 400: over it, though each part alone is under (a cgroup per step counted 400).
        over = run(c, BIG_BINARY.replace("HEAP", "400"), language="c")
        assert over.status == P.FAILED and over.error["code"] == P.MEMORY_LIMIT, (over.error, over.stderr)


# -- the slave's folder: leftovers of an earlier run ------------------------------------

def test_a_restarted_slave_removes_what_its_killed_run_left(make_cluster):
    lc = make_cluster(2, slots=1, languages="python", slave_args=["--no-warm"])  # job directories on the host
    with Cluster(lc.url, token=lc.token) as c:
        sleeper = "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(120)"
        jobs = [c.submit(sleeper, timeout=200) for _ in range(2)]
        for j in jobs:
            wait_for(lambda: c.job(j.id).stdout, 60, "the jobs to start")
        dirs = {c.job(j.id).slave_uid: os.path.dirname(c.job(j.id).stdout.strip()) for j in jobs}
        victim, bystander = lc.slaves
        assert set(dirs) == {victim.uid, bystander.uid}
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait()
        old = dirs[victim.uid]
        assert os.path.isdir(old) and _mounts_under(os.path.dirname(old)), "the killed run left nothing to test"
        again = lc.start_slave()
        assert again.uid == victim.uid
        assert not os.path.exists(old)
        assert _mounts_under(os.path.dirname(old)) == []
        # The other slave's live job directory was not touched.
        assert os.path.isdir(dirs[bystander.uid])
        other = next(j for j in jobs if c.job(j.id).slave_uid == bystander.uid)
        other.cancel().wait(WAIT)
