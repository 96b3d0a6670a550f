"""The spool file never grows past `storage.max_size_mb`, filled to the cap with
`when_full = "reject"`, whatever the rows' sizes (docs/operations.md: "The spool never
grows past storage.max_size_mb").

Between measurements of the file (a query), the writer estimates its size from what it
inserted. SQLite keeps whole rows in a page: two rows just over half a page take a page
each, so an estimate that counts bytes, not pages, lets the file pass the cap. The cap
here is past ``commit.MEASURE_WITHIN``, so the estimate, not a measurement, is what
decides most commits.
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from agent.families.event import SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.commit import MEASURE_WITHIN
from agent.spool.types import SpoolFull

MB = 1024 * 1024
CAP_MB = 10
assert CAP_MB * MB > 2 * MEASURE_WITHIN

Request = list[Event]


def track(rng: random.Random, key: str, n: int, noise: int) -> Event:
    """A Segment track with ``noise`` bytes that do not compress (ids, tokens, hashes)."""
    body = orjson.dumps({
        "type": "track", "event": rng.choice(["Order Completed", "Page Viewed", "Signed Up"]),
        "userId": f"user-{rng.randrange(10_000)}", "messageId": f"m-{n}",
        "timestamp": "2026-11-30T12:00:00.000Z",
        "properties": {"sku": rng.choice(["a-1", "b-22", "c-333"]), "price": rng.random(),
                       "token": rng.randbytes(noise).hex()},
        "context": {"library": {"name": "analytics.js", "version": "5.2.0"},
                    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"}})
    return Event(key, SEGMENT, dedupe_key(key, n), body)


def half_page_rows(rng: random.Random, n: int) -> Request:
    """A hundred keys (apps), one event each: every record is just over half a 4 KB page."""
    return [track(rng, f"key-{i}", n + i, 1700) for i in range(100)]


def mixed(rng: random.Random, n: int) -> Request:
    """What apps send: single events and batches, of several keys, small and large."""
    out = []
    for k in range(rng.randint(1, 12)):
        for j in range(rng.choice([1, 1, 1, 5, 20, 100])):
            out.append(track(rng, f"app-{k}", n + len(out), rng.choice([16, 64, 300, 1000])))
    return out


@pytest.mark.parametrize("requests", [half_page_rows, mixed], ids=["half-page rows", "mixed"])
async def test_a_spool_filled_to_the_cap_stays_within_it(
        tmp_path: Path, requests: Callable[[random.Random, int], Request]) -> None:
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_size_mb=CAP_MB,
                                           when_full="reject", sync="normal"))
    rng = random.Random(11)
    n = refused = 0
    try:
        for _ in range(20_000):   # bounded: refusals come long before
            request = requests(rng, n)
            n += len(request)
            try:
                await spool.append(request)
            except SpoolFull:
                refused += 1
                if refused == 20:   # refused at the cap, not by one large request
                    break
        assert refused == 20, "the spool never filled"
        # Filled, not refused early: within a few of the largest requests of the cap.
        with sqlite3.connect(path) as db:
            size = db.execute("SELECT page_count * page_size FROM pragma_page_count(), "
                              "pragma_page_size()").fetchone()[0]
        assert size >= CAP_MB * MB * 0.9, size
    finally:
        await spool.close()   # checkpoints the WAL into the file
    assert os.path.getsize(path) <= CAP_MB * MB, os.path.getsize(path) / MB


async def test_dead_letters_stay_within_the_cap_and_make_way_for_queued_events(
        tmp_path: Path) -> None:
    """An upstream that refuses everything: every event moves from a compressed record to
    an uncompressed dead letter, several times its stored size. The file must still stay
    within the cap, the oldest dead letters going first (counted), and never before a
    queued event: new events are still taken."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_size_mb=1, when_full="reject",
                                           sync="normal"))
    rng = random.Random(5)
    try:
        for n in range(0, 3000, 100):   # ~1 KB events, ~0.3 KB packed: 0.9 MB dead-lettered
            await spool.append([Event("bad", SEGMENT, dedupe_key("bad", i), orjson.dumps(
                {"messageId": f"m-{i}", "token": rng.randbytes(100).hex(), "text": "x" * 800}))
                for i in range(n, n + 100)])
        stream = spool.streams["bad"].id
        while rows := await spool.fetch(stream, 0, 500):
            await spool.dead_letter([(r.seq, "up", "HTTP 400: refused") for r in rows])
        dropped = spool.counters.get("dead_dropped_full", 0)
        assert dropped > 0 and spool.dead_count == 3000 - dropped
        await spool.append([Event("good", SEGMENT, dedupe_key("good", 1), b'{"messageId":"g"}')])
        assert spool.streams["good"].depth == 1
        newest = await spool.dead_letters(1)
        assert orjson.loads(newest[0]["body"])["messageId"] == "m-2999"   # the oldest went
    finally:
        await spool.close()
    assert os.path.getsize(path) <= MB, os.path.getsize(path) / MB


async def test_a_refused_append_deletes_no_dead_letter(tmp_path: Path) -> None:
    """when_full = "reject": dead letters yield to an append only when deleting them makes
    room for it. One that is refused anyway must leave them all (review: it emptied the
    dead letters, then was refused)."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), max_size_mb=1,
                                           when_full="reject", sync="normal"))
    rng = random.Random(5)

    def event(key: str, i: int, noise: int) -> Event:
        return Event(key, SEGMENT, dedupe_key(key, i), orjson.dumps(
            {"messageId": f"{key}-{i}", "r": rng.randbytes(noise).hex()}))

    try:
        n = 0
        while spool.used_bytes < 550_000:
            await spool.append([event("q", n + k, 1000) for k in range(10)])
            n += 10
        await spool.append([event("bad", i, 400) for i in range(300)])
        rows = await spool.fetch(spool.streams["bad"].id, 0, 500)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        assert spool.dead_count == 300
        with pytest.raises(SpoolFull):   # ~600 KB: more than the dead letters could free
            await spool.append([event("big", k, 2000) for k in range(400)])
        assert spool.dead_count == 300 and not spool.counters.get("dead_dropped_full")
        # ~300 KB: more than was free, less than the dead letters could free.
        await spool.append([event("more", k, 2000) for k in range(150)])
        assert spool.streams["more"].depth == 150
        assert 0 < spool.counters["dead_dropped_full"] < 300
    finally:
        await spool.close()


async def test_a_refused_append_forgets_no_dedupe_key(tmp_path: Path) -> None:
    """when_full = "reject": the stored dedupe keys of delivered events are forgotten to make
    room for an append only when that makes the room. An append refused anyway must keep
    them, or a restart within the window takes a resend of a delivered event for a new one
    (audit: it forgot them all, then was refused)."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), max_size_mb=1, when_full="reject",
                        sync="normal")
    spool = await Spool.open(cfg)
    rng = random.Random(6)

    def event(key: str, i: int, noise: int) -> Event:
        return Event(key, SEGMENT, dedupe_key(key, i), orjson.dumps(
            {"messageId": f"{key}-{i}", "r": rng.randbytes(noise).hex()}))

    try:
        await spool.append([event("done", i, 8) for i in range(5000)])
        rows = await spool.fetch(spool.streams["done"].id, 0, 5000)
        await spool.ack([r.seq for r in rows])
        assert spool.streams["done"].depth == 0
        n = 0
        while spool.used_bytes < 700_000:
            await spool.append([event("q", n + k, 1000) for k in range(10)])
            n += 10
        with pytest.raises(SpoolFull):   # ~800 KB: far more than the spent keys could free
            await spool.append([event("big", k, 2000) for k in range(400)])
        assert not spool.counters.get("dedupe_forgotten")
    finally:
        await spool.close()
    spool = await Spool.open(cfg)
    try:
        assert await spool.append([event("done", 17, 8)]) == 0   # a resend, kept out
        assert spool.streams["done"].depth == 0
        # Appends the forgotten keys make room for may forget them (documented).
        while not spool.counters.get("dedupe_forgotten"):
            await spool.append([event("q", n + k, 1000) for k in range(10)])
            n += 10
        assert spool.counters["dedupe_forgotten"] == 5000
    finally:
        await spool.close()
