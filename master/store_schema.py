"""The history's SQLite tables and triggers, and how its file and connections are opened."""
from __future__ import annotations

import fcntl
import os
import sqlite3

from distexec_kernel import protocol as P
from distexec_kernel.config import private_dir


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    language TEXT NOT NULL,
    client_id TEXT,
    user TEXT,
    submitted_at TEXT NOT NULL,
    -- before data: reading it never walks the overflow pages of a big record
    size INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs(submitted_at);
-- chars: the inputs' characters as the master counted them (inputs_chars), for a restart to count a
-- user's queued inputs without parsing them.  Both before data, as in jobs.
CREATE TABLE IF NOT EXISTS inputs (id INTEGER PRIMARY KEY, size INTEGER NOT NULL, chars INTEGER,
    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Groups cancelled, with their owner, newest last (rowid): a map still being sent in parts is refused
-- after a restart too.
CREATE TABLE IF NOT EXISTS cancelled_groups (grp TEXT PRIMARY KEY, user TEXT);
-- How many jobs each user has in each state, kept by triggers: a history page's
-- total is read here, not counted over a million rows (COUNT(*) walks them all).
-- A job with no user counts under ''.
CREATE TABLE IF NOT EXISTS job_counts (
    user TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (user, status)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS jobs_count_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts VALUES (COALESCE(NEW.user, ''), NEW.status, 1)
        ON CONFLICT (user, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE user = COALESCE(OLD.user, '') AND status = OLD.status;
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_update AFTER UPDATE OF status, user ON jobs
    WHEN OLD.status IS NOT NEW.status OR OLD.user IS NOT NEW.user BEGIN
    UPDATE job_counts SET n = n - 1 WHERE user = COALESCE(OLD.user, '') AND status = OLD.status;
    INSERT INTO job_counts VALUES (COALESCE(NEW.user, ''), NEW.status, 1)
        ON CONFLICT (user, status) DO UPDATE SET n = n + 1;
END;
-- The history's size (its records and inputs, as JSON text, and the files its jobs collected,
-- counted in their records' size), kept by triggers too:
-- pruning to --keep-mb reads it at each pass, in the store's writer, where a SUM over
-- a million rows held every commit back for half a second.
CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
""" + "".join(f"""
CREATE TRIGGER IF NOT EXISTS {table}_bytes_insert AFTER INSERT ON {table} BEGIN
    UPDATE totals SET n = n + NEW.size WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS {table}_bytes_delete AFTER DELETE ON {table} BEGIN
    UPDATE totals SET n = n - OLD.size WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS {table}_bytes_update AFTER UPDATE OF size ON {table} WHEN OLD.size != NEW.size BEGIN
    UPDATE totals SET n = n + NEW.size - OLD.size WHERE name = 'bytes';
END;""" for table in ("jobs", "inputs"))

# Each user's finished history (the records, inputs and collected files of their jobs that pruning may
# take), kept by triggers: what --keep-mb bounds and shares out among users (store_tx.prune), read
# without a scan.  A job's inputs are saved after its record, and deleted after it.
_FINISHED = f"NOT IN ('{P.QUEUED}', '{P.RUNNING}')"
_INPUTS_OF = "COALESCE((SELECT size FROM inputs WHERE id = {row}.id), 0)"
SCHEMA += f"""
CREATE TABLE IF NOT EXISTS user_bytes (user TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS jobs_user_bytes_insert AFTER INSERT ON jobs WHEN NEW.status {_FINISHED} BEGIN
    INSERT INTO user_bytes VALUES (COALESCE(NEW.user, ''), NEW.size + {_INPUTS_OF.format(row="NEW")})
        ON CONFLICT (user) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER IF NOT EXISTS jobs_user_bytes_delete AFTER DELETE ON jobs WHEN OLD.status {_FINISHED} BEGIN
    UPDATE user_bytes SET n = n - OLD.size - {_INPUTS_OF.format(row="OLD")} WHERE user = COALESCE(OLD.user, '');
END;
CREATE TRIGGER IF NOT EXISTS jobs_user_bytes_update AFTER UPDATE OF status, size, user ON jobs
    WHEN OLD.status {_FINISHED} OR NEW.status {_FINISHED} BEGIN
    UPDATE user_bytes SET n = n - OLD.size - {_INPUTS_OF.format(row="OLD")}
        WHERE OLD.status {_FINISHED} AND user = COALESCE(OLD.user, '');
    INSERT INTO user_bytes SELECT COALESCE(NEW.user, ''), NEW.size + {_INPUTS_OF.format(row="NEW")}
        WHERE NEW.status {_FINISHED} ON CONFLICT (user) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER IF NOT EXISTS inputs_user_bytes_insert AFTER INSERT ON inputs BEGIN
    UPDATE user_bytes SET n = n + NEW.size
        WHERE user = (SELECT COALESCE(user, '') FROM jobs WHERE id = NEW.id AND status {_FINISHED});
END;
CREATE TRIGGER IF NOT EXISTS inputs_user_bytes_delete AFTER DELETE ON inputs BEGIN
    UPDATE user_bytes SET n = n - OLD.size
        WHERE user = (SELECT COALESCE(user, '') FROM jobs WHERE id = OLD.id AND status {_FINISHED});
END;
CREATE TRIGGER IF NOT EXISTS inputs_user_bytes_update AFTER UPDATE OF size ON inputs WHEN OLD.size != NEW.size BEGIN
    UPDATE user_bytes SET n = n + NEW.size - OLD.size
        WHERE user = (SELECT COALESCE(user, '') FROM jobs WHERE id = NEW.id AND status {_FINISHED});
END;
"""

SIDE_FILES = ("-wal", "-shm", "-journal")


def connect(path: str, creating: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    if creating:
        # Must come before anything is written; a no-op on an existing file.
        # Lets prune hand freed pages back to the disk.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a process crash; only an OS crash can
    # lose the last commits, which is the usual trade for a history store.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    # The WAL is cut back to this after each checkpoint: a big prune's pages would otherwise keep it
    # that size on the disk for good.
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


def private_file(path: str) -> None:
    """Create the database file 0600 before SQLite does (it would use the umask: 0644).

    SQLite gives its -wal and -shm files the database file's mode; side files
    left by an older version are narrowed here too.
    """
    # Made private if missing.  One given with --db is the admin's choice and left as it
    # is, but not one others can write: they could plant a link where root writes (the
    # -wal beside the database, say) and have it write through it.
    private_dir(os.path.dirname(os.path.abspath(path)), narrow=False)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, *(path + side for side in SIDE_FILES)):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


class HistoryInUse(OSError):
    """Another master holds this history."""


def hold(path: str) -> int:
    """This process's hold on the history at ``path`` (a descriptor to keep open while it is used).

    Two masters on one history each resumed the other's running jobs, gave out the same ids, and failed
    healthy jobs as slave_lost once their slaves did not come back to them; the second is now refused.
    A lock file beside the database, flock'd: the kernel lets go when its holder exits or is killed, so
    a master that crashed never keeps its restart out.  Its pid is written there, for the refusal."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise HistoryInUse(f"the history {path} is in use by another master{by}: stop that one first, or give "
                           f"this one a history of its own (--db, or another DISTEXEC_HOME)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
