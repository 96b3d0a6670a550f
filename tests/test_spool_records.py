"""The spool's packed records (v1): partial acks, damaged records, space handed back,
the dedupe index rebuilt at start, and a failed commit that must not dedupe a retry."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import orjson
import pytest

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.types import Reason, SpoolFull


def ev(key: str, n: int, size: int = 10, family: int = NUCLEUS) -> Event:
    pad = os.urandom(size // 2 + 1).hex()[:size]
    return Event(key, family, dedupe_key(key, n), orjson.dumps({"id": n, "pad": pad}))


def ids(rows: list[object]) -> list[int]:
    return [orjson.loads(r.body)["id"] for r in rows]  # type: ignore[attr-defined]


async def open_spool(tmp_path: Path, **kw: object) -> Spool:
    return await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), **kw))  # type: ignore[arg-type]


async def test_partial_acks_survive_a_restart_and_a_full_record_becomes_spent(
        tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([ev("k", i) for i in range(10)])
    sid = spool.streams["k"].id
    rows = await spool.fetch(sid, 0, 100)
    await spool.ack([rows[i].seq for i in (0, 3, 9)])
    assert ids(await spool.fetch(sid, 0, 100)) == [1, 2, 4, 5, 6, 7, 8]
    assert ids(await spool.fetch(sid, rows[4].seq, 2)) == [5, 6]   # a cursor inside a record
    await spool.close()
    spool = await open_spool(tmp_path)
    try:
        assert spool.depth == 7 and spool.streams["k"].depth == 7
        left = await spool.fetch(sid, 0, 100)
        assert ids(left) == [1, 2, 4, 5, 6, 7, 8]
        await spool.ack([r.seq for r in left])
        assert spool.depth == 0 and spool.streams["k"].bytes == 0
        with sqlite3.connect(tmp_path / "spool.db") as db:
            assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM spent").fetchone()[0] == 1
    finally:
        await spool.close()


async def test_the_dedupe_index_is_rebuilt_from_queued_and_delivered_records(
        tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([ev("k", i) for i in range(3)])
    await spool.append([ev("k", i) for i in range(3, 6)])
    rows = await spool.fetch(spool.streams["k"].id, 0, 3)
    await spool.ack([r.seq for r in rows])                 # the first record: delivered
    await spool.close()
    spool = await open_spool(tmp_path)
    try:
        assert len(spool.index) == 6
        assert await spool.append([ev("k", i) for i in range(7)]) == 1   # only id 6 is new
        assert spool.counters["duplicates"] == 6
    finally:
        await spool.close()


async def test_a_key_keeps_its_order_across_families_in_one_commit(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        await spool.append([ev("k", i, family=(NUCLEUS, SEGMENT)[i % 3 == 1]) for i in range(7)])
        rows = await spool.fetch(spool.streams["k"].id, 0, 100)
        assert ids(rows) == list(range(7))
        assert [r.family for r in rows] == [(NUCLEUS, SEGMENT)[i % 3 == 1] for i in range(7)]
        assert [r.seq for r in rows] == list(range(rows[0].seq, rows[0].seq + 7))
    finally:
        await spool.close()


async def test_a_damaged_record_is_skipped_counted_and_the_rest_served(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    for b in range(3):
        await spool.append([ev("k", b * 10 + i) for i in range(10)])
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        rid, data = db.execute("SELECT id, data FROM records ORDER BY id LIMIT 1 OFFSET 1"
                               ).fetchone()
        db.execute("UPDATE records SET data = ? WHERE id = ?",
                   (data[:20] + bytes([data[20] ^ 0xFF]) + data[21:], rid))
    spool = await open_spool(tmp_path)
    try:
        sid = spool.streams["k"].id
        assert ids(await spool.fetch(sid, 0, 100)) == list(range(10)) + list(range(20, 30))
        await spool.append([ev("other", 0)])                # the next commit deletes it
        assert spool.counters["dropped_corrupt"] == 10 and spool.streams["k"].depth == 20
        assert ids(await spool.fetch(sid, 0, 100)) == list(range(10)) + list(range(20, 30))
    finally:
        await spool.close()


async def test_a_drained_spool_hands_its_space_back(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        for b in range(40):
            await spool.append([ev("k", b * 500 + i, size=300) for i in range(500)])
        await spool.close()   # checkpoints the WAL: the file holds the peak
        peak = os.path.getsize(tmp_path / "spool.db")
        spool = await open_spool(tmp_path)
        sid = spool.streams["k"].id
        while rows := await spool.fetch(sid, 0, 1000):
            await spool.ack([r.seq for r in rows])
        assert spool.depth == 0
        await spool.close()
        after = os.path.getsize(tmp_path / "spool.db")
        assert after <= peak // 10, (after, peak)
        spool = await open_spool(tmp_path)
    finally:
        await spool.close()


async def test_a_commit_that_fails_does_not_make_the_retry_a_duplicate(tmp_path: Path) -> None:
    """A full disk (here: SQLite's own page limit, the same SQLITE_FULL) fails the commit:
    the app retries the same events, and they must be stored, not taken for resends."""
    spool = await open_spool(tmp_path)
    try:
        await spool.append([ev("k", 0)])
        db = spool.db
        assert db is not None
        pages = await db.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await db.run(lambda c: c.execute(f"PRAGMA max_page_count={pages}").fetchone())
        batch = [ev("k", i, size=4000) for i in range(1, 40)]
        with pytest.raises(SpoolFull) as refused:
            await spool.append(batch)
        assert refused.value.reason is Reason.DISK_ERROR and "full" in str(refused.value)
        assert spool.depth == 1 and len(spool.index) == 1
        await db.run(lambda c: c.execute("PRAGMA max_page_count=1073741823").fetchone())
        assert await spool.append(batch) == 39
        assert spool.depth == 40
    finally:
        await spool.close()
