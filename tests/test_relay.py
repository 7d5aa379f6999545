"""The lean relay: submissions pipelined on the open WebSocket, results in the final event.

Real masters and slaves on loopback (conftest).  The client's HTTP requests
are counted with a response hook on its session (its request log), so the
tests can tell which path a submission took and that no result was fetched.
"""
from __future__ import annotations

import asyncio
import signal
import time

import argon2
import psutil
import pytest
import requests
import tornado.httpclient
import tornado.websocket

from distexec_kernel import Cluster, config, protocol as P
from distexec_kernel.cluster import DistexecError
from master import auth

from conftest import HOLD, UNTIL_RELEASED, close_ws, release_jobs, users_json, wait_for

CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)

SLEEPER = "import time\ntime.sleep(60)\n"
# Pipelined submissions that take the master longer to read through than its pings allowed for a pong
# (2 s): with 10,000 the test failed 3 runs of 3 before the change, with 6,000 1 run of 2.
BURST = 10000


def request_log(c: Cluster) -> list[tuple[str, str]]:
    """Every HTTP request ``c`` makes from now on, as (method, path)."""
    seen: list[tuple[str, str]] = []

    def hook(resp, *args, **kwargs):
        seen.append((resp.request.method, resp.request.path_url.split("?")[0]))
    c._http.hooks["response"].append(hook)
    return seen


def history(c: Cluster) -> list[dict]:
    records, _ = c.jobs_page(limit=1000, summary=True)
    return records


def test_many_submissions_go_out_without_waiting_and_all_come_back(client):
    log = request_log(client)
    jobs = [client.submit(f"print({i} * 2)", name=f"n{i}") for i in range(40)]
    # Not one HTTP request: every submission went out on the open WebSocket.
    assert log == []
    for job in jobs:
        job.wait(120)
    assert [j.status for j in jobs] == ["succeeded"] * 40
    assert [j.stdout for j in jobs] == [f"{i * 2}\n" for i in range(40)]
    assert [j.name for j in jobs] == [f"n{i}" for i in range(40)]
    ids = [j.id for j in jobs]
    assert ids == sorted(ids) and len(set(ids)) == 40  # queued in the order they were submitted
    # A finished job's small output came with its final event: no GET for any of them.
    assert log == []
    assert len([r for r in history(client) if r["name"].startswith("n")]) == 40


def test_a_small_result_needs_no_request_after_the_final_event(client):
    log = request_log(client)
    job = client.submit("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    job.wait(60)
    assert (job.status, job.exit_code, job.stdout, job.stderr) == ("failed", 3, "out\n", "err\n")
    assert job.error["code"] == "nonzero_exit"
    assert log == []
    # A big output does not ride in the event: it is read once, with one GET.
    big = client.submit("print('x' * 200000)").wait(60)
    assert len(big.stdout) == 200001
    assert log.count(("GET", f"/api/jobs/{big.id}")) <= 1


BAD_INPUTS = [
    (dict(source="pass", timeout=-1), "bad_request", 400),
    (dict(source="pass", retries=99), "bad_request", 400),
    (dict(source="pass", language=" "), "bad_request", 400),
    (dict(source="pass", files={"../escape.py": "x"}), "bad_request", 400),
    (dict(source="pass", collect=["/etc/*"]), "bad_request", 400),
    (dict(source="pass", language="py", files={"main.py": "x"}), "bad_request", 400),  # the program's own file
    (dict(source="x" * ((1 << 20) + 1)), "too_large", 413),
]


def test_each_bad_input_is_raised_with_its_code_as_over_http(cluster, client):
    log = request_log(client)
    with Cluster(cluster.url, token=cluster.token, events=False) as plain:
        for kwargs, code, status in BAD_INPUTS:
            # A malformed submission is refused at once, by the master's own check, sending nothing.
            with pytest.raises(DistexecError) as local:
                client.submit(**kwargs)
            with pytest.raises(DistexecError) as http:
                plain.submit(**kwargs)
            assert (local.value.code, local.value.status) == (code, status), kwargs
            assert (http.value.code, http.value.status) == (code, status), kwargs
            assert str(local.value) == str(http.value)
        # What only the master knows comes in its answer: submit returns, the job's first use raises.
        c_session = dict(source="int main(void) { return 0; }", language="c", session="s")
        job = client.submit(**c_session)
        with pytest.raises(DistexecError) as ws:
            job.id
        with pytest.raises(DistexecError) as http:
            plain.submit(**c_session)
        assert (ws.value.code, ws.value.status) == (http.value.code, http.value.status) == ("bad_request", 400)
        assert str(ws.value) == str(http.value) and "Python only" in str(ws.value)
        for look in (lambda: job.wait(5), lambda: job.status, lambda: job.record):
            with pytest.raises(DistexecError):
                look()  # every later use raises the same refusal
    assert log == []
    # A well-formed program in a language nobody runs is a rejected job, not an error.
    job = client.submit("x", language="cobol").wait(30)
    assert job.status == "rejected" and job.error["code"] == "unsupported_language"


@pytest.fixture
def users_file(tmp_path):
    return users_json(tmp_path, "alice", "bob")


def test_queue_full_and_rate_limited_reach_the_caller(make_cluster, users_file):
    lc = make_cluster(1, slots=1, languages="python",
                      master_args=["--users", users_file, "--max-queued-per-user", "2",
                                   "--rate", "1/min", "--burst", "3"])  # no refill within the test
    with Cluster(lc.url, user="alice", password="alice-pw") as alice, \
            Cluster(lc.url, user="bob", password="bob-pw") as bob:
        holder = alice.submit(SLEEPER)
        wait_for(lambda: holder.status == "running", 30, "the sleeper to hold the only slot")
        queued = [alice.submit(SLEEPER) for _ in range(2)]
        limited = alice.submit("pass")  # a fourth within the burst of 3
        with pytest.raises(DistexecError) as err:
            limited.wait(30)
        assert (err.value.code, err.value.status) == ("rate_limited", 429)
        assert "retry in" in str(err.value)
        mine = [bob.submit(SLEEPER) for _ in range(2)]
        full = bob.submit("pass")  # within bob's burst, past his 2 queued
        with pytest.raises(DistexecError) as err:
            full.id
        assert (err.value.code, err.value.status) == ("queue_full", 429)
        assert "--max-queued-per-user" in str(err.value)
        for job in [holder, *queued, *mine]:
            job.cancel()


def test_a_burst_taken_in_at_once_is_still_judged_submission_by_submission(make_cluster, users_file):
    """The master answers the submissions one read brings together, with one commit; each keeps the
    answer it would have had alone, in order: a bad request, a program that does not parse, a full
    queue, a ref sent twice.  Nothing is lost and nothing is made twice."""
    lc = make_cluster(1, slots=1, languages="python",
                      master_args=["--users", users_file, "--max-queued-per-user", "3"])
    with Cluster(lc.url, user="alice", password="alice-pw") as alice:
        holder = alice.submit(SLEEPER)
        wait_for(lambda: holder.status == "running", 30, "the sleeper to hold the only slot")
        replies: dict[str, list[dict]] = {}
        alice.subscribe(lambda m: replies.setdefault(m["ref"], []).append(m) if m["type"] == "submit_reply" else 0)
        ok = {"source": SLEEPER, "language": "python"}
        burst = [("q1", ok), ("bad", {**ok, "colour": "red"}), ("syntax", {**ok, "source": "def ("}),
                 ("q2", ok), ("q1", ok), ("cobol", {**ok, "language": "cobol"}), ("q3", ok), ("full", ok)]

        def send_all():  # on the channel's own loop, in one go: the frames leave back to back
            for ref, request in burst:
                alice._events.send(P.make("submit", request=request, ref=f"burst-{ref}"))
        alice._events._loop.call_soon_threadsafe(send_all)
        wait_for(lambda: sum(map(len, replies.values())) == len(burst), 30, "an answer to every frame")
        first = {ref[len("burst-"):]: answers[0] for ref, answers in replies.items()}
        queued = [first[r]["job"] for r in ("q1", "q2", "q3")]
        assert [j["status"] for j in queued] == ["queued"] * 3
        assert [j["id"] for j in queued] == sorted(j["id"] for j in queued)  # in the order sent
        # The ref sent twice names the same job both times.
        assert [a["job"]["id"] for a in replies["burst-q1"]] == [queued[0]["id"]] * 2
        assert (first["bad"]["job"], first["bad"]["error"]["code"], first["bad"]["error"]["status"]) == \
            (None, "bad_request", 400)
        assert "colour" in first["bad"]["error"]["message"]
        assert first["syntax"]["job"]["status"] == "rejected"
        assert first["syntax"]["job"]["error"]["code"] == "syntax_error"
        assert first["cobol"]["job"]["error"]["code"] == "unsupported_language"
        # Past the 3 queued (a rejected job waits for nothing: it takes no place in the queue).
        assert (first["full"]["job"], first["full"]["error"]["code"]) == (None, "queue_full")
        assert "at most 3 may wait per user" in first["full"]["error"]["message"]
        made = {r["id"] for r in history(alice)}
        assert made == {holder.id, *(j["id"] for j in queued), first["syntax"]["job"]["id"],
                        first["cobol"]["job"]["id"]}
        for job_id in made:
            alice.job(job_id).cancel()


def test_a_user_removed_while_connected_is_refused_on_the_websocket(make_cluster, users_file):
    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users_file])
    with Cluster(lc.url, user="alice", password="alice-pw") as alice:
        assert alice.submit("print('ok')").wait(60).stdout == "ok\n"
        log = request_log(alice)
        assert auth.remove_user(users_file, "alice")
        job = alice.submit("print('no')")
        with pytest.raises(DistexecError) as err:
            job.wait(30)
        assert err.value.status == 401 and "log in again" in str(err.value)
        assert log == []  # refused on the WebSocket, as a POST would have been


def _alice_and_boss(make_cluster, tmp_path):
    """A cluster whose users are alice and boss, an admin: (its users file, the cluster)."""
    users = users_json(tmp_path, "alice")
    auth.add_user(users, "boss", "boss-pw", admin=True, hasher=CHEAP)
    return users, make_cluster(1, slots=1, languages="python", master_args=["--users", users])


def test_an_admin_demoted_while_connected_hears_only_its_own_jobs_after(make_cluster, tmp_path):
    users, lc = _alice_and_boss(make_cluster, tmp_path)
    with Cluster(lc.url, user="alice", password="alice-pw") as alice, \
            Cluster(lc.url, user="boss", password="boss-pw") as boss:
        heard: list[dict] = []
        boss.subscribe(heard.append)

        def heard_of(job_id: int) -> bool:
            return any(m.get("type") == "job_update" and m["job"]["id"] == job_id for m in list(heard))

        seen = alice.submit("print(1)").wait(60)
        wait_for(lambda: heard_of(seen.id), 20, "boss, an admin, to hear of alice's job")
        auth.add_user(users, "boss", "boss-pw", admin=False, hasher=CHEAP)
        # Its channel is closed, and opened again as what its login now is.
        wait_for(lambda: {"type": "connection", "connected": False} in heard, 20, "boss's channel to close")
        back = heard.index({"type": "connection", "connected": False})
        wait_for(lambda: {"type": "connection", "connected": True} in heard[back:], 20, "boss to reconnect")
        hidden = alice.submit("print(2)").wait(60)
        own = boss.submit("print(3)").wait(60)
        wait_for(lambda: heard_of(own.id), 20, "boss to hear of its own job")
        assert not heard_of(hidden.id)


def test_a_cancel_on_the_websocket_is_judged_by_the_login_as_it_is_now(make_cluster, tmp_path):
    users, lc = _alice_and_boss(make_cluster, tmp_path)
    with Cluster(lc.url, user="alice", password="alice-pw") as alice, \
            Cluster(lc.url, user="boss", password="boss-pw") as boss:
        sleeper = alice.submit(SLEEPER)
        wait_for(lambda: sleeper.status == "running", 30, "alice's job to run")

        async def cancel_after_demotion() -> dict:
            req = tornado.httpclient.HTTPRequest(config.ws_url(lc.url) + "/ws/client",
                                                 headers={"Authorization": f"Bearer {boss.token}"})
            conn = await tornado.websocket.websocket_connect(req)
            # Demoted once the channel is open, well within its first re-check (PING_INTERVAL).
            auth.add_user(users, "boss", "boss-pw", admin=False, hasher=CHEAP)
            conn.write_message(P.encode(P.make("cancel", job_id=sleeper.id, ref="c1")))
            while (msg := P.decode(await asyncio.wait_for(conn.read_message(), 20)))["type"] != "cancel_reply":
                pass
            await close_ws(conn)
            return msg

        reply = asyncio.run(cancel_after_demotion())
        assert reply["job"] is None and reply["error"]["code"] == "not_found"
        assert alice.job(sleeper.id).status == "running"
        sleeper.cancel()


def _stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


def test_submissions_sent_to_a_master_that_dies_are_sent_again_to_the_next(make_cluster):
    lc = make_cluster(2, slots=2, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        c.submit("pass").wait(60)
        # Frozen: the submissions reach its socket but it never reads them, then it dies.
        lc.master.send_signal(signal.SIGSTOP)
        wait_for(lambda: _stopped(lc.master.pid), 10, "the master to stop")
        jobs = [c.submit(f"print({i})") for i in range(12)]
        assert all(j.pending for j in jobs)
        lc.master.stop(signal.SIGKILL)
        lc.start_master()
        for job in jobs:
            job.wait(120)
        assert [j.stdout for j in jobs] == [f"{i}\n" for i in range(12)]
        # Each made once: the dead master had read none of them.
        assert len(history(c)) == 13


def test_a_reconnect_mid_burst_neither_loses_nor_doubles_a_submission(make_cluster):
    lc = make_cluster(2, slots=2, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        c.submit("pass").wait(60)
        lc.master.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(lc.master.pid), 10, "the master to stop")
            jobs = [c.submit(f"print({i})") for i in range(12)]
            events = c._events
            wait_for(lambda: not events._outbox and not events._flushing, 10, "the frames to be written")
            old = events._conn
            # The client drops its connection with the frames unanswered (the master
            # has them in its socket buffer), and reconnects to the same master.
            events._loop.call_soon_threadsafe(old.protocol.stream.close)
            wait_for(lambda: events._conn is not old, 10, "the client to drop its connection")
        finally:
            lc.master.send_signal(signal.SIGCONT)
        # The master now reads the old connection's submissions and the resent ones: same refs.
        for job in jobs:
            job.wait(120)
        assert [j.stdout for j in jobs] == [f"{i}\n" for i in range(12)]
        assert len({j.id for j in jobs}) == 12
        assert len(history(c)) == 13


def test_a_long_burst_keeps_the_channel_up_and_sends_nothing_twice(make_cluster):
    """A master working through thousands of pipelined submissions reads the client's pong behind
    them, late: that is no silence (distexec_kernel/liveness.py).  Before, its ping timeout dropped
    the channel mid-burst, and the client sent every unanswered submission again."""
    lc = make_cluster(1, slots=1, languages="python", master_args=["--max-queued-per-user", "20000"])
    with Cluster(lc.url, token=lc.token) as c:
        blocker = c.submit(SLEEPER)  # holds the one slot: the burst stays queued, nothing runs
        wait_for(lambda: c.job(blocker.id).status == P.RUNNING, 30, "the blocker to start")
        events = c._events
        opened = events.connections
        jobs = [c.submit("pass") for _ in range(BURST)]
        assert [j.status for j in jobs] == [P.QUEUED] * BURST  # each answered (status waits for it)
        assert events.connections == opened, "the event channel dropped during the burst"
        assert len({j.id for j in jobs}) == BURST


def test_pending_submissions_fail_clearly_when_the_client_closes(make_cluster):
    lc = make_cluster(1, slots=1, languages="python")
    c = Cluster(lc.url, token=lc.token)
    try:
        lc.master.send_signal(signal.SIGSTOP)
        wait_for(lambda: _stopped(lc.master.pid), 10, "the master to stop")
        job = c.submit("pass")
        assert job.pending
        t0 = time.monotonic()
        c.close()
        # Not held the 5 s tornado gives a peer to answer the close: a stopped master never does.
        assert time.monotonic() - t0 < 3
    finally:
        c.close()
        lc.master.send_signal(signal.SIGCONT)
    with pytest.raises(DistexecError, match="closed before the master answered"):
        job.wait(10)


def test_history_totals_are_kept_by_the_store_through_every_change(tmp_path):
    """GET /api/jobs's total comes from counts the store keeps (not COUNT(*) over the history):
    they must match a real count after inserts, status changes, user filters, pruning and a reopen."""
    import asyncio
    import sqlite3

    from distexec_kernel import protocol as P
    from master.store import JobStore

    path = str(tmp_path / "history.sqlite3")

    def job(job_id: int, status: str, user: str | None) -> dict:
        j = P.new_job(job_id, {"source": "pass", "language": "python", "files": {}, "args": [], "stdin": None},
                      client_id=None, user=user)
        j["status"] = status
        return j

    def truth(status=None, user=None) -> int:
        conn = sqlite3.connect(path)
        try:
            where = " AND ".join(c for c in ("status = ?" if status else "", "user = ?" if user else "") if c)
            args = [a for a in (status, user) if a]
            return conn.execute("SELECT COUNT(*) FROM jobs" + (f" WHERE {where}" if where else ""), args).fetchone()[0]
        finally:
            conn.close()

    async def check(store: JobStore) -> None:
        for status in (None, *P.STATES):
            for user in (None, "alice", "bob"):
                _, total = await store.list(status, 5, 0, user)
                assert total == truth(status, user), (status, user)

    async def scenario() -> None:
        store = JobStore(path)
        try:
            await store.save_many([job(i, P.QUEUED, ("alice", "bob", None)[i % 3]) for i in range(1, 61)])
            await check(store)
            # Status changes (the same rows saved again), one user's job changing hands.
            await store.save_many([job(i, P.SUCCEEDED if i % 2 else P.FAILED, ("alice", "bob", None)[i % 3])
                                   for i in range(1, 41)])
            await store.save(job(41, P.RUNNING, "bob"))
            await check(store)
            assert await store.prune(before="9999-01-01T00:00:00Z") == 40  # terminal ones only
            await check(store)
            page, total = await store.list(None, 5, 0, "alice")
            assert total == truth(None, "alice") and [j["id"] for j in page] == sorted(
                [j["id"] for j in page], reverse=True) and all(j["user"] == "alice" for j in page)
        finally:
            store.close()
        # A history written before the counts existed is counted once when opened.
        conn = sqlite3.connect(path)
        conn.execute("DELETE FROM meta WHERE key = 'job_counts'")
        conn.execute("UPDATE job_counts SET n = 999")
        conn.commit()
        conn.close()
        store = JobStore(path)
        try:
            await check(store)
        finally:
            store.close()

    asyncio.run(scenario())


def test_a_submission_the_master_never_answers_fails_as_unreachable(make_cluster, monkeypatch):
    from distexec_kernel import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "ACK_TIMEOUT", 1.0)
    lc = make_cluster(1, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        lc.master.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(lc.master.pid), 10, "the master to stop")
            job = c.submit("pass")
            with pytest.raises(DistexecError) as err:
                job.wait(20)
            assert err.value.code == "unreachable" and err.value.transient
            assert "may or may not have been queued" in str(err.value)
            with pytest.raises(TimeoutError):
                c.submit("pass").wait(0.2)  # the caller's own deadline comes first: a TimeoutError
        finally:
            lc.master.send_signal(signal.SIGCONT)


def test_a_very_large_submission_goes_over_http(client):
    log = request_log(client)
    # Within every field's limit, but past what one WebSocket frame should carry.
    job = client.submit("import sys\nprint(len(sys.stdin.read()), len(open('big.txt').read()))",
                        stdin="x" * (7 << 20), files={"big.txt": "y" * (2 << 20)})
    assert log == [("POST", "/api/jobs")] and not job.pending
    assert job.wait(120).stdout == f"{7 << 20} {2 << 20}\n"
    assert client.submit("print('small again')").wait(60).stdout == "small again\n"
    assert log == [("POST", "/api/jobs")]  # the small one went on the WebSocket


def test_the_historys_size_is_kept_by_the_store_through_every_change(tmp_path):
    """Pruning to --keep-mb reads the history's size from totals the store keeps (a SUM over a
    million rows held the writer back half a second): the whole and each user's finished part must
    match a real sum after inserts with inputs, saves that change a record's size or status, pruning
    by date and by size, and a reopen."""
    import asyncio
    import sqlite3

    from master.store import JobStore

    path = str(tmp_path / "history.sqlite3")

    def job(job_id: int, status: str, out: str = "", files: dict | None = None, user: str | None = "alice") -> dict:
        j = P.new_job(job_id, {"source": "print(1)", "language": "python", "files": files or {}, "args": [],
                               "stdin": None}, client_id=None, user=user)
        j.update(status=status, stdout=out)
        return j

    def query(sql: str) -> list:
        conn = sqlite3.connect(path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def truth() -> int:
        return sum(query(f"SELECT COALESCE(SUM(size), 0) FROM {t}")[0][0] for t in ("jobs", "inputs"))

    def finished() -> dict:
        return dict(query("SELECT COALESCE(j.user, ''), SUM(j.size + COALESCE(i.size, 0)) FROM jobs j "
                          "LEFT JOIN inputs i ON i.id = j.id WHERE j.status NOT IN ('queued', 'running') GROUP BY 1"))

    async def agree(store) -> None:
        assert await store.size() == truth()
        assert dict(query("SELECT user, n FROM user_bytes WHERE n != 0")) == finished()
        assert await store.finished_size() == sum(finished().values())

    async def scenario() -> None:
        store = JobStore(path)
        try:
            await store.save_many([job(i, P.QUEUED, files={"data.txt": "x" * (100 * i)}) for i in range(1, 41)])
            assert truth() > 40 * 100 and finished() == {}
            await agree(store)
            # Saved again: bigger records (output), inputs saved again with other sizes.
            await store.save_many([job(i, P.SUCCEEDED, out="y" * (50 * i), files={"d": "z" * i}) for i in range(1, 31)])
            await agree(store)
            await store.save_many([job(i, P.FAILED, out="v" * i, user=None) for i in range(61, 65)])
            await agree(store)
            assert await store.prune(before="9999-01-01T00:00:00Z") == 34  # terminal ones only
            await agree(store)
            await store.save_many([job(i, P.SUCCEEDED, out="w" * 3000) for i in range(41, 61)])
            keep = sum(finished().values()) // 2
            assert await store.prune(keep_bytes=keep) > 0
            await agree(store)
            assert 0 < sum(finished().values()) <= keep
            # The pages it freed went back to the disk (a PRAGMA stepped once freed one page).
            assert query("PRAGMA freelist_count") == [(0,)]
        finally:
            store.close()
        # A history written before the totals existed is summed once when opened.
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE totals")
        conn.execute("DELETE FROM user_bytes")
        conn.execute("DELETE FROM meta WHERE key = 'user_bytes'")
        conn.commit()
        conn.close()
        store = JobStore(path)
        try:
            assert truth() > 0 and finished()
            await agree(store)
        finally:
            store.close()

    asyncio.run(scenario())


def test_a_submission_sent_again_to_a_restarted_master_gets_the_job_it_made_before(make_cluster, users_file):
    """The master committed the job, then died before its answer went out: the submission is sent
    again (same ref, marked "again") to the restarted master, which answers with that job, not a
    second one.  The ref is the user's own: the same ref from another user is another job.  (Logins
    do not outlive a restart, so each user logs in again; the admin token's client resends by itself.)"""
    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users_file])
    body = {"source": "print('once')", "language": "python"}

    def ask(user: str, ref: str) -> dict:
        with Cluster(lc.url, user=user, password=f"{user}-pw") as c:
            replies: list[dict] = []
            c.subscribe(lambda m: replies.append(m) if m["type"] == "submit_reply" else None)
            c._events.send(P.make("submit", request=body, ref=ref, again=True))
            job = wait_for(lambda: next((m for m in replies if m["ref"] == ref), None), 30, f"{user}'s answer")["job"]
            assert c.job(job["id"]).wait(60).stdout == "once\n"
            return {**job, "history": [r["id"] for r in history(c)]}

    with Cluster(lc.url, user="alice", password="alice-pw") as alice:
        replies: list[dict] = []
        alice.subscribe(lambda m: replies.append(m) if m["type"] in ("submit_reply", "job_update") else None)
        alice._events.send(P.make("submit", request=body, ref="r-1"))
        made = wait_for(lambda: next((m for m in replies if m.get("ref") == "r-1"), None), 30, "the answer")["job"]
        assert made["ref"] == "r-1"
        assert alice.job(made["id"]).wait(60).stdout == "once\n"
        # The ref is the submitter's: answered in its submit_reply, not told in every event.
        updates = [m["job"] for m in replies if m["type"] == "job_update" and m["job"]["id"] == made["id"]]
        assert updates and not any("ref" in job for job in updates), updates
    lc.restart_master()
    again = ask("alice", "r-1")
    assert again["id"] == made["id"] and again["status"] == "succeeded", again
    assert again["history"] == [made["id"]]
    other = ask("bob", "r-1")
    assert other["id"] != made["id"] and other["user"] == "bob"
    # A ref nobody used, sent "again" (the master never read it): made now, once.
    fresh = ask("alice", "r-2")
    assert fresh["id"] not in (made["id"], other["id"])
    assert fresh["history"] == [fresh["id"], made["id"]]


def test_a_read_answered_before_an_event_does_not_move_the_job_back(make_cluster):
    """A GET or a listing asked while a job was queued, answered after the events of its start and output,
    leaves the job running with its output (it moved it back to queued, its output wiped)."""
    lc = make_cluster(1, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        blocker = c.submit(HOLD + UNTIL_RELEASED)
        job = c.submit(HOLD + "print('started', flush=True)\n" + UNTIL_RELEASED)
        wait_for(lambda: blocker.status == P.RUNNING, 30, "the blocker to take the one slot")
        asked = time.monotonic()
        late = c._call("GET", f"/api/jobs/{job.id}")  # the job as it is now: queued
        listed = c._call("GET", "/api/jobs", params={"limit": 50})["jobs"]
        assert late["status"] == P.QUEUED
        release_jobs(lc.slaves[0].proc.pid)  # the blocker ends; the job starts and prints
        wait_for(lambda: job.record.get("stdout") == "started\n", 30, "the job's output event")
        job._replace(late, asked)  # as if that read's answer came only now
        [summary] = [r for r in listed if r["id"] == job.id]
        job._apply_update(summary, asked)
        assert job.status == P.RUNNING and job.record["stdout"] == "started\n"
        # A read asked after the events is applied: here, the job's end.
        release_jobs(lc.slaves[0].proc.pid)
        assert job.wait(30).status == P.SUCCEEDED and job.stdout == "started\n"
        assert job.refresh().status == P.SUCCEEDED


def test_a_submission_is_answered_without_the_inputs_its_sender_keeps(cluster, client):
    """The answer to a submission echoed its inputs back: the 201 of a 7 MiB stdin carried it again, and a
    map of 10,000 jobs of one 10 KB program was answered with 100 MB.  A sender that keeps what it sent
    (``echo=0``, ``"echo": false``; the client always does) is answered without them, an ended job
    (rejected: its source cut) whole; and the client's jobs hold their inputs as the master keeps them."""
    url, headers = cluster.url, {"Authorization": f"Bearer {cluster.token}"}
    body = {"source": "import sys\nprint(sys.argv[1], sys.stdin.read(), open('a.txt').read())", "language": "py",
            "files": {"a.txt": "aaa"}, "stdin": "in", "args": ["x"]}
    inputs = set(P.INPUT_FIELDS)

    def post(path: str, payload) -> dict:
        resp = requests.post(url + path, json=payload, headers=headers, timeout=30)
        assert resp.status_code == 201, resp.text
        return resp.json()

    lean = post("/api/jobs?echo=0", body)
    assert lean["id"] and lean["language"] == "python" and not inputs & set(lean), lean
    full = post("/api/jobs", body)
    assert {k: full[k] for k in inputs} == {k: body[k] for k in inputs}  # as before, for other clients
    batch = post("/api/jobs?echo=0", [body, body])["jobs"]
    assert len(batch) == 2 and not any(inputs & set(job) for job in batch)
    rejected = post("/api/jobs?echo=0", {"source": "def (", "language": "python"})
    assert rejected["status"] == "rejected" and rejected["source"] == "def ("

    async def ws_replies() -> list[dict]:
        req = tornado.httpclient.HTTPRequest(config.ws_url(url) + "/ws/client", headers=headers)
        conn = await tornado.websocket.websocket_connect(req)
        for ref, echo in (("lean", {"echo": False}), ("full", {})):
            conn.write_message(P.encode(P.make("submit", request=body, ref=ref, **echo)))
        replies = []
        while len(replies) < 2:
            msg = P.decode(await asyncio.wait_for(conn.read_message(), 20))
            if msg["type"] == "submit_reply":
                replies.append(msg)
        await close_ws(conn)
        return replies

    replies = {msg["ref"]: msg["job"] for msg in asyncio.run(ws_replies())}
    assert not inputs & set(replies["lean"]) and replies["full"]["source"] == body["source"]

    # The client's jobs, pipelined, over HTTP and in a map, hold what the master keeps, and run.
    log = request_log(client)
    piped = client.submit(body["source"], files=body["files"], stdin="in", args=["x"])
    big = client.submit(body["source"], files={"a.txt": "aaa" + " " * (2 << 20)}, stdin="in" + " " * (7 << 20),
                        args=["x"])  # past what the WebSocket takes: over HTTP
    mapped = client.map("import sys\nprint(sys.argv[1])", ["m0", "m1"])
    assert log == [("POST", "/api/jobs"), ("POST", "/api/jobs")]  # the big one and the map
    for job in (piped, big, *mapped):
        kept = client.job(job.id).record
        assert {k: job.record[k] for k in inputs} == {k: kept[k] for k in inputs}, job.id
    assert piped.wait(60).stdout == "x in aaa\n" and big.wait(120).stdout.startswith("x in")
    assert mapped.results(timeout=60) == ["m0\n", "m1\n"]
