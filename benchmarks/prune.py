"""What a `--keep-mb` pruning pass costs the store's writer, with a long history.

    .venv/bin/python benchmarks/prune.py [--jobs 300000]

Fills a fresh store with ``--jobs`` finished jobs (~700 bytes each, by
``JobStore.save_many``), then times ``prune(keep_bytes=)`` with a bound the
history fits in (the pass only reads its size), median of 3, and a ``save``
issued right after a pass: the writer commits in order, so that save waits
for the pass.  Before/after: run it from a ``git archive`` of the old tree
with ``PYTHONPATH`` set to it (docs/performance.md).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import protocol as P  # noqa: E402
from master.store import JobStore  # noqa: E402

REQUEST = {"source": "print(1)" * 20, "language": "python", "files": {}, "args": [], "stdin": None}


def finished(job_id: int) -> dict:
    job = P.new_job(job_id, REQUEST, client_id=None, user="u")
    job.update(status=P.SUCCEEDED, stdout="x" * 500, finished_at=P.now())
    return job


async def bench(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="distexec-prune-") as tmp:
        store = JobStore(os.path.join(tmp, "history.sqlite3"))
        try:
            for base in range(0, n, 20000):
                await store.save_many([finished(i) for i in range(base + 1, min(n, base + 20000) + 1)])
            bound = 2 * await store.size()
            passes = []
            for _ in range(3):
                t0 = time.perf_counter()
                await store.prune(keep_bytes=bound)
                passes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pruning = store.prune(keep_bytes=bound)
            await store.save(P.new_job(n + 1, REQUEST, client_id=None, user="u"))
            behind = time.perf_counter() - t0
            await pruning
        finally:
            store.close()
    print(f"{n} jobs in history: a pruning pass (nothing to delete) {statistics.median(passes) * 1000:.1f} ms; "
          f"a save issued right after it {behind * 1000:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=300000)
    asyncio.run(bench(p.parse_args().jobs))


if __name__ == "__main__":
    main()
