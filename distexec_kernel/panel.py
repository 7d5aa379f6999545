"""The ipywidgets job panel: history, detail, editor and cluster view, live.

``JobPanel(cluster)`` is a ``VBox``; ``%remote panel`` displays one.

How it stays live without freezing anything:

* Events arrive in the cluster's event thread.  ``_on_event`` only updates
  plain Python state under a lock and marks parts of the panel dirty; it
  never touches a widget.
* One flusher thread per panel applies the dirty parts to the widgets, by
  trait assignment inside ``hold_sync``, at most once per ``FLUSH_INTERVAL``.
  A burst of 500 job events therefore costs a handful of re-renders, and the
  browser gets one message per changed widget per flush.  Nothing here calls
  ``display()`` or ``with out:`` from a thread (ipywidgets #2358, #4020).
* Everything that talks to the master for a button (submit, cancel, rerun,
  loading a job's full record, loading older history) runs on one worker
  thread, so a click never blocks the kernel.  Failures land in the panel's
  message line, never as an exception in the kernel.

Tests and users drive the panel through its widgets, which are attributes:
``panel.editor.source``, ``panel.run_button``, ``panel.job_list``,
``panel.detail.cancel_button``… (see ``JobPanel.__init__``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import html
import logging
import shlex
import threading
import time

import ipywidgets as W

from . import display as D, protocol as P

log = logging.getLogger("distexec.panel")

PAGE_SIZE = 100
# History rows fetched per request: the first load, and "older" when paging past them.
LOAD_CHUNK = 200
# The most often the widgets are re-rendered; a burst of events within it coalesces.
FLUSH_INTERVAL = 0.1
# While a running job is on screen, its elapsed time is re-rendered this often.
TICK = 1.0
# The detail view shows the tail of a long output; the whole of it stays one
# `distexec show ID` away.  Re-sending megabytes per flush would stall the browser.
OUTPUT_TAIL = 64 * 1024

_PRE = "<pre style='margin:0;max-height:22em;overflow:auto;white-space:pre-wrap'>{}</pre>"
# Monospace rows line up; the widget HTML's 28 px line height would spread a table over a screen.
_STYLE = ("<style>.distexec-rows select{font-family:var(--jp-code-font-family,monospace);"
          "font-size:var(--jp-code-font-size,12px)}"
          ".distexec-code textarea{font-family:var(--jp-code-font-family,monospace)}"
          ".distexec-panel .widget-html-content{line-height:1.35}"
          ".distexec-panel table th,.distexec-panel table td{padding:1px 10px 1px 0;vertical-align:top}"
          "</style>")


# --- pure helpers (no widgets, no I/O) --------------------------------------

def row_label(job: dict) -> str:
    """One history row: ``✅     42  name  python  3f2a1b0c…  0.08 s``."""
    err = (job.get("error") or {}).get("code") or ""
    status = job.get("status")
    if status == P.RUNNING:
        # Whole seconds: the label changes once per tick, not on every flush.
        dur = f"{int(D.duration(job) or 0)} s…"
    else:
        dur = D.fmt_seconds(D.duration(job)) if status != P.QUEUED else "queued"
    return (f"{P.ICONS.get(job.get('status'), '?')} {job['id']:>6}  {(job.get('name') or '')[:24]:<24}  "
            f"{job.get('language') or '':<10}  {D.short_uid(job.get('slave_uid')):<9}  {dur:>8}  {err}").rstrip()


def matches(job: dict, status: str, text: str) -> bool:
    """The filter: ``status`` ('' for all) and ``text`` in the name, language or id."""
    if status and job.get("status") != status:
        return False
    if text:
        text = text.lower()
        hay = (f"{job.get('id')} {job.get('name') or ''} {job.get('language') or ''}").lower()
        return all(word in hay for word in text.split())
    return True


class Output:
    """One stream of a job's output, appended by offset as ``job_output`` events say.

    Chunks are kept in a list, so a long-running job's megabytes are not
    copied again for every chunk.
    """

    def __init__(self, text: str = ""):
        self._chunks = [text] if text else []
        self.length = len(text)

    def append(self, offset: int, data: str) -> bool:
        """Add the part of ``data`` not seen yet; False if a chunk before it was missed."""
        if offset > self.length:
            return False
        new = data[self.length - offset:]
        if new:
            self._chunks.append(new)
            self.length += len(new)
        return True

    def text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def tail(self, n: int) -> str:
        parts, size = [], 0
        for chunk in reversed(self._chunks):
            parts.append(chunk)
            size += len(chunk)
            if size >= n:
                break
        return "".join(reversed(parts))[-n:] if parts else ""


def _summary(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in P.SUMMARY_OMIT}


_RANK = {P.QUEUED: 0, P.RUNNING: 1}


def progress(job: dict) -> tuple[int, int]:
    """How far a job has got; an event older than a record read from the master has less.

    (A retry's requeue looks like a step back; the next dispatch's higher
    attempt count sorts after everything before it.)
    """
    return (job.get("attempts") or 0, _RANK.get(job.get("status"), 2))


def _esc(value) -> str:
    return html.escape("-" if value is None or value == "" else str(value))


def detail_html(job: dict) -> str:
    """The selected job's facts as a small HTML table."""
    err = job.get("error") or {}
    where = f" (line {err['line']})" if err.get("line") else ""
    name = job.get("name") or ""
    rows = [
        ("status", f"{P.ICONS.get(job.get('status'), '?')} {job.get('status')}"),
        ("job", f"{job['id']}" + (f" · {name}" if name != f"job {job['id']}" else "")),
        ("language", job.get("language")),
        ("exit code", job.get("exit_code")),
        ("slave", job.get("slave_uid")),
        ("error code", err.get("code")),
        ("client", " · ".join(str(x) for x in (job.get("client_id"), job.get("user")) if x)),
        ("duration", D.fmt_seconds(D.duration(job))),
        ("submitted", D.fmt_time(job.get("submitted_at"))),
        ("timeout", D.fmt_seconds(job.get("timeout"))),
        ("started", D.fmt_time(job.get("started_at"))),
        ("arguments", shlex.join(job["args"]) if job.get("args") else None),
        ("finished", D.fmt_time(job.get("finished_at"))),
    ]
    # Two facts a line keeps the detail short; the error message gets a line of its own.
    cells = [f"<th style='text-align:left'>{k}</th><td style='text-align:left'>{_esc(v)}</td>" for k, v in rows]
    body = "".join("<tr>" + "".join(cells[i:i + 2]) + "</tr>" for i in range(0, len(cells), 2))
    if err:
        body += (f"<tr><th style='text-align:left'>error</th><td colspan='3' style='text-align:left'>"
                 f"{_esc((err.get('message') or '') + where)}</td></tr>")
    return f"<table>{body}</table>"


# --- the views: widgets only, no logic ---------------------------------------

class JobsView:
    """The history list with its filters and pager."""

    def __init__(self):
        self.status_filter = W.Dropdown(options=[("all", "")] + [(s, s) for s in P.STATES], value="",
                                        description="status", layout=W.Layout(width="14em"))
        self.text_filter = W.Text(placeholder="name, language or id contains…", description="filter",
                                  continuous_update=True, layout=W.Layout(width="22em"))
        self.list = W.Select(options=[], rows=12, layout=W.Layout(width="100%"))
        self.list.add_class("distexec-rows")
        self.prev_button = W.Button(description="◀ newer", disabled=True, layout=W.Layout(width="8em"))
        self.next_button = W.Button(description="older ▶", disabled=True, layout=W.Layout(width="8em"))
        self.page_label = W.Label("no jobs")
        self.box = W.VBox([
            W.HBox([self.status_filter, self.text_filter]),
            self.list,
            W.HBox([self.prev_button, self.page_label, self.next_button]),
        ])


class DetailView:
    """The selected job: facts, program, output, and the actions on it."""

    def __init__(self):
        self.header = W.HTML("<i>select a job above</i>")
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True, button_style="danger")
        self.rerun_button = W.Button(description="Rerun", icon="repeat", disabled=True)
        self.edit_button = W.Button(description="Edit", icon="edit", disabled=True)
        self.source = W.HTML()
        self.stdout = W.HTML()
        self.stderr = W.HTML()
        self.box = W.VBox([
            self.header,
            W.HBox([self.cancel_button, self.rerun_button, self.edit_button]),
            W.HTML("<b>program</b>"), self.source,
            W.HTML("<b>stdout</b>"), self.stdout,
            W.HTML("<b>stderr</b>"), self.stderr,
        ])


class EditorView:
    """Write or load a program and run it."""

    def __init__(self):
        wide = W.Layout(width="100%")
        self.language = W.Dropdown(options=[], description="language")
        self.name = W.Text(placeholder="optional", description="name")
        self.source = W.Textarea(placeholder="the program", rows=14, layout=wide)
        self.source.add_class("distexec-code")
        self.files = W.FileUpload(multiple=True, description="extra files")
        self.carried_files = W.Label("")
        self.clear_files_button = W.Button(description="drop loaded files", disabled=True)
        self.args = W.Text(placeholder="arguments, split as a shell would", description="arguments",
                           layout=wide)
        self.stdin = W.Textarea(placeholder="standard input", description="stdin", rows=3, layout=wide)
        self.timeout = W.FloatText(value=0.0, description="timeout (s)",
                                   tooltip="0: the master's default")
        self.run_button = W.Button(description="Run", icon="play", button_style="success")
        self.box = W.VBox([
            W.HBox([self.language, self.name]),
            self.source,
            W.HBox([self.files, self.carried_files, self.clear_files_button]),
            self.args, self.stdin,
            W.HBox([self.timeout, self.run_button]),
        ])


class ClusterView:
    """Connected slaves and clients."""

    def __init__(self):
        self.slaves = W.HTML("<i>loading…</i>")
        self.clients = W.HTML("<i>loading…</i>")
        self.box = W.VBox([W.HTML("<b>slaves</b>"), self.slaves, W.HTML("<b>clients</b>"), self.clients])


# --- the panel ----------------------------------------------------------------

class JobPanel(W.VBox):
    """The live job panel for one ``Cluster``; display it in a notebook.

    Widgets a user (or a test) drives: ``job_list`` (a ``Select`` of
    ``(label, job id)``), ``status_filter``, ``text_filter``, ``prev_button``,
    ``next_button``, ``detail.*`` (``cancel_button``, ``rerun_button``,
    ``edit_button``, and ``header``/``source``/``stdout``/``stderr`` HTML),
    ``editor.*`` (``language``, ``source``, ``files``, ``args``, ``stdin``,
    ``timeout``, ``name``), ``run_button``, ``refresh_button``, ``cluster_view.*``,
    ``tabs`` and ``message`` (the last error or notice).

    ``renders`` counts, per part ("jobs", "detail", "cluster", …), how often
    the widgets were actually re-rendered: a burst of events must not make it
    grow with the number of events.
    """

    def __init__(self, cluster, *, page_size: int = PAGE_SIZE):
        self.cluster = cluster
        self.page_size = page_size
        self.renders: collections.Counter = collections.Counter()
        self.events = 0

        self.jobs_view = JobsView()
        self.detail = DetailView()
        self.editor = EditorView()
        self.cluster_view = ClusterView()
        self.job_list = self.jobs_view.list
        self.status_filter = self.jobs_view.status_filter
        self.text_filter = self.jobs_view.text_filter
        self.prev_button = self.jobs_view.prev_button
        self.next_button = self.jobs_view.next_button
        self.run_button = self.editor.run_button
        self.title = W.HTML()
        self.message = W.Label("")
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="8em"))
        self.tabs = W.Tab(children=[W.VBox([self.jobs_view.box, self.detail.box]), self.editor.box,
                                    self.cluster_view.box],
                          titles=("Jobs", "Editor", "Cluster"))
        super().__init__([W.HTML(_STYLE), W.HBox([self.title, self.refresh_button]), self.message, self.tabs])
        self.add_class("distexec-panel")

        # -- state, guarded by _lock; only the flusher turns it into widget traits --
        self._lock = threading.RLock()
        self._jobs: dict[int, dict] = {}      # summaries of the loaded part of the history
        self._oldest: int | None = None       # every job with id >= this is in _jobs
        self._complete = False                # _jobs holds the whole history
        self._total = 0                       # jobs in the history, as far as we know
        self._seq = 0                         # events seen; orders HTTP answers against events
        self._job_seq: dict[int, int] = {}    # job id -> seq of its last event
        self._selected: int | None = None
        self._detail: dict | None = None      # the selected job's record
        self._detail_full = False             # _detail came from the master, with output
        self._detail_out = {s: Output() for s in P.STREAMS}
        self._detail_log: list[dict] | None = None  # events for the selected job while it loads
        self._slaves: list[dict] = []
        self._clients: list[dict] = []
        self._languages: list[dict] = []
        self._connected = True
        self._filter = ("", "")
        self._page = 0
        self._loading_more = False
        self._loaded = False                  # the first _reload has answered
        self._carried_files: dict[str, str] = {}
        self._edit: dict | None = None        # a job loaded into the editor, to apply
        self._note = ""
        self._dirty: set[str] = set()

        self._tls = threading.local()
        self._render_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._last_flush = 0.0
        self._ticking = False                 # a running job is shown: re-render every TICK
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distexec-panel")

        guard = self._guarded
        self.job_list.observe(guard(self._on_list_select), "value")
        self.status_filter.observe(guard(self._on_filter), "value")
        self.text_filter.observe(guard(self._on_filter), "value")
        self.prev_button.on_click(guard(lambda _: self._turn_page(-1)))
        self.next_button.on_click(guard(lambda _: self._turn_page(+1)))
        self.refresh_button.on_click(guard(lambda _: self.refresh()))
        self.detail.cancel_button.on_click(guard(lambda _: self.cancel()))
        self.detail.rerun_button.on_click(guard(lambda _: self.rerun()))
        self.detail.edit_button.on_click(guard(lambda _: self.edit()))
        self.run_button.on_click(guard(lambda _: self.run()))
        self.editor.clear_files_button.on_click(guard(lambda _: self._set_carried_files({})))

        self._unsubscribe = cluster.subscribe(self._on_event)
        self._flusher = threading.Thread(target=self._flush_loop, name="distexec-panel-flush", daemon=True)
        self._flusher.start()
        self.refresh()

    # -- public actions -----------------------------------------------------------

    def refresh(self) -> concurrent.futures.Future:
        """Re-read the history's newest jobs, slaves, clients and languages (in the background).

        Events keep the panel current by themselves; this is for after a
        reconnect, or for a user who wants to be sure.  Returns a Future.
        """
        return self._task("refresh", self._reload)

    def select(self, job_id: int | None) -> concurrent.futures.Future | None:
        """Show job ``job_id`` in the detail view; its full record loads in the background."""
        with self._lock:
            self._selected = job_id
            self._detail = dict(self._jobs[job_id]) if job_id in self._jobs else None
            self._detail_full = False
            self._detail_out = {s: Output() for s in P.STREAMS}
            self._detail_log = []
            self._mark("detail", "jobs")
        if job_id is None:
            return None
        return self._task(f"load job {job_id}", self._load_detail, job_id)

    def run(self) -> concurrent.futures.Future | None:
        """Submit what the editor holds (the Run button)."""
        try:
            request = self._editor_request()
        except ValueError as exc:
            self._say(f"⚠ {exc}")
            return None
        return self._task("submit", self._submit, request)

    def cancel(self) -> concurrent.futures.Future | None:
        """Cancel the selected job (the Cancel button)."""
        job_id = self._selected
        if job_id is None:
            return None
        return self._task(f"cancel job {job_id}", self._cancel, job_id)

    def rerun(self) -> concurrent.futures.Future | None:
        """Submit the selected job again: same program, language, files, args, stdin, timeout."""
        job_id = self._selected
        if job_id is None:
            return None
        return self._task(f"rerun job {job_id}", self._rerun, job_id)

    def edit(self) -> concurrent.futures.Future | None:
        """Load the selected job into the editor and switch to it."""
        job_id = self._selected
        if job_id is None:
            return None
        return self._task(f"edit job {job_id}", self._load_into_editor, job_id)

    def flush(self) -> None:
        """Apply pending updates to the widgets now, in the calling thread."""
        self._flush()

    def close(self) -> None:
        """Stop listening to the cluster, stop the panel's threads and close its widgets."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        self._wake.set()
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)
        for widget in _descendants(self):
            widget.close()
        super().close()

    # -- events (cluster's event thread): state only, never widgets ---------------

    def _on_event(self, msg: dict) -> None:
        kind = msg["type"]
        with self._lock:
            self.events += 1
            self._seq += 1
            if kind == "job_update":
                self._apply_update(msg["job"])
            elif kind == "job_output":
                if msg["job_id"] == self._selected:
                    self._detail_event(msg)
            elif kind == "slaves_changed":
                old = {lang for s in self._slaves for lang in s["languages"]}
                self._slaves = msg["slaves"]
                if {lang for s in self._slaves for lang in s["languages"]} != old:
                    self._task("languages", self._load_languages)
                self._mark("cluster")
            elif kind == "clients_changed":
                self._clients = msg["clients"]
                self._mark("cluster")
            elif kind == "connection":
                was, self._connected = self._connected, msg["connected"]
                self._mark("title")
                if msg["connected"] and not was:
                    # Events were missed while away: read everything again.
                    self._note = "reconnected to the master; history re-read"
                    self._task("refresh", self._reload)

    def _apply_update(self, summary: dict) -> None:
        job_id = summary["id"]
        self._job_seq[job_id] = self._seq
        if job_id not in self._jobs:
            if not self._complete and self._oldest is not None and job_id < self._oldest:
                return  # outside the loaded window; read fresh when paged to
            self._total += 1
            self._jobs[job_id] = {}
        self._jobs[job_id].update(summary)
        self._mark("jobs")
        if job_id == self._selected:
            self._detail_event({"type": "job_update", "job": summary})

    def _detail_event(self, msg: dict, replay: bool = False) -> None:
        """An event about the selected job: apply it, or keep it until its record loads.

        ``replay``: the event was kept while the record loaded, so it may be
        older than the record; such an update is skipped (output chunks are
        placed by offset, so replaying one is harmless).
        """
        if self._detail_log is not None:
            self._detail_log.append(msg)
            if msg["type"] == "job_update" and self._detail is not None:
                self._detail.update(msg["job"])  # the facts show now; output after the load
                self._mark("detail")
            return
        if self._detail is None:
            return
        if msg["type"] == "job_update":
            summary = msg["job"]
            if replay and progress(summary) < progress(self._detail):
                return
            if summary.get("status") == P.QUEUED and self._detail.get("status") != P.QUEUED:
                self._detail_out = {s: Output() for s in P.STREAMS}  # requeued: output starts again
            self._detail.update(summary)
            if summary.get("status") in P.TERMINAL:
                # The summary carries no output: the record has it all, final.
                self._reload_detail()
        elif not self._detail_out[msg["stream"]].append(msg["offset"], msg["data"]):
            self._reload_detail()
        self._mark("detail")

    def _reload_detail(self) -> None:
        job_id = self._selected
        self._detail_log = []
        self._task(f"load job {job_id}", self._load_detail, job_id)

    # -- work against the master (the worker thread) ---------------------------

    def _task(self, what: str, fn, *args) -> concurrent.futures.Future:
        def run():
            try:
                return fn(*args)
            except Exception as exc:  # shown in the panel; a callback must not raise into the kernel
                log.debug("panel: %s failed", what, exc_info=True)
                self._say(f"⚠ {what}: {exc}")
                raise
        try:
            return self._worker.submit(run)
        except RuntimeError:  # closed
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(RuntimeError("the panel is closed"))
            return future

    def _reload(self) -> None:
        with self._lock:
            start = self._seq
        jobs, total = self.cluster.jobs_page(limit=LOAD_CHUNK, summary=True)
        slaves, clients, languages = self.cluster.slaves(), self.cluster.clients(), self.cluster.languages()
        with self._lock:
            fetched = {j["id"]: _summary(j) for j in jobs}
            newest = max(fetched, default=0)
            # Jobs with events since the request started are newer here than in the answer.
            kept = {i: j for i, j in self._jobs.items() if self._job_seq.get(i, -1) > start}
            fetched.update(kept)
            self._jobs = fetched
            self._total = total + sum(1 for i in kept if i > newest)
            self._complete = len(jobs) >= total
            self._oldest = min((j["id"] for j in jobs), default=None)
            self._slaves, self._clients, self._languages = slaves, clients, languages
            self._loaded = True
            self._mark("jobs", "cluster", "languages", "title")
            selected = self._selected
        if selected is not None:
            self._load_detail(selected)

    def _load_more(self) -> None:
        """Fetch the next older chunk of history, for paging past what is loaded."""
        try:
            with self._lock:
                offset = sum(1 for i in self._jobs if self._oldest is None or i >= self._oldest)
            while True:
                jobs, total = self.cluster.jobs_page(limit=LOAD_CHUNK, offset=offset, summary=True)
                with self._lock:
                    older = [j for j in jobs if j["id"] not in self._jobs]
                    for j in older:
                        self._jobs[j["id"]] = _summary(j)
                    if jobs:
                        self._oldest = min([j["id"] for j in jobs] + [self._oldest or jobs[0]["id"]])
                    if len(jobs) < LOAD_CHUNK or offset + len(jobs) >= total:
                        self._complete = True
                    self._mark("jobs")
                # A chunk with nothing new: events were missed, so the offset was low.
                if older or self._complete:
                    return
                offset += len(jobs)
        finally:
            self._loading_more = False

    def _load_languages(self) -> None:
        languages = self.cluster.languages()
        with self._lock:
            self._languages = languages
            self._mark("languages")

    def _load_detail(self, job_id: int) -> None:
        with self._lock:
            if self._selected != job_id:
                return
            if self._detail_log is None:
                self._detail_log = []
        record = self.cluster.job(job_id).record
        with self._lock:
            if self._selected != job_id:
                return
            self._adopt_record(record)

    def _adopt_record(self, record: dict) -> None:
        """Make ``record`` (full, from the master) the selected job's detail; replay newer events."""
        pending, self._detail_log = self._detail_log or [], None
        self._detail = dict(record)
        self._detail_full = True
        self._detail_out = {s: Output(record.get(s) or "") for s in P.STREAMS}
        for msg in pending:
            self._detail_event(msg, replay=True)
        if record["id"] in self._jobs and not pending:
            self._jobs[record["id"]].update(_summary(record))
            self._mark("jobs")
        self._mark("detail")

    def _submit(self, request: dict) -> dict:
        with self._lock:
            start = self._seq
        record = self.cluster.submit(**request).record
        self._show_new(record, start)
        err = record.get("error") or {}
        self._say(f"{P.ICONS[record['status']]} submitted job {record['id']}" +
                  (f": {err.get('code')}: {err.get('message')}" if err else ""))
        return record

    def _show_new(self, record: dict, start: int) -> None:
        """A job this panel submitted: in the list at once, selected, its output streaming."""
        job_id = record["id"]
        with self._lock:
            if job_id not in self._jobs:
                self._jobs[job_id] = _summary(record)
                self._total += 1
            self._selected = job_id
            self._detail_log = None
            if self._job_seq.get(job_id, -1) > start:
                # Events overtook the submit's answer: the record is already old.
                self._detail = dict(self._jobs[job_id])
                self._detail_full = False
                self._reload_detail()
            else:
                self._jobs[job_id] = _summary(record)
                self._adopt_record(record)
            if not matches(self._jobs[job_id], *self._filter):
                self._filter = ("", "")
                self._mark("filters")
            self._page = 0
            self._mark("jobs", "detail", "show_jobs")

    def _cancel(self, job_id: int) -> None:
        record = self.cluster.cancel(job_id).record
        if record["status"] in P.TERMINAL and record["status"] != P.CANCELLED:
            self._say(f"job {job_id} had already ended: {record['status']}")
        else:
            self._say(f"cancel of job {job_id} requested")

    def _full_record(self, job_id: int) -> dict:
        with self._lock:
            if self._selected == job_id and self._detail_full and self._detail is not None:
                return dict(self._detail)
        return self.cluster.job(job_id).record

    def _rerun(self, job_id: int) -> dict:
        rec = self._full_record(job_id)
        name = rec.get("name")
        request = {"source": rec["source"], "language": rec["language"], "files": rec.get("files") or None,
                   "args": rec.get("args") or None, "stdin": rec.get("stdin"), "timeout": rec.get("timeout"),
                   "name": None if name == f"job {job_id}" else name, "retries": rec.get("retries") or 0,
                   "session": rec.get("session")}
        return self._submit(request)

    def _load_into_editor(self, job_id: int) -> None:
        rec = self._full_record(job_id)
        with self._lock:
            self._edit = rec
            self._carried_files = dict(rec.get("files") or {})
            self._mark("editor")
        self._say(f"job {job_id} loaded into the editor")

    # -- the editor (the kernel thread: reads widgets the user filled) -------------

    def _editor_request(self) -> dict:
        ed = self.editor
        if not ed.language.value:
            raise ValueError("choose a language (no connected slave offers one yet?)")
        try:
            args = shlex.split(ed.args.value)
        except ValueError as exc:
            raise ValueError(f"arguments: {exc}") from None
        files = dict(self._carried_files)
        for upload in ed.files.value:
            try:
                files[upload["name"]] = bytes(upload["content"]).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"file {upload['name']!r} is not UTF-8 text") from None
        timeout = ed.timeout.value
        if timeout < 0:
            raise ValueError("timeout must be positive (0: the master's default)")
        return {"source": ed.source.value, "language": ed.language.value, "files": files or None,
                "args": args or None, "stdin": ed.stdin.value or None, "timeout": timeout or None,
                "name": ed.name.value.strip() or None}

    def _set_carried_files(self, files: dict) -> None:
        with self._lock:
            self._carried_files = dict(files)
            self._mark("files")

    # -- user input observers (the kernel thread) ---------------------------------

    def _on_list_select(self, change) -> None:
        if getattr(self._tls, "rendering", False) or change["new"] == self._selected:
            return
        self.select(change["new"])

    def _on_filter(self, change) -> None:
        if getattr(self._tls, "rendering", False):
            return
        with self._lock:
            self._filter = (self.status_filter.value or "", self.text_filter.value.strip())
            self._page = 0
            self._mark("jobs")

    def _turn_page(self, step: int) -> None:
        with self._lock:
            self._page = max(0, self._page + step)
            self._mark("jobs")

    def _guarded(self, fn):
        """Wrap a widget callback: an error shows in the panel, never raises into the kernel."""
        def call(arg):
            try:
                fn(arg)
            except Exception as exc:
                log.debug("panel callback failed", exc_info=True)
                self._say(f"⚠ {exc}")
        return call

    def _say(self, text: str) -> None:
        with self._lock:
            self._note = text
            self._mark("title")

    # -- rendering (the flusher thread) ----------------------------------------

    def _mark(self, *parts: str) -> None:
        self._dirty.update(parts)
        self._wake.set()

    def _flush_loop(self) -> None:
        while True:
            if not self._wake.wait(TICK if self._ticking else None):
                with self._lock:
                    self._mark("jobs", "detail")  # a running job's elapsed time moves on
            if self._closed:
                return
            # Let a burst gather: at most one flush per FLUSH_INTERVAL.
            delay = self._last_flush + FLUSH_INTERVAL - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._closed:
                return
            self._wake.clear()
            try:
                self._flush()
            except Exception:  # a rendering bug must not end live updates
                log.exception("panel: rendering failed")
            self._last_flush = time.monotonic()

    def _flush(self) -> None:
        with self._render_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
            if not dirty or self._closed:
                return
            self._tls.rendering = True
            try:
                if "filters" in dirty:
                    self._render_filters()
                if "editor" in dirty or "languages" in dirty:
                    self._render_languages()
                if "editor" in dirty:
                    self._render_editor()
                if "files" in dirty or "editor" in dirty:
                    self._render_files()
                if "jobs" in dirty:
                    self._render_jobs()
                if "detail" in dirty:
                    self._render_detail()
                if "cluster" in dirty:
                    self._render_cluster()
                if "title" in dirty or "cluster" in dirty or "jobs" in dirty:
                    self._render_title()
                if "show_jobs" in dirty:
                    self.tabs.selected_index = 0
                if "show_editor" in dirty:
                    self.tabs.selected_index = 1
            finally:
                self._tls.rendering = False

    def _render_jobs(self) -> None:
        with self._lock:
            rows = sorted((j for j in self._jobs.values() if "status" in j and matches(j, *self._filter)),
                          key=lambda j: -j["id"])
            pages = max(1, -(-len(rows) // self.page_size))
            if self._page >= pages and self._complete:
                self._page = pages - 1
            page = self._page
            first = page * self.page_size
            shown = rows[first:first + self.page_size]
            need_more = self._loaded and not self._complete and len(shown) < self.page_size
            if need_more and not self._loading_more:
                self._loading_more = True
                self._task("load older jobs", self._load_more)
            options = [(row_label(j), j["id"]) for j in shown]
            self._ticking = any(j["status"] == P.RUNNING for j in shown) or (
                self._detail is not None and self._detail.get("status") == P.RUNNING)
            selected, total, complete = self._selected, self._total, self._complete
            filtered = any(self._filter)
        if not rows:
            text = "loading…" if need_more or not self._loaded else ("no matching jobs" if filtered else "no jobs")
        else:
            text = f"{first + 1}–{first + len(shown)} of {len(rows)}"
            text += (" matching" if filtered else "") + ("" if complete else f" loaded, {total} in the history")
        lst = self.job_list
        with lst.hold_sync():
            if tuple(options) != tuple(lst.options):
                lst.options = options
                self.renders["jobs"] += 1
            want = selected if any(v == selected for _, v in options) else None
            if lst.value != want or (want is None and lst.index is not None):
                if want is None:
                    lst.index = None
                else:
                    lst.value = want
        self.jobs_view.page_label.value = text
        self.prev_button.disabled = page == 0
        self.next_button.disabled = complete and first + self.page_size >= len(rows)

    def _render_detail(self) -> None:
        with self._lock:
            job = dict(self._detail) if self._detail else None
            full = self._detail_full
            outs = {s: (o.tail(OUTPUT_TAIL), o.length) for s, o in self._detail_out.items()}
        d = self.detail
        self.renders["detail"] += 1
        if job is None:
            d.header.value = "<i>select a job above</i>"
            d.source.value = d.stdout.value = d.stderr.value = ""
            d.cancel_button.disabled = d.rerun_button.disabled = d.edit_button.disabled = True
            return
        d.header.value = detail_html(job)
        d.cancel_button.disabled = job.get("status") not in (P.QUEUED, P.RUNNING)
        d.rerun_button.disabled = d.edit_button.disabled = False
        if not full:
            d.source.value = "<i>loading…</i>"
            return
        d.source.value = _PRE.format(html.escape(job.get("source") or ""))
        for stream in P.STREAMS:
            text, length = outs[stream]
            note = f"… {length - len(text)} characters before these not shown\n" if length > len(text) else ""
            getattr(d, stream).value = _PRE.format(html.escape(note + text)) if length else "<i>(none)</i>"

    def _render_cluster(self) -> None:
        with self._lock:
            slaves, clients = list(self._slaves), list(self._clients)
        self.renders["cluster"] += 1
        self.cluster_view.slaves.value = D.slaves_html(slaves)
        self.cluster_view.clients.value = D.clients_html(clients)

    def _render_title(self) -> None:
        with self._lock:
            connected, note = self._connected, self._note
            n_slaves, n_clients, total = len(self._slaves), len(self._clients), self._total
        me = self.cluster.client_id or "-"
        state = "🟢 connected" if connected else "🔴 disconnected, reconnecting…"
        self.title.value = (f"<b>distexec</b> · {html.escape(self.cluster.url)} · client {html.escape(me)}"
                            f" · {state} · {total} jobs · {n_slaves} slaves · {n_clients} clients")
        self.message.value = note

    def _render_filters(self) -> None:
        status, text = self._filter
        self.status_filter.value = status
        self.text_filter.value = text

    def _render_languages(self) -> None:
        with self._lock:
            langs = list(self._languages)
            edit = self._edit
        dd = self.editor.language
        options = [(f"{lang['name']} {lang.get('version') or ''}".strip(), lang["name"]) for lang in langs]
        want = edit["language"] if edit else (dd.value or "python")
        if edit and not any(v == want for _, v in options):
            options.append((f"{want} (no slave runs it now)", want))
        if tuple(options) != tuple(dd.options):
            self.renders["languages"] += 1
            dd.options = options
        if any(v == want for _, v in options):
            dd.value = want
        elif options and dd.value is None:
            dd.value = options[0][1]

    def _render_editor(self) -> None:
        with self._lock:
            rec, self._edit = self._edit, None
        if rec is None:
            return
        ed = self.editor
        ed.source.value = rec.get("source") or ""
        ed.args.value = shlex.join(rec.get("args") or [])
        ed.stdin.value = rec.get("stdin") or ""
        ed.timeout.value = float(rec.get("timeout") or 0.0)
        name = rec.get("name") or ""
        ed.name.value = "" if name == f"job {rec['id']}" else name
        ed.files.value = ()
        self.tabs.selected_index = 1

    def _render_files(self) -> None:
        with self._lock:
            names = sorted(self._carried_files)
        self.editor.carried_files.value = f"loaded: {', '.join(names)}" if names else ""
        self.editor.clear_files_button.disabled = not names


def _descendants(widget):
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)
        yield child
