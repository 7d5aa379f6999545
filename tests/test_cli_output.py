"""What the CLI prints from jobs cannot drive the terminal: control characters are neutralised
there; redirected to a file or a pipe, a job's output is its program's, byte for byte."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distexec_kernel import display, protocol as P

from conftest import on_terminal

TITLE = "\x1b]0;pwned\x07"            # OSC 0: retitle the window
CLIPBOARD = "\x1b]52;c;ZXZpbA==\x07"  # OSC 52: write the clipboard
CSI = "\x9b2J"                        # C1 CSI: clear the screen
NAME = f"job{TITLE}\rhidden"
PROGRAM = ("import sys\n"
           f"print({CLIPBOARD!r} + 'out' + {CSI!r})\n"
           "print('tab\\tand newline kept')\n"
           f"sys.stderr.write({TITLE!r} + 'err\\n')\n")
CONTROLS = ("\x1b", "\x07", "\x9b", "\r")


def run(cluster, *argv) -> subprocess.CompletedProcess:
    """The CLI with stdout and stderr on pipes; their text as written (no newline translation: a \r stays)."""
    done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *argv, "--url", cluster.url,
                           "--token", cluster.token], capture_output=True, timeout=60)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def assert_clean(text: str) -> None:
    assert not any(c in text for c in CONTROLS), repr(text)


def assert_clean_on_terminal(shown: str) -> None:
    """Clean, but for the \r of the terminal's own \r\n (a raw \r before it stays: \r\r\n)."""
    assert_clean(shown.replace("\r\n", "\n"))


def test_clean_keeps_text_and_shows_controls():
    assert display.clean("a\tb\nc ✅ é") == "a\tb\nc ✅ é"
    assert display.clean(TITLE) == "\\x1b]0;pwned\\x07"
    assert display.clean("\x00\x7f\x85\x9f\r") == "\\x00\\x7f\\x85\\x9f\\x0d"


def test_an_exit_code_reads_as_what_it_was():
    # A failed job's 0 (one cut at its output limit that exited by itself) must not read as a success.
    assert display.exit_code_text({"status": P.FAILED, "exit_code": 0}) == "0 (the process's own; the job failed)"
    assert display.exit_code_text({"status": P.SUCCEEDED, "exit_code": 0}) == "0"
    assert display.exit_code_text({"status": P.FAILED, "exit_code": -9}) == "-9 (SIGKILL)"
    assert display.exit_code_text({"status": P.FAILED, "exit_code": 3}) == "3"
    assert display.exit_code_text({"status": P.REJECTED, "exit_code": None}) is None


def test_cli_neutralises_escapes_from_job_names_and_output(cluster, tmp_path):
    program = tmp_path / "evil.py"
    program.write_text(PROGRAM)
    shown, done = on_terminal(cluster, "submit", str(program), "--name", NAME)
    assert done.returncode == 0, shown
    assert_clean_on_terminal(shown)
    assert "\\x1b]52;c;ZXZpbA==\\x07out\\x9b2J\r\n" in shown
    assert "tab\tand newline kept\r\n" in shown
    assert "\\x1b]0;pwned\\x07err" in shown

    # A table's layout: its cells are escaped wherever it goes, a pipe too.
    listed = run(cluster, "jobs")
    assert listed.returncode == 0, listed.stderr
    assert_clean(listed.stdout)
    assert "job\\x1b]0;pwned\\x07\\x0dhidden" in listed.stdout
    job_id = json.loads(run(cluster, "jobs", "--json").stdout)["jobs"][0]["id"]

    shown, done = on_terminal(cluster, "show", str(job_id))
    assert done.returncode == 0, shown
    assert_clean_on_terminal(shown)
    assert "name:      job\\x1b]0;pwned\\x07" in shown

    # --json escapes every control character as JSON does (C1 included), and says the same.
    as_json = run(cluster, "show", str(job_id), "--json")
    assert_clean(as_json.stdout)
    record = json.loads(as_json.stdout)
    assert record["name"] == NAME and record["stdout"].startswith(CLIPBOARD)

    # --raw: the bytes as they are, on a terminal too.
    raw, _ = on_terminal(cluster, "show", str(job_id), "--raw")
    assert TITLE in raw and CLIPBOARD + "out" + CSI in raw
    raw, done = on_terminal(cluster, "submit", str(program), "--raw")
    assert done.returncode == 0 and raw.startswith(CLIPBOARD + "out" + CSI), raw
    assert TITLE + "err" in raw


# Colour, tab, CR LF and a NUL, on both streams: what a program's output file may well hold.
BYTES_OUT = "a\x1b[31mRED\x1b[0m\tb\r\n\x00z\n"
BYTES_ERR = "e\x1b[1mBOLD\x1b[0m\r\n"
ESCAPED_OUT = "a\\x1b[31mRED\\x1b[0m\tb\\x0d\r\n\\x00z\r\n"  # as a terminal shows it (its \n is \r\n)
ESCAPED_ERR = "e\\x1b[1mBOLD\\x1b[0m\\x0d\r\n"


def test_redirected_output_is_the_programs_bytes_each_stream_judged_alone(cluster, tmp_path):
    """`distexec submit prog > out.txt` gives the program's output, as a local run would: only a
    terminal gets control characters escaped, stdout and stderr each by whether it is one."""
    program = tmp_path / "colours.sh"
    program.write_text("printf 'a\\033[31mRED\\033[0m\\tb\\r\\n\\000z\\n'\n"
                       "printf 'e\\033[1mBOLD\\033[0m\\r\\n' >&2\n")
    both = run(cluster, "submit", str(program))
    assert both.returncode == 0, both.stderr
    assert both.stdout == BYTES_OUT
    assert both.stderr.startswith(BYTES_ERR + "✅ job"), repr(both.stderr)

    shown, done = on_terminal(cluster, "submit", str(program), streams=("stdout",))
    assert done.returncode == 0, done.stderr
    assert shown == ESCAPED_OUT and done.stderr.startswith(BYTES_ERR + "✅ job"), (shown, done.stderr)
    shown, done = on_terminal(cluster, "submit", str(program), streams=("stderr",))
    assert done.returncode == 0, shown
    assert done.stdout == BYTES_OUT and shown.startswith(ESCAPED_ERR + "✅ job"), (done.stdout, shown)

    # `show` prints the job's output too: the same rule.
    job_id = json.loads(run(cluster, "jobs", "--json", "--limit", "1").stdout)["jobs"][0]["id"]
    redirected = run(cluster, "show", str(job_id))
    assert f"--- stdout ---\n{BYTES_OUT.rstrip(chr(10))}\n--- stderr ---\n{BYTES_ERR}" in redirected.stdout
    shown, _ = on_terminal(cluster, "show", str(job_id))
    assert "--- stdout ---\r\n" + ESCAPED_OUT.removesuffix("\r\n") + "\r\n--- stderr ---" in shown, shown


def test_a_reader_that_leaves_ends_the_command_quietly(cluster, tmp_path):
    """`distexec jobs --json | head`: no BrokenPipeError traceback, the exit status of a tool SIGPIPE stopped."""
    program = tmp_path / "hello.py"
    program.write_text("print('hello')\n")
    assert run(cluster, "submit", str(program)).returncode == 0
    for argv in (["jobs", "--json"], ["jobs"], ["submit", str(program)]):
        read, write = os.pipe()
        os.close(read)  # the reader has gone before anything is written: every write fails with EPIPE
        try:
            done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *argv, "--url", cluster.url,
                                   "--token", cluster.token], stdout=write, stderr=subprocess.PIPE, text=True,
                                  timeout=60)
        finally:
            os.close(write)
        assert done.stderr.count("\n") <= 1 and "Traceback" not in done.stderr, (argv, done.stderr)
        assert "BrokenPipe" not in done.stderr and done.returncode == 141, (argv, done.returncode, done.stderr)


def test_get_prints_a_collected_names_controls_escaped_on_one_line(cluster, tmp_path):
    program = tmp_path / "names.py"
    program.write_text(f"open({TITLE + CSI + chr(10) + 'fake line.txt'!r}, 'w').write('hi')\n")
    done = run(cluster, "submit", str(program), "--collect", "*.txt")
    assert done.returncode == 0, done.stderr
    job_id = json.loads(run(cluster, "jobs", "--json", "--limit", "1").stdout)["jobs"][0]["id"]
    got = run(cluster, "get", str(job_id), "-o", str(tmp_path / "out"))
    assert got.returncode == 0, got.stderr
    assert_clean(got.stdout)
    assert got.stdout.count("\n") == 1 and "\\x1b]0;pwned\\x07\\x9b2J\\x0afake line.txt" in got.stdout
    assert (tmp_path / "out" / (TITLE + CSI + "\nfake line.txt")).read_text() == "hi"


def test_json_commands_print_one_document_also_when_they_fail(cluster):
    from distexec_kernel.local import free_port

    missing = run(cluster, "show", "99999", "--json")
    assert missing.returncode == 2 and "99999" in missing.stderr
    assert json.loads(missing.stdout)["error"]["code"] == "not_found", missing.stdout

    class Away:
        url, token = f"http://127.0.0.1:{free_port()}", cluster.token  # nothing listens there
    for argv in (("jobs", "--json"), ("slaves", "--json"), ("clients", "--json")):
        away = run(Away, *argv)
        assert away.returncode == 2 and away.stderr.startswith("distexec: "), away.stderr
        error = json.loads(away.stdout)["error"]
        assert error["code"] == "unreachable" and error["message"] in away.stderr, (argv, away.stdout)
    # Without --json, stdout stays empty: the reason is on stderr only, with what to do.
    away = run(Away, "jobs")
    assert away.stdout == "" and "none is running there; start one with `distexec up`" in away.stderr


SERVER_MODULES = ("master", "slave", "sqlite3", "argon2", "psutil")


@pytest.mark.parametrize("argv", [["jobs", "--help"], ["submit", "--help"], ["--help"]])
def test_client_commands_load_no_server_code(argv):
    """A command that only reads the history does not load the store, SQLite, argon2 or the sandbox."""
    probe = ("import sys\nfrom distexec_kernel import cli\n"
             f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_server_commands_still_take_their_roles_options():
    for role, flag in (("master", "--max-queued-per-user"), ("slave", "--disk-limit")):
        done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", role, "--help"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and flag in done.stdout, done.stderr
        bad = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", role, "--no-such-option"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
