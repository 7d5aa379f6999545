"""One transaction of the history: a group of saves or a prune, and which of its failures are worth
trying again.  ``JobStore`` (store.py) decides when and on which connection; this is what it runs."""
from __future__ import annotations

import json
import sqlite3

from distexec_kernel import protocol as P
from distexec_kernel.fairshare import level as share

# Pruning never touches these (nor anything else not terminal).
UNFINISHED = (P.QUEUED, P.RUNNING)
TERMINAL_ONLY = "status NOT IN (?, ?)"
CANCELLED_GROUPS_KEPT = 10_000  # a user's newest; a part of an older one is taken (its sender stopped long ago)
TRANSIENT_CODES = frozenset({5, 6, 10, 13})  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR (and its kinds), SQLITE_FULL


def insert(conn: sqlite3.Connection, rows: list[tuple], input_rows: list[tuple]) -> None:
    # An upsert, not INSERT OR REPLACE: a replace deletes the row without firing the
    # delete trigger (job_counts), and rewrites every index entry of it.  A later save
    # sets only what can change after a job is made: SQLite rewrites the index entries
    # of every column an UPDATE sets, changed or not, and the others (language, client,
    # user, submission time, group, ref) are given once, when the job is made.
    conn.executemany("INSERT INTO jobs (id, status, language, client_id, user, submitted_at, grp, ref, data, size)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
                     " data = excluded.data, size = excluded.size", rows)
    if input_rows:
        # An upsert too: a replace's delete would not fire the delete trigger (totals).
        conn.executemany("INSERT INTO inputs (id, data, size, chars) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
                         " SET data = excluded.data, size = excluded.size, chars = excluded.chars", input_rows)


def prune(conn: sqlite3.Connection, before: str | None, keep_bytes: int | None) -> list[int]:
    """Delete terminal jobs (see ``JobStore.prune``); returns their ids."""
    doomed: list[int] = []
    if before is not None:
        doomed += _delete(conn, [r[0] for r in conn.execute(
            f"SELECT id FROM jobs WHERE {TERMINAL_ONLY} AND submitted_at < ?", (*UNFINISHED, before))])
    if keep_bytes is not None:
        sizes = dict(conn.execute("SELECT user, n FROM user_bytes WHERE n > 0"))
        level = share(list(sizes.values()), keep_bytes)
        for user, size in sizes.items():
            if size <= level:
                continue
            # Their oldest first, down to the level: one user's excess never costs another's history.
            mine = []
            for job_id, job_size in conn.execute(
                    f"SELECT j.id, j.size + COALESCE(i.size, 0) FROM jobs j LEFT JOIN inputs i ON i.id = j.id "
                    f"WHERE j.user IS ? AND j.{TERMINAL_ONLY} ORDER BY j.id", (user or None, *UNFINISHED)):
                mine.append(job_id)
                size -= job_size
                if size <= level:
                    break
            doomed += _delete(conn, mine)
    if not doomed:
        return []
    # Ids are never given twice, also when the newest jobs are the ones pruned.
    conn.execute("INSERT INTO meta (key, value) VALUES ('max_pruned_id', ?) ON CONFLICT(key) DO UPDATE "
                 "SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (str(max(doomed)),))
    return doomed


def _delete(conn: sqlite3.Connection, job_ids: list[int]) -> list[int]:
    if job_ids:
        ids = json.dumps(job_ids)
        # The record before its inputs: the triggers count a finished job's inputs from its record.
        conn.execute("DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?))", (ids,))
        conn.execute("DELETE FROM inputs WHERE id IN (SELECT value FROM json_each(?))", (ids,))
    return job_ids


def total_bytes(conn: sqlite3.Connection) -> int:
    """The history's size: kept by triggers (the totals table), one row read."""
    return conn.execute("SELECT n FROM totals WHERE name = 'bytes'").fetchone()[0]


def inputs_of(conn: sqlite3.Connection, job_ids: list[int], written: list | tuple = ()) -> dict[int, str]:
    """Job id -> its inputs as saved: the text of a JSON object ("{}" if none), never decoded here (it
    goes into a job_run as it is).  ``written``: this transaction's input rows, taken as they are."""
    found = {row[0]: row[1] for row in written if row[0] in job_ids}
    missing = [job_id for job_id in job_ids if job_id not in found]
    if missing:
        found.update(conn.execute("SELECT id, data FROM inputs WHERE id IN (SELECT value FROM json_each(?))",
                                  (json.dumps(missing),)).fetchall())
    return {job_id: found.get(job_id, "{}") for job_id in job_ids}


def attempt(conn: sqlite3.Connection, group: list) -> tuple:
    """One transaction for ``group`` (saves, or one prune): (error, prune's count, inputs read, pruned ids)."""
    err, result, loaded, pruned = None, None, [None] * len(group), []
    try:
        conn.execute("BEGIN")
        if group[0][0][0] == "prune":
            pruned = prune(conn, *group[0][0][1])
            result = len(pruned)
        else:
            pairs = [pair for op, _, _ in group for pair in op[1]]
            insert(conn, [row for row, _ in pairs], [inputs for _, inputs in pairs if inputs is not None])
            for grp, user in (pair for op, _, _ in group for pair in op[3]):
                conn.execute("INSERT OR IGNORE INTO cancelled_groups (grp, user) VALUES (?, ?)", (grp, user))
                # A user's own newest: cancelling many groups of one's own pushes out none of another's.
                conn.execute("DELETE FROM cancelled_groups WHERE user IS ?1 AND rowid NOT IN (SELECT rowid FROM "
                             "cancelled_groups WHERE user IS ?1 ORDER BY rowid DESC LIMIT ?2)",
                             (user, CANCELLED_GROUPS_KEPT))
        conn.execute("COMMIT")
        if result is None:
            loaded = [inputs_of(conn, op[2], [i for _, i in op[1] if i is not None]) if op[2] else None
                      for op, _, _ in group]
    except (sqlite3.Error, ValueError) as exc:
        # ValueError: text SQLite cannot take (e.g. a lone surrogate); the writer must live on.
        err = exc
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
    return err, result, loaded, pruned


def transient(exc: Exception) -> bool:
    """A failure the disk may recover from (full, an I/O error, busy or locked): worth trying again."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in TRANSIENT_CODES
