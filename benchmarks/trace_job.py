"""One trivial job's path, syscall by syscall, across the client, master, slave and pool.

    .venv/bin/python benchmarks/trace_job.py [--jobs 30]       # needs root and perf (linux-perf)

Runs trivial Python jobs one after another through a local cluster of
1 slave x 1 slot under ``perf trace -a`` (the socket, pipe and file
syscalls that carry a job between processes, and the history's page
writes), then prints the job of median latency: each traced call from the
client's submit on, in ms, named by process (client, master, slave; pool:
the warm pool's parent and children).  Each job is marked in the trace by a
write of a length of its own to /dev/null, so no clocks are compared.  The
trace slows a job by a third or so: read where the time goes, not the sum.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402

SYSCALLS = "sendto,recvfrom,sendmsg,recvmsg,write,read,pwrite64"
MARK = 100_000  # a job's marker: a write of MARK + its index bytes to /dev/null
LINE = re.compile(r"^\s*([\d.]+) \(\s*([\d.]*) ms\): (\S+)/(\d+) (\w+)\((.*)$")


def threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=30)
    args = p.parse_args()
    out = tempfile.NamedTemporaryFile(prefix="distexec-trace-", suffix=".txt", delete=False).name
    null = os.open(os.devnull, os.O_WRONLY)
    latencies = []
    with tempfile.TemporaryDirectory(prefix="distexec-trace-") as tmp:
        lc = LocalCluster(1, slots=1, home=tmp, log_dir=os.path.join(tmp, "logs"), wait_complete=True)
        with lc, Cluster(lc.url, token=lc.token) as c:
            for _ in range(20):
                c.submit("pass").wait(60)
            roles = {**{t: "client" for t in threads(os.getpid())}, **{t: "master" for t in threads(lc.master.pid)},
                     **{t: "slave" for t in threads(lc.slaves[0].pid)}}
            perf = subprocess.Popen(["perf", "trace", "-a", "-o", out, "-e", SYSCALLS], stderr=subprocess.DEVNULL)
            time.sleep(2)  # perf trace attaches its tracepoints
            for i in range(args.jobs + 1):
                os.write(null, b"\0" * (MARK + i))
                if i == args.jobs:
                    break
                t0 = time.perf_counter()
                c.submit("pass").wait(60)
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)
            perf.send_signal(signal.SIGINT)
            perf.wait()
    os.close(null)
    with open(out) as f:
        lines = f.readlines()
    os.unlink(out)
    marks = {}
    for n, line in enumerate(lines):
        m = LINE.match(line)
        count = re.search(r"count: (\d+)", m.group(6)) if m and m.group(5) == "write" else None
        if count and MARK <= int(count.group(1)) <= MARK + args.jobs:
            marks[int(count.group(1)) - MARK] = n
    median = sorted(range(len(latencies)), key=latencies.__getitem__)[len(latencies) // 2]
    print(f"{args.jobs} jobs under perf trace, p50 {statistics.median(latencies) * 1000:.2f} ms; "
          f"job {median} ({latencies[median] * 1000:.2f} ms), ms from its submit:")
    start = None
    for line in lines[marks[median] + 1:marks[median + 1]]:
        m = LINE.match(line)
        if not m or "EAGAIN" in line:
            continue
        at, took, _, tid, call, rest = m.groups()
        start = float(at) if start is None else start
        role = roles.get(int(tid), "pool")
        size = re.search(r"(?:len|count|size): (\d+)", rest)
        print(f"  {float(at) - start:8.3f}  {role:<6} {tid:>7} {call:<9} {size.group(1) if size else '':>6}"
              f"  {took or '...'} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
