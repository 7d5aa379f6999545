"""What one job's trickle of live output after a large output costs the master and other users.

    .venv/bin/python benchmarks/output_trickle.py [--mib 7] [--seconds 10] [--runs 1]

A local cluster of 1 slave x 2 slots.  One job prints ``--mib`` MiB on stdout
and on stderr, then one byte on each every 4 ms for ``--seconds`` (the slave
sends what came every 10 ms: about 100 chunks a second a stream).  Meanwhile
trivial jobs run one after another in the other slot.  Prints, for the
trickle's window, the master's CPU (its process's user + system time over the
wall time) and the trivial jobs' latency (submit to end, p50 and max).  The
master appended each chunk to the job's output with ``+=``, a copy of all of
it per chunk; compare with an older tree (``cd /tmp/old && PYTHONPATH=$PWD
...``): the machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402

TRICKLE = """\
import sys, time
mib, seconds = int(sys.argv[1]), float(sys.argv[2])
sys.stdout.write("x" * (mib << 20)); sys.stdout.flush()
sys.stderr.write("y" * (mib << 20)); sys.stderr.flush()
end = time.monotonic() + seconds
while time.monotonic() < end:
    sys.stdout.write("."); sys.stdout.flush()
    sys.stderr.write("."); sys.stderr.flush()
    time.sleep(0.004)
"""


def one_run(c: Cluster, master: psutil.Process, mib: int, seconds: float) -> tuple[float, list[float]]:
    job = c.submit(TRICKLE, args=[str(mib), str(seconds)], timeout=seconds + 120)
    deadline = time.monotonic() + 120
    while len(c.job(job.id).stdout or "") <= mib << 20:  # its large output is in: the trickle is on
        if time.monotonic() > deadline:
            raise SystemExit(f"the trickle did not start: job {job.id} is {c.job(job.id).status}")
        time.sleep(0.2)
    cpu0, t0 = sum(master.cpu_times()[:2]), time.monotonic()
    latencies = []
    while time.monotonic() - t0 < seconds - 0.5:
        start = time.monotonic()
        c.submit("pass").wait(60)
        latencies.append(time.monotonic() - start)
    cpu = (sum(master.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    job.wait(seconds + 120)
    return cpu, latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=7)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as home:
        lc = LocalCluster(1, slots=2, languages="python", home=home, log_dir=os.path.join(home, "logs"),
                          wait_complete=True).start()
        try:
            master = psutil.Process(lc.master.pid)
            with Cluster(lc.url, token=lc.token) as c:
                c.submit("pass").wait(60)  # warm
                for run in range(args.runs):
                    cpu, lat = one_run(c, master, args.mib, args.seconds)
                    lat_ms = sorted(x * 1000 for x in lat)
                    print(f"run {run + 1}: master CPU {cpu * 100:.0f}% of a core; other jobs: {len(lat)}, "
                          f"p50 {statistics.median(lat_ms):.0f} ms, max {lat_ms[-1]:.0f} ms", flush=True)
        finally:
            lc.stop()


if __name__ == "__main__":
    main()
