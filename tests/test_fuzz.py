"""Property tests: random and malformed input never crashes the protocol code or the master.

The first half checks ``protocol`` directly (fast, no cluster).  The second
feeds frames to a real master over real WebSockets and bodies over HTTP:
every frame gets an error reply (or is ignored where the protocol says so),
no handler fails inside (``internal_error``, HTTP 500), no connection is
closed, and afterwards the master still runs a normal job.
"""
from __future__ import annotations

import json

import argon2
import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from distexec_kernel import Cluster, protocol as P, rich_outputs as R
from master import auth

from conftest import Socket

FAST = settings(max_examples=150, deadline=None)
LIVE = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------

# Lone surrogates and NaN/Infinity are valid for Python's json but not JSON: both must be refused cleanly.
surrogates = st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=4)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats() | st.text(max_size=20) | surrogates)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

_BY_TYPE = {int: st.integers(min_value=-(2 ** 40), max_value=2 ** 40) | st.integers(), float: st.floats(),
            str: st.text(max_size=30) | surrogates,
            bool: st.booleans(), list: st.lists(json_values, max_size=3),
            dict: st.dictionaries(st.text(max_size=8), json_values, max_size=3), type(None): st.none()}


_IN_RANGE = {**_BY_TYPE, int: st.integers(min_value=P.INT_MIN, max_value=P.INT_MAX)}


def _of_type(expected, by_type=_BY_TYPE) -> st.SearchStrategy:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return st.one_of(*(by_type[k] for k in kinds))


submissions = st.fixed_dictionaries({}, optional={
    "source": st.text(max_size=40) | json_values,
    "language": st.sampled_from(["python", "py", "c", "bash", "nope", "", "PYTHON"]) | json_values,
    "name": st.text(max_size=20) | surrogates | json_values,
    "files": st.dictionaries(st.text(max_size=12), st.text(max_size=10) | json_values, max_size=3) | json_values,
    "args": st.lists(st.text(max_size=5) | json_values, max_size=3) | json_values,
    "stdin": st.text(max_size=10) | json_values,
    "timeout": st.floats() | st.integers() | json_values,
    "retries": st.integers(min_value=-3, max_value=20) | json_values,
    "session": st.text(max_size=10) | json_values,
    "collect": st.lists(st.text(max_size=8) | json_values, max_size=3) | json_values,
    "unexpected": json_values,
})


@st.composite
def messages(draw, types=tuple(P.MESSAGES) + ("bogus",)) -> dict:
    """Message-shaped dicts: a known (or unknown) type, each field right-typed, wrong-typed or missing."""
    msg_type = draw(st.sampled_from(types))
    msg = {"type": msg_type}
    for field, (expected, _required) in P.MESSAGES.get(msg_type, {}).items():
        if draw(st.integers(0, 5)) == 0:
            continue
        if msg_type == "submit" and field == "request":
            msg[field] = draw(submissions | json_values)
        else:
            msg[field] = draw(_of_type(expected) | json_values) if draw(st.booleans()) else draw(_of_type(expected))
    if draw(st.integers(0, 4)) == 0:
        msg[draw(st.text(max_size=6))] = draw(json_values)
    return msg


# A job's error as the table wants it in a job_finished: {"code", "message", "line"?, "column"?}.
job_errors = st.none() | st.builds(P.error, st.sampled_from(tuple(P.ERROR_STATUS)), st.text(max_size=20),
                                   line=st.none() | st.integers(1, 10 ** 6), column=st.none() | st.integers(1, 200))


@st.composite
def valid_messages(draw) -> dict:
    """Messages that match the table, with strict-JSON values only (no NaN, no lone surrogate)."""
    msg_type = draw(st.sampled_from(tuple(P.MESSAGES)))
    msg = {"type": msg_type}
    for field, (expected, required) in P.MESSAGES[msg_type].items():
        if required or draw(st.booleans()):
            msg[field] = draw(st.sampled_from(P.STREAMS) if field == "stream" else _of_type(expected, _IN_RANGE))
    if msg_type == "job_finished":
        msg["error"] = draw(job_errors)
    assume(_strict(msg))
    return msg


def _strict(value) -> bool:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


frames = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    json_values.map(_dumps),
    messages().map(_dumps),
)

# --- protocol, no cluster ---------------------------------------------------


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200) | json_values.map(_dumps) | messages().map(_dumps))
def test_decode_returns_a_valid_message_or_raises_protocol_error(frame):
    try:
        msg = P.decode(frame)
    except P.ProtocolError as exc:
        assert exc.code in ("bad_json", "bad_message", "unknown_type", "too_large") and exc.message
        return
    assert P.validate(msg) is msg and msg["type"] in P.MESSAGES


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200) | json_values.map(_dumps)
       | st.lists(messages().map(_dumps) | json_values.map(_dumps), max_size=5).map(lambda xs: "[" + ",".join(xs) + "]"))
def test_decode_batch_returns_valid_messages_and_errors_never_raises(frame):
    out = P.decode_batch(frame)
    assert out or P.loads(frame) == []  # an empty batch is no message, and no error
    for item in out:
        if isinstance(item, P.ProtocolError):
            assert item.code in ("bad_json", "bad_message", "unknown_type", "too_large") and item.message
        else:
            assert P.validate(item) is item and item["type"] in P.MESSAGES


@FAST
@given(st.lists(valid_messages(), min_size=1, max_size=5))
def test_valid_messages_survive_a_batch_in_order(msgs):
    assert P.decode_batch(P.encode_batch([P.encode(m) for m in msgs])) == msgs


@FAST
@given(valid_messages())
def test_a_valid_message_survives_encode_and_decode(msg):
    assert P.validate(msg) is msg
    assert P.decode(P.encode(msg)) == msg


@FAST
@given(json_values, st.integers(min_value=0, max_value=P.MAX_JSON_DEPTH + 1))
def test_check_value_refuses_exactly_what_loads_would(value, levels):
    """A slave checks a session's display bundles with ``check_value`` before they go into a job_finished:
    what it passes, the master's ``loads`` must take, or the result is lost and the job runs for ever."""
    for _ in range(levels):
        value = [value]
    try:
        P.check_value(value)
        checked = None
    except ValueError as exc:
        checked = str(exc)
    try:
        P.loads(_dumps(value))  # escaped as a kernel's JSON escapes them (ensure_ascii): surrogates too
        loaded = None
    except ValueError as exc:
        loaded = str(exc)
    assert (checked is None) == (loaded is None), (checked, loaded)


mime_types = st.sampled_from(["text/plain", "text/html", "image/png", "image/svg+xml", "application/json",
                              "application/vnd.custom+json", "text/markdown"]) | st.text(max_size=12)
bundles = st.fixed_dictionaries({"output_type": st.sampled_from(R.OUTPUT_TYPES) | json_values,
                                 "data": st.dictionaries(mime_types, st.text(max_size=8) | json_values, max_size=4)
                                 | json_values}, optional={"metadata": json_values})


@FAST
@given(st.lists(bundles | json_values, max_size=4) | json_values)
def test_clean_outputs_keeps_what_a_renderer_takes_and_says_what_it_left_out(outputs):
    """The one rule for a result's rich outputs (slave and master apply it): text for every MIME type but
    JSON ones, which take any JSON value.  Whatever it is given, what it keeps it would keep again, and
    nothing goes without a note."""
    kept, notes = R.clean_outputs(outputs)
    assert R.clean_outputs(kept) == (kept, [])
    for out in kept:
        assert out["output_type"] in R.OUTPUT_TYPES and isinstance(out["metadata"], dict)
        assert all(isinstance(value, str) or R.json_mime(mime) for mime, value in out["data"].items())
    given_ = outputs if isinstance(outputs, list) else []
    assert len(notes) >= len(given_) - len(kept)
    if not notes:
        assert [out["data"] for out in kept] == [out["data"] for out in given_]


@FAST
@given(submissions | json_values)
def test_check_submission_normalises_or_names_the_problem(body):
    try:
        sub = P.check_submission(body)
    except P.ProtocolError as exc:
        assert exc.code in ("bad_request", "too_large") and exc.message
        return
    assert set(sub) == set(P.SUBMISSION)
    assert isinstance(sub["source"], str) and sub["language"].strip()
    assert 0 < sub["timeout"] <= P.MAX_TIMEOUT and isinstance(sub["timeout"], float)
    assert 0 <= sub["retries"] <= P.MAX_RETRIES
    assert all(isinstance(a, str) for a in sub["args"]) and isinstance(sub["files"], dict)
    for name in sub["files"]:
        parts = name.split("/")
        assert not set(parts) & {"", ".", ".."} and len(parts) <= P.MAX_FILE_DEPTH
    json.dumps(sub, allow_nan=False)  # what is accepted can be stored and sent back


def test_strings_python_accepts_but_json_does_not_are_bad_json():
    for text in ('{"type": "cancel", "job_id": 1, "ref": "\\ud800"}', '{"type": "cancel", "job_id": NaN}',
                 b'{"type": "cancel", "job_id": 1, "ref": "\xed\xa0\x80"}', '"\\udfff"'):
        with pytest.raises(P.ProtocolError) as err:
            P.decode(text)
        assert err.value.code == "bad_json"
    # A proper pair (an emoji written as two escapes) is fine.
    assert P.decode('{"type": "cancel", "job_id": 1, "ref": "\\ud83d\\ude00"}')["ref"] == "\U0001F600"


def test_a_lone_surrogate_in_a_job_field_does_not_break_the_history(make_cluster):
    # It used to reach SQLite and kill the history writer: every later submission then hung.
    lc = make_cluster(0)
    headers = {"Authorization": f"Bearer {lc.token}"}
    for body in ('{"source": "\\ud800", "language": "python"}',
                 '{"source": "print(1)", "language": "python", "name": "\\udc00"}'):
        resp = requests.post(lc.url + "/api/jobs", data=body, headers=headers, timeout=20)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_json"
    resp = requests.post(lc.url + "/api/jobs", json={"source": "print(1)", "language": "python", "name": "ok"},
                         headers=headers, timeout=20)
    assert resp.status_code == 201
    assert requests.get(lc.url + f"/api/jobs/{resp.json()['id']}", headers=headers, timeout=20).json()["name"] == "ok"


def test_what_a_user_sends_reaches_the_log_bounded_and_without_tokens(make_cluster, tmp_path):
    """A job id of 5,000 digits (a 500 and a traceback per request), a message type of 8 MiB
    (logged whole: two took the log 17 MB), and ?token= on an API request (a token in the log)."""
    lc = make_cluster(0)
    headers = {"Authorization": f"Bearer {lc.token}"}
    nines = "9" * 5000
    for path in (f"/api/jobs/{nines}", f"/api/jobs/{nines}/artifacts/x"):
        assert requests.get(lc.url + path, headers=headers, timeout=20).status_code == 404
    assert requests.post(f"{lc.url}/api/jobs/{nines}/cancel", headers=headers, timeout=20).status_code == 404
    sock = Socket(lc.url, "/ws/client", lc.token)
    try:
        assert sock.recv()["type"] == "welcome"
        replies = sock.exchange(json.dumps({"type": "A" * (8 << 20)}))
        assert [r["error"]["code"] for r in replies] == ["unknown_type"]
        assert len(replies[0]["error"]["message"]) < 200
    finally:
        sock.close()
    # The token is for WebSocket upgrades only (a browser's); an API request names it in a header.
    assert requests.get(f"{lc.url}/api/jobs?token={lc.token}", timeout=20).status_code == 401
    assert requests.get(f"{lc.url}/api/jobs?limit=x&token={lc.token}", headers=headers, timeout=20).status_code == 400
    master_log = (tmp_path / "logs" / "master.log").read_text()
    assert lc.token not in master_log and "token=…" in master_log
    assert "Traceback" not in master_log and len(master_log) < 100_000, len(master_log)


def test_a_client_frame_is_bounded_so_that_its_job_run_fits_the_slaves_limit(make_cluster):
    """A job_run is its submission and a little more: a frame near the 64 MiB message limit (8 MiB of
    stdin is 48 MiB as JSON, with files more still) would make one the slave refuses at each try.  A
    client's frame is bounded as an HTTP body is, 32 MiB; under it the job runs with all its stdin."""
    lc = make_cluster(1, slots=1, languages="python")
    sock = Socket(lc.url, "/ws/client", lc.token)
    try:
        assert sock.recv()["type"] == "welcome"
        program = "import sys\nprint(len(sys.stdin.read()))"

        def frame(ref: str, chars: int) -> str:
            return json.dumps({"type": "submit", "ref": ref, "request": {
                "source": program, "language": "python", "stdin": "\x01" * chars}}, ensure_ascii=False)
        big = sock.exchange(frame("big", 6 << 20))  # 36 MiB as JSON
        assert [r["error"]["code"] for r in big] == ["too_large"], big
        sock.send(frame("fits", 4 << 20))  # 24 MiB
        reply = sock.recv()
        while reply["type"] != "submit_reply":
            reply = sock.recv()
        assert reply["ref"] == "fits" and reply["job"], reply
        job = Cluster(lc.url, token=lc.token).job(reply["job"]["id"]).wait(60)
        assert job.status == P.SUCCEEDED and job.stdout == f"{4 << 20}\n", (job.error, job.stderr[-300:])
    finally:
        sock.close()


def test_integers_past_64_bits_are_refused_not_looked_up(make_cluster):
    # A job id of 10**30 reached SQLite (OverflowError): 500 over HTTP, internal_error on the WebSocket.
    lc = make_cluster(0)
    headers = {"Authorization": f"Bearer {lc.token}"}
    huge = 10 ** 30
    assert requests.get(f"{lc.url}/api/jobs/{huge}", headers=headers, timeout=20).status_code == 404
    assert requests.post(f"{lc.url}/api/jobs/{huge}/cancel", headers=headers, timeout=20).status_code == 404
    with pytest.raises(P.ProtocolError, match="job_id"):
        P.decode(json.dumps({"type": "cancel", "job_id": huge}))
    assert P.decode(json.dumps({"type": "cancel", "job_id": P.INT_MAX}))["job_id"] == P.INT_MAX
    sock = Socket(lc.url, "/ws/client", lc.token)
    try:
        assert sock.recv()["type"] == "welcome"
        replies = sock.exchange(json.dumps({"type": "cancel", "job_id": huge}))
        assert [r["error"]["code"] for r in replies] == ["bad_message"]
        replies = sock.exchange(json.dumps({"type": "cancel", "job_id": P.INT_MAX}))
        assert [(r["type"], r["error"]["code"]) for r in replies] == [("cancel_reply", "not_found")]
    finally:
        sock.close()


# --- the live master ----------------------------------------------------------


@pytest.fixture
def bare_master(make_cluster, tmp_path):
    """A master with no slave (client submissions are rejected, never run) and one user, "fuzzer"."""
    users = str(tmp_path / "users.json")
    auth.add_user(users, "fuzzer", "pw", hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
    return make_cluster(0, languages="python", master_args=["--users", users])


@pytest.fixture(params=["admin", "user"])
def client_socket(request, bare_master):
    """A client connection as the admin, or as a logged-in user (whose paths check ownership)."""
    token = bare_master.token
    if request.param == "user":
        token = requests.post(bare_master.url + "/api/login", json={"user": "fuzzer", "password": "pw"},
                              timeout=20).json()["token"]
    sock = Socket(bare_master.url, "/ws/client", token)
    assert sock.recv()["type"] == "welcome"
    yield sock
    sock.close()


@pytest.fixture
def slave_socket(bare_master):
    """A registered (fake) slave connection that offers no language, so no job is sent to it."""
    sock = Socket(bare_master.url, "/ws/slave", bare_master.secret)
    sock.send(P.encode(P.make("register", protocol=P.PROTOCOL_VERSION, uid="fuzz-slave", host="fuzz",
                              languages=[], slots=1)))
    while (reply := sock.recv())["type"] != "register_reply":
        pass
    assert reply["ok"] is True
    yield sock
    sock.close()


def test_what_a_slave_connection_says_before_registering_counts_for_nothing(bare_master):
    """A languages message (protocol 4: a slave's toolchains found after it registered), output or a
    result from a connection that never registered: each refused as not_registered, none offering a
    language or touching a job; the connection can still register after."""
    sock = Socket(bare_master.url, "/ws/slave", bare_master.secret)
    try:
        early = [P.make("languages", languages=[{"name": "ruby", "version": "3.1"}], detecting=False),
                 P.make("job_output", job_id=1, stream="stdout", data="x"),
                 P.make("job_finished", job_id=1, exit_code=0, error=None, stdout="", stderr="")]
        for msg in early:
            replies = sock.exchange(P.encode(msg))
            assert [(r["type"], r["error"]["code"]) for r in replies] == [("error", "not_registered")], (msg, replies)
        names = [lang["name"] for lang in requests.get(bare_master.url + "/api/languages", timeout=20,
                                                       headers={"Authorization": f"Bearer {bare_master.token}"}).json()["languages"]]
        assert "ruby" not in names, names
        sock.send(P.encode(P.make("register", protocol=P.PROTOCOL_VERSION, uid="late-slave", host="fuzz",
                                  languages=[], slots=1)))
        while (reply := sock.recv())["type"] != "register_reply":
            pass
        assert reply["ok"] is True
    finally:
        sock.close()


@LIVE
@given(frame=frames)
def test_every_client_frame_gets_a_reply_and_the_connection_lives(client_socket, frame):
    replies = client_socket.exchange(frame)
    assert len(replies) == 1, replies
    reply = replies[0]
    assert reply["type"] in ("error", "submit_reply", "cancel_reply"), reply
    P.validate(reply)
    err = reply.get("error")
    if err is not None:
        assert err["code"] != "internal_error", err
        assert err["message"]
    if reply["type"] == "submit_reply" and err is None:
        assert reply["job"]["user"] in ("admin", "fuzzer")
        # Nothing runs here: an accepted submission is rejected (no slave), part of the history.
        assert reply["job"]["status"] == P.REJECTED


@LIVE
@given(frame=frames)
def test_slave_frames_get_an_error_reply_or_are_ignored_and_the_connection_lives(slave_socket, frame):
    try:
        msg = json.loads(frame)
    except ValueError:
        msg = None
    if isinstance(msg, dict) and msg.get("type") == "register":
        # A slave of another protocol version is refused and closed by design (tested in test_core).
        assume(msg.get("protocol") == P.PROTOCOL_VERSION or not isinstance(msg.get("protocol"), int)
               or isinstance(msg.get("protocol"), bool))
    replies = slave_socket.exchange(frame)
    for reply in replies:
        P.validate(reply)
        assert reply["type"] in ("error", "register_reply", "result_ack", "draining", "session_end"), reply
        if reply["type"] == "error":
            assert reply["error"]["code"] != "internal_error", reply
    try:
        P.decode(frame)
        valid = True
    except P.ProtocolError:
        valid = False
    if not valid:
        assert [r["type"] for r in replies] == ["error"]


@LIVE
@given(body=st.one_of(st.binary(max_size=80), json_values.map(_dumps), submissions.map(_dumps)))
def test_random_job_bodies_get_201_or_a_4xx_with_a_json_error(bare_master, body):
    resp = requests.post(bare_master.url + "/api/jobs", data=body, timeout=20,
                         headers={"Authorization": f"Bearer {bare_master.token}"})
    assert resp.status_code in (201, 400, 413), (resp.status_code, resp.text)
    answer = resp.json()
    if resp.status_code == 201 and "jobs" in answer:
        # A list is a batch: all of it checked, then (no slave here) all of it rejected.
        assert all(j["status"] == P.REJECTED and isinstance(j["id"], int) for j in answer["jobs"])
        assert (answer["group"] is None) == (not answer["jobs"])
    elif resp.status_code == 201:
        assert answer["status"] == P.REJECTED and isinstance(answer["id"], int)
    else:
        assert set(answer["error"]) >= {"code", "message"} and answer["error"]["message"]


def test_after_the_fuzzing_the_master_still_runs_jobs(bare_master, client_socket, slave_socket):
    # A burst of garbage on both channels at once, without waiting for the replies...
    for i in range(200):
        client_socket.send(["{", "[]", '{"type": "submit"}', b"\xff\xfe", '{"type":"cancel","job_id":-1}'][i % 5])
        slave_socket.send(['{"type": "job_finished"}', "null", '{"type": "job_output", "job_id": 1, '
                           '"stream": "stdin", "data": ""}', '{"type":"draining"}'][i % 4])
    # ...is all answered, one reply each, in order, and both connections still work.
    replies = client_socket.exchange("{")
    assert len(replies) == 201 and replies[-1]["error"]["code"] == "bad_json"
    assert [r["type"] for r in replies[:5]] == ["error", "error", "error", "error", "cancel_reply"]
    assert all(r["error"]["code"] != "internal_error" for r in replies)
    replies = slave_socket.exchange("null")
    assert len(replies) == 201 and replies[-1]["type"] == "error"
    assert [r["type"] for r in replies[:4]] == ["error", "error", "error", "draining"]
    slave_socket.close()
    bare_master.start_slave()
    with Cluster(bare_master.url, token=bare_master.token) as c:
        job = c.submit("print('still here')").wait(30)
        assert job.status == P.SUCCEEDED and job.stdout == "still here\n"
    assert bare_master.master.alive()


segments = st.one_of(st.from_regex(r"\A[0-9]{1,40}\Z"), st.text(max_size=12), st.sampled_from(["-1", "0", "1"]))
queries = st.dictionaries(st.sampled_from(["status", "limit", "offset", "token", "user", "x"]),
                          st.text(max_size=12) | st.integers().map(str), max_size=3)


@LIVE
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
       template=st.sampled_from(["/api/jobs", "/api/jobs/{}", "/api/jobs/{}/cancel", "/api/sessions",
                                 "/api/sessions/{}", "/api/login", "/api/slaves", "/api/clients",
                                 "/api/languages", "/api/health", "/api/{}", "/{}"]),
       segment=segments, query=queries, body=st.none() | st.binary(max_size=40) | json_values.map(_dumps))
def test_any_request_to_any_endpoint_gets_a_json_answer_below_500(bare_master, method, template, segment,
                                                                   query, body):
    from urllib.parse import quote
    path = template.format(quote(segment, safe=""))
    resp = requests.request(method, bare_master.url + path, params=query, data=body, timeout=20,
                            headers={"Authorization": f"Bearer {bare_master.token}"})
    assert resp.status_code < 500, (method, path, query, resp.status_code, resp.text)
    answer = resp.json()
    if resp.status_code >= 400:
        assert answer["error"]["code"] and answer["error"]["message"]
