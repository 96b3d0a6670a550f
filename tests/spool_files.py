"""Spool files written and read straight with SQLite, for the migration and salvage tests.

``V0_SCHEMA`` is the pre-issue-11 schema (agent/spool/schema.py at 4a6f75f), kept here
because the code no longer has it, as is ``V5_DEAD_SUMMARY`` (v5's, at eb9513b7); ``read_v1`` reads a v1 file the way the schema
documents it (records.py, dedupe.keys_to_bytes), independently of the spool's reader.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.settings import StorageConfig
from agent.spool import Spool, records
from agent.spool.migrate import upgrade
from agent.spool.schema import VERSION

V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,
    depth INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY, stream INTEGER NOT NULL,
    family INTEGER NOT NULL, received INTEGER NOT NULL, dkey INTEGER NOT NULL,
    body BLOB NOT NULL, acked INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS events_dkey ON events(dkey);
CREATE INDEX IF NOT EXISTS events_live ON events(stream, seq) WHERE acked IS NULL;
CREATE INDEX IF NOT EXISTS events_acked ON events(acked) WHERE acked IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead(seq INTEGER PRIMARY KEY, stream INTEGER NOT NULL,
    family INTEGER NOT NULL, received INTEGER NOT NULL, dkey INTEGER NOT NULL,
    body BLOB NOT NULL, upstream TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS clock_marks(observed INTEGER PRIMARY KEY, next_seq INTEGER NOT NULL);
"""


# v5's dead-letter summary: no agent-observed times; the newest groups by the wall clock.
V5_DEAD_SUMMARY = """
CREATE INDEX dead_groups_newest ON dead_groups(newest DESC, reason, upstream);
CREATE TRIGGER dead_in AFTER INSERT ON dead BEGIN
    INSERT INTO dead_groups(reason, upstream, letters, oldest, newest)
        VALUES (NEW.reason, NEW.upstream, 1, NEW.at, NEW.at)
        ON CONFLICT(reason, upstream) DO UPDATE SET letters = letters + 1,
            oldest = min(oldest, excluded.oldest), newest = max(newest, excluded.newest);
    INSERT INTO dead_times(grp, at, n)
        SELECT id, NEW.at, 1 FROM dead_groups
        WHERE reason = NEW.reason AND upstream = NEW.upstream
        ON CONFLICT(grp, at) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER dead_out AFTER DELETE ON dead BEGIN
    DELETE FROM dead_times WHERE n = 1 AND at = OLD.at AND grp = (
        SELECT id FROM dead_groups WHERE reason = OLD.reason AND upstream = OLD.upstream);
    UPDATE dead_times SET n = n - 1 WHERE at = OLD.at AND grp = (
        SELECT id FROM dead_groups WHERE reason = OLD.reason AND upstream = OLD.upstream);
    DELETE FROM dead_groups
        WHERE reason = OLD.reason AND upstream = OLD.upstream AND letters = 1;
    UPDATE dead_groups SET letters = letters - 1,
        oldest = (SELECT min(at) FROM dead_times WHERE grp = dead_groups.id),
        newest = (SELECT max(at) FROM dead_times WHERE grp = dead_groups.id)
        WHERE reason = OLD.reason AND upstream = OLD.upstream;
END;
"""


def as_v5_without_observed(path: Path) -> None:
    """Turn a stopped agent's spool (with no dead letters) into one a v5 agent wrote before
    it kept the letters' agent-observed time: v5's summary, and ``dead`` without its
    ``observed`` column."""
    with connect(path) as db:
        assert db.execute("SELECT count(*) FROM dead").fetchone() == (0,)
        db.executescript("""
            BEGIN;
            DROP TRIGGER dead_in; DROP TRIGGER dead_out; DROP INDEX dead_groups_latest;
            DROP TABLE dead_seen;
            ALTER TABLE dead_groups DROP COLUMN first_seen;
            ALTER TABLE dead_groups DROP COLUMN last_seen;
            ALTER TABLE dead DROP COLUMN observed;
            """ + V5_DEAD_SUMMARY + "PRAGMA user_version = 5; COMMIT;")


@dataclass(frozen=True, slots=True)
class Stored:
    """One event as a spool file holds it."""

    seq: int
    stream: int
    family: int
    received: int
    dkey: int
    body: bytes


DATA = Path(__file__).parent / "data"


def copy_of(fixture: Path, tmp_path: Path) -> Path:
    """A spool file of tests/data copied as ``tmp_path/spool.db``, for a test to change."""
    path = tmp_path / "spool.db"
    shutil.copy(fixture, path)
    return path


def connect(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


def table(path: Path, sql: str) -> list[tuple[object, ...]]:
    """The rows ``sql`` reads from the spool file at ``path``."""
    with connect(path) as db:
        return db.execute(sql).fetchall()


def build_v0(path: Path, events: Iterable[tuple[Stored, int | None]],
             marks: Iterable[tuple[int, int]] = (), streams: Iterable[tuple[int, str]] = (),
             dead: Iterable[tuple[Stored, str, str, int]] = (),
             counters: Iterable[tuple[str, int]] = ()) -> None:
    """A v0 spool file: ``events`` as (event, acked time or None for a queued one)."""
    with connect(path) as db:
        # A fixture, not what is tested: its tables made without an fsync each (15 ms a file).
        db.execute("PRAGMA synchronous = OFF")
        db.executescript(V0_SCHEMA)
        db.execute("BEGIN")
        db.executemany("INSERT INTO streams(id, key) VALUES (?, ?)", streams)
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                       ((e.seq, e.stream, e.family, e.received, e.dkey, e.body, acked)
                        for e, acked in events))
        db.executemany("INSERT INTO dead VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       ((e.seq, e.stream, e.family, e.received, e.dkey, e.body, up, why, at)
                        for e, up, why, at in dead))
        db.executemany("INSERT INTO counters VALUES (?, ?)", counters)
        db.executemany("INSERT INTO clock_marks VALUES (?, ?)", marks)
        db.execute("UPDATE streams SET depth = (SELECT count(*) FROM events e WHERE "
                   "e.stream = streams.id AND acked IS NULL), bytes = (SELECT "
                   "coalesce(sum(length(body)), 0) FROM events e WHERE e.stream = streams.id "
                   "AND acked IS NULL)")
        db.execute("COMMIT")


def keys_of(blob: bytes) -> list[int]:
    keys = array("q")
    keys.frombytes(blob)
    return keys.tolist()


def read_v1(path: Path) -> dict[int, list[Stored]]:
    """Every queued event of a v1 file, by stream, in record (FIFO) order."""
    out: dict[int, list[Stored]] = {}
    with connect(path) as db:
        for rid, stream, family, n, received, gone, dkeys, data in db.execute(
                "SELECT id, stream, family, n, received, gone, dkeys, data FROM records "
                "ORDER BY id"):
            bodies, keys = records.unpack(data), keys_of(dkeys)
            assert len(bodies) == len(keys) == n
            for i in range(n):
                if gone is None or not gone[i // 8] >> (i % 8) & 1:
                    out.setdefault(stream, []).append(
                        Stored(rid + i, stream, family, received, keys[i], bodies[i]))
    return out


def covering(marks: list[tuple[int, int]], seq: int) -> int | None:
    """The agent-observed time by which ``seq`` was received, by the file's clock marks:
    the earliest mark whose next_seq is above it."""
    found = [observed for observed, next_seq in marks if next_seq > seq]
    return min(found) if found else None


def failed_midway_changes_nothing(path: Path, refused: int) -> None:
    """Upgrading ``path`` while SQLite refuses the authorizer action ``refused`` (a step
    midway through the migration) fails and leaves the file byte for byte as it was; the
    next start migrates it."""
    before = path.read_bytes()
    with connect(path) as db:
        db.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY
                          if action == refused else sqlite3.SQLITE_OK)
        with pytest.raises(sqlite3.DatabaseError):
            upgrade(db)
    assert path.read_bytes() == before
    with connect(path) as db:
        upgrade(db)
    assert table(path, "PRAGMA user_version") == [(VERSION,)]


async def leave_salvage_pending(spool: Path, scratch: Path | None) -> Path:
    """The files as an agent leaves them when it stops after moving its damaged spool
    aside and before copying it into the fresh one (the next start does): the file moved
    aside (returned), the marker naming it, and a fresh spool at ``spool``, made in the
    directory ``scratch`` (None: the agent stopped before it made one)."""
    moved = spool.with_name(f"{spool.name}.corrupt-20260101T000000")
    spool.rename(moved)
    spool.with_name(f"{spool.name}.salvaging").write_text(f"{moved.name}\n")
    if scratch is not None:
        fresh = await Spool.open(StorageConfig(path=str(scratch / "spool.db")))
        await fresh.close()
        (scratch / "spool.db").rename(spool)
    return moved
