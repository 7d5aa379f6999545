"""The master: jobs, slaves, clients and the events between them.

The Tornado handlers (``app``, ``sockets``) only read, validate and call in
here.  What becomes of a job is decided by the lifecycle (``jobs.py``), and
where it runs by the scheduler, both free of I/O; this module feeds them
events and carries their decisions out, in order.  Every change is written
to the store and committed *before* it is announced to clients or acted
upon, so what a client saw is never lost by a master crash.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Awaitable

from distexec_kernel import protocol as P
from distexec_kernel.rich_outputs import clean_outputs

from . import jobs as J, parts
from .admission import (DEFAULT_MAX_QUEUE, DEFAULT_MAX_QUEUED_MB_PER_USER, DEFAULT_MAX_QUEUED_PER_USER, Admission,
                        QueueFull, bound_rejected)
from .carry import Carrier, done as _done
from .clients import DEFAULT_MAX_CLIENTS_PER_USER, ClientBook, ClientInfo, Coalesced, Peer
from .retention import Retention
from .scheduler import Scheduler
from .sessions import SessionBook
from .slaves import SlaveInfo, language_list, results_of, slave_list
from .store import JobStore

__all__ = ["Master", "Peer", "QueueFull", "SlaveInfo"]

log = logging.getLogger("distexec.master")

SLAVES_EVENT_DELAY = 0.1  # seconds slave-list changes are gathered before clients hear of them

# How long the jobs of a slave whose connection dropped wait for it to come back before they are lost. A live
# slave reconnects within a fraction of a second (a network blip, a ping timeout on a loaded machine) and
# reports them; a dead one costs its jobs these few seconds more.
RECONNECT_GRACE = 3.0

# How long a cancel of a running job waits for its slave to kill it (milliseconds) before it answers.
CANCEL_WAIT = 5.0

DEFAULT_KEEP_DAYS = 90.0
DEFAULT_KEEP_MB = 10_000.0
PRUNE_INTERVAL = 3600.0  # seconds between two passes of the history retention


class Master:
    """The master's state and its entry points: the handlers call these, one per request or frame."""

    def __init__(self, store: JobStore, *, max_jobs: int | None = None, lost_grace: float = 30.0,
                 max_queue: int | None = DEFAULT_MAX_QUEUE,
                 max_queued_per_user: int | None = DEFAULT_MAX_QUEUED_PER_USER,
                 max_queued_mb_per_user: float | None = DEFAULT_MAX_QUEUED_MB_PER_USER,
                 keep_days: float | None = DEFAULT_KEEP_DAYS, keep_mb: float | None = DEFAULT_KEEP_MB,
                 prune_interval: float = PRUNE_INTERVAL, end_grace: float = J.END_GRACE,
                 max_clients_per_user: int | None = DEFAULT_MAX_CLIENTS_PER_USER,
                 max_running_per_user: int | None = None, max_timeout: float | None = None):
        self.store = store
        self.scheduler = Scheduler(max_jobs, max_running_per_user)
        self.jobs = J.Lifecycle(self.scheduler, end_grace=end_grace)
        self.sessions = SessionBook(self.scheduler)
        self.clients = ClientBook(max_clients_per_user)
        self.retention = Retention(store, keep_days, keep_mb, prune_interval)
        self.admission = Admission(self.scheduler, store, max_queue, max_queued_per_user, max_timeout,
                                   max_queued_mb_per_user)
        self.lost_grace = lost_grace
        self.slaves: dict[str, SlaveInfo] = {}
        self._next_id = store.max_id() + 1
        # Every finished job changes a slave's counters; the whole list to every
        # client each time would cost more than the jobs under load.
        self._slaves_changed = Coalesced(SLAVES_EVENT_DELAY, self._send_slaves_changed)
        self._carry = Carrier(store, self.jobs, self.slaves, self.clients, self._timer_fired)
        # Resumed jobs' timers wait for the loop (start).
        self._resumed = self.jobs.resume(store.unfinished(), lost_grace, store.queued_inputs())
        if self.jobs.records:
            log.info("resumed %d unfinished job(s) from the history", len(self.jobs.records))

    # -- start-up ----------------------------------------------------------

    def start(self) -> None:
        """Arm the grace timers for resumed running jobs; call with the loop running."""
        self.admission.start(self.lost_grace)
        self._carry(self._resumed)
        self._resumed = []
        if self.scheduler.held_sessions:
            asyncio.get_running_loop().call_later(min(self.lost_grace, self.admission.window), self._release_sessions)
        self.retention.start()

    def _release_sessions(self) -> None:
        """Sessions no slave reported since the restart start anew with their next job."""
        if self.scheduler.release_held_sessions():
            self._dispatch()

    def shutdown(self) -> None:
        """Stop settling jobs; call before the server closes its connections.

        The slaves keep running their jobs and hand the results to the next
        master, so a planned restart (SIGTERM) loses nothing either.
        """
        self._carry(self.jobs.stop())
        self.retention.stop()
        self.admission.syntax.close()

    def _timer_fired(self, job_id: int, token: int) -> None:
        self._carry(self.jobs.timer_fired(job_id, token))
        self._dispatch()

    def _dispatch(self) -> None:
        """Start what the scheduler places now: saved running (one commit), then announced and sent."""
        self._carry(J.merged(self._assigned()))

    def _assigned(self) -> list[J.Decision]:
        """The decisions that start every job the scheduler places now (their saves not yet merged)."""
        return [d for job_id, uid in self.scheduler.assign() for d in self._dispatched(job_id, uid)]

    def _dispatched(self, job_id: int, uid: str) -> list[J.Decision]:
        job = self.jobs.job(job_id)
        note = self.sessions.used(job, uid) if job.get("session") is not None else None
        return self.jobs.dispatched(job_id, uid, note)

    def _send_slaves_changed(self) -> None:
        self.clients.broadcast(P.make("slaves_changed", slaves=self.slave_list()))

    # -- clients -----------------------------------------------------------

    def client_connected(self, peer: Peer, user: str | None, host: str, wanted_id: str | None = None,
                         owner: str | None = None, account: str | None = None,
                         label: str | None = None) -> ClientInfo:
        """See ``ClientBook.client_connected``."""
        return self.clients.client_connected(peer, user, host, wanted_id, owner, account, label)

    def client_disconnected(self, cid: str) -> None:
        self.clients.client_disconnected(cid)

    def client_of(self, cid: str | None, account: str | None) -> str | None:
        return self.clients.client_of(cid, account)

    def client_list(self, owner: str | None = None) -> list[dict]:
        return self.clients.client_list(owner)

    # -- submission --------------------------------------------------------

    async def submit(self, request: dict, *, client_id: str | None = None,
                     user: str | None = None, ref: str | None = None) -> dict:
        """Validate and record a submission; returns the job (maybe rejected).

        Raises ProtocolError for a bad request; a program that does not parse
        or that no slave can run is a *rejected job*, kept in the history.
        ``ref``: the client's own for a WebSocket submission, kept with the job
        (``JobStore.id_of_ref``: sent again after a restart, it finds this job).
        """
        [job] = await self.submit_each([(request, ref)], client_id=client_id, user=user)
        if isinstance(job, P.ProtocolError):
            raise job
        return job

    async def submit_each(self, requests: list[tuple[dict, str | None]], *, client_id: str | None = None,
                          user: str | None = None) -> list[dict | P.ProtocolError]:
        """Independent submissions ``(request, ref)`` that came together (a client's pipelined burst), each
        judged as ``submit`` would, in order; one commit for all and the starts they allow. Each item is
        the job or the ProtocolError that refused it."""
        out: list[dict | P.ProtocolError] = []
        for request, _ in requests:
            try:
                out.append(self.admission.check(request))
            except P.ProtocolError as exc:
                out.append(exc)
        owner = await self._rejoined([sub for sub in out if isinstance(sub, dict)], client_id, user)
        jobs, decisions = [], []
        for i, (sub, (_, ref)) in enumerate(zip(out, requests)):
            if isinstance(sub, dict):
                try:  # after the last await: nothing else is queued between this check and the enqueue
                    self.admission.check_room(owner, subs=[sub])
                except P.ProtocolError as exc:  # QueueFull, or too_large for any queue
                    out[i] = exc
                    continue
                jobs.append(self._record(sub, client_id, owner, None, ref, decisions))
        saved = iter(await self._commit_submitted(jobs, decisions, client_id))
        return [item if isinstance(item, P.ProtocolError) else next(saved) for item in out]

    async def submit_batch(self, requests: list, *, client_id: str | None = None, user: str | None = None,
                           group: str | None = None, part: int | None = None) -> list[dict]:
        """Record a batch as one group, all or nothing: every item is checked before any is queued.

        The jobs get consecutive ids in the batch's order and share a group: a new one, or ``group``, one
        of the owner's (a 404 otherwise), ``part`` keying it (``parts.py``); committed together, in order."""
        subs = P.check_batch(requests, self.admission.check)
        if not subs:
            return []
        owner = await self._rejoined(subs, client_id, user)
        if group is not None:
            await self.admission.check_join(owner, group)
        if (keys := parts.refs(group, part, len(subs))) and (made := await parts.taken(self, owner, keys)):
            return made  # sent again: taken once
        self.admission.check_room(owner, len(subs), group, subs)  # after the last await, as in submit_each
        group, decisions = group or f"g{self._next_id}", []
        jobs = [self._record(sub, client_id, owner, group, keys[i] if keys else None, decisions)
                for i, sub in enumerate(subs)]
        return await self._commit_submitted(jobs, decisions, client_id)

    async def _rejoined(self, subs: list[dict], client_id: str | None, user: str | None) -> str | None:
        """Once returning slaves had their moment and large programs were parsed off the loop: the jobs' owner."""
        for language in {sub["language"] for sub in subs}:
            await self.admission.await_returning_slaves(language, self.slaves)
        client = self.clients.get(client_id)
        owner = user or (client.user if client is not None else None)
        await self.admission.syntax.ahead(owner, subs)
        return owner

    def _record(self, sub: dict, client_id: str | None, owner: str | None, group: str | None,
                ref: str | None, decisions: list[J.Decision]) -> dict:
        """A new job, queued or rejected at once; what that decides is added to ``decisions``."""
        job = P.new_job(self._next_id, sub, client_id=client_id, user=owner)
        self._next_id += 1
        job["group"] = group
        if ref is not None:
            job["ref"] = ref
        # The jobs recorded before it in this turn are active already (sessions per user).
        rejection = (self.admission.rejection(job, detecting=self._detecting)
                     or self.sessions.refusal(job, self.jobs.jobs(), self.slaves))
        if rejection is not None:
            job.update(status=P.REJECTED, error=rejection, finished_at=P.now())
            bound_rejected(job)
        decisions += self.jobs.submitted([job])
        return job

    async def _commit_submitted(self, jobs: list[dict], decisions: list[J.Decision],
                                client_id: str | None) -> list[dict]:
        """Commit new jobs with the starts they allow, before any of them is announced; the jobs as they
        then are.  One that starts at once is sent the inputs text its save wrote (store.save_many)."""
        if not jobs:
            return []
        client = self.clients.get(client_id)
        if client is not None:
            client.jobs_submitted += len(jobs)
            self.clients.changed()
        decisions += self._assigned()
        replies = [dict(self.jobs.job(job["id"]) or job) for job in jobs]
        await self._carry.run(J.merged(decisions))
        return [{**reply, **{k: job[k] for k in P.INPUT_FIELDS}} for reply, job in zip(replies, jobs)]

    # -- cancel ------------------------------------------------------------

    async def cancel(self, job_id: int, user: str | None = None) -> dict | None:
        """Cancel in any non-terminal state; a terminal job is returned as it is.

        ``user`` limits it to that user's jobs (another's is None, as if absent);
        None is an admin's cancel.  A running job is returned still running: it
        ends when its slave has killed it (``ended``).
        """
        job = self.jobs.job(job_id)
        if job is None:
            stored = await self.store.get(job_id)
            return stored if _visible(stored, user) else None
        if not _visible(job, user):
            return None
        carrying = self._carry(self.jobs.cancel(job_id))
        self._dispatch()
        await _done(carrying)
        return dict(job)

    async def ended(self, job: dict, within: float = CANCEL_WAIT) -> dict:
        """``job`` as it is once it has ended (committed), or as it is after ``within`` seconds."""
        if self.jobs.job(job["id"]) is not None:
            await self._carry.ended(job["id"], within)
        return await self.get_job(job["id"]) or job

    async def cancel_group(self, group: str, user: str | None = None) -> int | None:
        """Cancel the unfinished jobs of ``group`` that ``user`` may see; how many there were.

        None if ``user`` has no job in that group at all (a 404, as for a job). The queued ones
        leave the queue first, all at once, so none starts while the running ones are stopped.
        """
        mine = [j for j in self.jobs.jobs() if j.get("group") == group and _visible(j, user)]
        if not (known := mine or (await self.store.list(None, 1, 0, user, group=group))[0]):
            return None
        marked = self.admission.group_cancelled(group, known[0].get("user"))  # parts still coming: refused
        queued = [j["id"] for j in mine if j["status"] == P.QUEUED]
        carrying = [self._carry(self.jobs.cancel(job_id)) for job_id in queued]
        carrying += [self._carry(self.jobs.cancel(j["id"])) for j in mine if j["id"] not in queued]
        self._dispatch()
        await asyncio.gather(marked, *map(_done, carrying))
        return len(mine)

    # -- slaves ------------------------------------------------------------

    def slave_registered(self, peer: Peer, msg: dict) -> SlaveInfo | dict:
        """Register a slave; returns its info, or an error dict to refuse it."""
        if msg["protocol"] != P.PROTOCOL_VERSION:
            return P.error("protocol_mismatch",
                           f"this master speaks protocol {P.PROTOCOL_VERSION}, the slave "
                           f"{msg['protocol']}: install the same distexec version on both")
        uid = msg["uid"]
        # The same slave may reconnect before its old connection is seen closed:
        # its `running` and `results` say what became of its jobs, so none is
        # lost here; the old connection's close is then ignored.
        langs = _languages_of(msg)
        info = SlaveInfo(uid, msg["host"], langs, msg["slots"], peer, draining=bool(msg.get("draining")),
                         instance=msg.get("instance"), detecting=bool(msg.get("detecting")))
        self.slaves[uid] = info
        peer.send(P.make("register_reply", ok=True, slave_uid=uid))
        self.admission.slave_joined()
        results = results_of(uid, msg.get("results", []))
        running = {j for j in msg.get("running", []) if isinstance(j, int)}
        self._carry(self.jobs.slave_back(uid, info.instance, [lang["name"] for lang in langs], msg["slots"],
                                         info.draining, running, {r["job_id"] for r in results}))
        # Results it finished while we were away.
        for result in results:
            asyncio.ensure_future(self.job_finished(uid, result))
        for end in self.sessions.reconcile(uid, P.session_keys_of(msg.get("sessions")),
                                           msg.get("max_sessions_per_user")):
            peer.send(end)
        log.info("slave %s registered from %s: %s, %d slot(s)%s", uid, msg["host"],
                 ", ".join(lang["name"] for lang in langs) or "no languages", msg["slots"],
                 "; still detecting toolchains" if info.detecting else "")
        self._settle_detection()
        self._slaves_changed()
        self._dispatch()
        return info

    def slave_languages(self, uid: str, msg: dict) -> None:
        """A slave's languages changed (it ended its toolchain detection): place what now can run."""
        info = self.slaves.get(uid)
        if info is None:
            return
        info.languages = _languages_of(msg)
        info.detecting = msg["detecting"]
        self.scheduler.set_languages(uid, [lang["name"] for lang in info.languages])
        log.info("slave %s now offers: %s%s", uid, ", ".join(lang["name"] for lang in info.languages) or "no languages",
                 "; still detecting toolchains" if info.detecting else "")
        self._settle_detection()
        self._slaves_changed()
        self._dispatch()

    def _detecting(self) -> bool:
        return any(s.detecting for s in self.slaves.values())

    def _settle_detection(self) -> None:
        """When no connected slave is detecting any more, fail the jobs queued for a language
        that detection did not bring: none of them would ever start."""
        if self._detecting() or self.jobs.stopping:
            return  # a stopping master's slaves leave: its queue is the next master's
        for job_id, err in self.admission.unplaceable():
            job = self.jobs.job(job_id)
            if job is not None and job["status"] == P.QUEUED:
                log.info("job %d: %s", job_id, err["message"])
                self._carry(self.jobs.dropped(job_id, err))

    def slave_disconnected(self, uid: str, peer: Peer, leaving: bool = False) -> None:
        """The connection closed; ``leaving``: the slave said it stops, so it will not reconnect."""
        info = self.slaves.get(uid)
        if info is None or info.peer is not peer:
            return
        del self.slaves[uid]
        grace = min(self.lost_grace, RECONNECT_GRACE)
        if not leaving:
            self.admission.expect_back(uid, [lang["name"] for lang in info.languages], grace)
        self._carry(self.jobs.slave_lost(uid, leaving, grace))
        if not self.jobs.stopping and uid in self.scheduler.session_slave.values():
            # Its sessions wait as long as its jobs do (their next jobs stay
            # queued): a slave back in time reports them alive, and nothing is lost.
            asyncio.get_running_loop().call_later(grace, self._sessions_grace_expired, uid, grace)
        log.info("slave %s disconnected", uid)
        self._settle_detection()
        self._slaves_changed()
        self._dispatch()

    def _sessions_grace_expired(self, uid: str, grace: float) -> None:
        if uid not in self.slaves:
            for job_id, err in self.sessions.lose(uid, f"disconnected and did not come back within {grace:g} s",
                                                  self.jobs.job):
                self._carry(self.jobs.dropped(job_id, err))
            self._dispatch()

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
        return slave_list(self.slaves, self.scheduler)

    def language_list(self) -> list[dict]:
        return language_list(self.slaves)

    # -- sessions ------------------------------------------------------------

    def session_ended(self, uid: str, msg: dict) -> None:
        """The slave ended a session by itself (idle, its interpreter died)."""
        if self.sessions.ended(uid, msg):
            self._dispatch()

    def end_session(self, name: str, user: str | None) -> dict | None:
        """End a session on a user's request; returns what it was, or None if there is none."""
        info, uid = self.sessions.end(name, user)
        slave = self.slaves.get(uid) if uid else None
        if slave is not None:
            slave.peer.send(P.make("session_end", session=name, user=user, reason="ended by a user"))
        return info

    def session_list(self, owner: str | None = None) -> list[dict]:
        return self.sessions.list(owner)

    # -- job progress from slaves -----------------------------------------

    def job_output(self, uid: str, msg: dict) -> None:
        self._carry(self.jobs.output(uid, msg["job_id"], msg["stream"], msg["data"]))

    def job_output_so_far(self, uid: str, msg: dict) -> None:
        self._carry(self.jobs.output_so_far(uid, msg["job_id"], msg["stdout"], msg["stderr"]))

    def job_artifact(self, uid: str, msg: dict) -> None:
        """A chunk of a running job's collected file, ahead of its result; staged until the result comes."""
        if not self.jobs.runs_on(msg["job_id"], uid):
            return  # settled meanwhile (cancelled, lost): its result is only acknowledged
        try:
            data = base64.b64decode(msg["data"], validate=True)
        except (binascii.Error, ValueError):
            raise P.ProtocolError("bad_message", "job_artifact: data is not base64") from None
        self.store.artifacts.receive(msg["job_id"], msg["index"], msg["offset"], data)

    async def job_finished(self, uid: str, msg: dict) -> None:
        job_id = msg["job_id"]
        stderr, artifacts = msg["stderr"], []
        if self.jobs.runs_on(job_id, uid) and msg.get("artifacts"):
            artifacts, missing = await asyncio.to_thread(self.store.artifacts.finish, job_id, msg["artifacts"])
            if missing:
                log.warning("job %d: collected file(s) did not arrive whole: %s", job_id, ", ".join(missing))
                stderr += f"distexec: collected file(s) lost on the way to the master: {', '.join(missing)}\n"
        applied = self.jobs.runs_on(job_id, uid)
        outputs, dropped = clean_outputs(msg.get("outputs"))  # a client renders them: only what it can
        if dropped and applied:
            log.warning("job %d: %s", job_id, "; ".join(dropped))
            stderr += "".join(f"distexec: {note}\n" for note in dropped)
        decisions = self.jobs.finished(uid, job_id, msg["exit_code"], msg["error"], msg["stdout"],
                                       stderr, outputs, artifacts, msg.get("ended_ago"))
        if applied:
            slave = self.slaves.get(uid)
            if slave is not None:
                slave.completed += 1
            # The jobs its slot lets start share the result's commit: one save, one
            # carrying-out for both (its acknowledgement waits for that commit either way).
            decisions += self._assigned()
            self._slaves_changed()
        await self._carry.run(J.merged(decisions))

    def prune(self, before: str | None = None) -> Awaitable[int]:
        """See ``Retention.prune``."""
        return self.retention.prune(before)

    # -- reads ----------------------------------------------------------------

    async def get_job(self, job_id: int, user: str | None = None) -> dict | None:
        """The job, or None; ``user`` limits it to that user's jobs (None: an admin's read)."""
        active = self.jobs.job(job_id)
        if active is not None and not _visible(active, user):
            return None
        stored = await self.store.get(job_id)
        await self._carry.durable([job_id])
        active = self.jobs.job(job_id)
        if active is None and stored is not None and stored["status"] not in P.TERMINAL:
            stored = await self.store.get(job_id)  # it settled meanwhile: committed by now
        # An active job's state (and output so far) is in memory, its inputs in the store.
        job = {**(stored or {}), **active} if active is not None else stored
        return job if _visible(job, user) else None

    async def list_jobs(self, status: str | None, limit: int, offset: int, user: str | None = None,
                        group: str | None = None, summary: bool = False) -> tuple[list[dict], int]:
        """See ``JobStore.list``; ``summary``: without the bulky fields (job_record.summary)."""
        jobs, total = await self.store.list(status, limit, offset, user, group=group, summary=summary)
        await self._carry.durable([j["id"] for j in jobs])
        # A running job's output so far lives in memory, not yet in the store.
        jobs = [{**j, **self.jobs.job(j["id"])} if self.jobs.job(j["id"]) else j for j in jobs]
        return ([P.summary(j) for j in jobs] if summary else jobs), total


def _languages_of(msg: dict) -> list[dict]:
    """The well-formed entries of a ``register`` or ``languages`` message's list."""
    return [lang for lang in msg["languages"] if isinstance(lang, dict) and isinstance(lang.get("name"), str)]


def _visible(job: dict | None, owner: str | None) -> bool:
    """Whether a client limited to ``owner``'s jobs (None: an admin) may see ``job``."""
    return job is not None and (owner is None or job.get("user") == owner)
