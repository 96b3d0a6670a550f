"""The group commit and expiry, each one plain function run on the writer's thread.

A whole group commit (dead letters, acks, size cap, inserts, depth and counter
updates, COMMIT) is one call there: see db.py for why one hop, not one per statement.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import orjson

from agent.outcomes import Counts, Drop, Tally, record
from agent.spool.db import mark, transaction, used_bytes

# Per-row overhead (record header, index entries, page slack) used when
# estimating whether a group still fits under max_size_mb.
ROW_OVERHEAD = 64
DROP_CHUNK = 500
# Rows go in as multi-row VALUES statements of power-of-two sizes up to CHUNK: a few
# statements per commit (each compiled once and cached), instead of executemany's one
# sqlite3_step per row, each of which drops the GIL and then waits to get it back from
# the busy event loop thread.
CHUNK = 512
EXACT = 64  # up to this many rows (every single-event group commit): one statement
_INSERT = ("INSERT OR IGNORE INTO events(seq, stream, family, received, dkey, body) "
           "SELECT column1, column2, column3, column4, column5, column6 FROM (VALUES {})")
_INSERTS: dict[int, str] = {}


@dataclass(slots=True)
class Job:
    """One group commit, as plain data prepared on the event loop."""

    rows: list[tuple[int, int, int, int, int, bytes]]  # (seq, stream, family, received, dkey, body)
    sizes: list[int]                  # events per waiting request, in order
    totals: dict[int, list[int]]      # stream id -> [events, body bytes] in ``rows``
    new_streams: list[tuple[int, str]]
    acks: list[int]
    dead: list[tuple[int, str, str]]  # (seq, upstream, reason)
    room: int                         # bytes left under max_size_mb before this commit
    incoming: int                     # estimated bytes of ``rows``
    reject_when_full: bool
    remember: bool                    # keep acked dedupe keys (dedupe_window_h > 0)
    counters: Counts                  # deltas counted on the loop since the last commit
    now: int
    mark: tuple[int, int] | None = None  # (agent-observed ms, next seq): see clock_marks


@dataclass(slots=True)
class Outcome:
    """What a commit changed, for the loop to apply to its in-memory state."""

    stored: list[int] | None          # new events per request; None: refused, spool full
    streams: dict[int, list[int]] = field(default_factory=dict)  # id -> [depth, bytes] deltas
    counters: Counts = field(default_factory=dict)               # deltas computed here
    used_bytes: int = 0


def commit(conn: sqlite3.Connection, job: Job) -> Outcome:
    """Run one group commit; rolls back and re-raises on any error."""
    out = Outcome(stored=[])
    with transaction(conn):
        if job.mark is not None:
            mark(conn, *job.mark)
        if job.dead:
            _move_dead(conn, job, out)
        if job.acks:
            record(out.counters, Tally.ACKED, _delete(conn, job.acks, job.remember, job.now, out))
        if job.rows:
            excess = job.incoming - job.room
            if excess > 0:
                excess -= _forget_dedupe(conn, out)
            if excess > 0 and job.reject_when_full:
                record(out.counters, Drop.REJECTED_FULL, len(job.rows))
                out.stored = None
            else:
                if excess > 0:
                    _drop_oldest(conn, excess, out)
                out.stored = _insert(conn, job, out)
        _save(conn, out.streams, {**job.counters, **_sum(job.counters, out.counters)})
    out.used_bytes = used_bytes(conn)
    return out


def _insert(conn: sqlite3.Connection, job: Job, out: Outcome) -> list[int]:
    if job.new_streams:
        conn.executemany("INSERT OR IGNORE INTO streams(id, key) VALUES (?, ?)", job.new_streams)
    rows = job.rows
    n_inserted = 0
    start = 0
    while start < len(rows):
        left = len(rows) - start
        size = left if left <= EXACT else min(CHUNK, 1 << (left.bit_length() - 1))
        chunk = rows[start:start + size]
        n_inserted += conn.execute(_insert_sql(size), tuple(chain.from_iterable(chunk))).rowcount
        start += size
    deltas = out.streams
    if n_inserted == len(rows):  # the usual case: no resends, totals known in advance
        for sid, (n, nbytes) in job.totals.items():
            d = deltas.setdefault(sid, [0, 0])
            d[0] += n
            d[1] += nbytes
        stored = list(job.sizes)
    else:  # some were resends: find which seqs made it
        inserted = {r[0] for r in conn.execute(
            "SELECT seq FROM events WHERE seq BETWEEN ? AND ?", (rows[0][0], rows[-1][0]))}
        stored = []
        i = 0
        for size in job.sizes:
            n = 0
            for row in rows[i:i + size]:
                if row[0] in inserted:
                    n += 1
                    d = deltas.setdefault(row[1], [0, 0])
                    d[0] += 1
                    d[1] += len(row[5])
            i += size
            stored.append(n)
    record(out.counters, Tally.INGESTED, n_inserted)
    record(out.counters, Tally.DUPLICATES, len(rows) - n_inserted)
    return stored


def _insert_sql(size: int) -> str:
    sql = _INSERTS.get(size)
    if sql is None:
        sql = _INSERTS[size] = _INSERT.format(",".join(["(?,?,?,?,?,?)"] * size))
    return sql


def _delete(conn: sqlite3.Connection, seqs: list[int], remember: bool, now: int,
            out: Outcome) -> int:
    """Take rows out of the queue by seq; ``remember`` leaves tombstones (acked ones)."""
    arg = orjson.dumps(seqs).decode()
    if remember:
        gone = conn.execute("SELECT stream, length(body) FROM events WHERE seq IN "
                            "(SELECT value FROM json_each(?)) AND acked IS NULL",
                            (arg,)).fetchall()
        conn.execute("UPDATE events SET body = x'', acked = ? WHERE seq IN "
                     "(SELECT value FROM json_each(?)) AND acked IS NULL", (now, arg))
    else:
        gone = conn.execute("DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?)) "
                            "AND acked IS NULL RETURNING stream, length(body)",
                            (arg,)).fetchall()
    _uncount(out.streams, gone)
    return len(gone)


def _move_dead(conn: sqlite3.Connection, job: Job, out: Outcome) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO dead(seq, stream, family, received, dkey, body, upstream, "
        "reason, at) SELECT seq, stream, family, received, dkey, body, ?, ?, ? "
        "FROM events WHERE seq = ? AND acked IS NULL",
        [(up, reason, job.now, seq) for seq, up, reason in job.dead])
    n = _delete(conn, [seq for seq, _, _ in job.dead], job.remember, job.now, out)
    record(out.counters, Drop.DEAD_LETTERED, n)


def _forget_dedupe(conn: sqlite3.Connection, out: Outcome) -> int:
    """At max_size_mb, forget the dedupe keys of delivered events; returns the bytes freed.

    They are kept for dedupe_window_h and take space under the same cap: left alone they
    would keep new events out (or push the queue out) on a busy agent with an empty queue.
    Forgotten all at once, since keys are spread over every page by their hash; the cost
    is that a late resend of an already delivered event may be delivered again.
    """
    before = used_bytes(conn)
    n = conn.execute("DELETE FROM events WHERE acked IS NOT NULL").rowcount  # tombstones
    if n <= 0:
        return 0
    record(out.counters, Tally.DEDUPE_FORGOTTEN, n)
    return before - used_bytes(conn)


def _drop_oldest(conn: sqlite3.Connection, excess: int, out: Outcome) -> None:
    """when_full = "drop_oldest": delete the oldest events until ``excess`` bytes are free
    (tombstones are gone by then: _forget_dedupe runs first)."""
    freed = 0
    while freed < excess:
        gone = conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?) "
            "RETURNING stream, length(body)", (DROP_CHUNK,)).fetchall()
        if not gone:
            break
        _uncount(out.streams, gone)
        freed += sum(n + ROW_OVERHEAD for _, n in gone)
        record(out.counters, Drop.DROPPED_FULL, len(gone))


@dataclass(slots=True)
class Expiry:
    """What prune drops: events older than ``max_age_ms`` by both clocks (agent/clock.py)."""

    wall_cutoff: int   # wall-clock ms: events received before it are old by the wall clock
    forget: int        # wall-clock ms: dedupe keys of events acked before it are forgotten
    observed: int      # agent-observed ms now
    max_age_ms: int
    window_ms: int     # dedupe_window_h
    next_seq: int      # every event with a lower seq is committed


def prune(conn: sqlite3.Connection, exp: Expiry, counters: Counts) -> Outcome:
    """Drop events old by both clocks; forget dedupe keys that both clocks say are past
    the dedupe window (acked before ``exp.forget``, received ``window_ms`` ago)."""
    out = Outcome(stored=None)
    with transaction(conn):
        mark(conn, exp.observed, exp.next_seq)
        below = _received_by(conn, exp.observed - exp.max_age_ms)
        keys_below = _received_by(conn, exp.observed - exp.window_ms)
        # Marks older than the one each of those needs are never needed again.
        conn.execute("DELETE FROM clock_marks WHERE observed < (SELECT max(observed) FROM "
                     "clock_marks WHERE observed <= ?)",
                     (exp.observed - max(exp.max_age_ms, exp.window_ms),))
        rows = conn.execute("DELETE FROM events WHERE seq < ? AND received < ? RETURNING "
                            "stream, length(body), acked", (below, exp.wall_cutoff)).fetchall()
        gone = [(sid, n) for sid, n, acked in rows if acked is None]
        _uncount(out.streams, gone)
        record(out.counters, Drop.EXPIRED, len(gone))
        conn.execute("DELETE FROM events WHERE acked < ? AND seq < ?", (exp.forget, keys_below))
        _save(conn, out.streams, {**counters, **_sum(counters, out.counters)})
    out.used_bytes = used_bytes(conn)
    return out


def _received_by(conn: sqlite3.Connection, observed: int) -> int:
    """The seq below which every event was received by agent-observed time ``observed``."""
    row = conn.execute("SELECT next_seq FROM clock_marks WHERE observed <= ? "
                       "ORDER BY observed DESC LIMIT 1", (observed,)).fetchone()
    return int(row[0]) if row is not None else 0


def _save(conn: sqlite3.Connection, streams: dict[int, list[int]], counters: Counts) -> None:
    """Persist depth and counter *changes* in the same transaction as the rows they count."""
    if streams:
        conn.executemany("UPDATE streams SET depth = depth + ?, bytes = bytes + ? WHERE id = ?",
                         [(d, b, sid) for sid, (d, b) in streams.items() if d or b])
    if counters:
        conn.executemany("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) "
                         "DO UPDATE SET value = value + excluded.value",
                         [(k, v) for k, v in counters.items() if v])


def _uncount(streams: dict[int, list[int]], gone: list[Any]) -> None:
    for sid, nbytes in gone:
        d = streams.get(sid)
        if d is None:
            d = streams[sid] = [0, 0]
        d[0] -= 1
        d[1] -= nbytes


def _sum(a: Counts, b: Counts) -> Counts:
    """Keys of ``b``, each with a's value added (for saving both in one statement)."""
    return {k: a.get(k, 0) + v for k, v in b.items()}
