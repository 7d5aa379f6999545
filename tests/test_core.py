"""The cluster core against real processes: master, two slaves, HTTP, WebSockets, CLI."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
import tornado.httpclient
import tornado.websocket

from distexec_kernel import Cluster, config, protocol as P
from distexec_kernel.cluster import DistexecError

from conftest import HOLD, UNTIL_RELEASED, close_ws, held_by, held_jobs, release_jobs, release_until_done, wait_for


def api(cluster, method, path, token="default", **kwargs):
    headers = kwargs.pop("headers", {})
    token = cluster.token if token == "default" else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, cluster.url + path, headers=headers, timeout=10, **kwargs)


def intervals(jobs):
    return [(P.parse_time(j.started_at), P.parse_time(j.finished_at)) for j in jobs]


def max_overlap(spans):
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


# -- jobs and their outcomes ----------------------------------------------------

def test_hello_job_record(client, cluster):
    job = client.submit("import sys\nprint('hello', sys.argv[1:])", language="py", args=["a", "b c"],
                        name="greet").wait(30)
    assert job.status == P.SUCCEEDED, job.record
    assert job.language == "python"  # alias stored under its main name
    assert job.stdout == "hello ['a', 'b c']\n"
    assert job.exit_code == 0 and job.error is None
    assert job.name == "greet"
    assert job.slave_uid in {s.uid for s in cluster.slaves}
    assert job.client_id == client.client_id
    sub, start, end = (P.parse_time(t) for t in (job.submitted_at, job.started_at, job.finished_at))
    assert sub <= start <= end
    assert "." in job.submitted_at and job.submitted_at.endswith("Z")  # at least ms precision, UTC


def test_job_times_are_right_across_a_seconds_end(monkeypatch):
    # now() makes each second's text once: the millisecond after a second's end must carry the next second.
    from datetime import datetime, timezone

    from distexec_kernel import job_record
    start = 1_796_000_000 * 10**9
    for ns in (start + 998_700_000, start + 999_999_999, start + 1_000_000_000, start + 1_000_001_000,
               start + 59 * 10**9 + 3_000_000, start + 999_000_000):  # and back (a clock set back)
        monkeypatch.setattr(job_record._time, "time_ns", lambda ns=ns: ns)
        expected = datetime.fromtimestamp(ns // 10**6 / 1000, timezone.utc).isoformat(timespec="milliseconds")
        assert P.now() == expected.replace("+00:00", "Z")


def test_files_and_stdin(client):
    src = "import sys\nprint(open('data.txt').read().strip(), sys.stdin.read().upper())"
    job = client.submit(src, files={"data.txt": "from a file\n"}, stdin="from stdin").wait(30)
    assert job.stdout == "from a file FROM STDIN\n", job.record


def test_stderr_and_nonzero_exit(client):
    job = client.submit("import sys\nprint('out')\nprint('bad', file=sys.stderr)\nsys.exit(3)").wait(30)
    assert job.status == P.FAILED
    assert job.exit_code == 3
    assert job.error["code"] == P.NONZERO_EXIT
    assert job.stdout == "out\n" and job.stderr == "bad\n"


def test_uncaught_exception_is_nonzero_exit_with_traceback(client):
    job = client.submit("def f():\n    raise ValueError('boom')\nf()").wait(30)
    assert job.error["code"] == P.NONZERO_EXIT and job.exit_code == 1
    assert "ValueError: boom" in job.stderr


def test_killed_by_signal(client):
    job = client.submit("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)").wait(30)
    assert job.status == P.FAILED
    assert job.error["code"] == P.SIGNAL
    assert "SIGSEGV" in job.error["message"]


SEGFAULTS = {
    "python": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
    "bash": "kill -SEGV $$",
    "c": "int main(void) { return *(volatile int *)0; }",
}


@pytest.mark.parametrize("warm", ["--warm", "--no-warm"])
def test_a_death_by_signal_is_minus_its_number_in_every_language(make_cluster, warm):
    """Whatever stood between the slave and the program (bwrap reports 128+N, a warm child is reaped
    directly), the job's exit code is -N, as Python's subprocess says; the CLI's is 128+N."""
    lc = make_cluster(1, slots=1, languages="python,bash,c", slave_args=[warm])
    with Cluster(lc.url, token=lc.token) as c:
        for lang, source in SEGFAULTS.items():
            for _ in range(2 if lang == "c" else 1):  # the second run of a C program is the cached one
                job = c.submit(source, language=lang).wait(60)
                assert job.error["code"] == P.SIGNAL and "SIGSEGV" in job.error["message"], job.record
                assert job.exit_code == -int(signal.SIGSEGV), (lang, job.record)


def test_timeout(client):
    t0 = time.monotonic()
    job = client.submit("import time\nprint('start', flush=True)\ntime.sleep(60)", timeout=1).wait(30)
    assert job.status == P.FAILED and job.error["code"] == P.TIMEOUT
    assert job.stdout == "start\n"  # output up to the kill is kept
    assert time.monotonic() - t0 < 15


def test_syntax_error_is_rejected_with_line(client):
    job = client.submit("x = 1\nif x\n    print(x)\n")
    assert job.status == P.REJECTED
    assert job.error["code"] == P.SYNTAX_ERROR
    assert job.error["line"] == 2
    assert job.slave_uid is None and job.started_at is None
    # The rejection is part of the history.
    assert client.job(job.id).status == P.REJECTED


def test_unsupported_language_names_the_available_ones(client):
    job = client.submit("IDENTIFICATION DIVISION.", language="cobol")
    assert job.status == P.REJECTED
    assert job.error["code"] == P.UNSUPPORTED_LANGUAGE
    assert "python" in job.error["message"] and "cobol" in job.error["message"]


def test_languages_endpoint(client):
    names = {lang["name"]: lang for lang in client.languages()}
    assert names["python"]["slaves"] == 2
    assert names["python"]["version"]


# -- cancel ------------------------------------------------------------------------

def test_cancel_running_job(client):
    job = client.submit("import time\nprint('up', flush=True)\ntime.sleep(60)")
    wait_for(lambda: client.job(job.id).stdout == "up\n", what="the job to start")
    job.cancel()
    job.wait(20)
    assert job.status == P.CANCELLED and job.error["code"] == P.CANCELLED_CODE


def test_a_cancel_answers_with_the_end_it_caused(cluster, client):
    """Over HTTP and over the WebSocket, cancelling a running job answers once its slave has killed
    it: the job as it ended (cancelled), not still running."""
    over_http, over_ws = (client.submit("import time\nprint('up', flush=True)\ntime.sleep(60)") for _ in "ab")
    for job in (over_http, over_ws):
        wait_for(lambda: client.job(job.id).stdout == "up\n", what=f"job {job.id} to start")

    r = api(cluster, "POST", f"/api/jobs/{over_http.id}/cancel")
    assert r.status_code == 200
    answer = r.json()
    assert (answer["status"], answer["error"]["code"]) == (P.CANCELLED, P.CANCELLED_CODE), answer
    assert answer["finished_at"] and answer["stdout"] == "up\n"

    async def cancel_on_the_socket():
        conn = await _ws(cluster.url, cluster.token, "/ws/client")
        try:
            conn.write_message(P.encode(P.make("cancel", job_id=over_ws.id, ref="c1")))
            while (msg := await _read(conn, 20))["type"] != "cancel_reply":
                pass
            return msg
        finally:
            await close_ws(conn)
    reply = asyncio.run(cancel_on_the_socket())
    assert reply["ref"] == "c1" and reply.get("error") is None
    assert (reply["job"]["status"], reply["job"]["error"]["code"]) == (P.CANCELLED, P.CANCELLED_CODE)
    assert client.job(over_ws.id).status == P.CANCELLED


def test_cancel_queued_job_and_terminal_cancel(make_cluster):
    lc = make_cluster(1, slots=1)
    with Cluster(lc.url, token=lc.token) as c:
        blocker = c.submit("import time\ntime.sleep(60)")
        queued = c.submit("print('never')")
        wait_for(lambda: c.job(blocker.id).status == P.RUNNING, what="the blocker to run")
        assert c.job(queued.id).status == P.QUEUED
        assert queued.cancel().status == P.CANCELLED
        assert queued.error["code"] == P.CANCELLED_CODE and queued.started_at is None
        blocker.cancel().wait(20)
        assert blocker.status == P.CANCELLED
        # Cancelling a finished job changes nothing.
        assert c.cancel(blocker.id).status == P.CANCELLED
        with pytest.raises(DistexecError) as exc:
            c.cancel(99999)
        assert exc.value.status == 404


# -- scheduling across the cluster ------------------------------------------------

def test_max_jobs_cap_and_slots_are_never_exceeded(make_cluster):
    lc = make_cluster(2, slots=3, max_jobs=4)
    pids = [s.proc.pid for s in lc.slaves]
    with Cluster(lc.url, token=lc.token) as c:
        jobs = [c.submit(HOLD + UNTIL_RELEASED) for _ in range(14)]
        # The first four run together and hold their slots: the cap is reached, and none is let past it.
        wait_for(lambda: len(held_by(*pids)) == 4, 30, "four jobs to run at once")
        assert len(c.jobs(status=P.RUNNING)) == 4
        release_until_done(jobs, *pids)
        for j in jobs:
            j.wait(60)
        assert all(j.status == P.SUCCEEDED for j in jobs), [j.record for j in jobs]
        assert max_overlap(intervals(jobs)) <= 4
        # The cap was reached (the check above could otherwise pass vacuously).
        assert max_overlap(intervals(jobs)) >= 3
        for uid in {j.slave_uid for j in jobs}:
            assert max_overlap(intervals([j for j in jobs if j.slave_uid == uid])) <= 3
        assert len({j.slave_uid for j in jobs}) == 2


def test_per_slave_slots_without_a_cap(make_cluster):
    lc = make_cluster(2, slots=2)
    pids = [s.proc.pid for s in lc.slaves]
    with Cluster(lc.url, token=lc.token) as c:
        jobs = [c.submit(HOLD + UNTIL_RELEASED) for _ in range(10)]
        wait_for(lambda: [len(held_jobs(pid)) for pid in pids] == [2, 2], 30, "each slave's two slots taken")
        release_until_done(jobs, *pids)
        for j in jobs:
            j.wait(60)
        per_slave = {}
        for j in jobs:
            per_slave.setdefault(j.slave_uid, []).append(j)
        assert set(per_slave) == {s.uid for s in lc.slaves}  # spread over both
        for group in per_slave.values():
            assert max_overlap(intervals(group)) <= 2
        # Least-loaded placement spreads evenly.
        assert abs(len(per_slave[lc.slaves[0].uid]) - len(per_slave[lc.slaves[1].uid])) <= 2


# -- history and restarts ---------------------------------------------------------

def test_history_and_queued_jobs_survive_a_master_restart(make_cluster):
    lc = make_cluster(1, slots=1)
    with Cluster(lc.url, token=lc.token) as c:
        done = c.submit("print('kept')").wait(30)
        blocker = c.submit(HOLD + UNTIL_RELEASED + "print('blocker done')")
        waiting = [c.submit(f"print({i} * 7)") for i in range(3)]
        wait_for(lambda: c.job(blocker.id).status == P.RUNNING, what="blocker running")
        assert all(c.job(j.id).status == P.QUEUED for j in waiting)
    lc.restart_master(signal.SIGKILL)
    release_jobs(lc.slaves[0].pid)  # the blocker ends once the new master is up
    with Cluster(lc.url, token=lc.token) as c:
        old = c.job(done.id)
        assert old.status == P.SUCCEEDED and old.stdout == "kept\n"
        # The queued jobs were not lost and run once the slave is back.
        for i, j in enumerate(waiting):
            assert c.job(j.id).wait(60).stdout == f"{i * 7}\n"
        assert c.job(blocker.id).wait(60).status in (P.SUCCEEDED, P.FAILED)


def test_job_ids_continue_after_restart(make_cluster):
    lc = make_cluster(1)
    with Cluster(lc.url, token=lc.token) as c:
        first = c.submit("print(1)").wait(30).id
    lc.restart_master(signal.SIGTERM)
    with Cluster(lc.url, token=lc.token) as c:
        assert c.submit("print(2)").id > first


# -- HTTP API ---------------------------------------------------------------------

def test_http_api_contract(cluster):
    assert requests.get(cluster.url + "/api/health", timeout=10).json()["status"] == "ok"
    r = api(cluster, "POST", "/api/jobs", json={"source": "print(6*7)", "language": "python"})
    assert r.status_code == 201
    job = r.json()
    for field in ("id", "name", "language", "status", "error", "slave_uid", "client_id", "submitted_at",
                  "started_at", "finished_at", "exit_code", "stdout", "stderr", "timeout"):
        assert field in job
    wait_for(lambda: api(cluster, "GET", f"/api/jobs/{job['id']}").json()["status"] == P.SUCCEEDED,
             what="the job to finish")
    assert api(cluster, "GET", f"/api/jobs/{job['id']}").json()["stdout"] == "42\n"
    api(cluster, "POST", "/api/jobs", json={"source": "print(1)", "language": "python"})
    listing = api(cluster, "GET", "/api/jobs?limit=1").json()
    assert listing["total"] == 2 and len(listing["jobs"]) == 1
    assert listing["jobs"][0]["id"] > job["id"]  # newest first
    assert api(cluster, "GET", "/api/jobs?status=succeeded").json()["total"] >= 1
    summary = api(cluster, "GET", "/api/jobs?summary=1").json()["jobs"]
    assert summary[-1]["id"] == job["id"] and summary[-1]["status"] == P.SUCCEEDED
    assert not {"source", "stdout", "stderr", "files", "stdin"} & set(summary[-1])
    assert api(cluster, "GET", "/api/jobs/424242").status_code == 404
    slaves = api(cluster, "GET", "/api/slaves").json()["slaves"]
    assert {s["uid"] for s in slaves} == {s.uid for s in cluster.slaves}
    for s in slaves:
        assert {"uid", "host", "languages", "slots", "running", "completed", "connected_at", "last_seen"} <= set(s)


@pytest.mark.parametrize("body,code", [
    (b"not json", "bad_json"),
    (b"[1, 2]", "bad_request"),
    (json.dumps({"language": "python"}).encode(), "bad_request"),
    (json.dumps({"source": 5, "language": "python"}).encode(), "bad_request"),
    (json.dumps({"source": "x", "language": "python", "timeout": -1}).encode(), "bad_request"),
    (json.dumps({"source": "x", "language": "python", "files": {"../etc/passwd": "x"}}).encode(), "bad_request"),
    (json.dumps({"source": "x", "language": "python", "args": [1]}).encode(), "bad_request"),
    (json.dumps({"source": "x", "language": "python", "bogus": 1}).encode(), "bad_request"),
])
def test_bad_requests_get_400_with_a_reason(cluster, body, code):
    r = api(cluster, "POST", "/api/jobs", data=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]


def test_a_timeout_of_zero_is_refused_saying_what_is_allowed():
    with pytest.raises(P.ProtocolError, match=r"more than 0 and at most 86400 seconds, not 0$"):
        P.check_submission({"source": "x", "language": "python", "timeout": 0})


def test_oversized_source_gets_413(cluster):
    r = api(cluster, "POST", "/api/jobs", json={"source": "#" * (P.MAX_SOURCE_BYTES + 1), "language": "python"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_tokens(cluster):
    assert api(cluster, "GET", "/api/jobs", token=None).status_code == 401
    assert api(cluster, "GET", "/api/jobs", token="wrong").status_code == 401
    # The slave secret is not a client token.
    assert api(cluster, "GET", "/api/jobs", token=cluster.secret).status_code == 401
    assert api(cluster, "GET", "/api/jobs").status_code == 200
    with pytest.raises(DistexecError) as exc:
        Cluster(cluster.url, token="wrong")
    assert exc.value.status == 401


# -- WebSocket channels -----------------------------------------------------------

async def _ws(url, token, path):
    req = tornado.httpclient.HTTPRequest(config.ws_url(url) + path, headers={"Authorization": f"Bearer {token}"})
    return await tornado.websocket.websocket_connect(req)


async def _read(conn, timeout=10):
    text = await asyncio.wait_for(conn.read_message(), timeout)
    return None if text is None else json.loads(text)


def test_channels_refuse_the_other_credential(cluster):
    async def go():
        for token, path in ((cluster.token, "/ws/slave"), (cluster.secret, "/ws/client"), ("nope", "/ws/client")):
            with pytest.raises(tornado.httpclient.HTTPClientError) as exc:
                await _ws(cluster.url, token, path)
            assert exc.value.code == 401
    asyncio.run(go())


@pytest.mark.parametrize("batch", [False, True])
def test_slave_with_wrong_protocol_version_is_refused(cluster, batch):
    """Also when it reads batches: the master's messages gathered for the turn go out before its close."""
    async def go():
        conn = await _ws(cluster.url, cluster.secret, "/ws/slave")
        conn.write_message(json.dumps({"type": "register", "protocol": P.PROTOCOL_VERSION + 41, "uid": "old",
                                       "host": "h", "languages": [{"name": "python"}], "slots": 1,
                                       "batch": batch}))
        reply = await _read(conn)
        assert reply["type"] == "register_reply" and reply["ok"] is False
        assert reply["error"]["code"] == "protocol_mismatch"
        assert str(P.PROTOCOL_VERSION) in reply["error"]["message"]
        # And the master closes the connection (whatever else it sent first).
        while await _read(conn, timeout=30) is not None:
            pass
        await close_ws(conn, closed_by_peer=True)
    asyncio.run(go())
    assert "old" not in {s["uid"] for s in api(cluster, "GET", "/api/slaves").json()["slaves"]}


def test_slave_process_with_wrong_secret_exits_with_a_clear_message(cluster, home):
    proc = subprocess.run([sys.executable, "-m", "slave", "--master", cluster.url, "--secret", "wrong"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "DISTEXEC_HOME": str(home)})
    assert proc.returncode == 2
    assert "refused the slave secret" in proc.stderr


def test_malformed_messages_get_an_error_and_the_connection_lives(cluster):
    async def go():
        conn = await _ws(cluster.url, cluster.token, "/ws/client")
        assert (await _read(conn))["type"] == "welcome"
        for bad in ("not json", "[]", '{"type": 5}', '{"type": "nope"}', '{"type": "cancel"}',
                    '{"type": "cancel", "job_id": "x"}', '{"type": "register_reply", "ok": true}'):
            conn.write_message(bad)
            while True:
                reply = await _read(conn)
                if reply["type"] == "error":
                    break
            assert reply["error"]["code"] and reply["error"]["message"]
        # Still alive: a submit over the socket works.
        conn.write_message(json.dumps({"type": "submit", "ref": "r1",
                                       "request": {"source": "print('ws')", "language": "python"}}))
        while True:
            reply = await _read(conn)
            if reply["type"] == "submit_reply":
                break
        assert reply["ref"] == "r1" and reply["job"]["status"] in (P.QUEUED, P.RUNNING)
        await close_ws(conn)
    asyncio.run(go())


def test_submit_over_websocket_with_bad_request_gets_error_reply(cluster):
    async def go():
        conn = await _ws(cluster.url, cluster.token, "/ws/client")
        await _read(conn)
        conn.write_message(json.dumps({"type": "submit", "ref": "bad", "request": {"language": "python"}}))
        while True:
            reply = await _read(conn)
            if reply["type"] == "submit_reply":
                break
        # The answer to a submit is a submit_reply, so the sender can match it by its ref.
        assert reply["ref"] == "bad" and reply["job"] is None
        assert reply["error"]["code"] == "bad_request" and "source" in reply["error"]["message"]
        await close_ws(conn)
    asyncio.run(go())


# -- clients ------------------------------------------------------------------------

def test_each_open_cluster_counts_as_one_client(cluster):
    a = Cluster(cluster.url, token=cluster.token)
    b = Cluster(cluster.url, token=cluster.token)
    try:
        ids = {c["id"] for c in a.clients()}
        assert {a.client_id, b.client_id} <= ids
        a.submit("print(1)").wait(30)
        mine = next(c for c in a.clients() if c["id"] == a.client_id)
        assert mine["jobs_submitted"] == 1 and mine["host"] and mine["connected_at"]
        b.close()
        wait_for(lambda: b.client_id not in {c["id"] for c in a.clients()}, what="b to leave")
    finally:
        a.close()
        b.close()


def test_live_events_reach_every_client(cluster):
    a = Cluster(cluster.url, token=cluster.token)
    b = Cluster(cluster.url, token=cluster.token)
    seen = []
    b.subscribe(lambda msg: seen.append(msg))
    try:
        job = a.submit("print('shared')").wait(30)
        wait_for(lambda: any(m["type"] == "job_update" and m["job"]["id"] == job.id
                             and m["job"]["status"] == P.SUCCEEDED for m in seen), what="b to see a's job end")
        assert any(m["type"] == "job_output" and m["job_id"] == job.id and m["data"] == "shared\n" for m in seen)
    finally:
        a.close()
        b.close()


def test_output_streams_before_the_job_ends(client, cluster):
    job = client.submit(HOLD + "print(0, flush=True)\n" + UNTIL_RELEASED + "print(1)\nprint(2)\n")
    seen = []
    for stream, text in job.iter_output(timeout=30):
        seen.append((text, job.status))
        if len(seen) == 1:  # the job waits for this: its first line came while it ran
            release_jobs(*(s.proc.pid for s in cluster.slaves))
    assert "".join(t for t, _ in seen) == "0\n1\n2\n"
    assert seen[0][1] == P.RUNNING  # the first chunk came while the job still ran


# -- connection file and CLI --------------------------------------------------------

def test_connection_file_is_private(cluster, home):
    path = home / "connection.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["url"] == cluster.url and info["token"] == cluster.token and info["slave_secret"] == cluster.secret


def cli(*args, input=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", *args], capture_output=True, text=True,
                          timeout=timeout, input=input)


def test_cli_submit_jobs_show_cancel(cluster, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint('args', sys.argv[1:], sys.stdin.read())\nsys.exit(5)")
    stdin = tmp_path / "in.txt"
    stdin.write_text("IN")
    r = cli("submit", str(prog), "--arg", "x", "--arg", "y", "--stdin-file", str(stdin))
    assert r.returncode == 5
    assert r.stdout == "args ['x', 'y'] IN\n"
    assert "nonzero_exit" in r.stderr and "❌" in r.stderr
    jobs = json.loads(cli("jobs", "--json").stdout)
    assert jobs["total"] == 1 and jobs["jobs"][0]["name"] == "prog.py"
    job_id = jobs["jobs"][0]["id"]
    shown = json.loads(cli("show", str(job_id), "--json").stdout)
    assert shown["exit_code"] == 5 and shown["slave_uid"]
    table = cli("jobs").stdout
    assert "prog.py" in table and "❌" in table
    assert "slave" in cli("show", str(job_id)).stdout

    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(60)")
    r = cli("submit", str(slow), "--no-wait")
    slow_id = int(r.stdout.strip())
    r = cli("cancel", str(slow_id))
    assert r.returncode == 0 and "🚫" in cli("show", str(slow_id)).stdout

    slaves = json.loads(cli("slaves", "--json").stdout)["slaves"]
    assert len(slaves) == 2
    assert isinstance(json.loads(cli("clients", "--json").stdout)["clients"], list)


def test_cli_errors_are_one_line(cluster, tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("print(")
    r = cli("submit", str(bad))
    assert r.returncode == 2 and "syntax_error" in r.stderr and "Traceback" not in r.stderr
    r = cli("submit", str(tmp_path / "missing.py"))
    assert r.returncode != 0 and "cannot read" in r.stderr and "Traceback" not in r.stderr
    r = cli("jobs", "--url", "http://127.0.0.1:1")
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    r = cli("jobs", "--token", "wrong")
    assert r.returncode == 2 and "401" in r.stderr and "Traceback" not in r.stderr


def test_distexec_up_starts_and_stops_everything(home):
    proc = subprocess.Popen([sys.executable, "-m", "distexec_kernel.cli", "up", "--slaves", "2", "--port", "0",
                             "--slots", "1", "--warm-imports", "decimal"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "ready" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "distexec up exited early"
        assert "2 slave(s)" in line
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        # Secrets travel in the environment, never on a command line that `ps` shows everyone.
        info = json.loads((home / "connection.json").read_text())
        for child in children:
            cmdline = " ".join(child.cmdline())
            assert info["token"] not in cmdline and info["slave_secret"] not in cmdline
        with Cluster() as c:  # found through the connection file
            assert len(c.slaves()) == 2
            # decimal imported by the slaves' warm pools (--warm-imports), not by the job
            assert c.submit("import sys; print('up', 'decimal' in sys.modules)").wait(30).stdout == "up True\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_slave_uid_is_stable_across_restarts(make_cluster):
    lc = make_cluster(1)
    uid = lc.slaves[0].uid
    lc.slaves[0].stop(signal.SIGINT)
    again = lc.start_slave()
    assert again.uid == uid
    # A second slave on the same host at the same time gets its own UID.
    other = lc.start_slave()
    assert other.uid != uid


def test_threads_share_one_cluster(client):
    results = []

    def work(i):
        results.append(client.submit(f"print({i})").wait(60).stdout)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(f"{i}\n" for i in range(8))


def test_the_final_event_carries_a_small_output_whole(client):
    """A client that waited on events needs no request to read a small result."""
    events: list[dict] = []
    unsubscribe = client.subscribe(lambda m: events.append(m["job"]) if m["type"] == "job_update" else None)
    try:
        small = client.submit("import sys\nprint('hi')\nprint('oops', file=sys.stderr)")
        big = client.submit(f"print('x' * {P.SMALL_OUTPUT_CHARS + 10})")

        def final(job):
            return next((e for e in events if e["id"] == job.id and e["status"] in P.TERMINAL), None)

        wait_for(lambda: final(small) and final(big), 60, "both jobs' final events")
    finally:
        unsubscribe()
    assert (final(small)["stdout"], final(small)["stderr"]) == ("hi\n", "oops\n")
    assert "stdout" not in final(big)  # too large for an event: read once from the master
    # The handle took the result from the event: it is complete without asking the master again.
    assert small.done and not small._stale and small.stdout == "hi\n"
    assert big.wait(30).stdout == "x" * (P.SMALL_OUTPUT_CHARS + 10) + "\n"
