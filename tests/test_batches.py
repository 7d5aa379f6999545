"""Batch frames: a connection's messages of one loop turn go in one frame, to peers that read them.

Real masters and slaves on loopback (conftest); raw WebSocket peers see the
frames as they come, so the tests tell a batch from single frames.  Also:
each job is announced once per committed state, and its job_run goes first.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import tornado.httpclient
import tornado.websocket

from distexec_kernel import Cluster, config, protocol as P

from conftest import HOLD, UNTIL_RELEASED, Socket, release_jobs, wait_for

T = 120


# -- the protocol, no cluster ----------------------------------------------------

def test_a_batch_decodes_to_its_messages_in_order_and_a_bad_one_stands_alone():
    msgs = [P.make("job_cancel", job_id=i) for i in range(3)]
    text = P.encode_batch([P.encode(msgs[0]), P.encode(msgs[1]), '{"type": "job_cancel"}', P.encode(msgs[2])])
    out = P.decode_batch(text)
    assert out[:2] == msgs[:2] and out[3] == msgs[2]
    assert isinstance(out[2], P.ProtocolError) and out[2].code == "bad_message"
    # A single message is a batch of one; a frame that is not JSON, one error.
    assert P.decode_batch(P.encode(msgs[0])) == [msgs[0]]
    [bad] = P.decode_batch("[{")
    assert isinstance(bad, P.ProtocolError) and bad.code == "bad_json"
    # The master reads one message per frame: nobody sends it batches.
    with pytest.raises(P.ProtocolError):
        P.decode(text)


def test_batch_frames_keep_order_and_stop_short_of_the_limit():
    texts = [P.encode(P.make("job_cancel", job_id=i)) for i in range(10)]  # 31-32 characters each
    frames = P.batch_frames(texts, 100)
    assert [m for f in frames for m in P.decode_batch(f)] == [P.decode(t) for t in texts]
    assert all(len(f) <= 100 for f in frames) and all(f.startswith("[") for f in frames[:-1])
    big = P.encode(P.make("job_cancel", job_id=10, ref="x" * 200))
    # A message past the limit goes alone, as itself; a lone message is never a batch of one.
    assert P.batch_frames([texts[0], big, texts[1]], 100) == [texts[0], big, texts[1]]
    assert P.batch_frames([texts[0]], 100) == [texts[0]]
    assert P.batch_frames([], 100) == []


# -- clients ----------------------------------------------------------------------

def test_a_client_hears_each_committed_state_of_a_job_once_in_order(make_cluster):
    """A job that starts at once was never committed as queued: it is announced running, then
    ended; a job that waits is announced queued, running, ended."""
    lc = make_cluster(1, slots=1)
    with Cluster(lc.url, token=lc.token) as c:
        seen: list[tuple[int, str]] = []
        c.subscribe(lambda m: seen.append((m["job"]["id"], m["job"]["status"])) if m["type"] == "job_update" else None)
        first = c.submit(HOLD + UNTIL_RELEASED)
        assert first.status == P.RUNNING  # the submit_reply says what was committed
        second = c.submit("print(2)")
        assert second.status == P.QUEUED  # the one slot is taken
        release_jobs(lc.slaves[0].pid)
        assert first.wait(T).status == second.wait(T).status == P.SUCCEEDED
        wait_for(lambda: (second.id, P.SUCCEEDED) in seen, 20, "the second job's last event")
        assert [s for j, s in seen if j == first.id] == [P.RUNNING, P.SUCCEEDED]
        assert [s for j, s in seen if j == second.id] == [P.QUEUED, P.RUNNING, P.SUCCEEDED]


def _job_events(sock: Socket, ids: set[int]) -> tuple[list[str], list[tuple]]:
    """Read ``sock`` until every job of ``ids`` has ended: its frames, and the events of those jobs in order."""
    frames, events, ended = [], [], set()
    while ended != ids:
        text = sock.recv_text(T)
        frames.append(text)
        for msg in P.decode_batch(text):
            assert not isinstance(msg, P.ProtocolError), msg
            if msg["type"] == "job_update" and msg["job"]["id"] in ids:
                events.append((msg["job"]["id"], msg["job"]["status"]))
                if msg["job"]["status"] in P.TERMINAL:
                    ended.add(msg["job"]["id"])
            elif msg["type"] == "job_output" and msg["job_id"] in ids:
                events.append((msg["job_id"], msg["stream"], msg["offset"], msg["data"]))
    return frames, events


def test_a_burst_of_200_jobs_reaches_a_batch_reader_whole_and_in_order(make_cluster):
    """The same events, in the same order, to a client that reads batches (fewer frames) and to one
    that does not (one message per frame, as before batches existed)."""
    lc = make_cluster(2, slots=2)
    batched = Socket(lc.url, "/ws/client?batch=1", lc.token)
    single = Socket(lc.url, "/ws/client", lc.token)
    try:
        with Cluster(lc.url, token=lc.token) as c:
            jobs = [c.submit(f"print({i})") for i in range(200)]
            assert [j.wait(T).stdout for j in jobs] == [f"{i}\n" for i in range(200)]
        ids = {j.id for j in jobs}
        batch_frames, batch_events = _job_events(batched, ids)
        single_frames, single_events = _job_events(single, ids)
    finally:
        batched.close()
        single.close()
    assert batch_events == single_events
    # Each job's states in order, each once, ending succeeded: queued first unless it started at once.
    for job_id in ids:
        states = [e[1] for e in batch_events if e[0] == job_id and len(e) == 2]
        assert states in ([P.QUEUED, P.RUNNING, P.SUCCEEDED], [P.RUNNING, P.SUCCEEDED]), (job_id, states)
    assert all(text.startswith("{") for text in single_frames)
    sizes = [len(P.decode_batch(text)) for text in batch_frames]
    assert max(sizes) > 1 and len(batch_frames) < sum(sizes), sizes


# -- slaves -----------------------------------------------------------------------

class RawSlave:
    """A slave speaking the protocol by hand on its own loop thread: it answers every job_run at
    once and keeps every frame it got."""

    def __init__(self, lc, uid: str, batch: bool):
        self.uid = uid
        self.frames: list[str] = []
        self.registered = threading.Event()
        self.conn = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.reader = asyncio.run_coroutine_threadsafe(self._serve(lc, batch), self.loop)

    async def _serve(self, lc, batch: bool) -> None:
        req = tornado.httpclient.HTTPRequest(config.ws_url(lc.url) + "/ws/slave",
                                             headers={"Authorization": f"Bearer {lc.secret}"}, connect_timeout=10)
        self.conn = await tornado.websocket.websocket_connect(req, max_message_size=P.MAX_MESSAGE_BYTES)
        self.conn.write_message(P.encode(P.make(
            "register", protocol=P.PROTOCOL_VERSION, uid=self.uid, host="test", slots=1,
            languages=[{"name": "python", "version": "3"}], **({"batch": True} if batch else {}))))
        while (text := await self.conn.read_message()) is not None:
            self.frames.append(text)
            for msg in P.decode_batch(text):
                if msg["type"] == "register_reply":
                    self.registered.set()
                elif msg["type"] == "job_run":
                    self.conn.write_message(P.encode(P.make(
                        "job_finished", job_id=msg["job"]["id"], exit_code=0, error=None,
                        stdout=f"{self.uid}\n", stderr="")))

    def messages(self) -> list[dict]:
        return [msg for text in self.frames for msg in P.decode_batch(text)]

    def close(self) -> None:
        if self.conn is not None:
            self.loop.call_soon_threadsafe(self.conn.close)
        self.reader.result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_slave_that_reads_batches_gets_them_and_one_that_does_not_gets_single_frames(make_cluster):
    lc = make_cluster(0)
    slaves = [RawSlave(lc, "reads-batches", True), RawSlave(lc, "one-by-one", False)]
    try:
        for s in slaves:
            assert s.registered.wait(20), s.frames
        with Cluster(lc.url, token=lc.token) as c:
            # One batch: all queued at once, so each result frees a slot for a job already waiting.
            jobs = list(c.submit_many([{"source": f"print({i})"} for i in range(20)]))
            ran_on = [j.wait(T).stdout.strip() for j in jobs]
        assert all(j.status == P.SUCCEEDED for j in jobs)
        assert set(ran_on) == {"reads-batches", "one-by-one"}
        for s in slaves:
            wait_for(lambda s=s: sum(m["type"] == "result_ack" for m in s.messages()) == ran_on.count(s.uid),
                     20, f"{s.uid}'s acknowledgements")
            runs = [m["job"]["id"] for m in s.messages() if m["type"] == "job_run"]
            assert sorted(runs) == sorted(j.id for j, on in zip(jobs, ran_on) if on == s.uid)
    finally:
        for s in slaves:
            s.close()
    batching, single = slaves
    # A freed slot's next job_run and the result's acknowledgement go in one frame, job_run first.
    pairs = [[m["type"] for m in P.decode_batch(t)] for t in batching.frames if t.startswith("[")]
    assert ["job_run", "result_ack"] in pairs, batching.frames
    assert all(t.startswith("{") for t in single.frames)
