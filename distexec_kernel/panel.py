"""The ipywidgets job panel: a thin widget shell over ``PanelModel``.

``JobPanel(cluster)`` is a ``VBox``; ``%remote panel`` displays one.  The
state and every decision live in ``panel_model.PanelModel`` (tested
without widgets), the HTML in ``panel_html``; this module holds the
widgets and the two threads that keep them live without freezing anything:

* Events arrive in the cluster's event thread and go to the model, which
  only updates plain Python state and marks parts dirty; no widget is
  touched there.
* One flusher thread per panel applies the dirty parts to the widgets, by
  trait assignment inside ``hold_sync``, at most once per ``FLUSH_INTERVAL``.
  A burst of 500 job events therefore costs a handful of re-renders.
  Nothing here calls ``display()`` or ``with out:`` from a thread
  (ipywidgets #2358, #4020).
* Everything that talks to the master (the model's ``Task``s, and submit,
  cancel, rerun, edit) runs on one worker thread, so a click never blocks
  the kernel.  Failures land in the panel's message line, never as an
  exception in the kernel.

Tests and users drive the panel through its widgets, which are attributes:
``panel.editor.source``, ``panel.run_button``, ``panel.job_list``,
``panel.detail.cancel_button``… (see ``JobPanel``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import shlex
import threading
import time

import ipywidgets as W

from . import display as D, panel_html as H, protocol as P
from .panel_jobs import editor_request, editor_timeout, is_unnamed, rerun_request
from .panel_model import PAGE_SIZE, PanelModel, Task
from .panel_views import NOT_OFFERED, ClusterView, DetailView, EditorView, JobsView

log = logging.getLogger("distexec.panel")

# History rows fetched per request: the first load, and "older" when paging past them.
LOAD_CHUNK = 200
# The most often the widgets are re-rendered; a burst of events within it coalesces.
FLUSH_INTERVAL = 0.1


# --- the panel ----------------------------------------------------------------

class JobPanel(W.VBox):
    """The live job panel for one ``Cluster``; display it in a notebook.

    Widgets a user (or a test) drives: ``job_list`` (a ``Select`` of
    ``(label, job id)``), ``status_filter``, ``text_filter``, ``prev_button``,
    ``next_button``, ``detail.*`` (``cancel_button``, ``rerun_button``,
    ``edit_button``, and ``header``/``source``/``stdout``/``stderr`` HTML),
    ``editor.*`` (``language``, ``source``, ``files``, ``args``, ``stdin``,
    ``timeout``, ``name``), ``run_button``, ``refresh_button``, ``cluster_view.*``,
    ``tabs`` and ``message`` (the last error or notice).  ``model`` is the
    state behind them.

    ``renders`` counts, per part ("jobs", "detail", "cluster", …), how often
    the widgets were actually re-rendered: a burst of events must not make it
    grow with the number of events.
    """

    def __init__(self, cluster, *, page_size: int = PAGE_SIZE):
        self.cluster = cluster
        self.model = PanelModel(page_size)
        self.renders: collections.Counter = collections.Counter()

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
        super().__init__([W.HTML(H.STYLE), W.HBox([self.title, self.refresh_button]), self.message, self.tabs])
        self.add_class("distexec-panel")

        self._tls = threading.local()
        self._render_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._last_flush = 0.0
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distexec-panel")

        guard = self._guarded
        self.job_list.observe(guard(self._on_list_select), "value")
        self.status_filter.observe(guard(self._on_filter), "value")
        self.text_filter.observe(guard(self._on_filter), "value")
        self.prev_button.on_click(guard(lambda _: self._changed(self.model.turn_page(-1))))
        self.next_button.on_click(guard(lambda _: self._changed(self.model.turn_page(+1))))
        self.refresh_button.on_click(guard(lambda _: self.refresh()))
        self.detail.cancel_button.on_click(guard(lambda _: self.cancel()))
        self.detail.rerun_button.on_click(guard(lambda _: self.rerun()))
        self.detail.edit_button.on_click(guard(lambda _: self.edit()))
        self.run_button.on_click(guard(lambda _: self.run()))
        self.editor.clear_files_button.on_click(guard(lambda _: self._changed(self.model.set_carried_files({}))))

        self._unsubscribe = cluster.subscribe(self._on_event)
        self._flusher = threading.Thread(target=self._flush_loop, name="distexec-panel-flush", daemon=True)
        self._flusher.start()
        self.refresh()

    @property
    def page_size(self) -> int:
        """Rows a page of the history shows."""
        return self.model.page_size

    @property
    def events(self) -> int:
        """How many events the panel has taken in."""
        return self.model.events

    # -- public actions -----------------------------------------------------------

    def refresh(self) -> concurrent.futures.Future:
        """Re-read the history's newest jobs, slaves, clients and languages (in the background).

        Events keep the panel current by themselves; this is for after a
        reconnect, or for a user who wants to be sure.  Returns a Future.
        """
        return self._task("refresh", self._reload)

    def select(self, job_id: int | None) -> concurrent.futures.Future | None:
        """Show job ``job_id`` in the detail view; its full record loads in the background."""
        futures = self._run_tasks(self.model.select(job_id))
        return futures[0] if futures else None

    def run(self) -> concurrent.futures.Future | None:
        """Submit what the editor holds (the Run button)."""
        ed = self.editor
        try:
            request = editor_request(language=ed.language.value, source=ed.source.value, args=ed.args.value,
                                     uploads=ed.files.value, carried=self.model.carried_files,
                                     stdin=ed.stdin.value, timeout=ed.timeout.value, name=ed.name.value)
        except ValueError as exc:
            self._say(f"⚠ {exc}")
            return None
        return self._task("submit", self._submit, request)

    def cancel(self) -> concurrent.futures.Future | None:
        """Cancel the selected job, or every unfinished job of the selected group (the Cancel button)."""
        group = self.model.group
        if group is not None:
            return self._task(f"cancel group {group}", self._cancel_group, group)
        job_id = self.model.selected
        return None if job_id is None else self._task(f"cancel job {job_id}", self._cancel, job_id)

    def rerun(self) -> concurrent.futures.Future | None:
        """Submit the selected job again: same program, language, files, args, stdin, timeout."""
        job_id = self.model.selected
        return None if job_id is None else self._task(
            f"rerun job {job_id}", lambda: self._submit(rerun_request(self._full_record(job_id))))

    def edit(self) -> concurrent.futures.Future | None:
        """Load the selected job into the editor and switch to it."""
        job_id = self.model.selected
        return None if job_id is None else self._task(
            f"edit job {job_id}", lambda: self._changed(self.model.load_into_editor(self._full_record(job_id))))

    def flush(self) -> None:
        """Apply pending updates to the widgets now, in the calling thread."""
        self._flush()

    def _ipython_display_(self) -> None:
        """Displayed as a live view (``live.py``): what it lists stays true in a saved notebook, for
        nbconvert's widget state and, as text, for a reader without widgets."""
        from .live import LiveView

        LiveView(self, self._snapshot, catch_up=self.flush, finished=lambda: self._closed,
                 redraw_when_viewed=False).show()

    def _snapshot(self) -> dict:
        if not self.title.value:  # not rendered yet: its "no jobs" would be a guess
            return H.snapshot(f"<b>distexec</b> job panel · {H.esc(self.cluster.url)} · live in Jupyter "
                              f"(<code>%remote jobs</code> lists the history as text)", "", "", [])
        return H.snapshot(self.title.value, self.message.value, self.jobs_view.page_label.value,
                          [label for label, _ in self.job_list.options])

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

    # -- from the model to the master (the worker thread) ------------------------------

    def _on_event(self, msg: dict) -> None:
        self._run_tasks(self.model.on_event(msg))
        self._wake.set()

    def _run_tasks(self, tasks: list[Task]) -> list[concurrent.futures.Future]:
        self._wake.set()
        return [self._task(f"{t.kind.replace('_', ' ')}{'' if t.arg is None else f' {t.arg}'}",
                           getattr(self, f"_{t.kind}"), *(() if t.arg is None else (t.arg,)))
                for t in tasks]

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
        start = self.model.seq
        jobs, total = self.cluster.jobs_page(limit=LOAD_CHUNK, summary=True)
        slaves, clients, languages = self.cluster.slaves(), self.cluster.clients(), self.cluster.languages()
        self._run_tasks(self.model.reloaded(start, jobs, total, slaves, clients, languages))

    def _load_more(self) -> None:
        """Fetch older chunks of history until the page is full or the history ends."""
        try:
            offset = self.model.more_offset()
            while True:
                jobs, total = self.cluster.jobs_page(limit=LOAD_CHUNK, offset=offset, summary=True)
                if self.model.more_loaded(jobs, total, offset, LOAD_CHUNK):
                    return
                offset += len(jobs)
        finally:
            self.model.loading_more = False
            self._wake.set()

    def _load_languages(self) -> None:
        languages = self.cluster.languages()
        with self.model.lock:
            self.model.languages = languages
            self.model.mark("languages")
        self._wake.set()

    def _load_detail(self, job_id: int) -> None:
        if self.model.detail_wanted(job_id):
            job = self.cluster.job(job_id)
            self._run_tasks(self.model.detail_loaded(job.record))
            images = H.image_artifacts(job.artifacts)
            if images:
                # Collected images show in the detail; bounded in number and size (panel_html).
                self.model.images_loaded(job_id, {a["name"]: H.data_uri(a, job.artifact(a["name"])) for a in images})

    def _submit(self, request: dict) -> dict:
        start = self.model.seq
        record = self.cluster.submit(**request).record
        self._run_tasks(self.model.submitted(record, start))
        return record

    def _cancel(self, job_id: int) -> None:
        record = self.cluster.cancel(job_id).record
        if record["status"] in P.TERMINAL and record["status"] != P.CANCELLED:
            self._say(f"job {job_id} had already ended: {record['status']}")
        else:
            self.model.say(f"cancel of job {job_id} requested", about=job_id)
            self._wake.set()

    def _cancel_group(self, group: str) -> None:
        cancelled = self.cluster.cancel_group(group)
        self._say(f"group {group}: cancel of {D.plural(cancelled, 'job')} requested")

    def _full_record(self, job_id: int) -> dict:
        return self.model.full_record(job_id) or self.cluster.job(job_id).record

    # -- user input observers (the kernel thread) ---------------------------------

    def _on_list_select(self, change) -> None:
        if getattr(self._tls, "rendering", False) or change["new"] == self.model.selected:
            return
        self.select(change["new"])

    def _on_filter(self, change) -> None:
        if not getattr(self._tls, "rendering", False):
            self._changed(self.model.set_filter(self.status_filter.value or "", self.text_filter.value))

    def _changed(self, _=None) -> None:
        self._wake.set()

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
        self.model.say(text)
        self._wake.set()

    # -- rendering (the flusher thread) ----------------------------------------

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait(self.model.tick_wait())
            if self._closed:
                return
            # Let a burst gather: at most one flush per FLUSH_INTERVAL.
            delay = self._last_flush + FLUSH_INTERVAL - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._closed:
                return
            self._wake.clear()
            self.model.tick()  # due or not, whatever woke us: output must not starve the clock
            try:
                self._flush()
            except Exception:  # a rendering bug must not end live updates
                log.exception("panel: rendering failed")
            self._last_flush = time.monotonic()

    def _flush(self) -> None:
        with self._render_lock:
            dirty = self.model.take_dirty()
            if not dirty or self._closed:
                return
            self._tls.rendering = True
            try:
                if "filters" in dirty:
                    self.status_filter.value, self.text_filter.value = self.model.filter
                if "editor" in dirty or "languages" in dirty:
                    self._render_languages()
                if "editor" in dirty:
                    self._render_editor()
                if "files" in dirty:
                    self._render_files()
                if "jobs" in dirty:
                    self._render_jobs()
                if "detail" in dirty:
                    self._render_detail()
                if "cluster" in dirty:
                    self._render_cluster()
                if dirty & {"title", "cluster", "jobs"}:
                    self._render_title()
                if "show_jobs" in dirty:
                    self.tabs.selected_index = 0
                if "show_editor" in dirty:
                    self.tabs.selected_index = 1
            finally:
                self._tls.rendering = False

    def _render_jobs(self) -> None:
        page, tasks = self.model.page_view()
        self._run_tasks(tasks)
        lst = self.job_list
        with lst.hold_sync():
            if tuple(page.options) != tuple(lst.options):
                lst.options = page.options
                self.renders["jobs"] += 1
            if lst.value != page.selected or (page.selected is None and lst.index is not None):
                if page.selected is None:
                    lst.index = None
                else:
                    lst.value = page.selected
        self.jobs_view.page_label.value = page.label
        self.prev_button.disabled = page.prev_disabled
        self.next_button.disabled = page.next_disabled

    def _render_detail(self) -> None:
        m = self.model
        with m.lock:
            job = dict(m.detail) if m.detail else None
            full = m.detail_full
            outs = {s: (o.tail(H.OUTPUT_TAIL), o.length) for s, o in m.detail_out.items()}
            images = dict(m.images)
        group = m.group_summary()
        d = self.detail
        self.renders["detail"] += 1
        if group is not None:
            d.header.value = H.group_html(group)
            d.source.value = d.stdout.value = d.stderr.value = ""
            d.cancel_button.disabled = not group["unfinished"]
            d.cancel_button.button_style = "danger" if group["unfinished"] else ""
            d.rerun_button.disabled = d.edit_button.disabled = True
            return
        if job is None:
            d.header.value = H.EMPTY_DETAIL
            d.source.value = d.stdout.value = d.stderr.value = ""
            d.cancel_button.disabled = d.rerun_button.disabled = d.edit_button.disabled = True
            d.cancel_button.button_style = ""
            return
        d.header.value = H.detail_html(job) + H.artifacts_html(job.get("artifacts") or [], images)
        cancellable = job.get("status") in (P.QUEUED, P.RUNNING)
        d.cancel_button.disabled = not cancellable
        d.cancel_button.button_style = "danger" if cancellable else ""
        d.rerun_button.disabled = d.edit_button.disabled = False
        if not full:
            d.source.value = H.LOADING
            return
        d.source.value = H.pre(job.get("source") or "")
        for stream in P.STREAMS:
            getattr(d, stream).value = H.output_html(*outs[stream])

    def _render_cluster(self) -> None:
        with self.model.lock:
            slaves, clients = list(self.model.slaves), list(self.model.clients)
        self.renders["cluster"] += 1
        self.cluster_view.slaves.value, self.cluster_view.clients.value = H.cluster_html(slaves, clients)

    def _render_title(self) -> None:
        m = self.model
        with m.lock:
            connected, note, refused = m.connected, m.note, m.refused is not None
            n_slaves, n_clients, total = len(m.slaves), len(m.clients), m.total
        self.title.value = H.title_html(self.cluster.url, m.me(self.cluster.client_id), connected, total,
                                        n_slaves, n_clients, refused)
        self.message.value = note

    def _render_languages(self) -> None:
        with self.model.lock:
            langs = list(self.model.languages)
            edit = self.model.edit
        dd = self.editor.language
        options = [(f"{lang['name']} {lang.get('version') or ''}".strip(), lang["name"]) for lang in langs]
        # What the user chose (or a job loaded into the editor) stays chosen, marked if no slave runs it.
        want = edit["language"] if edit else (dd.value or "python")
        if (edit or dd.value) and not any(v == want for _, v in options):
            options.append((f"{want} {NOT_OFFERED}", want))
        if tuple(options) != tuple(dd.options):
            self.renders["languages"] += 1
            dd.options = options
        if any(v == want for _, v in options):
            dd.value = want
        elif options and dd.value is None:
            dd.value = options[0][1]

    def _render_editor(self) -> None:
        with self.model.lock:
            rec, self.model.edit = self.model.edit, None
        if rec is None:
            return
        ed = self.editor
        ed.source.value = rec.get("source") or ""
        ed.args.value = shlex.join(rec.get("args") or [])
        ed.stdin.value = rec.get("stdin") or ""
        ed.timeout.value = editor_timeout(rec)
        ed.name.value = "" if is_unnamed(rec) else rec["name"]
        ed.files.value = ()

    def _render_files(self) -> None:
        with self.model.lock:
            names = sorted(self.model.carried_files)
        self.editor.carried_files.value = f"loaded: {', '.join(names)}" if names else ""
        self.editor.clear_files_button.disabled = not names


def _descendants(widget):
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)
        yield child
