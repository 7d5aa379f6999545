"""What a cell says besides its program: option lines, kept files, completeness, completions.

The kernels (``kernel.py``) read a cell with ``parse``; the ``%%remote``
magic shares the reading of local files (``read_text``, ``read_files``).
No Jupyter imports here, so it is tested as plain functions.

A kernel cell may start with option lines, which no language of ours would
accept as its first lines anyway::

    %timeout 5          seconds the job may run
    %arg 6 7            arguments (shell quoting; repeatable)
    %stdin some text    a line of standard input (repeatable: one line each)
    %file data.txt      send this local file with the job (repeatable)
    %session NAME       run in the persistent Python session NAME
    %no-wait            submit and return at once

A cell starting with ``%%file NAME`` is no program: its body is kept as the
file NAME and sent with every later cell (an empty body forgets it).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field

from . import languages as L, protocol as P
from .config import seconds

OPTIONS = {
    "%timeout": "S", "%arg": "A...", "%stdin": "TEXT", "%file": "PATH", "%session": "NAME", "%no-wait": "",
}
FILE_CELL = "%%file"


class OptionError(ValueError):
    """A cell's options or local files are wrong; the message says what to write instead."""


def read_text(path: str) -> str:
    """A local UTF-8 text file, for sending with a job."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise OptionError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise OptionError(f"{path} is not UTF-8 text") from None


def read_files(paths: list[str]) -> dict:
    """Local files by their base names and folders by their names, as a job's ``files``
    (see ``files.read_paths``); two of one name are refused."""
    from .files import FilesError, read_paths
    try:
        return read_paths(paths)
    except FilesError as exc:
        raise OptionError(str(exc)) from None


@dataclass
class Cell:
    """A kernel cell read: the program and what its option lines asked for."""
    # The program with the option lines blanked (not removed), so the
    # compiler's line numbers are the cell's.
    source: str
    timeout: float | None = None
    args: list[str] = field(default_factory=list)
    stdin: str | None = None
    files: list[str] = field(default_factory=list)
    session: str | None = None
    no_wait: bool = False


@dataclass
class FileCell:
    """A ``%%file NAME`` cell: ``text`` is kept as NAME (None: forget NAME)."""
    name: str
    text: str | None


def _option_word(line: str) -> str | None:
    m = re.match(r"%[\w-]+", line)
    return m.group(0) if m else None


def parse(code: str, language: str) -> Cell | FileCell:
    """Read a kernel cell of ``language``.  ``OptionError`` names what is wrong and how to write it.

    A ``%`` word that is no option ends the options in Python (IPython
    syntax such as ``%matplotlib inline`` is the session's business); in the
    other languages it is an error, since the compiler would refuse it anyway.
    """
    if code.startswith(FILE_CELL) and (len(code) == len(FILE_CELL) or code[len(FILE_CELL)].isspace()):
        return _file_cell(code)
    lines = code.split("\n")
    cell = Cell(source="")
    stdin: list[str] = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        word = _option_word(line)
        if word is None:
            break
        if word not in OPTIONS:
            if L.canonical(language) == "python":
                break
            raise OptionError(f"unknown option {word}; the options are: {', '.join(OPTIONS)} "
                              f"(and {FILE_CELL} NAME as a cell's first line)")
        rest = line[len(word):].strip()
        _apply(cell, word, rest, stdin)
        lines[n] = ""
    if stdin:
        cell.stdin = "".join(stdin)
    cell.source = "\n".join(lines)
    if not cell.source.strip():
        raise OptionError("the cell has options but no program: write the program below them")
    if cell.session is not None and L.canonical(language) != "python":
        raise OptionError(f"%session: sessions run Python only, not {language}")
    return cell


def _apply(cell: Cell, word: str, rest: str, stdin: list[str]) -> None:
    needs_value = bool(OPTIONS[word])
    if needs_value and not rest:
        raise OptionError(f"{word} needs a value: {word} {OPTIONS[word]}")
    if not needs_value and rest:
        raise OptionError(f"{word} takes no value")
    if word == "%timeout":
        try:
            cell.timeout = seconds(rest)
        except argparse.ArgumentTypeError as exc:
            raise OptionError(f"%timeout: {exc}") from None
    elif word == "%arg":
        try:
            cell.args += shlex.split(rest)
        except ValueError as exc:
            raise OptionError(f"%arg: cannot split {rest!r}: {exc}") from None
    elif word == "%stdin":
        stdin.append(rest + "\n")
    elif word == "%file":
        cell.files.append(rest)
    elif word == "%session":
        cell.session = rest
    elif word == "%no-wait":
        cell.no_wait = True


def _file_cell(code: str) -> FileCell:
    head, _, body = code.partition("\n")
    parts = head.split()
    if len(parts) != 2:
        raise OptionError(f"write {FILE_CELL} NAME on the cell's first line, the file's text below it")
    name = parts[1]
    try:
        P.check_file_name(name)
    except P.ProtocolError as exc:
        raise OptionError(f"{FILE_CELL}: {exc}") from None
    return FileCell(name=name, text=body if body.strip() else None)


# -- is_complete --------------------------------------------------------------------


def _program(code: str) -> str:
    # Option lines are not the language's: judge what follows them.
    return "\n".join("" if _option_word(line) in OPTIONS else line for line in code.split("\n"))


def is_complete(code: str, language: str) -> dict:
    """The ``is_complete_reply`` content for a cell: complete, incomplete (with an indent), invalid or unknown."""
    if code.startswith(FILE_CELL):
        return {"status": "complete"}
    lang = L.get(language)
    blocks = lang.blocks if lang else ""
    if blocks == "python":
        return _python_complete(code)
    if blocks == "braces":
        return _braces_complete(_program(code))
    return {"status": "unknown"}


def _python_complete(code: str) -> dict:
    # IPython's own check (codeop underneath) also knows %magics and !shell lines,
    # which session cells accept, and our option lines read as line magics.
    from IPython.core.inputtransformer2 import TransformerManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a SyntaxWarning in the user's code is not ours to show
        status, indent = TransformerManager().check_complete(code)
    reply = {"status": status}
    if status == "incomplete":
        reply["indent"] = " " * (indent or 0)
    return reply


_PAIRS = {")": "(", "]": "[", "}": "{"}


def _braces_complete(code: str) -> dict:
    """Balanced brackets outside strings and comments: complete; an unmatched closer: invalid."""
    stack: list[str] = []
    i, n = 0, len(code)
    while i < n:
        c = code[i]
        if code.startswith("//", i):
            end = code.find("\n", i)
            i = n if end < 0 else end
            continue
        if code.startswith("/*", i):
            end = code.find("*/", i + 2)
            if end < 0:
                return {"status": "incomplete", "indent": ""}
            i = end + 2
            continue
        if c in "\"`":
            end = _string_end(code, i, c)
            if end < 0:
                return {"status": "incomplete", "indent": ""}
            i = end + 1
            continue
        if c == "'":
            # A char literal is one character or a short escape ('x', '\n',
            # '\u{1F600}'); anything else is a Rust lifetime or a lone quote: step over it.
            if code.startswith("\\", i + 1):
                end = _string_end(code, i, c)
                i = end + 1 if 0 < end - i <= 12 else i + 1
            else:
                i = i + 3 if code[i + 2:i + 3] == "'" else i + 1
            continue
        if c in "([{":
            stack.append(c)
        elif c in _PAIRS:
            if not stack or stack[-1] != _PAIRS[c]:
                return {"status": "invalid"}
            stack.pop()
        i += 1
    if stack:
        return {"status": "incomplete", "indent": "    " * len(stack)}
    return {"status": "complete"}


def _string_end(code: str, start: int, quote: str) -> int:
    """Index of the quote closing the string at ``start``, or -1; escapes skipped, newlines end "..." strings."""
    i = start + 1
    while i < len(code):
        c = code[i]
        if c == "\\":
            i += 2
            continue
        if c == quote:
            return i
        if c == "\n" and quote != "`":
            return -1
        i += 1
    return -1


# -- completion -----------------------------------------------------------------------


_WORD = re.compile(r"[A-Za-z_][\w]*")


def complete(code: str, cursor_pos: int, language: str) -> dict:
    """The ``complete_reply`` content: ``%`` options at a line's start, else keywords and the cell's own words."""
    before = code[:cursor_pos]
    line = before.rsplit("\n", 1)[-1]
    m = re.search(r"^%%?[\w-]*$", line)
    if m:
        prefix = m.group(0)
        matches = sorted(o for o in (*OPTIONS, FILE_CELL) if o.startswith(prefix))
        return _reply(matches, cursor_pos - len(prefix), cursor_pos)
    m = re.search(r"[A-Za-z_]\w*$", before)
    if not m:
        return _reply([], cursor_pos, cursor_pos)
    prefix = m.group(0)
    lang = L.get(language)
    words = set(lang.keywords if lang else ()) | set(_WORD.findall(code))
    matches = sorted(w for w in words if w.startswith(prefix) and w != prefix)
    return _reply(matches, m.start(), cursor_pos)


def _reply(matches: list[str], start: int, end: int) -> dict:
    return {"status": "ok", "matches": matches, "cursor_start": start, "cursor_end": end, "metadata": {}}
