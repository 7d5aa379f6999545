"""Where a trivial job's time goes, hop by hop (client, master, slave + sandbox + process, back).

    .venv/bin/python benchmarks/profile_job.py [--jobs 100] [--slaves 2] [--slots 2]

Runs trivial Python jobs (``pass``) one after another through a real local
cluster and splits each one's latency with the client's clock and the
master's job times (``submitted_at``, ``started_at``, ``finished_at``: the
same machine, one clock, millisecond precision):

- submit -> on the master: the client sends, the master reads and checks it
  (``submitted_at`` is set when the master makes the job, before its commit);
- submit -> answered: what ``Cluster.submit`` (and ``job.id``) waits for;
- queued -> dispatched: the submission's commit, then placement;
- dispatched -> result on the master: the "running" commit, ``job_run`` to
  the slave, the slave's set-up, the sandbox, the process, the result back;
- result -> client: the final commit, the ``job_update`` event, the waiter waking.

For the process and sandbox inside the slave hop, the same run times a bare
``python3 -I -S -c pass`` (see ``benchmarks/sandbox_overhead.py`` for the
sandbox alone).  Medians; the machines are shared, so compare within a run.
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

from distexec_kernel import Cluster, protocol as P  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402
from slave import toolchains  # noqa: E402


def epoch(text: str) -> float:
    return P.parse_time(text).timestamp()


def bare(n: int) -> float:
    python = toolchains.candidates("python3")[0]  # what the slaves run (not a pyenv shim)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--slaves", type=int, default=2)
    p.add_argument("--slots", type=int, default=2)
    args = p.parse_args()
    hops: dict[str, list[float]] = {k: [] for k in (
        "submit -> on the master", "submit -> answered", "queued -> dispatched",
        "dispatched -> result on the master", "result -> client", "total")}
    with tempfile.TemporaryDirectory(prefix="distexec-profile-") as tmp:
        lc = LocalCluster(args.slaves, slots=args.slots, home=tmp, log_dir=os.path.join(tmp, "logs"),
                          wait_complete=True)
        with lc, Cluster(lc.url, token=lc.token) as c:
            for _ in range(10):
                c.submit("pass").wait(60)  # warm: compile caches, connections
            for _ in range(args.jobs):
                t0 = time.time()
                job = c.submit("pass")
                job.id  # the master's answer
                t1 = time.time()
                job.wait(60)
                t2 = time.time()
                assert job.status == P.SUCCEEDED, job.record
                sub, start, end = epoch(job.submitted_at), epoch(job.started_at), epoch(job.finished_at)
                for name, value in (("submit -> on the master", sub - t0), ("submit -> answered", t1 - t0),
                                    ("queued -> dispatched", start - sub),
                                    ("dispatched -> result on the master", end - start),
                                    ("result -> client", t2 - end), ("total", t2 - t0)):
                    hops[name].append(value)
    process = bare(min(args.jobs, 30))
    print(f"{args.jobs} trivial Python jobs one after another, {args.slaves} slaves x {args.slots} slots "
          f"(medians, ms)")
    for name, values in hops.items():
        print(f"  {name:<36} {statistics.median(values) * 1000:8.2f}")
    print(f"  {'bare python3 -I -S -c pass, here':<36} {process * 1000:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
