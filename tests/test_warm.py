"""The warm pool (slave/warm.py): each job is still a fresh, isolated, limited process.

One slave with two slots and small limits serves the module, warm (the
default with bubblewrap).  Every test ends by checking that no process of a
warm job is left (a process under the slave running as a slot's uid) and
that the slave still serves the next job warm.  A job proves it ran warm by
its directory, under /run/distexec inside the pool's parent.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

import psutil
import pytest

from distexec_kernel import Cluster, protocol as P
from slave import uids as job_uids
from slave.warm import PREPARE_AHEAD, PREPARE_AHEAD_LAST, ahead_wait
from slave.warm_pool import _ended

from conftest import (DOUBLE_FORKING_DAEMON, FORK_UNTIL_REFUSED, HOLD, SMALL_DISK_MB, SMALL_MAX_PROCS, SMALL_MEMORY_MB,
                      READ_EACH_ARG, UNTIL_RELEASED, held_jobs, release_jobs, small_limits_cluster, wait_for,
                      parent_name, warm_parents)

MEMORY_MB, MAX_PROCS, DISK_MB = SMALL_MEMORY_MB, SMALL_MAX_PROCS, SMALL_DISK_MB
SLOTS = 2
WARM_UIDS = range(job_uids.FIRST, job_uids.FIRST + job_uids.COUNT)  # each slot takes one of them (slave/uids.py)
# First line of every probe's output: where it ran.
WHERE = "import os as _os; print('warm' if _os.getcwd().startswith('/run/distexec/job') else 'fresh', flush=True)\n"
SH_WHERE = 'case "$PWD" in /run/distexec/job*) echo warm;; *) echo fresh;; esac\n'


@pytest.fixture(scope="module")
def box():
    root = tempfile.mkdtemp(prefix="distexec-warm-test-", dir="/var/tmp")
    for sub in ("jobs", "home"):
        os.makedirs(os.path.join(root, sub))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lc(box):
    cluster = small_limits_cluster(box, SLOTS, "--warm", languages="python,bash,sh,c,ruby,javascript,java")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def c(lc):
    client = Cluster(lc.url, token=lc.token)
    yield client
    client.close()


def slave_log(box) -> str:
    with open(os.path.join(box, "logs", "slave-1.log")) as f:
        return f.read()


def descendants(lc) -> list[psutil.Process]:
    try:
        return psutil.Process(lc.slaves[0].pid).children(recursive=True)
    except psutil.Error:
        return []


def job_processes(lc) -> list[psutil.Process]:
    """Live processes of warm jobs: under the slave, running as a slot's uid (but the children forked
    ahead for free slots, waiting for a job)."""
    found = []
    pool = {p.pid for p in warm_parents(lc.slaves[0].pid)}
    for p in descendants(lc):
        if p.pid in pool:
            continue
        try:
            if p.uids().real in WARM_UIDS and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def zygote(lc) -> psutil.Process:
    """The pool's parent: the Python process bwrap runs, root, started with the parent's source."""
    found = [p for p in warm_parents(lc.slaves[0].pid) if p.name() != "bwrap" and parent_name(p) == "bwrap"]
    assert len(found) == 1, found
    return found[0]


def another_parent(lc, old: psutil.Process) -> bool:
    """Whether the pool has a parent other than ``old`` (processes come and go meanwhile)."""
    try:
        return zygote(lc).pid != old.pid
    except (AssertionError, psutil.Error):
        return False


def run(c, source: str, language: str = "python", timeout: float = 30, **kwargs):
    return c.submit(source, language=language, timeout=timeout, **kwargs).wait(90)


@pytest.fixture(autouse=True)
def nothing_left(request, lc):
    """After each test: nothing of a job survives, and the next job still runs warm."""
    yield
    if "c" not in request.fixturenames:
        return
    wait_for(lambda: not job_processes(lc), 15, "every process of the warm jobs to be gone")
    client = request.getfixturevalue("c")
    wait_for(lambda: run(client, WHERE).stdout == "warm\n", 30, "a job to run warm again")


# -- what runs where ------------------------------------------------------------------


def test_the_slave_says_which_languages_run_warm(c, box):
    text = slave_log(box)
    assert "warm pool: python, bash, javascript, ruby jobs and the c, cpp, go, rust, java programs the " \
           "compile cache holds are forked from a parent started once in bubblewrap" in text, text
    assert "parent ready" in text, text


def test_each_warm_job_is_a_new_process_in_a_directory_of_its_own(c):
    source = WHERE + textwrap.dedent("""
        import os
        print(os.getpid(), os.getuid(), os.getcwd(), sorted(os.listdir('.')), sorted(os.listdir('/tmp')))
        for path in ('mine.txt', '/tmp/mine.txt', '/var/tmp/mine.txt', '/dev/shm/mine.txt'):
            open(path, 'w').write('left by an earlier job')
    """)
    seen = []
    for _ in range(3):
        job = run(c, source)
        assert job.status == P.SUCCEEDED, job.record
        where, line = job.stdout.splitlines()
        assert where == "warm"
        pid, uid, cwd, listing = line.split(" ", 3)
        # Nothing an earlier job wrote, in its directory or /tmp.
        assert listing == "['main.py'] []", line
        assert int(uid) in WARM_UIDS
        seen.append((int(pid), cwd))
    assert len({pid for pid, _ in seen}) == 3, seen
    assert len({cwd for _, cwd in seen}) == 3, seen
    for lang in ("bash", "sh"):  # sh: bash's alias, stored and run as bash
        job = run(c, SH_WHERE + "ls -A; id -u", lang)
        assert job.status == P.SUCCEEDED and job.record["language"] == "bash", job.record
        assert job.stdout.split()[:2] == ["warm", "main.bash"], job.stdout
        assert int(job.stdout.split()[2]) in WARM_UIDS, job.stdout


def test_jobs_one_after_another_take_turns_on_the_slots(c):
    """The next job goes to the slot free the longest, whose child was forked and isolated ahead, not
    to the slot just freed (its child is being forked then): one after another, the two uids alternate."""
    uids = []
    for _ in range(4):
        job = run(c, WHERE + "import os; print(os.getuid())")
        assert job.status == P.SUCCEEDED and job.stdout.startswith("warm\n"), job.record
        uids.append(int(job.stdout.split()[1]))
    assert uids[0] != uids[1] and uids == uids[:2] * 2, uids


def test_a_jobs_main_module_is_its_own(c):
    """What a child runs while it waits for its job (a rehearsal of the job's path, to take its page
    copies ahead) leaves nothing in the job's __main__ and prints nothing."""
    job = run(c, "print(sorted(k for k in globals() if not k.startswith('__')), "
                 "__import__('sys').modules['__main__'].__dict__ is globals(), __name__)")
    assert job.status == P.SUCCEEDED and job.stdout == "[] True __main__\n" and job.stderr == "", job.record


def test_the_pools_command_lines_stay_short_and_a_jobs_argv_is_a_fresh_ones(c, lc):
    """The parent's program and config reach it on stdin and its socket: on its command line they made
    every `ps` of the slave host tens of KiB a pool (and a job's sys.orig_argv held them)."""
    parent = zygote(lc)
    assert parent.cmdline()[1:3] == ["-u", "-"] and len(parent.cmdline()) == 4, parent.cmdline()
    assert sum(len(a) + 1 for a in parent.parent().cmdline()) < 8000  # bwrap's own arguments, then those
    job = run(c, WHERE + "import sys\nprint(sys.argv, sys.orig_argv[1:])", args=["a b"])
    assert job.stdout == "warm\n['main.py', 'a b'] ['-u', 'main.py', 'a b']\n", job.record


def test_a_warm_programs_exit_code_and_signals_are_its_own(c):
    """A program (sh, bash, C) runs as its warm child's own child (warm_child.run_program): its exit
    code and the signal that killed it are reported as a fresh process's would be, and the signals it
    sends its own process group reach it alone."""
    job = run(c, SH_WHERE + "exit 7", "sh")
    assert (job.status, job.exit_code, job.stdout) == (P.FAILED, 7, "warm\n"), job.record
    job = run(c, SH_WHERE + "kill -SEGV $$", "bash")
    assert job.error["code"] == P.SIGNAL and "SIGSEGV" in job.error["message"] and job.stdout == "warm\n", job.record
    # It ignores TERM and sends TERM to its whole process group: what waits for it ignores that too,
    # from the start (a race a few runs catch: it once ignored them only once the program had started).
    for _ in range(6):
        job = run(c, SH_WHERE + "trap '' TERM; kill -TERM 0; echo alive", "sh")
        assert (job.status, job.stdout) == (P.SUCCEEDED, "warm\nalive\n"), job.record
    crash = "#include <stdio.h>\nint main(void) { puts(\"up\"); fflush(stdout); return *(volatile int *)0; }\n"
    run(c, crash, "c")  # compiled (fresh), into the compile cache
    job = run(c, crash, "c")
    assert job.error["code"] == P.SIGNAL and "SIGSEGV" in job.error["message"] and job.stdout == "up\n", job.record


def test_two_warm_jobs_at_once_cannot_see_or_signal_each_other(c):
    first = c.submit(WHERE + textwrap.dedent("""
        import os, time
        open('private.txt', 'w').write('first')
        open('/tmp/private', 'w').write('first')
        print(os.getpid(), os.getuid(), os.getcwd(), flush=True)
        time.sleep(60)
    """), timeout=90)
    wait_for(lambda: len(first.stdout.splitlines()) == 2, 20, "the first job to start")
    assert first.stdout.startswith("warm\n")
    pid, uid, cwd = first.stdout.splitlines()[1].split()
    probe = WHERE + textwrap.dedent("""
        import os, signal, sys
        pid, cwd, uid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        out = [str(os.getuid() != uid)]
        for sig in (signal.SIGKILL, 0):
            try:
                os.kill(pid, sig)
                out.append('reached')
            except OSError as exc:
                out.append(type(exc).__name__)
        out.append(str(os.path.exists(f'/proc/{pid}')))
        out.append(str([int(p) for p in os.listdir('/proc') if p.isdigit()] == [os.getpid()]))
        for path in (os.path.join(cwd, 'private.txt'), f'/proc/{pid}/root/tmp/private',
                     f'/proc/{pid}/cwd/private.txt'):
            try:
                out.append(open(path).read())
            except OSError as exc:
                out.append(type(exc).__name__)
        out.append(str(os.listdir('/tmp')))
        print(' '.join(out))
    """)
    try:
        job = run(c, probe, args=[pid, cwd, uid])
        assert job.status == P.SUCCEEDED, job.record
        assert job.stdout.splitlines() == [
            "warm", "True PermissionError PermissionError False True FileNotFoundError FileNotFoundError "
                    "FileNotFoundError []"], job.stdout
        assert first.refresh().status == P.RUNNING, first.record
    finally:
        first.cancel()
        first.wait(60)
    assert first.status == P.CANCELLED, first.record


def test_the_child_waiting_for_a_slots_next_job_is_out_of_its_running_jobs_reach(c, lc):
    """A job running past a moment has its slot's next child forked beside it, as root: the job (same
    uid as the next one) cannot signal it, even with kill(-1), and the next jobs run warm.  (kill(-1)
    says 0 whenever some other process is in its PID namespace, signalled or not: seen from outside.)"""
    # It attacks until let go, and once more after: at least once while the children are there.
    job = c.submit(WHERE + textwrap.dedent("""
        import os, signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        print('started', flush=True)
        released = False
        while not released:
            released = signal.sigtimedwait({signal.SIGUSR1}, 0.01) is not None
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                try:
                    os.kill(-1, sig)  # every process this uid may signal, but itself
                except OSError:
                    pass
        print('done')
    """), timeout=60)
    wait_for(lambda: "started" in job.stdout, 20, "the job to start")
    # Both slots have a waiting child while the job runs: its own slot's was forked beside it.
    waiting = lambda: [p for p in warm_parents(lc.slaves[0].pid) if p.uids().real == 0 and p.cwd() == "/"
                       and p.name() != "bwrap" and parent_name(p) not in ("bwrap", "")]
    wait_for(lambda: len(waiting()) == SLOTS, 10, "a waiting child for each slot")
    before = {p.pid for p in waiting()}
    release_jobs(lc.slaves[0].pid)
    assert job.wait(60).status == P.SUCCEEDED, job.record
    assert job.stdout.splitlines() == ["warm", "started", "done"], job.stdout
    assert before <= {p.pid for p in waiting()}, "a waiting child died under the job's signals"
    for p in waiting():
        assert p.status() != psutil.STATUS_STOPPED
    for _ in range(2 * SLOTS):
        assert run(c, WHERE).stdout == "warm\n"


def test_a_long_jobs_next_child_waits_for_a_quiet_slave_but_not_for_ever():
    """When to fork a running job's slot's next child: once the slave has started or ended no job for
    PREPARE_AHEAD (a fork would slow those down), and by PREPARE_AHEAD_LAST after the start even if it
    never goes quiet.  (That the child is then there while the job runs: the test above.)"""
    start, step = 1000.0, PREPARE_AHEAD
    assert ahead_wait(start + step, start, busy_at=start) == 0  # nothing else happened since it started
    # Another job started (or ended) 5 ms ago: wait until 20 ms after that.
    assert ahead_wait(start + step, start, busy_at=start + step - 0.005) == pytest.approx(step - 0.005)
    # Busy right up to the last moment: at PREPARE_AHEAD_LAST, the fork waits no longer.
    last = start + PREPARE_AHEAD_LAST
    assert ahead_wait(last - 0.01, start, busy_at=last - 0.011) == pytest.approx(0.01)
    assert ahead_wait(last, start, busy_at=last - 0.001) == 0
    assert ahead_wait(last + 1, start, busy_at=last + 1) == 0


def test_interpreter_state_a_job_changes_does_not_reach_the_next(c):
    tamper = WHERE + textwrap.dedent("""
        import builtins, os, random, sys
        random.seed(7)
        written = []
        for d in [p for p in sys.path if os.path.isdir(p)] + [os.path.dirname(os.__file__)]:
            try:
                with open(os.path.join(d, 'distexec_evil.py'), 'w') as f:
                    f.write('raise SystemExit(99)')
                written.append(d)
            except OSError:
                pass
        print(written, flush=True)
        builtins.len = lambda x: 42
        builtins.print = lambda *a, **k: None
        sys.modules['json'] = None
        sys.path.insert(0, '/tmp')
        os.environ['TAMPERED'] = '1'
    """)
    job = run(c, tamper)
    assert job.status == P.SUCCEEDED, (job.error, job.stderr)
    # Its own directory is on sys.path (as for `python3 main.py`); nothing else is writable.
    assert job.stdout.startswith("warm\n['/run/distexec/job") and job.stdout.count("'") == 2, job.stdout
    check = WHERE + textwrap.dedent("""
        import os, sys, random
        print(len('abc'), sys.modules.get('json', 'absent') is None, os.environ.get('TAMPERED'), '/tmp' in sys.path)
        import json
        print(json.dumps([1]))
        try:
            import distexec_evil
            print('evil imported')
        except ImportError:
            print('no evil')
        random.seed(7)
    """)
    job = run(c, check)
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout == "warm\n3 False None False\n[1]\nno evil\n", job.stdout


def test_links_and_fifos_a_job_leaves_reach_neither_the_next_job_nor_the_host(c, box):
    """Root never writes where a warm job can: the next job's files are written by its own uid
    into a tmpfs made for it.  Planted symlinks, FIFOs and hard links under the names the next
    job uses, in each writable place, must neither redirect its files nor block it, on any slot."""
    target = os.path.join(box, "root-only")
    with open(target, "w") as f:
        f.write("host\n")
    os.chmod(target, 0o600)
    plant = WHERE + textwrap.dedent(f"""
        import os
        for d in ('.', '/tmp', '/var/tmp', '/dev/shm'):
            os.symlink({target!r}, os.path.join(d, 'data.txt'))
            os.mkfifo(os.path.join(d, 'in.fifo'))
            with open(os.path.join(d, 'own'), 'w') as f:
                f.write('planted')
            os.link(os.path.join(d, 'own'), os.path.join(d, 'linked.txt'))  # links stay within one mount
        os.symlink('/tmp', 'sub')  # a folder of the next job's, sent elsewhere
        print(sorted(os.listdir('.')), os.getuid(), flush=True)
    """)
    # One per slot, each slot's uid planting: side by side, or one after another, as the slave gives a
    # job the slot free the longest (test_jobs_one_after_another_take_turns_on_the_slots).
    planters = [c.submit(plant, timeout=30) for _ in range(SLOTS)]
    for job in planters:
        job.wait(90)
        assert job.status == P.SUCCEEDED, (job.error, job.stderr)
        assert job.stdout.startswith("warm\n['data.txt', 'in.fifo', 'linked.txt', 'main.py', 'own', 'sub'] "), \
            job.stdout
    assert len({job.stdout.split()[-1] for job in planters}) == SLOTS  # every slot's uid planted
    check = WHERE + textwrap.dedent("""
        import os
        names = ('data.txt', 'sub/inner.txt', 'in.fifo', 'linked.txt')
        print(*[open(name).read().strip() for name in names],
              any(os.path.islink(name) for name in ('data.txt', 'sub')), {os.stat(n).st_nlink for n in names},
              sorted(os.listdir('.')), [sorted(os.listdir(d)) for d in ('/tmp', '/var/tmp', '/dev/shm')])
    """)
    files = {"data.txt": "fresh\n", "sub/inner.txt": "inner\n", "in.fifo": "plain\n", "linked.txt": "mine\n"}
    checks = [c.submit(check, files=files, timeout=30) for _ in range(SLOTS)]  # side by side, every slot
    checks += [c.submit(check, files=files, timeout=30) for _ in range(2)]
    for job in checks:
        job.wait(90)
        assert job.status == P.SUCCEEDED, (job.error, job.stderr)
        assert job.stdout == ("warm\nfresh inner plain mine False {1} "
                              "['data.txt', 'in.fifo', 'linked.txt', 'main.py', 'sub'] [[], [], []]\n"), job.stdout
    with open(target) as f:
        assert f.read() == "host\n"
    assert os.stat(target).st_uid == 0 and os.stat(target).st_mode & 0o777 == 0o600


def test_a_warm_jobs_uid_has_a_name(c):
    job = run(c, WHERE + "import getpass, os, subprocess\n"
                 "print(getpass.getuser(), os.getuid())\n"
                 "print(subprocess.run(['whoami'], capture_output=True, text=True).stdout.strip())")
    assert job.status == P.SUCCEEDED, job.record
    where, name_uid, who = job.stdout.splitlines()
    name, uid = name_uid.split()
    assert where == "warm" and name == who == f"job{uid}", job.stdout


def test_random_differs_between_warm_jobs(c):
    source = WHERE + "import random, uuid; print(random.random(), uuid.uuid4())"
    outs = {run(c, source).stdout for _ in range(3)}
    assert len(outs) == 3 and all(o.startswith("warm\n") for o in outs), outs


def test_the_job_cannot_reach_the_parent_or_its_socket(c):
    source = WHERE + textwrap.dedent("""
        import os, signal, stat, fcntl
        kinds = []
        for fd in sorted(int(n) for n in os.listdir('/proc/self/fd')):
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                continue  # listdir's own, closed
            if fd > 2:
                writes = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
                kinds.append('socket' if stat.S_ISSOCK(mode) else 'pipe-w' if stat.S_ISFIFO(mode) and writes else
                             oct(mode))
        # Its own "done" pipe's write end only (warm_zygote.run_python): no socket to its parent
        print(kinds)
        for pid in (1, 2):
            try:
                os.kill(pid, signal.SIGKILL)
                print(pid, 'reached')
            except OSError as exc:
                print(pid, type(exc).__name__)
        print(os.path.exists('/proc/1'), os.path.exists('/proc/2'), os.listdir('/sys/fs/cgroup'))
        with open('/proc/self/status') as f:
            print([l.split()[1] for l in f if l.startswith(('Cap', 'NoNewPrivs', 'Seccomp:'))])
    """)
    job = run(c, source)
    assert job.status == P.SUCCEEDED, job.record
    # No capability held, and none to gain by exec: inheritable, permitted, effective, bounding and
    # ambient all empty, as a fresh job's (the bounding and inheritable sets were bwrap's --cap-add).
    assert job.stdout.splitlines() == [
        "warm", "['pipe-w']", "1 PermissionError", "2 PermissionError", "False False []",
        str(["0000000000000000"] * 5 + ["1", "2"])], job.stdout


# -- the security bars, on the warm path ------------------------------------------------


def test_fork_bomb_is_held_by_the_pids_limit(c):
    job = run(c, SH_WHERE + ":(){ :|:& };: 2>/dev/null; sleep 60", "bash", timeout=3)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT, job.record
    assert job.stdout.startswith("warm\n")
    job = run(c, WHERE + FORK_UNTIL_REFUSED)
    assert job.status == P.SUCCEEDED, job.record
    where, n = job.stdout.split()
    assert where == "warm" and MAX_PROCS - 4 <= int(n) < MAX_PROCS, job.stdout


def test_memory_hog_hits_the_memory_limit(c):
    job = run(c, WHERE + "x = b'x' * (1 << 30)\nprint('allocated')")
    assert job.status == P.FAILED and job.error["code"] == P.MEMORY_LIMIT, job.record
    assert job.stdout == "warm\n"
    job = run(c, SH_WHERE + "python3 -c \"x = b'y' * (1 << 30)\"; exit $?", "bash")
    assert job.status == P.FAILED and job.error["code"] == P.MEMORY_LIMIT, job.record


def test_output_flood_hits_the_output_limit(c):
    job = run(c, SH_WHERE + "yes", "bash")
    assert job.status == P.FAILED and job.error["code"] == P.OUTPUT_LIMIT, job.record
    assert job.stdout.startswith("warm\n") and len(job.stdout.encode()) <= 1 << 20


def test_output_under_the_limit_arrives_whole_on_both_streams(c):
    # Multi-byte characters written in odd-sized pieces: every read may end inside one.
    job = run(c, WHERE + textwrap.dedent("""
        import os
        data = ('é' * 150000).encode() + b'end'
        for i in range(0, len(data), 4097):
            os.write(1, data[i:i + 4097])
            os.write(2, b'\\xc3')  # 'ü', one byte at a time
            os.write(2, b'\\xbc')
    """))
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout == "warm\n" + "é" * 150000 + "end", len(job.stdout)
    assert job.stderr == "ü" * len(range(0, 300003, 4097)), job.stderr[:50]


def test_a_warm_jobs_loopback_is_its_own(c):
    """Another user's job serving on 127.0.0.1 (a notebook's server, a test's) is neither listed
    (/proc/net) nor reachable from a job beside it; a job's own loopback works."""
    server = c.submit(WHERE + textwrap.dedent("""
        import socket, time
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
        u = socket.socket(socket.AF_UNIX); u.bind("\\0distexec-test-abstract"); u.listen()
        print(s.getsockname()[1], flush=True)
        time.sleep(60)
    """), timeout=90)
    wait_for(lambda: len(server.stdout.splitlines()) == 2, 20, "the server job to listen")
    assert server.stdout.startswith("warm\n")
    port = server.stdout.splitlines()[1]
    probe = run(c, WHERE + textwrap.dedent("""
        import socket, sys
        port = int(sys.argv[1])
        print(f":{port:04X} " in open("/proc/net/tcp").read(), "distexec-test-abstract" in open("/proc/net/unix").read())
        for family, address in ((socket.AF_INET, ("127.0.0.1", port)), (socket.AF_UNIX, "\\0distexec-test-abstract")):
            try:
                socket.socket(family).connect(address)
                print("reached")
            except OSError as exc:
                print(type(exc).__name__)
        mine = socket.socket(); mine.bind(("127.0.0.1", 0)); mine.listen()
        socket.create_connection(mine.getsockname(), timeout=5)
        print("own loopback works")
    """), args=[port])
    server.cancel()
    assert probe.status == P.SUCCEEDED, probe.record
    assert probe.stdout.splitlines() == ["warm", "False False", "ConnectionRefusedError", "ConnectionRefusedError",
                                         "own loopback works"], probe.stdout


def test_no_network(c, lc):
    source = WHERE + textwrap.dedent("""
        import socket, sys
        try:
            socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
            print("connected")
        except OSError as exc:
            print(type(exc).__name__)
    """)
    job = run(c, source, args=[str(lc.port)])
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout.splitlines()[0] == "warm"
    assert job.stdout.splitlines()[1] in ("ConnectionRefusedError", "OSError"), job.stdout


def test_no_secret_is_readable(c, lc, box):
    home = os.path.join(box, "home")
    secret_file = os.path.join(home, "connection.json")
    with open(secret_file, "w") as f:
        f.write(f'{{"token": "{lc.token}", "slave_secret": "{lc.secret}"}}')
    os.chmod(secret_file, 0o644)
    source = WHERE + "import os\nprint(sorted(k for k in os.environ if 'DISTEXEC' in k))\n" + READ_EACH_ARG + \
        textwrap.dedent("""
        print(os.path.exists(os.path.dirname(sys.argv[1])) and os.listdir(os.path.dirname(sys.argv[1])))
        print(os.listdir(sys.argv[-1]) if os.path.isdir(sys.argv[-1]) else 'no jobs folder')
    """)
    paths = [secret_file, f"/proc/{lc.slaves[0].pid}/environ", "/etc/shadow", os.path.join(box, "jobs")]
    job = run(c, source, args=paths)
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout.startswith("warm\n[]\n"), job.stdout
    assert "READ" not in job.stdout and lc.token not in job.stdout and lc.secret not in job.stdout
    assert job.stdout.splitlines()[-2] in ("[]", "False"), job.stdout
    assert job.stdout.splitlines()[-1] in ("[]", "no jobs folder"), job.stdout


WRITE = WHERE + textwrap.dedent("""
    import sys
    with open(sys.argv[1] + '/big', 'wb') as f:
        for _ in range(int(sys.argv[2])):
            f.write(b'0' * (1 << 20))
    print('wrote', sys.argv[2])
""")


def test_disk_limit(c):
    for where in (".", "/tmp", "/var/tmp", "/dev/shm"):
        job = run(c, WRITE, args=[where, str(DISK_MB + 8)])
        assert job.status == P.FAILED and job.error["code"] == P.DISK_LIMIT, (where, job.error, job.stderr)
        assert job.stdout == "warm\n" and f"disk limit of {DISK_MB} MiB" in job.error["message"]
    job = run(c, WRITE, args=["/tmp", "8"])
    assert job.status == P.SUCCEEDED and job.stdout == "warm\nwrote 8\n", job.record


# -- ending a job ends only that job ---------------------------------------------------------


def test_cancel_and_timeout_end_only_that_job(c, lc):
    # The other job waits until the victim has ended, however long that takes here.
    steady = WHERE + HOLD + UNTIL_RELEASED + "print('done')"
    victim = c.submit(WHERE + "import time; time.sleep(300)", timeout=120)
    other = c.submit(steady, timeout=120)
    wait_for(lambda: victim.stdout and other.stdout, 20, "both jobs to start")
    victim.cancel()
    assert victim.wait(60).status == P.CANCELLED, victim.record
    release_jobs(lc.slaves[0].pid)
    assert other.wait(60).status == P.SUCCEEDED and other.stdout == "warm\ndone\n", other.record
    spinner = c.submit(WHERE + "while True: pass", timeout=2)
    other = c.submit(steady, timeout=120)
    assert spinner.wait(60).error["code"] == P.TIMEOUT, spinner.record
    release_jobs(lc.slaves[0].pid)
    assert other.wait(60).status == P.SUCCEEDED and other.stdout == "warm\ndone\n", other.record


def test_a_job_ended_as_it_is_handed_to_its_child_is_not_started_again_fresh(c, box):
    """A job killed (its timeout, a cancel, its slave stopping) after the slave handed it to the pool and
    before its child started it: the child "ended before it started".  The slave took that for a child
    that failed on its own and ran the job again in a fresh process, a job that had been ended.  A
    timeout of a microsecond makes the kill come at once, before the child can start the job."""
    before = slave_log(box).count("could not start job")
    jobs = [c.submit(WHERE + "print('ran')", timeout=1e-6) for _ in range(4)]
    for job in jobs:
        assert job.wait(60).status == P.FAILED and job.error["code"] == P.TIMEOUT, job.record
        assert "ran" not in job.stdout, job.record
    assert slave_log(box).count("could not start job") == before, slave_log(box)[-3000:]
    assert c.submit(WHERE + "print('ran')").wait(60).stdout == "warm\nran\n"


# A Python job says it ended on a pipe just before its process exits (warm_zygote.run_python); the job
# holds that pipe's write end, so it can say so itself, early, or write anything there.
DONE_PIPE = textwrap.dedent("""
    import fcntl, os, stat
    done = [fd for fd in range(3, 256) if _is_pipe_w(fd)]

    def _say(data):
        os.write(done[0], data)
""").replace("_is_pipe_w(fd)", "(lambda fd: os.path.exists(f'/proc/self/fd/{fd}') and stat.S_ISFIFO(os.fstat(fd).st_mode)"
             " and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY)(fd)")


@pytest.mark.parametrize("quiet", [False, True], ids=["output-open", "output-closed"])
def test_a_job_that_says_it_ended_and_goes_on_is_killed_before_its_slot_runs_again(c, lc, quiet):
    # It says "done 0" early, then tries to kill every process of its uid for 3 s: a job given its
    # slot (same uid) before it is dead would be killed.  With its output closed, nothing else
    # makes the slave kill it at its "end": the slot's release must.
    liar = WHERE + DONE_PIPE + textwrap.dedent(f"""
        import signal, sys, time
        print('lying', flush=True)
        if {quiet}:
            os.close(1)
            os.close(2)
        _say(b'done 0')
        end = time.time() + 3
        while time.time() < end:
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
        sys.exit(5)
    """)
    job = c.submit(liar, timeout=30)
    assert job.wait(60).status == P.SUCCEEDED and job.exit_code == 0 and job.stdout == "warm\nlying\n", job.record
    # Both followers alive at once in the liar's slots, before either goes on: one given its slot too
    # early is killed on the spot.
    followers = [c.submit(WHERE + HOLD + UNTIL_RELEASED + "print('alive')", timeout=60) for _ in range(SLOTS)]
    wait_for(lambda: len(held_jobs(lc.slaves[0].pid)) == SLOTS or all(f.done for f in followers), 30,
             "both followers to wait for their release")
    release_jobs(lc.slaves[0].pid)
    for f in followers:
        assert f.wait(60).status == P.SUCCEEDED and f.stdout == "warm\nalive\n", f.record
    wait_for(lambda: not job_processes(lc), 15, "the lying job to be gone")


def test_a_fifo_the_job_puts_under_its_done_pipes_number_never_gets_the_done(c):
    # The job closes its "done" pipe and puts a FIFO at that number; a reader it forked prints what
    # lands there.  The end is written only to the pipe the child made (same device and inode), so
    # nothing lands, and the end is heard when the process is reaped.
    job = run(c, WHERE + DONE_PIPE + textwrap.dedent("""
        os.mkfifo('planted')
        fd = os.open('planted', os.O_RDWR)
        os.dup2(fd, done[0])
        if os.fork() == 0:
            print('got', os.read(fd, 64), flush=True)
            os._exit(0)
        print('main', flush=True)
    """), timeout=30)
    assert (job.status, job.exit_code, job.stdout) == (P.SUCCEEDED, 0, "warm\nmain\n"), job.record


def test_a_process_the_job_forks_that_runs_to_the_end_of_its_code_does_not_end_the_job(c):
    # The forked child reaches the end of the script first; the job ends when its own process does.
    job = run(c, WHERE + textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            print('child', flush=True)
        else:
            os.wait()
            time.sleep(0.3)
            print('parent')
    """))
    assert (job.status, job.stdout) == (P.SUCCEEDED, "warm\nchild\nparent\n"), job.record


def test_what_a_job_writes_on_its_done_pipe_is_no_more_than_its_exit_code(c):
    for said, code in [(b"nonsense", 3), (b"done -1", 4), (b"done 12345", 6), (b"done 7 8", 9), (b"x" * 60000, 10)]:
        job = run(c, WHERE + DONE_PIPE + f"os.set_blocking(done[0], False)\ntry:\n    _say({said!r})\n"
                  f"except BlockingIOError:\n    pass\nraise SystemExit({code})")
        assert (job.exit_code, job.stdout) == (code, "warm\n"), (said, job.record)
    # Its own exit code, said early, is taken: the job could have exited with it.  (It waits for the parent
    # to read it: at once, its real end's "done 1" could join it on the pipe, and the parent takes neither.)
    job = run(c, WHERE + DONE_PIPE + textwrap.dedent("""
        import struct, termios, time
        _say(b'done 42')
        deadline = time.monotonic() + 30
        while struct.unpack('i', fcntl.ioctl(done[0], termios.FIONREAD, bytes(4)))[0] and time.monotonic() < deadline:
            time.sleep(0.001)
        raise SystemExit(1)
    """))
    assert job.exit_code == 42, job.record


def test_a_daemon_left_by_a_job_is_killed_when_it_ends(c, lc):
    job = run(c, WHERE + DOUBLE_FORKING_DAEMON)
    assert (job.status, job.stdout) == (P.SUCCEEDED, "warm\ndaemon up\n"), job.record
    wait_for(lambda: not job_processes(lc), 15, "the daemon to be gone")


# -- falling back to a fresh process -----------------------------------------------------------


def test_a_job_the_pool_does_not_serve_runs_fresh_and_the_log_says_why(c, box):
    # Its directory dies with a warm child: a job that collects files runs in a fresh process.
    job = run(c, WHERE + "open('kept.txt', 'w').write('kept')", collect=["kept.txt"])
    assert (job.status, job.stdout) == (P.SUCCEEDED, "fresh\n"), job.record
    assert [a["name"] for a in job.artifacts] == ["kept.txt"] and job.artifact("kept.txt") == b"kept", job.record
    assert "warm pool: jobs that collect files are not served warm" in slave_log(box)


C_PROGRAM = textwrap.dedent("""
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <unistd.h>
    int main(int argc, char **argv) {
        char b[4096];
        printf("%s %d\\n", getcwd(b, sizeof b), (int)getuid());
        fflush(stdout);
        if (argc > 1) raise(SIGSEGV);
        return 0;
    }
""")


def test_a_cached_compiled_program_runs_warm(c, box):
    first = run(c, C_PROGRAM, "c", timeout=60)
    assert first.status == P.SUCCEEDED, first.record
    # Compiled in a fresh process (the cache had nothing), then kept: the next run is warm.
    assert first.stdout.startswith(os.path.join(box, "jobs")), first.stdout
    assert "warm pool: a compiled program not in the compile cache yet" in slave_log(box)
    again = run(c, C_PROGRAM, "c", timeout=60)
    assert again.status == P.SUCCEEDED, again.record
    cwd, uid = again.stdout.split()
    assert cwd.startswith("/run/distexec/job") and int(uid) in WARM_UIDS, again.stdout
    # Run warm once, the program is kept in memory too: warm again with the disk's copy gone.
    cache = os.path.join(box, "home", "cache", "compile")
    for entry in os.listdir(cache):  # the entries, not the cache's own folder (later stores go there)
        shutil.rmtree(os.path.join(cache, entry))
    # Signals are told as for a fresh process.
    crash = run(c, C_PROGRAM, "c", timeout=60, args=["crash"])
    assert crash.status == P.FAILED and crash.error["code"] == P.SIGNAL, crash.record
    assert crash.error["signal"] == "SIGSEGV" and crash.stdout.startswith("/run/distexec/job"), crash.record


STREAMING_C = textwrap.dedent("""
    #include <stdio.h>
    #include <unistd.h>
    int main(void) {
        char b[4096];
        printf("%s\\n", getcwd(b, sizeof b));
        fprintf(stderr, "on stderr\\n");
        sleep(60);
        return 0;
    }
""")


def test_a_cached_compiled_programs_lines_stream_while_it_runs_warm(c, box):
    # No fflush: a C program's stdout on a pipe is line-buffered by the slave (stdbuf's library,
    # set in the environment; slave/stdbuf.py), warm as in a fresh process.
    for warm in (False, True):
        job = c.submit(STREAMING_C, language="c", timeout=120)
        # Before its end: it sleeps 60 s.
        wait_for(lambda: job.stdout.endswith("\n") and "on stderr" in job.stderr, 30, "the first lines")
        assert job.stdout.startswith("/run/distexec/job" if warm else os.path.join(box, "jobs")), job.stdout
        job.cancel()
        job.wait(30)
        assert job.status == P.CANCELLED, job.record


def test_a_cached_program_too_big_to_hold_in_the_slaves_memory_runs_fresh_and_the_log_says_why(c, box):
    # 20 MiB of initialised data in the executable: over what the pool holds of one program.
    big = textwrap.dedent("""
        #include <stdio.h>
        #include <unistd.h>
        char big[20 << 20] = {1};
        int main(int argc, char **argv) {
            char b[4096];
            printf("%s %d\\n", getcwd(b, sizeof b), big[argc - 1] + big[(20 << 20) - argc]);
            return 0;
        }
    """)
    for _ in range(3):  # the first compiles it; the others find it in the compile cache
        job = run(c, big, "c", timeout=120)
        assert job.status == P.SUCCEEDED, job.record
        cwd, first = job.stdout.split()
        assert cwd.startswith(os.path.join(box, "jobs")) and first == "1", job.stdout
    assert "warm pool: a compiled program larger than 16 MiB (run from the disk)" in slave_log(box)


# Where each ran, its pid and uid, and what its runtime takes as its heap's limit.
PROBES = {
    "javascript": ("const v8 = require('v8');\n"
                   "console.log(process.cwd(), process.pid, process.getuid(), v8.getHeapStatistics().heap_size_limit);",
                   None),
    "ruby": ("puts [Dir.pwd, Process.pid, Process.uid, 0].join(' ')", None),
    # The uid from /proc: the JDK's UnixSystem says 0 for a uid with no account (a slot's).
    "java": ("import java.nio.file.*;\n"
             "public class Main { public static void main(String[] a) throws Exception {\n"
             "  String uid = Files.readAllLines(Paths.get(\"/proc/self/status\")).stream()\n"
             "    .filter(l -> l.startsWith(\"Uid:\")).findFirst().get().split(\"\\\\s+\")[1];\n"
             "  System.out.println(Paths.get(\"\").toAbsolutePath() + \" \" + ProcessHandle.current().pid()\n"
             "    + \" \" + uid + \" \" + Runtime.getRuntime().maxMemory());\n"
             "} }\n", "compiled first in a fresh process"),
}


@pytest.mark.parametrize("language", sorted(PROBES))
def test_javascript_ruby_and_cached_java_run_warm_each_in_a_new_process_told_its_memory_limit(c, box, language):
    source, first = PROBES[language]
    runs = [run(c, source, language, timeout=120) for _ in range(3)]
    assert all(job.status == P.SUCCEEDED for job in runs), [job.record for job in runs]
    seen = [job.stdout.split() for job in runs]
    if first:  # not in the compile cache yet: its first run is a fresh process's, its heap sized by the cgroup
        assert seen[0][0].startswith(os.path.join(box, "jobs")), seen
        fresh_heap, seen = int(seen[0][3]), seen[1:]
    assert all(cwd.startswith("/run/distexec/job") and int(uid) in WARM_UIDS for cwd, _, uid, _ in seen), seen
    assert len({cwd for cwd, *_ in seen}) == len(seen), seen  # a directory of its own
    assert len({(cwd, pid) for cwd, pid, *_ in seen}) == len(seen), seen
    heaps = {int(heap) for *_, heap in seen}
    if language == "java":  # the heap a warm JVM gives itself is the one it gives itself in a fresh job
        assert heaps == {fresh_heap}, (heaps, fresh_heap)
    if language == "javascript":  # not the machine's memory: within the job's limit
        assert all(0 < heap < SMALL_MEMORY_MB << 20 for heap in heaps), heaps


def test_a_warm_node_that_outgrows_its_limit_ends_with_a_clear_error(c):
    job = run(c, "const a = []; for (;;) a.push(new Array(1 << 20).fill(1.5));", "javascript", timeout=60)
    assert job.status == P.FAILED, job.record
    # Node's own heap limit (set from the job's) or the cgroup's: either says it was memory.
    assert "heap out of memory" in job.stderr or job.error["code"] == P.MEMORY_LIMIT, job.record


def test_a_job_whose_parent_dies_runs_again_fresh_and_the_parent_comes_back(c, lc, box):
    parent = zygote(lc)
    job = c.submit(WHERE + HOLD + "print('up', flush=True)\n" + UNTIL_RELEASED + "print('done')", timeout=60)
    wait_for(lambda: "up" in job.stdout, 20, "the job to start")
    parent.send_signal(signal.SIGKILL)
    # Released only once it runs again, fresh: the first run's child, still dying, may be held too.
    wait_for(lambda: "fresh\nup\n" in c.job(job.id).stdout, 30, "the job to run again, fresh")
    release_jobs(lc.slaves[0].pid)
    job.wait(60)
    assert job.status == P.SUCCEEDED, job.record
    # Its first run died with the parent; it ran again, whole, in a fresh process.
    assert job.stdout.endswith("fresh\nup\ndone\n"), job.stdout
    assert "ran again in a fresh process" in job.stderr
    assert "its parent died" in slave_log(box)
    # The autouse check waits for a job to run warm again: a new parent.
    wait_for(lambda: another_parent(lc, parent), 30, "a new parent")


def test_a_cancelled_job_whose_parent_dies_before_telling_its_end_is_not_run_again(c, lc, box):
    """A job the parent dies under runs again, whole, in a fresh process: nothing of it may have been
    lost.  Not one that was ended already (cancelled, timed out) and whose parent died before it told
    the end: that one ran again too, in a fresh process, for a job its user had ended."""
    parent = zygote(lc)
    job = c.submit(WHERE + "import time; print('up', flush=True); time.sleep(60)", timeout=60)
    wait_for(lambda: "up" in job.stdout, 20, "the job to start")
    parent.send_signal(signal.SIGSTOP)  # it cannot tell the end now
    cancel = threading.Thread(target=job.cancel)  # which returns once the job has ended
    try:
        cancel.start()
        # The slave kills the job's processes itself (its cgroup), then waits for the parent's word.
        wait_for(lambda: not job_processes(lc), 20, "the cancelled job's process to be killed")
    finally:
        parent.send_signal(signal.SIGKILL)  # within that wait: the parent dies without a word
        cancel.join(60)
    assert job.wait(60).status == P.CANCELLED, job.record
    assert job.stdout == "warm\nup\n" and "ran again" not in job.stderr, (job.stdout, job.stderr)
    wait_for(lambda: another_parent(lc, parent), 30, "a new parent")


def test_a_killed_job_whose_end_goes_untold_ends_as_killed_and_does_not_run_again(c, lc, box):
    parent = zygote(lc)
    job = c.submit(WHERE + "import time; print('up', flush=True); time.sleep(30)", timeout=2)
    wait_for(lambda: "up" in job.stdout, 20, "the job to start")
    # Frozen, the parent cannot tell the job's end once it is killed at its timeout, as when the job's
    # processes are slow to die.
    parent.send_signal(signal.SIGSTOP)
    try:
        job.wait(60)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent.send_signal(signal.SIGCONT)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT, job.record
    # Ended as it was ended: not run again, whole, for another timeout, with a note of a parent's death.
    assert job.stdout == "warm\nup\n" and "ran again" not in job.stderr, job.record
    assert "no word of job" in slave_log(box)
    wait_for(lambda: another_parent(lc, parent), 30, "a new parent")


def test_no_warm_runs_every_job_fresh(make_cluster, tmp_path):
    other = make_cluster(1, slots=1, languages="python", slave_args=["--no-warm", "--warm-imports", "decimal"])
    with Cluster(other.url, token=other.token) as client:
        job = run(client, WHERE)
    assert (job.status, job.stdout) == (P.SUCCEEDED, "fresh\n"), job.record
    # Asked for imports it has no pool for: said, not silently dropped.
    assert "--warm-imports decimal ignored: no warm pool here (--no-warm)" in \
        (tmp_path / "logs" / "slave-1.log").read_text()


# A job's mount table, as a list of mount points, after where it ran (WHERE).
MOUNTS = WHERE + "print('\\n'.join(line.split()[4] for line in open('/proc/self/mountinfo')))\n"


def test_a_job_lists_no_other_jobs_directory_among_its_mounts(make_cluster):
    """bwrap binds the host's tree and covers the job folders with a tmpfs: covered, another job's
    tmpfs was still listed in /proc/self/mountinfo, by its folder's name and its slave's UID, in a
    fresh job, a session and every warm job whose pool started while it was mounted.  Now each
    sandbox's table is made without them (slave/mountview.py)."""
    from slave.jobdirs import FOLDER_PREFIX

    lc = make_cluster(1, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as client:
        # Files to collect: a job the pool does not serve, in a directory mounted on the host.
        first = client.submit("import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(120)\n",
                              collect=["none"], timeout=150)
        try:
            wait_for(lambda: first.stdout, 30, "the first job's directory")
            top = os.path.dirname(first.stdout.strip())
            assert os.path.ismount(top), top
            # Its pool's parent starts while the first job's directory is mounted; the first holds the
            # first slave's one slot, so every probe runs on this one.
            second = lc.start_slave()
            for how, kwargs in (("warm", {}), ("fresh", {"collect": ["none"]}), ("session", {"session": "s"})):
                job = client.submit(MOUNTS, timeout=60, **kwargs).wait(90)
                assert job.status == P.SUCCEEDED and job.slave_uid == second.uid, (how, job.record)
                where, *points = job.stdout.splitlines()
                assert where == ("warm" if how == "warm" else "fresh"), (how, where)
                assert os.path.basename(top) not in job.stdout and first.slave_uid not in job.stdout, (how, points)
                # No other job's either (another slave's on this host): only its own folder, if any.
                folders = {(p.split(FOLDER_PREFIX, 1)[1] + "/").split("/")[1] for p in points if FOLDER_PREFIX in p}
                assert len(folders) <= (0 if how == "warm" else 1), (how, points)
        finally:
            first.cancel()
            first.wait(60)


def test_modules_the_pool_imports_once_are_in_each_job_and_what_a_job_changes_in_them_stays_its_own(
        make_cluster, tmp_path):
    # decimal is imported by nothing else at a Python job's start: here only because the pool did.
    other = make_cluster(1, slots=1, languages="python",
                         slave_args=["--warm-imports", "decimal,json,no_such_module_here"])
    log = (tmp_path / "logs" / "slave-1.log").read_text()
    assert "imported once for every Python job: decimal, json;" in log, log
    assert "--warm-imports no_such_module_here not imported (ModuleNotFoundError" in log, log
    with Cluster(other.url, token=other.token) as client:
        first = run(client, WHERE + textwrap.dedent("""
            import sys
            print('decimal' in sys.modules, 'json' in sys.modules)
            import decimal, json
            json.dumps = lambda *a, **k: 'tampered'
            decimal.getcontext().prec = 3
            decimal.MARK = 'left by the first job'
        """))
        assert (first.status, first.stdout) == (P.SUCCEEDED, "warm\nTrue True\n"), first.record
        second = run(client, WHERE + textwrap.dedent("""
            import decimal, json
            print(json.dumps([1]), decimal.getcontext().prec, hasattr(decimal, 'MARK'))
        """))
        assert (second.status, second.stdout) == (P.SUCCEEDED, "warm\n[1] 28 False\n"), second.record


def test_numpy_imported_once_by_the_pool_draws_a_different_sequence_in_each_job(make_cluster):
    # numpy.random's global generator is seeded at its import: in the parent, once, for every child.
    other = make_cluster(1, slots=1, languages="python", slave_args=["--warm-imports", "numpy"])
    with Cluster(other.url, token=other.token) as client:
        source = WHERE + "import sys\nprint('numpy' in sys.modules)\nimport numpy\nprint(list(numpy.random.randint(0, 2**31, 4)))"
        outs = [run(client, source) for _ in range(3)]
    assert all(o.status == P.SUCCEEDED and o.stdout.startswith("warm\nTrue\n") for o in outs), [o.record for o in outs]
    assert len({o.stdout for o in outs}) == 3, [o.stdout for o in outs]


def test_an_import_that_starts_a_thread_is_refused_and_the_current_directory_is_not_searched(tmp_path):
    # The parent's own import step (slave/warm_zygote.py), run on its own: a fork copies only the
    # thread that forks, so a module that starts one cannot be shared with the children.
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "threaded.py").write_text("import threading, time\n"
                                         "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    (tmp_path / "planted.py").write_text("raise SystemExit('imported from the current directory')\n")
    probe = textwrap.dedent("""
        import sys
        from slave.warm_zygote import _preload
        print(_preload(['planted', 'json']))
        sys.path.append(sys.argv[1])
        try:
            _preload(['threaded'])
        except OSError as exc:
            print(exc)
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "mods")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": repo})
    assert out.returncode == 0, out.stderr
    refused, why = out.stdout.splitlines()
    assert refused == "[('planted', \"ModuleNotFoundError: No module named 'planted'\")]", out.stdout
    assert why == "importing threaded started 1 thread(s), which no child would have", out.stdout


def test_a_job_sent_as_soon_as_the_slave_registers_waits_for_the_warm_pool(make_cluster, tmp_path):
    # The pool's parent starts while the slave registers: the first job must still run warm.
    other = make_cluster(1, slots=1, languages="python", wait_complete=False)
    with Cluster(other.url, token=other.token) as client:
        job = client.submit(WHERE + "print('first')").wait(60)
    assert job.status == P.SUCCEEDED, job.error
    assert job.stdout == "warm\nfirst\n"
    assert "parent ready" in (tmp_path / "logs" / "slave-1.log").read_text()


def test_a_killed_slave_takes_its_warm_jobs_with_it(make_cluster):
    other = make_cluster(1, slots=1, languages="python,bash")
    with Cluster(other.url, token=other.token) as client:
        job = client.submit(SH_WHERE + "sleep 300 & setsid sleep 301 & wait", language="bash", timeout=600)
        wait_for(lambda: job.stdout == "warm\n", 20, "the job to start")

        def sleeps():
            return [p for p in psutil.Process(other.slaves[0].pid).children(recursive=True)
                    if p.name() == "sleep"]
        procs = wait_for(lambda: len(sleeps()) == 2 and sleeps(), 20, "the job's sleeps")
    dead = other.slaves[0]
    dead.proc.kill()
    dead.proc.wait(10)
    # bwrap dies with the slave, the parent with bwrap, and every job with the parent's PID namespace.
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, alive


def test_the_parents_end_message_is_parsed_as_words_and_a_malformed_one_refused():
    ident, ended = _ended("exit 7 -9 1048576,100,90 0 ")
    assert (ident, ended.exit_code, ended.free, ended.error, ended.disk) == (7, -9, [1048576, 100, 90], None, False)
    ident, ended = _ended("exit 8 - - 1 OSError(28, 'No space left') (line 3)\nmore")
    assert (ident, ended.exit_code, ended.free, ended.disk) == (8, None, None, True)
    assert ended.error == "OSError(28, 'No space left') (line 3)\nmore"
    for bad in ("exit 9 0 - 0", "exit x 0 - 0 ", "exit 9 0 1,a 0 "):
        with pytest.raises(ValueError):
            _ended(bad)

