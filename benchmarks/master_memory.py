"""The master's memory with a long queue: RSS with N queued jobs of M MiB each vs. before.

    .venv/bin/python benchmarks/master_memory.py [--jobs 10000] [--mib 1] [--threads 4]

A real local cluster: one slave with one slot, taken by a job that sleeps,
so every later job stays queued.  Each queued job carries M MiB of stdin (an
input, like its source and files).  Prints the master's RSS before and after
the N submissions, and the history's size on disk.  The queue caps are
lifted for the run (--max-queued-per-user 0 --max-queue 0).  Needs N x M MiB
of free disk in the temporary directory: the inputs go to the history.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import threading
import time

import psutil
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster, protocol as P  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402

MIB = 1 << 20


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--mib", type=float, default=1.0, help="stdin size of each queued job")
    p.add_argument("--threads", type=int, default=4, help="submissions in flight at once")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="distexec-mem-") as tmp:
        lc = LocalCluster(1, slots=1, languages="python", home=tmp, log_dir=os.path.join(tmp, "logs"),
                          master_args=["--max-queued-per-user", "0", "--max-queue", "0"], wait_complete=True)
        with lc:
            with Cluster(lc.url, token=lc.token, events=False) as c:
                busy = c.submit("import time\ntime.sleep(3600)", timeout=3600)
                deadline = time.monotonic() + 60
                while c.job(busy.id).status != P.RUNNING:
                    if time.monotonic() > deadline:
                        raise SystemExit("the sleeper did not start")
                    time.sleep(0.05)
            pid = lc.master.pid
            before = rss_mib(pid)
            body = {"source": "import sys\nprint(len(sys.stdin.read()))\n", "language": "python",
                    "stdin": "x" * int(args.mib * MIB)}
            # One body, encoded once: the client's cost is not what is measured.
            data = P.encode(body).encode()
            headers = {"Authorization": f"Bearer {lc.token}", "Content-Type": "application/json"}
            local = threading.local()

            def post(_: int) -> int:
                if not hasattr(local, "session"):
                    local.session = requests.Session()  # one keep-alive connection per thread
                r = local.session.post(lc.url + "/api/jobs", data=data, headers=headers, timeout=120)
                if r.status_code != 201 or r.json()["status"] != P.QUEUED:
                    raise SystemExit(f"submission refused: {r.status_code} {r.text[:200]}")
                return 1

            t0 = time.perf_counter()
            peak = before
            with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
                for n, _ in enumerate(pool.map(post, range(args.jobs)), 1):
                    if n % 500 == 0:
                        peak = max(peak, rss_mib(pid))
                        print(f"  {n} queued, master RSS {rss_mib(pid):.0f} MiB", file=sys.stderr)
            elapsed = time.perf_counter() - t0
            after = rss_mib(pid)
            db = os.path.join(tmp, "history.sqlite3")
            disk = sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s)) / MIB
            print(f"{args.jobs} queued jobs of {args.mib:g} MiB ({args.jobs * args.mib:.0f} MiB of inputs) "
                  f"in {elapsed:.0f} s")
            print(f"master RSS: {before:.0f} MiB before, {after:.0f} MiB after "
                  f"(+{after - before:.0f} MiB, {(after - before) * 1024 / max(1, args.jobs):.1f} KiB per job; "
                  f"peak seen {peak:.0f} MiB)")
            print(f"history on disk: {disk:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
