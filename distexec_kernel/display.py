"""How jobs, slaves and clients look to a person: text tables and one-line statuses.

Shared by the CLI, the magic (which adds HTML) and the panel, so a job
reads the same everywhere.
"""
from __future__ import annotations

import datetime as _dt
import html
import signal

from . import protocol as P


# Every C0 control but newline and tab, DEL, and every C1 control: shown as
# ``\x1b`` and the like, so text from a job (its name, output, errors) cannot
# move the cursor, retitle the window (OSC 0), write the clipboard (OSC 52)
# or hide what it printed.  Printable text, emoji included, is left alone.
_CONTROLS = {cp: f"\\x{cp:02x}" for cp in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if cp not in (0x09, 0x0a)}


_NAME_CONTROLS = {**_CONTROLS, 0x09: "\\x09", 0x0a: "\\x0a"}


def clean(text: str) -> str:
    """``text`` with terminal control characters neutralised (see _CONTROLS); for a terminal."""
    return text.translate(_CONTROLS)


def clean_name(name: str) -> str:
    """A name a job chose (a file's) for a terminal, on one line: a newline in it cannot fake another."""
    return name.translate(_NAME_CONTROLS)


def short_uid(uid: str | None, n: int = 8) -> str:
    if not uid:
        return "-"
    return uid if len(uid) <= n else uid[:n] + "…"


def identity(client_id: str | None, user: str | None) -> str:
    """Who submitted a job, or who a client is, the same everywhere: ``c7 · alice``."""
    return " · ".join(str(x) for x in (client_id, user) if x) or "-"


def plural(n: int, word: str) -> str:
    """``1 client``, ``2 clients``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def map_outputs(stdouts: list[str], most: int = 10, lines: int = 20) -> str:
    """What a ``--map`` cell shows of its jobs' outputs, as ipyparallel's ``%%px`` does of its
    engines': each non-empty stdout under its input's index (``[3] 9``), the first ``most`` of
    them, each to its last ``lines`` lines; then how many more there are and where to read them."""
    parts, more = [], 0
    for index, out in enumerate(stdouts):
        if not out:
            continue
        if len(parts) == most:
            more += 1
            continue
        kept = out.splitlines(keepends=True)
        if len(kept) > lines:
            kept = [f"[... {len(kept) - lines} earlier lines]\n"] + kept[-lines:]
        text = "".join(kept) if kept[-1].endswith("\n") else "".join(kept) + "\n"
        parts.append(f"[{index}] {text}" if len(kept) == 1 else f"[{index}]\n{text}")
    if more:
        parts.append(f"[... {plural(more, 'more output')}: -o NAME keeps the group, NAME.results() has them all]\n")
    return "".join(parts)


def duration(job: dict) -> float | None:
    start, end = P.parse_time(job.get("started_at")), P.parse_time(job.get("finished_at"))
    if start and end:
        return (end - start).total_seconds()
    if start and job.get("status") == P.RUNNING:
        return (_dt.datetime.now(_dt.timezone.utc) - start).total_seconds()
    return None


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 600:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min"


def fmt_time(text: str | None) -> str:
    t = P.parse_time(text)
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def status_line(job: dict) -> str:
    """``✅ job 42 · python · slave 3f2a… · 0.08 s``, plus the error if any."""
    parts = [f"{P.ICONS.get(job['status'], '?')} job {job['id']}", job["language"]]
    if job.get("slave_uid"):
        parts.append(f"slave {short_uid(job['slave_uid'])}")
    d = duration(job)
    if d is not None:
        parts.append(fmt_seconds(d))
    line = " · ".join(parts)
    if job["status"] in (P.QUEUED, P.RUNNING):
        line += f" · {job['status']}"
    err = job.get("error")
    if err:
        line += f" · {err.get('code')}: {err.get('message')}"
    return line


# The state's colour, from JupyterLab's theme when there is one: the sign of a
# job's state for a reader whose browser has no emoji font.
STATE_COLORS = {
    P.QUEUED: "var(--jp-content-font-color2, #757575)",
    P.RUNNING: "var(--jp-brand-color1, #1976d2)",
    P.SUCCEEDED: "var(--jp-success-color1, #388e3c)",
    P.FAILED: "var(--jp-error-color1, #d32f2f)",
    P.REJECTED: "var(--jp-error-color1, #d32f2f)",
    P.CANCELLED: "var(--jp-warn-color1, #f57c00)",
}


def status_html(job: dict) -> str:
    """``status_line`` as HTML, escaped, coloured by the job's state."""
    color = STATE_COLORS.get(job.get("status"), "inherit")
    return (f"<span class='distexec-status distexec-{html.escape(str(job.get('status')))}' "
            f"style='font-family:var(--jp-code-font-family,monospace);color:{color}'>"
            f"{html.escape(status_line(job))}</span>")


def status_bundle(job: dict) -> dict:
    """The status line as a display bundle: gray in a notebook, plain elsewhere."""
    return {"text/plain": status_line(job), "text/html": f"<div>{status_html(job)}</div>"}


def failure_lines(job: dict, interrupted: bool = False) -> list[str]:
    """What a person needs to see for a job that did not succeed, line by line.

    The job's status line, its error code and message, and where it points
    (the line of a compile or syntax error).  Shared by the magic and the
    kernels, so a failed cell reads the same in both.
    """
    err = job.get("error") or {}
    lines = [status_line({**job, "error": None})]
    if err:
        lines.append(f"{err.get('code')}: {err.get('message')}")
    if err.get("code") == P.SYNTAX_ERROR:
        caret = syntax_caret(err)
        if caret:
            lines.append(caret)
    elif err.get("line") and err.get("text"):
        # Where a compiler or a runtime error points: the details are in the stderr above.
        lines.append(f"  line {err['line']}: {err['text'].strip()}")
    if err.get("code") == P.UNSUPPORTED_LANGUAGE and err.get("available") is not None \
            and "available" not in (err.get("message") or ""):
        lines.append("available languages: " + (", ".join(err["available"]) or "none"))
    if interrupted:
        lines.append(f"KeyboardInterrupt: job {job['id']} was cancelled on the master")
    return lines


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _html_table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p><i>{html.escape(empty)}</i></p>"
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


JOB_HEADERS = ["", "id", "name", "language", "status", "slave", "submitted", "duration", "error"]


def job_rows(jobs: list[dict]) -> list[list[str]]:
    return [[P.ICONS.get(j["status"], "?"), str(j["id"]), j.get("name") or "", j["language"], j["status"],
             short_uid(j.get("slave_uid")), fmt_time(j.get("submitted_at")), fmt_seconds(duration(j)),
             (j.get("error") or {}).get("code") or ""] for j in jobs]


SLAVE_HEADERS = ["uid", "host", "languages", "running/slots", "completed", "connected", "last seen"]


def slave_rows(slaves: list[dict]) -> list[list[str]]:
    return [[s["uid"], s["host"], ", ".join(s["languages"]),
             f"{s['running']}/{s['slots']}" + (" (draining)" if s.get("draining") else ""),
             str(s["completed"]), fmt_time(s["connected_at"]), fmt_time(s["last_seen"])] for s in slaves]


CLIENT_HEADERS = ["id", "user", "host", "connected", "jobs submitted"]


def client_rows(clients: list[dict]) -> list[list[str]]:
    # The host is the address the master sees; the client's own name for it is a label.
    return [[c["id"], c.get("user") or "-", c["host"] + (f" ({c['label']})" if c.get("label") else ""),
             fmt_time(c["connected_at"]), str(c["jobs_submitted"])] for c in clients]


SESSION_HEADERS = ["name", "user", "slave", "language", "created", "last used", "jobs"]


def session_rows(sessions: list[dict]) -> list[list[str]]:
    return [[s["name"], s.get("user") or "-", short_uid(s.get("slave_uid")), s.get("language") or "-",
             fmt_time(s.get("created_at")), fmt_time(s.get("last_used")), str(s.get("jobs", "-"))]
            for s in sessions]


def languages_text(langs: list[dict]) -> str:
    """What ``distexec languages`` and ``%remote languages`` print: one language a line."""
    lines = [f"{lang['name']:<12} {lang.get('version') or '?':<12} on {lang['slaves']} slave(s)" for lang in langs]
    return "\n".join(lines) if lines else "no slaves connected"


def jobs_text(jobs: list[dict]) -> str:
    return _table(*_with_users(jobs)) if jobs else "no jobs"


def jobs_html(jobs: list[dict]) -> str:
    return _html_table(*_with_users(jobs), "no jobs")


def _with_users(jobs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The jobs' table, with whose each is when they are not all one user's (an admin's view)."""
    rows = job_rows(jobs)
    if len({j.get("user") for j in jobs}) < 2:
        return JOB_HEADERS, rows
    return (JOB_HEADERS[:2] + ["user"] + JOB_HEADERS[2:],
            [row[:2] + [j.get("user") or ""] + row[2:] for row, j in zip(rows, jobs)])


def slaves_text(slaves: list[dict]) -> str:
    return _table(SLAVE_HEADERS, slave_rows(slaves)) if slaves else "no slaves connected"


def slaves_html(slaves: list[dict]) -> str:
    return _html_table(SLAVE_HEADERS, slave_rows(slaves), "no slaves connected")


def clients_text(clients: list[dict]) -> str:
    return _table(CLIENT_HEADERS, client_rows(clients)) if clients else "no clients connected"


def clients_html(clients: list[dict]) -> str:
    return _html_table(CLIENT_HEADERS, client_rows(clients), "no clients connected")


def sessions_text(sessions: list[dict]) -> str:
    return _table(SESSION_HEADERS, session_rows(sessions)) if sessions else "no sessions"


def sessions_html(sessions: list[dict]) -> str:
    return _html_table(SESSION_HEADERS, session_rows(sessions), "no sessions")


def error_text(err: dict) -> str:
    """An error's message with the line it names, said once (a syntax error's message says it already)."""
    message = err.get("message") or ""
    line = err.get("line")
    return message + (f" (line {line})" if line and f"line {line}" not in message else "")


def exit_code_text(job: dict) -> str | None:
    """The exit code as a person reads it (None: the process never ended by itself or never ran).

    A death by signal is named (the slave's SIGKILL at a limit reads ``-9 (SIGKILL)``), and a
    failed job's 0 says whose it is: a job cut at its output limit may have exited 0 by itself,
    and a bare 0 beside ❌ would read as a success."""
    code = job.get("exit_code")
    if code is None:
        return None
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    if code == 0 and job.get("status") == P.FAILED:
        return "0 (the process's own; the job failed)"
    return str(code)


def job_detail_text(job: dict) -> str:
    err = job.get("error")
    lines = [
        status_line(job),
        f"name:      {job.get('name')}",
        f"status:    {job['status']}",
        f"slave:     {job.get('slave_uid') or '-'}",
        f"client:    {job.get('client_id') or '-'}",
        f"submitted: {fmt_time(job.get('submitted_at'))}",
        f"started:   {fmt_time(job.get('started_at'))}",
        f"finished:  {fmt_time(job.get('finished_at'))}",
        f"exit code: {exit_code_text(job) or '-'}",
    ]
    if err:
        lines.append(f"error:     {err.get('code')}: {error_text(err)}")
    for stream in ("stdout", "stderr"):
        text = job.get(stream) or ""
        if text:
            lines.append(f"--- {stream} ---")
            lines.append(text.rstrip("\n"))
    if job.get("artifacts"):
        lines.append(f"--- collected files (distexec get {job.get('id')}) ---")
        lines += [f"{a.get('name')}  {a.get('size')} bytes  {a.get('mime')}" for a in job["artifacts"]]
    return "\n".join(lines)


def syntax_caret(err: dict) -> str | None:
    """The offending line with a caret under the column, as Python shows it."""
    text = err.get("text")
    if not text or not err.get("line"):
        return None
    col = max(1, err.get("column") or 1)
    stripped = text.lstrip()
    col -= len(text) - len(stripped)
    return f"  line {err['line']}: {stripped}\n  {' ' * (len(str(err['line'])) + 7)}{' ' * max(0, col - 1)}^"
