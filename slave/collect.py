"""Files out: what a job's ``collect`` globs keep of its directory once it ends.

The slave reads as root where the job (another uid) wrote, so the walk is
descriptor-based (``os.fwalk``, never following a link) and each file is
opened through ``safefs.open_regular``: a symlink to ``/etc/passwd``, a
FIFO, a device or a hard link to a file elsewhere is never read, only named
in the note of what was left out.  At most ``MAX_ARTIFACTS`` files and
``MAX_ARTIFACT_BYTES`` in all are kept; the rest are left out, by name, in
the note (the job keeps its own status: its program did what it did).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import mimetypes
import os
import stat
from dataclasses import dataclass, field

from distexec_kernel import protocol as P

from . import safefs

# The session kernel's own files in its directory (connection file, sockets, log): never the job's output.
PRIVATE_PREFIX = ".distexec-"
NOTE_NAMES = 10  # names listed in the note per reason; the rest are counted


@dataclass
class Collected:
    """What ``collect`` kept (``meta`` and ``blobs``, in the same order) and what it left out."""

    meta: list[dict] = field(default_factory=list)  # {"name", "size", "sha256", "mime"}
    blobs: list[bytes] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # reason -> names

    def leave_out(self, reason: str, name: str) -> None:
        self.left_out.setdefault(reason, []).append(name)

    def note(self) -> str | None:
        """One line for the job's stderr naming what was left out, or None."""
        if not self.left_out:
            return None
        parts = []
        for reason, names in self.left_out.items():
            shown = ", ".join(names[:NOTE_NAMES]) + (f" and {len(names) - NOTE_NAMES} more"
                                                      if len(names) > NOTE_NAMES else "")
            parts.append(f"{reason}: {shown}")
        return (f"distexec: collect kept {len(self.meta)} file(s); left out {'; '.join(parts)}\n")


def matches(pattern: str, name: str) -> bool:
    """Whether the relative path ``name`` matches the glob ``pattern`` (both ``/``-separated).

    ``*``, ``?`` and ``[...]`` stay within one folder; ``**`` as a whole part
    matches any number of folders (``out/**`` is everything under ``out``,
    ``**/*.png`` every PNG at any depth).  As in a shell, a name starting
    with ``.`` (``.cache``, ``.ipython`` in a session's home) is matched
    only by a pattern part that starts with ``.`` too.
    """
    pats, parts = pattern.split("/"), name.split("/")

    @functools.lru_cache(maxsize=None)  # a pattern of many ``**`` would otherwise take exponential time
    def match(i: int, j: int) -> bool:
        if i == len(pats):
            return j == len(parts)
        if pats[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(parts) + 1)
                       if not any(p.startswith(".") for p in parts[j:k]))
        return (j < len(parts) and (pats[i].startswith(".") or not parts[j].startswith("."))
                and fnmatch.fnmatchcase(parts[j], pats[i]) and match(i + 1, j + 1))

    return match(0, 0)


def _candidates(root_fd: int):
    """Every non-folder entry under ``root_fd`` as a relative path, sorted; links are listed, not followed."""
    names = []
    for dirpath, dirnames, filenames, fd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        rel = "" if dirpath == "." else dirpath[2:] + "/"
        if not rel:
            dirnames[:] = [d for d in dirnames if not d.startswith(PRIVATE_PREFIX)]
        # A link to a folder is listed with the folders (and not entered): it is a candidate, to be refused.
        filenames = filenames + [d for d in dirnames
                                 if stat.S_ISLNK(os.stat(d, dir_fd=fd, follow_symlinks=False).st_mode)]
        for name in filenames:
            if rel or not name.startswith(PRIVATE_PREFIX):
                names.append(rel + name)
        if rel.count("/") >= P.MAX_FILE_DEPTH:
            dirnames[:] = []  # deeper than a job file may be named: not collected
    return sorted(names)


def collect(workdir: str, patterns: list[str], max_files: int = P.MAX_ARTIFACTS,
            max_bytes: int = P.MAX_ARTIFACT_BYTES) -> Collected:
    """Read the regular files under ``workdir`` matching ``patterns``, within the caps.

    Run once the job's processes are gone (a fresh job) or its cell has
    ended (a session); never raises for what the job left behind.
    """
    out = Collected()
    try:
        root_fd = safefs.open_dir(workdir)
    except OSError:
        return out
    try:
        used = 0
        for name in _candidates(root_fd):
            if not any(matches(p, name) for p in patterns):
                continue
            try:
                fd, st = safefs.open_regular(root_fd, name)
            except (safefs.UnsafePath, OSError):
                out.leave_out("not a regular file of its own (a link, FIFO or hard link)", name)
                continue
            try:
                if len(out.meta) >= max_files:
                    out.leave_out(f"past {max_files} files", name)
                    continue
                if used + st.st_size > max_bytes:
                    out.leave_out(f"past {max_bytes >> 20} MiB in all ({st.st_size} bytes)", name)
                    continue
                data = _read(fd, max_bytes - used)
                if data is None:
                    out.leave_out(f"past {max_bytes >> 20} MiB in all (grew while read)", name)
                    continue
            finally:
                os.close(fd)
            used += len(data)
            out.blobs.append(data)
            out.meta.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                             "mime": mime_of(name)})
    finally:
        os.close(root_fd)
    return out


def _read(fd: int, most: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > most:
            return None
        chunks.append(chunk)


def mime_of(name: str) -> str:
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
