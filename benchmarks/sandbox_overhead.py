"""What the job sandbox costs per step, plain against bubblewrap.

    .venv/bin/python benchmarks/sandbox_overhead.py [--jobs 100] [--cluster]

Runs the same trivial step N times through each sandbox this machine
offers, taking turns, and prints the median and 90th percentile of its wall time, from
``Sandbox.command`` (cgroup made) to ``cleanup`` (cgroup removed): the cost
the runner pays per compile or run step.  Two programs: ``true`` (the
sandbox's own cost, almost nothing else) and ``python3 -I -S -c pass`` (a
trivial Python job).  With ``--cluster``, also the latency of a trivial
job through a real master and slave, ``--sandbox none`` against the
default.  Needs root for bubblewrap and cgroups.  The machines are shared
and noisy: compare within one run.
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

from slave.bwrap import BwrapSandbox  # noqa: E402
from slave.sandbox import Cgroups, Limits, Sandbox  # noqa: E402
from slave.seccomp import seccomp_available  # noqa: E402

from side_by_side import trivial_job_times  # noqa: E402


def one(sandbox: Sandbox, argv: list[str], workdir: str, limits: Limits) -> float:
    t0 = time.perf_counter()
    spawn = sandbox.command(argv, workdir, {}, limits, timeout=60)
    try:
        subprocess.run(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    finally:
        sandbox.cleanup(spawn)
    return time.perf_counter() - t0


def measure(boxes: list[Sandbox], argv: list[str], n: int, limits: Limits) -> list[list[float]]:
    """Times per sandbox, taken in turn so that the load of a shared machine,
    which drifts by the second, weighs on every sandbox alike."""
    workdir = tempfile.mkdtemp(prefix="distexec-bench-")
    try:
        for box in boxes:
            one(box, argv, workdir, limits)  # warm the page cache
        times: list[list[float]] = [[] for _ in boxes]
        for _ in range(n):
            for i, box in enumerate(boxes):
                times[i].append(one(box, argv, workdir, limits))
        return times
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def through_clusters(n: int) -> None:
    """p50 of a trivial Python job, submit to result, through a real master and
    slave: one cluster per ``--sandbox`` mode, taking turns job by job."""
    modes = ("none", "auto")
    times = trivial_job_times([["--sandbox", mode] for mode in modes], n)
    print(f"{n} trivial Python jobs per cluster (1 slave, 1 slot), submit to result; milliseconds")
    base = None
    for mode, ts in zip(modes, times):
        ts.sort()
        med = statistics.median(ts) * 1000
        base = med if base is None else base
        print(f"--sandbox {mode:5} median {med:7.2f}  p90 {ts[int(len(ts) * 0.9) - 1] * 1000:7.2f}"
              f"  {med - base:+7.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100, help="steps per sandbox and program (default 100)")
    p.add_argument("--cluster", action="store_true",
                   help="also time trivial jobs end to end through a real cluster, --sandbox none against auto")
    args = p.parse_args()
    if args.cluster:
        through_clusters(args.jobs)
    limits = Limits()
    cgroups = Cgroups()
    seccomp = seccomp_available() is None
    filt = " + seccomp" if seccomp else ""
    boxes = [("plain", Sandbox(Cgroups(mounts={}))),
             (f"plain + cgroups{filt}", Sandbox(cgroups, seccomp=seccomp))]
    bwrap = BwrapSandbox(cgroups, seccomp=seccomp)
    why = bwrap.probe(limits)
    if why is None:
        boxes.append((f"bwrap + cgroups{filt}", bwrap))
    else:
        print(f"bubblewrap not measured: {why}")
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    programs = [("true", ["true"]), ("python3 -I -S -c pass", [python, "-I", "-S", "-c", "pass"])]
    print(f"{args.jobs} steps each, {os.cpu_count()} cores; milliseconds")
    print(f"{'program':24} {'sandbox':30} {'median':>8} {'p90':>8} {'+median':>8}")
    try:
        for label, argv in programs:
            base = None
            for (name, _), times in zip(boxes, measure([box for _, box in boxes], argv, args.jobs, limits)):
                times.sort()
                med = statistics.median(times) * 1000
                p90 = times[int(len(times) * 0.9) - 1] * 1000
                base = med if base is None else base
                print(f"{label:24} {name:30} {med:8.2f} {p90:8.2f} {med - base:+8.2f}")
    finally:
        cgroups.close()


if __name__ == "__main__":
    main()
