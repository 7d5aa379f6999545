"""A batch too large for one request, or for the queue's cap, sent in parts: one ``JobGroup`` all the same.

``Cluster.submit_many`` (so ``map``, the magic's ``--map`` and ``submit
--each``) sends at once what the master takes: at most ``MAX_BATCH`` jobs
(and ``PART_BYTES`` of JSON), and no more than the user's room under
``--max-queued-per-user``. The rest waits here, in the client, and a thread
sends it in parts as the user's jobs leave the queue, each part joining the
first one's group (``POST /api/jobs?group=G``; each answer says the room
left). So a map of 50,000 holds no more of the master's memory, nor of the
queue ahead of other people, than one of 1,000, and its author still gets
every job's handle at once, in input order: a job not sent yet reads as
queued with no id, and what needs the master (``wait()``, ``refresh()``)
waits until it is sent.

Nothing is dropped quietly: ``Cluster.close()`` (the end of a ``with``)
waits until all is sent, and so does the interpreter's exit (``atexit``),
saying so, unless the master has been unreachable for ``GIVE_UP_AT_EXIT``
seconds. A cancel of the group, from this client or any other (the panel's),
ends the jobs not sent as cancelled. A login that expires on the way is
waited for (``Cluster.login`` again) for ``LOGIN_WAIT`` seconds; a master
unreachable for ``UNREACHABLE_WAIT`` seconds ends the rest rejected.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import json
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from . import protocol as P
from .errors import UNREACHABLE, DistexecError
from .group import REFRESH_EVERY, JobGroup
from .job import Job, sharing_inputs

if TYPE_CHECKING:
    from .cluster import Cluster

QUEUE_FULL = "queue_full"
RATE_LIMITED = "rate_limited"
GROUP_CANCELLED = "group_cancelled"
# A part is at least this share of the user's cap (or all that is left): not one request per job
# that starts, while the queue still holds three quarters of the user's jobs.
PART_OF_CAP = 4
# The parts leave a tenth of the user's cap free: their own next cell or job is queued, not refused
# queue_full, while a large map of theirs is being sent.
LEFT_FREE_OF_CAP = 10
PART_BYTES = 8 << 20  # of JSON in one request: the master takes 32 MiB
LONGEST_PAUSE = 60.0  # the longest a rate limit's retry_after is waited in one go
LOGIN_WAIT = 3600.0  # how long an expired login is waited for before the rest is given up
# With the event channel up, jobs leaving the queue are heard: the backstop can be rarer.
QUIET_BACKSTOP = 5 * REFRESH_EVERY
LEAVES_QUEUE = frozenset({P.RUNNING, P.CANCELLED, P.REJECTED})
UNREACHABLE_WAIT = 600.0  # a master away this long: the rest is given up (rejected)
GIVE_UP_AT_EXIT = 30.0  # close() and the interpreter's exit stop waiting for a master away this long
NOT_SENT = {"code": P.CANCELLED_CODE, "message": "cancelled before it was sent"}  # what a stop leaves


def submit_in_parts(cluster: "Cluster", items: list[dict]) -> JobGroup:
    """Send ``items`` (checked submissions): what fits now in one batch, the rest by a ``Feeder``.

    Raises as a batch does when not even one job fits (a full queue) or the
    first part is refused: then nothing of it was queued.
    """
    size, text = _part(items, P.MAX_BATCH)
    first = items[:size]
    try:
        body = _post(cluster, "/api/jobs?echo=0", text)
    except DistexecError as exc:
        if not _room(exc):
            raise
        first = items[:min(max(1, _room(exc) - _left_free(exc.details.get("cap"))), len(first))]
        body = _post(cluster, "/api/jobs?echo=0", _part(first, len(first))[1])
    jobs = [Job(cluster, sharing_inputs(record, sub)) for record, sub in zip(body["jobs"], first)]
    rest = items[len(first):]
    if not rest:
        return JobGroup(cluster, body.get("group"), jobs)
    waiting = [Job(cluster, dict(sub, id=None, status=P.QUEUED, group=body["group"]),
                   ack=concurrent.futures.Future(), unsent=True) for sub in rest]
    group = JobGroup(cluster, body["group"], jobs + waiting)
    group._feeder = Feeder(cluster, group, list(zip(rest, waiting)), body.get("room"), body.get("cap"))
    group._feeder.start()
    return group


def _left_free(cap) -> int:
    """How much of the user's room the parts leave to their other submissions."""
    return cap // LEFT_FREE_OF_CAP if isinstance(cap, int) and cap > 0 else 0


def _room(exc: DistexecError) -> int:
    """How many jobs a full queue's refusal says would fit (0 for any other refusal)."""
    room = exc.details.get("room") if exc.code == QUEUE_FULL else None
    return room if isinstance(room, int) and room > 0 else 0


def _part(subs: list[dict], most: int) -> tuple[int, str]:
    """How many of ``subs`` (at least one) go in one request, at most ``most`` and PART_BYTES of JSON, and
    that request's body: each submission encoded once, for its size and for the body (it was twice)."""
    texts, total = [], 0
    for sub in subs[:most]:
        text = json.dumps(sub, allow_nan=False)  # as requests' json= encodes
        total += len(text) + 1
        if total > PART_BYTES and texts:
            break
        texts.append(text)
    return len(texts), "[" + ",".join(texts) + "]"


def _post(cluster: "Cluster", path: str, text: str) -> dict:
    return cluster._call("POST", path, data=text.encode(), headers={"Content-Type": "application/json"})


class Feeder(threading.Thread):
    """Sends a group's remaining submissions as the user's queue has room; stops on ``stop()``."""

    def __init__(self, cluster: "Cluster", group: JobGroup, unsent: list[tuple[dict, Job]],
                 room: int | None, cap: int | None):
        """``room``, ``cap``: what the first part's answer said of the user's queue (None: no word)."""
        # A daemon, waited for at exit (_finish_all): a script's exit sends what it submitted, as before
        # parts, but a master that is gone does not hold the process forever.
        super().__init__(name=f"distexec-feed-{group.id}", daemon=True)
        self._cluster = cluster
        self._group = group
        self._unsent = deque(unsent)
        # Held while a part is on its way: stop() waits for its answer, so a cancel that follows
        # reaches every job the master made.  Re-entered by an output listener of the group's that
        # stops the sending as the part's early events are applied (in this thread, lock held).
        self._lock = threading.RLock()
        self._stopped = False
        self._left_queue = 0  # jobs seen leaving the queue (events) since the last answer came
        self._moved = threading.Condition()
        self._room, self._cap = room, cap
        self._landed = len(group) - len(unsent)  # the group's jobs the master has
        self._unsure = 0  # the size of the last part if it went out and its answer did not come back
        self._away_since: float | None = None  # the master unreachable since (monotonic), or None
        self._awaiting_login = False
        self._unsubscribe = cluster.subscribe(self._on_event)

    @property
    def group_id(self) -> str | None:
        return self._group.id

    def _on_event(self, msg: dict) -> None:
        # A job leaves the queue as it starts, or is cancelled while waiting (a double count of a
        # running job cancelled only costs a refused part, which tells the true room).
        if msg["type"] == "job_update" and msg["job"].get("status") in LEAVES_QUEUE or msg["type"] == "connection":
            with self._moved:
                self._left_queue += 1
                self._moved.notify_all()

    def run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopped or not self._unsent:
                        break
                size = self._room_for()
                with self._lock:
                    if self._stopped:
                        break
                    part = [self._unsent[i] for i in range(min(size, len(self._unsent)))]
                    size, text = _part([sub for sub, _ in part], size)
                    refusal = self._send(part[:size], text)
                if refusal is not None and not self._pause(refusal):
                    with self._lock:
                        if refusal.code == GROUP_CANCELLED:  # by this user elsewhere (the panel, another client)
                            self._end(P.CANCELLED, dict(NOT_SENT, message=NOT_SENT["message"] + " (its group was)"))
                        else:
                            self._end(P.REJECTED, {"code": refusal.code or "refused",
                                                   "message": f"not sent: {refusal}"})
                    return
        except BaseException as exc:  # the thread's end must not leave jobs that read as queued forever
            with self._lock:
                self._end(P.REJECTED, {"code": "refused", "message": f"not sent: {exc!r}"})
            raise
        finally:
            self._unsubscribe()
        with self._lock:  # stopped: what a stop() interrupted before it could end them, ends here
            self._end(P.CANCELLED, NOT_SENT)

    def _room_for(self) -> int:
        """Wait until the room the last answer told, and the jobs seen leaving the queue since, make a
        part worth sending (a quarter of the cap, or all that is left), or a while (then try: the answer
        tells the room); how many to send."""
        if self._room is None:
            return P.MAX_BATCH  # no word of the room: a refusal will tell it
        cap = self._cap if isinstance(self._cap, int) and self._cap > 0 else P.MAX_BATCH
        enough = max(1, min(len(self._unsent), cap // PART_OF_CAP))
        backstop = QUIET_BACKSTOP if self._cluster._events_connected() else REFRESH_EVERY
        deadline = time.monotonic() + backstop
        with self._moved:
            while not self._stopped and self._free() < enough and time.monotonic() < deadline:
                self._moved.wait(deadline - time.monotonic())
            free = self._free()
            # Past the backstop with too little room heard of: a small part, whose answer tells the room.
            return min(P.MAX_BATCH, free) if free >= enough else max(1, free)

    def _free(self) -> int:
        return self._room + self._left_queue - _left_free(self._cap)

    def _send(self, part: list[tuple[dict, Job]], text: str) -> DistexecError | None:
        """Send ``part``, keyed by its place in the group (``master/parts.py``): a part whose answer was
        lost (a master frozen or restarting, a dropped connection) is sent again as it was, with the
        same key, and taken once. Its refusal, or None once its jobs are settled."""
        if self._unsure:
            part = [self._unsent[i] for i in range(self._unsure)]
            text = _part([s for s, _ in part], len(part))[1]  # all of it: it fit before
        try:
            body = _post(self._cluster, f"/api/jobs?group={self._group.id}&part={self._landed}&echo=0", text)
        except DistexecError as exc:
            self._heard_room()
            if exc.code == UNREACHABLE and self._away_since is None:
                self._away_since = time.monotonic()
            elif exc.code != UNREACHABLE:
                self._away_since = None
            # Unanswered (or a proxy's 5xx): perhaps taken, so the same part goes again, with its key.
            self._unsure = len(part) if exc.transient else 0
            if exc.code == QUEUE_FULL:
                self._room, self._cap = _room(exc), exc.details.get("cap", self._cap)
            return exc
        self._heard_room()
        self._away_since, self._unsure = None, 0
        self._room, self._cap = body.get("room"), body.get("cap", self._cap)
        return self._settle(part, body["jobs"])

    def _heard_room(self) -> None:
        # The answer's room counts the jobs that left the queue before it: count only those after.
        with self._moved:
            self._left_queue = 0

    def _settle(self, part: list[tuple[dict, Job]], records: list[dict]) -> None:
        for _ in part:
            self._unsent.popleft()
        for (_, job), record in zip(part, records):
            job._acknowledge(record)
            job._ack.set_result(None)
        self._landed += len(part)
        self._group._sent([job for _, job in part])
        return None

    def _pause(self, refusal: DistexecError) -> bool:
        """Wait as ``refusal`` asks, True; False: the rest cannot be sent."""
        if refusal.code == QUEUE_FULL:
            return True  # _room_for waits for the room
        if refusal.status == 401:
            return self._await_login(refusal)
        if refusal.code == UNREACHABLE and time.monotonic() - (self._away_since or time.monotonic()) > UNREACHABLE_WAIT:
            return False
        if refusal.code == RATE_LIMITED or refusal.transient:
            pause = refusal.details.get("retry_after")
            pause = pause if isinstance(pause, (int, float)) and pause > 0 else REFRESH_EVERY
            with self._moved:
                self._moved.wait_for(lambda: self._stopped, min(pause, LONGEST_PAUSE))
            return True
        return False

    def _await_login(self, refusal: DistexecError) -> bool:
        """The login expired (or was revoked) on the way: wait for ``Cluster.login`` to give a new one."""
        token = self._cluster.token
        print(f"distexec: {refusal}; {len(self._unsent)} job(s) of group {self._group.id} are not sent yet: "
              f"log in again (Cluster.login) within {LOGIN_WAIT / 60:g} min to send them", file=sys.stderr)
        self._awaiting_login = True
        try:
            deadline = time.monotonic() + LOGIN_WAIT
            with self._moved:  # Cluster.login says nothing to us: look every REFRESH_EVERY s
                while not self._stopped and self._cluster.token == token and time.monotonic() < deadline:
                    self._moved.wait(min(REFRESH_EVERY, deadline - time.monotonic()))
                return not self._stopped and self._cluster.token != token
        finally:
            self._awaiting_login = False

    def stop(self) -> None:
        """Send nothing more; what was not sent ends cancelled (a part on its way lands first)."""
        with self._moved:
            self._stopped = True
            self._moved.notify_all()
        with self._lock:
            self._end(P.CANCELLED, NOT_SENT)

    def finish(self) -> None:
        """Wait until all is sent (``Cluster.close``, the interpreter's exit); a Ctrl-C meanwhile stops
        it and goes on, as does a master away for GIVE_UP_AT_EXIT s or a login to make again."""
        if not self.is_alive() or not self._unsent:
            return
        print(f"distexec: sending the {len(self._unsent)} job(s) of group {self._group.id} not sent yet "
              f"(Ctrl-C cancels them)", file=sys.stderr)
        try:
            while self.is_alive():
                self.join(REFRESH_EVERY)
                away = self._away_since is not None and time.monotonic() - self._away_since > GIVE_UP_AT_EXIT
                if away or self._awaiting_login:
                    left = len(self._unsent)
                    self.stop()
                    print(f"distexec: {left} job(s) of group {self._group.id} not sent: "
                          f"{'the master is unreachable' if away else 'the login expired'}", file=sys.stderr)
                    return
        except KeyboardInterrupt:
            self.stop()
            raise

    def _end(self, status: str, error: dict) -> None:
        """Settle every job not sent with a record of our own (``id`` None): the group can end."""
        while self._unsent:
            sub, job = self._unsent.popleft()
            job._acknowledge(dict(sub, id=None, status=status, error=dict(error), group=self._group.id,
                                  stdout="", stderr="", attempts=0))
            if not job._ack.done():
                job._ack.set_result(None)
        self._group._sent([])


def feeders(cluster: "Cluster | None" = None) -> list[Feeder]:
    """The feeders still sending (of ``cluster``, or of any): the live threads are the registry."""
    return [t for t in threading.enumerate() if isinstance(t, Feeder) and cluster in (None, t._cluster)]


@atexit.register
def _finish_all() -> None:
    """At the interpreter's exit: what scripts submitted goes before it ends (see Feeder.finish)."""
    for feeder in feeders():
        try:
            feeder.finish()
        except KeyboardInterrupt:
            pass  # stopped: each is cancelled in turn by its own Ctrl-C, or all by a kill
