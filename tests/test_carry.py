"""The master carrying out a dispatch: the save, the inputs read back with it, and only then the job_run."""
from __future__ import annotations

import asyncio
import contextlib
import json

from distexec_kernel import protocol as P
from master import jobs as J
from master.core import Master
from master.store import JobStore


class Recorder:
    """A connection's far end that keeps what it was sent (and, in ``log``, shared, in what order)."""

    def __init__(self, name: str, log: list[tuple[str, str]]):
        self.name = name
        self.log = log
        self.frames: list[dict] = []
        self.sent: list[str] = []  # what was sent encoded already, as it was

    def send(self, msg):
        if isinstance(msg, str):
            self.sent.append(msg)
        self.frames.append(P.decode(msg) if isinstance(msg, str) else msg)
        self.log.append((self.name, self.frames[-1]["type"]))


@contextlib.contextmanager
def one_slot_master(tmp_path):
    """A Master on a real store with one one-slot slave "s1" and one client, both Recorders
    (in a running event loop)."""
    store = JobStore(str(tmp_path / "history.sqlite3"))
    master = Master(store)
    master.start()
    log: list[tuple[str, str]] = []
    slave, client = Recorder("slave", log), Recorder("client", log)
    master.client_connected(client, None, "127.0.0.1")
    register = P.make("register", protocol=P.PROTOCOL_VERSION, uid="s1", host="h",
                      languages=[{"name": "python"}], slots=1, instance="i1")
    assert not isinstance(master.slave_registered(slave, register), dict)
    try:
        yield master, store, slave, client
    finally:
        master.shutdown()
        store.close()


def test_submit_reply_tells_running_only_once_it_is_saved(tmp_path):
    """The reply to a submission that starts at once says running, and the history says so too."""
    async def scenario():
        with one_slot_master(tmp_path) as (master, store, slave, client):
            reply = await master.submit({"source": "print(1)", "language": "python"})
            assert reply["status"] == P.RUNNING and reply["source"] == "print(1)"
            [saved] = store.recent(1)  # read at once, in the reply's turn
            assert saved["id"] == reply["id"] and saved["status"] == P.RUNNING
            [run] = [f for f in slave.frames if f["type"] == "job_run"]
            assert run["job"]["id"] == reply["id"]
            # Announced once, as committed (its queued state never was), after the job_run went.
            updates = [f["job"]["status"] for f in client.frames if f["type"] == "job_update"]
            assert updates == [P.RUNNING]
            assert slave.log[-2:] == [("slave", "job_run"), ("client", "job_update")]
            # A cancel now reaches the slave; its report settles the job, acknowledged once saved.
            await master.cancel(reply["id"])
            assert slave.frames[-1] == P.make("job_cancel", job_id=reply["id"])
            await master.job_finished("s1", P.make("job_finished", job_id=reply["id"], exit_code=None,
                                                   error=J.cancelled(), stdout="", stderr=""))
            assert slave.frames[-1] == P.make("result_ack", job_id=reply["id"])
            assert (await store.get(reply["id"]))["status"] == P.CANCELLED

    asyncio.run(scenario())


def test_a_freed_slot_starts_the_next_job_with_its_inputs_read_back_in_the_results_commit(tmp_path):
    async def scenario():
        with one_slot_master(tmp_path) as (master, store, slave, client):
            first, second, third = await master.submit_batch(
                [{"source": f"print({i})", "language": "python", "args": [str(i)]} for i in (1, 2, 3)])
            assert [first["status"], second["status"]] == [P.RUNNING, P.QUEUED]
            # The queued jobs' inputs are not in memory: they come back from the store.
            assert "source" not in master.jobs.job(second["id"])
            await master.job_finished("s1", P.make("job_finished", job_id=first["id"], exit_code=0, error=None,
                                                   stdout="1\n", stderr=""))
            runs = [f["job"] for f in slave.frames if f["type"] == "job_run"]
            assert [(r["id"], r["source"], r["args"]) for r in runs] == [
                (first["id"], "print(1)", ["1"]), (second["id"], "print(2)", ["2"])]
            # The next job's job_run first (it waits for it), then the result's acknowledgement.
            assert slave.frames[-2]["type"] == "job_run"
            assert slave.frames[-1] == P.make("result_ack", job_id=first["id"])
            # Both are durable before either was told: the result and the next start.
            assert (await store.get(first["id"]))["status"] == P.SUCCEEDED
            assert (await store.get(second["id"]))["status"] == P.RUNNING
            updates = [(f["job"]["id"], f["job"]["status"]) for f in client.frames if f["type"] == "job_update"]
            assert updates[-2:] == [(first["id"], P.SUCCEEDED), (second["id"], P.RUNNING)]
            # As the store keeps them, the text of a JSON object: spliced into a job_run undecoded.
            assert json.loads((await store.inputs_many([third["id"], 999]))[third["id"]])["source"] == "print(3)"
            assert (await store.inputs_many([999])) == {999: "{}"}

    asyncio.run(scenario())


def _no_repeated_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def test_a_job_run_carries_the_inputs_as_submitted_whether_started_at_once_or_read_back(tmp_path):
    """The inputs go into a job_run as the JSON text the store wrote, not decoded and encoded again:
    text that looks like the message's own end, escapes and any script survive, and no key repeats."""
    tricky = 'print("}}", "\\\\", "\\u00e9t\\u00e9 \\U0001f600")\n# "},"type":"job_cancel"}'
    subs = [{"source": tricky, "language": "python", "args": ['"}', "é"], "stdin": "}}\n\\\"{ 😀",
             "files": {"data/ü.txt": '{"a": "}}"}'}} for _ in range(2)]

    async def scenario():
        with one_slot_master(tmp_path) as (master, store, slave, client):
            first, second = await master.submit_batch(subs)
            assert [first["status"], second["status"]] == [P.RUNNING, P.QUEUED]
            await master.job_finished("s1", P.make("job_finished", job_id=first["id"], exit_code=0, error=None,
                                                   stdout="", stderr=""))
        texts = [t for t in slave.sent if '"job_run"' in t]
        assert len(texts) == 2  # the first from its submission's save, the second read back
        for text, job in zip(texts, (first, second)):
            run = json.loads(text, object_pairs_hook=_no_repeated_keys)
            assert P.decode(text)["type"] == "job_run" and run["job"]["id"] == job["id"]
            assert {k: run["job"][k] for k in P.INPUT_FIELDS} == {k: subs[0][k] for k in P.INPUT_FIELDS}
        # A job saved without inputs (an older history's) is sent none: the slave fills them in.
        assert json.loads(J._job_run({"id": 9, "language": "python"}, "{}"))["job"]["id"] == 9

    asyncio.run(scenario())
