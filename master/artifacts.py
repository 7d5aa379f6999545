"""Files out, on the master: the collected files of finished jobs.

A slave sends a job's files as ``job_artifact`` frames (base64 chunks, by
index) before its ``job_finished``, which lists them (name, size, sha256,
mime).  The chunks are staged under ``incoming/JOB/``; when the result comes,
each file whose size and hash match its listing moves to ``JOB/INDEX`` and
the listing becomes the job's ``artifacts``.  Files are kept by job id only,
so ``delete(job_id)`` is all that pruning the history has to call.

Everything is under the master's private directory (0700, files 0600).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

from distexec_kernel import protocol as P
from distexec_kernel.procs import write_all

log = logging.getLogger("distexec.master.artifacts")

INCOMING = "incoming"


def root_for(db_path: str) -> str:
    """Where the artifacts of the history at ``db_path`` live: beside it, one folder per history."""
    base, _ = os.path.splitext(os.path.abspath(db_path))
    return base + "-artifacts"


class ArtifactStore:
    def __init__(self, root: str | None):
        # No root (an in-memory history): a private temporary folder, gone with the master.
        self._temporary = root is None
        self.root = tempfile.mkdtemp(prefix="distexec-artifacts-") if root is None else root
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.incoming = os.path.join(self.root, INCOMING)
        # What was half received before a restart is sent again by its slave, whole.
        shutil.rmtree(self.incoming, ignore_errors=True)
        os.makedirs(self.incoming, mode=0o700, exist_ok=True)
        self._staged: dict[int, dict[int, int]] = {}  # job id -> index -> bytes received so far

    # -- receiving ------------------------------------------------------------------

    def receive(self, job_id: int, index: int, offset: int, data: bytes) -> None:
        """Stage ``data`` at ``offset`` of the job's file ``index``; offset 0 starts the file anew.

        Raises ProtocolError for a frame out of order or past the caps.
        """
        if not 0 <= index < P.MAX_ARTIFACTS:
            raise P.ProtocolError("bad_message", f"job_artifact: index must be below {P.MAX_ARTIFACTS}")
        sizes = self._staged.setdefault(job_id, {})
        have = sizes.get(index, 0) if offset else 0
        if offset != have:
            raise P.ProtocolError("bad_message", f"job_artifact: job {job_id} file {index}: offset {offset}, "
                                  f"expected {have}")
        total = sum(size for i, size in sizes.items() if i != index) + have + len(data)
        if total > P.MAX_ARTIFACT_BYTES:
            raise P.ProtocolError("too_large", f"job_artifact: job {job_id}'s files are over "
                                  f"{P.MAX_ARTIFACT_BYTES} bytes")
        folder = os.path.join(self.incoming, str(job_id))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if offset else os.O_TRUNC)
        fd = os.open(os.path.join(folder, str(index)), flags, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        sizes[index] = have + len(data)

    def finish(self, job_id: int, listing) -> tuple[list[dict], list[str]]:
        """Keep the staged files that match ``listing`` (a ``job_finished``'s ``artifacts``).

        Returns the job's ``artifacts`` and the names that did not arrive whole
        (left out).  Blocking: run it off the event loop.
        """
        kept, missing = [], []
        staged = os.path.join(self.incoming, str(job_id))
        final = os.path.join(self.root, str(job_id))
        try:
            for index, meta in enumerate(listing[:P.MAX_ARTIFACTS] if isinstance(listing, list) else []):
                meta = _check_meta(meta)
                if meta is None:
                    continue
                src = os.path.join(staged, str(index))
                if not _matches(src, meta):
                    missing.append(meta["name"])
                    continue
                os.makedirs(final, mode=0o700, exist_ok=True)
                os.replace(src, os.path.join(final, str(len(kept))))
                kept.append(meta)
        finally:
            self.discard(job_id)
        return kept, missing

    def discard(self, job_id: int) -> None:
        """Drop what was staged for the job (a result that never came, a job settled meanwhile)."""
        # Only a job that sent chunks has a folder here (``incoming`` starts empty
        # at each start): most jobs have none, and an rmtree per job showed in profiles.
        if self._staged.pop(job_id, None) is not None:
            shutil.rmtree(os.path.join(self.incoming, str(job_id)), ignore_errors=True)

    # -- reading and deleting ---------------------------------------------------------

    def path(self, job_id: int, index: int) -> str:
        """The file of the job's artifact number ``index`` (its place in the job's ``artifacts``)."""
        return os.path.join(self.root, str(int(job_id)), str(int(index)))

    def delete(self, job_id: int) -> None:
        """Remove every file kept for the job: what pruning the history calls for each job it drops."""
        self.discard(job_id)
        shutil.rmtree(os.path.join(self.root, str(int(job_id))), ignore_errors=True)

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)


def _check_meta(meta) -> dict | None:
    if not isinstance(meta, dict):
        return None
    name, size, digest, mime = meta.get("name"), meta.get("size"), meta.get("sha256"), meta.get("mime")
    try:
        P.check_file_name(name)
    except P.ProtocolError:
        return None
    if (not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= P.MAX_ARTIFACT_BYTES
            or not isinstance(digest, str) or len(digest) != 64 or not isinstance(mime, str) or len(mime) > 200):
        return None
    return {"name": name, "size": size, "sha256": digest, "mime": mime}


def _matches(path: str, meta: dict) -> bool:
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError:
        return False
    return size == meta["size"] and h.hexdigest() == meta["sha256"]
