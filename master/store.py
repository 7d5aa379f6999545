"""The job history, in SQLite.

Saves are committed on the event loop when it goes idle: everything saved
in one turn of the loop is one transaction ("group commit"), committed at the
start of the next turn, with no timer adding latency and no hand-off to a
thread and back (each a wake-up, dear on these machines: 0.5-0.8 ms of a
trivial job's 9, docs/performance.md).  ``save`` resolves only after the
commit, so the master can announce a change after it is durable.  A commit
writes the WAL and does not sync it (``synchronous=NORMAL``); what can wait
on the disk goes to the writer thread: the WAL's checkpoints (the loop's
connection makes none itself), pruning, and any save made while one of those
is in the thread, so that the loop never waits for the thread's lock and
saves keep their order.

Reads (history pages) run on a small thread pool with their own connections;
WAL lets them proceed while a commit is written.

A job's inputs (``protocol.INPUT_FIELDS``: source, files, args, stdin) live
in a table of their own, written once with the job's first save: the master
keeps only what scheduling needs in memory and reads the inputs back when it
dispatches (``inputs_many``), as the JSON text written, which goes into the
job_run undecoded.  Later saves carry no inputs and leave them alone.

Retention: ``prune`` deletes the oldest terminal jobs (never queued or
running ones) older than a date or past a total size.  The database file
and its WAL side files are private to the owner (0600).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import sqlite3
import threading
import time

import orjson

from distexec_kernel import protocol as P
from distexec_kernel.job_record import inputs_chars

from .artifacts import ArtifactStore, root_for
from .store_schema import SCHEMA, connect, hold, private_file
from .store_tx import UNFINISHED, attempt, inputs_of, insert, total_bytes, transient

log = logging.getLogger("distexec.master.store")

# Jobs saved on the loop between two checkpoints.  A job's save writes about 8 pages (its row, its
# indexes, its inputs, the counts), many of them the same pages again: a checkpoint writes each page
# once, so fewer of them write less.  At 500 the WAL stays under about 13 MiB (25 KiB per job) and the
# writer thread's CPU per job of a long run is 28 us, against 3.3 MiB and 49 us at 125, about
# SQLite's own 1,000 pages (benchmarks/master_scale.py, docs/performance.md).
CHECKPOINT_ROWS = 500
# A commit that failed for want of disk is tried again, every RETRY_FIRST..RETRY_MAX s, for this long.
RETRY_FOR = 600.0
RETRY_FIRST, RETRY_MAX = 0.05, 2.0


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a history written by an older version up to this schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "size" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE jobs SET size = length(CAST(data AS BLOB))")
    if "grp" not in columns:  # the batch a job came in (JOB "group"), for GET /api/jobs?group=
        conn.execute("ALTER TABLE jobs ADD COLUMN grp TEXT")
    if "ref" not in columns:  # the client's ref of a WebSocket submission: a resend after a crash finds its job
        conn.execute("ALTER TABLE jobs ADD COLUMN ref TEXT")
    if "chars" not in {row[1] for row in conn.execute("PRAGMA table_info(inputs)")}:
        conn.execute("ALTER TABLE inputs ADD COLUMN chars INTEGER")  # NULL: counted from data when needed
    if "user" not in {row[1] for row in conn.execute("PRAGMA table_info(cancelled_groups)")}:
        conn.execute("ALTER TABLE cancelled_groups ADD COLUMN user TEXT")  # (a history of 2026-12-02's)
    conn.execute("CREATE INDEX IF NOT EXISTS cancelled_groups_user ON cancelled_groups(user)")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_ref ON jobs(user, ref) WHERE ref IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_grp ON jobs(grp, id) WHERE grp IS NOT NULL")
    # A user's page of history (GET /api/jobs as a non-admin), newest first, without a scan.
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_user ON jobs(user, id)")
    if conn.execute("SELECT 1 FROM meta WHERE key = 'job_counts'").fetchone() is None:
        # A history from before the counts table: count it once; the triggers keep it from now on.
        conn.execute("DELETE FROM job_counts")
        conn.execute("INSERT INTO job_counts SELECT COALESCE(user, ''), status, COUNT(*) FROM jobs GROUP BY 1, 2")
        conn.execute("INSERT INTO meta (key, value) VALUES ('job_counts', '1')")
    if conn.execute("SELECT 1 FROM totals WHERE name = 'bytes'").fetchone() is None:
        # A history from before the totals table: summed once; the triggers keep it from now on.
        conn.execute("INSERT INTO totals (name, n) VALUES ('bytes', (SELECT COALESCE(SUM(size), 0) FROM jobs)"
                     " + (SELECT COALESCE(SUM(size), 0) FROM inputs))")
    if conn.execute("SELECT 1 FROM meta WHERE key = 'user_bytes'").fetchone() is None:
        # A history from before the per-user sizes: summed once; the triggers keep them from now on.
        conn.execute("DELETE FROM user_bytes")
        conn.execute("INSERT INTO user_bytes SELECT COALESCE(j.user, ''), SUM(j.size + COALESCE(i.size, 0)) "
                     "FROM jobs j LEFT JOIN inputs i ON i.id = j.id WHERE j.status NOT IN (?, ?) GROUP BY 1",
                     UNFINISHED)
        conn.execute("INSERT INTO meta (key, value) VALUES ('user_bytes', '1')")
    # Unfinished jobs of an older version keep their inputs inside the record:
    # move them out, since the master now saves those records without them.
    rows = conn.execute("SELECT id, data FROM jobs WHERE status IN (?, ?) AND id NOT IN "
                        "(SELECT id FROM inputs)", UNFINISHED).fetchall()
    for job_id, data in rows:
        job = json.loads(data)
        rest, inputs = _split(job)
        if inputs:
            _write(conn, rest, inputs)


def _split(job: dict) -> tuple[dict, dict]:
    """(the job without its inputs, its inputs)."""
    inputs = {k: job[k] for k in P.INPUT_FIELDS if k in job}
    return ({k: v for k, v in job.items() if k not in inputs} if inputs else job), inputs


# Made once: json.dumps with options builds an encoder per call (a save is on the event loop).
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _json(value) -> str:
    """The history's text of ``value``, by orjson: on the loop, a record's in 0.6 us against the standard
    library's 4.9, and 7 MiB of stdin's in 5 ms against 26 (docs/performance.md, "The lean relay").
    What orjson refuses (an integer past 64 bits, say) the standard library writes, as it always did."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return _ENCODER.encode(value)


def _rows(job: dict) -> tuple[tuple, tuple | None]:
    rest, inputs = _split(job)
    data = _json(rest)
    # Its collected files (kept beside the history) count towards --keep-mb: a few lines of listing
    # each in the record, up to the cap on what a job may keep on the master's disk.
    size = len(data) + sum(a.get("size", 0) for a in rest.get("artifacts") or ())
    row = (job["id"], job["status"], job["language"], job.get("client_id"), job.get("user"),
           job["submitted_at"], job.get("group"), job.get("ref"), data, size)
    if not inputs:
        return row, None
    text = _json(inputs)
    return row, (job["id"], text, len(text), inputs_chars(inputs))


def _write(conn: sqlite3.Connection, rest: dict, inputs: dict) -> None:
    row, input_row = _rows({**rest, **inputs})
    insert(conn, [row], [input_row] if input_row else [])


def _where(equal: dict) -> tuple[str, list]:
    """A WHERE clause of ``column = ?`` for each column whose value is not None, and its parameters."""
    used = {column: value for column, value in equal.items() if value is not None}
    return ("WHERE " + " AND ".join(f"{column} = ?" for column in used) if used else ""), list(used.values())


# What a page read with ``summary`` leaves in SQLite (job_record.SUMMARY_OMIT's fields kept in the record;
# the others are inputs, not read at all then).
_BULKY = ", ".join(f"'$.{k}'" for k in P.SUMMARY_OMIT if k not in P.INPUT_FIELDS)
PAGE_BYTES = 64 << 20


def _merge(data: str, inputs: str | None) -> dict:
    job = json.loads(data)
    if inputs is not None:
        job.update(json.loads(inputs))
    return job


class JobStore:
    def __init__(self, path: str):
        self.path = path
        self._hold = None
        if path != ":memory:":
            private_file(path)
            self._hold = hold(path)
        conn = connect(path, creating=True)
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        _migrate(conn)
        conn.execute("COMMIT")
        conn.close()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list = []  # saves of this turn of the loop, committed at the next
        self._in_thread = 0  # writes handed to the writer thread and not settled yet
        self._rows = 0  # jobs saved on the loop since its last checkpoint
        self._conn: sqlite3.Connection | None = None  # the event loop's own
        self._closing = False  # close() gives up a commit being tried again: the master is going
        self._writer = threading.Thread(target=self._write_loop, name="distexec-db-writer", daemon=True)
        self._writer.start()
        self._local = threading.local()
        self._readers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="distexec-db-read")
        # The jobs' collected files, by job id: pruning a job deletes its files too (_run).
        self.artifacts = ArtifactStore(None if path == ":memory:" else root_for(path))

    # -- start-up (synchronous, before serving) -----------------------------

    def _read_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    def max_id(self) -> int:
        """The highest job id ever given, also when pruning deleted it: ids are never reused."""
        conn = self._read_conn()
        row = conn.execute("SELECT MAX(id) FROM jobs").fetchone()
        pruned = conn.execute("SELECT value FROM meta WHERE key = 'max_pruned_id'").fetchone()
        return max(row[0] or 0, int(pruned[0]) if pruned else 0)

    def unfinished(self) -> list[dict]:
        """Queued and running jobs, oldest first, without their inputs: what a restarted master resumes."""
        rows = self._read_conn().execute(
            "SELECT data FROM jobs WHERE status IN (?, ?) ORDER BY id", UNFINISHED).fetchall()
        return [_split(json.loads(r[0]))[0] for r in rows]

    def queued_inputs(self) -> dict[int, int]:
        """Queued job id -> its inputs' characters (``inputs_chars``, as the master that took them counted,
        not the stored JSON's bytes, which escaping makes up to 6 times more): what a restarted master
        counts per user."""
        # Counted when saved; parsed only for a row an older version saved (1 GiB of inputs took 2 s).
        rows = self._read_conn().execute(
            "SELECT i.id, i.chars, CASE WHEN i.chars IS NULL THEN i.data END FROM inputs i JOIN jobs j ON j.id = i.id "
            "WHERE j.status = ?", (P.QUEUED,))
        return {job_id: chars if chars is not None else inputs_chars(json.loads(data)) for job_id, chars, data in rows}

    def cancelled_groups(self) -> list[tuple[str, str | None]]:
        """The groups remembered as cancelled and their owners, oldest first."""
        return self._read_conn().execute("SELECT grp, user FROM cancelled_groups ORDER BY rowid").fetchall()

    def recent(self, limit: int) -> list[dict]:
        """The newest ``limit`` jobs, newest first: which slaves a restarted master may expect back."""
        rows = self._read_conn().execute("SELECT data FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- writes ------------------------------------------------------------

    def save(self, job: dict) -> asyncio.Future:
        """Insert or replace the job; the future resolves once it is committed.

        The inputs the job carries are saved with it; a job without them
        (the master's copy of a queued or running job) leaves the saved ones.
        """
        return self.save_many([job])

    def save_many(self, jobs: list[dict], load: list[int] | tuple = ()) -> asyncio.Future:
        """``save`` for ``jobs`` in one transaction (a batch: all of it or none of it).

        ``load``: jobs whose inputs the future resolves to (``inputs_many``),
        read right after the commit on the same connection: a dispatch's save
        and its read of the inputs cost one step, not two.  A job saved here
        with its inputs (submitted and started in one turn) is answered with
        the text just written for it, not read back.
        """
        return self._submit(("save", [_rows(job) for job in jobs], list(load), ()))

    def group_cancelled(self, group: str, user: str | None) -> asyncio.Future:
        """Remember that ``user``'s ``group`` was cancelled (their newest CANCELLED_GROUPS_KEPT); resolves
        once committed."""
        return self._submit(("save", [], [], ((group, user),)))

    def prune(self, before: str | None = None, keep_bytes: int | None = None) -> asyncio.Future:
        """Delete terminal jobs submitted before ``before`` (RFC 3339), then, until
        the terminal jobs take at most ``keep_bytes``, the oldest of the users
        who keep the most (``store_tx.share``).

        Queued and running jobs are never deleted.  Resolves to the number deleted.
        """
        return self._submit(("prune", (before, keep_bytes)))

    def _submit(self, op: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if op[0] == "prune":  # after the saves before it, which go first to keep their order
            pending, self._pending = self._pending, []
            self._to_thread(pending + [(op, loop, fut)])
            return fut
        if not self._pending:
            loop.call_soon(self._commit_pending)
        self._pending.append((op, loop, fut))
        return fut

    def _commit_pending(self, checkpoint: bool = True) -> None:
        group, self._pending = self._pending, []
        if not group:
            return
        if self._in_thread:  # after what the thread holds, never beside it
            self._to_thread(group)
            return
        if self._conn is None:
            self._conn = connect(self.path)
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread's work, below
        self._run(self._conn, group, inline=True)
        self._rows += sum(len(op[1]) for op, _, _ in group)
        if checkpoint and self._rows >= CHECKPOINT_ROWS:
            # In the thread, with the saves that come meanwhile after it (so it completes, and the
            # thread's next commit starts the WAL again from its beginning: it stays this size).
            self._rows = 0
            loop = asyncio.get_running_loop()
            self._to_thread([(("checkpoint",), loop, loop.create_future())])

    def _to_thread(self, items: list) -> None:
        self._in_thread += len(items)
        for item in items:
            self._queue.put(item)

    def _thread_settled(self, futs: list, err: Exception | None) -> None:
        self._in_thread -= len(futs)
        _settle_all(futs, err)

    def _write_loop(self) -> None:
        conn = connect(self.path)
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            # Saves in a row share one transaction; a prune has one of its own.
            while batch:
                if batch[0][0][0] == "checkpoint":
                    _, loop, fut = batch.pop(0)
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:
                        log.warning("could not checkpoint the history's WAL: %s", exc)
                    loop.call_soon_threadsafe(self._thread_settled, [(fut, None)], None)
                    continue
                if batch[0][0][0] == "prune":
                    group, batch = batch[:1], batch[1:]
                else:
                    n = next((i for i, b in enumerate(batch) if b[0][0] != "save"), len(batch))
                    group, batch = batch[:n], batch[n:]
                self._run(conn, group)
        conn.close()

    def _run(self, conn: sqlite3.Connection, group: list, inline: bool = False) -> None:
        """Commit ``group``; settle its futures (with the error if it failed for good).

        A commit that failed for want of disk (full, an I/O error, locked) is
        tried again on the writer thread until it succeeds, for up to
        ``RETRY_FOR`` seconds: every write after it queues behind it, so the
        history's order holds, and nothing it holds is announced meanwhile.
        """
        deadline, delay = time.monotonic() + RETRY_FOR, RETRY_FIRST
        while True:
            err, result, loaded, pruned = attempt(conn, group)
            if err is None or not transient(err) or self._closing or time.monotonic() > deadline:
                break
            if inline:  # the loop never sleeps: the thread tries again, and what comes next goes behind it
                log.error("history write failed: %s; trying again for up to %g s", err, RETRY_FOR)
                self._to_thread(group)
                return
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        if err is not None:
            log.error("history write failed: %s", err)
        if result and err is None:
            # A pruned job's collected files go with it, once its deletion is committed.
            for job_id in pruned:
                self.artifacts.delete(job_id)
            try:
                # As a script: stepped once, as execute() does, it frees a single page.
                conn.executescript("PRAGMA incremental_vacuum;")
            except sqlite3.Error as exc:
                log.warning("could not hand freed pages back after pruning: %s", exc)
        settled = [(fut, result if inputs is None else inputs) for (_, _, fut), inputs in zip(group, loaded)]
        if inline:
            _settle_all(settled, err)
            return
        # One wake-up of the loop for the whole group, not one per future: under load a
        # commit settles hundreds of saves, and each wake-up is a write to the loop's pipe.
        group[0][1].call_soon_threadsafe(self._thread_settled, settled, err)

    # -- reads -------------------------------------------------------------

    def _list(self, status: str | None, limit: int, offset: int, user: str | None, group: str | None = None,
              summary: bool = False):
        clause, params = _where({"j.grp": group, "j.status": status or None, "j.user": user})
        conn = self._read_conn()
        if group is not None:  # a batch: at most MAX_BATCH rows, through its index
            total = conn.execute(f"SELECT COUNT(*) FROM jobs j {clause}", params).fetchone()[0]
        else:
            total = self._count(conn, status, user)
        if summary:  # without its bulky fields (16 MiB of output each, at most), left in SQLite
            query = f"SELECT json_remove(j.data, {_BULKY}), NULL FROM jobs j {clause}"
        else:
            query = f"SELECT j.data, i.data FROM jobs j LEFT JOIN inputs i ON i.id = j.id {clause}"
        jobs, held = [], 0
        for data, inputs in conn.execute(query + " ORDER BY j.id DESC LIMIT ? OFFSET ?", [*params, limit, offset]):
            held += len(data) + len(inputs or "")
            if jobs and held > PAGE_BYTES:
                break  # a shorter page: the next starts at offset + len(jobs)
            jobs.append(_merge(data, inputs))
        return jobs, total

    @staticmethod
    def _count(conn: sqlite3.Connection, status: str | None, user: str | None) -> int:
        """How many jobs (of ``status``, of ``user``): read from job_counts, as cheap with a million as with ten."""
        clause, params = _where({"status": status or None, "user": user})
        return conn.execute(f"SELECT COALESCE(SUM(n), 0) FROM job_counts {clause}", params).fetchone()[0]

    async def list(self, status: str | None = None, limit: int = 100, offset: int = 0,
                   user: str | None = None, group: str | None = None,
                   summary: bool = False) -> tuple[list[dict], int]:
        """A page of jobs, newest first, and how many match.  Fewer than ``limit`` when they are
        large: a page holds at most PAGE_BYTES of records (and at least one), so that one request for
        a thousand jobs of 16 MiB of output each cannot take the master's memory."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._list, status, limit, offset, user, group, summary)

    def _get(self, job_id: int) -> dict | None:
        row = self._read_conn().execute("SELECT j.data, i.data FROM jobs j LEFT JOIN inputs i ON i.id = j.id "
                                        "WHERE j.id = ?", (job_id,)).fetchone()
        return _merge(*row) if row else None

    async def get(self, job_id: int) -> dict | None:
        """The job with its inputs, or None."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._get, job_id)

    async def id_of_ref(self, user: str | None, ref: str) -> int | None:
        """The job ``user`` submitted under ``ref`` on the WebSocket, if it was committed."""
        def find() -> int | None:
            row = self._read_conn().execute("SELECT id FROM jobs WHERE user IS ? AND ref = ? ORDER BY id DESC LIMIT 1",
                                            (user, ref)).fetchone()
            return row[0] if row else None
        return await asyncio.get_running_loop().run_in_executor(self._readers, find)

    async def has_group(self, user: str | None, group: str) -> bool:
        """Whether ``user`` has a job in ``group`` (committed: a group's first batch is, before its answer)."""
        def find() -> bool:
            return self._read_conn().execute("SELECT 1 FROM jobs WHERE grp = ? AND user IS ? LIMIT 1",
                                             (group, user)).fetchone() is not None
        return await asyncio.get_running_loop().run_in_executor(self._readers, find)

    async def inputs_many(self, job_ids: list[int]) -> dict[int, str]:
        """Job id -> the inputs saved with it (``protocol.INPUT_FIELDS``), as the text of a JSON object
        ("{}" if none), in one query.

        Read apart from the jobs' records: this runs for every queued job
        dispatched, for a whole dispatch pass at once.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: inputs_of(self._read_conn(), list(job_ids)))

    def _size(self) -> int:
        return total_bytes(self._read_conn())

    async def finished_size(self) -> int:
        """How many bytes the finished jobs take, which ``keep_bytes`` bounds: one small table summed."""
        def read() -> int:
            return self._read_conn().execute("SELECT COALESCE(SUM(n), 0) FROM user_bytes").fetchone()[0]
        return await asyncio.get_running_loop().run_in_executor(self._readers, read)

    async def size(self) -> int:
        """About how many bytes the jobs take (their JSON text), which ``keep_bytes`` bounds."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._size)

    def close(self) -> None:
        self._commit_pending(checkpoint=False)  # saved in this turn: committed before the store goes
        self._closing = True
        self._queue.put(None)
        self._writer.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._readers.shutdown(wait=True)
        self.artifacts.close()
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None


def _settle_all(futs: list[tuple[asyncio.Future, object]], err: Exception | None) -> None:
    for fut, result in futs:
        _settle(fut, err, result)


def _settle(fut: asyncio.Future, err: Exception | None, result=None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(result)
    else:
        fut.set_exception(err)
