"""One job run as a cell of a live session: its files, argv and stdin, the wait, and how it ended.

``SessionRunner`` (sessions.py) owns the kernels: starting, ending, reaping
them.  ``CellRunner`` runs one cell in a kernel it is given, with the same
supervisor and classifier as a fresh process (steps.py), and asks its
``end`` callback to end the session when the cell leaves it unusable (the
interpreter died, hit the memory limit, did not stop when interrupted,
called exit()).  How a cell ends maps onto the job outcomes of a fresh
process; see sessions.py's docstring.
"""
from __future__ import annotations

import asyncio
import errno
import json
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from distexec_kernel import diagnostics as D, protocol as P
from distexec_kernel.job_record import OUTPUT_PLACE
from distexec_kernel.rich_outputs import clean_mime_data

from . import safefs, steps
from .jobdirs import JobDir, JobDirs
from .kernel_io import ANSI, CELL_LINE, CELL_NAME, CellState, IopubPump, answer_input, exit_code
from .runner import Outcome, Capture, watch_memory, disk_error
from .sandbox import Limits, Sandbox

INTERRUPT_GRACE = 3.0  # seconds a cell has to stop after SIGINT before the kernel is killed
REPLY_TIMEOUT = 5.0  # seconds to wait for the shell reply once the cell went idle
# The reply is sent before the idle status; one still missing this long after it (seconds) may have
# been dropped, so the kernel is asked (a probe).  A probe sent early does no harm: it is silent.
PROBE_AFTER_IDLE = 0.1
# Once the reply came, the idle status is waited for while iopub still gives messages (the backlog a
# thread of an earlier cell flooded it with, this cell's output behind it), until it has been silent
# this long (seconds), and SETTLE_MOST at most: the status may have been dropped (a cut message).
SETTLE_AFTER_REPLY = 1.0
SETTLE_MOST = 10.0
SESSION_ARGV0 = "main.py"  # what a fresh process job sees as sys.argv[0]
# A session's kernel is capped at one core while a cell runs (what a slot is
# worth); sessions.py caps it lower between cells.
CELL_CPUS = 1.0


def _cell_name(session: Session, count: int, as_said: str) -> str:
    """``Cell In[6]`` as the user knows it: the job that ran it (the notebook's In[] differs)."""
    job_id = session.cells.get(count)
    return as_said if job_id is None else f"Cell of job {job_id}"


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# How deep a bundle may nest: the frames that carry it put it 4 levels down (a batch to a client,
# ``[{"job": {"outputs": [bundle]}}]``; a register's ``results``), and the master refuses a frame past
# MAX_JSON_DEPTH.  A few levels to spare, so a new envelope does not lose a user's bundle to its refusal.
BUNDLE_DEPTH = P.MAX_JSON_DEPTH - 8

# An object's default repr (``<Figure size 640x480 with 1 Axes>``, ``<IPython.core.display.HTML object>``).
_PLACEHOLDER = re.compile(r"<[^\n]*>")


def placeholder(data: dict) -> bool:
    """Whether a rich output's ``text/plain`` only stands in for what its other types show.

    It is left out of stdout: a notebook shows the figure or the HTML where a local
    cell's output shows no such line, and a terminal learns nothing from it.
    """
    text = data.get("text/plain")
    return isinstance(text, str) and len(data) > 1 and _PLACEHOLDER.fullmatch(text.strip()) is not None


@dataclass
class Session:
    """One live kernel and what we know of it."""

    key: tuple  # (user, name): see protocol.session_key
    workdir: str
    proc: asyncio.subprocess.Process
    client: object  # jupyter_client AsyncKernelClient
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    jobs: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    spawn: object = None  # the sandbox's Spawn, for its cleanup
    jobdir: JobDir | None = None  # its directory, on its disk quota
    pump: IopubPump | None = None  # reads (and drops what is not a cell's) on iopub
    relays: list = field(default_factory=list)  # zmtp_relay.Relay per socket, between the client and the kernel
    own_pids: frozenset = frozenset()  # the kernel and its sandbox wrappers: all else is a cell's leftover
    ended_reason: str | None = None  # set once it is ended, for a cell still running then
    # (args, stdin) the kernel's sys.argv / sys.stdin were last set to.
    io_state: tuple | None = None
    # The kernel's execution count -> the job that ran that cell: a traceback names jobs, not In[N].
    cells: dict = field(default_factory=dict)
    box: object = None  # the sandbox it runs in, as its own uid
    uid: object = None  # that uid's hold (uids.Uid), released once the kernel is gone

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class CellRunner:
    """Runs cells in sessions' kernels; ``end(session, reason)`` ends a session if it is still the live one."""

    def __init__(self, sandbox: Sandbox, limits: Limits, jobdirs: JobDirs,
                 end: Callable[[object, str], Awaitable[None]]):
        self.sandbox = sandbox
        self.limits = limits
        self.jobdirs = jobdirs
        self.end = end

    async def execute(self, session: Session, job: dict, capture: Capture, cancel: asyncio.Event) -> Outcome:
        """Run ``job`` as a cell of ``session``; how it ended, as a fresh process's would be told."""
        kc = session.client
        files = P.files_of(job)
        if files:
            # The kernel (the job's uid) owns this directory and may have planted
            # links or FIFOs under these names: see safefs.  Off the loop, too.
            try:
                await asyncio.to_thread(safefs.write_files, session.workdir, files,
                                        (session.box or self.sandbox).file_owner)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return self._outcome(None, disk_error(self.jobdirs, "the job's files do not fit in the "
                                                          "session's directory under"), capture)
                return self._outcome(None, P.error(P.INTERNAL_ERROR, f"the job's files could not be written: "
                                                   f"{exc}"), capture)
        args = tuple(job.get("args") or ())
        stdin = job.get("stdin")
        if (args, stdin) != session.io_state or stdin is not None:
            # Each job sees its own argv and stdin, as a fresh process would.
            # Shell requests run in order, so the cell below runs after this.
            setup = (f"__import__('sys').argv = {[SESSION_ARGV0, *args]!r}; "
                     f"__import__('sys').stdin = __import__('io').StringIO({stdin or ''!r})")
            if session.io_state is None:
                # IPython warns on sys.exit(); a job exiting with a code is no surprise here.
                setup += "; __import__('warnings').filterwarnings('ignore', message='To exit: use')"
            kc.execute(setup, silent=True, store_history=False, allow_stdin=False, stop_on_error=False)
            session.io_state = (args, stdin)
        if session.spawn is not None and session.spawn.cgroup is not None:
            session.spawn.cgroup.set_cpus(CELL_CPUS)  # a write or two to cgroup files: no thread needed
        msg_id = kc.execute(job["source"], silent=False, store_history=True, allow_stdin=True,
                            stop_on_error=False)
        lines = iter((stdin or "").splitlines())
        state = CellState(job_id=job.get("id"))
        # Registered before anything awaits: the pump must not drop the cell's first messages.
        idle = self._watch_cell(session, msg_id, capture, state)
        reader = asyncio.ensure_future(self._read_cell(session, msg_id, idle, state))
        inputs = asyncio.ensure_future(answer_input(kc, msg_id, lines,
                                                    lambda stream, text: _feed(capture, stream, text)))
        exited = asyncio.ensure_future(session.proc.wait())
        # Without a memory cgroup the limit is polled; with one, we learn of it when the kernel is killed.
        watcher = (asyncio.ensure_future(watch_memory(session.proc.pid, self.limits.memory_bytes, capture))
                   if getattr(session.spawn, "watch_memory", True) else None)
        ended = asyncio.ensure_future(asyncio.wait([reader, exited], return_when=asyncio.FIRST_COMPLETED))
        timeout = job["timeout"]
        try:
            reason = await steps.supervise(ended, cancel, time.monotonic() + timeout, watcher=watcher,
                                           limits=(capture.crossed, session.pump.cut))
            if reason is None:
                if exited.done() or session.ended_reason is not None or not session.alive:
                    # The interpreter died, or the session was ended (its sockets closed under the cell).
                    reason = "exited"
                else:
                    reader.result()
            if reason in ("timeout", "cancelled", "output_limit"):
                await self._interrupt(session, reader, capture, state)
            elif reason is None and (capture.over or session.pump.cut.is_set()):
                reason = "output_limit"  # the cell ended, but past the limit
        finally:
            ended.cancel()
            session.pump.end_cell()
            for fut in (inputs, watcher, exited, reader):
                if fut is None:
                    continue
                if fut.done():
                    if not fut.cancelled():
                        fut.exception()  # seen: a closed socket's error is no news here
                else:
                    fut.cancel()
        if reason in (None, "exited") and session.ended_reason is not None:
            # Ended from outside while the cell ran (a user's DELETE): the job did not fail by itself.
            return self._outcome(None, P.error(
                P.CANCELLED_CODE, f"the session was ended while this job ran ({session.ended_reason})"), capture)
        if reason == "exited":
            exceeded = getattr(self.sandbox, "memory_exceeded", None)
            if exceeded is not None and exceeded(session.spawn):
                reason = "memory_limit"  # the sandbox's cgroup killed it
        if reason == "memory_limit":
            await self.end(session, "it used more than the memory limit")
            capture.feed("stderr", "distexec: the session was ended (memory limit): its variables are gone; "
                         "the next job starts a new one\n", 0)
        elif reason == "exited" or not session.alive:
            await asyncio.wait([asyncio.ensure_future(session.proc.wait())], timeout=5.0)
            code = session.proc.returncode
            await self.end(session, f"its interpreter exited (code {code})")
            if reason in (None, "exited"):
                err = steps.exit_error(code)  # a signal, also through a sandbox wrapper
                if err is None or err["code"] == P.NONZERO_EXIT:
                    err = P.error(P.NONZERO_EXIT, f"the session's interpreter exited with code {code}")
                err["message"] += "; the session has ended, its variables are gone"
                return self._outcome(code, err, capture)
        if reason in ("timeout", "cancelled", "output_limit", "memory_limit"):
            return self._outcome(None, steps.limit_error(reason, timeout, self.limits.memory_bytes,
                                                         self.limits.output_bytes), capture)
        if state.exit_requested:
            # exit() in a cell: end the session after it, as a terminal would.
            await self.end(session, "the program called exit()")
        if state.ename == "SystemExit":
            code = exit_code(state.evalue)
            if code == 0:
                return self._outcome(0, None, capture)
            return self._outcome(code, P.error(P.NONZERO_EXIT, f"exited with code {code}"), capture)
        # What the cell raised, cut as a fresh job's is (D.brief): ``ValueError('x' * 8_000_000)`` made 8 MB of
        # error message, in every event and listing of the job.  Its traceback has it whole, in stderr.
        if state.ename is not None and session.jobdir is not None and session.jobdir.full():
            return self._outcome(1, disk_error(self.jobdirs, f"{D.brief(state.ename)}: the session wrote more "
                                                             f"than"), capture)
        if state.ename is not None:
            return self._outcome(1, P.error(P.NONZERO_EXIT, D.brief(f"{state.ename}: {state.evalue}"),
                                            line=state.line), capture)
        return self._outcome(0, None, capture)

    @staticmethod
    def _outcome(exit_code, err, capture: Capture) -> Outcome:
        return Outcome(exit_code, err, capture.text("stdout"), capture.text("stderr"), outputs=capture.outputs)

    async def _interrupt(self, session: Session, reader: asyncio.Future, capture: Capture,
                         state: CellState) -> None:
        """Interrupt the cell (KeyboardInterrupt); end the session if it does not stop.

        Asked over the control channel, so the kernel signals itself: a
        signal from out here would reach only the sandbox's wrapper.  The
        probe after it is answered once the cell is over, whether or not
        the cell's own reply survived the signal (``CellState.probe``).
        """
        kc = session.client
        if not state.started.is_set():
            # Still in the set-up before it (a moment, as a rule): a signal there would be lost on the
            # set-up, and the cell would run on.  Past the grace the cell is interrupted regardless.
            started = asyncio.ensure_future(state.started.wait())
            try:
                await asyncio.wait([reader, started], timeout=INTERRUPT_GRACE,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                started.cancel()
            if reader.done():
                return
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        _probe(kc, state)
        done, _ = await asyncio.wait([reader], timeout=INTERRUPT_GRACE)
        if reader not in done and session.alive:
            await self.end(session, "its interpreter did not stop when interrupted")
            capture.feed("stderr", "distexec: the session did not stop when interrupted, so it was "
                         "ended: its variables are gone; the next job starts a new one\n", 0)

    @staticmethod
    def _watch_cell(session: Session, msg_id: str, capture: Capture, state: CellState) -> asyncio.Future:
        """Have the pump feed the cell's messages into ``capture``; a future done when the kernel is idle."""
        idle = asyncio.get_running_loop().create_future()

        def on_message(msg: dict) -> None:
            kind = msg["msg_type"]
            content = msg["content"]
            if kind == "stream":
                stream = "stderr" if content.get("name") == "stderr" else "stdout"
                text = content.get("text", "")
                _feed(capture, stream, text)
            elif kind in ("execute_result", "display_data", "update_display_data"):
                _display(kind, content, capture)
            elif kind == "execute_input":
                state.started.set()
                state.count = content.get("execution_count")
                if isinstance(state.count, int) and state.job_id is not None:
                    session.cells[state.count] = state.job_id
            elif kind == "error":
                # ipykernel sends text; a cell may send an error of its own making, with anything in it.
                state.ename, state.evalue = (v if v is None or isinstance(v, str) else str(v)
                                             for v in (content.get("ename"), content.get("evalue")))
                if state.ename != "SystemExit":
                    frames = content.get("traceback") or []
                    frames = frames if isinstance(frames, list) else [frames]
                    tb = ANSI.sub("", "\n".join(f if isinstance(f, str) else str(f) for f in frames)) + "\n"
                    # The line is this cell's own (a frame of an earlier cell's function is not).
                    lines = [int(line) for count, line in CELL_LINE.findall(tb) if int(count) == state.count]
                    state.line = lines[-1] if lines else None
                    tb = CELL_NAME.sub(lambda m: _cell_name(session, int(m.group(1)), m.group(0)), tb)
                    _feed(capture, "stderr", tb)
                elif exit_code(state.evalue) == 1 and state.evalue not in ("1", None):
                    # sys.exit("message"): Python prints the message on stderr, as a fresh job shows it.
                    _feed(capture, "stderr", f"{state.evalue}\n")
            elif kind == "status" and content.get("execution_state") == "idle" and not idle.done():
                idle.set_result(None)

        # Only this cell's messages: what threads of earlier cells print is dropped by the pump.
        session.pump.start_cell(msg_id, on_message, state.job_id, lambda line: _feed(capture, "stderr", line))
        return idle

    async def _read_cell(self, session: Session, msg_id: str, idle: asyncio.Future, state: CellState) -> None:
        """Wait until the cell is done: the kernel idle again on iopub, and its reply on shell.

        Either may come alone: a message cut as too large (zmtp_relay)
        drops the iopub connection for a moment, and the idle status with it;
        a SIGINT as the cell ends may cost the reply (ours, or one the cell
        sent itself), and then the probe's reply stands in.
        """
        reply = asyncio.ensure_future(_shell_reply(session.client, msg_id, state))
        try:
            await asyncio.wait([idle, reply], return_when=asyncio.FIRST_COMPLETED)
            if idle.done():
                done, _ = await asyncio.wait([reply], timeout=PROBE_AFTER_IDLE)
                if not done:
                    _probe(session.client, state)
                    await asyncio.wait([reply], timeout=REPLY_TIMEOUT)
            else:  # output is flushed before the reply; the idle status follows it
                await _settled(session.pump, idle)
        finally:
            reply.cancel()


def _display(kind: str, content: dict, capture: Capture) -> None:
    """A display message: its ``text/plain`` to stdout, the bundle (not an update's) to the outputs."""
    data, metadata = content.get("data") or {}, content.get("metadata") or {}
    if not isinstance(data, dict) or not isinstance(metadata, dict):
        _feed(capture, "stderr", "distexec: a display output was dropped: its data and metadata are not "
                                 "JSON objects\n")
        return
    # A widget's view names a model that lives in the session's kernel only: no notebook
    # could draw it, so its text (a progress bar's line) stands alone.
    data = {k: v for k, v in data.items() if k != WIDGET_VIEW} if WIDGET_VIEW in data else data
    # A value a renderer cannot take (``display({'text/plain': 5, 'text/html': ['<b>']}, raw=True)``: not
    # text) is dropped and said; the protocol's rule, which the master applies again.
    data, dropped = clean_mime_data(data)
    for note in dropped:
        _feed(capture, "stderr", f"distexec: {note}\n")
    if dropped and not data:
        return
    text = data.get("text/plain")
    at = capture.chars["stdout"]
    if text is not None and not placeholder(data):  # terminals and plain clients read this in stdout
        text += "\n"
        _feed(capture, "stdout", text)
    if kind == "update_display_data":
        return
    # The whole bundle travels too, in order, counted against the output limit, with where it came
    # in stdout: a notebook shows it there (outputs.in_place).
    bundle = {"output_type": kind, "data": data, "metadata": {**metadata, OUTPUT_PLACE: {"stdout_at": at}}}
    try:
        # What the master would refuse, it would refuse in the whole job_finished: the job's result would
        # be lost, and the job left running.  Checked here, where the bundle alone can go.
        P.check_value(bundle, BUNDLE_DEPTH)
    except ValueError as exc:
        _feed(capture, "stderr", f"distexec: a display output was dropped: {exc}\n")
        return
    capture.feed("stdout", "", len(json.dumps(bundle, ensure_ascii=False).encode()))
    if not capture.over:
        capture.outputs.append(bundle)


def _feed(capture: Capture, stream: str, text: str) -> None:
    # A lone surrogate (a cell's own JSON escape) is counted, not raised on: the agent sends it as
    # U+FFFD, 3 bytes as well.  Raised on, it used to end the session's iopub reader.
    capture.feed(stream, text, len(text.encode(errors="surrogatepass")))


async def _settled(pump, idle: asyncio.Future) -> None:
    """Wait for ``idle`` while ``pump`` still hears iopub (SETTLE_AFTER_REPLY, SETTLE_MOST): with a fixed
    second, a cell run beside a flooding thread ended before its own output came, and showed none."""
    start = time.monotonic()
    while True:
        await asyncio.wait([idle], timeout=SETTLE_AFTER_REPLY)
        now = time.monotonic()
        if idle.done() or now - pump.heard >= SETTLE_AFTER_REPLY or now - start >= SETTLE_MOST:
            return


def _ignore(stream: str, text: str) -> None:
    pass


def _probe(kc, state: CellState) -> None:
    """Send the cell's probe (``CellState.probe``), once."""
    if state.probe is None:
        state.probe = kc.execute("", silent=True, store_history=False, allow_stdin=False,
                                 stop_on_error=False)


async def _shell_reply(kc, msg_id: str, state: CellState) -> None:
    while True:
        reply = await kc.get_shell_msg()
        parent = reply.get("parent_header", {}).get("msg_id")
        if state.probe is not None and parent == state.probe:
            return  # the kernel has handled what was sent after the cell: the cell is over
        if parent == msg_id:
            for payload in reply["content"].get("payload") or []:
                if payload.get("source") == "ask_exit" and not payload.get("keepkernel"):
                    state.exit_requested = True
            return
