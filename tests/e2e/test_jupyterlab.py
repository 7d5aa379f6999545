"""Every example notebook, run in JupyterLab in headless Chromium, and what it renders.

One local cluster (with history in it before anything opens), one
JupyterLab and one browser serve the whole module.  Each notebook in
notebooks/ is opened in the kernel its metadata names and run with Run
All; then what the page shows is checked: no error output except in cells
tagged ``raises-exception``, the ``%%remote`` output streaming and its ✅
line, the panel live and clickable, the theme followed, and no job's
output ever running as script.  Screenshots go to tests/e2e/screenshots/
(kept by CI; the README's come from there).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import playwright.sync_api as playwright_api
import pytest

from distexec_kernel import Cluster
from distexec_kernel.local import LocalCluster

from conftest import HOLD, UNTIL_RELEASED, assert_gone, release_jobs
from lab_browser import (CHROMIUM, CLOSE_CURRENT, NOTEBOOK_JSON, OPEN_NOTEBOOK, RUN_ALL, RUN_FROM, SET_THEME, WAIT_RUN,
                         JupyterLab,
                         copy_notebooks, kernel_needed, launch_browser)

expect = playwright_api.expect

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
SHOTS = Path(__file__).resolve().parent / "screenshots"

# Markup that would run script if a job's text were put into the page as HTML.
XSS = "<script>window.__distexecXss='script'</script><img src=x onerror=\"window.__distexecXss='img'\">"
T = 60_000  # ms: generous, for a 2-core machine shared with the cluster and the kernels


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The cluster (with some history), JupyterLab, and one Chromium page, all stopped at the end."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no {CHROMIUM}: scripts/setup.sh installs Debian's chromium (scripts/apt-packages-tests.txt)")
    work = tmp_path_factory.mktemp("e2e")
    home = work / "distexec-home"
    home.mkdir()
    cluster = LocalCluster(2, slots=2, home=str(home), log_dir=str(work / "logs"), wait_complete=True).start()
    server = browser = pw = None
    try:
        with Cluster(cluster.url, token=cluster.token) as c:
            # History the notebooks must cope with: a name like theirs, an unnamed job, and markup.
            history = [c.submit("print('from before')", name="square 7"), c.submit("print(1)"),
                       c.submit(f"print({XSS!r})", name=XSS)]
            for job in history:
                job.wait(60)
        notebooks = work / "notebooks"
        copy_notebooks(REPO / "notebooks", notebooks)
        env = {k: v for k, v in os.environ.items()
               if k not in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET")}
        env["DISTEXEC_HOME"] = str(home)
        server = JupyterLab(notebooks, work / "jupyter", env)
        server.wait_ready()
        pw = playwright_api.sync_playwright().start()
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.url}/lab?token={server.token}")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started", timeout=T)
        page.evaluate("async () => await window.jupyterapp.started")
        SHOTS.mkdir(exist_ok=True)
        yield {"page": page, "errors": errors, "server": server, "cluster": cluster, "notebooks": notebooks,
               "xss_job": history[-1].id}
    finally:
        leftovers = []
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        if server is not None:
            leftovers = server.stop()
        cluster.stop()
        assert_gone(leftovers, "JupyterLab and its kernels")


@pytest.fixture(scope="module")
def client(lab):
    c = Cluster(lab["cluster"].url, token=lab["cluster"].token)
    yield c
    c.close()


def code_cell(page, text: str):
    """The cell whose source contains ``text``, as rendered."""
    return page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=text)).first


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def outputs_text(cell: dict, widgets: bool = True) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if not widgets and WIDGET_VIEW in out.get("data", {}):
            continue
        if out["output_type"] == "stream":
            parts.append("".join(out["text"]))
        elif out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
        else:
            parts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def run_notebook(lab, name: str, while_running=None) -> dict:
    """Open ``name`` in its kernel, Run All, and return the notebook as the page holds it afterwards."""
    page, server = lab["page"], lab["server"]
    needed = kernel_needed(lab["notebooks"] / name)
    available = server.kernelspecs()
    if needed not in available:
        pytest.fail(f"{name} needs the kernel {needed!r}, which is not installed here (have: "
                    f"{sorted(available)}); scripts/setup.sh must install it")
    assert page.evaluate(OPEN_NOTEBOOK, name) == needed
    page.evaluate(RUN_ALL)
    if while_running is not None:
        while_running(page)
    assert page.evaluate(WAIT_RUN) == "done"
    nb = page.evaluate(NOTEBOOK_JSON)
    for _ in range(len(nb["cells"])):
        stopped = _stopped_on_purpose(nb["cells"])
        if stopped is None:
            break
        page.evaluate(RUN_FROM, stopped)
        assert page.evaluate(WAIT_RUN) == "done"
        nb = page.evaluate(NOTEBOOK_JSON)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        assert cell["execution_count"] is not None, f"{name}: a cell did not run:\n{source}"
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        if "raises-exception" in cell["metadata"].get("tags", []):
            assert len(errors) == 1, f"{name}: the cell that fails on purpose did not fail:\n{source}"
        else:
            assert not errors, f"{name}: error output in\n{source}\n{outputs_text(cell)}"
    assert not lab["errors"], lab["errors"]
    return nb


def _stopped_on_purpose(cells: list[dict]) -> int | None:
    """The index to go on from if Run All stopped at a cell tagged to fail, else None."""
    last = None
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        if cell["execution_count"] is None:
            if last is not None and "raises-exception" in last["metadata"].get("tags", []) \
                    and any(o["output_type"] == "error" for o in last["outputs"]):
                return index
            return None
        last = cell
    return None


def xss_ran(page) -> str | None:
    return page.evaluate("() => window.__distexecXss || null")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_to_the_end(lab, name):
    page = lab["page"]
    streamed = []

    def watch_streaming(page):
        # The countdown prints a line every 0.3 s: some lines show while the cell still runs.
        cell = code_cell(page, "--name countdown")
        page.wait_for_function(
            """(el) => { const t = el.querySelector('.jp-OutputArea').innerText;
                         return t.includes('4') && !t.includes('liftoff'); }""",
            arg=cell.element_handle(timeout=T), timeout=T, polling=50)
        streamed.append(cell.locator(".jp-OutputArea").inner_text())

    nb = run_notebook(lab, name, watch_streaming if name == "quickstart.ipynb" else None)
    page.screenshot(path=str(SHOTS / f"{Path(name).stem}.png"), full_page=False)
    try:
        if name == "quickstart.ipynb":
            assert streamed and "liftoff" not in streamed[0]
            cell = code_cell(page, "--name countdown")
            expect(cell.locator(".jp-OutputArea")).to_contain_text("liftoff")
            status = cell.locator(".jp-OutputArea").inner_text()
            assert re.search(r"✅ job \d+ · python · slave \S+… · \d+\.\d+ s", status), status
            cell.scroll_into_view_if_needed()
            cell.screenshot(path=str(SHOTS / "remote-cell.png"))
        if name == "panel.ipynb":
            # What its cells print (a panel's own text lists the whole history, as the panel does).
            printed = "\n".join(outputs_text(c, widgets=False) for c in nb["cells"] if c["cell_type"] == "code")
            assert "from before" not in printed and "square 7" not in printed  # only its own jobs
            expect(page.locator(".distexec-panel").first).to_be_visible()
    finally:
        assert xss_ran(page) is None, "a job's output ran as script"
        if name != "panel.ipynb":  # the panel stays open for test_panel_in_the_browser
            page.evaluate(CLOSE_CURRENT)


def row(panel, job_id: int):
    """The list's row of job ``job_id`` (a row reads ``icon state id name …``)."""
    return panel.locator(".distexec-rows select option").filter(
        has_text=re.compile(rf"^\S+\s+\S+\s+{job_id}\s"))


def select_job(panel, job_id: int):
    """Click the row of job ``job_id`` in the panel's list.

    An option is chosen by its label, and a row's label changes with its job
    (state, elapsed time): if it changed between reading and clicking, read
    it again.
    """
    expect(row(panel, job_id)).to_have_count(1, timeout=T)
    rows = panel.locator(".distexec-rows select")
    deadline = time.monotonic() + T / 1000
    while True:
        label = rows.evaluate("(s, id) => [...s.options].find(o => o.value.split(/\\s+/)[2] === String(id)).value",
                              job_id)
        try:
            rows.select_option(value=label, timeout=3000)
            return
        except playwright_api.TimeoutError:
            if time.monotonic() > deadline:
                raise


def panel_tab(panel, title: str):
    panel.locator(".lm-TabBar-tab", has_text=title).first.click()


def test_panel_in_the_browser(lab, client):
    page = lab["page"]
    if page.locator(".distexec-panel").count() == 0:
        run_notebook(lab, "panel.ipynb")
    else:
        page.evaluate(OPEN_NOTEBOOK, "panel.ipynb")  # open already: brought to the front
    panel = page.locator(".distexec-panel").first
    panel.scroll_into_view_if_needed()

    # A job from outside appears live, with its state in words as well as its icon.
    name = f"outside-{uuid.uuid4().hex[:6]}"
    # It holds its slot until the panel has shown it running, then is let go.
    job = client.submit(HOLD + "for i in range(3):\n    print('outside', i, flush=True)\n" + UNTIL_RELEASED,
                        name=name)
    expect(row(panel, job.id)).to_contain_text(re.compile("queued|running"), timeout=T)
    expect(row(panel, job.id)).to_contain_text("running", timeout=T)
    expect(row(panel, job.id)).to_contain_text(name)
    release_jobs(*(slave.pid for slave in lab["cluster"].slaves))
    expect(row(panel, job.id)).to_contain_text(re.compile(r"^✅\s+ok\s"), timeout=T)
    job.wait(30)

    # Clicking it shows its slave UID and output.
    select_job(panel, job.id)
    detail = panel.locator(".distexec-detail")
    expect(detail).to_contain_text(job.slave_uid, timeout=T)
    expect(detail).to_contain_text("outside 2", timeout=T)
    expect(detail.get_by_role("button", name="Cancel")).to_be_disabled()
    panel.screenshot(path=str(SHOTS / "panel-light.png"))

    # A job whose name and output are markup: shown as text, never run.  A fresh one: the
    # history's is far down the list once the notebooks have run their jobs.
    xss = client.submit(f"print({XSS!r})", name=XSS).wait(60)
    expect(row(panel, xss.id)).to_contain_text(re.compile(r"^✅\s+ok\s"), timeout=T)
    select_job(panel, xss.id)
    expect(detail).to_contain_text("window.__distexecXss='img'", timeout=T)
    assert xss_ran(page) is None, "a job's output ran as script"

    # The theme: the panel takes JupyterLab's colours, so it changes with it.
    light = panel.evaluate("el => getComputedStyle(el).backgroundColor")
    page.evaluate(SET_THEME, "JupyterLab Dark")
    try:
        expect(panel).not_to_have_css("background-color", light, timeout=T)
        dark = panel.evaluate("el => getComputedStyle(el).backgroundColor")
        assert _luminance(dark) < 0.3 < _luminance(light), (light, dark)
        select_job(panel, job.id)
        expect(detail).to_contain_text("outside 2", timeout=T)
        panel.screenshot(path=str(SHOTS / "panel-dark.png"))
    finally:
        page.evaluate(SET_THEME, "JupyterLab Light")

    # The editor runs a typed program.
    panel_tab(panel, "Editor")
    panel.locator(".distexec-code textarea").fill("print('typed', 6 * 7)")
    panel.locator("button", has_text=re.compile(r"^\s*Run\s*$")).click()
    expect(detail).to_contain_text("typed 42", timeout=T)

    # The Cluster view lists both slaves, and this page's client with its jobs.
    panel_tab(panel, "Cluster")
    for slave in client.slaves():
        expect(panel).to_contain_text(slave["uid"], timeout=T)
    panel.screenshot(path=str(SHOTS / "panel-cluster.png"))
    assert not lab["errors"], lab["errors"]
    assert xss_ran(page) is None


def _luminance(css: str) -> float:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255
