"""Salvage a corrupt spool: copy every readable row into the fresh one, count the rest.

As Vector's disk buffer does (rather than drop the whole file, as Fluent Bit
drops a chunk): the damaged file, already moved aside, is opened read-only and
read in seq order; a read that hits a damaged page skips past it to the next
readable row. Rows keep their seq (FIFO order, and the cursors and in-flight
acks of running forwarders), stream, receipt time and dedupe key. What could
not be read is counted as ``dropped_corrupt``: exactly, when the queue's size is
known (the running agent's own count, or the old file's streams table), else
only the rows read without a key, and the log says the count is unknown.
Runs on the writer's thread, the copy in one transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.families.event import NUCLEUS, SEGMENT
from agent.outcomes import Counts, Drop, Tally, from_names, record
from agent.spool.db import mark, transaction

EVENT_COLS = "seq, stream, family, received, dkey, body, acked"
EVENT_TYPES = (int, int, int, int, int, bytes, (int, type(None)))
DEAD_COLS = "seq, stream, family, received, dkey, body, upstream, reason, at"
DEAD_TYPES = (int, int, int, int, int, bytes, str, str, int)
CHUNK = 500
TOP = 1 << 62  # above any seq


@dataclass(slots=True)
class Carry:
    """What the agent knows of the lost spool from memory (nothing, at startup)."""

    streams: dict[int, str]           # stream id -> key
    counters: Counts
    observed: int                     # agent-observed ms (agent/clock.py)
    next_seq: int                     # the running agent's next seq (1 at startup)
    depth: int | None                 # queued events, if the spool had been loaded


@dataclass(slots=True)
class Salvaged:
    queued: int = 0                   # queued events copied
    lost: int = 0                     # counted as dropped_corrupt
    known: bool = True                # whether ``lost`` is the whole loss
    skipped: int = 0                  # damaged stretches skipped


def salvage(fresh: sqlite3.Connection, moved: Path, carry: Carry) -> Salvaged:
    """Copy what can be read of ``moved`` into ``fresh``, with the counters (plus one
    ``spool_corrupt`` and the ``dropped_corrupt`` loss) and the agent-observed time."""
    out = Salvaged()
    try:
        old = sqlite3.connect(f"file:{moved}?mode=ro", uri=True)
    except sqlite3.Error:
        old = None
    try:
        if old is not None:
            # A truncated file's schema names pages past its end: without this every
            # query fails, even on the pages that are still there.
            _try(old, "PRAGMA writable_schema = ON")
        file_streams = _try(old, "SELECT id, key FROM streams NOT INDEXED") or []
        depth = carry.depth
        if depth is None:
            queued = _try(old, "SELECT sum(depth) FROM streams NOT INDEXED")
            depth = int(queued[0][0] or 0) if queued else None
        with transaction(fresh):
            # The running agent's map first: where the file disagrees, it is the damaged one.
            fresh.executemany("INSERT OR IGNORE INTO streams(id, key) VALUES (?, ?)",
                              sorted(carry.streams.items()) + sorted(file_streams))
            streams = {sid for (sid,) in fresh.execute("SELECT id FROM streams")}
            unsendable = _copy(old, fresh, streams, out)
            out.queued = fresh.execute("SELECT count(*) FROM events WHERE acked IS NULL"
                                       ).fetchone()[0]
            fresh.execute("UPDATE streams SET "
                          "depth = (SELECT count(*) FROM events e "
                          "WHERE e.stream = streams.id AND e.acked IS NULL), "
                          "bytes = (SELECT coalesce(sum(length(body)), 0) FROM events e "
                          "WHERE e.stream = streams.id AND e.acked IS NULL)")
            out.known = depth is not None
            out.lost = max(depth - out.queued, 0) if depth is not None else unsendable
            _carry_clock(old, fresh, carry)
            counters = salvage_counters(old, carry.counters, out.lost)
            fresh.executemany("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)",
                              sorted(counters.items()))
    finally:
        if old is not None:
            old.close()
    return out


def _copy(old: sqlite3.Connection | None, fresh: sqlite3.Connection, streams: set[int],
          out: Salvaged) -> int:
    """Copy readable events and dead letters; returns how many events were read but not
    kept: garbled by the damage, or of an unknown stream (nowhere to send them)."""
    if old is None:
        return 0
    dropped = 0
    for rows in _scan(old, "events", EVENT_COLS, out):
        keep = [r for r in rows if _sound(r, EVENT_TYPES) and r[1] in streams]
        dropped += sum(1 for r in rows if r[6] is None) - sum(1 for r in keep if r[6] is None)
        fresh.executemany(f"INSERT OR IGNORE INTO events({EVENT_COLS}) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", keep)
    for rows in _scan(old, "dead", DEAD_COLS, out):
        fresh.executemany(f"INSERT OR IGNORE INTO dead({DEAD_COLS}) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [r for r in rows if _sound(r, DEAD_TYPES)])
    return dropped


def _sound(row: tuple[Any, ...], types: tuple[Any, ...]) -> bool:
    """Whether every value has its column's type (damage can garble a record into other
    types, or NULL) and the family is one the forwarders know."""
    return all(isinstance(v, t) for v, t in zip(row, types)) and row[2] in (NUCLEUS, SEGMENT)


def _scan(old: sqlite3.Connection, table: str, cols: str, out: Salvaged) -> Iterator[list[Any]]:
    """Rows of ``table`` in seq order, in chunks, skipping damaged stretches."""
    sql = f"SELECT {cols} FROM {table} NOT INDEXED WHERE seq > ? ORDER BY seq LIMIT {CHUNK}"
    after = 0
    while True:
        rows: list[Any] = []
        try:
            # Row by row: the rows read before the damage are kept.
            for row in old.execute(sql, (after,)):
                rows.append(row)  # noqa: PERF402
            damaged = False
        except sqlite3.DatabaseError:
            damaged = True
        if rows:
            yield rows
            after = rows[-1][0]
        if damaged:
            out.skipped += 1
            nxt = _past_damage(old, table, after)
            if nxt is None:
                return
            after = nxt
        elif len(rows) < CHUNK:
            return


def _past_damage(old: sqlite3.Connection, table: str, after: int) -> int | None:
    """A seq past the damage met reading rows after ``after``: reading on from it reads
    again; None when nothing past it can be read."""
    def readable(seq: int) -> bool:  # can the row after ``seq`` be found?
        return _try(old, f"SELECT seq FROM {table} NOT INDEXED WHERE seq > ? "
                    "ORDER BY seq LIMIT 1", (seq,)) is not None
    first = _try(old, f"SELECT seq FROM {table} NOT INDEXED WHERE seq > ? "
                 "ORDER BY seq LIMIT 1", (after,))
    if first:  # the row is found but cannot be read (its overflow pages): skip that row
        return int(first[0][0])
    # The page holding the next row is damaged. Probe further and further ahead for a
    # row that can be found, then narrow down to the end of the damage.
    lo, step = after, 1
    while True:
        hi = lo + step
        if hi >= TOP:
            return None
        if readable(hi):
            break
        lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if readable(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _carry_clock(old: sqlite3.Connection | None, fresh: sqlite3.Connection,
                 carry: Carry) -> None:
    """Keep the agent-observed time and the file's clock marks, and mark every salvaged
    row as received by now (a row whose own mark is lost counts its age from now: kept
    longer, never expired early)."""
    marks = _try(old, "SELECT observed, next_seq FROM clock_marks NOT INDEXED") or []
    fresh.executemany("INSERT OR REPLACE INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                      marks)
    top = fresh.execute("SELECT max(coalesce((SELECT max(seq) FROM events), 0), "
                        "coalesce((SELECT max(seq) FROM dead), 0))").fetchone()[0]
    mark(fresh, max([carry.observed, *(int(o) for o, _ in marks)]),
         max(carry.next_seq, top + 1))


def salvage_counters(old: sqlite3.Connection | None, carried: Counts, lost: int) -> Counts:
    """The lost spool's counters (the running agent's, else the file's), plus this loss."""
    counters = from_names(_try(old, "SELECT name, value FROM counters NOT INDEXED") or [])
    for outcome, n in carried.items():  # the running agent's are never behind the file's
        counters[outcome] = max(counters.get(outcome, 0), n)
    record(counters, Tally.SPOOL_CORRUPT)
    record(counters, Drop.DROPPED_CORRUPT, lost)
    return counters


def _try(conn: sqlite3.Connection | None, sql: str, params: Any = ()) -> list[Any] | None:
    """All rows, or None when the damage (or a missing table) makes the query fail."""
    if conn is None:
        return None
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.DatabaseError:
        return None
