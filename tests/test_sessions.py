"""Persistent Python sessions (``session=NAME``): placement, then real clusters.

The scheduler is fed events; everything else runs against real masters and
slaves (``make_cluster``), whose session kernels are real ipykernels.
"""
from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest

from distexec_kernel import Cluster, diagnostics as D, protocol as P
from distexec_kernel.cluster import DistexecError
from master.scheduler import Scheduler

from conftest import (HOLD, UNTIL_RELEASED, assert_gone, held_jobs, logs, release_jobs, release_until_done,
                      shared_cluster, wait_for)

WAIT = 60  # seconds a job may take: a session's first job starts a kernel on a loaded machine


# --- the scheduler, fed events ------------------------------------------------

def _two_slaves(slots: int = 2) -> Scheduler:
    s = Scheduler()
    s.add_slave("a", ["python"], slots)
    s.add_slave("b", ["python"], slots)
    return s


def test_session_binds_to_its_first_slave():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    [(job, home)] = s.assign()
    assert job == 1
    s.finished(1)
    # The other slave is idle longer, which would win a plain job; the session stays.
    for j in range(2, 8):
        s.enqueue(j, "python", "x")
        assert s.assign() == [(j, home)]
        s.finished(j)
    assert s.session_slave == {"x": home}


def test_session_jobs_run_one_at_a_time_in_order():
    s = _two_slaves(slots=4)
    for j in (1, 2, 3):
        s.enqueue(j, "python", "x")
    s.enqueue(4, "python")
    first = s.assign()
    # Job 1 of the session starts; 2 and 3 wait for it, but do not hold back job 4.
    assert [j for j, _ in first] == [1, 4]
    assert list(s.queue) == [2, 3]
    assert s.assign() == []
    s.finished(1)
    [(job, uid)] = s.assign()
    assert job == 2 and uid == s.session_slave["x"]
    s.finished(2)
    assert [j for j, _ in s.assign()] == [3]


def test_two_sessions_are_independent():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python", "y")
    placed = dict(s.assign())
    assert set(placed) == {1, 2}
    # Least loaded first: the two sessions land on different slaves.
    assert placed[1] != placed[2]
    assert s.session_slave == {"x": placed[1], "y": placed[2]}


def test_session_waits_for_its_full_slave_without_blocking_others():
    s = _two_slaves(slots=1)
    s.enqueue(1, "python", "x")
    [(_, home)] = s.assign()
    s.finished(1)
    s.enqueue(2, "python")  # a plain job takes the session's slave? either is free
    s.enqueue(3, "python")
    s.assign()
    assert not s.queue
    s.enqueue(4, "python", "x")
    s.enqueue(5, "python")
    # Both slots are taken: nothing starts.
    assert s.assign() == []
    other = "b" if home == "a" else "a"
    job_on_other = next(j for j, owner in s.running.items() if owner == other)
    s.finished(job_on_other)
    # A slot frees on the other slave: the plain job takes it, the session job waits.
    assert s.assign() == [(5, other)]
    job_on_home = next(j for j, owner in s.running.items() if owner == home)
    s.finished(job_on_home)
    assert s.assign() == [(4, home)]


def test_lost_slave_drops_its_sessions_and_hands_back_their_queued_jobs():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    [(_, home)] = s.assign()
    s.enqueue(2, "python", "x")
    s.enqueue(3, "python", "x")
    s.enqueue(4, "python")
    assert s.remove_slave(home) == [1]
    names, queued = s.drop_sessions(home)
    assert names == ["x"] and queued == [2, 3]
    assert list(s.queue) == [4]
    s.finished(1)
    # The next job of the name starts a new session on a slave still here.
    s.enqueue(5, "python", "x")
    placed = dict(s.assign())
    assert placed[5] != home and s.session_slave["x"] == placed[5]


def test_cancelled_queued_session_job_does_not_hold_the_session():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python", "x")
    s.enqueue(3, "python", "x")
    s.assign()
    assert s.dequeue(2)
    s.finished(1)
    assert [j for j, _ in s.assign()] == [3]


def test_reported_session_binds_and_a_second_owner_is_refused():
    s = _two_slaves()
    assert s.bind_session("x", "b")
    assert not s.bind_session("x", "a")
    s.enqueue(1, "python", "x")
    assert s.assign() == [(1, "b")]
    s.finished(1)
    assert s.unbind_session("x") == "b"
    assert "x" not in s.session_slave


def test_restored_running_session_job_keeps_the_session_busy():
    s = Scheduler()
    s.mark_running(7, "a", session="x")
    s.add_slave("a", ["python"], 2, running=[7])
    s.bind_session("x", "a")
    s.enqueue(8, "python", "x")
    assert s.assign() == []
    s.finished(7)
    assert s.assign() == [(8, "a")]


def test_a_session_on_a_draining_slave_waits_there():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    [(_, home)] = s.assign()
    s.finished(1)
    s.set_accepting(home, False)
    s.enqueue(2, "python", "x")
    s.enqueue(3, "python")
    # The plain job goes to the other slave; the session's job is not moved away from its variables.
    assert s.assign() == [(3, "b" if home == "a" else "a")]
    assert list(s.queue) == [2]
    names, queued = s.drop_sessions(home)
    assert names == ["x"] and queued == [2] and not s.queue


def test_requeued_session_job_keeps_its_session():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python", "x")
    s.assign()
    s.finished(1)
    s.requeue_front(1, "python", "x")
    # Job 1 goes first again, and job 2 still waits behind it.
    assert [j for j, _ in s.assign()] == [1]
    assert list(s.queue) == [2]


# --- real clusters ---------------------------------------------------------------

@pytest.fixture(scope="module")
def py_cluster(tmp_path_factory):
    """Two slaves of two slots, offering Python only (sessions need no other
    toolchain), shared by the tests that break nothing: each uses its own
    session names, and the ``py_client`` fixture ends its sessions."""
    with shared_cluster(tmp_path_factory, "sessions", 2, slots=2, languages="python") as lc:
        yield lc
        kernels = [k for child in lc.slaves for k in kernels_of(child)]
    assert_gone(kernels, "kernel processes")


@pytest.fixture
def py_client(py_cluster):
    c = Cluster(py_cluster.url, token=py_cluster.token)
    yield c
    for s in c.sessions():
        try:
            c.end_session(s["name"])
        except DistexecError as exc:  # it ended by itself meanwhile
            assert exc.status == 404
    c.close()


def kernels_of(child) -> list[psutil.Process]:
    """The session kernels (and their sandbox wrappers) a slave process started."""
    try:
        procs = psutil.Process(child.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if any("ipykernel_launcher" in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def run(c: Cluster, source: str, **kw):
    return c.submit(source, **kw).wait(WAIT)


def test_variables_live_from_one_job_to_the_next(py_client):
    first = run(py_client, "x = 41\nprint('set')", session="s")
    assert first.status == P.SUCCEEDED, first.stderr
    assert first.stdout == "set\n"
    # The last line's value shows, as in a notebook.
    second = run(py_client, "x += 1\nx", session="s")
    assert second.status == P.SUCCEEDED, second.stderr
    assert second.stdout == "42\n"
    assert second.exit_code == 0 and second.session == "s"
    assert second.slave_uid == first.slave_uid


def test_the_slave_says_when_sessions_and_jobs_run_different_pythons(py_client, py_cluster):
    """A session's kernel needs ipykernel, so it runs in the slave's own interpreter; fresh jobs run the
    python3 detected on PATH.  A researcher imported pandas in a session, then not in a map: the slave's
    log now says so whenever the two differ (and only then)."""
    probe = "import os, sys\nprint(os.path.realpath(sys.executable))"
    fresh = run(py_client, probe).stdout
    session = run(py_client, probe, session="which-python").stdout
    with open(os.path.join(py_cluster.log_dir, "slave-1.log")) as f:
        said = "a module installed for one is not there for the other" in f.read()
    assert said == (fresh != session), (fresh, session)


def test_sessions_are_independent_and_plain_jobs_are_fresh(py_client):
    assert run(py_client, "x = 'a'", session="a").status == P.SUCCEEDED
    assert run(py_client, "x = 'b'", session="b").status == P.SUCCEEDED
    assert run(py_client, "print(x)", session="a").stdout == "a\n"
    assert run(py_client, "print(x)", session="b").stdout == "b\n"
    plain = run(py_client, "print(x)")
    assert plain.status == P.FAILED and "NameError" in plain.stderr
    # A session-less job runs in a process of its own, not in a kernel.
    assert run(py_client, "import sys; print('ipykernel' in sys.modules)").stdout == "False\n"
    assert run(py_client, "import sys; print('ipykernel' in sys.modules)", session="a").stdout == "True\n"


def test_a_session_stays_on_its_slave_and_runs_its_jobs_in_order(py_client, py_cluster):
    assert len(py_client.slaves()) == 2
    first = run(py_client, "seen = []", session="order")
    assert first.status == P.SUCCEEDED, first.stderr
    # Submitted back to back, without waiting: they queue and run one at a time, in order.
    jobs = [py_client.submit(f"seen.append({i}); print(len(seen))", session="order") for i in range(12)]
    # Plain jobs meanwhile spread over both slaves: they run at once, held until each slave has one.
    plain = [py_client.submit(HOLD + UNTIL_RELEASED + "print('plain')") for _ in range(6)]
    pids = [s.proc.pid for s in py_cluster.slaves]
    wait_for(lambda: all(held_jobs(pid) for pid in pids), WAIT, "plain jobs running on both slaves")
    release_until_done(plain, *pids, timeout=WAIT)
    for j in jobs + plain:
        j.wait(WAIT)
    assert [j.status for j in jobs] == [P.SUCCEEDED] * 12, [j.stderr for j in jobs]
    assert {j.slave_uid for j in jobs} == {first.slave_uid}
    assert [j.stdout for j in jobs] == [f"{i + 1}\n" for i in range(12)]
    assert run(py_client, "print(seen)", session="order").stdout == f"{list(range(12))}\n"
    assert all(j.status == P.SUCCEEDED for j in plain)
    assert {j.slave_uid for j in plain} == {s["uid"] for s in py_client.slaves()}


def test_an_exception_fails_the_job_and_the_session_survives(py_client):
    assert run(py_client, "kept = 'still here'", session="e").status == P.SUCCEEDED
    bad = run(py_client, "print('before')\nraise ValueError('bad value')", session="e")
    assert bad.status == P.FAILED
    assert bad.error["code"] == P.NONZERO_EXIT
    assert "ValueError: bad value" in bad.error["message"]
    assert bad.error["line"] == 2
    assert bad.exit_code == 1
    assert bad.stdout == "before\n"
    assert "Traceback" in bad.stderr and "ValueError: bad value" in bad.stderr
    assert "\x1b[" not in bad.stderr  # plain text, no terminal colours
    after = run(py_client, "print(kept)", session="e")
    assert after.status == P.SUCCEEDED and after.stdout == "still here\n"
    # A traceback names the jobs whose cells its frames are in (the kernel's In[N] is not the
    # notebook's), and the error's line is the failing cell's own.
    defined = run(py_client, "def f():\n    return 1 / 0", session="e")
    called = run(py_client, "x = 1\nf()", session="e")
    assert called.status == P.FAILED and called.error["line"] == 2, called.error
    assert f"Cell of job {called.id}, line 2" in called.stderr, called.stderr
    assert f"Cell of job {defined.id}, line 2, in f" in called.stderr and "Cell In[" not in called.stderr
    code = run(py_client, "import sys; sys.exit(3)", session="e")
    assert code.status == P.FAILED and code.exit_code == 3 and code.error["code"] == P.NONZERO_EXIT
    assert run(py_client, "import sys; sys.exit(0)", session="e").status == P.SUCCEEDED


def test_args_and_stdin_belong_to_each_job(py_client):
    job = run(py_client, "import sys\nprint(sys.argv[1:])\nprint(input('name? '))\nprint(sys.stdin.read())",
              session="io", args=["a", "b c"], stdin="ada\nrest\n")
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout == "['a', 'b c']\nname? ada\nada\nrest\n\n"
    # The next job gets its own (none): no leftovers from the last one.
    nxt = run(py_client, "import sys\nprint(sys.argv[1:], repr(sys.stdin.read()))", session="io")
    assert nxt.stdout == "[] ''\n"
    eof = run(py_client, "input()", session="io")
    assert eof.status == P.FAILED and "EOFError" in eof.error["message"]


def test_files_land_in_the_session_directory_and_stay(py_client):
    job = run(py_client, "print(open('data.txt').read())", session="f", files={"data.txt": "hello"})
    assert job.status == P.SUCCEEDED and job.stdout == "hello\n", job.stderr
    later = run(py_client, "import os\nprint(open('data.txt').read(), os.getcwd() == os.environ['HOME'])", session="f")
    assert later.stdout == "hello True\n", later.stderr


def test_output_streams_and_cancel_keeps_the_session(py_client):
    assert run(py_client, "kept = 7", session="c").status == P.SUCCEEDED
    job = py_client.submit("print('tick', flush=True)\nimport time\ntime.sleep(120)", session="c")
    wait_for(lambda: py_client.job(job.id).stdout == "tick\n", WAIT, "the first line to stream")
    assert py_client.job(job.id).status == P.RUNNING
    job.cancel()
    job.wait(WAIT)
    assert job.status == P.CANCELLED and job.error["code"] == P.CANCELLED_CODE
    assert job.stdout == "tick\n"
    after = run(py_client, "print(kept)", session="c")
    assert after.status == P.SUCCEEDED and after.stdout == "7\n"


def test_timeout_interrupts_the_cell_and_the_session_lives_on(py_client):
    assert run(py_client, "kept = 'yes'", session="t").status == P.SUCCEEDED
    job = run(py_client, "import time\ntime.sleep(60)", session="t", timeout=1)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT
    assert "KeyboardInterrupt" in job.stderr
    assert run(py_client, "print(kept)", session="t").stdout == "yes\n"


def next_request_wrapped(before: str = "pass", after: str = "pass") -> str:
    """A cell that sets ``kept`` and has the kernel run ``before`` as it takes its next request, and
    ``after`` once that request's code is over (then the kernel is as before): how the tests below make
    a race certain."""
    return ("kernel = get_ipython().kernel\n"
            "inner = kernel.do_execute\n"
            "async def once(*args, **kwargs):\n"
            "    kernel.do_execute = inner\n"
            f"    {before}\n"
            "    reply = inner(*args, **kwargs)\n"
            "    reply = (await reply) if hasattr(reply, '__await__') else reply\n"
            f"    {after}\n"
            "    return reply\n"
            "kernel.do_execute = once\n"
            "kept = 'yes'")


def test_an_interrupt_that_costs_the_cell_its_reply_leaves_the_session_alive(py_client):
    """A SIGINT that lands as a cell ends, after its code and before ipykernel sends its reply, makes the
    kernel drop the reply ("KeyboardInterrupt caught in kernel"); the kernel is idle and well.  Before,
    the slave waited for that reply, called the cell stuck, and ended the session: its variables gone.
    The race made certain: the next cell's handler raises KeyboardInterrupt once the cell's code is over."""
    late = next_request_wrapped(after="raise KeyboardInterrupt")
    assert run(py_client, late, session="race").status == P.SUCCEEDED
    job = run(py_client, "import time\ntime.sleep(60)", session="race", timeout=1)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT, job.error
    assert "did not stop" not in job.stderr, job.stderr
    after = run(py_client, "print(kept)", session="race")
    assert after.status == P.SUCCEEDED and after.stdout == "yes\n", after.stderr


def test_a_cell_whose_reply_a_late_sigint_drops_ends_at_once(py_client):
    """The same lost reply with no interrupt of ours: the cell's own code (here, the kernel's handler)
    raises KeyboardInterrupt after the cell's code is over.  The kernel goes idle without a reply; the
    slave used to wait REPLY_TIMEOUT (5 s) for it, so a job with 3 s to run timed out although its code
    had ended.  Now the slave asks the kernel (a probe) when the idle status comes without the reply."""
    late = next_request_wrapped(after="raise KeyboardInterrupt")
    assert run(py_client, late, session="lost").status == P.SUCCEEDED
    job = run(py_client, "print('done')", session="lost", timeout=3)
    assert job.status == P.SUCCEEDED and job.stdout == "done\n", (job.error, job.stderr)
    after = run(py_client, "print(kept)", session="lost")
    assert after.status == P.SUCCEEDED and after.stdout == "yes\n", after.stderr


def test_a_cancel_while_the_kernel_sets_up_argv_interrupts_the_cell_not_the_set_up(py_client):
    """A job's argv and stdin are set by a silent request sent just before its cell.  A cancel that came
    while the kernel ran that set-up interrupted the set-up: the cell then ran on (sleeping), the slave
    ended the session as one that "did not stop when interrupted", and had the set-up been kept, the
    next job would have seen the wrong argv.  The slave now interrupts once the cell has begun.
    The set-up made slow: the next request's handler sleeps 2 s first."""
    slow = next_request_wrapped(before="__import__('time').sleep(2)")
    assert run(py_client, slow, session="setup").status == P.SUCCEEDED
    job = py_client.submit("import time\ntime.sleep(60)", session="setup", args=["a"])
    wait_for(lambda: py_client.job(job.id).status == P.RUNNING, WAIT, "the job to start")
    job.cancel()
    job.wait(WAIT)
    assert job.status == P.CANCELLED and job.error["code"] == P.CANCELLED_CODE, job.error
    assert "did not stop" not in job.stderr and "KeyboardInterrupt" in job.stderr, job.stderr
    after = run(py_client, "import sys\nprint(sys.argv[1:], kept)", session="setup", args=["a"])
    assert after.status == P.SUCCEEDED and after.stdout == "['a'] yes\n", after.stderr


def test_a_cell_that_ignores_the_interrupt_ends_its_session_with_a_message(py_client):
    assert run(py_client, "kept = 1", session="stubborn").status == P.SUCCEEDED
    job = run(py_client, "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)",
              session="stubborn", timeout=1)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT
    assert "did not stop when interrupted" in job.stderr
    wait_for(lambda: all(s["name"] != "stubborn" for s in py_client.sessions()), 20,
             "the ended session to leave /api/sessions")
    nxt = run(py_client, "print(kept)", session="stubborn")
    assert nxt.status == P.FAILED and "NameError" in nxt.stderr
    assert "starts a new one" in nxt.stderr and "did not stop when interrupted" in nxt.stderr


def test_interpreter_death_fails_the_job_and_the_next_starts_afresh(py_client):
    assert run(py_client, "kept = 1", session="d").status == P.SUCCEEDED
    job = run(py_client, "import os\nos._exit(4)", session="d")
    assert job.status == P.FAILED and job.exit_code == 4
    assert "session has ended" in job.error["message"]
    nxt = run(py_client, "print('kept' in dir())", session="d")
    assert nxt.status == P.SUCCEEDED and nxt.stdout == "False\n"
    assert "starts a new one" in nxt.stderr


def test_sessions_are_listed_and_can_be_ended(py_client):
    a = run(py_client, "x = 1", session="listed")
    run(py_client, "x", session="listed")
    [info] = [s for s in py_client.sessions() if s["name"] == "listed"]
    assert info["slave_uid"] == a.slave_uid
    assert info["language"] == "python" and info["jobs"] == 2
    assert P.parse_time(info["created_at"]) <= P.parse_time(info["last_used"])
    ended = py_client.end_session("listed")
    assert ended["name"] == "listed"
    assert all(s["name"] != "listed" for s in py_client.sessions())
    with pytest.raises(DistexecError) as err:
        py_client.end_session("listed")
    assert err.value.status == 404
    nxt = run(py_client, "x", session="listed")
    assert nxt.status == P.FAILED and "NameError" in nxt.stderr


def test_ending_a_busy_session_cancels_its_running_job(py_client):
    job = py_client.submit("print('started', flush=True)\nimport time\ntime.sleep(120)", session="busy")
    wait_for(lambda: py_client.job(job.id).stdout == "started\n", WAIT, "the session job to start")
    py_client.end_session("busy")
    job.wait(WAIT)
    assert job.status == P.CANCELLED
    assert "the session was ended while this job ran (ended by a user)" in job.error["message"]
    assert run(py_client, "print('fresh')", session="busy").stdout == "fresh\n"


def test_bad_session_requests_are_refused(py_client):
    with pytest.raises(DistexecError) as err:
        py_client.submit("int main(){return 0;}", language="c", session="s").id  # refused in the master's answer
    assert err.value.status == 400 and "Python only" in str(err.value)
    with pytest.raises(DistexecError) as err:
        py_client.submit("x = 1", session="")
    assert err.value.status == 400


def test_idle_sessions_end_after_the_ttl(make_cluster):
    lc = make_cluster(1, slots=2, languages="python", slave_args=["--session-ttl", "1"])
    with Cluster(lc.url, token=lc.token) as c:
        assert run(c, "x = 1", session="idle").status == P.SUCCEEDED
        kernels = kernels_of(lc.slaves[0])
        assert kernels
        wait_for(lambda: not c.sessions(), 20, "the idle session to end")
        assert_gone(kernels, "kernel processes")
        nxt = run(c, "x", session="idle")
        assert nxt.status == P.FAILED and "NameError" in nxt.stderr
        assert "idle for more than 1 s" in nxt.stderr


def test_a_lost_slave_loses_its_session_clearly(make_cluster, tmp_path):
    lc = make_cluster(2, slots=2, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        first = run(c, "x = 1", session="lost")
        assert first.status == P.SUCCEEDED, first.stderr
        # A retry left: requeued when its slave is lost, then failed with its session all the same.
        running = c.submit("print('started', flush=True)\nimport time\ntime.sleep(120)", session="lost", retries=1)
        wait_for(lambda: c.job(running.id).stdout == "started\n", WAIT, "the session job to start")
        queued = c.submit("print(x)", session="lost")
        assert c.job(queued.id).status == P.QUEUED  # the session is busy
        child = next(s for s in lc.slaves if s.uid == first.slave_uid)
        kernels = kernels_of(child)
        assert kernels
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(10)
        # The kernels die with their slave, even one killed outright.
        assert_gone(kernels, "kernel processes")
        for job in (running, queued):
            job.wait(WAIT)
            assert job.status == P.FAILED, logs(tmp_path)
            assert job.error["code"] == P.SLAVE_LOST
            assert "lost" in job.error["message"] and "'lost" in job.error["message"]
        assert "lost while this job ran" in running.error["message"], running.error
        assert "lost before this job ran" in queued.error["message"], queued.error
        assert not c.sessions()
        nxt = run(c, "x = 2\nprint(x)", session="lost")
        assert nxt.status == P.SUCCEEDED, nxt.stderr
        assert nxt.slave_uid != first.slave_uid
        assert "was lost" in nxt.stderr and "starts a new session" in nxt.stderr


def test_no_kernel_outlives_the_cluster(make_cluster):
    lc = make_cluster(2, slots=2, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        jobs = [c.submit("x = 1", session=f"k{i}") for i in range(3)]
        for j in jobs:
            assert j.wait(WAIT).status == P.SUCCEEDED, j.stderr
    kernels = [k for child in lc.slaves for k in kernels_of(child)]
    assert len(kernels) >= 3
    lc.stop()
    assert_gone(kernels, "kernel processes")


@contextlib.contextmanager
def limited_slave(make_cluster, *slave_args: str):
    """A client of one slave with one slot, Python only, started with ``slave_args`` (its limits)."""
    lc = make_cluster(1, slots=1, languages="python", slave_args=list(slave_args))
    with Cluster(lc.url, token=lc.token) as c:
        yield c


def test_past_the_memory_limit_the_session_ends_with_a_message(make_cluster):
    with limited_slave(make_cluster, "--memory-limit", "200") as c:
        assert run(c, "kept = 1", session="m").status == P.SUCCEEDED
        job = run(c, "b = bytearray(400 << 20)\nb[::4096] = b'x' * len(b[::4096])", session="m")
        assert job.status == P.FAILED and job.error["code"] == P.MEMORY_LIMIT
        assert "the session was ended" in job.stderr
        nxt = run(c, "print('kept' in dir())", session="m")
        assert nxt.status == P.SUCCEEDED and nxt.stdout == "False\n"
        assert "memory limit" in nxt.stderr and "starts a new one" in nxt.stderr


def test_sessions_outlive_a_master_restart(make_cluster):
    lc = make_cluster(1, slots=2, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        first = run(c, "kept = 'across'", session="r")
        assert first.status == P.SUCCEEDED, first.stderr
    lc.restart_master(signal.SIGKILL)
    with Cluster(lc.url, token=lc.token) as c:
        # The slave reconnects and tells the new master which sessions it has.
        wait_for(lambda: [s["name"] for s in c.sessions()] == ["r"], 30, "the session to be reported again")
        after = run(c, "print(kept)", session="r")
        assert after.status == P.SUCCEEDED and after.stdout == "across\n"
        assert after.slave_uid == first.slave_uid and not after.stderr


def test_after_a_restart_session_jobs_wait_for_their_slave_to_report():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python")
    s.hold_session("x")
    # The plain job runs; the session's job does not start a new session meanwhile.
    assert [j for j, _ in s.assign()] == [2]
    assert list(s.queue) == [1]
    s.bind_session("x", "a")
    assert s.assign() == [(1, "a")]
    s.enqueue(3, "python", "y")
    s.hold_session("y")
    assert s.assign() == []
    # Its slave never reported it: released, it starts anew.
    assert s.release_held_sessions()
    assert [j for j, _ in s.assign()] == [3]


def test_a_queued_session_job_waits_for_its_slave_across_a_master_restart(make_cluster):
    lc = make_cluster(2, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        first = run(c, "kept = 'mine'", session="q")
        assert first.status == P.SUCCEEDED, first.stderr
        home = next(s for s in lc.slaves if s.uid == first.slave_uid)
        # Fill both slaves, queue the session's next job for its own, then free the other.
        sleepers = [c.submit(HOLD + "print('started', flush=True)\n" + UNTIL_RELEASED) for _ in range(2)]
        for j in sleepers:
            wait_for(lambda: c.job(j.id).stdout == "started\n", WAIT, "the sleepers to start")
        queued = c.submit("print(kept)", session="q")
        assert c.job(queued.id).status == P.QUEUED
        [other] = [j for j in sleepers if c.job(j.id).slave_uid != home.uid]
        assert other.cancel().wait(WAIT).status == P.CANCELLED
        assert c.job(queued.id).status == P.QUEUED
    # The session's slave is frozen while the master restarts: the other comes back
    # first, idle, and the job must not start a new session there.
    os.kill(home.pid, signal.SIGSTOP)
    try:
        lc.restart_master(signal.SIGKILL)
        with Cluster(lc.url, token=lc.token) as c:
            wait_for(lambda: len(c.slaves()) == 1, WAIT, "the other slave to register")
            assert c.job(queued.id).status == P.QUEUED
            os.kill(home.pid, signal.SIGCONT)
            release_jobs(home.pid)  # the sleeper that holds the session's slave
            job = c.job(queued.id).wait(WAIT)
            assert job.status == P.SUCCEEDED, job.stderr
            assert job.stdout == "mine\n" and job.slave_uid == home.uid
    finally:
        os.kill(home.pid, signal.SIGCONT)


def test_the_process_limit_binds_the_cells_not_the_kernel(make_cluster):
    with limited_slave(make_cluster, "--max-procs", "4") as c:
        # ipykernel's own threads do not use up the job's --max-procs...
        ok = run(c, "import threading\nt = threading.Thread(target=lambda: None)\nt.start()\nt.join()\nprint('ok')",
                 session="p")
        assert ok.status == P.SUCCEEDED and ok.stdout == "ok\n", ok.stderr
        # ...and the cells still cannot go far past it.
        many = run(c, "import threading, time\nfor _ in range(40):\n"
                      "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()", session="p")
        assert many.status == P.FAILED and "can't start new thread" in many.stderr


def test_past_the_output_limit_the_job_fails_and_the_session_lives_on(make_cluster):
    with limited_slave(make_cluster, "--output-limit", "1") as c:
        assert run(c, "kept = 1", session="o").status == P.SUCCEEDED
        once = run(c, "print('x' * (3 << 20))", session="o")
        assert once.status == P.FAILED and once.error["code"] == P.OUTPUT_LIMIT
        assert len(once.stdout) <= 1 << 20
        flood = run(c, "while True:\n    print('y' * 1000)", session="o")
        assert flood.status == P.FAILED and flood.error["code"] == P.OUTPUT_LIMIT
        after = run(c, "print(kept)", session="o")
        assert after.status == P.SUCCEEDED and after.stdout == "1\n", after.stderr


def test_a_cells_error_message_is_cut_as_a_fresh_jobs_is_and_its_traceback_counts_as_output(make_cluster):
    """What a cell raised is its error's message cut at ``diagnostics.REASON_CHARS``, as a fresh job's has
    been; the whole of it is in the traceback, in stderr, under the output limit with the rest of the
    output.  Before: ``raise ValueError('x' * 1_000_000)`` gave an error message of 1 MB, in every event
    and listing of the job."""
    said = "x" * (D.REASON_CHARS - len("ValueError: ")) + "…"
    with limited_slave(make_cluster, "--output-limit", "4") as c:
        big = run(c, "kept = 1\nraise ValueError('x' * 1_000_000)", session="big")
        assert big.status == P.FAILED and big.error["code"] == P.NONZERO_EXIT, big.error
        assert big.error["message"] == "ValueError: " + said and big.error["line"] == 2, big.error
        assert "ValueError: " + "x" * 1_000_000 + "\n" in big.stderr
        fresh = run(c, "raise ValueError('x' * 10_000)")
        assert fresh.error["message"] == "exited with code 1: ValueError: " + said, fresh.error
        # A traceback that takes the output past the limit ends the cell as any output past it does.
        over = run(c, "print('y' * 3_500_000)\nraise ValueError('x' * 1_000_000)", session="big")
        assert over.status == P.FAILED and over.error["code"] == P.OUTPUT_LIMIT, over.error
        assert len(over.stdout) + len(over.stderr) <= 4 << 20
        assert run(c, "print(kept)", session="big").stdout == "1\n"
        # A text past what one kernel message may carry is cut in the kernel (slave/kernel_errors.py) to a
        # quarter of the output limit: the cell fails as any that raised, and the session keeps its variables.
        # Before, the slave's relay cut the kernel's socket and the session started again, empty.
        huge = run(c, "raise ValueError('x' * 50_000_000)", session="big")
        assert huge.status == P.FAILED and huge.error["code"] == P.NONZERO_EXIT, huge.error
        assert huge.error["message"] == "ValueError: " + said, huge.error
        assert "characters cut]" in huge.stderr and len(huge.stderr) <= 1 << 20, len(huge.stderr)
        assert run(c, "print(kept)", session="big").stdout == "1\n"
        # What did it leaves nothing in the user's namespace.
        assert run(c, "print([n for n in dir() if 'distexec' in n])", session="big").stdout == "[]\n"


# --- what a cell leaves in its directory, then the slave writes there as root ---

def _plant(kind: str, victim: str) -> str:
    """A cell that leaves, under the name ``note.txt``, what an attacker would."""
    return {
        "symlink": f"import os\nos.symlink({victim!r}, 'note.txt')\n",
        # Opening a FIFO to write blocks until someone reads: the slave's event loop, before.
        "fifo": "import os\nos.mkfifo('note.txt')\n",
        # A second name of a file the kernel keeps: writing through it would change 'kept.txt'.
        "hardlink": "import os\nopen('kept.txt', 'w').write('kept')\nos.link('kept.txt', 'note.txt')\n",
        # As large as a file may be (RLIMIT_FSIZE), sparse: the slave must not read or copy it.
        "huge": "import resource\nf = open('note.txt', 'wb')\n"
                "f.truncate(resource.getrlimit(resource.RLIMIT_FSIZE)[0])\nf.close()\n",
    }[kind]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink", "huge"])
def test_job_files_replace_what_a_cell_planted_and_never_write_through_it(py_client, tmp_path, kind):
    # A host file only root may write, outside anything the sandbox shows the kernel.
    victim = tmp_path / "root-only.txt"
    victim.write_text("untouched")
    victim.chmod(0o600)
    name = f"plant-{kind}"
    planted = run(py_client, _plant(kind, str(victim)), session=name)
    assert planted.status == P.SUCCEEDED, planted.stderr
    job = py_client.submit("print(open('note.txt').read())\nimport os\nprint(sorted(os.listdir('.')))",
                        session=name, files={"note.txt": "from the job"})
    job.wait(WAIT)
    assert job.status == P.SUCCEEDED, (job.error, job.stderr)
    assert job.stdout.startswith("from the job\n")
    assert victim.read_text() == "untouched"
    if kind == "hardlink":
        again = run(py_client, "print(open('kept.txt').read())", session=name)
        assert again.stdout == "kept\n"  # the other name kept its content: no write went through the link


def test_a_planted_fifo_leaves_the_slave_serving_others(py_client, py_cluster):
    """Before, the root open() of a FIFO blocked the slave's loop: the master dropped
    the slave and a bystander's job on it ended slave_lost."""
    planted = run(py_client, "import os\nos.mkfifo('stuck')", session="fifo-bystander")
    assert planted.status == P.SUCCEEDED, planted.stderr
    uid = planted.slave_uid
    before = {s["uid"]: s["connected_at"] for s in py_client.slaves()}
    # One bystander on each slave, running (held) while the session's job meets the FIFO; a slot of each
    # slave is left for that job.
    bystanders = [py_client.submit(HOLD + UNTIL_RELEASED + "print('ok')") for _ in range(2)]
    pids = [s.proc.pid for s in py_cluster.slaves]
    wait_for(lambda: all(held_jobs(pid) for pid in pids), WAIT, "a bystander running on each slave")
    job = run(py_client, "print(open('stuck').read())", session="fifo-bystander", files={"stuck": "x"})
    assert job.status == P.SUCCEEDED and job.stdout == "x\n", (job.error, job.stderr)
    release_until_done(bystanders, *pids, timeout=WAIT)
    for b in bystanders:
        assert b.wait(WAIT).status == P.SUCCEEDED, b.error
    # The slave never dropped its connection.
    assert {s["uid"]: s["connected_at"] for s in py_client.slaves()}[uid] == before[uid]


def test_a_folder_planted_where_a_job_file_goes_is_a_clear_error(py_client):
    assert run(py_client, "import os\nos.mkdir('data.txt')", session="dir-plant").status == P.SUCCEEDED
    job = run(py_client, "print(1)", session="dir-plant", files={"data.txt": "x"})
    assert job.status == P.FAILED
    assert "data.txt" in job.error["message"] and "folder" in job.error["message"]
    # The session lives on.
    assert run(py_client, "print(2)", session="dir-plant").stdout == "2\n"


def test_the_kernel_log_is_read_without_following_a_link(tmp_path):
    """Read as root when a kernel fails to start, in a directory the kernel's uid owns."""
    from slave.sessions import SessionRunner
    secret = tmp_path / "secret"
    secret.write_text("root only")
    workdir = tmp_path / "session"
    workdir.mkdir()
    os.symlink(secret, workdir / ".distexec-kernel.log")
    assert SessionRunner._kernel_log(str(workdir)) == "no log"
    os.unlink(workdir / ".distexec-kernel.log")
    os.mkfifo(workdir / ".distexec-kernel.log")  # opened non-blocking, refused: no hang
    assert SessionRunner._kernel_log(str(workdir)) == "no log"
    os.unlink(workdir / ".distexec-kernel.log")
    (workdir / ".distexec-kernel.log").write_text("x" * 5000 + "the end")
    assert SessionRunner._kernel_log(str(workdir)).endswith("the end")


def test_an_admin_ends_another_users_session_and_a_user_cannot(make_cluster, tmp_path):
    # A runaway session lived until it idled out: only its owner could end it.
    from conftest import users_json
    lc = make_cluster(1, slots=2, languages="python", master_args=["--users", users_json(tmp_path, "alice", "bob")])
    with Cluster(lc.url, user="alice", password="alice-pw") as alice, \
            Cluster(lc.url, user="bob", password="bob-pw") as bob, Cluster(lc.url, token=lc.token) as admin:
        assert alice.submit("kept = 1", session="work").wait(120).status == P.SUCCEEDED
        with pytest.raises(DistexecError) as exc:
            bob.end_session("work", user="alice")
        assert exc.value.status == 403
        with pytest.raises(DistexecError) as exc:
            bob.end_session("work")  # his own "work": there is none
        assert exc.value.status == 404
        assert [s["name"] for s in alice.sessions()] == ["work"]
        assert admin.end_session("work", user="alice")["name"] == "work"
        wait_for(lambda: not alice.sessions(), 20, "alice's session to end")
        after = alice.submit("print(kept)", session="work").wait(120)
        assert after.status == P.FAILED and "NameError" in after.stderr


def test_a_process_a_session_starts_between_its_cells_is_stopped(make_cluster, tmp_path):
    # The end-of-cell sweep missed a process a thread started after the cell: a 200 MiB spinner
    # lived on, its slot shown free, until the next cell ended.
    lc = make_cluster(1, slots=1, languages="python")
    # The thread starts it once the cell is over on the slave: past the end-of-cell sweep, the slave
    # lowers the session's CPU cap (IDLE_CPUS), which the kernel can read in its own cgroup.
    late = ("import subprocess, threading, time\n"
            "cpu = next(l.split(':')[2].strip() for l in open('/proc/self/cgroup') if l.split(':')[1] == 'cpu')\n"
            "quota = f'/sys/fs/cgroup/cpu{cpu}/cpu.cfs_quota_us'\n"
            "cell = int(open(quota).read())\n"
            "def later():\n"
            "    deadline = time.monotonic() + 60\n"
            "    while int(open(quota).read()) == cell and time.monotonic() < deadline:\n"
            "        time.sleep(0.01)\n"
            "    subprocess.Popen(['sleep', '61.25'])\n"
            "threading.Thread(target=later, daemon=True).start()\n")
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit(late, session="late").wait(120)
        assert job.status == P.SUCCEEDED and "left running" not in job.stderr, (job.error, job.stderr[-600:])
        wait_for(lambda: "stopped 1 process(es) started between its cells" in logs(tmp_path), 20,
                 "the slave to stop the late process")
        assert not [p for p in psutil.process_iter(["cmdline"]) if "61.25" in (p.info["cmdline"] or [])]
        after = c.submit("print('still here')", session="late").wait(60)
        assert after.stdout == "still here\n" and "left running" not in after.stderr  # the session lives on


INOTIFY_ALL = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nheld = []\n"
               "while len(held) < 100000 and (fd := libc.inotify_init1(0)) >= 0:\n    held.append(fd)\n"
               "print(len(held), ctypes.get_errno())\n")


def test_a_session_runs_as_its_own_uid_and_cannot_take_nobodys_quotas(make_cluster):
    # All sessions and fresh jobs ran as nobody and shared its per-uid kernel quotas: one session
    # holding every inotify instance (or POSIX message queue) refused them to every other job.
    lc = make_cluster(1, slots=2, languages="python", slave_args=["--no-warm"])
    with Cluster(lc.url, token=lc.token) as c:
        uid = "import os\nprint(os.getuid(), os.getgid())"
        first = c.submit(uid, session="one").wait(120).stdout.split()
        second = c.submit(uid, session="two").wait(120).stdout.split()
        fresh = c.submit(uid).wait(60).stdout.split()
        assert fresh[0] == fresh[1] and fresh[0] != "65534", fresh
        assert first[0] == first[1] and second[0] == second[1], (first, second)
        assert len({first[0], second[0], fresh[0]}) == 3, (first, second, fresh)
        hog = c.submit(INOTIFY_ALL, session="one").wait(120)
        held, errno = map(int, hog.stdout.split())
        assert held >= 16 and errno == 24, hog.stdout  # EMFILE: its uid's instances are all taken
        others = [c.submit(INOTIFY_ALL.replace("100000", "4")).wait(60),
                  c.submit(INOTIFY_ALL.replace("100000", "4"), session="two").wait(120)]
        assert [o.stdout for o in others] == ["4 0\n", "4 0\n"], [o.record for o in others]
        third = c.submit(uid, session="three").wait(120).stdout.split()
        assert third[0] not in (first[0], second[0], "65534"), third
