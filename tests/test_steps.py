"""slave/steps.py: the one supervisor of a step, fed real futures and events (no processes needed)."""
from __future__ import annotations

import asyncio
import signal
import time

from distexec_kernel import protocol as P
from slave import steps


def run(coro):
    return asyncio.run(coro)


def test_the_steps_own_end_wins_over_a_cancel_in_the_same_instant():
    async def go():
        ended = asyncio.get_running_loop().create_future()
        cancel = asyncio.Event()
        ended.set_result(0)
        cancel.set()
        return await steps.supervise(ended, cancel, time.monotonic() + 10)
    assert run(go()) is None


def test_cancel_timeout_watcher_and_each_limit_stop_a_step_at_once():
    """Polled, a flood ending within the poll ran to its own end past the limit (exit code 0)."""
    async def go(kind):
        loop = asyncio.get_running_loop()
        ended, cancel = loop.create_future(), asyncio.Event()
        watcher = loop.create_future()
        budget, cut = asyncio.Event(), asyncio.Event()
        if kind == "cancelled":
            loop.call_later(0.05, cancel.set)
        elif kind == "memory_limit":
            loop.call_later(0.05, watcher.set_result, "memory_limit")
        elif kind in ("budget", "cut"):
            loop.call_later(0.05, (budget if kind == "budget" else cut).set)
        started = time.monotonic()
        reason = await steps.supervise(ended, cancel, started + (0.1 if kind == "timeout" else 30),
                                       watcher=watcher, limits=(budget, cut))
        return reason, time.monotonic() - started
    for kind in ("cancelled", "timeout", "memory_limit", "budget", "cut"):
        reason, took = run(go(kind))
        assert reason == {"budget": "output_limit", "cut": "output_limit"}.get(kind, kind), kind
        assert took < 0.4, (kind, took)  # a poll (every 0.5 s, before) would come later


def test_one_classifier_for_limits_and_exits():
    assert steps.limit_error("timeout", 2.5, 1 << 30, 16 << 20) == P.error(P.TIMEOUT, "ran past its timeout of 2.5 s")
    assert steps.limit_error("output_limit", 1, 1 << 30, 16 << 20)["message"].endswith("of 16 MiB")
    assert steps.limit_error("memory_limit", 1, 1 << 30, 16 << 20)["code"] == P.MEMORY_LIMIT
    # Stopped at the limit (the slave's SIGKILL): nothing to add. Ended by itself before the kill
    # (its last write crossed the limit): its own exit code stands, and the message says why.
    assert steps.limit_error("output_limit", 1, 1 << 30, 1 << 20, -9) == steps.limit_error("output_limit", 1, 1 << 30,
                                                                                             1 << 20)
    assert "exited by itself (code 0)" in steps.limit_error("output_limit", 1, 1 << 30, 1 << 20, 0)["message"]
    assert steps.exit_error(0) is None
    assert steps.exit_error(3) == P.error(P.NONZERO_EXIT, "exited with code 3")
    assert steps.exit_error(-int(signal.SIGSEGV))["signal"] == "SIGSEGV"
    # What a sandbox wrapper reports for its child's death by a signal.
    assert steps.exit_error(128 + int(signal.SIGKILL))["code"] == P.SIGNAL
    assert steps.exit_error(128 + 1)["code"] == P.NONZERO_EXIT  # SIGHUP is not one a job dies of here
