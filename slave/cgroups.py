"""Per-step cgroups (``memory`` and ``pids``, and ``cpu`` for a step with a
CPU cap: a session's kernel): the memory and process limits of a job step, how its OOM kill is seen, and how every process of it is found
and killed, even ones that left its process group.

Each controller is used where the machine mounts it: a cgroup v1 hierarchy of
its own, else the unified (v2) hierarchy, the only one on Debian 12, Ubuntu
22.04 and later.  What differs between the two is here and nowhere else: the
files a limit is written to, where an OOM kill is counted, how a controller is
made available below (v2: each parent's ``cgroup.subtree_control``), and that
one v2 directory holds every controller.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
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


# Where each version keeps a controller's limit.
_LIMIT_FILE = {1: {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.cfs_quota_us"},
               2: {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.max"}}
UNIFIED = "(v2)"  # the key of the v2 mount in ``_mounts()``'s answer (no v1 option is named so)


def _mounts() -> dict[str, str]:
    """controller -> mount point for the cgroup v1 hierarchies of this machine, and
    ``UNIFIED`` -> the cgroup2 mount point if there is one."""
    found = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "cgroup":
                    for opt in parts[3].split(","):
                        found.setdefault(opt, parts[1])
                elif len(parts) >= 3 and parts[2] == "cgroup2":
                    found.setdefault(UNIFIED, parts[1])
    except OSError:
        pass
    return found


def _enable(top: str, ctrl: str, below: list[str]) -> None:
    """Make ``ctrl`` usable in the children of ``below`` (each made if missing, inside the one
    before), under the v2 mount ``top``: a cgroup gives its children a controller in its
    ``cgroup.subtree_control``, and only one its own parent gave it."""
    for path in [top] + below:
        os.makedirs(path, exist_ok=True)
        control = os.path.join(path, "cgroup.subtree_control")
        if ctrl not in _read(control).split():
            _write(control, "+" + ctrl)


def _holds_processes(mount: str) -> bool:
    """True if the v2 mount's root is a cgroup with processes of its own that is not the hierarchy's
    root (which is exempt, and has no ``cgroup.type``): a container's, in a cgroup namespace."""
    try:
        return (os.path.exists(os.path.join(mount, "cgroup.type"))
                and bool(_read(os.path.join(mount, "cgroup.procs")).split()))
    except OSError:
        return False


def _vacate(mount: str) -> str | None:
    """Move the processes of a container's cgroup root into ``<mount>/init``, as Docker-in-Docker's
    entry point does, so that the root may pass controllers on.  None once it is empty, else why not."""
    leaf = os.path.join(mount, "init")
    try:
        os.makedirs(leaf, exist_ok=True)
        for _ in range(10):  # a process forked meanwhile is born in the root: read again
            pids = _read(os.path.join(mount, "cgroup.procs")).split()
            if not pids:
                log.info("cgroups: moved this container's processes into %s, so that its root can pass the"
                         " controllers on to the jobs' cgroups", leaf)
                return None
            for pid in pids:
                try:
                    _write(os.path.join(leaf, "cgroup.procs"), pid)
                except ProcessLookupError:
                    pass  # gone meanwhile
        return "processes keep being born there"
    except OSError as exc:
        return exc.strerror


class Cgroups:
    """The slave's cgroup subtree (``<mount>/distexec/slave-<pid>-<n>``) for
    the ``memory`` and ``pids`` controllers, one child cgroup per step.

    Created only where we may write (root, or a delegated subtree); a
    controller that cannot be used is left out of ``base`` and ``missing``
    says why.  ``unified``: the controllers on the v2 hierarchy.
    """

    # cpu only for steps whose Limits name ``cpus``: a job holds a slot, a session's kernel does not.
    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, mounts: dict[str, str] | None = None):
        self.base: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        self.unified: frozenset[str] = frozenset()
        self._leftovers: list[JobCgroup] = []
        # Steps are set up and cleaned up on worker threads, several at once.
        self._lock = threading.Lock()
        mounts = _mounts() if mounts is None else mounts
        instance = next(_instances)
        v2 = mounts.get(UNIFIED)
        try:
            offered = set(_read(os.path.join(v2, "cgroup.controllers")).split()) if v2 else set()
        except OSError:
            offered = set()
        if v2 and offered & set(self.CONTROLLERS) and _holds_processes(v2):
            why_not = _vacate(v2)
            if why_not is not None:
                for ctrl in offered.intersection(self.CONTROLLERS).difference(mounts):
                    self.missing[ctrl] = (f"the cgroup v2 root seen here ({v2}, a container's) holds processes, so"
                                          f" it cannot pass controllers on, and moving them into a child cgroup"
                                          f" failed: {why_not}")
        for ctrl in self.CONTROLLERS:
            if ctrl in self.missing:
                continue
            mount = mounts.get(ctrl) or (v2 if ctrl in offered else None)
            if mount is None:
                self.missing[ctrl] = "no cgroup hierarchy offers it (v1 or v2)"
                continue
            version = 1 if mounts.get(ctrl) else 2
            top = os.path.join(mount, "distexec")
            base = os.path.join(top, f"slave-{os.getpid()}-{instance}")
            try:
                if version == 2:
                    # Only a cgroup without processes of its own may pass a controller on (the
                    # mount's root excepted): ours hold none, the steps below them hold them all.
                    _enable(mount, ctrl, [top, base])
                else:
                    os.makedirs(base, exist_ok=True)
                probe = os.path.join(base, f"probe-{ctrl}")  # on v2 one directory holds them all
                os.mkdir(probe)
                try:
                    _write(os.path.join(probe, _LIMIT_FILE[version][ctrl]),
                           "1000" if ctrl != "cpu" or version == 1 else f"1000 {CPU_PERIOD_US}")
                finally:
                    os.rmdir(probe)
            except OSError as exc:
                self.missing[ctrl] = f"cannot create cgroups under {mount} (cgroup v{version}): {exc.strerror}"
                continue
            self.base[ctrl] = base
            if version == 2:
                self.unified |= {ctrl}
            _reap_stale(top, version == 2)

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
        # A random name, not a count: a job reads its own in /proc/self/cgroup, and a count told it
        # how many steps the slave had run, so how busy the other users were.
        name = name or f"job-{secrets.token_hex(6)}"
        cg = JobCgroup({ctrl: os.path.join(base, name) for ctrl, base in self.base.items()
                        if ctrl != "cpu" or limits.cpus is not None}, unified=self.unified)
        try:
            for path in cg.dirs():
                os.mkdir(path)
            for ctrl, path in cg.paths.items():
                if ctrl == "memory":
                    v2 = ctrl in self.unified
                    _write(os.path.join(path, _LIMIT_FILE[2 if v2 else 1][ctrl]), str(limits.memory_bytes))
                    # Swap would let a job go past its limit, only slower.
                    swap, value = (("memory.swap.max", "0") if v2 else
                                   ("memory.memsw.limit_in_bytes", str(limits.memory_bytes)))
                    if os.path.exists(os.path.join(path, swap)):
                        _write(os.path.join(path, swap), value)
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


def _reap_stale(top: str, v2: bool) -> None:
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
                    JobCgroup({"x": os.path.join(base, job)}, unified=frozenset({"x"} if v2 else ())).destroy()
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
    """One step's cgroups: controller -> directory (on v2 one directory for all of them)."""

    paths: dict[str, str]
    gone: bool = field(default=False)
    unified: frozenset = frozenset()  # the controllers whose directory is on the v2 hierarchy

    def dirs(self) -> list[str]:
        return sorted(set(self.paths.values()))

    def join_paths(self) -> tuple[str, ...]:
        return tuple(os.path.join(p, "cgroup.procs") for p in self.dirs())

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.dirs():
            try:
                found.update(int(x) for x in _read(os.path.join(path, "cgroup.procs")).split())
            except OSError:
                pass
        return found

    def set_cpus(self, cpus: float) -> None:
        """Cap the step at ``cpus`` cores (CFS quota over a 100 ms period); no-op without a cpu cgroup."""
        path = self.paths.get("cpu")
        if path is None:
            return
        quota = max(1000, int(cpus * CPU_PERIOD_US))
        if "cpu" in self.unified:
            _write(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
        else:
            _write(os.path.join(path, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))

    def unified_dirs(self) -> set[str]:
        return {self.paths[ctrl] for ctrl in self.unified if ctrl in self.paths}

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
            # v2: the cgroup's own kills and those below it, none here (a step's cgroup is a leaf).
            events = "memory.events" if "memory" in self.unified else "memory.oom_control"
            for line in _read(os.path.join(path, events)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            # Kernels before 4.13 count no kills: reaching the limit is the best hint.
            return int(_read(os.path.join(path, "memory.failcnt")))
        except (OSError, ValueError):
            return 0

    def kill_all(self) -> None:
        for path in self.unified_dirs():
            try:
                # v2 (Linux 5.14+): every process, also those forked meanwhile, in one write.
                _write(os.path.join(path, "cgroup.kill"), "1")
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def clear(self, wait: float = 1.0) -> bool:
        """Kill every process here and wait until they have left; the cgroup stays.  True when empty."""
        return self._killing_until(lambda: not self.pids(), wait)

    def destroy(self, wait: float = 1.0) -> bool:
        """Kill every process of the step, then remove the cgroups.  True when gone.

        A killed process leaves its cgroup only once the kernel has torn it
        down, so removal is retried for up to ``wait`` seconds.
        """
        if self.gone:
            return True
        self.kill_all()
        self.gone = self._killing_until(self._remove, wait)
        return self.gone

    def _remove(self) -> bool:
        left = set()
        for path in self.dirs():
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", path, exc)
                left.add(path)
        self.paths = {ctrl: path for ctrl, path in self.paths.items() if path in left}
        return not left

    def _killing_until(self, done, wait: float) -> bool:
        """Kill what is here until ``done()``, backing off, for up to ``wait`` seconds; True once done."""
        deadline = time.monotonic() + wait
        delay = 0.0005
        while not done():
            if time.monotonic() >= deadline:
                return False
            self.kill_all()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True
