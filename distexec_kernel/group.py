"""``JobGroup``: the jobs of one batch or map, followed as one.

A group is submitted in one request (``POST /api/jobs`` with a list) and
followed through the cluster's event channel: each ``job_update`` of the
group moves the counts, so waiting costs no request per job.  One listing of
the group (``GET /api/jobs?group=G``) brings the outputs when all have
ended, and serves as the backstop when events may have been missed (a
reconnect, a quiet channel).
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import protocol as P
from .errors import RemoteError

if TYPE_CHECKING:
    from .cluster import Cluster
    from .job import Job

# A waiter re-reads the group this often when no event came, so a lost event
# delays the answer, never loses it.
REFRESH_EVERY = 2.0
PAGE = 1000  # the master's largest page of GET /api/jobs
# A waiter counts the group's states at most once per this much time per job, and at least every
# RECOUNT_MOST: a count reads every job not ended yet, and a large group's events come by the thousand a
# second (counting at each took the client thread's time from the events: ~8% of a map's throughput
# at 2,000 jobs).  1,000 jobs: every 20 ms.
RECOUNT_PER_JOB = 20e-6
RECOUNT_MOST = 0.05
BAR_EVERY = 0.1  # the progress bar is drawn at most this often (in a notebook each draw is a message)

# The order the counts are shown in: what a person watches first.
SHOWN = (P.SUCCEEDED, P.FAILED, P.REJECTED, P.CANCELLED, P.RUNNING, P.QUEUED)


def item_args(item) -> list[str]:
    """A map input as a job's arguments: a list or tuple is the arguments, anything else one."""
    return [str(a) for a in item] if isinstance(item, (list, tuple)) else [str(item)]


def describe_counts(counts: dict[str, int], total: int | None = None) -> str:
    """``✅ 30 · ❌ 2 · 🚫 0 · ⏳ 1 · 🕓 5`` — failed and rejected share the ❌."""
    merged: dict[str, int] = {}
    for state in SHOWN:
        icon = P.ICONS[state]
        merged[icon] = merged.get(icon, 0) + counts.get(state, 0)
    parts = [f"{icon} {n}" for icon, n in merged.items()
             if n or icon in (P.ICONS[P.SUCCEEDED], P.ICONS[P.FAILED], P.ICONS[P.CANCELLED])]
    if total is not None:
        parts.append(f"{total} jobs")
    return " · ".join(parts)


class JobGroup(Sequence):
    """The jobs of one batch, in input order, with their counts, progress and results."""

    def __init__(self, cluster: "Cluster", group_id: str | None, jobs: list["Job"]):
        self._cluster = cluster
        self.id = group_id
        self._jobs = jobs
        self._by_id = {job.id: job for job in jobs if not job.pending}
        self._cond = threading.Condition()
        self._changed = 0  # bumped by each event of the group, to wake waiters
        self._stale = False
        self._have_outputs = all(not j.pending and j.done for j in jobs)
        self._feeder = None  # sends the jobs still pending: those past one batch or the queue's room (feeding.py)
        self._early: dict[int, dict] = {}  # events of a part's jobs that came before its answer
        # The jobs not seen ended yet, and how those seen ended: a job that has ended stays so
        # (Job._older), so a count reads only the others.
        self._open, self._ended, self._counting = list(jobs), Counter(), threading.Lock()
        self.started = time.monotonic()
        self._unsubscribe = cluster.subscribe(self._on_event) if not self._have_outputs else None

    # -- a sequence of Job ----------------------------------------------------------

    def __getitem__(self, index):
        return self._jobs[index]

    def __len__(self) -> int:
        return len(self._jobs)

    def __repr__(self) -> str:
        return f"<JobGroup {self.id} {describe_counts(self.counts(), len(self))}>"

    # -- state ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Status -> how many jobs of the group are in it now."""
        with self._counting:
            live, still = Counter(), []
            for job in self._open:
                state = P.QUEUED if job.pending else job.status  # not sent: waits
                if state in P.TERMINAL:
                    self._ended[state] += 1
                else:
                    live[state] += 1
                    still.append(job)
            self._open = still
            return dict(self._ended + live)

    @property
    def done(self) -> bool:
        return all(not job.pending and job.done for job in self._jobs)

    @property
    def failed(self) -> list["Job"]:
        """The jobs that ended in any way but success (failed, rejected, cancelled), in input order."""
        return [job for job in self._jobs if not job.pending and job.done and job.status != P.SUCCEEDED]

    @property
    def succeeded(self) -> list["Job"]:
        return [job for job in self._jobs if not job.pending and job.status == P.SUCCEEDED]

    def summary(self) -> str:
        """``✅ 30 · ❌ 2 · 🚫 0 · 32 jobs · 1.4 s``: the line the magic ends with."""
        return f"{describe_counts(self.counts(), len(self))} · {time.monotonic() - self.started:.1f} s"

    # -- events -----------------------------------------------------------------------

    def _on_event(self, msg: dict) -> None:
        if msg["type"] == "job_update":
            with self._cond:  # as _sent registers a part: an event of it is applied or kept, not lost
                job = self._by_id.get(msg["job"].get("id"))
                if job is None:
                    if self._feeder is not None and self.id is not None and msg["job"].get("group") == self.id:
                        self._early.setdefault(msg["job"]["id"], {}).update(msg["job"])
                    return
            job._apply_update(msg["job"])
        elif msg["type"] == "connection":
            self._stale = True  # events may have been missed while away
        else:
            return
        with self._cond:
            self._changed += 1
            self._cond.notify_all()

    def _sent(self, jobs: list["Job"]) -> None:
        """A part of the group reached the master (feeding.py): follow its jobs from now on."""
        with self._cond:
            for job in jobs:
                self._by_id[job.id] = job
                early = self._early.pop(job.id, None)
                if early is not None:
                    job._apply_update(early)
            if not any(job.pending for job in self._jobs):
                self._early.clear()
            self._changed += 1
            self._cond.notify_all()

    def _records(self, summary: bool) -> list[dict]:
        out, offset = [], 0
        while True:
            page, total = self._cluster.jobs_page(limit=PAGE, offset=offset, summary=summary, group=self.id)
            out.extend(page)
            offset += len(page)
            if not page or offset >= total:
                return out

    def refresh(self, summary: bool = True) -> "JobGroup":
        """Re-read the group's jobs from the master (one listing, not a request per job)."""
        if self.id is None:
            return self
        asked = time.monotonic()
        for record in self._records(summary):
            job = self._by_id.get(record["id"])
            if job is None:
                continue
            if summary:
                job._apply_update(record, asked)
            else:
                job._replace(record, asked)
        self._stale = False
        return self

    def _fetch_outputs(self) -> None:
        if not self._have_outputs:
            if any(job._stale or job.stdout is None for job in self._jobs):
                self.refresh(summary=False)  # one listing for the outputs the events did not bring
            self._have_outputs = True
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

    # -- actions ---------------------------------------------------------------------

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> "JobGroup":
        """Block until every job has ended; returns the group.  ``TimeoutError`` if ``timeout`` passes.

        ``progress``: a live bar with the counts per state (an ipywidgets bar
        in a notebook, a text bar on stderr).  By default (None) it is drawn
        in a notebook and on a terminal, not into a log file or a pipe.
        Interrupting the wait (Ctrl-C) leaves the jobs running; call
        ``cancel()`` to stop them.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _bar(len(self), progress) if progress is not False and len(self) else None
        # Read once at the start: events between the submission's answer and our subscription are not lost.
        last_refresh = drawn = float("-inf")
        try:
            while True:
                with self._cond:
                    seen = self._changed
                # A large group's listing is a page per thousand jobs: re-read as often per job, not per group.
                if self._stale or time.monotonic() - last_refresh > REFRESH_EVERY * max(1, len(self) // PAGE):
                    self.refresh()
                    last_refresh = time.monotonic()
                counts, counted = self.counts(), time.monotonic()
                ended = sum(counts.get(s, 0) for s in P.TERMINAL)
                if bar is not None and (ended == len(self) or counted - drawn >= BAR_EVERY):
                    drawn = counted
                    bar.n = ended
                    bar.set_postfix_str(describe_counts(counts), refresh=False)
                    bar.refresh()
                if ended == len(self):
                    break
                wait = REFRESH_EVERY
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"group {self.id}: {describe_counts(counts, len(self))} "
                                           f"after {timeout} s")
                with self._cond:
                    if self._changed == seen:
                        self._cond.wait(wait)
                pause = counted + min(RECOUNT_MOST, len(self) * RECOUNT_PER_JOB) - time.monotonic()
                if pause > 0:
                    time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        finally:
            if bar is not None:
                if hasattr(bar, "container") and set(self.counts()) - {P.SUCCEEDED}:
                    # The notebook bar turns red where a job failed or was cancelled (tqdm
                    # colours a full bar green), as the summary line's ❌ and 🚫 say.
                    bar.display(bar_style="danger", check_delay=False)
                bar.close()
                if getattr(bar, "live", None) is not None:
                    bar.live.sync()  # its text as it ended, for a reader without widgets (live.py)
                    bar.live.stop()
        self._fetch_outputs()
        return self

    def stop_sending(self) -> "JobGroup":
        """Send nothing more of the group (those not sent end cancelled); those sent run on."""
        if self._feeder is not None:
            self._feeder.stop()
        return self

    def wait_sent(self, timeout: float | None = None) -> "JobGroup":
        """Block until every job has reached the master (a group sent in parts, ``feeding.py``), not
        until they end: what a process that leaves right after submitting must wait for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (left := sum(job.pending for job in self._jobs)):
                wait = REFRESH_EVERY if deadline is None else min(REFRESH_EVERY, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"group {self.id}: {left} job(s) not sent after {timeout} s")
                self._cond.wait(wait)
        return self

    def results(self, errors: str = "raise", timeout: float | None = None) -> list:
        """The stdouts in input order, once all have ended.

        ``errors="raise"``: raise the ``RemoteError`` of the first job (in
        input order) that did not succeed; ``errors="return"``: put each such
        job's ``RemoteError`` in its place instead.
        """
        if errors not in ("raise", "return"):
            raise ValueError("errors must be 'raise' or 'return'")
        if not (self.done and self._have_outputs):
            self.wait(timeout=timeout, progress=False)
        out = []
        for job in self._jobs:
            if job.status == P.SUCCEEDED:
                out.append(job.stdout)
            elif errors == "raise":
                raise RemoteError(job)
            else:
                out.append(RemoteError(job))
        return out

    def cancel(self) -> "JobGroup":
        """Cancel every job of the group that has not ended (queued ones never start, those not sent
        yet are not sent)."""
        self.stop_sending()
        if self.id is not None and not self.done:
            self._cluster.cancel_group(self.id)
            self.refresh()
        return self

    def close(self) -> None:
        """Stop following the group's events (done by itself once all have ended and been read)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


def _bar(total: int, asked: bool | None = None):
    """tqdm's bar for where we are: its notebook widget in a notebook, text on stderr elsewhere;
    unless ``asked``, none where stderr is not a terminal (a script's log keeps no carriage returns)."""
    from tqdm.auto import tqdm

    notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto in a notebook only
    in_notebook = notebook is not None and issubclass(tqdm, notebook.tqdm_notebook)
    if asked is None and not in_notebook and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    if not in_notebook:
        return tqdm(total=total, unit="job", desc="jobs", leave=True, dynamic_ncols=True)
    from .live import LiveView

    # Displayed by us, not by tqdm: with a display_id, so that its text (tqdm's own line) can be
    # brought to where the bar ended; tqdm's display() froze it at 0%.
    bar = tqdm(total=total, unit="job", desc="jobs", leave=True, dynamic_ncols=True, display=False)
    bar.live = LiveView(bar.container, lambda: {"text/plain": bar.container.__repr__(True)}).show(follow=False)
    return bar
