"""Whether a submission gets in: its checks, the queue caps, and the wait for returning slaves.

A bad request raises ``ProtocolError`` (nothing is recorded); a program that
does not parse, or that no connected slave runs, becomes a *rejected job*
(``rejection`` says why), kept in the history.  Sessions have their own
refusal (``SessionBook.refusal``).
"""
from __future__ import annotations

import asyncio
import json
from typing import Callable, Collection

from distexec_kernel import languages as L, protocol as P, submission
from distexec_kernel.job_record import inputs_chars

from .parsing import Syntax
from .scheduler import Scheduler
from .store_tx import CANCELLED_GROUPS_KEPT

# After a start, how long a submission for a language only absent slaves ran
# waits for them to reconnect before it is rejected (they retry within seconds).
REJOIN_WINDOW = 10.0
# How much of the history tells which slaves (and languages) to expect back.
REJOIN_HISTORY = 1000

DEFAULT_MAX_QUEUED_PER_USER = 1000
# A safety cap on all queued jobs (about 1 KiB of memory each, their inputs in the store); users meet theirs first.
DEFAULT_MAX_QUEUE = 100_000
# MiB of inputs (programs, files, stdin) one user's queued jobs may hold in the history: queued jobs are
# never pruned, and 25 session cells of 14 MiB each, queued behind one that slept, took the history from
# 0.1 to 355 MiB past --keep-mb 20 (an audit); at the job cap, a user alone could fill the master's disk.
DEFAULT_MAX_QUEUED_MB_PER_USER = 1024.0
MIB = 1 << 20


class QueueFull(P.ProtocolError):
    """A submission past a queue cap; ``status`` is the HTTP status it gets."""

    def __init__(self, message: str, status: int = 429, room: int = 0, cap: int | None = None):
        super().__init__("queue_full", message)
        self.status = status
        self.room = room  # how many would fit now: a client sending a large map in parts sends that many
        self.cap = cap

    def to_dict(self) -> dict:
        return {**super().to_dict(), "room": self.room, "cap": self.cap}


class Admission:
    window = REJOIN_WINDOW

    def __init__(self, scheduler: Scheduler, store, max_queue: int | None, max_queued_per_user: int | None,
                 max_timeout: float | None = None, max_queued_mb_per_user: float | None = None):
        self.scheduler = scheduler
        self.max_queued_chars = int(max_queued_mb_per_user * MIB) if max_queued_mb_per_user else None
        self.max_timeout = max_timeout  # the longest a job may ask to run (None: P.MAX_TIMEOUT)
        # Most jobs waiting at once, per user and in all; past either a
        # submission is refused, not queued (see queue_room).  None: no cap.
        self.max_queue = max_queue
        self.max_queued_per_user = max_queued_per_user
        # Slaves expected back, with their languages and until when (loop time), and a wake-up
        # for submissions waiting on them (see await_returning_slaves): those that ran jobs before
        # this start, and any that drops its connection without saying it stops (expect_back).
        self._expected: dict[str, set[str]] = {}
        for job in store.recent(REJOIN_HISTORY):
            if job.get("slave_uid"):
                self._expected.setdefault(job["slave_uid"], set()).add(job["language"])
        self._until: dict[str, float] = {}
        self._joined: asyncio.Event | None = None
        # Jobs queued for a language no slave offered, while a slave was still
        # detecting its toolchains: job id -> language (see rejection, unplaceable).
        self._awaiting_detection: dict[int, str] = {}
        self.store = store
        self.syntax = Syntax()  # large programs parsed ahead (``syntax.ahead``), off the loop
        # Each user's cancelled groups, oldest first, at most CANCELLED_GROUPS_KEPT, as the store keeps
        # them across restarts: a client still sending a large map in parts is told to stop.
        self._cancelled_groups: dict[str | None, dict[str, None]] = {}
        for group, user in store.cancelled_groups():
            self._cancelled_groups.setdefault(user, {})[group] = None

    def start(self, lost_grace: float) -> None:
        """Open the rejoin window; call with the loop running."""
        until = asyncio.get_running_loop().time() + min(lost_grace, REJOIN_WINDOW)
        self._until = dict.fromkeys(self._expected, until)

    def expect_back(self, uid: str, languages: Collection[str], within: float) -> None:
        """``uid`` dropped its connection without saying it stops: for ``within`` seconds, a
        submission for a language only it offered waits for it instead of being refused."""
        self._expected[uid] = set(languages)
        self._until[uid] = asyncio.get_running_loop().time() + min(within, REJOIN_WINDOW)

    def slave_joined(self) -> None:
        """Wake the submissions waiting for returning slaves, to look again."""
        if self._joined is not None:
            self._joined.set()
            self._joined = None

    async def await_returning_slaves(self, language: str, connected: Collection[str]) -> None:
        """Give the slaves expected back that ran ``language`` a moment to reconnect.

        Without this, a submission that arrives between a master restart (or a
        slave's dropped connection) and the slaves' return would be rejected as
        unsupported.  Bounded by REJOIN_WINDOW; a master with no history and no
        dropped slave never waits.
        """
        loop = asyncio.get_running_loop()
        while not self.scheduler.can_run(language):
            now = loop.time()
            until = max((self._until.get(uid, 0.0) for uid, langs in self._expected.items()
                         if language in langs and uid not in connected), default=0.0)
            if until <= now:
                return
            if self._joined is None:
                self._joined = asyncio.Event()
            try:
                await asyncio.wait_for(self._joined.wait(), until - now)
            except asyncio.TimeoutError:
                return

    def check(self, request) -> dict:
        """The submission ``request`` checked and its language made canonical; ProtocolError if bad."""
        sub = submission.check(request)
        if self.max_timeout is not None and sub["timeout"] > self.max_timeout:
            if request.get("timeout") is not None:
                raise P.ProtocolError("bad_request", f"field 'timeout' is at most {self.max_timeout:g} seconds on "
                                      f"this cluster (--max-timeout), not {sub['timeout']:g}")
            sub["timeout"] = self.max_timeout  # the default, cut to the cluster's
        sub["language"] = L.canonical(sub["language"])
        if sub["session"] is not None and sub["language"] != "python":
            raise P.ProtocolError("bad_request", f"sessions run Python only, not {sub['language']!r}: "
                                  "drop 'session' to run it as a fresh process")
        return sub

    def rejection(self, job: dict, detecting: Callable[[], bool] = lambda: False) -> dict | None:
        """Why the job is rejected (it does not parse, or no connected slave runs its language), or None.

        ``detecting()``: a connected slave is still asking its toolchains.  A
        job for a language none offers yet is then queued, not refused; it
        is judged again when detection ends (``unplaceable``).
        """
        detail = self.syntax.detail(job.get("user"), job)
        if detail is not None:
            where = f" (line {detail['line']})" if detail.get("line") else ""
            return P.error(P.SYNTAX_ERROR, detail["message"] + where, line=detail.get("line"),
                           column=detail.get("column"), text=detail.get("text"))
        if not self.scheduler.can_run(job["language"]):
            if detecting():
                self._awaiting_detection[job["id"]] = job["language"]
                return None
            return self._unsupported(job["language"])
        return None

    def unplaceable(self) -> list[tuple[int, dict]]:
        """Once no connected slave is detecting: the jobs queued meanwhile whose language none
        of them offers, each with the refusal it would have had at once (the caller fails them)."""
        pending, self._awaiting_detection = self._awaiting_detection, {}
        return [(job_id, self._unsupported(language, " (and no slave is still detecting its toolchains)"))
                for job_id, language in pending.items() if not self.scheduler.can_run(language)]

    def _unsupported(self, language: str, why: str = "") -> dict:
        available = sorted(self.scheduler.languages())
        names = ", ".join(available) if available else "none (no slave is connected)"
        return P.error(P.UNSUPPORTED_LANGUAGE, f"no connected slave runs {language!r}{why}; available: {names}",
                       available=available)

    async def check_join(self, owner: str | None, group: str) -> None:
        """Refuse a batch joining ``group`` unless it is ``owner``'s (whether it still takes jobs is
        ``check_room``'s: a part sent again is answered with the jobs it made, cancelled or not)."""
        if not await self.store.has_group(owner, group):
            raise P.ProtocolError("not_found", f"no group {group} of yours to add jobs to")

    def group_cancelled(self, group: str, owner: str | None) -> asyncio.Future:
        """From now on ``owner``'s ``group`` takes no more jobs (a map still being sent in parts stops
        there, whoever cancelled it, also after a restart); the future resolves once that is durable."""
        mine = self._cancelled_groups.setdefault(owner, {})
        mine[group] = None
        if len(mine) > CANCELLED_GROUPS_KEPT:
            del mine[next(iter(mine))]
        return self.store.group_cancelled(group, owner)

    def room_of(self, user: str | None) -> dict:
        """What a batch's answer tells its sender of the queue: how many more fit now, and the cap."""
        cap = self.max_queued_per_user if self.max_queued_per_user is not None else self.max_queue
        return {"room": self.queue_room(user), "cap": cap}

    def queue_room(self, user: str | None) -> int:
        """How many more jobs ``user`` may queue now (per-user cap and global cap)."""
        room = []
        if self.max_queued_per_user is not None:
            room.append(self.max_queued_per_user - self.scheduler.queued_by(user))
        if self.max_queue is not None:
            room.append(self.max_queue - len(self.scheduler.queue))
        return max(0, min(room)) if room else P.INT_MAX

    def check_room(self, user: str | None, count: int = 1, joining: str | None = None,
                   subs: Collection[dict] = ()) -> None:
        """Raise QueueFull unless ``user`` may queue ``count`` more jobs (all of them, or none), the
        submissions ``subs`` (their inputs counted); ``group_cancelled`` if ``joining`` a group of theirs
        that was cancelled."""
        if joining in self._cancelled_groups.get(user, ()):
            raise P.ProtocolError("group_cancelled", f"group {joining} was cancelled: it takes no more jobs")
        self._check_chars(user, count, sum(map(inputs_chars, subs)))
        if self.queue_room(user) >= count:
            return
        mine = self.scheduler.queued_by(user)
        if self.max_queued_per_user is not None and mine + count > self.max_queued_per_user:
            raise QueueFull(self._per_user_refusal(user, mine, count), room=self.queue_room(user),
                            cap=self.max_queued_per_user)
        raise QueueFull(f"the master's queue is full ({self.max_queue} jobs waiting in all, "
                        f"--max-queue): try again when some have run", status=503,
                        room=self.queue_room(user), cap=self.max_queue)

    def _per_user_refusal(self, user: str | None, mine: int, count: int) -> str:
        """Why ``count`` more jobs may not wait for ``user``, naming the cap and how many fit now.
        Parts of the cap are suggested only while some fit: with none, a part would be refused too."""
        cap = self.max_queued_per_user
        fits = max(0, cap - mine)
        head = (f"{user or 'this user'} has {mine} job(s) waiting, and at most {cap} may wait per user "
                "(--max-queued-per-user); ")
        if not fits:
            return head + "the queue is full now, no more fit: try again when some have run" + (
                f" (the {count} then in parts of at most {cap})" if count > cap else "")
        return head + f"{fits} more would fit: " + (
            f"send the {count} in parts of at most {cap}" if count > cap else "try again when some have run")


    def _check_chars(self, user: str | None, count: int, chars: int) -> None:
        cap = self.max_queued_chars
        if cap is None or not chars:
            return
        if chars > cap:
            raise P.ProtocolError("too_large", f"these jobs' inputs (programs, files, stdin) are {chars / MIB:.1f} MiB, "
                                  f"more than one user may have waiting ({cap / MIB:g} MiB, --max-queued-mb-per-user)")
        held = self.scheduler.queued_chars_by(user)
        if held + chars <= cap:
            return
        fits = (cap - held) // max(1, chars // count)
        raise QueueFull(f"{user or 'this user'} has {held / MIB:.1f} MiB of inputs (programs, files, stdin) in jobs "
                        f"waiting, and at most {cap / MIB:g} MiB may wait per user (--max-queued-mb-per-user): "
                        "try again when some have run", room=max(0, min(fits, self.queue_room(user))),
                        cap=self.max_queued_per_user)


def bound_rejected(job: dict) -> None:
    """A rejected job never runs: keep enough to show why, not megabytes (a flood of them filled the history)."""
    source = job["source"].encode()
    if len(source) > P.REJECTED_SOURCE_BYTES:
        job["source"] = source[:P.REJECTED_SOURCE_BYTES].decode("utf-8", "ignore")
    job["files"] = {}
    job["stdin"] = None
    if len(json.dumps(job["args"])) > P.REJECTED_SOURCE_BYTES:
        job["args"] = []
    err = job.get("error") or {}
    if isinstance(err.get("text"), str) and len(err["text"]) > 1000:
        err["text"] = err["text"][:1000]  # the offending line, for the caret
