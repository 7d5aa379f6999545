"""What the log says of a frame that did not decode: it is dropped, and a dropped job_finished leaves
its job running until the master's backstop (jobs.py), so the log names what it was."""
from __future__ import annotations

import re

# A dropped frame's first characters, looked at for its type and job: a message's "type" comes first
# (protocol.make), its job_id next.  A regular expression on a slice, never a parse of what did not parse.
PEEK_CHARS = 200
_TYPE = re.compile(r'"type"\s*:\s*"([A-Za-z_]{1,40})"')
_JOB_ID = re.compile(r'"job_id"\s*:\s*(\d{1,15})')


def peek(text: str | bytes) -> str:
    """What a frame that did not decode says it is ("a job_finished for job 7"), as far as its start tells."""
    head = text[:PEEK_CHARS]
    head = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    kind, job = _TYPE.search(head), _JOB_ID.search(head)
    return f"a {kind.group(1) if kind else 'frame of no type we could see'}" + (f" for job {job.group(1)}" if job else "")
