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
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from distexec_kernel import languages as L, protocol as P
from distexec_kernel.procs import die_with_parent, kill_group

from . import safefs, steps
from .jobdirs import JobDir, JobDirs
from .kernel_io import (ANSI, CELL_LINE, MESSAGE_MARGIN, CellState, IopubPump, answer_input, close_client,
                        exit_code, make_client, until_ready)
from .runner import Outcome, OutputCallback, Runner, _Capture, _watch_memory, disk_error
from .sandbox import Limits, Sandbox

log = logging.getLogger("distexec.slave.sessions")

DEFAULT_TTL = 1800.0  # seconds an idle session lives
KERNEL_START_TIMEOUT = 60.0  # a loaded 2-core machine can take a few seconds
INTERRUPT_GRACE = 3.0  # seconds a cell has to stop after SIGINT before the kernel is killed
REPLY_TIMEOUT = 5.0  # seconds to wait for the shell reply once the cell went idle
SETTLE_AFTER_REPLY = 1.0  # seconds to wait for the idle status once the reply came
CONNECTION_FILE = ".distexec-kernel.json"
SOCKET_PREFIX = ".distexec-k"  # ipc sockets .distexec-k-1 ... -5
MAX_IPC_PATH = 100  # sun_path is 108 bytes; leave room for "-N"
DEFAULT_MAX_SESSIONS = 4  # per user: --max-sessions-per-user
# A session's kernel is capped at one core while a cell runs (what a slot is
# worth) and at a tenth of one between cells, when the slave counts its slot
# free: what a cell's threads do after it returned is all that runs then.
CELL_CPUS = 1.0
IDLE_CPUS = 0.1
STOP_STRAYS_WITHIN = 5.0  # seconds to see a cell's leftover processes gone, else the session ends
SESSION_ARGV0 = "main.py"  # what a fresh process job sees as sys.argv[0]
# Tasks (threads) ipykernel and zmq run for themselves: 11 measured with
# ipykernel 7.  They are added to --max-procs, which stays the cells' own budget.
KERNEL_TASKS = 16


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
    jobdir: JobDir | None = None  # its directory, on its disk quota
    pump: IopubPump | None = None  # reads (and drops what is not a cell's) on iopub
    own_pids: frozenset = frozenset()  # the kernel and its sandbox wrappers: all else is a cell's leftover
    ended_reason: str | None = None  # set once it is ended, for a cell still running then
    # (args, stdin) the kernel's sys.argv / sys.stdin were last set to.
    io_state: tuple | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class SessionRunner:
    """Runs Python jobs that name a session in that session's kernel."""

    def __init__(self, sandbox: Sandbox, limits: Limits, jobdirs: JobDirs | None = None,
                 ttl: float = DEFAULT_TTL, max_per_user: int = DEFAULT_MAX_SESSIONS):
        self.sandbox = sandbox
        self.limits = limits
        self.jobdirs = jobdirs or JobDirs(f"sessions-{os.getpid()}-{id(self):x}")
        self.ttl = ttl
        self.max_per_user = max_per_user
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
        return (f"python sessions: one ipykernel per session, at most {self.max_per_user} per user, ended after "
                f"{self.ttl:g} s idle; each kernel runs in the same sandbox as a job's process, its memory, "
                f"process and disk limits covering the whole session, {CELL_CPUS:g} core while a cell runs and "
                f"{IDLE_CPUS:g} between cells; processes a cell leaves running are stopped when it ends")

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
                refused = self._over_cap(name)
                if refused is not None:
                    return Outcome(None, refused)
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
                # Before the job's end is told, so its slot is never free while they run.
                stopped = await self._stop_strays(session)
                if stopped:
                    capture.feed("stderr", f"distexec: stopped {stopped} process(es) this job left running: a "
                                 "session keeps its variables, not background processes\n", 0)
                    outcome.stderr = capture.text("stderr")
                # Files out: the session's directory lives on, but the cell is over.
                return await outcome.collect(session.workdir, job.get("collect"), capture.on_output or _ignore)
            finally:
                session.jobs += 1
                session.last_used = time.monotonic()

    def _over_cap(self, name: tuple) -> dict | None:
        """The error for a job that would open one session too many for its user here, else None."""
        user = name[0]
        mine = sorted(n for u, n in set(self.sessions) | set(self._starting) if u == user)
        if len(mine) < self.max_per_user:
            return None
        return P.error(P.SESSION_LIMIT, f"{P.session_label(name)} would be session {len(mine) + 1} of its user: "
                       f"at most {self.max_per_user} (--max-sessions-per-user); open now: {', '.join(mine)}; "
                       f"end one first (%remote sessions, DELETE /api/sessions/NAME)")

    async def _stop_strays(self, session: Session) -> int:
        """Kill every process of the session but the kernel's own; how many there were.

        A session that cannot be cleared (a process that will not die) is
        ended: the slave never counts a slot free while a cell's process runs.
        """
        if not session.alive or session.ended_reason is not None:
            return 0
        killed, gone = await asyncio.to_thread(_kill_strays, session)
        if not gone and self.sessions.get(session.key) is session:
            await self._end(session, "a process it left running could not be stopped", notify=True)
        elif session.spawn is not None and session.spawn.cgroup is not None:
            await asyncio.to_thread(session.spawn.cgroup.set_cpus, IDLE_CPUS)
        return killed
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
        from jupyter_client.connect import write_connection_file

        jobdir = await asyncio.to_thread(self.jobdirs.make, "session")
        workdir = jobdir.path
        conn_file = os.path.join(workdir, CONNECTION_FILE)
        ipc = os.path.join(workdir, SOCKET_PREFIX)
        # Unix sockets, not TCP: they reach into a sandbox without a network.
        if len(ipc.encode()) > MAX_IPC_PATH:
            await asyncio.to_thread(self.jobdirs.remove, jobdir)
            raise RuntimeError(f"the session's socket path {ipc!r} is longer than {MAX_IPC_PATH} bytes: "
                               "start the slave with a shorter --workdir")
        write_connection_file(conn_file, ip=ipc, transport="ipc", kernel_name="python3")
        # No JPY_PARENT_PID: inside a PID namespace the kernel's parent is pid 1,
        # which ipykernel's poller takes for "the parent died".  PDEATHSIG (and
        # bubblewrap's --die-with-parent) do that job.  No timeout: the CPU-time
        # backstop is per job, and a kernel outlives many jobs.
        limits = dataclasses.replace(self.limits, max_procs=self.limits.max_procs + KERNEL_TASKS, cpus=CELL_CPUS)
        try:
            spawn = self.sandbox.command(kernel_argv(conn_file), workdir, {}, limits, tmpdirs=jobdir.sandbox_tmp)
        except BaseException:
            await asyncio.to_thread(self.jobdirs.remove, jobdir)
            raise

        log_file = open(os.path.join(workdir, ".distexec-kernel.log"), "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *spawn.argv, cwd=spawn.cwd, env=spawn.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file, start_new_session=True,
                # If the slave dies, however it dies, so does the kernel (the sandbox's preexec does it too).
                preexec_fn=spawn.preexec or die_with_parent)
        finally:
            log_file.close()
        # No message larger than the output limit could be: see kernel_io.
        client = make_client(conn_file, self.limits.output_bytes + MESSAGE_MARGIN)
        # No heartbeat channel: we hold the process and see it exit, and the
        # heartbeat misreports a kernel still starting on a loaded machine.
        client.start_channels(hb=False)
        session = Session(name, workdir, proc, client, spawn=spawn, jobdir=jobdir)
        ready = asyncio.ensure_future(asyncio.wait_for(until_ready(client), KERNEL_START_TIMEOUT))
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
        session.pump = IopubPump(client)
        session.own_pids = frozenset(await asyncio.to_thread(_session_pids, session))
        if spawn.cgroup is not None:
            await asyncio.to_thread(spawn.cgroup.set_cpus, IDLE_CPUS)
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
        if session.pump is not None:
            session.pump.close()
        close_client(session.client)
        kill_group(session.proc.pid)
        if session.proc.returncode is None:
            try:
                await asyncio.wait_for(session.proc.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("session %r: kernel %d did not die", session.key, session.proc.pid)
        # Off the event loop: a long session's directory can be large, and the loop answers the pings.
        await asyncio.to_thread(self.sandbox.cleanup, session.spawn)
        if session.jobdir is not None:
            await asyncio.to_thread(self.jobdirs.remove, session.jobdir)

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
            await asyncio.to_thread(session.spawn.cgroup.set_cpus, CELL_CPUS)
        msg_id = kc.execute(job["source"], silent=False, store_history=True, allow_stdin=True,
                            stop_on_error=False)
        lines = iter((stdin or "").splitlines())
        state = CellState()
        # Registered before anything awaits: the pump must not drop the cell's first messages.
        idle = self._watch_cell(session, msg_id, capture, state)
        reader = asyncio.ensure_future(self._read_cell(session, msg_id, idle, state))
        inputs = asyncio.ensure_future(answer_input(kc, msg_id, lines,
                                                    lambda stream, text: capture.feed(stream, text,
                                                                                      len(text.encode()))))
        exited = asyncio.ensure_future(session.proc.wait())
        # Without a memory cgroup the limit is polled; with one, we learn of it when the kernel is killed.
        watcher = (asyncio.ensure_future(_watch_memory(session.proc.pid, self.limits.memory_bytes, capture))
                   if getattr(session.spawn, "watch_memory", True) else None)
        ended = asyncio.ensure_future(asyncio.wait([reader, exited], return_when=asyncio.FIRST_COMPLETED))
        timeout = job.get("timeout") or P.DEFAULT_TIMEOUT
        try:
            reason = await steps.supervise(ended, cancel, time.monotonic() + timeout, watcher=watcher,
                                           over=lambda: capture.over or session.pump.oversized)
            if reason is None:
                if exited.done() or session.ended_reason is not None or not session.alive:
                    # The interpreter died, or the session was ended (its sockets closed under the cell).
                    reason = "exited"
                else:
                    reader.result()
            if reason in ("timeout", "cancelled", "output_limit"):
                await self._interrupt(session, reader, capture)
            elif reason is None and (capture.over or session.pump.oversized):
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
            await self._end(session, "the program called exit()", notify=True)
        if state.ename == "SystemExit":
            code = exit_code(state.evalue)
            if code == 0:
                return self._outcome(0, None, capture)
            return self._outcome(code, P.error(P.NONZERO_EXIT, f"exited with code {code}"), capture)
        if state.ename is not None and session.jobdir is not None and session.jobdir.full():
            return self._outcome(1, disk_error(self.jobdirs, f"{state.ename}: the session wrote more than"), capture)
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

    @staticmethod
    def _watch_cell(session: Session, msg_id: str, capture: _Capture, state: CellState) -> asyncio.Future:
        """Have the pump feed the cell's messages into ``capture``; a future done when the kernel is idle."""
        idle = asyncio.get_running_loop().create_future()

        def on_message(msg: dict) -> None:
            kind = msg["msg_type"]
            content = msg["content"]
            if kind == "stream":
                stream = "stderr" if content.get("name") == "stderr" else "stdout"
                text = content.get("text", "")
                capture.feed(stream, text, len(text.encode()))
            elif kind in ("execute_result", "display_data", "update_display_data"):
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
            elif kind == "error":
                state.ename, state.evalue = content.get("ename"), content.get("evalue")
                if state.ename != "SystemExit":
                    tb = ANSI.sub("", "\n".join(content.get("traceback") or [])) + "\n"
                    lines = CELL_LINE.findall(tb)
                    state.line = int(lines[-1]) if lines else None
                    capture.feed("stderr", tb, len(tb.encode()))
            elif kind == "status" and content.get("execution_state") == "idle" and not idle.done():
                idle.set_result(None)

        # Only this cell's messages: what threads of earlier cells print is dropped by the pump.
        session.pump.start_cell(msg_id, on_message)
        return idle

    async def _read_cell(self, session: Session, msg_id: str, idle: asyncio.Future, state: CellState) -> None:
        """Wait until the cell is done: the kernel idle again on iopub, and its reply on shell.

        Either may come alone: a message refused as too large (kernel_io)
        drops the iopub connection for a moment, and the idle status with it.
        """
        reply = asyncio.ensure_future(_shell_reply(session.client, msg_id, state))
        try:
            await asyncio.wait([idle, reply], return_when=asyncio.FIRST_COMPLETED)
            if idle.done():
                await asyncio.wait([reply], timeout=REPLY_TIMEOUT)
            else:  # output is flushed before the reply; the idle status follows it
                await asyncio.wait([idle], timeout=SETTLE_AFTER_REPLY)
        finally:
            reply.cancel()


def _ignore(stream: str, text: str) -> None:
    pass


async def _shell_reply(kc, msg_id: str, state: CellState) -> None:
    while True:
        reply = await kc.get_shell_msg()
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            for payload in reply["content"].get("payload") or []:
                if payload.get("source") == "ask_exit" and not payload.get("keepkernel"):
                    state.exit_requested = True
            return


def _session_pids(session: Session) -> set[int]:
    """Every process of the session: its cgroup, or (without one) the kernel and its descendants."""
    cg = getattr(session.spawn, "cgroup", None)
    if cg is not None and cg.pids():
        return cg.pids()
    try:
        root = psutil.Process(session.proc.pid)
        return {root.pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.Error:
        return set()


def _zombie(pid: int) -> bool:
    # Killed, not yet reaped by its parent (the kernel, through Popen): it runs no more.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _kill_strays(session: Session) -> tuple[int, bool]:
    """SIGKILL what is not the kernel's own until nothing else is left; (how many, whether all are gone)."""
    killed: set[int] = set()
    deadline = time.monotonic() + STOP_STRAYS_WITHIN
    delay = 0.001
    while True:
        strays = {p for p in _session_pids(session) - session.own_pids if not _zombie(p)}
        if not strays:
            return len(killed), True
        if time.monotonic() > deadline:
            return len(killed), False
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(delay)  # a killed process leaves its cgroup once torn down
        delay = min(delay * 2, 0.05)


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
    def max_sessions_per_user(self) -> int:
        return self.sessions.max_per_user

    @property
    def on_session_ended(self):
        return self.sessions.on_ended

    @on_session_ended.setter
    def on_session_ended(self, callback) -> None:
        self.sessions.on_ended = callback
