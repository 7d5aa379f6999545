"""The job record: its fields, its states, the error codes a job ends with.

Part of the protocol (``protocol`` re-exports every name here, so callers
write ``P.SUCCEEDED``); kept apart from the frame table and the checks of
what comes in, as the record is what the store, the scheduler and the
client's ``Job`` share.  Standard library only, like ``protocol``.
"""
from __future__ import annotations

import datetime as _dt
import time as _time

# --- job states -----------------------------------------------------------

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
REJECTED = "rejected"

STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, REJECTED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, REJECTED})
ICONS = {
    QUEUED: "🕓",
    RUNNING: "⏳",
    SUCCEEDED: "✅",
    FAILED: "❌",
    REJECTED: "❌",
    CANCELLED: "🚫",
}

# --- error codes (error.code of a job that did not succeed) ---------------

SYNTAX_ERROR = "syntax_error"
UNSUPPORTED_LANGUAGE = "unsupported_language"
COMPILE_ERROR = "compile_error"
NONZERO_EXIT = "nonzero_exit"
SIGNAL = "signal"
TIMEOUT = "timeout"
MEMORY_LIMIT = "memory_limit"
OUTPUT_LIMIT = "output_limit"
# Wrote more than the slave's --disk-limit (its directory and /tmp together).
DISK_LIMIT = "disk_limit"
# Would have opened a session past --max-sessions-per-user.
SESSION_LIMIT = "session_limit"
SLAVE_LOST = "slave_lost"
CANCELLED_CODE = "cancelled"
# Not in the contract's table, but a job whose files cannot even be laid out
# (bad file name, disk full) must still end with a reason.
INTERNAL_ERROR = "internal_error"

# The status a job ends in for each error code.
ERROR_STATUS = {
    SYNTAX_ERROR: REJECTED,
    UNSUPPORTED_LANGUAGE: REJECTED,
    COMPILE_ERROR: FAILED,
    NONZERO_EXIT: FAILED,
    SIGNAL: FAILED,
    TIMEOUT: FAILED,
    MEMORY_LIMIT: FAILED,
    OUTPUT_LIMIT: FAILED,
    DISK_LIMIT: FAILED,
    SESSION_LIMIT: REJECTED,
    SLAVE_LOST: FAILED,
    INTERNAL_ERROR: FAILED,
    CANCELLED_CODE: CANCELLED,
}


_second: tuple[int, str] = (-1, "")  # the last second ``now`` wrote, and how: one tuple, so threads agree


def now(ago: float = 0.0) -> str:
    """RFC 3339 UTC with millisecond precision, as every job time is (``ago`` seconds before now)."""
    # As datetime's isoformat(timespec="milliseconds") would write it; the second's part is made
    # once per second (the master stamps several times per job, thousands of jobs a second).
    global _second
    seconds, ns = divmod(_time.time_ns() - int(ago * 1e9), 1_000_000_000)
    made = _second
    if made[0] != seconds:
        made = _second = (seconds, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)))
    return "%s.%03dZ" % (made[1], ns // 1_000_000)


def parse_time(text: str | None) -> _dt.datetime | None:
    """A job time (``now``'s form) as an aware datetime; None for none."""
    if not text:
        return None
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the job record ------------------------------------------------------

JOB_FIELDS = (
    "id", "name", "language", "status", "error", "slave_uid", "client_id", "user",
    "submitted_at", "started_at", "finished_at", "exit_code", "stdout", "stderr",
    "timeout", "source", "files", "args", "stdin", "retries", "attempts", "session", "group",
    "collect", "outputs", "artifacts",
)

# What a job is run with: the store keeps these apart, and the master holds
# them in memory only while it hands a job to a slave.
INPUT_FIELDS = ("source", "files", "args", "stdin")


def inputs_chars(job: dict) -> int:
    """What a job's inputs weigh, in characters (bytes, for text): source, files, arguments and stdin."""
    return (len(job.get("source") or "") + len(job.get("stdin") or "")
            + sum(len(name) + len(data) for name, data in (job.get("files") or {}).items())
            + sum(len(arg) for arg in job.get("args") or ()))
# A rejected job keeps at most this much of its source, and none of its files or stdin.
REJECTED_SOURCE_BYTES = 64 << 10


def new_job(job_id: int, submission: dict, *, client_id: str | None, user: str | None) -> dict:
    """A queued job's record, every field of ``JOB_FIELDS`` present, from a checked submission."""
    job = {field: None for field in JOB_FIELDS}
    job.update(submission)
    job.update(
        id=job_id,
        name=submission.get("name") or f"job {job_id}",
        status=QUEUED,
        client_id=client_id,
        user=user,
        submitted_at=now(),
        stdout="",
        stderr="",
        attempts=0,
        outputs=[],
        artifacts=[],
    )
    return job


# Bulky fields, and ``ref`` (the submitting client's own key for its submission, answered in its
# submit_reply: nothing another listener needs, in every event).
SUMMARY_OMIT = ("source", "files", "stdin", "stdout", "stderr", "outputs", "ref")
# A finished job's event carries its whole output up to this size, so a client
# that waited for it needs no request to read the result.
SMALL_OUTPUT_CHARS = 64 << 10
# The key of a rich output's metadata that says where it came in the job's
# stdout (``{"stdout_at": characters before it}``): a notebook shows it there,
# where a local cell would, and without the text/plain stdout also has of it.
OUTPUT_PLACE = "distexec"


_SUMMARY_OMIT = frozenset(SUMMARY_OMIT)
_INPUTS = frozenset(INPUT_FIELDS)


def summary(job: dict) -> dict:
    """A job without its bulky fields, for live status events."""
    return {k: v for k, v in job.items() if k not in _SUMMARY_OMIT}


def answer_of(job: dict, echo: bool = True) -> dict:
    """What the answer to a submission carries: the job, or without ``echo`` (its sender keeps what it
    sent) the job less its inputs while it has not ended; an ended one (a rejected job keeps part of its
    source only) is told whole.  A map of 10,000 jobs of one 10 KB program was answered with 100 MB."""
    if echo or job.get("status") in TERMINAL:
        return job
    return {k: v for k, v in job.items() if k not in _INPUTS}


def update_of(job: dict) -> dict:
    """What a ``job_update`` event carries: the summary and, once the job has
    ended with a small output, that whole output (``stdout`` and ``stderr``)."""
    out = summary(job)
    # Rich outputs (figures...) are read with the job: a terminal event without stdout says so.
    if job.get("status") in TERMINAL and not job.get("outputs"):
        stdout, stderr = job.get("stdout") or "", job.get("stderr") or ""
        if len(stdout) + len(stderr) <= SMALL_OUTPUT_CHARS:
            out.update(stdout=stdout, stderr=stderr)
    return out


def status_of(error_obj: dict | None) -> str:
    """The status a job ends in with this error (``None``: it succeeded)."""
    if error_obj is None:
        return SUCCEEDED
    return ERROR_STATUS.get(error_obj.get("code"), FAILED)


# --- sessions ------------------------------------------------------------

def session_key(user: str | None, name: str) -> tuple[str | None, str]:
    """Who a session belongs to and its name: its identity everywhere.

    A pair, never one joined string: with ``name@user``, user ``corp``'s
    session ``work@alice`` and user ``alice@corp``'s ``work`` were one.
    """
    return (user, name)


def session_keys_of(items) -> list[tuple[str | None, str]]:
    """The well-formed ``{"user", "name"}`` entries of a ``register`` message's ``sessions``."""
    out = []
    for item in items or ():
        if isinstance(item, dict) and isinstance(item.get("name"), str) \
                and isinstance(item.get("user"), (str, type(None))):
            out.append(session_key(item["user"], item["name"]))
    return out


def session_label(key: tuple[str | None, str]) -> str:
    """How a person reads a session key in a message."""
    user, name = key
    return repr(name) if user is None else f"{name!r} of user {user!r}"
