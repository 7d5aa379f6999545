"""Which queued job runs next, and where.  The one place that decides.

A plain class with no I/O and no clock: the master feeds it events (a slave
joined or left, a job was queued, cancelled or finished) and asks it for
assignments.  Tests drive it the same way.

Policy:
- fair share across users: when a slot frees, the next job comes from the
  user with the fewest running jobs; among users with as many, from the one
  given a slot least recently (users never given one first), and then from
  the one whose waiting job was queued first.  Without the middle rule, with
  one slot every turn would be a tie at zero running and one user's long
  queue would go first whole.  Within one user, jobs leave first in,
  first out, except that a job nobody can run right now (its language's
  slaves are all full) does not hold back a job of another language behind
  it (nor another user's job);
- at most ``max_jobs`` jobs run across the cluster, and at most ``slots`` on
  each slave; at most ``max_running_per_user`` of one user's (a class on a
  few slots: one student's endless loops cannot take them all, since fair
  share only acts when a slot frees);
- a job goes to the slave that runs its language with the fewest running
  jobs relative to its slots; ties go to the slave idle the longest;
- a session (a persistent interpreter, ``session=NAME``) lives on one slave:
  its first job is placed like any other and binds NAME to that slave; every
  later job of NAME goes there, one at a time, in the order queued (it waits
  while the session runs a job or its slave is full, without holding back
  jobs of other sessions or none).  When that slave leaves, the session is
  gone: ``drop_sessions`` unbinds it and hands back its queued jobs.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class SlaveState:
    uid: str
    languages: frozenset[str]
    slots: int
    running: set[int] = field(default_factory=set)
    # Logical time of the slave's last assignment or finish: lower = idle longer.
    last_active: int = 0
    accepting: bool = True

    @property
    def load(self) -> float:
        return len(self.running) / self.slots if self.slots else float("inf")

    @property
    def free(self) -> int:
        return self.slots - len(self.running)


class Scheduler:
    def __init__(self, max_jobs: int | None = None, max_running_per_user: int | None = None):
        self.max_jobs = max_jobs
        self.max_running_per_user = max_running_per_user
        self.slaves: dict[str, SlaveState] = {}
        # job id -> language, in arrival order.
        self.queue: OrderedDict[int, str] = OrderedDict()
        # job id -> its user, for queued and running jobs (None: no user).
        self.job_user: dict[int, str | None] = {}
        self._queued_by: Counter[str | None] = Counter()
        # User -> the characters of inputs their queued jobs hold in the store; job -> its own, for its life.
        self._queued_chars: Counter[str | None] = Counter()
        self.job_chars: dict[int, int] = {}
        # user -> logical time they were last given a slot (one entry per user seen).
        self._served: dict[str | None, int] = {}
        # job id -> slave uid, for every job counted as running.  A job can be
        # running on a slave that is not connected (after a master restart,
        # until the slave comes back or the grace period ends): it still
        # counts against max_jobs.
        self.running: dict[int, str] = {}
        # User -> how many of ``running`` are theirs, kept in step by _start and _stop
        # (assign reads it for every placement).
        self._running_by: Counter[str | None] = Counter()
        # Session bookkeeping: job id -> session name (queued or running jobs
        # of a session), session -> the slave it lives on, and session -> the
        # one job of it running now.
        self.job_session: dict[int, str] = {}
        self.session_slave: dict[str, str] = {}
        self.session_running: dict[str, int] = {}
        # Sessions of jobs taken back after a master restart, not yet reported
        # by their slave: their jobs wait (until bind_session, or
        # release_held_sessions) rather than start a new session elsewhere
        # while the old one may still be alive on a slave not yet back.
        self.held_sessions: set[str] = set()
        # The slaves that take a job now (accepting, a slot free), kept in step
        # by every change of theirs: assign does not scan every slave.
        self._open: dict[str, SlaveState] = {}
        self._clock = 0

    # -- events ------------------------------------------------------------

    def add_slave(self, uid: str, languages: Iterable[str], slots: int,
                  running: Iterable[int] = ()) -> None:
        """A slave (re)registered; ``running`` are its jobs already under way."""
        self._clock += 1
        state = SlaveState(uid, frozenset(languages), max(0, slots), last_active=self._clock)
        for job_id in running:
            state.running.add(job_id)
            self._start(job_id, uid)
        # Jobs we thought ran there but which it no longer reports stay in
        # self.running until the master settles them with finished().
        self._open.pop(uid, None)  # a state it replaces
        self.slaves[uid] = state
        self._recheck(state)

    def _recheck(self, state: SlaveState) -> None:
        """Keep ``state`` in the open slaves if it takes a job now, out of them otherwise."""
        if state.accepting and state.free > 0 and self.slaves.get(state.uid) is state:
            self._open[state.uid] = state
        elif self._open.get(state.uid) is state:
            del self._open[state.uid]

    def set_languages(self, uid: str, languages: Iterable[str]) -> None:
        """A connected slave's languages changed (its toolchain detection ended)."""
        if uid in self.slaves:
            self.slaves[uid].languages = frozenset(languages)

    def remove_slave(self, uid: str) -> list[int]:
        """A slave left; returns the jobs that were running on it."""
        state = self.slaves.pop(uid, None)
        if state is not None:
            self._recheck(state)
        return sorted(j for j, owner in self.running.items() if owner == uid) if state else []

    def set_accepting(self, uid: str, accepting: bool) -> None:
        """A draining slave takes no new jobs but keeps the ones it has."""
        if uid in self.slaves:
            self.slaves[uid].accepting = accepting
            self._recheck(self.slaves[uid])

    def enqueue(self, job_id: int, language: str, session: str | None = None,
                user: str | None = None, chars: int = 0) -> None:
        """Queue a job of ``user``: it waits behind the jobs queued before it.  ``chars``: its inputs'."""
        self.job_chars[job_id] = chars
        self._add_queued(job_id, language, user)
        if session is not None:
            self.job_session[job_id] = session

    def requeue_front(self, job_id: int, language: str, session: str | None = None,
                      user: str | None = None) -> None:
        """A job to retry goes back at the head: it has waited already."""
        self._stop(job_id)
        self._add_queued(job_id, language, user)
        self.queue.move_to_end(job_id, last=False)
        if session is not None:
            self.job_session[job_id] = session

    def _add_queued(self, job_id: int, language: str, user: str | None) -> None:
        if job_id not in self.queue:
            self._queued_by[user] += 1
            self._queued_chars[user] += self.job_chars.get(job_id, 0)
        self.queue[job_id] = language
        self.job_user[job_id] = user

    def _take_queued(self, job_id: int) -> bool:
        if self.queue.pop(job_id, None) is None:
            return False
        user = self.job_user.get(job_id)
        self._queued_by[user] -= 1
        self._queued_chars[user] -= self.job_chars.get(job_id, 0)
        if not self._queued_by[user]:
            del self._queued_by[user], self._queued_chars[user]
        return True

    def dequeue(self, job_id: int) -> bool:
        """Remove a queued job (cancelled); False if it was not queued."""
        if not self._take_queued(job_id):
            return False
        self.job_session.pop(job_id, None)
        self.job_user.pop(job_id, None)
        self.job_chars.pop(job_id, None)
        return True

    def mark_running(self, job_id: int, uid: str, session: str | None = None,
                     user: str | None = None) -> None:
        """Count a job as running on ``uid`` (restored after a master restart, or taken back from the
        queue when the slave it was lost with comes back still running it)."""
        self._stop(job_id)  # counted again under ``user``
        self.job_user[job_id] = user
        self._start(job_id, uid)
        if uid in self.slaves:
            self.slaves[uid].running.add(job_id)
            self._recheck(self.slaves[uid])
        if session is not None:
            # Busy until it is settled; the binding comes back when its slave
            # registers and reports the session alive.
            self.job_session[job_id] = session
            self.session_running[session] = job_id

    def bind_session(self, session: str, uid: str) -> bool:
        """A slave reports ``session`` alive there; False if it is bound elsewhere."""
        owner = self.session_slave.setdefault(session, uid)
        if owner == uid:
            self.held_sessions.discard(session)
        return owner == uid

    def hold_session(self, session: str) -> None:
        """Keep the jobs of ``session`` waiting for its slave to report it (after a restart)."""
        if session not in self.session_slave:
            self.held_sessions.add(session)

    def release_held_sessions(self) -> bool:
        """Stop waiting: sessions not reported by now start anew.  True if any was held."""
        held = bool(self.held_sessions)
        self.held_sessions.clear()
        return held

    def unbind_session(self, session: str) -> str | None:
        """The session ended (idle, ended by a user, its interpreter died); returns its slave."""
        return self.session_slave.pop(session, None)

    def drop_sessions(self, uid: str) -> tuple[list[str], list[int]]:
        """Slave ``uid`` left: its sessions are gone.

        Returns their names and their queued jobs, taken off the queue (they
        counted on the session's variables, so the master fails them).
        """
        names = sorted((n for n, owner in self.session_slave.items() if owner == uid), key=repr)
        for name in names:
            del self.session_slave[name]
        gone = set(names)
        queued = [j for j in self.queue if self.job_session.get(j) in gone]
        for job_id in queued:
            self.dequeue(job_id)
        return names, queued

    def finished(self, job_id: int) -> None:
        """A running job ended, however it ended."""
        uid = self._stop(job_id)
        session = self.job_session.pop(job_id, None)
        self.job_user.pop(job_id, None)
        self.job_chars.pop(job_id, None)
        if session is not None and self.session_running.get(session) == job_id:
            del self.session_running[session]
        state = self.slaves.get(uid) if uid else None
        if state is not None:
            state.running.discard(job_id)
            self._recheck(state)
            self._clock += 1
            state.last_active = self._clock

    # -- queries -----------------------------------------------------------

    def languages(self) -> dict[str, int]:
        """Language -> number of connected slaves that run it."""
        counts: dict[str, int] = {}
        for state in self.slaves.values():
            for lang in state.languages:
                counts[lang] = counts.get(lang, 0) + 1
        return counts

    def queued_by(self, user: str | None) -> int:
        """How many jobs of ``user`` wait in the queue."""
        return self._queued_by.get(user, 0)

    def queued_chars_by(self, user: str | None) -> int:
        """The characters of inputs ``user``'s queued jobs hold."""
        return self._queued_chars.get(user, 0)

    def running_by(self) -> Counter:
        """User -> number of their jobs counted as running."""
        return Counter(self._running_by)

    def _start(self, job_id: int, uid: str) -> None:
        """Count ``job_id`` as running on ``uid`` (under its user as ``job_user`` says now)."""
        if job_id not in self.running:
            self._running_by[self.job_user.get(job_id)] += 1
        self.running[job_id] = uid

    def _stop(self, job_id: int) -> str | None:
        """Count ``job_id`` as running no more; the slave it was counted on, if it was."""
        uid = self.running.pop(job_id, None)
        if uid is not None:
            user = self.job_user.get(job_id)
            self._running_by[user] -= 1
            if not self._running_by[user]:
                del self._running_by[user]
        return uid

    def can_run(self, language: str) -> bool:
        return any(language in s.languages for s in self.slaves.values())

    def assign(self) -> list[tuple[int, str]]:
        """Take as many queued jobs as may start now; returns (job_id, slave uid) pairs.

        One job at a time: each goes to the user with the fewest running jobs
        among those with a job that can start now (ties: the user served least
        recently, then the earliest queued).
        """
        out = []
        running = self.running_by()
        while self.max_jobs is None or len(self.running) < self.max_jobs:
            open_slaves = list(self._open.values())
            if not open_slaves:
                break
            pick = self._next_fair(open_slaves, running)
            if pick is None:
                break
            job_id, best = pick
            user = self.job_user.get(job_id)
            session = self.job_session.get(job_id)
            self._take_queued(job_id)
            running[user] += 1
            best.running.add(job_id)
            self._recheck(best)
            self._start(job_id, best.uid)
            if session is not None:
                self.session_slave[session] = best.uid
                self.session_running[session] = job_id
            self._clock += 1
            best.last_active = self._clock
            self._served[user] = self._clock
            out.append((job_id, best.uid))
        return out

    def _next_fair(self, open_slaves: list[SlaveState],
                   running: Counter) -> tuple[int, SlaveState] | None:
        """The job that should start next and its slave, or None if none can start now."""
        pick = None
        pick_key = None
        seen: set[str | None] = set()  # users whose first job that can start is known
        # Sessions whose next job cannot start now: their later jobs wait too.
        held: set[str] = set()
        fewest = min((running.get(u, 0) for u in self._queued_by), default=0)
        cap = self.max_running_per_user
        for job_id, language in self.queue.items():
            user = self.job_user.get(job_id)
            if user in seen:
                continue
            if cap is not None and running.get(user, 0) >= cap:
                seen.add(user)  # their jobs wait for one of theirs to end (a session's too)
                if len(seen) == len(self._queued_by):
                    break
                continue
            session = self.job_session.get(job_id)
            if session is not None and (session in held or session in self.session_running
                                        or session in self.held_sessions):
                held.add(session)
                continue
            home = self.session_slave.get(session) if session is not None else None
            if home is not None:
                candidates = [s for s in open_slaves if s.uid == home and language in s.languages]
            else:
                candidates = [s for s in open_slaves if language in s.languages]
            if not candidates:
                if session is not None:
                    held.add(session)
                continue
            seen.add(user)
            key = (running.get(user, 0), self._served.get(user, 0))
            if pick_key is None or key < pick_key:
                best = min(candidates, key=lambda s: (s.load, s.last_active, s.uid))
                pick, pick_key = (job_id, best), key
            # Queue order breaks the remaining ties, so nobody later can beat a
            # pick with the fewest running never served; and once every waiting
            # user is seen, the scan is done.
            if pick_key == (fewest, 0) or len(seen) == len(self._queued_by):
                break
        return pick
