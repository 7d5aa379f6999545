"""Per-step cgroups (v1 ``memory`` and ``pids``, and ``cpu`` for a step with a
CPU cap: a session's kernel): the memory and process limits of a job step, how its OOM kill is seen, and how every process of it is found
and killed, even ones that left its process group.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sandbox import Limits

log = logging.getLogger("distexec.slave.cgroups")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _v1_mounts() -> dict[str, str]:
    """controller -> mount point, for the cgroup v1 hierarchies of this machine."""
    found = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "cgroup":
                    for opt in parts[3].split(","):
                        found.setdefault(opt, parts[1])
    except OSError:
        pass
    return found


class Cgroups:
    """The slave's cgroup v1 subtree (``<mount>/distexec/slave-<pid>-<n>``) for
    the ``memory`` and ``pids`` controllers, one child cgroup per step.

    Created only where we may write (root, or a delegated subtree); a
    controller that cannot be used is left out of ``base`` and ``missing``
    says why.
    """

    # cpu only for steps whose Limits name ``cpus``: a job holds a slot, a session's kernel does not.
    CONTROLLERS = ("memory", "pids", "cpu")
    _PROBE = {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.cfs_quota_us"}

    def __init__(self, mounts: dict[str, str] | None = None):
        self.base: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        self._counter = itertools.count(1)
        self._leftovers: list[JobCgroup] = []
        # Steps are set up and cleaned up on worker threads, several at once.
        self._lock = threading.Lock()
        mounts = _v1_mounts() if mounts is None else mounts
        instance = next(_instances)
        for ctrl in self.CONTROLLERS:
            mount = mounts.get(ctrl)
            if mount is None:
                self.missing[ctrl] = "no cgroup v1 hierarchy mounted (cgroup v2 is not supported yet)"
                continue
            top = os.path.join(mount, "distexec")
            base = os.path.join(top, f"slave-{os.getpid()}-{instance}")
            try:
                os.makedirs(base, exist_ok=True)
                probe = os.path.join(base, "probe")
                os.mkdir(probe)
                _write(os.path.join(probe, self._PROBE[ctrl]), "1000")
                os.rmdir(probe)
            except OSError as exc:
                self.missing[ctrl] = f"cannot create cgroups under {mount}: {exc.strerror}"
                continue
            self.base[ctrl] = base
            _reap_stale(top)

    @property
    def memory(self) -> bool:
        return "memory" in self.base

    @property
    def pids(self) -> bool:
        return "pids" in self.base

    @property
    def cpu(self) -> bool:
        return "cpu" in self.base

    def create(self, limits: Limits, extra_procs: int = 0, name: str | None = None) -> "JobCgroup | None":
        """A fresh cgroup for one step, with the limits set; None if there are no controllers."""
        if not self.base:
            return None
        self._retry_leftovers()
        name = name or f"job-{next(self._counter)}"
        cg = JobCgroup({ctrl: os.path.join(base, name) for ctrl, base in self.base.items()
                        if ctrl != "cpu" or limits.cpus is not None})
        try:
            for ctrl, path in cg.paths.items():
                os.mkdir(path)
                if ctrl == "memory":
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(limits.memory_bytes))
                    memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
                    if os.path.exists(memsw):
                        # Swap would let a job go past its limit, only slower.
                        _write(memsw, str(limits.memory_bytes))
                elif ctrl == "cpu":
                    cg.set_cpus(limits.cpus)
                else:
                    _write(os.path.join(path, "pids.max"), str(limits.max_procs + extra_procs))
        except OSError:
            cg.destroy()
            raise
        return cg

    def pool(self, n: int, limits: Limits) -> "list[JobCgroup]":
        """``n`` memory+pids cgroups made once and reused job after job (the warm pool's slots):
        a mkdir and rmdir per job cost more than the rest of a warm job's set-up."""
        made: list[JobCgroup] = []
        try:
            for i in range(n):
                cg = self.create(limits, name=f"warm-{i}")
                if cg is None:
                    break
                made.append(cg)
        except OSError:
            for cg in made:
                self.release(cg)
            raise
        return made

    def release(self, cg: "JobCgroup") -> None:
        if not cg.destroy():
            with self._lock:
                self._leftovers.append(cg)

    def _retry_leftovers(self) -> None:
        with self._lock:
            self._leftovers = [cg for cg in self._leftovers if not cg.destroy(wait=0)]

    def close(self) -> None:
        for cg in self._leftovers:
            cg.destroy()
        for base in self.base.values():
            try:
                os.rmdir(base)
            except OSError:
                pass


_instances = itertools.count(1)
CPU_PERIOD_US = 100_000


def _reap_stale(top: str) -> None:
    """Remove what slaves that died without cleaning up left under ``top``.

    Best effort: slaves starting together may reap the same directory.
    """
    try:
        entries = os.listdir(top)
    except OSError:
        return
    for entry in entries:
        try:
            pid = int(entry.split("-")[1]) if entry.startswith("slave-") else None
        except (IndexError, ValueError):
            continue
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        base = os.path.join(top, entry)
        try:
            for job in os.listdir(base):
                if os.path.isdir(os.path.join(base, job)):
                    JobCgroup({"x": os.path.join(base, job)}).destroy()
            os.rmdir(base)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@dataclass
class JobCgroup:
    """One step's cgroups: controller -> directory."""

    paths: dict[str, str]
    gone: bool = field(default=False)

    def join_paths(self) -> tuple[str, ...]:
        return tuple(os.path.join(p, "cgroup.procs") for p in self.paths.values())

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths.values():
            try:
                found.update(int(x) for x in _read(os.path.join(path, "cgroup.procs")).split())
            except OSError:
                pass
        return found

    def set_cpus(self, cpus: float) -> None:
        """Cap the step at ``cpus`` cores (CFS quota over a 100 ms period); no-op without a cpu cgroup."""
        path = self.paths.get("cpu")
        if path is not None:
            _write(os.path.join(path, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(path, "cpu.cfs_quota_us"), str(max(1000, int(cpus * CPU_PERIOD_US))))

    def oom_killed(self) -> bool:
        """True if the kernel killed a process of this step for going past the memory limit."""
        return self.oom_count() > 0

    def oom_count(self) -> int:
        """How many times the kernel killed a process here for its memory, ever (a cgroup
        reused job after job: compare before and after)."""
        path = self.paths.get("memory")
        if path is None:
            return 0
        try:
            for line in _read(os.path.join(path, "memory.oom_control")).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            # Kernels before 4.13 count no kills: reaching the limit is the best hint.
            return int(_read(os.path.join(path, "memory.failcnt")))
        except (OSError, ValueError):
            return 0

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def clear(self, wait: float = 1.0) -> bool:
        """Kill every process here and wait until they have left; the cgroup stays.  True when empty."""
        deadline = time.monotonic() + wait
        delay = 0.0005
        while self.pids():
            if time.monotonic() >= deadline:
                return False
            self.kill_all()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def destroy(self, wait: float = 1.0) -> bool:
        """Kill every process of the step, then remove the cgroups.  True when gone.

        A killed process leaves its cgroup only once the kernel has torn it
        down, so removal is retried for up to ``wait`` seconds.
        """
        if self.gone:
            return True
        deadline = time.monotonic() + wait
        delay = 0.0005
        while True:
            self.kill_all()
            left = {}
            for ctrl, path in self.paths.items():
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("cannot remove cgroup %s: %s", path, exc)
                    left[ctrl] = path
            self.paths = left
            if not left:
                self.gone = True
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
