"""Opening a spool with a backlog: the dedupe index is rebuilt from the keys stored beside
the records and the delivered events' ``spent`` rows, and keeps only the newest
``dedupe_max_keys``. Memory while opening must follow that cap, not the backlog."""

from __future__ import annotations

import sqlite3
import tracemalloc
from contextlib import closing
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.clock import Clock
from agent.families.event import SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.db import load_state
from agent.spool.dedupe import HOUR_MS, StoredKeys, keys_to_bytes
from agent.spool.schema import SCHEMA

CAP = 1000
DAY0 = 1_767_225_600_000   # 2026-01-01, ms
BACKLOG = 60   # requests of 1000 events: 480 KB of dedupe keys on disk


def event(b: int, i: int) -> Event:
    return Event("k", SEGMENT, dedupe_key("k", b, i), b'{"type":"track","event":"e"}')


async def reopened(cfg: StorageConfig, commits: list[list[Event]]) -> tuple[Spool, int, int]:
    """A spool written with ``commits``, closed, and opened again: with the memory traced
    (by tracemalloc) once open, and at the peak while opening."""
    spool = await Spool.open(cfg)
    for events in commits:
        await spool.append(events)
    await spool.close()
    tracemalloc.start()
    try:
        spool = await Spool.open(cfg)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return spool, kept, peak


async def test_opening_a_backlog_reads_the_dedupe_keys_the_cap_keeps(tmp_path: Path) -> None:
    """Audit: every record's keys were read into one list before the index trimmed them
    to the cap (cap 10,000 keys, 4M queued: 34 MB peak while opening)."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), dedupe_max_keys=CAP, sync="normal")
    spool, _, peak = await reopened(cfg, [[event(b, i) for i in range(1000)]
                                          for b in range(BACKLOG)])
    try:
        assert spool.depth == BACKLOG * 1000
        assert CAP * 15 // 16 <= len(spool.index) <= CAP
        assert await spool.append([event(BACKLOG - 1, 999)]) == 0   # the newest: kept
        assert peak < 200_000, peak   # the backlog's keys alone are 480 KB
    finally:
        await spool.close()


async def test_keys_past_the_cap_are_counted_forgotten_once_not_at_each_restart(
        tmp_path: Path) -> None:
    """Audit: the keys the index trims at load were counted in dedupe_forgotten again at
    every restart, though the run that stored them had counted them already."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), dedupe_max_keys=CAP, sync="normal")
    spool = await Spool.open(cfg)
    for b in range(3):
        await spool.append([event(b, i) for i in range(1000)])
    await spool.close()
    counts = []
    for _ in range(3):
        spool = await Spool.open(cfg)
        counts.append(spool.counters.get("dedupe_forgotten", 0))
        assert await spool.append([event(2, 999)]) == 0   # a commit: saves what was counted
        await spool.close()
    assert counts[0] >= 1000 and counts == [counts[0]] * 3, counts   # pre-fix: +2000 a time


async def test_a_key_stored_again_is_rebuilt_with_its_newest_receipt(
        tmp_path: Path, clock: Clock) -> None:
    """An event queued past dedupe_window_h (a day without its upstream) leaves the index,
    so the app's resend then is stored again: a new receipt, whose own resends within the
    window the running agent stores once. A restart rebuilt the key at the older record's
    receipt (the first of the two in the file), and the next expiry forgot it: a resend an
    hour after the second receipt was stored a third time (the agent not restarted: once)."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), sync="normal", dedupe_window_h=24)
    again = event(0, 0)
    spool = await Spool.open(cfg)
    try:
        assert await spool.append([again]) == 1
        clock.passed_ms += 25 * HOUR_MS
        await spool.prune()
        assert await spool.append([again]) == 1   # past the window: at-least-once
    finally:
        await spool.close()
    spool = await Spool.open(cfg)
    try:
        clock.passed_ms += HOUR_MS
        await spool.prune()
        assert await spool.append([again]) == 0   # an hour after its second receipt
        assert spool.depth == 2
    finally:
        await spool.close()


async def test_opening_many_one_event_records_takes_little_more_than_it_keeps(
        tmp_path: Path) -> None:
    """Events posted one at a time, by apps on many keys, are a record each. Opening such a
    spool must not build a Python object per record on the way to the index and the live
    records' arrays: at 500,000 records that took 211 MB of RSS for 83 MB kept (a full
    512 MB spool of them: about 640 MB more at every start, on a small device)."""
    records, keys = 20_000, 1000
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), sync="normal")
    spool, kept, peak = await reopened(cfg, [   # a commit each, a record for each key
        [Event(f"k{i}", SEGMENT, dedupe_key("k", b, i), b'{"type":"track"}') for i in range(keys)]
        for b in range(records // keys)])
    try:
        assert spool.depth == records and len(spool.index) == records
        # The index and the live records' arrays are what stays; the way there may add
        # tens of bytes a record (a cursor's rows, arrays growing), not a tuple of objects.
        assert (peak - kept) / records < 100, (peak - kept) / records
    finally:
        await spool.close()


def _reference_records(conn: sqlite3.Connection, now: int, max_keys: int) -> tuple[
        list[tuple[int, int, int]], list[tuple[bytes, int, int]]]:
    """What load_state reads, row by row: every live record (id, n, receipt time), and
    the stored keys of the newest records and spent rows while under the cap, oldest first."""
    marks = conn.execute("SELECT next_seq, observed FROM clock_marks ORDER BY next_seq").fetchall()
    latest = max([now] + [observed for _, observed in marks])

    def receipt(rid: int) -> int:   # the first mark after the record
        return int(next((observed for next_seq, observed in marks if next_seq > rid), latest))

    live = [(rid, n, receipt(rid)) for rid, n in conn.execute("SELECT id, n FROM records ORDER BY id")]
    keys, held = [], 0
    for rid, dkeys, wall, seen in conn.execute(
            "SELECT id, dkeys, received, NULL FROM records UNION ALL "
            "SELECT id, dkeys, received, observed FROM spent ORDER BY 1 DESC"):
        if held >= max_keys:
            break
        keys.append((dkeys, wall, receipt(rid) if seen is None else seen))
        held += len(dkeys) // 8
    return live, keys[::-1]


@settings(max_examples=150, deadline=None)
@example([(True, 5, False), (True, 1000, False), (True, 1000, False)], 2000, 0)  # cap hit mid-batch
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 1000) | st.integers(1, 3),
                          st.booleans()), max_size=40),
       st.integers(1, 20) | st.integers(900, 4000), st.integers(0, 10**6))
def test_opening_reads_the_records_and_keys_row_by_row_would(
        rows: list[tuple[bool, int, bool]], max_keys: int, now: int) -> None:
    """load_state reads a batch of rows at a time and takes them apart in C loops: what it
    returns must be what reading row by row gives, with spent rows among the records,
    clock marks between them, and the cap cutting a batch."""
    # In memory: the same queries, without a directory and a file made and removed at
    # each example (with them, unsynced, the test took 1.6x as long).
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.executescript(SCHEMA)
        # The records' queue: the start takes a record in none for damage.
        conn.execute("INSERT INTO streams(id, key) VALUES (1, 'k')")
        seq, observed = 1, 0
        for i, (is_record, n, marked) in enumerate(rows):
            dkeys = keys_to_bytes(range(seq, seq + n))
            if is_record:
                conn.execute("INSERT INTO records(id, stream, family, n, received, live, bytes, "
                             "dkeys, data) VALUES (?, 1, 0, ?, ?, ?, 0, ?, x'')",
                             (seq, n, DAY0 + i, n, dkeys))
            else:
                conn.execute("INSERT INTO spent(id, received, observed, dkeys) VALUES (?, ?, ?, ?)",
                             (seq, DAY0 + i, observed + 7, dkeys))
            seq += n
            if marked:   # every event below seq received by then
                observed += 1000
                conn.execute("INSERT INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                              (observed, seq))
        state = load_state(conn, now, max_keys)
        live, keys = _reference_records(conn, now, max_keys)
    assert list(zip(*state.live)) == live
    got = StoredKeys.of(keys)
    assert (state.keys.blob, state.keys.counts, state.keys.wall, state.keys.observed) == \
        (got.blob, got.counts, got.wall, got.observed)
