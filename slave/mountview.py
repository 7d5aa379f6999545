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

So the process that becomes bwrap first takes a mount namespace of its own,
private (nothing more arrives from the host, nothing leaves), and unmounts
there what bwrap would only cover (bwrap.py leaves the cgroup hierarchies
listed) and every job folder's mount that is not this step's: bwrap then
copies a table without them.
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

# The C library's mount calls, shared with jobdirs.py, which mounts and unmounts the jobs' tmpfs.
_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MNT_DETACH = 2
_OCTAL = re.compile(rb"\\([0-7]{3})")


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The mount points of this process's namespace, as paths (mountinfo writes a space, a tab, a
    newline and a backslash in them as ``\\ooo``)."""
    with open(mountinfo, "rb") as f:
        return [os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), line.split()[4])) for line in f]


def under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


@dataclass(frozen=True)
class View:
    """What one sandbox must not list: the mounts under ``covered`` (where it lays a tmpfs) and
    below any folder named ``folder_prefix``… (the slaves' job folders, wherever they are), except
    those that hold or are held by a path in ``shown`` (what it binds from the host)."""

    covered: tuple[str, ...]
    shown: tuple[str, ...]
    folder_prefix: str

    def hidden(self, points: list[str]) -> list[str]:
        """The mount points of ``points`` to unmount, deepest first, each as often as it is listed."""
        def in_folder(point: str) -> bool:
            return any(part.startswith(self.folder_prefix) for part in point.split("/")[1:-1])

        out = [p for p in points
               if (any(under(p, c) for c in self.covered) or in_folder(p))
               and not any(under(s, p) or under(p, s) for s in self.shown)]
        # A point listed twice has two mounts stacked there: each needs its unmount.
        return sorted(out, key=len, reverse=True)

    def enter(self) -> None:
        """In the child that execs bwrap (root), between fork and exec: a private copy of the mount
        table without what ``hidden`` names.  Raises if the copy cannot be made private: unmounting
        in a namespace whose mounts are still shared would unmount them on the host too."""
        if _LIBC.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for the sandbox's mount table")
        if _LIBC.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "making the sandbox's mount table private")
        for point in self.hidden(mount_points()):
            # One that will not go (gone meanwhile, busy) stays listed, unreachable as before.
            _LIBC.umount2(os.fsencode(point), _MNT_DETACH)
