"""What a restarted master spends counting the queued jobs' inputs (``JobStore.queued_inputs``).

    .venv/bin/python benchmarks/queued_count.py [--jobs 256] [--mib 4] [--runs 5]

Writes a history of N queued jobs, each with M MiB of stdin (half newlines,
which JSON doubles), then times ``queued_inputs`` as this version saved
them (their ``chars`` column) and, in the same run, with that column emptied:
what a history an older version wrote costs, every input parsed.  Medians of
--runs reads each, turn by turn.  Needs N x M x 1.5 MiB of disk in the
temporary directory.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import protocol as P  # noqa: E402
from master.store import JobStore  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=256)
    p.add_argument("--mib", type=float, default=4.0)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    half = int(a.mib * (1 << 20)) // 2
    stdin = "\n" * half + "x" * half
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "history.sqlite3")

        async def fill() -> None:
            store = JobStore(path)
            for n in range(1, a.jobs + 1):
                job = P.new_job(n, {"source": "print(len(input()))", "language": "python", "files": {},
                                    "args": [], "stdin": stdin}, client_id=None, user=f"user{n % 8}")
                await store.save(job)
            store.close()

        asyncio.run(fill())
        plain = os.path.join(folder, "older.sqlite3")
        conn = sqlite3.connect(path)
        conn.execute("VACUUM INTO ?", (plain,))
        conn.close()
        conn = sqlite3.connect(plain)
        conn.execute("UPDATE inputs SET chars = NULL")
        conn.commit()
        conn.close()
        times: dict[str, list[float]] = {"saved chars": [], "parsed (older history)": []}
        counts = []
        for _ in range(a.runs):
            for label, file in (("saved chars", path), ("parsed (older history)", plain)):
                store = JobStore(file)
                try:
                    t = time.perf_counter()
                    counts.append(sum(store.queued_inputs().values()))
                    times[label].append(time.perf_counter() - t)
                finally:
                    store.close()
        assert len(set(counts)) == 1, counts  # both ways count the same
        print(f"{a.jobs} queued jobs x {a.mib:g} MiB of stdin, {counts[0] / (1 << 20):.0f} Mi characters")
        base = statistics.median(times["parsed (older history)"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"  {label:24} median {med * 1e3:8.1f} ms  ({base / med:.1f}x faster than parsing)"
                  if label == "saved chars" else f"  {label:24} median {med * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
