"""Chaos: many clients, short jobs, while a slave is killed and comes back and the master restarts.

Afterwards every job must be in exactly one terminal state (in the history
and in what each client saw), every succeeded job's output must be the one
its input calls for, and no job may have run more often than its retries
allow.  A job that lost its slave and had no retry left is `slave_lost`;
nothing else may fail.
"""
from __future__ import annotations

import hashlib
import signal
import threading
import time

import pytest

from distexec_kernel import Cluster, protocol as P
from distexec_kernel.cluster import DistexecError

from conftest import logs, wait_for

CLIENTS = 4
JOBS_PER_CLIENT = 75
IN_FLIGHT = 12  # per client: enough that jobs are running when the chaos strikes

PROGRAM = """\
import hashlib, sys, time
time.sleep(float(sys.argv[2]))
print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:16])
"""


def token(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ChaosClient(threading.Thread):
    """One user: its own Cluster, a window of jobs in flight, every event it sees recorded."""

    def __init__(self, lc, n: int, progress):
        super().__init__(name=f"chaos-client-{n}")
        self.lc = lc
        self.n = n
        self.progress = progress
        self.jobs: dict[str, object] = {}  # name -> Job
        self.terminal_seen: dict[int, set[str]] = {}
        self.errors: list[BaseException] = []
        self.resubmits = 0

    def on_event(self, msg: dict) -> None:
        if msg["type"] == "job_update" and msg["job"]["status"] in P.TERMINAL:
            self.terminal_seen.setdefault(msg["job"]["id"], set()).add(msg["job"]["status"])

    def submit(self, c: Cluster, name: str, arg: str, retries: int):
        """Submit once, even across a master restart: an answer lost in the crash is looked up by name."""
        deadline = time.monotonic() + 40
        while True:
            try:
                return c.submit(PROGRAM, args=[arg, "0.02"], name=name, retries=retries, timeout=60)
            except DistexecError as exc:
                if not exc.transient or time.monotonic() > deadline:
                    raise
            # The master is away: once it answers again, was the job recorded before the crash?
            def answered():
                try:
                    return ([j for j in c.jobs(limit=200) if j.name == name],)
                except DistexecError as exc:
                    if not exc.transient:
                        raise
                    return None
            [recorded] = wait_for(answered, max(0.0, deadline - time.monotonic()), "the master to answer again")
            if recorded:
                return c.job(recorded[0].id)
            self.resubmits += 1

    def run(self) -> None:
        try:
            with Cluster(self.lc.url, token=self.lc.token) as c:
                c.subscribe(self.on_event)
                window = []
                for i in range(JOBS_PER_CLIENT):
                    name = f"chaos {self.n}-{i}"
                    job = self.submit(c, name, f"{self.n}:{i}", retries=i % 2)
                    self.jobs[name] = job
                    window.append(job)
                    if len(window) >= IN_FLIGHT:
                        window.pop(0).wait(60)
                        self.progress()
                for job in window:
                    job.wait(60)
                    self.progress()
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


@pytest.mark.timeout(300)  # about 20 s on a quiet machine; far more when the cores are shared
def test_chaos(make_cluster, tmp_path):
    t0 = time.monotonic()
    lc = make_cluster(2, slots=2, master_args=["--lost-grace", "5"])
    done = [0]
    lock = threading.Lock()

    def progress():
        with lock:
            done[0] += 1

    clients = [ChaosClient(lc, n, progress) for n in range(CLIENTS)]
    for t in clients:
        t.start()
    total = CLIENTS * JOBS_PER_CLIENT
    try:
        # The chaos, paced by progress so that it strikes while jobs run and wait.
        wait_for(lambda: done[0] >= total // 5, 40, "a fifth of the jobs")
        victim = lc.slaves[0]
        with Cluster(lc.url, token=lc.token) as c:
            running = [j for j in c.jobs(status=P.RUNNING) if j.slave_uid == victim.uid]
        victim.stop(signal.SIGKILL)
        print(f"killed slave {victim.uid} at {time.monotonic() - t0:.1f} s with {len(running)} job(s) running there")
        wait_for(lambda: done[0] >= 2 * total // 5, 40, "two fifths of the jobs")
        back = lc.start_slave()  # takes the killed slave's UID slot again
        assert back.uid == victim.uid
        wait_for(lambda: done[0] >= 3 * total // 5, 40, "three fifths of the jobs")
        lc.restart_master(signal.SIGKILL)
        print(f"master restarted at {time.monotonic() - t0:.1f} s")
    finally:
        for t in clients:
            t.join(90)
    assert not any(t.is_alive() for t in clients), "a client never finished"
    errors = [e for t in clients for e in t.errors]
    assert not errors, f"{errors!r}\n{logs(tmp_path)[-5000:]}"

    with Cluster(lc.url, token=lc.token) as c:
        history = {j["name"]: j for j in c.jobs_page(limit=1000)[0] if j["name"].startswith("chaos ")}
    # Each submission is in the history once: none lost, none doubled by a resubmission.
    assert len(history) == total, f"{len(history)} jobs in the history, {total} submitted"
    codes: dict[str, int] = {}
    for t in clients:
        assert len(t.jobs) == JOBS_PER_CLIENT
        for name, job in t.jobs.items():
            rec = history[name]
            arg = name.split()[1].replace("-", ":")
            status = rec["status"]
            assert status in (P.SUCCEEDED, P.FAILED), rec
            # One terminal state: the same in the history, in the client's handle, and in every event seen.
            assert job.status == status, (job.record, rec)
            assert t.terminal_seen.get(rec["id"], {status}) == {status}, (rec["id"], t.terminal_seen[rec["id"]])
            # Never run more often than its retries allow.
            assert 1 <= rec["attempts"] <= rec["retries"] + 1, rec
            if status == P.SUCCEEDED:
                assert rec["stdout"] == token(arg) + "\n", rec
                assert rec["exit_code"] == 0
            else:
                # Only a lost slave may fail a job, and only once its retries are spent.
                assert rec["error"]["code"] == P.SLAVE_LOST, rec
                assert rec["attempts"] == rec["retries"] + 1, rec
            codes[status] = codes.get(status, 0) + 1
            if rec["attempts"] > 1:
                codes["run again"] = codes.get("run again", 0) + 1
    assert codes.get(P.SUCCEEDED, 0) >= total * 0.8, codes
    elapsed = time.monotonic() - t0
    print(f"chaos: {codes} in {elapsed:.1f} s; resubmitted after a lost answer: "
          f"{sum(t.resubmits for t in clients)}")
