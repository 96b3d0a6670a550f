"""The spool's SQLite schema, moving a corrupt file aside, and offline reads."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams(
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    depth INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
);
-- seq is the FIFO order; family 0/1 costs no payload bytes in SQLite records.
-- An acknowledged event stays as a tombstone (body emptied, acked = the time) for
-- dedupe_window_h, so a late resend is not stored again: marking rows in seq order
-- touches pages in order, where deleting them and inserting their keys elsewhere
-- dirtied a random page of two hash-ordered B-trees per event (8x slower drain).
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY,
    stream INTEGER NOT NULL,
    family INTEGER NOT NULL,
    received INTEGER NOT NULL,
    dkey INTEGER NOT NULL,
    body BLOB NOT NULL,
    acked INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dkey ON events(dkey);
-- Each forwarder reads one key's queue in order; without this it would scan
-- past every other key's backlog (and past tombstones).
CREATE INDEX IF NOT EXISTS events_live ON events(stream, seq) WHERE acked IS NULL;
-- Tombstones in the order they expire.
CREATE INDEX IF NOT EXISTS events_acked ON events(acked) WHERE acked IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead(
    seq INTEGER PRIMARY KEY,
    stream INTEGER NOT NULL,
    family INTEGER NOT NULL,
    received INTEGER NOT NULL,
    dkey INTEGER NOT NULL,
    body BLOB NOT NULL,
    upstream TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Every event with seq < next_seq was received by agent-observed time ``observed`` (the
-- time the agent has seen pass, over all its runs: agent/clock.py); the latest mark is
-- where that time resumes. With the wall clock, this is what expiry goes by.
CREATE TABLE IF NOT EXISTS clock_marks(observed INTEGER PRIMARY KEY, next_seq INTEGER NOT NULL);
"""


def move_aside(path: Path) -> Path:
    """Rename a spool and its WAL/SHM files to ``<name>.corrupt-<ts>``."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            src.rename(Path(str(target) + suffix))
    return target


def read_offline(path: Path) -> dict[str, Any]:
    """Queue depth and counters straight from a spool no agent is serving."""
    if not path.exists():
        return {"spool": str(path), "exists": False, "depth": 0, "streams": {}, "counters": {}}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        streams = {key: {"depth": depth, "bytes": nbytes} for key, depth, nbytes in
                   conn.execute("SELECT key, depth, bytes FROM streams")}
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        dead = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
    finally:
        conn.close()
    return {"spool": str(path), "exists": True,
            "depth": sum(s["depth"] for s in streams.values()),
            "streams": streams, "counters": counters, "dead_letters": dead}
