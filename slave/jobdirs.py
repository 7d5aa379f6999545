"""Where a slave's jobs and sessions write: a folder of the slave's own, and in
it one size-limited tmpfs per job (its disk quota).

``<parent>/distexec-slave-<uid>/`` (``--workdir`` or the system temp dir)
holds this slave's job directories and nothing else, so a slave that starts
again removes what an earlier run of it left (killed -9, a power cut) without
touching other slaves' directories: each slave has its own folder, held with
a lock while it runs.

Each job gets ``<folder>/<name>-XXXX/``, a tmpfs of ``--disk-limit`` MiB
mounted by the slave (root), holding ``work/`` (the job's directory, its
``$HOME``), and ``tmp/`` and ``shm/`` (bound as the sandbox's ``/tmp`` and
``/dev/shm``): everything a job can write shares one budget, and past it the
kernel answers ENOSPC, with nothing polled.  A tmpfs lives in memory, so what
a job writes counts against its memory cgroup as well (docs/sandbox.md).
Without the right to mount (a slave not run as root) the directories are
plain ones on the host disk and ``describe()`` says there is no disk limit.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass

from . import safefs
from .mountview import _LIBC, _MNT_DETACH, mount_points, under

log = logging.getLogger("distexec.slave.jobdirs")

_MS_NOSUID, _MS_NODEV = 2, 4
LOCK_NAME = ".lock"
# Every slave's folder of job directories starts so, wherever it is: a sandbox lists no mount in one
# but its own job's (mountview.py).
FOLDER_PREFIX = "distexec-slave-"
# Free space under which a job's tmpfs counts as full: a write that failed for
# want of space leaves less than one page free (a partial write fills it).
FULL_MARGIN = 64 << 10
BYTES_PER_INODE = 4096  # nr_inodes: the tmpfs's inodes are memory too, bounded with the size


@dataclass
class JobDir:
    """One job's (or session's) place: ``path`` is its working directory."""

    top: str
    path: str
    tmp: str
    shm: str
    limited: bool

    @property
    def sandbox_tmp(self) -> dict[str, str]:
        """Sandbox path -> host directory, for what must share the job's quota (empty: none)."""
        return {"/tmp": self.tmp, "/dev/shm": self.shm} if self.limited else {}

    def full(self) -> bool:
        """True if the job's tmpfs has (almost) no space or no inode left: it hit its disk limit."""
        st = self._statvfs()
        return st is not None and quota_full(st.f_bavail * st.f_frsize, st.f_files, st.f_favail)

    def used(self) -> int | None:
        """Bytes the job's files take in its tmpfs (None: not on one of its own)."""
        st = self._statvfs()
        return None if st is None else (st.f_blocks - st.f_bfree) * st.f_frsize

    def _statvfs(self) -> os.statvfs_result | None:
        if not self.limited:
            return None
        try:
            return os.statvfs(self.top)
        except OSError:
            return None


def quota_full(free_bytes: int, inodes: int, free_inodes: int) -> bool:
    """A job's tmpfs with these figures (statvfs) hit its disk limit: (almost) no space or no inode left."""
    return free_bytes < FULL_MARGIN or (inodes > 0 and free_inodes == 0)


class JobDirs:
    """The slave's folder of job directories; ``make`` and ``remove`` one job's."""

    def __init__(self, slave_uid: str, parent: str | None = None, disk_limit_mb: int = 1024):
        self.disk_limit_mb = disk_limit_mb
        # Empty mount points of jobs that ended, for the next ones (see remove); make and remove run on threads.
        self._free: list[str] = []
        self._lock = threading.Lock()
        parent = os.path.realpath(parent or tempfile.gettempdir())
        self._lock_fd: int | None = None
        self.root = self._claim(os.path.join(parent, f"{FOLDER_PREFIX}{_safe(slave_uid)}"), parent, slave_uid)
        self.why_unlimited = self._probe_mount() if disk_limit_mb else "--disk-limit 0"

    @property
    def limited(self) -> bool:
        return self.why_unlimited is None

    def describe(self) -> str:
        where = f"job directories under {self.root}"
        if self.limited:
            return (f"{where}; disk {self.disk_limit_mb} MiB per job for its directory, /tmp and /dev/shm "
                    f"together (a tmpfs of that size: in memory, counted against the memory limit too)")
        return f"{where}; disk NOT limited ({self.why_unlimited})"

    # -- the slave's folder ----------------------------------------------------

    def _claim(self, root: str, parent: str, uid: str) -> str:
        """Take ``root`` for this slave: ours alone while we run; what an earlier run left is removed."""
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
        try:
            fd = safefs.open_dir(root)  # never a link someone planted in a shared /tmp
        except OSError as exc:
            return self._fallback(parent, uid, f"{root} is not a plain folder ({exc.strerror})")
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return self._fallback(parent, uid, f"{root} belongs to uid {st.st_uid} or is writable by others")
            lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                return self._fallback(parent, uid, f"another slave with UID {uid} runs and uses {root}")
            self._lock_fd = lock
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        self._remove_leftovers(root)
        return root

    def _fallback(self, parent: str, uid: str, why: str) -> str:
        path = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{_safe(uid)}-", dir=parent)
        log.warning("%s: using %s, which no later run will clean up", why, path)
        return path

    def _remove_leftovers(self, root: str, whose: str = "an earlier run left") -> None:
        """Unmount and delete what is in the slave's folder (never following a link)."""
        for mount in sorted(_mounts_under(root), key=len, reverse=True):
            if _LIBC.umount2(mount.encode(), _MNT_DETACH) != 0:
                log.warning("cannot unmount the leftover %s: %s", mount, os.strerror(ctypes.get_errno()))
        left = [n for n in os.listdir(root) if n != LOCK_NAME]
        for name in left:
            _remove(os.path.join(root, name))
        if left:
            log.info("removed %d job director%s %s in %s", len(left), "y" if len(left) == 1 else "ies", whose, root)

    def _probe_mount(self) -> str | None:
        if os.geteuid() != 0:
            return "the slave is not root: it cannot mount a size-limited tmpfs per job"
        probe = tempfile.mkdtemp(prefix="probe-", dir=self.root)
        try:
            why = _mount_tmpfs(probe, 1 << 20)
            if why is None:
                _LIBC.umount2(probe.encode(), _MNT_DETACH)
            return why
        finally:
            os.rmdir(probe)

    # -- one job's directory ------------------------------------------------------

    def make(self, prefix: str) -> JobDir:
        """A fresh directory for one job or session (its disk quota mounted, if limited)."""
        limited = False
        if self.limited:
            with self._lock:
                top = self._free.pop() if self._free else None
            if top is None:
                top = tempfile.mkdtemp(prefix="q", dir=self.root)
            why = _mount_tmpfs(top, self.disk_limit_mb << 20)
            if why is not None:
                with self._lock:
                    self._free.append(top)
                raise OSError(errno.EIO, f"cannot mount the job's disk quota: {why}")
            limited = True
        else:
            top = tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.root)
        jd = JobDir(top, os.path.join(top, "work"), os.path.join(top, "tmp"), os.path.join(top, "shm"), limited)
        os.mkdir(jd.path, 0o700)
        for d in (jd.tmp, jd.shm):
            os.mkdir(d)
            os.chmod(d, 0o1777)  # sticky and open to all, as /tmp
        return jd

    def remove(self, jd: JobDir) -> None:
        """Delete the job's directory: an unmount frees a quota'd one at once, however many files.

        The mount point itself stays, empty, for a later job: removing it
        would detach the copies of that tmpfs in every sandbox whose bwrap is
        copying the mount tree at that moment, and their bwrap fails ("Can't
        bind mount /oldroot/ on /newroot/: ... No such file or directory").
        At most as many stay as jobs and sessions ran here at once.
        """
        if not jd.limited:
            _remove(jd.top)
            return
        if _LIBC.umount2(jd.top.encode(), _MNT_DETACH) != 0:
            log.warning("cannot unmount %s: %s", jd.top, os.strerror(ctypes.get_errno()))
            return  # not put back: a later job must never find another's files there
        with self._lock:
            self._free.append(jd.top)

    def close(self) -> None:
        """At slave exit: nothing of ours stays behind."""
        self._remove_leftovers(self.root, "kept for later jobs")
        try:
            os.unlink(os.path.join(self.root, LOCK_NAME))
        except OSError:
            pass  # a fallback folder (another slave held ours) has none: it goes all the same
        try:
            os.rmdir(self.root)
        except OSError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)[:64] or "slave"


def _mount_tmpfs(path: str, size: int) -> str | None:
    opts = f"size={size},nr_inodes={max(1024, size // BYTES_PER_INODE)},mode=0755".encode()
    if _LIBC.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts) != 0:
        return f"mount of a tmpfs failed: {os.strerror(ctypes.get_errno())}"
    return None


def _mounts_under(root: str) -> list[str]:
    try:
        return [point for point in mount_points() if under(point, root) and point != root]
    except OSError:
        return []


def _remove(path: str) -> None:
    # shutil.rmtree walks by descriptor on Linux: a link the job left is removed, never followed.
    assert shutil.rmtree.avoids_symlink_attacks
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)
