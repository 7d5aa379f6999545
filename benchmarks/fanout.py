"""Fan-out: N trivial jobs as one batch (``Cluster.map``) against N ``submit`` calls, in one run.

    .venv/bin/python benchmarks/fanout.py [--jobs 500] [--slaves 2] [--slots 2] [--big 10000] [--cap 0]

Prints, for each way, how long the submission took (the client's side only)
and the throughput until every result was in; then how long a batch of
``--big`` jobs takes to be accepted and how fast one job of another client
runs while it is queued (the fair share).  The machines are shared and
noisy: compare within a run.  ``--cap N``: the master's ``--max-queued-per-user``
(0: none), so a map past it is sent in parts (``distexec_kernel/feeding.py``):
run it with and without, in turns.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402
from master import auth  # noqa: E402

SOURCE = "import sys\nprint(sys.argv[1])\n"


def one_by_one(c: Cluster, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jobs = [c.submit(SOURCE, args=[str(i)]) for i in range(n)]
    submitted = time.perf_counter() - t0
    for j in jobs:
        j.wait(600)
    assert all(j.status == "succeeded" for j in jobs)
    return submitted, n / (time.perf_counter() - t0)


def as_map(c: Cluster, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    group = c.map(SOURCE, range(n))
    submitted = time.perf_counter() - t0
    results = group.results(timeout=600)
    assert results == [f"{i}\n" for i in range(n)]
    return submitted, n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--slaves", type=int, default=2)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--big", type=int, default=10_000)
    p.add_argument("--cap", type=int, default=0, help="--max-queued-per-user (0: none)")
    args = p.parse_args()
    home = tempfile.mkdtemp(prefix="distexec-bench-")
    os.environ["DISTEXEC_HOME"] = home
    users = os.path.join(home, "users.json")
    auth.add_user(users, "alice", "alice-pw")
    lc = LocalCluster(args.slaves, slots=args.slots, languages="python", home=home, log_dir=os.path.join(home, "logs"),
                      master_args=["--max-queued-per-user", str(args.cap), "--users", users, "--rate", "0"],
                      wait_complete=True)
    lc.start()
    try:
        with Cluster(lc.url, token=lc.token) as c:
            c.map("pass", range(20)).results(timeout=120)  # warm: toolchains, caches, connections
            rows = []
            # Past a cap, N submit() calls are refused (queue_full); a map is sent in parts.
            ways = (("map", as_map),) if args.cap else (("submit x N", one_by_one), ("map", as_map))
            for name, way in ways:
                subs, rates = [], []
                for _ in range(3):
                    sub, rate = way(c, args.jobs)
                    subs.append(sub)
                    rates.append(rate)
                rows.append((name, statistics.median(subs), statistics.median(rates)))
            print(f"{args.jobs} trivial jobs, {args.slaves} slaves x {args.slots} slots; medians of 3")
            for name, sub, rate in rows:
                print(f"  {name:<16} submitted in {sub * 1000:8.1f} ms   {rate:6.1f} jobs/s to the last result")
            if len(rows) == 2:
                print(f"  map / submit x N: submission time {rows[1][1] / rows[0][1]:.2f}x, throughput "
                      f"{rows[1][2] / rows[0][2]:.2f}x")
            # One user's big batch of sleepers queued, and another user's single job meanwhile.
            with Cluster(lc.url, user="alice", password="alice-pw") as alice:
                t0 = time.perf_counter()
                big = alice.map("import time; time.sleep(0.5)", range(args.big))
                accepted = time.perf_counter() - t0
                lone_times = []
                for _ in range(5):
                    t1 = time.perf_counter()
                    lone = c.submit("print('me')").wait(120)
                    assert lone.status == "succeeded", lone.record
                    lone_times.append(time.perf_counter() - t1)
                t2 = time.perf_counter()
                big.cancel()
                cancelled = time.perf_counter() - t2
            print(f"  alice's batch of {args.big} accepted in {accepted:.2f} s, cancelled in {cancelled:.2f} s")
            print(f"  meanwhile another user's single job: median {statistics.median(lone_times):.2f} s "
                  f"(fair share: it takes the next free slot, not a place behind the batch)")
    finally:
        lc.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
