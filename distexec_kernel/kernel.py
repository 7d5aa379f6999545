"""A Jupyter kernel per language: every cell is a program run on the distexec cluster.

``python -m distexec_kernel.kernel --language c -f CONNECTION_FILE`` is what
the kernelspecs of ``distexec kernel install`` start.  The kernel process
runs here; each cell is submitted through the ``Cluster``/``Job`` API, its
output streamed into the cell as it comes, the status line shown as the
``%%remote`` magic shows it.  A job that does not succeed is an error reply
named after its ``error.code``, so Run All stops there.  A Python kernel
runs its cells in a persistent session of its own, so state lives on from
cell to cell.

Cells are handled in the main thread, blocking, as IPython handles its own:
ipykernel installs Python's default SIGINT handler around each request, so
a kernel interrupt raises KeyboardInterrupt here, which cancels the job.
"""
from __future__ import annotations

import atexit
import sys
import time
import uuid

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel
from traitlets import Unicode

from . import __version__, cells, config, display as D, interrupts, languages as L, protocol as P
from .cluster import Cluster, DistexecError, Job
from .outputs import in_place, metadata_of, rich_outputs

# After a failed attempt to reach the cluster, kernel_info does not try again
# for this long (a front end asks for it often; a cell always tries).
RETRY_INFO_AFTER = 30.0

NO_CLUSTER = "no_cluster"
USAGE = "UsageError"


class DistexecKernel(Kernel):
    """A wrapper kernel (ipykernel's ``Kernel`` base) for one language of the language table."""

    implementation = "distexec"
    implementation_version = __version__
    language_name = Unicode("python", help="the language of this kernel's cells (a name of the language table)"
                            ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        lang = L.get(self.language_name)
        if lang is None:
            raise ValueError(f"unknown language {self.language_name!r}; known: {', '.join(L.LANGUAGES)}")
        self.lang = lang
        self.kept_files: dict[str, str] = {}
        self._cluster: Cluster | None = None
        self._connect_failed_at = float("-inf")
        self._version: str | None = None
        # One Python session per kernel instance: state lives from cell to cell,
        # and a second notebook does not share it.
        self.session_name = f"kernel-{uuid.uuid4().hex[:12]}" if lang.name == "python" else None
        self._session_used = False

    # -- what the front end is told ------------------------------------------------------

    @property
    def language(self) -> str:
        return self.lang.name

    @property
    def language_version(self) -> str:
        return self._toolchain_version() or "unknown"

    @property
    def language_info(self) -> dict:
        lang = self.lang
        info = {"name": lang.name, "version": self.language_version, "mimetype": lang.mimetype,
                "file_extension": lang.extensions[0] if lang.extensions else ""}
        if lang.codemirror_mode:
            info["codemirror_mode"] = lang.codemirror_mode
        if lang.pygments_lexer:
            info["pygments_lexer"] = lang.pygments_lexer
        return info

    @property
    def banner(self) -> str:
        where = self._cluster.url if self._cluster else "the cluster (none reached yet)"
        return (f"{self.lang.display_name} (distexec): each cell is a {self.lang.display_name} program "
                f"run on {where}.\nOptions on a cell's first lines: {', '.join(cells.OPTIONS)}; "
                f"`{cells.FILE_CELL} NAME` keeps a file for later cells.")

    @property
    def kernel_info(self) -> dict:
        info = super().kernel_info
        # ipykernel lists "debugger" whenever debugpy is installed; cells run
        # remotely, so there is nothing here to debug.
        info["supported_features"] = [f for f in info.get("supported_features", []) if f != "debugger"]
        return info

    def _toolchain_version(self) -> str | None:
        """The version of the toolchain the cluster's slaves run, from ``GET /api/languages``."""
        if self._version is None and self._cluster_or_none(quiet=True) is not None:
            try:
                found = [x for x in self._cluster.languages() if x["name"] == self.lang.name]
            except DistexecError:
                found = []
            if found and found[0].get("version"):
                self._version = str(found[0]["version"])
        return self._version

    # -- the cluster --------------------------------------------------------------------------

    def _connect(self) -> Cluster:
        """The cluster, found like the magic finds it; raises what says why there is none."""
        if self._cluster is None:
            try:
                self._cluster = Cluster()
            except BaseException:
                self._connect_failed_at = time.monotonic()
                raise
        return self._cluster

    def _cluster_or_none(self, quiet: bool) -> Cluster | None:
        if self._cluster is None and quiet and time.monotonic() - self._connect_failed_at < RETRY_INFO_AFTER:
            return None
        try:
            return self._connect()
        except (DistexecError, config.ConnectionConfigError):
            return None

    # -- execute ---------------------------------------------------------------------------------

    async def do_execute(self, code, silent, store_history=True, user_expressions=None, allow_stdin=False,
                         **kwargs):
        """Run the cell on the cluster; see the module's docstring."""
        job: list[Job] = []  # the cell's job once submitted, for an interrupt that comes at any point
        try:
            return self._execute(code, silent, job)
        except KeyboardInterrupt:
            # Job.follow handles an interrupt while the job runs; this one came
            # between its steps (submitting, showing the result).
            if job:
                try:
                    if not job[0].done:
                        job[0].cancel().wait(timeout=10)
                except (DistexecError, TimeoutError, KeyboardInterrupt):
                    pass  # shown as it stands; the master has the cancel request
                return self._failed(job[0].record, interrupted=True)
            return self._error("KeyboardInterrupt", "interrupted before the job was submitted",
                               ["KeyboardInterrupt: interrupted before the job was submitted"])

    def _execute(self, code: str, silent: bool, job_box: list) -> dict:
        if not code.strip():
            return self._ok()
        try:
            cell = cells.parse(code, self.lang.name)
            if isinstance(cell, cells.FileCell):
                return self._keep_file(cell, silent)
            files = {**self.kept_files, **cells.read_files(cell.files)}
        except cells.OptionError as exc:
            return self._error(USAGE, str(exc), [f"{USAGE}: {exc}"])
        try:
            cluster = self._connect()
        except (DistexecError, config.ConnectionConfigError) as exc:
            said = str(exc).rstrip(".")
            # "no cluster found" already says how to get one: the advice once, not twice.
            advice = ("" if "`distexec up`" in said else
                      " Start one with `distexec up`, log in to one with `distexec login URL --user NAME` (in a "
                      "terminal), or set DISTEXEC_URL and DISTEXEC_TOKEN.")
            msg = (f"no distexec cluster to run this {self.lang.display_name} cell: {said}.{advice} "
                   f"Then run the cell again.")
            return self._error(NO_CLUSTER, msg, [msg])
        session = cell.session or self.session_name
        try:
            with interrupts.held() as interrupt:
                job = cluster.submit(cell.source, language=self.lang.name, files=files or None,
                                     args=cell.args or None, stdin=cell.stdin, timeout=cell.timeout,
                                     name=f"{self.lang.name} cell {self.execution_count}", session=session)
                job.id  # the master's answer to the (pipelined) submission: a refusal is raised here
        except DistexecError as exc:
            if exc.status == 401:
                # The login expired (or the master no longer takes the token): the next cell connects
                # anew, so a login made meanwhile (`distexec login`) serves it with no kernel restart.
                self._cluster = None
                cluster.close()
                msg = (f"{exc}. Log in again (`distexec login URL --user NAME` in a terminal), then run the "
                       f"cell again.")
                return self._error(exc.code or "unauthorized", msg, [msg])
            return self._error(exc.code or "DistexecError", str(exc), [f"{exc.code}: {exc}"])
        job_box.append(job)
        self._session_used |= session is not None and session == self.session_name
        if interrupt.pressed:  # while it was being submitted: cancelled, as it would be a moment later
            job.cancel_and_wait()
            return self._failed(job.record, True)
        if cell.no_wait:
            if not silent:
                self._show(D.status_bundle(job.record))
            return self._ok()

        written = []

        def write(stream: str, text: str) -> None:
            written.append((stream, text))
            if not silent:
                self._stream(stream, text)

        interrupted = job.follow(write)
        record = job.record
        if not silent and not interrupted:
            self._show_outputs(written, record)  # as the magic: a failed cell's displays show too
        if interrupted or record["status"] != P.SUCCEEDED:
            return self._failed(record, interrupted)
        if not silent:
            self._show(D.status_bundle(record))
        return self._ok()

    def _keep_file(self, cell: cells.FileCell, silent: bool) -> dict:
        if cell.text is None:
            gone = self.kept_files.pop(cell.name, None)
            note = f"forgot {cell.name}" if gone is not None else f"no kept file {cell.name} to forget"
        else:
            self.kept_files[cell.name] = cell.text
            note = (f"kept {cell.name} ({len(cell.text.splitlines())} lines): "
                    f"sent with every later cell")
        if not silent:
            self.send_response(self.iopub_socket, "stream", {"name": "stdout", "text": note + "\n"})
        return self._ok()

    def _show(self, bundle: dict) -> None:
        self.send_response(self.iopub_socket, "display_data", {"data": bundle, "metadata": {}})

    def _stream(self, stream: str, text: str) -> None:
        self.send_response(self.iopub_socket, "stream", {"name": stream, "text": text})

    def _show_outputs(self, written: list[tuple[str, str]], record: dict) -> None:
        """The job's rich outputs (nbformat-style, from a session's display calls), when it has any:
        the cell redrawn with each where it came (outputs.in_place), or after what was streamed."""
        redrawn = in_place(written, record)
        if redrawn is not None:
            self.send_response(self.iopub_socket, "clear_output", {"wait": True})
        for kind, item in redrawn if redrawn is not None else [("output", out) for out in rich_outputs(record)]:
            if kind != "output":
                self._stream(kind, item)
                continue
            content = {"data": item.get("data", {}), "metadata": metadata_of(item)}
            if item.get("output_type") == "execute_result":
                content["execution_count"] = self.execution_count
                self.send_response(self.iopub_socket, "execute_result", content)
            else:
                self.send_response(self.iopub_socket, "display_data", content)

    # -- replies ---------------------------------------------------------------------------------

    def _ok(self) -> dict:
        return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def _failed(self, record: dict, interrupted: bool = False) -> dict:
        err = record.get("error") or {}
        ename = err.get("code") or (P.CANCELLED_CODE if interrupted else record["status"])
        return self._error(ename, err.get("message") or record["status"],
                           D.failure_lines(record, interrupted=interrupted))

    def _error(self, ename: str, evalue: str, traceback: list[str]) -> dict:
        content = {"ename": ename, "evalue": evalue, "traceback": traceback}
        self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    # -- the other requests --------------------------------------------------------------------

    async def do_is_complete(self, code):
        return cells.is_complete(code, self.lang.name)

    async def do_complete(self, code, cursor_pos):
        return cells.complete(code, len(code) if cursor_pos is None else cursor_pos, self.lang.name)

    async def do_shutdown(self, restart):
        if self._cluster is not None:
            # The kernel's own session only: one named with %session may be shared.
            if self._session_used:
                try:
                    self._cluster.end_session(self.session_name)
                except DistexecError:
                    pass  # already gone (ended, idle past its TTL, slave lost)
            self._cluster.close()
            self._cluster = None
        return {"status": "ok", "restart": restart}


class DistexecKernelApp(IPKernelApp):
    """Exits on a shutdown request, rather than hanging until the front end kills it.

    ipykernel's control thread, once the shutdown is handled, flushes stdout through the IOPub
    thread and waits for it (up to 10 s).  Meanwhile the main loop has stopped and
    ``IPKernelApp.close`` (an atexit handler) stops that IOPub thread, then joins the control
    thread: the flush is never done, and jupyter_client killed the kernel after 2.6 s, two
    shutdowns in three.  IPython's kernel has atexit handlers of its own that give the flush
    time; this one lets the control thread end first (atexit runs the last registered first).
    """

    def initialize(self, argv=None):
        super().initialize(argv)
        atexit.register(self._control_thread_done)

    def _control_thread_done(self) -> None:
        thread = getattr(self, "control_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    """``python -m distexec_kernel.kernel --language L -f CONNECTION_FILE``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--language" in argv:
        i = argv.index("--language")
        argv[i:i + 2] = [f"--DistexecKernel.language_name={argv[i + 1]}"] if i + 1 < len(argv) else []
    DistexecKernelApp.launch_instance(argv=argv, kernel_class=DistexecKernel)


if __name__ == "__main__":
    main()
