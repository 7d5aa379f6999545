"""``Job``: a handle on one job, kept current by its cluster's event channel.

A job submitted on the open WebSocket (``Cluster.submit``'s fast path) is
returned before the master has answered: it holds a future for that answer
(the "ack"), and everything that reads the job (``id``, ``status``,
``wait()``, ...) first waits for it, raising the master's refusal as the
HTTP path would (the same ``DistexecError`` code and status).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from . import files as F, protocol as P
from .errors import DistexecError, RemoteError

if TYPE_CHECKING:
    from .cluster import Cluster

# Backstop: a waiter re-reads its job this often even if no event came, so a
# lost event (reconnect, master restart) delays the answer, never loses it.
REFRESH_EVERY = 2.0


def sharing_inputs(record: dict, known: dict) -> dict:
    """``record`` holding ``known``'s inputs where it has none (answered without them: ``P.answer_of``), and
    ``known``'s own source and files where they are the same: a map's jobs share one program, not a decoded
    copy each (2 KB a job for a 2 KB program, 10 KB with a 10 KB one)."""
    for key in P.INPUT_FIELDS:
        if key not in record:  # as the master keeps an input not given: no files, no args, no stdin
            value = known.get(key)
            record[key] = value if value is not None else {"files": {}, "args": []}.get(key)
        elif key in ("source", "files") and key in known and record[key] == known[key]:
            record[key] = known[key]
    return record


def _progress(record: dict) -> int:
    """How far along a job's record is: queued, running, queued again for a retry, running again..., ended."""
    status = record.get("status", P.QUEUED)
    if status in P.TERMINAL:
        return 1 << 30
    return 2 * (record.get("attempts") or 0) - (status == P.RUNNING)


class Job:
    """A handle on one job, kept up to date by the cluster's event channel."""

    def __init__(self, cluster: "Cluster", record: dict | None, ack: concurrent.futures.Future | None = None,
                 ack_deadline: float | None = None, unsent: bool = False, sent: dict | None = None):
        """``ack``: the master's answer to a pipelined submission, still to come; ``record`` is None then.

        ``ack_deadline`` (``time.monotonic()``): when to give up waiting for
        it (the future is then failed, see ``Cluster._ack_expired``).
        ``unsent``: a job of a group kept in the client until the queue has
        room (``feeding.py``): ``record`` is its submission, read as queued
        with no id, at once; what needs the master waits until it is sent.
        ``sent``: the checked submission of a pipelined one, whose answer
        does not carry its inputs back.
        """
        self._cluster = cluster
        self._record = dict(record or {})
        self._ack = ack
        self._ack_deadline = ack_deadline
        self._lock = threading.RLock()
        self._waiting: threading.Condition | None = None  # made by the first waiter (see _cond)
        self._output_listeners: list[Callable[[str, str], None]] = []
        self._stale = False
        self._news = 0.0  # when the event channel last told us something of this job
        self._unsent = unsent
        self._sent = sent

    # -- record ----------------------------------------------------------------

    def __getattr__(self, name):
        record = self.__dict__.get("_record")
        if record is not None and name in P.JOB_FIELDS:
            if not self.__dict__.get("_unsent"):
                self._acked()
            return self._record.get(name)
        raise AttributeError(name)

    # -- the master's answer to a pipelined submission ---------------------------

    def _acked(self, timeout: float | None = None) -> None:
        """Wait for the master's answer to the submission, if it is still to come.

        Raises the master's refusal (``DistexecError``, as the HTTP path
        raises it), ``DistexecError(code=UNREACHABLE)`` if no answer came by
        the ack deadline, or ``TimeoutError`` if ``timeout`` passes first.
        """
        ack = self._ack
        if ack is None:
            return
        give_up = None if timeout is None else time.monotonic() + timeout
        while not ack.done():
            now = time.monotonic()
            waits = [t - now for t in (self._ack_deadline, give_up) if t is not None]
            try:
                ack.result(max(0.0, min(waits)) if waits else None)
            except concurrent.futures.TimeoutError:
                if give_up is not None and time.monotonic() >= give_up:
                    raise TimeoutError(f"the master has not answered this submission after {timeout} s") from None
                # Past the ack deadline: failed, unless the master is still answering (a long burst).
                self._cluster._ack_expired(self)
        ack.result()  # re-raises a refusal on every access, as a failed request would each time
        self._ack = None  # answered: from now on, no waiting

    @property
    def pending(self) -> bool:
        """True while the master has not yet answered the submission (pipelined ``submit``)."""
        ack = self._ack
        return ack is not None and not ack.done()

    def _acknowledge(self, record: dict) -> None:
        """The master accepted the submission: ``record`` is the job as it was queued (event thread)."""
        with self._lock:
            self._record = self._with_inputs(record)
            self._unsent = False
            self._notify()

    def _with_inputs(self, record: dict) -> dict:
        """``record`` (from the master) holding the inputs we have: ours, or those we sent (called locked)."""
        known, self._sent = self._record or self._sent or {}, None
        return sharing_inputs(dict(record), known)

    @property
    def record(self) -> dict:
        if not self._unsent:
            self._acked()
        with self._lock:
            return dict(self._record)

    @property
    def done(self) -> bool:
        if not self._unsent:
            self._acked()
        return self._record.get("status") in P.TERMINAL

    @property
    def icon(self) -> str:
        return P.ICONS.get(self.status, "?")

    @property
    def duration(self) -> float | None:
        start, end = P.parse_time(self.started_at), P.parse_time(self.finished_at)
        return (end - start).total_seconds() if start and end else None

    def __repr__(self) -> str:
        ack = self._ack
        if ack is not None and not ack.done():
            return "<Job (not sent yet: the queue is full)>" if self._unsent else "<Job (submitted, not yet answered)>"
        if ack is not None and ack.exception() is not None:
            return f"<Job refused: {ack.exception()}>"
        return f"<Job {self.id} {self.language} {self.icon} {self.status}>"

    @property
    def _cond(self) -> threading.Condition:
        """What a waiter of this job waits on, over its lock: made at the first wait, as most jobs
        of a large group are never waited on one by one (a ``Condition`` is about a kilobyte)."""
        if self._waiting is None:
            with self._lock:
                if self._waiting is None:
                    self._waiting = threading.Condition(self._lock)
        return self._waiting

    def _notify(self) -> None:
        """Wake this job's waiters, if any (with the lock held)."""
        if self._waiting is not None:
            self._waiting.notify_all()

    # -- updates (from the event thread) ---------------------------------------

    def _older(self, record: dict, asked_at: float | None = None) -> bool:
        """``record`` says less than we know.  A job ends once (the master never moves a terminal job),
        so nothing undoes its end.  And a read (a GET, a listing: ``asked_at``, when it was asked) that
        an event overtook cannot move the job back (running to queued, wiping its live output); the
        events come in order, so only a read can be late."""
        if self._record.get("status") in P.TERMINAL and record.get("status", P.QUEUED) not in P.TERMINAL:
            return True
        return asked_at is not None and self._news > asked_at and _progress(record) < _progress(self._record)

    def _apply_update(self, summary: dict, asked_at: float | None = None) -> None:
        """An event's summary, or (``asked_at`` given) a listing's record of this job."""
        with self._lock:
            if self._older(summary, asked_at):
                return
            if asked_at is None:
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
            self._notify()

    def _apply_output(self, stream: str, offset: int, data: str) -> None:
        with self._lock:
            self._news = time.monotonic()
            current = self._record.get(stream) or ""
            if offset > len(current):
                self._stale = True  # missed a chunk: re-read
            elif offset + len(data) > len(current):
                new = data[len(current) - offset:]
                self._record[stream] = current + new
                for listener in list(self._output_listeners):
                    listener(stream, new)
            self._notify()

    def _replace(self, record: dict, asked_at: float) -> None:
        """The job as a read asked at ``asked_at`` (``time.monotonic()``) found it."""
        with self._lock:
            if self._older(record, asked_at):
                return  # (still stale if it was: the next read is answered later)
            self._record = self._with_inputs(record)
            self._stale = False
            self._notify()

    # -- actions -----------------------------------------------------------------

    def refresh(self, timeout: float = 30.0) -> "Job":
        """Re-read the job from the master; ``timeout`` bounds the HTTP request."""
        self._acked()
        asked = time.monotonic()
        self._replace(self._cluster._call("GET", f"/api/jobs/{self.id}", timeout=timeout), asked)
        return self

    def cancel(self) -> "Job":
        self._acked()
        asked = time.monotonic()
        self._replace(self._cluster._post(f"/api/jobs/{self.id}/cancel"), asked)
        return self

    # -- files out ---------------------------------------------------------------

    @property
    def artifacts(self) -> list[dict]:
        """The files its ``collect`` kept: ``[{"name", "size", "sha256", "mime"}]`` (empty until it ends)."""
        self._acked()
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
        self._acked(timeout)
        sent = {"stdout": 0, "stderr": 0}
        attempt = self._record.get("attempts")
        last_refresh = time.monotonic()
        self._cluster._watch(self)
        try:
            while True:
                with self._lock:
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
                with self._lock:
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

    def cancel_and_wait(self, cancel_wait: float = 10.0) -> None:
        """What an interrupt does to a job: cancel it and wait up to ``cancel_wait`` s for its end,
        never raising (another interrupt included): the caller shows it as it stands."""
        try:
            self.cancel()
            self.wait(timeout=cancel_wait)
        except (DistexecError, TimeoutError, KeyboardInterrupt):
            pass  # the master still has the cancel request

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
            self.cancel_and_wait(cancel_wait)
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
