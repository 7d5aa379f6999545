"""The master's bookkeeping of persistent Python sessions (``--session NAME``).

Where a session lives is the scheduler's decision (affinity, one job at a
time); this keeps what ``/api/sessions`` shows, the notes a job gets when its
session was lost, and what happens to sessions when their slave comes and
goes.  A mixin of ``Master``: it works on the master's scheduler, jobs and
slaves.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from distexec_kernel import protocol as P

if TYPE_CHECKING:
    from .core import Peer

log = logging.getLogger("distexec.master")


class SessionBook:
    def _session_used(self, job: dict, uid: str) -> None:
        """A job of a session was placed on ``uid`` (the scheduler chose, by affinity)."""
        key = _session_key(job)
        info = self.sessions.get(key)
        now = P.now()
        if info is None or info["slave_uid"] != uid:
            info = self.sessions[key] = {"name": job["session"], "user": job.get("user"), "slave_uid": uid,
                                         "language": job["language"], "created_at": now, "last_used": now,
                                         "jobs": 0}
            note = self._session_notes.pop(key, None)
            if note:
                self._notes_to_send[job["id"]] = note
        info["last_used"] = now
        info["jobs"] += 1

    def _reconcile_sessions(self, uid: str, peer: Peer, alive: list[tuple]) -> None:
        """A slave registered with the sessions it has alive: bind them, forget the rest."""
        for key in alive:
            if self.scheduler.bind_session(key, uid):
                self._session_notes.pop(key, None)
                if key not in self.sessions:
                    user, name = key
                    self.sessions[key] = {"name": name, "user": user, "slave_uid": uid, "language": "python",
                                          "created_at": P.now(), "last_used": P.now(), "jobs": 0}
            else:
                # A newer session of that name started elsewhere while it was away.
                peer.send(P.make("session_end", session=key[1], user=key[0],
                                 reason=f"a newer session of that name runs on slave "
                                        f"{self.scheduler.session_slave[key]}"))
        gone = [k for k, owner in self.scheduler.session_slave.items() if owner == uid and k not in alive]
        for key in gone:
            self.scheduler.unbind_session(key)
            self.sessions.pop(key, None)
            self._note_session(key, f"session {P.session_label(key)} was lost: slave {uid} restarted without it")

    def _lose_sessions(self, uid: str, how: str) -> None:
        """Slave ``uid`` left: its sessions are gone, and so are their queued jobs."""
        names, queued = self.scheduler.drop_sessions(uid)
        for key in names:
            self.sessions.pop(key, None)
            self._note_session(key, f"session {P.session_label(key)} was lost: its slave {uid} {how}; "
                                    f"this job starts a new session")
        for job_id in queued:
            job = self.active.get(job_id)
            if job is not None:
                key = _session_key(job)
                asyncio.ensure_future(self._finish(job, None, P.error(
                    P.SLAVE_LOST, f"session {P.session_label(key)} was lost before this job ran: its slave {uid} {how}; "
                                  f"the next job of {job['session']!r} starts a new session")))
        if names:
            log.info("slave %s %s: session(s) lost: %s", uid, how, ", ".join(map(P.session_label, names)))

    def _sessions_grace_expired(self, uid: str, grace: float) -> None:
        if uid not in self.slaves:
            self._lose_sessions(uid, f"disconnected and did not come back within {grace:g} s")

    def _note_session(self, key: str, note: str) -> None:
        self._session_notes[key] = note
        while len(self._session_notes) > 10000:  # names are the users' to choose: keep it bounded
            self._session_notes.pop(next(iter(self._session_notes)))

    def session_ended(self, uid: str, msg: dict) -> None:
        """The slave ended a session by itself (idle, its interpreter died)."""
        key = P.session_key(msg["user"], msg["session"])
        if self.scheduler.session_slave.get(key) != uid:
            return
        self.scheduler.unbind_session(key)
        self.sessions.pop(key, None)
        self._note_session(key, f"session {P.session_label(key)} ended on slave {uid} ({msg['reason']}); "
                                f"this job starts a new one")
        self._dispatch()

    def end_session(self, name: str, user: str | None) -> dict | None:
        """End a session on a user's request; returns what it was, or None if there is none."""
        key = P.session_key(user, name)
        info = self.sessions.pop(key, None)
        uid = self.scheduler.unbind_session(key)
        if info is None and uid is None:
            return None
        slave = self.slaves.get(uid) if uid else None
        if slave is not None:
            slave.peer.send(P.make("session_end", session=name, user=user, reason="ended by a user"))
        self._session_notes.pop(key, None)
        return info or {"name": name, "user": user, "slave_uid": uid}

    def _session_refusal(self, job: dict) -> dict | None:
        """The error for a job that would open one session too many for its user, else None.

        A user's sessions are counted across the cluster: the live ones and
        those that jobs queued or running will open.  The cap is the smallest
        ``--max-sessions-per-user`` of the connected slaves.
        """
        key = _session_key(job)
        caps = [cap for uid, cap in self._session_caps.items() if uid in self.slaves and isinstance(cap, int)]
        if key is None or not caps:
            return None
        user, cap = key[0], min(caps)
        mine = {name for u, name in self.sessions if u == user}
        mine |= {other["session"] for other in self.active.values()
                 if other.get("session") is not None and other.get("user") == user}
        if key[1] in mine or len(mine) < cap:
            return None
        return P.error(P.SESSION_LIMIT, f"session {key[1]!r} would be session {len(mine) + 1} of "
                       f"{'user ' + repr(user) if user else 'this user'}: at most {cap} at once "
                       f"(--max-sessions-per-user); open: {', '.join(sorted(mine))}; end one first "
                       f"(%remote sessions, Cluster.end_session, DELETE /api/sessions/NAME)", limit=cap)

    def session_list(self, owner: str | None = None) -> list[dict]:
        """Live sessions, oldest first; ``owner`` limits them to that user's."""
        return sorted((dict(i) for i in self.sessions.values() if owner is None or i["user"] == owner),
                      key=lambda i: (i["created_at"], i["name"]))


def _session_key(job: dict) -> tuple | None:
    """Sessions are per user: two users' sessions of one name are two interpreters."""
    name = job.get("session")
    if name is None:
        return None
    return P.session_key(job.get("user"), name)

