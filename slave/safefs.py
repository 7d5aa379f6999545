"""File operations the slave does, as root, where a job can write.

A job's directory (a fresh job's between its steps, a session's for its
whole life) belongs to the job's unprivileged uid, which may have planted a
symlink, a FIFO or a hard link under any name the slave later touches.  A
plain ``open(path, "w")`` as root then writes through the link into a host
file, or blocks the slave's event loop on the FIFO.  So everything here works
under a directory descriptor, one path component at a time, never follows a
link (``O_NOFOLLOW``), never blocks on a special file (``O_NONBLOCK``), and
refuses whatever is not a plain directory or a regular file of one link.
"""
from __future__ import annotations

import os
import stat

from distexec_kernel.procs import write_all as _write_all

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path the slave refuses to touch: a link, a FIFO, a device, a hard link."""


class TooLarge(OSError):
    """A file past the size the caller allows."""


def _parts(name: str) -> list[str]:
    # The master already refused such names (protocol.check_file_name); the
    # slave checks again because it is root here and the name becomes a path:
    # a job file's name must never reach outside the directory, whoever sent it.
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"bad file name {name!r}")
    return parts


def own_folder(path: str, mode: int) -> None:
    """Make ``path`` (``mode``) unless it is there, then make sure it is a real folder of this uid that
    no one else may write: where root writes, nobody may plant a name (or the folder itself as a link)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{path} is not a folder of uid {os.getuid()} that only it may write")


def open_dir(path: str) -> int:
    """A descriptor of directory ``path``, which must not itself be a link."""
    return os.open(path, _DIR_FLAGS)


def _descend(dir_fd: int, parts: list[str], create: bool, owner: tuple[int, int] | None) -> int:
    """Walk ``parts`` (folders) from ``dir_fd``; a new descriptor of the last one.

    A component that is a symlink fails with ELOOP/ENOTDIR instead of being followed.
    """
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafePath(f"{part!r} is not a plain folder ({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_file(dir_fd: int, name: str, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Create ``name`` (a relative path) under ``dir_fd`` holding ``data``, replacing what was there.

    Whatever had that name (a file, a symlink to a host file, a FIFO, a hard
    link) is unlinked first, never opened; the new file is made with
    ``O_EXCL``, so a link planted in between makes this fail rather than
    write through it.  ``owner``: (uid, gid) to hand the file to, so the job
    can rewrite its own input as it could in a fresh run.
    """
    *folders, leaf = _parts(name)
    fd = _descend(dir_fd, folders, True, owner)
    try:
        try:
            os.unlink(leaf, dir_fd=fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise UnsafePath(f"{name!r} is a folder in the job's directory") from None
        try:
            out = os.open(leaf, _NEW_FILE_FLAGS, 0o644, dir_fd=fd)
        except FileExistsError:
            raise UnsafePath(f"{name!r} was re-created by the job while the slave wrote it") from None
        try:
            if owner is not None:
                os.fchown(out, *owner)
            _write_all(out, data)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def write_files(root: str, files: dict[str, bytes], owner: tuple[int, int] | None = None) -> None:
    """``write_file`` for each of ``files`` under the directory ``root``."""
    dir_fd = open_dir(root)
    try:
        for name, data in files.items():
            write_file(dir_fd, name, data, owner)
    finally:
        os.close(dir_fd)


def exists(root: str, name: str) -> bool:
    """Whether ``name`` (a relative path) is under the directory ``root``, as ``lexists`` says, but with its
    folders walked without following a link: a folder the job made a link leads nowhere, not out of it."""
    dir_fd = open_dir(root)
    try:
        *folders, leaf = _parts(name)
        fd = _descend(dir_fd, folders, False, None)
    except UnsafePath:
        return False
    finally:
        os.close(dir_fd)
    try:
        os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open ``name`` under ``dir_fd`` for reading if it is a regular file of one link.

    Returns the descriptor and its stat; raises UnsafePath for anything else
    (a symlink, a FIFO, a device, a hard link to a file elsewhere).
    """
    *folders, leaf = _parts(name)
    fd = _descend(dir_fd, folders, False, None)
    try:
        try:
            f = os.open(leaf, _READ_FLAGS, dir_fd=fd)
        except OSError as exc:
            raise UnsafePath(f"{name!r} cannot be read safely ({exc.strerror})") from None
    finally:
        os.close(fd)
    st = os.fstat(f)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(f)
        raise UnsafePath(f"{name!r} is not a regular file of its own")
    return f, st


def copy_out(src_dir_fd: int, name: str, dest_path: str, max_bytes: int | None = None) -> int:
    """Copy the regular file ``name`` (under ``src_dir_fd``) to ``dest_path``, a place the job cannot write.

    The copy gets fresh times and mode 0644: nothing of when or by whom the
    original was made travels with it.  Returns the number of bytes copied.
    """
    src, st = open_regular(src_dir_fd, name)
    try:
        if max_bytes is not None and st.st_size > max_bytes:
            raise TooLarge(f"{name!r} is larger than {max_bytes} bytes")
        out = os.open(dest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755
                      if st.st_mode & 0o111 else 0o644)
        try:
            copied = 0
            while True:
                chunk = os.read(src, 1 << 20)
                if not chunk:
                    return copied
                copied += len(chunk)
                if max_bytes is not None and copied > max_bytes:
                    raise TooLarge(f"{name!r} grew past {max_bytes} bytes while it was copied")
                _write_all(out, chunk)
        finally:
            os.close(out)
    finally:
        os.close(src)
