"""distexec against ipyparallel and Dask, in one run on one machine.

    .venv/bin/pip install -e '.[bench]'      # ipyparallel and dask[distributed]
    .venv/bin/python benchmarks/vs_peers.py [--jobs 100] [--burst 1000] [--rounds 5] [--bursts 2] [--sleepers 64]

For each system, two local workers (distexec: the default configuration,
sandbox and limits on, 2 slaves x 2 slots): time from start to the first
result, the median latency of a trivial task run one after another, and the
throughput of a burst of trivial tasks submitted one by one and then all
waited for (``Cluster.submit``; ``apply_async``; ``Client.submit``).  The
three stay up and take turns (the p50 in ``--rounds``, the burst in
``--bursts``): on a shared machine the load drifts by a third within minutes,
and one system's phase after another's handed that drift to one of them
(before 2026-11-30, one run's p50 ratio swung from 0.71x to 1.13x).  Then
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


class Distexec:
    """A local distexec cluster (2 slaves x 2 slots, the default configuration), kept up across rounds."""

    name = "distexec"

    def start(self) -> float:
        from distexec_kernel import Cluster
        from distexec_kernel.local import LocalCluster

        self.home = tempfile.mkdtemp(prefix="distexec-bench-")
        t0 = time.perf_counter()
        self.lc = LocalCluster(2, slots=2, home=self.home).start()
        self.c = Cluster(self.lc.url, token=self.lc.token)
        self.c.submit("pass").wait(60)
        start = time.perf_counter() - t0
        self.lc.until_complete()  # the rest measures steady running, not the slaves' start
        return start

    def trivial(self) -> None:
        self.c.submit("pass").wait(60)

    def burst(self, n: int) -> None:
        jobs = [self.c.submit("pass") for _ in range(n)]
        for j in jobs:
            j.wait(600)
        assert all(j.status == "succeeded" for j in jobs)

    def cached_c(self, n: int) -> list[float]:
        self.c.submit(C_PROGRAM, language="c").wait(120)  # compiled once, then from the compile cache
        return timed(lambda: self.c.submit(C_PROGRAM, language="c").wait(60), n)

    def close(self) -> None:
        # Also after a start that failed half-way (each close below): what it made goes.
        try:
            if hasattr(self, "c"):
                self.c.close()
            if hasattr(self, "lc"):
                self.lc.stop()
        finally:
            if hasattr(self, "home"):
                shutil.rmtree(self.home, ignore_errors=True)


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
    # How much of that spread is the master taking the submissions in (submitted_at is set as it
    # makes each job): the client's submit() calls themselves take a few ms for all of them.
    made = sorted(_epoch(j.record["submitted_at"]) for j in jobs)
    first_wave = min(count, 2 * slots) - 1
    return {"wall": wall, "ideal": waves * seconds, "spread": starts[first_wave] - starts[0],
            "intake": made[first_wave] - made[0], "path": statistics.median(path)}


def _epoch(text: str) -> float:
    from distexec_kernel import protocol as P
    return P.parse_time(text).timestamp()


class Ipyparallel:
    """Two ipyparallel engines, tasks through a load-balanced view."""

    name = "ipyparallel"

    def start(self) -> float:
        import ipyparallel as ipp

        t0 = time.perf_counter()
        self.cluster = ipp.Cluster(n=2, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(2, timeout=120)
        self.view = self.rc.load_balanced_view()
        self.view.apply_sync(nothing)
        return time.perf_counter() - t0

    def trivial(self) -> None:
        self.view.apply_sync(nothing)

    def burst(self, n: int) -> None:
        for r in [self.view.apply_async(nothing) for _ in range(n)]:
            r.get(600)

    def close(self) -> None:
        if hasattr(self, "rc"):
            self.rc.close()
        if hasattr(self, "cluster"):
            self.cluster.stop_cluster_sync()


class Dask:
    """Two Dask worker processes, one thread each."""

    name = "dask"

    def start(self) -> float:
        import dask
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        # Its scheduler's and workers' scratch space (dask-scratch-space), removed at close.
        self.scratch = tempfile.mkdtemp(prefix="distexec-bench-dask-")
        dask.config.set({"temporary-directory": self.scratch})
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.submit(nothing, pure=False).result()
        return time.perf_counter() - t0

    def trivial(self) -> None:
        self.client.submit(nothing, pure=False).result()

    def burst(self, n: int) -> None:
        self.client.gather([self.client.submit(nothing, pure=False) for _ in range(n)])

    def close(self) -> None:
        try:
            if hasattr(self, "client"):
                self.client.close()
            if hasattr(self, "cluster"):
                self.cluster.close()
        finally:
            if hasattr(self, "scratch"):
                shutil.rmtree(self.scratch, ignore_errors=True)


def compare(systems: list, n: int, burst: int, rounds: int, bursts: int) -> dict:
    """Each system's start; then ``rounds`` turns in which every system (in an order that rotates)
    times ``n / rounds`` trivial tasks one after another; then ``bursts`` turns of a burst of ``burst``.
    The machine's load drifts within a run: taking turns spreads the drift over every system, where
    one system's phase after another's would give it to one of them."""
    results, up = {}, []
    try:
        for system in systems:  # one at a time: each starts beside the ones already up, idle
            try:
                started = system.start()
            except ImportError as exc:  # raised before it starts anything
                print(f"{system.name}: not installed ({exc.name}); skipped")
                continue
            except BaseException:
                system.close()  # what a start that failed half-way left running
                raise
            results[system.name] = {"start": started, "lat": [], "rounds": [], "secs": 0.0}
            up.append(system)
            timed(system.trivial, 10)
        per = max(1, n // rounds)
        for turn in range(rounds):
            for system in up[turn % len(up):] + up[:turn % len(up)]:
                lat = timed(system.trivial, per)
                results[system.name]["lat"] += lat
                results[system.name]["rounds"].append(statistics.median(lat))
        for turn in range(bursts):
            for system in up[turn % len(up):] + up[:turn % len(up)]:
                t0 = time.perf_counter()
                system.burst(burst)
                results[system.name]["secs"] += time.perf_counter() - t0
        for system in up:
            r = results[system.name]
            r["rate"] = burst * bursts / r["secs"]
            if hasattr(system, "cached_c"):
                r["c_lat"], r["c_bare"] = system.cached_c(n), bare_c(n)
    finally:
        for system in up:
            system.close()
    return results


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def targets(results: dict, sleep: dict | None) -> list[tuple[str, str, str]]:
    """Issue 12's targets: (what, measured, PASS/MISS/-)."""
    d, ipp, dask = results.get("distexec"), results.get("ipyparallel"), results.get("dask")
    rows = []
    if d and ipp:
        ratio = statistics.median(d["lat"]) / statistics.median(ipp["lat"])
        turns = sorted(a / b for a, b in zip(d["rounds"], ipp["rounds"]))
        rows.append(("p50 trivial job, distexec / ipyparallel <= 0.6",
                     f"{ratio:.2f}x (rounds {turns[0]:.2f}-{turns[-1]:.2f}x)", verdict(ratio <= 0.6)))
        ratio = d["rate"] / ipp["rate"]
        rows.append(("1,000-job throughput, distexec / ipyparallel >= 1.8", f"{ratio:.2f}x", verdict(ratio >= 1.8)))
    if d and dask:
        ratio = d["rate"] / dask["rate"]
        rows.append(("1,000-job throughput, distexec / Dask >= 1.3", f"{ratio:.2f}x", verdict(ratio >= 1.3)))
    if d and "c_lat" in d:
        c50, bare = statistics.median(d["c_lat"]), statistics.median(d["c_bare"])
        ratio = c50 / (1.5 * bare + 0.001)
        rows.append(("cached C job <= 1.5 x the bare binary's run + 1 ms",
                     f"{c50 * 1000:.1f} ms, target {(1.5 * bare + 0.001) * 1000:.1f} ms (bare {bare * 1000:.2f} ms): "
                     f"{ratio:.2f}x", verdict(ratio <= 1)))
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
    p.add_argument("--rounds", type=int, default=5, help="turns the systems take at the p50 (jobs/rounds each)")
    p.add_argument("--bursts", type=int, default=2, help="turns the systems take at the burst")
    p.add_argument("--sleepers", type=int, default=64, help="distexec jobs sleeping 0.25 s on 2 x 8 slots (0: skip)")
    p.add_argument("--only", default="distexec,ipyparallel,dask", help="systems to run, comma-separated")
    args = p.parse_args()
    wanted = args.only.split(",")
    systems = [cls() for cls in (Distexec, Ipyparallel, Dask) if cls.name in wanted]
    results = compare(systems, args.jobs, args.burst, args.rounds, args.bursts)
    sleep = bench_sleepers(args.sleepers, 0.25) if args.sleepers and "distexec" in wanted else None
    base = results.get("distexec")
    print(f"\n{'system':<12} {'start->first result':>20} {'p50 trivial task':>17} {'burst jobs/s':>13}"
          f" {'p50 vs distexec':>16}")
    for name, r in results.items():
        p50 = statistics.median(r["lat"])
        ratio = f"{p50 / statistics.median(base['lat']):.2f}x" if base else "-"
        print(f"{name:<12} {r['start']:>18.2f} s {p50 * 1000:>14.1f} ms {r['rate']:>13.0f} {ratio:>16}")
    print(f"\np50: {args.rounds} rounds, the systems taking turns; burst: {args.burst} trivial tasks submitted "
          f"one by one, then all waited for, {args.bursts} turns each")
    print("\nissue 12 targets")
    for what, measured, mark in targets(results, sleep):
        print(f"  {mark:<5} {what:<58} {measured}")
    if sleep:
        print(f"\nsleepers: the first wave's starts spread over {sleep['spread'] * 1000:.0f} ms; each job's path "
              f"(dispatched -> result on the master, less its sleep) p50 {sleep['path'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
