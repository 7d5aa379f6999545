"""Large programs are parsed off the master's loop, users in turns; what cannot be parsed is rejected clearly."""
from __future__ import annotations

import asyncio
import threading

import psutil
import requests

from distexec_kernel import protocol as P
from master import parsing

from conftest import wait_for

# About 1 MiB that parses: ast.parse takes a second or more of CPU here.
BIG = "x = 1\n" * 170_000
# A sum of 300,000 ones: too deep for Python's parser (it would not compile it to run it either).
TOO_DEEP = "x = " + "+".join(["1"] * 300_000) + "\n"


def _worker_pids(master_pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(master_pid).children()
            if "master.parsing" in " ".join(p.cmdline())]


def _served_while_parsing(lc, bob, send) -> None:
    """``send`` (alice's submission, answered once it is parsed) in a thread; while the master's parser
    works on it, bob's job is taken in, run and finished, and ``send`` is still unanswered."""
    answered = threading.Event()

    def sending():
        send()
        answered.set()
    sender = threading.Thread(target=sending)
    sender.start()
    try:
        wait_for(lambda: _worker_pids(lc.master.proc.pid), 30, "the master to start parsing alice's submission")
        job = bob.submit("print('bob')").wait(60)
        assert job.status == P.SUCCEEDED and not answered.is_set()
    finally:
        sender.join(120)
    assert answered.is_set()


def test_a_program_too_deep_to_parse_is_rejected_with_a_clear_error(client):
    job = client.submit(TOO_DEEP).wait(60)
    assert job.status == P.REJECTED and job.error["code"] == P.SYNTAX_ERROR, job.error
    assert "nested too deeply" in job.error["message"]
    small = client.submit("x = " + "+".join(["1"] * 3000)).wait(60)  # on the loop: caught there too
    assert small.status == P.REJECTED and small.error["code"] == P.SYNTAX_ERROR, small.error
    fine = client.submit("print('after')").wait(60)
    assert fine.status == P.SUCCEEDED and fine.stdout == "after\n"


def test_a_users_large_programs_do_not_hold_another_users_job(two_users):
    lc, alice, bob = two_users
    batch: list = []

    def submit_batch():
        group = alice.submit_many([{"source": BIG}, {"source": BIG + "x = (\n"},
                                   {"source": BIG + "print(len('ok'))\n"}])
        batch.extend(group[i] for i in range(len(group)))
    # On the master's loop, alice's 3 MiB would have held bob's submission until her batch was answered.
    _served_while_parsing(lc, bob, submit_batch)
    ends = [j.wait(120) for j in batch]
    assert [j.status for j in ends] == [P.SUCCEEDED, P.REJECTED, P.SUCCEEDED]
    assert ends[1].error["code"] == P.SYNTAX_ERROR and ends[1].error["line"] == 170_001, ends[1].error
    assert ends[2].stdout == "2\n"


def test_a_small_session_cell_that_is_dear_to_transform_is_parsed_off_the_loop(two_users):
    """IPython's transformer tokenizes a cell again for each line it rewrites: 3.9 KiB of ``a?`` lines
    took 15 s, parsed on the loop because the cell was small, and held everyone (the slaves' pings too)."""
    lc, alice, bob = two_users
    cell = "a?\n" * 700  # 2.1 KB: seconds in the transformer
    assert parsing._cost((None, True, "python", cell)) > parsing.INLINE_BYTES
    assert parsing._cost((None, False, "python", cell)) < parsing.INLINE_BYTES  # not a cell: plain Python
    assert parsing._cost((None, True, "python", "%matplotlib inline\nimport math\nprint(math.pi)\n")) \
        < parsing.INLINE_BYTES  # an everyday cell stays on the loop, with no trip to the worker
    jobs: list = []

    def submit_cell():
        jobs.append(alice.submit(cell, session="help", timeout=120))
        jobs[0].id  # answered
    _served_while_parsing(lc, bob, submit_cell)
    jobs[0].cancel()


def test_a_parser_that_dies_rejects_that_program_and_the_next_is_judged_again(client, cluster):
    first: list = []
    sender = threading.Thread(target=lambda: first.append(client.submit(BIG + "print(1)\n").wait(60)))
    sender.start()
    pids = wait_for(lambda: _worker_pids(cluster.master.proc.pid), 30, "the parsing process")
    psutil.Process(pids[0]).kill()
    sender.join(90)
    job = first[0]
    assert job.status == P.REJECTED and job.error["code"] == P.SYNTAX_ERROR, job.error
    assert "parser failed" in job.error["message"], job.error
    again = client.submit(BIG + "print('judged')\n").wait(60)
    assert again.status == P.SUCCEEDED and again.stdout == "judged\n", again.error
    bad = client.submit(BIG + "def f(:\n").wait(60)
    assert bad.status == P.REJECTED and bad.error["line"] == 170_001, bad.error


def test_an_http_submission_is_parsed_off_the_loop_too(client, cluster):
    r = requests.post(f"{cluster.url}/api/jobs", json={"source": TOO_DEEP, "language": "python"},
                      headers={"Authorization": f"Bearer {cluster.token}"}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == P.REJECTED and r.json()["error"]["code"] == P.SYNTAX_ERROR


# -- the worker itself: real processes, no cluster --------------------------------------------------

def test_users_take_turns_in_the_parser(monkeypatch):
    monkeypatch.setattr(parsing, "PART_BYTES", 40_000)
    program = "y = 2\n" * 6_000  # 36 KB: one part each

    async def run():
        worker, order = parsing.Worker(), []

        async def one(user, n):
            await worker.parse(user, [(False, "python", program)] * n)
            order.append(user)
        try:
            # alice's 6 parts are queued before bob's one: bob's comes after her first, not after her last.
            await asyncio.gather(one("alice", 6), one("bob", 1))
        finally:
            worker.close()
        return order
    assert asyncio.run(run()) == ["bob", "alice"]


def test_a_parse_past_its_time_is_rejected_and_the_worker_starts_again(monkeypatch):
    monkeypatch.setattr(parsing, "PART_TIMEOUT", 0.05)

    async def run():
        worker = parsing.Worker()
        try:
            slow = await worker.parse("alice", [(False, "python", BIG)])
            monkeypatch.setattr(parsing, "PART_TIMEOUT", 60)
            fine = await worker.parse("alice", [(False, "python", "def f(:\n"), (False, "python", "pass\n")])
        finally:
            worker.close()
        return slow, fine
    slow, fine = asyncio.run(run())
    assert "took over 0.05 s to parse" in slow[0]["message"]
    assert fine[0]["line"] == 1 and fine[1] is None


def test_the_worker_ends_once_idle_and_starts_again_when_needed(monkeypatch):
    monkeypatch.setattr(parsing, "IDLE_STOP", 0.05)

    async def run():
        worker = parsing.Worker()
        try:
            first = await worker.parse("alice", [(False, "python", "pass\n")])
            proc = worker._proc
            await asyncio.to_thread(proc.wait, 10)  # ended by the idle timer (TimeoutExpired if not)
            again = await worker.parse("alice", [(False, "python", "def f(:\n")])
        finally:
            worker.close()
        return first, proc, again
    first, proc, again = asyncio.run(run())
    assert first == [None]
    assert proc.poll() is not None, "the idle worker still runs"
    assert again[0]["line"] == 1
