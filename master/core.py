"""The master's logic: jobs, slaves, clients and the events between them.

The Tornado handlers (``http_api``, ``sockets``) only read, validate and call
in here; the scheduler decides placement; the store keeps the history.
Every status change is written to the store and committed *before* it is
announced to clients or acted upon, so what a client saw is never lost by
a master crash.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Protocol as _Proto

from distexec_kernel import languages as L, protocol as P

from .clients import ClientBook, ClientInfo
from .retention import Retention
from .scheduler import Scheduler
from .sessions import SessionBook, _session_key
from .store import JobStore

log = logging.getLogger("distexec.master")

# Output kept in memory for a running job, per stream; the slave enforces
# the real limit and sends the whole output at the end.
LIVE_OUTPUT_CAP = 16 << 20
SLAVES_EVENT_DELAY = 0.1  # seconds slave-list changes are gathered before clients hear of them

# After a start, how long a submission for a language only absent slaves ran
# waits for them to reconnect before it is rejected (they retry within seconds).
REJOIN_WINDOW = 10.0
# How much of the history tells which slaves (and languages) to expect back.
REJOIN_HISTORY = 1000
# How long the jobs of a slave whose connection dropped wait for it to come
# back before they are lost.  A live slave reconnects within a fraction of a
# second (a network blip, a ping timeout on a loaded machine) and reports them;
# a dead one costs its jobs these few seconds more.
RECONNECT_GRACE = 3.0

DEFAULT_MAX_QUEUED_PER_USER = 1000
# A safety cap on all queued jobs together (they cost about 1 KiB of memory
# each, their inputs being in the store); users meet their own cap first.
DEFAULT_MAX_QUEUE = 100_000
DEFAULT_KEEP_DAYS = 90.0
DEFAULT_KEEP_MB = 10_000.0
PRUNE_INTERVAL = 3600.0  # seconds between two passes of the history retention


class Peer(_Proto):
    """What the core needs of a connection: send one message."""

    def send(self, msg: dict | str) -> None:
        """Send ``msg``: a message, or the text ``protocol.encode`` made of one."""


@dataclass
class SlaveInfo:
    uid: str
    host: str
    languages: list[dict]
    slots: int
    peer: Peer
    connected_at: str = field(default_factory=P.now)
    last_seen: str = field(default_factory=P.now)
    completed: int = 0
    draining: bool = False
    instance: str | None = None  # the slave process's id, new at each slave start


class QueueFull(P.ProtocolError):
    """A submission past a queue cap; ``status`` is the HTTP status it gets."""

    def __init__(self, message: str, status: int = 429):
        super().__init__("queue_full", message)
        self.status = status


class Master(ClientBook, SessionBook, Retention):
    def __init__(self, store: JobStore, *, max_jobs: int | None = None, lost_grace: float = 30.0,
                 max_queue: int | None = DEFAULT_MAX_QUEUE,
                 max_queued_per_user: int | None = DEFAULT_MAX_QUEUED_PER_USER,
                 keep_days: float | None = DEFAULT_KEEP_DAYS, keep_mb: float | None = DEFAULT_KEEP_MB,
                 prune_interval: float = PRUNE_INTERVAL):
        self.store = store
        self.scheduler = Scheduler(max_jobs)
        self.lost_grace = lost_grace
        # Most jobs waiting at once, per user and in all; past either a
        # submission is refused, not queued (see queue_room).
        self.max_queue = max_queue
        self.max_queued_per_user = max_queued_per_user
        # History retention (see prune): None is no bound.
        self.keep_days = keep_days
        self.keep_mb = keep_mb
        self.prune_interval = prune_interval
        self._prune_task: asyncio.Task | None = None
        # Client id -> the account it was issued to, newest last: only that
        # account may take the id again (reconnecting) or name it on a request.
        self._issued: dict[str, str | None] = {}
        # The inputs of the job being submitted, during its first dispatch only.
        self._at_hand: dict[int, dict] = {}
        # Non-terminal jobs, by id.  Terminal jobs live in the store only.
        self.active: dict[int, dict] = {}
        self.slaves: dict[str, SlaveInfo] = {}
        self.clients: dict[str, ClientInfo] = {}
        self._next_id = store.max_id() + 1
        self._next_client = 1
        self._grace_handles: dict[int, asyncio.TimerHandle] = {}
        self._slaves_event: asyncio.TimerHandle | None = None
        self._clients_event: asyncio.TimerHandle | None = None
        # Live Python sessions by key (see _session_key): what /api/sessions shows.
        # Where each lives is the scheduler's business; this is the bookkeeping.
        self.sessions: dict[tuple, dict] = {}
        # Session key -> why the session of that name is gone, told to the next
        # job of that name (in its stderr) when it starts a new one.
        self._session_notes: dict[tuple, str] = {}
        # Slave UID -> its --max-sessions-per-user (master/sessions.py).
        self._session_caps: dict[str, int | None] = {}
        self._notes_to_send: dict[int, str] = {}
        # Running jobs taken back after a restart: what they printed before it
        # is gone from memory, so their live output is not relayed (clients
        # would get chunks at the wrong offsets); the result brings all of it.
        self._output_gap: set[int] = set()
        # Terminal saves not yet committed: a duplicate result waits for them
        # before it is acknowledged, so a slave never drops a result too soon.
        self._settling: dict[int, asyncio.Future] = {}
        # Set while the master shuts down: its slaves' connections close then,
        # and their jobs must stay `running` for the next master to reconcile.
        self.stopping = False
        # Running job -> the slave process (instance) its job_run was written
        # to; None when unknown (taken back after a restart).  A job with no
        # entry was never sent, and one whose slave process comes back without
        # it never reached it: either way it never ran, so it runs again
        # without using up a retry.
        self._sent_to: dict[int, str | None] = {}
        # Running job -> which dispatch of it is current, so a stale send is dropped.
        self._dispatches: dict[int, int] = {}
        self._dispatch_seq = 0
        # Slaves that ran jobs before this start, with their languages, and a
        # wake-up for submissions waiting on them (see _await_returning_slaves).
        self._expected: dict[str, set[str]] = {}
        for job in store.recent(REJOIN_HISTORY):
            if job.get("slave_uid"):
                self._expected.setdefault(job["slave_uid"], set()).add(job["language"])
        self._rejoin_until = 0.0
        self._slave_joined = asyncio.Event()
        self._resume()

    # -- start-up ----------------------------------------------------------

    def _resume(self) -> None:
        """Take back queued and running jobs from the history after a restart."""
        for job in self.store.unfinished():
            self.active[job["id"]] = job
            if job.get("session") is not None:
                # Its session may be alive on a slave not back yet: wait for it to say so.
                self.scheduler.hold_session(_session_key(job))
            if job["status"] == P.QUEUED:
                self.scheduler.enqueue(job["id"], job["language"], _session_key(job), user=job.get("user"))
            else:
                # Its slave may still be running it: wait for it to come back.
                self.scheduler.mark_running(job["id"], job["slave_uid"], _session_key(job), user=job.get("user"))
                self._output_gap.add(job["id"])
                self._sent_to[job["id"]] = None
        if self.active:
            log.info("resumed %d unfinished job(s) from the history", len(self.active))

    def start(self) -> None:
        """Arm the grace timers for resumed running jobs; call with the loop running."""
        self._rejoin_until = asyncio.get_running_loop().time() + min(self.lost_grace, REJOIN_WINDOW)
        for job in list(self.active.values()):
            if job["status"] == P.RUNNING and job["slave_uid"] not in self.slaves:
                self._arm_grace(job["id"])
        if self.scheduler.held_sessions:
            asyncio.get_running_loop().call_later(min(self.lost_grace, REJOIN_WINDOW), self._release_sessions)
        if self.keep_days is not None or self.keep_mb is not None:
            self._prune_task = asyncio.ensure_future(self._prune_loop())

    def _release_sessions(self) -> None:
        """Sessions no slave reported since the restart start anew with their next job."""
        if self.scheduler.release_held_sessions():
            self._dispatch()

    def shutdown(self) -> None:
        """Stop settling jobs; call before the server closes its connections.

        The slaves keep running their jobs and hand the results to the next
        master, so a planned restart (SIGTERM) loses nothing either.
        """
        self.stopping = True
        for job_id in list(self._grace_handles):
            self._cancel_grace(job_id)
        if self._prune_task is not None:
            self._prune_task.cancel()

    # -- clients -----------------------------------------------------------

    def _slaves_changed(self) -> None:
        """Tell clients the slave list changed, at most once per SLAVES_EVENT_DELAY.

        Every finished job changes a slave's counters; sending the whole list to
        every client each time would cost more than the jobs under load.
        """
        if self._slaves_event is None:
            loop = asyncio.get_running_loop()
            self._slaves_event = loop.call_later(SLAVES_EVENT_DELAY, self._send_slaves_changed)

    def _send_slaves_changed(self) -> None:
        self._slaves_event = None
        self._broadcast(P.make("slaves_changed", slaves=self.slave_list()))

    def _broadcast(self, msg: dict, job: dict | None = None) -> None:
        """Send to every client; an event about ``job`` only to its owner and the admins."""
        text = None  # encoded once, on first use: a burst of events goes to every client
        for client in list(self.clients.values()):
            if job is None or _visible(job, client.owner):
                if text is None:
                    text = P.encode(msg)
                client.peer.send(text)

    # -- submission --------------------------------------------------------

    async def submit(self, request: dict, *, client_id: str | None = None,
                     user: str | None = None) -> dict:
        """Validate and record a submission; returns the job (maybe rejected).

        Raises ProtocolError for a bad request; a program that does not parse
        or that no slave can run is a *rejected job*, kept in the history.
        """
        [job] = await self._submit_checked([self._check(request)], client_id, user, group=None)
        return job

    async def submit_batch(self, requests: list, *, client_id: str | None = None,
                           user: str | None = None) -> list[dict]:
        """Record a batch as one group, all or nothing: every item is checked before any is queued.

        The jobs get consecutive ids in the batch's order and share ``group``;
        they are committed together and queued in order.
        """
        subs = P.check_batch(requests, self._check)
        if not subs:
            return []
        return await self._submit_checked(subs, client_id, user, group=f"g{self._next_id}")

    def _check(self, request) -> dict:
        sub = P.check_submission(request)
        sub["language"] = L.canonical(sub["language"])
        if sub["session"] is not None and sub["language"] != "python":
            raise P.ProtocolError("bad_request", f"sessions run Python only, not {sub['language']!r}: "
                                  "drop 'session' to run it as a fresh process")
        return sub

    async def _submit_checked(self, subs: list[dict], client_id: str | None, user: str | None,
                              group: str | None) -> list[dict]:
        for language in {sub["language"] for sub in subs}:
            await self._await_returning_slaves(language)
        client = self.clients.get(client_id) if client_id else None
        owner = user or (client.user if client is not None else None)
        # After the last await: nothing else is queued between this check and the enqueue.
        self.check_room(owner, len(subs))
        jobs: list[dict] = []
        held: dict[int, dict] = {}
        for sub in subs:
            job = P.new_job(self._next_id, sub, client_id=client_id, user=owner)
            self._next_id += 1
            job["group"] = group
            rejection = self._rejection(job)
            if rejection is not None:
                job.update(status=P.REJECTED, error=rejection, finished_at=P.now())
                _bound_rejected(job)
            else:
                # Memory holds what scheduling needs; the inputs go to the store only.  Active
                # at once, so the next item of a batch counts it (sessions per user).
                held[job["id"]] = self.active[job["id"]] = {k: v for k, v in job.items()
                                                            if k not in P.INPUT_FIELDS}
            jobs.append(job)
        if client is not None:
            client.jobs_submitted += len(jobs)
            self._clients_changed()
        queued = [job for job in jobs if job["id"] in held]
        for job in queued:
            self.scheduler.enqueue(job["id"], job["language"], _session_key(job), user=owner)
        # One commit for the whole batch, before any of it is announced.
        await self.store.save_many(jobs)
        for job in jobs:
            self._announce(held.get(job["id"], job))
        if queued:
            # A job that starts at once is sent with the inputs at hand, saving a read.
            for job in queued:
                self._at_hand[job["id"]] = {k: job[k] for k in P.INPUT_FIELDS}
            try:
                self._dispatch()
            finally:
                for job in queued:
                    del self._at_hand[job["id"]]
        return [{**held[job["id"]], **{k: job[k] for k in P.INPUT_FIELDS}} if job["id"] in held else job
                for job in jobs]

    def queue_room(self, user: str | None) -> int:
        """How many more jobs ``user`` may queue now (per-user cap and global cap)."""
        room = []
        if self.max_queued_per_user is not None:
            room.append(self.max_queued_per_user - self.scheduler.queued_by(user))
        if self.max_queue is not None:
            room.append(self.max_queue - len(self.scheduler.queue))
        return max(0, min(room)) if room else P.INT_MAX

    def check_room(self, user: str | None, count: int = 1) -> None:
        """Raise QueueFull unless ``user`` may queue ``count`` more jobs (all of them, or none)."""
        if self.queue_room(user) >= count:
            return
        mine = self.scheduler.queued_by(user)
        if self.max_queued_per_user is not None and mine + count > self.max_queued_per_user:
            fits = max(0, self.max_queued_per_user - mine)
            raise QueueFull(f"{user or 'this user'} has {mine} job(s) waiting, and at most "
                            f"{self.max_queued_per_user} may wait per user (--max-queued-per-user); "
                            f"{fits} more would fit: try again when some have run")
        raise QueueFull(f"the master's queue is full ({self.max_queue} jobs waiting in all, "
                        f"--max-queue): try again when some have run", status=503)

    async def _await_returning_slaves(self, language: str) -> None:
        """Right after a restart, give the slaves that ran ``language`` a moment to reconnect.

        Without this, a submission that arrives between a master restart and
        its slaves' return would be rejected as unsupported.  Bounded by
        REJOIN_WINDOW; a master with no history never waits.
        """
        loop = asyncio.get_running_loop()
        while (not self.scheduler.can_run(language) and loop.time() < self._rejoin_until
               and any(language in langs and uid not in self.slaves for uid, langs in self._expected.items())):
            try:
                await asyncio.wait_for(self._slave_joined.wait(), self._rejoin_until - loop.time())
            except asyncio.TimeoutError:
                return

    def _rejection(self, job: dict) -> dict | None:
        if job.get("session") is not None:  # a session cell is IPython (magics, !cmd); sessions are Python only
            detail = L.check_session_syntax(job["source"])
        else:
            detail = L.check_syntax(job["language"], job["source"])
        if detail is not None:
            where = f" (line {detail['line']})" if detail.get("line") else ""
            return P.error(P.SYNTAX_ERROR, detail["message"] + where, line=detail.get("line"),
                           column=detail.get("column"), text=detail.get("text"))
        if not self.scheduler.can_run(job["language"]):
            available = sorted(self.scheduler.languages())
            names = ", ".join(available) if available else "none (no slave is connected)"
            return P.error(P.UNSUPPORTED_LANGUAGE,
                           f"no connected slave runs {job['language']!r}; available: {names}",
                           available=available)
        return self._session_refusal(job)

    # -- cancel ------------------------------------------------------------

    async def cancel(self, job_id: int, user: str | None = None) -> dict | None:
        """Cancel in any non-terminal state; a terminal job is returned as it is.

        ``user`` limits it to that user's jobs (another's is None, as if absent);
        None is an admin's cancel.
        """
        job = self.active.get(job_id)
        if job is None:
            stored = await self.store.get(job_id)
            return stored if _visible(stored, user) else None
        if not _visible(job, user):
            return None
        if job["status"] == P.QUEUED:
            self.scheduler.dequeue(job_id)
            return await self._finish(job, None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
        # Running: the slave kills it and reports; if the slave is gone, settle here.
        slave = self.slaves.get(job["slave_uid"])
        if slave is None:
            self.scheduler.finished(job_id)
            return await self._finish(job, None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
        job["cancel_requested"] = True
        slave.peer.send(P.make("job_cancel", job_id=job_id))
        return job

    async def cancel_group(self, group: str, user: str | None = None) -> int | None:
        """Cancel the unfinished jobs of ``group`` that ``user`` may see; how many there were.

        None if ``user`` has no job in that group at all (a 404, as for a job).
        The queued ones leave the queue first, all at once, so none of them
        starts while the running ones are being stopped.
        """
        mine = [j for j in self.active.values() if j.get("group") == group and _visible(j, user)]
        if not mine:
            _, total = await self.store.list(None, 1, 0, user, group=group)
            return 0 if total else None
        queued = [j for j in mine if j["status"] == P.QUEUED]
        for job in queued:
            self.scheduler.dequeue(job["id"])
        await asyncio.gather(*(self._finish(job, None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
                               for job in queued))
        for job in mine:
            if job["status"] == P.RUNNING:
                await self.cancel(job["id"], user)
        return len(mine)

    # -- dispatch ----------------------------------------------------------

    def _dispatch(self) -> None:
        for job_id, uid in self.scheduler.assign():
            job = self.active[job_id]
            job.update(status=P.RUNNING, slave_uid=uid, started_at=P.now(),
                       attempts=(job.get("attempts") or 0) + 1)
            if job.get("session") is not None:
                self._session_used(job, uid)
            slave = self.slaves.get(uid)
            self._dispatch_seq += 1
            self._dispatches[job_id] = self._dispatch_seq
            asyncio.ensure_future(self._send_run(job, uid, slave.peer if slave else None, self._dispatch_seq,
                                                 self._at_hand.get(job_id)))

    async def _send_run(self, job: dict, uid: str, peer: Peer | None, seq: int,
                        inputs: dict | None = None) -> None:
        # Durable before announced, and before the slave may start it.
        await self.store.save(job)
        self._announce(job)
        if inputs is None:
            # Saved at submission (that commit came first: one writer, in
            # order); read back only now, and dropped once sent.
            inputs = await self.store.inputs(job["id"])
        slave = self.slaves.get(uid)
        if (slave is None or slave.peer is not peer or self.active.get(job["id"]) is not job
                or job["status"] != P.RUNNING or self._dispatches.get(job["id"]) != seq):
            # Settled, requeued or dispatched again meanwhile, or the slave left or
            # came back on a new connection (whose register could not list this
            # job, so it was lost there): whoever changed it has handled it.
            return
        if job.get("cancel_requested"):
            # Cancelled while its record was being saved: the slave dropped the
            # job_cancel for a job it did not have yet, so never start it.
            self.scheduler.finished(job["id"])
            await self._finish(job, None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
            return
        self._sent_to[job["id"]] = slave.instance
        note = self._notes_to_send.pop(job["id"], None)
        slave.peer.send(P.make("job_run", job=_for_slave({**job, **inputs}, note)))

    # -- slaves ------------------------------------------------------------

    def slave_registered(self, peer: Peer, msg: dict) -> SlaveInfo | dict:
        """Register a slave; returns its info, or an error dict to refuse it."""
        if msg["protocol"] != P.PROTOCOL_VERSION:
            return P.error("protocol_mismatch",
                           f"this master speaks protocol {P.PROTOCOL_VERSION}, the slave "
                           f"{msg['protocol']}: install the same distexec version on both")
        uid = msg["uid"]
        old = self.slaves.get(uid)
        if old is not None and old.peer is not peer:
            # The same slave reconnected before its old connection was seen closed.
            # Its `running` and `results` below say what became of its jobs, so
            # none is lost here; the old connection's close is then ignored.
            del self.slaves[uid]
            self.scheduler.remove_slave(uid)
        langs = [lang for lang in msg["languages"] if isinstance(lang, dict) and isinstance(lang.get("name"), str)]
        info = SlaveInfo(uid, msg["host"], langs, msg["slots"], peer, draining=bool(msg.get("draining")),
                         instance=msg.get("instance"))
        self.slaves[uid] = info
        still_running = {j for j in msg.get("running", []) if isinstance(j, int)}
        ours = [j for j, owner in self.scheduler.running.items() if owner == uid]
        self.scheduler.add_slave(uid, [lang["name"] for lang in langs], msg["slots"],
                                 running=[j for j in ours if j in still_running])
        self.scheduler.set_accepting(uid, not info.draining)
        for job_id in ours:
            self._cancel_grace(job_id)
        peer.send(P.make("register_reply", ok=True, slave_uid=uid))
        self._slave_joined.set()
        self._slave_joined = asyncio.Event()
        # Jobs it still runs that we settled meanwhile (e.g. failed as lost): stop them.
        for job_id in still_running - set(ours):
            peer.send(P.make("job_cancel", job_id=job_id))
        # Results it finished while we were away.
        reported = set()
        for result in msg.get("results", []):
            try:
                P.validate(result)
            except P.ProtocolError as exc:
                log.warning("slave %s sent a malformed stored result: %s", uid, exc.message)
                continue
            reported.add(result["job_id"])
            asyncio.ensure_future(self.job_finished(uid, result))
        # Jobs it ran for us that it neither runs nor reports: lost with the slave.
        for job_id in ours:
            if job_id not in still_running and job_id not in reported:
                job = self.active.get(job_id)
                if job is not None:
                    asyncio.ensure_future(self._lose(job, "the slave restarted and no longer has this job",
                                                     instance=info.instance))
        self._reconcile_sessions(uid, peer, P.session_keys_of(msg.get("sessions")))
        self._session_caps[uid] = msg.get("max_sessions_per_user")
        log.info("slave %s registered from %s: %s, %d slot(s)", uid, msg["host"],
                 ", ".join(lang["name"] for lang in langs) or "no languages", msg["slots"])
        self._slaves_changed()
        self._dispatch()
        return info

    def slave_disconnected(self, uid: str, peer: Peer, leaving: bool = False) -> None:
        """The connection closed; ``leaving``: the slave said it stops, so it will not reconnect."""
        if self._drop_slave(uid, peer, leaving):
            self._slaves_changed()
            self._dispatch()

    def _drop_slave(self, uid: str, peer: Peer, leaving: bool = False) -> bool:
        info = self.slaves.get(uid)
        if info is None or info.peer is not peer:
            return False
        del self.slaves[uid]
        # The scheduler keeps counting its jobs until they are settled, so the cap holds.
        lost = self.scheduler.remove_slave(uid)
        if self.stopping:
            return True
        grace = min(self.lost_grace, RECONNECT_GRACE)
        for job_id in lost:
            job = self.active.get(job_id)
            if job is None:
                continue
            if leaving:
                asyncio.ensure_future(self._lose(job, "its slave stopped while it ran"))
            else:
                self._arm_grace(job_id, grace, f"its slave disconnected while it ran and did not "
                                               f"come back within {grace:g} s")
        if uid in self.scheduler.session_slave.values():
            # Its sessions wait as long as its jobs do (their next jobs stay
            # queued): a slave back in time reports them alive, and nothing is lost.
            asyncio.get_running_loop().call_later(grace, self._sessions_grace_expired, uid, grace)
        log.info("slave %s disconnected (%d job(s) were running there)", uid, len(lost))
        return True

    def slave_draining(self, uid: str) -> None:
        info = self.slaves.get(uid)
        if info is not None:
            info.draining = True
            self.scheduler.set_accepting(uid, False)
            # The echo tells the slave that every job_run sent before it has
            # reached it, so once idle it may leave without stranding a job.
            info.peer.send(P.make("draining"))
            self._slaves_changed()

    def slave_seen(self, uid: str) -> None:
        info = self.slaves.get(uid)
        if info is not None:
            info.last_seen = P.now()

    def slave_list(self) -> list[dict]:
        return [{
            "uid": s.uid, "host": s.host, "languages": [lang["name"] for lang in s.languages],
            "versions": {lang["name"]: lang.get("version") for lang in s.languages},
            "slots": s.slots,
            "running": len(self.scheduler.slaves[s.uid].running) if s.uid in self.scheduler.slaves else 0,
            "completed": s.completed, "connected_at": s.connected_at, "last_seen": s.last_seen,
            "draining": s.draining,
        } for s in self.slaves.values()]

    def language_list(self) -> list[dict]:
        seen: dict[str, dict] = {}
        for s in self.slaves.values():
            for lang in s.languages:
                entry = seen.setdefault(lang["name"], {"name": lang["name"], "version": lang.get("version"), "slaves": 0})
                entry["slaves"] += 1
        return sorted(seen.values(), key=lambda e: e["name"])

    # -- job progress from slaves -----------------------------------------

    def job_output(self, uid: str, msg: dict) -> None:
        job = self.active.get(msg["job_id"])
        if (job is None or job.get("slave_uid") != uid or job["status"] != P.RUNNING
                or job["id"] in self._output_gap):
            return
        stream = msg["stream"]
        offset = len(job[stream])
        if offset >= LIVE_OUTPUT_CAP:
            return
        job[stream] += msg["data"]
        self._broadcast(P.make("job_output", job_id=job["id"], stream=stream, offset=offset, data=msg["data"]),
                        job)

    def job_artifact(self, uid: str, msg: dict) -> None:
        """A chunk of a running job's collected file, ahead of its result; staged until the result comes."""
        job = self.active.get(msg["job_id"])
        if job is None or job.get("slave_uid") != uid or job["status"] != P.RUNNING:
            return  # settled meanwhile (cancelled, lost): its result is only acknowledged
        try:
            data = base64.b64decode(msg["data"], validate=True)
        except (binascii.Error, ValueError):
            raise P.ProtocolError("bad_message", "job_artifact: data is not base64") from None
        self.store.artifacts.receive(job["id"], msg["index"], msg["offset"], data)

    async def job_finished(self, uid: str, msg: dict) -> None:
        job_id = msg["job_id"]
        slave = self.slaves.get(uid)
        job = self.active.get(job_id)
        if job is None or job.get("slave_uid") != uid or job["status"] != P.RUNNING:
            # Already settled (cancelled, lost, or a duplicate report): just
            # acknowledge, once the settled state is durable.
            if job is None:  # (a job that runs again elsewhere keeps its new slave's chunks)
                self.store.artifacts.discard(job_id)
            pending = self._settling.get(job_id)
            if pending is not None:
                try:
                    await asyncio.shield(pending)
                except Exception:
                    return  # not durable: keep the slave's copy
                slave = self.slaves.get(uid)
            if slave is not None:
                slave.peer.send(P.make("result_ack", job_id=job_id))
            return
        self.scheduler.finished(job_id)
        if slave is not None:
            slave.completed += 1
        stderr, artifacts = msg["stderr"], []
        if msg.get("artifacts"):
            artifacts, missing = await asyncio.to_thread(self.store.artifacts.finish, job_id, msg["artifacts"])
            if missing:
                log.warning("job %d: collected file(s) did not arrive whole: %s", job_id, ", ".join(missing))
                stderr += f"distexec: collected file(s) lost on the way to the master: {', '.join(missing)}\n"
        await self._finish(job, msg["exit_code"], msg["error"], msg["stdout"], stderr,
                           outputs=_rich_outputs(msg.get("outputs")), artifacts=artifacts)
        slave = self.slaves.get(uid)
        if slave is not None:
            slave.peer.send(P.make("result_ack", job_id=job_id))
        self._slaves_changed()

    async def _lose(self, job: dict, why: str, instance: str | None = None) -> None:
        """Its slave is gone: retry if the job allows it, else fail it.

        ``instance``: the slave process that came back without the job, if
        one did; if that is the process the job was sent to, it never got it.
        """
        if self.active.get(job["id"]) is not job or job["status"] != P.RUNNING or self.stopping:
            return
        home = self.scheduler.slaves.get(job["slave_uid"])
        if job["slave_uid"] in self.slaves and home is not None and job["id"] in home.running:
            return  # its slave came back meanwhile and reported it still running
        self._output_gap.discard(job["id"])
        self._dispatches.pop(job["id"], None)
        self.scheduler.finished(job["id"])
        sent_to = self._sent_to.pop(job["id"], _NEVER_SENT)
        never_ran = sent_to is _NEVER_SENT or (instance is not None and sent_to == instance)
        if job.get("cancel_requested"):
            await self._finish(job, None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
        elif never_ran or (job.get("attempts") or 0) <= (job.get("retries") or 0):
            if never_ran:
                # Its job_run was never sent, or the slave process it went to
                # came back without it: it did not run, so no retry is used up.
                job["attempts"] = max(0, (job.get("attempts") or 0) - 1)
                why += ", before it started"
            job.update(status=P.QUEUED, slave_uid=None, started_at=None, stdout="", stderr="")
            self.store.artifacts.discard(job["id"])
            self.scheduler.requeue_front(job["id"], job["language"], _session_key(job), user=job.get("user"))
            await self.store.save(job)
            self._announce(job)
            log.info("job %d requeued (%s), attempt %d of %d", job["id"], why,
                     job["attempts"] + 1, job["retries"] + 1)
        else:
            lost = f"; its session {job['session']!r} is lost with it" if job.get("session") else ""
            await self._finish(job, None, P.error(P.SLAVE_LOST, f"{why} (slave {job['slave_uid']}){lost}"))
        self._dispatch()

    def _arm_grace(self, job_id: int, delay: float | None = None, why: str | None = None) -> None:
        """Lose the job unless its slave is back (and still has it) within ``delay`` seconds."""
        delay = self.lost_grace if delay is None else delay
        why = why or f"its slave did not come back within {delay:g} s"
        self._cancel_grace(job_id)
        loop = asyncio.get_running_loop()
        self._grace_handles[job_id] = loop.call_later(delay, self._grace_expired, job_id, why)

    def _cancel_grace(self, job_id: int) -> None:
        handle = self._grace_handles.pop(job_id, None)
        if handle is not None:
            handle.cancel()

    def _grace_expired(self, job_id: int, why: str) -> None:
        self._grace_handles.pop(job_id, None)
        job = self.active.get(job_id)
        if job is not None and job["status"] == P.RUNNING and job["slave_uid"] not in self.slaves:
            asyncio.ensure_future(self._lose(job, why))

    # -- settling ------------------------------------------------------------

    async def _finish(self, job: dict, exit_code: int | None, err: dict | None,
                      stdout: str | None = None, stderr: str | None = None, *,
                      outputs: list | None = None, artifacts: list | None = None) -> dict:
        # The slave says whether its kill or the program's own end came first:
        # a job that finished before the cancel reached it keeps its result.
        job.pop("cancel_requested", None)
        job.update(status=P.status_of(err), error=err, exit_code=exit_code, finished_at=P.now())
        if stdout is not None:
            job["stdout"] = stdout
        if stderr is not None:
            job["stderr"] = stderr
        job["outputs"] = outputs or []
        job["artifacts"] = artifacts or []
        self.store.artifacts.discard(job["id"])  # chunks of a result that will not come
        self.active.pop(job["id"], None)
        self._cancel_grace(job["id"])
        self._output_gap.discard(job["id"])
        self._sent_to.pop(job["id"], None)
        self._dispatches.pop(job["id"], None)
        saved = self._settling[job["id"]] = self.store.save(job)
        try:
            await saved
        finally:
            if self._settling.get(job["id"]) is saved:
                del self._settling[job["id"]]
        self._announce(job)
        self._dispatch()
        return job

    def _announce(self, job: dict) -> None:
        self._broadcast(P.make("job_update", job=P.update_of(_public(job))), job)

    # -- reads ----------------------------------------------------------------

    async def get_job(self, job_id: int, user: str | None = None) -> dict | None:
        """The job, or None; ``user`` limits it to that user's jobs (None: an admin's read)."""
        active = self.active.get(job_id)
        if active is not None and not _visible(active, user):
            return None
        stored = await self.store.get(job_id)
        # An active job's state (and output so far) is in memory, its inputs in the store.
        job = _public({**(stored or {}), **active}) if active is not None else stored
        return job if _visible(job, user) else None

    async def list_jobs(self, status: str | None, limit: int, offset: int,
                        user: str | None = None, group: str | None = None) -> tuple[list[dict], int]:
        jobs, total = await self.store.list(status, limit, offset, user, group=group)
        # A running job's output so far lives in memory, not yet in the store.
        return [_public({**j, **self.active[j["id"]]}) if j["id"] in self.active else j for j in jobs], total


_NEVER_SENT = object()


def _bound_rejected(job: dict) -> None:
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


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k != "cancel_requested"}


def _visible(job: dict | None, owner: str | None) -> bool:
    """Whether a client limited to ``owner``'s jobs (None: an admin) may see ``job``."""
    return job is not None and (owner is None or job.get("user") == owner)


def _rich_outputs(outputs) -> list[dict]:
    """The well-formed nbformat-style outputs of a result: clients display them, so nothing else passes."""
    kept = []
    for out in outputs if isinstance(outputs, list) else ():
        if (isinstance(out, dict) and out.get("output_type") in ("display_data", "execute_result")
                and isinstance(out.get("data"), dict) and all(isinstance(k, str) for k in out["data"])):
            meta = out.get("metadata")
            kept.append({"output_type": out["output_type"], "data": out["data"],
                         "metadata": meta if isinstance(meta, dict) else {}})
    return kept


def _for_slave(job: dict, session_note: str | None = None) -> dict:
    out = {k: job.get(k) for k in ("id", "language", "timeout", "name", "user", "session", "collect")}
    out.update(source=job.get("source") or "", files=job.get("files") or {}, args=job.get("args") or [],
               stdin=job.get("stdin"))
    if session_note:
        out["session_note"] = session_note
    return out
