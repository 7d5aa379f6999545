"""distexec against ipyparallel and Dask, in one run on one machine.

    .venv/bin/pip install ipyparallel "dask[distributed]"   # or: pip install -e '.[bench]'
    .venv/bin/python benchmarks/vs_peers.py [--jobs 100] [--burst 500]

For each system, two local workers: time from start to the first result,
the median latency of a trivial task run one after another, and the
throughput of a burst of trivial tasks.  What a "task" is differs, and the
table should be read with that in mind: ipyparallel and Dask call a Python
function in a long-lived worker process that every task shares; distexec runs
each job as a fresh program in its own sandboxed process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nothing():
    return None


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_distexec(n: int, burst: int) -> dict:
    from distexec_kernel import Cluster
    from distexec_kernel.local import LocalCluster

    home = tempfile.mkdtemp(prefix="distexec-bench-")
    t0 = time.perf_counter()
    lc = LocalCluster(2, home=home).start()
    try:
        with Cluster(lc.url, token=lc.token) as c:
            c.submit("pass").wait(60)
            start = time.perf_counter() - t0
            timed(lambda: c.submit("pass").wait(60), 10)
            lat = timed(lambda: c.submit("pass").wait(60), n)
            t1 = time.perf_counter()
            jobs = [c.submit("pass") for _ in range(burst)]
            for j in jobs:
                j.wait(300)
            rate = burst / (time.perf_counter() - t1)
            assert all(j.status == "succeeded" for j in jobs)
    finally:
        lc.stop()
    return {"start": start, "lat": lat, "rate": rate}


def bench_ipyparallel(n: int, burst: int) -> dict:
    import ipyparallel as ipp

    t0 = time.perf_counter()
    cluster = ipp.Cluster(n=2, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=120)
        view = rc.load_balanced_view()
        view.apply_sync(nothing)
        start = time.perf_counter() - t0
        timed(lambda: view.apply_sync(nothing), 10)
        lat = timed(lambda: view.apply_sync(nothing), n)
        t1 = time.perf_counter()
        view.map_sync(lambda _: None, range(burst))
        rate = burst / (time.perf_counter() - t1)
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    return {"start": start, "lat": lat, "rate": rate}


def bench_dask(n: int, burst: int) -> dict:
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        client.submit(nothing, pure=False).result()
        start = time.perf_counter() - t0
        timed(lambda: client.submit(nothing, pure=False).result(), 10)
        lat = timed(lambda: client.submit(nothing, pure=False).result(), n)
        t1 = time.perf_counter()
        client.gather(client.map(lambda i: None, range(burst), pure=False))
        rate = burst / (time.perf_counter() - t1)
    finally:
        client.close()
        cluster.close()
    return {"start": start, "lat": lat, "rate": rate}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--burst", type=int, default=500)
    args = p.parse_args()
    results = {}
    for name, fn in (("distexec", bench_distexec), ("ipyparallel", bench_ipyparallel), ("dask", bench_dask)):
        try:
            results[name] = fn(args.jobs, args.burst)
        except ImportError as exc:
            print(f"{name}: not installed ({exc.name}); skipped")
    base = results.get("distexec")
    print(f"\n{'system':<12} {'start->first result':>20} {'p50 trivial task':>17} {'burst jobs/s':>13}"
          f" {'p50 vs distexec':>16}")
    for name, r in results.items():
        p50 = statistics.median(r["lat"])
        ratio = f"{p50 / statistics.median(base['lat']):.2f}x" if base else "-"
        print(f"{name:<12} {r['start']:>18.2f} s {p50 * 1000:>14.1f} ms {r['rate']:>13.0f} {ratio:>16}")


if __name__ == "__main__":
    main()
