"""The dictionary learned from the device's events (agent/spool/codebook.py), on a real
spool file: learned once a backlog of small records builds up, read back by an
independent decoder, kept across a restart, gone with the last record, never written
by a device that delivers as it goes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import zstandard

from agent.clock import Clock
from agent.families.event import SEGMENT, Event, dedupe_key
from agent.families.lanes import NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live
from agent.spool.codebook import LEARN_BYTES
from agent.spool.records import ZSTD_DICT, ZSTD_LEARNED
from agent.spool.types import SpoolFull
from tests.spool_files import table
from tests.test_disk import six_mb_fs  # noqa: F401  (a fixture)
from tests.waiting import wait_for

KEYS = ("app-1", "app-2")


def lone(i: int) -> Event:
    """Event ``i``: what an app posts one call at a time, ids and times its own."""
    body = orjson.dumps({
        "type": "track", "event": ("Saved", "Opened", "Shared")[i % 3],
        "userId": f"user-{i % 7}", "messageId": str(uuid.UUID(int=i * 7919 + 13)),
        "timestamp": f"2026-12-03T01:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "properties": {"doc": f"notes-{i % 11}.txt", "size": i * 37 % 5000},
        "context": {"library": {"name": "analytics-python", "version": "2.3.3"}}})
    key = KEYS[i % len(KEYS)]
    return Event(key, SEGMENT, dedupe_key("segment", key, str(i)), body, None, NORMAL)


async def post_alone(spool: Spool, first: int, count: int) -> list[Event]:
    """``count`` events, each in a commit of its own."""
    events = [lone(i) for i in range(first, first + count)]
    for ev in events:
        assert await spool.append([ev]) == 1
    return events


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        yield spool
    finally:
        await spool.close()


async def backlog(path: Path, count: int) -> list[Event]:
    """A spool at ``path`` left with ``count`` lone events queued, closed."""
    async with opened(path) as spool:
        return await post_alone(spool, 0, count)


async def queued(spool: Spool) -> dict[str, list[bytes]]:
    return {key: [r.body for r in await spool.fetch(spool.streams[key].id, 0, 10_000)]
            for key in KEYS}


def by_key(events: list[Event]) -> dict[str, list[bytes]]:
    return {key: [ev.body for ev in events if ev.key == key] for key in KEYS}


def decoded(path: Path) -> list[bytes]:
    """Each learned record's raw content, decoded as the schema documents it (the name
    after the CRC, zstd with the stored dictionary as raw content), not by the spool."""
    dicts = dict(table(path, "SELECT id, body FROM dicts"))
    out = []
    for (data,) in table(path, f"SELECT data FROM records WHERE unicode(data) = {ZSTD_LEARNED}"):
        (name,) = struct.unpack_from("<q", data, 5)
        book = zstandard.ZstdCompressionDict(dicts[name], dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        out.append(zstandard.ZstdDecompressor(dict_data=book).decompress(data[13:]))
    return out


def tags(path: Path) -> list[int]:
    return [data[0] for (data,) in table(path, "SELECT data FROM records ORDER BY id")]


async def test_a_backlog_of_lone_events_is_packed_with_a_dictionary_learned_from_them(
        tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with opened(path) as spool:
        events = await post_alone(spool, 0, 200)
        assert await queued(spool) == by_key(events)
    learned_at = tags(path).index(ZSTD_LEARNED)
    # The first records are the samples, packed with the built-in dictionary; every one
    # after the dictionary is learned, with it.
    assert set(tags(path)[:learned_at]) == {ZSTD_DICT} and set(tags(path)[learned_at:]) == {ZSTD_LEARNED}
    assert sum(len(ev.body) for ev in events[:learned_at]) >= LEARN_BYTES
    assert table(path, "SELECT count(*) FROM dicts") == [(1,)]
    # Read back with the stored dictionary alone: each holds its event's bytes.
    raws = decoded(path)
    assert len(raws) == 200 - learned_at
    assert all(ev.body in raw for ev, raw in zip(events[learned_at:], raws, strict=True))
    sizes = dict(table(path, "SELECT unicode(data), avg(length(data)) FROM records GROUP BY 1"))
    assert sizes[ZSTD_LEARNED] < 0.6 * sizes[ZSTD_DICT]


async def test_a_restarted_spool_goes_on_with_the_stored_dictionary(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    [(name,)] = table(path, "SELECT id FROM dicts")
    async with opened(path) as spool:   # a new reader thread: nothing kept from before
        events += await post_alone(spool, 100, 20)
        assert await queued(spool) == by_key(events)
    assert table(path, "SELECT id FROM dicts") == [(name,)]
    assert tags(path)[-20:] == [ZSTD_LEARNED] * 20
    assert len(decoded(path)) == tags(path).count(ZSTD_LEARNED)


async def test_the_dictionary_goes_with_the_last_record_and_a_device_that_delivers_as_it_goes_writes_none(
        tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with opened(path) as spool:
        await post_alone(spool, 0, 100)
        assert table(path, "SELECT count(*) FROM dicts") == [(1,)]
        for key in KEYS:
            await spool.ack([r.seq for r in await spool.fetch(spool.streams[key].id, 0, 1000)])
        assert spool.depth == 0
        assert table(path, "SELECT count(*) FROM dicts") == [(0,)]
        # Each event delivered before the next: far more than LEARN_BYTES pass, none learned.
        for i in range(100, 200):
            await post_alone(spool, i, 1)
            assert tags(path) == [ZSTD_DICT]
            rows = await spool.fetch(spool.streams[KEYS[i % 2]].id, 0, 10)
            await spool.ack([r.seq for r in rows])
        assert table(path, "SELECT count(*) FROM dicts") == [(0,)]
        # A backlog again: a dictionary learned afresh.
        events = await post_alone(spool, 200, 100)
        assert ZSTD_LEARNED in tags(path) and await queued(spool) == by_key(events)


async def test_records_whose_dictionary_is_lost_are_counted_dropped_and_the_rest_delivered(
        tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    learned_at = tags(path).index(ZSTD_LEARNED)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM dicts")
    async with opened(path) as spool:
        assert await queued(spool) == by_key(events[:learned_at])
        # The reader hands the damaged records to the next commit.
        await wait_for(lambda: spool.counters.get("dropped_corrupt") == 100 - learned_at)
        assert spool.depth == learned_at


async def test_a_salvage_keeps_the_events_of_records_packed_with_a_learned_dictionary(
        tmp_path: Path) -> None:
    """The fresh spool a salvage copies into has no dictionary: such records are packed
    again with the built-in one, nothing lost."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    assert ZSTD_LEARNED in tags(path)
    # Bit rot in the spent keys' page, which every start reads: the file is salvaged.
    [(page,)] = table(path, "SELECT pageno FROM dbstat WHERE name = 'spent'")
    with open(path, "r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(b"\xff" * 4096)
    async with opened(path) as spool:
        assert spool.counters.get("spool_corrupt") == 1
        assert await queued(spool) == by_key(events)
    assert set(tags(path)) == {ZSTD_DICT}
    assert list(tmp_path.glob("spool.db.corrupt-*"))


async def test_events_a_full_disk_refused_are_not_learned_from(
        six_mb_fs: Path) -> None:  # noqa: F811
    """A commit the disk refuses stores none of its events, and they must not become the
    dictionary's samples either: the spool would write copies of events it never held
    (an app told to retry may never send them again)."""
    path = six_mb_fs / "spool.db"
    filler = six_mb_fs / "filler"
    secret = Event(KEYS[0], SEGMENT, dedupe_key("segment", "refused"), orjson.dumps(
        {"type": "track", "event": "Refused", "userId": "not-stored-4f1c9e"}), None, NORMAL)
    async with opened(path) as spool:
        await post_alone(spool, 0, 5)   # samples, fewer than a dictionary needs
        assert spool.db is not None
        await spool.db.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        stat = os.statvfs(six_mb_fs)
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize))
        with pytest.raises(SpoolFull):
            await spool.append([secret])
        filler.unlink()
        await post_alone(spool, 5, 40)
    [(body,)] = table(path, "SELECT body FROM dicts")
    assert lone(0).body in body and b"not-stored-4f1c9e" not in body


async def test_a_dictionary_of_expired_events_is_not_written_again(
        tmp_path: Path, clock: Clock) -> None:
    """Expiry emptied the queue (the trigger deleted the dictionary with the last record);
    a dead letter retried then queued events again before any app posted. The writer went
    on packing with the dictionary of the expired events, and wrote it back to disk:
    copies of events the spool had dropped."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_age_days=1))
    try:
        await post_alone(spool, 0, 100)
        [(old,)] = table(path, "SELECT id FROM dicts")
        clock.passed_ms += 61_000   # a clock mark: what came before it can expire
        await post_alone(spool, 100, 1)
        clock.passed_ms += 2 * 86_400_000
        clock.wall_shift_ms = 2 * 86_400_000
        [row] = await spool.fetch(spool.streams[KEYS[0]].id, 0, 1)
        await spool.dead_letter([(row.seq, "up", "HTTP 400: no")])   # kept: dead just now
        assert await spool.prune() == 100
        assert spool.depth == 0 and table(path, "SELECT count(*) FROM dicts") == [(0,)]
        assert await dead_live.retry(spool, dead.Which(every=True)) == 1
        await post_alone(spool, 101, 3)
    finally:
        await spool.close()
    assert (old,) not in table(path, "SELECT id FROM dicts")


def flip_a_bit(db: sqlite3.Connection) -> None:
    [(body,)] = db.execute("SELECT body FROM dicts")
    db.execute("UPDATE dicts SET body = ?", (body[:-1] + bytes([body[-1] ^ 1]),))


# Bit rot in the stored dictionary's row, which SQLite reads without complaint: its body
# no longer has its name, or its name or body is of another type.
DICTIONARY_DAMAGE: dict[str, Callable[[sqlite3.Connection], object]] = {
    "body": flip_a_bit,
    "name": lambda db: db.execute("UPDATE dicts SET id = 'garbage'"),
    "body-type": lambda db: db.execute("UPDATE dicts SET body = 'garbage'"),
}


@pytest.mark.parametrize("damage", DICTIONARY_DAMAGE.values(), ids=DICTIONARY_DAMAGE.keys())
async def test_a_restart_over_a_damaged_dictionary_stores_new_events_readably(
        tmp_path: Path, damage: Callable[[sqlite3.Connection], object]) -> None:
    """The records packed with a damaged dictionary are lost (counted dropped_corrupt);
    the events apps post after the restart must not be packed with it too."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    learned_at = tags(path).index(ZSTD_LEARNED)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        damage(db)
    async with opened(path) as spool:
        events = events[:learned_at] + await post_alone(spool, 100, 20)
        assert await queued(spool) == by_key(events)


async def test_a_salvage_over_a_garbled_dictionary_name_keeps_the_other_records(
        tmp_path: Path) -> None:
    """Only the records packed with the damaged dictionary are lost, counted (a body that
    no longer has its name already was)."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    learned_at = tags(path).index(ZSTD_LEARNED)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        DICTIONARY_DAMAGE["name"](db)
    [(page,)] = table(path, "SELECT pageno FROM dbstat WHERE name = 'spent'")
    with open(path, "r+b") as fh:   # and a damaged page: the file is salvaged at start
        fh.seek((page - 1) * 4096)
        fh.write(b"\xff" * 4096)
    async with opened(path) as spool:
        assert spool.counters.get("spool_corrupt") == 1
        assert spool.counters.get("dropped_corrupt") == 100 - learned_at
        assert await queued(spool) == by_key(events[:learned_at])
