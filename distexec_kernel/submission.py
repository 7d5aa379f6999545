"""A submission checked as the master checks it, also in the client before it is sent.

The protocol checks its shape (``protocol.check_submission``); then no job
file may take the program's own file name, which the language table knows
(the program would be written over it, unseen).  The client runs the same
check, so a pipelined ``submit`` refuses at once what the master would; the
master then adds what is its own (``master/admission.py``).
Standard library only, like the protocol and the language table.
"""
from __future__ import annotations

from . import languages as L, protocol as P


def check(request) -> dict:
    """The submission ``request`` checked; ProtocolError if bad."""
    sub = P.check_submission(request)
    lang = L.get(sub["language"])
    if lang is not None and sub["session"] is None and sub["files"]:
        own = lang.source_name(sub["source"])
        if own in sub["files"]:
            raise P.ProtocolError("bad_request", f"file name {own!r} is the program's own file in a "
                                  f"{lang.name} job: give that file another name")
    return sub
