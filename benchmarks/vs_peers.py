"""distexec against ipyparallel and Dask, in one run on one machine.

    .venv/bin/pip install -e '.[bench]'      # ipyparallel and dask[distributed]
    .venv/bin/python benchmarks/vs_peers.py [--jobs 100] [--burst 1000] [--sleepers 64]

For each system, two local workers (distexec: the default configuration,
sandbox and limits on, 2 slaves x 2 slots): time from start to the first
result, the median latency of a trivial task run one after another, and the
throughput of a burst of trivial tasks submitted one by one and then all
waited for (``Cluster.submit``; ``apply_async``; ``Client.submit``).  Then
distexec alone: 64 jobs sleeping 0.25 s on 2 slaves x 8 slots against the
ideal wall time; and a cached C program's job (compiled once by the cluster,
then run from its compile cache) against the same program compiled here and
run bare.  It ends with issue 12's targets, each PASS or MISS (the master's
own target: ``benchmarks/master_scale.py``).

What a "task" is differs, and the table should be read with that in mind:
ipyparallel and Dask call a Python function in a long-lived worker process
that every task shares; distexec runs each job as a fresh program in its own
sandboxed process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
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
    lc = LocalCluster(2, slots=2, home=home).start()
    try:
        with Cluster(lc.url, token=lc.token) as c:
            c.submit("pass").wait(60)
            start = time.perf_counter() - t0
            lc.until_complete()  # the rest measures steady running, not the slaves' start
            timed(lambda: c.submit("pass").wait(60), 10)
            lat = timed(lambda: c.submit("pass").wait(60), n)
            c.submit(C_PROGRAM, language="c").wait(120)  # compiled once, then from the compile cache
            c_lat = timed(lambda: c.submit(C_PROGRAM, language="c").wait(60), n)
            t1 = time.perf_counter()
            jobs = [c.submit("pass") for _ in range(burst)]
            for j in jobs:
                j.wait(600)
            rate = burst / (time.perf_counter() - t1)
            assert all(j.status == "succeeded" for j in jobs)
    finally:
        lc.stop()
        shutil.rmtree(home, ignore_errors=True)
    return {"start": start, "lat": lat, "rate": rate, "c_lat": c_lat, "c_bare": bare_c(n)}


C_PROGRAM = "int main(void) { return 0; }\n"


def bare_c(n: int) -> list[float]:
    """The same C program, compiled here with gcc and run bare (no sandbox, no cluster), ``n`` times."""
    with tempfile.TemporaryDirectory(prefix="distexec-bench-c-") as tmp:
        src, exe = os.path.join(tmp, "main.c"), os.path.join(tmp, "main")
        with open(src, "w") as f:
            f.write(C_PROGRAM)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        return timed(lambda: subprocess.run([exe], check=True), n)


def bench_sleepers(count: int, seconds: float, slots: int = 8) -> dict:
    """``count`` jobs sleeping ``seconds`` on 2 slaves x ``slots``: wall time against the ideal."""
    from distexec_kernel import Cluster
    from distexec_kernel.local import LocalCluster

    home = tempfile.mkdtemp(prefix="distexec-bench-")
    lc = LocalCluster(2, slots=slots, home=home, wait_complete=True).start()
    try:
        with Cluster(lc.url, token=lc.token) as c:
            c.submit("pass").wait(60)
            t0 = time.perf_counter()
            jobs = [c.submit(f"import time\ntime.sleep({seconds})") for _ in range(count)]
            for j in jobs:
                j.wait(300)
            wall = time.perf_counter() - t0
            assert all(j.status == "succeeded" for j in jobs)
    finally:
        lc.stop()
        shutil.rmtree(home, ignore_errors=True)
    waves = -(-count // (2 * slots))
    # Where the excess goes, by the master's clock: the first wave's starts spread over the time
    # the cluster takes to start 2 x slots jobs; each job's own path (dispatch -> result, less its sleep).
    starts = sorted(_epoch(j.started_at) for j in jobs)
    path = [_epoch(j.finished_at) - _epoch(j.started_at) - seconds for j in jobs]
    return {"wall": wall, "ideal": waves * seconds, "spread": starts[2 * slots - 1] - starts[0],
            "path": statistics.median(path)}


def _epoch(text: str) -> float:
    from distexec_kernel import protocol as P
    return P.parse_time(text).timestamp()


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
        results = [view.apply_async(nothing) for _ in range(burst)]
        for r in results:
            r.get(600)
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
        client.gather([client.submit(nothing, pure=False) for _ in range(burst)])
        rate = burst / (time.perf_counter() - t1)
    finally:
        client.close()
        cluster.close()
    return {"start": start, "lat": lat, "rate": rate}


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def targets(results: dict, sleep: dict | None) -> list[tuple[str, str, str]]:
    """Issue 12's targets: (what, measured, PASS/MISS/-)."""
    d, ipp, dask = results.get("distexec"), results.get("ipyparallel"), results.get("dask")
    rows = []
    if d and ipp:
        ratio = statistics.median(d["lat"]) / statistics.median(ipp["lat"])
        rows.append(("p50 trivial job, distexec / ipyparallel <= 0.6", f"{ratio:.2f}x", verdict(ratio <= 0.6)))
        ratio = d["rate"] / ipp["rate"]
        rows.append(("1,000-job throughput, distexec / ipyparallel >= 1.8", f"{ratio:.2f}x", verdict(ratio >= 1.8)))
    if d and dask:
        ratio = d["rate"] / dask["rate"]
        rows.append(("1,000-job throughput, distexec / Dask >= 1.3", f"{ratio:.2f}x", verdict(ratio >= 1.3)))
    if d and "c_lat" in d:
        c50, bare = statistics.median(d["c_lat"]), statistics.median(d["c_bare"])
        ratio = c50 / (1.5 * bare + 0.001)
        rows.append(("cached C job <= 1.5 x the bare binary's run + 1 ms",
                     f"{c50 * 1000:.1f} ms / {(1.5 * bare + 0.001) * 1000:.1f} ms = {ratio:.2f}x", verdict(ratio <= 1)))
    if sleep:
        ratio = sleep["wall"] / sleep["ideal"]
        rows.append(("64 x 0.25 s sleeps on 2 x 8 slots, wall / ideal <= 1.05",
                     f"{ratio:.3f}x ({sleep['wall']:.2f} s / {sleep['ideal']:.2f} s)", verdict(ratio <= 1.05)))
    if d:
        rows.append(("distexec up -> first result <= 1 s", f"{d['start']:.2f} s", verdict(d["start"] <= 1.0)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=100, help="trivial tasks timed one after another (p50)")
    p.add_argument("--burst", type=int, default=1000, help="trivial tasks submitted one by one, then waited for")
    p.add_argument("--sleepers", type=int, default=64, help="distexec jobs sleeping 0.25 s on 2 x 8 slots (0: skip)")
    p.add_argument("--only", default="distexec,ipyparallel,dask", help="systems to run, comma-separated")
    args = p.parse_args()
    results = {}
    wanted = args.only.split(",")
    for name, fn in (("distexec", bench_distexec), ("ipyparallel", bench_ipyparallel), ("dask", bench_dask)):
        if name not in wanted:
            continue
        try:
            results[name] = fn(args.jobs, args.burst)
        except ImportError as exc:
            print(f"{name}: not installed ({exc.name}); skipped")
    sleep = bench_sleepers(args.sleepers, 0.25) if args.sleepers and "distexec" in wanted else None
    base = results.get("distexec")
    print(f"\n{'system':<12} {'start->first result':>20} {'p50 trivial task':>17} {'burst jobs/s':>13}"
          f" {'p50 vs distexec':>16}")
    for name, r in results.items():
        p50 = statistics.median(r["lat"])
        ratio = f"{p50 / statistics.median(base['lat']):.2f}x" if base else "-"
        print(f"{name:<12} {r['start']:>18.2f} s {p50 * 1000:>14.1f} ms {r['rate']:>13.0f} {ratio:>16}")
    print(f"\nburst: {args.burst} trivial tasks submitted one by one, then all waited for")
    print("\nissue 12 targets")
    for what, measured, mark in targets(results, sleep):
        print(f"  {mark:<5} {what:<58} {measured}")
    if sleep:
        print(f"\nsleepers: the first wave's starts spread over {sleep['spread'] * 1000:.0f} ms; each job's path "
              f"(dispatched -> result on the master, less its sleep) p50 {sleep['path'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
