"""Process helpers every role needs: dying with the parent, killing a group, writing a whole buffer.

Standard library only (ctypes), so the client's ``distexec up`` and the
slave share them.
"""
from __future__ import annotations

import ctypes
import os
import signal

# Loaded here, at import, never between fork and exec, where only plain system calls are safe.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child between fork and exec: receive ``sig`` when the parent dies, however it dies.

    A slave killed outright takes its jobs and kernels with it (the master
    counts them lost, and may run them elsewhere, so they must not run on);
    ``distexec up``'s children get SIGTERM instead of living on as orphans.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig))


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group; one that is gone already is no error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``: ``os.write`` may write less than it is given."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
