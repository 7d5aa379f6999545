"""Compiled programs kept between jobs, so running the same program again skips its compile.

An entry is a directory named by a key: the SHA-256 of the user the job is
recorded under, the language, its toolchain version, the compiler's argv and
every file of the job that the compiler could read (the source, headers and
other job files).  It holds the compile step's artefacts: one executable, or
a set of ``.class`` files.

Safe under concurrent jobs and concurrent slaves sharing one directory:
an entry is written in a private temporary directory and renamed into place
in one step, so a reader sees a whole entry or none; two jobs compiling the
same source both work, and the second rename simply loses.  Eviction
renames an entry away before deleting it, so a reader copying from it
either finishes or fails cleanly and compiles instead.  Bounded in bytes:
the least recently used entries go first, of the users who keep more than a
fair share of it.

Every method is blocking file I/O; the runner calls them in a thread.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time

from distexec_kernel import config, fairshare

from . import safefs

log = logging.getLogger("distexec.slave.compile_cache")

DEFAULT_MAX_BYTES = 256 << 20
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_KEY_FORMAT = 3  # bump when what goes into a key changes (2: the owner; 3: its tag in the name)
_OWNER_SEP = "-"


class CompileCache:
    """A directory of compiled artefacts, least recently used evicted beyond ``max_bytes``."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = root
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self._lock = threading.Lock()
        # Users' compiled programs: for root alone, also where $DISTEXEC_HOME is a folder others can read.
        config.private_dir(root, dedicated=True)
        self._sweep()

    def describe(self) -> str:
        return f"compile cache {self.root} (at most {self.max_bytes >> 20} MiB)"

    @staticmethod
    def key(language: str, version: str, argv: list[str], files: dict[str, str | bytes],
            owner: str | None = None) -> str:
        """The key of one compile: the same key means the same artefacts.

        ``owner``: the user the job is recorded under.  Each user has their own entries: a hit is
        quicker than a compile, so a shared entry would tell one user that another had compiled
        the very program they submit.
        """
        h = hashlib.sha256()
        header = {"format": _KEY_FORMAT, "owner": owner, "language": language, "version": version,
                  "argv": list(argv)}
        h.update(json.dumps(header, sort_keys=True).encode())
        for name in sorted(files):
            data = files[name]
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogateescape")
            # Lengths first, so no two different file sets hash the same bytes.
            h.update(f"\0{len(name)}:{name}\0{len(data)}:".encode())
            h.update(data)
        # The owner's tag in the name too (a digest: no user name on the disk), for the eviction's
        # fair shares.
        return f"{h.hexdigest()}{_OWNER_SEP}{hashlib.sha256(repr(owner).encode()).hexdigest()[:16]}"

    def _entry(self, key: str) -> str:
        return os.path.join(self.root, key)

    def fetch(self, key: str, dest: str) -> bool:
        """Copy the artefacts stored under ``key`` into ``dest``; False on a miss."""
        def copy(path: str, name: str) -> None:
            # A copy, never a link: a job that rewrote its executable
            # must not change what the next job runs.  No times copied:
            # they would tell this job when someone compiled the same program.
            shutil.copyfile(path, os.path.join(dest, name))
            shutil.copymode(path, os.path.join(dest, name))
        return self._visit(key, copy) is not None

    def read(self, key: str, max_bytes: int) -> "dict[str, tuple[bytes, int]] | None":
        """The artefacts stored under ``key`` (name -> (bytes, permission bits)), for a job whose
        directory the slave cannot reach (the warm pool's child writes them); None on a miss.

        Raises ``safefs.TooLarge`` past ``max_bytes`` in all, each file's size read before its bytes:
        they would be held in the slave's memory, once per job running them at the same time.
        """
        left = max_bytes

        def load(path: str, name: str) -> tuple[bytes, int]:
            nonlocal left
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                left -= st.st_size
                if left < 0:
                    raise safefs.TooLarge(f"a compiled program of more than {max_bytes} bytes")
                return f.read(st.st_size), st.st_mode & 0o777
        return self._visit(key, load)

    def _visit(self, key: str, use) -> dict | None:
        """``use(path, name)`` for each artefact under ``key``, counted as a hit; None on a miss."""
        entry = self._entry(key)
        try:
            found = {name: use(os.path.join(entry, name), name) for name in os.listdir(entry)}
            os.utime(entry)  # most recently used
        except safefs.TooLarge:
            raise  # there, but not to be read whole: the caller runs it another way
        except OSError as exc:
            # Absent, or evicted while we read: compile instead.
            if not isinstance(exc, FileNotFoundError):
                log.warning("compile cache entry %s unreadable: %s", key[:12], exc)
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return found

    def store(self, key: str, src: str, patterns: tuple[str, ...]) -> bool:
        """Keep the files of ``src`` that match ``patterns`` under ``key``.

        Returns False when there was nothing to keep or another job stored
        the same key first.
        """
        # Only regular files of one link, opened without following links
        # (safefs): the slave copies as root, outside the sandbox, so a link the
        # build planted (main.bin -> a secret) would copy the secret into the
        # cache and hand it to later jobs, and a FIFO would hang the copy.
        names = sorted({os.path.basename(p) for pattern in patterns for p in glob.glob(os.path.join(src, pattern))})
        if not names:
            return False
        tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root)
        try:
            src_fd = safefs.open_dir(src)
            try:
                budget, kept = self.max_bytes, 0
                for name in names:
                    try:
                        budget -= safefs.copy_out(src_fd, name, os.path.join(tmp, name), max_bytes=budget)
                        kept += 1
                    except safefs.TooLarge:
                        return False  # over the cache's whole size: not worth keeping
                    except safefs.UnsafePath as exc:
                        log.warning("compile cache %s: skipped: %s", key[:12], exc)
            finally:
                os.close(src_fd)
            if not kept:
                return False
            try:
                os.rename(tmp, self._entry(key))
            except OSError:
                return False  # stored by a concurrent job (ENOTEMPTY/EEXIST): theirs is as good
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self.stores += 1
        self.evict()
        return True

    def entries(self) -> list[tuple[str, float, int]]:
        """``(key, last used, bytes)`` of every complete entry."""
        out = []
        for name in os.listdir(self.root):
            if name.startswith("."):
                continue
            path = self._entry(name)
            try:
                used = os.stat(path).st_mtime
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            except FileNotFoundError:
                continue
            out.append((name, used, size))
        return out

    def evict(self) -> None:
        """Drop entries until the cache fits in ``max_bytes``: the least recently used of those who
        keep more than their fair share, so one user compiling program after program evicts their
        own, never the few another runs again and again."""
        entries = sorted(self.entries(), key=lambda e: e[1])
        kept: dict[str, int] = {}
        for key, _, size in entries:
            kept[_owner(key)] = kept.get(_owner(key), 0) + size
        cut = fairshare.level(list(kept.values()), self.max_bytes)
        for key, _, size in entries:
            owner = _owner(key)
            if kept[owner] <= cut:
                continue
            kept[owner] -= size
            trash = os.path.join(self.root, f"{_TRASH_PREFIX}{key}-{os.getpid()}-{time.monotonic_ns()}")
            try:
                os.rename(self._entry(key), trash)
            except FileNotFoundError:
                continue  # another slave evicted it
            shutil.rmtree(trash, ignore_errors=True)

    def _sweep(self) -> None:
        # Temporary and trash directories left by a slave that died mid-write.
        # Only old ones: a live slave sharing the directory may be writing one now.
        cutoff = time.time() - 3600
        for name in os.listdir(self.root):
            if name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                path = os.path.join(self.root, name)
                try:
                    if os.stat(path).st_mtime < cutoff:
                        shutil.rmtree(path, ignore_errors=True)
                except FileNotFoundError:
                    pass


def _owner(key: str) -> str:
    """The owner's tag of an entry ("" for one older than the tags: they share one share)."""
    return key.rpartition(_OWNER_SEP)[2] if _OWNER_SEP in key else ""
