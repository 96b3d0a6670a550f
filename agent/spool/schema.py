"""The spool's SQLite schema (v6), its version check, offline reads."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent.paths import not_a_file, sqlite_uri
from agent.spool.codebook import DICTS
from agent.spool.db import PAST, typed, used_bytes

VERSION = 6
SEEN_SINCE = 6   # the first version whose dead letters' summary keeps agent-observed times
# v1 (issue 11): events packed per commit group into compressed records (records.py);
# an ack sets a bit in ``gone`` instead of rewriting the event, and a record whose
# events are all gone is deleted, its dedupe keys kept in ``spent`` for the window.
# v2 (issue 13): a ``lane`` per record and per dead letter (agent/families/lanes.py), and
# records indexed by (stream, lane, id): each lane of a key is one sequential read.
# v3: the dead letters' summary (``DEAD_SUMMARY``), kept as letters come and go: grouping
# every letter again after each change took 2.5 s at 700k letters.
# v4: the same tables; small records may be packed with the built-in dictionary
# (records.ZSTD_DICT), which an older agent cannot read: it must refuse the file, not
# count those records damaged and delete them.
# v5: ``dicts``, the dictionary learned from the device's events (codebook.DICTS), which
# small records may be packed with (records.ZSTD_LEARNED): again unreadable before.
# v6: the dead letters' summary keeps when each group was dead-lettered by the agent-observed
# clock too (``dead_seen``, ``first_seen``, ``last_seen``), which their ages and order go
# by (dead.aged): a wall clock corrected since (from 1970, say) made them decades old.

# Records by lane, the oldest first (an index's entries end with the rowid): drop_oldest
# looks for the oldest normal record first, and without it read every record of a spool
# of high-lane ones at each drop. Not a format change: an older agent reads and writes a
# file with it (SQLite keeps every index up to date), so the version stays, and a spool
# without it gets it as it opens (migrate.ensure).
LANE_INDEX = "CREATE INDEX IF NOT EXISTS records_by_lane ON records(lane)"

# A dead letter's agent-observed ms of dead-lettering, expiry's second clock for its age
# (NULL: made before it was kept, or salvaged from a file that had none or garbled it;
# judged by its event's age). Not a format change either: an older agent leaves it NULL,
# and a spool without it gets it as it opens (migrate.ensure).
DEAD_OBSERVED = "ALTER TABLE dead ADD COLUMN observed INTEGER"

# Per (reason, upstream) group of dead letters: how many, and the first and last time one
# was dead-lettered, by the wall clock (``oldest``, ``newest``) and by the agent-observed
# clock (``first_seen``, ``last_seen``; db.PAST for a letter that does not say: made before
# that was kept); per group and time, how many then (what a delete needs to find the
# group's new first and last time in one step). Kept by the triggers, so every
# writer (commits, retries, purges, expiry, the size cap, a salvage) keeps it: letters are
# inserted and deleted, never changed in these columns. The newest groups are those the
# agent saw dead-lettered last (``DEAD_ORDER``): by the wall clock, letters made while it
# read ten years ahead stayed on top of the newest reasons for ten years.
_SEEN = f"coalesce(NEW.observed, {PAST})"
_GROUP = "SELECT id FROM dead_groups WHERE reason = OLD.reason AND upstream = OLD.upstream"
DEAD_GROUPS = """CREATE TABLE dead_groups(id INTEGER PRIMARY KEY, reason TEXT NOT NULL,
                            upstream TEXT NOT NULL, letters INTEGER NOT NULL,
                            oldest INTEGER NOT NULL, newest INTEGER NOT NULL,
                            first_seen INTEGER, last_seen INTEGER,
                            UNIQUE(reason, upstream))"""
DEAD_TIMES = """CREATE TABLE dead_times(grp INTEGER NOT NULL, at INTEGER NOT NULL,
                           n INTEGER NOT NULL, PRIMARY KEY(grp, at)) WITHOUT ROWID"""
DEAD_SEEN = """CREATE TABLE dead_seen(grp INTEGER NOT NULL, seen INTEGER NOT NULL,
                          n INTEGER NOT NULL, PRIMARY KEY(grp, seen)) WITHOUT ROWID"""
DEAD_ORDER = ("CREATE INDEX dead_groups_latest ON dead_groups(last_seen DESC, newest DESC, "
              "reason, upstream)")
DEAD_TRIGGERS = (
    f"""CREATE TRIGGER dead_in AFTER INSERT ON dead BEGIN
    INSERT INTO dead_groups(reason, upstream, letters, oldest, newest, first_seen, last_seen)
        VALUES (NEW.reason, NEW.upstream, 1, NEW.at, NEW.at, {_SEEN}, {_SEEN})
        ON CONFLICT(reason, upstream) DO UPDATE SET letters = letters + 1,
            oldest = min(oldest, excluded.oldest), newest = max(newest, excluded.newest),
            first_seen = min(first_seen, excluded.first_seen),
            last_seen = max(last_seen, excluded.last_seen);
    INSERT INTO dead_times(grp, at, n)
        SELECT id, NEW.at, 1 FROM dead_groups
        WHERE reason = NEW.reason AND upstream = NEW.upstream
        ON CONFLICT(grp, at) DO UPDATE SET n = n + 1;
    INSERT INTO dead_seen(grp, seen, n)
        SELECT id, {_SEEN}, 1 FROM dead_groups
        WHERE reason = NEW.reason AND upstream = NEW.upstream
        ON CONFLICT(grp, seen) DO UPDATE SET n = n + 1;
END""",
    f"""CREATE TRIGGER dead_out AFTER DELETE ON dead BEGIN
    DELETE FROM dead_times WHERE n = 1 AND at = OLD.at AND grp = ({_GROUP});
    UPDATE dead_times SET n = n - 1 WHERE at = OLD.at AND grp = ({_GROUP});
    DELETE FROM dead_seen WHERE n = 1 AND seen = coalesce(OLD.observed, {PAST})
        AND grp = ({_GROUP});
    UPDATE dead_seen SET n = n - 1 WHERE seen = coalesce(OLD.observed, {PAST})
        AND grp = ({_GROUP});
    DELETE FROM dead_groups
        WHERE reason = OLD.reason AND upstream = OLD.upstream AND letters = 1;
    UPDATE dead_groups SET letters = letters - 1,
        oldest = (SELECT min(at) FROM dead_times WHERE grp = dead_groups.id),
        newest = (SELECT max(at) FROM dead_times WHERE grp = dead_groups.id),
        first_seen = (SELECT min(seen) FROM dead_seen WHERE grp = dead_groups.id),
        last_seen = (SELECT max(seen) FROM dead_seen WHERE grp = dead_groups.id)
        WHERE reason = OLD.reason AND upstream = OLD.upstream;
END""",
)
DEAD_SUMMARY = (DEAD_GROUPS, DEAD_ORDER, DEAD_TIMES, DEAD_SEEN, *DEAD_TRIGGERS)
SCHEMA = """
PRAGMA auto_vacuum = INCREMENTAL;   -- set before the first table: space is handed back after a drain
CREATE TABLE streams(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,
                     depth INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0);
-- One row per commit group per (stream, lane, family): events seq = id .. id+n-1, FIFO by
-- id within each (stream, lane).
CREATE TABLE records(id INTEGER PRIMARY KEY, stream INTEGER NOT NULL, family INTEGER NOT NULL,
                     n INTEGER NOT NULL, received INTEGER NOT NULL,
                     live INTEGER NOT NULL,      -- events not yet acked or dead-lettered
                     gone BLOB,                  -- n-bit bitmap (LSB first) of acked/dead events; NULL: none
                     bytes INTEGER NOT NULL,     -- raw body bytes of the live events (depth accounting)
                     dkeys BLOB NOT NULL,        -- n little-endian int64 dedupe keys, in seq order
                     data BLOB NOT NULL,         -- records.pack(bodies)
                     lane INTEGER NOT NULL DEFAULT 1);  -- 0 high, 1 normal (families/lanes.py)
CREATE INDEX records_lane ON records(stream, lane, id);
-- Dedupe keys of fully delivered records, kept for dedupe_window_h (rebuilds the index at start).
CREATE TABLE spent(id INTEGER PRIMARY KEY, received INTEGER NOT NULL, observed INTEGER NOT NULL,
                   dkeys BLOB NOT NULL);
CREATE TABLE dead(seq INTEGER PRIMARY KEY, stream INTEGER NOT NULL, family INTEGER NOT NULL,
                  received INTEGER NOT NULL, dkey INTEGER NOT NULL, body BLOB NOT NULL,
                  upstream TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL,
                  lane INTEGER NOT NULL DEFAULT 1, observed INTEGER);
CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Every event with seq < next_seq was received by agent-observed time ``observed`` (the
-- time the agent has seen pass, over all its runs: agent/clock.py); the latest mark is
-- where that time resumes, and (kept up to date by commits that delete records: see
-- db.advance_mark) the seq above which the next start numbers. With the wall clock,
-- this is what expiry goes by.
CREATE TABLE clock_marks(observed INTEGER PRIMARY KEY, next_seq INTEGER NOT NULL);
""" + "".join(f"{statement};\n" for statement in (LANE_INDEX, *DEAD_SUMMARY, *DICTS)) + \
    f"PRAGMA user_version = {VERSION};\n"


def has_observed(conn: sqlite3.Connection) -> bool:
    """Whether the file's dead letters have their column for ``DEAD_OBSERVED``."""
    return conn.execute("SELECT 1 FROM pragma_table_info('dead') WHERE name = 'observed'"
                        ).fetchone() is not None


# A fifo or a device named as the spool (/dev/null, say): never opened, nor its mode changed.
SPECIAL_FIX = "set storage.path to a file of the spool's own (the agent creates it)"


class SpoolUnusable(Exception):
    """A spool file this agent does not open; the message says why and what to do."""


class SpoolTooNew(SpoolUnusable):
    """The spool was written by a newer agent (a higher schema version): refused untouched."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(f"spool {path} is format v{found}, newer than this agent reads "
                         f"(v{supported}); it was left untouched: run a newer agent, "
                         "or move the file away to start an empty spool")
        self.path = path
        self.found = found
        self.supported = supported


def read_only_uri(path: Path) -> str:
    """The SQLite URI that opens ``path`` read-only."""
    return sqlite_uri(path, "mode=ro")


def refuse_special(path: Path) -> None:
    """SpoolUnusable if ``path`` is there and is not a regular file: SQLite says only "disk
    I/O error" of a directory or a device, and opening a fifo no one writes waits forever."""
    try:
        kind = not_a_file(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if kind == "a directory":
        raise SpoolUnusable(f"spool {path} is a directory; set storage.path to a file, such "
                            f"as {path / 'spool.db'}")
    if kind:
        raise SpoolUnusable(f"spool {path} is not a regular file ({kind}); {SPECIAL_FIX}")


def readable_spool(path: Path) -> bool:
    """For the offline commands: whether a spool file is at ``path``; SpoolUnusable if this
    user may not read it, or search a directory on its way (pathlib raises that, and SQLite
    says only "unable to open database file", naming neither the file nor the cause)."""
    try:
        if not path.exists():
            return False
        why = None if os.access(path, os.R_OK) else os.strerror(errno.EACCES)
    except PermissionError as exc:
        why = exc.strerror
    if why is not None:
        raise SpoolUnusable(f"spool {path} cannot be read by this user: {why} (its mode, "
                            "or a directory's on its way); run the command as the agent's user")
    return True


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to a spool file (safe beside a running agent: WAL);
    SpoolTooNew for one a newer agent wrote, whose tables this code cannot read;
    SpoolUnusable for a directory, a fifo or a device, or a -wal it cannot read."""
    refuse_special(path)
    try:
        conn, found = _versioned(read_only_uri(path))
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN and _unwritable_dir(path):
            why = (f"which this user cannot create ({path.parent} is not writable by it); "
                   "run the command as the agent's user")
        elif exc.sqlite_errorcode in _NO_SHM:
            # The disk full, say: a stopped agent's file needs no -shm to be read.
            why = f"which cannot be made there (SQLite: {exc}; the disk full?); free some space"
        else:
            raise
        conn, found = _versioned(_without_wal(path, why))
    if found > VERSION:
        conn.close()
        raise SpoolTooNew(str(path), found, VERSION)
    return conn


def _versioned(uri: str) -> tuple[sqlite3.Connection, int]:
    """A connection to ``uri`` and the file's schema version (SQLite opens at the first read)."""
    conn = sqlite3.connect(uri, uri=True)
    try:
        return conn, int(conn.execute("PRAGMA user_version").fetchone()[0])
    except BaseException:
        conn.close()
        raise


def _unwritable_dir(path: Path) -> bool:
    """Whether ``path`` is readable in a directory this user may not write: SQLite then
    cannot make the -shm that its read-only open of a WAL file needs beside it."""
    return os.access(path, os.R_OK) and not os.access(path.parent, os.W_OK)


# SQLite's errors making the -shm a read-only open of a WAL file needs (no room for it).
_NO_SHM = frozenset({sqlite3.SQLITE_IOERR_SHMOPEN, sqlite3.SQLITE_IOERR_SHMSIZE,
                     sqlite3.SQLITE_IOERR_SHMMAP})


def _without_wal(path: Path, why: str) -> str:
    """The URI that reads ``path`` alone, for a spool beside which no -shm can be made
    (its directory another user's agent's, or the disk full; ``why``, said when a -wal
    holds changes): ``immutable``, which takes no lock and reads no -wal.
    Only with no -wal holding changes: one is there while an agent has the file open, and
    after one was killed (the file without it would give stale figures as current). With
    none, no agent has it open; one starting during the read may make it fail, once."""
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size:
        raise SpoolUnusable(
            f"spool {path} cannot be read: the changes its agent left in {wal} are read "
            f"through a {path.name}-shm beside it, {why}, or start the agent (it folds them "
            "into the file)")
    return sqlite_uri(path, "mode=ro&immutable=1")


def blank(conn: sqlite3.Connection) -> bool:
    """Whether ``conn``'s file holds no table: SQLite makes the file at the open, and a
    first start killed before the spool's tables were written leaves it empty (so does
    `touch`). No spool yet: the agent's next start makes it one."""
    return conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None


def read_offline(path: Path) -> dict[str, Any]:
    """Queue depth, counters, the bytes used and the receipt time of the event queued
    first (``first_received``, None if none is, or for a v0 spool not converted yet),
    straight from a spool no agent is serving."""
    absent = {"spool": str(path), "exists": False, "depth": 0, "streams": {}, "counters": {}}
    if not readable_spool(path):
        return absent
    conn = open_read_only(path)
    try:
        if blank(conn):
            return absent
        rows = conn.execute("SELECT key, depth, bytes FROM streams").fetchall()
        streams = {key: {"depth": depth, "bytes": nbytes} for key, depth, nbytes in rows}
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        dead = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
        used = used_bytes(conn)
        # As the running agent reads it (Spool.first_age_s): the lowest seq queued.
        first = conn.execute("SELECT received FROM records ORDER BY id LIMIT 1").fetchone() \
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                            "AND name = 'records'").fetchone() else None
    finally:
        conn.close()
    # A value damage garbled into another type, read without complaint (the tables are not
    # STRICT): damage, as the agent's open takes it (db.load_state), not a traceback here.
    if not all(typed(row, (str, int, int)) for row in rows) or (first and not typed(first, (int,))):
        raise sqlite3.DatabaseError("database disk image is malformed: a value of another "
                                    "type; the agent's next start moves it aside and salvages it")
    return {"spool": str(path), "exists": True,
            "depth": sum(s["depth"] for s in streams.values()),
            "streams": streams, "counters": counters, "dead_letters": dead, "used_bytes": used,
            "first_received": first[0] if first else None}
