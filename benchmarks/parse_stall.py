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
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
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


def run(programs: int, stdin_mib: float, master_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="distexec-bench-") as home:
        lc = LocalCluster(1, slots=2, languages="python", home=home, log_dir=os.path.join(home, "logs"),
                          wait_complete=True, master_args=["--users", users_file(home)] + master_args).start()
        try:
            alice = Cluster(lc.url, user="alice", password="alice-pw")
            bob = Cluster(lc.url, user="bob", password="bob-pw")
            bob.submit("pass").wait(60)
            done = threading.Event()
            took: list[float] = []
            jobs: list = []
            master = psutil.Process(lc.master.proc.pid)
            cpu0 = sum(master.cpu_times()[:2])

            def submit():
                t0 = time.perf_counter()
                try:
                    if stdin_mib:
                        data = "x" * int(stdin_mib * (1 << 20))
                        jobs.extend(alice.submit("pass", stdin=data) for _ in range(programs))
                        for job in jobs:
                            job.id  # read and answered
                    else:
                        jobs.extend(alice.submit_many([{"source": BIG + f"y = {i}\n"} for i in range(programs)]))
                    took.append(time.perf_counter() - t0)
                finally:
                    done.set()
            sender = threading.Thread(target=submit)
            sender.start()
            time.sleep(0.05)  # alice's batch on its way first: what is measured is bob's jobs behind it
            latencies = []
            while not done.is_set():
                t0 = time.perf_counter()
                bob.submit("pass").wait(300)
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.03)  # under the master's default rate per user (50 submissions/s)
            sender.join()
            if not took:
                raise SystemExit("alice's submissions failed (see above)")
            for job in jobs:
                job.wait(300)
            cpu = sum(master.cpu_times()[:2]) - cpu0  # her jobs stored, sent to the slave, ended; bob's too
            alice.close()
            bob.close()
        finally:
            lc.stop()
    return {"batch": took[0], "p50": statistics.median(latencies), "max": max(latencies), "n": len(latencies),
            "cpu": cpu}


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


if __name__ == "__main__":
    main()
