"""Latency and throughput of trivial Python jobs through a real local cluster.

    .venv/bin/python benchmarks/latency.py [--jobs 200] [--burst 500] [--slaves 2]

Prints medians and ratios against a baseline measured in the same run: a
fresh `python3 -I -S -c pass` started from this process (what running a job
costs with no cluster at all).  The machines are shared and noisy, so only
ratios within one run mean much.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402
from slave import toolchains  # noqa: E402


def baseline(n: int) -> list[float]:
    # The interpreter the slaves run (PATH's first real python3, not a pyenv shim).
    python = toolchains.candidates("python3")[0]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


# A program that does nothing, per language: what is left is distexec's cost.
TRIVIAL = {"python": "pass", "bash": "true", "c": "int main(void) { return 0; }"}


def sequential(c: Cluster, n: int, language: str = "python") -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        job = c.submit(TRIVIAL[language], language=language).wait(60)
        out.append(time.perf_counter() - t0)
        assert job.status == "succeeded", job.record
    return out


def burst(c: Cluster, n: int) -> float:
    t0 = time.perf_counter()
    jobs = [c.submit("pass") for _ in range(n)]
    for j in jobs:
        j.wait(300)
    elapsed = time.perf_counter() - t0
    assert all(j.status == "succeeded" for j in jobs)
    return n / elapsed


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ms (p90 {sorted(xs)[int(len(xs) * 0.9)] * 1000:.1f})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--burst", type=int, default=500)
    p.add_argument("--slaves", type=int, default=2)
    p.add_argument("--language", choices=sorted(TRIVIAL), default="python",
                   help="language of the sequential trivial jobs (c: compiled once, then from the cache)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["DISTEXEC_HOME"] = home
        t0 = time.perf_counter()
        lc = LocalCluster(args.slaves, home=home, wait_complete=True).start()
        start_up = time.perf_counter() - t0
        try:
            with Cluster(lc.url, token=lc.token) as c:
                first = time.perf_counter()
                c.submit("pass").wait(60)
                print(f"start-up: cluster ready {start_up:.2f} s, first result {start_up + time.perf_counter() - first:.2f} s")
                sequential(c, 10, args.language)  # warm up (and fill the compile cache)
                base = baseline(args.jobs)
                lat = sequential(c, args.jobs, args.language)
                rate = burst(c, args.burst)
        finally:
            lc.stop()
    print(f"baseline fresh `python3 -I -S -c pass`: {ms(base)}")
    print(f"distexec trivial {args.language} job, submit -> result:  {ms(lat)}")
    print(f"ratio distexec / baseline (medians):    {statistics.median(lat) / statistics.median(base):.2f}")
    print(f"throughput, {args.burst} jobs submitted at once, {args.slaves} slaves: {rate:.0f} jobs/s")


if __name__ == "__main__":
    main()
