"""One supervisor for a step, one classifier of how it ended.

A step is one process run for a job (a compile, a run) or one cell of a
session.  Both wait for the first of: the step's own end, a cancel, a limit
(memory watcher, output budget) or the deadline; both then name what
happened with the same error codes and messages.  Copies of this drifted
(cancel checked before exit in one, after in the other), so it lives here
once, for the fresh-process runner, the sessions and any runner to come.
"""
from __future__ import annotations

import asyncio
import signal
import time
from distexec_kernel import protocol as P

# A sandbox wrapper reports its child's death by signal N as exit code 128+N.
SIGNALS_SEEN_AS_EXIT = frozenset(int(s) for s in (
    signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGBUS, signal.SIGILL, signal.SIGKILL,
    signal.SIGTERM, signal.SIGXCPU, signal.SIGXFSZ))


async def supervise(ended: asyncio.Future, cancel: asyncio.Event, deadline: float, *,
                    watcher: asyncio.Future | None = None, limits: tuple[asyncio.Event, ...] = ()) -> str | None:
    """Wait until ``ended`` is done, or until something ends the step first.

    Returns None if the step ended by itself, else why it must be stopped:
    ``"timeout"`` (``deadline``, a ``time.monotonic()`` value), ``"cancelled"``,
    the ``watcher``'s own result (``"memory_limit"``), or ``"output_limit"``
    once one of ``limits`` is set (an output budget spent, a message cut as too
    large).  The step's own end wins over a cancel or a limit seen in the same
    instant: a job that finished keeps its result.
    """
    # Events, not a poll: polled every half second, a flood that ended within it ran to its end past
    # the limit and reported exit code 0 (a clean success, to a reader of exit_code), where a timeout
    # or a memory limit stops the job where it is.
    cancelled = asyncio.ensure_future(cancel.wait())
    crossed = [asyncio.ensure_future(event.wait()) for event in limits]
    waits = [ended, cancelled, *crossed] + ([watcher] if watcher is not None else [])
    try:
        while not ended.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if ended in done:
                break
            if cancelled in done:
                return "cancelled"
            if watcher is not None and watcher in done:
                return watcher.result()
            if done.intersection(crossed):
                return "output_limit"
        return None
    finally:
        for waiting in (cancelled, *crossed):
            waiting.cancel()


def limit_error(reason: str, timeout: float, memory_bytes: int, output_bytes: int,
                exit_code: int | None = None) -> dict:
    """The error of a step that was stopped for ``reason`` (what ``supervise`` returned).

    ``exit_code``: the job's (``job_exit_code``), when it has one.  One that is not a death by
    signal means the step ended by itself before it could be stopped: said in the message, so
    that a failed job showing its own exit code (0 too) reads as what it was."""
    if reason == "cancelled":
        return P.error(P.CANCELLED_CODE, "cancelled by a user")
    if reason == "timeout":
        return P.error(P.TIMEOUT, f"ran past its timeout of {timeout:g} s")
    if reason == "output_limit":
        message = f"wrote more than the output limit of {output_bytes >> 20} MiB"
        if exit_code is not None and exit_code >= 0:
            # Its last write crossed the limit and it exited before the slave's kill reached it.
            message += (f"; its output was cut there, and it exited by itself (code {exit_code}) before it "
                        f"could be stopped")
        return P.error(P.OUTPUT_LIMIT, message)
    if reason == "memory_limit":
        return P.error(P.MEMORY_LIMIT, f"used more than the memory limit of {memory_bytes >> 20} MiB")
    raise ValueError(f"not a reason to stop a step: {reason!r}")


def exit_error(code: int | None) -> dict | None:
    """The error of a process that ended with ``code`` by itself (None: it succeeded)."""
    code = job_exit_code(code)
    if code is not None and code < 0:
        return signal_error(-code)
    if code:
        return P.error(P.NONZERO_EXIT, f"exited with code {code}")
    return None


def job_exit_code(code: int | None) -> int | None:
    """The exit code a job reports: a death by signal N is -N, as Python's subprocess says, whether
    the process was the sandbox's child (which reports 128+N) or a warm child reaped directly."""
    if code is not None and code > 128 and code - 128 in SIGNALS_SEEN_AS_EXIT:
        return 128 - code
    return code


def signal_error(signum: int) -> dict:
    try:
        name = signal.Signals(signum).name
        desc = signal.strsignal(signum)
    except ValueError:
        name, desc = f"signal {signum}", None
    return P.error(P.SIGNAL, f"killed by {name}" + (f" ({desc.lower()})" if desc else ""), signal=name)
