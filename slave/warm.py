"""The warm pool: a fresh, isolated, limited process per job without paying for
bwrap, setpriv and an interpreter's start each time.

``WarmRunner`` sits in front of the fresh-process runner.  A parent started
once per slave inside bubblewrap (slave/warm_zygote.py and warm_child.py, spoken
to through slave/warm_pool.py) forks one child per job; the child isolates itself
and runs the job: Python source in a fresh ``__main__``, ``bash`` (also ``sh``, its alias) spawned
and waited for.  Each slot of the slave has its own uid and its own memory+pids
cgroup, made once.  A job the pool cannot serve (another language, files to
collect, no bubblewrap, the parent down) runs in a fresh process, and the
log says why, once per reason.  docs/sandbox.md ("The warm path") says what a
warm job can and cannot do; docs/performance.md ("Warm pool") what it costs.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import marshal
import os
import shutil
import signal
import time

from distexec_kernel import languages as L, protocol as P

from . import safefs, steps, uids
from .bwrap import WARM_ROOT, BwrapSandbox
from .job_pipes import OutputPipe, feed
from .jobdirs import BYTES_PER_INODE, JobDirs, quota_full
from .runner import (DRAIN_AFTER_EXIT, KILL_GRACE, Capture, Outcome, OutputCallback, ProcessRunner,
                     Runner, StepResult, disk_error, fields_of, hit_disk_limit, run_outcome)
from .sandbox import Limits, job_env, rlimits
from .seccomp import program_bytes
from .warm_pool import Zygote, ZygoteDied

log = logging.getLogger("distexec.slave.warm")

# How each language runs in a warm child: its source exec'd in a fresh __main__, or its program spawned
# (a compiled language's once the compile cache holds it).  Not PowerShell: .NET sizes its heap from
# the cgroup tree, which a warm child does not show, and no registry here offers it to test a remedy.
SERVED = {"python": "python", "bash": "exec", "javascript": "exec", "ruby": "exec",
          "c": "exec", "cpp": "exec", "go": "exec", "rust": "exec", "java": "exec"}
# The parent is restarted after it dies, unless it died this often within RESTART_WINDOW seconds.
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0
EMPTY_WAIT = 5.0  # seconds for a slot's cgroup to empty after its job
# A job still running this long (seconds) has its slot's next child forked, so that the child is
# isolated and waiting when the job ends (jobs ending together, say a wave of sleepers, then do not all
# wait for forks at once).  Shorter jobs do without: a fork beside them would slow them down.  So would
# a fork beside the other jobs this slave starts and ends: it waits until the slave has started or ended
# none for as long, or until PREPARE_AHEAD_LAST after the job's start (ahead_wait).
PREPARE_AHEAD = 0.02
PREPARE_AHEAD_LAST = 0.1
# Seconds for a job's process to be reaped after it said it ended (its exit takes about a millisecond;
# longer with much memory to free), before it is killed like anything else left in its cgroup.
GONE_WAIT = 0.2
PIPES_CLOSE = 0.01  # seconds for a job's output pipes to close after its end, before what holds them is killed
PROGRAMS_BYTES = 32 << 20  # compiled programs kept in memory for warm runs
# A larger one runs fresh, copied from the disk: the warm child gets its program from the slave's
# memory, and a few jobs at once running big ones would hold a few times the compile cache there.
PROGRAM_MAX_BYTES = PROGRAMS_BYTES // 2


def ahead_wait(now: float, started: float, busy_at: float) -> float:
    """Seconds a running job's slot's next child waits before it is forked (0: now), for a job that
    started at ``started`` on a slave that last started or ended a job at ``busy_at``."""
    return max(0.0, min(busy_at + PREPARE_AHEAD - now, started + PREPARE_AHEAD_LAST - now))


class ChildFailed(Exception):
    """A warm child could not set the job up (nothing of it ran); the parent lives on."""


class WarmRunner(Runner):
    """The jobs of SERVED forked from a warm parent; everything else to ``fresh``."""

    def __init__(self, fresh: ProcessRunner, slots: int, imports: list[str] | tuple = ()):
        self.fresh = fresh
        self.slots = max(1, slots)
        self.imports = list(imports)  # modules imported once in the parent, for every Python job
        self.why_off: str | None = None  # the pool is off for good, and why
        self.zygote: Zygote | None = None
        self.cgroups: list = []
        self.uids: list[uids.Uid] = []  # slot -> its jobs' uid, held while the pool lives
        self._free: list[int] = []
        # Slots whose job has ended, its result gone out, while its process is still being reaped
        # and its cgroup checked empty (_release): the next job on this slave waits for one.
        self._releasing: set[asyncio.Task] = set()
        # Each slot has two cgroups, used in turns: the child waiting for the slot's next job joins the
        # other one ahead (a join can take milliseconds), never the one its running job is in.
        self._next: dict[int, int] = {}  # slot -> which of its two cgroups its next job uses
        self._oom: dict[int, int] = {}  # cgroup index -> its OOM count, read after its last job
        self._said: set[str] = set()
        self._busy_at = 0.0  # when a job last started or ended here (monotonic)
        self._ahead: dict[int, asyncio.TimerHandle] = {}  # slot -> the timer forking its next child beside its job
        self._deaths: list[float] = []
        self._restarting: asyncio.Task | None = None
        self._starting: asyncio.Task | None = None
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # The compile cache's programs last run warm, in memory (most recent last): the same program
        # run again skips a thread's round trip and the disk.  Bounded by PROGRAMS_BYTES.
        self._programs: collections.OrderedDict[str, dict] = collections.OrderedDict()

    # -- start, stop, describe ------------------------------------------------------

    def start_soon(self) -> None:
        """``start`` in the background, so the slave registers meanwhile; a job that comes
        first waits for it (``started``)."""
        self._starting = asyncio.ensure_future(self.start())

    async def started(self) -> None:
        """Return once a ``start_soon`` has ended, whichever way."""
        if self._starting is not None and not self._starting.done():
            await asyncio.wait([self._starting])

    async def start(self) -> None:
        """Start the pool's parent; if it cannot run here, say why and serve every job fresh."""
        self.why_off = self._why_not_here()
        if self.why_off is None:
            try:
                # Each slot's jobs run as a uid of the slot's own (uids.py): concurrent jobs then cannot
                # signal, trace or read each other, nor share a per-uid quota.
                while len(self.uids) < self.slots:
                    self.uids.append(uids.take())
                self.cgroups = self.fresh.sandbox.cgroups.pool(2 * self.slots, self.fresh.limits)
                self._free = list(range(len(self.cgroups) // 2))
                await self._start_zygote()
            except OSError as exc:
                self.why_off = str(exc)
                for held in self.uids:
                    held.release()
        if self.why_off is not None:
            log.warning("warm pool: off (%s); every job runs in a fresh process", self.why_off)

    def _why_not_here(self) -> str | None:
        box = self.fresh.sandbox
        if not isinstance(box, BwrapSandbox):
            return "no bwrap"
        if not (box.cgroups and box.cgroups.memory and box.cgroups.pids):
            return "no memory and pids cgroups"
        if "python" not in self.fresh.toolchains:
            return "no python3 for its parent"
        return None

    async def _start_zygote(self) -> None:
        box, limits = self.fresh.sandbox, self.fresh.limits
        python = self.fresh.programs.get("python", {}).get("python3") or shutil.which("python3") or "python3"
        dirs = [path for cg in self.cgroups for path in cg.dirs()]
        zygote = Zygote(lambda command: box.zygote_command(command, self.fresh.jobdirs.root, dirs, limits), python,
                        job_env(WARM_ROOT, dict(L.get("python").env)),
                        {"root": WARM_ROOT, "seccomp": program_bytes().hex() if box.seccomp else "",
                         "imports": self.imports, "netns": not limits.allow_network})
        try:
            await zygote.start()
        except OSError as exc:
            if not self.imports:
                raise
            log.error("warm pool: %s; it starts again without --warm-imports", exc)
            self.imports = []
            return await self._start_zygote()
        for refused in zygote.refused:
            name, _, why = refused.partition(" ")
            self.imports = [n for n in self.imports if n != name]
            log.warning("warm pool: --warm-imports %s not imported (%s); jobs import it themselves", name, why)
        self.zygote = zygote
        for slot in self._free:
            self._prepare(slot)
        log.info("warm pool: parent ready (pid %s in its namespace)", zygote.pid)

    def _slot_spec(self, slot: int) -> dict:
        """What a slot's child needs before its job comes."""
        jobdirs, limits = self.fresh.jobdirs, self.fresh.limits
        disk = _tmpfs_bytes(jobdirs, limits)
        uid = self.uids[slot].uid
        return {"uid": uid, "gid": uid, "cgroups": list(self._cg(slot, self._next.get(slot, 0)).join_paths()),
                "disk_bytes": disk,
                "inodes": max(1024, disk // BYTES_PER_INODE)}

    def _cg(self, slot: int, turn: int):
        return self.cgroups[2 * slot + turn]

    def _prepare(self, slot: int) -> None:
        # Forked and isolated while the slot is free: the next job waits for none of it.
        if self.zygote is not None:
            self.zygote.prepare(slot, self._slot_spec(slot))

    def _prepare_ahead(self, slot: int, started: float) -> None:
        wait = ahead_wait(time.monotonic(), started, self._busy_at)
        if wait > 0:
            self._ahead[slot] = asyncio.get_running_loop().call_later(wait, self._prepare_ahead, slot, started)
            return
        self._prepare(slot)

    def describe(self) -> str:
        if self.why_off is not None:
            return f"warm pool: off ({self.why_off}); {self.fresh.describe()}"
        held = ", ".join(str(u.uid) for u in self.uids)
        compiled = [name for name in SERVED if L.get(name).compile]
        return (f"warm pool: {', '.join(n for n in SERVED if n not in compiled)} jobs and the "
                f"{', '.join(compiled)} programs the compile cache holds are forked from a parent started once "
                f"in bubblewrap, "
                f"each in its own mount and IPC namespaces"
                f"{'' if self.fresh.limits.allow_network else ' and the network namespace of its slot'}, "
                f"tmpfs (its directory, /tmp, /var/tmp, /dev/shm), "
                f"cgroup and seccomp filter, as its slot's uid ({held}), killed whole at its end"
                f"{'; imported once for every Python job: ' + ', '.join(self.imports) if self.imports else ''}"
                f"; other jobs: "
                f"{self.fresh.describe()}")

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.wait([self._starting])
        if self._restarting is not None:
            self._restarting.cancel()
        if self.zygote is not None:
            await self.zygote.close()
        if self._releasing:  # each empties its cgroup (its child died with the parent): before they go
            await asyncio.wait(set(self._releasing), timeout=EMPTY_WAIT)
        for cg in self.cgroups:
            await asyncio.to_thread(self.fresh.sandbox.cgroups.release, cg)
        for held in self.uids:  # nothing runs as them now (the cgroups emptied, or kept)
            held.release()
        os.close(self._devnull)
        await self.fresh.close()

    # -- a job ------------------------------------------------------------------------

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        await self.started()
        why = self._why_not(job)
        artefacts = None
        if why is None and L.get(job["language"]).compile:
            fresh = self.fresh
            lang = L.get(job["language"])
            key = fresh.cache_key(lang, job, lang.source_name(job["source"]))
            artefacts = self._programs.get(key)
            if artefacts is not None:
                self._programs.move_to_end(key)
            else:
                try:
                    artefacts = await asyncio.to_thread(fresh.compile_cache.read, key, PROGRAM_MAX_BYTES)
                except safefs.TooLarge:
                    why = f"a compiled program larger than {PROGRAM_MAX_BYTES >> 20} MiB (run from the disk)"
                if artefacts is not None:
                    self._keep_program(key, artefacts)
            if artefacts is None:
                why = why or "a compiled program not in the compile cache yet"
            else:
                log.info("job %s: compile cache hit (%s, %s), run warm", job["id"], lang.name, key[:12])
        deadline = time.monotonic() + EMPTY_WAIT
        while why is None and not self._free and self._releasing and time.monotonic() < deadline:
            # The master counts a slot free once its job's result is in; here it is free once that
            # job's process is reaped, a millisecond or so later.
            await asyncio.wait(set(self._releasing), timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
        if why is None and not self._free:
            why = "no free slot"  # never with the agent's slot count; said, not hidden
        if why is not None:
            if why not in self._said:
                self._said.add(why)
                log.info("warm pool: %s; such jobs run in a fresh process", why)
            return await self.fresh.run(job, on_output, cancel)
        # The slot free the longest: its next child has had the most time to be forked and isolated
        # (the slot freed last is forking its own right now).
        slot = self._free.pop(0)
        turn = self._next.get(slot, 0)
        self._next[slot] = 1 - turn  # the slot's next child is prepared in the other cgroup
        gone: list[asyncio.Future] = []  # the child's reaping (_run), which the slot's release awaits
        try:
            return await self._run(self.zygote, slot, turn, job, on_output, cancel, artefacts, gone)
        except ChildFailed as exc:
            # Nothing of the job ran; the parent is fine.
            log.warning("warm pool: %s; it runs in a fresh process", exc)
            return await self.fresh.run(job, on_output, cancel)
        except ZygoteDied as exc:
            log.warning("warm pool: its parent died (%s); job %s runs again in a fresh process", exc, job["id"])
            self._restart_soon()
            note = "distexec: the warm pool's parent died under this job; it ran again in a fresh process\n"
            on_output("stderr", note)
            outcome = await self.fresh.run(job, on_output, cancel)
            outcome.stderr = note + outcome.stderr
            return outcome
        finally:
            # After the result: a Python job says it ended just before its process exits, and the
            # exit (its memory torn down) is no part of the job's time.
            task = asyncio.ensure_future(self._release(slot, turn, gone[0] if gone else None))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    def _keep_program(self, key: str, artefacts: dict) -> None:
        self._programs[key] = artefacts
        total = sum(_bytes_of(a) for a in self._programs.values())
        while len(self._programs) > 1 and total > PROGRAMS_BYTES:
            total -= _bytes_of(self._programs.popitem(last=False)[1])

    def _why_not(self, job: dict) -> str | None:
        if self.why_off is not None:
            return f"off ({self.why_off})"
        lang = L.get(job["language"])
        if lang is None or lang.name not in self.fresh.toolchains:
            return "a language this slave does not run"  # the fresh runner says so, as an error
        if lang.name not in SERVED:
            return f"language {lang.name} not served warm"
        if lang.compile and self.fresh.compile_cache is None:
            return "no compile cache (compiled programs run warm from it)"
        if job.get("collect"):
            return "jobs that collect files are not served warm"
        if self.zygote is None or self.zygote.died is not None:
            self._restart_soon()
            return "its parent is restarting"
        return None

    async def _release(self, slot: int, turn: int, gone: asyncio.Future | None) -> None:
        """The slot is free again once its job's process has been reaped and nothing of the job (a
        daemon it left) is in its job's cgroup: the slot's next job has the same uid."""
        if gone is not None:
            try:
                await asyncio.wait_for(asyncio.shield(gone), GONE_WAIT)
            except (ZygoteDied, asyncio.TimeoutError):
                pass  # not gone yet (a job that said "done" and went on, say): killed below
        cg = self._cg(slot, turn)
        if _kill_left(cg):
            deadline = time.monotonic() + EMPTY_WAIT

            def empty() -> bool:
                while cg.pids():
                    cg.kill_all()
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.005)
                return True
            if not await asyncio.to_thread(empty):
                log.error("warm pool: slot %d still holds processes %s; not used again", slot, sorted(cg.pids()))
                return
        # The count its job left, before the cgroup's next job (two turns on) compares against it.
        self._oom[2 * slot + turn] = cg.oom_count()
        self._free.append(slot)
        self._prepare(slot)

    def _restart_soon(self) -> None:
        if self.why_off is not None or (self._restarting is not None and not self._restarting.done()):
            return
        self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        old, self.zygote = self.zygote, None
        if old is not None:
            await old.close()
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            self.why_off = f"its parent died {len(self._deaths)} times within {RESTART_WINDOW:g} s"
            log.error("warm pool: off (%s); every job runs in a fresh process", self.why_off)
            return
        try:
            await self._start_zygote()
        except OSError as exc:
            self.why_off = str(exc)
            log.error("warm pool: off (%s); every job runs in a fresh process", exc)

    async def _run(self, zygote: Zygote, slot: int, turn: int, job: dict, on_output: OutputCallback,
                   cancel: asyncio.Event, artefacts: dict | None, gone: list) -> Outcome:
        fresh, limits, jobdirs = self.fresh, self.fresh.limits, self.fresh.jobdirs
        lang = L.get(job["language"])
        mode = SERVED.get(lang.name, "exec")
        source_name = lang.source_name(job["source"])
        files = {name: P.file_bytes(content, name) for name, content in (job.get("files") or {}).items()}
        dirname = f"job{job['id']}"
        work = f"{WARM_ROOT}/{dirname}"
        argv: list[str] = []
        files[source_name] = job["source"].encode()  # Python's too: tracebacks quote it, a job may read it
        modes = {}
        for name, (data, perms) in (artefacts or {}).items():  # a compiled program from the cache
            files[name], modes[name] = data, perms
        env = dict(lang.env)
        if mode == "exec":
            argv = fresh.run_argv(lang, fields_of(lang, job), env) + list(job.get("args") or [])
            if lang.memory_options:
                argv[1:1] = L.fill(lang.memory_options, {"memory_bytes": str(limits.memory_bytes),
                                                         "half_memory_mib": str(limits.memory_bytes >> 21)})
            if "/" not in argv[0]:  # spawned, not exec'd by a shell: no PATH search of its own
                argv[0] = shutil.which(argv[0]) or argv[0]
        timeout = job.get("timeout") or P.DEFAULT_TIMEOUT
        cg = self._cg(slot, turn)
        spec = {"mode": mode, "source": job["source"], "source_name": source_name, "args": list(job.get("args") or []),
                "argv": argv, "files": files, "env": job_env(work, env),
                "rlimits": rlimits(limits, timeout), "dirname": dirname, "modes": modes}
        stdin = job.get("stdin")
        stdin_r, stdin_w = os.pipe() if stdin is not None else (self._devnull, None)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        oom_before = self._oom.pop(2 * slot + turn, None)
        if oom_before is None:
            oom_before = cg.oom_count()
        started = time.monotonic()
        try:
            ended = zygote.run(slot, marshal.dumps(spec), [stdin_r, out_w, err_w])
        except BaseException:
            for fd in (out_r, err_r, stdin_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w) + ((stdin_r,) if stdin_w is not None else ()):
                os.close(fd)
        gone.append(ended.gone)
        self._busy_at = started
        self._ahead[slot] = asyncio.get_running_loop().call_later(PREPARE_AHEAD, self._prepare_ahead, slot, started)
        capture = Capture(limits.output_bytes, on_output)
        feeder = asyncio.ensure_future(asyncio.to_thread(feed, stdin_w, stdin.encode())) if stdin_w else None
        readers = [OutputPipe(out_r, "stdout", capture), OutputPipe(err_r, "stderr", capture)]
        try:
            reason = await steps.supervise(ended, cancel, started + timeout, limits=(capture.crossed,))
            if reason is not None:
                zygote.kill(ended)
                cg.kill_all()
                await asyncio.wait([ended], timeout=KILL_GRACE)
                if not ended.done():
                    # Its processes slow to die (I/O, memory reclaim), or the parent stuck: the job
                    # ends as it was ended (run again, a timed-out job would take its whole time
                    # again); the parent, which should have told, is started anew all the same.
                    log.warning("warm pool: no word of job %s's end %g s after it was killed; its parent "
                                "starts again", job["id"], KILL_GRACE)
                    self._restart_soon()
                    ended.add_done_callback(lambda f: f.cancelled() or f.exception())  # known, not logged
            try:
                result = ended.result() if ended.done() else None
            except ZygoteDied:
                if reason is None:
                    raise  # died under a running job: run again, whole (run())
                # Ended by us, then the parent died before its word came: ended as it was ended, its
                # output kept.  Run again, a cancelled job started anew and lost what it had printed.
                log.warning("warm pool: its parent died before it told job %s's end", job["id"])
                self._restart_soon()
                result = None
            # Its output has ended with it, unless something it left (a daemon) holds the pipes: that
            # goes now (all it left goes once the slot is released).
            await asyncio.wait([r.done for r in readers], timeout=PIPES_CLOSE)
            if not all(r.done.done() for r in readers):
                _kill_left(cg)
                await asyncio.wait([r.done for r in readers], timeout=DRAIN_AFTER_EXIT)
        finally:
            self._ahead.pop(slot).cancel()
            self._busy_at = time.monotonic()
            if not ended.done():
                zygote.kill(ended)
                cg.kill_all()
            for r in readers:
                r.close()
            if feeder is not None:
                await asyncio.wait([feeder], timeout=KILL_GRACE)
        if result is None:  # killed, its end never told: see above
            step = StepResult(None, reason, time.monotonic() - started)
            return run_outcome(step, capture, job, limits, lang, source_name, jobdirs, lambda: False)
        # Ended by us (its timeout, a cancel, its slave stopping) before its child could start it: it
        # ends as it was ended.  Taken for a child's own failure, it ran again in a fresh process.
        if result.error is not None and reason is None:
            if result.disk:
                return Outcome(None, disk_error(jobdirs, "the job's files do not fit in"))
            raise ChildFailed(f"its child could not start job {job['id']}: {result.error}")
        if reason is None and capture.over:
            reason = "output_limit"
        if reason is None and result.exit_code != 0 and cg.oom_count() > oom_before:
            reason = "memory_limit"
        step = StepResult(result.exit_code, reason, time.monotonic() - started)
        full = result.free is not None and quota_full(*result.free)
        used = None if result.free is None else _tmpfs_bytes(jobdirs, limits) - result.free[0]
        return run_outcome(step, capture, job, limits, lang, source_name, jobdirs,
                           lambda: hit_disk_limit(step, full, True), lambda: used)


def _tmpfs_bytes(jobdirs: JobDirs, limits: Limits) -> int:
    """The size of a warm child's tmpfs (its directory, /tmp and /dev/shm)."""
    return jobdirs.disk_limit_mb << 20 if jobdirs.disk_limit_mb else limits.memory_bytes


def _bytes_of(artefacts: dict) -> int:
    return sum(len(data) for data, _ in artefacts.values())


def _kill_left(cg) -> bool:
    """Kill what is left in the slot's cgroup; False when it is empty (one read: every process of a
    job is in each of the slot's cgroups, so one controller's list is enough)."""
    path = cg.paths.get("pids") or next(iter(cg.paths.values()))
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return bool(pids)
