"""Pure functions on one job, as the panel shows and edits it: no widgets, no I/O, no state."""
from __future__ import annotations

import base64
import shlex

from . import display as D, protocol as P

# A text sign for each state, so a row reads without an emoji font (a plain
# browser shows the icons as empty boxes).
STATE_WORDS = {P.QUEUED: "queued", P.RUNNING: "running", P.SUCCEEDED: "ok", P.FAILED: "FAILED",
               P.REJECTED: "REJECTED", P.CANCELLED: "cancelled"}


def is_unnamed(job: dict) -> bool:
    """The master names a job submitted without a name ``job ID``."""
    name = job.get("name")
    return not name or name == f"job {job.get('id')}"


def display_name(job: dict) -> str:
    """The job's own name, else the first line of its program if known, else ``(unnamed)``."""
    if not is_unnamed(job):
        return job["name"]
    first = next((line.strip() for line in (job.get("source") or "").splitlines() if line.strip()), "")
    return f"({first[:40]}{'…' if len(first) > 40 else ''})" if first else "(unnamed)"


def row_label(job: dict) -> str:
    """One history row: ``✅ ok          42  name  python  3f2a1b0c…  0.08 s``."""
    err = (job.get("error") or {}).get("code") or ""
    status = job.get("status")
    if status == P.RUNNING:
        # Whole seconds: the label changes once per tick, not on every flush.
        dur = f"{int(D.duration(job) or 0)} s…"
    else:
        dur = D.fmt_seconds(D.duration(job)) if status != P.QUEUED else "-"
    name = display_name(job)
    name = name if len(name) <= 24 else name[:23] + "…"
    return (f"{P.ICONS.get(status, '?')} {STATE_WORDS.get(status, status or '?'):<9} {job['id']:>6}  "
            f"{name:<24}  {job.get('language') or '':<10}  {D.short_uid(job.get('slave_uid')):<9}  "
            f"{dur:>8}  {err}").rstrip()


def matches(job: dict, status: str, text: str) -> bool:
    """The filter: ``status`` ('' for all) and every word of ``text`` in the name, language or id."""
    if status and job.get("status") != status:
        return False
    if text:
        hay = f"{job.get('id')} {job.get('name') or ''} {job.get('language') or ''}".lower()
        return all(word in hay for word in text.lower().split())
    return True


_RANK = {P.QUEUED: 0, P.RUNNING: 1}


def progress(job: dict) -> tuple[int, int]:
    """How far a job has got; an event older than a record read from the master has less.

    (A retry's requeue looks like a step back; the next dispatch's higher
    attempt count sorts after everything before it.)
    """
    return (job.get("attempts") or 0, _RANK.get(job.get("status"), 2))


def rerun_request(record: dict) -> dict:
    """The submission that runs ``record``'s job again, as it was asked for."""
    return {"source": record["source"], "language": record["language"], "files": record.get("files") or None,
            "args": record.get("args") or None, "stdin": record.get("stdin"),
            "timeout": editor_timeout(record) or None,
            "name": None if is_unnamed(record) else record["name"], "retries": record.get("retries") or 0,
            "session": record.get("session")}


def editor_timeout(record: dict) -> float:
    """The timeout to show in the editor: 0 (the master's default) for a job that ran with the default."""
    timeout = record.get("timeout")
    return 0.0 if not timeout or timeout == P.DEFAULT_TIMEOUT else float(timeout)


def editor_request(*, language: str, source: str, args: str, uploads, carried: dict, stdin: str,
                   timeout: float, name: str) -> dict:
    """A submission from what the editor holds; ``ValueError`` says what is wrong with it."""
    if not language:
        raise ValueError("choose a language (no connected slave offers one yet?)")
    if not source.strip():
        raise ValueError("the program is empty: write it in the editor")  # as %%remote refuses an empty cell
    try:
        argv = shlex.split(args)
    except ValueError as exc:
        raise ValueError(f"arguments: {exc}") from None
    files = dict(carried)
    for upload in uploads:
        data = bytes(upload["content"])
        try:
            files[upload["name"]] = data.decode("utf-8")
        except UnicodeDecodeError:  # an image, a data file: sent as bytes, as the API takes them
            files[upload["name"]] = {"base64": base64.b64encode(data).decode("ascii")}
    if timeout < 0:
        raise ValueError("timeout must be positive (0: the master's default)")
    return {"source": source, "language": language, "files": files or None, "args": argv or None,
            "stdin": stdin or None, "timeout": timeout or None, "name": name.strip() or None}


class Output:
    """One stream of a job's output, appended by offset as ``job_output`` events say.

    Chunks are kept in a list, so a long-running job's megabytes are not
    copied again for every chunk.
    """

    def __init__(self, text: str = ""):
        self._chunks = [text] if text else []
        self.length = len(text)

    def append(self, offset: int, data: str) -> bool:
        """Add the part of ``data`` not seen yet; False if a chunk before it was missed."""
        if offset > self.length:
            return False
        new = data[self.length - offset:]
        if new:
            self._chunks.append(new)
            self.length += len(new)
        return True

    def text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def tail(self, n: int) -> str:
        parts, size = [], 0
        for chunk in reversed(self._chunks):
            parts.append(chunk)
            size += len(chunk)
            if size >= n:
                break
        return "".join(reversed(parts))[-n:] if parts else ""
