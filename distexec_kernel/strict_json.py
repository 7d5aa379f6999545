"""JSON for untrusted input: what every frame and request body is parsed with.

Python's json accepts what a strict peer does not (NaN, Infinity, lone UTF-16
surrogates, nesting deep enough to exhaust the parser's recursion); each of
these broke something downstream.  ``loads`` refuses them, ``check_value``
tells whether a value a sender made would be refused, before it is sent.
Part of the protocol, which re-exports these names; standard library only.
"""
from __future__ import annotations

import json
import math
import re

# How deep arrays and objects may nest in what we parse.  Our messages nest a
# few levels; without a bound, 100,000 nested "[" made the parser raise
# RecursionError, which a handler took for a bug of its own (a 500).
MAX_JSON_DEPTH = 128


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads with options builds a decoder per call (every frame comes through here).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def loads(text: str | bytes):
    """``json.loads`` for untrusted input: UTF-8 only, no NaN/Infinity, no lone surrogates, nesting
    at most ``MAX_JSON_DEPTH`` deep (``check_value``).  Python's json accepts all of these, and each
    breaks something downstream that is strict: a lone surrogate (``"\\ud800"``) in a job's name
    cannot be encoded for SQLite and used to kill the master's history writer.  Raises ValueError."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    try:
        value = _DECODER.decode(text)
    except RecursionError:  # the parser is recursive: past the interpreter's depth, before our check
        raise ValueError(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels") from None
    # Fewer openers cannot nest deeper, only an escape makes a surrogate (strict UTF-8): most frames need no walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(text):
        check_value(value)
    return value


def check_value(value, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ValueError if ``loads`` would refuse ``value`` encoded (deeper than ``max_depth``, NaN or Infinity,
    a lone surrogate), so a sender can check what its users made (a session's display bundles, MiB) before
    it sends it: one walk, no encoding, no recursion.  JSON's own types (what json.loads makes, and tuples)
    are told by exact type: 3x faster than isinstance."""
    stack = [((value,), 0)]  # (items, how deep the container holding them is)
    while stack:
        items, depth = stack.pop()
        for item in items:
            t = type(item)
            if t is str:
                if not item.isascii() and _LONE_SURROGATE.search(item):
                    raise ValueError("a string holds a lone UTF-16 surrogate")
            elif t is dict or t is list or t is tuple:
                if depth >= max_depth:
                    raise ValueError(f"arrays and objects nest deeper than {max_depth} levels")
                stack.extend(((item.keys(), depth + 1), (item.values(), depth + 1)) if t is dict
                             else ((item, depth + 1),))
            elif t is float and not math.isfinite(item):
                raise ValueError("NaN or Infinity is not JSON")
