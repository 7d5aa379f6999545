"""A finished job's rich results in a notebook: its display outputs, then its collected files.

Both go through Jupyter's own output area (``display(..., raw=True)``), as a
local cell's outputs do, so HTML or SVG a job made is rendered, and
sanitised when untrusted, by JupyterLab itself; none of it is put into a
widget.  Text-only bundles are not shown again: their ``text/plain`` is
already in the job's stdout, which the cell streamed.
"""
from __future__ import annotations

import base64
import html

from .files import human_size

# Collected images shown inline; bigger ones and the rest are listed by name and size.
INLINE_IMAGES = {"image/png", "image/jpeg", "image/gif"}
MAX_INLINE_IMAGES = 20
MAX_INLINE_BYTES = 8 << 20


def rich_outputs(record: dict) -> list[dict]:
    """The job's outputs that carry more than ``text/plain``, in order."""
    return [out for out in record.get("outputs") or []
            if isinstance(out, dict) and set(out.get("data") or {}) - {"text/plain"}]


def show_outputs(record: dict, display) -> None:
    """Display the job's rich outputs with ``display`` (IPython's), as a local cell would."""
    for out in rich_outputs(record):
        display(out["data"], raw=True, metadata=out.get("metadata") or None)


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
