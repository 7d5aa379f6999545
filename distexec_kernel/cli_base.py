"""What the ``distexec`` commands share: the cluster their options name, text and JSON shown
safely (a job's output and names cannot drive the terminal), a password read."""
from __future__ import annotations

import json
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
    """Print text that may come from a job: control characters neutralised unless ``raw``."""
    print(text if raw else display.clean(text), file=file or sys.stdout)


def read_password(user: str, from_stdin: bool, confirm: bool = True) -> str:
    if from_stdin:
        # One line, so `echo pw | distexec user add NAME --password-stdin` works in scripts.
        return sys.stdin.readline().rstrip("\r\n")
    import getpass
    first = getpass.getpass(f"password for {user}: ")
    if confirm and getpass.getpass("again: ") != first:
        raise SystemExit("distexec: the passwords differ")
    return first
