"""Uids for jobs: none held by two holders at once on this host.

The kernel counts some quotas per uid across the whole host (RLIMIT_NPROC, inotify instances, POSIX
message queue bytes, keyrings), and a process may signal another of its uid wherever it can name
it.  So each warm slot, each session's kernel and each fresh job runs as a uid of its own, as
``isolate`` gives each box one, and not as ``nobody``.  Several slaves may run on one host (``distexec
up --slaves 2``), so the uids are shared out through a lock file per uid: an open file description
holds an ``flock`` on it, and the kernel lets go when the holder closes it or dies, so a slave that
crashed holds nothing.  A uid that is an account here is never taken.
"""
from __future__ import annotations

import fcntl
import logging
import os
import pwd

from . import safefs

FIRST, COUNT = 60100, 900  # 60100-60999: no account on Debian (its 60000-64999 are made on demand)
LOCKS = "/run/distexec-uids"

log = logging.getLogger("distexec.slave")


class Uid:
    """One uid, held until ``release`` (or this process's end)."""

    def __init__(self, uid: int, fd: int):
        self.uid, self._fd = uid, fd

    def release(self) -> None:
        """Let another holder take it; only once nothing runs as it any more."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"Uid({self.uid}{'' if self._fd >= 0 else ', released'})"


class UidsGone(OSError):
    """Every uid of the range is held or is an account."""


def take(locks: str = LOCKS, first: int = FIRST, count: int = COUNT) -> Uid:
    """The lowest uid of the range no holder on this host has, held by the caller."""
    _ready(locks)
    for uid in range(first, first + count):
        if _account(uid):
            continue
        fd = os.open(os.path.join(locks, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return Uid(uid, fd)
    raise UidsGone(f"every uid from {first} to {first + count - 1} is taken by a job or is an account")


def _ready(locks: str) -> None:
    # Root's own folder: a job cannot plant a lock file (or a link in its place) to keep a uid from us.
    safefs.own_folder(locks, 0o700)


def _account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def own_box(sandbox):
    """``sandbox`` as a uid of its own, and that uid's hold (to release once nothing runs as it).

    Unisolated (the slave is not root, or no sandbox switches uids), or every uid held: the sandbox
    as it is (its uid, ``nobody`` where it switches) and no hold."""
    if sandbox.file_owner is None:
        return sandbox, None
    try:
        held = take()
    except OSError as exc:
        log.warning("a job runs as uid %d, shared: %s", sandbox.job_uid, exc)
        return sandbox, None
    return sandbox.for_uid(held.uid), held
