"""Local clusters that differ only in their slaves' options, timed job by job in turns.

Taking turns within one run is what makes two configurations comparable on
these shared, noisy machines (see docs/performance.md).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time


def trivial_job_times(slave_args: list[list[str]], n: int, *, languages: str | None = None,
                      source: str = "pass") -> list[list[float]]:
    """Submit-to-result seconds of ``n`` trivial Python jobs on one 1-slave, 1-slot
    cluster per entry of ``slave_args``, the clusters taking turns job by job."""
    from distexec_kernel import Cluster
    from distexec_kernel.local import LocalCluster

    home = tempfile.mkdtemp(prefix="distexec-bench-home-")
    clusters = [LocalCluster(1, slots=1, home=home, log_dir=os.path.join(home, "logs"), languages=languages,
                             slave_args=args, wait_complete=True) for args in slave_args]
    clients = []
    try:
        for lc in clusters:
            lc.start()
            clients.append(Cluster(lc.url, token=lc.token))
        for c in clients:
            c.submit(source).wait(60)  # warm up
        times: list[list[float]] = [[] for _ in slave_args]
        for _ in range(n):
            for i, c in enumerate(clients):
                t0 = time.perf_counter()
                job = c.submit(source).wait(60)
                times[i].append(time.perf_counter() - t0)
                assert job.status == "succeeded", job.record
        return times
    finally:
        for c in clients:
            c.close()
        for lc in clusters:
            lc.stop()
        shutil.rmtree(home, ignore_errors=True)
