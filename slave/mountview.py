"""A sandbox's mount table: the system's mounts and the job's own, no other job's.

bubblewrap binds the host's whole tree (``--ro-bind / /`` is recursive) and
lays a tmpfs over what a job must not reach (/tmp, the folder of the job
directories, the slave's secrets).  A mount it only covers stays in the
namespace, unreachable but listed in ``/proc/self/mountinfo`` at its path:
every other job's tmpfs (``/tmp/distexec-slave-<uid>/<dir>``), of every slave
on the host; and where the host's ``/`` is shared (systemd's default), every
one mounted later arrived there too, into running jobs and into the warm
pool's parent, whose children copied them.  Where the host's mounts are
private, a copy outlives the slave's unmount at the job's end: each of those
tmpfs (its files, its memory) stayed as long as any sandbox that had copied it.

So bwrap starts from a table made for it: a private mount namespace without
what it would only cover (the cgroup hierarchies stay listed, bwrap.py) and
without any job's tmpfs.  Making one costs an unmount per mount dropped, and
each unmount waits for the kernel's RCU grace period (milliseconds on a busy
machine, benchmarks/mount_view.py), so it is made once per kind of sandbox
(``View``) and kept: each step joins it (setns), takes a copy of its own, and
brings in its own job's tmpfs, cloned from the host's table (open_tree and
move_mount, Linux 5.2).  No unmount, no read of the table on a step's path.
A thread watches the host's table and makes the namespace again, about a
second after a change outside the job folders: a mount the host adds reaches
the jobs started after it, one it removes is let go.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("distexec.slave.mountview")

# The C library's mount calls, shared with jobdirs.py, which mounts and unmounts the jobs' tmpfs.
_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MNT_DETACH = 2
# One number on every architecture, as for every call from 424 on.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429
_AT_FDCWD, _OPEN_TREE_CLONE, _MOVE_MOUNT_F_EMPTY_PATH = -100, 1, 4
_OCTAL = re.compile(rb"\\([0-7]{3})")
# Kinds of sandbox whose namespaces are kept, the last used: a slave's steps and its warm pool are
# two; a sandbox probed in a directory of its own (not a job folder) is another.
KEPT = 4
# After a change of the host's table, how long to wait for the ones that come with it (a job's mount
# comes with its unmount) before comparing.
SETTLE = 1.0


def _table(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[int, str]]:
    """(mount id, mount point) of each mount of this process's namespace (mountinfo writes a space,
    a tab, a newline and a backslash in a point as ``\\ooo``)."""
    with open(mountinfo, "rb") as f:
        rows = [line.split(maxsplit=5) for line in f]
    return [(int(r[0]), os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), r[4]))) for r in rows]


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    return [point for _, point in _table(mountinfo)]


def under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def folder_of(path: str, prefix: str) -> str | None:
    """The folder named ``prefix``… that ``path`` is (or is in), if any: a slave's job folder."""
    parts = path.split("/")
    for i, part in enumerate(parts[1:], 1):
        if part.startswith(prefix):
            return "/".join(parts[:i + 1])
    return None


@dataclass(frozen=True)
class View:
    """What one kind of sandbox must not list: the mounts under ``covered`` (where it lays a tmpfs),
    except those that hold or are held by a path in ``shown`` (what it binds from the host, a job
    folder standing for whatever it binds in one), and every mount in a folder named
    ``folder_prefix``… (the slaves' job folders, wherever they are)."""

    covered: tuple[str, ...]
    shown: tuple[str, ...]
    folder_prefix: str

    def in_folder(self, point: str) -> bool:
        return folder_of(point, self.folder_prefix) is not None

    def hidden(self, points: list[str]) -> list[str]:
        """The mount points of ``points`` to unmount, deepest first, each as often as it is listed."""
        out = [p for p in points
               if self.in_folder(p) or (any(under(p, c) for c in self.covered)
                                        and not any(under(s, p) or under(p, s) for s in self.shown))]
        # A point listed twice has two mounts stacked there: each needs its unmount.
        return sorted(out, key=len, reverse=True)

    def signature(self, table: list[tuple[int, str]]) -> frozenset[int]:
        """The host's mounts that a namespace made for this view depends on: all but the jobs'."""
        return frozenset(mid for mid, point in table if not self.in_folder(point))


class _Space:
    """A namespace made for a view, held open by a descriptor (no process lives in it)."""

    def __init__(self, view: View):
        table = _table()
        self.signature = view.signature(table)
        out = [os.fsencode(p) for p in view.hidden([p for _, p in table])]

        def make() -> None:  # in the child, before it execs cat
            if _LIBC.unshare(_CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for the sandboxes' mount table")
            # Private before anything is unmounted: in a shared one the unmounts would reach the host.
            if _LIBC.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "making the sandboxes' mount table private")
            for point in out:
                # One that will not go (gone meanwhile, busy) stays listed, unreachable as before.
                _LIBC.umount2(point, _MNT_DETACH)

        # A process to make it in (the slave has threads: setns and unshare want one that has none),
        # which waits on its input for the slave to open its namespace, then exits.
        proc = subprocess.Popen([shutil.which("cat") or "/bin/cat"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, preexec_fn=make)
        try:
            self.fd = os.open(f"/proc/{proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # Its root there: the namespace's own, or the slave's chroot, which setns leaves.
                self.root = os.open(f"/proc/{proc.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                os.close(self.fd)
                raise
        finally:
            proc.stdin.close()
            proc.wait()
        weakref.finalize(self, os.close, self.fd)
        weakref.finalize(self, os.close, self.root)


class Spaces:
    """The namespaces made so far, one per view, and the thread that keeps them up to date."""

    def __init__(self, settle: float = SETTLE):
        self._settle = settle
        self._lock = threading.Lock()
        self._made: dict[View, _Space] = {}
        self._watcher: threading.Thread | None = None

    def entry(self, view: View, own: str | None) -> Callable[[], None]:
        """What the process that execs bwrap does first (between fork and exec): join ``view``'s
        namespace, in a copy of its own, with the job's tmpfs mounted at ``own`` (None: none)."""
        space = self._space(view)
        own_path = os.fsencode(own) if own else None

        def enter() -> None:
            clone = -1
            if own_path is not None:
                # Cloned here, where the host's table has it; attached after the switch.
                clone = _LIBC.syscall(_SYS_OPEN_TREE, _AT_FDCWD, own_path, _OPEN_TREE_CLONE | os.O_CLOEXEC)
                if clone < 0:
                    raise OSError(ctypes.get_errno(), "open_tree(2) of the job's own directory (Linux >= 5.2)")
            if _LIBC.setns(space.fd, _CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns(2) into the sandboxes' mount table")
            os.fchdir(space.root)
            os.chroot(".")
            # A copy of its own: nothing this step mounts reaches the namespace the next one joins.
            if _LIBC.unshare(_CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for the step's mount table")
            if clone >= 0:
                if _LIBC.syscall(_SYS_MOVE_MOUNT, clone, b"", _AT_FDCWD, own_path, _MOVE_MOUNT_F_EMPTY_PATH) != 0:
                    raise OSError(ctypes.get_errno(), "move_mount(2) of the job's own directory")
                os.close(clone)
        return enter

    def _space(self, view: View) -> _Space:
        with self._lock:
            space = self._made.pop(view, None)
            if space is None:
                space = _Space(view)
                while len(self._made) >= KEPT:
                    del self._made[next(iter(self._made))]
            self._made[view] = space  # the last used last
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="mount-table", daemon=True)
                self._watcher.start()
            return space

    def _watch(self) -> None:
        # mountinfo polls with POLLPRI once the table changed since this file's last poll.
        with open("/proc/self/mountinfo", "rb") as f:
            poller = select.poll()
            poller.register(f, select.POLLPRI)
            while True:
                poller.poll()
                time.sleep(self._settle)
                poller.poll(0)  # what changed meanwhile is in the table read next
                try:
                    self.refresh()
                except Exception:
                    log.exception("the sandboxes' mount table could not be made again; the last one stays")

    def refresh(self) -> None:
        """Make again each namespace whose host mounts changed (a job's coming and going aside)."""
        table = _table()
        with self._lock:
            made = list(self._made.items())
        for view, space in made:
            if view.signature(table) != space.signature:
                log.info("the host's mounts changed: the sandboxes' mount table is made again")
                fresh = _Space(view)
                with self._lock:
                    if view in self._made:  # not dropped meanwhile
                        self._made[view] = fresh
                # The old one closes once no step about to start holds it (each copies it at its start).


SPACES = Spaces()


def supported() -> str | None:
    """Why a step could not bring its job's directory into its mount table here (None: it can)."""
    fd = _LIBC.syscall(_SYS_OPEN_TREE, _AT_FDCWD, b"/", _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        return f"open_tree(2) failed: {os.strerror(ctypes.get_errno())} (Linux 5.2 or later is needed)"
    os.close(fd)
    return None
