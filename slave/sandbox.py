"""What surrounds a job's process: limits, environment, isolation.

``Sandbox.command`` turns the argv of a compile or run step into what is
actually spawned.  The runner knows nothing of how isolation is done, so a
stronger sandbox is a change here only.

Two sandboxes, the strongest that works is picked once at slave start
(``bwrap.best_sandbox``) and says what it does in ``describe()``:

- ``BwrapSandbox`` (bwrap.py): bubblewrap (as Flatpak uses it) puts each step in its own
  mount, PID, IPC, UTS and (unless ``--allow-network``) network namespace; the
  system is read-only, /tmp is private, only the job's directory is writable;
  the slave's $DISTEXEC_HOME, its user's home and the other jobs' directories
  are hidden; the program runs as a uid of its own (uids.py) with no capabilities.
- ``Sandbox``: the fallback when bubblewrap is missing or refused: a clean
  environment, a process group and resource limits only.

Both put each step in its own cgroup (``cgroups.py``: v1 ``memory`` and ``pids``) where the
kernel offers them: that is what enforces the memory and process limits and
what lets cleanup kill every process of the step, even ones that left the
process group.  Without cgroups the runner falls back to polling the job's
memory with psutil, and the process limit is RLIMIT_NPROC (of the job's own
uid) or nothing.  Both install a seccomp filter (``seccomp.py``, x86_64) that
refuses new user namespaces and a few other kernel interfaces.
docs/sandbox.md says what a job can and cannot do.
"""
from __future__ import annotations

import logging
import math
import os
import resource
from dataclasses import dataclass
from typing import Callable

from distexec_kernel.procs import die_with_parent, kill_group

from .cgroups import Cgroups, JobCgroup  # noqa: F401 (Cgroups re-exported)
from .seccomp import REFUSED_SYSCALLS, _install_seccomp  # noqa: F401

log = logging.getLogger("distexec.slave.sandbox")


@dataclass
class Limits:
    memory_mb: int = 1024
    output_mb: int = 16
    max_procs: int = 64
    allow_network: bool = False
    open_files: int = 256
    file_size_mb: int = 256
    # Cores a step may use at most (cgroup cpu quota); None: not capped (a job holds a slot).
    cpus: float | None = None

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb << 20

    @property
    def output_bytes(self) -> int:
        return self.output_mb << 20


@dataclass
class Spawn:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    preexec: Callable[[], None] | None
    # The step's cgroup, owned by the sandbox (None without cgroups).
    cgroup: "JobCgroup | None" = None
    # False when the kernel holds the memory limit (cgroup): the runner's RSS poll is then redundant.
    watch_memory: bool = True
    # The cgroup is the job's, shared by its steps (``command(within=...)``): freed by the runner.
    shared_cgroup: bool = False
    oom_before: int = 0  # the cgroup's OOM kills when the step began


# Only these reach a job: never the slave's secret or the user's tokens.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "JAVA_HOME", "GOROOT")

# Seconds of CPU time a process may use beyond (timeout x cores): RLIMIT_CPU is
# only the backstop for the runner's wall-clock timeout, so it must never fire
# first for an honest multi-threaded program.
CPU_MARGIN = 5
CORES = os.cpu_count() or 1  # read once: os.cpu_count() reads /sys at each call, and rlimits() runs per job

# bubblewrap's own processes in the step's pids cgroup (the outer bwrap and the
# namespace's init): they do not count against the job's --max-procs.
BWRAP_PROCS = 2

NOBODY = 65534
CGROUP_ROOT = "/sys/fs/cgroup"


def job_env(workdir: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def rlimits(limits: Limits, timeout: float | None, nproc: bool = False) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for every step: core dumps, open files, file size, the CPU-time
    backstop (``timeout`` x cores + a margin) and, if ``nproc``, the process count."""
    size = limits.file_size_mb << 20
    out = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
           (resource.RLIMIT_FSIZE, size, size)]
    if timeout:
        cpu = math.ceil(timeout * CORES) + CPU_MARGIN
        out.append((resource.RLIMIT_CPU, cpu, cpu + 1))
    if nproc:
        out.append((resource.RLIMIT_NPROC, limits.max_procs, limits.max_procs))
    return out


def _preexec(limits: Limits, timeout: float | None, cgroup: "JobCgroup | None",
             nproc: bool, seccomp: bool = False, first: Callable[[], None] | None = None) -> Callable[[], None]:
    limits_set = rlimits(limits, timeout, nproc)
    join = cgroup.join_paths() if cgroup else ()

    def apply() -> None:
        # Runs in the child between fork and exec: plain syscalls only (the sandbox's ``first`` too: it
        # joins the sandboxes' mount namespace, mountview.py).
        die_with_parent()
        if first is not None:
            first()
        pid = str(os.getpid()).encode()
        for path in join:
            # Joined before exec, so every process of the step is born inside.
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        os.umask(0o022)
        for which, soft, hard in limits_set:
            resource.setrlimit(which, (soft, hard))
        if seccomp:
            _install_seccomp()
    return apply


class Sandbox:
    """No isolation beyond a process group, a private directory, a clean
    environment and resource limits (cgroups where available).  Subclasses
    add real isolation."""

    name = "none"

    def __init__(self, cgroups: Cgroups | None = None, why_not: str | None = None,
                 limits: Limits | None = None, seccomp: bool = False):
        self.cgroups = cgroups
        # Why nothing stronger is in force, for describe().
        self.why_not = why_not
        # The slave's limits, for describe(); each step follows the Limits it is given.
        self.limits = limits or Limits()
        # The system-call filter (see _seccomp_program), if this machine takes it.
        self.seccomp = seccomp
        self.why_no_seccomp: str | None = None

    @property
    def job_uid(self) -> int:
        return os.getuid()

    @property
    def file_owner(self) -> tuple[int, int] | None:
        """(uid, gid) that files the slave writes for a running job are handed to; None: leave them."""
        return None

    def for_uid(self, uid: int) -> "Sandbox":
        """This sandbox with its processes run as ``uid`` (a session's own); without isolation, itself."""
        return self

    def describe(self) -> str:
        """What isolation and which limits are in force, in one line for the start-up log."""
        why = f" ({self.why_not})" if self.why_not else ""
        return (f"isolation: NONE{why} beyond a private working directory, a clean environment and "
                f"resource limits; jobs run as the slave's user (uid {os.getuid()}), see its files "
                f"and can reach the network; " + self._describe_limits())

    def _describe_limits(self) -> str:
        cg, lim = self.cgroups, self.limits
        parts = []
        if cg and cg.memory:
            parts.append(f"memory {lim.memory_mb} MiB per job by cgroup{' v2' * ('memory' in cg.unified)}")
        else:
            why = cg.missing.get("memory") if cg else "cgroups not used"
            parts.append(f"memory {lim.memory_mb} MiB per job polled every 50 ms (no memory cgroup: {why})")
        if cg and cg.pids:
            parts.append(f"{lim.max_procs} processes per job by cgroup{' v2' * ('pids' in cg.unified)}")
        elif self._nproc_rlimit():
            parts.append(f"{lim.max_procs} processes by RLIMIT_NPROC of the job's own uid (no pids cgroup)")
        else:
            why = cg.missing.get("pids") if cg else "cgroups not used"
            parts.append(f"processes NOT limited (no pids cgroup: {why})")
        parts.append(f"output {lim.output_mb} MiB, files {lim.file_size_mb} MiB, {lim.open_files} open files, "
                     "CPU time (timeout x cores)")
        if self.seccomp:
            calls = f"refused system calls: {REFUSED_SYSCALLS} (seccomp)"
        else:
            calls = f"NO system-call filter ({self.why_no_seccomp or 'seccomp off'})"
        return "limits: " + ", ".join(parts) + "; " + calls + "; " + self._describe_cleanup()

    def _describe_cleanup(self) -> str:
        if self.cgroups and self.cgroups.base:
            return "every process of a job is killed at its end (cgroup)"
        return "only the job's process group is killed at its end: a daemon that calls setsid() survives"

    def _nproc_rlimit(self) -> bool:
        # RLIMIT_NPROC counts every process of the real uid and never binds
        # root: here jobs run as the slave's own user, whose other processes
        # (the slave, a desktop session) would eat the budget.
        return False

    def _wrap(self, argv: list[str], workdir: str, limits: Limits, cgroup: "JobCgroup | None",
              tmpdirs: dict[str, str]) -> tuple[list[str], Callable[[], None] | None]:
        """The step's command as spawned, and what its process does first, if anything (in the
        child, as the slave's user, before the limits and the exec)."""
        return list(argv), None

    def close(self) -> None:
        """At slave exit: free what the sandbox holds for all jobs."""
        if self.cgroups is not None:
            self.cgroups.close()

    def _extra_procs(self) -> int:
        return 0

    def job_cgroup(self, limits: Limits) -> "JobCgroup | None":
        """One cgroup for every step of a job (``command(within=...)``), freed with ``release_job_cgroup``.

        What a compile step writes into the job's tmpfs is charged to the
        cgroup it ran in; a cgroup of its own, removed after it, would leave
        those pages charged to nobody's limit while the program runs.
        """
        return self.cgroups.create(limits, self._extra_procs()) if self.cgroups else None

    def release_job_cgroup(self, cgroup: "JobCgroup | None") -> None:
        if cgroup is not None:
            self.cgroups.release(cgroup)

    def command(self, argv: list[str], workdir: str, extra_env: dict[str, str], limits: Limits,
                timeout: float | None = None, tmpdirs: dict[str, str] | None = None,
                within: "JobCgroup | None" = None) -> Spawn:
        """What to spawn for one step (``argv`` run in ``workdir``).

        ``timeout`` (seconds of wall clock the runner allows) sets the CPU-time
        backstop.  ``tmpdirs``: sandbox path (``/tmp``, ``/dev/shm``) -> host
        directory to show there instead of a private tmpfs (the job's disk
        quota, see jobdirs.py).  ``within``: the job's cgroup (``job_cgroup``)
        for the step to join, rather than one of its own.  Every Spawn must be
        given back to ``cleanup`` once its process has exited or been killed.
        """
        cgroup = within or (self.cgroups.create(limits, self._extra_procs()) if self.cgroups else None)
        try:
            wrapped, first = self._wrap(argv, workdir, limits, cgroup, tmpdirs or {})
        except BaseException:
            if cgroup and not within:
                self.cgroups.release(cgroup)
            raise
        return Spawn(wrapped, workdir, job_env(workdir, extra_env),
                     _preexec(limits, timeout, cgroup, self._nproc_rlimit(), self.seccomp, first), cgroup=cgroup,
                     watch_memory=not (cgroup and "memory" in cgroup.paths), shared_cgroup=within is not None,
                     oom_before=within.oom_count() if within else 0)

    def kill(self, spawn: Spawn, pid: int) -> None:
        """Kill the step now (timeout, cancel, a limit).  ``pid`` is the spawned
        process, leader of its own process group; the runner then waits for it."""
        kill_group(pid)

    def memory_exceeded(self, spawn: Spawn) -> bool:
        """After the step ended: did the kernel kill a process of it for its memory?"""
        return bool(spawn.cgroup and spawn.cgroup.oom_count() > spawn.oom_before)

    def cleanup(self, spawn: Spawn) -> None:
        """Kill whatever is left of the step and free what ``command`` took."""
        if spawn.cgroup is None:
            return
        if not spawn.shared_cgroup:
            self.cgroups.release(spawn.cgroup)
        elif not spawn.cgroup.clear():
            log.warning("a step's processes would not leave the cgroup %s", spawn.cgroup.paths)
