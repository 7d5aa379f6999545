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
import time
from dataclasses import dataclass, field

from distexec_kernel import protocol as P

from . import safefs

# The session kernel's own files in its directory (connection file, sockets, log): never the job's output.
PRIVATE_PREFIX = ".distexec-"
NOTE_NAMES = 10  # names listed in the note per reason; the rest are counted
# Collecting is root's work after the job's end, outside its limits and its slot's timeout: it
# stops after this long (a job may leave 200,000 files, and up to 64 patterns of many ``**``).
COLLECT_SECONDS = 10.0


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
    pats, parts = _parts(pattern), name.split("/")
    if len(pats) - pats.count("**") > len(parts):
        return False  # more parts to match one each than the name has (a pattern of many parts)

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


@functools.lru_cache(maxsize=256)
def _parts(pattern: str) -> tuple[str, ...]:
    """A pattern's parts, a run of ``**`` as one (``**/**`` matches what ``**`` does)."""
    out: list[str] = []
    for part in pattern.split("/"):
        if not (part == "**" and out and out[-1] == "**"):
            out.append(part)
    return tuple(out)


def _candidates(root_fd: int, deadline: float) -> tuple[list[str], bool]:
    """Every non-folder entry under ``root_fd`` as a relative path, sorted; links are listed, not followed.
    And whether the walk got through before ``deadline`` (time.monotonic())."""
    names = []
    for dirpath, dirnames, filenames, fd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        if time.monotonic() > deadline:
            return sorted(names), False
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
    return sorted(names), True


def collect(workdir: str, patterns: list[str], max_files: int = P.MAX_ARTIFACTS,
            max_bytes: int = P.MAX_ARTIFACT_BYTES, seconds: float = COLLECT_SECONDS) -> Collected:
    """Read the regular files under ``workdir`` matching ``patterns``, within the caps.

    Run once the job's processes are gone (a fresh job) or its cell has
    ended (a session); never raises for what the job left behind, and
    stops after ``seconds``, noting that the rest was not looked at.
    """
    out = Collected()
    deadline = time.monotonic() + seconds
    try:
        root_fd = safefs.open_dir(workdir)
    except OSError:
        return out
    try:
        used = 0
        names, walked = _candidates(root_fd, deadline)
        unlooked = 0
        for looked, name in enumerate(names):
            if time.monotonic() > deadline:
                unlooked = len(names) - looked
                break
            if not any(matches(p, name) for p in patterns):
                continue
            if not _is_utf8(name):
                out.leave_out("a name that is not UTF-8", shown_name(name))
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
        if unlooked or not walked:
            out.leave_out(f"not looked at (collecting stops after {seconds:g} s)",
                          f"{unlooked} file(s)" + ("" if walked else " and those not listed yet"))
    finally:
        os.close(root_fd)
    return out


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # bytes the file system gave that are not UTF-8 (surrogate escapes)
        return False


def shown_name(name: str) -> str:
    """A file name that is not UTF-8, said with its stray bytes as ``\\xff``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
