"""The example notebooks, and the magic inside a real kernel.

Every notebook in notebooks/ is executed top to bottom with nbclient in a
real ``python3`` kernel against a real local cluster, found through the
connection file (the kernel inherits DISTEXEC_HOME), and its outputs are
checked.  The kernel tests below drive ipykernel directly to check what
only a kernel shows: output routed to the cell that ran it, a failed job
failing the execute reply, a kernel interrupt cancelling the job, a
--no-wait status widget updated from the event thread, and what a notebook
executed by nbclient saves of widgets the event thread changed between cells.
"""
from __future__ import annotations

import os
import queue
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbclient.util import run_sync

from distexec_kernel import Cluster, protocol as P

from conftest import HOLD, SHOWN_IN_PLACE, UNTIL_RELEASED, module_cluster, release_jobs, visible_outputs, wait_for

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
# The notebooks of the python3 kernel; those of our own kernels (kernelspec
# distexec-*) are run by tests/test_kernels.py.
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")
                   if not nbformat.read(p, as_version=4).metadata.get("kernelspec", {})
                   .get("name", "").startswith("distexec-"))


def kernel_env(home) -> dict:
    env = dict(os.environ)
    env["DISTEXEC_HOME"] = str(home)
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET"):
        env.pop(var, None)
    # The kernel must be this venv's Python, whatever is first on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # And import the code under test: the venv's editable install may point at another checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def execute(nb, home, cwd, **kwargs):
    client = NotebookClient(nb, timeout=120, startup_timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}, **kwargs)
    return client.execute(env=kernel_env(home))


def text_of(cell) -> str:
    """Everything a cell showed, as text: streams, plain-text results, error tracebacks."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", "") + "\n")
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback) + "\n")
    return "".join(parts)


def cell(nb, startswith: str):
    matches = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith)]
    assert len(matches) == 1, f"{len(matches)} cells start with {startswith!r}"
    return matches[0]


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
STATUS_OK = re.compile(r"✅ job \d+ · (\w+) · slave \S+… · \d+\.\d+ s")


def check_quickstart(nb, cluster: Cluster) -> None:
    assert "2 slave(s)" not in text_of(cell(nb, "%remote slaves"))  # a table, not a connect message
    assert all(s["uid"] in text_of(cell(nb, "%remote slaves")) for s in cluster.slaves())
    hello = text_of(cell(nb, "%%remote --name hello"))
    assert re.search(r"^hello from \S+, process \d+$", hello, re.M) and STATUS_OK.search(hello)
    assert text_of(cell(nb, "%%remote --name countdown")).startswith("5\n4\n3\n2\n1\nliftoff\n")
    assert "the answer is 42\n" in text_of(cell(nb, "%%remote --arg 6"))
    assert re.search(r"^bash \d+\.\d+", text_of(cell(nb, "%%remote bash")), re.M)
    assert STATUS_OK.search(text_of(cell(nb, "%%remote bash"))).group(1) == "bash"
    assert "2 3 5 7 11 13 17 19 23 29\n" in text_of(cell(nb, "%remote run primes.py"))
    assert "2 3 5 7 11\n" in text_of(cell(nb, "%%remote --file primes.py"))
    # Shown as 🕓/⏳ when the cell ran; saved as it ended, as a later cell waited for it (live.py).
    assert STATUS_OK.match(text_of(cell(nb, "%%remote --no-wait -o slow")))
    assert re.search(r"still (queued|running)", text_of(cell(nb, "print('this cell ran")))
    assert "succeeded 'slow job done\\n'" in text_of(cell(nb, "slow.wait("))
    assert "stored 10 squares\n" in text_of(cell(nb, "%%remote --session demo\ndata ="))
    assert "still here: their sum is 285\n" in text_of(cell(nb, "%%remote --session demo\nprint("))
    [listing] = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() == "%remote sessions"]
    sessions = text_of(listing)
    assert re.search(r"^demo +\S+ +\S+ +python .* 2$", sessions, re.M), sessions
    ended = text_of(cell(nb, "%remote sessions --end demo"))
    assert ended.startswith("ended session demo\n") and not re.search(r"^demo ", ended, re.M), ended
    history = text_of(cell(nb, "%remote jobs"))
    ids = [int(m) for m in re.findall(r"^\S+\s+(\d+)\s", history, re.M)]
    assert len(ids) >= 5 and ids == sorted(ids, reverse=True)
    assert "fails-on-purpose" not in history  # it had not run yet
    assert "slow job done" in text_of(cell(nb, "%remote show"))
    assert re.search(r"^succeeded 42 \w+", text_of(cell(nb, "from distexec_kernel import Cluster")), re.M)
    fail = cell(nb, "%%remote --name fails-on-purpose")
    errors = [o for o in fail.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "RemoteJobFailed"
    assert "about to fail" in text_of(fail) and "nonzero_exit" in text_of(fail)
    assert "Traceback" not in text_of(fail) and "magic.py" not in text_of(fail)
    last = cluster.jobs(limit=1)[0]
    assert last.name == "fails-on-purpose" and last.status == P.FAILED


def check_multilang(nb, cluster: Cluster) -> None:
    languages = text_of(cell(nb, "from distexec_kernel import Cluster"))
    for lang in cluster.languages():
        assert re.search(rf"^{lang['name']} +\S+ +on 1 slave", languages, re.M) is None  # two slaves here
        assert re.search(rf"^{lang['name']} +\S+ +on 2 slave\(s\)$", languages, re.M), lang
    seen = set()
    for c in nb.cells:
        if c.cell_type == "code" and c.source.startswith("%%remote ") and "--arg 100" in c.source:
            out = text_of(c)
            lang, value = re.match(r"(\w+): (\d+)\n", out).groups()
            assert value == "338350", out
            assert STATUS_OK.search(out).group(1) == lang
            seen.add(lang)
    assert {"python", "bash"} <= seen and len(seen) >= 3
    compare = text_of(cell(nb, "programs = {"))
    assert "all agree: True -> 333833500" in compare
    for lang in seen:
        assert f"'{lang}': '333833500'" in compare
    broken = cell(nb, "%%remote c\n#include <stdio.h>\n\nint main(void)")
    out = text_of(broken)
    assert "compile_error" in out and re.search(r"main\.c:4:\d+: error: expected .;.", out), out
    assert [o.ename for o in broken.outputs if o.output_type == "error"] == ["RemoteJobFailed"]


def check_fanout(nb, cluster: Cluster) -> None:
    assert "2 slaves, 4 slots in all" in text_of(nb.cells[1])
    submitted = re.search(r"group (g\d+): 32 jobs submitted", text_of(cell(nb, "PI_JOB = ")))
    assert submitted, text_of(cell(nb, "PI_JOB = "))
    collected = text_of(cell(nb, "shares = "))
    estimate = re.search(r"collected 32 results: pi ≈ (\d\.\d+)", collected)
    assert estimate and abs(float(estimate.group(1)) - 3.1416) < 0.02
    assert "✅ 32 · ❌ 0 · 🚫 0 · 32 jobs" in collected
    assert "{10: 45, 100: 4950, 1000: 499500, 10000: 49995000, 100000: 4999950000}" in \
        text_of(cell(nb, "print(dict(zip(sizes"))
    assert "✅ 5 · ❌ 0 · 🚫 0 · 5 jobs" in text_of(cell(nb, "%%remote --map sizes -o sums"))
    flaky = text_of(cell(nb, "FLAKY = "))
    assert "✅ 12 · ❌ 4 · 🚫 0 · 16 jobs" in flaky
    assert "[1, 4, 9, RemoteError(" in flaky
    assert "nonzero_exit, stderr '4 is a multiple of 4'" in flaky
    failing = cell(nb, "%%remote --map sizes\n")
    assert [o.ename for o in failing.outputs if o.output_type == "error"] == ["RemoteGroupFailed"]
    assert "10000 is too many" in text_of(failing)
    assert "{'cancelled': 8}" in text_of(cell(nb, "sleepers = "))
    pi_jobs = cluster.jobs_page(group=submitted.group(1), limit=100)[0]
    assert len(pi_jobs) == 32 and all(j["status"] == P.SUCCEEDED for j in pi_jobs)
    assert len({j["slave_uid"] for j in pi_jobs}) == 2, "the jobs did not fan out over both slaves"


def check_panel(nb, cluster: Cluster) -> None:
    # Only the magic's part; the panel's own behaviour is tested with the panel.
    shown = [o for o in cell(nb, "%remote panel").outputs if o.output_type == "display_data"]
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0].data


def check_rich(nb, cluster: Cluster) -> None:
    # Only what the notebook itself showed: the cluster's history may hold anything.
    import base64

    def shown(c) -> list[dict]:
        return [o.data for o in c.outputs if o.output_type == "display_data"]

    png = b"\x89PNG\r\n\x1a\n"
    figure = shown(cell(nb, "%%remote --session plots\n%matplotlib inline"))
    assert [base64.b64decode(d["image/png"])[:8] for d in figure if "image/png" in d] == [png], figure
    assert STATUS_OK.search(figure[-1]["text/plain"])
    frame = cell(nb, "%%remote --session plots\nimport pandas")
    table = [d for d in shown(frame) if "<table" in d.get("text/html", "")]
    assert len(table) == 1 and "sin x" in table[0]["text/html"]
    # As a local cell: the HTML table alone, not the text table streamed above it too.
    assert [o.output_type for o in frame.outputs] == ["display_data", "display_data"], frame.outputs
    assert "distexec" not in frame.outputs[0].metadata  # where it came in stdout: ours, not shown
    stats = cell(nb, "%%remote --file data/")
    assert "500 values, mean 10." in text_of(stats) and "out/summary.csv" in text_of(stats)
    made = cell(nb, "%%remote --session plots --file data/")
    images = [d for d in shown(made) if "image/png" in d]
    assert len(images) == 1 and base64.b64decode(images[0]["image/png"])[:8] == png
    assert "histogram.png" in images[0]["text/plain"]
    listing = text_of(cell(nb, "print(stats.artifact("))
    assert re.search(r"^count,mean,stdev\n500,10\.\d+,", listing, re.M), listing
    assert re.search(r"^histogram\.png \d+ image/png$", listing, re.M), listing
    assert "starts with b'\\x89PNG'" in listing, listing
    assert text_of(cell(nb, "%remote sessions --end plots")).startswith("ended session plots\n")


CHECKS = {"quickstart.ipynb": check_quickstart, "multilang.ipynb": check_multilang,
          "fanout.ipynb": check_fanout, "panel.ipynb": check_panel, "rich.ipynb": check_rich}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, cluster, home, tmp_path):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{name} is committed with outputs: clear them"
    execute(nb, home, tmp_path)
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        assert c.execution_count is not None, c.source
        if "raises-exception" not in c.metadata.get("tags", []):
            assert not [o for o in c.outputs if o.output_type == "error"], text_of(c)
    with Cluster(cluster.url, token=cluster.token) as c:
        check = CHECKS.get(name)
        if check is not None:
            check(nb, c)


def test_a_failed_job_stops_run_all(cluster, home, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext distexec_kernel"),
        nbformat.v4.new_code_cell("%%remote\nimport sys\nprint('remote trouble', file=sys.stderr)\nsys.exit(2)"),
        nbformat.v4.new_code_cell("print('must not run')"),
    ])
    with pytest.raises(CellExecutionError) as info:
        execute(nb, home, tmp_path)
    assert info.value.ename == "RemoteJobFailed"
    assert "nonzero_exit" in str(info.value)
    failed = nb.cells[1]
    assert "remote trouble" in text_of(failed)
    assert [o.ename for o in failed.outputs if o.output_type == "error"] == ["RemoteJobFailed"]
    assert nb.cells[2].execution_count is None and not nb.cells[2].outputs

    # With allow_errors the rest still runs: the failure is an ordinary cell error.
    nb2 = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.source) for c in nb.cells])
    execute(nb2, home, tmp_path, allow_errors=True)
    assert "must not run" in text_of(nb2.cells[2])


# -- a kernel, driven message by message -------------------------------------------


# One cluster for the kernel tests (each notebook above gets its own, for a clean history).
kernel_cluster = module_cluster("kernel", 2, slots=2)


@pytest.fixture(scope="module")
def kernel(kernel_cluster):
    """A python3 kernel with the extension loaded, shared by the kernel tests (a start costs seconds)."""
    km, kc = start_new_kernel(kernel_name="python3", env=kernel_env(kernel_cluster.home),
                              cwd=kernel_cluster.home)
    try:
        reply = kc.execute_interactive("%load_ext distexec_kernel", timeout=60)
        assert reply["content"]["status"] == "ok"
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_in(kc, code: str, timeout: float = 30.0):
    """Execute ``code``; its iopub messages (with arrival times) up to idle, and its reply."""
    return collect(kc, kc.execute(code), timeout)


def collect(kc, msg_id: str, timeout: float = 30.0, until=None):
    """The cell's iopub messages up to idle, and its reply; or, with ``until``, up to the first message
    ``until`` accepts, and no reply."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no idle for {msg_id} within {timeout} s; got {got}")
        if msg["parent_header"].get("msg_id") != msg_id:
            continue  # e.g. a status widget of an earlier cell updating
        got.append((time.time(), msg))
        if until is not None and until(msg):
            return got, None
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["parent_header"]["msg_id"] == msg_id
    return got, reply


def test_kernel_streams_output_live_into_the_running_cell(kernel, kernel_cluster):
    km, kc = kernel
    msg_id = kc.execute("%%remote --name live\n" + HOLD + "for i in range(2):\n    print('tick', i, flush=True)\n"
                        + UNTIL_RELEASED + "for i in range(2, 4):\n    print('tick', i, flush=True)\n")
    # The job waits until its first ticks are in the cell: only live output lets it end.
    shown, _ = collect(kc, msg_id, until=lambda m: m["msg_type"] == "stream" and "tick 1" in m["content"]["text"])
    release_jobs(*(s.proc.pid for s in kernel_cluster.slaves))
    rest, reply = collect(kc, msg_id)
    msgs = shown + rest
    assert reply["content"]["status"] == "ok"
    # run_in kept only messages with this cell's parent header: all the output landed in this cell.
    streams = [(t, m) for t, m in msgs if m["msg_type"] == "stream"]
    assert "".join(m["content"]["text"] for _, m in streams) == "tick 0\ntick 1\ntick 2\ntick 3\n"
    status = [(t, m) for t, m in msgs if m["msg_type"] == "display_data"]
    assert len(status) == 1
    assert STATUS_OK.match(status[0][1]["content"]["data"]["text/plain"])
    assert not [m for _, m in shown if m["msg_type"] == "display_data"], "the status line came before the output"


def test_a_session_cells_rich_outputs_show_in_place_without_their_text(kernel, kernel_cluster):
    km, kc = kernel
    msgs, reply = run_in(kc, "%%remote --session in-place\n" + SHOWN_IN_PLACE, timeout=120)
    assert reply["content"]["status"] == "ok"
    shown = visible_outputs([m for _, m in msgs])
    assert [(kind, item if kind == "stdout" else item["text/plain"][:1] if "✅" in item["text/plain"]
             else item["text/html"])
            for kind, item in shown] == [("stdout", "before\n"), ("display_data", "<b>html table</b>"),
                                         ("stdout", "after\n"), ("display_data", "<b>html table</b>"),
                                         ("display_data", "✅")], shown
    # Terminals and plain clients still read the text in stdout.
    with Cluster(kernel_cluster.url, token=kernel_cluster.token) as c:
        [record] = c.jobs_page(limit=1)[0]
        assert c.job(record["id"]).stdout == "before\nTEXT TABLE\nafter\nTEXT TABLE\n"
        c.end_session("in-place")


def test_a_groups_bar_is_red_when_a_job_failed_and_green_when_all_succeeded(kernel):
    km, kc = kernel

    def styles(code: str) -> list[str]:
        msgs, _ = run_in(kc, code, timeout=120)
        return [m["content"]["data"]["state"]["bar_style"] for _, m in msgs if m["msg_type"] == "comm_msg"
                and "bar_style" in m["content"]["data"].get("state", {})]

    run_in(kc, "items = [0, 1, 2]")
    assert styles("%%remote --map items\nimport sys\nsys.exit(int(sys.argv[1]) == 1)\n")[-1] == "danger"
    assert styles("%%remote --map items\nimport sys\nprint(sys.argv[1])\n")[-1] == "success"


def test_kernel_failed_job_gives_an_error_reply(kernel):
    km, kc = kernel
    msgs, reply = run_in(kc, "%%remote\nprint(undefined_name)\n")
    errors = [m for _, m in msgs if m["msg_type"] == "error"]
    assert len(errors) == 1 and errors[0]["content"]["ename"] == "RemoteJobFailed"
    assert "nonzero_exit" in "\n".join(errors[0]["content"]["traceback"])
    stderr = "".join(m["content"]["text"] for _, m in msgs
                     if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
    assert "NameError" in stderr
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "RemoteJobFailed"
    assert reply["content"]["traceback"] == errors[0]["content"]["traceback"]


def test_kernel_interrupt_cancels_the_job(kernel, kernel_cluster):
    km, kc = kernel
    with Cluster(kernel_cluster.url, token=kernel_cluster.token) as master:
        msg_id = kc.execute("%%remote --name sleeper --timeout 60\nimport time\n"
                            "print('sleeping', flush=True)\ntime.sleep(60)\n")
        # From this thread: jupyter_client's sync calls leave an event loop behind in any other.
        wait_for(lambda: any(j.name == "sleeper" and j.status == P.RUNNING for j in master.jobs(limit=5)),
                 what="the job to run")
        km.interrupt_kernel()
        msgs, reply = collect(kc, msg_id)
        assert reply["content"]["status"] == "error"
        tb = "\n".join(line for _, m in msgs if m["msg_type"] == "error" for line in m["content"]["traceback"])
        assert "cancelled on the master" in tb
        job = next(j for j in master.jobs(limit=5) if j.name == "sleeper")
        assert master.job(job.id).wait(timeout=20).status == P.CANCELLED


def test_kernel_no_wait_widget_updates_after_the_cell_ended(kernel, kernel_cluster):
    km, kc = kernel
    t0 = time.monotonic()
    msgs, reply = run_in(kc, "%%remote --no-wait -o h\n" + HOLD + UNTIL_RELEASED + "print('late')\n")
    assert reply["content"]["status"] == "ok"
    # The job is held until released below: a cell that waited for it would not be back at all.
    assert time.monotonic() - t0 < 15, "the cell waited for the job"
    release_jobs(*(s.pid for s in kernel_cluster.slaves))
    shown = [m for _, m in msgs if m["msg_type"] == "display_data"]
    assert len(shown) == 1
    model_id = shown[0]["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    # The event thread sets the widget's value: the front end gets comm updates after the cell ended.
    deadline = time.monotonic() + 30
    values = []
    while not any("✅" in v for v in values):
        assert time.monotonic() < deadline, f"no ✅ update; saw {values}"
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        data = msg["content"].get("data", {})
        if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == model_id \
                and data.get("method") == "update" and "value" in data.get("state", {}):
            values.append(data["state"]["value"])
    assert "job" in values[-1]
    msgs, reply = run_in(kc, "print(h.wait(timeout=20).stdout)")
    assert reply["content"]["status"] == "ok"
    assert "late\n\n" in [m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream"]


def test_a_live_line_that_missed_its_end_event_ends_with_the_cell_that_waited(kernel, kernel_cluster):
    """The status line of a ``--no-wait`` job hears its end from the events; when it missed that event
    (the channel was down as the job ended), a later cell that waits for the handle brings the end:
    at that cell's end the line is caught up from the handle (``show_job``'s catch_up).  The missed
    event made certain: the line's listener is taken off before the job is released."""
    km, kc = kernel
    msgs, reply = run_in(kc, "%%remote --no-wait -o deaf\n" + HOLD + UNTIL_RELEASED + "print('ended')\n")
    assert reply["content"]["status"] == "ok"
    [shown] = [m for _, m in msgs if m["msg_type"] == "display_data"]
    model_id = shown["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    msgs, reply = run_in(kc, "lines = [f for f in deaf._cluster._listeners\n"
                             "         if f.__qualname__.endswith('show_job.<locals>.on_event')]\n"
                             "for f in lines:\n"
                             "    deaf._cluster._listeners.remove(f)\n"
                             "print(len(lines))")
    assert [m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream"] == ["1\n"], msgs
    release_jobs(*(s.pid for s in kernel_cluster.slaves))
    msgs, reply = run_in(kc, "print(deaf.wait(timeout=20).status)")
    assert reply["content"]["status"] == "ok"
    assert [m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream"] == ["succeeded\n"], msgs
    # Sent within that cell (its end's sync), so collect() saw it among the cell's messages.
    values = [m["content"]["data"]["state"]["value"] for _, m in msgs
              if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
              and "value" in m["content"]["data"].get("state", {})]
    assert values and "✅" in values[-1], values
    texts = [m["content"]["data"]["text/plain"] for _, m in msgs if m["msg_type"] == "update_display_data"]
    assert texts and texts[-1].startswith("✅"), texts


def test_a_saved_notebook_shows_the_widgets_as_they_ended(kernel_cluster, tmp_path):
    """What ``jupyter nbconvert --execute`` saves: nbclient keeps a widget's state from the messages of the
    cell it runs, and a reader without widgets (GitHub, an HTML export) sees the output's text.  A job's
    status line and a panel that the event thread brought to ✅ while no cell ran must still be saved as
    ✅, with the job's slave and output; and a map's bar as full, not at its first 0%."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in (
        "%load_ext distexec_kernel",
        "%%remote --no-wait --name saved-view -o h\n" + HOLD + UNTIL_RELEASED + "print('late output')\n",
        "import time\nfrom distexec_kernel import Cluster, JobPanel\n"
        "panel = JobPanel(Cluster())\npanel.text_filter.value = 'saved-view'\npanel.select(h.id)\n"
        "deadline = time.monotonic() + 60\n"
        "while not ([label[0] for label, _ in panel.job_list.options] == ['⏳'] and '⏳' in panel.detail.header.value):\n"
        "    assert time.monotonic() < deadline, panel.job_list.options\n"
        "    time.sleep(0.05)\n"
        "panel",
        "print(h.status)",
        "items = [1, 2, 3]",
        "%%remote --map items\nimport sys\nprint(sys.argv[1])\n",
    )])
    client = NotebookClient(nb, timeout=120, startup_timeout=60, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel(env=kernel_env(kernel_cluster.home)):
        for index in range(3):
            client.execute_cell(nb.cells[index], index)
        [status] = [o for o in nb.cells[1].outputs if o.output_type == "display_data"]
        status_id = status.data[WIDGET_VIEW]["model_id"]
        assert re.match(r"⏳ job \d+", status.data["text/plain"])
        # The job ends between two cells: its updates come while no cell runs.  Read here, they are
        # the ones nbclient would have dropped (not the running cell's), and prove that they came.
        release_jobs(*(s.pid for s in kernel_cluster.slaves))
        seen = {"status": False, "row": False, "stdout": False}
        deadline = time.monotonic() + 30
        while not all(seen.values()):
            assert time.monotonic() < deadline, f"the event thread's updates did not all come: {seen}"
            try:
                msg = run_sync(client.kc.iopub_channel.get_msg)(timeout=1)
            except queue.Empty:
                continue
            state = msg["content"].get("data", {}).get("state", {}) if msg["msg_type"] == "comm_msg" else {}
            seen["status"] |= msg["content"].get("comm_id") == status_id and "✅" in str(state.get("value"))
            seen["row"] |= any(label.startswith("✅") for label in state.get("_options_labels", ()))
            seen["stdout"] |= str(state.get("value")).startswith("<pre>late output")
        for index in range(3, len(nb.cells)):
            client.execute_cell(nb.cells[index], index)
        client.set_widgets_metadata()
    assert text_of(nb.cells[3]) == "succeeded\n"
    widgets = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]

    def saved(model_id: str) -> dict:
        return widgets[model_id]["state"]

    def tree(model_id: str):
        yield saved(model_id)
        for child in saved(model_id).get("children", ()):
            yield from tree(child.removeprefix("IPY_MODEL_"))

    with Cluster(kernel_cluster.url, token=kernel_cluster.token) as c:
        job = c.jobs(limit=20)
        job = next(j for j in job if j.name == "saved-view")
        assert job.status == P.SUCCEEDED
        slave = job.slave_uid[:8]
    # The status line: its widget, and the text beside it, as it ended.
    [status] = [o for o in nb.cells[1].outputs if o.output_type == "display_data"]
    assert "✅" in saved(status_id)["value"] and slave in saved(status_id)["value"]
    assert STATUS_OK.match(status.data["text/plain"]) and slave in status.data["text/plain"], status.data
    assert "✅" in status.data["text/html"] and "⏳" not in status.data["text/html"]
    # The panel: its row and its detail in the saved state, its row in the text.
    [shown] = [o for o in nb.cells[2].outputs if WIDGET_VIEW in o.get("data", {})]
    panel = list(tree(shown.data[WIDGET_VIEW]["model_id"]))
    rows = [label for w in panel for label in w.get("_options_labels", ()) if "saved-view" in label]
    assert len(rows) == 1 and rows[0].startswith("✅") and slave in rows[0], rows
    assert any(w.get("value", "").startswith("<pre>late output") for w in panel if w.get("_model_name") == "HTMLModel")
    assert re.search(rf"^✅ ok +{job.id} +saved-view .*{slave}", shown.data["text/plain"], re.M), shown.data
    assert "⏳" not in shown.data["text/plain"]
    # The map's bar: full in the text too, not at its first 0%.
    [bar] = [o for o in nb.cells[5].outputs if o.output_type == "display_data" and WIDGET_VIEW in o.data]
    assert "3/3" in bar.data["text/plain"] and "✅ 3" in bar.data["text/plain"], bar.data
    assert [w["value"] for w in tree(bar.data[WIDGET_VIEW]["model_id"]) if w.get("_model_name") == "FloatProgressModel"] == [3.0]


def test_a_panel_on_screen_is_not_redrawn_but_its_saved_text_follows_once_none_shows_it(kernel, kernel_cluster):
    """Updating a display's text makes a front end re-render the widget's view (and ipywidgets 8 keeps the old
    view updating, detached): the panel's text follows at a cell's end only while no front end shows it."""
    km, kc = kernel

    def front_end_views(model_id: str, count: int) -> None:
        # What a front end sends as it shows or removes a view of a model whose views it counts.
        kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": model_id, "data": {
            "method": "update", "state": {"_view_count": count}, "buffer_paths": []}}))

    def redrawn(msgs, display_id: str) -> list[str]:
        return [m["content"]["data"]["text/plain"] for _, m in msgs if m["msg_type"] == "update_display_data"
                and m["content"]["transient"]["display_id"] == display_id]

    msgs, reply = run_in(kc, "from distexec_kernel import Cluster, JobPanel\nshown = JobPanel(Cluster())\n"
                             "shown.text_filter.value = 'on-screen'\nshown")
    assert reply["content"]["status"] == "ok"
    [shown] = [m["content"] for _, m in msgs if m["msg_type"] == "display_data"]
    model_id, display_id = shown["data"][WIDGET_VIEW]["model_id"], shown["transient"]["display_id"]
    front_end_views(model_id, 1)
    # Within the cell, the panel's flusher (its own thread) shows the job's end: a change while a front end
    # shows the panel.
    msgs, reply = run_in(kc, "done = Cluster().submit('print(1)', name='on-screen').wait(timeout=30)\n"
                             "import time\ndeadline = time.monotonic() + 30\n"
                             "while not any(label.startswith('✅') for label, _ in shown.job_list.options):\n"
                             "    assert time.monotonic() < deadline, shown.job_list.options\n"
                             "    time.sleep(0.02)")
    assert reply["content"]["status"] == "ok" and not redrawn(msgs, display_id)
    msgs, _ = run_in(kc, "pass")
    assert not redrawn(msgs, display_id)
    front_end_views(model_id, 0)
    msgs, _ = run_in(kc, "pass")
    [text] = redrawn(msgs, display_id)
    assert re.search(r"^✅ ok +\d+ +on-screen ", text, re.M), text
    run_in(kc, "shown.close()")
