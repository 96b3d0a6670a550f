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


async def test_opening_a_backlog_reads_the_dedupe_keys_the_cap_keeps(tmp_path: Path) -> None:
    """Audit: every record's keys were read into one list before the index trimmed them
    to the cap (cap 10,000 keys, 4M queued: 34 MB peak while opening)."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), dedupe_max_keys=CAP, sync="normal")
    spool = await Spool.open(cfg)
    for b in range(BACKLOG):
        await spool.append([event(b, i) for i in range(1000)])
    await spool.close()
    tracemalloc.start()
    try:
        spool = await Spool.open(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
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
