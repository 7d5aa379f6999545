"""Files in (folders, bytes) and files out (``collect``, artifacts), against real masters and slaves."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import requests

from distexec_kernel import Cluster, protocol as P
from distexec_kernel.cluster import DistexecError
from distexec_kernel.files import FilesError, read_paths
from slave.collect import collect, matches

from conftest import users_json

T = 90  # seconds a job may take on a loaded machine (Java compiles)


# --- names and patterns ---------------------------------------------------------

@pytest.mark.parametrize("name", ["a.txt", "pkg/mod.py", "data/in.csv", "/".join("abcdefgh"), ".hidden/x"])
def test_relative_paths_are_file_names(name):
    P.check_file_name(name)


@pytest.mark.parametrize("name", ["", "/etc/passwd", "a/../b", "../x", "a//b", "a/", "./a", "a\\b", "a\0b",
                                  "/".join("abcdefghi"), "x" * 256, 7])
def test_file_names_that_leave_the_job_dir_or_go_too_deep_are_refused(name):
    with pytest.raises(P.ProtocolError) as err:
        P.check_file_name(name)
    assert err.value.code == "bad_request" and "file name" in err.value.message


def test_file_content_is_text_or_base64_and_counts_as_bytes():
    sub = P.check_submission({"source": "x", "language": "python",
                              "files": {"t.txt": "é", "b.bin": {"base64": base64.b64encode(b"\0\xff").decode()}}})
    assert P.file_bytes(sub["files"]["t.txt"]) == "é".encode() and P.file_bytes(sub["files"]["b.bin"]) == b"\0\xff"
    for bad in ({"base64": "not base64!"}, {"base64": 3}, {"b64": "AA=="}, 5, None):
        with pytest.raises(P.ProtocolError) as err:
            P.check_submission({"source": "x", "language": "python", "files": {"f": bad}})
        assert "file 'f'" in err.value.message
    big = {"base64": base64.b64encode(b"\0" * (P.MAX_FILES_BYTES + 1)).decode()}
    with pytest.raises(P.ProtocolError) as err:
        P.check_submission({"source": "x", "language": "python", "files": {"f": big}})
    assert err.value.code == "too_large"


@pytest.mark.parametrize("bad", [["/etc/*"], ["../*"], ["a/../../b"], [""], [3], ["x"] * 33])
def test_collect_patterns_stay_in_the_job_dir(bad):
    with pytest.raises(P.ProtocolError) as err:
        P.check_submission({"source": "x", "language": "python", "collect": bad})
    assert "collect" in err.value.message


def test_collect_globs():
    assert matches("*.png", "a.png") and not matches("*.png", "d/a.png")
    assert matches("**/*.png", "a.png") and matches("**/*.png", "d/e/a.png")
    assert matches("out/**", "out/a") and matches("out/**", "out/x/y") and not matches("out/**", "outx/a")
    assert matches("data/[ab].txt", "data/b.txt") and not matches("data/[ab].txt", "data/c.txt")
    # Hidden names only for a pattern that names them, as in a shell.
    assert not matches("*", ".x") and not matches("**", ".cache/f") and not matches("out/**", "out/.git/x")
    assert matches(".x", ".x") and matches(".cache/**", ".cache/f") and matches("**/.x", "a/.x")


def test_a_pattern_of_many_parts_is_judged_at_once():
    # 84 "**" parts took 5 ms per name (32 such patterns: hours for a job's 200,000 files).
    many = "**/" * 84 + "z"
    assert matches(many, "a/b/c/z") and not matches(many, "a/b/c/d/e/f/g/h/f0")
    t0 = time.perf_counter()
    for i in range(1000):
        matches(many, f"a/b/c/d/e/f/g/h/f{i}")
        matches("/".join(["**", "x"] * 63), f"a/b/c/d/e/f/g/h/f{i}")
    assert time.perf_counter() - t0 < 1.0  # 0.03 s here; 10 s before


def test_collecting_stops_after_its_time_and_says_so(tmp_path):
    for i in range(50):
        (tmp_path / f"f{i:02}.txt").write_text(str(i))
    found = collect(str(tmp_path), ["*.txt"], seconds=0)
    assert found.meta == [] and "not looked at (collecting stops after 0 s)" in found.note()
    found = collect(str(tmp_path), ["*.txt"])
    assert len(found.meta) == 50 and found.note() is None


def test_a_local_folder_becomes_files_under_its_name(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "in.csv").write_text("a,b\n")
    (tmp_path / "data" / "sub" / "blob.bin").write_bytes(b"\x00\xff")
    (tmp_path / "data" / ".secret").write_text("no")
    (tmp_path / "data" / "__pycache__").mkdir()
    (tmp_path / "data" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    files = read_paths([str(tmp_path / "data") + "/"])
    assert files == {"data/in.csv": "a,b\n", "data/sub/blob.bin": {"base64": "AP8="}}
    (tmp_path / "many").mkdir()
    for i in range(P.MAX_FILES + 1):
        (tmp_path / "many" / f"{i}.txt").write_text("x")
    with pytest.raises(FilesError, match=f"more than {P.MAX_FILES} files"):
        read_paths([str(tmp_path / "many")])


def test_a_fifo_in_a_folder_sent_is_refused_at_once(tmp_path):
    """A named pipe (a running program's, or planted) must not hang `--file DIR` waiting for a writer."""
    import threading

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.csv").write_text("a,b\n")
    os.mkfifo(tmp_path / "data" / "pipe")
    outcome: list = []

    def send():
        try:
            outcome.append(read_paths([str(tmp_path / "data")]))
        except FilesError as exc:
            outcome.append(exc)
    reader = threading.Thread(target=send, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock it, then fail
        with open(tmp_path / "data" / "pipe", "w"):
            pass
        pytest.fail("read_paths waited on the FIFO")
    assert isinstance(outcome[0], FilesError) and "pipe is not a regular file" in str(outcome[0])


# --- files in, on a real cluster ----------------------------------------------------

def test_folders_and_binary_files_reach_the_job(client, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.csv").write_text("x,y\n1,2\n")
    (tmp_path / "data" / "raw.bin").write_bytes(bytes(range(256)))
    src = ("import hashlib\nprint(open('data/in.csv').read().splitlines()[1])\n"
           "print(hashlib.sha256(open('data/raw.bin','rb').read()).hexdigest())\n"
           "import os\nos.path.exists('deep') and print(open('deep/a/b/c.bin','rb').read())\n")
    job = client.submit(src, files=[str(tmp_path / "data")]).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout.splitlines()[:2] == ["1,2", hashlib.sha256(bytes(range(256))).hexdigest()]
    # A dict of files takes bytes too, and paths with folders.
    job = client.submit(src, files={"data/in.csv": "h\nrow\n", "data/raw.bin": b"",
                                    "deep/a/b/c.bin": b"\x00\x01"}).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout.splitlines() == ["row", hashlib.sha256(b"").hexdigest(), "b'\\x00\\x01'"]
    # The same in a session: written through the same safe writer into its directory.
    job = client.submit(src, session="files-in", files={"data/in.csv": "h\nsess\n", "data/raw.bin": b"1",
                                                         "deep/a/b/c.bin": b"\xfe"}).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout.splitlines()[0] == "sess"


def test_judge0_multi_file_python_example(client):
    # Judge0's example of a multi-file program: main.py importing a package.
    files = {"my_package/__init__.py": "",
             "my_package/my_module1.py": "def hello():\n    return 'Hello from my_module1'\n",
             "my_package/my_module2.py": "from .my_module1 import hello\n\ndef shout():\n    return hello().upper()\n"}
    src = "from my_package.my_module1 import hello\nfrom my_package import my_module2\nprint(hello())\n" \
          "print(my_module2.shout())\n"
    job = client.submit(src, files=files).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout == "Hello from my_module1\nHELLO FROM MY_MODULE1\n"


def test_java_with_a_package_compiles_and_runs(client):
    src = ("/* a licence header */\npackage com.example.app;\n\nimport com.example.util.Greeter;\n\n"
           "public class Hello {\n    public static void main(String[] a) {\n"
           "        System.out.println(Greeter.greet(Hello.class.getName()));\n    }\n}\n")
    files = {"com/example/util/Greeter.java": "package com.example.util;\npublic class Greeter {\n"
                                              "    public static String greet(String n) { return \"hi \" + n; }\n}\n"}
    job = client.submit(src, language="java", files=files).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout == "hi com.example.app.Hello\n"
    # A compile error still points at the program's line.
    bad = client.submit("package a.b;\npublic class Main {\n  int x = ;\n}\n", language="java").wait(T)
    assert bad.error["code"] == P.COMPILE_ERROR and bad.error["line"] == 3, bad.error


def test_bad_file_names_are_refused_before_any_job(client):
    for name in ("../up.txt", "/abs.txt", "a//b.txt"):
        with pytest.raises(DistexecError) as err:
            client.submit("print(1)", files={name: "x"})
        assert err.value.status == 400 and "file name" in str(err.value)
    # A file named as the program's own would be replaced by it, unseen.
    for source, lang, own in (("print(1)", "py", "main.py"), ("public class Hi {}", "java", "Hi.java")):
        with pytest.raises(DistexecError) as err:
            client.submit(source, language=lang, files={own: "x", "other.txt": "y"})
        assert err.value.status == 400 and f"file name '{own}' is the program's own file" in str(err.value)
    assert client.submit("print(open('main.py.txt').read())", files={"main.py.txt": "z"}).wait(60).stdout == "z\n"


# --- files out ---------------------------------------------------------------------

ATTACKS = """
import os
os.makedirs('out/sub', exist_ok=True)
open('out/a.txt', 'w').write('A')
open('out/sub/b.bin', 'wb').write(bytes(range(256)))
open('plot.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n' + b'p' * 100)
os.symlink('/etc/passwd', 'leak.png')
os.symlink('/etc', 'out/etc')
os.mkfifo('fifo.png')
open('mine.png', 'w').write('m'); os.link('mine.png', 'twin.png')
with open('huge.png', 'wb') as f:
    f.truncate((64 << 20) + 1)
print('done')
"""


def test_collect_keeps_regular_files_and_names_what_it_left_out(client):
    job = client.submit(ATTACKS, collect=["*.png", "out/**"]).wait(T)
    assert job.status == P.SUCCEEDED and job.error is None, job.stderr
    assert [a["name"] for a in job.artifacts] == ["out/a.txt", "out/sub/b.bin", "plot.png"]
    by_name = {a["name"]: a for a in job.artifacts}
    assert by_name["plot.png"]["mime"] == "image/png" and by_name["out/a.txt"]["mime"] == "text/plain"
    for meta in job.artifacts:
        data = job.artifact(meta["name"])
        assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"]
    assert job.artifact("out/sub/b.bin") == bytes(range(256))
    # Links (to a file or a folder), the FIFO, the hard-linked pair and the huge file: named, never read.
    note = job.stderr
    for name in ("leak.png", "out/etc", "fifo.png", "mine.png", "twin.png", "huge.png"):
        assert name in note, note
    assert "past 64 MiB" in note and "root:" not in json.dumps(job.record)
    with pytest.raises(DistexecError) as err:
        job.artifact("leak.png")
    assert err.value.status == 404


def test_a_collected_name_that_is_not_utf8_is_left_out_and_the_job_still_ends(client):
    # It made the result unsendable: the job stayed running, its slot taken, past any timeout or cancel.
    # Also under such names: a link to /etc/passwd, a FIFO, a hard link. Left out by name, never opened.
    src = ("import os\nopen(bytes([0xff]) + b'x', 'w').write('x')\nopen('fine.txt', 'w').write('ok')\n"
           "os.symlink('/etc/passwd', b'\\xfelx')\nos.mkfifo(b'\\xfdfx')\n"
           "open('twin', 'w').write('t')\nos.link('twin', b'\\xfchx')\n")
    for session in (None, "collect-utf8"):
        job = client.submit(src, collect=["*x", "*.txt"], session=session, timeout=30).wait(T)
        assert job.status == P.SUCCEEDED, (job.record, session)
        assert [a["name"] for a in job.artifacts] == ["fine.txt"]
        for name in ("\\xfchx", "\\xfdfx", "\\xfelx", "\\xffx"):
            assert name in job.stderr, job.stderr
        assert "a name that is not UTF-8: \\xfchx, \\xfdfx, \\xfelx, \\xffx" in job.stderr, job.stderr
        assert "root:" not in json.dumps(job.record)
    client.end_session("collect-utf8")


def test_collect_caps_the_number_of_files(client):
    src = "import os\nos.makedirs('out')\nfor i in range(105):\n    open(f'out/{i:03}.txt', 'w').write(str(i))\n"
    job = client.submit(src, collect=["out/*.txt"]).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert len(job.artifacts) == P.MAX_ARTIFACTS and job.artifacts[-1]["name"] == "out/099.txt"
    assert "past 100 files: out/100.txt, out/101.txt" in job.stderr


def test_collect_keeps_up_to_64_mib_in_frames_and_a_failed_job_keeps_its_files(client, tmp_path):
    # 2 x 25 MiB fits (the frames are 4 MiB each); a third 25 MiB file does not.
    src = ("import os\nfor n in 'abc':\n    open(n + '.bin', 'wb').write(os.urandom(25 << 20))\n"
           "raise SystemExit(3)\n")
    job = client.submit(src, collect=["*.bin"], timeout=120).wait(180)
    assert job.status == P.FAILED and job.exit_code == 3
    assert [a["name"] for a in job.artifacts] == ["a.bin", "b.bin"]
    assert "c.bin" in job.stderr and "past 64 MiB" in job.stderr
    data = job.artifact("b.bin")
    assert hashlib.sha256(data).hexdigest() == job.artifacts[1]["sha256"] and len(data) == 25 << 20


def test_a_session_cell_collects_from_its_directory(client):
    job = client.submit("open('result.csv', 'w').write('a,b\\n')\nvalue = 42", session="collect-s",
                        collect=["*.csv"]).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert [a["name"] for a in job.artifacts] == ["result.csv"] and job.artifact("result.csv") == b"a,b\n"
    # The kernel's own files in that directory are never collected.
    job = client.submit("print(value)", session="collect-s", collect=["**"]).wait(T)
    assert job.stdout == "42\n" and [a["name"] for a in job.artifacts] == ["result.csv"], job.artifacts


def test_distexec_get_saves_the_files_with_their_folders(cluster, client, tmp_path, home):
    job = client.submit(ATTACKS, collect=["out/**", "plot.png"]).wait(T)
    env = {**os.environ, "DISTEXEC_URL": cluster.url, "DISTEXEC_TOKEN": cluster.token}

    def get(*argv):
        return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "get", str(job.id), *argv],
                              capture_output=True, text=True, env=env, timeout=60)

    r = get("-o", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "all" / "out" / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert (tmp_path / "all" / "plot.png").read_bytes().startswith(b"\x89PNG")
    r = get("out/a.txt", "-o", str(tmp_path / "one"))
    assert r.returncode == 0 and os.listdir(tmp_path / "one") == ["out"]
    assert (tmp_path / "one" / "out" / "a.txt").read_text() == "A"
    shown = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "show", str(job.id)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert f"collected files (distexec get {job.id})" in shown.stdout and "out/sub/b.bin  256 bytes" in shown.stdout
    r = get("nope.txt", "-o", str(tmp_path / "none"))
    assert r.returncode == 1 and "no collected file" in r.stderr and "out/a.txt" in r.stderr
    # submit --file DIR --collect PAT: the folder goes in, the collected file is named at the end.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "n.txt").write_text("21")
    prog = tmp_path / "double.py"
    prog.write_text("n = int(open('src/n.txt').read())\nopen('answer.txt', 'w').write(str(2 * n))\nprint(n)\n")
    r = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "submit", str(prog), "--file",
                        str(tmp_path / "src"), "--collect", "answer.txt"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout == "21\n", r.stderr
    assert "collected answer.txt (2 bytes)" in r.stderr


def test_saving_collected_files_writes_through_no_link_planted_in_the_folder(client, tmp_path):
    """The folder files are saved into may be shared (a class's): what another user planted there (a
    link, a hard link, a FIFO) must not make this write (as root, often) land in a file they chose."""
    job = client.submit("import os\nos.makedirs('out', exist_ok=True)\nopen('out/r.txt', 'w').write('job')\n"
                        "open('p.png', 'w').write('png')\n", collect=["out/**", "p.png"]).wait(T)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "out").symlink_to(victim)
    with pytest.raises(FilesError, match="out is not a folder"):
        job.save_artifacts(str(shared))
    assert os.listdir(victim) == ["file"]
    (shared / "out").unlink()
    os.link(victim / "file", shared / "p.png")  # a hard link to a file the saver may write
    os.mkfifo(shared / "out-fifo")
    (shared / "out").mkdir()
    os.mkfifo(shared / "out" / "r.txt")  # a FIFO: opening it to write would wait for a reader
    assert sorted(job.save_artifacts(str(shared))) == [str(shared / "out" / "r.txt"), str(shared / "p.png")]
    assert (victim / "file").read_text() == "precious"  # the entry was replaced, the file it shared kept
    assert (shared / "p.png").read_text() == "png" and (shared / "out" / "r.txt").read_text() == "job"
    assert sorted(os.listdir(shared)) == ["out", "out-fifo", "p.png"]  # no temporary file left
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FilesError, match="is not a folder"):
        job.save_artifacts(str(tmp_path / "a-file"))


def test_another_users_artifacts_are_not_found(make_cluster, tmp_path):
    users = users_json(tmp_path, "alice", "bob")
    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users])
    alice, bob = Cluster(lc.url, user="alice", password="alice-pw"), Cluster(lc.url, user="bob", password="bob-pw")
    try:
        job = alice.submit("open('s.html','w').write('<script>alert(1)</script>')", collect=["s.html"]).wait(T)
        assert job.artifacts[0]["mime"] == "text/html"
        url = f"{lc.url}/api/jobs/{job.id}/artifacts/s.html"
        resp = requests.get(url, headers={"Authorization": f"Bearer {alice.token}"}, timeout=20)
        assert resp.status_code == 200 and resp.content == b"<script>alert(1)</script>"
        # HTML a job made never runs as a page of the master.
        assert resp.headers["Content-Security-Policy"] == "sandbox"
        assert resp.headers["Content-Disposition"] == "attachment"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        resp = requests.get(url, headers={"Authorization": f"Bearer {bob.token}"}, timeout=20)
        assert resp.status_code == 404
        assert requests.get(url, timeout=20).status_code == 401
    finally:
        alice.close()
        bob.close()


def test_artifacts_are_private_files_keyed_by_job_and_go_with_delete(make_cluster, home):
    lc = make_cluster(1, slots=1, languages="python")
    c = Cluster(lc.url, token=lc.token)
    try:
        job = c.submit("open('k.txt','w').write('kept')", collect=["k.txt"]).wait(T)
        assert job.artifact("k.txt") == b"kept"
    finally:
        c.close()
    from master.artifacts import ArtifactStore, root_for
    store = ArtifactStore(root_for(os.path.join(str(home), "history.sqlite3")))
    path = store.path(job.id, 0)
    with open(path, "rb") as f:
        assert f.read() == b"kept"
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(store.root).st_mode & 0o777 == 0o700
    store.delete(job.id)
    assert not os.path.exists(path)


def test_collected_files_finished_while_the_master_was_down_reach_the_next_one(make_cluster, tmp_path):
    """The slave keeps the files with the unacknowledged result and sends both after it registers again."""
    import psutil
    import signal

    from conftest import HOLD, UNTIL_RELEASED, job_processes_of, logs, release_jobs, wait_for
    lc = make_cluster(1, slots=1, languages="python", master_args=["--lost-grace", "60"])
    c = Cluster(lc.url, token=lc.token)
    try:
        # 5 MiB: two job_artifact frames.
        job = c.submit(HOLD + UNTIL_RELEASED + "open('big.bin', 'wb').write(b'x' * (5 << 20))\n",
                       collect=["big.bin"], name="across")
        slave = psutil.Process(lc.slaves[0].proc.pid)
        wait_for(lambda: job_processes_of(slave.pid), 30, "the job's process to start")
    finally:
        c.close()
    lc.master.stop(signal.SIGKILL)
    release_jobs(slave.pid)  # it ends with no master
    # The job's processes are the slave's children: once they are gone, its result waits for a master.
    wait_for(lambda: not job_processes_of(slave.pid), 30, "the job to end with no master")
    lc.start_master()
    with Cluster(lc.url, token=lc.token) as c2:
        j = c2.job(job.id).wait(30)
        assert j.status == P.SUCCEEDED, (j.record, logs(tmp_path))
        assert j.artifacts[0]["size"] == 5 << 20 and j.artifact("big.bin") == b"x" * (5 << 20)
