"""A finished job's rich results in a notebook: its display outputs, then its collected files.

Both go through Jupyter's own output area (``display(..., raw=True)``), as a
local cell's outputs do, so HTML, SVG or JavaScript a job made is rendered
by JupyterLab itself, and trusted as a local cell's output is while the
notebook runs: its scripts run (JupyterLab sanitises only a notebook opened
untrusted).  Only the cell's own job, which the user just ran, is shown this
way; the panel and every listing escape what jobs print, and none of it is
put into a widget.  Text-only bundles are not shown again: their ``text/plain`` is
already in the job's stdout, which the cell streamed.

A session's slave also puts a rich output's ``text/plain`` in stdout (for
terminals and plain clients), so a DataFrame streams as a text table.  Once
the job has ended, a notebook redraws the cell (``in_place``): each rich
output where it came, in place of that text, as a local cell shows it.
"""
from __future__ import annotations

import base64
import html
from typing import Iterator

from .files import human_size
from .job_record import OUTPUT_PLACE

# Collected images shown inline; bigger ones and the rest are listed by name and size.
INLINE_IMAGES = {"image/png", "image/jpeg", "image/gif"}
MAX_INLINE_IMAGES = 20
MAX_INLINE_BYTES = 8 << 20


def rich_outputs(record: dict) -> list[dict]:
    """The job's outputs that carry more than ``text/plain``, in order."""
    return [out for out in record.get("outputs") or []
            if isinstance(out, dict) and set(out.get("data") or {}) - {"text/plain"}]


def metadata_of(out: dict) -> dict:
    """A rich output's metadata as its program gave it (without where it came in stdout)."""
    return {k: v for k, v in (out.get("metadata") or {}).items() if k != OUTPUT_PLACE}


def show_outputs(record: dict, display) -> None:
    """Display the job's rich outputs with ``display`` (IPython's), as a local cell would."""
    for out in rich_outputs(record):
        display(out["data"], raw=True, metadata=metadata_of(out) or None)


def in_place(written: list[tuple[str, str]], record: dict) -> list[tuple[str, object]] | None:
    """The cell's output redrawn as a local cell shows it: what was streamed (``written``,
    ``(stream, text)`` in order), with each rich output at the place in stdout where it came
    and its ``text/plain`` there taken out.  Items are ``(stream, text)`` or ``("output", out)``.
    None: nothing to redraw (no rich output, or one that does not say where it came)."""
    rich = rich_outputs(record)
    places = [(out.get("metadata") or {}).get(OUTPUT_PLACE) for out in rich]
    if not rich or not all(isinstance(p, dict) and isinstance(p.get("stdout_at"), int) for p in places):
        return None
    stdout = "".join(text for stream, text in written if stream == "stdout")
    cuts = []  # (where, how many characters of stdout it replaces, the output)
    for out, place in zip(rich, places):
        at, plain = place["stdout_at"], out["data"].get("text/plain")
        shown = plain + "\n" if isinstance(plain, str) else None
        cuts.append((at, len(shown) if shown and stdout.startswith(shown, at) else 0, out))
    return list(_redrawn(written, sorted(cuts, key=lambda c: c[0])))


def _redrawn(written: list[tuple[str, str]], cuts: list[tuple]) -> Iterator[tuple[str, object]]:
    pos = cursor = 0  # stdout's characters streamed before this piece; where the kept text resumes
    k = 0
    for stream, text in written:
        if stream != "stdout":
            yield stream, text
            continue
        end = pos + len(text)
        while k < len(cuts) and cuts[k][0] < end:
            at, length, out = cuts[k]
            if at > max(cursor, pos):
                yield "stdout", text[max(cursor, pos) - pos:at - pos]
            yield "output", out
            cursor = max(cursor, at + length)
            k += 1
        if cursor < end:
            yield "stdout", text[max(cursor, pos) - pos:]
        pos = end
    for _, _, out in cuts[k:]:  # at the very end of stdout (a cell's last value)
        yield "output", out


def show_artifacts(job, display) -> None:
    """Collected images inline, with their names; the other files as a list of names and sizes."""
    shown, listed = 0, []
    for meta in job.artifacts:
        if meta["mime"] in INLINE_IMAGES and meta["size"] <= MAX_INLINE_BYTES and shown < MAX_INLINE_IMAGES:
            data = job.artifact(meta["name"])
            display({meta["mime"]: base64.b64encode(data).decode("ascii"),
                     "text/plain": f"<{meta['name']}: {meta['mime']}, {human_size(meta['size'])}>"}, raw=True)
            shown += 1
            listed.append((meta, True))
        else:
            listed.append((meta, False))
    if not listed:
        return
    plain = ["collected files (job.artifact(name), job.save_artifacts(dir), distexec get "
             f"{job.id}):"] + [f"  {m['name']}  {human_size(m['size'])}  {m['mime']}" + ("  (shown above)" if s else "")
                               for m, s in listed]
    rows = "".join(f"<tr><td><code>{html.escape(m['name'])}</code></td><td>{human_size(m['size'])}</td>"
                   f"<td>{html.escape(m['mime'])}</td><td>{'shown above' if s else ''}</td></tr>"
                   for m, s in listed)
    display({"text/plain": "\n".join(plain),
             "text/html": f"<details><summary>{len(listed)} collected file(s) of job {job.id}</summary>"
                          f"<table>{rows}</table></details>"}, raw=True)
