"""Which languages this slave can run, found by asking each toolchain its version.

A toolchain counts only if it answers the way a job would call it: in a
job's clean environment (HOME is a fresh directory, no slave variables) and,
when given one, through the slave's sandbox.  So a rustup proxy under
/root/.cargo/bin, which needs ~/.rustup, is passed over for the next
``rustc`` on PATH (Debian's /usr/bin/rustc), and the runner is told the
absolute path of each program that answered.

Every toolchain is asked at once, so detection waits for the slowest one only
(``javac -version`` starts a JVM: about 0.5 s); a slave does not wait even
for that before it registers (``slave/server.py``).  With a ``cache_path`` the
answers are kept (refusals too, for a shorter while), keyed by the programs'
paths, sizes and modification times, so a slave started again on the same
machine asks nothing; a replaced compiler has a new identity and is asked again.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from distexec_kernel import config, languages as L

from .sandbox import Limits, Sandbox, job_env

log = logging.getLogger("distexec.slave.toolchains")

DETECT_TIMEOUT = 15.0
# What a slave with nothing remembered asks before it registers: the
# languages of the warm pool, which answer in tens of milliseconds.  The rest
# (a JVM takes half a second) it asks after, and tells the master then.
FIRST = ("python", "bash")
# Those later probes run at this niceness, so the jobs running meanwhile come
# first (a JVM's start is half a second of both cores of a small machine); as
# a busy machine then gives them little CPU, they get longer to answer.
LATER_NICE = 10
LATER_TIMEOUT = 60.0
# Even an unchanged binary is asked again after this long: a toolchain
# manager's proxy stays the same file while the toolchain behind it changes.
CACHE_TTL = 24 * 3600.0
# A toolchain that refused is asked again sooner: its fix is often a config file away.
FAILURE_TTL = 3600.0


def _ttl(entry: dict) -> float:
    return CACHE_TTL if entry.get("version") else FAILURE_TTL


@dataclass
class Toolchain:
    """A language this slave runs: its version and the programs that answered."""

    name: str
    version: str
    # Program name in the language's templates -> absolute path to run.
    programs: dict[str, str] = field(default_factory=dict)


def _names(lang: L.Language) -> list[str]:
    # Every program a language needs must be there: a JDK's java without javac is no use.
    # A run step of "./{exe}" runs what the compile step made: nothing to find.
    names = [cmd[0] for cmd in (lang.version, lang.compile or (), lang.run) if cmd and "{" not in cmd[0]]
    return list(dict.fromkeys(names))


def candidates(program: str) -> list[str]:
    """Every executable called ``program`` on PATH, in PATH order, each real file once."""
    if os.path.isabs(program):
        return [program] if os.access(program, os.X_OK) else []
    out, seen = [], set()
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                out.append(os.path.abspath(path))
    # A version manager's shim (pyenv, rbenv, asdf keep them in a shims/
    # directory) starts a shell script before the real program: ~60 ms of CPU
    # on every job.  Try the real programs on PATH first.
    return sorted(out, key=_is_shim)


def _is_shim(path: str) -> bool:
    return f"{os.sep}shims{os.sep}" in path


def _resolve(lang: L.Language, first: str) -> dict[str, str] | None:
    """Absolute paths for all the language's programs, ``first`` for the version command's.

    The others are taken from ``first``'s directory when they are there (the
    same JDK's ``java`` as its ``javac``), else from PATH.
    """
    programs = {lang.version[0]: first}
    for name in _names(lang):
        if name in programs:
            continue
        beside = os.path.join(os.path.dirname(first), name)
        path = beside if os.access(beside, os.X_OK) else shutil.which(name)
        if path is None:
            return None
        programs[name] = os.path.abspath(path)
    return programs


def _identity(programs: dict[str, str], lang: L.Language, sandbox_name: str) -> list:
    out: list = [list(lang.version), sandbox_name]
    for name, path in sorted(programs.items()):
        st = os.stat(os.path.realpath(path))
        out.append([name, path, st.st_size, st.st_mtime_ns])
    return out


class _Probe:
    """One version command, started and waited for in a worker thread.

    Started from the event loop it held the loop 30-60 ms per probe (a fork
    of the slave, not a vfork, as the sandbox's set-up runs in the child, then
    the wait for its exec): seven probes at once kept a just-registered slave
    from its first job for a third of a second.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._killed = False
        self._lock = threading.Lock()

    def run(self, argv: list[str], cwd: str, env: dict, preexec, timeout: float) -> tuple[int | None, bytes]:
        """(exit code, output); the code is None if it did not answer within ``timeout`` or was killed."""
        proc = subprocess.Popen(argv, cwd=cwd, env=env, preexec_fn=preexec, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with self._lock:
            self._proc = proc
            if self._killed:
                proc.kill()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None, b""
        return (None if self._killed else proc.returncode), out

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


async def _ask(lang: L.Language, programs: dict[str, str], sandbox: Sandbox | None,
               limits: Limits, pool: ThreadPoolExecutor, background: bool = False) -> tuple[str | None, bool]:
    """The version the toolchain reports in a job's environment (None if it fails there),
    and whether that answer is worth keeping (not a timeout or a failed start).

    Run in ``pool``'s threads.  ``background``: at LATER_NICE, with LATER_TIMEOUT to answer."""
    argv = [programs.get(lang.version[0], lang.version[0])] + list(lang.version[1:])
    program = argv[0]
    tmp = tempfile.mkdtemp(prefix="distexec-detect-")
    spawn = None
    try:
        if sandbox is not None:
            spawn = sandbox.command(argv, tmp, dict(lang.env), limits)
            argv, cwd, env, preexec = spawn.argv, spawn.cwd, spawn.env, spawn.preexec
        else:
            cwd, env, preexec = tmp, job_env(tmp, dict(lang.env)), None
        if background:
            preexec = _niced(preexec)
        timeout = LATER_TIMEOUT if background else DETECT_TIMEOUT
        probe = _Probe()
        try:
            code, out = await asyncio.get_running_loop().run_in_executor(
                pool, probe.run, argv, cwd, env, preexec, timeout)
        except asyncio.CancelledError:
            probe.kill()  # the slave stops while detecting: leave no probe behind
            raise
        if code is None:
            log.warning("%s: %s did not answer within %g s", lang.name, program, timeout)
            return None, False
    except OSError as exc:
        log.warning("%s: %s could not be started: %s", lang.name, program, exc)
        return None, False
    finally:
        if spawn is not None:
            sandbox.cleanup(spawn)
        shutil.rmtree(tmp, ignore_errors=True)
    text = out.decode(errors="replace")
    if code != 0:
        log.info("%s: %s does not work in a job's environment: %s", lang.name, program,
                 text.strip().splitlines()[0] if text.strip() else f"exit code {code}")
        return None, True
    return L.parse_version(lang, text), True


def _niced(preexec):
    def run() -> None:
        os.nice(LATER_NICE)
        if preexec is not None:
            preexec()
    return run


def default_cache_path() -> str:
    """Where a slave keeps its toolchain answers: ``$DISTEXEC_TOOLCHAIN_CACHE``, else under ``$DISTEXEC_HOME``.

    The answers depend on the machine, not on the cluster, so slaves with
    different homes (a test suite's clusters) may share one file.
    """
    return os.environ.get("DISTEXEC_TOOLCHAIN_CACHE") or os.path.join(config.home(), "cache", "toolchains.json")


def _load(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # slaves starting together each write a whole file
    except OSError as exc:
        log.warning("could not keep toolchain versions in %s: %s", path, exc)


def wanted(only: list[str] | None = None) -> list[L.Language]:
    """The languages to look for: all, or ``only`` (``--languages``; aliases allowed).

    An unknown name is a ``ValueError``.
    """
    names = [L.canonical(n) for n in only] if only else list(L.LANGUAGES)
    unknown = [n for n in names if n not in L.LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language(s): {', '.join(unknown)}; known: {', '.join(L.LANGUAGES)}")
    return [L.LANGUAGES[n] for n in dict.fromkeys(names)]


class _CacheLock:
    """Held while asking: slaves starting together on one machine take turns, and
    the later ones find the first one's answers in the cache and ask nothing
    (``distexec up``'s slaves started a JVM each, at once, on two cores).

    Taken without blocking the event loop: a thread waits for it when it is busy.
    """

    def __init__(self, cache_path: str):
        self.path = f"{cache_path}.lock"
        self._fd: int | None = None

    async def __aenter__(self) -> "_CacheLock":
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("toolchain cache lock %s: %s; asking without it", self.path, exc)
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await self._wait(fd)
        self._fd = fd
        return self

    @staticmethod
    async def _wait(fd: int) -> None:
        loop = asyncio.get_running_loop()
        taken = loop.create_future()

        def settle() -> None:
            if taken.cancelled():
                os.close(fd)  # nobody waits for it any more: let it go
            else:
                taken.set_result(None)

        def wait() -> None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is closed: the slave is gone
                os.close(fd)

        threading.Thread(target=wait, daemon=True, name="toolchain-cache-lock").start()
        await taken

    async def __aexit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Detector:
    """Finds toolchains, remembering answers in ``cache_path`` (see the module's docstring).

    ``remembered`` answers from the cache alone, at once; ``detect`` asks
    what it must.  A slave uses both to register before the slow toolchains
    (a JVM, a rustup proxy) have answered, and to learn them afterwards.
    """

    def __init__(self, *, cache_path: str | None = None, sandbox: Sandbox | None = None,
                 limits: Limits | None = None, keep: bool = True):
        self.cache_path = cache_path
        # False: answers are written only by keep_answers (the sandbox is still being probed).
        self.keep = keep
        self.sandbox = sandbox
        self.limits = limits or Limits()
        self._sandbox_name = type(sandbox).__name__ if sandbox is not None else "none"
        self._cached = _load(cache_path)
        self._fresh: dict[str, dict] = {}
        self._now = time.time()

    def _choices(self, lang: L.Language):
        """(programs, cache key, remembered entry or None) for each candidate, in PATH order."""
        if not lang.version:
            return
        for first in candidates(lang.version[0]):
            programs = _resolve(lang, first)
            if programs is None:
                continue
            try:
                key = json.dumps(_identity(programs, lang, self._sandbox_name))
            except OSError:
                continue
            hit = self._cached.get(key)
            fresh = isinstance(hit, dict) and self._now - float(hit.get("at", 0)) < _ttl(hit)
            yield programs, key, hit if fresh else None

    def remembered(self, lang: L.Language) -> tuple[bool, Toolchain | None]:
        """Whether the cache alone settles ``lang`` (no program left to ask), and its toolchain if it works."""
        for programs, _, hit in self._choices(lang):
            if hit is None:
                return False, None
            if hit.get("version") is not None:
                return True, Toolchain(lang.name, hit["version"], programs)
        return True, None

    async def _one(self, lang: L.Language, pool: ThreadPoolExecutor, background: bool) -> Toolchain | None:
        for programs, key, hit in self._choices(lang):
            # Failures are kept too: a rustup proxy that cannot work for a job is not asked again.
            if hit is not None:
                version = hit.get("version")
            else:
                version, keep = await _ask(lang, programs, self.sandbox, self.limits, pool, background)
                if keep:
                    self._fresh[key] = {"language": lang.name, "version": version, "at": self._now}
            if version is not None:
                return Toolchain(lang.name, version, programs)
        return None

    async def detect(self, langs: list[L.Language], background: bool = False) -> dict[str, Toolchain]:
        """Language name -> ``Toolchain`` for those of ``langs`` that work here, asking at once
        every program the cache does not settle; new answers are written to the cache.

        ``background``: nobody waits on it; the probes yield the CPU (LATER_NICE), and
        slaves of one machine take turns (``_CacheLock``)."""
        started = time.monotonic()
        if not (background and self.cache_path):
            return await self._detect(langs, background, started)
        async with _CacheLock(self.cache_path):
            self._cached = _load(self.cache_path)  # what others asked while we waited
            return await self._detect(langs, background, started)

    def keep_answers(self) -> None:
        """Write the answers held back (``keep=False``) to the cache, and the next ones as they come."""
        self.keep = True
        self._save()

    def _save(self) -> None:
        if self.cache_path and self.keep and self._fresh:
            # Entries of binaries long gone or too old to trust are dropped.
            kept = {k: v for k, v in self._cached.items()
                    if isinstance(v, dict) and self._now - float(v.get("at", 0)) < _ttl(v)}
            _save(self.cache_path, {**kept, **self._fresh})

    async def _detect(self, langs: list[L.Language], background: bool, started: float) -> dict[str, Toolchain]:
        asked = len(self._fresh)
        # Threads of its own: a probe may take seconds, and the runner's file work must not queue behind it.
        pool = ThreadPoolExecutor(max_workers=max(1, len(langs)), thread_name_prefix="toolchain-probe")
        try:
            results = await asyncio.gather(*(self._one(lang, pool, background) for lang in langs))
        finally:
            pool.shutdown(wait=False)
        found = {lang.name: tc for lang, tc in zip(langs, results) if tc is not None}
        missing = [lang.name for lang, tc in zip(langs, results) if tc is None]
        log.info("toolchains found in %.3f s (%d asked, the rest remembered)%s", time.monotonic() - started,
                 len(self._fresh) - asked, f"; not available here: {', '.join(missing)}" if missing else "")
        if len(self._fresh) > asked:
            self._save()
        return found


async def detect_toolchains(only: list[str] | None = None, *, cache_path: str | None = None,
                            sandbox: Sandbox | None = None,
                            limits: Limits | None = None) -> dict[str, Toolchain]:
    """Language name -> ``Toolchain``, for every language that works here.

    ``only`` restricts the set (``--languages``); names may be aliases, and
    an unknown name is a ``ValueError``.  A language whose programs are not
    on PATH (PowerShell on most Linux machines) is left out with one log line.
    """
    langs = wanted(only)
    return await Detector(cache_path=cache_path, sandbox=sandbox, limits=limits).detect(langs)


async def detect(only: list[str] | None = None, **kwargs) -> dict[str, str]:
    """Language name -> toolchain version (what a slave advertises); see ``detect_toolchains``."""
    return {name: tc.version for name, tc in (await detect_toolchains(only, **kwargs)).items()}
