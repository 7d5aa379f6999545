"""Real attacks on the job sandbox, through a real master and slave.

These are the fresh-process sandbox's (``--no-warm``); tests/test_warm.py
makes the same attacks on the warm path.

One slave with small limits serves the module; its $DISTEXEC_HOME and job
directories live outside /tmp, so hiding them is the sandbox's work and not a
side effect of the private /tmp.  Every test ends by checking that no
process of any job is left (found by the job directory in its environment)
and that the slave still runs the next job.
"""
from __future__ import annotations

import json
import os
import re
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import psutil
import pytest

from distexec_kernel import Cluster, protocol as P
from slave import uids
from slave.bwrap import BwrapSandbox, best_sandbox
from slave.sandbox import Cgroups, Limits, NOBODY, Sandbox

from conftest import (DOUBLE_FORKING_DAEMON, FORK_UNTIL_REFUSED, SMALL_DISK_MB, SMALL_MAX_PROCS, SMALL_MEMORY_MB,
                      READ_EACH_ARG, small_limits_cluster, wait_for)

MEMORY_MB, MAX_PROCS, DISK_MB = SMALL_MEMORY_MB, SMALL_MAX_PROCS, SMALL_DISK_MB


@pytest.fixture(scope="module")
def box():
    """Outside /tmp: the job root and $DISTEXEC_HOME, removed at the end."""
    root = tempfile.mkdtemp(prefix="distexec-sandbox-test-", dir="/var/tmp")
    os.makedirs(os.path.join(root, "jobs"))
    os.makedirs(os.path.join(root, "home"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lc(box):
    cluster = small_limits_cluster(box, 2, "--no-warm")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def box_client(lc):
    with Cluster(lc.url, token=lc.token) as c:
        yield c


def job_processes(jobs_root: str) -> list[str]:
    """The names of every live process of a job of ours: its $HOME is its job directory (bwrap's too)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("HOME", "").startswith(jobs_root + os.sep) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.name())
        except (psutil.Error, OSError):
            pass
    return found


@pytest.fixture(autouse=True)
def nothing_left(request, box):
    """After each test: no process of a job survives, and the slave runs the next job."""
    yield
    if "box_client" not in request.fixturenames:
        return
    jobs = os.path.join(box, "jobs")
    wait_for(lambda: not job_processes(jobs), 15, "every process of the jobs to be gone")
    box_client = request.getfixturevalue("box_client")
    job = box_client.submit("print('still serving')", timeout=30).wait(60)
    assert (job.status, job.stdout) == (P.SUCCEEDED, "still serving\n"), job.record
    assert job_dirs(jobs) == [], "job directories left behind"


def job_dirs(jobs: str) -> list[str]:
    """What is left in the slaves' folders under ``jobs`` (each slave keeps a folder of its own, with its
    lock): a job directory still mounted or holding anything.  An ended job's empty, unmounted mount
    point is kept for a later job (slave/jobdirs.py)."""
    out = []
    for folder in os.listdir(jobs):
        for name in os.listdir(os.path.join(jobs, folder)):
            path = os.path.join(jobs, folder, name)
            if name != ".lock" and (os.path.ismount(path) or not os.path.isdir(path) or os.listdir(path)):
                out.append(os.path.join(folder, name))
    return out


def run(box_client, source: str, language: str = "python", timeout: float = 30, **kwargs):
    return box_client.submit(source, language=language, timeout=timeout, **kwargs).wait(90)


def slave_log(box) -> str:
    with open(os.path.join(box, "logs", "slave-1.log")) as f:
        return f.read()


# -- what is in force ------------------------------------------------------------


def test_slave_says_which_isolation_is_in_force(box_client, box):
    text = slave_log(box)
    assert "isolation: bubblewrap" in text, text
    assert "refused system calls: new user namespaces" in text, text
    assert f"memory {MEMORY_MB} MiB per job by cgroup" in text, text
    assert f"{MAX_PROCS} processes per job by cgroup" in text, text


def test_job_runs_as_a_uid_of_its_own_without_capabilities(box_client):
    job = run(box_client, "id -u; id -g; grep ^Cap /proc/self/status | tr '\\n' ' '; echo; echo $$", "bash")
    assert job.status == P.SUCCEEDED, job.record
    uid, gid, caps, pid = job.stdout.splitlines()
    assert uid == gid and int(uid) in range(uids.FIRST, uids.FIRST + uids.COUNT), (uid, gid)
    assert caps.split() == ["CapInh:", "0" * 16, "CapPrm:", "0" * 16, "CapEff:", "0" * 16, "CapBnd:", "0" * 16,
                            "CapAmb:", "0" * 16], caps
    # Its own PID namespace: bwrap's init is 1, the job's first process is 2.
    assert int(pid) <= 3


def test_a_jobs_uid_has_a_name_and_the_hosts_people_are_not_listed(box_client):
    # Without an account of its own a job's whoami failed and getpass.getuser() raised KeyError.
    # The backups beside the two files, and the subordinate ids, list the host's people too.
    others = " ".join(f for f in ("/etc/passwd-", "/etc/group-", "/etc/subuid", "/etc/subgid") if os.path.exists(f))
    job = run(box_client, "id -u; whoami; id -gn; python3 -c 'import getpass; print(getpass.getuser())'; "
                          f"echo x >> /etc/passwd || echo read-only; cat /etc/passwd /etc/group {others}", "bash")
    assert job.status == P.SUCCEEDED, job.record
    uid, who, group, py_who, refused, *lines = job.stdout.splitlines()
    assert who == group == py_who == f"job{uid}" and refused == "read-only", job.stdout
    passwd = [line.split(":") for line in lines if line.count(":") == 6]
    groups = [line.split(":") for line in lines if line.count(":") == 3]
    assert passwd and groups and len(passwd) + len(groups) == len(lines), lines
    for entry in passwd + groups:
        number = int(entry[2])
        assert number < 1000 or number == NOBODY or number in range(uids.FIRST, uids.FIRST + uids.COUNT), entry
    assert all(g[3] == "" for g in groups), "a group's members name the host's people"


def test_the_accounts_file_keeps_system_accounts_and_drops_peoples(monkeypatch, tmp_path):
    import pwd

    from slave import accounts
    host = [pwd.struct_passwd(("root", "x", 0, 0, "root", "/root", "/bin/bash")),
            pwd.struct_passwd(("alice", "x", 1000, 1000, "Alice", "/home/alice", "/bin/bash")),
            pwd.struct_passwd(("taken", "x", uids.FIRST + 1, 7, "", "/", "/bin/sh")),
            pwd.struct_passwd(("nobody", "x", NOBODY, NOBODY, "nobody", "/nonexistent", "/usr/sbin/nologin"))]
    monkeypatch.setattr(pwd, "getpwall", lambda: host)
    files = accounts.written(str(tmp_path / "etc"))
    text = pathlib.Path(files["/etc/passwd"]).read_text()
    names = [line.split(":")[0] for line in text.splitlines()]
    assert names[:2] == ["root", "nobody"] and "alice" not in names and "taken" not in names, names
    assert f"job{uids.FIRST}:x:{uids.FIRST}:{uids.FIRST}:" in text
    # The uid a host account holds is never a job's (uids.take): it gets no job's name either.
    assert f"job{uids.FIRST + 1}" not in text and len(names) == 2 + uids.COUNT - 1
    assert stat.S_IMODE(os.stat(files["/etc/passwd"]).st_mode) == 0o644
    os.chmod(tmp_path / "etc", 0o777)
    with pytest.raises(OSError, match="only it may write"):
        accounts.written(str(tmp_path / "etc"))


def test_the_accounts_files_replace_a_link_a_fifo_or_a_hard_link_in_their_place(tmp_path):
    """Root writes them: whatever stands at their names is replaced, never written through or waited on."""
    from slave import accounts
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o755)
    victim = tmp_path / "roots-file"
    victim.write_text("root's\n")
    (folder / "passwd").symlink_to(victim)
    os.mkfifo(folder / "group")  # an open for writing would wait for a reader for ever
    os.mkfifo(folder / "empty")  # (what covers the subordinate id lists)
    accounts.written(str(folder))
    (folder / "passwd").unlink()
    os.link(victim, folder / "passwd")  # a hard link: writing in place would change the victim
    (folder / "empty").unlink()
    (folder / "empty").symlink_to(victim)  # a truncation through it would empty the victim
    files = accounts.written(str(folder))
    for path in {*files.values(), str(folder / "empty")}:
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, path
    assert (folder / "empty").read_text() == ""
    assert victim.read_text() == "root's\n"
    (tmp_path / "linked").symlink_to(folder)  # the folder itself as a link: refused
    with pytest.raises(OSError, match="only it may write"):
        accounts.written(str(tmp_path / "linked"))


def test_job_cannot_make_a_user_namespace_or_use_keyrings(box_client):
    # As "root" in a user namespace of its own a job could mount and reach
    # kernel code that container escapes go through; keyrings would be shared
    # by every job running as nobody.
    source = textwrap.dedent("""
        import ctypes, os, threading, subprocess
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
        for flags in (CLONE_NEWUSER, CLONE_NEWUSER | CLONE_NEWNS):
            print(libc.unshare(flags), os.strerror(ctypes.get_errno()))
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 1)
        print(libc.syscall(250, 0, -4, 1), os.strerror(ctypes.get_errno()))
        print(subprocess.run(["unshare", "-U", "-r", "id"], capture_output=True, text=True).stderr.strip())
        # Threads and child processes still work (clone3 falls back to clone).
        t = threading.Thread(target=print, args=("thread ran",))
        t.start(); t.join()
        print(subprocess.run(["echo", "child ran"], capture_output=True, text=True).stdout.strip())
    """)
    job = run(box_client, source)
    assert job.status == P.SUCCEEDED, (job.error, job.stdout, job.stderr)
    assert job.stdout.splitlines() == [
        "-1 Operation not permitted", "-1 Operation not permitted", "-1 Operation not permitted",
        "unshare: unshare failed: Operation not permitted", "thread ran", "child ran"], job.stdout


# -- resource limits -----------------------------------------------------------------


def test_fork_bomb_is_stopped_and_nothing_survives(box_client):
    # The bomb's parent stays alive, so the job ends only by its timeout; the
    # pids cgroup keeps the bomb at MAX_PROCS processes meanwhile.
    job = run(box_client, ":(){ :|:& };: 2>/dev/null; sleep 60", "bash", timeout=3)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT, job.record


def test_processes_per_job_are_capped(box_client):
    job = run(box_client, FORK_UNTIL_REFUSED)
    assert job.status == P.SUCCEEDED, job.record
    # The job's own process counts too; bubblewrap's two do not.
    assert MAX_PROCS - 4 <= int(job.stdout) < MAX_PROCS, job.stdout


def test_yes_flooding_stdout_hits_the_output_limit(box_client):
    job = run(box_client, "yes", "bash", timeout=30)
    assert job.status == P.FAILED and job.error["code"] == P.OUTPUT_LIMIT, job.record
    assert len(job.stdout.encode()) <= 1 << 20


def test_memory_hog_hits_the_memory_limit(box_client):
    job = run(box_client, "x = b'x' * (1 << 30)\nprint('allocated')")
    assert job.status == P.FAILED and job.error["code"] == P.MEMORY_LIMIT, job.record
    assert "allocated" not in job.stdout
    assert f"{MEMORY_MB} MiB" in job.error["message"]


def test_memory_hog_in_a_child_process_hits_the_memory_limit(box_client):
    # The limit covers every process of the job, not one at a time.
    source = "python3 -c \"x = b'y' * (1 << 30)\"; exit $?"
    job = run(box_client, source, "bash")
    assert job.status == P.FAILED and job.error["code"] == P.MEMORY_LIMIT, job.record


def test_infinite_loop_times_out_and_leaves_no_process(box_client, box):
    jobs = os.path.join(box, "jobs")
    source = textwrap.dedent("""
        import subprocess
        subprocess.Popen(["sleep", "300"])
        print("looping", flush=True)
        while True:
            pass
    """)
    job = box_client.submit(source, timeout=3)
    # The detector sees the job's processes while it runs (bwrap, python, sleep)...
    wait_for(lambda: "sleep" in job_processes(jobs), 20, "the job's child")
    job.wait(60)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT, job.record
    assert job.stdout == "looping\n"
    # ...and the autouse check finds none of them afterwards.


def test_cancel_leaves_no_process(box_client, box):
    jobs = os.path.join(box, "jobs")
    job = box_client.submit("sleep 300 & sleep 300 & wait", language="bash", timeout=120)
    wait_for(lambda: job_processes(jobs).count("sleep") == 2, 20, "the sleeps")
    job.cancel()
    job.wait(60)
    assert job.status == P.CANCELLED, job.record
    wait_for(lambda: not job_processes(jobs), 15, "the cancelled job's processes to be gone")


def test_double_forking_daemon_is_gone_after_the_job(box_client, box):
    job = run(box_client, DOUBLE_FORKING_DAEMON)
    assert (job.status, job.stdout) == (P.SUCCEEDED, "daemon up\n"), job.record
    # The autouse check: the daemon died with the job's PID namespace.


def test_cpu_time_is_limited_beyond_the_timeout(tmp_path):
    # RLIMIT_CPU is the backstop should the wall-clock watch fail: the kernel
    # stops a spinning process at (timeout x cores + margin) seconds of CPU.
    sandbox = Sandbox()
    spawn = sandbox.command(["python3", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_CPU))"],
                            str(tmp_path), {}, Limits(), timeout=2)
    try:
        out = subprocess.run(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec,
                             capture_output=True, text=True, timeout=30).stdout
    finally:
        sandbox.cleanup(spawn)
    soft, hard = json.loads(out.replace("(", "[").replace(")", "]"))
    assert soft == 2 * (os.cpu_count() or 1) + 5 and hard == soft + 1


def test_file_size_is_limited(box_client):
    source = textwrap.dedent("""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        print(resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        try:
            with open("big", "wb") as f:
                for _ in range(300):
                    f.write(b"0" * (1 << 20))
        except OSError as exc:
            print(exc.strerror)
    """)
    job = run(box_client, source)
    # Its disk limit (one file may fill it, no more) ended the writing; the program handled the error
    # and exited 0, and still fails disk_limit: what it meant to write was refused.
    assert (job.status, job.error["code"], job.exit_code) == (P.FAILED, P.DISK_LIMIT, 0), (job.error, job.stderr)
    fsize, nofile = job.stdout.splitlines()[0].split()
    assert (int(fsize), int(nofile)) == (DISK_MB, 256)
    assert "No space left on device" in job.stdout


# -- network ---------------------------------------------------------------------------

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
        print("connected")
    except OSError as exc:
        print(type(exc).__name__)
""")


def test_no_network_by_default(box_client, lc):
    job = run(box_client, CONNECT, args=[str(lc.port)])
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout.strip() in ("ConnectionRefusedError", "OSError"), job.stdout


def test_network_when_the_slave_allows_it(make_cluster):
    other = make_cluster(1, slots=1, slave_args=["--allow-network"])
    with Cluster(other.url, token=other.token) as c:
        job = run(c, CONNECT, args=[str(other.port)])
    assert (job.status, job.stdout) == (P.SUCCEEDED, "connected\n"), job.record


# -- secrets and other jobs ------------------------------------------------------------


def test_job_sees_no_secret_in_its_environment(box_client, lc):
    job = run(box_client, "import os, json; print(json.dumps(dict(os.environ)))")
    assert job.status == P.SUCCEEDED, job.record
    env = json.loads(job.stdout)
    assert not [k for k in env if k.startswith("DISTEXEC")], env
    assert lc.token not in job.stdout and lc.secret not in job.stdout


def test_job_cannot_read_the_slaves_files(box_client, lc, box):
    home = os.path.join(box, "home")
    # World-readable on purpose: only the sandbox stands between it and the job.
    secret_file = os.path.join(home, "connection.json")
    with open(secret_file, "w") as f:
        json.dump({"token": lc.token, "slave_secret": lc.secret}, f)
    os.chmod(secret_file, 0o644)
    uid_files = [n for n in os.listdir(home) if n.endswith(".uid")]
    assert uid_files, os.listdir(home)
    slave_pid = lc.slaves[0].pid
    source = READ_EACH_ARG + textwrap.dedent("""
        print("home listing", os.path.exists(os.path.dirname(sys.argv[1])) and os.listdir(os.path.dirname(sys.argv[1])))
    """)
    paths = [secret_file, os.path.join(home, uid_files[0]), f"/proc/{slave_pid}/environ", "/etc/shadow",
             os.path.expanduser("~/.bash_history")]
    job = run(box_client, source, args=paths)
    assert job.status == P.SUCCEEDED, job.record
    assert "READ" not in job.stdout, job.stdout
    assert lc.token not in job.stdout and lc.secret not in job.stdout
    assert "home listing []" in job.stdout or "home listing False" in job.stdout, job.stdout


def test_a_job_cannot_read_or_list_the_hosts_home_folders(bwrap_sandbox, jobdir):
    """A file of one of the host's people, readable by every local account, is not for jobs sent from
    elsewhere: /home is an empty folder to a job.  Before, a job listed and read it."""
    person = tempfile.mkdtemp(prefix="distexec-test-person-", dir="/home")
    try:
        os.chmod(person, 0o755)
        notes = os.path.join(person, "notes.txt")
        with open(notes, "w") as f:
            f.write("private notes\n")
        os.chmod(notes, 0o644)
        ran = _in_sandbox(bwrap_sandbox, Limits(), jobdir, ["sh", "-c", f"ls -a /home; cat {notes}"])
        assert ran.stdout.split() == [".", ".."], ran.stdout
        assert "private notes" not in ran.stdout and "No such file" in ran.stderr, ran.stderr
    finally:
        shutil.rmtree(person)


def test_job_cannot_see_another_jobs_directory(box_client, box):
    first = box_client.submit(textwrap.dedent("""
        import os, time
        open("private.txt", "w").write("first job's data")
        print(os.getcwd(), flush=True)
        time.sleep(60)
    """), timeout=90)
    wait_for(lambda: first.stdout, 20, "the first job's directory")
    other_dir = first.stdout.strip()
    assert other_dir.startswith(os.path.join(box, "jobs"))
    probe = textwrap.dedent("""
        import os, sys
        d = sys.argv[1]
        # The slave's folder of job directories (two levels up: <folder>/<job>/work) shows only this job's.
        mine = os.path.dirname(os.getcwd())
        print(os.getcwd() != d, os.path.exists(d),
              os.listdir(os.path.dirname(mine)) == [os.path.basename(mine)])
        # Nor among its mounts: bwrap covered the other job's tmpfs, and it was listed all the same.
        table = open("/proc/self/mountinfo").read()
        print(os.path.basename(os.path.dirname(d)) in table, os.path.basename(mine) in table)
        try:
            print(open(os.path.join(d, "private.txt")).read())
        except OSError as exc:
            print(type(exc).__name__)
    """)
    try:
        job = run(box_client, probe, args=[other_dir])
    finally:
        first.cancel()
        first.wait(60)
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout.splitlines() == ["True False True", "False True", "FileNotFoundError"], job.stdout


def test_a_job_plants_nothing_in_its_top_which_each_step_clones_by_path(box_client):
    """Each step's process clones the job's top (its tmpfs root) by path, as root (``mountview.Spaces.entry``,
    open_tree).  The job never reaches that path: only its directory and its /tmp and /dev/shm are bound
    in, and the directory above its own is bwrap's, on another file system.  A symlink, a FIFO, a hard
    link or its own directory moved there are refused, and each step of a compiled job (two clones of
    the top) still runs."""
    job = run(box_client, 'echo x > f\n'
                          '[ "$(stat -c %d .)" = "$(stat -c %d ..)" ] && echo "the top is in reach"\n'
                          'for op in "ln -s / ../planted" "mkfifo ../planted" "ln f ../planted" "mv $PWD ../moved"; do\n'
                          '  $op 2>/dev/null && echo "made: $op"\n'
                          'done\n'
                          'ls -A ..', "bash")
    assert job.status == P.SUCCEEDED, job.stderr
    assert job.stdout == "work\n", job.stdout
    compiled = run(box_client, '#include <stdio.h>\nint main(void) { puts("ran"); return 0; }\n', "c", timeout=60)
    assert compiled.status == P.SUCCEEDED and compiled.stdout == "ran\n", compiled.stderr


def test_symlink_out_of_the_job_directory_leaks_nothing(box_client, lc, box):
    secret_file = os.path.join(box, "home", "connection.json")
    with open(secret_file, "w") as f:
        json.dump({"token": lc.token}, f)
    os.chmod(secret_file, 0o644)
    with open("/etc/shadow") as f:
        shadow = f.read()
    script = textwrap.dedent(f"""
        ln -s /etc/shadow shadow_link
        ln -s {secret_file} secret_link
        ln /etc/shadow hard_link 2>&1 || echo "no hard link"
        cat shadow_link secret_link hard_link 2>&1
        ls -l
    """)
    job = run(box_client, script, "bash")
    assert lc.token not in job.stdout + job.stderr
    assert "root:" not in job.stdout + job.stderr
    assert "Permission denied" in job.stdout and "No such file" in job.stdout, job.stdout
    assert shadow  # the test itself could read it: the job could not


def test_chown_of_the_job_directory_never_follows_links(tmp_path):
    # A step runs as nobody and may plant links; the next step's preparation
    # (as root) must not hand their targets to nobody.
    target = tmp_path / "root-owned"
    target.write_text("keep me")
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "source.c").write_text("int main(){}")
    os.symlink(target, workdir / "link")
    os.link(target, workdir / "hard")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "inner").write_text("keep me too")
    os.symlink(outside, workdir / "dirlink")  # not walked into
    os.mkfifo(workdir / "fifo")  # chowned without being opened: never blocks
    sandbox = BwrapSandbox(None)
    spawn = sandbox.command(["true"], str(workdir), {}, Limits())
    sandbox.cleanup(spawn)
    assert os.stat(target).st_uid == 0
    assert os.stat(outside).st_uid == 0 and os.stat(outside / "inner").st_uid == 0
    assert os.stat(workdir / "source.c").st_uid == NOBODY
    assert os.stat(workdir).st_uid == NOBODY


# -- other languages through the sandbox ------------------------------------------------


def _in_sandbox(sandbox, limits, workdir, argv):
    spawn = sandbox.command(argv, str(workdir), {}, limits, timeout=60)
    try:
        return subprocess.run(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec,
                              capture_output=True, text=True, timeout=120, start_new_session=True)
    finally:
        sandbox.cleanup(spawn)


@pytest.fixture(scope="module")
def bwrap_sandbox():
    sandbox = best_sandbox(Limits())
    assert isinstance(sandbox, BwrapSandbox), sandbox.describe()
    yield sandbox
    sandbox.close()


@pytest.fixture
def jobdir():
    """A job directory where the runner makes one by default: straight in the system's temp dir."""
    path = tempfile.mkdtemp(prefix="distexec-job-")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_tmp_is_private_and_writable_next_to_the_job_directory(bwrap_sandbox, jobdir):
    outside = tempfile.mkdtemp(prefix="distexec-other-")
    try:
        ran = _in_sandbox(bwrap_sandbox, Limits(), jobdir, [
            "sh", "-c", f"touch /tmp/scratch && stat -c %a /tmp && ls -a /tmp && ls {outside} 2>&1"])
    finally:
        os.rmdir(outside)
    lines = ran.stdout.splitlines()
    assert lines[0] == "1777", ran.stdout + ran.stderr
    # Only this job's directory, what the job wrote, and the way to a toolchain
    # shown again read-only (the slave's own Python, when it lives under /tmp):
    # not the host's /tmp.
    shown = {os.path.relpath(p, "/tmp").split(os.sep)[0] for p in bwrap_sandbox.expose
             if p.startswith("/tmp/")}
    listed = lines[1:-1]
    assert sorted(listed) == sorted([".", "..", jobdir.name, "scratch", *shown]), ran.stdout
    assert outside.split("/")[-1] not in listed
    assert "No such file" in lines[-1]
    assert not os.path.exists("/tmp/scratch")


# Run as root in a mount namespace whose mounts are shared, as systemd makes the host's: a job's tmpfs
# mounted before a step starts, and one mounted while it runs, beside the step's own.
ON_A_SHARED_HOST = textwrap.dedent("""
    import json, subprocess, sys
    from slave.bwrap import BwrapSandbox, best_sandbox
    from slave.jobdirs import JobDirs
    from slave.sandbox import Limits
    box = best_sandbox(Limits())
    assert isinstance(box, BwrapSandbox), box.describe()
    dirs = JobDirs("shared-host", sys.argv[1], disk_limit_mb=8)
    before, mine = dirs.make("before"), dirs.make("mine")
    spawn = box.command(["sh", "-c", "echo up; read go; cat /proc/self/mountinfo"], mine.path, {}, Limits(),
                        timeout=60, tmpdirs=mine.sandbox_tmp)
    step = subprocess.Popen(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    assert step.stdout.readline() == "up\\n"
    later = dirs.make("later")
    table, _ = step.communicate("go\\n", timeout=60)
    box.cleanup(spawn)
    for jd in (before, mine, later):
        dirs.remove(jd)
    dirs.close()
    box.close()
    print(json.dumps({"table": table, **{k: jd.top for k, jd in (("before", before), ("mine", mine),
                                                                   ("later", later))}}))
""")


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare(1)")
def test_a_step_lists_no_other_jobs_tmpfs_mounted_before_it_or_while_it_runs(tmp_path):
    """On a host whose / is shared (systemd's default) every job's tmpfs mounted later arrived in
    running sandboxes too; covered ones were listed before it anyway.  Neither is now."""
    done = subprocess.run(["unshare", "--mount", "--propagation", "shared", "--", sys.executable, "-c",
                           ON_A_SHARED_HOST, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    points = [line.split()[4] for line in seen["table"].splitlines()]
    assert seen["mine"] in points, points
    assert not [p for p in points if os.path.basename(seen["before"]) in p or os.path.basename(seen["later"]) in p]


# Run as root in a mount namespace of its own: mounts the "host" adds after the sandboxes' table was made.
ADDED_LATER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from slave.bwrap import BwrapSandbox, best_sandbox
    from slave.jobdirs import JobDirs
    from slave.sandbox import Limits
    box = best_sandbox(Limits())
    assert isinstance(box, BwrapSandbox), box.describe()
    dirs = JobDirs("added-later", sys.argv[1], disk_limit_mb=8)
    mine = dirs.make("mine")

    def step():
        spawn = box.command(["sh", "-c", "cat /proc/self/mountinfo; cat /srv/marker 2>/dev/null; true"], mine.path,
                            {}, Limits(), timeout=60, tmpdirs=mine.sandbox_tmp)
        try:
            return subprocess.run(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec, text=True,
                                  capture_output=True, timeout=60, start_new_session=True, check=True).stdout
        finally:
            box.cleanup(spawn)

    def until(predicate, what):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = step()
            if predicate(out):
                return out
        raise SystemExit(f"never, in 30 s: {what}")

    first = step()
    other = dirs.make("other")
    covered = os.path.join(sys.argv[1], "covered")
    os.mkdir(covered)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "covered", covered], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "added", "/srv"], check=True)
    with open("/srv/marker", "w") as f:
        f.write("added on the host\\n")
    seen = until(lambda out: "added on the host" in out, "a mount the host added reaches a step")
    subprocess.run(["umount", "/srv"], check=True)
    gone = until(lambda out: " /srv " not in out, "a mount the host removed leaves the steps")
    subprocess.run(["umount", covered], check=True)
    for jd in (mine, other):
        dirs.remove(jd)
    dirs.close()
    box.close()
    print(json.dumps({"first": first, "seen": seen, "gone": gone, "mine": mine.top, "other": other.top,
                      "covered": covered}))
""")


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare(1)")
def test_steps_share_a_table_made_once_that_follows_the_hosts_own_mounts_and_never_lists_a_jobs(tmp_path):
    """slave/mountview.py makes the sandboxes' table once: a job's tmpfs mounted after it is still
    in no step's table but its own, while a mount the host adds (outside what bwrap covers) reaches
    the steps started after it, and one it removes leaves them."""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c",
                           ADDED_LATER, str(tmp_path)], capture_output=True, text=True, timeout=180,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    for name in ("first", "seen", "gone"):
        points = [line.split()[4] for line in seen[name].splitlines() if len(line.split()) > 4]
        assert seen["mine"] in points, (name, points)
        assert not [p for p in points if os.path.basename(seen["other"]) in p or p == seen["covered"]], points
    assert "/srv" in [line.split()[4] for line in seen["seen"].splitlines() if len(line.split()) > 4]


def test_c_compiles_and_runs_inside(bwrap_sandbox, jobdir):
    tmp_path = jobdir
    limits = Limits(memory_mb=MEMORY_MB, max_procs=MAX_PROCS)
    (tmp_path / "main.c").write_text('#include <stdio.h>\nint main(){printf("hi from C\\n");return 0;}\n')
    gcc = _in_sandbox(bwrap_sandbox, limits, tmp_path, ["gcc", "-O2", "-o", "main.bin", "main.c"])
    assert gcc.returncode == 0, gcc.stderr
    ran = _in_sandbox(bwrap_sandbox, limits, tmp_path, ["./main.bin"])
    assert (ran.returncode, ran.stdout) == (0, "hi from C\n"), ran.stderr


def test_java_compiles_and_runs_inside_with_the_default_limits(bwrap_sandbox, tmp_path):
    # The JVM reserves far more address space than it uses: fine under a
    # memory cgroup, where RLIMIT_AS would have killed it.
    limits = Limits()
    (tmp_path / "Main.java").write_text(
        'public class Main { public static void main(String[] a) { System.out.println("hi from Java"); } }\n')
    javac = _in_sandbox(bwrap_sandbox, limits, tmp_path, ["javac", "Main.java"])
    assert javac.returncode == 0, javac.stderr
    ran = _in_sandbox(bwrap_sandbox, limits, tmp_path, ["java", "-cp", ".", "Main"])
    assert (ran.returncode, ran.stdout) == (0, "hi from Java\n"), ran.stderr


def test_java_sizes_its_heap_to_the_memory_cgroup(bwrap_sandbox, tmp_path):
    limits = Limits(memory_mb=MEMORY_MB, max_procs=MAX_PROCS)
    ran = _in_sandbox(bwrap_sandbox, limits, tmp_path, ["java", "-XX:+PrintFlagsFinal", "-version"])
    assert ran.returncode == 0, ran.stderr
    max_heap = next(int(line.split()[3]) for line in ran.stdout.splitlines() if " MaxHeapSize " in line)
    assert max_heap <= MEMORY_MB << 20, max_heap


# -- without bubblewrap -----------------------------------------------------------------


def test_fallback_says_clearly_that_there_is_no_isolation(monkeypatch, tmp_path):
    # A PATH without bwrap, as on a machine that lacks it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for prog in ("true", "id"):
        os.symlink(shutil.which(prog), bindir / prog)
    monkeypatch.setenv("PATH", str(bindir))
    sandbox = best_sandbox(Limits(memory_mb=MEMORY_MB))
    try:
        assert type(sandbox) is Sandbox
        text = sandbox.describe()
        assert "isolation: NONE" in text and "bwrap and setpriv not found" in text, text
        # Still limited by cgroups: a memory hog is stopped by the kernel.
        spawn = sandbox.command([sys.executable, "-c", "x = b'x' * (1 << 30)"], str(tmp_path), {},
                                Limits(memory_mb=MEMORY_MB), timeout=30)
        try:
            done = subprocess.run(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec,
                                  capture_output=True, timeout=60)
            assert done.returncode == -9 and sandbox.memory_exceeded(spawn) and not spawn.watch_memory
        finally:
            sandbox.cleanup(spawn)
    finally:
        sandbox.close()


def test_sandbox_bwrap_refuses_to_start_a_slave_without_isolation(tmp_path, home):
    # An operator who wants isolation or nothing: no silent fallback.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = dict(os.environ, PATH=str(bindir), DISTEXEC_HOME=str(home))
    done = subprocess.run([sys.executable, "-m", "slave", "--master", "http://127.0.0.1:9", "--secret", "s",
                           "--sandbox", "bwrap"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--sandbox bwrap: bubblewrap cannot isolate jobs here: bwrap and setpriv not found" in done.stderr


def test_sandbox_none_is_said_at_start(make_cluster, tmp_path):
    other = make_cluster(1, slots=1, slave_args=["--sandbox", "none"])
    with Cluster(other.url, token=other.token) as c:
        job = run(c, "id -u", "bash")
    assert (job.status, job.stdout) == (P.SUCCEEDED, f"{os.getuid()}\n"), job.record
    text = (tmp_path / "logs" / "slave-1.log").read_text()
    assert "isolation: NONE (--sandbox none)" in text, text


def test_a_broken_bwrap_is_refused_with_the_reason(tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    why = BwrapSandbox(None, bwrap=str(fake)).probe(Limits())
    assert why is not None and "No permissions to create new namespace" in why


def test_without_cgroups_the_runner_polls_memory_and_says_so():
    sandbox = Sandbox(Cgroups(mounts={}))
    text = sandbox.describe()
    assert "polled every 50 ms" in text and "no cgroup hierarchy offers it (v1 or v2)" in text, text
    assert "daemon that calls setsid() survives" in text
    spawn = sandbox.command(["true"], "/", {}, Limits())
    assert spawn.watch_memory and spawn.cgroup is None
    sandbox.cleanup(spawn)


def test_cgroups_of_finished_steps_are_removed(bwrap_sandbox, tmp_path):
    limits = Limits()
    before = {c: set(os.listdir(b)) for c, b in bwrap_sandbox.cgroups.base.items()}
    ran = _in_sandbox(bwrap_sandbox, limits, tmp_path, ["sh", "-c", "sleep 100 & sleep 100 & echo started"])
    assert ran.stdout == "started\n"
    after = {c: set(os.listdir(b)) for c, b in bwrap_sandbox.cgroups.base.items()}
    assert after == before
    assert all(stat.S_ISDIR(os.stat(b).st_mode) for b in bwrap_sandbox.cgroups.base.values())


def test_killing_a_step_leaves_no_zombie(bwrap_sandbox, jobdir):
    # The runner's kill on a timeout: bwrap must reap the namespace's init
    # itself, not leave it to the system's init as a zombie.
    spawn = bwrap_sandbox.command(["sh", "-c", "sleep 300 & setsid sleep 301 & exec sleep 302"], str(jobdir),
                                  {}, Limits(), timeout=60)
    try:
        proc = subprocess.Popen(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec,
                                start_new_session=True)
        wait_for(lambda: len(spawn.cgroup.pids()) >= 5, 20, "the step's processes")
        inside = spawn.cgroup.pids() - {proc.pid}
        bwrap_sandbox.kill(spawn, proc.pid)
        assert proc.wait(20) == 128 + 9 or proc.returncode == -9
        # Right away, not eventually: nothing of the step is left, not even a zombie.
        assert [pid for pid in inside if psutil.pid_exists(pid)] == []
    finally:
        bwrap_sandbox.cleanup(spawn)


def test_a_killed_slave_takes_its_jobs_with_it(make_cluster, tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    other = make_cluster(1, slots=1, slave_args=["--workdir", str(jobs), "--no-warm"])
    with Cluster(other.url, token=other.token) as c:
        c.submit("sleep 300 & setsid sleep 301 & wait", language="bash", timeout=600)
        wait_for(lambda: job_processes(str(jobs)).count("sleep") == 2, 20, "the job's sleeps")
    dead = other.slaves[0]
    dead.proc.kill()
    dead.proc.wait(10)
    # bwrap dies with its parent, and the job's PID namespace with bwrap.
    wait_for(lambda: not job_processes(str(jobs)), 15, "the job's processes to die with the slave")
    # The next slave on the machine clears the dead one's cgroups.
    def stale():
        return [entry for ctrl in ("memory", "pids") for entry in os.listdir(f"/sys/fs/cgroup/{ctrl}/distexec")
                if entry.startswith(f"slave-{dead.pid}-")]
    assert len(stale()) == 2
    other.start_slave()
    assert stale() == []


def test_a_jobs_cgroup_name_tells_nothing_of_how_many_steps_ran_before(box_client):
    # Named by a count, the cgroup in /proc/self/cgroup told a job how many steps the slave had run:
    # two jobs a while apart measured the other users' activity between them.
    probe = "open('kept', 'w').close()\nprint(open('/proc/self/cgroup').read())"
    names = []
    for _ in range(3):
        job = run(box_client, probe, collect=["kept"])  # collected: a fresh process, a cgroup of its own
        assert job.status == P.SUCCEEDED, job.record
        names.append({line.rsplit("/", 1)[1] for line in job.stdout.split() if "/distexec/" in line})
    assert all(len(n) == 1 for n in names) and len(set.union(*names)) == 3, names
    assert not any(re.fullmatch(r"job-\d{1,6}", name) for n in names for name in n), names


def test_cgroup_tree_shows_only_the_jobs_own(box_client):
    """Before, /sys/fs/cgroup showed every job's cgroup, and so its memory use."""
    other = box_client.submit("import time\nprint('up', flush=True)\ntime.sleep(60)", timeout=90)
    wait_for(lambda: box_client.job(other.id).stdout, 30, "the other job to start")
    probe = textwrap.dedent("""
        import os
        own = {l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup")}
        seen = []
        for root, dirs, files in os.walk("/sys/fs/cgroup"):
            if "cgroup.procs" in files:
                seen.append(root)
        print(len(seen))
        for path in seen:
            ctrl, rel = path[len("/sys/fs/cgroup/"):].split("/", 1)
            print(ctrl, "/" + rel in own)
        memory = next(p for p in seen if p.startswith("/sys/fs/cgroup/memory/"))
        print(int(open(memory + "/memory.limit_in_bytes").read()) >> 20)
    """)
    try:
        job = run(box_client, probe)
    finally:
        other.cancel()
        other.wait(60)
    assert job.status == P.SUCCEEDED, job.record
    lines = job.stdout.splitlines()
    # Its memory and pids cgroups, nothing else: no other job's, no hierarchy root.
    assert lines[0] == "2", job.stdout
    assert sorted(lines[1:3]) == ["memory True", "pids True"], job.stdout
    assert lines[3] == str(MEMORY_MB), job.stdout
