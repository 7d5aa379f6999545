"""The distexec wire protocol, defined once.

Master, slave and client all import this module, so it depends on the
standard library only.  Every WebSocket frame is one JSON object with a
``type`` field, or, to a receiver that asked for it, a *batch*: a JSON array
of such objects, in order (``encode_batch``, ``decode_batch``); ``MESSAGES`` below says, for each type, which fields it
carries and of which JSON type.  ``decode`` checks a received frame against
that table, so a handler only ever sees well-formed messages.  The message
set is described in prose in ``docs/protocol.md``.  The job record, its
states and error codes live in ``job_record``, and the strict JSON every frame
is parsed with (``loads``, ``check_value``) in ``strict_json``; both are
re-exported here, so ``P.SUCCEEDED`` and ``P.loads`` read as before.
"""
from __future__ import annotations

import base64
import binascii
import json

from .job_record import (  # noqa: F401  (re-exported: the protocol is read as one namespace)
    CANCELLED, CANCELLED_CODE, COMPILE_ERROR, DISK_LIMIT, ERROR_STATUS, FAILED, ICONS, INPUT_FIELDS,
    INTERNAL_ERROR, JOB_FIELDS, MEMORY_LIMIT, NONZERO_EXIT, OUTPUT_LIMIT, QUEUED, REJECTED,
    REJECTED_SOURCE_BYTES, RUNNING, SESSION_LIMIT, SIGNAL, SLAVE_LOST, SMALL_OUTPUT_CHARS, STATES,
    SUCCEEDED, SUMMARY_OMIT, SYNTAX_ERROR, TERMINAL, TIMEOUT, UNSUPPORTED_LANGUAGE, new_job, now,
    answer_of, parse_time, session_key, session_keys_of, session_label, status_of, summary, update_of,
)
from .strict_json import MAX_JSON_DEPTH, check_value, loads  # noqa: F401  (re-exported, as above)

PROTOCOL_VERSION = 5  # what each version brought: docs/protocol.md, "Versioning"

# --- limits on what the master accepts ------------------------------------

MAX_SOURCE_BYTES = 1 << 20
MAX_FILES_BYTES = 8 << 20
MAX_FILES = 64
MAX_ARGS = 256
MAX_STDIN_BYTES = 8 << 20
MAX_NAME_CHARS = 200
# A language's name or alias (the longest known is 10 characters): kept by a job, also a rejected
# one, and repeated in its error.  (A ``ref``, a client's uuid kept for resends, is bounded like a name.)
MAX_LANGUAGE_CHARS = 64
MAX_TIMEOUT = 24 * 3600.0
DEFAULT_TIMEOUT = 300.0
MAX_RETRIES = 10
# Jobs in one batch (POST /api/jobs with a list, Cluster.map): one request, one commit.
MAX_BATCH = 10_000
# Job files may sit in folders, this deep at most (``a/b/c.txt`` is 3 levels).
MAX_FILE_DEPTH = 8
MAX_FILE_PATH_CHARS = 1024
# ``collect``: globs per submission, and what one job may keep (files out).
MAX_COLLECT_PATTERNS = 32
MAX_ARTIFACTS = 100
MAX_ARTIFACT_BYTES = 64 << 20
# Artifacts travel from slave to master in frames of this many raw bytes
# (base64 in a ``job_artifact`` frame), never in ``job_finished``: 64 MiB of
# them would not fit one frame.
ARTIFACT_CHUNK = 4 << 20
# A frame may carry a finished job's whole output (16 MiB by default) plus
# its files, so the WebSocket limit sits above the sum of those.
MAX_MESSAGE_BYTES = 64 << 20


class ProtocolError(Exception):
    """A message or request that breaks the protocol; carried as data."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def error(code: str, message: str, **extra) -> dict:
    """The one error shape used everywhere: ``{"code", "message", ...}``."""
    out = {"code": code, "message": message}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


# --- the message table ----------------------------------------------------
#
# type -> {field: (json type(s), required)}.  ``int`` accepts no bools and
# ``float`` accepts ints, as JSON does not tell them apart.

_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_OPT_DICT = (dict, type(None))

MESSAGES: dict[str, dict[str, tuple[object, bool]]] = {
    # slave -> master
    "register": {
        "protocol": (int, True),
        "uid": (str, True),
        "host": (str, True),
        "languages": (list, True),  # [{"name", "version"}]
        "slots": (int, True),
        "running": (list, False),  # job ids still running here (after a master restart)
        "results": (list, False),  # job_finished messages not yet acknowledged
        "draining": (bool, False),
        "batch": (bool, False),  # it reads batch frames (arrays of messages)
        "sessions": (list, False),  # the Python sessions alive here: [{"user", "name"}]
        "max_sessions_per_user": (int, False),  # its --max-sessions-per-user
        "instance": (str, False),  # new with each slave process: tells a reconnect from a restart
        "detecting": (bool, False),  # still asking toolchains: ``languages`` messages will follow
    },
    # slave -> master: its languages changed (a detection ended); the whole list
    "languages": {"languages": (list, True), "detecting": (bool, True)},
    # slave -> master, and master -> client with the chunk's offset in the stream
    "job_output": {
        "job_id": (int, True),
        "stream": (str, True),
        "data": (str, True),
        "offset": (int, False),
    },
    # slave -> master, after each register: a running job's whole output so far (docs/protocol.md)
    "job_output_so_far": {"job_id": (int, True), "stdout": (str, True), "stderr": (str, True)},
    "job_finished": {
        "job_id": (int, True),
        "exit_code": (_OPT_INT, True),
        "error": (_OPT_DICT, True),
        "stdout": (str, True),
        "stderr": (str, True),
        # nbformat-style rich outputs of a session cell (display_data, execute_result)
        "outputs": (list, False),
        # collected files: [{"name", "size", "sha256", "mime"}]; their bytes came before, in job_artifact frames
        "artifacts": (list, False),
        "ended_ago": (_NUM, False),  # seconds since the job ended, as the slave sends it
    },
    # slave -> master, before the job's job_finished: ``data`` (base64) is
    # bytes ``offset``.. of the job's artifact number ``index``
    "job_artifact": {
        "job_id": (int, True),
        "index": (int, True),
        "offset": (int, True),
        "data": (str, True),
    },
    "draining": {},
    # a session ended by itself (idle, its interpreter died): the name is free again
    "session_ended": {"session": (str, True), "user": (_OPT_STR, True), "reason": (str, True)},
    # master -> slave
    "register_reply": {"ok": (bool, True), "error": (_OPT_DICT, False), "slave_uid": (str, False)},
    "job_run": {"job": (dict, True)},
    "job_cancel": {"job_id": (int, True)},
    "result_ack": {"job_id": (int, True)},
    "session_end": {"session": (str, True), "user": (_OPT_STR, True), "reason": (str, False)},
    # client -> master
    "submit": {"request": (dict, True), "ref": (_OPT_STR, False), "again": (bool, False), "echo": (bool, False)},
    "cancel": {"job_id": (int, True), "ref": (_OPT_STR, False)},
    # master -> client
    "welcome": {"client_id": (str, True), "version": (str, True)},
    "submit_reply": {"job": (_OPT_DICT, True), "error": (_OPT_DICT, False), "ref": (_OPT_STR, False)},
    "cancel_reply": {"job": (_OPT_DICT, True), "error": (_OPT_DICT, False), "ref": (_OPT_STR, False)},
    "job_update": {"job": (dict, True)},
    "slaves_changed": {"slaves": (list, True)},
    "clients_changed": {"clients": (list, True)},
    # both ways
    "error": {"error": (dict, True)},
}

STREAMS = ("stdout", "stderr")


# JSON integers past 64 bits fit neither SQLite (a job id of 10**30 used to
# fail inside the master) nor most peers' number types.
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def _type_ok(value, expected) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    t = type(value)
    if t is not int and t in kinds:  # the common case, before the exact rules below
        return True
    if isinstance(value, bool):
        return bool in kinds
    if int in kinds and isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    if float in kinds and isinstance(value, (int, float)):
        return True
    return any(k not in (int, float, bool) and isinstance(value, k) for k in kinds)


def _type_name(expected) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "integer", float: "number", str: "string", list: "array",
             dict: "object", bool: "boolean", type(None): "null"}
    return " or ".join(names[k] for k in kinds)


def make(msg_type: str, **fields) -> dict:
    """Build a message; raises if it does not match the table (a bug of ours)."""
    msg = {"type": msg_type, **fields}
    validate(msg)
    return msg


def failed_result(job_id, why: str) -> dict:
    """A ``job_finished`` standing in for a result that cannot be taken (``internal_error``, saying
    ``why``), so the job ends; ProtocolError if ``job_id`` names no job."""
    return make("job_finished", job_id=job_id, exit_code=None, stdout="", stderr="", error=error(INTERNAL_ERROR, why))


def validate(msg) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", "a message must be a JSON object")
    msg_type = msg.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError("bad_message", "a message needs a string 'type'")
    spec = MESSAGES.get(msg_type)
    if spec is None:
        raise ProtocolError("unknown_type", f"unknown message type {msg_type[:64]!r}")  # (a type may be 64 MiB)
    for field, (expected, required) in spec.items():
        if field not in msg:
            if required:
                raise ProtocolError("bad_message", f"{msg_type}: missing field {field!r}")
            continue
        if not _type_ok(msg[field], expected):
            raise ProtocolError(
                "bad_message", f"{msg_type}: field {field!r} must be {_type_name(expected)}")
    if "stream" in spec and msg["stream"] not in STREAMS:
        raise ProtocolError("bad_message", f"{msg_type}: stream must be stdout or stderr")
    if isinstance(msg.get("ref"), str) and len(msg["ref"]) > MAX_NAME_CHARS:
        raise ProtocolError("bad_message", f"{msg_type}: field 'ref' is over {MAX_NAME_CHARS} characters")
    if msg_type == "job_finished" and msg["error"] is not None:
        _check_job_error(msg["error"])
    return msg


def _check_job_error(err: dict) -> None:
    """A job's error is ``{"code", "message", "line"?, "column"?}``: the master files a job by its code
    (``status_of``), and a code that was an array raised inside it, the job left running, its result
    sent again at every register."""
    if (type(err.get("code")) is not str or type(err.get("message")) is not str
            or not all(_type_ok(err.get(key), _OPT_INT) for key in ("line", "column"))):
        raise ProtocolError("bad_message", "job_finished: field 'error' must be an object with a string 'code' "
                                           "and 'message' (and an integer 'line' and 'column', if any)")


# One encoder, made once: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(msg: dict) -> str:
    return _ENCODER.encode(msg)


def encode_batch(texts: list[str]) -> str:
    """One batch frame of messages already ``encode``d, in order (for a receiver that reads batches)."""
    return "[" + ",".join(texts) + "]"


def batch_frames(texts: list[str], limit: int) -> list[str]:
    """Frames for ``texts`` (``encode``d messages), in order, for a receiver that reads batches.

    A batch ends before it passes ``limit`` characters (a larger message goes
    alone); a message alone goes as itself, not as a batch of one.
    """
    frames, start, size = [], 0, 0
    for i, text in enumerate(texts):
        if size and size + len(text) > limit:
            frames.append(texts[start] if i - start == 1 else encode_batch(texts[start:i]))
            start, size = i, 0
        size += len(text) + 1
    if start < len(texts):
        frames.append(texts[start] if len(texts) - start == 1 else encode_batch(texts[start:]))
    return frames


def decode(text: str | bytes) -> dict:
    """Parse and validate one frame; raises ProtocolError on anything wrong."""
    return validate(_parse(text))


def decode_batch(text: str | bytes) -> list[dict | ProtocolError]:
    """Parse a frame that may be a batch: its messages in order, each checked on its own.

    A malformed message is returned as its ProtocolError in its place (the
    others stand); a frame that is not JSON at all is one ProtocolError.
    """
    try:
        value = _parse(text)
    except ProtocolError as exc:
        return [exc]
    out: list[dict | ProtocolError] = []
    for msg in value if isinstance(value, list) else (value,):
        try:
            out.append(validate(msg))
        except ProtocolError as exc:
            out.append(exc)
    return out


def _parse(text: str | bytes):
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message over {MAX_MESSAGE_BYTES >> 20} MiB")
    try:
        return loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"not JSON: {exc}") from None


# --- submissions ----------------------------------------------------------

# submission field -> (json type, default)
SUBMISSION = {
    "source": (str, None),
    "language": (str, None),
    "name": (_OPT_STR, None),
    "files": (_OPT_DICT, None),
    "args": ((list, type(None)), None),
    "stdin": (_OPT_STR, None),
    "timeout": ((int, float, type(None)), None),
    "retries": (_OPT_INT, None),
    "session": (_OPT_STR, None),
    "collect": ((list, type(None)), None),
}


def _bad(message: str):
    raise ProtocolError("bad_request", message)


def check_submission(body) -> dict:
    """Validate a submission (HTTP body or ``submit`` request) and normalise it.

    Raises ProtocolError("bad_request" | "too_large") with a message naming the
    field.  A well-formed submission may still be rejected later (syntax,
    language); that is a job outcome, not a bad request.
    """
    if not isinstance(body, dict):
        _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - set(SUBMISSION))
    if unknown:
        _bad(f"unknown field(s): {', '.join(unknown)}")
    for field in ("source", "language"):
        if field not in body:
            _bad(f"missing field {field!r}")
    out = {}
    for field, (expected, default) in SUBMISSION.items():
        value = body.get(field, default)
        if value is not None or field in ("source", "language"):
            if not _type_ok(value, expected):
                _bad(f"field {field!r} must be {_type_name(expected)}")
        out[field] = value
    if not out["language"].strip():
        _bad("field 'language' must not be empty")
    if len(out["language"]) > MAX_LANGUAGE_CHARS:
        _bad(f"field 'language' is over {MAX_LANGUAGE_CHARS} characters")
    if len(out["source"].encode()) > MAX_SOURCE_BYTES:
        raise ProtocolError("too_large", f"source is over {MAX_SOURCE_BYTES >> 20} MiB")
    if out["name"] is not None and len(out["name"]) > MAX_NAME_CHARS:
        _bad(f"field 'name' is over {MAX_NAME_CHARS} characters")
    files = out["files"] or {}
    if len(files) > MAX_FILES:
        _bad(f"at most {MAX_FILES} files")
    total = 0
    for fname, content in files.items():
        check_file_name(fname)
        total += len(file_bytes(content, fname))
    if total > MAX_FILES_BYTES:
        raise ProtocolError("too_large", f"files are over {MAX_FILES_BYTES >> 20} MiB in all")
    out["files"] = files
    args = out["args"] or []
    if len(args) > MAX_ARGS or not all(isinstance(a, str) for a in args):
        _bad(f"field 'args' must be a list of at most {MAX_ARGS} strings")
    out["args"] = args
    if out["stdin"] is not None and len(out["stdin"].encode()) > MAX_STDIN_BYTES:
        raise ProtocolError("too_large", f"stdin is over {MAX_STDIN_BYTES >> 20} MiB")
    timeout = out["timeout"]
    if timeout is not None and not (0 < timeout <= MAX_TIMEOUT):
        _bad(f"field 'timeout' must be more than 0 and at most {MAX_TIMEOUT:g} seconds, not {timeout!r}")
    out["timeout"] = float(timeout) if timeout is not None else DEFAULT_TIMEOUT
    retries = out["retries"] or 0
    if not 0 <= retries <= MAX_RETRIES:
        _bad(f"field 'retries' must be between 0 and {MAX_RETRIES}")
    out["retries"] = retries
    out["collect"] = check_collect(out["collect"])
    session = out["session"]
    if session is not None and (not session.strip() or len(session) > MAX_NAME_CHARS
                                or not session.isprintable()):
        _bad(f"field 'session' must be a printable name of 1 to {MAX_NAME_CHARS} characters")
    return out


def check_batch(body, check=check_submission) -> list[dict]:
    """Validate a batch (a JSON list of submissions) whole: the first bad item refuses it all.

    ``check`` validates one item (the master passes its own, which adds what
    it alone knows); its error comes back naming the item's index.
    """
    if not isinstance(body, list):
        _bad("a batch must be a JSON list of submissions")
    if len(body) > MAX_BATCH:
        _bad(f"a batch holds at most {MAX_BATCH} submissions, not {len(body)}: split it")
    out = []
    for index, item in enumerate(body):
        try:
            out.append(check(item))
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"item {index}: {exc.message}") from None
    return out


def check_file_name(name) -> None:
    """A job file name is a relative path (``pkg/mod.py``) that stays in the job's directory.

    No absolute path, no ``..`` or ``.``, no empty part (``a//b``, a trailing
    ``/``), no backslash or NUL, at most ``MAX_FILE_DEPTH`` levels.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or len(name) > MAX_FILE_PATH_CHARS or "\\" in name or "\0" in name
            or any(p in ("", ".", "..") or len(p) > 255 for p in parts)):
        _bad(f"bad file name {name!r}: use a relative path such as data/in.csv "
             f"(no leading /, no '..', no empty parts)")
    if len(parts) > MAX_FILE_DEPTH:
        _bad(f"bad file name {name!r}: at most {MAX_FILE_DEPTH} levels of folders")


def file_bytes(content, name: str = "?") -> bytes:
    """A job file's content as bytes: text (UTF-8), or ``{"base64": "..."}`` for binary files."""
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, dict) and set(content) == {"base64"} and isinstance(content["base64"], str):
        try:
            return base64.b64decode(content["base64"], validate=True)
        except (binascii.Error, ValueError):
            _bad(f"file {name!r}: 'base64' is not valid base64")
    _bad(f"file {name!r}: content must be a string, or {{\"base64\": \"...\"}} for bytes")


def files_of(job: dict) -> dict[str, bytes]:
    """A job's files as bytes, by name, as the slave lays them out.

    The master checked the names and the contents (``check_submission``);
    decoding is all that is left.
    """
    return {name: file_bytes(content, name) for name, content in (job.get("files") or {}).items()}


def file_content(data: bytes):
    """How bytes travel as a job file: text when they are UTF-8, else ``{"base64": ...}``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def check_collect(patterns) -> list[str] | None:
    """``collect``: globs relative to the job's directory (``*.png``, ``out/**``); None when absent."""
    if patterns is None:
        return None
    if len(patterns) > MAX_COLLECT_PATTERNS:
        _bad(f"field 'collect' holds at most {MAX_COLLECT_PATTERNS} patterns")
    for pat in patterns:
        if (not isinstance(pat, str) or not pat or len(pat) > 255 or pat.startswith("/") or "\0" in pat
                or any(p in ("..", "") for p in pat.split("/"))):
            _bad(f"field 'collect': bad pattern {pat!r}: use globs relative to the job's directory, "
                 f"such as *.png or out/** (no leading /, no '..')")
    return list(patterns) or None


