"""The job panel, driven through its widgets as a user would, against a real cluster.

No browser: a widget outside a kernel keeps its traits all the same, so
setting ``.value`` and calling ``button.click()`` exercises the same code a
click in JupyterLab does.
"""
from __future__ import annotations

import datetime as dt
import html
import re
import shlex
import threading
import time

import pytest

from distexec_kernel import Cluster, protocol as P
from distexec_kernel import panel as panel_mod
from distexec_kernel.panel import JobPanel

from conftest import HOLD, UNTIL_RELEASED, release_jobs, wait_for

T = 20.0  # generous: the 2 cores are shared with the cluster and other tests


@pytest.fixture
def make_panel(client):
    made = []

    def make(cluster=None, **kwargs) -> JobPanel:
        p = JobPanel(cluster or client, **kwargs)
        made.append(p)
        # Loaded: the languages of the slaves fill the editor's dropdown.
        wait_for(lambda: "python" in [v for _, v in p.editor.language.options], T, "languages loaded")
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def panel(make_panel):
    return make_panel()


def text(widget) -> str:
    return html.unescape(widget.value)


def rows(p: JobPanel) -> dict[int, str]:
    """Job id -> row label, as the list shows them now."""
    return {v: label for label, v in p.job_list.options}


def icon(p: JobPanel, job_id: int) -> str | None:
    label = rows(p).get(job_id)
    return label[0] if label else None


def upload(name: str, content: bytes) -> dict:
    """One file as ipywidgets 8's FileUpload holds it after a browser upload."""
    return {"name": name, "type": "", "size": len(content), "content": memoryview(content),
            "last_modified": dt.datetime.now(dt.timezone.utc)}


def run_in_editor(p: JobPanel, source: str, language: str = "python", args: str = "", **fields) -> int:
    """Fill the editor, click Run, return the id of the job it selected."""
    before = p.job_list.value
    ed = p.editor
    ed.language.value = language
    ed.source.value = source
    ed.args.value = args
    for name, value in fields.items():
        getattr(ed, name).value = value
    p.run_button.click()
    return wait_for(lambda: p.job_list.value not in (None, before) and p.job_list.value, T, "the new job selected")


def test_run_from_editor_streams_to_success(panel, client, cluster):
    history: list[dict] = []
    panel.job_list.observe(lambda change: history.append({v: lab for lab, v in change["new"]}), "options")

    job_id = run_in_editor(
        panel, HOLD + "import sys\nprint('hello', sys.argv[1:], flush=True)\n" + UNTIL_RELEASED, args="a 'b c'")
    # In the list at once, from the submit's answer, not a later event.
    assert icon(panel, job_id) in ("🕓", "⏳")
    wait_for(lambda: icon(panel, job_id) == "⏳", T, "row ⏳ while the job waits")
    release_jobs(*(s.proc.pid for s in cluster.slaves))
    wait_for(lambda: icon(panel, job_id) == "✅", T, "row ✅")
    seen = [h[job_id][0] for h in history if job_id in h]
    assert seen[0] in ("🕓", "⏳") and seen[-1] == "✅", seen
    assert seen.index("✅") > 0

    master = client.job(job_id)
    assert master.status == P.SUCCEEDED and master.args == ["a", "b c"]
    assert master.slave_uid in {s.uid for s in cluster.slaves}
    wait_for(lambda: "hello ['a', 'b c']" in text(panel.detail.stdout), T, "stdout in the detail")
    header = text(panel.detail.header)
    assert master.slave_uid in header
    assert "exit code</th><td>0<" in header
    assert panel.detail.cancel_button.disabled and not panel.detail.rerun_button.disabled
    assert "sys.argv" in text(panel.detail.source)
    assert "(none)" in text(panel.detail.stderr)


def test_output_streams_into_detail_and_cancel(panel, client):
    job_id = run_in_editor(panel, "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    # The running job's output arrives by job_output events while it runs.
    wait_for(lambda: "started" in text(panel.detail.stdout), T, "live output in the detail")
    assert icon(panel, job_id) == "⏳"
    # No event comes while it sleeps, yet its elapsed time moves on in the row.
    wait_for(lambda: re.search(r"  [2-9] s…", rows(panel)[job_id]), T, "the elapsed time ticking")
    assert not panel.detail.cancel_button.disabled
    assert panel.detail.cancel_button.button_style == "danger"  # red while it can be clicked
    panel.detail.cancel_button.click()
    wait_for(lambda: icon(panel, job_id) == "🚫", T, "row 🚫")
    assert client.job(job_id).status == P.CANCELLED
    wait_for(lambda: panel.detail.cancel_button.disabled, T, "Cancel disabled once cancelled")
    assert panel.detail.cancel_button.button_style == ""  # a disabled button is not drawn red
    assert "🚫 job" in panel.message.value and "cancelled" in panel.message.value  # the note followed it
    header = text(panel.detail.header)
    assert "cancelled" in header and "error code</th><td>cancelled" in header


def pre_text(widget) -> str:
    """The text inside a detail <pre>, as the user reads it."""
    value = widget.value
    return html.unescape(value[value.index(">") + 1:value.rindex("</pre>")]) if "<pre" in value else ""


def test_selected_mid_run_the_output_is_whole_and_not_doubled(panel, client, cluster):
    job = client.submit(HOLD + "for i in range(4):\n    print('tick', i, flush=True)\n" + UNTIL_RELEASED +
                        "for i in range(4, 8):\n    print('tick', i, flush=True)\n", name="ticker")
    wait_for(lambda: "tick 3" in (client.job(job.id).stdout or "") and icon(panel, job.id) == "⏳", T,
             "the job half way, and in the list")
    panel.job_list.value = job.id  # a click while it runs: output so far, then the rest live
    wait_for(lambda: "tick 3" in pre_text(panel.detail.stdout) and icon(panel, job.id) == "⏳", T,
             "the selected job's output so far")
    release_jobs(*(s.proc.pid for s in cluster.slaves))
    wait_for(lambda: "tick 5" in pre_text(panel.detail.stdout), T, "the rest of its output, live")
    wait_for(lambda: icon(panel, job.id) == "✅", T, "✅")
    want = "".join(f"tick {i}\n" for i in range(8))
    assert job.wait(T).stdout == want
    wait_for(lambda: pre_text(panel.detail.stdout) == want, T, "the detail's stdout equal to the master's")


def test_cancel_of_a_finished_job_is_reported_not_raised(panel, client):
    job = client.submit("print('done')").wait(T)
    wait_for(lambda: icon(panel, job.id) == "✅", T, "row ✅")
    panel.job_list.value = job.id
    wait_for(lambda: "done" in text(panel.detail.stdout), T, "detail loaded")
    assert panel.detail.cancel_button.disabled
    panel.detail.cancel_button.click()  # a click that raced the job's end
    wait_for(lambda: "already ended: succeeded" in panel.message.value, T, "the notice")
    assert client.job(job.id).status == P.SUCCEEDED
    assert icon(panel, job.id) == "✅"


def test_rerun_makes_a_new_job_with_the_same_program(panel, client):
    src = "import sys\nprint(open('data.txt').read().strip(), sys.argv[1:], sys.stdin.read())\n"
    job = client.submit(src, files={"data.txt": "from a file\n"}, args=["x y", "z"], stdin="IN",
                        timeout=30, name="the original").wait(T)
    assert job.status == P.SUCCEEDED, job.record
    wait_for(lambda: job.id in rows(panel), T, "the job in the list")
    panel.job_list.value = job.id
    wait_for(lambda: "from a file" in text(panel.detail.stdout), T, "detail loaded")
    panel.detail.rerun_button.click()
    new_id = wait_for(lambda: panel.job_list.value not in (None, job.id) and panel.job_list.value, T, "rerun")
    wait_for(lambda: icon(panel, new_id) == "✅", T, "rerun ✅")
    again = client.job(new_id)
    for field in ("source", "language", "files", "args", "stdin", "timeout", "name"):
        assert getattr(again, field) == getattr(job, field), field
    assert again.stdout == job.stdout == "from a file ['x y', 'z'] IN\n"
    wait_for(lambda: "from a file" in text(panel.detail.stdout), T, "the rerun's output in the detail")


def test_edit_loads_the_job_into_the_editor(panel, client):
    src = "import sys\nprint(open('data.txt').read().strip(), *sys.argv[1:])\n"
    job = client.submit(src, files={"data.txt": "carried"}, args=["one two", "3"], stdin="s", timeout=12).wait(T)
    wait_for(lambda: job.id in rows(panel), T, "the job in the list")
    panel.job_list.value = job.id
    panel.detail.edit_button.click()
    ed = panel.editor
    wait_for(lambda: ed.source.value == src, T, "the source in the editor")
    assert ed.language.value == "python"
    assert shlex.split(ed.args.value) == ["one two", "3"]
    assert ed.stdin.value == "s" and ed.timeout.value == 12.0
    assert "data.txt" in ed.carried_files.value
    assert panel.tabs.selected_index == 1
    # Run what was loaded, with one argument changed: the file goes along.
    ed.args.value = "'one two' 4"
    panel.run_button.click()
    new_id = wait_for(lambda: panel.job_list.value not in (None, job.id) and panel.job_list.value, T, "run")
    wait_for(lambda: icon(panel, new_id) == "✅", T, "edited job ✅")
    assert client.job(new_id).stdout == "carried one two 4\n"
    # Dropping the loaded files makes the same program fail: the file is gone.
    ed.clear_files_button.click()
    wait_for(lambda: ed.carried_files.value == "", T, "files dropped")
    third = run_in_editor(panel, src, args="x")
    wait_for(lambda: icon(panel, third) == "❌", T, "❌ without its file")
    assert client.job(third).error["code"] == P.NONZERO_EXIT


def test_editor_refusals_show_in_the_panel(panel, client):
    total = client.jobs_page(limit=1)[1]
    ed = panel.editor
    ed.source.value = "print(1)"
    ed.args.value = "'unclosed"
    panel.run_button.click()
    wait_for(lambda: "arguments" in panel.message.value and panel.message.value.startswith("⚠"), T, "args error")
    ed.args.value = ""
    ed.source.value = "  \n"
    panel.run_button.click()
    wait_for(lambda: "the program is empty" in panel.message.value, T, "empty program error")
    ed.source.value = "x" * (P.MAX_SOURCE_BYTES + 1)  # the master refuses it: no job at all
    panel.run_button.click()
    wait_for(lambda: panel.message.value.startswith("⚠ submit") and "over" in panel.message.value, T,
             "the master's refusal")
    assert client.jobs_page(limit=1)[1] == total

    # A syntax error is not refused: it is a rejected job, in the history.
    job_id = run_in_editor(panel, "print(1\n")
    wait_for(lambda: icon(panel, job_id) == "❌", T, "row ❌")
    wait_for(lambda: "syntax_error" in text(panel.detail.header), T, "the error code in the detail")


def test_uploaded_files_go_with_the_job(panel, client):
    panel.editor.files.value = (upload("up.txt", b"uploaded"), upload("b.bin", b"\xff\xfe"))
    job_id = run_in_editor(panel, "print(open('up.txt').read(), open('b.bin', 'rb').read())")
    wait_for(lambda: icon(panel, job_id) == "✅", T, "✅")
    assert client.job(job_id).files == {"up.txt": "uploaded", "b.bin": {"base64": "//4="}}
    assert client.job(job_id).stdout == "uploaded b'\\xff\\xfe'\n"


def cell(value: str) -> str:
    return f"<td style='text-align:left'>{value}</td>"


def test_cluster_view_shows_slaves_and_clients_live(panel, client, cluster):
    other = Cluster(cluster.url, token=cluster.token)
    other_id = other.client_id
    try:
        view = panel.cluster_view
        wait_for(lambda: all(cell(s.uid) in text(view.slaves) for s in cluster.slaves), T, "both slaves")
        wait_for(lambda: cell(client.client_id) in text(view.clients) and cell(other_id) in text(view.clients),
                 T, "both clients")
        assert "python" in text(view.slaves) and cell("0/2") in text(view.slaves)
        assert "2 slaves · 2 clients" in panel.title.value
        # Live: a job's end changes its slave's count of jobs done.
        client.submit("print(1)").wait(T)
        wait_for(lambda: cell("1") in text(view.slaves), T, "a slave with one job done")
    finally:
        other.close()
    wait_for(lambda: cell(other_id) not in text(panel.cluster_view.clients), T, "the closed client gone")
    assert cell(client.client_id) in text(panel.cluster_view.clients)


def test_other_clients_jobs_appear_live_in_every_panel(make_panel, client, cluster):
    other = Cluster(cluster.url, token=cluster.token)
    try:
        mine, second, theirs = make_panel(), make_panel(), make_panel(other)
        job = other.submit("print('theirs')", name="from the other notebook")
        for p in (mine, second):
            wait_for(lambda: job.id in rows(p), T, "the other client's job listed")
            assert "from the other notebook" in rows(p)[job.id]
        for p in (mine, second, theirs):
            wait_for(lambda: icon(p, job.id) == "✅", T, "✅ everywhere")
        # ...and mine in theirs.
        job_id = run_in_editor(mine, "print('mine')")
        wait_for(lambda: icon(theirs, job_id) == "✅", T, "my job in their panel")
        theirs.job_list.value = job_id
        wait_for(lambda: "mine" in text(theirs.detail.stdout), T, "my job's output in their detail")
    finally:
        other.close()


def test_filters_narrow_the_rows(panel, client):
    good = [client.submit("print('ok')", name=f"needle {i}") for i in range(3)]
    bad = [client.submit("raise SystemExit(3)", name=f"hay {i}") for i in range(2)]
    for j in good + bad:
        j.wait(T)
    ids = {j.id for j in good + bad}
    wait_for(lambda: ids <= set(rows(panel)) and icon(panel, bad[-1].id) == "❌", T, "all listed")

    panel.status_filter.value = P.FAILED
    wait_for(lambda: set(rows(panel)) == {j.id for j in bad}, T, "only the failed")
    panel.text_filter.value = "needle"
    wait_for(lambda: rows(panel) == {}, T, "failed and needle: none")
    assert "no matching jobs" in panel.jobs_view.page_label.value
    panel.status_filter.value = ""
    wait_for(lambda: set(rows(panel)) == {j.id for j in good}, T, "only the needles")
    panel.text_filter.value = str(good[1].id)
    wait_for(lambda: good[1].id in rows(panel) and not (set(rows(panel)) & {j.id for j in bad}), T, "by id")
    panel.text_filter.value = ""
    wait_for(lambda: ids <= set(rows(panel)), T, "filters cleared")
    # Newest first.
    shown = list(rows(panel))
    assert shown == sorted(shown, reverse=True)


def test_pages_go_past_what_was_loaded(make_panel, client, monkeypatch):
    # Small chunks and pages, so three pages and two "load older" fetches need only 25 jobs.
    monkeypatch.setattr(panel_mod, "LOAD_CHUNK", 10)
    jobs = [client.submit(f"print({i})", name=f"page job {i}") for i in range(25)]
    for j in jobs:
        j.wait(T)
    p = make_panel(page_size=10)
    history, total = client.jobs_page(limit=25)
    assert total == 25
    expected = [j["id"] for j in history]
    seen = []
    for page in range(3):
        want = expected[page * 10:page * 10 + 10]
        wait_for(lambda: list(rows(p)) == want, T, f"page {page + 1}")
        seen += list(rows(p))
        if page < 2:
            assert not p.next_button.disabled
            p.next_button.click()
    assert seen == expected
    wait_for(lambda: p.next_button.disabled, T, "no page after the last")
    assert "21–25 of 25" in p.jobs_view.page_label.value
    p.prev_button.click()
    wait_for(lambda: list(rows(p)) == expected[10:20], T, "back one page")


def test_a_burst_coalesces_and_ends_consistent(panel, client):
    option_syncs = []
    panel.job_list.observe(lambda c: option_syncs.append(len(c["new"])), "options")
    events_before, renders_before = panel.events, panel.renders["jobs"]
    started = time.monotonic()
    n = 200
    jobs = [client.submit(f"print({i})") for i in range(n)]
    for j in jobs:
        j.wait(T)
    history, _ = client.jobs_page(limit=panel.page_size)
    want = {j["id"]: P.ICONS[j["status"]] for j in history}
    wait_for(lambda: {i: lab[0] for i, lab in rows(panel).items()} == want, T, "the panel matches the master")
    elapsed = time.monotonic() - started
    events = panel.events - events_before
    # Each job makes two or three events (queued unless it started at once, running, finished),
    # plus slaves_changed.
    assert events >= 2 * n
    assert len(option_syncs) == panel.renders["jobs"] - renders_before
    # At most one re-render per flush interval, however many events came in it
    # (how many events share a flush depends on how fast the cluster runs them).
    assert len(option_syncs) <= elapsed / panel_mod.FLUSH_INTERVAL + 3, (len(option_syncs), elapsed)
    assert len(option_syncs) < events / 2, (len(option_syncs), events)
    assert all(icon(panel, j.id) == "✅" for j in jobs[-panel.page_size:])


def test_close_unsubscribes_and_closes_widgets(make_panel, client):
    p = make_panel()
    job = client.submit("print(1)").wait(T)
    wait_for(lambda: icon(p, job.id) == "✅", T, "listed")
    flusher = [t for t in threading.enumerate() if t.name == "distexec-panel-flush"]
    p.close()
    events = p.events
    client.submit("print(2)").wait(T)
    assert p.events == events
    assert p.job_list.comm is None and p.run_button.comm is None and p.comm is None
    assert sum(t.is_alive() for t in threading.enumerate() if t.name == "distexec-panel-flush") < len(flusher)
    p.close()  # twice is harmless


def test_master_restart_shows_disconnected_then_reloads(panel, client, cluster):
    done = client.submit("print('before')").wait(T)
    wait_for(lambda: icon(panel, done.id) == "✅", T, "listed")
    cluster.master.stop()
    wait_for(lambda: "disconnected" in panel.title.value, T, "🔴 in the title")
    panel.refresh_button.click()  # a user trying while it is down: told, not raised
    wait_for(lambda: panel.message.value.startswith("⚠ refresh"), T, "the refresh failure shown")
    cluster.start_master()
    wait_for(lambda: "🟢 connected" in panel.title.value, T, "🟢 again")
    assert "reconnected" in panel.message.value  # the stale failure is not left standing
    wait_for(lambda: all(cell(s.uid) in text(panel.cluster_view.slaves) for s in cluster.slaves), T,
             "the slaves back in the cluster view")
    # The history survived the restart, and new events flow again.
    after = client.submit("print('after')").wait(T)
    wait_for(lambda: icon(panel, after.id) == "✅" and icon(panel, done.id) == "✅", T, "both listed")


def test_clients_table_counts_submissions_live_and_names_one_identity(panel, client):
    view = panel.cluster_view
    me = next(c for c in client.clients() if c["id"] == client.client_id)
    wait_for(lambda: cell(client.client_id) in text(view.clients), T, "this client listed")
    row = lambda: re.search(rf"<tr><td style='text-align:left'>{client.client_id}</td>.*?</tr>", text(view.clients))
    assert row().group(0).endswith(f"{cell(str(me['jobs_submitted']))}</tr>")
    job = client.submit("print('counted')", name="counted").wait(T)
    # No reload: the master's clients_changed brings the new count.
    wait_for(lambda: row().group(0).endswith(f"{cell(str(me['jobs_submitted'] + 1))}</tr>"), T,
             "jobs submitted + 1 in the Cluster tab")
    # The job's client reads as the Cluster tab lists it, and as the title names this panel.
    assert job.user == me["user"]
    panel.job_list.value = job.id
    identity = f"{client.client_id} · {me['user']}"
    wait_for(lambda: f"<th>client</th><td>{identity}</td>" in text(panel.detail.header), T, "the detail")
    assert f"client {identity}" in text(panel.title)
    assert cell(me["user"]) in row().group(0)


def test_edit_of_a_job_that_ran_with_the_default_timeout_keeps_the_default(panel, client):
    job = client.submit("print('plain')").wait(T)
    assert job.timeout == P.DEFAULT_TIMEOUT  # the master filled it in
    wait_for(lambda: job.id in rows(panel), T, "listed")
    assert "(unnamed)" in rows(panel)[job.id]
    panel.editor.timeout.value = 42.0
    panel.job_list.value = job.id
    panel.detail.edit_button.click()
    wait_for(lambda: panel.editor.source.value == "print('plain')", T, "loaded into the editor")
    assert panel.editor.timeout.value == 0.0 and panel.editor.name.value == ""


def test_a_group_shows_as_one_row_and_cancelling_it_cancels_the_group(panel, client):
    from distexec_kernel.panel_model import group_value
    group = client.map("import time, sys\ntime.sleep(60)\n", range(6), name="panel-sweep")
    row = group_value(group.id)
    wait_for(lambda: row in rows(panel), T, "the group's row")
    assert rows(panel)[row].startswith("▸ group " + group.id) and "0/6 done" in rows(panel)[row]
    assert not any(v in rows(panel) for v in (j.id for j in group))  # its jobs folded into the one row
    panel.job_list.value = row  # a click on the row
    wait_for(lambda: all(j.id in rows(panel) for j in group), T, "the group opened to its jobs")
    header = text(panel.detail.header)
    assert f"group {group.id}" in header and "6 jobs" in header
    assert not panel.detail.cancel_button.disabled
    panel.detail.cancel_button.click()
    assert group.wait(T, progress=False).counts() == {P.CANCELLED: 6}
    wait_for(lambda: "🚫 6" in rows(panel)[row] and panel.detail.cancel_button.disabled, T, "the row cancelled")


def test_the_detail_lists_collected_files_and_shows_images(panel, client):
    png = ("import base64\nopen('dot.png', 'wb').write(base64.b64decode("
           "'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='))\n"
           "open('notes.txt', 'w').write('n')\n")
    job = client.submit(png, collect=["*.png", "*.txt"]).wait(60)
    assert {a["name"] for a in job.artifacts} == {"dot.png", "notes.txt"}
    wait_for(lambda: job.id in rows(panel), T, "the job's row")
    panel.job_list.value = job.id
    wait_for(lambda: "<img" in panel.detail.header.value, T, "the image in the detail")
    header = panel.detail.header.value
    assert "data:image/png;base64,iVBOR" in header and "notes.txt" in header and header.count("<img") == 1


def test_a_language_set_before_or_without_a_slave_for_it_is_kept_and_marked(client):
    # A notebook sets the editor's language right after making the panel, while the slaves' languages
    # load in the background: the dropdown refused ("Invalid selection") whatever was not listed yet.
    p = JobPanel(client)
    try:
        p.editor.language.value = "cobol"  # no slave runs it, loaded or not
        assert p.editor.language.value == "cobol"
        assert ("cobol (no slave runs it now)", "cobol") in p.editor.language.options
        p.editor.language.value = "python"
        wait_for(lambda: any(v == "python" and "no slave" not in label for label, v in p.editor.language.options),
                 T, "languages loaded")
        assert p.editor.language.value == "python"
    finally:
        p.close()


def test_a_panel_whose_login_is_removed_says_it_was_refused(make_cluster, make_panel, tmp_path):
    from master import auth

    from conftest import users_json
    users = users_json(tmp_path, "alice")
    # A history of its own: the panel's module cluster may have taken this home's first (one master per history).
    lc = make_cluster(1, slots=1, languages="python",
                      master_args=["--users", users, "--db", str(tmp_path / "own-history.sqlite3")])
    alice = Cluster(lc.url, user="alice", password="alice-pw")
    try:
        p = make_panel(alice)
        assert "🟢 connected" in p.title.value
        auth.remove_user(users, "alice")  # the master closes her channel at its next check; no way back
        wait_for(lambda: "refused this panel's connection" in p.message.value, T, "the refusal in the panel")
        assert "🔴 refused" in p.title.value and "reconnecting" not in p.title.value
    finally:
        alice.close()
