"""What the CLI prints from jobs cannot drive the terminal: control characters are neutralised."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distexec_kernel import display

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
    return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *argv, "--url", cluster.url,
                           "--token", cluster.token], capture_output=True, text=True, timeout=60)


def assert_clean(text: str) -> None:
    assert not any(c in text for c in CONTROLS), repr(text)


def test_clean_keeps_text_and_shows_controls():
    assert display.clean("a\tb\nc ✅ é") == "a\tb\nc ✅ é"
    assert display.clean(TITLE) == "\\x1b]0;pwned\\x07"
    assert display.clean("\x00\x7f\x85\x9f\r") == "\\x00\\x7f\\x85\\x9f\\x0d"


def test_cli_neutralises_escapes_from_job_names_and_output(cluster, tmp_path):
    program = tmp_path / "evil.py"
    program.write_text(PROGRAM)
    done = run(cluster, "submit", str(program), "--name", NAME)
    assert done.returncode == 0, done.stderr
    assert_clean(done.stdout)
    assert_clean(done.stderr)
    assert "\\x1b]52;c;ZXZpbA==\\x07out\\x9b2J\n" in done.stdout
    assert "tab\tand newline kept\n" in done.stdout
    assert "\\x1b]0;pwned\\x07err" in done.stderr

    listed = run(cluster, "jobs")
    assert listed.returncode == 0, listed.stderr
    assert_clean(listed.stdout)
    assert "job\\x1b]0;pwned\\x07\\x0dhidden" in listed.stdout
    job_id = json.loads(run(cluster, "jobs", "--json").stdout)["jobs"][0]["id"]

    shown = run(cluster, "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    assert_clean(shown.stdout)
    assert "name:      job\\x1b]0;pwned\\x07" in shown.stdout

    # --json escapes every control character as JSON does (C1 included), and says the same.
    as_json = run(cluster, "show", str(job_id), "--json")
    assert_clean(as_json.stdout)
    record = json.loads(as_json.stdout)
    assert record["name"] == NAME and record["stdout"].startswith(CLIPBOARD)

    # --raw: the bytes as they are.
    raw = run(cluster, "show", str(job_id), "--raw")
    assert TITLE in raw.stdout and CLIPBOARD + "out" + CSI in raw.stdout
    raw_submit = run(cluster, "submit", str(program), "--raw")
    assert raw_submit.stdout.startswith(CLIPBOARD + "out" + CSI)
    assert TITLE + "err" in raw_submit.stderr


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
