"""Logins, tokens and who sees which job, against a real master and slave."""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import argon2
import pytest
import requests
import tornado.httpclient
import tornado.websocket

from distexec_kernel import Cluster, config, protocol as P
from distexec_kernel.cluster import DistexecError
from master import auth

from conftest import close_ws, wait_for

SLEEPER = "import time\ntime.sleep(60)\n"
# Real Argon2id, with the cheapest parameters: the default costs ~1 s per login on a loaded 2-core box.
CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)


def ws_status(url: str, path: str, token: str | None) -> int:
    """Open a WebSocket with ``token``; 101 if it opened, else the HTTP status it was refused with."""
    async def attempt() -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = tornado.httpclient.HTTPRequest(config.ws_url(url) + path, headers=headers, connect_timeout=10)
        try:
            conn = await tornado.websocket.websocket_connect(req)
        except tornado.httpclient.HTTPClientError as exc:
            return exc.code
        await close_ws(conn)
        return 101
    return asyncio.run(attempt())


def get(url: str, path: str, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url + path, headers=headers, timeout=20)


def login(url: str, user: str, password: str) -> requests.Response:
    return requests.post(url + "/api/login", json={"user": user, "password": password}, timeout=20)


@pytest.fixture
def users_file(tmp_path):
    path = str(tmp_path / "users.json")
    auth.add_user(path, "alice", "alice-pw", hasher=CHEAP)
    auth.add_user(path, "bob", "bob-pw", hasher=CHEAP)
    auth.add_user(path, "boss", "boss-pw", admin=True, hasher=CHEAP)
    return path


@pytest.fixture
def user_cluster(make_cluster, users_file):
    return make_cluster(1, slots=2, languages="python", master_args=["--users", users_file])


def test_user_add_cli_writes_an_argon2_hash_in_a_private_file(tmp_path, home, monkeypatch, capsys):
    from distexec_kernel import cli
    path = str(tmp_path / "u" / "users.json")
    done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "user", "add", "carol", "--admin",
                           "--users", path, "--password-stdin"],
                          input="s3cret pass\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "added carol (admin)" in done.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = Path(path).read_text()
    assert "s3cret" not in text
    entry = json.loads(text)["users"]["carol"]
    assert entry["admin"] is True and entry["password"].startswith("$argon2id$")

    capsys.readouterr()
    assert cli.main(["user", "list", "--users", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"users": [{"name": "carol", "admin": True}]}

    # The reserved name and a name with a path separator are refused, and the file is unchanged.
    for bad in ("admin", "../x"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
        assert cli.main(["user", "add", bad, "--users", path, "--password-stdin"]) == 2
        assert "distexec:" in capsys.readouterr().err
    assert Path(path).read_text() == text

    assert cli.main(["user", "remove", "carol", "--users", path]) == 0
    assert auth.load_users(path) == {}
    assert cli.main(["user", "remove", "carol", "--users", path]) == 1


def test_login_returns_an_expiring_token_and_refuses_bad_credentials(user_cluster):
    url = user_cluster.url
    ok = login(url, "alice", "alice-pw")
    assert ok.status_code == 200
    body = ok.json()
    assert set(body) == {"token", "expires_at", "user", "admin"}
    assert body["user"] == "alice" and body["admin"] is False
    expires = P.parse_time(body["expires_at"])
    assert 11.9 * 3600 < (expires - P.parse_time(P.now())).total_seconds() <= 12 * 3600  # the default TTL
    assert get(url, "/api/jobs", body["token"]).status_code == 200

    for user, password in (("alice", "wrong"), ("nobody", "alice-pw"), ("alice", "")):
        refused = login(url, user, password)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "login_failed"
    bad = requests.post(url + "/api/login", data="not json", timeout=20)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_json"

    for token in (None, "wrong", body["token"] + "x"):
        resp = get(url, "/api/jobs", token)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "unauthorized"
        assert ws_status(url, "/ws/client", token) == 401
    assert login(url, "boss", "boss-pw").json()["admin"] is True


def test_login_attempts_are_rate_limited_per_address(user_cluster):
    # Each login costs an Argon2 hash; a flood is cut off before hashing.
    codes = [requests.post(user_cluster.url + "/api/login", json={}, timeout=20) for _ in range(40)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert int(limited[0].headers["Retry-After"]) >= 1


def test_a_class_logging_in_from_one_address_is_not_refused_but_failures_are(user_cluster):
    # Every attempt spent the address's budget: thirty students behind one NAT logging in at once got
    # 429s, and anyone there sending wrong passwords locked the others out.  Now only failures count.
    for _ in range(30):
        assert login(user_cluster.url, "boss", "boss-pw").status_code == 200
    codes = [login(user_cluster.url, "boss", "wrong").status_code for _ in range(16)]
    assert codes[0] == 401 and 429 in codes, codes


def test_one_persons_wrong_passwords_lock_out_their_own_name_not_the_others_behind_their_address(user_cluster):
    # Failures were counted per address only: behind a JupyterHub or a NAT, one student's retry loop
    # with a wrong password had every other student there refused ("too many failed login attempts").
    url = user_cluster.url
    answers = [login(url, "bob", "wrong") for _ in range(16)]
    codes = [r.status_code for r in answers]
    assert codes[0] == 401 and 429 in codes, codes
    refused = next(r for r in answers if r.status_code == 429)  # refused before the hash, for their name
    assert "as 'bob' from this address" in refused.json()["error"]["message"], refused.text
    for user in ("alice", "boss"):
        assert login(url, user, f"{user}-pw").status_code == 200, user
    assert login(url, "alice", "wrong").status_code == 401  # and their own failures are theirs


def test_a_class_logging_in_at_the_same_moment_gets_in_and_a_flood_of_guesses_is_cut_off(make_cluster, tmp_path):
    """Thirty students behind one address calling Cluster(user=...) in the same second: each attempt took
    a token of the address's budget until its hash was done, so 19 of 30 got "too many failed login
    attempts" (none had failed), and the master hashed all of them at once (34 -> 429 MiB)."""
    users = str(tmp_path / "users.json")
    auth.add_user(users, "teacher", "teacher-pw")  # the real cost, 64 MiB a hash
    for i in range(30):
        auth.add_user(users, f"s{i}", f"s{i}-pw", hasher=CHEAP)
    lc = make_cluster(0, master_args=["--users", users])

    def peak_mib() -> float:
        with open(f"/proc/{lc.master.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    before = peak_mib()
    with ThreadPoolExecutor(30) as pool:
        teacher = list(pool.map(lambda _: login(lc.url, "teacher", "teacher-pw").status_code, range(12)))
        students = list(pool.map(lambda i: login(lc.url, f"s{i}", f"s{i}-pw").status_code, range(30)))
    assert teacher == [200] * 12 and students == [200] * 30, (teacher, students)
    # Two hashes at once, 64 MiB each; twelve at once (the executor's threads on a bigger host) is 768.
    assert peak_mib() - before < 3 * 64, (before, peak_mib())
    # Guesses are still counted, also sent all at once and spread over many names (each within its
    # own name's budget): past the address's budget (30 failures, 10 more a second) they are refused
    # at their turn, before hashing, each refusal saying when to come back.
    started = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        guesses = list(pool.map(lambda i: login(lc.url, f"s{i % 30}", "wrong"), range(90)))
    took = time.monotonic() - started
    codes = [r.status_code for r in guesses]
    assert set(codes) == {401, 429} and codes.count(401) <= 30 + 2 + 10 * took + 1, (codes, took)
    refused = next(r for r in guesses if r.status_code == 429)
    wait = re.search(r"retry in ([\d.]+) s", refused.json()["error"]["message"])
    assert wait and float(wait.group(1)) > 0, refused.text  # never "retry in 0.00 s", refused again at once
    # One address's guesses do not lock out the students there for long: the budget comes back.
    wait_for(lambda: login(lc.url, "s0", "s0-pw").status_code == 200, 10, "the budget to come back")


def test_slave_secret_and_client_tokens_never_open_the_other_channel(user_cluster):
    url, token, secret = user_cluster.url, user_cluster.token, user_cluster.secret
    user_token = login(url, "boss", "boss-pw").json()["token"]
    # The slave secret opens no part of the client API.
    assert get(url, "/api/jobs", secret).status_code == 401
    assert requests.post(url + "/api/jobs", headers={"Authorization": f"Bearer {secret}"},
                         json={"source": "print(1)", "language": "python"}, timeout=20).status_code == 401
    assert ws_status(url, "/ws/client", secret) == 401
    # Neither the admin token nor an (admin) login token opens the slave channel.
    assert ws_status(url, "/ws/slave", token) == 401
    assert ws_status(url, "/ws/slave", user_token) == 401
    # Each opens its own.
    assert ws_status(url, "/ws/slave", secret) == 101
    assert ws_status(url, "/ws/client", token) == 101
    assert ws_status(url, "/ws/client", user_token) == 101


def test_users_see_and_cancel_only_their_own_jobs_admins_see_all(user_cluster):
    url = user_cluster.url
    alice = Cluster(url, user="alice", password="alice-pw")
    bob = Cluster(url, user="bob", password="bob-pw")
    boss = Cluster(url, user="boss", password="boss-pw")
    admin = Cluster(url, token=user_cluster.token)
    bob_events: list[dict] = []
    bob.subscribe(bob_events.append)
    try:
        slow = alice.submit(SLEEPER, timeout=60, name="alice's")
        quick = alice.submit("print('from alice')")
        assert quick.wait(30).stdout == "from alice\n"
        assert slow.user == "alice" and quick.user == "alice"
        wait_for(lambda: alice.job(slow.id).status == P.RUNNING, 20, "alice's job to run")

        # Bob: another user's job is as if it did not exist.
        for action in (lambda: bob.job(slow.id), lambda: bob.cancel(slow.id), lambda: bob.job(quick.id)):
            with pytest.raises(DistexecError) as err:
                action()
            assert err.value.status == 404
        assert bob.jobs() == []
        mine = bob.submit("print('from bob')").wait(30)
        assert mine.status == P.SUCCEEDED and mine.user == "bob"
        assert [j.id for j in bob.jobs()] == [mine.id]
        assert bob.jobs_page()[1] == 1
        # The event channel is in order: bob's own job's end came after all of alice's events
        # so far, and none of hers reached him.
        wait_for(lambda: any(e.get("type") == "job_update" and e["job"]["id"] == mine.id
                             and e["job"]["status"] == P.SUCCEEDED for e in bob_events), 20, "bob's events")
        seen = {e["job"]["id"] if e["type"] == "job_update" else e["job_id"]
                for e in bob_events if e["type"] in ("job_update", "job_output")}
        assert seen == {mine.id}

        # The admin token and an admin user see everyone's jobs.
        for who in (admin, boss):
            assert {slow.id, quick.id, mine.id} <= {j.id for j in who.jobs()}
            assert who.job(slow.id).user == "alice"
        assert alice.job(slow.id).status == P.RUNNING  # bob's cancel did nothing
        assert {j.id for j in alice.jobs()} == {slow.id, quick.id}
        cancelled = boss.cancel(slow.id)
        assert cancelled.id == slow.id
        assert slow.wait(30).status == P.CANCELLED
    finally:
        for c in (alice, bob, boss, admin):
            c.close()


def test_a_login_token_expires_for_http_and_websockets(make_cluster, users_file):
    lc = make_cluster(0, master_args=["--users", users_file, "--token-ttl", "1.5"])
    alice = Cluster(lc.url, user="alice", password="alice-pw")
    try:
        token = alice.token

        def listed() -> list:
            return [cl["id"] for cl in get(lc.url, "/api/clients", lc.token).json()["clients"]]
        assert alice.client_id in listed()
        assert alice.jobs() == []
        assert ws_status(lc.url, "/ws/client", token) == 101
        # Past the TTL: refused everywhere, and the open event channel is closed by the master.
        wait_for(lambda: get(lc.url, "/api/jobs", token).status_code == 401, 15, "the token to expire")
        assert ws_status(lc.url, "/ws/client", token) == 401
        wait_for(lambda: alice.client_id not in listed(), 15, "the master to close the expired channel")
        wait_for(lambda: alice._events.refused, 15, "the reconnection with the old token to be refused")
        with pytest.raises(DistexecError) as err:
            alice.jobs()
        assert err.value.status == 401 and "log in again" in str(err.value)
        # Logging in again gives a fresh token; the admin token never expires.
        alice.login("alice", "alice-pw")
        assert alice.jobs() == []
        wait_for(alice._events_connected, 15, "the event channel to come back with the new token")
        assert get(lc.url, "/api/jobs", lc.token).status_code == 200
    finally:
        alice.close()


def test_removing_a_user_ends_their_logins_without_a_restart(user_cluster, users_file):
    token = login(user_cluster.url, "bob", "bob-pw").json()["token"]
    assert get(user_cluster.url, "/api/jobs", token).status_code == 200
    assert auth.remove_user(users_file, "bob")
    assert get(user_cluster.url, "/api/jobs", token).status_code == 401
    assert login(user_cluster.url, "bob", "bob-pw").status_code == 401
    # A user added while the master runs can log in at once.
    auth.add_user(users_file, "dave", "dave-pw", hasher=CHEAP)
    assert login(user_cluster.url, "dave", "dave-pw").status_code == 200


def test_a_new_password_or_a_user_made_again_ends_the_old_logins(user_cluster, users_file):
    # A stolen token outlived a password reset for up to --token-ttl, and a name made again for
    # someone else inherited the old person's logins.
    old = login(user_cluster.url, "alice", "alice-pw").json()["token"]
    auth.add_user(users_file, "alice", "new-pw", hasher=CHEAP)  # "updated alice"
    assert get(user_cluster.url, "/api/jobs", old).status_code == 401
    assert login(user_cluster.url, "alice", "alice-pw").status_code == 401
    fresh = login(user_cluster.url, "alice", "new-pw").json()["token"]
    assert get(user_cluster.url, "/api/jobs", fresh).status_code == 200
    assert auth.remove_user(users_file, "alice")
    auth.add_user(users_file, "alice", "new-pw", hasher=CHEAP)  # the same password, set again
    assert get(user_cluster.url, "/api/jobs", fresh).status_code == 401


def test_logins_outlive_a_master_restart_as_digests_only(make_cluster, users_file, home):
    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users_file])
    alice = Cluster(lc.url, user="alice", password="alice-pw")
    try:
        job = alice.submit("print('before')")
        assert job.wait(60).stdout == "before\n"
        bob = login(lc.url, "bob", "bob-pw").json()["token"]
        saved = home / "logins.json"
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        text = saved.read_text()
        assert alice.token not in text and bob not in text  # digests, never a usable token
        assert auth.remove_user(users_file, "bob")  # while the master is down, say
        boss = login(lc.url, "boss", "boss-pw").json()["token"]
        auth.add_user(users_file, "boss", "other-pw", hasher=CHEAP)  # so is a new password

        lc.restart_master(signal.SIGTERM)  # an upgrade in the middle of a class
        # Alice's notebook rides the restart: same token, her event channel back, her history hers.
        wait_for(alice._events_connected, 30, "alice's event channel to come back")
        assert [j.id for j in alice.jobs()] == [job.id]
        assert alice.submit("print('after')").wait(60).stdout == "after\n"
        assert get(lc.url, "/api/jobs", bob).status_code == 401  # removed meanwhile: not kept
        assert get(lc.url, "/api/jobs", boss).status_code == 401  # given for the old password: not kept
        forged = ("y" if alice.token[0] == "x" else "x") + alice.token[1:]  # one in 64 tokens starts with x
        assert get(lc.url, "/api/jobs", forged).status_code == 401
    finally:
        alice.close()
    # Expired logins are neither accepted nor kept.
    lc.master.stop(signal.SIGTERM)
    lc.start_master("--token-ttl", "0.5")
    short = login(lc.url, "boss", "other-pw").json()["token"]
    wait_for(lambda: get(lc.url, "/api/jobs", short).status_code == 401, 15, "the short login to expire")
    lc.restart_master(signal.SIGTERM)
    assert get(lc.url, "/api/jobs", short).status_code == 401
    assert get(lc.url, "/api/jobs", login(lc.url, "boss", "other-pw").json()["token"]).status_code == 200


def test_a_master_without_users_file_refuses_logins(make_cluster):
    lc = make_cluster(0)
    resp = login(lc.url, "alice", "alice-pw")
    assert resp.status_code == 401 and "--users" in resp.json()["error"]["message"]


def test_a_broken_users_file_stops_the_master_with_its_reason(make_cluster, tmp_path, home):
    from distexec_kernel.local import LocalCluster
    bad = tmp_path / "users.json"
    bad.write_text('{"users": ["alice"]}')
    logs = tmp_path / "broken-logs"
    lc = LocalCluster(0, home=str(home), master_args=["--users", str(bad)], log_dir=str(logs))
    with pytest.raises(RuntimeError, match="exited with code 1"):
        lc.start(timeout=30)
    assert "is not of the form" in (logs / "master.log").read_text()


def test_cli_commands_log_in_with_user(user_cluster, home, tmp_path):
    with Cluster(user_cluster.url, user="bob", password="bob-pw") as bob:
        bobs = bob.submit("print('bob')").wait(30)
    program = tmp_path / "hello.py"
    program.write_text("print('alice via the cli')\n")

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *argv, "--url", user_cluster.url,
                               "--user", "alice", "--password-stdin"],
                              input="alice-pw\n", capture_output=True, text=True, timeout=60)

    done = cli("submit", str(program))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "alice via the cli\n"
    listed = cli("jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)["jobs"]
    assert [(j["user"], j["stdout"]) for j in jobs] == [("alice", "alice via the cli\n")]  # not bob's
    refused = cli("show", str(bobs.id))
    assert refused.returncode == 2 and f"no job {bobs.id}" in refused.stderr
    refused = cli("jobs", "--of", "bob")
    assert refused.returncode == 2 and "only an admin may list another user's jobs" in refused.stderr
    # A teacher's view: whose each job is, and one student's alone.
    admin = [sys.executable, "-m", "distexec_kernel.cli", "jobs", "--url", user_cluster.url, "--token",
             user_cluster.token]
    table = subprocess.run(admin, capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert table[0].split()[:3] == ["id", "user", "name"], table
    assert sorted(line.split()[2] for line in table[2:]) == ["alice", "bob"], table
    bobs_only = subprocess.run(admin + ["--of", "bob", "--json"], capture_output=True, text=True, timeout=60)
    assert [j["id"] for j in json.loads(bobs_only.stdout)["jobs"]] == [bobs.id], bobs_only


def test_a_refused_token_keeps_the_connection_alive(user_cluster):
    # A client's keep-alive connection must survive a 401; once, it did not for /api/jobs,
    # and the client's next request on it failed as "cannot reach the master".
    import http.client
    from urllib.parse import urlsplit
    where = urlsplit(user_cluster.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=20)
    try:
        for method, path, body in (("GET", "/api/jobs", None), ("POST", "/api/jobs", b'{"source": "1"}'),
                                   ("GET", "/api/jobs/1", None)):
            conn.request(method, path, body=body, headers={"Authorization": "Bearer wrong"})
            resp = conn.getresponse()
            assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "unauthorized"
            assert resp.getheader("Connection") != "close"
            conn.request("GET", "/api/health")  # the same socket
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    finally:
        conn.close()


def test_magic_connect_logs_in_with_the_password_asked_for(user_cluster, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    asked = []
    monkeypatch.setattr("getpass.getpass", lambda prompt="": asked.append(prompt) or "alice-pw")
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "distexec_kernel")
        with capture_output() as out:
            shell.run_line_magic("remote", f"connect {user_cluster.url} --user alice")
        assert asked == ["password for alice: "]
        assert "connected to" in out.stdout
        with capture_output():
            result = shell.run_cell("%%remote\nprint('as alice')\n")
        assert result.success
        jobs = get(user_cluster.url, "/api/jobs", user_cluster.token).json()["jobs"]
        assert jobs[0]["user"] == "alice" and jobs[0]["stdout"] == "as alice\n"
    finally:
        shell.run_line_magic("unload_ext", "distexec_kernel")
        InteractiveShell.clear_instance()


def test_session_names_cannot_reach_another_users_session(make_cluster, tmp_path):
    """Keys were ``name@user``: user ``corp``'s session ``work@alice`` was user
    ``alice@corp``'s session ``work``, variables and all."""
    with pytest.raises(ValueError, match="bad user name"):
        auth.add_user(str(tmp_path / "other.json"), "alice@corp", "pw", hasher=CHEAP)
    # A users file written before names were restricted: its '@' name cannot log in.
    path = str(tmp_path / "users.json")
    auth.save_users(path, {name: {"password": auth.hash_password(f"{name}-pw", CHEAP), "admin": False}
                           for name in ("corp", "alice", "alice@corp")})
    lc = make_cluster(1, slots=2, languages="python", master_args=["--users", path])
    assert login(lc.url, "alice@corp", "alice@corp-pw").status_code == 401
    corp = Cluster(lc.url, token=login(lc.url, "corp", "corp-pw").json()["token"])
    alice = Cluster(lc.url, token=login(lc.url, "alice", "alice-pw").json()["token"])
    admin = Cluster(lc.url, token=lc.token)
    try:
        assert corp.submit("x = 'corp'", session="work@alice").wait(60).status == P.SUCCEEDED
        assert alice.submit("x = 'alice'", session="work").wait(60).status == P.SUCCEEDED
        # The admin token's session of the same joined spelling is a third interpreter.
        for who, name, want in ((corp, "work@alice", "corp"), (alice, "work", "alice")):
            job = who.submit("print(x)", session=name).wait(60)
            assert job.stdout == f"{want}\n", (job.error, job.stderr)
        stranger = admin.submit("print(x)", session="work@alice").wait(60)
        assert stranger.status == P.FAILED and "NameError" in stranger.stderr
        mine = {(s["user"], s["name"]) for s in admin.sessions()}
        assert {("corp", "work@alice"), ("alice", "work"), (auth.ADMIN, "work@alice")} <= mine
        assert [s["name"] for s in alice.sessions()] == ["work"]
    finally:
        for c in (corp, alice, admin):
            c.close()


def test_one_users_compiled_programs_are_not_anothers_cache_hits(make_cluster, users_file):
    # A hit is quicker than a compile: shared, it would tell bob that alice had compiled his exact program.
    import uuid

    lc = make_cluster(1, slots=2, languages="c", master_args=["--users", users_file])
    tag = uuid.uuid4().hex
    source = f'#include <stdio.h>\nint main(void) {{ puts("{tag}"); return 0; }}\n'
    alice = Cluster(lc.url, user="alice", password="alice-pw")
    bob = Cluster(lc.url, user="bob", password="bob-pw")
    try:
        ran = [(who, who.submit(source, language="c").wait(120)) for who in (alice, alice, bob, bob)]
    finally:
        alice.close()
        bob.close()
    assert all(job.stdout == f"{tag}\n" for _, job in ran), [job.record for _, job in ran]

    def logs() -> str:
        return "".join(Path(lc.log_dir, name).read_text() for name in os.listdir(lc.log_dir) if name.startswith("slave"))
    text = wait_for(lambda: all(f"job {job.id}: compile" in logs() for _, job in ran) and logs(), 30,
                    "each job's compile or cache hit in the slave's log")
    compiled = [f"job {job.id}: compiled c" in text for _, job in ran]
    hit = [f"job {job.id}: compile cache hit" in text for _, job in ran]
    assert (compiled, hit) == ([True, False, True, False], [False, True, False, True]), text
    entries = [n for n in os.listdir(os.path.join(lc.home, "cache", "compile")) if not n.startswith(".")]
    assert len(entries) == 2, entries


def test_clients_are_shown_as_the_server_sees_them_and_only_to_their_owner(user_cluster):
    import socket
    from urllib.parse import quote

    url = user_cluster.url
    alice = Cluster(url, user="alice", password="alice-pw")
    bob = Cluster(url, user="bob", password="bob-pw")
    admin = Cluster(url, token=user_cluster.token)
    try:
        # A user sees their own clients only; an admin sees all.
        assert [cl["id"] for cl in alice.clients()] == [alice.client_id]
        assert [cl["id"] for cl in bob.clients()] == [bob.client_id]
        everyone = {cl["id"]: cl for cl in admin.clients()}
        assert {alice.client_id, bob.client_id, admin.client_id} <= set(everyone)
        # The host is the peer address the master sees; what the client says is only a label.
        mine = everyone[alice.client_id]
        assert mine["host"] == "127.0.0.1" and mine["label"] == socket.gethostname()[:64]

        async def claim(query: str) -> dict:
            req = tornado.httpclient.HTTPRequest(
                config.ws_url(url) + "/ws/client?" + query,
                headers={"Authorization": f"Bearer {bob.token}"}, connect_timeout=10)
            conn = await tornado.websocket.websocket_connect(req)
            welcome = P.decode(await asyncio.wait_for(conn.read_message(), 10))
            listed = {cl["id"]: cl for cl in admin.clients()}
            await close_ws(conn)
            return {"id": welcome["client_id"], **listed[welcome["client_id"]]}

        spoofed = asyncio.run(claim("host=" + quote("trusted.example\x1b[2J")))
        assert spoofed["host"] == "127.0.0.1" and spoofed["label"].startswith("trusted.example")
        assert spoofed["label"].isprintable()
        # Bob cannot take alice's client id, even once she is gone.
        alice_id = alice.client_id
        alice.close()
        wait_for(lambda: alice_id not in {cl["id"] for cl in admin.clients()}, 15, "alice's client to go")
        assert asyncio.run(claim(f"client_id={alice_id}"))["id"] != alice_id
        # Nor have his submissions counted as hers through the header.
        job = requests.post(url + "/api/jobs", json={"source": "print(1)", "language": "python"}, timeout=20,
                            headers={"Authorization": f"Bearer {bob.token}", "X-Distexec-Client": alice_id}).json()
        assert job["client_id"] is None and job["user"] == "bob"
        # His own client id on the header is his.
        own = requests.post(url + "/api/jobs", json={"source": "print(1)", "language": "python"}, timeout=20,
                            headers={"Authorization": f"Bearer {bob.token}",
                                     "X-Distexec-Client": bob.client_id}).json()
        assert own["client_id"] == bob.client_id
        assert bob.submit("print(2)").client_id == bob.client_id
    finally:
        for c in (alice, bob, admin):
            c.close()


def test_a_master_started_by_hand_makes_its_own_secrets_or_takes_its_flags(home):
    """`distexec master` with no token or secret in its environment (what a user runs by hand)."""
    from distexec_kernel.local import MASTER_READY, SLAVE_REGISTERED, Child, free_port
    env = {k: v for k, v in os.environ.items() if k not in ("DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET", "DISTEXEC_URL")}
    master_argv = [sys.executable, "-m", "master", "--host", "127.0.0.1", "--port", str(free_port())]
    started: list[Child] = []

    def start(name, argv, ready):
        child = Child(name, argv, env, subprocess.DEVNULL)
        started.append(child)
        return child.wait_line(ready, 60)

    try:
        url = start("master", master_argv, MASTER_READY).split()[0]
        made = json.loads((home / "connection.json").read_text())
        token, secret = made["token"], made["slave_secret"]
        assert made["url"] == url and len(token) >= 32 and len(secret) >= 32 and token != secret
        assert get(url, "/api/jobs", None).status_code == 401 and get(url, "/api/jobs", token).status_code == 200
        assert ws_status(url, "/ws/slave", secret) == 101 and ws_status(url, "/ws/slave", token) == 401
        start("slave", [sys.executable, "-m", "slave", "--master", url, "--secret", secret, "--slots", "1",
                        "--languages", "python"], SLAVE_REGISTERED)
        with Cluster() as c:  # all it needs, from the connection file
            assert c.submit("print(6 * 7)").wait(60).stdout == "42\n"
            # Restarted by hand: it keeps its connection file's secrets, so the slave started with
            # them registers again and this very client (its token, its event channel) goes on.
            started.pop(0).stop()
            start("master", master_argv, MASTER_READY)
            again = json.loads((home / "connection.json").read_text())
            assert (again["token"], again["slave_secret"]) == (token, secret)
            wait_for(lambda: len(c.slaves()) == 1, 30, "the slave to register with the restarted master")
            assert c.submit("print(7 * 6)").wait(60).stdout == "42\n"
        for child in reversed(started):
            child.stop()
        started.clear()

        # With no connection file to keep them from: new secrets.
        (home / "connection.json").unlink()
        url = start("master", master_argv, MASTER_READY).split()[0]
        fresh = json.loads((home / "connection.json").read_text())
        assert fresh["token"] != token and fresh["slave_secret"] != secret
        started.pop().stop()
        url = start("master", master_argv + ["--token", "t" * 40, "--slave-secret", "s" * 40], MASTER_READY).split()[0]
        given = json.loads((home / "connection.json").read_text())
        assert (given["token"], given["slave_secret"]) == ("t" * 40, "s" * 40)
        assert get(url, "/api/jobs", "t" * 40).status_code == 200 and get(url, "/api/jobs", token).status_code == 401
        assert ws_status(url, "/ws/slave", "s" * 40) == 101 and ws_status(url, "/ws/slave", secret) == 401
    finally:
        for child in reversed(started):
            child.stop()


def test_the_connection_files_credentials_go_to_its_own_master_only(make_cluster, home):
    """A URL given by hand (a typo, one pasted from elsewhere) never receives the local admin token
    or slave secret: a server there learns nothing it could use on our master."""
    import http.server
    import threading

    lc = make_cluster(0)
    seen: list[str] = []

    class Capture(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(str(self.headers))
            body = json.dumps({"error": {"code": "unauthorized", "message": "who are you"}}).encode()
            self.send_response(401 if self.path != "/api/health" else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET", "DISTEXEC_URL")}
    try:
        with pytest.raises(DistexecError) as err:
            Cluster(other)
        assert err.value.status == 401 and f"credentials are for {lc.url}, not sent to {other}" in str(err.value)
        cli = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "jobs", "--url", other], env=env,
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2 and "not sent to" in cli.stderr, cli.stderr
        slave = subprocess.run([sys.executable, "-m", "slave", "--master", other.replace("http", "ws")], env=env,
                               capture_output=True, text=True, timeout=60)
        assert slave.returncode == 2 and f"credentials are for {lc.url}, not sent" in slave.stderr, slave.stderr
        assert seen and not [h for h in seen if lc.token in h or lc.secret in h]
    finally:
        server.shutdown()
        server.server_close()
    with Cluster(lc.url, events=False) as c:  # its own master: the file's token, as always
        assert c.token == lc.token and c.jobs() == []


@pytest.fixture
def student(tmp_path, monkeypatch):
    """A person's own account: its own $DISTEXEC_HOME, no connection file, no environment."""
    path = tmp_path / "student-home"
    monkeypatch.setenv("DISTEXEC_HOME", str(path))
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_CAFILE"):
        monkeypatch.delenv(var, raising=False)
    return path


def cli(*argv, input=None) -> subprocess.CompletedProcess:
    """``distexec ARGV...`` in a process of its own, as a person types it."""
    return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *argv], input=input,
                          capture_output=True, text=True, timeout=60)


def test_distexec_login_serves_this_accounts_commands_until_logout(user_cluster, student):
    assert cli("login", user_cluster.url, "--user", "alice", "--password-stdin", input="wrong\n").returncode == 2
    assert not (student / "login.json").exists()
    done = cli("login", user_cluster.url, "--user", "alice", "--password-stdin", input="alice-pw\n")
    assert done.returncode == 0 and f"logged in to {user_cluster.url} as alice" in done.stdout, done.stderr
    kept = student / "login.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(student.stat().st_mode) == 0o700

    prog = student.parent / "who.py"
    prog.write_text("print('hello')\n")
    assert cli("submit", str(prog)).stdout == "hello\n"
    mine = get(user_cluster.url, "/api/jobs", user_cluster.token).json()["jobs"][0]
    assert mine["user"] == "alice" and mine["name"] == "who.py"
    with Cluster(events=False) as c:  # what a notebook's magic and the language kernels do
        assert c.token == json.loads(kept.read_text())["logins"][0]["token"]
        assert [j.id for j in c.jobs()] == [mine["id"]]

    saved = json.loads(kept.read_text())
    kept.write_text(json.dumps({"logins": [dict(saved["logins"][0], expires_epoch=1.0)]}))  # once its time passed
    late = cli("jobs")
    assert late.returncode == 2 and "the login of alice" in late.stderr and "distexec login" in late.stderr
    kept.write_text(json.dumps(saved))
    assert cli("logout").returncode == 0 and not kept.exists()
    gone = cli("jobs")
    assert gone.returncode == 2 and "no cluster found" in gone.stderr and "Traceback" not in gone.stderr
    assert cli("logout").returncode == 1


def test_distexec_login_keeps_one_login_per_master(make_cluster, users_file, tmp_path, student):
    """A person in two courses: logged in to both masters at once, the newest the default, each
    master's token sent to it alone; logout forgets one master's login, or all of them.  A login
    file from before (one login) is still read."""
    first = make_cluster(0, master_args=["--users", users_file], home=str(tmp_path / "first"))
    second = make_cluster(0, master_args=["--users", users_file], home=str(tmp_path / "second"))

    def login(lc, user):
        done = cli("login", lc.url, "--user", user, "--password-stdin", input=f"{user}-pw\n")
        assert done.returncode == 0, done.stderr
        return done.stdout

    def who(**kwargs) -> str:  # the user the master sees, through what a notebook or kernel uses
        with Cluster(events=False, **kwargs) as c:
            return c._post("/api/jobs", {"source": "pass", "language": "python"})["user"]

    login(first, "alice")
    out = login(second, "bob")
    assert f"still logged in to {first.url}" in out
    assert who() == "bob" and who(url=first.url) == "alice"  # the newest is the default; each its own
    mine = cli("jobs", "--url", first.url)
    assert mine.returncode == 0 and mine.stdout.count("rejected") == 1, mine.stdout + mine.stderr  # alice's
    login(first, "alice")  # again: the default now
    assert who() == "alice"
    logins = json.loads((student / "login.json").read_text())["logins"]
    assert [entry["url"] for entry in logins] == [first.url, second.url]  # one each, newest first

    done = cli("logout", first.url)
    assert done.returncode == 0 and f"the default is now {second.url}" in done.stdout
    assert who() == "bob"
    with pytest.raises(DistexecError) as refused:
        who(url=first.url)  # its login forgotten; the other master's token is not sent there
    assert refused.value.status == 401 and f"credentials are for {second.url}, not sent to" in str(refused.value)
    assert cli("logout", first.url).returncode == 1
    assert cli("logout").returncode == 0 and not (student / "login.json").exists()

    # A login file written before several were kept.
    login(second, "bob")
    [entry] = json.loads((student / "login.json").read_text())["logins"]
    (student / "login.json").write_text(json.dumps(entry))
    assert who() == "bob"
    login(first, "alice")
    assert who() == "alice" and who(url=second.url) == "bob"


def test_one_user_holds_a_bounded_number_of_logins(tmp_path, users_file):
    """Logging in again and again grows neither the master's memory nor the logins file past a
    bound per user; the oldest login ends, the others (and other users') stay, across a restart."""
    saved = tmp_path / "logins.json"

    def master_auth():  # as `distexec master --users FILE` builds it, with a bound of 3
        return auth.Auth("admin-token", "slave-secret", users_file=users_file, logins_file=str(saved),
                         max_logins_per_user=3)
    a = master_auth()
    tokens = [a.login("alice", "alice-pw")["token"] for _ in range(5)]
    bob = a.login("bob", "bob-pw")["token"]
    assert [a.identify(t) is not None for t in tokens] == [False, False, True, True, True]
    assert a.identify(bob).user == "bob"
    assert len(json.loads(saved.read_text())["logins"]) == 4
    restarted = master_auth()
    assert [restarted.identify(t) is not None for t in tokens + [bob]] == [False, False, True, True, True, True]


def test_a_notebook_takes_a_new_distexec_login_at_its_next_cell(make_cluster, users_file, tmp_path, monkeypatch):
    from IPython.utils.capture import capture_output

    from conftest import magic_shell
    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users_file, "--token-ttl", "4"])
    student = tmp_path / "student-home"
    monkeypatch.setenv("DISTEXEC_HOME", str(student))
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    def login() -> str:
        done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "login", lc.url, "--user", "alice",
                               "--password-stdin"], input="alice-pw\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads((student / "login.json").read_text())["logins"][0]["token"]

    def cell(shell, code):
        with capture_output() as cap:
            result = shell.run_cell(code)
        return result.success, cap.stdout + cap.stderr

    first = login()
    with magic_shell() as shell:
        ok, out = cell(shell, "%%remote\nprint('as alice')\n")
        assert ok and "as alice" in out, out
        wait_for(lambda: get(lc.url, "/api/jobs", first).status_code == 401, 30, "the login to expire")
        ok, out = cell(shell, "%%remote\nprint('late')\n")
        assert not ok and "distexec login" in out, out
        login()
        ok, out = cell(shell, "%%remote\nprint('again')\n")
        assert ok and "again" in out, out


@pytest.fixture
def far_url():
    """Makes http:// URLs off loopback, a new one each call, where a connection is refused at once: a
    port bound, never listening, on this machine's own non-loopback address; on a machine with no such
    address, TEST-NET-1 (192.0.2.0/24), which has no route there and fails as fast."""
    import ipaddress
    import socket

    import psutil
    own = next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback), None)
    bound: list[socket.socket] = []
    ports = iter(range(9, 100))

    def make() -> str:
        if own is None:
            return f"http://192.0.2.1:{next(ports)}"
        sock = socket.socket()
        sock.bind((own, 0))
        bound.append(sock)
        return f"http://{own}:{sock.getsockname()[1]}"
    yield make
    for sock in bound:
        sock.close()


def test_a_password_for_plain_http_to_another_machine_is_warned_of_before_it_is_asked(user_cluster, home,
                                                                                     monkeypatch, far_url):
    """A student given an http:// address off the machine is told, before typing the password, that it
    would cross the network unencrypted: by the CLI, the magic's connect and the Python API alike.
    Loopback and https are quiet."""
    import warnings

    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    far = far_url()
    assert config.cleartext(far)
    for near in (user_cluster.url, user_cluster.url.replace("127.0.0.1", "localhost"), "http://[::1]:9",
                 far.replace("http://", "https://")):
        assert not config.cleartext(near), near
    # The CLI: one line on stderr, before it reads the password (it then cannot reach the master).
    done = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "login", far, "--user", "alice",
                           "--password-stdin"], input="alice-pw\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot reach" in done.stderr, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("distexec: warning:")]
    assert len(warned) == 1 and far in warned[0] and "unencrypted" in warned[0] and "https://" in warned[0]
    assert done.stderr.index("distexec: warning:") < done.stderr.index("cannot reach")
    # Python: a CleartextWarning, once per master in a process.
    with pytest.warns(config.CleartextWarning, match="unencrypted"):
        with pytest.raises(DistexecError):
            Cluster(far, user="alice", password="alice-pw", events=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", config.CleartextWarning)
        with pytest.raises(DistexecError):
            Cluster(far, user="alice", password="alice-pw", events=False)  # told already
        # A login on this machine warns of nothing.
        with Cluster(user_cluster.url, user="alice", password="alice-pw", events=False) as c:
            assert c.user == "alice"
    # %remote connect: the warning comes before getpass asks.
    far = far_url()
    asked = []
    monkeypatch.setattr("getpass.getpass", lambda prompt="": asked.append(len(caught)) or "alice-pw")
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "distexec_kernel")
        with warnings.catch_warnings(record=True) as caught, capture_output():
            warnings.simplefilter("always")
            with pytest.raises(DistexecError):
                shell.run_line_magic("remote", f"connect {far} --user alice")
        assert asked == [1]  # one warning out already when the password was asked for
        assert caught[0].category is config.CleartextWarning and far in str(caught[0].message)
    finally:
        shell.run_line_magic("unload_ext", "distexec_kernel")
        InteractiveShell.clear_instance()
