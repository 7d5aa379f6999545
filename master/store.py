"""The job history, in SQLite.

Writes go to one writer thread so that a slow disk never stalls the event
loop.  The writer takes everything queued since its last commit and commits
it as one transaction ("group commit"): under load many status changes share
one fsync, and when idle a single change is committed at once, with no timer
adding latency.  ``save`` resolves only after the commit, so the master can
announce a change after it is durable.

Reads (history pages) run on a small thread pool with their own connections;
WAL lets them proceed while the writer commits.
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

from distexec_kernel import protocol as P

from .artifacts import ArtifactStore, root_for

log = logging.getLogger("distexec.master.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    language TEXT NOT NULL,
    client_id TEXT,
    user TEXT,
    submitted_at TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Added after the first release: a history written before gains the column when opened.
COLUMNS = {"grp": "ALTER TABLE jobs ADD COLUMN grp TEXT"}
INDEXES = "CREATE INDEX IF NOT EXISTS jobs_grp ON jobs(grp, id) WHERE grp IS NOT NULL;"


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a process crash; only an OS crash can
    # lose the last commits, which is the usual trade for a history store.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class JobStore:
    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = _connect(path)
        conn.executescript(SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        for column, ddl in COLUMNS.items():
            if column not in have:
                conn.execute(ddl)
        conn.executescript(INDEXES)
        conn.close()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="distexec-db-writer", daemon=True)
        self._writer.start()
        self._local = threading.local()
        self._readers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="distexec-db-read")
        # The jobs' collected files, by job id: pruning a job must call artifacts.delete(job_id).
        self.artifacts = ArtifactStore(None if path == ":memory:" else root_for(path))

    # -- start-up (synchronous, before serving) -----------------------------

    def _read_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    def max_id(self) -> int:
        row = self._read_conn().execute("SELECT MAX(id) FROM jobs").fetchone()
        return row[0] or 0

    def unfinished(self) -> list[dict]:
        """Queued and running jobs, oldest first: what a restarted master resumes."""
        rows = self._read_conn().execute(
            "SELECT data FROM jobs WHERE status IN (?, ?) ORDER BY id",
            (P.QUEUED, P.RUNNING)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def recent(self, limit: int) -> list[dict]:
        """The newest ``limit`` jobs, newest first: which slaves a restarted master may expect back."""
        rows = self._read_conn().execute("SELECT data FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- writes ------------------------------------------------------------

    def save(self, job: dict) -> asyncio.Future:
        """Insert or replace the job; the future resolves once it is committed."""
        return self.save_many([job])

    def save_many(self, jobs: list[dict]) -> asyncio.Future:
        """Insert or replace ``jobs`` in one transaction; the future resolves once it is committed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rows = [(job["id"], job["status"], job["language"], job.get("client_id"), job.get("user"),
                 job["submitted_at"], job.get("group"), json.dumps(job, ensure_ascii=False)) for job in jobs]
        self._queue.put((rows, loop, fut))
        return fut

    def _write_loop(self) -> None:
        conn = _connect(self.path)
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
            err = None
            try:
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT OR REPLACE INTO jobs (id, status, language, client_id, user, submitted_at, grp, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [row for b in batch for row in b[0]])
                conn.execute("COMMIT")
            except (sqlite3.Error, ValueError) as exc:
                # ValueError: text SQLite cannot take (e.g. a lone surrogate); the writer must live on.
                log.error("history write failed: %s", exc)
                err = exc
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for _, loop, fut in batch:
                loop.call_soon_threadsafe(_settle, fut, err)
        conn.close()

    # -- reads -------------------------------------------------------------

    def _list(self, status: str | None, limit: int, offset: int, user: str | None, group: str | None = None):
        where, params = [], []
        if group is not None:
            where.append("grp = ?")
            params.append(group)
        if status:
            where.append("status = ?")
            params.append(status)
        if user is not None:
            where.append("user = ?")
            params.append(user)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        conn = self._read_conn()
        total = conn.execute(f"SELECT COUNT(*) FROM jobs {clause}", params).fetchone()[0]
        rows = conn.execute(f"SELECT data FROM jobs {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                            [*params, limit, offset]).fetchall()
        return [json.loads(r[0]) for r in rows], total

    async def list(self, status: str | None = None, limit: int = 100, offset: int = 0,
                   user: str | None = None, group: str | None = None) -> tuple[list[dict], int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._list, status, limit, offset, user, group)

    def _get(self, job_id: int) -> dict | None:
        row = self._read_conn().execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    async def get(self, job_id: int) -> dict | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._get, job_id)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._readers.shutdown(wait=True)
        self.artifacts.close()


def _settle(fut: asyncio.Future, err: Exception | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)
