"""Persistent Python sessions: one Jupyter kernel per session name.

A job with ``session=NAME`` runs as a cell in the kernel named NAME on this
slave, so its variables are there for the next job of NAME, as on an
ipyparallel engine.  The master sends all jobs of one session here, one at a
time; ``SessionRunner`` still takes a lock per session so two cells never
interleave.

The kernel is ipykernel, driven with jupyter_client's ``AsyncKernelClient``
over IPC sockets in the session's private directory.  We start the kernel
process ourselves (not through ``KernelManager``) so that it is spawned
through the slave's ``Sandbox`` like every other job, in its own process
group, and dies with the slave (``PR_SET_PDEATHSIG``) even if the slave is
killed outright.

How a cell ends maps onto the job outcomes of a fresh process:
- an exception: ``failed`` / ``nonzero_exit``, exit code 1, the traceback in
  stderr; the session lives on.  ``sys.exit(n)`` is exit code ``n``.
- past its timeout, past the output limit, or cancelled: the cell is
  interrupted (KeyboardInterrupt, asked over the kernel's control channel);
  if it does not stop within ``INTERRUPT_GRACE`` the kernel is killed and
  the session ends (the next job starts a new one and says so in its stderr).
- past the memory limit: the session ends (its memory is its variables).
- the session is ended from outside (``DELETE /api/sessions/NAME``): the
  running cell's job is ``cancelled``.
- the interpreter dies (``os._exit``, a crash): the job fails with the exit
  code or signal, and the session ends.
Idle sessions end after ``ttl`` seconds; all end when the slave stops.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from distexec_kernel import languages as L, protocol as P

from .runner import (_SIGNALS_SEEN_AS_EXIT, Outcome, OutputCallback, Runner, _Capture, _kill_group, _signal_error,
                     _watch_memory)
from . import safefs
from .sandbox import Limits, Sandbox

log = logging.getLogger("distexec.slave.sessions")

DEFAULT_TTL = 1800.0  # seconds an idle session lives
KERNEL_START_TIMEOUT = 60.0  # a loaded 2-core machine can take a few seconds
INTERRUPT_GRACE = 3.0  # seconds a cell has to stop after SIGINT before the kernel is killed
REPLY_TIMEOUT = 5.0  # seconds to wait for the shell reply once the cell went idle
CONNECTION_FILE = ".distexec-kernel.json"
SOCKET_PREFIX = ".distexec-k"  # ipc sockets .distexec-k-1 ... -5
MAX_IPC_PATH = 100  # sun_path is 108 bytes; leave room for "-N"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CELL_LINE = re.compile(r"Cell In\[\d+\], line (\d+)")
SESSION_ARGV0 = "main.py"  # what a fresh process job sees as sys.argv[0]
# Tasks (threads) ipykernel and zmq run for themselves: 11 measured with
# ipykernel 7.  They are added to --max-procs, which stays the cells' own budget.
KERNEL_TASKS = 16


def _die_with_slave() -> None:
    # Between fork and exec: if the slave dies, however it dies, so does the kernel.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def kernel_argv(connection_file: str) -> list[str]:
    """ipykernel's python3 kernel, run by the slave's own interpreter.

    Not whatever kernelspec named python3 the machine has: that one may be
    another Python without ipykernel; ours has it as a dependency.
    """
    # Plain tracebacks, and no history database written into the job's home.
    return [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file,
            "--InteractiveShell.colors=nocolor", "--HistoryManager.enabled=False",
                   "--IPKernelApp.log_level=ERROR"]


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
    ended_reason: str | None = None  # set once it is ended, for a cell still running then
    # (args, stdin) the kernel's sys.argv / sys.stdin were last set to.
    io_state: tuple | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class SessionRunner:
    """Runs Python jobs that name a session in that session's kernel."""

    def __init__(self, sandbox: Sandbox, limits: Limits, workroot: str | None = None,
                 ttl: float = DEFAULT_TTL):
        self.sandbox = sandbox
        self.limits = limits
        self.workroot = workroot
        self.ttl = ttl
        self.sessions: dict[tuple, Session] = {}
        # Why a session of that key ended here, for the note in the next job's stderr.
        self.ended: dict[tuple, str] = {}
        # Called with (key, reason) when a session ends on its own (idle,
        # interpreter died, restarted): the agent tells the master.
        self.on_ended: Callable[[tuple, str], None] | None = None
        self._starting: dict[tuple, asyncio.Future] = {}
        self._reaper: asyncio.Task | None = None
        self._closed = False

    def describe(self) -> str:
        return (f"python sessions: one ipykernel per session, ended after {self.ttl:g} s idle; each kernel "
                f"runs in the same sandbox as a job's process, its memory limit covering the whole session")

    def session_names(self) -> list[tuple]:
        """Keys of the sessions alive here, and of those whose kernel is starting (a job waits on it)."""
        return sorted(set(self.sessions) | set(self._starting), key=repr)

    # -- the Runner interface ------------------------------------------------

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        name = P.session_key(job.get("user"), job["session"])
        if L.canonical(job.get("language") or "") != "python":
            return Outcome(None, P.error(P.UNSUPPORTED_LANGUAGE, "sessions run Python only"))
        if self._closed:
            return Outcome(None, P.error(P.INTERNAL_ERROR, "the slave is stopping"))
        capture = _Capture(self.limits.output_bytes, on_output)
        session = self.sessions.get(name)
        if session is None or not session.alive:
            if session is not None:
                await self._end(session, "its interpreter exited", notify=True)
            note = job.get("session_note") or (
                f"session {name[1]!r} ended earlier ({self.ended[name]}); this job starts a new one"
                if name in self.ended else None)
            started = self._starting.get(name)
            if started is None:
                started = self._starting[name] = asyncio.ensure_future(self._start(name))
                started.add_done_callback(lambda f: self._starting.pop(name, None))
            cancelled = asyncio.ensure_future(cancel.wait())
            await asyncio.wait([started, cancelled], return_when=asyncio.FIRST_COMPLETED)
            cancelled.cancel()
            if not started.done():
                # The kernel keeps starting, for the session's next job.
                started.add_done_callback(lambda f: f.cancelled() or f.exception())
                return Outcome(None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
            try:
                session = started.result()
            except Exception as exc:
                log.exception("session %r did not start", name)
                return Outcome(None, P.error(P.INTERNAL_ERROR, f"the session's interpreter did not start: {exc}"))
            if note:
                text = f"distexec: {note}\n"
                capture.feed("stderr", text, len(text.encode()))
        async with session.lock:
            session.last_used = time.monotonic()
            try:
                outcome = await self._execute(session, job, capture, cancel)
                # Files out: the session's directory lives on, but the cell is over.
                return await outcome.collect(session.workdir, job.get("collect"), capture.on_output or _ignore)
            finally:
                session.jobs += 1
                session.last_used = time.monotonic()

    async def close(self) -> None:
        """End every session: no kernel outlives the slave."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        starting = list(self._starting.values())
        for fut in starting:
            fut.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        for session in list(self.sessions.values()):
            await self._end(session, "the slave stopped", notify=False)

    async def end_session(self, name: tuple, reason: str = "ended by a user") -> bool:
        """End the session of key ``name`` now (a running cell is killed); False if there is none."""
        session = self.sessions.get(name)
        if session is None:
            return False
        await self._end(session, reason, notify=False)
        return True

    # -- kernels ---------------------------------------------------------------

    async def _start(self, name: tuple) -> Session:
        from jupyter_client.asynchronous import AsyncKernelClient
        from jupyter_client.connect import write_connection_file

        workdir = tempfile.mkdtemp(prefix="distexec-session-", dir=self.workroot)
        conn_file = os.path.join(workdir, CONNECTION_FILE)
        ipc = os.path.join(workdir, SOCKET_PREFIX)
        # Unix sockets, not TCP: they reach into a sandbox without a network.
        if len(ipc.encode()) > MAX_IPC_PATH:
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"the session's socket path {ipc!r} is longer than {MAX_IPC_PATH} bytes: "
                               "start the slave with a shorter --workdir")
        write_connection_file(conn_file, ip=ipc, transport="ipc", kernel_name="python3")
        # No JPY_PARENT_PID: inside a PID namespace the kernel's parent is pid 1,
        # which ipykernel's poller takes for "the parent died".  PDEATHSIG (and
        # bubblewrap's --die-with-parent) do that job.  No timeout: the CPU-time
        # backstop is per job, and a kernel outlives many jobs.
        limits = dataclasses.replace(self.limits, max_procs=self.limits.max_procs + KERNEL_TASKS)
        spawn = self.sandbox.command(kernel_argv(conn_file), workdir, {}, limits)

        def preexec() -> None:
            if spawn.preexec is not None:
                spawn.preexec()
            _die_with_slave()

        log_file = open(os.path.join(workdir, ".distexec-kernel.log"), "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *spawn.argv, cwd=spawn.cwd, env=spawn.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file, start_new_session=True,
                preexec_fn=preexec)
        finally:
            log_file.close()
        client = AsyncKernelClient()
        client.load_connection_file(conn_file)
        client.allow_stdin = True
        # No heartbeat channel: we hold the process and see it exit, and the
        # heartbeat misreports a kernel still starting on a loaded machine.
        client.start_channels(hb=False)
        session = Session(name, workdir, proc, client, spawn=spawn)
        ready = asyncio.ensure_future(asyncio.wait_for(_until_ready(client), KERNEL_START_TIMEOUT))
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                raise RuntimeError(f"it exited with code {proc.returncode}: {self._kernel_log(workdir)}")
            try:
                ready.result()
            except asyncio.TimeoutError:
                raise RuntimeError(f"it did not answer within {KERNEL_START_TIMEOUT:g} s: "
                                   f"{self._kernel_log(workdir)}") from None
        except BaseException:
            ready.cancel()
            await self._dispose(session)
            raise
        finally:
            exited.cancel()
        if self._closed:
            await self._dispose(session)
            raise RuntimeError("the slave is stopping")
        self.sessions[name] = session
        self.ended.pop(name, None)
        self._arm_reaper()
        log.info("session %r started (kernel pid %d)", name, proc.pid)
        return session

    @staticmethod
    def _kernel_log(workdir: str) -> str:
        try:
            with open(os.path.join(workdir, ".distexec-kernel.log"), errors="replace") as f:
                return f.read()[-2000:].strip() or "no output"
        except OSError:
            return "no log"

    async def _end(self, session: Session, reason: str, *, notify: bool) -> None:
        session.ended_reason = session.ended_reason or reason
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self.ended[session.key] = reason
            while len(self.ended) > 1000:  # only for the next job's note: keep the newest
                del self.ended[next(iter(self.ended))]
        await self._dispose(session)
        log.info("session %r ended: %s", session.key, reason)
        if notify and self.on_ended is not None:
            self.on_ended(session.key, reason)

    async def _dispose(self, session: Session) -> None:
        try:
            session.client.stop_channels()
        except Exception:
            pass
        _kill_group(session.proc.pid)
        if session.proc.returncode is None:
            try:
                await asyncio.wait_for(session.proc.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("session %r: kernel %d did not die", session.key, session.proc.pid)
        # Off the event loop: a long session's directory can be large, and the loop answers the pings.
        await asyncio.to_thread(self.sandbox.cleanup, session.spawn)
        await asyncio.to_thread(shutil.rmtree, session.workdir, ignore_errors=True)

    def _arm_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        """End sessions idle for longer than the TTL."""
        while self.sessions:
            await asyncio.sleep(max(0.05, min(self.ttl / 4, 30.0)))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if not session.lock.locked() and now - session.last_used > self.ttl:
                    await self._end(session, f"idle for more than {self.ttl:g} s", notify=True)

    # -- one cell ----------------------------------------------------------------

    async def _execute(self, session: Session, job: dict, capture: _Capture,
                       cancel: asyncio.Event) -> Outcome:
        kc = session.client
        files = {name: P.file_bytes(content, name) for name, content in (job.get("files") or {}).items()}
        if files:
            # The kernel (the job's uid) owns this directory and may have planted
            # links or FIFOs under these names: see safefs.  Off the loop, too.
            try:
                await asyncio.to_thread(safefs.write_files, session.workdir, files, self.sandbox.file_owner)
            except OSError as exc:
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
        msg_id = kc.execute(job["source"], silent=False, store_history=True, allow_stdin=True,
                            stop_on_error=False)
        lines = iter((stdin or "").splitlines())
        state = _CellState()
        reader = asyncio.ensure_future(self._read_cell(session, msg_id, capture, state))
        inputs = asyncio.ensure_future(_answer_input(kc, msg_id, lines, capture))
        exited = asyncio.ensure_future(session.proc.wait())
        cancelled = asyncio.ensure_future(cancel.wait())
        if getattr(session.spawn, "watch_memory", True):
            watcher = asyncio.ensure_future(_watch_memory(session.proc.pid, self.limits.memory_bytes, capture))
        else:  # the sandbox's cgroup holds the limit; we learn of it when the kernel is killed
            watcher = asyncio.ensure_future(asyncio.Event().wait())
        timeout = job.get("timeout") or P.DEFAULT_TIMEOUT
        deadline = time.monotonic() + timeout
        reason = None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = "timeout"
                    break
                done, _ = await asyncio.wait([reader, exited, cancelled, watcher], timeout=min(remaining, 0.5),
                                             return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    if session.ended_reason is not None or not session.alive:
                        # Its sockets were closed under it (the session was ended).
                        reason = "exited"
                    else:
                        reader.result()
                    break
                if exited in done:
                    reason = "exited"
                    break
                if cancelled in done:
                    reason = "cancelled"
                    break
                if watcher in done:
                    reason = watcher.result()
                    break
                if capture.over:
                    reason = "output_limit"
                    break
            if reason in ("timeout", "cancelled", "output_limit"):
                await self._interrupt(session, reader, capture)
            elif reason is None and capture.over:
                reason = "output_limit"  # the cell ended, but past the limit
        finally:
            for fut in (inputs, cancelled, watcher, exited, reader):
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
            if self.sessions.get(session.key) is session:
                await self._end(session, "it used more than the memory limit", notify=True)
            capture.feed("stderr", "distexec: the session was ended (memory limit): its variables are gone; "
                         "the next job starts a new one\n", 0)
        elif reason == "exited" or not session.alive:
            await asyncio.wait([asyncio.ensure_future(session.proc.wait())], timeout=5.0)
            code = session.proc.returncode
            if self.sessions.get(session.key) is session:
                await self._end(session, f"its interpreter exited (code {code})", notify=True)
            if reason in (None, "exited"):
                if code is not None and code < 0:
                    err = _signal_error(-code)
                    err["message"] += "; the session has ended, its variables are gone"
                elif code is not None and code > 128 and code - 128 in _SIGNALS_SEEN_AS_EXIT:
                    err = _signal_error(code - 128)  # through a sandbox wrapper
                    err["message"] += "; the session has ended, its variables are gone"
                else:
                    err = P.error(P.NONZERO_EXIT, f"the session's interpreter exited with code {code}; "
                                  "the session has ended, its variables are gone")
                return self._outcome(code, err, capture)
        if reason == "timeout":
            return self._outcome(None, P.error(P.TIMEOUT, f"ran past its timeout of {timeout:g} s"), capture)
        if reason == "cancelled":
            return self._outcome(None, P.error(P.CANCELLED_CODE, "cancelled by a user"), capture)
        if reason == "output_limit":
            return self._outcome(None, P.error(
                P.OUTPUT_LIMIT, f"wrote more than the output limit of {self.limits.output_bytes >> 20} MiB"), capture)
        if reason == "memory_limit":
            return self._outcome(None, P.error(
                P.MEMORY_LIMIT, f"used more than the memory limit of {self.limits.memory_bytes >> 20} MiB"), capture)
        if state.exit_requested:
            # exit() in a cell: end the session after it, as a terminal would.
            await self._end(session, "the program called exit()", notify=True)
        if state.ename == "SystemExit":
            code = _exit_code(state.evalue)
            if code == 0:
                return self._outcome(0, None, capture)
            return self._outcome(code, P.error(P.NONZERO_EXIT, f"exited with code {code}"), capture)
        if state.ename is not None:
            return self._outcome(1, P.error(P.NONZERO_EXIT, f"{state.ename}: {state.evalue}",
                                            line=state.line), capture)
        return self._outcome(0, None, capture)

    @staticmethod
    def _outcome(exit_code, err, capture: _Capture) -> Outcome:
        return Outcome(exit_code, err, capture.text("stdout"), capture.text("stderr"), outputs=capture.outputs)

    async def _interrupt(self, session: Session, reader: asyncio.Future, capture: _Capture) -> None:
        """Interrupt the cell (KeyboardInterrupt); end the session if it does not stop.

        Asked over the control channel, so the kernel signals itself: a
        signal from out here would reach only the sandbox's wrapper.
        """
        kc = session.client
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        done, _ = await asyncio.wait([reader], timeout=INTERRUPT_GRACE)
        if reader not in done and session.alive:
            await self._end(session, "its interpreter did not stop when interrupted", notify=True)
            capture.feed("stderr", "distexec: the session did not stop when interrupted, so it was "
                         "ended: its variables are gone; the next job starts a new one\n", 0)

    async def _read_cell(self, session: Session, msg_id: str, capture: _Capture, state: "_CellState") -> None:
        """Stream the cell's output until the kernel is idle again, then take its reply."""
        kc = session.client
        while True:
            msg = await kc.get_iopub_msg()
            kind = msg["msg_type"]
            content = msg["content"]
            ours = msg.get("parent_header", {}).get("msg_id") == msg_id
            if kind == "stream":
                # Output from threads an earlier cell started shows here too, as in Jupyter.
                stream = "stderr" if content.get("name") == "stderr" else "stdout"
                text = content.get("text", "")
                capture.feed(stream, text, len(text.encode()))
            elif kind in ("execute_result", "display_data", "update_display_data") and ours:
                data = content.get("data") or {}
                text = data.get("text/plain")
                if text is not None:  # terminals and plain clients read this in stdout, as before
                    text += "\n"
                    capture.feed("stdout", text, len(text.encode()))
                if kind != "update_display_data" and isinstance(data, dict):
                    # The whole bundle travels too, in order, counted against the output limit.
                    bundle = {"output_type": kind, "data": data, "metadata": content.get("metadata") or {}}
                    capture.feed("stdout", "", len(json.dumps(bundle, ensure_ascii=False).encode()))
                    if not capture.over:
                        capture.outputs.append(bundle)
            elif kind == "error" and ours:
                state.ename, state.evalue = content.get("ename"), content.get("evalue")
                if state.ename != "SystemExit":
                    tb = ANSI.sub("", "\n".join(content.get("traceback") or [])) + "\n"
                    lines = CELL_LINE.findall(tb)
                    state.line = int(lines[-1]) if lines else None
                    capture.feed("stderr", tb, len(tb.encode()))
            elif kind == "status" and ours and content.get("execution_state") == "idle":
                break
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                reply = await kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                for payload in reply["content"].get("payload") or []:
                    if payload.get("source") == "ask_exit" and not payload.get("keepkernel"):
                        state.exit_requested = True
                break


def _ignore(stream: str, text: str) -> None:
    pass


async def _until_ready(kc) -> None:
    """Ask for kernel_info until the kernel answers and its output channel is connected.

    What ``wait_for_ready`` does, minus its heartbeat check.
    """
    while True:
        kc.kernel_info()
        try:
            msg = await kc.get_shell_msg(timeout=1.0)
        except queue.Empty:
            continue
        if msg["msg_type"] != "kernel_info_reply":
            continue
        try:
            # The reply's busy/idle status on iopub proves the subscription is live.
            await kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        break
    while True:  # drop what the handshake left on iopub
        try:
            await kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            return


@dataclass
class _CellState:
    ename: str | None = None
    evalue: str | None = None
    line: int | None = None
    exit_requested: bool = False


def _exit_code(evalue: str | None) -> int:
    if evalue in (None, "", "None"):
        return 0
    try:
        return int(evalue)
    except ValueError:
        return 1  # sys.exit("message"): Python exits with 1 and prints it


async def _answer_input(kc, msg_id: str, lines, capture: _Capture) -> None:
    """Serve ``input()`` from the job's stdin, one line per call; EOFError at its end."""
    while True:
        msg = await kc.get_stdin_msg()
        if msg["msg_type"] != "input_request" or msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        prompt = msg["content"].get("prompt") or ""
        if prompt:
            # What the cell printed before input() was flushed to iopub before
            # this request left, but travels on another socket: let it land first.
            await _iopub_settled(kc)
            capture.feed("stdout", prompt, len(prompt.encode()))
        kc.input(next(lines, "\x04"))  # ipykernel raises EOFError for \x04


async def _iopub_settled(kc, most: float = 0.2) -> None:
    import zmq
    deadline = time.monotonic() + most
    socket = kc.iopub_channel.socket
    while time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        if not socket.get(zmq.EVENTS) & zmq.POLLIN:
            await asyncio.sleep(0)  # the reader handles what it took last
            return


class RoutingRunner:
    """The slave's one ``Runner``: jobs that name a session go to the sessions,
    the rest to the runner of fresh processes."""

    def __init__(self, processes: Runner, sessions: SessionRunner):
        self.processes = processes
        self.sessions = sessions

    def describe(self) -> str:
        return f"{self.processes.describe()}; {self.sessions.describe()}"

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        runner = self.sessions if job.get("session") else self.processes
        return await runner.run(job, on_output, cancel)

    async def close(self) -> None:
        await self.sessions.close()
        await self.processes.close()

    # What the agent asks of a runner that keeps sessions.
    def session_names(self) -> list[tuple]:
        return self.sessions.session_names()

    async def end_session(self, name: tuple, reason: str = "ended by a user") -> bool:
        return await self.sessions.end_session(name, reason)

    @property
    def on_session_ended(self):
        return self.sessions.on_ended

    @on_session_ended.setter
    def on_session_ended(self, callback) -> None:
        self.sessions.on_ended = callback
