"""The %remote / %%remote magics, driven through IPython's InteractiveShell against a real cluster.

One cluster and one shell serve the whole module (starting a cluster costs
about a second); every test names its jobs or reads their ids, so tests do
not depend on each other's history.
"""
from __future__ import annotations

import io
import re
import signal
import threading
import time
import uuid
from contextlib import redirect_stdout

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from distexec_kernel import Cluster, Job, display as D, protocol as P
from distexec_kernel.magic import RemoteJobFailed, magics_of

from conftest import HOLD, UNTIL_RELEASED, magic_shell, module_cluster, release_jobs, wait_for


lc = module_cluster("magic", 2, slots=2)


@pytest.fixture(scope="module")
def shell(lc):
    with magic_shell() as sh:
        yield sh


@pytest.fixture(scope="module")
def master(lc):
    """A separate client, to check what the master itself says."""
    with Cluster(lc.url, token=lc.token) as c:
        yield c


def run(shell, cell: str):
    with capture_output() as cap:
        result = shell.run_cell(cell)
    return result, cap


def displayed_text(cap) -> str:
    return "\n".join(o.data.get("text/plain", "") for o in cap.outputs)


def last_job_named(master, name: str) -> dict:
    return next(j.record for j in master.jobs(limit=50) if j.name == name)


class Recorder(io.TextIOBase):
    """A stdout that notes when each chunk was written."""

    def __init__(self):
        self.chunks: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.chunks.append((time.time(), text))
        return len(text)


def test_extension_loads_lazily_without_a_cluster(tmp_path, monkeypatch):
    """Loading needs no cluster; using one with none up fails the cell with one clear line."""
    monkeypatch.setenv("DISTEXEC_HOME", str(tmp_path))
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "distexec_kernel")
    try:
        assert sh.find_cell_magic("remote") is not None and sh.find_line_magic("remote") is not None
        result, cap = run(sh, "%%remote\nprint(1)\n")
        assert not result.success
        assert "no cluster found" in cap.stdout and "distexec up" in cap.stdout
        assert "Traceback" not in cap.stdout and "magic.py" not in cap.stdout
    finally:
        sh.run_line_magic("unload_ext", "distexec_kernel")
    assert sh.find_cell_magic("remote") is None


def test_help_comes_from_magic_arguments(shell):
    result, cap = run(shell, "%%remote?")
    assert result.success
    assert "%%remote [--timeout TIMEOUT]" in cap.stdout
    for option in ("--timeout", "--no-wait", "--session NAME", "--file PATH", "--arg A", "--stdin TEXT", "-o NAME"):
        assert option in cap.stdout
    result, cap = run(shell, "%remote?")
    assert "%remote COMMAND" in cap.stdout and "%remote run FILE" in cap.stdout and "connect" in cap.stdout
    # A command's own --help: its help once.
    result, cap = run(shell, "%remote sessions --help")
    assert (cap.stdout + cap.stderr).count("usage: %remote sessions") == 1, cap.stdout + cap.stderr
    assert "--end NAME" in cap.stdout + cap.stderr


def test_output_streams_live_and_ends_with_a_status_line(shell, master, lc):
    name = f"live-{uuid.uuid4().hex[:6]}"
    rec = Recorder()
    cell = (f"%%remote --name {name}\nimport sys\n" + HOLD +
            "for i in range(2):\n    print('line', i, flush=True)\n" + UNTIL_RELEASED +
            "for i in range(2, 4):\n    print('line', i, flush=True)\n"
            "print('to stderr', file=sys.stderr)\n")
    live = threading.Event()

    def release_once_shown():
        # The job waits until its first lines are in the cell: only live output lets it end.
        try:
            wait_for(lambda: "line 1" in "".join(text for _, text in rec.chunks), 30, "the first lines in the cell")
            live.set()
        finally:
            release_jobs(*(s.proc.pid for s in lc.slaves))
    releaser = threading.Thread(target=release_once_shown)
    releaser.start()
    with capture_output() as cap, redirect_stdout(rec):
        result = shell.run_cell(cell)
    releaser.join()
    assert result.success, cap.stdout
    job = last_job_named(master, name)
    out = "".join(text for _, text in rec.chunks)
    assert out == "line 0\nline 1\nline 2\nline 3\n"
    assert "to stderr" in cap.stderr
    # Live, not at the end: the first lines were in the cell while the job still waited.
    assert live.is_set(), rec.chunks
    status = displayed_text(cap)
    assert re.fullmatch(rf"✅ job {job['id']} · python · slave \S+… · \d+\.\d+ s", status), status
    assert job["slave_uid"][:8] in status


def test_failing_job_fails_the_cell_with_stderr_and_code(shell, master):
    result, cap = run(shell, "%%remote -o failed\nimport sys\nprint('bad thing', file=sys.stderr)\nsys.exit(3)\n")
    assert not result.success
    assert isinstance(result.error_in_exec, RemoteJobFailed)
    assert result.error_in_exec.record["status"] == P.FAILED
    assert "bad thing" in cap.stderr
    # The handle is kept even when the cell fails, to look at it afterwards.
    assert shell.user_ns["failed"].stderr == "bad thing\n"
    assert re.search(r"❌ job \d+ · python · slave", cap.stdout)
    assert "nonzero_exit: exited with code 3" in cap.stdout
    # Our own frames stay out of sight.
    assert "Traceback" not in cap.stdout and "magic.py" not in cap.stdout and "cluster.py" not in cap.stdout


def test_syntax_error_shows_the_line_with_a_caret(shell):
    result, cap = run(shell, "%%remote\nx = 1\ny = (2 +\nprint(y)\n")
    assert not result.success
    assert result.error_in_exec.record["status"] == P.REJECTED
    lines = cap.stdout.splitlines()
    assert any(line.startswith("syntax_error: ") for line in lines), cap.stdout
    src = next(i for i, line in enumerate(lines) if line.strip().startswith("line 2: y = (2 +"))
    caret = lines[src + 1]
    assert caret.strip() == "^"
    assert lines[src][caret.index("^")] == "("


def test_unsupported_language_names_the_available_ones(shell):
    result, cap = run(shell, "%%remote cobol\nDISPLAY 'HI'.\n")
    assert not result.success
    assert result.error_in_exec.record["error"]["code"] == P.UNSUPPORTED_LANGUAGE
    line = next(line for line in cap.stdout.splitlines() if line.startswith("unsupported_language"))
    for lang in ("bash", "python"):
        assert lang in line
    assert not re.search(r"\bsh\b", line)  # an alias, not a language of its own


def test_interrupt_cancels_the_remote_job(shell, master):
    name = f"interrupt-{uuid.uuid4().hex[:6]}"
    main = threading.main_thread().ident
    errors = []

    def interrupt_once_streaming():
        try:
            wait_for(lambda: any(j.name == name and j.status == P.RUNNING and "started" in (j.refresh().stdout or "")
                                 for j in master.jobs(limit=20)), what="the job to run")
        except AssertionError as exc:
            errors.append(exc)
            return
        signal.pthread_kill(main, signal.SIGINT)  # what a kernel interrupt is

    t = threading.Thread(target=interrupt_once_streaming)
    t.start()
    # The job's own timeout bounds the test if the interrupt never comes.
    result, cap = run(shell, f"%%remote --name {name} --timeout 30\nimport time\n"
                             "print('started', flush=True)\ntime.sleep(60)\n")
    t.join()
    assert not errors, errors
    assert not result.success
    assert result.error_in_exec.interrupted
    assert "started" in cap.stdout
    assert "was cancelled on the master" in cap.stdout
    job = wait_for(lambda: (r := last_job_named(master, name))["status"] in P.TERMINAL and r,
                   what="the job to end")
    assert job["status"] == P.CANCELLED and job["error"]["code"] == P.CANCELLED_CODE


def test_no_wait_returns_at_once_with_a_handle_and_live_status(shell, master, lc):
    t0 = time.monotonic()
    result, cap = run(shell, "%%remote --no-wait -o h\n" + HOLD + UNTIL_RELEASED + "print('done late')\n")
    elapsed = time.monotonic() - t0
    assert result.success
    assert elapsed < 15, elapsed  # it did not wait for the job, held until released below (a loaded CI is slow)
    h = shell.user_ns["h"]
    assert result.result is h and not h.done
    assert re.match(rf"[🕓⏳] job {h.id} · python", displayed_text(cap))
    widget = magics_of(shell).status_widgets[h.id]
    assert widget.value.startswith("<span") and ("🕓" in widget.value or "⏳" in widget.value)
    # Another cell runs while it is still going.
    other, _ = run(shell, "%%remote\nprint('meanwhile')\n")
    assert other.success and not master.job(h.id).done
    release_jobs(*(s.pid for s in lc.slaves))
    shell.run_cell("h.wait(timeout=20)")
    assert h.status == P.SUCCEEDED and h.stdout == "done late\n"
    wait_for(lambda: "✅" in widget.value, what="the status widget to show ✅")
    assert f"job {h.id}" in widget.value


def test_a_live_line_of_a_handle_behind_the_master_ends_at_once_and_leaves_no_listener(shell):
    """show_job reads the job once after it subscribes: when that read, not an event, brings the end (the
    handle behind the master), the line moves to it and its listener leaves at once."""
    result, _ = run(shell, "%%remote --no-wait -o ended\nprint('over')\n")
    assert result.success
    shell.run_cell("ended.wait(timeout=30)")
    magics = magics_of(shell)
    ended = shell.user_ns["ended"]
    assert ended.status == P.SUCCEEDED
    # A handle that missed the end: it says queued, the master says succeeded.
    stale = Job(magics.cluster, {**ended.record, "status": P.QUEUED})
    assert not stale.done
    listening = len(magics.cluster._listeners)
    with capture_output():
        assert magics.show_job(stale)
    assert "✅" in magics.status_widgets[stale.id].value
    assert len(magics.cluster._listeners) == listening


def test_run_file_with_args_stdin_and_shipped_file(shell, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("from a shipped file\n")
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint(sys.argv[1:])\nprint(open('data.txt').read().strip())\n"
                    "print('stdin:', sys.stdin.read())\n")
    result, cap = run(shell, f"%remote run {prog} --stdin hello --file {data} a -b 'c d' -- --name x")
    assert result.success, cap.stdout
    assert "['a', '-b', 'c d', '--name', 'x']\nfrom a shipped file\nstdin: hello\n" in cap.stdout
    assert re.match(r"✅ job \d+ · python", displayed_text(cap))


def test_run_takes_the_language_from_the_extension_or_lang(shell, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text('echo "sh says $1"\n')
    result, cap = run(shell, f"%remote run {script} there")
    assert result.success and "sh says there" in cap.stdout
    assert re.match(r"✅ job \d+ · bash", displayed_text(cap))  # .sh: bash, sh being its alias
    noext = tmp_path / "prog"
    noext.write_text('echo "bash $BASH_VERSION" | cut -c1-4\n')
    result, cap = run(shell, f"%remote run {noext}")
    assert not result.success and "--lang" in cap.stderr + cap.stdout
    result, cap = run(shell, f"%remote run {noext} --lang bash")
    assert result.success and "bash" in cap.stdout


def test_cell_file_arg_and_stdin_options(shell, tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text("def greet(who):\n    return 'hello ' + who\n")
    result, cap = run(shell, f"%%remote python --file {helper} --arg=-x --arg world --stdin 'from stdin'\n"
                             "import sys, helper\nprint(helper.greet(sys.argv[2]), sys.argv[1], input())\n")
    assert result.success, cap.stdout
    assert "hello world -x from stdin\n" in cap.stdout


def test_program_arguments_after_double_dash_and_a_hint_for_a_dash_after_arg(shell):
    result, cap = run(shell, "%%remote python --arg a --name dashes -- -v --name x\nimport sys\nprint(sys.argv[1:])\n")
    assert result.success, cap.stdout + cap.stderr
    assert "['a', '-v', '--name', 'x']\n" in cap.stdout
    result, cap = run(shell, "%%remote --arg -v\nprint(1)\n")
    assert not result.success
    said = cap.stdout + cap.stderr
    assert "UsageError" in said and "--arg=-v" in said and "-- -v" in said and "Traceback" not in said, said
    result, cap = run(shell, "%%remote?")
    assert "%%remote bash -- -v -x" in cap.stdout, cap.stdout


def test_bare_remote_names_its_commands_and_languages_is_one(shell, master):
    result, cap = run(shell, "%remote")
    said = cap.stdout + cap.stderr
    assert not result.success and "UsageError" in said, said
    assert "connect | run | jobs" in said and "languages" in said and "rest" not in said, said
    result, cap = run(shell, "%remote languages")
    assert result.success, cap.stdout + cap.stderr
    assert cap.stdout == D.languages_text(master.languages()) + "\n"
    assert "python " in cap.stdout and " slave(s)" in cap.stdout


def test_timeout_fails_the_cell_with_timeout(shell):
    result, cap = run(shell, "%%remote --timeout 0.5\nimport time\ntime.sleep(20)\n")
    assert not result.success
    assert result.error_in_exec.record["error"]["code"] == P.TIMEOUT
    assert "timeout: " in cap.stdout


def test_bad_options_are_usage_errors(shell, tmp_path):
    (tmp_path / "x.py").write_text("print(1)\n")
    for cell in ("%%remote --timeout -1\nprint(1)\n", "%%remote --timeout soon\nprint(1)\n", "%%remote\n\n",
                 f"%remote run {tmp_path / 'x.py'} --timeout 0", "%remote", "%remote jobs --limit many",
                 f"%%remote --file {tmp_path / 'missing.txt'}\nprint(1)\n", "%remote frobnicate"):
        result, cap = run(shell, cell)
        assert not result.success, cell
        assert "UsageError" in cap.stderr + cap.stdout, cell
        if "timeout" in cell:
            assert "seconds" in cap.stderr + cap.stdout, cell
        assert "Traceback" not in cap.stderr + cap.stdout, cell


def test_tables_for_jobs_slaves_and_clients(shell, lc, master):
    master.submit("print('older')").wait(30)  # so that --limit 3 leaves one out, whatever ran before
    ids = []
    for i in range(3):
        result, _ = run(shell, f"%%remote --name table-{i}\nprint({i})\n")
        assert result.success
        ids.append(last_job_named(master, f"table-{i}")["id"])
    result, _ = run(shell, "%remote jobs --limit 3")
    jobs = result.result
    assert "<table>" in jobs._repr_html_()
    rows = [line for line in repr(jobs).splitlines()[2:] if line.strip()]
    assert rows[-1].startswith("(3 of ") and rows[-1].endswith(" jobs)")
    assert [int(line.split()[1]) for line in rows[:-1]] == sorted(ids, reverse=True)  # newest first
    assert repr(jobs).splitlines()[2].startswith("✅")
    for i in ids:
        assert f"<td style='text-align:left'>{i}</td>" in jobs._repr_html_()
    result, _ = run(shell, "%remote jobs --status rejected")
    assert all(" rejected " in line for line in repr(result.result).splitlines()[2:] if line.strip()
               and not line.startswith("("))

    slaves = run(shell, "%remote slaves")[0].result
    for child in lc.slaves:
        assert child.uid in repr(slaves) and child.uid in slaves._repr_html_()
    clients = run(shell, "%remote clients")[0].result
    mine = magics_of(shell).cluster.client_id
    assert mine in repr(clients) and mine in clients._repr_html_()
    assert master.client_id in repr(clients)


def test_cancel_and_show(shell, master):
    job = master.submit("import time\ntime.sleep(30)\n", name="to-cancel")
    wait_for(lambda: master.job(job.id).status == P.RUNNING, what="the job to run")
    result, cap = run(shell, f"%remote cancel {job.id}")
    assert result.success
    assert cap.stdout.startswith(f"🚫 job {job.id} · python")
    assert master.job(job.id).status == P.CANCELLED
    shown = run(shell, f"%remote show {job.id}")[0].result
    assert "cancelled" in repr(shown) and "<pre>" in shown._repr_html_()


def test_connect_overrides_and_refuses_a_wrong_token(shell, lc):
    result, cap = run(shell, f"%remote connect {lc.url} --token wrong")
    assert not result.success
    assert cap.stdout.startswith("DistexecError: ") and "401" in cap.stdout and "Traceback" not in cap.stdout
    result, cap = run(shell, f"%remote connect {lc.url} --token {lc.token}")
    assert result.success
    assert f"connected to {lc.url}" in cap.stdout and "2 slave(s)" in cap.stdout
    assert "python" in cap.stdout


def test_sessions_keep_variables_and_are_listed(shell):
    name = f"nb-{uuid.uuid4().hex[:6]}"
    result, cap = run(shell, f"%%remote --session {name}\ncounter = 41\nprint('set')\n")
    assert result.success and "set\n" in cap.stdout, cap.stdout + cap.stderr
    result, cap = run(shell, f"%%remote --session {name} -o second\ncounter += 1\nprint(counter)\n")
    assert result.success and "42\n" in cap.stdout
    assert shell.user_ns["second"].session == name
    # Without --session every job is a fresh process.
    result, cap = run(shell, "%%remote\nprint(counter)\n")
    assert not result.success and "NameError" in cap.stderr
    assert "  line 1: print(counter)" in cap.stdout
    sessions = run(shell, "%remote sessions")[0].result
    row = next(line for line in repr(sessions).splitlines() if line.startswith(name + " "))
    assert row.split()[-1] == "2" and " python " in row  # two jobs so far
    assert f"<td style='text-align:left'>{name}</td>" in sessions._repr_html_()
    result, cap = run(shell, f"%remote sessions --end {name} nb-none")
    assert result.success and cap.stdout.startswith(f"ended session {name}\nno session nb-none to end\n")
    assert f"{name} " not in repr(result.result)
    result, cap = run(shell, f"%%remote --session {name}\nprint(counter)\n")
    assert not result.success and "NameError" in cap.stderr  # its variables went with it


def test_a_remote_error_raised_in_a_cell_reads_like_a_failed_cell(shell):
    result, _ = run(shell, "%%remote --no-wait -o bad\nraise SystemExit(5)\n")
    assert result.success
    result, cap = run(shell, "bad.wait(timeout=20, raise_on_error=True)")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "RemoteError"
    assert re.match(rf"❌ job {shell.user_ns['bad'].id} · python · slave \S+ · ", cap.stdout)
    assert "nonzero_exit: exited with code 5" in cap.stdout and "Traceback" not in cap.stdout


EXIT_WHILE_RECONNECTING = """
import os, sys, time
from distexec_kernel.local import LocalCluster
from IPython.testing.globalipapp import start_ipython
from distexec_kernel.magic import magics_of
lc = LocalCluster(1, slots=1, home=sys.argv[1]).start()
os.environ["DISTEXEC_URL"], os.environ["DISTEXEC_TOKEN"] = lc.url, lc.token
ip = start_ipython()
ip.run_line_magic("load_ext", "distexec_kernel")
ip.run_cell("%%remote\\nprint('hi')\\n")
client = magics_of(ip).cluster
lc.stop()  # the notebook's client now reconnects to a master that is gone
deadline = time.monotonic() + 30
while client._events_connected() and time.monotonic() < deadline:
    time.sleep(0.01)
print("exiting" if not client._events_connected() else "still connected", flush=True)
"""


def test_a_program_ending_while_its_client_reconnects_prints_no_traceback(tmp_path):
    """A research-group audit: after %%remote, a program (a script, nbconvert) ending once its master
    had stopped printed `Exception in thread distexec-events ... cannot schedule new futures after
    shutdown` in most runs: the event thread, reconnecting, met the interpreter's end."""
    import os
    import subprocess
    import sys
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_WHILE_RECONNECTING, str(tmp_path)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "DISTEXEC_HOME": str(tmp_path)})
        assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
        assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr
