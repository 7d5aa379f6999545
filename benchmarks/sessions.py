"""Latency of a trivial job in a warm session vs as a fresh process, through a real local cluster.

    .venv/bin/python benchmarks/sessions.py [--jobs 50]

One slave, one slot, one client.  Fresh: ``x = 1`` as a session-less job
(a sandboxed process of its own per job).  Warm session: the same in one
session whose kernel already runs (its first job, which starts the kernel,
is timed apart as "cold start").  Each time is submit to result, as a
notebook sees it.  The two kinds alternate, so machine load hits both
alike; the machines are shared and noisy: compare the numbers of one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster, protocol as P  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402


def timed(c: Cluster, **kw) -> float:
    t0 = time.perf_counter()
    job = c.submit("x = 1", **kw).wait(120)
    elapsed = time.perf_counter() - t0
    if job.status != P.SUCCEEDED:
        raise SystemExit(f"job {job.id} did not run: {job.status} {job.error} {job.stderr[:500]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=50, help="jobs of each kind (default 50)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="distexec-bench-") as home:
        with LocalCluster(1, slots=1, home=home, log_dir=os.path.join(home, "logs"), wait_complete=True) as lc:
            with Cluster(lc.url, token=lc.token) as c:
                timed(c)  # first process start: page cache
                cold = timed(c, session="bench")
                fresh, warm = [], []
                for _ in range(args.jobs):
                    fresh.append(timed(c))
                    warm.append(timed(c, session="bench"))
        f, w = statistics.median(fresh), statistics.median(warm)
        print(f"{'':22} {'median':>9} {'p90':>9}   ({args.jobs} jobs each, 1 slave, 1 slot)")
        for name, xs in (("fresh process", fresh), ("warm session", warm)):
            xs = sorted(xs)
            print(f"{name:22} {statistics.median(xs) * 1e3:8.1f}ms {xs[int(len(xs) * 0.9)] * 1e3:8.1f}ms")
        print(f"{'session cold start':22} {cold * 1e3:8.1f}ms")
        print(f"fresh / warm: {f / w:.1f}x")
        return 0


if __name__ == "__main__":
    sys.exit(main())
