"""How a failed ``%%remote`` cell shows: its exceptions and their lines.

A remote job that fails makes the cell fail as a local error would, with
the job's status line and error instead of a traceback through the magic's
own frames.  ``load_ipython_extension`` registers ``show_error`` for these.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import display as D
from .errors import RemoteError

if TYPE_CHECKING:
    from .group import JobGroup
    from .job import Job


class RemoteGroupFailed(RemoteError):
    """A ``%%remote --map`` cell some of whose jobs did not succeed: the first failure (input order) shows."""

    def __init__(self, group: JobGroup, interrupted: bool = False):
        self.group = group
        self.summary = group.summary()
        self.interrupted = interrupted
        first = group.failed[0] if group.failed else group[0]
        super().__init__(first)


class RemoteJobFailed(RemoteError):
    """A ``%%remote`` job that did not succeed: the cell fails as a local error would.

    Shown by ``show_error`` (a custom exception handler) as the job's status
    line and error, without a traceback of the magic's own frames.
    ``interrupted``: the user interrupted the cell and the job was cancelled.
    """

    def __init__(self, job: Job, interrupted: bool = False):
        super().__init__(job)
        self.record = job.record
        self.interrupted = interrupted


def error_lines(exc: BaseException) -> list[str]:
    """What a person needs to see for a failed job or an unreachable cluster, line by line.

    Any ``RemoteError`` (also ``job.wait(raise_on_error=True)`` in a cell) reads
    the same: the job's status line, its error code and message, where it points.
    """
    if not isinstance(exc, RemoteError):
        lines = [f"{type(exc).__name__}: {exc}"]
        if getattr(exc, "status", None) == 401:
            lines.append("log in again: `distexec login URL --user NAME` in a terminal (the next cell takes it), "
                         "or `%remote connect URL --user NAME`")
        return lines
    if isinstance(exc, RemoteGroupFailed):
        failed = exc.group.failed
        head = [exc.summary, f"{len(failed)} of {len(exc.group)} jobs did not succeed; the first, "
                             f"input {list(exc.group).index(exc.job)}:"]
        if exc.interrupted:
            head.append(f"KeyboardInterrupt: group {exc.group.id} was cancelled on the master")
        return head + D.failure_lines(exc.job.record)
    return D.failure_lines(exc.job.record, interrupted=getattr(exc, "interrupted", False))


def show_error(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler (``set_custom_exc``).

    IPython discards what a handler returns, so it shows the lines itself
    through ``_showtraceback``: in a kernel that sends the ``error`` output and
    sets the traceback of the execute reply (status ``error``, so Run All and
    nbclient stop); in a terminal it prints them.
    """
    shell._showtraceback(etype, value, error_lines(value))
