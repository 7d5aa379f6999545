"""The master's bookkeeping of persistent Python sessions (``--session NAME``).

Where a session lives is the scheduler's decision (affinity, one job at a
time); this keeps what ``/api/sessions`` shows, the notes a job gets when its
session was lost, and what happens to sessions when their slave comes and
goes.  An object ``Master`` holds: it changes the scheduler's session
bindings and returns what the master must do (messages to send, jobs to
fail); it sends nothing itself.
"""
from __future__ import annotations

import logging
from typing import Callable, Collection, Iterable

from distexec_kernel import protocol as P

from .jobs import session_of
from .scheduler import Scheduler

log = logging.getLogger("distexec.master")

NOTES_KEPT = 10_000  # names are the users' to choose: keep the notes bounded


class SessionBook:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        # Live sessions by key (see jobs.session_of): what /api/sessions shows.
        self.live: dict[tuple, dict] = {}
        # Session key -> why the session of that name is gone, told to the next
        # job of that name (in its stderr) when it starts a new one.
        self.notes: dict[tuple, str] = {}
        # Slave UID -> its --max-sessions-per-user.
        self.caps: dict[str, int | None] = {}

    def used(self, job: dict, uid: str) -> str | None:
        """A job of a session was placed on ``uid`` (the scheduler chose, by affinity).

        Returns the note the job's slave is to show it, if it starts the
        session anew after the old one was lost.
        """
        key = session_of(job)
        info = self.live.get(key)
        now = P.now()
        note = None
        if info is None or info["slave_uid"] != uid:
            info = self.live[key] = {"name": job["session"], "user": job.get("user"), "slave_uid": uid,
                                     "language": job["language"], "created_at": now, "last_used": now, "jobs": 0}
            note = self.notes.pop(key, None)
        info["last_used"] = now
        info["jobs"] += 1
        return note

    def reconcile(self, uid: str, alive: list[tuple], cap: int | None) -> list[dict]:
        """A slave registered with the sessions it has alive: bind them, forget the rest.

        Returns the ``session_end`` messages to send it (sessions that started
        anew elsewhere while it was away).
        """
        self.caps[uid] = cap
        tell = []
        for key in alive:
            if self.scheduler.bind_session(key, uid):
                self.notes.pop(key, None)
                if key not in self.live:
                    user, name = key
                    self.live[key] = {"name": name, "user": user, "slave_uid": uid, "language": "python",
                                      "created_at": P.now(), "last_used": P.now(), "jobs": 0}
            else:
                tell.append(P.make("session_end", session=key[1], user=key[0],
                                   reason=f"a newer session of that name runs on slave "
                                          f"{self.scheduler.session_slave[key]}"))
        gone = [k for k, owner in self.scheduler.session_slave.items() if owner == uid and k not in alive]
        for key in gone:
            self.scheduler.unbind_session(key)
            self.live.pop(key, None)
            self._note(key, f"session {P.session_label(key)} was lost: slave {uid} restarted without it")
        return tell

    def lose(self, uid: str, how: str, job_of: Callable[[int], dict | None]) -> list[tuple[int, dict]]:
        """Slave ``uid`` left: its sessions are gone, and so are their queued jobs.

        Returns those jobs (taken off the scheduler's queue) with the error they fail with.
        """
        names, queued = self.scheduler.drop_sessions(uid)
        for key in names:
            self.live.pop(key, None)
            self._note(key, f"session {P.session_label(key)} was lost: its slave {uid} {how}; "
                            f"this job starts a new session")
        failed = []
        for job_id in queued:
            job = job_of(job_id)
            if job is not None:
                # A job back in the queue for a retry had run: it was lost with its session, not before.
                when = "while this job ran" if job.get("attempts") else "before this job ran"
                failed.append((job_id, P.error(
                    P.SLAVE_LOST, f"session {P.session_label(session_of(job))} was lost {when}: "
                                  f"its slave {uid} {how}; the next job of {job['session']!r} starts a new session")))
        if names:
            log.info("slave %s %s: session(s) lost: %s", uid, how, ", ".join(map(P.session_label, names)))
        return failed

    def ended(self, uid: str, msg: dict) -> bool:
        """The slave ended a session by itself (idle, its interpreter died); True if it was bound there."""
        key = P.session_key(msg["user"], msg["session"])
        if self.scheduler.session_slave.get(key) != uid:
            return False
        self.scheduler.unbind_session(key)
        self.live.pop(key, None)
        self._note(key, f"session {P.session_label(key)} ended on slave {uid} ({msg['reason']}); "
                        f"this job starts a new one")
        return True

    def end(self, name: str, user: str | None) -> tuple[dict | None, str | None]:
        """End a session on a user's request: what it was (None if there is none) and its slave."""
        key = P.session_key(user, name)
        info = self.live.pop(key, None)
        uid = self.scheduler.unbind_session(key)
        if info is None and uid is None:
            return None, None
        self.notes.pop(key, None)
        return info or {"name": name, "user": user, "slave_uid": uid}, uid

    def refusal(self, job: dict, active: Iterable[dict], connected: Collection[str]) -> dict | None:
        """The error for a job that would open one session too many for its user, else None.

        A user's sessions are counted across the cluster: the live ones and
        those that ``active`` jobs (queued or running) will open.  The cap is
        the smallest ``--max-sessions-per-user`` of the ``connected`` slaves.
        """
        key = session_of(job)
        if key is None:  # most jobs: no walk over the slaves' caps for them
            return None
        caps = [cap for uid, cap in self.caps.items() if uid in connected and isinstance(cap, int)]
        if not caps:
            return None
        user, cap = key[0], min(caps)
        mine = {name for u, name in self.live if u == user}
        mine |= {other["session"] for other in active if other.get("session") is not None and other.get("user") == user}
        if key[1] in mine or len(mine) < cap:
            return None
        return P.error(P.SESSION_LIMIT, f"session {key[1]!r} would be session {len(mine) + 1} of "
                       f"{'user ' + repr(user) if user else 'this user'}: at most {cap} at once "
                       f"(--max-sessions-per-user); open: {', '.join(sorted(mine))}; end one first "
                       f"(%remote sessions --end NAME, Cluster.end_session, DELETE /api/sessions/NAME)", limit=cap)

    def list(self, owner: str | None = None) -> list[dict]:
        """Live sessions, oldest first; ``owner`` limits them to that user's."""
        return sorted((dict(i) for i in self.live.values() if owner is None or i["user"] == owner),
                      key=lambda i: (i["created_at"], i["name"]))

    def _note(self, key: tuple, note: str) -> None:
        self.notes[key] = note
        while len(self.notes) > NOTES_KEPT:
            self.notes.pop(next(iter(self.notes)))
