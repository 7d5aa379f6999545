"""Where a compiler's or runtime's message points in the program, and why a run failed: the
language table's ``locations`` and ``reason`` patterns (``languages.py``) put to a job's stderr.
Standard library only, like the table.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .languages import Language

# "main.ext:LINE[:COL]" at the start of a line: how most compilers we have
# no pattern for say it.  Only the program's own file: a line of another
# file (a header, a library) is not a line of the program.
_GENERIC_LOCATION = r"^(?:\./)?{file}:(?P<line>\d+)(?::(?P<col>\d+))?"
_CARET = re.compile(r"^(\s*)\^")


def locate(lang: Language | None, diagnostics: str, source_name: str | None = None,
           source: str | None = None) -> dict:
    """Where ``diagnostics`` (a compiler's or interpreter's stderr) points in the program.

    ``{"line": N, "column": M}`` (no column when none is known), or ``{}`` when it
    names no line.  The language's patterns are tried in order, the first
    one that matches wins; with no column in the match, a caret line two
    lines below (javac, node, ruby) gives it.  Given the ``source``, the
    line's text is added as ``text``, as for a Python syntax error, so the
    notebook can draw the caret.
    """
    where = _locate(lang, diagnostics, source_name)
    if where and source is not None:
        lines = source.splitlines()
        if 1 <= where["line"] <= len(lines) and lines[where["line"] - 1].strip():
            where["text"] = lines[where["line"] - 1]
    return where


REASON_TAIL = 1 << 16  # the end of stderr, where a runtime says why it stopped
REASON_CHARS = 300


def brief(text: str) -> str:
    """``text`` cut at REASON_CHARS, for an error's message: it is read in a status line, in every event
    and listing of the job; the whole of what the program said is in its stderr, within the output limit."""
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "…"


def reason(lang: Language | None, diagnostics: str) -> str | None:
    """Why a run failed in one line, as its runtime put it in ``diagnostics`` (its stderr): the
    uncaught exception (``ValueError: bad input 13``), the last one said.  None if it said none."""
    if lang is None or lang.reason is None:
        return None
    found = None
    for found in re.finditer(lang.reason, diagnostics[-REASON_TAIL:], re.M):
        pass
    if found is None:
        return None
    return brief(found.group("reason").strip())


def _locate(lang: Language | None, diagnostics: str, source_name: str | None) -> dict:
    file = re.escape(source_name or (lang.source if lang else "main"))
    patterns = [p.replace("{file}", file) for p in (*(lang.locations if lang else ()), _GENERIC_LOCATION)]
    for pattern in patterns:
        matches = list(re.finditer(pattern, diagnostics, re.M))
        if not matches:
            continue
        m = matches[-1] if lang is not None and lang.location_last else matches[0]
        line = int(m.group("line"))
        col = m.groupdict().get("col")
        column = int(col) if col else _caret_column(diagnostics, m.end())
        return {"line": line, "column": column} if column else {"line": line}
    return {}


def _caret_column(text: str, pos: int) -> int | None:
    # The matched line, then the quoted source line, then "   ^".
    rest = text[pos:].split("\n")[1:3]
    if len(rest) == 2:
        m = _CARET.match(rest[1])
        if m:
            return len(m.group(1)) + 1
    return None
