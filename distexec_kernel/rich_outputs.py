"""A session cell's rich outputs (display bundles in a job_finished, docs/sessions.md): what clients
may be given to display.  The slave cleans each bundle as it comes, the master each result again.
Standard library only, like the protocol.
"""
from __future__ import annotations

OUTPUT_TYPES = ("display_data", "execute_result")
_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object",
          type(None): "null"}


def json_mime(mime: str) -> bool:
    """Whether a bundle holds ``mime``'s value as JSON, any JSON value (``application/json``, ``*+json``), as
    nbformat has it; every other type's value is text (``image/png`` as base64), all its renderers take."""
    return mime == "application/json" or mime.endswith("+json")


def clean_mime_data(data: dict) -> tuple[dict, list[str]]:
    """A bundle's ``{MIME: value}`` with what a renderer can take, and a note for each value left out: a
    ``text/html`` of 5 reached the notebook's HTML renderer.  Dropped rather than made text: what a cell
    meant by 5 is its own to say."""
    kept, notes = {}, []
    for mime, value in data.items():
        if isinstance(mime, str) and (type(value) is str or json_mime(mime)):
            kept[mime] = value
        else:
            kind = _KINDS.get(type(value), "not JSON")  # (the name cut: a note of a MiB-long one is a flood)
            notes.append(f"a display output's {str(mime)[:100]} was dropped: it is {kind}, not text")
    return kept, notes


def clean_outputs(outputs) -> tuple[list[dict], list[str]]:
    """A result's well-formed rich outputs, each with ``clean_mime_data``, and a note on each thing left out:
    clients display them.  The slave cleans each bundle as it comes, the master again each result."""
    kept, notes = [], []
    for out in outputs if isinstance(outputs, list) else ():
        if not isinstance(out, dict) or out.get("output_type") not in OUTPUT_TYPES or type(out.get("data")) is not dict:
            notes.append("a rich output was dropped: it is no display_data or execute_result with a data object")
            continue
        data, said = clean_mime_data(out["data"])
        notes += said
        if data or not said:  # (one that came empty stays, as it came)
            meta = out["metadata"] if isinstance(out.get("metadata"), dict) else {}
            kept.append({"output_type": out["output_type"], "data": data, "metadata": meta})
    return kept, notes
