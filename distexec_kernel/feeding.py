"""A batch too large for one request, or for the queue's cap, sent in parts: one ``JobGroup`` all the same.

``Cluster.submit_many`` (so ``map``, the magic's ``--map`` and ``submit
--each``) sends at once what the master takes: at most ``MAX_BATCH`` jobs,
and no more than the user's room under ``--max-queued-per-user``. The rest
waits here, in the client, and a thread sends it in parts as the user's jobs
leave the queue, each part joining the first one's group (``POST
/api/jobs?group=G``). So a map of 50,000 holds no more of the master's memory,
nor of the queue ahead of other people, than one of 1,000, and its author
still gets every job's handle at once, in input order: a job not sent yet
reads as queued in the group's counts, and its own fields wait for it to be
sent, as a pipelined ``submit``'s wait for the master's answer.

If the client goes (the kernel restarts), what it had not sent is never
sent; the master's history holds what was.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from . import protocol as P
from .errors import UNREACHABLE, DistexecError
from .group import REFRESH_EVERY, JobGroup
from .job import Job

if TYPE_CHECKING:
    from .cluster import Cluster

QUEUE_FULL = "queue_full"
RATE_LIMITED = "rate_limited"
# A part is at least this share of the user's cap (or all that is left): not one request per job
# that starts, while the queue still holds three quarters of the user's jobs.
PART_OF_CAP = 4
LONGEST_PAUSE = 60.0  # the longest a rate limit's retry_after is waited in one go
LEAVES_QUEUE = frozenset({P.RUNNING, P.CANCELLED, P.REJECTED})


def submit_in_parts(cluster: "Cluster", items: list[dict]) -> JobGroup:
    """Send ``items`` (checked submissions): what fits now in one batch, the rest by a ``Feeder``.

    Raises as a batch does when not even one job fits (a full queue) or the
    first part is refused: then nothing of it was queued.
    """
    first, full = items[:P.MAX_BATCH], None
    try:
        body = cluster._post("/api/jobs", first)
    except DistexecError as exc:
        if not _room(exc):
            raise
        first, full = items[:_room(exc)], exc
        body = cluster._post("/api/jobs", first)
    jobs = [Job(cluster, record) for record in body["jobs"]]
    rest = items[len(first):]
    if not rest:
        return JobGroup(cluster, body.get("group"), jobs)
    waiting = [Job(cluster, None, ack=concurrent.futures.Future()) for _ in rest]
    group = JobGroup(cluster, body["group"], jobs + waiting)
    group._feeder = Feeder(cluster, group, list(zip(rest, waiting)), full)
    cluster._feeders.add(group._feeder)
    group._feeder.start()
    return group


def _room(exc: DistexecError) -> int:
    """How many jobs a full queue's refusal says would fit (0 for any other refusal)."""
    room = exc.details.get("room") if exc.code == QUEUE_FULL else None
    return room if isinstance(room, int) and room > 0 else 0


class Feeder(threading.Thread):
    """Sends a group's remaining submissions as the user's queue has room; stops on ``stop()``."""

    def __init__(self, cluster: "Cluster", group: JobGroup, unsent: list[tuple[dict, Job]],
                 full: DistexecError | None):
        """``full``: the refusal that cut the first part to the room left (the queue is full now)."""
        super().__init__(name=f"distexec-feed-{group.id}", daemon=True)
        self._cluster = cluster
        self._group = group
        self._unsent = deque(unsent)
        # Held while a part is on its way: stop() waits for its answer, so a cancel that follows
        # reaches every job the master made.
        self._lock = threading.Lock()
        self._stopped = False
        self._left_queue = 0  # jobs seen leaving the queue (events): room that may have come
        self._moved = threading.Condition()
        self._full = full
        self._landed = len(group) - len(unsent)  # the group's jobs the master has
        self._unsure = False  # the last part went out and its answer did not come back
        self._unsubscribe = cluster.subscribe(self._on_event)

    def _on_event(self, msg: dict) -> None:
        # A job leaves the queue as it starts, or is cancelled while waiting (a rare double count of a
        # running job cancelled only costs a refused part, which tells the true room).
        if msg["type"] == "job_update" and msg["job"].get("status") in LEAVES_QUEUE or msg["type"] == "connection":
            with self._moved:
                self._left_queue += 1
                self._moved.notify_all()

    def run(self) -> None:
        try:
            # None: as much as one batch holds
            size = self._room_for(0, self._full.details.get("cap")) if self._full else None
            while True:
                with self._lock:
                    if self._stopped or not self._unsent:
                        return
                    want = min(len(self._unsent), P.MAX_BATCH, size or P.MAX_BATCH)
                    part = [self._unsent[i] for i in range(want)]
                    with self._moved:
                        self._left_queue = 0
                    refusal = self._send(part)
                    if refusal is None:
                        size = None
                        continue
                size = self._pause(refusal)
                if size is None:
                    with self._lock:
                        self._end(P.REJECTED, {"code": refusal.code or "refused", "message": f"not sent: {refusal}"})
                    return
        except BaseException as exc:  # the thread's end must not leave jobs that read as queued forever
            with self._lock:
                self._end(P.REJECTED, {"code": "refused", "message": f"not sent: {exc!r}"})
            raise
        finally:
            self._unsubscribe()

    def _send(self, part: list[tuple[dict, Job]]) -> DistexecError | None:
        """Send ``part`` (or find it sent: a lost answer); its refusal, or None once its jobs are settled."""
        try:
            if self._unsure:
                # The last part's answer was lost (a master restart, a dropped connection): if the group
                # grew by that much, it was taken; sending it again would run each job twice.
                records = sorted(self._group._records(summary=True), key=lambda r: r["id"])
                self._unsure, taken = 0, len(records) - self._landed
                if taken == len(part):
                    return self._settle(part, records[-taken:])
            body = self._cluster._post(f"/api/jobs?group={self._group.id}", [s for s, _ in part])
        except DistexecError as exc:
            self._unsure = exc.code == UNREACHABLE
            return exc
        return self._settle(part, body["jobs"])

    def _settle(self, part: list[tuple[dict, Job]], records: list[dict]) -> None:
        for _ in part:
            self._unsent.popleft()
        for (_, job), record in zip(part, records):
            job._acknowledge(record)
            job._ack.set_result(None)
        self._landed += len(part)
        self._group._sent([job for _, job in part])
        return None

    def _pause(self, refusal: DistexecError) -> int | None:
        """Wait as ``refusal`` asks; how many to send next (0: as many as fit), None: give up."""
        if refusal.code == QUEUE_FULL:
            return self._room_for(_room(refusal), refusal.details.get("cap"))
        if refusal.code == RATE_LIMITED or refusal.transient:
            pause = refusal.details.get("retry_after")
            pause = pause if isinstance(pause, (int, float)) and pause > 0 else REFRESH_EVERY
            with self._moved:
                self._moved.wait_for(lambda: self._stopped, min(pause, LONGEST_PAUSE))
            return 0
        return None

    def _room_for(self, room: int, cap) -> int:
        """Wait until ``room`` and the jobs seen leaving the queue since make a part worth sending
        (a quarter of the cap, or all that is left), or a while (then try: the answer tells the room)."""
        enough = max(1, min(len(self._unsent), (cap if isinstance(cap, int) else P.MAX_BATCH) // PART_OF_CAP))
        deadline = time.monotonic() + REFRESH_EVERY
        with self._moved:
            while not self._stopped and room + self._left_queue < enough and time.monotonic() < deadline:
                self._moved.wait(deadline - time.monotonic())
            return max(enough, room + self._left_queue)

    def stop(self) -> None:
        """Send nothing more; what was not sent ends cancelled (a part on its way lands first)."""
        with self._moved:
            self._stopped = True
            self._moved.notify_all()
        with self._lock:
            self._end(P.CANCELLED, {"code": P.CANCELLED_CODE, "message": "cancelled before it was sent"})

    def _end(self, status: str, error: dict) -> None:
        """Settle every job not sent with a record of our own (``id`` None): the group can end."""
        while self._unsent:
            sub, job = self._unsent.popleft()
            job._acknowledge(dict(sub, id=None, status=status, error=error, group=self._group.id,
                                  stdout="", stderr="", attempts=0))
            if not job._ack.done():
                job._ack.set_result(None)
        self._group._sent([])
