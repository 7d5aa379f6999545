"""History retention: which finished jobs the master deletes, and when.

``--keep-days`` and ``--keep-mb`` bound the history; a pass runs at start
and every ``prune_interval`` seconds, and ``POST /api/prune`` (``distexec
prune``) runs one by hand.  The store does the deleting and never touches a
queued or running job.  An object ``Master`` holds.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import logging

from distexec_kernel import protocol as P

log = logging.getLogger("distexec.master")

SIZE_CHECK_EVERY = 2.0  # seconds between two looks at the finished history's size (one small read)


class Retention:
    def __init__(self, store, keep_days: float | None, keep_mb: float | None, interval: float):
        self.store = store
        self.keep_days = keep_days  # None: no bound
        self.keep_mb = keep_mb
        self.interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Prune now and every ``interval`` seconds, if the history is bounded; call with the loop running."""
        if self.keep_days is not None or self.keep_mb is not None:
            self._task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def prune(self, before: str | None = None) -> int:
        """Delete terminal jobs: those submitted before ``before`` (an ISO date or
        time, UTC unless it says), or with None, those past ``keep_days`` and
        then, past ``keep_mb`` of finished history, the oldest of the users who
        keep the most (each user's share: store_tx.share).  Queued and running
        jobs stay, and are not counted.
        Returns how many were deleted.
        """
        if before is not None:
            cutoff = _utc_text(before)
            keep_bytes = None
        else:
            cutoff = None
            if self.keep_days is not None:
                then = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=self.keep_days)
                cutoff = _utc_text(then.isoformat())
            keep_bytes = int(self.keep_mb * (1 << 20)) if self.keep_mb is not None else None
        count = await self.store.prune(cutoff, keep_bytes)
        if count:
            log.info("pruned %d job(s) from the history", count)
        return count

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                # A pass every interval (ages, and the bound), and one as soon as the finished history
                # is past --keep-mb: one user storing 70 MB/s would otherwise fill the disk in between.
                if loop.time() >= due or (self.keep_mb is not None
                                          and await self.store.finished_size() > self.keep_mb * (1 << 20)):
                    due = loop.time() + self.interval
                    await self.prune()
            except Exception:  # a failed pass is logged by the store; the next one may work
                log.exception("pruning the history failed")
            await asyncio.sleep(min(self.interval, SIZE_CHECK_EVERY))


def _utc_text(text: str) -> str:
    """An ISO date or time as the store writes times (RFC 3339 UTC, milliseconds); ValueError if bad."""
    when = P.parse_time(text.strip())
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
