"""Opening a spool with a backlog: the dedupe index is rebuilt from the keys stored beside
the records and the delivered events' ``spent`` rows, and keeps only the newest
``dedupe_max_keys``. Memory while opening must follow that cap, not the backlog."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from agent.families.event import SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool

CAP = 1000
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
