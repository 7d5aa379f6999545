"""The slave's side of the master connection.

Connects to ``/ws/slave``, registers, runs the jobs it is sent through its
``Runner``, streams their output and reports how they ended.  It keeps each
finished result until the master acknowledges it, so a result is not lost
when the master restarts while a job runs: on reconnecting, the slave sends
what it still runs and what it finished meanwhile.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import uuid

import tornado.httpclient
import tornado.iostream
import tornado.websocket

from distexec_kernel import config, protocol as P, wsclient

from .runner import Outcome, Runner

log = logging.getLogger("distexec.slave")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
OUTPUT_FLUSH = 0.01  # seconds output chunks are gathered before one message goes out
# Seconds between pings to the master (--ping-interval); silent for twice that, it is judged gone.
PING_INTERVAL = 2.0
# Bytes of unacknowledged results a register carries, at most; the rest follow it, one frame each.  Each
# result fits a frame (``_checked``), but four of 16 MiB made a register past P.MAX_MESSAGE_BYTES, which
# the master refused, and refused again at every reconnect: the slave never registered.  Half the limit
# leaves the register's own lists (running jobs, sessions, languages) all the room they can need.
REGISTER_RESULTS_BYTES = P.MAX_MESSAGE_BYTES // 2


class FatalSlaveError(Exception):
    """The master refused us for a reason retrying cannot fix."""


class Slave:
    def __init__(self, master_url: str, secret: str, uid: str, host: str, slots: int,
                 toolchains: dict[str, str], runner: Runner, *, cafile: str | None = None,
                 on_registered=None, detecting: bool = False, ping_interval: float = PING_INTERVAL):
        self.ws_url = config.ws_url(master_url) + "/ws/slave"
        self.secret = secret
        self.uid = uid
        self.host = host
        self.slots = slots
        self.toolchains = toolchains
        self.runner = runner
        self.cafile = cafile
        self.ping_interval = ping_interval
        self.on_registered = on_registered
        # Still asking toolchains: ``toolchains`` will grow (languages_changed tells the master).
        self.detecting = detecting
        # What the start left running (slave/server.py): cancelled when the slave stops.
        self.tasks: list[asyncio.Future] = []
        self.conn: tornado.websocket.WebSocketClientConnection | None = None
        self.running: dict[int, tuple[asyncio.Task, asyncio.Event]] = {}
        self.unacked: dict[int, dict] = {}
        # The collected files of unacknowledged results: sent again with them.
        self.unacked_blobs: dict[int, list[bytes]] = {}
        # When each unacknowledged job ended (monotonic): a result sent late says how long ago.
        self._ended: dict[int, float] = {}
        # The bytes each unacknowledged result takes as sent: what a register may carry (REGISTER_RESULTS_BYTES).
        self._sizes: dict[int, int] = {}
        # A result's frame as checked (without ended_ago), kept until its first send: encoded once, not
        # twice (85 ms more for 16 MiB of output).  A later send (after a reconnect) encodes it again.
        self._frames: dict[int, bytes] = {}
        self.draining = False
        # Sent at each register: the master knows from it that a job we do not
        # list was never received by this process (so it never ran here).
        self.instance = uuid.uuid4().hex
        self._stopping = asyncio.Event()
        self._fatal: FatalSlaveError | None = None
        # Jobs the slave itself killed on its way out (not a user's cancel).
        self._stopped_jobs: set[int] = set()
        self._pending_output: dict[tuple[int, str], list[str]] = {}
        # Each running job's output so far, sent again after a register (job_output_so_far); the
        # same strings as its Capture's parts, so it costs references, not copies.
        self._so_far: dict[int, dict[str, list[str]]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Set when the master confirms our draining: no job_run can follow it.
        self._drain_seen = asyncio.Event()
        self.handlers = {
            "register_reply": self.on_register_reply,
            "job_run": self.on_job_run,
            "job_cancel": self.on_job_cancel,
            "result_ack": self.on_result_ack,
            "draining": self.on_draining,
            "session_end": self.on_session_end,
            "error": self.on_error,
        }
        # A runner that keeps Python sessions (slave/sessions.py) tells us when
        # one ends by itself, and we tell the master.
        runner.on_session_ended = lambda key, reason: self._send(
            P.make("session_ended", session=key[1], user=key[0], reason=reason))

    # -- connection ----------------------------------------------------------

    def _request(self) -> tornado.httpclient.HTTPRequest:
        return wsclient.request(self.ws_url, self.secret, self.cafile)

    async def run(self) -> None:
        """Stay connected until stopped; raises FatalSlaveError if refused for good."""
        try:
            await wsclient.stay_connected(
                self._request, self._serve, self._stopping, log=log, first=BACKOFF_FIRST, most=BACKOFF_MAX,
                ping_interval=self.ping_interval, ping_timeout=self.ping_interval,
                refused_401=lambda: f"the master at {self.ws_url} refused the slave secret (401): check "
                                    f"--secret or DISTEXEC_SLAVE_SECRET")
        except wsclient.Refused as exc:
            if exc.cause is None:
                raise FatalSlaveError(str(exc)) from None
            raise FatalSlaveError(
                f"cannot verify the master's TLS certificate at {self.ws_url} ({exc.cause.verify_message}): "
                f"give its certificate as the CA file (DISTEXEC_CAFILE or the connection file's "
                f"\"cafile\"); refusing to connect") from None
        if self._fatal is not None:
            raise self._fatal

    async def _serve(self, conn) -> None:
        self.conn = conn
        riding, after = self._riding()
        self._send(P.make(
            "register", protocol=P.PROTOCOL_VERSION, uid=self.uid, host=self.host,
            languages=self._languages(),
            slots=self.slots, running=sorted({*self.running, *after}),
            results=[self._result(j) for j in riding],
            draining=self.draining, detecting=self.detecting, sessions=self._session_names(),
            instance=self.instance, batch=True, **self._session_cap()))  # read_frames reads batch frames
        self._send_output_so_far()
        for job_id in after:
            asyncio.ensure_future(self._send_result(job_id, conn))
        try:
            await wsclient.read_frames(conn, self._dispatch, log=log,
                                       on_bad=lambda exc: self._send(P.make("error", error=exc.to_dict())))
        finally:
            self.conn = None
        if not self._stopping.is_set():
            log.warning("lost the master; reconnecting")

    def _riding(self) -> tuple[list[int], list[int]]:
        """The unacknowledged results that ride in a register, and the jobs whose results follow it: those
        are listed as still running, and their results (after their files' frames) sent at once, each in a
        frame of its own.  A result with files never rides (its files must come first); nor do results past
        REGISTER_RESULTS_BYTES in all."""
        riding, after, room = [], [], REGISTER_RESULTS_BYTES
        for job_id in self.unacked:
            size = self._sizes.get(job_id, 0)
            if job_id in self.unacked_blobs or size > room:
                after.append(job_id)
            else:
                riding.append(job_id)
                room -= size
        return riding, sorted(after)

    def _dispatch(self, msg: dict) -> None:
        handler = self.handlers.get(msg["type"])
        if handler is None:
            log.warning("unexpected %r from the master", msg["type"])
            return
        handler(msg)

    def _send(self, msg: dict) -> None:
        self._write(_utf8(P.encode(msg)))

    def _write(self, frame: bytes) -> None:
        if self.conn is None:
            return
        try:
            self.conn.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            self.conn = None

    # -- messages from the master --------------------------------------------

    def on_register_reply(self, msg: dict) -> None:
        if not msg["ok"]:
            err = msg.get("error") or {}
            self._fatal = FatalSlaveError(f"the master refused this slave: {err.get('message', 'no reason given')}")
            log.error("%s", self._fatal)
            self._stopping.set()
            if self.conn is not None:
                self.conn.close()
            return
        log.info("registered with %s as %s", self.ws_url, self.uid)
        if self.draining:
            # We registered as draining: this master will send us no job.
            self._drain_seen.set()
        if self.on_registered is not None:
            self.on_registered(self)

    def on_job_run(self, msg: dict) -> None:
        # The master sends the inputs as its store keeps them: an older history's may lack a field.
        job = {"source": "", "files": {}, "args": [], "stdin": None, **msg["job"]}
        job_id = job.get("id")
        if not isinstance(job_id, int) or job_id in self.running:
            return
        if job_id in self.unacked:
            # We finished it already; the master missed the result.
            asyncio.ensure_future(self._send_result(job_id, self.conn))
            return
        cancel = asyncio.Event()
        task = asyncio.ensure_future(self._run(job, cancel))
        self.running[job_id] = (task, cancel)
        self._idle.clear()

    def on_job_cancel(self, msg: dict) -> None:
        entry = self.running.get(msg["job_id"])
        if entry is not None:
            entry[1].set()

    def on_result_ack(self, msg: dict) -> None:
        self.unacked.pop(msg["job_id"], None)
        self._ended.pop(msg["job_id"], None)
        self._sizes.pop(msg["job_id"], None)
        self._frames.pop(msg["job_id"], None)
        self.unacked_blobs.pop(msg["job_id"], None)
        self._check_idle()

    def on_session_end(self, msg: dict) -> None:
        asyncio.ensure_future(self.runner.end_session(P.session_key(msg["user"], msg["session"]),
                                                      msg.get("reason") or "ended by the master"))

    def _languages(self) -> list[dict]:
        return [{"name": n, "version": v} for n, v in sorted(self.toolchains.items())]

    def languages_changed(self, detecting: bool) -> None:
        """``toolchains`` changed (a detection ended): tell the master, now or at the next register."""
        self.detecting = detecting
        self._send(P.make("languages", languages=self._languages(), detecting=detecting))

    def _session_names(self) -> list[dict]:
        return [{"user": user, "name": name} for user, name in self.runner.session_names()]

    def _session_cap(self) -> dict:
        cap = self.runner.max_sessions_per_user
        return {"max_sessions_per_user": cap} if cap is not None else {}

    def on_draining(self, msg: dict) -> None:
        self._drain_seen.set()

    def on_error(self, msg: dict) -> None:
        log.warning("the master says: %s", msg["error"].get("message"))

    # -- running ---------------------------------------------------------------

    async def _run(self, job: dict, cancel: asyncio.Event) -> None:
        job_id = job["id"]

        so_far = self._so_far[job_id] = {"stdout": [], "stderr": []}

        def on_output(stream: str, data: str) -> None:
            so_far[stream].append(data)
            self._pending_output.setdefault((job_id, stream), []).append(data)
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(OUTPUT_FLUSH, self._flush_output)

        try:
            outcome = await self.runner.run(job, on_output, cancel)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task itself is being cancelled: the slave is going down
            # A runner that let a CancelledError of its own escape: still a job that must end.
            log.exception("job %s: the runner was cancelled from within", job_id)
            outcome = Outcome(None, P.error(P.INTERNAL_ERROR, "the slave failed: the runner was cancelled"))
        except Exception as exc:  # a runner bug must not lose the job
            log.exception("job %s failed inside the slave", job_id)
            outcome = Outcome(None, P.error(P.INTERNAL_ERROR, f"the slave failed: {exc}"))
        if job_id in self._stopped_jobs and (outcome.error or {}).get("code") == P.CANCELLED_CODE:
            # No user cancelled it: the slave stopped before it ended.
            outcome.error = P.error(P.SLAVE_LOST, "the slave was stopped (its drain deadline passed) "
                                                  "before the job ended")
        self._flush_output()
        self._so_far.pop(job_id, None)
        result, frame, blobs = _checked(job_id, outcome)
        self._sizes[job_id] = len(frame) + ENDED_AGO_ROOM
        self._frames[job_id] = frame
        self.unacked[job_id] = result
        self._ended[job_id] = time.monotonic()
        if blobs:
            self.unacked_blobs[job_id] = blobs
        self.running.pop(job_id, None)
        await self._send_result(job_id, self.conn)
        self._check_idle()

    async def _send_result(self, job_id: int, conn) -> None:
        """Send a finished job's collected files (``job_artifact`` frames), then its ``job_finished``.

        All on ``conn``, in order; a connection that closes meanwhile stops
        it (the next register sends it all again).  Each frame is awaited, so
        64 MiB of files are never all buffered at once.
        """
        if job_id not in self.unacked_blobs:
            if conn is not None and conn is self.conn and job_id in self.unacked:
                self._write(self._result_frame(job_id))  # at once, as it always went: no file frames to pace
            self._frames.pop(job_id, None)
            return
        try:
            for index, blob in enumerate(self.unacked_blobs.get(job_id, ())):
                for offset in range(0, max(len(blob), 1), P.ARTIFACT_CHUNK):
                    data = base64.b64encode(blob[offset:offset + P.ARTIFACT_CHUNK]).decode("ascii")
                    if conn is None or conn is not self.conn:
                        return
                    await conn.write_message(P.encode(P.make("job_artifact", job_id=job_id, index=index,
                                                             offset=offset, data=data)))
            if conn is not None and conn is self.conn and job_id in self.unacked:
                await conn.write_message(self._result_frame(job_id))
        except (tornado.websocket.WebSocketClosedError, tornado.iostream.StreamClosedError):
            pass  # the next register sends it all again
        finally:
            self._frames.pop(job_id, None)

    def _result_frame(self, job_id: int) -> bytes:
        """``_result``'s frame, from the one checked at the job's end while it is kept."""
        frame = self._frames.get(job_id)
        if frame is None:
            return _utf8(P.encode(self._result(job_id)))
        return _with_ended_ago(frame, round(time.monotonic() - self._ended[job_id], 3))

    def _result(self, job_id: int) -> dict:
        """An unacknowledged job_finished, saying how long ago the job ended: one sent after a master
        restart or a reconnect then keeps its true end (``finished_at``), not when the master heard."""
        result = self.unacked[job_id]
        result["ended_ago"] = round(time.monotonic() - self._ended[job_id], 3)
        return result

    def _flush_output(self) -> None:
        self._flush_handle = None
        pending, self._pending_output = self._pending_output, {}
        for (job_id, stream), parts in pending.items():
            self._send(P.make("job_output", job_id=job_id, stream=stream, data="".join(parts)))

    def _send_output_so_far(self) -> None:
        """After a register: each running job's whole output, which the master puts in place of its own.

        Chunks sent into a connection that had died were lost, and a restarted master
        holds none: without this its live output would have a hole until the result.
        The chunks still pending are in it, so they are not sent too.
        """
        for job_id, streams in self._so_far.items():
            for stream in streams:
                self._pending_output.pop((job_id, stream), None)
            self._send(P.make("job_output_so_far", job_id=job_id, stdout="".join(streams["stdout"]),
                              stderr="".join(streams["stderr"])))

    def _check_idle(self) -> None:
        if not self.running and not self.unacked:
            self._idle.set()

    # -- stopping ----------------------------------------------------------------

    async def drain(self, deadline: float = 30.0) -> None:
        """Take no new jobs, let the running ones finish and their results be acknowledged.

        Idle is judged only after the master confirms the draining (an echo, or
        a register as draining after a reconnect): a job_run it sent just
        before is then already here, and runs to the end like the others.
        """
        if self.draining:
            return
        self.draining = True
        self._send(P.make("draining"))
        log.info("draining: %d job(s) running, %d result(s) unacknowledged", len(self.running), len(self.unacked))
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        try:
            # The echo matters only while connected: with no connection no
            # job_run is on its way, and a reconnect registers as draining.
            while not self._drain_seen.is_set() and self.conn is not None:
                try:
                    await asyncio.wait_for(self._drain_seen.wait(), min(0.5, max(0.0, end - loop.time())))
                except asyncio.TimeoutError:
                    if loop.time() >= end:
                        raise
            while self.running or self.unacked:
                self._idle.clear()
                await asyncio.wait_for(self._idle.wait(), max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            log.warning("drain deadline passed; cancelling %d job(s)", len(self.running))
            self._stopped_jobs.update(self.running)
            for _, cancel in self.running.values():
                cancel.set()
            await asyncio.gather(*(t for t, _ in self.running.values()), return_exceptions=True)
            try:  # their results (cancelled) still go to the master if it listens
                await asyncio.wait_for(self._idle.wait(), 2.0)
            except asyncio.TimeoutError:
                pass
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self.conn is not None:
            # "Going away": the master settles our jobs now instead of waiting for a reconnect.
            wsclient.close(self.conn, 1001, "slave stopping")


def _checked(job_id: int, outcome: Outcome) -> tuple[dict, bytes, list[bytes]]:
    """The job's ``job_finished``, its frame without ``ended_ago`` (``_frame``), and its files' bytes to
    send before it.

    Checked as the master will read it, by the protocol's own ``decode``: a result it refuses is never
    acknowledged, so the slave kept it and sent it again in every register, which was refused with it (past
    the frame limit, not strict JSON), at every reconnect, for good; one that broke the message table
    raised here, and its job stayed running for good.  Such a result is replaced by a failed one that says
    why (``internal_error``), with the job's output if that alone passes, and no files.
    """
    try:
        result = outcome.message(job_id)
        return result, _frame(result), outcome.blobs
    except (P.ProtocolError, TypeError, ValueError) as exc:  # not a message; not JSON
        why = str(exc)
    log.error("job %s: the master would refuse its result (%s); it is reported failed instead", job_id, why)
    failed = P.failed_result(job_id, "the slave could not report this job's result, which the master would "
                                      f"refuse: {why}")
    with_output = {**failed, "stdout": outcome.stdout, "stderr": outcome.stderr}
    try:
        return with_output, _frame(with_output), []
    except (P.ProtocolError, TypeError, ValueError):
        return failed, _frame(failed), []


# What ``_with_ended_ago`` adds to a frame, at most: ``,"ended_ago":`` and a float's repr.
ENDED_AGO_ROOM = len(b',"ended_ago":') + 24


def _with_ended_ago(frame: bytes, ago: float) -> bytes:
    """``frame`` (an encoded JSON object without ``ended_ago``) with it added, as ``_result`` adds it."""
    return b"".join((memoryview(frame)[:-1], b',"ended_ago":', json.dumps(ago).encode(), b"}"))  # one copy


def _frame(result: dict) -> bytes:
    """``result`` as sent, without ``ended_ago``; ProtocolError if the master's ``P.decode`` would refuse it.

    Checked with an ``ended_ago`` longer than any it will carry (``_result_frame`` adds it at each send).  Not
    parsed again unless in doubt (16 MiB of output take 50 ms to parse): the table (``validate``) and a
    walk for what ``loads`` refuses (``check_value``) tell most; ``decode`` has the last word on what they
    doubt (a lone surrogate, which goes as U+FFFD, passes) and refuses an oversized frame before parsing.
    """
    P.validate(result)
    data = _utf8(P.encode(result))
    try:
        P.check_value(result)
        doubt = len(data) + ENDED_AGO_ROOM > P.MAX_MESSAGE_BYTES
    except ValueError:
        doubt = True
    if doubt:
        P.decode(_with_ended_ago(data, 1e15))
    return data


_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8, a lone surrogate (a name or output from a job's world that was not
    UTF-8) as U+FFFD.  Else tornado's own encoding raises inside the sending task, the result
    is never sent, and the job stays running on the master, its slot taken, for good."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")
