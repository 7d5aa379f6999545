"""The ``%remote`` / ``%%remote`` IPython magics: a thin shell over ``Cluster``.

``%load_ext distexec_kernel`` registers them.  The cluster is found on first
use (connection file or environment), so loading the extension works with no
cluster up; ``%remote connect`` points it elsewhere.

Two kernel rules shape this module (ipykernel 7, ipywidgets #2358/#4020):
output of a blocking cell is written by the *main* thread, pulled from
``Job.iter_output()``, so it lands in the cell that ran it; and the live
status of a ``--no-wait`` job is a widget displayed once from the main thread
whose ``value`` trait the event thread then sets (never ``display()`` or
``with out:`` from a background thread).
"""
from __future__ import annotations

import argparse
import getpass
import html
import os
import sys
import threading

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import clear_output, display

from . import config, display as D, interrupts, languages, outputs as O, protocol as P
from .config import seconds
from .cluster import Cluster, DistexecError, Job
from .group import item_args
from .live import LiveView
from .magic_args import parse_cell_line, parse_command, parse_line, read_files, read_source, split_run
from .magic_errors import RemoteGroupFailed, RemoteJobFailed, show_error

# The %remote subcommands, each done by its _cmd_<name> method.
COMMANDS = ("connect", "run", "jobs", "slaves", "clients", "sessions", "languages", "cancel", "show", "panel")

# How many live status widgets the magics keep a reference to (for tests and
# for re-reading); older ones still update, they are just not listed.
KEEP_WIDGETS = 200


class Rich:
    """A table with an HTML form for notebooks and a plain one for terminals and nbconvert."""

    def __init__(self, html_text: str, plain: str):
        self.html = html_text
        self.plain = plain

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.plain


def _rank(status: str) -> int:
    return 2 if status in P.TERMINAL else 1 if status == P.RUNNING else 0


def _write(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()


@magics_class
class RemoteMagics(Magics):
    """``%remote`` and ``%%remote``: run programs on a distexec cluster from a notebook."""

    def __init__(self, shell, cluster: Cluster | None = None):
        super().__init__(shell)
        self._cluster = cluster
        self._by_hand = cluster is not None  # given, or made by %remote connect: never dropped for another
        self.status_widgets: dict[int, object] = {}

    # -- the cluster ------------------------------------------------------------

    @property
    def cluster(self) -> Cluster:
        """The cluster, found from the connection file / environment on first use."""
        if self._cluster is None:
            self._cluster = Cluster()
        return self._cluster

    def close(self, stop_sending: bool = False) -> None:
        if self._cluster is not None:
            self._cluster.close(stop_sending=stop_sending)
            self._cluster = None

    def refused(self) -> None:
        """The master refused the token (a login expired): a cluster found by default is dropped, so the
        next cell finds it anew and takes a login made meanwhile (`distexec login`). Its maps' parts
        not sent yet could not be sent with that token: they end cancelled, at once."""
        if not self._by_hand:
            self.close(stop_sending=True)

    # -- %%remote ---------------------------------------------------------------

    @magic_arguments("%remote")
    @argument("language", nargs="?", default="python",
              help="language of the cell (python, bash, c, ...; aliases like py, js, sh work)")
    @argument("--timeout", type=seconds, help="seconds the job may run; past that it fails with `timeout`")
    @argument("--name", help="a name for the job in the history")
    @argument("--file", action="append", default=[], metavar="PATH",
              help="ship this local file (under its base name) or folder (under its name) with the job (repeatable)")
    @argument("--collect", action="append", default=[], metavar="PAT",
              help="keep the job's files matching this glob (*.png, out/**) and show images here (repeatable)")
    @argument("--arg", action="append", default=[], metavar="A",
              help="a command-line argument for the program (repeatable; --arg=-v for one that starts "
                   "with -); any after -- follow these: %%%%remote bash -- -v -x")
    @argument("--stdin", metavar="TEXT", help="text given to the program on its standard input")
    @argument("--no-wait", action="store_true",
              help="return at once with a live status line; the cell does not wait for the job")
    @argument("-o", "--output", metavar="NAME",
              help="store the job handle (a distexec Job) in the user namespace as NAME")
    @argument("--session", metavar="NAME",
              help="run in the persistent interpreter NAME, so variables live on between cells")
    @argument("--map", metavar="NAME",
              help="run the cell once per item of the iterable NAME (items become arguments, as "
                   "Cluster.map does); -o stores the JobGroup")
    @cell_magic("remote")
    def remote_cell(self, line: str, cell: str):
        """Run the cell on the cluster; stream its output here; fail the cell if the job fails.

        Interrupting the cell cancels the job.  With --no-wait the cell returns
        the job handle at once and shows its status updating in place.
        """
        args = parse_cell_line(self.remote_cell, line)
        if not cell.strip():
            raise UsageError("%%remote: the cell is empty: write the program below the %%remote line")
        if args.map:
            return self._map(cell, args)
        with interrupts.held() as interrupt:
            job = self.cluster.submit(cell, language=args.language, files=read_files(args.file) or None,
                                      args=args.arg or None, stdin=args.stdin, timeout=args.timeout,
                                      name=args.name, session=args.session, collect=args.collect or None)
        return self._after_submit(job, args.no_wait, args.output, interrupt.pressed)

    # -- %remote ------------------------------------------------------------------

    @magic_arguments("remote")
    @argument("command", choices=COMMANDS, metavar="COMMAND", help=" | ".join(COMMANDS))
    @argument("rest", nargs=argparse.REMAINDER, help="the command's own arguments")
    @line_magic("remote")
    def remote_line(self, line: str):
        """The cluster from a notebook.

        %remote connect [URL] [--token T]     use another master (default: the connection file)
        %remote connect [URL] --user NAME     log in as NAME (asks for the password)
        %remote connect URL --cafile PEM      verify an https master with this certificate
        %remote run FILE [--lang L] [ARGS...]  submit a file; the language comes from its extension;
                                              also --timeout S, --name N, --file PATH, --stdin TEXT,
                                              --collect PAT, --session NAME, --no-wait, -o NAME, as for %%remote;
                                              `--` ends these options (the rest go to the program)
        %remote jobs [--status S] [--limit N] the job history, newest first
        %remote slaves | clients | sessions   who is connected, the persistent sessions
        %remote languages                     the languages the connected slaves run
        %remote sessions --end NAME...        end sessions (their variables go)
        %remote show ID                       one job, with its output
        %remote cancel ID                     cancel a job
        %remote panel                         the ipywidgets job panel
        """
        if not line.strip():
            # argparse would say "required: COMMAND, rest", which names no command.
            raise UsageError(f"%remote needs a command: {' | '.join(COMMANDS)} (%remote? for help)")
        args = parse_line(self.remote_line, line)
        return getattr(self, f"_cmd_{args.command}")(args.rest)

    def _cmd_connect(self, rest):
        a = parse_command("connect", rest, (("url",), dict(nargs="?")), (("--token",), {}),
                          (("--user",), dict(help="log in as this user; the password is asked for")),
                          (("--cafile",), dict(help="the certificate to verify an https master with")))
        if a.user:
            config.warn_cleartext(a.url)
            # getpass reads through the kernel's input request, never echoing the password.
            new = Cluster(a.url, user=a.user, password=getpass.getpass(f"password for {a.user}: "), cafile=a.cafile)
        else:
            new = Cluster(a.url, token=a.token, cafile=a.cafile)
        self.close()
        self._cluster = new
        self._by_hand = True
        slaves = new.slaves()
        langs = sorted({lang for s in slaves for lang in s["languages"]})
        print(f"connected to {new.url} as client {new.client_id} · {len(slaves)} slave(s) · "
              f"languages: {', '.join(langs) or 'none'}")

    def _cmd_run(self, rest):
        opts, positional = split_run(rest)
        if not positional:
            raise UsageError("%remote run FILE [--lang L] [ARGS...]: which file?")
        path, prog_args = positional[0], positional[1:]
        language = opts.get("lang") or languages.from_filename(path)
        if not language:
            known = sorted(ext for lang in languages.LANGUAGES.values() for ext in lang.extensions)
            raise UsageError(f"%remote run: no language for {os.path.basename(path)!r}; "
                             f"give --lang (known extensions: {', '.join(known)})")
        try:
            timeout = seconds(opts["timeout"]) if "timeout" in opts else None
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"%remote run --timeout: {exc}") from None
        source = read_source(path)
        with interrupts.held() as interrupt:
            job = self.cluster.submit(source, language=language, args=prog_args or None, timeout=timeout,
                                      name=opts.get("name") or os.path.basename(path),
                                      files=read_files(opts.get("file", [])) or None,
                                      stdin=opts.get("stdin"), session=opts.get("session"),
                                      collect=opts.get("collect") or None)
        return self._after_submit(job, "no-wait" in opts, opts.get("o"), interrupt.pressed)

    def _cmd_jobs(self, rest):
        a = parse_command("jobs", rest, (("--status",), dict(choices=P.STATES)),
                      (("--limit",), dict(type=int, default=20)))
        records, total = self.cluster.jobs_page(status=a.status, limit=a.limit, summary=True)
        more = f"{len(records)} of {total} jobs" if total > len(records) else None
        return Rich(D.jobs_html(records) + (f"<p><i>{more}</i></p>" if more else ""),
                    D.jobs_text(records) + (f"\n({more})" if more else ""))

    def _cmd_slaves(self, rest):
        parse_command("slaves", rest)
        slaves = self.cluster.slaves()
        return Rich(D.slaves_html(slaves), D.slaves_text(slaves))

    def _cmd_clients(self, rest):
        parse_command("clients", rest)
        clients = self.cluster.clients()
        return Rich(D.clients_html(clients), D.clients_text(clients))

    def _cmd_sessions(self, rest):
        a = parse_command("sessions", rest, (("--end",), dict(nargs="+", metavar="NAME", default=[],
                                                               help="end these sessions (their variables go)")))
        for name in a.end:
            try:
                self.cluster.end_session(name)
            except DistexecError as exc:
                if exc.status != 404:
                    raise
                print(f"no session {name} to end")
            else:
                print(f"ended session {name}")
        sessions = self.cluster.sessions()
        return Rich(D.sessions_html(sessions), D.sessions_text(sessions))

    def _cmd_languages(self, rest):
        parse_command("languages", rest)
        print(D.languages_text(self.cluster.languages()))

    def _cmd_cancel(self, rest):
        a = parse_command("cancel", rest, (("id",), dict(type=int)))
        # The master answers once the slave has killed a running job; a slave slow
        # to do it leaves the job shown as it stands (⏳).
        print(D.status_line(self.cluster.cancel(a.id).record))

    def _cmd_show(self, rest):
        a = parse_command("show", rest, (("id",), dict(type=int)))
        record = self.cluster.job(a.id).record
        text = D.job_detail_text(record)
        return Rich(f"<pre>{html.escape(text)}</pre>", text)

    def _cmd_panel(self, rest):
        parse_command("panel", rest)
        from .panel import JobPanel
        display(JobPanel(self.cluster))

    # -- shared by %%remote and %remote run ---------------------------------------

    def _after_submit(self, job: Job, no_wait: bool, output: str | None, interrupted: bool = False):
        if output:
            self.shell.user_ns[output] = job
        if interrupted:  # while it was being submitted: the job is cancelled, as it would be a moment later
            job.cancel_and_wait()
            raise RemoteJobFailed(job, interrupted=True)
        if no_wait:
            return job  # shown by show_job as a live status line
        written = self._follow(job)
        # What a local cell would show before its error too: its displays, then the files it made.
        redrawn = O.in_place(written, job.record) if getattr(self.shell, "kernel", None) is not None else None
        if redrawn is None:  # (a terminal cannot take back what it printed)
            O.show_outputs(job.record, display)
        else:
            clear_output(wait=True)
            for kind, item in redrawn:
                if kind == "output":
                    display(item["data"], raw=True, metadata=O.metadata_of(item) or None)
                else:
                    _write(kind, item)
        O.show_artifacts(job, display)
        if job.status != P.SUCCEEDED:
            raise RemoteJobFailed(job)
        display(D.status_bundle(job.record), raw=True)
        return None

    def _follow(self, job: Job) -> list[tuple[str, str]]:
        """Stream the job's output into this cell, from the main thread; Ctrl-C cancels it.
        Returns what it wrote, ``(stream, text)`` in order, for the cell to be redrawn."""
        written = []

        def write(stream: str, text: str) -> None:
            written.append((stream, text))
            _write(stream, text)

        if job.follow(write):
            raise RemoteJobFailed(job, interrupted=True) from None
        return written

    def _map(self, cell: str, args: argparse.Namespace):
        """``%%remote --map NAME``: one job per item, a progress bar, a summary line."""
        if args.session:
            raise UsageError("%%remote --map runs a fresh job per item; it does not combine with --session")
        if args.map not in self.shell.user_ns:
            raise UsageError(f"%%remote --map: no variable {args.map!r} in the notebook")
        items = self.shell.user_ns[args.map]
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise UsageError(f"%%remote --map: {args.map} is a {type(items).__name__}, not an iterable of inputs")
        files = read_files(args.file) or None
        subs = [dict(source=cell, language=args.language, files=files, args=[*args.arg, *item_args(item)],
                     stdin=args.stdin, timeout=args.timeout, name=args.name, collect=args.collect or None)
                for item in items]
        with interrupts.held() as interrupt:
            group = self.cluster.submit_many(subs)
        if args.output:
            self.shell.user_ns[args.output] = group
        if interrupt.pressed:  # while the batch was being sent: what the master made is cancelled all the same
            _interrupted(group)
        if args.no_wait:
            return group
        try:
            group.wait(progress=True)
        except KeyboardInterrupt:
            _interrupted(group)
        _write("stdout", D.map_outputs([job.stdout or "" for job in group]))
        if group.failed:
            first = group.failed[0]
            if first.stderr:
                # Its own words first, as a local cell's traceback would come (the tail: a group can be big).
                sys.stderr.write(_tail(first.stderr))
                sys.stderr.flush()
            raise RemoteGroupFailed(group)
        summary = group.summary()
        display({"text/plain": summary,
                 "text/html": f"<div style='color:gray'>{html.escape(summary)}</div>"}, raw=True)
        return None

    # -- live status of a job that runs on ----------------------------------------

    def show_job(self, job: Job) -> bool:
        """Display a job handle as a status line that updates in place until the job ends.

        Registered as the IPython display function for ``Job``, so both a
        ``--no-wait`` cell and a later cell evaluating the handle show it.
        Runs in the main thread; the event thread only sets the widget's value.
        The line's text beside the widget, and its state in a saved notebook,
        are brought to the job's end at the end of a later cell (``live.py``).
        """
        import ipywidgets

        record = dict(job.record)
        widget = ipywidgets.HTML(value=D.status_html(record))
        self.status_widgets[job.id] = widget
        while len(self.status_widgets) > KEEP_WIDGETS:
            self.status_widgets.pop(next(iter(self.status_widgets)))
        moving = threading.Lock()
        unsubscribe = lambda: None  # the event subscription, once made  # noqa: E731

        def move(summary: dict) -> None:
            # From the event thread and, at a cell's end, the main thread: an ended line stays ended.
            with moving:
                if record["status"] not in P.TERMINAL or summary.get("status") in P.TERMINAL:
                    record.update(summary)
                    widget.value = D.status_html(record)
            if record["status"] in P.TERMINAL:
                unsubscribe()  # whoever brought the end: an end missed by the events leaves no listener

        def catch_up(latest: dict | None = None) -> None:
            # The handle may know the end before our subscriber does (a wait() that read the master):
            # the cell that waited then sends it, in its own messages.
            latest = latest or job.record
            if _rank(latest["status"]) > _rank(record["status"]):
                move(P.summary(latest))

        if not job.done:
            def on_event(msg):
                if msg["type"] == "job_update" and msg["job"].get("id") == record["id"]:
                    move(msg["job"])

            unsubscribe = job._cluster.subscribe(on_event)
            # It may have moved on before we subscribed: read it once now, and
            # apply it only if the event thread has not already gone further.
            try:
                catch_up(job._cluster._get(f"/api/jobs/{job.id}"))
            except DistexecError:
                pass
        LiveView(widget, lambda: D.status_bundle(record), catch_up=catch_up,
                 finished=lambda: record["status"] in P.TERMINAL).show()
        return True


def _tail(text: str, lines: int = 40) -> str:
    kept = text.splitlines(keepends=True)
    if len(kept) <= lines:
        return text
    return f"[... {len(kept) - lines} earlier lines]\n" + "".join(kept[-lines:])


_loaded: dict[int, RemoteMagics] = {}


def load_ipython_extension(ipython) -> None:
    """``%load_ext distexec_kernel``: register the magics, the error display and the job display."""
    if id(ipython) in _loaded:
        return
    magics = RemoteMagics(ipython)
    ipython.register_magics(magics)

    def shown(shell, etype, value, tb, tb_offset=None):
        if isinstance(value, DistexecError) and value.status == 401:
            magics.refused()
        return show_error(shell, etype, value, tb, tb_offset)
    ipython.set_custom_exc((RemoteJobFailed, RemoteGroupFailed, DistexecError, config.ConnectionConfigError),
                           shown)
    ipython.display_formatter.ipython_display_formatter.for_type(Job, magics.show_job)
    _loaded[id(ipython)] = magics


def unload_ipython_extension(ipython) -> None:
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
    magics.close()
    ipython.set_custom_exc((), None)
    ipython.display_formatter.ipython_display_formatter.pop(Job, None)
    # IPython has no unregister for Magics instances: drop ours by name.
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("remote", None)


def magics_of(ipython) -> RemoteMagics | None:
    """The loaded ``RemoteMagics`` of a shell (its cluster, its status widgets)."""
    return _loaded.get(id(ipython))


def _interrupted(group) -> None:
    """An interrupted ``--map`` cell: its group cancelled (its jobs' end awaited a while), the cell failed."""
    try:
        group.cancel()
        group.wait(timeout=10, progress=False)
    except (DistexecError, TimeoutError, KeyboardInterrupt):
        pass  # shown as it stands; the master still has the cancel request
    raise RemoteGroupFailed(group, interrupted=True) from None
