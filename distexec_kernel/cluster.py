"""The Python API: ``Cluster`` (``Job`` is in job.py, the errors in errors.py).

Requests go over HTTP (requests); live status and output arrive over the
``/ws/client`` event channel (``EventStream``), which also makes this
``Cluster`` count as one connected client while it is open.  Everything
here is blocking and thread-safe; the magic and the panel are thin shells
over it.

``submit`` is pipelined: while the event channel is open, the submission goes
out on it and a ``Job`` comes back at once; the master's answer (the job's
id, or a refusal) resolves it later (see job.py).  Submissions not answered
when the channel drops are sent again, under the same ``ref``, when it comes
back; the master answers a ref it has seen with the job it already made, so
a reconnect neither loses nor doubles a submission.  With no open channel,
``submit`` posts over HTTP as before.
"""
from __future__ import annotations

import concurrent.futures
import getpass
import itertools
import json
import secrets
import socket
import threading
import time
import urllib.parse
import weakref
from typing import Callable

import requests

from . import config, files as F, protocol as P, submission
from .errors import UNREACHABLE, DistexecError, RemoteError, tls_refusal, unreachable  # noqa: F401 (the API's names)
from .events import EventStream, weakly
from .feeding import feeders, submit_in_parts
from .group import JobGroup, item_args
from .job import Job, sharing_inputs

__all__ = ["Cluster", "Job", "JobGroup", "DistexecError", "RemoteError", "UNREACHABLE", "tls_refusal"]

# How long a pipelined submission may wait for the master's answer (as long
# as an HTTP submission waits), across reconnects; then it fails as
# unreachable, as a POST that timed out does.
ACK_TIMEOUT = 30.0
# Larger submissions go over HTTP: a frame past the master's limit would end
# the channel (and be resent on every reconnect); a POST gets a 413.
WS_SUBMIT_MAX_CHARS = P.MAX_MESSAGE_BYTES // 8  # characters: up to 4 bytes each in UTF-8

class Cluster:
    """A connection to one distexec master.  Counts as one client while open."""

    def __init__(self, url: str | None = None, token: str | None = None, *, user: str | None = None,
                 password: str | None = None, cafile: str | None = None,
                 events: bool = True, connect_timeout: float = 10.0):
        """``user`` + ``password`` log in (``POST /api/login``) instead of using a token.

        ``cafile``: the certificate(s) to verify an https master with (default:
        DISTEXEC_CAFILE or the connection file's, else the system's CAs).
        """
        endpoint = config.resolve(url, token)
        self.url = endpoint.url
        self.token = endpoint.token
        cafile = cafile or endpoint.cafile
        self.verify = cafile if cafile else True
        self._http = requests.Session()
        if self.token:
            self._http.headers["Authorization"] = f"Bearer {self.token}"
        self._watched: dict[int, "weakref.WeakSet[Job]"] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[dict], None]] = []
        self._events: EventStream | None = None
        # Pipelined submissions the master has not answered yet, by ref, oldest first.
        self._pending: dict[str, tuple[str, Job, concurrent.futures.Future]] = {}
        self._refs = itertools.count(1)
        self._last_reply = float("-inf")  # when the last submit_reply came (time.monotonic())
        self._ref_prefix = secrets.token_hex(8)  # refs are this client's own: the master keys them by user too
        self.user = user or getpass.getuser()
        self.login_info: dict | None = None
        self._cafile = cafile
        try:
            if password is not None:
                if not user:
                    raise DistexecError("a password needs a user name (user=...)")
                self.login(user, password)
            # Fail fast and clearly if the master is not there or the token is wrong.
            self._get("/api/health")
            try:
                self._get("/api/slaves")
            except DistexecError as exc:
                if exc.status == 401 and not self.token and endpoint.unsent:
                    raise DistexecError(f"{exc}; {endpoint.unsent}", exc.code, exc.status) from None
                raise
            if events:
                self._open_events(connect_timeout)
        except BaseException:
            self.close()  # no event thread or socket left behind by a refused connect
            raise

    def _open_events(self, connect_timeout: float) -> None:
        # Its thread holds this object weakly, and the channel closes when this object goes: a notebook
        # cell run again (c = Cluster(...)) left each earlier client's channel open, until the user's cap
        # of channels (--max-clients-per-user) refused the next one and only a kernel restart helped.
        self._events = EventStream(self.url, self.token, weakly(self._on_event), user=self.user,
                                   host=socket.gethostname(), cafile=self._cafile,
                                   on_connect=weakly(self._on_connect), on_refused=weakly(self._on_refused))
        self._closer = weakref.finalize(self, self._events.close)
        if not self._events.connected.wait(connect_timeout):
            raise DistexecError(f"no event channel from {self.url} within {connect_timeout} s")
        if self._events.refused:
            raise DistexecError(self._events.refused, status=self._events.refused_status or 401)
        self._http.headers["X-Distexec-Client"] = self._events.client_id

    @property
    def client_id(self) -> str | None:
        return self._events.client_id if self._events else None

    def login(self, user: str, password: str) -> dict:
        """Log in as ``user``; from now on requests carry the login token, which expires.

        Returns ``{"token", "expires_at", "user", "admin"}``.  Call it again
        when the token has expired (requests then fail with status 401).
        """
        config.warn_cleartext(self.url)
        self._http.headers.pop("Authorization", None)
        info = self._post("/api/login", {"user": user, "password": password})
        self.token = info["token"]
        self.user = info["user"]
        self.login_info = info
        self._http.headers["Authorization"] = f"Bearer {self.token}"
        if self._events is not None:
            # Used from its next (re)connection; a 401 for the old token then no longer ends it.
            self._events.token = self.token
            if self._events.refused:
                # It gave up when the old token expired: open it again with the new one.
                self._events.close()
                self._open_events(10.0)
        return info

    # -- HTTP ---------------------------------------------------------------------

    def _call(self, method: str, path: str, *, timeout: float = 30.0, **kwargs):
        try:
            resp = self._http.request(method, self.url + path, timeout=timeout, verify=self.verify, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise DistexecError(tls_refusal(self.url, exc)) from None
        except requests.exceptions.ConnectionError:
            raise DistexecError(unreachable(self.url), code=UNREACHABLE) from None
        except requests.exceptions.Timeout:
            raise DistexecError(f"the master at {self.url} did not answer in time", code=UNREACHABLE) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            err = (body or {}).get("error") if isinstance(body, dict) else None
            err = err or {"code": "http_error", "message": resp.reason}
            raise DistexecError(f"{err.get('message')} (HTTP {resp.status_code})", code=err.get("code"),
                                status=resp.status_code, details=err)
        return body

    def _download(self, path: str, timeout: float = 120.0) -> bytes:
        """The raw body of a GET (an artifact's bytes); errors as ``_call`` raises them."""
        try:
            resp = self._http.get(self.url + path, timeout=timeout, verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise DistexecError(tls_refusal(self.url, exc)) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise DistexecError(unreachable(self.url), code=UNREACHABLE) from None
        if resp.status_code >= 400:
            try:
                err = resp.json().get("error") or {}
            except (ValueError, AttributeError):
                err = {}
            raise DistexecError(f"{err.get('message') or resp.reason} (HTTP {resp.status_code})",
                                code=err.get("code") or "http_error", status=resp.status_code)
        return resp.content

    def _get(self, path: str, **params):
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def _post(self, path: str, body=None):
        return self._call("POST", path, json=body)

    # -- events -------------------------------------------------------------------

    def _on_event(self, msg: dict) -> None:
        if msg["type"] == "submit_reply":
            self._on_submit_reply(msg)
        elif msg["type"] == "job_update":
            for job in self._watchers(msg["job"].get("id")):
                job._apply_update(msg["job"])
        elif msg["type"] == "job_output":
            for job in self._watchers(msg["job_id"]):
                job._apply_output(msg["stream"], msg["offset"], msg["data"])
        for listener in list(self._listeners):
            listener(msg)

    def _on_connect(self, connected: bool) -> None:
        if connected:
            if self._events is not None and self._events.client_id:
                # A new id if the old one was still taken (our old connection not yet closed).
                self._http.headers["X-Distexec-Client"] = self._events.client_id
            # Submissions sent on the old connection and not answered: the master may or may
            # not have them.  Same refs again, in order, marked as sent again: it answers a
            # known ref with its job, also one it made just before it restarted.
            with self._lock:
                unanswered = [msg for msg, _, _ in self._pending.values()]
            events = self._events
            for msg in unanswered if events is not None else ():
                events.send(P.encode({**json.loads(msg), "again": True}))
            # Events may have been missed while away: have every waiter re-read.
            with self._lock:
                jobs = [j for s in self._watched.values() for j in s]
            for job in jobs:
                with job._lock:
                    job._stale = True
                    job._notify()
        for listener in list(self._listeners):
            listener({"type": "connection", "connected": connected})

    # -- pipelined submissions --------------------------------------------------

    def _submit_ws(self, body: dict, sent: dict) -> Job | None:
        """Send ``body`` (checked: ``sent``) on the event channel; the Job to answer later, or None if it's shut."""
        events = self._events
        if events is None or not events.connected.is_set() or events.in_event_thread():
            # (An event listener that submits could never read the answer its own thread brings.)
            return None
        ref = f"{self._ref_prefix}-{next(self._refs)}"
        msg = P.encode(P.make("submit", request=body, ref=ref, echo=False))
        if len(msg) > WS_SUBMIT_MAX_CHARS:
            return None  # over HTTP, where a body past the limit gets a clear 413, not a dropped channel
        ack = concurrent.futures.Future()
        job = Job(self, None, ack=ack, ack_deadline=time.monotonic() + ACK_TIMEOUT, sent=sent)
        with self._lock:
            self._pending[ref] = (msg, job, ack)
        if not events.send(msg):
            with self._lock:
                self._pending.pop(ref, None)
            return None
        return job

    def _on_submit_reply(self, msg: dict) -> None:
        """The master's answer to a pipelined submission (event thread, before the job's later events)."""
        self._last_reply = time.monotonic()
        with self._lock:
            entry = self._pending.pop(msg.get("ref") or "", None)
        if entry is None:
            return  # answered already (a resend's second answer) or given up on
        _, job, ack = entry
        if msg.get("job") is not None:
            job._acknowledge(msg["job"])
            _settle(ack, None)
            if msg["job"].get("status") not in P.TERMINAL:
                self._watch(job)  # before the next event is handled: none of its events is missed
        else:
            _settle(ack, _refusal(msg.get("error") or {}))

    def _ack_expired(self, job: Job) -> None:
        """No answer to ``job``'s submission by its deadline: fail it as an unreachable master.

        Unless answers are still coming (a burst of thousands, answered in
        order): then its deadline moves to ACK_TIMEOUT after the last answer.
        """
        with self._lock:
            if self._last_reply + ACK_TIMEOUT > time.monotonic() and self._events_connected():
                job._ack_deadline = self._last_reply + ACK_TIMEOUT
                return
            for ref, (_, pending, _) in list(self._pending.items()):
                if pending is job:
                    del self._pending[ref]
        _settle(job._ack, DistexecError(
            f"the master at {self.url} did not answer the submission within {ACK_TIMEOUT:g} s; "
            "it may or may not have been queued", code=UNREACHABLE))

    def _fail_pending(self, error: DistexecError) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for _, _, ack in pending:
            _settle(ack, error)

    def _on_refused(self, reason: str, status: int | None) -> None:
        """The event channel gave up for good (a 401, a certificate): unanswered submissions fail with it,
        and listeners (a panel) hear that it will not come back by itself."""
        self._fail_pending(DistexecError(f"{reason}; the submission was not confirmed", status=status))
        for listener in list(self._listeners):
            listener({"type": "connection", "connected": False, "refused": reason})

    def _watchers(self, job_id) -> list[Job]:
        with self._lock:
            return list(self._watched.get(job_id, ()))

    def _watch(self, job: Job) -> None:
        with self._lock:
            self._watched.setdefault(job.id, weakref.WeakSet()).add(job)

    def _unwatch(self, job: Job) -> None:
        with self._lock:
            s = self._watched.get(job.id)
            if s is not None:
                s.discard(job)
                if not s:
                    del self._watched[job.id]

    def _events_connected(self) -> bool:
        return self._events is not None and self._events.connected.is_set()

    def subscribe(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call ``listener(message)`` for every live event (from a background thread).

        Returns a function that unsubscribes.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- the API ------------------------------------------------------------------

    def submit(self, source: str, language: str = "python", files: dict | None = None,
               args: list | None = None, stdin: str | None = None, timeout: float | None = None,
               name: str | None = None, retries: int = 0, session: str | None = None,
               collect: list[str] | str | None = None) -> Job:
        """Submit one job.  ``files``: a dict (name -> text or bytes), a local file or folder path, or a
        list of paths; ``collect``: globs of files to keep from the job's directory once it ends."""
        body = _submission(source, language, files, args, stdin, timeout, name, retries, session, collect)
        sent = _check_locally(body)
        job = self._submit_ws(body, sent)
        if job is not None:
            return job  # the master's answer resolves it (job.id, job.wait() wait for it)
        job = Job(self, sharing_inputs(self._post("/api/jobs?echo=0", body), sent))
        # Watch from the start, so output that comes before the first wait() is kept.
        if not job.done:
            self._watch(job)
        return job

    def submit_many(self, submissions: list[dict]) -> JobGroup:
        """Submit a batch as one group: a ``JobGroup`` of the jobs, in the same order.

        Each item takes ``submit``'s keyword arguments (``source`` required). A bad item refuses
        the whole batch (``DistexecError`` naming its index). What the master does not take at once
        (past 10,000 in a request, or the user's room in the queue) is sent in parts as the user's
        jobs start (``feeding.py``); with no room at all the batch is refused, nothing queued."""
        if isinstance(submissions, (str, bytes, dict)):
            raise TypeError("submit_many takes a list of submissions (dicts of submit()'s arguments)")
        items = []
        for index, sub in enumerate(submissions):
            if not isinstance(sub, dict):
                raise TypeError(f"submission {index} is a {type(sub).__name__}, not a dict")
            try:
                items.append(_submission(**sub))
            except TypeError as exc:
                raise TypeError(f"submission {index}: {exc}") from None
        return submit_in_parts(self, items) if items else JobGroup(self, None, [])

    def map(self, source: str, inputs, language: str = "python", via: str = "args", **submit_kwargs) -> JobGroup:
        """One job of ``source`` per input, as a ``JobGroup`` in input order.

        ``via="args"``: a list or tuple input is the job's arguments, anything
        else one argument (``str(input)``); ``via="stdin"``: the input is the
        job's stdin.  Other keyword arguments are ``submit``'s, for every job.
        """
        if via not in ("args", "stdin"):
            raise ValueError("via must be 'args' or 'stdin'")
        try:
            items = list(inputs)
        except TypeError:
            raise TypeError(f"map needs an iterable of inputs, not {type(inputs).__name__}") from None
        if isinstance(inputs, (str, bytes)):
            raise TypeError("map needs an iterable of inputs, not a single string: wrap it in a list")
        return self.submit_many([dict(submit_kwargs, source=source, language=language,
                                      **({"args": item_args(item)} if via == "args" else {"stdin": str(item)}))
                                 for item in items])

    def cancel_group(self, group_id: str) -> int:
        """Cancel the group's jobs that have not ended; returns how many there were."""
        for feeder in [f for f in feeders(self) if f.group_id == group_id]:
            feeder.stop()  # first: no part of it lands after the master's cancel
        return self._post(f"/api/groups/{urllib.parse.quote(group_id, safe='')}/cancel")["cancelled"]

    def job(self, job_id: int) -> Job:
        job = Job(self, self._get(f"/api/jobs/{int(job_id)}"))
        if not job.done:
            self._watch(job)
        return job

    def jobs(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        """Up to ``limit`` jobs, newest first, from the ``offset``-th.  Read in as many pages as the
        master gives them in (a page holds fewer jobs when they are large)."""
        records: list[dict] = []
        while len(records) < limit:
            body = self._get("/api/jobs", status=status, limit=limit - len(records), offset=offset + len(records))
            records += body["jobs"]
            if not body["jobs"] or offset + len(records) >= body["total"]:
                break
        return [Job(self, j) for j in records]

    def jobs_page(self, status: str | None = None, limit: int = 100, offset: int = 0, summary: bool = False,
                  group: str | None = None, user: str | None = None) -> tuple[list[dict], int]:
        """One page of history as records, newest first, and the total count.

        ``summary=True`` leaves out source, files, stdin, stdout and stderr:
        what a table of jobs needs, at a fraction of the size.  ``group``:
        only that batch's jobs; ``user``: only that user's (for an admin).
        """
        body = self._get("/api/jobs", status=status, limit=limit, offset=offset,
                         summary="1" if summary else None, group=group, user=user)
        return body["jobs"], body["total"]

    def cancel(self, job_id: int) -> Job:
        return Job(self, self._post(f"/api/jobs/{int(job_id)}/cancel"))

    def slaves(self) -> list[dict]:
        return self._get("/api/slaves")["slaves"]

    def clients(self) -> list[dict]:
        return self._get("/api/clients")["clients"]

    def prune(self, before: str | None = None) -> int:
        """Delete finished jobs from the history (admins only); returns how many.

        ``before``: those submitted before this ISO date or time; None applies
        the master's retention (``--keep-days``, ``--keep-mb``) now.  Queued
        and running jobs are never deleted.
        """
        return self._post("/api/prune", {"before": before} if before else {})["pruned"]

    def languages(self) -> list[dict]:
        return self._get("/api/languages")["languages"]

    def sessions(self) -> list[dict]:
        """The live Python sessions (``submit(..., session=NAME)``): name, slave_uid, created_at, last_used, jobs."""
        return self._get("/api/sessions")["sessions"]

    def end_session(self, name: str, user: str | None = None) -> dict:
        """End session ``name``: its interpreter and variables go; the next job of that name starts afresh.
        ``user``: another user's session (for an admin)."""
        query = f"?user={urllib.parse.quote(user, safe='')}" if user else ""
        return self._call("DELETE", f"/api/sessions/{urllib.parse.quote(name, safe='')}{query}")

    def close(self, stop_sending: bool = False) -> None:
        """Close the channel; a map's parts not sent yet go first (a Ctrl-C, or ``stop_sending``:
        they are not sent, and end cancelled)."""
        for feeder in feeders(self):
            feeder.stop() if stop_sending else feeder.finish()
        if self._events is not None:
            self._closer.detach()
            self._events.close()
            self._events = None
        self._fail_pending(DistexecError("the client was closed before the master answered the submission"))
        self._http.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(stop_sending=kind is not None and not issubclass(kind, SystemExit))  # failed: not sent

    def __repr__(self) -> str:
        return f"<Cluster {self.url} client {self.client_id}>"


def _check_locally(body: dict) -> dict:
    """``body`` checked here, as the master checks it (its inputs as the master keeps them), a malformed one
    refused at once with the master's error.

    What only the master knows (its queue, the rate, sessions, the token)
    is refused in its answer, raised by the job's first use.
    """
    try:
        return submission.check(body)
    except P.ProtocolError as exc:
        status = 413 if exc.code == "too_large" else 400
        raise DistexecError(f"{exc.message} (HTTP {status})", code=exc.code, status=status) from None


def _refusal(err: dict) -> DistexecError:
    """A submit_reply's error as the HTTP path raises it: same code, status and message."""
    status = err.get("status") or 400
    return DistexecError(f"{err.get('message')} (HTTP {status})", code=err.get("code"), status=status, details=err)


def _settle(fut: concurrent.futures.Future, error: Exception | None) -> None:
    try:
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # settled already (expired, or the client closed meanwhile)


def _submission(source: str, language: str = "python", files: dict | None = None, args: list | None = None,
                stdin: str | None = None, timeout: float | None = None, name: str | None = None,
                retries: int = 0, session: str | None = None, collect: list[str] | str | None = None) -> dict:
    """One submission's body, as ``submit`` and ``submit_many`` send it (unset fields left out)."""
    if isinstance(collect, str):
        collect = [collect]
    body = {"source": source, "language": language, "files": F.as_files(files), "args": args, "stdin": stdin,
            "timeout": timeout, "name": name, "retries": retries, "session": session, "collect": collect}
    return {k: v for k, v in body.items() if v is not None}
