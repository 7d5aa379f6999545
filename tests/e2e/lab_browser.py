"""JupyterLab and headless Chromium for the end-to-end tests, started and always stopped.

JupyterLab runs from this venv on a free loopback port with a known token
and its own temporary home, config, data, runtime and settings folders, so
nothing of the machine's own Jupyter setup is read or written.  Chromium is
Debian's (``/usr/bin/chromium``, from scripts/apt-packages-tests.txt), driven by
Playwright for Python: Playwright never downloads a browser here.

The page gets the JupyterLab application as ``window.jupyterapp``
(``--LabApp.expose_app_in_browser``), so the tests open notebooks and run
them with JupyterLab's own commands and read what the front end holds,
instead of clicking through menus whose layout changes between releases.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import requests

from distexec_kernel.local import free_port

from conftest import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# User settings written before the start: no news or update check (no network, no
# pop-up over the screenshots); every cell in the DOM (no virtual scrolling), so the
# tests find a cell by its text wherever it is on the page.
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


# Server config: nothing the test does not use.  Above all no build check: on every page
# load it hashes JupyterLab's staging folder, ~12 s of CPU on a loaded 2-core machine.
CONFIG = {
    "LabApp": {"extension_manager": "readonly", "news_url": None, "expose_app_in_browser": True},
    "ServerApp": {"terminals_enabled": False, "jpserver_extensions": {"jupyter_lsp": False},
                  "open_browser": False,
                  # JupyterLab only sets these page settings where they are not set already.
                  "tornado_settings": {"page_config_data": {"buildCheck": False, "buildAvailable": False}}},
}


class JupyterLab:
    """A JupyterLab server in its own temporary world; ``stop()`` ends it and every kernel it started."""

    def __init__(self, root: Path, work: Path, env: dict):
        self.root = root
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dirs = {name: work / name for name in ("home", "config", "data", "runtime", "settings", "workspaces",
                                               "ipython")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps(CONFIG))
        for name, value in SETTINGS.items():
            path = dirs["settings"] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.env = dict(env, HOME=str(dirs["home"]), JUPYTER_CONFIG_DIR=str(dirs["config"]),
                        JUPYTER_DATA_DIR=str(dirs["data"]), JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
                        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
                        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
                        JUPYTER_PLATFORM_DIRS="1")
        # The kernel must be this venv's Python, whatever is first on PATH.
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        # The per-language kernels the C and Java notebooks declare, in this world's data dir.
        subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "kernel", "install", "--user",
                        "--languages", "c,java"], env=self.env, check=True, capture_output=True, timeout=120)
        argv = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.log_path = work / "jupyterlab.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=self.env, cwd=root, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._ps = psutil.Process(self.proc.pid)

    def api(self, method: str, path: str, **kwargs):
        resp = requests.request(method, f"{self.url}{path}", headers={"Authorization": f"token {self.token}"},
                                timeout=30, **kwargs)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.api("GET", "/api/status")
                return True
            except requests.RequestException:
                return False
        try:
            wait_for(ready, timeout, "JupyterLab to answer", interval=0.2)
        except AssertionError:
            raise RuntimeError(f"JupyterLab not ready within {timeout} s:\n{self.log()}") from None

    def kernelspecs(self) -> set[str]:
        return set(self.api("GET", "/api/kernelspecs")["kernelspecs"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> list[psutil.Process]:
        """Shut down its kernels, then the server; returns what was running under it, to check it ended."""
        try:
            procs = [self._ps] + self._ps.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        if self.proc.poll() is None:
            try:
                for kernel in self.api("GET", "/api/kernels"):
                    self.api("DELETE", f"/api/kernels/{kernel['id']}")
            except requests.RequestException:
                pass  # a server that does not answer is stopped by its signal below
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self._log.close()
        return procs


def copy_notebooks(src: Path, dst: Path) -> list[str]:
    """The notebooks to open, copied so that what they write stays out of the repository."""
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.glob("*.ipynb"))
    for name in names:
        shutil.copy(src / name, dst / name)
    return names


def kernel_needed(path: Path) -> str:
    """The kernel a notebook declares in its metadata (``kernelspec.name``)."""
    meta = json.loads(path.read_text()).get("metadata", {})
    return (meta.get("kernelspec") or {}).get("name") or "python3"


# --- in the page -------------------------------------------------------------------------

OPEN_NOTEBOOK = """async (path) => {
    const app = window.jupyterapp;
    const widget = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
    await widget.context.ready;
    await widget.sessionContext.ready;
    app.shell.activateById(widget.id);
    window.__distexecRun = null;
    return widget.sessionContext.session.kernel.name;
}"""

# Run All, remembered as a promise: JupyterLab's command resolves when the last cell has run
# (or one failed), so a test can watch cells while it runs and await the end later.
RUN_ALL = """() => {
    window.__distexecRun = window.jupyterapp.commands.execute('notebook:run-all-cells')
        .then(() => 'done', (e) => 'failed: ' + e);
}"""

# Run from cell ``index`` to the end: what a person does after a cell that fails on purpose,
# since JupyterLab's Run All stops at any error, ``raises-exception`` tag or not.
RUN_FROM = """(index) => {
    window.jupyterapp.shell.currentWidget.content.activeCellIndex = index;
    window.__distexecRun = window.jupyterapp.commands.execute('notebook:run-all-below')
        .then(() => 'done', (e) => 'failed: ' + e);
}"""

WAIT_RUN = "async () => await window.__distexecRun"

# The notebook as the front end holds it now (nbformat JSON), outputs included.
NOTEBOOK_JSON = "() => window.jupyterapp.shell.currentWidget.content.model.toJSON()"

# Shut the current notebook's kernel down and close it: a finished notebook costs nothing more.
CLOSE_CURRENT = """async () => {
    const w = window.jupyterapp.shell.currentWidget;
    if (w && w.sessionContext) { await w.sessionContext.shutdown(); }
    if (w) { w.dispose(); }
}"""

SET_THEME = "async (theme) => await window.jupyterapp.commands.execute('apputils:change-theme', {theme})"


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
