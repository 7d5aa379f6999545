"""The client's errors: a refusal or an unreachable master, and a job that did not succeed.

Errors travel as data (``{"code", "message"}``) everywhere else; they become
these exceptions only here, at the edge a person's code sees.
"""
from __future__ import annotations

import re
import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import Job

# DistexecError.code when the master could not be reached (down, restarting):
# worth retrying, unlike a refusal.
UNREACHABLE = "unreachable"


class DistexecError(Exception):
    """A request the master refused, or a master that cannot be reached."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.details = details or {}  # the refusal's other fields: a full queue's "room", a rate's "retry_after"

    @property
    def transient(self) -> bool:
        """The master is away or overloaded for now (restart, proxy error): try again later."""
        return self.code == UNREACHABLE or (self.status or 0) in (502, 503, 504)


class RemoteError(DistexecError):
    """A job that did not succeed; ``.job`` has its record."""

    def __init__(self, job: "Job"):
        err = job.error or {}
        super().__init__(f"job {job.id} {job.status}: [{err.get('code')}] {err.get('message')}",
                         code=err.get("code"))
        self.job = job


def unreachable(url: str) -> str:
    """What to say of a master nothing answers at: on this machine, none was started (or one
    stopped: its connection file stays, to keep its token for the next start)."""
    here = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
    return (f"cannot reach the distexec master at {url}"
            + (": none is running there; start one with `distexec up`" if here else
               ": is it running, and is the address right?"))


def tls_refusal(url: str, exc: Exception) -> str:
    """A short, useful message for a certificate this client could not verify."""
    # OpenSSL's reason ends before " (_ssl.c:NNN)"; it may quote the name it checked ('127.0.0.1').
    found = (re.search(r"certificate verify failed: (.+?)\.? \(_ssl", str(exc))
             or re.search(r"certificate verify failed: ([^(\]]+)", str(exc)))
    reason = found.group(1).strip() if found else str(exc)
    if "mismatch" in reason:  # a trusted certificate, for another name: no CA file would help
        advice = ("Reach the master by a name its certificate was issued for (on the master's machine: "
                  "its --url)")
    else:
        advice = ("Give the master's certificate as the CA file (cafile=..., DISTEXEC_CAFILE, or the "
                  "connection file's \"cafile\")")
    return f"TLS verification failed for {url}: {reason}; refusing to talk to it. {advice}"
