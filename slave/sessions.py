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
  if it does not stop within ``session_cells.INTERRUPT_GRACE`` the kernel is killed and
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
import logging
import os
import signal
import sys
import time
from typing import Callable

import psutil

from distexec_kernel import protocol as P
from distexec_kernel.procs import die_with_parent, kill_group

from . import kernel_errors, safefs, uids
from .jobdirs import JobDirs
from .kernel_io import MESSAGE_MARGIN, IopubPump, close_client, make_client, until_ready
from .runner import Outcome, OutputCallback, Capture
from .sandbox import Limits, Sandbox
from .session_cells import CELL_CPUS, CellRunner, Session, _ignore
from .zmtp_relay import Relay

log = logging.getLogger("distexec.slave.sessions")

DEFAULT_TTL = 1800.0  # seconds an idle session lives
KERNEL_START_TIMEOUT = 60.0  # a loaded 2-core machine can take a few seconds
CONNECTION_FILE = ".distexec-kernel.json"
SOCKET_PREFIX = ".distexec-k"  # ipc sockets .distexec-k-1 ... -5
RELAY_PREFIX = "k"  # the relays' sockets k-1 ... -4, beside the job's work/ (zmtp_relay)
RELAYED = ("shell", "iopub", "stdin", "control")  # no heartbeat: see _start
MAX_IPC_PATH = 100  # sun_path is 108 bytes; leave room for "-N"
DEFAULT_MAX_SESSIONS = 4  # per user: --max-sessions-per-user
# Between cells a session's kernel is capped at a tenth of a core (CELL_CPUS while a
# cell runs): the slave counts its slot free then, and what a cell's threads do
# after it returned is all that runs.
IDLE_CPUS = 0.1
STOP_STRAYS_WITHIN = 5.0  # seconds to see a cell's leftover processes gone, else the session ends
# Between cells, how often an idle session is looked at for a process one of its threads started
# after its cell ended (a thread that sleeps, then starts a 200 MiB spinner, with the slot free).
STRAY_CHECK_EVERY = 1.0
# Tasks (threads) ipykernel and zmq run for themselves: 11 measured with
# ipykernel 7.  They are added to --max-procs, which stays the cells' own budget.
KERNEL_TASKS = 16


def kernel_argv(connection_file: str, output_bytes: int) -> list[str]:
    """ipykernel's python3 kernel, run by the slave's own interpreter.

    Not whatever kernelspec named python3 the machine has: that one may be
    another Python without ipykernel; ours has it as a dependency.
    """
    # Plain tracebacks, and no history database written into the job's home.  An exception's text
    # and traceback a quarter of the output limit each at most: the messages that carry them
    # (twice each) stay within what the relay passes (kernel_errors.py).
    return [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file,
            "--InteractiveShell.colors=nocolor", "--HistoryManager.enabled=False",
            "--IPKernelApp.log_level=ERROR",
            f"--IPKernelApp.exec_lines={kernel_errors.setup_line(max(1024, output_bytes // 4))}"]


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
        self.cells = CellRunner(sandbox, limits, self.jobdirs, self._end_current)

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
        if self._closed:
            return Outcome(None, P.error(P.INTERNAL_ERROR, "the slave is stopping"))
        capture = Capture(self.limits.output_bytes, on_output)
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
                outcome = await self.cells.execute(session, job, capture, cancel)
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
                       f"end one first (%remote sessions --end NAME, DELETE /api/sessions/NAME)")

    async def _stop_strays(self, session: Session) -> int:
        """Kill every process of the session but the kernel's own; how many there were.

        A session that cannot be cleared (a process that will not die) is
        ended: the slave never counts a slot free while a cell's process runs.
        """
        if not session.alive or session.ended_reason is not None:
            return 0
        cgroup = getattr(session.spawn, "cgroup", None)
        # With a cgroup, its process list is read on the loop (one small file), and the
        # thread, which may wait for processes to die, is used only when there is one to
        # kill; without, finding them is a walk of /proc.  The cap below is a file write.
        if cgroup is None or _strays(session):
            killed, gone = await asyncio.to_thread(_kill_strays, session)
        else:
            killed, gone = 0, True
        if not gone and self.sessions.get(session.key) is session:
            await self._end(session, "a process it left running could not be stopped", notify=True)
        elif cgroup is not None:
            cgroup.set_cpus(IDLE_CPUS)
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
        _, connection = write_connection_file(conn_file, ip=ipc, transport="ipc", kernel_name="python3")
        # No JPY_PARENT_PID: inside a PID namespace the kernel's parent is pid 1,
        # which ipykernel's poller takes for "the parent died".  PDEATHSIG (and
        # bubblewrap's --die-with-parent) do that job.  No timeout: the CPU-time
        # backstop is per job, and a kernel outlives many jobs.
        limits = dataclasses.replace(self.limits, max_procs=self.limits.max_procs + KERNEL_TASKS, cpus=CELL_CPUS)
        # A uid of its own, as each job's: the kernel's per-uid quotas (inotify instances, POSIX message
        # queues) were shared with every other job and session, and one session could hold them all.
        box, held = uids.own_box(self.sandbox)
        try:
            spawn = box.command(kernel_argv(conn_file, limits.output_bytes), workdir, {}, limits,
                                tmpdirs=jobdir.sandbox_tmp)
        except BaseException:
            if held is not None:
                held.release()
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
        max_message = self.limits.output_bytes + MESSAGE_MARGIN
        # The client's sockets are the relays', in the job's top folder: the slave's, out of the kernel's sight.
        relayed = os.path.join(jobdir.top, RELAY_PREFIX)
        client = make_client({**connection, "ip": relayed}, max_message)
        session = Session(name, workdir, proc, client, spawn=spawn, jobdir=jobdir, box=box, uid=held)
        session.relays = [Relay(f"{relayed}-{connection[ch + '_port']}", f"{ipc}-{connection[ch + '_port']}",
                                max_message, lambda pid: pid in _pids(spawn, proc.pid), KERNEL_START_TIMEOUT,
                                on_cut=lambda: session.pump and session.pump.cut_one(),
                                on_refused=lambda: asyncio.ensure_future(self._end_current(
                                    session, "one of its kernel's sockets was replaced by something else")))
                          for ch in RELAYED]
        try:
            for relay in session.relays:
                await relay.start()
        except BaseException:
            await self._dispose(session)
            raise
        # No heartbeat channel: we hold the process and see it exit, and the
        # heartbeat misreports a kernel still starting on a loaded machine.
        client.start_channels(hb=False)
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
        session.pump = IopubPump(client, P.session_label(name))
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
        """The end of the kernel's log, read as every file in a session's directory is (safefs):
        the kernel's uid owns the directory and could have put a link or a FIFO there."""
        try:
            dir_fd = safefs.open_dir(workdir)
            try:
                fd, st = safefs.open_regular(dir_fd, ".distexec-kernel.log")
            finally:
                os.close(dir_fd)
            with os.fdopen(fd, "rb") as f:
                f.seek(max(0, st.st_size - 2000))
                return f.read().decode(errors="replace").strip() or "no output"
        except OSError:
            return "no log"

    async def _end_current(self, session: Session, reason: str) -> None:
        """A cell left ``session`` unusable: end it, if it is still the live session of its key."""
        if self.sessions.get(session.key) is session:
            await self._end(session, reason, notify=True)

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
        for relay in session.relays:
            await relay.close()
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
        if session.uid is not None:  # its processes are gone (cleanup): another job may take its uid
            session.uid.release()

    def _arm_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        """End sessions idle for longer than the TTL; stop what an idle one starts between its cells."""
        while self.sessions:
            await asyncio.sleep(max(0.05, min(self.ttl / 4, STRAY_CHECK_EVERY)))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.lock.locked():
                    continue  # a cell runs: its own end stops what it leaves
                if now - session.last_used > self.ttl:
                    await self._end(session, f"idle for more than {self.ttl:g} s", notify=True)
                elif session.alive and await _any_strays(session):
                    async with session.lock:
                        stopped = await self._stop_strays(session)
                    if stopped:
                        log.warning("session %s: stopped %d process(es) started between its cells",
                                    P.session_label(session.key), stopped)

def _session_pids(session: Session) -> set[int]:
    return _pids(session.spawn, session.proc.pid)


def _pids(spawn, kernel: int) -> set[int]:
    """Every process of a session: its cgroup, or (without one) the kernel and its descendants."""
    cg = getattr(spawn, "cgroup", None)
    if cg is not None and cg.pids():
        return cg.pids()
    try:
        root = psutil.Process(kernel)
        return {root.pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.Error:
        return set()


def _zombie(pid: int) -> bool:
    # Killed, not yet reaped by its parent (the kernel, through Popen): it runs no more.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


async def _any_strays(session: Session) -> bool:
    """Whether anything but the kernel's own runs in the session: its cgroup's list read here (one
    small file); without a cgroup, a walk of /proc, in a thread (the loop answers the pings)."""
    if getattr(session.spawn, "cgroup", None) is not None:
        return bool(_strays(session))
    return bool(await asyncio.to_thread(_strays, session))


def _strays(session: Session) -> set[int]:
    return {p for p in _session_pids(session) - session.own_pids if not _zombie(p)}


def _kill_strays(session: Session) -> tuple[int, bool]:
    """SIGKILL what is not the kernel's own until nothing else is left; (how many, whether all are gone)."""
    killed: set[int] = set()
    deadline = time.monotonic() + STOP_STRAYS_WITHIN
    delay = 0.001
    while True:
        strays = _strays(session)
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
