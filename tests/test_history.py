"""The history's bounds: retention, pruning by hand, rejected jobs kept small, private files."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import argon2
import pytest
import requests

from distexec_kernel import Cluster, config, protocol as P
from distexec_kernel.cluster import DistexecError
from distexec_kernel.local import LocalCluster
from master import auth

from conftest import users_json, wait_for

CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
SLEEPER = "import time\ntime.sleep(60)\n"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_prune_by_hand_keeps_queued_and_running_jobs_and_never_reuses_ids(make_cluster, tmp_path):
    users = users_json(tmp_path, "alice")
    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users])
    with Cluster(lc.url, token=lc.token) as c:
        old = [c.submit(f"print({i})").wait(30) for i in range(3)]
        rejected = c.submit("print(", name="broken")
        assert rejected.status == P.REJECTED
        running = c.submit(SLEEPER, timeout=60)
        wait_for(lambda: c.job(running.id).status == P.RUNNING, 20, "the sleeper to run")
        queued = c.submit("print('still queued')")
        # A user may not prune; the answer says why.
        with Cluster(lc.url, user="alice", password="alice-pw") as alice:
            with pytest.raises(DistexecError) as refused:
                alice.prune(before="2999-01-01")
            assert refused.value.status == 403 and refused.value.code == "forbidden"
        with pytest.raises(DistexecError) as bad:
            c.prune(before="yesterday")
        assert bad.value.status == 400
        assert c.prune(before="2000-01-01") == 0

        done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "prune", "--before", "2999-01-01",
                               "--url", lc.url, "--token", lc.token], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "pruned 4 job(s)"
        left = {j.id: j.status for j in c.jobs()}
        assert left == {running.id: P.RUNNING, queued.id: P.QUEUED}
        for gone in old + [rejected]:
            with pytest.raises(DistexecError):
                c.job(gone.id)
        # The queued job still has its inputs, and runs.
        c.cancel(running.id)
        assert c.job(queued.id).wait(30).stdout == "still queued\n"
        assert c.prune(before="2999-01-01") == 2
        # The pruned ids are never given again, also after a restart.
        top = queued.id
    lc.restart_master()
    with Cluster(lc.url, token=lc.token) as c:
        assert c.submit("print('new')").id > top


def test_retention_prunes_the_oldest_finished_jobs_past_the_size_bound(make_cluster):
    # 0.05 MiB holds about two of these jobs (20 KiB of output each), not five.
    lc = make_cluster(1, slots=1, languages="python", master_args=["--keep-mb", "0.05", "--prune-interval", "0.2"])
    with Cluster(lc.url, token=lc.token) as c:
        busy = c.submit(SLEEPER, timeout=60)
        wait_for(lambda: c.job(busy.id).status == P.RUNNING, 20, "the sleeper to run")
        waiting = c.submit("print('x' * 30000)")
        c.cancel(busy.id)
        done = [waiting.wait(30)] + [c.submit("print('x' * 20000)").wait(30) for _ in range(4)]
        blocker = c.submit(SLEEPER, timeout=60)
        wait_for(lambda: c.job(blocker.id).status == P.RUNNING, 20, "the second sleeper to run")
        pending = c.submit("print('pending ' * 10000)")

        def left() -> set[int]:
            return {j.id for j in c.jobs()}
        wait_for(lambda: done[2].id not in left(), 20, "the oldest finished jobs to be pruned")
        kept = left()
        # The newest finished ones stay, within the bound; never the running or queued ones.
        assert {blocker.id, pending.id} <= kept and done[-1].id in kept
        assert not {d.id for d in done[:3]} & kept
        c.cancel(blocker.id)
        # Read from its events: once it has ended it may be pruned at once (the bound is small).
        wait_for(lambda: pending.status == P.SUCCEEDED, 30, "the queued job to run and succeed")


def test_the_size_bound_is_shared_out_so_one_users_flood_prunes_their_own_history(make_cluster, tmp_path):
    # Pruning past --keep-mb took the oldest finished jobs whoever owned them: one user storing big
    # outputs erased everyone else's history, and the queued jobs' inputs (never pruned) were counted,
    # so each pass deleted every finished job.  No pass is due here (an hour): the size is watched.
    users = users_json(tmp_path, "alice", "bob")
    lc = make_cluster(1, slots=1, languages="python",
                      master_args=["--users", users, "--keep-mb", "0.25", "--prune-interval", "3600"])
    with Cluster(lc.url, token=lc.token) as admin, \
            Cluster(lc.url, user="alice", password="alice-pw") as alice, \
            Cluster(lc.url, user="bob", password="bob-pw") as bob:
        bobs = bob.submit("print('b' * 20000)").wait(60)
        assert bobs.status == P.SUCCEEDED
        busy = alice.submit(SLEEPER, timeout=60)
        wait_for(lambda: alice.job(busy.id).status == P.RUNNING, 20, "alice's sleeper to run")
        queued = alice.submit("import sys\nprint(len(sys.stdin.read()))", stdin="s" * 400_000)
        assert alice.job(queued.id).status == P.QUEUED  # read back: the master holds it
        assert admin.prune() == 0  # 400 KB of queued inputs, over the bound: not counted, nothing taken
        alice.cancel(busy.id)
        assert queued.wait(60).stdout == "400000\n"
        floods = [alice.submit("print('a' * 60000)").wait(60) for _ in range(2)]

        def kept() -> set[int]:
            return {j.id for j in admin.jobs(limit=100)}
        wait_for(lambda: queued.id not in kept(), 20, "alice's oldest big job to be pruned")
        assert bobs.id in kept() and floods[-1].id in kept(), kept()
        assert bob.job(bobs.id).stdout == "b" * 20000 + "\n"


def test_the_share_of_the_bound_cuts_the_biggest_users_to_one_level():
    from distexec_kernel.fairshare import level as share
    assert share([3, 10, 400], 100) == 87  # the two small users keep all; the big one is cut to the rest
    assert share([60, 60], 100) == 50
    assert share([30, 40], 100) == float("inf")  # under the bound: nothing to cut
    assert share([], 0) == float("inf")


def test_retention_by_age(make_cluster):
    # 0.00002 days is 1.7 s.
    lc = make_cluster(1, slots=1, languages="python", master_args=["--keep-days", "0.00002",
                                                                   "--prune-interval", "0.2"])
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit("print(1)").wait(30)
        running = c.submit(SLEEPER, timeout=60)
        wait_for(lambda: job.id not in {j.id for j in c.jobs()}, 20, "the finished job to age out")
        assert c.job(running.id).status == P.RUNNING  # old enough, but not finished: kept
        c.cancel(running.id)


def test_a_rejected_job_keeps_at_most_64_kib_of_source_and_no_files_or_stdin(client):
    source = "x = (\n" + "# padding\n" * 40_000  # 400 KiB that never parses
    job = client.submit(source, files={"data.txt": "d" * (1 << 20)}, stdin="s" * (1 << 20),
                        args=["a" * 100_000])
    assert job.status == P.REJECTED and job.error["code"] == P.SYNTAX_ERROR
    for record in (job.record, client.job(job.id).record):
        assert record["source"] == source[:P.REJECTED_SOURCE_BYTES]
        assert record["files"] == {} and record["stdin"] is None and record["args"] == []
    small = client.submit("print(", files={"f": "kept?"}, stdin="in")
    assert client.job(small.id).source == "print(" and client.job(small.id).record["files"] == {}


def test_home_and_history_files_are_private(tmp_path, monkeypatch):
    home = tmp_path / "fresh" / "home"  # does not exist yet
    monkeypatch.setenv("DISTEXEC_HOME", str(home))
    lc = LocalCluster(1, slots=1, languages="python", home=str(home), log_dir=str(tmp_path / "logs"))
    with lc:
        with Cluster(lc.url, token=lc.token) as c:
            assert c.submit("print(1)").wait(30).status == P.SUCCEEDED
        db = home / "history.sqlite3"
        assert mode(home) == 0o700
        for path in (db, f"{db}-wal", f"{db}-shm", home / "connection.json"):
            assert mode(path) == 0o600, path

    # A home and history made by an older version (0755, 0644) are narrowed at start.
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    db = old / "history.sqlite3"
    db.touch()
    os.chmod(db, 0o644)
    monkeypatch.setenv("DISTEXEC_HOME", str(old))
    with LocalCluster(0, home=str(old), log_dir=str(tmp_path / "logs2")) as lc:
        assert requests.get(lc.url + "/api/health", timeout=10).status_code == 200
        assert mode(old) == 0o700 and mode(db) == 0o600
        assert mode(f"{db}-wal") == 0o600


def test_user_add_makes_the_default_home_private(tmp_path, monkeypatch, capsys):
    import io

    from distexec_kernel import cli
    home = tmp_path / "new-home"
    monkeypatch.setenv("DISTEXEC_HOME", str(home))
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    monkeypatch.setattr(auth, "_hasher", CHEAP)
    assert cli.main(["user", "add", "carol", "--password-stdin"]) == 0
    assert mode(home) == 0o700 and mode(home / "users.json") == 0o600


def test_pruning_a_job_deletes_its_collected_files(make_cluster, home):
    lc = make_cluster(1, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit("open('out.txt', 'w').write('kept')", collect=["out.txt"]).wait(60)
        assert job.status == P.SUCCEEDED and job.artifact("out.txt") == b"kept"
        folder = os.path.join(str(home), "history-artifacts", str(job.id))
        assert os.path.isdir(folder)
        assert c.prune(before="2999-01-01") >= 1
        wait_for(lambda: not os.path.exists(folder), 15, "the pruned job's files to go")


def test_a_slave_alone_on_its_host_makes_its_home_private(make_cluster, tmp_path):
    # No master ever ran on this host: the slave is the first to make $DISTEXEC_HOME, and the
    # compile cache it keeps there holds users' programs.
    lc = make_cluster(0, slots=1, languages="c")
    home = tmp_path / "slave-host" / "home"
    lc.home = str(home)  # the slave's environment is made from it (LocalCluster._env)
    lc.start_slave()
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit('#include <stdio.h>\nint main(void) { puts("mine"); return 0; }', language="c").wait(60)
    assert job.status == P.SUCCEEDED and job.stdout == "mine\n"
    assert mode(home) == 0o700
    assert [p for p in (home / "cache" / "compile").rglob("*") if p.is_file()]  # the program is kept in there


def test_folders_that_are_not_distexecs_own_are_never_narrowed(make_cluster, tmp_path, monkeypatch):
    # DISTEXEC_HOME=/srv, --db /srv/data/history.sqlite3: chmod 0700 there would lock every other user out.
    theirs = tmp_path / "srv"
    theirs.mkdir()
    os.chmod(theirs, 0o755)
    (theirs / "their-data").write_text("x")
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    monkeypatch.setenv("DISTEXEC_HOME", str(theirs))
    lc = make_cluster(1, slots=1, languages="c", home=str(theirs), db=str(data / "history.sqlite3"))
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit('#include <stdio.h>\nint main(void) { puts("mine"); return 0; }', language="c").wait(60)
    assert job.status == P.SUCCEEDED
    assert mode(data) == 0o755 and mode(theirs) == 0o755
    # What distexec keeps there is private all the same.
    assert mode(data / "history.sqlite3") == 0o600 and mode(theirs / "connection.json") == 0o600
    cache = theirs / "cache" / "compile"
    assert mode(cache) == 0o700 and [p for p in cache.rglob("*") if p.is_file()]
    assert "is not distexec's own folder: left as it is" in (tmp_path / "logs" / "master.log").read_text()


def test_a_folder_left_readable_is_told_of_once(tmp_path, caplog):
    """A master keeps its connection file, history and logins in its home, each checked: a lab's home
    left 0755 (useradd's default) was told of three times in a row at each start."""
    home = tmp_path / "var-lib-distexec"
    home.mkdir()
    os.chmod(home, 0o755)
    (home / ".profile").write_text("# useradd's\n")  # not distexec's own folder: left as it is
    with caplog.at_level(logging.WARNING, logger="distexec"):
        for _ in range(3):
            assert config.private_dir(str(home)) == str(home)
    told = [r.getMessage() for r in caplog.records if "readable by others" in r.getMessage()]
    assert told == [f"{home} is readable by others (mode 755) and is not distexec's own folder: left as it is; "
                    "distexec's files in it are private (0600) all the same"]
    assert mode(home) == 0o755


def test_a_history_in_a_folder_others_can_write_is_refused(tmp_path):
    """--db /tmp/history.sqlite3, as root: anyone could plant history.sqlite3-wal there as a link to
    a file of root's, which the master would then chmod, and SQLite open, through it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp
    victim = tmp_path / "roots-file"
    victim.write_text("root's\n")
    os.chmod(victim, 0o644)
    planted = shared / "history.sqlite3-wal"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)  # another user's
    done = subprocess.run([sys.executable, "-m", "master", "--port", "0", "--db", str(shared / "history.sqlite3")],
                          env=dict(os.environ, DISTEXEC_HOME=str(tmp_path / "home")), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "is writable by others" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    # Before: root chmod-ed the link's target 0600 (it narrows side files), /etc/passwd as well as this.
    assert victim.read_text() == "root's\n" and mode(victim) == 0o644
    assert not (shared / "history.sqlite3").exists()
    assert mode(shared) == 0o1777


def test_a_second_master_on_a_history_in_use_is_refused_and_the_first_goes_on(make_cluster, home):
    """Before: a second master on the same history resumed the first one's running job, gave out the
    same ids, failed that job as slave_lost 30 s later and left the connection file naming itself."""
    lc = make_cluster(1, slots=2, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        running = c.submit(SLEEPER, timeout=60)
        wait_for(lambda: c.job(running.id).status == P.RUNNING, 20, "the sleeper to run")
        connection = (home / "connection.json").read_text()
        for extra in ([], ["--no-connection-file"]):
            done = subprocess.run([sys.executable, "-m", "master", "--port", "0", *extra],
                                  env=dict(os.environ, DISTEXEC_HOME=str(home)), capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 1, done.stderr
            assert f"is in use by another master (pid {lc.master.pid})" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr, done.stderr
        assert (home / "connection.json").read_text() == connection
        assert c.submit("print('still the one')").wait(30).stdout == "still the one\n"
        assert c.job(running.id).status == P.RUNNING
        c.cancel(running.id)
    # Killed, it holds nothing: its restart takes the history back.
    lc.restart_master()
    with Cluster(lc.url, token=lc.token) as c:
        assert c.job(running.id).status in (P.RUNNING, P.CANCELLED)


def test_collected_files_count_towards_the_historys_size_bound(make_cluster):
    # 0.5 MiB: two jobs' 300 KB files are over it, one is not (their records are a few hundred bytes).
    lc = make_cluster(1, slots=1, languages="python", master_args=["--keep-mb", "0.5", "--prune-interval", "0.2"])
    with Cluster(lc.url, token=lc.token) as c:
        make = "open('out.bin', 'wb').write(b'x' * 300_000)"
        first = c.submit(make, collect=["out.bin"]).wait(60)
        assert first.status == P.SUCCEEDED and len(first.artifact("out.bin")) == 300_000
        second = c.submit(make, collect=["out.bin"]).wait(60)
        assert second.status == P.SUCCEEDED
        wait_for(lambda: first.id not in {j.id for j in c.jobs()}, 20, "the older job and its file to be pruned")
        assert second.id in {j.id for j in c.jobs()} and len(c.job(second.id).artifact("out.bin")) == 300_000


def test_a_home_another_user_can_redirect_or_write_is_refused_and_left_as_it_is(tmp_path):
    """$DISTEXEC_HOME in a folder others can write (as root, with protected_symlinks off, as here):
    root must not follow their symbolic link, hang on their FIFO, or keep its secrets where they write."""
    target = tmp_path / "roots-empty-folder"  # what a planted link points root at: narrowed, it would break
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    planted = tmp_path / "planted-home"
    planted.symlink_to(target)
    os.lchown(planted, 65534, 65534)  # made by another user
    with pytest.raises(config.UnsafeFolderError, match="symbolic link of uid 65534"):
        config.private_dir(str(planted))
    assert mode(target) == 0o755

    fifo = tmp_path / "fifo-home"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # at once: no open that waits for a writer
        config.private_dir(str(fifo))

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp: anyone may plant names (links) where distexec would write
    with pytest.raises(config.UnsafeFolderError, match="writable by others"):
        config.private_dir(str(shared))
    assert mode(shared) == 0o1777
    # What a person sees: one line, for the master, a slave and the CLI alike.
    env = dict(os.environ, DISTEXEC_HOME=str(shared), DISTEXEC_SLAVE_SECRET="s")
    for argv in (["-m", "master", "--port", "0"], ["-m", "slave", "--master", "http://127.0.0.1:1"],
                 ["-m", "distexec_kernel.cli", "user", "add", "bob", "--password-stdin"]):
        done = subprocess.run([sys.executable, *argv], env=env, input="pw\n", capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and "is writable by others" in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr, (argv, done.stderr)

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(config.UnsafeFolderError, match="belongs to uid 65534"):
        config.private_dir(str(theirs))

    # A home moved elsewhere with a link of its own user's: followed, and made private.
    real = tmp_path / "disk2-home"
    real.mkdir(mode=0o755)
    os.chmod(real, 0o755)
    moved = tmp_path / "moved-home"
    moved.symlink_to(real)
    assert config.private_dir(str(moved)) == str(moved) and mode(real) == 0o700


def test_the_compile_cache_folder_is_narrowed_whatever_it_holds(tmp_path):
    from slave.compile_cache import CompileCache
    home = config.private_dir(str(tmp_path / "home"))
    root = os.path.join(home, "cache", "compile")
    os.makedirs(os.path.join(root, "ab"), mode=0o755)  # an older version's, with an entry
    os.chmod(root, 0o755)
    CompileCache(root, 1 << 20)
    assert mode(root) == 0o700
