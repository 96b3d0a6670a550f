"""The spool on real SQLite files: group commit, dedupe, FIFO, ack, dead letters, limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from agent.clock import CLOCK
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import HIGH
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.types import SpoolFull
from tests.waiting import wait_for


def ev(key: str, n: int, size: int = 10) -> Event:
    # Random padding: records are compressed, and a run of one letter would take no room.
    pad = os.urandom(size // 2 + 1).hex()[:size]
    return Event(key, NUCLEUS, dedupe_key(key, n), orjson.dumps({"id": n, "pad": pad}))


async def open_spool(tmp_path: Path, **kw: object) -> Spool:
    return await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), **kw))  # type: ignore[arg-type]


async def test_concurrent_appends_share_commits_and_survive_reopen(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    results = await asyncio.gather(*(spool.append([ev("k", i)]) for i in range(200)))
    assert results == [1] * 200
    # 200 requests were answered by far fewer transactions (group commit).
    assert spool.commits < 200
    await spool.close()
    again = await open_spool(tmp_path)
    assert again.depth == 200 and again.streams["k"].depth == 200
    rows = await again.fetch(again.streams["k"].id, 0, 1000)
    assert [orjson.loads(r.body)["id"] for r in rows] == list(range(200))
    await again.close()


async def test_resends_are_stored_once_even_after_delivery(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    assert await spool.append([ev("k", 1), ev("k", 2)]) == 2
    assert await spool.append([ev("k", 1), ev("k", 3)]) == 1
    rows = await spool.fetch(spool.streams["k"].id, 0, 10)
    await spool.ack([r.seq for r in rows])
    assert spool.depth == 0
    # The app never saw our ack and resends: remembered, not stored again.
    assert await spool.append([ev("k", 1)]) == 0
    assert spool.counters["duplicates"] == 2
    await spool.close()


async def test_fifo_per_key_and_cursor_reads(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    for i in range(10):
        await spool.append([ev("a", i), ev("b", i)])
    a, b = spool.streams["a"].id, spool.streams["b"].id
    first = await spool.fetch(a, 0, 4)
    rest = await spool.fetch(a, first[-1].seq, 100)
    assert [orjson.loads(r.body)["id"] for r in [*first, *rest]] == list(range(10))
    assert all(r.stream == a for r in [*first, *rest])
    assert len(await spool.fetch(b, 0, 100)) == 10
    await spool.close()


async def test_a_read_stops_at_the_event_that_reaches_its_bytes(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    # Ids of one width: every body the same size. Two records.
    await spool.append([ev("k", i, size=1000) for i in range(100, 110)])
    await spool.append([ev("k", i, size=1000) for i in range(110, 120)])
    k = spool.streams["k"].id
    every = await spool.fetch(k, 0, 100)
    await spool.ack([every[3].seq])   # a hole: the read's runs go around it
    size = len(every[0].body)
    live = [i for i in range(100, 120) if i != 103]
    for max_bytes, events in ((1, 1), (size, 1), (size + 1, 2), (size * 12 + 1, 13),
                              (size * 100, 19)):
        rows = await spool.fetch(k, 0, 100, max_bytes=max_bytes)
        assert [orjson.loads(r.body)["id"] for r in rows] == live[:events], max_bytes
    # From a cursor inside the first record; the count still a limit.
    rows = await spool.fetch(k, every[4].seq, 3, max_bytes=size * 100)
    assert [orjson.loads(r.body)["id"] for r in rows] == [105, 106, 107]
    rows = await spool.fetch(k, every[4].seq, 100, max_bytes=size * 6 + 1)
    assert [orjson.loads(r.body)["id"] for r in rows] == list(range(105, 112))
    # The high lane is read first, and its bytes count against the normal lane's.
    await spool.append([replace(ev("k", i, size=1000), lane=HIGH) for i in range(120, 123)])
    rows = await spool.fetch(k, 0, 100, max_bytes=size * 4 + 1)
    assert [orjson.loads(r.body)["id"] for r in rows] == [120, 121, 122, 100, 101]
    await spool.close()


async def test_ack_deletes_exactly_the_acked_rows(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([ev("k", i) for i in range(5)])
    rows = await spool.fetch(spool.streams["k"].id, 0, 10)
    await spool.ack([rows[1].seq, rows[3].seq, 999_999])   # unknown seqs are ignored
    left = await spool.fetch(spool.streams["k"].id, 0, 10)
    assert [r.seq for r in left] == [rows[0].seq, rows[2].seq, rows[4].seq]
    assert spool.counters["acked"] == 2 and spool.depth == 3
    await spool.close()


async def test_dead_letters_keep_the_event_and_reason(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.append([ev("k", 1), ev("k", 2)])
    rows = await spool.fetch(spool.streams["k"].id, 0, 10)
    await spool.dead_letter([(rows[0].seq, "up", "HTTP 400: bad event")])
    (dead,) = await spool.dead_letters()
    assert dead["reason"] == "HTTP 400: bad event" and dead["upstream"] == "up"
    assert orjson.loads(dead["body"])["id"] == 1
    assert spool.depth == 1 and spool.counters["dead_lettered"] == 1
    await spool.close()


async def test_reject_when_full(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, max_size_mb=1)
    big = 20_000
    stored = 0
    with pytest.raises(SpoolFull):
        for i in range(200):
            stored += await spool.append([ev("k", i, big)])
    assert 0 < stored < 120     # 1 MB of hex pads compressed about 2x: ~100 fit
    assert spool.counters["rejected_full"] >= 1
    assert os.path.getsize(tmp_path / "spool.db") <= 1024 * 1024 + 64 * 1024
    await spool.close()


async def test_drop_oldest_when_full_keeps_newest(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, max_size_mb=1, when_full="drop_oldest")
    for i in range(200):
        assert await spool.append([ev("k", i, 20_000)]) == 1
    rows = await spool.fetch(spool.streams["k"].id, 0, 1000)
    ids = [orjson.loads(r.body)["id"] for r in rows]
    assert ids == list(range(200 - len(ids), 200))     # the newest, in order
    assert spool.counters["dropped_full"] == 200 - len(ids) > 0
    assert spool.depth == len(ids)
    await spool.close()


async def test_prune_drops_old_events_and_counts_them(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, max_age_days=1)
    try:
        await spool.append([ev("k", 1)])
        CLOCK.passed_ms = 2 * 86_400_000                 # two days pass (both clocks)
        await spool.append([ev("k", 2)])
        await spool.close()
        spool = await open_spool(tmp_path, max_age_days=1)
        assert await spool.prune() == 1
        assert spool.depth == 1 and spool.counters["expired"] == 1
    finally:
        CLOCK.passed_ms = 0
        await spool.close()


async def test_files_are_private(tmp_path: Path) -> None:
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "d" / "spool.db")))
    await spool.append([ev("k", 1)])
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
    for name in ("spool.db", "spool.db-wal"):
        assert stat.S_IMODE(os.stat(tmp_path / "d" / name).st_mode) == 0o600
    await spool.close()


async def test_a_file_where_the_spool_directory_should_be_is_refused_untouched(
        tmp_path: Path) -> None:
    """Review: the directory helper took an existing regular file for the directory and
    made it 0700 (executable), then went on."""
    (tmp_path / "d").write_bytes(b"notes")
    (tmp_path / "d").chmod(0o644)
    with pytest.raises(OSError):
        await Spool.open(StorageConfig(path=str(tmp_path / "d" / "spool.db")))
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o644
    assert (tmp_path / "d").read_bytes() == b"notes"


async def _saved_forgotten(tmp_path: Path) -> int:
    """dedupe_forgotten as the spool at ``tmp_path`` saved it: read by opening it again."""
    again = await open_spool(tmp_path, dedupe_max_keys=100)
    try:
        return again.counters.get("dedupe_forgotten", 0)
    finally:
        await again.close()


async def test_garbage_spool_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "spool.db").write_bytes(b"this is not sqlite" * 100)
    spool = await open_spool(tmp_path)
    assert await spool.append([ev("k", 1)]) == 1
    assert spool.counters["spool_corrupt"] == 1
    aside = list(tmp_path.glob("spool.db.corrupt-*"))
    assert aside and aside[0].read_bytes().startswith(b"this is not sqlite")
    await spool.close()


async def test_counts_made_after_the_last_commit_survive_a_clean_stop(tmp_path: Path) -> None:
    """Keys past dedupe_max_keys are counted as forgotten once their commit is done, so
    after it: a clean stop right then must still save the count (it was lost: only the
    next commit would have saved it)."""
    spool = await open_spool(tmp_path, dedupe_max_keys=100)
    await spool.append([ev("k", i) for i in range(300)])
    forgotten = spool.counters["dedupe_forgotten"]
    assert forgotten > 0
    await spool.close()
    assert await _saved_forgotten(tmp_path) == forgotten


async def test_counts_an_expiry_chunk_saved_are_not_saved_again_by_a_stop_inside_it(
        tmp_path: Path) -> None:
    """The stop cancels expiry (its task) while a chunk runs on the writer's thread: the
    chunk commits, with the counts made since the last commit. They were put back as not
    saved, and the stop saved them a second time."""
    spool = await open_spool(tmp_path, dedupe_max_keys=100)
    await spool.append([ev("k", i) for i in range(300)])
    forgotten = spool.counters["dedupe_forgotten"]   # counted after its commit: unsaved
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")   # the chunk waits for this lock (busy_timeout)
        expiry = asyncio.create_task(spool.prune())
        await wait_for(lambda: spool.dropping is not None)   # its chunk is handed over
        assert spool.db is not None
        spool.db.hand_over(5.0)   # ... and taken by the writer's thread
        expiry.cancel()
        other.execute("ROLLBACK")
    with pytest.raises(asyncio.CancelledError):
        await expiry
    await spool.close()
    assert await _saved_forgotten(tmp_path) == forgotten
