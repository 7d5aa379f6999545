"""How long one user's large submissions hold another user's trivial jobs on the master.

    .venv/bin/python benchmarks/parse_stall.py [--programs 4] [--runs 1]
    .venv/bin/python benchmarks/parse_stall.py --stdin 7 --programs 32 [--master-args="--read-rate 0"]

A local cluster of 1 slave x 2 slots with two users.  Alice submits a batch
of ``--programs`` Python programs of about 1 MiB each (``ast.parse`` takes a
second or more of CPU per program here); meanwhile Bob submits trivial jobs
one after another (30 ms apart, under the default rate) and waits for each.
Prints how long Alice's batch took to be answered, Bob's job latency while it
was pending (p50 and max), and the master's CPU time until all her jobs had
ended.  Run it in turns with an older tree (``cd /tmp/old && PYTHONPATH=$PWD
...``) to compare: the machines are shared and noisy.  With ``--stdin MIB`` Alice's
programs are trivial and each carries MIB of stdin instead (what the master
reads, decodes and stores, not what it parses), sent one by one on her
WebSocket; ``--master-args`` passes flags to the master (``--read-rate 0``:
no read rate).

Alice runs in a process of her own, as two people's notebooks would: in one
process her thread encoding and sending 7 MiB frames held Bob's for the GIL,
which measured this script's client, not the master (a Bob job's 400-500 ms
was then 100-280 ms of his submit reaching the master and 90-140 ms of its
end reaching him).  For Bob's slowest jobs it prints where the time went, by
the master's clock (which is this machine's): ``intake`` (his submit() call
-> the master made the job), ``queue`` (-> dispatched), ``ran`` (-> its end
on the master: the ``job_run``'s trip to the slave, the run, the result's
trip back) and ``told`` (-> his wait() returned).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402

BIG = "x = 1\n" * 170_000


def users_file(folder: str) -> str:
    import argon2

    from master import auth

    cheap = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    path = os.path.join(folder, "users.json")
    for name in ("alice", "bob"):
        auth.add_user(path, name, f"{name}-pw", hasher=cheap)
    return path


def alice_sends(url: str, programs: int, stdin_mib: float, answered) -> None:
    """Alice's side, in her own process: submit, then put how long the submissions took to be answered."""
    logging.disable(logging.INFO)
    alice = Cluster(url, user="alice", password="alice-pw")
    t0 = time.perf_counter()
    if stdin_mib:
        data = "x" * int(stdin_mib * (1 << 20))
        jobs = [alice.submit("pass", stdin=data) for _ in range(programs)]
        for job in jobs:
            job.id  # read and answered
    else:
        jobs = alice.submit_many([{"source": BIG + f"y = {i}\n"} for i in range(programs)])
    answered.put(time.perf_counter() - t0)
    for i in range(len(jobs)):
        jobs[i].wait(300)
    alice.close()


def _epoch(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run(programs: int, stdin_mib: float, master_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="distexec-bench-") as home:
        lc = LocalCluster(1, slots=2, languages="python", home=home, log_dir=os.path.join(home, "logs"),
                          wait_complete=True, master_args=["--users", users_file(home)] + master_args).start()
        try:
            bob = Cluster(lc.url, user="bob", password="bob-pw")
            bob.submit("pass").wait(60)
            master = psutil.Process(lc.master.proc.pid)
            cpu0 = sum(master.cpu_times()[:2])
            spawn = multiprocessing.get_context("spawn")
            answered = spawn.Queue()
            alice = spawn.Process(target=alice_sends, args=(lc.url, programs, stdin_mib, answered))
            alice.start()
            time.sleep(0.5)  # her process started and sending first: what is measured is bob's jobs behind it
            bobs = []  # (latency, wall clock at submit, job)
            while alice.is_alive() and answered.empty():
                t0, wall0 = time.perf_counter(), time.time()
                job = bob.submit("pass").wait(300)
                bobs.append((time.perf_counter() - t0, wall0, job))
                time.sleep(0.03)  # under the master's default rate per user (50 submissions/s)
            alice.join(600)
            if answered.empty():
                raise SystemExit("alice's submissions failed (see above)")
            cpu = sum(master.cpu_times()[:2]) - cpu0  # her jobs stored, sent to the slave, ended; bob's too
            bob.close()
        finally:
            lc.stop()
    latencies = [b[0] for b in bobs]
    worst = []
    for took, wall0, job in sorted(bobs, key=lambda b: b[0], reverse=True)[:3]:
        made, started, ended = (_epoch(s) for s in (job.record["submitted_at"], job.started_at, job.finished_at))
        worst.append({"took": took, "intake": made - wall0, "queue": started - made, "ran": ended - started,
                      "told": wall0 + took - ended})
    return {"batch": answered.get(), "p50": statistics.median(latencies), "max": max(latencies),
            "n": len(latencies), "cpu": cpu, "worst": worst}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--programs", type=int, default=4, help="alice's programs of 1 MiB")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--stdin", type=float, default=0, metavar="MIB", help="trivial programs with this much stdin")
    p.add_argument("--master-args", default="", help="more flags for the master")
    args = p.parse_args()
    logging.disable(logging.INFO)
    for _ in range(args.runs):
        r = run(args.programs, args.stdin, args.master_args.split())
        what = f"{args.stdin:g} MiB of stdin" if args.stdin else "1 MiB of source"
        print(f"alice's {args.programs} x {what} answered in {r['batch']:.2f} s; meanwhile bob's {r['n']} trivial "
              f"job(s): p50 {r['p50'] * 1000:.1f} ms, max {r['max'] * 1000:.1f} ms; master CPU until her jobs "
              f"ended {r['cpu']:.2f} s", flush=True)
        for w in r["worst"]:
            print("  bob's job of {took:.0f} ms: intake {intake:.0f}, queue {queue:.0f}, ran {ran:.0f}, "
                  "told {told:.0f} ms".format(**{k: v * 1000 for k, v in w.items()}))


if __name__ == "__main__":
    main()
