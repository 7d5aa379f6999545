"""Line-buffered stdio for compiled programs, without running ``stdbuf`` first.

A C or C++ program block-buffers its stdout on a pipe, so the languages run it
under ``stdbuf -oL -eL`` (distexec_kernel/languages.py) and a notebook sees each
line as it is printed.  stdbuf only sets three environment variables (its
preload library and the modes) and execs the program; but its own start
(loading libc, reading the locale's files) doubled a trivial C job's process
time (0.7 ms more than the bare program's 0.7 ms here, more in the sandbox).
So the slave sets those variables itself and runs the program directly, and
keeps stdbuf where its library cannot be found.
"""
from __future__ import annotations

import functools
import os

# stdbuf's options as the languages give them, and the variable libstdbuf.so reads for each.
_MODES = {"-oL": ("_STDBUF_O", "L"), "-eL": ("_STDBUF_E", "L"), "-iL": ("_STDBUF_I", "L")}
# Where coreutils installs it (PKGLIBEXECDIR), below the prefix stdbuf is installed under.
_PLACES = ("libexec/coreutils", "lib/coreutils", "lib64/coreutils")


@functools.cache
def library(stdbuf: str) -> str | None:
    """The libstdbuf.so installed with this stdbuf, or None."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(stdbuf)))
    for place in _PLACES:
        path = os.path.join(prefix, place, "libstdbuf.so")
        if os.path.isfile(path):
            return path
    return None


def direct(argv: list[str], env: dict[str, str]) -> list[str]:
    """``argv`` without a leading ``stdbuf MODES...``, its effect moved into ``env`` (changed in place).

    Anything else (no stdbuf, an option other than a line mode, no library found) is returned as it is.
    """
    if not argv or os.path.basename(argv[0]) != "stdbuf":
        return argv
    modes, rest = {}, 1
    while rest < len(argv) and argv[rest] in _MODES:
        name, value = _MODES[argv[rest]]
        modes[name] = value
        rest += 1
    lib = library(argv[0])
    if lib is None or rest == len(argv) or argv[rest].startswith("-"):
        return argv
    env.update(modes)
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    return argv[rest:]
