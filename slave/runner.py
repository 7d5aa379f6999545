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
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import psutil

from distexec_kernel import languages as L, protocol as P

from . import safefs
from .collect import collect as collect_files
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


class Runner(Protocol):
    def describe(self) -> str:
        """One line for the slave's start-up log: how jobs are run and isolated."""

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        """Run ``job`` to the end.  Calls ``on_output`` with chunks as they come.

        Must return (never raise) once ``cancel`` is set, with the error code
        ``cancelled``, leaving no process of the job alive.
        """

    async def close(self) -> None: ...


@dataclass
class _Capture:
    """Both streams of one process, under one byte budget."""

    budget: int
    on_output: OutputCallback | None
    parts: dict = field(default_factory=lambda: {"stdout": [], "stderr": []})
    used: int = 0
    over: bool = False
    outputs: list = field(default_factory=list)  # a session cell's rich outputs, counted in ``used``

    def feed(self, stream: str, data: str, size: int) -> None:
        if self.over:
            return
        if self.used + size > self.budget:
            data = data[: max(0, self.budget - self.used)]
            self.over = True
        self.used += size
        if data:
            self.parts[stream].append(data)
            if self.on_output is not None:
                self.on_output(stream, data)

    def text(self, stream: str) -> str:
        return "".join(self.parts[stream])


@dataclass
class StepResult:
    returncode: int | None
    # None, or why we ended it: timeout, cancelled, output_limit, memory_limit
    reason: str | None
    elapsed: float


class ProcessRunner:
    """A fresh process (group) per job, inside the slave's sandbox."""

    def __init__(self, sandbox: Sandbox, limits: Limits, toolchains: dict[str, str],
                 workroot: str | None = None, compile_cache=None,
                 programs: dict[str, dict[str, str]] | None = None):
        self.sandbox = sandbox
        self.limits = limits
        self.toolchains = toolchains
        self.workroot = workroot
        self.compile_cache = compile_cache
        # language -> {program name in its templates: the absolute path detection found}
        self.programs = programs or {}

    def describe(self) -> str:
        return f"a fresh process per job; {self.sandbox.describe()}"

    async def close(self) -> None:
        self.sandbox.close()

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        lang = L.get(job["language"])
        if lang is None or lang.name not in self.toolchains:
            return Outcome(None, P.error(P.UNSUPPORTED_LANGUAGE, f"this slave does not run {job['language']!r}"))
        workdir = tempfile.mkdtemp(prefix=f"distexec-job{job['id']}-", dir=self.workroot)
        try:
            outcome = await self._run_in(workdir, lang, job, on_output, cancel)
            # Files out, before the directory goes: the job's processes are all gone by now.
            return await outcome.collect(workdir, job.get("collect"), on_output)
        except OSError as exc:
            log.exception("job %s could not be run", job["id"])
            return Outcome(None, P.error(P.INTERNAL_ERROR, f"the slave could not run the job: {exc}"))
        finally:
            # Off the event loop, like every step's set-up and clean-up: a Go
            # build cache is thousands of files, and a loop busy deleting them
            # answers no pings (the master then takes the slave for dead).
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)

    async def _run_in(self, workdir: str, lang: L.Language, job: dict,
                      on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        source_name = lang.source_name(job["source"])
        files = {name: P.file_bytes(content, name) for name, content in (job.get("files") or {}).items()}
        files[source_name] = job["source"].encode()
        # The directory is fresh, but one code path for every write where a job can reach.
        await asyncio.to_thread(safefs.write_files, workdir, files)
        fields = {"source": source_name, "main": os.path.splitext(source_name)[0], "exe": L.EXE}
        env = dict(lang.env)

        if lang.compile:
            refused = await self._compile(workdir, lang, job, source_name, self._argv(lang, lang.compile, fields),
                                          env, cancel)
            if refused is not None:
                return refused

        argv = self._argv(lang, lang.run, fields) + list(job.get("args") or [])
        stdin = (job.get("stdin") or "").encode() if job.get("stdin") is not None else None
        capture = _Capture(self.limits.output_bytes, on_output)
        step = await self._step(argv, workdir, env, stdin, job.get("timeout") or P.DEFAULT_TIMEOUT,
                                cancel, capture)
        out, err = capture.text("stdout"), capture.text("stderr")
        error = _classify(step, job, self.limits)
        if error is not None and error["code"] == P.NONZERO_EXIT:
            # An interpreter's syntax or runtime error names a line: point the notebook at it.
            error.update(L.locate(lang, err, source_name, job["source"]))
        return Outcome(step.returncode, error, out, err)

    def _argv(self, lang: L.Language, template: tuple[str, ...], fields: dict) -> list[str]:
        # The program that answered at detection, not whatever PATH finds first.
        argv = L.fill(template, fields)
        argv[0] = self.programs.get(lang.name, {}).get(argv[0], argv[0])
        return argv

    async def _compile(self, workdir: str, lang: L.Language, job: dict, source_name: str,
                       argv: list[str], env: dict, cancel: asyncio.Event) -> Outcome | None:
        """Leave the compiled program in ``workdir``: from the cache, or by compiling it.

        Returns None on success, else how the job ended (compile_error, cancelled).
        """
        cache, key = self.compile_cache, None
        if cache is not None:
            inputs = {name: P.file_bytes(content, name) for name, content in (job.get("files") or {}).items()}
            inputs[source_name] = job["source"].encode()
            key = cache.key(lang.name, self.toolchains.get(lang.name, ""), argv, inputs)
            if await asyncio.to_thread(cache.fetch, key, workdir):
                log.info("job %s: compile cache hit (%s, %s)", job["id"], lang.name, key[:12])
                return None
        capture = _Capture(self.limits.output_bytes, None)
        step = await self._step(argv, workdir, env, None, lang.compile_timeout, cancel, capture)
        if step.reason == "cancelled":
            return Outcome(None, P.error(P.CANCELLED_CODE, "cancelled by a user"))
        if step.reason is not None or step.returncode != 0:
            diag = capture.text("stderr") + capture.text("stdout")
            what = {"timeout": f"the compiler ran past {lang.compile_timeout:g} s",
                    "memory_limit": f"the compiler used more than {self.limits.memory_bytes >> 20} MiB",
                    "output_limit": "the compiler wrote more than the output limit",
                    }.get(step.reason, f"the {lang.name} compiler refused the program")
            return Outcome(None, P.error(P.COMPILE_ERROR, what, **L.locate(lang, diag, source_name, job["source"])),
                           stdout="", stderr=diag)
        log.info("job %s: compiled %s in %.2f s", job["id"], lang.name, step.elapsed)
        if key is not None:
            # Stored before the program runs, so nothing the program does can reach the cache.
            try:
                await asyncio.to_thread(cache.store, key, workdir, lang.artefacts)
            except OSError as exc:  # a full disk costs the next job a compile, not this job
                log.warning("job %s: could not keep the compiled program: %s", job["id"], exc)
        return None

    async def _step(self, argv: list[str], workdir: str, env: dict, stdin: bytes | None,
                    timeout: float, cancel: asyncio.Event, capture: _Capture) -> StepResult:
        started = time.monotonic()
        spawn = await asyncio.to_thread(self.sandbox.command, argv, workdir, env, self.limits, timeout=timeout)
        try:
            proc = await asyncio.create_subprocess_exec(
                *spawn.argv, cwd=spawn.cwd, env=spawn.env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=spawn.preexec)
        except BaseException:
            await asyncio.to_thread(self.sandbox.cleanup, spawn)
            raise
        reason: str | None = None
        try:
            if stdin is not None:
                asyncio.ensure_future(_feed(proc, stdin))
            readers = [asyncio.ensure_future(_pump(proc.stdout, "stdout", capture)),
                       asyncio.ensure_future(_pump(proc.stderr, "stderr", capture))]
            exited = asyncio.ensure_future(proc.wait())
            cancelled = asyncio.ensure_future(cancel.wait())
            # Polled only when the kernel does not hold the limit (no memory cgroup).
            watcher = (asyncio.ensure_future(_watch_memory(proc.pid, self.limits.memory_bytes, capture))
                       if spawn.watch_memory else asyncio.get_running_loop().create_future())
            deadline = started + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = "timeout"
                    break
                done, _ = await asyncio.wait([exited, cancelled, watcher], timeout=min(remaining, 0.5),
                                             return_when=asyncio.FIRST_COMPLETED)
                if cancelled in done:
                    reason = "cancelled"
                    break
                if watcher in done:
                    reason = watcher.result()
                    break
                if capture.over:
                    reason = "output_limit"
                    break
                if exited in done:
                    break
            for fut in (cancelled, watcher):
                fut.cancel()
            if reason is not None:
                self.sandbox.kill(spawn, proc.pid)
                # The sandbox's kill lets its wrapper exit by itself; should it not, the whole group goes.
                if not (await asyncio.wait([exited], timeout=KILL_GRACE))[0]:
                    _kill_group(proc.pid)
            await exited
            # Whatever the job left in its group goes too: no orphans.
            _kill_group(proc.pid)
            await asyncio.wait(readers, timeout=DRAIN_AFTER_EXIT)
            for r in readers:
                r.cancel()
            if reason is None and capture.over:
                reason = "output_limit"
            if reason is None and proc.returncode != 0 and self.sandbox.memory_exceeded(spawn):
                reason = "memory_limit"  # the kernel's OOM killer, inside the job's cgroup
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
            await asyncio.to_thread(self.sandbox.cleanup, spawn)
        return StepResult(proc.returncode, reason, time.monotonic() - started)


def _classify(step: StepResult, job: dict, limits: Limits) -> dict | None:
    code = step.returncode
    if step.reason == "cancelled":
        return P.error(P.CANCELLED_CODE, "cancelled by a user")
    if step.reason == "timeout":
        return P.error(P.TIMEOUT, f"ran past its timeout of {job.get('timeout') or P.DEFAULT_TIMEOUT:g} s")
    if step.reason == "output_limit":
        return P.error(P.OUTPUT_LIMIT, f"wrote more than the output limit of {limits.output_bytes >> 20} MiB")
    if step.reason == "memory_limit":
        return P.error(P.MEMORY_LIMIT, f"used more than the memory limit of {limits.memory_bytes >> 20} MiB")
    if code is not None and code < 0:
        return _signal_error(-code)
    if code is not None and code > 128 and code - 128 in _SIGNALS_SEEN_AS_EXIT:
        # A sandbox wrapper reports its child's death by signal N as 128+N.
        return _signal_error(code - 128)
    if code:
        return P.error(P.NONZERO_EXIT, f"exited with code {code}")
    return None


_SIGNALS_SEEN_AS_EXIT = {int(s) for s in (signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGBUS,
                                          signal.SIGILL, signal.SIGKILL, signal.SIGTERM,
                                          signal.SIGXCPU, signal.SIGXFSZ)}


def _signal_error(signum: int) -> dict:
    try:
        name = signal.Signals(signum).name
        desc = signal.strsignal(signum)
    except ValueError:
        name, desc = f"signal {signum}", None
    return P.error(P.SIGNAL, f"killed by {name}" + (f" ({desc.lower()})" if desc else ""), signal=name)


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


async def _pump(reader: asyncio.StreamReader, stream: str, capture: _Capture) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            tail = decoder.decode(b"", final=True)
            if tail:
                capture.feed(stream, tail, len(tail.encode()))
            return
        capture.feed(stream, decoder.decode(data), len(data))


async def _watch_memory(pid: int, limit: int, capture: _Capture) -> str:
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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
