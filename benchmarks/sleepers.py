"""Jobs that sleep, on 2 slaves x 8 slots: wall time against the ideal, and where the excess goes.

    .venv/bin/python benchmarks/sleepers.py [--count 64] [--sleep 0.25] [--runs 1]

``vs_peers.py``'s sleepers target (64 x 0.25 s, <= 1.05x the ideal) on its
own, with the count and the sleep to vary: each run starts a fresh local
cluster, submits ``--count`` jobs of ``time.sleep(SLEEP)`` one by one and
waits for all.  Per run it prints the wall time against the ideal (waves x
sleep), how far the first wave's starts spread, and each job's path on the
master (dispatched -> result) less its sleep, p50.  Compare trees by running
this in turns (``cd /tmp/old && PYTHONPATH=$PWD ...``): the machines are
shared and noisy.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vs_peers import bench_sleepers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=64, help="jobs")
    p.add_argument("--sleep", type=float, default=0.25, help="seconds each job sleeps")
    p.add_argument("--runs", type=int, default=1, help="runs, each on a fresh cluster")
    args = p.parse_args()
    logging.disable(logging.INFO)
    for _ in range(args.runs):
        r = bench_sleepers(args.count, args.sleep)
        print(f"{args.count} x {args.sleep:g} s on 2 x 8 slots: wall {r['wall']:.3f} s, "
              f"{r['wall'] / r['ideal']:.3f}x the ideal; first wave's starts spread over {r['spread'] * 1000:.0f} ms "
              f"(its submissions taken in over {r['intake'] * 1000:.0f} ms); "
              f"path less the sleep p50 {r['path'] * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
