"""The job panel's widgets, laid out, with no logic: ``JobPanel`` wires them to its model."""
from __future__ import annotations

import ipywidgets as W
from traitlets import validate

from . import panel_html as H, protocol as P

NOT_OFFERED = "(no slave runs it now)"


class LanguageDropdown(W.Dropdown):
    """The editor's language.  A name the slaves do not offer, or not yet (the panel loads them in
    the background), is kept and marked rather than refused: a notebook that sets it right after
    making the panel must not fail on the moment the list arrives."""

    @validate("value")
    def _validate_value(self, proposal):
        value = proposal.value
        if value is not None and value not in self._options_values:
            self.options = tuple(self.options) + ((f"{value} {NOT_OFFERED}", value),)
        return value


class JobsView:
    """The history list with its filters and pager."""

    def __init__(self):
        self.status_filter = W.Dropdown(options=[("all", "")] + [(s, s) for s in P.STATES], value="",
                                        description="status", layout=W.Layout(width="14em"))
        self.text_filter = W.Text(placeholder="name, language or id", description="filter",
                                  continuous_update=True, layout=W.Layout(width="24em"))
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
        self.header = W.HTML(H.EMPTY_DETAIL)
        # Red only while it can be clicked: a disabled red button still looks like an action.
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True)
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
        self.box.add_class("distexec-detail")


class EditorView:
    """Write or load a program and run it."""

    def __init__(self):
        wide = W.Layout(width="100%")
        self.language = LanguageDropdown(options=[], description="language")
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
        self.slaves = W.HTML(H.LOADING)
        self.clients = W.HTML(H.LOADING)
        self.box = W.VBox([W.HTML("<b>slaves</b>"), self.slaves, W.HTML("<b>clients</b>"), self.clients])
