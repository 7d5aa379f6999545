"""The Python API: ``Cluster`` and ``Job``.

Requests go over HTTP (requests); live status and output arrive over the
``/ws/client`` event channel (``EventStream``), which also makes this
``Cluster`` count as one connected client while it is open.  Everything
here is blocking and thread-safe; the magic and the panel are thin shells
over it.
"""
from __future__ import annotations

import getpass
import re
import socket
import threading
import time
import weakref
from typing import Callable, Iterator

import requests

from . import config, files as F, protocol as P
from .events import EventStream
from .group import JobGroup, item_args

# Backstop: a waiter re-reads its job this often even if no event came, so a
# lost event (reconnect, master restart) delays the answer, never loses it.
REFRESH_EVERY = 2.0

# DistexecError.code when the master could not be reached (down, restarting):
# worth retrying, unlike a refusal.
UNREACHABLE = "unreachable"


class DistexecError(Exception):
    """A request the master refused, or a master that cannot be reached."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status

    @property
    def transient(self) -> bool:
        """The master is away or overloaded for now (restart, proxy error): try again later."""
        return self.code == UNREACHABLE or (self.status or 0) in (502, 503, 504)


class RemoteError(DistexecError):
    """A job that did not succeed; ``.job`` has its record."""

    def __init__(self, job: "Job"):
        err = job.error or {}
        super().__init__(f"job {job.id} {job.status}: [{err.get('code')}] {err.get('message')}",
                         code=err.get("code"))
        self.job = job


def tls_refusal(url: str, exc: Exception) -> str:
    """A short, useful message for a certificate this client could not verify."""
    found = re.search(r"certificate verify failed: ([^(\]']+)", str(exc))
    reason = found.group(1).strip() if found else str(exc)
    return (f"TLS verification failed for {url}: {reason}; refusing to talk to it. Give the master's "
            f"certificate as the CA file (cafile=..., DISTEXEC_CAFILE, or the connection file's \"cafile\")")


class Job:
    """A handle on one job, kept up to date by the cluster's event channel."""

    def __init__(self, cluster: "Cluster", record: dict):
        self._cluster = cluster
        self._record = dict(record)
        self._cond = threading.Condition()
        self._output_listeners: list[Callable[[str, str], None]] = []
        self._stale = False
        self._news = 0.0  # when the event channel last told us something of this job

    # -- record ----------------------------------------------------------------

    def __getattr__(self, name):
        record = self.__dict__.get("_record")
        if record is not None and name in P.JOB_FIELDS:
            return record.get(name)
        raise AttributeError(name)

    @property
    def record(self) -> dict:
        with self._cond:
            return dict(self._record)

    @property
    def done(self) -> bool:
        return self._record.get("status") in P.TERMINAL

    @property
    def icon(self) -> str:
        return P.ICONS.get(self.status, "?")

    @property
    def duration(self) -> float | None:
        start, end = P.parse_time(self.started_at), P.parse_time(self.finished_at)
        return (end - start).total_seconds() if start and end else None

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.language} {self.icon} {self.status}>"

    # -- updates (from the event thread) ---------------------------------------

    def _apply_update(self, summary: dict) -> None:
        with self._cond:
            self._news = time.monotonic()
            was_queued = self._record.get("status") == P.QUEUED
            before = {stream: self._record.get(stream) or "" for stream in P.STREAMS}
            self._record.update(summary)
            if summary.get("status") == P.QUEUED and not was_queued:
                # Requeued for a retry: its output starts again.
                self._record.update(stdout="", stderr="")
            if summary.get("status") in P.TERMINAL:
                # A small output comes whole with the final event (protocol.update_of);
                # a larger one is read once from the master.
                self._stale = not all(stream in summary for stream in P.STREAMS)
                for stream in P.STREAMS:
                    text = summary.get(stream)
                    if text is not None and text.startswith(before[stream]) and len(text) > len(before[stream]):
                        for listener in list(self._output_listeners):
                            listener(stream, text[len(before[stream]):])
            self._cond.notify_all()

    def _apply_output(self, stream: str, offset: int, data: str) -> None:
        with self._cond:
            self._news = time.monotonic()
            current = self._record.get(stream) or ""
            if offset > len(current):
                self._stale = True  # missed a chunk: re-read
            elif offset + len(data) > len(current):
                new = data[len(current) - offset:]
                self._record[stream] = current + new
                for listener in list(self._output_listeners):
                    listener(stream, new)
            self._cond.notify_all()

    def _replace(self, record: dict) -> None:
        with self._cond:
            self._record = dict(record)
            self._stale = False
            self._cond.notify_all()

    # -- actions -----------------------------------------------------------------

    def refresh(self, timeout: float = 30.0) -> "Job":
        """Re-read the job from the master; ``timeout`` bounds the HTTP request."""
        self._replace(self._cluster._call("GET", f"/api/jobs/{self.id}", timeout=timeout))
        return self

    def cancel(self) -> "Job":
        self._replace(self._cluster._post(f"/api/jobs/{self.id}/cancel"))
        return self

    # -- files out ---------------------------------------------------------------

    @property
    def artifacts(self) -> list[dict]:
        """The files its ``collect`` kept: ``[{"name", "size", "sha256", "mime"}]`` (empty until it ends)."""
        return [dict(a) for a in self._record.get("artifacts") or []]

    def artifact(self, name: str) -> bytes:
        """The bytes of the collected file ``name`` (a path such as ``out/a.txt``)."""
        from urllib.parse import quote
        return self._cluster._download(f"/api/jobs/{self.id}/artifacts/{quote(name, safe='/')}")

    def save_artifacts(self, directory: str = ".", names: list[str] | None = None) -> list[str]:
        """Write its collected files (or ``names``) under ``directory``, folders kept; the paths written."""
        return F.save_artifacts(self, directory, names)

    def wait(self, timeout: float | None = None, *, raise_on_error: bool = False) -> "Job":
        """Block until the job ends; returns the job.  ``TimeoutError`` if ``timeout`` passes."""
        for _ in self.iter_output(timeout=timeout):
            pass
        if raise_on_error and self.status != P.SUCCEEDED:
            raise RemoteError(self)
        return self

    def iter_output(self, timeout: float | None = None) -> Iterator[tuple[str, str]]:
        """Yield ``(stream, text)`` chunks as they arrive, in the calling thread, until the job ends.

        This is how the magic streams output into the right cell: the chunks
        arrive in the event thread, but are handed out here.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = {"stdout": 0, "stderr": 0}
        attempt = self._record.get("attempts")
        last_refresh = time.monotonic()
        self._cluster._watch(self)
        try:
            while True:
                with self._cond:
                    stale = self._stale
                # Re-read only when told to, or when the channel has been quiet a while:
                # while events flow, a long job's output is not downloaded again and again.
                if stale or time.monotonic() - max(last_refresh, self._news) > REFRESH_EVERY:
                    try:
                        # A master that hangs must not hold us past our own deadline.
                        left = 30.0 if deadline is None else deadline - time.monotonic()
                        self.refresh(timeout=min(30.0, max(1.0, left)))
                    except DistexecError as exc:
                        if not exc.transient:
                            raise
                        # The master is away (restarting): keep waiting for it until our
                        # own deadline; the event channel's reconnect wakes us early.
                    last_refresh = time.monotonic()
                with self._cond:
                    if self._record.get("attempts") != attempt:
                        # Run again (retry after a lost slave): its output starts over.
                        attempt = self._record.get("attempts")
                        sent = {"stdout": 0, "stderr": 0}
                    chunks = []
                    for stream in ("stdout", "stderr"):
                        text = self._record.get(stream) or ""
                        # Shorter than what was handed out, in the same attempt: a
                        # restarted master lost the live output; the result has it all.
                        if len(text) > sent[stream]:
                            chunks.append((stream, text[sent[stream]:]))
                            sent[stream] = len(text)
                    finished = self.done and not self._stale
                    if not chunks and not finished:
                        wait = REFRESH_EVERY
                        if deadline is not None:
                            wait = min(wait, deadline - time.monotonic())
                            if wait <= 0:
                                raise TimeoutError(f"job {self.id} still {self.status} after {timeout} s")
                        self._cond.wait(wait)
                yield from chunks
                if finished and not chunks:
                    return
        finally:
            self._cluster._unwatch(self)

    def follow(self, write: Callable[[str, str], None], cancel_wait: float = 10.0) -> bool:
        """Hand the output to ``write(stream, text)`` in this thread as it comes, until the job ends.

        What the magic and the kernels stream into a cell.  A KeyboardInterrupt
        (Ctrl-C, a kernel interrupt) cancels the job on the master, waits up to
        ``cancel_wait`` s for it to end, writes the output that had arrived but
        was not written yet, and returns True; a job that ended by itself
        returns False.
        """
        written = dict.fromkeys(P.STREAMS, 0)

        def emit(stream: str, text: str) -> None:
            write(stream, text)
            written[stream] += len(text)

        try:
            for stream, text in self.iter_output():
                emit(stream, text)
        except KeyboardInterrupt:
            try:
                self.cancel()
                self.wait(timeout=cancel_wait)
            except (DistexecError, TimeoutError, KeyboardInterrupt):
                pass  # shown as it stands; the master still has the cancel request
            record = self.record
            for stream in P.STREAMS:
                rest = (record.get(stream) or "")[written[stream]:]
                if rest:
                    emit(stream, rest)
            return True
        return False

    def on_output(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(stream, text)`` from the event thread for each new chunk."""
        self._output_listeners.append(listener)


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
            self._get("/api/slaves")
            if events:
                self._open_events(connect_timeout)
        except BaseException:
            self.close()  # no event thread or socket left behind by a refused connect
            raise

    def _open_events(self, connect_timeout: float) -> None:
        self._events = EventStream(self.url, self.token, self._on_event, user=self.user,
                                   host=socket.gethostname(), cafile=self._cafile,
                                   on_connect=self._on_connect)
        if not self._events.connected.wait(connect_timeout):
            raise DistexecError(f"no event channel from {self.url} within {connect_timeout} s")
        if self._events.refused:
            raise DistexecError(self._events.refused, status=401)
        self._http.headers["X-Distexec-Client"] = self._events.client_id

    @property
    def client_id(self) -> str | None:
        return self._events.client_id if self._events else None

    def login(self, user: str, password: str) -> dict:
        """Log in as ``user``; from now on requests carry the login token, which expires.

        Returns ``{"token", "expires_at", "user", "admin"}``.  Call it again
        when the token has expired (requests then fail with status 401).
        """
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
            raise DistexecError(f"cannot reach the distexec master at {self.url}", code=UNREACHABLE) from None
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
                                status=resp.status_code)
        return body

    def _download(self, path: str, timeout: float = 120.0) -> bytes:
        """The raw body of a GET (an artifact's bytes); errors as ``_call`` raises them."""
        try:
            resp = self._http.get(self.url + path, timeout=timeout, verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise DistexecError(tls_refusal(self.url, exc)) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise DistexecError(f"cannot reach the distexec master at {self.url}", code=UNREACHABLE) from None
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
        if msg["type"] == "job_update":
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
            # Events may have been missed while away: have every waiter re-read.
            with self._lock:
                jobs = [j for s in self._watched.values() for j in s]
            for job in jobs:
                with job._cond:
                    job._stale = True
                    job._cond.notify_all()
        for listener in list(self._listeners):
            listener({"type": "connection", "connected": connected})

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
        job = Job(self, self._post("/api/jobs", body))
        # Watch from the start, so output that comes before the first wait() is kept.
        if not job.done:
            self._watch(job)
        return job

    def submit_many(self, submissions: list[dict]) -> JobGroup:
        """Submit a batch in one request: a ``JobGroup`` of the jobs, in the same order.

        Each item takes ``submit``'s keyword arguments (``source`` required).
        All or nothing: a bad item refuses the whole batch (``DistexecError``
        naming its index), as does a batch past the queue's cap.
        """
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
        if not items:
            return JobGroup(self, None, [])
        body = self._post("/api/jobs", items)
        return JobGroup(self, body.get("group"), [Job(self, record) for record in body["jobs"]])

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
        subs = []
        for item in items:
            if via == "args":
                subs.append(dict(submit_kwargs, source=source, language=language, args=item_args(item)))
            else:
                subs.append(dict(submit_kwargs, source=source, language=language, stdin=str(item)))
        return self.submit_many(subs)

    def cancel_group(self, group_id: str) -> int:
        """Cancel the group's jobs that have not ended; returns how many there were."""
        from urllib.parse import quote
        return self._post(f"/api/groups/{quote(group_id, safe='')}/cancel")["cancelled"]

    def job(self, job_id: int) -> Job:
        job = Job(self, self._get(f"/api/jobs/{int(job_id)}"))
        if not job.done:
            self._watch(job)
        return job

    def jobs(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        body = self._get("/api/jobs", status=status, limit=limit, offset=offset)
        return [Job(self, j) for j in body["jobs"]]

    def jobs_page(self, status: str | None = None, limit: int = 100, offset: int = 0,
                  summary: bool = False, group: str | None = None) -> tuple[list[dict], int]:
        """One page of history as records, newest first, and the total count.

        ``summary=True`` leaves out source, files, stdin, stdout and stderr:
        what a table of jobs needs, at a fraction of the size.  ``group``:
        only that batch's jobs.
        """
        body = self._get("/api/jobs", status=status, limit=limit, offset=offset,
                         summary="1" if summary else None, group=group)
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

    def end_session(self, name: str) -> dict:
        """End session ``name``: its interpreter and variables go; the next job of that name starts afresh."""
        from urllib.parse import quote
        return self._call("DELETE", f"/api/sessions/{quote(name, safe='')}")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        self._http.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Cluster {self.url} client {self.client_id}>"


def _submission(source: str, language: str = "python", files: dict | None = None, args: list | None = None,
                stdin: str | None = None, timeout: float | None = None, name: str | None = None,
                retries: int = 0, session: str | None = None, collect: list[str] | str | None = None) -> dict:
    """One submission's body, as ``submit`` and ``submit_many`` send it (unset fields left out)."""
    if isinstance(collect, str):
        collect = [collect]
    body = {"source": source, "language": language, "files": F.as_files(files), "args": args, "stdin": stdin,
            "timeout": timeout, "name": name, "retries": retries, "session": session, "collect": collect}
    return {k: v for k, v in body.items() if v is not None}
