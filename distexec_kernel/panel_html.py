"""The job panel's HTML: every string a job or the master supplies goes through ``html.escape``.

ipywidgets' ``HTML`` sets ``innerHTML`` unsanitised, so a job that prints
``<img src=x onerror=...>`` would run script in the user's JupyterLab if
its output were put in as it is.  Nothing here takes HTML from outside.

Colours and fonts come from JupyterLab's CSS variables, so the panel reads
in the light and the dark theme alike; the fallbacks after the commas are
for a front end without them (classic Notebook, VS Code).
"""
from __future__ import annotations

import html
import re
import shlex

from . import display as D, protocol as P
from .files import human_size
from .group import describe_counts
from .panel_jobs import display_name

# The detail view shows the tail of a long output; the whole of it stays one
# `distexec show ID` away.  Re-sending megabytes per flush would stall the browser.
OUTPUT_TAIL = 64 * 1024

STYLE = """<style>
.distexec-panel { font-family: var(--jp-ui-font-family, sans-serif); color: var(--jp-content-font-color1, #212121);
  background: var(--jp-layout-color1, #fff); padding: 4px; }
.distexec-panel .widget-html-content { line-height: 1.35; color: var(--jp-content-font-color1, #212121); }
.distexec-panel .widget-label { color: var(--jp-content-font-color1, #212121); }
.distexec-rows select { font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 12px);
  background: var(--jp-layout-color0, #fff); color: var(--jp-content-font-color1, #212121); }
.distexec-code textarea { font-family: var(--jp-code-font-family, monospace); }
.distexec-panel table { border-collapse: collapse; }
.distexec-panel table th, .distexec-panel table td { padding: 1px 10px 1px 0; vertical-align: top; text-align: left; }
.distexec-panel table th { color: var(--jp-content-font-color2, #616161); font-weight: 600; }
.distexec-panel pre { margin: 0; max-height: 22em; overflow: auto; white-space: pre-wrap;
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 12px);
  background: var(--jp-layout-color2, #eee); color: var(--jp-content-font-color1, #212121); padding: 2px 4px; }
.distexec-panel .distexec-muted { color: var(--jp-content-font-color2, #757575); font-style: italic; }
.distexec-panel .distexec-state { font-weight: 600; }
</style>"""

EMPTY_DETAIL = "<span class='distexec-muted'>select a job above</span>"
LOADING = "<span class='distexec-muted'>loading…</span>"
NONE = "<span class='distexec-muted'>(none)</span>"


def esc(value) -> str:
    return html.escape("-" if value is None or value == "" else str(value))


def pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def state_html(status: str | None) -> str:
    """The state in words and colour as well as its icon: it reads without an emoji font."""
    color = D.STATE_COLORS.get(status, "inherit")
    return (f"<span class='distexec-state distexec-{esc(status)}' style='color:{color}'>"
            f"{P.ICONS.get(status, '?')} {esc(status)}</span>")


def detail_html(job: dict) -> str:
    """The selected job's facts as a small table, two facts a line."""
    err = job.get("error") or {}
    rows = [
        ("status", None),
        ("job", f"{job['id']} · {display_name(job)}"),
        ("language", job.get("language")),
        ("exit code", D.exit_code_text(job)),
        ("slave", job.get("slave_uid")),
        ("error code", err.get("code")),
        ("client", D.identity(job.get("client_id"), job.get("user"))),
        ("duration", D.fmt_seconds(D.duration(job))),
        ("submitted", D.fmt_time(job.get("submitted_at"))),
        ("timeout", D.fmt_seconds(job.get("timeout"))),
        ("started", D.fmt_time(job.get("started_at"))),
        ("arguments", shlex.join(job["args"]) if job.get("args") else None),
        ("finished", D.fmt_time(job.get("finished_at"))),
    ]
    cells = [f"<th>{k}</th><td>{state_html(job.get('status')) if k == 'status' else esc(v)}</td>"
             for k, v in rows]
    body = "".join("<tr>" + "".join(cells[i:i + 2]) + "</tr>" for i in range(0, len(cells), 2))
    if err:
        body += f"<tr><th>error</th><td colspan='3'>{esc(D.error_text(err))}</td></tr>"
    return f"<table>{body}</table>"


def output_html(text: str, length: int) -> str:
    """One stream's tail, escaped; says how much before it is not shown."""
    if not length:
        return NONE
    note = f"… {length - len(text)} characters before these not shown\n" if length > len(text) else ""
    return pre(note + text)


def title_html(url: str, me: str, connected: bool, total: int, slaves: int, clients: int,
               refused: bool = False) -> str:
    state = "🟢 connected" if connected else "🔴 refused" if refused else "🔴 disconnected, reconnecting…"
    return (f"<b>distexec</b> · {esc(url)} · client {esc(me)} · {state} · {D.plural(total, 'job')}"
            f" · {D.plural(slaves, 'slave')} · {D.plural(clients, 'client')}")


def snapshot(title: str, message: str, page: str, rows: list[str]) -> dict:
    """The panel as a reader without its widgets sees it (GitHub, an HTML export): its title (our own
    ``title_html``), its message line, and the page of the history it lists, each row as the list shows it."""
    plain_title = html.unescape(re.sub(r"<[^>]*>", "", title))
    lines = [plain_title] + ([message] if message else []) + rows + ([page] if page else [])
    shown_rows = html.escape("\n".join(rows))
    return {"text/plain": "\n".join(lines),
            "text/html": (f"<div class='distexec-panel-snapshot'><div>{title}</div>"
                          + (f"<div>{esc(message)}</div>" if message else "")
                          + (f"<pre>{shown_rows}</pre>" if rows else "")
                          + (f"<div><i>{esc(page)}</i></div>" if page else "") + "</div>")}


def cluster_html(slaves: list[dict], clients: list[dict]) -> tuple[str, str]:
    """The Cluster tab's two tables (``display`` escapes every cell)."""
    return D.slaves_html(slaves), D.clients_html(clients)


# Collected images the detail shows inline: the first few, each under a size the page can carry.
SHOWN_IMAGES = 4
IMAGE_BYTES = 2 << 20
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def image_artifacts(artifacts: list[dict]) -> list[dict]:
    """The artifacts the detail shows as pictures (no SVG: it is markup, and could carry script)."""
    return [a for a in artifacts if a.get("mime") in IMAGE_TYPES and a.get("size", 0) <= IMAGE_BYTES][:SHOWN_IMAGES]


def data_uri(artifact: dict, data: bytes) -> str:
    import base64
    return f"data:{artifact['mime']};base64,{base64.b64encode(data).decode()}"


def artifacts_html(artifacts: list[dict], images: dict[str, str]) -> str:
    """The job's collected files: name and size each, and the images themselves."""
    if not artifacts:
        return ""
    items = "".join(f"<li><code>{esc(a['name'])}</code> · {esc(human_size(a.get('size') or 0))}"
                    f"{' · ' + esc(a['mime']) if a.get('mime') else ''}</li>" for a in artifacts)
    pictures = "".join(f"<div><img alt='{esc(name)}' src='{uri}' style='max-width:100%;max-height:320px'></div>"
                       for name, uri in images.items() if uri.startswith("data:image/"))
    return f"<div class='distexec-artifacts'><b>collected files</b><ul>{items}</ul>{pictures}</div>"


def group_html(group: dict) -> str:
    """A fan-out group in the detail: its counts per state and its jobs, in input order."""
    rows = "".join(f"<tr><td>{esc(j['id'])}</td><td>{state_html(j.get('status'))}</td>"
                   f"<td>{esc(' '.join(j.get('args') or []))}</td><td>{esc(D.short_uid(j.get('slave_uid')))}</td>"
                   f"<td>{esc((j.get('error') or {}).get('code'))}</td></tr>" for j in group["jobs"][:200])
    more = len(group["jobs"]) - 200
    note = f"<p class='distexec-muted'>… and {more} more</p>" if more > 0 else ""
    return (f"<p><b>group {esc(group['group'])}</b> · {len(group['jobs'])} jobs · "
            f"{esc(describe_counts(group['counts']))}</p>"
            f"<table><tr><th>job</th><th>state</th><th>arguments</th><th>slave</th><th>error</th></tr>"
            f"{rows}</table>{note}")
