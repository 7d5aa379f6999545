"""The master's two WebSocket channels: ``/ws/client`` (events, submit, cancel) and ``/ws/slave``.

Like the HTTP handlers, they stay thin: every frame is checked against the
protocol table, dispatched by a table of ``on_<type>`` methods, and handed to
``Master``; an unknown or malformed frame gets an error reply and the
connection lives on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, NamedTuple

import tornado.escape
import tornado.websocket

from distexec_kernel import liveness, protocol as P

from .auth import UNAUTHORIZED, Auth, bearer
from .core import Master
from .dropped import peek
from .ledger import SubmitLedger
from .limits import Gate
from .refusals import http_status

log = logging.getLogger("distexec.master.app")

# Seconds (the default of --ping-interval).  Tornado sends a ping every interval; a peer from which
# nothing at all (a message, a ping, a pong) has come for twice that is dropped (distexec_kernel/liveness.py).
PING_INTERVAL = 2.0
# Frames written to a peer and not yet taken by it: past this the peer is closed (it reconnects and
# reads again).  A client that never reads would otherwise grow the master's memory without bound.
# A user's channels share it: each event goes to each of them, and 63 channels that never read held
# 2 GiB of the master's memory for one ordinary user (an audit, 2026-12-03).
MAX_UNSENT_BYTES = 32 << 20
# A batch frame ends before it passes this many characters (a larger message goes alone):
# far under the receivers' MAX_MESSAGE_BYTES, and a long burst is parsed a piece at a time.
BATCH_CHARS = 256 << 10
# Frames of one peer handled in a row, at most, before the loop turns for the others.
INLINE_FRAMES = 64
# A client's frame, at most (bytes), as an HTTP body: the job_run it makes must fit the slave's MAX_MESSAGE_BYTES.
CLIENT_FRAME_BYTES = P.MAX_MESSAGE_BYTES // 2


# An error told to a peer, and logged, is cut at this length: a bad frame of 64 MiB is not
# written to the master's log again and again (two took it 17 MB in 0.4 s).
MAX_ERROR_CHARS = 1000

class Intake(NamedTuple):
    """A submission taken in on a client's channel, until it is answered."""
    request: dict
    ref: str | None
    again: bool  # sent again after a reconnect
    answer: asyncio.Future  # resolves to what its submit_reply carries
    echo: bool = True  # False: its sender keeps what it sent, the reply need not carry it back


def _refused(exc: P.ProtocolError) -> dict:
    return {"job": None, "error": {**exc.to_dict(), "status": http_status(exc)}}


class _Socket(tornado.websocket.WebSocketHandler):
    """Common part of both channels: JSON frames checked against the protocol table.

    Both channels turn Nagle's algorithm off (``set_nodelay``): their frames
    are small and each waits for an answer, and with Nagle on, a frame held
    back until the peer's delayed ACK costs up to 40 ms per hop (measured:
    a trivial job took 67 ms between dispatch and result instead of 13 ms).
    """

    handlers: dict[str, str] = {}
    max_frame = 0  # bytes a frame of this peer may take (0: the app's websocket_max_message_size alone)

    def initialize(self, master: Master, auth: Auth, gate: Gate) -> None:
        self.master = master
        self.auth = auth
        self.gate = gate
        self.closed = False
        # A peer that reads batch frames (it said so) gets the messages of one
        # loop turn in one frame: one write, one send syscall, one frame to
        # parse, instead of one each per message (see docs/performance.md).
        self.batches = False
        self._outbox: list[str] = []
        self._inline = 0  # frames handled in a row without the loop turning (on_message)
        self.hearing = liveness.Hearing()
        self._watching: asyncio.Future | None = None

    def hear(self) -> None:
        """Start judging whether the peer is still there (from ``open``)."""
        self._watching = asyncio.ensure_future(
            liveness.watch(self.hearing, self.ping_interval, 2 * self.ping_interval, self._silent))

    def _silent(self, seconds: float) -> None:
        log.warning("%s %s: nothing for %.1f s; closing", self.__class__.__name__, self.request.remote_ip, seconds)
        protocol = self.ws_connection
        self.close(reason="nothing heard")  # not 1001: that says a slave stops for good (on_close)
        liveness.drop(protocol)

    def on_ping(self, data: bytes) -> None:
        self.hearing.heard()

    def on_pong(self, data: bytes) -> None:
        self.hearing.heard()

    def check_origin(self, origin: str) -> bool:
        # Auth is by token, never by cookie, so cross-origin pages gain nothing.
        return True

    def send(self, msg: dict | str) -> None:
        if self.closed:
            return
        text = msg if isinstance(msg, str) else P.encode(msg)
        if not self._outbox:
            if not self.batches:
                self._write(text)
                return
            asyncio.get_running_loop().call_soon(self._flush_outbox)
        self._outbox.append(text)

    def _flush_outbox(self) -> None:
        """Write what ``send`` gathered, in order: one frame per batch of up to BATCH_CHARS."""
        texts, self._outbox = self._outbox, []
        if not self.batches:  # it registered again, without batches, since these were gathered
            for text in texts:
                self._write(text)
            return
        for frame in P.batch_frames(texts, BATCH_CHARS):
            self._write(frame)

    def _write(self, text: str) -> None:
        if self.closed:
            return
        try:
            # Retrieved, or each write unsent when the channel closes logs a traceback (71 for one client).
            self.write_message(text).add_done_callback(_retrieved)
        except tornado.websocket.WebSocketClosedError:
            self.closed = True
            return
        unsent = _unsent(self.ws_connection)
        if self.over_unsent(unsent):
            log.warning("%s %s: %.1f MiB written and not read, over its share of %d MiB; closing",
                        self.__class__.__name__, self.request.remote_ip, unsent / (1 << 20), MAX_UNSENT_BYTES >> 20)
            self.closed = True  # nothing more queued for it; the close frame waits behind the rest
            self.ws_connection.stream.close()

    def over_unsent(self, unsent: int) -> bool:
        """This channel, with ``unsent`` bytes written and not yet sent, holds too much."""
        return unsent > MAX_UNSENT_BYTES

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._flush_outbox()  # what was sent before the close goes first
        super().close(code, reason)

    def reply_error(self, code: str, message: str, about: str = "") -> None:
        """Answer the peer with an error; ``about``: what the log says of the frame, not the peer."""
        if len(message) > MAX_ERROR_CHARS:  # it may quote what the peer sent: a flood of the log
            message = message[:MAX_ERROR_CHARS] + "…"
        log.warning("%s %s: %s%s", self.__class__.__name__, self.request.remote_ip, about, message)
        self.send(P.make("error", error=P.error(code, message)))

    def unread(self, text: str | bytes) -> str:
        """What the log says of a frame that did not decode (it is dropped), before the reason."""
        return ""

    def on_message(self, text) -> Awaitable[None] | None:
        """Handle one frame.  A handler that completes at once (most do) runs here and returns None, so
        tornado reads the next frame in the same turn of the loop: a pipelined burst is taken in with
        no turn per frame.  One that must wait (a result's commit) returns its coroutine, which tornado
        awaits before reading on: that peer's later frames stay behind it.  So does a frame of a user past
        the read rate (``Gate.read_wait``), decoded only once its turn comes."""
        self.hearing.heard()
        wait = self._read_wait(len(text))
        if wait:
            return self._read_later(text, wait)
        return self._handle(text)

    def _read_wait(self, size: int) -> float:
        return 0.0  # a slave's frames: the master's own cluster

    async def _read_later(self, text: str, wait: float) -> None:
        while wait:
            await asyncio.sleep(wait)
            self.hearing.heard()  # we are the ones not reading: the peer is not silent
            wait = self._read_wait(len(text))
        waiting = self._handle(text)
        if waiting is not None:
            await waiting

    def _handle(self, text: str | bytes) -> Awaitable[None] | None:
        # Encoded to count its bytes only when its length leaves a doubt (4 bytes a character at most).
        if self.max_frame and len(text) > self.max_frame // 4 and len(tornado.escape.utf8(text)) > self.max_frame:
            return self.reply_error("too_large", f"a frame over {self.max_frame >> 20} MiB: submit by HTTP")
        try:
            msg = P.decode(text)
        except P.ProtocolError as exc:
            return self.reply_error(exc.code, exc.message, about=self.unread(text))
        name = self.handlers.get(msg["type"])
        if name is None:
            return self.reply_error("unexpected_type", f"{msg['type']!r} is not accepted on this channel")
        try:
            waiting = getattr(self, name)(msg)
        except Exception as exc:
            return self._failed(exc)
        if waiting is not None:
            return self._awaited(waiting)
        self._inline += 1
        if self._inline >= INLINE_FRAMES:
            # Let the loop turn: a peer that keeps sending must not keep the others waiting.
            self._inline = 0
            return asyncio.sleep(0)
        return None

    async def _awaited(self, waiting: Awaitable[None]) -> None:
        self._inline = 0
        try:
            await waiting
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, P.ProtocolError):
            return self.reply_error(exc.code, exc.message)
        # Never let one message take the connection down.
        log.error("%s message failed", self.__class__.__name__, exc_info=exc)
        self.reply_error("internal_error", "the master failed to handle this message")

    def on_close(self) -> None:
        self.closed = True
        if self._watching is not None:
            self._watching.cancel()


def _retrieved(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _unsent(conn) -> int:
    """Bytes written to the connection's stream and not yet sent (tornado keeps no public count)."""
    stream = getattr(conn, "stream", None)
    return getattr(stream, "_total_write_index", 0) - getattr(stream, "_total_write_done_index", 0)


class ClientSocket(_Socket):
    handlers = {"submit": "on_submit", "cancel": "on_cancel"}
    max_frame = CLIENT_FRAME_BYTES

    def initialize(self, master: Master, auth: Auth, gate: Gate, ledger: SubmitLedger) -> None:
        super().initialize(master, auth, gate)
        self.ledger = ledger  # one per application, shared by all its client channels

    def prepare(self):
        self._token = bearer(self)
        self.identity = self.auth.identify(self._token)
        if self.identity is None:
            raise tornado.web.HTTPError(401, reason="Unauthorized")
        # Admins are not capped: they run the cluster (benchmarks, drivers), as for the submission rate.
        full = None if self.identity.admin else self.master.clients.room_for(self.identity.user)
        if full:
            log.warning("client channel refused: %s", full)
            raise tornado.web.HTTPError(429, reason="Too Many Event Channels")
        self.user = self.identity.user
        self._answering: set[asyncio.Future] = set()
        self._intake: list[Intake] = []  # submissions taken in this turn, answered together (on_submit)

    def open(self) -> None:
        self.set_nodelay(True)  # see _Socket's note on small frames
        self.hear()
        self.batches = self.get_query_argument("batch", None) == "1"
        # The host is the address this connection comes from; what the client
        # says its host is (?host=) is a label only.
        host = self.request.remote_ip or "?"
        # A client is listed as the user its token or login names, the user its jobs carry:
        # one identity everywhere (a name the client gives itself would differ from its jobs').
        user = self.user
        wanted = self.get_query_argument("client_id", None)
        self.info = self.master.client_connected(self, user, host, wanted, owner=self.identity.owner,
                                                 account=self.identity.user,
                                                 label=self.get_query_argument("host", None))
        self._expiry = None
        self._recheck_later()
        if self.identity.expires_at is not None:
            # A login token's channel ends with the token; reconnecting then needs a new login.
            delay = max(0.0, self.identity.expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(
                delay, lambda: self.close(4001, "token expired"))

    def _read_wait(self, size: int) -> float:
        return self.gate.read_wait(self.identity, size)

    def over_unsent(self, unsent: int) -> bool:
        # A user's channels share one bound (each event goes to each; 63 that never read held 2 GiB).
        # One over its equal share is closed once they hold it together (a pass over the user's
        # channels, only then): a slow one beside channels that read may hold all of it.
        if self.identity.admin:  # not counted (prepare): each its own bound
            return unsent > MAX_UNSENT_BYTES
        clients = self.master.clients
        return (unsent > MAX_UNSENT_BYTES // max(1, clients.held_by(self.identity.user))
                and sum(_unsent(getattr(c.peer, "ws_connection", None))
                        for c in clients.of_account(self.identity.user)) > MAX_UNSENT_BYTES)

    def on_submit(self, msg: dict) -> None:
        """Take a submission in, to be answered with the others this turn of the loop brings (a client
        pipelines them): judged together, one commit.  Sent again after a reconnect, it gets the answer
        it had.  The answer to a submit is always a submit_reply with its ref, so the sender can match it."""
        ref = msg.get("ref")
        key = (self.identity.user, ref) if ref else None
        first = self.ledger.get(key) if key else None
        if first is not None:
            # Sent again after a reconnect: the same job, not a second one.
            self._track(asyncio.ensure_future(self._reply_again(first, ref)))
            return
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        if key:
            self.ledger.put(key, answer)
        if not self._intake:
            loop.call_soon(self._take_in)
        self._intake.append(Intake(msg["request"], ref, bool(msg.get("again")), answer, msg.get("echo", True)))

    def _take_in(self) -> None:
        items, self._intake = self._intake, []
        self._track(asyncio.ensure_future(self._answer(items)))

    def _track(self, task: asyncio.Future) -> None:
        self._answering.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._answering.discard)

    async def _answer(self, items: list[Intake]) -> None:
        """Submit and reply; each reply is sent in the turn its job is announced, so both share a frame."""
        try:
            bodies = await self._submit(items)
        except Exception:
            log.exception("submission failed")
            bodies = [{"job": None, "error": P.error("internal_error", "the master failed to handle this "
                                                     "submission", status=500)}] * len(items)
        for item, body in zip(items, bodies):
            told = body if body["job"] is None else {**body, "job": P.answer_of(body["job"], item.echo)}
            self.send(P.make("submit_reply", ref=item.ref, **told))
            item.answer.set_result(body)

    async def _submit(self, items: list[Intake]) -> list[dict]:
        """``{"job"}`` or ``{"error"}`` for each: what its submit_reply carries, as the HTTP path would answer."""
        # Checked again for each turn's submissions, as each HTTP request is: an expired
        # login or a user removed from the users file submits no more.
        identity = self.auth.identify(self._token)
        if identity is None:
            return [{"job": None, "error": P.error("unauthorized", UNAUTHORIZED, status=401)}] * len(items)
        bodies: list[dict | None] = [None] * len(items)
        fresh: list[int] = []
        for i, item in enumerate(items):
            if item.again and item.ref:
                # Sent again after a reconnect, with a ref the ledger does not know: this master may have
                # restarted after committing it, before its answer went out.  The job it made, not a second.
                made = await self.master.store.id_of_ref(self.user, item.ref)
                job = await self.master.get_job(made, user=self.identity.owner) if made is not None else None
                if job is not None:
                    bodies[i] = {"job": job}
                    continue
            try:
                self.gate.check_submit(identity)
            except P.ProtocolError as exc:
                bodies[i] = _refused(exc)
                continue
            fresh.append(i)
        made = await self.master.submit_each([(items[i].request, items[i].ref) for i in fresh],
                                             client_id=self.info.id, user=self.user)
        for i, result in zip(fresh, made):
            if isinstance(result, P.ProtocolError):
                self.gate.refund_submit(identity, 1)  # refused: nothing was queued
                bodies[i] = _refused(result)
            else:
                bodies[i] = {"job": result}
        return bodies

    async def _reply_again(self, first: asyncio.Future | dict, ref: str) -> None:
        body = dict(await asyncio.shield(first)) if isinstance(first, asyncio.Future) else first
        if body.get("job") is not None:
            body = {"job_id": body["job"]["id"]}
        if "job_id" in body:
            # What became of it while the client was away (it may have ended): the current record.
            job = await self.master.get_job(body["job_id"], user=self.identity.owner)
            body = {"job": job} if job is not None else {
                "job": None, "error": P.error("not_found", f"job {body['job_id']} is no longer in the history",
                                              status=404)}
        self.send(P.make("submit_reply", ref=ref, **body))

    async def on_cancel(self, msg: dict) -> None:
        identity = self.auth.identify(self._token)  # as now, not as when the channel opened
        if identity is None:
            job, err = None, P.error("unauthorized", UNAUTHORIZED, status=401)
        else:
            job = await self.master.cancel(msg["job_id"], user=identity.owner)
            err = None if job else P.error("not_found", f"no job {msg['job_id']}")
        if job is not None and job["status"] not in P.TERMINAL:
            # Answered with the end the cancel caused, once the slave has killed it, from a task:
            # the channel's later frames (submissions) are not held behind that kill.
            return self._track(asyncio.ensure_future(self._answer_cancel(job, msg.get("ref"))))
        self.send(P.make("cancel_reply", job=job, error=err, ref=msg.get("ref")))

    async def _answer_cancel(self, job: dict, ref: str | None) -> None:
        try:
            job = await self.master.ended(job)
        except Exception:
            log.exception("a cancelled job's end could not be read")  # answered as it was
        self.send(P.make("cancel_reply", job=job, ref=ref))

    def _recheck_later(self) -> None:
        self._rechecking = asyncio.get_running_loop().call_later(self.ping_interval, self._recheck)

    def _recheck(self) -> None:
        """The channel's identity, checked again: a user removed from the users file, or no longer an
        admin, must not go on hearing what it no longer may (every user's jobs, for a former admin).
        Closed, the client reconnects as what its token now stands for, if anything."""
        if self.closed:
            return
        identity = self.auth.identify(self._token)
        if identity is None or identity.admin != self.identity.admin:
            log.info("client %s: its login changed or ended; closing its channel", self.info.id)
            self.close(4001, "login changed")
            return
        self._recheck_later()

    def on_close(self) -> None:
        super().on_close()
        for timer in (getattr(self, "_expiry", None), getattr(self, "_rechecking", None)):
            if timer is not None:
                timer.cancel()
        self.master.client_disconnected(self.info.id)


class SlaveSocket(_Socket):
    handlers = {"register": "on_register", "job_output": "on_job_output", "job_output_so_far": "on_job_output_so_far",
                "job_finished": "on_job_finished", "job_artifact": "on_job_artifact", "draining": "on_draining",
                "session_ended": "on_session_ended", "languages": "on_languages"}

    def prepare(self):
        if not self.auth.slave_ok(bearer(self)):
            raise tornado.web.HTTPError(401, reason="Unauthorized")

    def open(self) -> None:
        self.set_nodelay(True)  # see _Socket's note on small frames
        self.hear()
        self.uid: str | None = None

    def on_pong(self, data: bytes) -> None:
        super().on_pong(data)
        if self.uid:
            self.master.slave_seen(self.uid)

    def on_register(self, msg: dict) -> None:
        if self.uid is not None and msg["uid"] != self.uid:
            # One connection, one slave: a second UID would leave the first registered with no one behind it.
            raise P.ProtocolError("already_registered", f"this connection is slave {self.uid}; "
                                  f"connect again to register as {msg['uid']}")
        self.batches = bool(msg.get("batch"))
        result = self.master.slave_registered(self, msg)
        if isinstance(result, dict):
            self.send(P.make("register_reply", ok=False, error=result))
            log.warning("refused slave %s: %s", msg["uid"], result["message"])
            self.close(4000, result["code"])
            return
        self.uid = msg["uid"]

    def unread(self, text: str | bytes) -> str:
        # A job_finished dropped here leaves its job running, its slot taken, until the backstop (jobs.py).
        return f"slave {self.uid or '(not registered)'}: {peek(text)} was dropped: "

    def _registered(self) -> str:
        if self.uid is None:
            raise P.ProtocolError("not_registered", "send register first")
        return self.uid

    def on_job_output(self, msg: dict) -> None:
        self.master.job_output(self._registered(), msg)

    def on_job_output_so_far(self, msg: dict) -> None:
        self.master.job_output_so_far(self._registered(), msg)

    def on_job_artifact(self, msg: dict) -> None:
        self.master.job_artifact(self._registered(), msg)

    async def on_job_finished(self, msg: dict) -> None:
        await self.master.job_finished(self._registered(), msg)

    def on_draining(self, msg: dict) -> None:
        self.master.slave_draining(self._registered())

    def on_session_ended(self, msg: dict) -> None:
        self.master.session_ended(self._registered(), msg)

    def on_languages(self, msg: dict) -> None:
        self.master.slave_languages(self._registered(), msg)

    def on_close(self) -> None:
        super().on_close()
        if self.uid:
            # 1001 "going away": the slave is stopping for good, no reconnect will come.
            self.master.slave_disconnected(self.uid, self, leaving=self.close_code == 1001)
