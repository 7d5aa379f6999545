"""Files in and out, on the client: local files and folders as a job's ``files``, collected files saved.

A job file's name is a relative path (``data/in.csv``); its content is text,
or ``{"base64": ...}`` for bytes (``protocol.file_content``).  A folder given
as a path is sent whole under its own name (``data/`` gives ``data/...``),
leaving out dot files and folders and ``__pycache__``, within the master's
caps (``MAX_FILES`` files, ``MAX_FILES_BYTES`` in all, ``MAX_FILE_DEPTH`` levels).
"""
from __future__ import annotations

import os
import stat

from . import protocol as P

SKIPPED_DIRS = {"__pycache__"}


class FilesError(ValueError):
    """Local files that cannot be sent (unreadable, too many, too big); the message says which."""


def read_paths(paths: list[str]) -> dict:
    """Local files and folders as a job's ``files``: a file under its base name, a folder under its name."""
    files: dict = {}
    total = 0
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            base = os.path.basename(os.path.normpath(os.path.abspath(path)))
            entries = [(f"{base}/{rel}", full) for rel, full in _walk(path)]
            if not entries:
                raise FilesError(f"folder {path} holds no files to send")
        else:
            entries = [(os.path.basename(path), path)]
        for name, full in entries:
            if name in files:
                raise FilesError(f"two files are both named {name!r}")
            try:
                P.check_file_name(name)
            except P.ProtocolError as exc:
                raise FilesError(exc.message) from None
            if len(files) >= P.MAX_FILES:
                raise FilesError(f"more than {P.MAX_FILES} files (at {name!r}): send fewer, or an archive")
            try:
                # O_NONBLOCK: a FIFO in the folder fails the check below instead of waiting for a writer.
                fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise FilesError(f"{full} is not a regular file (a FIFO, a device or a socket): not sent")
                    data = f.read(P.MAX_FILES_BYTES + 1)
            except OSError as exc:
                raise FilesError(f"cannot read {full}: {exc.strerror}") from None
            total += len(data)
            if total > P.MAX_FILES_BYTES:
                raise FilesError(f"the files are over {P.MAX_FILES_BYTES >> 20} MiB in all (at {name!r})")
            files[name] = P.file_content(data)
    return files


def _walk(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if not name.startswith("."):
                full = os.path.join(dirpath, name)
                yield os.path.relpath(full, root).replace(os.sep, "/"), full


def as_files(files) -> dict | None:
    """``submit``'s ``files``: a dict (name -> text, bytes or ``{"base64"}``), a path, or a list of paths."""
    if files is None:
        return None
    if isinstance(files, (str, os.PathLike)):
        return read_paths([os.fspath(files)])
    if isinstance(files, dict):
        return {name: P.file_content(bytes(c)) if isinstance(c, (bytes, bytearray)) else c
                for name, c in files.items()}
    return read_paths([os.fspath(p) for p in files])


def save_artifacts(job, directory: str, names: list[str] | None = None) -> list[str]:
    """Write the job's collected files (or those of ``names``) under ``directory``, folders kept.

    Returns the paths written.  A name is checked as a job file name is, so
    nothing is written outside ``directory``.
    """
    listed = {a["name"] for a in job.artifacts}
    wanted = list(names) if names else [a["name"] for a in job.artifacts]
    unknown = [n for n in wanted if n not in listed]
    if unknown:
        raise FilesError(f"job {job.id} has no collected file(s) {', '.join(map(repr, unknown))}; it has: "
                         f"{', '.join(sorted(listed)) or 'none'}")
    written = []
    for name in wanted:
        try:
            P.check_file_name(name)
        except P.ProtocolError as exc:
            raise FilesError(exc.message) from None
        dest = os.path.join(directory, *name.split("/"))
        try:
            _write_beneath(directory, name.split("/"), job.artifact(name))
        except OSError as exc:
            raise FilesError(f"cannot write {dest}: {exc.strerror}") from None
        written.append(dest)
    return written


def _write_beneath(directory: str, parts: list[str], data: bytes) -> None:
    """Write ``data`` at ``directory/parts...`` without following a link below ``directory``.

    The folder may be shared (a project's, a class's): a link, FIFO or hard link someone planted
    there must not turn this write (as root, often) into one of a file they chose.  Each folder is
    entered with O_NOFOLLOW; the file is written under a name of its own and renamed over the
    entry, so what stood there (a hard link to another file, a FIFO) is replaced, never written to.
    """
    try:  # the folder named is the caller's choice, followed if it is a link; below it nothing is
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileExistsError, NotADirectoryError):
        raise FilesError(f"{directory} is not a folder") from None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:  # ELOOP: a link; ENOTDIR: a file or a FIFO
                raise FilesError(f"{os.path.join(directory, *parts[:i + 1])} is not a folder (a link or a file): "
                                 f"not written through; remove it or choose another folder") from None
            os.close(fd)
            fd = sub
        tmp = f".{parts[-1]}.{os.getpid()}.{os.urandom(4).hex()}.part"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                f.write(data)
            os.replace(tmp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=fd)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def human_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} MiB"
