"""The CLI at a terminal: stdin in, bad input files, the status line's place, what a cancel shows."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import module_cluster, on_terminal, wait_for

lc = module_cluster("cli-input", 1, slots=2)

DOUBLE = "import sys\nprint(int(sys.stdin.read()) * 2)\n"


def cli(lc, *args, input=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *args, "--url", lc.url, "--token", lc.token],
                          capture_output=True, text=True, timeout=timeout, input=input)


def assert_refused(r, *words):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


def test_stdin_and_program_from_this_commands_stdin(lc, tmp_path):
    prog = tmp_path / "double.py"
    prog.write_text(DOUBLE)
    r = cli(lc, "submit", str(prog), "--stdin-file", "-", input="21\n")
    assert r.returncode == 0 and r.stdout == "42\n", r.stderr
    r = cli(lc, "submit", "-", "--lang", "python", input="print('from a pipe')\n")
    assert r.returncode == 0 and r.stdout == "from a pipe\n", r.stderr
    listed = json.loads(cli(lc, "jobs", "--json", "--limit", "1").stdout)["jobs"][0]
    assert listed["name"] == "stdin" and listed["language"] == "python"


def test_bad_input_files_are_refused_in_one_line(lc, tmp_path):
    prog = tmp_path / "double.py"
    prog.write_text(DOUBLE)
    assert_refused(cli(lc, "submit", str(prog), "--stdin-file", str(tmp_path / "missing")), "cannot read", "missing")
    assert_refused(cli(lc, "submit", str(prog), "--stdin-file", str(tmp_path)), "cannot read")
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x00\xe8\xff" * 10)
    assert_refused(cli(lc, "submit", str(prog), "--stdin-file", str(binary)), "not UTF-8", "--file")
    latin = tmp_path / "latin.py"
    latin.write_bytes("print('caf\xe9')\n".encode("latin-1"))
    assert_refused(cli(lc, "submit", str(latin)), "not UTF-8", "latin.py")
    assert_refused(cli(lc, "submit", str(prog), "--each", str(binary)), "not UTF-8")
    assert_refused(cli(lc, "submit", "-", input="print(1)"), "needs --lang")
    assert_refused(cli(lc, "submit", "-", "--lang", "python", "--stdin-file", "-", input="x"),
                   "only one of", "stdin (-)")
    # None of them reached the master.
    jobs = json.loads(cli(lc, "jobs", "--json", "--limit", "1000").stdout)["jobs"]
    assert not [j for j in jobs if j["name"] in ("latin.py",) or j["status"] == "rejected"]


def test_submit_each_over_no_lines_is_a_usage_error_that_submits_nothing(lc, tmp_path):
    prog = tmp_path / "double.py"
    prog.write_text(DOUBLE)
    before = json.loads(cli(lc, "jobs", "--json", "--limit", "1").stdout)["total"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n# only a comment\n")
    for each, extra in (("/dev/null", ()), (str(blank), ()), (str(blank), ("--no-wait",))):
        r = cli(lc, "submit", str(prog), "--each", each, *extra)
        assert r.returncode == 2 and r.stdout == "", (each, r.stdout, r.stderr)
        assert_refused(r, f"--each {each}", "no line of arguments", "no job submitted")
    r = cli(lc, "submit", str(prog), "--each", "-", input="")
    assert r.returncode == 2 and "--each stdin (-)" in r.stderr, r.stderr
    assert json.loads(cli(lc, "jobs", "--json", "--limit", "1").stdout)["total"] == before


def test_status_line_starts_its_own_line_on_a_terminal(lc, tmp_path):
    prog = tmp_path / "nonl.py"
    prog.write_text("import sys\nsys.stdout.write('no newline')\n")
    text, done = on_terminal(lc, "submit", str(prog))
    assert done.returncode == 0
    assert "no newline\r\n✅ job" in text, repr(text)

    # Not on a terminal the output stays byte for byte what the program wrote.
    r = cli(lc, "submit", str(prog))
    assert r.stdout == "no newline" and r.stderr.startswith("✅ job"), (r.stdout, r.stderr)


def test_cancel_shows_the_end_not_running(lc, tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    job_id = int(cli(lc, "submit", str(slow), "--no-wait").stdout)
    wait_for(lambda: "started" in cli(lc, "show", str(job_id)).stdout, 30, "the job to start")
    r = cli(lc, "cancel", str(job_id))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"🚫 job {job_id}") and "cancelled" in r.stdout, r.stdout

    quick = tmp_path / "quick.py"
    quick.write_text("print('done')\n")
    r = cli(lc, "submit", str(quick))
    ended = json.loads(cli(lc, "jobs", "--json", "--limit", "1").stdout)["jobs"][0]["id"]
    r = cli(lc, "cancel", str(ended))
    assert r.returncode == 0 and f"job {ended} had already ended" in r.stderr
    assert r.stdout.startswith(f"✅ job {ended}"), r.stdout


def test_up_on_a_port_in_use_says_so_and_starts_nothing(home):
    import socket

    import psutil

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "distexec_kernel.cli", "up", "--slaves", "2", "--port",
                                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1, (out, err)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "--port" in err, err
    assert "Traceback" not in err and "slave" not in err, err
    assert not [p for p in psutil.process_iter(["cmdline"]) if f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])]


def caught_signals(pid: int) -> int:
    """The signals a process has handlers for (``SigCgt`` of /proc/PID/status), as a bit mask."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("SigCgt:")), 16)


def importing_the_server(pid: int) -> bool:
    """Past Python's own start, into the server's imports: asyncio's or tornado's C module is mapped
    (imported by master/server.py and slave/server.py, not by the interpreter's start)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("/_asyncio." in line or "/tornado/speedups." in line for line in f)


def test_servers_stopped_while_starting_exit_quietly(home):
    """A Ctrl-C before a server has set its own handlers: a quiet exit 130 (no traceback).  While its
    modules import, by a handler of its entry point's (a KeyboardInterrupt there could be swallowed by
    the import machinery, and the server went on starting); after, Python's KeyboardInterrupt."""
    import signal

    sigterm = 1 << (signal.SIGTERM - 1)
    for role, argv in (("slave", ["--master", "http://127.0.0.1:1", "--secret", "s"]), ("master", ["--port", "0"])):
        proc = subprocess.Popen([sys.executable, "-m", role, *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        # The window: importing, before the server's loop catches SIGTERM (it sets SIGINT and SIGTERM
        # together, once started).  The imports left take tens of ms; the signal arrives in microseconds.
        wait_for(lambda: importing_the_server(proc.pid), 30, f"the {role} to import its modules", 0.001)
        assert not caught_signals(proc.pid) & sigterm, f"the {role} set its handlers before the test could look"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (role, err)
        assert proc.returncode == 130, (role, proc.returncode, err)


def submit_with(lc, *argv, after=()):
    """`distexec submit ARGV... -- AFTER...`: the connection options before the `--`."""
    cmd = [sys.executable, "-m", "distexec_kernel.cli", "submit", *argv, "--url", lc.url, "--token", lc.token]
    return subprocess.run([*cmd, "--", *after] if after else cmd, capture_output=True, text=True, timeout=60)


def test_program_arguments_may_start_with_a_dash_after_double_dash(lc, tmp_path):
    prog = tmp_path / "argv.py"
    prog.write_text("import sys\nprint(sys.argv[1:])\n")
    r = submit_with(lc, str(prog), "--arg", "a", "--name", "dashes", after=("-v", "--lang", "x", "--", "y"))
    assert r.returncode == 0 and r.stdout == "['a', '-v', '--lang', 'x', '--', 'y']\n", r.stderr
    each = tmp_path / "each.txt"
    each.write_text("1\n-2 three\n")
    r = submit_with(lc, str(prog), "--each", str(each), after=("-v",))
    assert r.returncode == 0 and r.stdout == "['-v', '1']\n['-v', '-2', 'three']\n", r.stderr
    # A dash after --arg reads as an option: the refusal says how to give it.
    assert_refused(cli(lc, "submit", str(prog), "--arg", "-v"), "--arg: expected one argument", "--arg=-v", "-- -v")
    assert_refused(cli(lc, "submit", str(prog), "extra"), "unrecognized arguments: extra", "after --")


def test_up_explains_each_option():
    import re
    done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "up", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--slaves", "--slots", "--max-jobs", "--port", "--host", "--languages", "--db"):
        # The flag, its metavar, then its help: on that line or, past the column, on the next.
        assert re.search(rf"^  {flag}(?: \S+)?(?: {{2,}}|\n {{20,}})[^-\s]", done.stdout, re.M), (flag, done.stdout)
