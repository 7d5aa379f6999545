"""What ``--warm-imports`` saves a job that imports those modules, and what it costs every other job.

    .venv/bin/python benchmarks/warm_imports.py [--imports json,decimal,asyncio] [--jobs 100]

Two warm pools built as the slave builds them (``benchmarks/warm.py``'s ``runners``), one without and
one with ``--warm-imports MODULES``, take turns of 10 jobs each: a job importing the modules and a
trivial job (``pass``), one after another with 5 ms between them (a client's gap).  Prints the median
``Runner.run`` (job in, outcome out) of each, and the pool's CPU per job (its parent and the children
it forked and reaped): a bigger parent makes each fork copy more.  Needs root (bubblewrap, cgroups);
compare within one run, the machines are shared.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from warm import cpu_used, one, runners  # noqa: E402

BLOCK = 10


async def bench(modules: list[str], n: int) -> None:
    plain, fresh_a = await runners(2)
    loaded, fresh_b = await runners(2, modules)
    if loaded.imports != modules:
        raise SystemExit(f"the pool imported only {loaded.imports} of {modules} (see the log)")
    jobs = {"import " + ", ".join(modules): "import " + ", ".join(modules), "pass": "pass"}
    ids = iter(range(1, 1 << 30))
    try:
        print(f"{n} jobs each, turns of {BLOCK}; Runner.run p50 in ms, the pool's CPU per job in ms")
        print(f"{'job':40} {'without':>9} {'with':>9} {'CPU without':>12} {'CPU with':>9}")
        for label, source in jobs.items():
            times = {"without": [], "with": []}
            cpu = {"without": 0.0, "with": 0.0}
            for name, r in (("without", plain), ("with", loaded)):
                await one(r, next(ids), "python", source)
            for _ in range(0, n, BLOCK):
                for name, r in (("without", plain), ("with", loaded)):
                    before = cpu_used(r)
                    for _ in range(BLOCK):
                        times[name].append(await one(r, next(ids), "python", source))
                        await asyncio.sleep(0.005)
                    cpu[name] += cpu_used(r) - before
            w, x = (statistics.median(times[k]) * 1000 for k in ("without", "with"))
            cw, cx = (cpu[k] * 1000 / len(times[k]) for k in ("without", "with"))
            print(f"{label[:40]:40} {w:9.2f} {x:9.2f} {cw:12.2f} {cx:9.2f}")
    finally:
        for r in (plain, loaded):
            await r.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imports", default="json,decimal,asyncio")
    p.add_argument("--jobs", type=int, default=100)
    args = p.parse_args()
    asyncio.run(bench([m for m in args.imports.split(",") if m], args.jobs))


if __name__ == "__main__":
    main()
