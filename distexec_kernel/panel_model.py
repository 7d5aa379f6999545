"""The job panel's state and decisions, with no widgets and no I/O.

Tests feed a ``PanelModel`` events and answers as the cluster would and
check what it decides: which rows a page shows, what the detail holds, and
which ``Task`` (a read from the master) it asks for.  The widget shell
(``panel.py``) calls it from three threads (the cluster's event thread, the
panel's worker thread, the kernel's thread; every method takes the model's
lock), carries out the tasks on its worker thread, and re-renders the parts
``take_dirty`` names.

Parts, as named in ``dirty``: ``jobs`` (the list and pager), ``detail``,
``cluster``, ``title`` (title and message line), ``languages``, ``editor``
(a job to load into it), ``files`` (files carried over by Edit),
``filters`` (the filter widgets to reset), ``show_jobs`` / ``show_editor``
(switch tabs).  A new kind of row (a fan-out group, say) adds its state
here, its part name, and one render method in the shell.
"""
from __future__ import annotations

import dataclasses
import threading
import time

from . import display as D, protocol as P
from .group import describe_counts
from .panel_jobs import Output, matches, progress, row_label

PAGE_SIZE = 100
# While a running job is on screen, its elapsed time is re-rendered this often.
TICK = 1.0


@dataclasses.dataclass(frozen=True)
class Task:
    """A read or write against the master the model wants done (on the worker thread).

    ``kind``: ``reload`` (history, slaves, clients, languages), ``load_more``
    (an older chunk of history), ``load_detail`` (``arg``: a job id),
    ``load_languages``.
    """
    kind: str
    arg: int | None = None


@dataclasses.dataclass
class Page:
    """What the history list shows now."""
    options: list[tuple[str, int]]
    selected: int | None
    label: str
    prev_disabled: bool
    next_disabled: bool


def _outputs(record: dict | None = None) -> dict[str, Output]:
    return {s: Output((record or {}).get(s) or "") for s in P.STREAMS}


# --- the model --------------------------------------------------------------------

class PanelModel:
    """Everything the panel shows, kept current from events and the master's answers."""

    def __init__(self, page_size: int = PAGE_SIZE, clock=time.monotonic):
        self.lock = threading.RLock()
        self.page_size = page_size
        self._clock = clock
        self.events = 0
        self.jobs: dict[int, dict] = {}       # summaries of the loaded part of the history
        self.oldest: int | None = None        # every job with id >= this is in jobs
        self.complete = False                 # jobs holds the whole history
        self.total = 0                        # jobs in the history, as far as we know
        self.seq = 0                          # events seen; orders HTTP answers against events
        self.job_seq: dict[int, int] = {}     # job id -> seq of its last event
        self.selected: int | None = None
        self.detail: dict | None = None       # the selected job's record
        self.detail_full = False              # detail came from the master, with output
        self.detail_out = _outputs()
        self.detail_log: list[dict] | None = None  # events for the selected job while it loads
        self.slaves: list[dict] = []
        self.clients: list[dict] = []
        self.languages: list[dict] = []
        self.connected = True
        self.refused: str | None = None  # why the master refused the event channel for good
        self.filter = ("", "")
        self.page = 0
        self.loading_more = False
        self.loaded = False                   # the first reload has answered
        self.carried_files: dict[str, str] = {}
        self.edit: dict | None = None         # a job to load into the editor
        self.note = ""
        self.note_job: int | None = None      # the note is about this job's progress
        self.dirty: set[str] = set()
        self.expanded: set[str] = set()       # fan-out groups whose jobs are listed under their row
        self.group: str | None = None         # the group shown in the detail (its row was clicked)
        self.images: dict[str, str] = {}      # the selected job's collected images, as data: URIs
        self.ticking = False                  # a running job is on screen
        self._next_tick: float | None = None

    def mark(self, *parts: str) -> None:
        with self.lock:
            self.dirty.update(parts)

    def take_dirty(self) -> set[str]:
        with self.lock:
            dirty, self.dirty = self.dirty, set()
            return dirty

    def say(self, text: str, about: int | None = None) -> None:
        """Show ``text`` in the message line.

        ``about``: a job the text is about (a cancel asked for); the line
        then follows that job's state until it ends, instead of going stale.
        """
        with self.lock:
            self.note, self.note_job = text, about
            self.mark("title")
            known = self.jobs.get(about) if about is not None else None
            if known and known.get("status") in P.TERMINAL:
                self._note_progress(known)  # its end came before this answer did

    # -- time -------------------------------------------------------------------------

    def tick_wait(self) -> float | None:
        """Seconds until a running job's elapsed time needs re-rendering; None if none is shown."""
        with self.lock:
            if not self.ticking:
                self._next_tick = None
                return None
            now = self._clock()
            if self._next_tick is None:
                self._next_tick = now + TICK
            return max(0.0, self._next_tick - now)

    def tick(self) -> None:
        """Mark the list and detail dirty if a tick is due, however many events woke the caller.

        The deadline is kept apart from the events: a job that prints more
        than once a second would otherwise keep postponing it.
        """
        with self.lock:
            now = self._clock()
            if self.ticking and self._next_tick is not None and now >= self._next_tick:
                self._next_tick = now + TICK
                self.mark("jobs", "detail")

    # -- events (the cluster's event thread) ---------------------------------------------

    def on_event(self, msg: dict) -> list[Task]:
        kind = msg["type"]
        with self.lock:
            self.events += 1
            self.seq += 1
            if kind == "job_update":
                return self._apply_update(msg["job"])
            if kind == "job_output":
                return self._detail_event(msg) if msg["job_id"] == self.selected else []
            if kind == "slaves_changed":
                old = {lang for s in self.slaves for lang in s["languages"]}
                self.slaves = msg["slaves"]
                self.mark("cluster", "title")
                new = {lang for s in self.slaves for lang in s["languages"]}
                return [Task("load_languages")] if new != old else []
            if kind == "clients_changed":
                self.clients = msg["clients"]
                self.mark("cluster", "title")
                return []
            if kind == "connection":
                was, self.connected = self.connected, msg["connected"]
                self.mark("title")
                if msg.get("refused"):
                    # Not a blip: "reconnecting…" would wait for ever.
                    self.refused = msg["refused"]
                    self.say(f"⚠ the master refused this panel's connection: {msg['refused']}; log in again "
                             f"(`distexec login` in a terminal, or %remote connect), then open a new panel")
                    return []
                if msg["connected"] and not was:
                    # Events were missed while away: read everything again.
                    self.say("reconnected to the master; history re-read")
                    return [Task("reload")]
            return []

    def _apply_update(self, summary: dict) -> list[Task]:
        job_id = summary["id"]
        self.job_seq[job_id] = self.seq
        if job_id == self.note_job:
            self._note_progress(summary)
        if job_id not in self.jobs:
            if not self.complete and self.oldest is not None and job_id < self.oldest:
                return []  # outside the loaded window; read fresh when paged to
            self.total += 1
            self.jobs[job_id] = {}
        self.jobs[job_id].update(summary)
        self.mark("jobs")
        if self.group is not None and summary.get("group") == self.group:
            self.mark("detail")  # the group's counts in the detail
        if job_id == self.selected:
            return self._detail_event({"type": "job_update", "job": summary})
        return []

    def _note_progress(self, job: dict, submitted: bool = False) -> None:
        """The message line follows the job this panel last submitted until it ends."""
        status = job.get("status")
        err = job.get("error") or {}
        text = f"{P.ICONS.get(status, '?')} {'submitted ' if submitted else ''}job {job['id']}: {status}"
        if err:  # the code only where it says more than the status ("cancelled: cancelled: ..." did not)
            text += (f": {err.get('code')}" if err.get("code") != status else "") + f": {D.error_text(err)}"
        self.note = text
        self.note_job = None if status in P.TERMINAL else job["id"]
        self.mark("title")

    def _detail_event(self, msg: dict, replay: bool = False) -> list[Task]:
        """An event about the selected job: apply it, or keep it until its record loads.

        ``replay``: the event was kept while the record loaded, so it may be
        older than the record; such an update is skipped (output chunks are
        placed by offset, so replaying one is harmless).
        """
        if self.detail_log is not None:
            self.detail_log.append(msg)
            if msg["type"] == "job_update" and self.detail is not None:
                self.detail.update(msg["job"])  # the facts show now; output after the load
                self.mark("detail")
            return []
        if self.detail is None:
            return []
        tasks: list[Task] = []
        if msg["type"] == "job_update":
            summary = msg["job"]
            if replay and progress(summary) < progress(self.detail):
                return []
            if summary.get("status") == P.QUEUED and self.detail.get("status") != P.QUEUED:
                self.detail_out = _outputs()  # requeued: output starts again
            self.detail.update(summary)
            if summary.get("status") in P.TERMINAL:
                # The summary carries no output: the record has it all, final.
                tasks = self._reload_detail()
        elif not self.detail_out[msg["stream"]].append(msg["offset"], msg["data"]):
            tasks = self._reload_detail()
        self.mark("detail")
        return tasks

    def _reload_detail(self) -> list[Task]:
        self.detail_log = []
        return [Task("load_detail", self.selected)]

    # -- user actions (the kernel's thread) -----------------------------------------

    def select(self, job_id: int | None) -> list[Task]:
        """Show job ``job_id`` in the detail; its full record is to be loaded.

        A negative value is a group's row (``group_value``): it opens or
        closes the group's jobs under it and shows the group in the detail.
        """
        with self.lock:
            if job_id is not None and job_id < 0:
                group = f"g{-job_id}"
                self.expanded.symmetric_difference_update({group})
                self.group, self.selected, self.detail, self.detail_log = group, None, None, None
                self.mark("detail", "jobs")
                return []
            self.group = None
            self.images = {}
            self.selected = job_id
            self.detail = dict(self.jobs[job_id]) if job_id in self.jobs else None
            self.detail_full = False
            self.detail_out = _outputs()
            self.detail_log = []
            self.mark("detail", "jobs")
            return [] if job_id is None else [Task("load_detail", job_id)]

    def set_filter(self, status: str, text: str) -> None:
        with self.lock:
            self.filter = (status or "", text.strip())
            self.page = 0
            self.mark("jobs")

    def turn_page(self, step: int) -> None:
        with self.lock:
            self.page = max(0, self.page + step)
            self.mark("jobs")

    def set_carried_files(self, files: dict) -> None:
        with self.lock:
            self.carried_files = dict(files)
            self.mark("files")

    # -- answers from the master (the worker thread) ----------------------------------

    def reloaded(self, start: int, jobs: list[dict], total: int, slaves: list[dict], clients: list[dict],
                 languages: list[dict]) -> list[Task]:
        """The answer of a reload that started when ``seq`` was ``start``."""
        with self.lock:
            fetched = {j["id"]: P.summary(j) for j in jobs}
            newest = max(fetched, default=0)
            # Jobs with events since the request started are newer here than in the answer.
            kept = {i: j for i, j in self.jobs.items() if self.job_seq.get(i, -1) > start}
            fetched.update(kept)
            self.jobs = fetched
            self.total = total + sum(1 for i in kept if i > newest)
            self.complete = len(jobs) >= total
            self.oldest = min((j["id"] for j in jobs), default=None)
            self.slaves, self.clients, self.languages = slaves, clients, languages
            self.loaded = True
            self.mark("jobs", "cluster", "languages", "title")
            return [] if self.selected is None else self._reload_detail()

    def more_offset(self) -> int:
        """Where the next older chunk of history starts."""
        with self.lock:
            return sum(1 for i in self.jobs if self.oldest is None or i >= self.oldest)

    def more_loaded(self, jobs: list[dict], total: int, offset: int, chunk: int) -> bool:
        """An older chunk arrived; True when no further chunk is needed now."""
        with self.lock:
            older = [j for j in jobs if j["id"] not in self.jobs]
            for j in older:
                self.jobs[j["id"]] = P.summary(j)
            if jobs:
                self.oldest = min([j["id"] for j in jobs] + [self.oldest or jobs[0]["id"]])
            if len(jobs) < chunk or offset + len(jobs) >= total:
                self.complete = True
            self.mark("jobs")
            # A chunk with nothing new: events were missed, so the offset was low.
            done = bool(older) or self.complete
            if done:
                self.loading_more = False
            return done

    def detail_wanted(self, job_id: int) -> bool:
        """Before loading ``job_id``'s record: is it still the one shown?  Keeps its events meanwhile."""
        with self.lock:
            if self.selected != job_id:
                return False
            if self.detail_log is None:
                self.detail_log = []
            return True

    def detail_loaded(self, record: dict) -> list[Task]:
        """Make ``record`` (full, from the master) the detail if still selected; replay newer events."""
        with self.lock:
            if self.selected != record["id"]:
                return []
            pending, self.detail_log = self.detail_log or [], None
            self.detail = dict(record)
            self.detail_full = True
            self.detail_out = _outputs(record)
            tasks = []
            for msg in pending:
                tasks += self._detail_event(msg, replay=True)
            if record["id"] in self.jobs and not pending:
                self.jobs[record["id"]].update(P.summary(record))
                self.mark("jobs")
            self.mark("detail")
            return tasks

    def submitted(self, record: dict, start: int) -> list[Task]:
        """A job this panel submitted: in the list at once, selected, its output streaming."""
        with self.lock:
            job_id = record["id"]
            self._note_progress(record, submitted=True)
            if job_id not in self.jobs:
                self.jobs[job_id] = P.summary(record)
                self.total += 1
            self.selected = job_id
            self.detail_log = None
            tasks: list[Task] = []
            if self.job_seq.get(job_id, -1) > start:
                # Events overtook the submit's answer: the record is already old.
                self.detail = dict(self.jobs[job_id])
                self.detail_full = False
                tasks = self._reload_detail()
            else:
                self.jobs[job_id] = P.summary(record)
                tasks = self.detail_loaded(record)
            if not matches(self.jobs[job_id], *self.filter):
                self.filter = ("", "")
                self.mark("filters")
            self.page = 0
            self.mark("jobs", "detail", "show_jobs")
            return tasks

    def full_record(self, job_id: int) -> dict | None:
        """The selected job's full record if loaded (no need to ask the master again)."""
        with self.lock:
            if self.selected == job_id and self.detail_full and self.detail is not None:
                return dict(self.detail)
            return None

    def load_into_editor(self, record: dict) -> None:
        with self.lock:
            self.edit = record
            self.carried_files = dict(record.get("files") or {})
            self.mark("editor", "files", "show_editor")
        self.say(f"job {record['id']} loaded into the editor")

    # -- what to show (the flusher thread) -------------------------------------------

    def page_view(self) -> tuple[Page, list[Task]]:
        """The rows of the current page, and a ``load_more`` task if the page needs older history."""
        with self.lock:
            rows = self._rows()
            pages = max(1, -(-len(rows) // self.page_size))
            if self.page >= pages and self.complete:
                self.page = pages - 1
            first = self.page * self.page_size
            shown = rows[first:first + self.page_size]
            need_more = self.loaded and not self.complete and len(shown) < self.page_size
            tasks = []
            if need_more and not self.loading_more:
                self.loading_more = True
                tasks.append(Task("load_more"))
            # A group's row shows no elapsed time: only a running job's row ticks.
            self.ticking = any(j.get("status") == P.RUNNING for j in shown) or (
                self.detail is not None and self.detail.get("status") == P.RUNNING)
            filtered = any(self.filter)
            if not rows:
                label = ("loading…" if need_more or not self.loaded
                         else ("no matching jobs" if filtered else "no jobs"))
            else:
                label = f"{first + 1}–{first + len(shown)} of {len(rows)}" + (" matching" if filtered else "")
                label += "" if self.complete else f" loaded, {self.total} in the history"
            options = [self._option(j) for j in shown]
            wanted = group_value(self.group) if self.group is not None else self.selected
            selected = wanted if any(v == wanted for _, v in options) else None
            page = Page(options, selected, label, prev_disabled=self.page == 0,
                        next_disabled=self.complete and first + self.page_size >= len(rows))
            return page, tasks

    # -- fan-out groups ----------------------------------------------------------------

    def _rows(self) -> list[dict]:
        """The list's rows, newest first: a group is one row (where its newest job stands),
        followed by its jobs in input order when it is open."""
        jobs = sorted((j for j in self.jobs.values() if "status" in j and matches(j, *self.filter)),
                      key=lambda j: -j["id"])
        out, seen = [], set()
        for job in jobs:
            group = job.get("group")
            if group is None:
                out.append(job)
                continue
            if group in seen:
                continue
            seen.add(group)
            out.append({"group": group, "row": "group"})
            if group in self.expanded:
                out += sorted((j for j in jobs if j.get("group") == group), key=lambda j: j["id"])
        return out

    def _option(self, row: dict) -> tuple[str, int]:
        if row.get("row") == "group":
            return self._group_label(row["group"]), group_value(row["group"])
        label = row_label(row)
        return ("   └ " + label if row.get("group") else label), row["id"]

    def group_jobs(self, group: str) -> list[dict]:
        with self.lock:
            return sorted((j for j in self.jobs.values() if j.get("group") == group and "status" in j),
                          key=lambda j: j["id"])

    def _group_label(self, group: str) -> str:
        jobs = self.group_jobs(group)
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j["status"]] = counts.get(j["status"], 0) + 1
        ended = sum(n for s, n in counts.items() if s in P.TERMINAL)
        name = next((j.get("name") for j in jobs if j.get("name")), "") or ""
        opened = "▾" if group in self.expanded else "▸"
        return (f"{opened} group {group:<8} {name[:24]:<24}  {ended}/{len(jobs)} done  "
                f"{describe_counts(counts)}")

    def group_summary(self) -> dict | None:
        """What the detail shows for the selected group: id, name, counts, its jobs."""
        with self.lock:
            if self.group is None:
                return None
            jobs = self.group_jobs(self.group)
            counts: dict[str, int] = {}
            for j in jobs:
                counts[j["status"]] = counts.get(j["status"], 0) + 1
            return {"group": self.group, "jobs": jobs, "counts": counts,
                    "unfinished": sum(1 for j in jobs if j["status"] not in P.TERMINAL)}

    def images_loaded(self, job_id: int, images: dict[str, str]) -> None:
        with self.lock:
            if self.selected == job_id:
                self.images = images
                self.mark("detail")

    def me(self, client_id: str | None) -> str:
        """This panel's client as the Cluster tab lists it: ``c7 · alice``."""
        with self.lock:
            user = next((c.get("user") for c in self.clients if c.get("id") == client_id), None)
        return D.identity(client_id, user)


def group_value(group: str) -> int:
    """A group's row in the list: minus the number in its id (``g42`` is -42), apart from every job id."""
    return -int(group[1:])
