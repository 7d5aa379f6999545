"""Where each trivial job's CPU goes, process by process, in a burst through a real local cluster.

    .venv/bin/python benchmarks/cpu_budget.py [--jobs 1000] [--slaves 2] [--slots 2] [--runs 3]

A burst of trivial Python jobs (``pass``), submitted one by one with
``Cluster.submit`` and then all waited for, is CPU-bound on these machines:
its throughput is the cores divided by the CPU one job costs, summed over
every process it goes through.  This prints that sum, split by process:

- master: the master's process (its event loop, the store's writer and readers);
- slaves: the slave processes (the agent, the runner's side of each job);
- warm pools: each slave's pool parent and the children it forks (one per job),
  counted when the parent reaps them, and bwrap above it;
- client: this process (``Cluster``, its event thread, encoding and decoding);
- other: the rest of the machine over the same time (the kernel's own threads,
  anything else running), from ``/proc/stat``.

It also prints the throughput the measured CPU allows on this machine's cores
(``cores / CPU per job``) and the CPU per job a throughput target leaves
(``--target`` jobs/s).  CPU time is counted in scheduler ticks: the figures
are averages over many jobs.  Medians over ``--runs`` bursts, each on a fresh
cluster.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def own_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def tree_cpu(p: psutil.Process) -> float:
    """A process's CPU and that of the children it has reaped."""
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def machine_busy() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK


def one_burst(jobs: int, slaves: int, slots: int) -> dict[str, float]:
    home = tempfile.mkdtemp(prefix="distexec-bench-")
    lc = LocalCluster(slaves, slots=slots, home=home, log_dir=os.path.join(home, "logs"),
                      wait_complete=True).start()
    try:
        with Cluster(lc.url, token=lc.token) as c:
            for _ in range(20):
                c.submit("pass").wait(60)  # connections, the pools' first children
            master = psutil.Process(lc.master.pid)
            agents = [psutil.Process(s.pid) for s in lc.slaves]
            pools = [p for a in agents for p in a.children()]  # bwrap: its parent and jobs below it
            me = psutil.Process()

            def sample() -> dict[str, float]:
                return {"master": own_cpu(master), "slaves": sum(own_cpu(a) for a in agents),
                        "warm pools": sum(tree_cpu(p) + sum(tree_cpu(k) for k in p.children(recursive=True))
                                          for p in pools),
                        "client": own_cpu(me), "machine": machine_busy()}
            before = sample()
            t0 = time.perf_counter()
            submitted = [c.submit("pass") for _ in range(jobs)]
            for job in submitted:
                job.wait(600)
            wall = time.perf_counter() - t0
            after = sample()
            assert all(j.status == "succeeded" for j in submitted)
    finally:
        lc.stop()
        shutil.rmtree(home, ignore_errors=True)
    per_job = {k: (after[k] - before[k]) / jobs for k in before}
    per_job["other"] = per_job.pop("machine") - sum(per_job.values())
    per_job["jobs/s"] = jobs / wall
    return per_job


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--slaves", type=int, default=2)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--target", type=float, default=0.0, help="a throughput (jobs/s) to budget for")
    args = p.parse_args()
    runs = [one_burst(args.jobs, args.slaves, args.slots) for _ in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    cores = os.cpu_count() or 1
    ours = sum(med[k] for k in ("master", "slaves", "warm pools", "client"))
    print(f"{args.jobs} trivial jobs submitted one by one, then waited for; {args.slaves} slaves x {args.slots} "
          f"slots; {cores} cores; medians of {args.runs} runs")
    print(f"  {'CPU per job':<14} {'ms':>7}")
    for key in ("master", "slaves", "warm pools", "client"):
        print(f"  {key:<14} {med[key] * 1000:7.2f}")
    print(f"  {'distexec':<14} {ours * 1000:7.2f}   (the processes above)")
    print(f"  {'other':<14} {med['other'] * 1000:7.2f}   (the rest of the machine meanwhile)")
    print(f"measured {med['jobs/s']:.0f} jobs/s; distexec's own CPU allows {cores / ours:.0f} jobs/s on {cores} cores")
    if args.target:
        print(f"{args.target:.0f} jobs/s leaves {cores / args.target * 1000:.2f} ms of CPU per job, all processes")


if __name__ == "__main__":
    main()
