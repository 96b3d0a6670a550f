"""The write-ahead log after a drain: SQLite reuses a -wal from its start after each
checkpoint and never shrinks it, so a synced backlog's megabytes of -wal stayed on disk
for as long as the agent ran. Once a commit empties the queue with the -wal past
commit.WAL_TRUNCATE_BYTES, it is checkpointed and truncated; a small one is left alone,
or an agent that delivers as it goes would pay for a checkpoint at every ack."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from agent.clock import Clock
from agent.families.event import NUCLEUS, Event
from agent.families.lanes import NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.commit import WAL_TRUNCATE_BYTES
from tests.spool_files import table


def events(first: int, n: int, pad: int) -> list[Event]:
    """Nucleus events padded with ``pad`` bytes of hex noise (zstd halves it, no more)."""
    rng = random.Random(first)
    return [Event("app1", NUCLEUS, i, b'{"id":%d,"pad":"%s"}' % (i, rng.randbytes(pad // 2).hex().encode()),
                  i, NORMAL) for i in range(first, first + n)]


async def drain(spool: Spool) -> None:
    rows = await spool.fetch(spool.streams["app1"].id, 0, 100_000)
    await spool.ack([r.seq for r in rows])
    assert spool.depth == 0


def wal(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def test_a_drained_backlog_gives_its_write_ahead_log_back(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        # One commit of ~6 MB: the -wal holds it whole whatever the checkpoints did
        # before (200 at a time, it peaked within a few pages of WAL_TRUNCATE_BYTES,
        # over or under it as the schema's pages went).
        assert await spool.append(events(0, 6_000, 2_000)) == 6_000
        assert wal(path) > WAL_TRUNCATE_BYTES
        await drain(spool)
        assert wal(path) == 0
        # Still a working spool: the next events are stored and read back.
        assert await spool.append(events(10_000, 3, 100)) == 3
        assert len(await spool.fetch(spool.streams["app1"].id, 0, 100)) == 3
    finally:
        await spool.close()
    assert table(path, "PRAGMA integrity_check") == [("ok",)]


async def test_a_small_write_ahead_log_is_left_as_it_is_when_the_queue_empties(
        tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        for first in range(0, 300, 100):
            assert await spool.append(events(first, 100, 200)) == 100
        await drain(spool)
        size = wal(path)
        assert 0 < size < WAL_TRUNCATE_BYTES
        assert await spool.append(events(1_000, 1, 100)) == 1
        await drain(spool)
        assert wal(path) >= size
    finally:
        await spool.close()


async def test_a_backlog_that_expires_gives_its_write_ahead_log_back(
        tmp_path: Path, clock: Clock) -> None:
    """Expiry empties the queue too (max_age_days: a device offline for a month, the
    backlog that grew the -wal most): its -wal went on taking megabytes until some later
    event happened to be delivered."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_age_days=1))
    try:
        for first in range(0, 6_000, 200):
            assert await spool.append(events(first, 200, 2_000)) == 200
            clock.passed_ms += 61_000   # a clock mark per commit: each one can expire
        assert wal(path) > WAL_TRUNCATE_BYTES
        clock.passed_ms += 2 * 86_400_000
        clock.wall_shift_ms = 2 * 86_400_000
        assert await spool.prune() == 6_000
        assert spool.depth == 0
        assert wal(path) == 0
    finally:
        await spool.close()
    assert table(path, "PRAGMA integrity_check") == [("ok",)]


async def test_a_truncation_a_reader_held_off_is_done_by_the_next_expiry_run(
        tmp_path: Path) -> None:
    """The commit that empties the queue truncates without waiting: a reader's snapshot
    at that moment (the forwarder's read ahead, a status query) makes it give up. It was
    not tried again until the queue next emptied, so the -wal kept the backlog's
    megabytes for as long as the agent ran; the next expiry run (every 10 minutes) must
    truncate it."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        for first in range(0, 6_000, 200):
            assert await spool.append(events(first, 200, 2_000)) == 200
        reader = sqlite3.connect(path)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM records").fetchone()   # holds a snapshot
            await drain(spool)
            assert wal(path) > WAL_TRUNCATE_BYTES   # held off
        finally:
            reader.close()
        assert await spool.prune() == 0   # nothing to expire
        assert wal(path) == 0
    finally:
        await spool.close()
