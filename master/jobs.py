"""The master's job lifecycle: a state machine with no I/O.

Modelled on dask distributed's ``worker_state_machine``: each event is a
method that changes the jobs' records and returns *decisions*, small
dataclasses that ``carry.Carrier`` carries out in order: ``Save`` a
record (committed before anything after it is carried out), ``Announce`` an
event to clients, ``Send`` a message to a slave, ``SetTimer`` /
``ClearTimer``, ``Load`` a job's inputs and come back with ``started``,
``Ack`` a slave's result once the job is durable, ``Discard`` the collected
files of a result that will not come.

Events: ``submitted``, ``dispatched`` (the scheduler chose a slave),
``started`` (its inputs are at hand: the job_run may go), ``output``,
``finished``, ``slave_lost``, ``slave_back``, ``cancel``, ``dropped`` (a
queued job its session took away), ``resume`` (after a master restart),
``timer_fired`` and ``stop``.

The machine also keeps the scheduler's counts in step (queued, running,
finished), since which job counts as running where is part of its state;
the scheduler (also pure) still chooses placements.  Tests feed events and
check the decisions, with no sockets, store or event loop.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from distexec_kernel import languages as L, protocol as P
from distexec_kernel.job_record import inputs_chars

# The decisions are read as ``J.Save`` and so on, as before they had a module of their own.
from .decisions import (Ack, Announce, ClearTimer, Decision, Discard, Load, Save, Send, SetTimer,  # noqa: F401
                        merged)
from .scheduler import Scheduler

log = logging.getLogger("distexec.master")

# Output kept in memory for a running job, per stream; the slave enforces
# the real limit and sends the whole output at the end.
LIVE_OUTPUT_CAP = 16 << 20
# A result older than this when it reaches the master waited for it: its end is checked against its start.
LATE_RESULT = 0.5
# The backstop for an end that never comes (``_deadline``): a job still running on a connected slave its
# timeout and this much more after it started is ended by the master (``slave_lost``), which tells the
# slave to stop it.  The slave ends a job at its timeout and reports at once, so only an end lost on its
# way meets it (a frame the master could not read, a slave bug); without it the job held its slot for
# good.  The grace covers what the slave does outside the timeout: a compile (up to a language's
# compile_timeout, 60 s) or a session's interpreter start (up to 60 s, slave/sessions.py), then the kill
# and its grace (a few seconds) and the result's trip, with up to 64 MiB of collected files.  Generous:
# a backstop that fires on a job still ending honestly fails it, one that fires late holds a slot longer.
END_GRACE = 90.0  # seconds; the master's --end-grace
# Of the timeout, when that is more: the cost of a late backstop is small beside a long job's run, and a
# long job's slave has more time to be slow in (a loaded machine, its collected files).
END_GRACE_SHARE = 0.1
# A cancelled job's kill must be confirmed within this (at most the end's grace): the slave kills at once,
# a session cell after a few seconds' interrupt, so a cancel that is never confirmed ends the job here.
CANCEL_CONFIRM = 30.0


class _Never:
    """``JobRecord.sent_to`` of a job whose job_run has not gone out (no instance name can equal it)."""

    def __repr__(self) -> str:
        return "NEVER"


NEVER = _Never()


# -- state -------------------------------------------------------------------

@dataclass
class JobRecord:
    """One queued or running job: its fields and what the lifecycle knows of it beyond them."""
    job: dict  # the job's fields, as saved (no inputs: those stay in the store)
    dispatch: int = 0  # which dispatch is current; a ``started`` for another is stale
    # The slave process (instance) its job_run went to; None: unknown (taken
    # back after a restart); NEVER: not sent.  A job that was never sent, or
    # whose slave process came back without it, never ran: it runs again
    # without using up a retry.
    sent_to: str | None | _Never = NEVER
    cancel: bool = False  # cancelled while on a slave: its report settles it
    # Taken back after a restart while running: what it printed before is
    # gone from memory, so its live output is not relayed (clients would get
    # chunks at the wrong offsets); the result brings all of it.
    output_gap: bool = False
    note: str | None = None  # told to the slave with the job_run (its session was lost)
    timer: int = 0  # the armed timer's token; 0: none
    why: str = ""  # what the timer's expiry means
    # The timer is the backstop for its end (its slave connected), not the wait for a slave that went away.
    deadline: bool = False
    # Requeued after its slave was lost: that slave and when the job started there.  Should the
    # slave come back still running it before it is sent anywhere else, that run goes on.
    lost_run: tuple[str, str | None] | None = None
    # Live output chunks not yet joined into ``job[stream]``, and their length: ``+=`` on the
    # job's string copied all of its output at every chunk (a 7 MiB output then a byte every few
    # ms took the master's CPU); joined only when the record is read or saved (``_joined``).
    pending: dict[str, list[str]] = field(default_factory=lambda: {"stdout": [], "stderr": []})
    pending_len: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})

    @property
    def running(self) -> bool:
        return self.job["status"] == P.RUNNING


def session_of(job: dict) -> tuple | None:
    """The job's session key: sessions are per user, two users' sessions of one name are two interpreters."""
    name = job.get("session")
    return None if name is None else P.session_key(job.get("user"), name)


def cancelled() -> dict:
    return P.error(P.CANCELLED_CODE, "cancelled by a user")


class Lifecycle:
    """Every queued and running job's record, and the events that move them."""

    def __init__(self, scheduler: Scheduler, live_output_cap: int = LIVE_OUTPUT_CAP, end_grace: float = END_GRACE):
        self.scheduler = scheduler
        self.live_output_cap = live_output_cap
        self.end_grace = end_grace
        self.records: dict[int, JobRecord] = {}
        self.slaves: dict[str, str | None] = {}  # connected slave -> its process instance
        self.stopping = False
        self._seq = 0  # dispatches and timer tokens

    # -- queries ------------------------------------------------------------

    def job(self, job_id: int) -> dict | None:
        """The job's record, its output so far whole."""
        rec = self.records.get(job_id)
        return _joined(rec) if rec is not None else None

    def jobs(self) -> Iterable[dict]:
        """Every queued and running job's record, for its other fields: a running job's output may
        lag behind (its latest chunks are joined by ``job``, not for a scan of all jobs)."""
        return (rec.job for rec in self.records.values())

    def runs_on(self, job_id: int, uid: str) -> bool:
        """Whether a result from ``uid`` for this job would settle it."""
        rec = self.records.get(job_id)
        return rec is not None and rec.running and rec.job.get("slave_uid") == uid

    # -- events -------------------------------------------------------------

    def resume(self, jobs: Iterable[dict], grace: float, chars: dict[int, int] | None = None) -> list[Decision]:
        """After a restart: take back the unfinished jobs of the history.

        A running one may still run on its slave: it waits ``grace`` seconds
        for it to come back and say so.  ``chars``: the queued ones' inputs, in characters (Store.queued_inputs).
        """
        out: list[Decision] = []
        for job in jobs:
            # A name that has since become an alias (``sh``) is queued under its main name.
            job["language"] = L.canonical(job["language"])
            rec = self.records[job["id"]] = JobRecord(job)
            key = session_of(job)
            if key is not None:
                # Its session may be alive on a slave not back yet: wait for it to say so.
                self.scheduler.hold_session(key)
            if job["status"] == P.QUEUED:
                self.scheduler.enqueue(job["id"], job["language"], key, user=job.get("user"),
                                       chars=(chars or {}).get(job["id"], 0))
            else:
                self.scheduler.mark_running(job["id"], job["slave_uid"], key, user=job.get("user"))
                rec.output_gap, rec.sent_to, rec.cancel = True, None, bool(job.get("cancel_requested"))
                out += self._arm(rec, grace, f"its slave did not come back within {grace:g} s")
        return out

    def submitted(self, jobs: list[dict]) -> list[Decision]:
        """New jobs (with their inputs), queued or already rejected: saved in one commit, then announced."""
        for job in jobs:
            if job["status"] == P.QUEUED:
                # Memory holds what scheduling needs; the inputs go to the store only.
                self.records[job["id"]] = JobRecord({k: v for k, v in job.items() if k not in P.INPUT_FIELDS})
                self.scheduler.enqueue(job["id"], job["language"], session_of(job), user=job.get("user"),
                                       chars=inputs_chars(job))
        return [Save(tuple(jobs)), *(_update(self.records[j["id"]].job if j["id"] in self.records else j)
                                     for j in jobs)]

    def dispatched(self, job_id: int, uid: str, note: str | None = None) -> list[Decision]:
        """The scheduler placed the job on ``uid``: saved as running, then sent (``Load``), then announced.

        The slave first: the job waits for its job_run, nobody for the announcement.
        """
        rec = self.records[job_id]
        self._seq += 1
        rec.dispatch, rec.sent_to, rec.note, rec.lost_run = self._seq, NEVER, note, None
        rec.job.update(status=P.RUNNING, slave_uid=uid, started_at=P.now(),
                       attempts=(rec.job.get("attempts") or 0) + 1)
        return [Save((rec.job,)), Load(job_id, rec.dispatch), _update(rec.job)]

    def started(self, job_id: int, dispatch: int, inputs: str) -> list[Decision]:
        """The job's record is durable and its inputs at hand (the JSON text the store keeps): the
        job_run goes out, if still current.

        Settled, requeued or dispatched again meanwhile, or its slave left (it
        is then lost there, never sent, and runs again): nothing to do.
        """
        rec = self.records.get(job_id)
        if (rec is None or rec.dispatch != dispatch or rec.sent_to is not NEVER or not rec.running
                or rec.job["slave_uid"] not in self.slaves):
            return []
        uid = rec.job["slave_uid"]
        rec.sent_to = self.slaves[uid]
        note, rec.note = rec.note, None
        return [Send(uid, _job_run(rec.job, inputs, note)), *self._deadline(rec)]

    def output(self, uid: str, job_id: int, stream: str, data: str) -> list[Decision]:
        rec = self.records.get(job_id)
        if rec is None or not self.runs_on(job_id, uid) or rec.output_gap:
            return []
        offset = len(rec.job[stream]) + rec.pending_len[stream]
        if offset >= self.live_output_cap:
            return []
        rec.pending[stream].append(data)
        rec.pending_len[stream] += len(data)
        return [Announce(P.make("job_output", job_id=job_id, stream=stream, offset=offset, data=data),
                         rec.job.get("user"))]

    def output_so_far(self, uid: str, job_id: int, stdout: str, stderr: str) -> list[Decision]:
        """A running job's whole output so far, from its slave just registered again: it replaces what
        is held (a restarted master holds none; chunks sent into a dead connection were lost), and the
        live relay goes on from there.  Clients are sent what they may lack, placed by offset."""
        rec = self.records.get(job_id)
        if rec is None or not self.runs_on(job_id, uid):
            return []
        out: list[Decision] = []
        _joined(rec)
        for stream, text in (("stdout", stdout), ("stderr", stderr)):
            text, held = text[:self.live_output_cap], rec.job[stream]
            # Only the new tail when what is held is its start (nothing was lost); else all of it.
            offset = len(held) if not rec.output_gap and text.startswith(held) else 0
            rec.job[stream] = text
            if len(text) > offset:
                out.append(Announce(P.make("job_output", job_id=job_id, stream=stream, offset=offset,
                                           data=text[offset:]), rec.job.get("user")))
        rec.output_gap = False
        return out

    def finished(self, uid: str, job_id: int, exit_code: int | None, error: dict | None, stdout: str,
                 stderr: str, outputs: list | None = None, artifacts: list | None = None,
                 ended_ago: float | None = None) -> list[Decision]:
        """A slave's result.  Applied if the job runs there; otherwise (settled already, a
        duplicate) only acknowledged, once what settled it is durable.  The slave says
        whether its kill or the program's own end came first: a job that finished before
        a cancel reached it keeps its result; and how long ago it ended (``ended_ago``): a
        result that waited for this master keeps its end as ``finished_at``."""
        if not self.runs_on(job_id, uid) and not self._taken_back(uid, self.slaves.get(uid), job_id):
            # A job that runs again elsewhere keeps its new slave's chunks.
            return ([] if job_id in self.records else [Discard(job_id)]) + [Ack(uid, job_id)]
        # (Taken back: requeued when its slave was lost, that slave ran it to its end meanwhile.)
        rec = self.records[job_id]
        if ((error or {}).get("code") == P.SLAVE_LOST and not rec.cancel
                and (rec.job.get("attempts") or 0) <= (rec.job.get("retries") or 0)):
            # The slave gave up on it (its drain deadline passed): as with a slave that went away,
            # a job with retries left runs again elsewhere (without, it ends with what it printed).
            return self._lose(rec, error.get("message") or "its slave stopped") + [Ack(uid, job_id)]
        return self._settle(rec, exit_code, error, stdout, stderr, outputs=outputs, artifacts=artifacts,
                            ended_ago=ended_ago) + [Ack(uid, job_id)]

    def cancel(self, job_id: int) -> list[Decision]:
        """A user's cancel.  It wins over any later start: a job not yet sent to its
        slave (or whose slave is away) is settled here and never sent; one on a
        slave is settled by the slave's report."""
        rec = self.records.get(job_id)
        if rec is None:
            return []
        if not rec.running or rec.job["slave_uid"] not in self.slaves or rec.sent_to is NEVER:
            return self._settle(rec, None, cancelled())
        if rec.cancel:
            return []
        # Saved too: should the slave not get it (a connection dead unnoticed) and the master
        # restart before the slave is back, the next master sends it again (resume, slave_back).
        rec.cancel = rec.job["cancel_requested"] = True
        # Its end is now due within CANCEL_CONFIRM: a slave that never confirms the kill holds no slot for long.
        return [Save((_joined(rec),)), Send(rec.job["slave_uid"], P.make("job_cancel", job_id=job_id)),
                *self._deadline(rec)]

    def dropped(self, job_id: int, error: dict) -> list[Decision]:
        """A queued job taken off the queue by the scheduler (its session was lost): it fails."""
        rec = self.records.get(job_id)
        return self._settle(rec, None, error) if rec is not None and not rec.running else []

    def slave_lost(self, uid: str, leaving: bool, grace: float) -> list[Decision]:
        """The connection to ``uid`` closed.  ``leaving``: it said it stops, so its jobs are
        lost now; otherwise they wait ``grace`` seconds for it to come back."""
        self.slaves.pop(uid, None)
        # The scheduler keeps counting its jobs until they are settled, so the cap holds.
        self.scheduler.remove_slave(uid)
        if self.stopping:
            return []  # they stay running, for the next master to reconcile
        out: list[Decision] = []
        for rec in self._on(uid):
            if leaving:
                out += self._lose(rec, "its slave stopped while it ran")
            else:
                out += self._arm(rec, grace, f"its slave disconnected while it ran and did not "
                                             f"come back within {grace:g} s")
        return out

    def slave_back(self, uid: str, instance: str | None, languages: list[str], slots: int,
                   draining: bool, running: set[int], reported: set[int]) -> list[Decision]:
        """Slave ``uid`` registered (again): ``running`` are the jobs it runs, ``reported``
        those whose results it brings (fed as ``finished`` next)."""
        if uid in self.slaves:  # its old connection is not seen closed yet
            self.scheduler.remove_slave(uid)
        ours = self._on(uid)
        self.scheduler.add_slave(uid, languages, slots, running=[r.job["id"] for r in ours if r.job["id"] in running])
        self.scheduler.set_accepting(uid, not draining)
        self.slaves[uid] = instance
        out: list[Decision] = []
        for job_id in sorted(running):
            out += self._taken_back(uid, instance, job_id)
        for rec in ours:  # the wait for it is over; the backstop for their ends again (the rest are lost below)
            if rec.job["id"] in running or rec.job["id"] in reported:
                out += self._deadline(rec, back=True)
        # Jobs it still runs that were settled meanwhile (e.g. failed as lost): stop them.  And the
        # cancels it may not have had: one sent into a connection that had died unnoticed is lost.
        mine = {rec.job["id"] for rec in self._on(uid)}
        stop = (running - mine) | {rec.job["id"] for rec in ours if rec.cancel and rec.job["id"] in running}
        out += [Send(uid, P.make("job_cancel", job_id=j)) for j in sorted(stop)]
        # Jobs it ran for us that it neither runs nor reports: lost with the slave.
        for rec in ours:
            if rec.job["id"] not in running and rec.job["id"] not in reported:
                out += self._lose(rec, "the slave restarted and no longer has this job", instance=instance)
        return out

    def _taken_back(self, uid: str, instance: str | None, job_id: int) -> list[Decision]:
        """A job requeued when ``uid`` was lost, and still waiting, that ``uid`` says it still runs: that
        run goes on, as if the slave had come back in time.  Sent there again instead, the new run
        would meet the old one (the slave would refuse it, and the old one's end would settle it)."""
        rec = self.records.get(job_id)
        if (rec is None or rec.running or rec.lost_run is None or rec.lost_run[0] != uid
                or session_of(rec.job) is not None or not self.scheduler.dequeue(job_id)):
            return []
        job = rec.job
        rec.sent_to, rec.output_gap = instance, True  # what it printed before is not in memory: the result brings it
        job.update(status=P.RUNNING, slave_uid=uid, started_at=rec.lost_run[1])
        rec.lost_run = None
        self.scheduler.mark_running(job_id, uid, user=job.get("user"))
        log.info("job %d: slave %s came back still running it; that run goes on", job_id, uid)
        return [Save((job,)), _update(job), *self._deadline(rec, back=True)]

    def timer_fired(self, job_id: int, token: int) -> list[Decision]:
        rec = self.records.get(job_id)
        if rec is None or rec.timer != token:
            return []
        rec.timer = 0
        if rec.running and rec.job["slave_uid"] not in self.slaves:
            return self._lose(rec, rec.why)
        if rec.running and rec.deadline:
            return self._overdue(rec)
        return []

    def stop(self) -> list[Decision]:
        """The master stops: nothing is settled from now on, its slaves keep the jobs for the next one."""
        self.stopping = True
        out: list[Decision] = []
        for rec in self.records.values():
            if rec.timer:
                rec.timer = 0
                out.append(ClearTimer(rec.job["id"]))
        return out

    # -- transitions ----------------------------------------------------------

    def _on(self, uid: str) -> list[JobRecord]:
        return [rec for _, rec in sorted(self.records.items())
                if rec.running and rec.job.get("slave_uid") == uid]

    def _arm(self, rec: JobRecord, delay: float, why: str, deadline: bool = False) -> list[Decision]:
        self._seq += 1
        rec.timer, rec.why, rec.deadline = self._seq, why, deadline
        return [SetTimer(rec.job["id"], rec.timer, delay)]

    def _deadline(self, rec: JobRecord, back: bool = False) -> list[Decision]:
        """Arm the backstop for the end of a job on a connected slave: its timeout and the grace after its
        start (``started_at``, so a restart or a reconnect moves it not), or, once cancelled, CANCEL_CONFIRM
        from now.  ``back``: its slave has just come back, and gets that long at least to report."""
        timeout = float(rec.job.get("timeout") or P.DEFAULT_TIMEOUT)
        allowed = timeout + max(self.end_grace, END_GRACE_SHARE * timeout)
        started = P.parse_time(rec.job.get("started_at"))
        left = (started.timestamp() if started else time.time()) + allowed - time.time()
        why = (f"its slave did not report its end in time: {allowed:g} s after it started "
               f"(its timeout of {timeout:g} s and {allowed - timeout:g} s of grace)")
        confirm = min(self.end_grace, CANCEL_CONFIRM)
        if rec.cancel and confirm < left:
            left, why = confirm, f"its slave did not confirm the kill within {confirm:g} s"
        return self._arm(rec, max(left, confirm if back else 0.0), why, deadline=True)

    def _overdue(self, rec: JobRecord) -> list[Decision]:
        """The backstop fired: the master ends the job itself and tells its slave to stop it.  A lost
        slave's code, not ``timeout``: what is known is that the master lost track of the run, not that the
        program ran long (a lost end is often that of a program that ended at once).  No retry: its slave
        is still there and may still run it, and a run it mishandled would likely be mishandled again."""
        uid = rec.job["slave_uid"]
        log.warning("job %d: %s (slave %s); ending it here", rec.job["id"], rec.why, uid)
        err = (P.error(P.CANCELLED_CODE, f"cancelled by a user; {rec.why}") if rec.cancel else
               P.error(P.SLAVE_LOST, f"{rec.why} (slave {uid}); the master ended it and told the slave to stop it"))
        return self._settle(rec, None, err) + [Send(uid, P.make("job_cancel", job_id=rec.job["id"]))]

    def _lose(self, rec: JobRecord, why: str, instance: str | None = None) -> list[Decision]:
        """Its slave is gone: retry if the job allows it, else fail it.

        ``instance``: the slave process that came back without the job, if one
        did; if that is the process the job was sent to, it never got it.
        """
        if self.stopping:
            return []
        job = rec.job
        never_ran = rec.sent_to is NEVER or (instance is not None and rec.sent_to == instance)
        self.scheduler.finished(job["id"])
        if rec.cancel:
            return self._settle(rec, None, cancelled())
        if not (never_ran or (job.get("attempts") or 0) <= (job.get("retries") or 0)):
            lost = f"; its session {job['session']!r} is lost with it" if job.get("session") else ""
            return self._settle(rec, None, P.error(P.SLAVE_LOST, f"{why} (slave {job['slave_uid']}){lost}"))
        if never_ran:
            # Its job_run was never sent, or the slave process it went to came
            # back without it: it did not run, so no retry is used up.
            job["attempts"] = max(0, (job.get("attempts") or 0) - 1)
            why += ", before it started"
        out: list[Decision] = [ClearTimer(job["id"])] if rec.timer else []
        rec.lost_run = None if never_ran else (job["slave_uid"], job.get("started_at"))
        rec.timer, rec.dispatch, rec.sent_to, rec.output_gap, rec.note = 0, 0, NEVER, False, None
        _joined(rec)  # and dropped: a new attempt starts its output over
        job.update(status=P.QUEUED, slave_uid=None, started_at=None, stdout="", stderr="")
        self.scheduler.requeue_front(job["id"], job["language"], session_of(job), user=job.get("user"))
        log.info("job %d requeued (%s), attempt %d of %d", job["id"], why, job["attempts"] + 1,
                 (job.get("retries") or 0) + 1)
        return out + [Discard(job["id"]), Save((job,)), _update(job)]

    def _settle(self, rec: JobRecord, exit_code: int | None, err: dict | None, stdout: str | None = None,
                stderr: str | None = None, *, outputs: list | None = None,
                artifacts: list | None = None, ended_ago: float | None = None) -> list[Decision]:
        """The job's one terminal state: it leaves the records (terminal jobs live in the store only)."""
        job = _joined(rec)
        del self.records[job["id"]]
        job.pop("cancel_requested", None)  # the record's own fields only, once it has ended
        if job["status"] == P.QUEUED:
            self.scheduler.dequeue(job["id"])
        self.scheduler.finished(job["id"])
        job.update(status=P.status_of(err), error=err, exit_code=exit_code, finished_at=_end(job, ended_ago),
                   outputs=outputs or [], artifacts=artifacts or [])
        if stdout is not None:
            job["stdout"] = stdout
        if stderr is not None:
            job["stderr"] = stderr
        out: list[Decision] = [ClearTimer(job["id"])] if rec.timer else []
        return out + [Discard(job["id"]), Save((job,)), _update(job)]


def _joined(rec: JobRecord) -> dict:
    """The record's job with its pending output chunks joined in: one copy per read, not per chunk."""
    for stream, chunks in rec.pending.items():
        if chunks:
            rec.job[stream] = "".join([rec.job[stream], *chunks])
            chunks.clear()
            rec.pending_len[stream] = 0
    return rec.job


def _end(job: dict, ended_ago: float | None) -> str:
    """When the job ended: ``ended_ago`` seconds before now, as its slave says (a result that waited
    for the master, across a restart or a reconnect, keeps its end), never before it started."""
    ago = max(0.0, ended_ago or 0.0)
    if ago >= LATE_RESULT:
        # Only a late one is checked: a prompt result's job started before its job_run went out.
        started = P.parse_time(job.get("started_at"))
        ran_for = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds() if started else 0.0
        ago = min(ago, max(0.0, ran_for))
    return P.now(ago)


def _update(job: dict) -> Announce:
    return Announce(P.make("job_update", job=P.update_of(job)), job.get("user"))


def _job_run(job: dict, inputs: str, session_note: str | None = None) -> str:
    """The job_run of ``job``, encoded, with ``inputs`` (a JSON object's text, as the store keeps it)
    spliced in as they are: a job's inputs can be 17 MiB, and decoding them to encode them again
    took the master's event loop tens of milliseconds a job (docs/performance.md, "The lean relay")."""
    fields = {k: job.get(k) for k in ("id", "language", "timeout", "name", "user", "session", "collect")}
    if session_note:
        fields["session_note"] = session_note
    text = P.encode(P.make("job_run", job=fields))  # the job is its last field: the text ends with "}}"
    return text if inputs == "{}" else f"{text[:-2]},{inputs[1:]}}}"
