"""The slave's work to send a finished job's result, by the size of its output.

    .venv/bin/python benchmarks/result_frame.py [--runs 5]

A result is checked as the master will read it (``agent._frame``: its JSON,
UTF-8).  The send then encoded it a second time, with ``ended_ago``; it now
adds ``ended_ago`` to the checked frame (``agent._with_ended_ago``).  Both
ways in turns, on the same results, in this process; medians in ms.  Both
block the slave's event loop, where other jobs' output and results wait.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import protocol as P  # noqa: E402
from slave import agent  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    print(f"{'output':>10} {'check':>9} {'then encode again (before)':>27} {'then add ended_ago (now)':>25}")
    for size in (100, 1 << 20, 16 << 20):
        result = P.make("job_finished", job_id=7, exit_code=0, stdout=("line é\n" * (size // 8 + 1))[:size],
                        stderr="", error=None)
        check, again, added = [], [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            frame = agent._frame(result)
            check.append(time.perf_counter() - t)
            t = time.perf_counter()
            before = agent._utf8(P.encode({**result, "ended_ago": 0.125}))
            again.append(time.perf_counter() - t)
            t = time.perf_counter()
            now = agent._with_ended_ago(frame, 0.125)
            added.append(time.perf_counter() - t)
            assert now == before
        print(f"{size:>10} {statistics.median(check) * 1e3:>9.2f} {statistics.median(again) * 1e3:>27.2f} "
              f"{statistics.median(added) * 1e3:>25.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
