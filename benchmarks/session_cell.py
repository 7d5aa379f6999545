"""Where a warm session cell's time goes: the slave's part, and ipykernel's own reply.

    .venv/bin/python benchmarks/session_cell.py [--cells 60]

Two measurements in one run, so they share the machine's load:

- the slave's part: ``SessionRunner.run`` driven directly (no master, no
  client), ``x = 1`` cell after cell in one session, in the slave's sandbox
  and cgroups (run as root, as a slave is); with the share of its steps
  (the cell itself, waiting for the kernel's idle and reply; the scan for
  processes it left and the CPU caps);
- ipykernel alone: a plain ``jupyter_client`` against a kernel started
  without distexec, the round trip of ``kernel_info`` and of ``x = 1``.

The end-to-end figure (submit to result through a master) is
``benchmarks/sessions.py``.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slave import session_cells, sessions  # noqa: E402
from slave.bwrap import best_sandbox  # noqa: E402
from slave.jobdirs import JobDirs  # noqa: E402
from slave.sandbox import Limits  # noqa: E402


def _timing(owner, name: str, into: dict) -> None:
    """Wrap the coroutine ``owner.name`` so that each call's time lands in ``into[name]``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    async def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            into.setdefault(name, []).append(time.perf_counter() - started)

    setattr(owner, name, timed)


async def slave_part(cells: int) -> tuple[list[float], dict]:
    limits = Limits()
    runner = sessions.SessionRunner(best_sandbox(limits), limits, JobDirs(f"bench-{os.getpid()}"))
    steps: dict[str, list[float]] = {}
    _timing(session_cells.CellRunner, "_read_cell", steps)
    _timing(runner, "_stop_strays", steps)
    job = {"id": 1, "user": "bench", "session": "s", "source": "x = 1", "timeout": 30, "language": "python"}
    cancel = asyncio.Event()
    try:
        await runner.run(job, lambda *a: None, cancel)  # starts the kernel
        steps.clear()
        totals = []
        for i in range(cells):
            started = time.perf_counter()
            outcome = await runner.run(dict(job, id=i + 2), lambda *a: None, cancel)
            totals.append(time.perf_counter() - started)
            if outcome.error is not None:
                raise SystemExit(f"a cell failed: {outcome.error}")
        return totals, steps
    finally:
        await runner.close()
        runner.jobdirs.close()
        runner.sandbox.close()


def ipykernel_alone(requests: int) -> tuple[list[float], list[float]]:
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec

    with tempfile.TemporaryDirectory(prefix="distexec-bench-") as home:
        km = KernelManager(connection_file=os.path.join(home, "kernel.json"), transport="ipc",
                           ip=os.path.join(home, "k"))
        km._kernel_spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                                           "--HistoryManager.enabled=False"], display_name="py", language="python")
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            info, cell = [], []
            for _ in range(requests + 10):
                started = time.perf_counter()
                kc.kernel_info()
                kc.get_shell_msg(timeout=10)
                info.append(time.perf_counter() - started)
            for _ in range(requests + 10):
                started = time.perf_counter()
                msg_id = kc.execute("x = 1")
                while True:  # its idle status and its reply, as the slave waits for both
                    msg = kc.get_iopub_msg(timeout=10)
                    if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                            and msg["content"]["execution_state"] == "idle"):
                        break
                kc.get_shell_msg(timeout=10)
                cell.append(time.perf_counter() - started)
            return info[10:], cell[10:]  # the first ones warm up the kernel
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=60, help="cells (and kernel requests) timed (default 60)")
    args = p.parse_args()
    totals, steps = asyncio.run(slave_part(args.cells))
    info, cell = ipykernel_alone(args.cells)

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:7.2f} ms"

    print(f"p50 of {args.cells}")
    print(f"the slave's part of a cell (SessionRunner.run)  {ms(totals)}")
    print(f"  of it: the cell, to the kernel's idle + reply  {ms(steps['_read_cell'])}")
    print(f"  of it: stray processes and the CPU cap after   {ms(steps['_stop_strays'])}")
    print(f"ipykernel alone: kernel_info round trip         {ms(info)}")
    print(f"ipykernel alone: x = 1, to idle + reply          {ms(cell)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
