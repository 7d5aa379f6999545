"""What the ``distexec`` commands share: the cluster their options name, text and JSON shown
safely (a job's output and names cannot drive the terminal), a password read."""
from __future__ import annotations

import json
import os
import sys

from . import config, display


def cluster_of(args, events: bool = False):
    from .cluster import Cluster
    user = getattr(args, "user", None)
    password = None
    if user:
        config.warn_cleartext(getattr(args, "url", None))
        password = read_password(user, args.password_stdin, confirm=False)
    return Cluster(getattr(args, "url", None), getattr(args, "token", None), user=user, password=password,
                   cafile=getattr(args, "cafile", None), events=events)


def print_json(obj) -> None:
    # JSON escapes C0 controls itself; DEL and C1 (e.g. U+009B, a one-character CSI) it leaves raw.
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    print("".join(f"\\u{ord(ch):04x}" if 0x7f <= ord(ch) < 0xa0 else ch for ch in text)
          if any(0x7f <= ord(ch) < 0xa0 for ch in text) else text)


def show(text: str, raw: bool = False, file=None) -> None:
    """Print a line of ours that quotes a job's words (a table, a status line): control characters
    neutralised unless ``raw``, wherever it goes, since a ``\r`` would hide or forge the line in a
    log as on a screen."""
    print(text if raw else display.clean(text), file=file or sys.stdout)


def write_output(text: str, stream, raw: bool = False) -> None:
    """Write what a job printed to ``stream``: escaped only on a terminal (docs/security.md).

    Redirected to a file or a pipe, the bytes are the program's, as with a local run: the
    terminal that could be driven is not there, and rewriting them would change the data.
    """
    stream.write(text if raw or not _is_terminal(stream) else display.clean(text))


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream: no terminal to protect
        return False


def reader_gone() -> int:
    """After a BrokenPipeError (``distexec jobs --json | head``): exit quietly, as ``cat`` would.

    The Python docs' recipe: devnull on stdout and stderr, so the interpreter's last flush
    of what is still buffered fails no more.  141 (128 + SIGPIPE) is what a shell reports
    of a command that SIGPIPE stopped: under ``set -o pipefail`` a script sees us end as it
    would see any other tool whose reader left, and not as a failure of ours (1).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, ValueError, OSError):
            pass
    return 141


def read_password(user: str, from_stdin: bool, confirm: bool = True) -> str:
    if from_stdin:
        # One line, so `echo pw | distexec user add NAME --password-stdin` works in scripts.
        return sys.stdin.readline().rstrip("\r\n")
    import getpass
    first = getpass.getpass(f"password for {user}: ")
    if confirm and getpass.getpass("again: ") != first:
        raise SystemExit("distexec: the passwords differ")
    return first
