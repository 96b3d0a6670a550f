"""Where the spool's time goes: `python -m bench.micro_spool [--rows N]`.

SQLite alone, one thread, no event loop, sync=FULL, WAL, in bench/out/:
1. group commits of 3,200 rows (32 requests x 100 events) into the spool's
   schema, as the table grows: with Outpost's dedupe index (a unique index on a
   64-bit hash), and without it (the cost of exact dedupe);
2. acknowledging 400 rows per commit out of a queue of N rows: deleting them and
   remembering their keys in a separate table (the old way), or marking them as
   tombstones (the current way).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import time
from pathlib import Path

import orjson

from .procs import ROOT

PRAGMAS = "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA journal_size_limit=67108864;"
TABLE = ("CREATE TABLE events(seq INTEGER PRIMARY KEY, stream INTEGER NOT NULL, family INTEGER "
         "NOT NULL, received INTEGER NOT NULL, dkey INTEGER NOT NULL, body BLOB NOT NULL, "
         "acked INTEGER);")
BODY = b"x" * 250


def _fresh(path: Path, schema: str) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(PRAGMAS + schema)
    return conn


def _dkey() -> int:
    return random.getrandbits(64) - (1 << 63)


def inserts(path: Path, total: int, dedupe: bool, per: int = 3200) -> list[float]:
    """Rows/s for each fifth of ``total`` rows inserted in commits of ``per``."""
    schema = TABLE + ("CREATE UNIQUE INDEX events_dkey ON events(dkey);" if dedupe else "")
    schema += "CREATE INDEX events_live ON events(stream, seq) WHERE acked IS NULL;"
    conn = _fresh(path, schema)
    rates, seq, step = [], 1, total // 5
    started = time.perf_counter()
    while seq <= total:
        rows = [(seq + i, 1, 0, 1, _dkey(), BODY) for i in range(per)]
        seq += per
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR IGNORE INTO events(seq, stream, family, received, dkey, "
                         "body) VALUES (?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
        if (seq - 1) % step < per:
            now = time.perf_counter()
            rates.append(step / (now - started))
            started = now
    conn.close()
    return rates


def acks(path: Path, total: int, tombstones: bool, per: int = 400) -> float:
    """Acks/s, acknowledging ``total`` queued rows ``per`` to a commit."""
    conn = _fresh(path, TABLE + "CREATE UNIQUE INDEX events_dkey ON events(dkey);"
                  "CREATE INDEX events_live ON events(stream, seq) WHERE acked IS NULL;"
                  "CREATE INDEX events_acked ON events(acked) WHERE acked IS NOT NULL;"
                  "CREATE TABLE acked(dkey INTEGER PRIMARY KEY, at INTEGER NOT NULL);")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO events(seq, stream, family, received, dkey, body) "
                     "VALUES (?,?,?,?,?,?)", ((i, 1, 0, 1, _dkey(), BODY)
                                              for i in range(1, total + 1)))
    conn.execute("COMMIT")
    started = time.perf_counter()
    for first in range(1, total + 1, per):
        arg = orjson.dumps(list(range(first, first + per))).decode()
        conn.execute("BEGIN IMMEDIATE")
        if tombstones:
            conn.execute("SELECT stream, length(body) FROM events WHERE seq IN "
                         "(SELECT value FROM json_each(?)) AND acked IS NULL", (arg,)).fetchall()
            conn.execute("UPDATE events SET body = x'', acked = 1 WHERE seq IN "
                         "(SELECT value FROM json_each(?)) AND acked IS NULL", (arg,))
        else:
            conn.execute("INSERT OR REPLACE INTO acked(dkey, at) SELECT dkey, 1 FROM events "
                         "WHERE seq IN (SELECT value FROM json_each(?))", (arg,))
            conn.execute("DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?)) "
                         "RETURNING stream, length(body)", (arg,)).fetchall()
        conn.execute("COMMIT")
    conn.close()
    return total / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro_spool", description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    args = p.parse_args()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "micro_spool.db"
    try:
        for dedupe in (True, False):
            rates = inserts(path, args.rows, dedupe)
            print(f"insert, 3,200-row commits, {'with' if dedupe else 'without'} dedupe index: "
                  + ", ".join(f"{r:,.0f}" for r in rates) + " rows/s per fifth of the table")
        n = min(args.rows, 200_000)
        for tomb in (False, True):
            print(f"ack {n:,} queued rows, 400 per commit, "
                  f"{'tombstones' if tomb else 'delete + acked keys'}: "
                  f"{acks(path, n, tomb):,.0f} acks/s")
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
