"""The per-language Jupyter kernels, against one real local cluster.

Jupyter's conformance suite (``jupyter_kernel_test.KernelTests``) for the C,
Java and Python kernels; then what only our kernels do: options, kept files,
a failing job as an error reply, an interrupt cancelling the job, the example
notebooks run by nbclient, and the kernelspecs installed into and removed
from a temporary prefix.  The kernelspecs are installed with our own
``kernelspec.install`` and found through JUPYTER_PATH; the kernels find the
cluster through DISTEXEC_URL / DISTEXEC_TOKEN, as a user's would.
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
from pathlib import Path

import jupyter_kernel_test as jkt
import nbformat
import psutil
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from distexec_kernel import Cluster, cli, kernelspec, protocol as P
from distexec_kernel.local import LocalCluster, free_port

from conftest import release_jobs, shared_cluster, wait_for
from test_notebooks import collect, text_of

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# A cold javac on a loaded 2-core machine takes many seconds (tests/test_languages.py).
JOB_WAIT = 90
STATUS_OK = re.compile(r"✅ job \d+ · (\w+) · slave \S+… · \d+\.\d+ s")


@pytest.fixture(scope="module", autouse=True)
def world(tmp_path_factory):
    """One cluster and one kernelspec prefix for every test here; the environment points at both."""
    prefix = tmp_path_factory.mktemp("kernels-prefix")
    with shared_cluster(tmp_path_factory, "kernels", 2, slots=2) as lc, pytest.MonkeyPatch.context() as mp:
        kernelspec.install(["c", "java", "python"], prefix=str(prefix))
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        mp.setenv("DISTEXEC_URL", lc.url)
        mp.setenv("DISTEXEC_TOKEN", lc.token)
        yield lc


class _Conformance(jkt.KernelTests):
    __test__ = False  # only the per-language classes below run
    # What a cell run as a whole program cannot have: no expression values, pager,
    # history, inspection or clearing of output (not tested, rather than skipped).
    test_pager = test_execute_result = test_display_data = test_history = test_inspect = None
    test_clear_output = None

    def execute_helper(self, code, timeout=JOB_WAIT, **kwargs):
        return super().execute_helper(code, timeout=timeout, **kwargs)


class TestCKernel(_Conformance):
    __test__ = True
    kernel_name = "distexec-c"
    language_name = "c"
    file_extension = ".c"
    code_hello_world = '#include <stdio.h>\nint main(void) { puts("hello, world"); return 0; }\n'
    code_stderr = '#include <stdio.h>\nint main(void) { fputs("careful\\n", stderr); return 0; }\n'
    # Fails with no output of its own: the suite wants the error message alone.
    code_generate_error = "int main(void) { return 3; }\n"
    complete_code_samples = ["int main(void) { return 0; }", "%timeout 5\nint x = 1;",
                             'char *s = "{"; // }', "/* ( */ int y;"]
    incomplete_code_samples = ["int main(void) {", "int f(int x) { return (x", "/* a comment"]
    invalid_code_samples = ["int main(void) }", "int x = (1];"]
    completion_samples = [{"text": "whi", "matches": {"while"}}, {"text": "%ti", "matches": {"%timeout"}},
                          {"text": "%%f", "matches": {"%%file"}},
                          {"text": "int counter = 0;\ncou", "matches": {"counter"}}]


class TestJavaKernel(_Conformance):
    __test__ = True
    kernel_name = "distexec-java"
    language_name = "java"
    file_extension = ".java"
    code_hello_world = ('public class Hello {\n  public static void main(String[] a) {\n'
                        '    System.out.println("hello, world");\n  }\n}\n')
    code_stderr = ('public class Err {\n  public static void main(String[] a) {\n'
                   '    System.err.println("careful");\n  }\n}\n')
    code_generate_error = "public class Fail {\n  public static void main(String[] a) { System.exit(3); }\n}\n"
    complete_code_samples = ["public class A { }", "%arg 1 2\nclass B { void f() { g(); } }"]
    incomplete_code_samples = ["public class A {", "public class A { void f() { g(1,"]
    invalid_code_samples = ["public class A { ) }"]
    completion_samples = [{"text": "Sys", "matches": {"System"}}, {"text": "%no", "matches": {"%no-wait"}}]


class TestPythonKernel(_Conformance):
    __test__ = True
    kernel_name = "distexec-python"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys\nprint('careful', file=sys.stderr)"
    code_generate_error = "import sys\nsys.exit(3)"
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n", "%timeout 5\nx = 1"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    completion_samples = [{"text": "pri", "matches": {"print"}}, {"text": "%se", "matches": {"%session"}}]


# -- beyond the conformance suite ------------------------------------------------------------


def start(name: str):
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=60)
    # wait_for_ready may leave more than one kernel_info reply behind.
    while True:
        try:
            kc.get_shell_msg(timeout=0.2)
        except queue.Empty:
            return km, kc


@pytest.fixture(scope="module")
def c_kernel(world):
    km, kc = start("distexec-c")
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run(kc, code: str, timeout: float = JOB_WAIT):
    """Execute ``code``: (its iopub messages, the reply content, all it showed as text)."""
    got, reply = collect(kc, kc.execute(code), timeout)
    msgs = [m for _, m in got]
    shown = []
    for m in msgs:
        c = m["content"]
        if m["msg_type"] == "stream":
            shown.append(c["text"])
        elif m["msg_type"] in ("display_data", "execute_result"):
            shown.append(c["data"]["text/plain"] + "\n")
        elif m["msg_type"] == "error":
            shown.append("\n".join(c["traceback"]) + "\n")
    return msgs, reply["content"], "".join(shown)


C_ECHO = ('#include <stdio.h>\nint main(int argc, char **argv) {\n  char line[100];\n'
          '  for (int i = 1; i < argc; i++) printf("arg %s\\n", argv[i]);\n'
          '  while (fgets(line, sizeof line, stdin)) printf("in %s", line);\n  return 0;\n}\n')


def test_options_args_stdin_and_a_local_file(c_kernel, tmp_path):
    km, kc = c_kernel
    _, reply, out = run(kc, "%arg 6 'two words'\n%stdin first line\n%stdin second\n" + C_ECHO)
    assert reply["status"] == "ok", out
    assert out.startswith("arg 6\narg two words\nin first line\nin second\n")
    assert STATUS_OK.search(out).group(1) == "c"
    data = tmp_path / "data.txt"
    data.write_text("42\n")
    _, reply, out = run(kc, f"%file {data}\n#include <stdio.h>\nint main(void) {{\n  int x;\n"
                            f'  FILE *f = fopen("data.txt", "r");\n  fscanf(f, "%d", &x);\n'
                            f'  printf("read %d\\n", x);\n  return 0;\n}}\n')
    assert reply["status"] == "ok" and "read 42\n" in out, out


def test_bad_options_are_a_usage_error_naming_the_fix(c_kernel, world):
    km, kc = c_kernel
    with Cluster(world.url, token=world.token, events=False) as c:
        before = c.jobs_page(limit=1)[1]
        for code, says in (("%timeout soon\nint main(void) { return 0; }", "not a number of seconds"),
                           ("%bogus\nint main(void) { return 0; }", "unknown option %bogus"),
                           ("%session s\nint main(void) { return 0; }", "sessions run Python only"),
                           ("%file /no/such/file.h\nint main(void) { return 0; }", "cannot read /no/such/file.h"),
                           ("%arg 1\n", "no program")):
            msgs, reply, out = run(kc, code)
            assert reply["status"] == "error" and reply["ename"] == "UsageError", out
            assert says in out
        assert c.jobs_page(limit=1)[1] == before, "a cell with bad options was submitted"


def test_kept_header_is_sent_with_later_cells(c_kernel):
    km, kc = c_kernel
    _, reply, out = run(kc, "%%file sq.h\nstatic int sq(int x) { return x * x; }\n")
    assert reply["status"] == "ok" and "kept sq.h" in out
    code = '#include <stdio.h>\n#include "sq.h"\nint main(void) { printf("%d\\n", sq(12)); return 0; }\n'
    _, reply, out = run(kc, code)
    assert reply["status"] == "ok" and out.startswith("144\n"), out
    _, reply, out = run(kc, "%%file sq.h\n")  # an empty body forgets it
    assert "forgot sq.h" in out
    _, reply, out = run(kc, code)
    assert reply["ename"] == P.COMPILE_ERROR and "sq.h" in out


def test_compile_error_is_an_error_reply_pointing_at_the_line(c_kernel):
    km, kc = c_kernel
    msgs, reply, out = run(kc, "%timeout 30\n#include <stdio.h>\nint main(void) {\n  printf(\"x\")\n}\n")
    assert reply["status"] == "error" and reply["ename"] == P.COMPILE_ERROR
    errors = [m for m in msgs if m["msg_type"] == "error"]
    assert len(errors) == 1 and errors[0]["content"]["traceback"] == reply["traceback"]
    # The option line stays a (blank) line: the compiler's line 4 is the cell's line 4.
    assert "main.c:4:" in out and '  line 4: printf("x")' in reply["traceback"]
    assert reply["traceback"][0].startswith("❌ job ")


def test_timeout_fails_the_cell_with_its_code(c_kernel):
    km, kc = c_kernel
    _, reply, out = run(kc, "%timeout 1\n#include <unistd.h>\nint main(void) { sleep(30); return 0; }\n")
    assert reply["status"] == "error" and reply["ename"] == P.TIMEOUT, out


# A C program that waits for its test to let it go (conftest's HOLD and UNTIL_RELEASED, in C).
C_UNTIL_RELEASED = ("#include <signal.h>\n#include <time.h>\nint main(void) {\n"
                    "  sigset_t s; sigemptyset(&s); sigaddset(&s, SIGUSR1); sigprocmask(SIG_BLOCK, &s, 0);\n"
                    "  struct timespec t = {300, 0}; sigtimedwait(&s, 0, &t);\n  return 0;\n}\n")


def test_no_wait_returns_at_once(c_kernel, world):
    km, kc = c_kernel
    _, reply, out = run(kc, "%no-wait\n" + C_UNTIL_RELEASED)
    assert reply["status"] == "ok"
    job_id = int(re.search(r"job (\d+)", out).group(1))
    with Cluster(world.url, token=world.token) as c:
        assert c.job(job_id).status in (P.QUEUED, P.RUNNING)  # the cell ended; the job waits on
        release_jobs(*(s.proc.pid for s in world.slaves), timeout=JOB_WAIT)
        assert c.job(job_id).wait(timeout=JOB_WAIT).status == P.SUCCEEDED


def test_interrupt_cancels_the_running_job(c_kernel, world):
    km, kc = c_kernel
    with Cluster(world.url, token=world.token, events=False) as master:
        msg_id = kc.execute('#include <stdio.h>\n#include <unistd.h>\nint main(void) {\n'
                            '  puts("sleeping"); fflush(stdout);\n  sleep(60);\n  return 0;\n}\n')
        job = wait_for(lambda: next((j for j in master.jobs(limit=3) if j.status == P.RUNNING
                                     and "sleeping" in (master.job(j.id).stdout or "")), None),
                       timeout=JOB_WAIT, what="the job to run and print")
        km.interrupt_kernel()
        got, reply = collect(kc, msg_id)
        content = reply["content"]
        assert content["status"] == "error" and content["ename"] == P.CANCELLED_CODE
        assert any("cancelled on the master" in line for line in content["traceback"])
        assert any(m["msg_type"] == "stream" and "sleeping" in m["content"]["text"] for _, m in got)
        assert master.job(job.id).wait(timeout=20).status == P.CANCELLED
    # The kernel lives on.
    _, reply, out = run(kc, '#include <stdio.h>\nint main(void) { puts("after"); return 0; }\n')
    assert reply["status"] == "ok" and out.startswith("after\n")


def _unread_by_master(lc, pid: int) -> bool:
    """Whether the master has bytes from process ``pid`` it has not read yet (its socket's receive queue)."""
    port = int(lc.url.rsplit(":", 1)[1])
    theirs = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == port}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, rx = fields[1], fields[2], fields[4].split(":")[1]
                if (int(local.rsplit(":", 1)[1], 16) == port and int(remote.rsplit(":", 1)[1], 16) in theirs
                        and int(rx, 16) > 0):
                    return True
    return False


def test_an_interrupt_while_the_master_answers_the_submission_cancels_the_job(c_kernel, world):
    km, kc = c_kernel
    run(kc, "int main(void) { return 0; }\n")  # connected to the master before it is frozen
    os.kill(world.master.pid, signal.SIGSTOP)
    try:
        msg_id = kc.execute("%timeout 60\n#include <unistd.h>\nint main(void) { sleep(60); return 0; }\n")
        # The cell's submission waits in the frozen master's socket: the kernel waits for its answer.
        wait_for(lambda: _unread_by_master(world, km.provisioner.process.pid), JOB_WAIT, "the submission to be sent")
        km.interrupt_kernel()
    finally:
        os.kill(world.master.pid, signal.SIGCONT)
    got, reply = collect(kc, msg_id)
    content = reply["content"]
    # Not a KeyboardInterrupt that left the job it submitted running, unseen: the job came and was cancelled.
    assert content["status"] == "error" and content["ename"] == P.CANCELLED_CODE, content
    job_id = int(re.search(r"job (\d+)", " ".join(content["traceback"])).group(1))
    with Cluster(world.url, token=world.token, events=False) as master:
        assert master.job(job_id).wait(timeout=20).status == P.CANCELLED


def test_python_kernel_keeps_state_in_its_session(world):
    km, kc = start("distexec-python")
    try:
        _, reply, out = run(kc, "x = 41\nprint('set')")
        assert reply["status"] == "ok" and out.startswith("set\n"), out
        _, reply, out = run(kc, "print(x + 1)")
        assert reply["status"] == "ok" and out.startswith("42\n"), out
        _, reply, out = run(kc, "raise ValueError('bad value')")
        assert reply["ename"] == P.NONZERO_EXIT and "ValueError: bad value" in out
        with Cluster(world.url, token=world.token, events=False) as c:
            names = [s["name"] for s in c.sessions()]
            assert len([n for n in names if n.startswith("kernel-")]) == 1, names
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    # Its session ends with the kernel.
    with Cluster(world.url, token=world.token, events=False) as c:
        wait_for(lambda: not [s for s in c.sessions() if s["name"].startswith("kernel-")],
                 what="the kernel's session to end")


@pytest.mark.parametrize("name", ["distexec-c", "distexec-python"])
def test_a_kernel_asked_to_shut_down_exits_on_its_own(world, name):
    # It hung on ipykernel's last flush, two shutdowns in three, until Jupyter killed it (2.6 s later).
    for _ in range(3):
        km, kc = start(name)
        proc = km.provisioner.process
        try:
            kc.shutdown()
            assert proc.wait(timeout=4) == 0
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def test_kernel_info_tells_the_clusters_toolchain_version(c_kernel, world):
    km, kc = c_kernel
    kc.kernel_info()
    info = kc.get_shell_msg(timeout=30)["content"]
    with Cluster(world.url, token=world.token, events=False) as c:
        version = next(x["version"] for x in c.languages() if x["name"] == "c")
    assert info["language_info"] == {"name": "c", "version": version, "mimetype": "text/x-csrc",
                                     "file_extension": ".c", "codemirror_mode": "clike", "pygments_lexer": "c"}
    assert "debugger" not in info.get("supported_features", [])


def test_no_cluster_is_said_in_the_first_cell(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTEXEC_URL", f"http://127.0.0.1:{free_port()}")
    km, kc = start("distexec-c")
    try:
        kc.kernel_info()
        assert kc.get_shell_msg(timeout=30)["content"]["language_info"]["version"] == "unknown"
        _, reply, out = run(kc, "int main(void) { return 0; }\n")
        assert reply["status"] == "error" and reply["ename"] == "no_cluster"
        assert "cannot reach the distexec master" in out and "distexec up" in out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    # No cluster named anywhere: how to get one is said once.
    monkeypatch.delenv("DISTEXEC_URL")
    monkeypatch.setenv("DISTEXEC_HOME", str(tmp_path / "empty-home"))
    km, kc = start("distexec-c")
    try:
        _, reply, out = run(kc, "int main(void) { return 0; }\n")
        assert reply["ename"] == "no_cluster" and "no cluster found" in out
        assert out.count("distexec up") == 1, out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_no_slave_for_the_language_is_said(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with LocalCluster(1, slots=1, home=str(home), log_dir=str(tmp_path / "logs"), languages="python") as lc:
        monkeypatch.setenv("DISTEXEC_URL", lc.url)
        monkeypatch.setenv("DISTEXEC_TOKEN", lc.token)
        km, kc = start("distexec-c")
        try:
            _, reply, out = run(kc, "int main(void) { return 0; }\n")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    assert reply["status"] == "error" and reply["ename"] == P.UNSUPPORTED_LANGUAGE
    assert "python" in out, out


def test_a_kernel_logged_in_with_distexec_login_takes_a_new_login_without_a_restart(tmp_path, monkeypatch):
    """On a shared master with logins: a person's kernels run as them through `distexec login`, and
    once that login has expired, logging in again in a terminal serves the next cell."""
    import subprocess
    import sys

    import requests

    from conftest import users_json
    student = tmp_path / "student-home"
    users = users_json(tmp_path, "alice")
    with LocalCluster(1, slots=1, home=str(tmp_path / "master-home"), log_dir=str(tmp_path / "logs"),
                      languages="c", master_args=["--users", users, "--token-ttl", "6"]) as lc:
        for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("DISTEXEC_HOME", str(student))

        def login() -> str:
            done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "login", lc.url, "--user", "alice",
                                   "--password-stdin"], input="alice-pw\n", capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            return json.loads((student / "login.json").read_text())["logins"][0]["token"]
        first = login()
        km, kc = start("distexec-c")
        try:
            _, reply, out = run(kc, '#include <stdio.h>\nint main(void) { puts("as alice"); return 0; }\n')
            assert reply["status"] == "ok" and "as alice" in out, out
            jobs = requests.get(lc.url + "/api/jobs", headers={"Authorization": f"Bearer {lc.token}"}, timeout=20)
            assert jobs.json()["jobs"][0]["user"] == "alice"
            wait_for(lambda: requests.get(lc.url + "/api/jobs", headers={"Authorization": f"Bearer {first}"},
                                          timeout=20).status_code == 401, 30, "the login to expire")
            _, reply, out = run(kc, "int main(void) { return 0; }\n")
            assert reply["status"] == "error" and "distexec login" in out, out
            login()
            _, reply, out = run(kc, '#include <stdio.h>\nint main(void) { puts("again"); return 0; }\n')
            assert reply["status"] == "ok" and "again" in out, out
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


# -- notebooks --------------------------------------------------------------------------------


def execute(nb, cwd, **kwargs):
    client = NotebookClient(nb, timeout=JOB_WAIT, startup_timeout=60,
                            resources={"metadata": {"path": str(cwd)}}, **kwargs)
    return client.execute()


def cell(nb, startswith: str):
    matches = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith)]
    assert len(matches) == 1, f"{len(matches)} cells start with {startswith!r}"
    return matches[0]


def run_notebook(name: str, tmp_path):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} has outputs: clear them"
    execute(nb, tmp_path)
    for c in nb.cells:
        if c.cell_type == "code" and "raises-exception" not in c.metadata.get("tags", []):
            assert not [o for o in c.outputs if o.output_type == "error"], text_of(c)
    return nb


def check_teaching_notebook(nb, lang: str, where: str):
    assert re.search(r"^hello from \S+, process \d+$", text_of(nb.cells[1]), re.M)
    assert STATUS_OK.search(text_of(nb.cells[1])).group(1) == lang
    args = text_of(cell(nb, "%arg 6 7"))
    assert "hello, 6 times 7 is 42\n" in args and "your name: Ada\n" in args
    assert "mean mark: 12.17\n" in "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    broken = [c for c in nb.cells if "raises-exception" in c.metadata.get("tags", [])]
    assert len(broken) == 1
    errors = [o for o in broken[0].outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == [P.COMPILE_ERROR]
    line = where.split(":")[1]
    assert f"{where}:" in text_of(broken[0]) and f"  line {line}: " in text_of(broken[0]), text_of(broken[0])
    timed = [text_of(c) for c in nb.cells if c.cell_type == "code" and c.source.startswith("%arg 200000")]
    assert len(timed) == 2
    assert re.search(r"^trial division: 17984 primes below 200000 in [\d.]+ ms$", timed[0], re.M), timed[0]
    assert re.search(r"^sieve: 17984 primes below 200000 in [\d.]+ ms$", timed[1], re.M), timed[1]
    assert all(STATUS_OK.search(t) for t in timed)


def test_c_notebook_runs_top_to_bottom(tmp_path):
    nb = run_notebook("c-kernel.ipynb", tmp_path)
    check_teaching_notebook(nb, "c", "main.c:4")


def test_java_notebook_runs_top_to_bottom(tmp_path):
    nb = run_notebook("java-kernel.ipynb", tmp_path)
    check_teaching_notebook(nb, "java", "Broken.java:3")


def test_compile_error_stops_run_all_at_its_cell(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('#include <stdio.h>\nint main(void) { puts("first"); return 0; }'),
        nbformat.v4.new_code_cell("#include <stdio.h>\n\nint main(void) {\n  undeclared = 1;\n  return 0;\n}"),
        nbformat.v4.new_code_cell('#include <stdio.h>\nint main(void) { puts("must not run"); return 0; }'),
    ])
    nb.metadata["kernelspec"] = {"name": "distexec-c", "display_name": "C (distexec)", "language": "c"}
    with pytest.raises(CellExecutionError) as info:
        execute(nb, tmp_path)
    assert info.value.ename == P.COMPILE_ERROR
    assert "line 4: undeclared = 1;" in str(info.value)
    assert "first\n" in text_of(nb.cells[0])
    assert nb.cells[2].execution_count is None and not nb.cells[2].outputs


# -- kernelspecs ------------------------------------------------------------------------------


def test_kernelspecs_install_list_remove_in_a_prefix(tmp_path, capsys):
    prefix = str(tmp_path / "p")
    assert cli.main(["kernel", "install", "--prefix", prefix, "--languages", "c,java,py"]) == 0
    kernels = Path(prefix, "share", "jupyter", "kernels")
    assert sorted(os.listdir(kernels)) == ["distexec-c", "distexec-java", "distexec-python"]
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager(kernel_dirs=[str(kernels)]).get_kernel_spec("distexec-java")
    assert spec.display_name == "Java (distexec)" and spec.language == "java"
    assert spec.argv[1:5] == ["-m", "distexec_kernel.kernel", "--language", "java"]
    assert cli.main(["kernel", "list", "--prefix", prefix]) == 0
    listed = capsys.readouterr().out
    assert all(f"distexec-{x}" in listed for x in ("c", "java", "python"))
    assert cli.main(["kernel", "remove", "java", "--prefix", prefix]) == 0
    assert sorted(os.listdir(kernels)) == ["distexec-c", "distexec-python"]
    assert cli.main(["kernel", "remove", "java", "--prefix", prefix]) == 2
    assert "no kernelspec distexec-java installed" in capsys.readouterr().err
    assert cli.main(["kernel", "install", "--prefix", prefix, "--languages", "cobol"]) == 2
    assert "unknown language(s) cobol" in capsys.readouterr().err
    assert sorted(os.listdir(kernels)) == ["distexec-c", "distexec-python"]


def test_default_install_is_every_language(tmp_path):
    from distexec_kernel import languages as L
    done = kernelspec.install(prefix=str(tmp_path))
    assert sorted(done) == sorted(f"distexec-{x}" for x in L.LANGUAGES)
    assert kernelspec.display_name("cpp") == "C++ (distexec)"
