"""The history store's commits: on the event loop when it goes idle, and in the writer thread for
what can wait on the disk (checkpoints, pruning), in the order the master asked for them."""
import asyncio
import os
import sqlite3
import subprocess

import pytest

from distexec_kernel import Cluster, protocol as P
from master.store import CHECKPOINT_ROWS, JobStore

from conftest import HOLD, UNTIL_RELEASED, release_jobs, until, wait_for


def job(job_id: int, status: str = P.QUEUED, **fields) -> dict:
    j = P.new_job(job_id, {"source": "print('x')" * 20, "language": "python", "files": {}, "args": [],
                           "stdin": None}, client_id=None, user="alice")
    j["status"] = status
    j.update(fields)
    return j


def ids(path: str) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM jobs ORDER BY id")]
    finally:
        conn.close()


def test_the_wal_stays_small_while_the_loop_commits_job_after_job(tmp_path):
    """The loop's connection makes no checkpoint itself; the writer thread does, every
    CHECKPOINT_ROWS jobs. Without them the WAL grows by every page ever written (about 100 MiB here)."""
    path = str(tmp_path / "history.sqlite3")

    async def scenario() -> int:
        store = JobStore(path)
        try:
            largest = 0
            for i in range(1, 8 * CHECKPOINT_ROWS):
                await store.save(job(i))
                await store.save(job(i, P.SUCCEEDED, stdout="y" * 200))
                largest = max(largest, os.stat(path + "-wal").st_size)
            return largest
        finally:
            store.close()

    largest = asyncio.run(scenario())
    # About 25 KiB per job between checkpoints (each job saved twice, as queued then finished).
    assert largest < CHECKPOINT_ROWS * (48 << 10), f"the WAL grew to {largest >> 20} MiB"
    assert ids(path) == list(range(1, 8 * CHECKPOINT_ROWS))


def test_records_and_inputs_read_back_as_saved_whichever_encoder_wrote_them(tmp_path):
    """The history's text is orjson's, and the standard library's for what orjson refuses (here an
    integer past 64 bits in a record): either way a job reads back as it was saved, and its inputs'
    text, spliced into a job_run as it is, decodes to the inputs given."""
    path = str(tmp_path / "history.sqlite3")
    tricky = 'quote " back \\ nl \n tab \t nul \x00 del \x7f é ✅ \u2028 }},"x":1{'
    inputs = {"source": "print(1)\n" + tricky, "files": {"a \"b\".txt": tricky}, "args": [tricky, ""], "stdin": tricky}
    plain = job(1, P.SUCCEEDED, stdout=tricky, exit_code=3, **inputs)
    odd = job(2, P.FAILED, exit_code=2 ** 70, stderr=tricky, **inputs)

    async def scenario() -> tuple:
        store = JobStore(path)
        try:
            await store.save_many([plain, odd])
            return await store.get(1), await store.get(2), await store.inputs_many([1, 2])
        finally:
            store.close()

    first, second, texts = asyncio.run(scenario())
    assert first == plain and second == odd
    assert second["exit_code"] == 2 ** 70
    for text in texts.values():
        assert P.loads(text) == inputs


def test_saves_and_a_prune_are_committed_in_the_order_they_were_asked(tmp_path):
    """A prune runs in the writer thread: saves asked before it in the same turn go first (it sees
    them), saves asked while it runs go after it (it cannot delete them), and the loop never waits."""
    path = str(tmp_path / "history.sqlite3")
    old = "2000-01-01T00:00:00.000Z"

    async def scenario() -> tuple[int, int]:
        store = JobStore(path)
        try:
            await store.save_many([job(i, P.SUCCEEDED, submitted_at=old) for i in (1, 2)])
            # Same turn: job 3 saved as terminal and old, then the prune, then job 2 saved again.
            before = store.save(job(3, P.SUCCEEDED, submitted_at=old))
            prune = store.prune(before="2001-01-01T00:00:00Z")
            after = store.save(job(2, P.SUCCEEDED, submitted_at=old, stdout="again"))
            pruned = await prune
            await asyncio.gather(before, after)
            # And once the thread is idle, the loop commits again.
            await store.save(job(4))
            got = await store.get(2)
            return pruned, got["stdout"]
        finally:
            store.close()

    pruned, stdout = asyncio.run(scenario())
    assert pruned == 3  # 1, 2 and 3: job 3's save came before it
    assert stdout == "again" and ids(path) == [2, 4]  # job 2's came after it


def test_saves_made_in_the_last_turn_are_committed_by_close(tmp_path):
    path = str(tmp_path / "history.sqlite3")

    async def scenario() -> None:
        store = JobStore(path)
        await store.save(job(1))
        store.save(job(2))  # not awaited: the master's shutdown closes the store in the same turn
        store.close()

    asyncio.run(scenario())
    assert ids(path) == [1, 2]


def test_cancelled_groups_are_kept_across_a_restart_each_users_newest_only(tmp_path, monkeypatch):
    import master.store_tx as tx
    monkeypatch.setattr(tx, "CANCELLED_GROUPS_KEPT", 3)
    path = str(tmp_path / "history.sqlite3")

    async def scenario() -> None:
        store = JobStore(path)
        await store.save(job(1))
        await store.group_cancelled("g0", "bob")
        for n in range(1, 6):  # with saves in the same commit, as the master's cancel makes them
            store.save(job(10 + n, P.CANCELLED))
            await store.group_cancelled(f"g{n}", "alice")
        await store.group_cancelled("g5", "alice")  # twice: kept once
        store.close()

    asyncio.run(scenario())
    reopened = JobStore(path)  # as a restarted master reads them
    try:
        # Alice's many cancels pushed out her own oldest, not bob's.
        assert reopened.cancelled_groups() == [("g0", "bob"), ("g3", "alice"), ("g4", "alice"), ("g5", "alice")]
        assert ids(path) == [1, 11, 12, 13, 14, 15]
    finally:
        reopened.close()


def test_a_history_with_the_first_cancelled_groups_table_is_brought_up_to_date(tmp_path):
    path = str(tmp_path / "history.sqlite3")
    JobStore(path).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE cancelled_groups; CREATE TABLE cancelled_groups (grp TEXT PRIMARY KEY);"
                       "INSERT INTO cancelled_groups VALUES ('g7');")
    conn.close()
    store = JobStore(path)
    try:
        assert store.cancelled_groups() == [("g7", None)]
    finally:
        store.close()


def test_queued_inputs_are_counted_as_saved_and_an_older_historys_from_their_text(tmp_path):
    """A restart counts each user's queued inputs in characters (``inputs_chars``).  They are saved
    beside the inputs, so a restart no longer parses them all (about 2 s per GiB); a history an older
    version wrote (no ``chars`` column) is counted from the text, as before."""
    path = str(tmp_path / "history.sqlite3")
    newlines = job(1, stdin="\n" * 5000)  # 5,000 characters, 10,000 bytes of JSON
    with_files = job(2, files={"data.txt": "é" * 300}, args=["-v", "x"])
    expected = {j["id"]: len(j["source"]) + len(j["stdin"] or "") + sum(map(len, j["args"]))
                + sum(len(n) + len(d) for n, d in j["files"].items()) for j in (newlines, with_files)}
    assert expected[1] == len(newlines["source"]) + 5000

    async def save(store: JobStore, *jobs: dict) -> None:
        await store.save_many(list(jobs))
        store.close()

    asyncio.run(save(JobStore(path), newlines, with_files, job(3, P.SUCCEEDED)))
    conn = sqlite3.connect(path)
    assert dict(conn.execute("SELECT id, chars FROM inputs WHERE id < 3")) == expected
    # The older table: no chars, data first.
    # (legacy_alter_table: the jobs table's triggers keep naming "inputs", as they do in such a history)
    conn.executescript("PRAGMA legacy_alter_table = ON; ALTER TABLE inputs RENAME TO saved; "
                       "CREATE TABLE inputs (id INTEGER PRIMARY KEY, data TEXT NOT NULL, size INTEGER NOT NULL); "
                       "INSERT INTO inputs SELECT id, data, size FROM saved; DROP TABLE saved;")
    conn.close()
    store = JobStore(path)
    try:
        assert store.queued_inputs() == expected  # job 3 has ended: not counted
    finally:
        store.close()
    asyncio.run(save(JobStore(path), job(4, stdin="\t" * 70)))  # saved by this version into the older table
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT chars FROM inputs WHERE id = 4").fetchone() == (len(job(4)["source"]) + 70,)
    conn.close()
    store = JobStore(path)
    try:
        assert store.queued_inputs() == {**expected, 4: len(job(4)["source"]) + 70}
    finally:
        store.close()


def _fill(folder) -> None:
    """Write into ``folder`` until its file system has no space left."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
        except OSError:
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system of its own (a tmpfs), to fill up."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_commit_that_fails_for_want_of_disk_is_tried_again_in_order_until_it_succeeds(small_disk):
    """A disk full under the history (or an I/O error): the save waited for (a job's end, before it
    is announced) used to fail for good, the job left running in the history until a restart."""
    path = str(small_disk / "history.sqlite3")

    async def scenario() -> None:
        store = JobStore(path)
        try:
            await store.save(job(1))
            _fill(small_disk)
            ran = store.save(job(1, P.RUNNING, stdout="z" * 300_000))
            # Its commit fails for want of disk, and goes to the writer thread to be tried again.
            await until(lambda: store._in_thread == 1, 30, "the failed commit handed to the writer thread")
            ended = store.save(job(1, P.SUCCEEDED, stdout="done"))
            await until(lambda: store._in_thread == 2, 30, "the next commit queued behind the failed one")
            assert not ran.done() and not ended.done()  # being tried again: nothing settled with an error
            os.unlink(small_disk / "filler")
            await asyncio.wait_for(asyncio.gather(ran, ended), 30)
        finally:
            store.close()

    asyncio.run(scenario())
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT status FROM jobs WHERE id = 1").fetchone()[0] == P.SUCCEEDED
    finally:
        conn.close()


def test_a_job_that_ends_while_the_historys_disk_is_full_is_told_once_there_is_room(make_cluster, small_disk,
                                                                                     tmp_path):
    lc = make_cluster(1, slots=1, languages="python", db=str(small_disk / "history.sqlite3"))
    master_log = tmp_path / "logs" / "master.log"
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit(HOLD + UNTIL_RELEASED + "print('ended')")
        wait_for(lambda: job.status == P.RUNNING, 60, "the job to start")
        _fill(small_disk)  # before its end, which then cannot be written
        release_jobs(lc.slaves[0].pid)
        wait_for(lambda: "history write failed" in master_log.read_text(), 60, "the end's commit to fail")
        assert job.status == P.RUNNING  # not told before it is durable
        os.unlink(small_disk / "filler")
        assert job.wait(60).status == P.SUCCEEDED and job.stdout == "ended\n"
        assert c.job(job.id).status == P.SUCCEEDED  # as the history has it
