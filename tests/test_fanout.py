"""Fan-out: batches, groups, ``Cluster.map``, ``%%remote --map`` and ``submit --each``, on a real cluster."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pytest
import requests
from IPython.utils.capture import capture_output

from distexec_kernel import Cluster, JobGroup, RemoteError, protocol as P

from conftest import (HOLD, UNTIL_RELEASED, held_jobs, job_processes_of, magic_shell, module_cluster, release_jobs,
                      wait_for)

SQUARE = "import sys\nn = int(sys.argv[1])\nprint(n * n)\n"
FLAKY = "import sys\nn = int(sys.argv[1])\nif n % 3 == 0:\n    sys.exit(f'{n} is a multiple of 3')\nprint(n)\n"
SLEEPER = "import time\ntime.sleep(120)\n"


lc = module_cluster("fanout", 2, slots=2, languages="python,sh")


@pytest.fixture
def c(lc):
    with Cluster(lc.url, token=lc.token) as client:
        yield client


def post(lc, body, **params) -> requests.Response:
    """``POST /api/jobs`` as the admin; ``params``: the query (``group``, ``part``)."""
    return requests.post(lc.url + "/api/jobs", json=body, params=params,
                         headers={"Authorization": f"Bearer {lc.token}"}, timeout=60)


# --- the batch endpoint ----------------------------------------------------------

def test_a_batch_is_one_group_in_order_and_listed_by_group(lc, c):
    r = post(lc, [{"source": SQUARE, "language": "python", "args": [str(n)]} for n in range(5)])
    assert r.status_code == 201, r.text
    body = r.json()
    jobs = body["jobs"]
    assert [j["args"] for j in jobs] == [[str(n)] for n in range(5)]
    ids = [j["id"] for j in jobs]
    assert ids == list(range(ids[0], ids[0] + 5))  # consecutive, in the batch's order
    group = body["group"]
    assert group and all(j["group"] == group for j in jobs)
    listed, total = c.jobs_page(group=group, limit=100)
    assert total == 5 and sorted(j["id"] for j in listed) == ids
    # A single submission has no group.
    assert c.submit("print(1)").wait(60).group is None


def test_a_bad_item_refuses_the_whole_batch_naming_its_index(lc, c):
    before = c.jobs_page(limit=1)[1]
    good = {"source": "print(1)", "language": "python"}
    r = post(lc, [good, good, {"source": "print(1)", "language": "python", "timeout": -1}, good])
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("item 2: ")
    r = post(lc, [good, "not a submission"])
    assert r.status_code == 400 and "item 1" in r.json()["error"]["message"]
    r = post(lc, [good] * (P.MAX_BATCH + 1))
    assert r.status_code == 400 and str(P.MAX_BATCH) in r.json()["error"]["message"]
    assert c.jobs_page(limit=1)[1] == before  # nothing of them was queued or kept


def test_a_program_that_does_not_parse_is_a_rejected_job_of_the_group(lc, c):
    # (The master parses a program once for the jobs in a row that share it.)
    group = c.submit_many([dict(source=s) for s in ("print(1)", "print((", "print((", "print(1)", "print(3)")])
    assert [j.status for j in group][1:3] == [P.REJECTED] * 2
    assert group.wait(60, progress=False).counts() == {P.SUCCEEDED: 3, P.REJECTED: 2}
    assert [type(r) for r in group.results(errors="return")] == [str, RemoteError, RemoteError, str, str]
    assert group[2].error["code"] == P.SYNTAX_ERROR and "line 1" in group[2].error["message"]


def test_an_empty_map_is_an_empty_group_and_a_non_iterable_is_refused(c):
    empty = c.map(SQUARE, [])
    assert isinstance(empty, JobGroup) and len(empty) == 0
    assert empty.wait(1).results() == [] and empty.counts() == {}
    with pytest.raises(TypeError, match="iterable"):
        c.map(SQUARE, 42)
    with pytest.raises(TypeError, match="iterable"):
        c.map(SQUARE, "12")
    with pytest.raises(ValueError, match="via"):
        c.map(SQUARE, [1], via="env")


# --- JobGroup ------------------------------------------------------------------------

def test_map_results_come_in_input_order(c):
    inputs = list(range(24))
    group = c.map(SQUARE, inputs, name="order")
    assert group.results(timeout=120) == [f"{n * n}\n" for n in inputs]
    assert group.counts() == {P.SUCCEEDED: 24}
    assert len({j.slave_uid for j in group}) == 2  # spread over both slaves


def test_a_listing_read_before_the_jobs_ended_does_not_undo_their_ends(lc, c, monkeypatch):
    # A waiter's listing is answered while events keep coming: applied after them, it once put jobs
    # back to running with no event left to end them, and a map waited for the next backstop re-read
    # (4 s for 2,000 jobs: half the throughput of the same jobs submitted one by one).
    group = c.map(HOLD + UNTIL_RELEASED, range(4))
    early, full = group._records(summary=True), group._records(summary=False)
    assert {r["status"] for r in early + full} <= {P.QUEUED, P.RUNNING}  # held: none can have ended
    slaves = [s.pid for s in lc.slaves]
    wait_for(lambda: sum(len(held_jobs(pid)) for pid in slaves) == 4, 60, "the 4 jobs to wait for their release")
    release_jobs(*slaves)
    group.wait(120)
    assert group.counts() == {P.SUCCEEDED: 4}
    for summary, answer in ((True, early), (False, full)):
        monkeypatch.setattr(group, "_records", lambda summary, answer=answer: answer)  # late answers
        group.refresh(summary=summary)
        assert group.counts() == {P.SUCCEEDED: 4} and group.done
    assert all(job.wait(0).status == P.SUCCEEDED for job in group)


def test_a_maps_jobs_hold_one_copy_of_its_program(c, monkeypatch):
    # A copy each was 2 KB a job for a 2 KB program, the client's largest cost in a map of thousands.
    monkeypatch.setattr(P, "MAX_BATCH", 4)  # also the parts sent after the first
    source = SQUARE + "# " + "x" * 2000 + "\n"
    group = c.map(source, range(6))
    group.refresh(summary=False)  # the full records read again: the same program, kept once
    group.wait(120)
    assert [j.stdout for j in group] == [f"{n * n}\n" for n in range(6)]
    assert group[0].source == source and all(job.source is group[0].source for job in group)


def test_a_map_past_one_batch_is_sent_in_parts_as_one_group(lc, c, monkeypatch):
    # The client's parts made small (the master takes up to 10,000 in one request, as before).
    monkeypatch.setattr(P, "MAX_BATCH", 4)
    inputs = list(range(10))
    group = c.map(SQUARE, inputs, name="parts")
    assert len(group) == 10
    assert group.results(timeout=120) == [f"{n * n}\n" for n in inputs]
    ids = [j.id for j in group]
    assert ids == sorted(ids) and {j.group for j in group} == {group.id}
    listed, total = c.jobs_page(group=group.id, limit=100)
    assert total == 10 and sorted(j["id"] for j in listed) == ids
    # A part joins only a group of the same user, and only as a batch.
    r = post(lc, {"source": "print(1)", "language": "python"}, group=group.id)
    assert r.status_code == 400 and "batch" in r.json()["error"]["message"]
    r = post(lc, [{"source": "print(1)", "language": "python"}], group="g999999999")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_part_whose_answer_was_lost_is_not_sent_twice(lc, c):
    """A part the master took whose answer never came back (a frozen master, a dropped connection): the
    feeder sends the same part again with the same key and the master answers with the jobs it made,
    instead of running each twice; also when the next part would have been larger (an audit's case)."""
    import concurrent.futures

    from distexec_kernel.feeding import Feeder
    from distexec_kernel.group import JobGroup
    from distexec_kernel.job import Job

    first = post(lc, [{"source": SQUARE, "language": "python", "args": ["1"]}]).json()
    subs = [{"source": SQUARE, "language": "python", "args": [str(n)]} for n in range(2, 7)]
    waiting = [Job(c, dict(sub, id=None, status=P.QUEUED), ack=concurrent.futures.Future(), unsent=True)
               for sub in subs]
    group = JobGroup(c, first["group"], [Job(c, first["jobs"][0])] + waiting)
    assert [j.id for j in waiting] == [None] * 5 and {j.status for j in waiting} == {P.QUEUED}  # at once
    # A part of two (keyed by its place in the group, 1) went out and was taken; its answer was lost.
    taken = post(lc, subs[:2], group=group.id, part=1).json()["jobs"]
    feeder = Feeder(c, group, list(zip(subs, waiting)), None, None)
    feeder._unsure = 2
    group._feeder = feeder
    feeder.start()
    assert group.results(timeout=120) == [f"{n * n}\n" for n in range(1, 7)]
    assert [j.id for j in group[1:3]] == [j["id"] for j in taken]
    assert c.jobs_page(group=group.id)[1] == 6  # not 8
    # The master's side alone: the same keyed part twice is taken once; one that runs past what was
    # taken under its key (positions 5 and 6 of a group of 6) is a conflict, not an answer with others.
    again = post(lc, subs[:2], group=group.id, part=1)
    assert again.status_code == 201 and [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in taken]
    other = post(lc, subs[:2], group=group.id, part=5)
    assert other.status_code == 409 and other.json()["error"]["code"] == "conflict", other.text
    assert c.jobs_page(group=group.id)[1] == 6
    # Once the group is cancelled, a part it took is still answered with its jobs; a new one is refused.
    c.cancel_group(group.id)
    again = post(lc, subs[:2], group=group.id, part=1)
    assert again.status_code == 201 and [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in taken]
    new = post(lc, subs[:1], group=group.id, part=6)
    assert new.status_code == 409 and new.json()["error"]["code"] == "group_cancelled", new.text


def test_map_by_stdin_and_tuples_as_arguments(c):
    by_stdin = c.map("print(input()[::-1])", ["abc", "xyz"], via="stdin")
    assert by_stdin.results(timeout=60) == ["cba\n", "zyx\n"]
    by_args = c.map("import sys\nprint(':'.join(sys.argv[1:]))", [("a", 1), ["b", 2]])
    assert by_args.results(timeout=60) == ["a:1\n", "b:2\n"]


def test_partial_failure_names_the_first_failure_in_input_order(c):
    group = c.map(FLAKY, range(1, 10)).wait(120, progress=False)
    assert group.counts() == {P.SUCCEEDED: 6, P.FAILED: 3}
    assert [j.args for j in group.failed] == [["3"], ["6"], ["9"]]
    assert [j.args[0] for j in group.succeeded] == ["1", "2", "4", "5", "7", "8"]
    with pytest.raises(RemoteError) as info:
        group.results()
    assert info.value.job.args == ["3"] and info.value.code == P.NONZERO_EXIT
    mixed = group.results(errors="return")
    assert mixed[0] == "1\n" and isinstance(mixed[2], RemoteError) and "3 is a multiple" in mixed[2].job.stderr


def test_a_failure_says_what_the_program_raised(c):
    """A sweep's RemoteError said only "exited with code 1": what was raised was in the job's stderr alone."""
    group = c.map("import sys\nn = int(sys.argv[1])\nif n == 2:\n    raise ValueError(f'bad input {n}')\n",
                  range(3)).wait(120, progress=False)
    with pytest.raises(RemoteError) as info:
        group.results()
    assert str(info.value) == f"job {group[2].id} failed: [nonzero_exit] exited with code 1: ValueError: bad input 2"
    assert group[2].error["line"] == 4  # and where, as before


def test_progress_counts_match_the_final_states(c, capsys):
    group = c.map(FLAKY, range(1, 7))
    group.wait(120, progress=True)
    bar = capsys.readouterr().err  # tqdm's terminal bar, on stderr
    final = Counter(j.status for j in group)
    assert final == {P.SUCCEEDED: 4, P.FAILED: 2}
    assert "6/6" in bar and "✅ 4 · ❌ 2 · 🚫 0" in bar
    assert group.summary().startswith("✅ 4 · ❌ 2 · 🚫 0 · 6 jobs · ")
    # By default no bar where stderr is not a terminal (here, captured: a script's log file).
    c.map(FLAKY, range(1, 3)).wait(120)
    assert "jobs:" not in capsys.readouterr().err


def test_the_progress_bar_is_drawn_a_few_times_a_second_not_at_each_event(c, capsys):
    # In a notebook each draw is a widget message to the browser: a map of thousands sent thousands.
    from distexec_kernel.group import BAR_EVERY
    t0 = time.monotonic()
    group = c.map("pass", range(300)).wait(120, progress=True)
    took = time.monotonic() - t0
    bar = capsys.readouterr().err
    assert group.counts() == {P.SUCCEEDED: 300} and "300/300" in bar
    assert bar.count("\r") <= took / BAR_EVERY + 5, (bar.count("\r"), took)


def test_retries_apply_per_job_when_a_slave_is_lost(make_cluster):
    lc = make_cluster(2, slots=2, languages="sh")
    with Cluster(lc.url, token=lc.token) as c:
        group = c.submit_many([dict(source="sleep 3; echo done", language="sh", retries=1) for _ in range(4)])
        wait_for(lambda: group.refresh().counts().get(P.RUNNING) == 4, 60, "all four running")
        victim = group[0].slave_uid
        lost = [j.id for j in group if j.slave_uid == victim]
        # Kill the slave that runs the first job, outright: its jobs are retried elsewhere.
        next(s for s in lc.slaves if getattr(s, "uid", None) == victim).send_signal(9)
        group.wait(120, progress=False)
        assert group.counts() == {P.SUCCEEDED: 4}
        assert sorted(j.id for j in group if j.attempts == 2) == sorted(lost)
        assert all(j.stdout == "done\n" for j in group)


def _job_processes(lc) -> list[psutil.Process]:
    """Everything the slaves have started: the jobs' sandboxes and programs (not the warm pools' parents)."""
    return [p for child in lc.slaves for p in job_processes_of(child.pid)]


def test_cancel_in_the_middle_leaves_nothing_running(lc, c):
    group = c.map(SLEEPER, range(10), name="cancel-me")
    wait_for(lambda: group.refresh().counts().get(P.RUNNING) == 4, 60, "four of them running")
    wait_for(lambda: len(_job_processes(lc)) >= 4, 30, "their processes to start")
    group.cancel()
    group.wait(60, progress=False)
    assert group.counts() == {P.CANCELLED: 10}
    assert all(j.error["code"] == P.CANCELLED_CODE for j in group)
    wait_for(lambda: not _job_processes(lc), 30, "the cancelled jobs' processes to be gone")
    # And the cluster runs the next job at once.
    assert c.submit("print('after')").wait(60).stdout == "after\n"


def test_cancelling_an_unknown_group_is_a_404(lc):
    r = requests.post(lc.url + "/api/groups/g999999999/cancel", headers={"Authorization": f"Bearer {lc.token}"},
                      timeout=30)
    assert r.status_code == 404


def test_a_batch_survives_a_master_restart_whole(make_cluster):
    lc = make_cluster(1, slots=1, languages="sh")
    with Cluster(lc.url, token=lc.token) as c:
        gid = c.submit_many([dict(source="sleep 30", language="sh") for _ in range(6)]).id
    lc.restart_master()
    with Cluster(lc.url, token=lc.token) as c:
        jobs, total = c.jobs_page(group=gid, limit=100)
        assert total == 6 and {j["status"] for j in jobs} <= {P.QUEUED, P.RUNNING}
        assert c.cancel_group(gid) == 6


# --- the magic -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shell(lc):
    with magic_shell() as sh:
        yield sh


def run(shell, cell: str):
    with capture_output() as cap:
        result = shell.run_cell(cell)
    return result, cap


def test_magic_map_shows_a_summary_and_keeps_the_group(shell):
    shell.user_ns["items"] = [1, 2, 3]
    result, cap = run(shell, "%%remote --map items -o squares\n" + SQUARE)
    assert result.success, cap.stderr
    shown = "\n".join(o.data.get("text/plain", "") for o in cap.outputs)
    assert "✅ 3 · ❌ 0 · 🚫 0 · 3 jobs · " in shown
    assert cap.stdout == "[0] 1\n[1] 4\n[2] 9\n"  # each job's output under its input's index
    assert shell.user_ns["squares"].results() == ["1\n", "4\n", "9\n"]


def test_magic_map_fails_the_cell_with_the_first_failure(shell):
    shell.user_ns["items"] = [1, 2, 3, 4, 5, 6]
    result, cap = run(shell, "%%remote --map items\n" + FLAKY)
    assert not result.success
    assert type(result.error_in_exec).__name__ == "RemoteGroupFailed"
    assert result.error_in_exec.job.args == ["3"]
    assert "3 is a multiple of 3" in cap.stderr  # the first failure's own words
    assert cap.stdout.startswith("[0] 1\n[1] 2\n[3] 4\n[4] 5\n")  # the outputs of those that succeeded
    text = cap.stdout + cap.stderr
    assert "✅ 4 · ❌ 2 · 🚫 0 · 6 jobs" in text and "nonzero_exit" in text


def test_a_map_shows_the_first_outputs_each_to_its_last_lines():
    from distexec_kernel.display import map_outputs
    outs = ["", "one\n", "a\nb\n", "no newline"] + [f"{i}\n" for i in range(4, 30)]
    shown = map_outputs(outs, most=3)
    assert shown == ("[1] one\n[2]\na\nb\n[3] no newline\n"
                     "[... 26 more outputs: -o NAME keeps the group, NAME.results() has them all]\n")
    long = map_outputs(["".join(f"{i}\n" for i in range(100))], lines=2)
    assert long == "[0]\n[... 98 earlier lines]\n98\n99\n"
    assert map_outputs(["", ""]) == ""


def test_interrupting_a_magic_map_cancels_the_group(lc, shell, c):
    # The bar's module imported before: an interrupt landing in its first import leaves a .pyc open (a warning).
    importlib.import_module("tqdm.auto")

    shell.user_ns["items"] = list(range(6))  # 4 slots: 4 run, 2 wait
    shell.user_ns.pop("interrupted", None)
    main = threading.main_thread().ident
    errors = []

    def interrupt_once_running():
        # The cell has its group (-o) and is waiting on it; four of its jobs run.
        try:
            group = wait_for(lambda: shell.user_ns.get("interrupted"), 60, "the group to be submitted")
            wait_for(lambda: c.jobs_page(group=group.id, status=P.RUNNING)[1] == 4, 60, "four of them to run")
        except AssertionError as exc:
            errors.append(exc)
            return
        signal.pthread_kill(main, signal.SIGINT)  # what a kernel interrupt is

    t = threading.Thread(target=interrupt_once_running)
    t.start()
    # The jobs' own timeout bounds the test if the interrupt never comes.
    result, cap = run(shell, "%%remote --map items -o interrupted --timeout 60\n" + SLEEPER)
    t.join()
    assert not errors, errors
    assert not result.success
    assert type(result.error_in_exec).__name__ == "RemoteGroupFailed" and result.error_in_exec.interrupted
    gid = shell.user_ns["interrupted"].id
    assert f"group {gid} was cancelled on the master" in cap.stdout + cap.stderr
    # From the master's side: every job of the group ended cancelled (none had finished), none left waiting or
    # running, well before the jobs' own timeout would end them.
    jobs = wait_for(lambda: (page := c.jobs_page(group=gid, limit=100)[0]) and
                    all(j["status"] in P.TERMINAL for j in page) and page, 20, "the group's jobs to end")
    assert len(jobs) == 6
    assert Counter(j["status"] for j in jobs) == {P.CANCELLED: 6}, [(j["id"], j["status"]) for j in jobs]
    assert all(j["error"]["code"] == P.CANCELLED_CODE for j in jobs)
    wait_for(lambda: not _job_processes(lc), 30, "the cancelled jobs' processes to be gone")


def test_an_interrupt_while_a_map_is_being_sent_cancels_what_the_master_made(lc, shell, c):
    importlib.import_module("tqdm.auto")  # as above
    run(shell, "%remote slaves")  # the cell's cluster connected before the master is frozen
    shell.user_ns["items"] = list(range(6))
    shell.user_ns.pop("held", None)
    name = f"held-{os.getpid()}"
    main = threading.main_thread().ident
    errors = []

    def sending() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name == "submit_many":
                return True
            frame = frame.f_back
        return False

    def interrupt_while_sending():
        # The master frozen, the batch's request waits for its answer: the interrupt comes in that wait.
        try:
            wait_for(sending, 60, "the cell to be sending its batch")
            signal.pthread_kill(main, signal.SIGINT)
        except AssertionError as exc:
            errors.append(exc)
        finally:
            os.kill(lc.master.pid, signal.SIGCONT)

    os.kill(lc.master.pid, signal.SIGSTOP)
    t = threading.Thread(target=interrupt_while_sending)
    t.start()
    try:
        result, cap = run(shell, f"%%remote --map items -o held --name {name} --timeout 60\n" + SLEEPER)
        t.join()
        assert not errors, errors
        # Not a bare KeyboardInterrupt out of the request, leaving a group nobody holds: the group came,
        # and was cancelled, as an interrupt a moment later would have done.
        assert type(result.error_in_exec).__name__ == "RemoteGroupFailed" and result.error_in_exec.interrupted
        gid = shell.user_ns["held"].id
        jobs = wait_for(lambda: (page := c.jobs_page(group=gid, limit=100)[0]) and
                        all(j["status"] in P.TERMINAL for j in page) and page, 20, "the group's jobs to end")
        assert len(jobs) == 6 and {j["status"] for j in jobs} == {P.CANCELLED}
    finally:
        os.kill(lc.master.pid, signal.SIGCONT)
        t.join()
        for job in c.jobs_page(limit=500)[0]:  # what an unheld interrupt left running, not to hold the slots
            if job["name"] == name and job["status"] not in P.TERMINAL:
                c.cancel(job["id"])


def test_magic_map_refuses_what_is_not_there_or_not_iterable(shell):
    shell.user_ns["number"] = 7
    for line, words in (("--map nowhere", "no variable 'nowhere'"), ("--map number", "not an iterable"),
                        ("--map number --session s", "does not combine with --session")):
        result, cap = run(shell, f"%%remote {line}\nprint(1)")
        assert not result.success and words in str(result.error_in_exec), (line, result.error_in_exec)


# --- the command line ------------------------------------------------------------------

def cli(lc, *argv, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISTEXEC_URL=lc.url, DISTEXEC_TOKEN=lc.token)
    return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("line", ["a#b c", "a b #c d", '"#x" y', "x '#' z", "  # only", "a\\#b #c", 'x""#y',
                                  '"a\\"#" b', "a\t#b", "tab\tsep'a b'#c", "#"])
def test_submit_each_splits_a_line_as_bash_does(tmp_path, line):
    from distexec_kernel.cli_submit import _each_args
    each = tmp_path / "each.txt"
    each.write_text(line + "\n")
    # "-" first: printf with no word left prints its format once all the same.
    bash = subprocess.run(["bash", "-c", f"printf '%s\\0' - {line}"], capture_output=True, text=True, check=True)
    words = bash.stdout.split("\0")[1:-1]
    assert _each_args(str(each)) == ([words] if words else [])


def test_submit_each_prints_outputs_in_order_and_exits_by_the_jobs(lc, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(FLAKY)
    good = tmp_path / "good.txt"
    good.write_text("1\n# a comment\n\n2\n'4' \n")
    done = cli(lc, "submit", str(prog), "--each", str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n2\n4\n"
    assert "✅ 3 · ❌ 0 · 🚫 0 · 3 jobs" in done.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n3\n5\n6\n")
    done = cli(lc, "submit", str(prog), "--each", str(bad), "--progress")
    assert done.returncode == 1  # the first failure's own exit code (sys.exit with a message: 1)
    assert done.stdout == "1\n5\n"
    assert "3 is a multiple of 3" in done.stderr and "4/4" in done.stderr
    unbalanced = tmp_path / "unbalanced.txt"
    unbalanced.write_text("'open\n")
    done = cli(lc, "submit", str(prog), "--each", str(unbalanced))
    assert done.returncode != 0 and "line 1" in done.stderr
