"""Widgets kept live by threads, and saved as they last stood: for nbconvert, GitHub and an HTML export.

A notebook executed by ``jupyter nbconvert --execute`` (nbclient) showed our
widgets in their first state (``⏳ … running``, ``jobs: 0%``) though the jobs
had ended.  Two causes, found with ipykernel 7.4 and nbclient 0.11:

* A widget set from a background thread (the cluster's event thread, the
  panel's flusher) sends its comm message with the parent header of the last
  execute request: a thread with no parent of its own gets the shell's last
  context.  A live front end applies the message whatever its parent; nbclient
  reads only the messages of the cell it is running, up to that cell's idle,
  and drops the others.  A change made between two cells, or after one
  finished, never reaches the widget state it saves.
* A reader without the widget's JavaScript (GitHub, an HTML export of a
  notebook saved without widget state) shows the output's ``text/html`` or
  ``text/plain``; ``display()`` froze those at the widget's first state.

So a ``LiveView`` is displayed with a display_id and, beside the widget's
view, a text rendering of what it shows.  A change to its widgets made by
another thread while no cell runs is remembered; at the end of every cell
(IPython's ``post_run_cell``: in the main thread, still inside that cell's
request, so nbclient reads what is sent) those widget states are sent again,
and the display's text is updated where it changed.  A front end with widgets
re-renders the view, on the same model, once per such update.
"""
from __future__ import annotations

import logging
import threading
import uuid
from typing import Callable

log = logging.getLogger("distexec.live")

_lock = threading.Lock()
_views: list["LiveView"] = []
_hooked: set[int] = set()  # id() of the shells whose cell events we follow
_in_cell = False


def widgets_of(root) -> list:
    """``root`` and every widget under it (a box's children, a tab's pages)."""
    found, stack = [], [root]
    while stack:
        widget = stack.pop()
        found.append(widget)
        stack.extend(getattr(widget, "children", ()) or ())
    return found


class LiveView:
    """One display of ``widget``, kept true for a saved notebook; see the module's docstring.

    ``render()`` returns what the widget shows as a display bundle without the
    widget (``text/plain``, and ``text/html`` where there is one).  ``catch_up()``
    (main thread, before each sync) brings the widgets up to date with what the
    kernel knows, so that a cell that waited for a job ends with the job's end in
    its own messages.  ``finished()``: nothing will change any more; the view is
    forgotten after its next sync.

    Updating the text makes a front end re-render the widget's view, and
    ipywidgets 8 (jupyterlab-manager's ``renderModel``) leaves the old view
    attached to the model, detached from the page, updating on.  Harmless for a
    status line that changes once more; not for the panel, which changes all
    the time and has the user's focus.  ``redraw_when_viewed=False``: the text
    is updated only at the end of a cell where no front end shows the widget
    (``_view_count``, which front ends keep once it is a number; nbclient shows
    none), and not in the cell that displayed it, before a front end has said
    that it shows it.
    """

    def __init__(self, widget, render: Callable[[], dict], *, catch_up: Callable[[], None] | None = None,
                 finished: Callable[[], bool] | None = None, redraw_when_viewed: bool = True):
        self.widget = widget
        self.render = render
        self.catch_up = catch_up
        self.finished = finished or (lambda: False)
        self.redraw_when_viewed = redraw_when_viewed
        self.display_id = uuid.uuid4().hex
        self._shown: dict | None = None
        self._fresh = True  # not yet past the end of the cell that displayed it
        self._missed: dict[int, tuple[object, set[str]]] = {}
        self._lock = threading.Lock()

    def show(self, follow: bool = True) -> "LiveView":
        """Display it (main thread).  ``follow``: sync it at the end of every cell until it has finished;
        without, the owner calls ``sync()`` itself (a bar drawn and closed within one cell)."""
        from IPython.display import display

        shell = _kernel_shell()
        if not self.redraw_when_viewed and self.widget._view_count is None:
            self.widget._view_count = 0  # front ends count their views from now on
        for widget in widgets_of(self.widget):
            widget.observe(self._changed)
        self._shown = self.render()
        display(self._bundle(self._shown), raw=True, display_id=self.display_id)
        # A terminal shell shows text once and cannot take it back: only a kernel's displays are synced.
        if follow and shell is not None and not self.finished():
            _follow(shell, self)
        return self

    def sync(self) -> None:
        """Send again what nbclient may have missed, and update the text (main thread, within a cell)."""
        if self.widget.comm is None:
            return  # closed: its view has gone
        if self.catch_up is not None:
            self.catch_up()
        with self._lock:
            missed, self._missed = self._missed, {}
        for widget, names in missed.values():
            if widget.comm is not None:
                widget.send_state(sorted(names))
        fresh, self._fresh = self._fresh, False
        if not self.redraw_when_viewed and (fresh or self.widget._view_count):
            return
        text = self.render()
        if text != self._shown:
            from IPython.display import update_display

            update_display(self._bundle(text), raw=True, display_id=self.display_id)
            self._shown = text

    @property
    def closed(self) -> bool:
        return self.widget.comm is None

    def stop(self) -> None:
        """Stop noting changes (it has finished, or closed)."""
        for widget in widgets_of(self.widget):
            widget.unobserve(self._changed)

    def _bundle(self, text: dict) -> dict:
        return {**self.widget._repr_mimebundle_(), **text}

    def _changed(self, change) -> None:
        # The main thread changes widgets within a request (a cell, or a front end's message, whose
        # sender has the change); another thread's change counts as missed unless a cell runs.  ipywidgets
        # sends a change before it calls observers, except inside hold_sync, where it sends at the end:
        # a panel's catch_up (its flush, under its render lock) waits for such a render to be over.
        owner, name = change["owner"], change["name"]
        if _in_cell or name not in owner.keys or threading.current_thread() is threading.main_thread():
            return
        with self._lock:
            self._missed.setdefault(id(owner), (owner, set()))[1].add(name)


def _kernel_shell():
    """The IPython shell if it runs in a kernel (a front end shows widgets), else None."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def _follow(shell, view: LiveView) -> None:
    global _in_cell
    with _lock:
        _views.append(view)
        if id(shell) in _hooked:
            return
        _hooked.add(id(shell))
        _in_cell = True  # shown from a running cell: its post_run_cell is still to come
    shell.events.register("pre_run_cell", _cell_starts)
    shell.events.register("post_run_cell", _cell_ended)


def _cell_starts(info=None) -> None:
    global _in_cell
    _in_cell = True


def _cell_ended(result=None) -> None:
    """Sync every followed view, and forget those that have finished or closed."""
    global _in_cell
    _in_cell = False  # first: a change from now on may come after this cell's idle
    with _lock:
        views = list(_views)
    done = []
    for view in views:
        try:
            finished = view.finished()  # before the sync: an end that comes during it is synced next time
            if not view.closed:
                view.sync()
            if finished or view.closed:
                done.append(view)
        except Exception:  # IPython would print a callback's traceback into the user's cell
            log.exception("live view: sync failed")
            done.append(view)
    with _lock:
        _views[:] = [v for v in _views if v not in done]
    for view in done:
        view.stop()


def followed() -> list[LiveView]:
    """The views synced at the end of each cell (for tests)."""
    with _lock:
        return list(_views)
