"""How a slave runs one job.  Everything else in the slave talks to ``Runner``.

``Runner`` is the small interface that other ways of running a job plug into
(a warm fork-server pool, a persistent jupyter_client session): given a job,
a callback for output chunks and a cancel event, run it and return how it
ended.  ``ProcessRunner`` is the general one: a fresh process group per job
in a fresh temporary directory, compile step first for compiled languages.
"""
from __future__ import annotations

import asyncio
import codecs
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Callable

import psutil

from distexec_kernel import diagnostics as D, languages as L, protocol as P
from distexec_kernel.procs import kill_group

from . import safefs, stdbuf, steps, uids
from .collect import collect as collect_files
from .jobdirs import JobDir, JobDirs
from .sandbox import Limits, Sandbox

log = logging.getLogger("distexec.slave.runner")

OutputCallback = Callable[[str, str], None]  # (stream, text)

READ_CHUNK = 64 * 1024
MEMORY_POLL = 0.05  # seconds between memory checks of a job's processes
DRAIN_AFTER_EXIT = 1.0  # seconds to wait for pipes held open by stray children
KILL_GRACE = 2.0  # seconds a killed step's wrapper has to exit before its group is killed


@dataclass
class Outcome:
    """How a job ended; becomes the ``job_finished`` message."""

    exit_code: int | None
    error: dict | None
    stdout: str = ""
    stderr: str = ""
    outputs: list = field(default_factory=list)  # rich outputs (nbformat-style) of a session cell
    artifacts: list = field(default_factory=list)  # collected files: {"name", "size", "sha256", "mime"}
    blobs: list = field(default_factory=list)  # their bytes, same order: sent as job_artifact frames

    def message(self, job_id: int) -> dict:
        extra = {k: v for k, v in (("outputs", self.outputs), ("artifacts", self.artifacts)) if v}
        return P.make("job_finished", job_id=job_id, exit_code=self.exit_code, error=self.error,
                      stdout=self.stdout, stderr=self.stderr, **extra)

    async def collect(self, workdir: str, patterns: list[str] | None, on_output: OutputCallback) -> "Outcome":
        """Keep the files of ``workdir`` that ``patterns`` match (see slave/collect.py); note what was left out."""
        if patterns:
            found = await asyncio.to_thread(collect_files, workdir, patterns)
            self.artifacts, self.blobs = found.meta, found.blobs
            note = found.note()
            if note:
                on_output("stderr", note)
                self.stderr += note
        return self


class Runner:
    """How a slave runs jobs; the agent talks to nothing else.

    A subclass runs jobs (``describe``, ``run``, ``close``).  The session
    hooks below are what a runner keeping persistent interpreters answers
    (``RoutingRunner`` over ``SessionRunner``); a runner without sessions
    keeps these answers, so the agent asks every runner the same way.
    """

    # Set by the agent: called with (session key, reason) when a session ends by itself.
    on_session_ended: Callable[[tuple, str], None] | None = None
    # The --max-sessions-per-user a runner with sessions enforces, told to the master at register.
    max_sessions_per_user: int | None = None

    def describe(self) -> str:
        """One line for the slave's start-up log: how jobs are run and isolated."""
        raise NotImplementedError

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        """Run ``job`` to the end.  Calls ``on_output`` with chunks as they come.

        Must return (never raise) once ``cancel`` is set, with the error code
        ``cancelled``, leaving no process of the job alive.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """At slave exit: nothing of a job outlives the slave."""

    def session_names(self) -> list[tuple]:
        """The (user, name) keys of the sessions alive here, for ``register``."""
        return []

    async def end_session(self, key: tuple, reason: str = "ended by a user") -> bool:
        """End that session now; False if there is none."""
        return False


@dataclass
class Capture:
    """Both streams of one process, under one byte budget."""

    budget: int
    on_output: OutputCallback | None
    parts: dict = field(default_factory=lambda: {"stdout": [], "stderr": []})
    used: int = 0
    over: bool = False
    outputs: list = field(default_factory=list)  # a session cell's rich outputs, counted in ``used``
    chars: dict = field(default_factory=lambda: {"stdout": 0, "stderr": 0})  # each stream's length so far
    crossed: asyncio.Event = field(default_factory=asyncio.Event)  # set with ``over``: the step is stopped at once

    def feed(self, stream: str, data: str, size: int) -> None:
        """``size``: the bytes ``data`` took (or, for a rich output, its bundle's); it costs that plus what
        JSON adds to send it.  Counted by bytes alone, 12 MiB of \\x01 (6 bytes each as \\u0001) made a
        72 MiB job_finished, past the master's message limit: the master closed the slave's connection
        at each try, and the slave was lost to everyone."""
        if self.over:
            return
        size += _escaped(data)
        if self.used + size > self.budget:
            room = max(0, self.budget - self.used)
            data = data[:room]  # each character costs a byte at least
            while data and len(data.encode(errors="surrogatepass")) + _escaped(data) > room:
                data = data[: len(data) // 2]
            self.over = True
            self.crossed.set()
        self.used += size
        if data:
            self.parts[stream].append(data)
            self.chars[stream] += len(data)
            if self.on_output is not None:
                self.on_output(stream, data)

    def text(self, stream: str) -> str:
        return "".join(self.parts[stream])


def _escaped(text: str) -> int:
    """What JSON's escapes add to ``text`` (C, about 3.5 ns a character here)."""
    return len(encode_basestring(text)) - 2 - len(text) if text else 0


@dataclass
class StepResult:
    returncode: int | None
    # None, or why we ended it: timeout, cancelled, output_limit, memory_limit
    reason: str | None
    elapsed: float


class ProcessRunner(Runner):
    """A fresh process (group) per job, inside the slave's sandbox."""

    def __init__(self, sandbox: Sandbox, limits: Limits, toolchains: dict[str, str],
                 jobdirs: JobDirs | None = None, compile_cache=None,
                 programs: dict[str, dict[str, str]] | None = None):
        self.sandbox = sandbox
        self.limits = limits
        self.toolchains = toolchains
        # None (a runner built by hand): a folder of its own, the default quota.
        self.jobdirs = jobdirs or JobDirs(f"runner-{os.getpid()}-{id(self):x}")
        self.compile_cache = compile_cache
        # language -> {program name in its templates: the absolute path detection found}
        self.programs = programs or {}

    def describe(self) -> str:
        return f"a fresh process per job; {self.sandbox.describe()}; {self.jobdirs.describe()}"

    async def close(self) -> None:
        self.sandbox.close()
        await asyncio.to_thread(self.jobdirs.close)

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        # The master sends a checked job: its language canonical and run here, a timeout set.
        lang = L.LANGUAGES[job["language"]]
        try:
            jobdir = await asyncio.to_thread(self.jobdirs.make, f"job{job['id']}")
        except OSError as exc:
            log.exception("job %s: no directory for it", job["id"])
            return Outcome(None, P.error(P.INTERNAL_ERROR, f"the slave could not run the job: {exc}"))
        # A uid of the job's own, not one every fresh job shares (uids.py).
        box, held = await asyncio.to_thread(uids.own_box, self.sandbox)
        try:
            outcome = await self._run_in(box, jobdir, lang, job, on_output, cancel)
            # Files out, before the directory goes: the job's processes are all gone by now.
            return await outcome.collect(jobdir.path, job.get("collect"), on_output)
        except OSError as exc:
            log.exception("job %s could not be run", job["id"])
            return Outcome(None, P.error(P.INTERNAL_ERROR, f"the slave could not run the job: {exc}"))
        finally:
            if held is not None:  # each step's clean-up killed all that ran as it
                held.release()
            # Off the event loop, like every step's set-up and clean-up: a Go
            # build cache is thousands of files, and a loop busy deleting them
            # answers no pings (the master then takes the slave for dead).
            await asyncio.to_thread(self.jobdirs.remove, jobdir)

    async def _run_in(self, box: Sandbox, jobdir: JobDir, lang: L.Language, job: dict,
                      on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        workdir = jobdir.path
        fields = fields_of(lang, job)
        source_name = fields["source"]
        files = P.files_of(job)
        files[source_name] = job["source"].encode()
        # The directory is fresh, but one code path for every write where a job can reach.
        try:
            await asyncio.to_thread(safefs.write_files, workdir, files)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Outcome(None, disk_error(self.jobdirs, "the job's files do not fit in"))
            raise
        env = dict(lang.env)
        # Both steps in one cgroup: what the compiler leaves in the job's tmpfs stays under the job's limit.
        cgroup = await asyncio.to_thread(self.sandbox.job_cgroup, self.limits) if lang.compile else None
        try:
            if lang.compile:
                refused = await self._compile(box, jobdir, lang, job, fields,
                                              self._argv(lang, lang.compile, fields), env, cancel, cgroup)
                if refused is not None:
                    return refused

            env = dict(env)
            argv = self.run_argv(lang, fields, env) + list(job.get("args") or [])
            stdin = (job.get("stdin") or "").encode() if job.get("stdin") is not None else None
            capture = Capture(self.limits.output_bytes, on_output)
            step = await self._step(box, argv, jobdir, env, stdin, job["timeout"], cancel, capture, cgroup)
        finally:
            await asyncio.to_thread(self.sandbox.release_job_cgroup, cgroup)
        return run_outcome(step, capture, job, self.limits, lang, source_name, self.jobdirs,
                           lambda: _hit_disk_limit(step, jobdir), jobdir.used)

    def _argv(self, lang: L.Language, template: tuple[str, ...], fields: dict) -> list[str]:
        # The program that answered at detection, not whatever PATH finds first.
        argv = L.fill(template, fields)
        argv[0] = self.programs.get(lang.name, {}).get(argv[0], argv[0])
        return argv

    def run_argv(self, lang: L.Language, fields: dict, env: dict) -> list[str]:
        """The run step's command; ``env``, the step's own, may gain what stdbuf would set (slave/stdbuf.py)."""
        return stdbuf.direct(self._argv(lang, lang.run, fields), env)

    def cache_key(self, lang: L.Language, job: dict, source_name: str, argv: list[str] | None = None) -> str:
        """The compile cache's key of this job's compile step (``argv``: its command, if made already)."""
        if argv is None:
            argv = self._argv(lang, lang.compile, fields_of(lang, job))
        inputs = P.files_of(job)
        inputs[source_name] = job["source"].encode()
        return self.compile_cache.key(lang.name, self.toolchains.get(lang.name, ""), argv, inputs, job.get("user"))

    async def _compile(self, box: Sandbox, jobdir: JobDir, lang: L.Language, job: dict, fields: dict,
                       argv: list[str], env: dict, cancel: asyncio.Event, cgroup=None) -> Outcome | None:
        """Leave the compiled program in ``workdir``: from the cache, or by compiling it.

        Returns None on success, else how the job ended (compile_error, cancelled).
        """
        cache, key = self.compile_cache, None
        workdir, source_name = jobdir.path, fields["source"]
        if cache is not None:
            key = self.cache_key(lang, job, source_name, argv)
            if await asyncio.to_thread(cache.fetch, key, workdir):
                log.info("job %s: compile cache hit (%s, %s)", job["id"], lang.name, key[:12])
                return None
        capture = Capture(self.limits.output_bytes, None)
        step = await self._step(box, argv, jobdir, env, None, lang.compile_timeout, cancel, capture, cgroup)
        if step.reason == "cancelled":
            return Outcome(None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
        if step.reason is None and step.returncode != 0 and _hit_disk_limit(step, jobdir):
            return Outcome(None, disk_error(self.jobdirs, "the compiler wrote more than"), stdout="",
                           stderr=capture.text("stderr") + capture.text("stdout"))
        if step.reason is not None or step.returncode != 0:
            diag = capture.text("stderr") + capture.text("stdout")
            what = {"timeout": f"the compiler ran past {lang.compile_timeout:g} s",
                    "memory_limit": f"the compiler used more than {self.limits.memory_bytes >> 20} MiB",
                    "output_limit": "the compiler wrote more than the output limit",
                    }.get(step.reason, f"the {lang.name} compiler refused the program")
            return Outcome(None, P.error(P.COMPILE_ERROR, what, **D.locate(lang, diag, source_name, job["source"])),
                           stdout="", stderr=diag)
        log.info("job %s: compiled %s in %.2f s", job["id"], lang.name, step.elapsed)
        entry = L.fill((lang.entry,), fields)[0] if lang.entry else None
        if entry is not None and not safefs.exists(workdir, entry):
            # Refused before it runs, and never cached: so a cached program always has what it starts.
            what = f"{lang.no_entry} (the compiler made no {entry} to run)"
            return Outcome(None, P.error(P.COMPILE_ERROR, what), stdout="",
                           stderr=capture.text("stderr") + capture.text("stdout") + f"distexec: {what}\n")
        if key is not None:
            # Stored before the program runs, so nothing the program does can reach the cache.
            try:
                await asyncio.to_thread(cache.store, key, workdir, lang.artefacts)
            except OSError as exc:  # a full disk costs the next job a compile, not this job
                log.warning("job %s: could not keep the compiled program: %s", job["id"], exc)
        return None

    async def _step(self, box: Sandbox, argv: list[str], jobdir: JobDir, env: dict, stdin: bytes | None,
                    timeout: float, cancel: asyncio.Event, capture: Capture, cgroup=None) -> StepResult:
        """One step in a fresh sandboxed process; ``cgroup``: the job's, to share (else one of the step's own)."""
        started = time.monotonic()
        spawn = await asyncio.to_thread(box.command, argv, jobdir.path, env, self.limits, timeout=timeout,
                                        tmpdirs=jobdir.sandbox_tmp, within=cgroup)
        try:
            proc = await asyncio.create_subprocess_exec(
                *spawn.argv, cwd=spawn.cwd, env=spawn.env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=spawn.preexec)
        except BaseException:
            await asyncio.to_thread(box.cleanup, spawn)
            raise
        reason: str | None = None
        try:
            if stdin is not None:
                asyncio.ensure_future(_feed(proc, stdin))
            readers = [asyncio.ensure_future(_pump(proc.stdout, "stdout", capture)),
                       asyncio.ensure_future(_pump(proc.stderr, "stderr", capture))]
            exited = asyncio.ensure_future(proc.wait())
            # Polled only when the kernel does not hold the limit (no memory cgroup).
            watcher = (asyncio.ensure_future(watch_memory(proc.pid, self.limits.memory_bytes, capture))
                       if spawn.watch_memory else None)
            try:
                reason = await steps.supervise(exited, cancel, started + timeout, watcher=watcher,
                                               limits=(capture.crossed,))
            finally:
                if watcher is not None:
                    watcher.cancel()
            if reason is not None:
                box.kill(spawn, proc.pid)
                # The sandbox's kill lets its wrapper exit by itself; should it not, the whole group goes.
                if not (await asyncio.wait([exited], timeout=KILL_GRACE))[0]:
                    kill_group(proc.pid)
            await exited
            # Whatever the job left in its group goes too: no orphans.
            kill_group(proc.pid)
            await asyncio.wait(readers, timeout=DRAIN_AFTER_EXIT)
            for r in readers:
                r.cancel()
            if reason is None and capture.over:
                reason = "output_limit"
            if reason is None and proc.returncode != 0 and box.memory_exceeded(spawn):
                reason = "memory_limit"  # the kernel's OOM killer, inside the job's cgroup
        finally:
            if proc.returncode is None:
                kill_group(proc.pid)
                await proc.wait()
            await asyncio.to_thread(box.cleanup, spawn)
        return StepResult(proc.returncode, reason, time.monotonic() - started)


def fields_of(lang: L.Language, job: dict) -> dict:
    """What the placeholders of ``lang``'s templates stand for in ``job``: the language table says
    which files a compile takes and what the run starts; the runner fills them in."""
    source_name = lang.source_name(job["source"])
    return {"source": source_name, "main": lang.main_name(job["source"]), "exe": L.EXE,
            "sources": lang.compiled_with(source_name, job.get("files") or {})}


def run_outcome(step: StepResult, capture: Capture, job: dict, limits: Limits, lang: L.Language,
                source_name: str, jobdirs: JobDirs, hit_disk_limit: Callable[[], bool],
                files_bytes: Callable[[], int | None] = lambda: None) -> Outcome:
    """How a job's run step ended: a limit, a signal, an exit code, the disk quota
    (``hit_disk_limit``, asked of a step that ended by itself; ``files_bytes``, what its files
    took, only of one killed at its memory limit), a line to point at."""
    out, err = capture.text("stdout"), capture.text("stderr")
    error = _classify(step, job, limits)
    if (error is None or error["code"] in (P.NONZERO_EXIT, P.SIGNAL)) and hit_disk_limit():
        # Also when it exits 0: what it meant to write was refused (ENOSPC), so its results
        # are likely short, and the contract has a job past its disk limit fail.
        error = disk_error(jobdirs, "wrote more than")
    elif error is not None and error["code"] == P.MEMORY_LIMIT:
        error = files_filled_memory(files_bytes(), limits, jobdirs) or error
    if error is not None and error["code"] == P.NONZERO_EXIT:
        # An interpreter's syntax or runtime error names a line: point the notebook at it; and what it
        # raised, said in the message (a RemoteError from results() said only "exited with code 1").
        error.update(D.locate(lang, err, source_name, job["source"]))
        why = D.reason(lang, err)
        if why:
            error["message"] += f": {why}"
    return Outcome(steps.job_exit_code(step.returncode), error, out, err)


def _hit_disk_limit(step: StepResult, jobdir: JobDir) -> bool:
    return hit_disk_limit(step, jobdir.full(), jobdir.limited)


def hit_disk_limit(step: StepResult, full: bool, limited: bool) -> bool:
    """Did a step that failed run into its disk quota?  Asked of the kernel, not of its output:
    the job's tmpfs is ``full``, or a file went past RLIMIT_FSIZE (SIGXFSZ, set to the quota)."""
    code = step.returncode
    xfsz = int(signal.SIGXFSZ)
    return full or (limited and code is not None and code in (-xfsz, 128 + xfsz))


def disk_error(jobdirs: JobDirs, what: str) -> dict:
    return P.error(P.DISK_LIMIT, f"{what} the disk limit of {jobdirs.disk_limit_mb} MiB (its directory and /tmp "
                                 f"together)")


def files_filled_memory(used: int | None, limits: Limits, jobdirs: JobDirs) -> dict | None:
    """The error of a job killed at its memory limit when its files took half of it or more.

    Its files are in a tmpfs, charged to its memory: with the defaults (1024 MiB
    each) a job writing a big file meets the memory limit just before the disk
    limit, and what it has to change is what it writes, so it says that.
    """
    if used is None or used * 2 < limits.memory_bytes:
        return None
    return P.error(P.DISK_LIMIT, f"its files ({used >> 20} MiB in its directory and /tmp) filled its memory: "
                                 f"a job's files are kept in memory, and with its processes they went past the "
                                 f"memory limit of {limits.memory_bytes >> 20} MiB (the disk limit is "
                                 f"{jobdirs.disk_limit_mb} MiB)")


def _classify(step: StepResult, job: dict, limits: Limits) -> dict | None:
    if step.reason is not None:
        return steps.limit_error(step.reason, job["timeout"], limits.memory_bytes, limits.output_bytes,
                                 steps.job_exit_code(step.returncode))
    return steps.exit_error(step.returncode)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program did not read all of its input: its business
    finally:
        try:
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass


async def _pump(reader: asyncio.StreamReader, stream: str, capture: Capture) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            tail = decoder.decode(b"", final=True)
            if tail:
                capture.feed(stream, tail, len(tail.encode()))
            return
        capture.feed(stream, decoder.decode(data), len(data))


async def watch_memory(pid: int, limit: int, capture: Capture) -> str:
    """Return "memory_limit" when the job's processes use more than ``limit`` bytes."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return await asyncio.Event().wait()  # gone already; wait to be cancelled
    while True:
        await asyncio.sleep(MEMORY_POLL)
        try:
            procs = [root] + root.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return await asyncio.Event().wait()
        if rss > limit:
            return "memory_limit"
