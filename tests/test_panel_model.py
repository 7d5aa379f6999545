"""The panel's model and HTML, fed events as the cluster sends them: no widgets, no browser, no cluster."""
from __future__ import annotations

import re

import pytest

from distexec_kernel import display as D, panel_html as H, protocol as P
from distexec_kernel.panel_jobs import (STATE_WORDS, display_name, editor_request, editor_timeout, rerun_request,
                                        row_label)
from distexec_kernel.panel_model import TICK, PanelModel, Task

XSS = "<script>alert(1)</script><img src=x onerror=\"alert(2)\">"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(job_id: int, status: str = P.QUEUED, **fields) -> dict:
    base = {"id": job_id, "name": f"job {job_id}", "language": "python", "status": status, "error": None,
            "slave_uid": None, "client_id": "c1", "user": "admin", "submitted_at": "2026-01-01T00:00:00.000Z",
            "started_at": None, "finished_at": None, "exit_code": None, "timeout": P.DEFAULT_TIMEOUT,
            "attempts": 0}
    if status != P.QUEUED:
        base.update(started_at="2026-01-01T00:00:01.000Z", slave_uid="3f2a1b0c9d8e", attempts=1)
    if status in P.TERMINAL:
        base.update(finished_at="2026-01-01T00:00:02.000Z")
    base.update(fields)
    return base


def update(j: dict) -> dict:
    return {"type": "job_update", "job": P.summary(j)}


def output(job_id: int, offset: int, data: str, stream: str = "stdout") -> dict:
    return {"type": "job_output", "job_id": job_id, "stream": stream, "offset": offset, "data": data}


def loaded(model: PanelModel, jobs: list[dict] = (), clients: list[dict] = ()) -> PanelModel:
    model.reloaded(model.seq, list(jobs), len(jobs), [], list(clients), [])
    return model


# -- 2: a state reads without the emoji ----------------------------------------------------

@pytest.mark.parametrize("status", P.STATES)
def test_every_state_has_a_word_in_its_row_and_a_colour_in_html(status):
    label = row_label(job(7, status))
    assert label.startswith(P.ICONS[status])
    assert label.split()[1] == STATE_WORDS[status]
    # Without the icon the rows still differ: one word per state, failures in capitals.
    assert len(set(STATE_WORDS.values())) == len(P.STATES)
    html = H.state_html(status)
    assert status in html and D.STATE_COLORS[status] in html
    assert D.STATE_COLORS[status] in D.status_html(job(7, status))
    assert "var(--jp-" in D.STATE_COLORS[status]  # the theme's colour, with a fallback


# -- 3: a running job's clock ticks while it prints -----------------------------------------

def test_elapsed_time_ticks_while_the_selected_job_prints_every_200_ms():
    clock = Clock()
    m = loaded(PanelModel(clock=clock), [job(1, P.RUNNING)])
    m.select(1)
    m.detail_loaded(job(1, P.RUNNING, stdout="", stderr=""))
    m.page_view()
    m.take_dirty()
    assert m.tick_wait() == pytest.approx(TICK)
    ticks, offset = 0, 0
    for _ in range(30):  # 6 s of output, five lines a second
        clock.now += 0.2
        m.on_event(output(1, offset, "x\n"))
        offset += 2
        m.tick()  # what the flusher does each time anything wakes it
        dirty = m.take_dirty()
        assert "detail" in dirty
        if "jobs" in dirty:
            ticks += 1
            m.page_view()
    assert 5 <= ticks <= 6, ticks  # once a second, not never (the old loop reset its wait on each event)


def test_no_tick_once_nothing_runs():
    clock = Clock()
    m = loaded(PanelModel(clock=clock), [job(1, P.RUNNING)])
    m.page_view()
    assert m.tick_wait() is not None
    m.on_event(update(job(1, P.SUCCEEDED)))
    m.page_view()
    assert m.tick_wait() is None


# -- 4: the message line follows the submitted job to its end -------------------------------

def test_the_note_follows_the_submitted_job_until_it_ends():
    m = loaded(PanelModel())
    tasks = m.submitted(job(5), m.seq)
    assert tasks == []
    assert m.note == "🕓 submitted job 5: queued" and m.selected == 5
    m.on_event(update(job(5, P.RUNNING)))
    assert m.note == "⏳ job 5: running"
    m.on_event(update(job(6, P.SUCCEEDED)))  # another job: not about it
    assert m.note == "⏳ job 5: running"
    tasks = m.on_event(update(job(5, P.FAILED, error={"code": "nonzero_exit", "message": "exit 3"})))
    assert m.note == "❌ job 5: failed: nonzero_exit: exit 3"
    assert tasks == [Task("load_detail", 5)]  # its final output
    m.on_event(update(job(5, P.FAILED)))
    m.say("something else")
    m.on_event(update(job(5, P.SUCCEEDED)))
    assert m.note == "something else"


def test_a_cancel_note_follows_the_job_even_if_its_end_came_first():
    m = loaded(PanelModel(), [job(3, P.RUNNING)])
    m.say("cancel of job 3 requested", about=3)
    m.on_event(update(job(3, P.CANCELLED, error={"code": "cancelled", "message": "by a user"})))
    assert m.note == "🚫 job 3: cancelled: by a user"
    m.on_event(update(job(4, P.CANCELLED)))
    m.say("cancel of job 4 requested", about=4)  # the answer came after the event
    assert m.note.startswith("🚫 job 4: cancelled")


def test_a_refused_channel_says_so_instead_of_reconnecting_for_ever():
    from distexec_kernel.panel_html import title_html
    m = loaded(PanelModel())
    m.on_event({"type": "connection", "connected": False})
    assert m.refused is None and "reconnecting" in title_html("u", "c1", m.connected, 0, 0, 0, m.refused is not None)
    m.on_event({"type": "connection", "connected": False, "refused": "the master refused the token (401)"})
    assert m.note.startswith("⚠ the master refused this panel's connection: the master refused the token (401)")
    assert "log in again" in m.note
    title = title_html("u", "c1", m.connected, 0, 0, 0, m.refused is not None)
    assert "🔴 refused" in title and "reconnecting" not in title


def test_a_rejected_submission_is_final_at_once():
    m = loaded(PanelModel())
    m.submitted(job(9, P.REJECTED, error={"code": "syntax_error", "message": "invalid syntax"}), m.seq)
    assert m.note == "❌ submitted job 9: rejected: syntax_error: invalid syntax"
    assert m.note_job is None


# -- 6 and 7: the Cluster tab live, one identity ------------------------------------------

def test_clients_changed_updates_the_cluster_part_and_the_title():
    m = loaded(PanelModel(), clients=[{"id": "c1", "user": "admin", "host": "h", "connected_at": None,
                                       "jobs_submitted": 0}])
    m.take_dirty()
    m.on_event({"type": "clients_changed", "clients": [{"id": "c1", "user": "admin", "host": "h",
                                                        "connected_at": None, "jobs_submitted": 3}]})
    assert {"cluster", "title"} <= m.take_dirty()
    _, clients = H.cluster_html([], m.clients)
    assert "<td style='text-align:left'>3</td>" in clients
    assert m.me("c1") == "c1 · admin" == D.identity("c1", "admin")


def test_the_detail_names_the_client_as_the_cluster_tab_does():
    header = H.detail_html(job(3, P.SUCCEEDED, client_id="c7", user="alice"))
    assert "<th>client</th><td>c7 · alice</td>" in header
    assert D.identity("c7", None) == "c7" and D.identity(None, None) == "-"


def test_the_line_an_error_names_is_said_once():
    rejected = job(4, P.REJECTED, error={"code": P.SYNTAX_ERROR, "message": "invalid syntax (line 2)", "line": 2})
    failed = job(5, P.FAILED, error={"code": P.NONZERO_EXIT, "message": "exited with code 1", "line": 3})
    for text in (H.detail_html(rejected), D.job_detail_text(rejected)):
        assert "invalid syntax (line 2)" in text and "(line 2) (line 2)" not in text, text
    for text in (H.detail_html(failed), D.job_detail_text(failed)):
        assert "exited with code 1 (line 3)" in text, text


# -- 8: the small things -------------------------------------------------------------------

def test_counts_are_singular_for_one():
    title = H.title_html("http://m", "c1 · admin", True, 1, 1, 1)
    assert "1 job ·" in title and "1 slave ·" in title and title.endswith("1 client")
    assert H.title_html("http://m", "c1", True, 2, 0, 2).endswith("0 slaves · 2 clients")


def test_unnamed_jobs_say_so_or_show_their_first_line():
    assert "(unnamed)" in row_label(job(85))
    assert "job 85" not in row_label(job(85))
    assert display_name(job(85, source="\n  import os\nprint(1)")) == "(import os)"
    assert display_name(job(85, name="mine", source="x")) == "mine"
    assert "85 · (unnamed)" in H.detail_html(job(85))


def test_edit_and_rerun_keep_the_default_timeout_as_the_default():
    ran_default = job(4, P.SUCCEEDED, source="print(1)", timeout=P.DEFAULT_TIMEOUT)
    assert editor_timeout(ran_default) == 0.0
    assert rerun_request(ran_default)["timeout"] is None and rerun_request(ran_default)["name"] is None
    assert editor_timeout(job(4, timeout=12)) == 12.0
    assert rerun_request(job(4, source="x", timeout=12, name="n"))["timeout"] == 12.0


def test_the_editor_request_checks_what_was_typed():
    ok = dict(language="python", source="print(1)", args="a 'b c'", uploads=(), carried={"f": "x"},
              stdin="", timeout=0.0, name=" n ")
    req = editor_request(**ok)
    assert req["args"] == ["a", "b c"] and req["timeout"] is None and req["name"] == "n" and req["files"] == {"f": "x"}
    for bad, msg in [({"language": ""}, "choose a language"), ({"args": "'open"}, "arguments"),
                     ({"timeout": -1.0}, "timeout"), ({"source": " \n"}, "the program is empty")]:
        with pytest.raises(ValueError, match=msg):
            editor_request(**{**ok, **bad})
    # A file that is not text (an image, data) goes as bytes, as the API takes them.
    req = editor_request(**{**ok, "uploads": ({"name": "b.bin", "content": b"\xff\x00"},)})
    assert req["files"] == {"f": "x", "b.bin": {"base64": "/wA="}}


# -- escaping: a job's text never becomes markup -------------------------------------------

def test_everything_a_job_supplies_is_escaped():
    bad = job(1, P.FAILED, name=XSS, language=XSS, slave_uid=XSS, client_id=XSS, user=XSS, args=[XSS],
              error={"code": XSS, "message": XSS, "line": 1}, source=XSS)
    pieces = [H.detail_html(bad), H.output_html(XSS, len(XSS)), H.pre(XSS), D.status_html(bad),
              H.title_html(XSS, XSS, True, 1, 1, 1), H.state_html(XSS),
              *H.cluster_html([{"uid": XSS, "host": XSS, "languages": [XSS], "running": 0, "slots": 1,
                                "completed": 0, "connected_at": None, "last_seen": None}],
                              [{"id": XSS, "user": XSS, "host": XSS, "connected_at": None, "jobs_submitted": 0}])]
    for piece in pieces:
        assert "<script" not in piece and "<img" not in piece, piece
        assert "&lt;script&gt;" in piece or "&lt;img" in piece, piece


# -- the model's bookkeeping ---------------------------------------------------------------

def test_output_of_the_selected_job_is_kept_while_its_record_loads_and_replayed_once():
    m = loaded(PanelModel(), [job(2, P.RUNNING)])
    assert m.select(2) == [Task("load_detail", 2)]
    assert m.detail_wanted(2)
    m.on_event(output(2, 0, "a\nb\n"))
    m.on_event(output(2, 4, "c\n"))
    m.detail_loaded(job(2, P.RUNNING, stdout="a\n", stderr=""))  # read before "b" arrived
    assert m.detail_out["stdout"].text() == "a\nb\nc\n"
    # A chunk past the end means one was missed: the record is read again.
    assert m.on_event(output(2, 50, "z")) == [Task("load_detail", 2)]


def test_an_event_newer_than_a_reload_survives_it():
    m = loaded(PanelModel(), [job(1)])
    start = m.seq
    m.on_event(update(job(2, P.RUNNING)))
    m.reloaded(start, [job(1, P.SUCCEEDED)], 1, [], [], [])
    assert m.jobs[2]["status"] == P.RUNNING and m.jobs[1]["status"] == P.SUCCEEDED
    assert m.total == 2


def test_pages_ask_for_older_history_once():
    m = PanelModel(page_size=2)
    m.reloaded(m.seq, [job(9), job(8)], 5, [], [], [])
    m.turn_page(1)
    page, tasks = m.page_view()
    assert tasks == [Task("load_more")] and page.options == []
    assert m.page_view()[1] == []  # already loading
    assert m.more_offset() == 2
    assert m.more_loaded([job(7), job(6)], 5, 2, chunk=2)
    page, _ = m.page_view()
    assert [v for _, v in page.options] == [7, 6] and re.match(r"3–4 of 4 loaded, 5 in", page.label)


# -- fan-out groups (issue 14) and collected files (issue 15) ------------------------------------------

def test_a_group_is_one_row_that_opens_to_its_jobs():
    from distexec_kernel.panel_model import group_value
    m = loaded(PanelModel())
    for i in range(10, 14):
        m.on_event(update(job(i, P.SUCCEEDED if i < 12 else P.RUNNING, group="g10", name="sweep", args=[str(i)])))
    m.on_event(update(job(14, P.QUEUED)))
    page, _ = m.page_view()
    labels = [label for label, _ in page.options]
    assert [v for _, v in page.options] == [14, group_value("g10")]  # one row for the four
    assert labels[1].startswith("▸ group g10") and "2/4 done" in labels[1] and "✅ 2" in labels[1]
    # Clicking the row opens it: its jobs follow it, in input order; the detail shows the group.
    assert m.select(group_value("g10")) == []
    page, _ = m.page_view()
    assert [v for _, v in page.options] == [14, -10, 10, 11, 12, 13]
    assert page.selected == -10 and page.options[2][0].startswith("   └ ")
    summary = m.group_summary()
    assert summary["counts"] == {P.SUCCEEDED: 2, P.RUNNING: 2} and summary["unfinished"] == 2
    html = H.group_html(summary)
    assert "group g10" in html and "4 jobs" in html and html.count("<tr>") == 5
    # Live: an event moves the row's counts; clicking again closes it.
    m.on_event(update(job(12, P.FAILED, group="g10", name="sweep")))
    assert "❌ 1" in m.page_view()[0].options[1][0]
    m.select(-10)
    assert [v for _, v in m.page_view()[0].options] == [14, -10]
    # Selecting a job leaves the group.
    assert m.select(14) == [Task("load_detail", 14)] and m.group_summary() is None


def test_collected_files_are_listed_and_only_raster_images_shown():
    artifacts = [{"name": "plot.png", "size": 2048, "mime": "image/png", "sha256": "x"},
                 {"name": f"out/{XSS}.svg", "size": 10, "mime": "image/svg+xml", "sha256": "y"},
                 {"name": "huge.png", "size": H.IMAGE_BYTES + 1, "mime": "image/png", "sha256": "z"}]
    assert [a["name"] for a in H.image_artifacts(artifacts)] == ["plot.png"]  # no SVG (markup), nothing huge
    uri = H.data_uri(artifacts[0], b"\x89PNG")
    html = H.artifacts_html(artifacts, {"plot.png": uri, "evil": "javascript:alert(1)"})
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<img") == 1 and f"src='{uri}'" in html
    assert "2.0 KiB" in html or "2048" in html
    assert H.artifacts_html([], {}) == ""


def test_the_panels_text_for_a_saved_notebook_is_its_title_and_rows_escaped():
    from distexec_kernel.panel_jobs import row_label
    title = H.title_html("http://m", "c1", True, 1, 2, 1)
    row = row_label(job(7, P.SUCCEEDED, name="<img src=x onerror=alert(1)>"))
    shown = H.snapshot(title, "✅ job 7: succeeded", "1–1 of 1", [row])
    assert shown["text/plain"].splitlines() == [
        "distexec · http://m · client c1 · 🟢 connected · 1 job · 2 slaves · 1 client",
        "✅ job 7: succeeded", row, "1–1 of 1"]
    assert row.startswith("✅ ok") and "<img" not in shown["text/html"] and "&lt;img src=x" in shown["text/html"]
