"""What a fresh step's mount table costs with other jobs' folders mounted on the host.

    .venv/bin/python benchmarks/mount_view.py [--steps 60] [--others 0,8,64]

A slave's job folder (slave/jobdirs.py, a size-limited tmpfs per job) holds
N other jobs' directories while one more job runs ``true`` in bubblewrap
(cgroups and seccomp as a slave sets them), N taken in turns step by step.
Prints, per N, the median and 90th percentile of two times in
milliseconds: ``Popen`` (fork, the process's set-up before it execs bwrap
-- slave/mountview.py's work -- and the exec: the slave's event loop waits
for all of it) and the whole step (to its exit and the cgroup's removal).
Needs root.  Shared, noisy machines: compare within one run.
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
from slave.jobdirs import JobDirs  # noqa: E402
from slave.sandbox import Cgroups, Limits  # noqa: E402
from slave.seccomp import seccomp_available  # noqa: E402


def step(box: BwrapSandbox, jd, limits: Limits) -> tuple[float, float]:
    t0 = time.perf_counter()
    spawn = box.command(["true"], jd.path, {}, limits, timeout=60, tmpdirs=jd.sandbox_tmp)
    try:
        t1 = time.perf_counter()
        proc = subprocess.Popen(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        t2 = time.perf_counter()
        if proc.wait() != 0:
            raise SystemExit(f"the step failed (exit {proc.returncode})")
    finally:
        box.cleanup(spawn)
    return t2 - t1, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="steps per N (default 60)")
    p.add_argument("--others", default="0,8,64", help="other jobs' folders mounted, comma-separated (default 0,8,64)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (bubblewrap as root, a tmpfs per job, cgroups)")
    counts = [int(n) for n in args.others.split(",")]
    limits = Limits()
    cgroups = Cgroups()
    box = BwrapSandbox(cgroups, seccomp=seccomp_available() is None)
    why = box.probe(limits)
    if why is not None:
        raise SystemExit(f"bubblewrap unavailable: {why}")
    parent = tempfile.mkdtemp(prefix="distexec-bench-")
    dirs = JobDirs("mount-view-bench", parent, 16)
    others = [dirs.make("other") for _ in range(max(counts))]
    mine = dirs.make("mine")
    times: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    try:
        for _ in range(args.steps):
            for n in counts:
                # The first n stay mounted, the rest are unmounted for this step and mounted again after.
                for jd in others[n:]:
                    dirs.remove(jd)
                times[n].append(step(box, mine, limits))
                others[n:] = [dirs.make("other") for _ in others[n:]]
        print(f"{args.steps} steps of `true` in bwrap per N, {os.cpu_count()} cores; milliseconds")
        print(f"{'other jobs mounted':>18} {'Popen p50':>10} {'p90':>8} {'step p50':>10} {'p90':>8}")
        for n in counts:
            popen = sorted(t[0] * 1000 for t in times[n])
            whole = sorted(t[1] * 1000 for t in times[n])
            p90 = int(len(popen) * 0.9) - 1
            print(f"{n:18d} {statistics.median(popen):10.2f} {popen[p90]:8.2f} "
                  f"{statistics.median(whole):10.2f} {whole[p90]:8.2f}")
    finally:
        for jd in others + [mine]:
            dirs.remove(jd)
        dirs.close()
        cgroups.close()
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
