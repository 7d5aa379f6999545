"""How the ``%remote`` / ``%%remote`` magics read their lines and local files.

Every mistake becomes IPython's ``UsageError`` (shown as one line, the cell
fails), never ``SystemExit`` from argparse, which would stop the kernel.
"""
from __future__ import annotations

import argparse
import shlex

from IPython.core.error import UsageError

from . import cells, dashes


class UsageParser(argparse.ArgumentParser):
    """argparse that reports through IPython's UsageError instead of exiting the kernel."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage()}")

    def exit(self, status=0, message=None):
        raise UsageError(message or self.format_help())

    def print_help(self, file=None):
        pass  # --help: the help comes once, through exit's UsageError, not printed before it too




def parse_line(magic, line: str) -> argparse.Namespace:
    """Parse a magic's line with shell quoting.

    IPython's own ``parse_argstring`` splits in non-POSIX mode and keeps the
    quotes (``--stdin 'a b'`` would send ``'a b'`` with its quotes).
    """
    return _parse(magic, _words(line))


def parse_cell_line(magic, line: str) -> argparse.Namespace:
    """``%%remote``'s line: its options, then after ``--`` the program's arguments (appended to
    ``--arg``'s), which may start with a dash.  Cut by hand: argparse would read them as options."""
    argv, after = dashes.split(_words(line))
    args = _parse(magic, argv)
    args.arg = [*args.arg, *after]
    return args


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse {line!r}: {exc}") from None


def _parse(magic, argv: list[str]) -> argparse.Namespace:
    try:
        return magic.parser.parse_args(argv)
    except UsageError as exc:
        if dashes.DASHED_ARG not in str(exc):
            raise
        raise UsageError(dashes.hint(str(exc), "%%remote [LANG] [options]")) from None


def parse_command(prog: str, rest: list[str], *specs) -> argparse.Namespace:
    """The arguments of ``%remote PROG``; ``specs`` are ``(flags, add_argument keywords)`` pairs."""
    parser = UsageParser(prog=f"%remote {prog}")
    for flags, kwargs in specs:
        parser.add_argument(*flags, **kwargs)
    return parser.parse_args(rest)


# Options of `%remote run` that take a value, and flags that do not.  Kept by
# hand because the program's own ARGS may hold anything, dashes included: the
# options are read wherever they appear, `--` ends them.
_RUN_VALUES = {"--lang": "lang", "--timeout": "timeout", "--name": "name", "--stdin": "stdin",
               "--session": "session", "-o": "o", "--output": "o", "--file": "file", "--collect": "collect"}
_RUN_FLAGS = {"--no-wait": "no-wait"}


def split_run(rest: list[str]) -> tuple[dict, list[str]]:
    """``%remote run``'s words: its options (by name) and the rest, the file and the program's arguments."""
    opts: dict = {}
    positional: list[str] = []
    tokens = list(rest)
    while tokens:
        tok = tokens.pop(0)
        if tok == "--":
            positional += tokens
            break
        key, eq, value = tok.partition("=")
        if key in _RUN_VALUES:
            if not eq:
                if not tokens:
                    raise UsageError(f"%remote run: {key} needs a value")
                value = tokens.pop(0)
            name = _RUN_VALUES[key]
            if name in ("file", "collect"):
                opts.setdefault(name, []).append(value)
            else:
                opts[name] = value
        elif tok in _RUN_FLAGS:
            opts[_RUN_FLAGS[tok]] = True
        else:
            positional.append(tok)
    return opts, positional


def read_source(path: str) -> str:
    """A program file's text, for ``%remote run``."""
    try:
        return cells.read_text(path)
    except cells.OptionError as exc:
        raise UsageError(str(exc)) from None


def read_files(paths: list[str]) -> dict:
    """``--file`` paths as the job's files (a folder under its name)."""
    try:
        return cells.read_files(paths)
    except cells.OptionError as exc:
        raise UsageError(str(exc)) from None
