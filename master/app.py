"""The master's Tornado application: the HTTP API (the two WebSocket channels are in sockets.py).

Handlers stay thin: authenticate, parse, validate, call ``Master``, write.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re

import tornado.log
import tornado.web
import tornado.websocket

from distexec_kernel import __version__, protocol as P

from .auth import UNAUTHORIZED, Auth, Identity, bearer, redacted
from .core import Master
from .ledger import SubmitLedger
from .limits import Gate, RateLimited
from .refusals import http_status
from .sockets import PING_INTERVAL, ClientSocket, SlaveSocket

log = logging.getLogger("distexec.master.app")

MAX_BODY_BYTES = 32 << 20


class ApiHandler(tornado.web.RequestHandler):
    master: Master
    auth: Auth
    needs_auth = True

    def initialize(self, master: Master, auth: Auth, gate: Gate) -> None:
        self.master = master
        self.auth = auth
        self.gate = gate
        self.identity: Identity | None = None
        self.user: str | None = None

    @property
    def owner(self) -> str | None:
        """Whose jobs this request may see: None for an admin (all)."""
        return self.identity.owner if self.identity else None

    def authenticate(self) -> bool:
        """Set ``identity`` and ``user`` from the request's token; False if it is not valid."""
        self.identity = self.auth.identify(bearer(self))
        if self.identity is None:
            return False
        self.user = self.identity.user
        return True

    def prepare(self) -> None:
        self.set_header("Content-Type", "application/json")
        if self.needs_auth and not self.authenticate():
            return self.fail(401, "unauthorized", UNAUTHORIZED)

    def fail(self, status: int, code: str, message: str, **extra) -> None:
        self.set_status(status)
        self.finish({"error": P.error(code, message, **extra)})

    def write_error(self, status_code: int, **kwargs) -> None:
        reason = self._reason or "error"
        self.finish({"error": {"code": reason.lower().replace(" ", "_"), "message": reason}})

    def json_body(self):
        try:
            return P.loads(self.request.body or b"null")
        except ValueError as exc:
            raise P.ProtocolError("bad_json", f"the request body is not JSON: {exc}") from None

    def send_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(obj, ensure_ascii=False))

    def int_arg(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise P.ProtocolError("bad_request", f"{name} must be an integer") from None
        if not lo <= value <= hi:
            raise P.ProtocolError("bad_request", f"{name} must be between {lo} and {hi}")
        return value


def _protocol_errors(method):
    """Turn a ProtocolError raised by a handler into a 4xx JSON answer."""
    async def wrapper(self, *args):
        try:
            return await method(self, *args)
        except P.ProtocolError as exc:
            if isinstance(exc, RateLimited):
                self.set_header("Retry-After", str(max(1, math.ceil(exc.retry_after))))
            status = http_status(exc)
            extra = {k: v for k, v in exc.to_dict().items() if k not in ("code", "message")}
            self.fail(status, exc.code, exc.message, **extra)
    wrapper.__name__ = method.__name__
    return wrapper


class HealthHandler(ApiHandler):
    needs_auth = False

    def get(self) -> None:
        self.send_json({"status": "ok", "version": __version__})


TOO_LARGE = f"the request body is over {MAX_BODY_BYTES} bytes"


@tornado.web.stream_request_body
class JobsHandler(ApiHandler):
    """Streams the body in, so one over the limit gets a JSON 413, not a dropped connection."""

    def prepare(self) -> None:
        self.set_header("Content-Type", "application/json")
        self._chunks: list[bytes] = []
        self._size = 0
        # Here prepare runs before the body is read, and an answer given now
        # makes tornado close the connection: a 401 waits for the method, so
        # a client's keep-alive connection survives a bad token.
        if not self.authenticate() or self.request.method != "POST":
            return
        try:
            declared = int(self.request.headers.get("Content-Length", "0"))
        except ValueError:
            declared = 0
        if declared > MAX_BODY_BYTES:
            # Answered before the body is read; tornado then closes the connection, and says so.
            self.set_header("Connection", "close")
            return self.fail(413, "too_large", TOO_LARGE)
        # Headroom above the limit: tornado drops a chunked body past its own cap
        # with a bare 400, so ours must be the one that trips first.
        self.request.connection.set_max_body_size(2 * MAX_BODY_BYTES)

    def data_received(self, chunk: bytes) -> None:
        if self.identity is None:
            return  # keep nothing for a stranger (tornado's own cap bounds the reading)
        self._size += len(chunk)
        if self._size <= MAX_BODY_BYTES:
            self._chunks.append(chunk)
        elif not self._finished:
            # A chunked upload (no Content-Length) past the limit: answer now, drop the rest.
            self._chunks = []
            self.set_header("Connection", "close")
            self.fail(413, "too_large", TOO_LARGE)

    def _refused(self) -> bool:
        if self.identity is None and not self._finished:
            self.fail(401, "unauthorized", UNAUTHORIZED)
        return self._finished

    @_protocol_errors
    async def get(self) -> None:
        if self._refused():
            return
        status = self.get_query_argument("status", None) or None
        if status is not None and status not in P.STATES:
            raise P.ProtocolError("bad_request", f"status must be one of {', '.join(P.STATES)}")
        limit = self.int_arg("limit", 100, 1, 1000)
        offset = self.int_arg("offset", 0, 0, 1 << 40)
        group = self.get_query_argument("group", None) or None
        # ?user=NAME: an admin's view of one person's jobs (a teacher's of one student's).
        whose = self.get_query_argument("user", None) or self.owner
        if whose != self.owner and self.owner is not None:
            return self.fail(403, "forbidden", "only an admin may list another user's jobs")
        # summary: a history page for a table, with no sources or outputs (megabytes each).
        jobs, total = await self.master.list_jobs(status, limit, offset, user=whose, group=group,
                                                  summary=self.get_query_argument("summary", "") in ("1", "true"))
        self.send_json({"jobs": jobs, "total": total})

    @_protocol_errors
    async def post(self) -> None:
        if self._refused():
            return  # no valid token, or answered 413 while the body came in
        self.request.body = b"".join(self._chunks)
        self._chunks = []
        await self.gate.read_turn(self.identity, len(self.request.body))
        body = self.json_body()
        # A batch counts what it holds (one beyond P.MAX_BATCH: it is refused for its size anyway).
        cost = min(len(body), P.MAX_BATCH + 1) if isinstance(body, list) else 1
        self.gate.check_submit(self.identity, cost)
        # The header only links the job to a client of the same account, never another's.
        client_id = self.master.client_of(self.request.headers.get("X-Distexec-Client"), self.identity.user)
        # ?group=G: a batch joins the user's group G (a map too large for one batch, or for the queue's
        # cap, sent in parts: one group all the same).
        join = self.get_query_argument("group", None) or None
        # ?echo=0: the sender keeps what it sent; the jobs are answered without their inputs.
        echo = self.get_query_argument("echo", "1") not in ("0", "false")
        try:
            if join is not None and (not isinstance(body, list) or not GROUP_ID.fullmatch(join)):
                raise P.ProtocolError("bad_request", "group= joins a batch (a JSON list) to one of your groups "
                                                     "(an id such as g42)")
            if isinstance(body, list):
                # A batch: all of it or none of it, one group, one commit.
                jobs = await self.master.submit_batch(body, client_id=client_id, user=self.user, group=join,
                                                      part=self.int_arg("part", None, 0, P.INT_MAX) if join else None)
                return self.send_json({"jobs": [P.answer_of(job, echo) for job in jobs],
                                       "group": jobs[0]["group"] if jobs else None,
                                       **self.master.admission.room_of(self.user)}, 201)
            job = await self.master.submit(body, client_id=client_id, user=self.user)
        except P.ProtocolError:
            self.gate.refund_submit(self.identity, cost)  # refused whole: nothing of it was queued
            raise
        self.send_json(P.answer_of(job, echo), 201)


GROUP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _job_id(text: str) -> int | None:
    """The id in a URL, or None if no job can have it (past 64 bits: SQLite cannot even look).
    Its length first: int() of over 4,300 digits raises (Python's guard), which was a 500."""
    if len(text) > len(str(P.INT_MAX)):
        return None
    value = int(text)
    return value if value <= P.INT_MAX else None


class JobHandler(ApiHandler):
    async def get(self, job_id: str) -> None:
        jid = _job_id(job_id)
        job = await self.master.get_job(jid, user=self.owner) if jid is not None else None
        if job is None:
            return self.fail(404, "not_found", f"no job {job_id}")
        self.send_json(job)


# Served as they are, and the browser is told not to run them on the master's origin.
INLINE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp", "text/plain", "application/json",
                "text/csv"}


class ArtifactHandler(ApiHandler):
    """``GET /api/jobs/ID/artifacts/NAME``: a collected file's bytes, with its MIME type."""

    async def get(self, job_id: str, name: str) -> None:
        jid = _job_id(job_id)
        job = await self.master.get_job(jid, user=self.owner) if jid is not None else None
        if job is None:
            return self.fail(404, "not_found", f"no job {job_id}")
        index = next((i for i, a in enumerate(job.get("artifacts") or []) if a.get("name") == name), None)
        if index is None:
            return self.fail(404, "not_found", f"job {job_id} has no collected file {name!r}")
        meta = job["artifacts"][index]
        try:
            f = open(self.master.store.artifacts.path(jid, index), "rb")
        except OSError:
            return self.fail(404, "not_found", f"job {job_id}'s file {name!r} is no longer kept")
        with f:
            mime = meta.get("mime") or "application/octet-stream"
            self.set_header("Content-Type", mime)
            self.set_header("X-Content-Type-Options", "nosniff")
            # HTML or SVG a job wrote must not run as the master's own page.
            self.set_header("Content-Security-Policy", "sandbox")
            if mime not in INLINE_TYPES:
                self.set_header("Content-Disposition", "attachment")
            self.set_header("Content-Length", str(meta["size"]))
            while chunk := f.read(1 << 20):
                self.write(chunk)
                await self.flush()
        self.finish()


class CancelHandler(ApiHandler):
    async def post(self, job_id: str) -> None:
        jid = _job_id(job_id)
        job = await self.master.cancel(jid, user=self.owner) if jid is not None else None
        if job is None:
            return self.fail(404, "not_found", f"no job {job_id}")
        # Answered with the end the cancel caused, once the slave has killed it.
        self.send_json(job if job["status"] in P.TERMINAL else await self.master.ended(job))


class GroupCancelHandler(ApiHandler):
    async def post(self, group: str) -> None:
        cancelled = await self.master.cancel_group(group, user=self.owner)
        if cancelled is None:
            return self.fail(404, "not_found", f"no group {group}")
        self.send_json({"group": group, "cancelled": cancelled})


class LoginHandler(ApiHandler):
    """``POST /api/login {"user", "password"}`` -> a login token that expires."""

    needs_auth = False

    @_protocol_errors
    async def post(self) -> None:
        # Failed attempts only are counted (Gate.check_login): a class behind one address logging in at
        # nine o'clock is not refused, and a flood of guesses is cut off before hashing.
        address = self.request.remote_ip or "?"
        self.gate.check_login(address)  # refused at once: no wait for a turn
        try:
            body = self.json_body()
            if not (isinstance(body, dict) and isinstance(body.get("user"), str)
                    and isinstance(body.get("password"), str)):
                raise P.ProtocolError("bad_request", 'the body must be {"user": NAME, "password": PASSWORD}')
        except P.ProtocolError:
            self.gate.login_failed(address)
            raise
        user = body["user"]
        self.gate.check_login(address, user)
        if not self.auth.logins_enabled:
            return self.fail(401, "login_failed", "this master has no user logins (start it with --users FILE)")
        loop = asyncio.get_running_loop()
        async with self.gate.login_turns:
            self.gate.check_login(address, user)  # the failures made while it waited count
            # Argon2 takes tens of milliseconds on purpose: keep it off the event loop.
            session = await loop.run_in_executor(None, self.auth.login, user, body["password"])
            if session is None:
                self.gate.login_failed(address, user)  # within its turn: the next in line sees it
        if session is None:
            log.warning("failed login for %r from %s", user[:64], self.request.remote_ip)
            return self.fail(401, "login_failed", "wrong user name or password")
        self.send_json(session)


class SlavesHandler(ApiHandler):
    def get(self) -> None:
        self.send_json({"slaves": self.master.slave_list()})


class ClientsHandler(ApiHandler):
    def get(self) -> None:
        # A user sees their own clients; an admin sees all.
        self.send_json({"clients": self.master.client_list(self.owner)})


class PruneHandler(ApiHandler):
    """``POST /api/prune {"before"?: DATE}`` (admins): delete terminal jobs from the history.

    Without ``before``, applies the master's retention (--keep-days, --keep-mb) now.
    """

    @_protocol_errors
    async def post(self) -> None:
        if not self.identity.admin:
            raise P.ProtocolError("forbidden", "only an admin may prune the history")
        body = self.json_body()
        body = {} if body is None else body
        if not isinstance(body, dict) or not isinstance(body.get("before", ""), (str, type(None))):
            raise P.ProtocolError("bad_request", 'the body must be {} or {"before": DATE}')
        before = body.get("before")
        if before is not None:
            try:
                before = _valid_time(before)
            except ValueError:
                raise P.ProtocolError("bad_request", f"before must be an ISO date or time, not {before!r}") from None
        self.send_json({"pruned": await self.master.prune(before)})


def _valid_time(text: str) -> str:
    P.parse_time(text.strip())  # raises ValueError (empty text is None: refuse it too)
    if not text.strip():
        raise ValueError(text)
    return text


class LanguagesHandler(ApiHandler):
    def get(self) -> None:
        self.send_json({"languages": self.master.language_list()})


class SessionsHandler(ApiHandler):
    def get(self) -> None:
        self.send_json({"sessions": self.master.session_list(self.owner)})


class SessionHandler(ApiHandler):
    def delete(self, name: str) -> None:
        """End the caller's session NAME: its interpreter and variables go.  An admin ends another
        user's with ``?user=NAME`` (a runaway session would otherwise live until it idles out)."""
        user = self.get_query_argument("user", None) or self.user
        if user != self.user and self.owner is not None:
            return self.fail(403, "forbidden", "only an admin may end another user's session")
        ended = self.master.end_session(name, user)
        if ended is None:
            return self.fail(404, "not_found", f"no session {name!r}" + (f" of {user!r}" if user != self.user else ""))
        self.send_json(ended)


class NotFoundHandler(ApiHandler):
    needs_auth = False

    def prepare(self) -> None:
        self.fail(404, "not_found", f"no such endpoint: {self.request.method} {self.request.path}")


# --- WebSockets -------------------------------------------------------------

def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with a ``?token=`` (a WebSocket's) never written out."""
    status = handler.get_status()
    access = tornado.log.access_log
    write = access.info if status < 400 else access.warning if status < 500 else access.error
    req = handler.request
    write("%d %s %s (%s) %.2fms", status, req.method, redacted(req.uri or ""), req.remote_ip,
          1000.0 * req.request_time())


def make_app(master: Master, auth: Auth, gate: Gate | None = None,
             ping_interval: float = PING_INTERVAL) -> tornado.web.Application:
    args = {"master": master, "auth": auth, "gate": gate or Gate()}
    return tornado.web.Application(
        [
            (r"/api/health", HealthHandler, args),
            (r"/api/login", LoginHandler, args),
            (r"/api/jobs", JobsHandler, args),
            (r"/api/jobs/(\d+)", JobHandler, args),
            (r"/api/jobs/(\d+)/cancel", CancelHandler, args),
            (r"/api/jobs/(\d+)/artifacts/(.+)", ArtifactHandler, args),
            (r"/api/groups/(" + GROUP_ID.pattern + ")/cancel", GroupCancelHandler, args),
            (r"/api/slaves", SlavesHandler, args),
            (r"/api/clients", ClientsHandler, args),
            (r"/api/prune", PruneHandler, args),
            (r"/api/languages", LanguagesHandler, args),
            (r"/api/sessions", SessionsHandler, args),
            (r"/api/sessions/([^/]+)", SessionHandler, args),
            (r"/ws/client", ClientSocket, {**args, "ledger": SubmitLedger()}),
            (r"/ws/slave", SlaveSocket, args),
            (r".*", NotFoundHandler, args),
        ],
        log_function=_log_request,
        websocket_ping_interval=ping_interval,  # the sockets' liveness reads it too (self.ping_interval)
        websocket_ping_timeout=0,  # a late pong is no silence: the sockets judge (distexec_kernel/liveness.py)
        websocket_max_message_size=P.MAX_MESSAGE_BYTES,
        max_body_size=MAX_BODY_BYTES,
    )
