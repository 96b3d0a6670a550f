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

import asyncio
import contextlib
import os
import random
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import orjson
import pytest

from agent.families.errors import Invalid
from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key, now_ms
from agent.families.lanes import HIGH
from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live
from agent.spool import commit as spool_commit
from agent.spool.commit import MEASURE_WITHIN
from agent.spool.db import keys_from_bytes
from agent.spool.dedupe import keys_to_bytes
from agent.spool.types import Reason, Row, SpoolFull
from tests.waiting import LoopTurns

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
    spool = await Spool.open(one_mb(path))
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
    spool = await Spool.open(one_mb(tmp_path / "spool.db"))
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
    cfg = one_mb(tmp_path / "spool.db")
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
        # Its key, with nothing queued, was forgotten at the start; its dedupe keys stay.
        assert "done" not in spool.streams
        # Appends the forgotten keys make room for may forget them (documented).
        while not spool.counters.get("dedupe_forgotten"):
            await spool.append([event("q", n + k, 1000) for k in range(10)])
            n += 10
        # Whole rows (of 1,000 keys), as many as the room needs, not all five.
        assert spool.counters["dedupe_forgotten"] in range(1000, 5000, 1000)
    finally:
        await spool.close()


def one_mb(path: Path, when_full: str = "reject") -> StorageConfig:
    """A spool capped at 1 MB (sync "normal": these tests wait for no fsync)."""
    return StorageConfig(path=str(path), max_size_mb=1, when_full=when_full, sync="normal")


def too_big() -> list[Event]:
    """One request bigger than max_size_mb: 300 events of 8 KB, half of it after packing."""
    return [incompressible("big", i, 8000) for i in range(300)]


def never_fits(reply: object) -> bool:
    """Refused as larger than the whole spool: "too large" (413), not "retry later"."""
    return isinstance(reply, Invalid) and reply.too_large and "max_size_mb" in reply.message


def incompressible(key: str, n: int, size: int) -> Event:
    """An event of ``size`` random hex characters: zstd packs it to about half."""
    return Event(key, SEGMENT, dedupe_key(key, n),
                 orjson.dumps({"messageId": f"{key}-{n}", "pad": os.urandom(size // 2).hex()}))


def used(path: Path) -> int:
    """The file's pages in use, as the agent counts them (closed at once: the agent's own
    close must be the last, or it leaves the WAL unmerged)."""
    with closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT (page_count - freelist_count) * page_size FROM "
                              "pragma_page_count(), pragma_freelist_count(), "
                              "pragma_page_size()").fetchone()[0])


async def test_drop_oldest_refuses_a_request_that_cannot_fit_and_stores_the_rest(
        tmp_path: Path) -> None:
    """when_full = "drop_oldest", one group commit of three ~400 KB requests under a 1 MiB
    cap: once every older record is gone there is still no room for all three. The one
    that does not fit is refused (503, as in reject mode), whole; the others are stored
    (audit: all three were stored, 1,286,144 bytes used)."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        await spool.append([incompressible("old", i, 1000) for i in range(100)])
        requests = [[incompressible(f"k{r}", i, 8000) for i in range(100)] for r in range(3)]
        replies = await asyncio.gather(*(spool.append(r) for r in requests),
                                       return_exceptions=True)
        refused = [r for r in replies if isinstance(r, SpoolFull)]
        assert len(refused) == 1 and sorted(r for r in replies if isinstance(r, int)) == [100, 100]
        assert refused[0].reason == Reason.FULL
        # The refused request's key was new: it keeps no queue.
        assert sorted(s.depth for k, s in spool.streams.items() if k != "old") == [100, 100]
        assert spool.counters["rejected_full"] == 100
        assert used(path) <= MB
    finally:
        await spool.close()
    assert os.path.getsize(path) <= MB, os.path.getsize(path)


async def test_drop_oldest_stays_within_the_cap_under_mixed_traffic(tmp_path: Path) -> None:
    """when_full = "drop_oldest", bursts of concurrent requests of mixed sizes and keys,
    some acked between bursts: each commit drops what it must of the oldest, and the file
    never passes the cap (audit: space freed was counted from a per-row estimate, never
    measured, and deleting rows from partly used pages frees less: 1,187,840 bytes used, and
    the file itself 1,183,744)."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    rng = random.Random(14)
    n = 0
    try:
        for burst in range(15):
            requests = []
            for _ in range(rng.randint(1, 40)):
                key, m = f"k{rng.randint(0, 5)}", rng.choice([1, 1, 1, 5, 50])
                size = rng.choice([30, 300, 3000, 9000])
                requests.append([incompressible(key, n + j, size) for j in range(m)])
                n += m
            await asyncio.gather(*(spool.append(r) for r in requests),
                                 return_exceptions=True)
            if rng.random() < 0.3:
                for stream in list(spool.streams.values()):
                    rows = await spool.fetch(stream.id, 0, rng.randint(1, 80))
                    await spool.ack([r.seq for r in rows[: len(rows) // 2 + 1]])
            assert used(path) <= MB, (burst, used(path))
        assert spool.counters["dropped_full"] > 0
    finally:
        await spool.close()
    assert os.path.getsize(path) <= MB, os.path.getsize(path)


async def test_drop_oldest_making_room_among_lone_events_holds_the_loop_no_longer(
        tmp_path: Path) -> None:
    """A spool at the cap holds lone events (an app that posts one at a time: a record
    each), and a large request comes: drop_oldest deletes thousands of records in one
    commit. Each had its dedupe keys forgotten on its own, a pass over the index's bucket
    in Python each time: 5,000 records held the event loop 6 s (4 MiB of them, with the
    default cap, well past the service's 30 s watchdog), every app and /healthz waiting."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_size_mb=2,
                                           when_full="drop_oldest", sync="normal"))
    try:
        await spool.append([Event(f"lone-{i}", NUCLEUS, i, b'{"id":%d}' % i)
                            for i in range(14_000)])
        assert len(spool.live) == 14_000
        async with LoopTurns(every=0) as turns:   # looks every turn
            await spool.append([incompressible("big", i, 800) for i in range(1500)])
        assert spool.counters["dropped_full"] >= 4000
        assert turns.worst < 1.0, f"one turn of the event loop ran {turns.worst:.2f}s"
    finally:
        await spool.close()


async def test_drop_oldest_refuses_a_request_bigger_than_the_cap_and_drops_nothing(
        tmp_path: Path) -> None:
    """A single request bigger than max_size_mb cannot fit even with every older record
    gone: refused whole, and the queue it would have pushed out stays."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        await spool.append([incompressible("old", i, 1000) for i in range(100)])
        with pytest.raises(Invalid, match="max_size_mb = 1 holds"):
            await spool.append(too_big())
        assert spool.streams["old"].depth == 100 and not spool.counters.get("dropped_full")
        assert "big" not in spool.streams or spool.streams["big"].depth == 0
        assert used(path) <= MB
    finally:
        await spool.close()


async def test_reject_refuses_only_the_request_that_does_not_fit(tmp_path: Path) -> None:
    """when_full = "reject": a request too big for max_size_mb shares a group commit with
    small ones, on an empty spool. Only it is refused; the small ones are stored (audit:
    every request of the commit got 503)."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path))
    try:
        big = too_big()
        small = [[incompressible("small", j, 40)] for j in range(5)]
        replies = await asyncio.gather(spool.append(big), *(spool.append(s) for s in small),
                                       return_exceptions=True)
        assert never_fits(replies[0]) and replies[1:] == [1] * 5, replies
        assert spool.streams["small"].depth == 5
        assert spool.counters["rejected_full"] == 300
        assert used(path) <= MB
    finally:
        await spool.close()


@pytest.mark.parametrize("when_full", ["reject", "drop_oldest"])
async def test_a_request_that_shares_an_event_with_a_refused_one_is_not_answered_stored(
        tmp_path: Path, when_full: str) -> None:
    """Two requests in one group commit carry the same event (an SDK's retry beside its
    first try): the second is a resend of the first. When the first does not fit and is
    refused, the second must not be answered as stored (a resend of an event that is
    not stored): it is stored, or refused too, never acknowledged and lost."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path, when_full))
    try:
        shared = incompressible("app", 0, 40)
        big = [shared, *(incompressible("app", i, 8000) for i in range(1, 300))]
        replies = await asyncio.gather(spool.append(big), spool.append([shared]),
                                       return_exceptions=True)
        assert never_fits(replies[0]), replies
        if not isinstance(replies[1], SpoolFull):   # answered stored: it must be there
            assert spool.streams["app"].depth == 1, replies
            rows = await spool.fetch(spool.streams["app"].id, 0, 10)
            assert [r.body for r in rows] == [shared.body]
    finally:
        await spool.close()


async def test_a_request_repeating_its_own_event_is_not_refused_with_another(
        tmp_path: Path) -> None:
    """A request that repeats one of its own events (an SDK's batch holding a retry of its
    own message) leans on no other request: when another request of the same commit is
    refused, it is stored, not refused with it."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path))
    try:
        big = too_big()
        twice = incompressible("app", 0, 40)
        replies = await asyncio.gather(spool.append(big), spool.append([twice, twice]),
                                       spool.append([incompressible("app", 1, 40)]),
                                       return_exceptions=True)
        assert never_fits(replies[0]) and replies[1:] == [1, 1], replies
        assert spool.streams["app"].depth == 2
    finally:
        await spool.close()


async def test_a_resend_of_a_stored_event_is_not_refused_with_another_request(
        tmp_path: Path) -> None:
    """Three requests share a group commit: an app's event, its SDK's retry of that event,
    and another app's request too big for max_size_mb. Only the big one is refused: the
    first is stored, so the retry is a resend of a stored event (answered as stored, and
    counted a duplicate), not refused with 503 and counted ``rejected_full`` for an event
    the spool holds and will deliver."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path))
    try:
        big = too_big()
        event = incompressible("app", 0, 40)
        replies = await asyncio.gather(spool.append(big), spool.append([event]),
                                       spool.append([event]), return_exceptions=True)
        assert never_fits(replies[0]), replies
        assert spool.streams["app"].depth == 1
        assert replies[1:] == [1, 0], replies
        assert spool.counters["rejected_full"] == 300
        assert spool.counters["duplicates"] == 1
    finally:
        await spool.close()


@pytest.mark.parametrize("size,counts", [(8000, range(232, 240)), (1000, range(1840, 1880, 5))])
async def test_a_request_an_empty_spool_cannot_hold_is_too_large_not_retry_later(
        tmp_path: Path, size: int, counts: range) -> None:
    """Requests of sizes around what an empty 1 MB spool holds: each is stored, or refused
    as too large (413). "Retry later" (503) to a request that did not fit in an empty
    spool is a lie its app retries forever: one within ~1.3% under the most the spool
    holds got it, the spool's real cost of the request (interior pages, its queue's row)
    being more than the estimate judged it by."""
    for n in counts:
        spool = await Spool.open(one_mb(tmp_path / f"{size}-{n}.db"))
        try:
            reply: object = await spool.append([incompressible("big", i, size)
                                                for i in range(n)])
        except (SpoolFull, Invalid) as exc:
            reply = exc
        finally:
            await spool.close()
        assert reply == n or never_fits(reply), (n, reply)

async def test_a_resend_of_an_event_stored_before_is_not_refused_at_a_full_spool(
        tmp_path: Path) -> None:
    """A spool over its cap (max_size_mb lowered, when_full = "reject"): an app's resend of
    an event stored earlier shares a group commit with another app's new event, which does
    not fit. The resend needs no room: it is answered as stored (a duplicate), not refused
    with 503 beside the new event and counted ``rejected_full`` for an event the spool
    holds."""
    path = tmp_path / "spool.db"
    event = incompressible("app", 0, 40)
    spool = await Spool.open(StorageConfig(path=str(path), max_size_mb=2, sync="normal"))
    try:
        assert await spool.append([event]) == 1
        await spool.append([incompressible("filler", n, 8000) for n in range(350)])
    finally:
        await spool.close()
    assert used(path) > MB
    spool = await Spool.open(one_mb(path))
    try:
        replies = await asyncio.gather(spool.append([incompressible("other", 0, 40)]),
                                       spool.append([event]), return_exceptions=True)
        assert isinstance(replies[0], SpoolFull), replies
        assert replies[1] == 0, replies
        assert spool.counters.get("rejected_full", 0) == 1
        assert spool.counters["duplicates"] == 1
    finally:
        await spool.close()


@pytest.mark.parametrize("when_full", ["reject", "drop_oldest"])
async def test_the_write_ahead_log_stays_a_small_part_of_the_cap_under_sustained_load(
        tmp_path: Path, when_full: str) -> None:
    """Apps post and the upstream acks, for a while, under a 1 MB cap it keeps reaching
    (the acks free less than is posted): the spool's -wal beside the file is disk the cap
    is meant to bound too, most of all when the spool is full (docs/operations.md: the log
    is checkpointed at an eighth of max_size_mb, and passes that by a commit at most).
    SQLite's own checkpoint waits for 1000 pages: the -wal reached 4.2 MB, the spool
    4.9 MB on disk for a 1 MB cap."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path, when_full))
    rng = random.Random(3)
    wal, most, n = Path(f"{path}-wal"), 0, 0
    try:
        # 500 requests, a fetch and ack after one in ten: the spool is full from the 323rd
        # on, ~940 events refused (or as many of the oldest dropped). The -wal's largest:
        # 230 KB, 210 KB while full; SQLite's own 1000-page checkpoint had it at 4.2 MB.
        for _ in range(500):
            request = [incompressible("k", n + j, rng.choice([100, 1000, 2000]))
                       for j in range(rng.choice([1, 5, 20]))]
            n += len(request)
            with contextlib.suppress(SpoolFull):
                await spool.append(request)
            if rng.random() < 0.1:
                rows = await spool.fetch(spool.streams["k"].id, 0, rng.randint(1, 100))
                await spool.ack([r.seq for r in rows])
            most = max(most, wal.stat().st_size if wal.exists() else 0)
        assert spool.counters["acked"] > 1000
        full = "rejected_full" if when_full == "reject" else "dropped_full"
        assert spool.counters.get(full, 0) > 100, spool.counters   # the cap was reached
    finally:
        await spool.close()
    assert most <= MB * 3 // 8, most


async def test_drop_oldest_over_a_lowered_cap_trims_the_excess_in_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_size_mb lowered under what the spool holds (when_full = "drop_oldest"): the
    first request's commit deleted the whole excess in one transaction (~1 s for 100,000
    lone events), every app's request waiting for it. A commit frees what its own events
    need (the file does not grow), and expiry's runs take the excess in chunks, the oldest
    first, apps' requests answered in between."""
    # Many chunks of a small backlog (raising=False: the failing run had none).
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 64, raising=False)
    path = tmp_path / "spool.db"
    n = 3000
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        await spool.append([incompressible(f"lone-{i}", i, 1000) for i in range(n)])
        assert len(spool.live) == n                   # a record each
    finally:
        await spool.close()
    before = used(path)
    assert before > 2 * MB
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        await spool.append([incompressible("app", 0, 40)])
        first = spool.counters.get("dropped_full", 0)
        assert 0 < first < 100, first                 # its own room, not the whole excess
        assert spool.used_bytes <= before
        trim = asyncio.create_task(spool.prune())     # takes the writer's lock first
        await spool.append([incompressible("app", 1, 40)])
        between = spool.counters["dropped_full"]
        await trim
        dropped = spool.counters["dropped_full"]
        assert between < dropped, "the request waited for the whole trim"
        assert spool.used_bytes <= MB
        assert dropped + spool.depth == n + 2         # every event counted
        kept = [i for i in range(n) if (s := spool.streams.get(f"lone-{i}")) and s.depth]
        assert kept == list(range(n - len(kept), n))  # the oldest went: FIFO
        assert spool.streams["app"].depth == 2
    finally:
        await spool.close()


async def spool_of_dead_letters(path: Path, n: int, *then: list[Event]) -> list[Row]:
    """A spool at ``path``, closed again, holding ``n`` dead letters of key "dead" (1,000
    incompressible bytes each), then each request of ``then`` queued; the letters' rows."""
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        await spool.append([incompressible("dead", i, 1000) for i in range(n)])
        rows = await spool.fetch(spool.streams["dead"].id, 0, n)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        for events in then:
            await spool.append(events)
    finally:
        await spool.close()
    return rows


async def test_a_dead_letter_over_a_lowered_cap_makes_room_for_itself_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with dead letters: over a lowered max_size_mb ("drop_oldest"), the commit
    that dead-letters one event deleted every older dead letter the excess took, in one
    transaction, apps waiting. It makes room for its own; expiry's runs take the rest in
    chunks."""
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 64, raising=False)
    path = tmp_path / "spool.db"
    n = 3000
    rows = await spool_of_dead_letters(path, n, [incompressible("late", 0, 1000)])
    assert used(path) > 2 * MB
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        [row] = await spool.fetch(spool.streams["late"].id, 0, 1)
        await spool.dead_letter([(row.seq, "up", "HTTP 400")])
        first = spool.counters.get("dead_dropped_full", 0)
        assert first < 100, first                     # its own room, not the whole excess
        await spool.prune()
        assert spool.used_bytes <= MB
        assert spool.dead_count + spool.counters["dead_dropped_full"] == n + 1
        letters = await spool.dead_letters(limit=n + 1)   # the newest first
        assert letters[0]["key"] == "late" and letters[-1]["seq"] > rows[0].seq  # oldest went
    finally:
        await spool.close()


async def test_over_a_lowered_cap_a_request_bigger_than_the_cap_is_refused_and_drops_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a lowered max_size_mb a commit keeps the file within its size rather than the
    cap (the excess goes in chunks): a request bigger than the cap must still be refused,
    not take the room of older events that the trim would then take it out of."""
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 64)   # the excess: many chunks
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        await spool.append([incompressible(f"old-{i}", i, 8000) for i in range(600)])
    finally:
        await spool.close()
    assert used(path) > 2 * MB
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        with pytest.raises(Invalid, match="max_size_mb = 1 holds"):
            await spool.append(too_big())
        assert spool.depth == 600 and not spool.counters.get("dropped_full")
    finally:
        await spool.close()


# Dead letters a tenth, and nearly half, of the excess: either way short of it.
@pytest.mark.parametrize("dead", [100, 1500])
async def test_reject_over_a_lowered_cap_a_dead_letter_keeps_the_others(
        tmp_path: Path, dead: int) -> None:
    """when_full = "reject" (the default), max_size_mb lowered under a spool its queue
    fills: the commit that dead-letters one event deleted every dead letter, its own too,
    trying to bring the file within a cap that only the queue's delivery can. The file
    must not grow (it makes room for its own dead letter), and the others are kept."""
    path = tmp_path / "spool.db"
    await spool_of_dead_letters(path, dead, [incompressible(f"q-{i}", i, 1000)
                                             for i in range(3000)],
                                [incompressible("late", 0, 1000)])
    before = used(path)
    assert before > 2 * MB
    spool = await Spool.open(one_mb(path))
    try:
        [row] = await spool.fetch(spool.streams["late"].id, 0, 1)
        await spool.dead_letter([(row.seq, "up", "HTTP 400")])
        assert spool.counters.get("dead_dropped_full", 0) < 10   # its own room at most
        assert spool.used_bytes <= before                         # the file did not grow
        letters = await spool.dead_letters(limit=1)
        assert letters and letters[0]["key"] == "late"            # its own is kept
        assert spool.dead_count + spool.counters.get("dead_dropped_full", 0) == dead + 1
        kept = spool.dead_count
        await spool.prune()   # nor does expiry delete them for that cap
        assert spool.dead_count == kept and spool.depth == 3000
    finally:
        await spool.close()


async def test_reject_over_a_lowered_cap_trims_dead_letters_in_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """when_full = "reject", max_size_mb lowered under a spool of dead letters: the first
    app's request deleted every dead letter the excess took in one transaction (0.7 s for
    50,000, all apps waiting), as drop_oldest did before its chunks. It takes the room its
    own events need (the file does not grow); expiry's runs take the rest in chunks, the
    oldest first."""
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 64)
    path = tmp_path / "spool.db"
    n = 3000
    rows = await spool_of_dead_letters(path, n)
    before = used(path)
    assert before > 2 * MB
    spool = await Spool.open(one_mb(path))
    try:
        await spool.append([incompressible("app", 0, 40)])
        first = spool.counters.get("dead_dropped_full", 0)
        assert first < 200, first                     # its own room, not the whole excess
        assert spool.used_bytes <= before and spool.streams["app"].depth == 1
        await spool.prune()
        assert spool.used_bytes <= MB
        assert spool.dead_count + spool.counters["dead_dropped_full"] == n
        letters = await spool.dead_letters(limit=n)   # the newest first
        assert letters[0]["seq"] == rows[-1].seq and letters[-1]["seq"] > rows[0].seq
    finally:
        await spool.close()


class Steps:
    """A progress handler counting its calls (SQLite's steps on a connection, or every
    Nth): deterministic where a timing is not."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return 0   # go on


async def test_drop_oldest_behind_high_lane_records_reads_no_more_than_it_drops(
        tmp_path: Path) -> None:
    """when_full = "drop_oldest", a spool at the cap holding high-lane records (an app's
    errors while its upstream is down, a record each), then an app's normal events.
    Looking for the oldest normal-lane record to drop first read every record ahead of
    it (no index leads by lane): ~90 ms per request at 100,000 records, every app
    waiting. Counted in SQLite's own steps on the writer's connection: a commit that
    drops one record takes fewer steps than the spool holds records (~900 all told),
    not a read of them all (~3 steps each). The spool is one an agent wrote before the
    index (dropped here as it was never made)."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        n = 0
        while not spool.counters.get("dropped_full") and n < 40_000:
            await spool.append([Event(f"lone-{i}", NUCLEUS, dedupe_key("k", i),
                                      b'{"type":"error","id":%d}' % i, lane=HIGH)
                                for i in range(n, n + 4000)])
            n += 4000
    finally:
        await spool.close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP INDEX IF EXISTS records_by_lane")
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    steps = Steps()

    try:
        held, before = len(spool.live), spool.counters["dropped_full"]
        assert held > 5000, held
        assert spool.db is not None
        await spool.db.run(sqlite3.Connection.set_progress_handler, steps, 1)
        for i in range(100):   # the file's free pages first, then the app's oldest goes
            steps.n = 0
            await spool.append([incompressible("app", i, 4000)])
            if spool.counters["dropped_full"] > before:
                break
        await spool.db.run(sqlite3.Connection.set_progress_handler, None, 1)
        assert spool.counters["dropped_full"] == before + 1
        assert steps.n < held, f"{steps.n} SQLite steps to drop one of {held} records"
    finally:
        await spool.close()


async def test_reject_at_a_cap_full_of_dead_letters_costs_what_it_deletes(
        tmp_path: Path) -> None:
    """when_full = "reject" (the default), a spool at the cap full of small dead letters
    (an upstream that refuses every event): each request that needs room first summed
    every dead letter's size, to know whether deleting them could make it (~160 ms a
    request at a million letters, every app waiting). Counted in SQLite's steps on the
    writer's connection: a commit that deletes letters for its room costs what it deletes
    (~260 steps a letter: its delete, its summary's trigger, the file measured again),
    not a read of every letter it keeps."""
    spool = await Spool.open(one_mb(tmp_path / "spool.db"))
    steps = Steps()

    try:
        n = 0
        while not spool.counters.get("dead_dropped_full") and n < 40_000:
            await spool.append([Event("bad", NUCLEUS, dedupe_key("bad", i), b'{"id":%d}' % i)
                                for i in range(n, n + 2000)])
            rows = await spool.fetch(spool.streams["bad"].id, 0, 2000)
            await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
            n += 2000
        held, before = spool.dead_count, spool.counters["dead_dropped_full"]
        assert held > 5000, held
        assert spool.db is not None
        await spool.db.run(sqlite3.Connection.set_progress_handler, steps, 1)
        for i in range(100):   # the room dead-lettering left first, then letters go
            steps.n = 0
            await spool.append([incompressible("app", i, 4000)])
            if spool.counters["dead_dropped_full"] > before:
                break
        await spool.db.run(sqlite3.Connection.set_progress_handler, None, 1)
        deleted = spool.counters["dead_dropped_full"] - before
        assert 0 < deleted < 200 and spool.streams["app"].depth == i + 1
        assert steps.n < 500 * deleted, \
            f"{steps.n} SQLite steps to delete {deleted} of {held} letters"
    finally:
        await spool.close()


async def test_reject_over_a_lowered_cap_trims_dead_letters_at_a_cost_per_chunk_not_per_excess(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """when_full = "reject", max_size_mb lowered under a spool of small dead letters: each
    chunk of expiry's trim summed the dead letters again, to know whether they could bring
    the file within the cap: a run's cost grew with the square of the excess (a million
    letters: a thousand chunks reading up to all of them). Counted in SQLite's steps on
    the writer's connection, in hundreds: what the letters' deletes cost (~200 steps
    each), not that and a read of the rest at each chunk."""
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 64)
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        await spool.append([Event("bad", NUCLEUS, dedupe_key("bad", i), b'{"id":%d}' % i)
                            for i in range(20_000)])
        rows = await spool.fetch(spool.streams["bad"].id, 0, 20_000)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
    finally:
        await spool.close()
    assert used(path) > 1.3 * MB
    spool = await Spool.open(one_mb(path))
    hundreds = Steps()

    try:
        assert spool.db is not None
        await spool.db.run(sqlite3.Connection.set_progress_handler, hundreds, 100)
        await spool.prune()
        await spool.db.run(sqlite3.Connection.set_progress_handler, None, 100)
        deleted = spool.counters["dead_dropped_full"]
        assert spool.used_bytes <= MB and deleted > 3000
        assert hundreds.n < 4 * deleted, \
            f"{hundreds.n}00 SQLite steps to delete {deleted} letters"
    finally:
        await spool.close()


async def test_over_a_lowered_cap_a_request_too_big_beside_events_in_flight_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a lowered max_size_mb ("drop_oldest"), a request smaller than the cap but too
    big beside the records whose events are in flight (which nothing drops) was accepted,
    the file held at its size, and the next trim then dropped it, the newest events, while
    they were being acknowledged: at the cap the same request is refused (503)."""
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 64)   # the excess: many chunks
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        await spool.append([incompressible("sent", i, 8000) for i in range(180)])
        await spool.append([incompressible(f"old-{i}", i, 8000) for i in range(600)])
    finally:
        await spool.close()
    spool = await Spool.open(one_mb(path, "drop_oldest"))
    try:
        sent = spool.streams["sent"]
        spool.leases.hold(sent.id, [0, 10**12])       # its events are in flight
        try:
            stored = await spool.append([incompressible("new", i, 8000) for i in range(80)])
        except SpoolFull:
            stored = 0
        for _ in range(50):                            # expiry's runs trim the excess
            await spool.prune()
            if spool.used_bytes <= MB or not any(
                    s.depth for k, s in spool.streams.items() if k.startswith("old-")):
                break
        depth = s.depth if (s := spool.streams.get("new")) else 0
        assert depth == stored, f"{stored} events accepted, {depth} kept"
        assert sent.depth == 180
    finally:
        await spool.close()


async def test_at_the_cap_only_the_dedupe_keys_a_request_needs_are_forgotten(
        tmp_path: Path) -> None:
    """A spool at the cap holding mostly the stored dedupe keys of delivered events (batches
    of 100 delivered within the window), and a request of ~20 KB: the commit forgot 1,024
    rows of keys at a time whatever it needed (~100,000 keys, the whole file, for a few
    pages), and after a restart a resend of any of them within the window was delivered
    again. It forgets the oldest rows it needs, about its own size."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(one_mb(path))
    await spool.close()
    rows, per = 1200, 100
    with closing(sqlite3.connect(path)) as db, db:   # delivered just now (both clocks)
        now = now_ms()
        db.executemany("INSERT INTO spent(id, received, observed, dkeys) VALUES (?, ?, 0, ?)",
                       [(1 + r * per, now, keys_to_bytes([dedupe_key("done", r * per + i)
                                                          for i in range(per)]))
                        for r in range(rows)])
    spool = await Spool.open(one_mb(path))
    try:
        assert spool.used_bytes > MB - 100_000, spool.used_bytes
        assert await spool.append([incompressible("q", i, 4000) for i in range(10)]) == 10
        forgotten = spool.counters.get("dedupe_forgotten", 0)
        assert 0 < forgotten <= 100 * per, f"{forgotten} keys forgotten for ~20 KB"
    finally:
        await spool.close()
    spool = await Spool.open(one_mb(path))
    try:   # a restart: the file's keys alone say what was delivered
        middle = rows // 2 * per
        assert await spool.append([Event("done", SEGMENT, dedupe_key("done", middle),
                                         b'{"messageId":"m"}')]) == 0, "delivered again"
    finally:
        await spool.close()


async def test_a_dedupe_key_forgotten_by_the_file_and_by_memory_is_counted_once(
        tmp_path: Path) -> None:
    """At the cap the file forgets the oldest delivered events' keys (the running agent
    still knows them), and past dedupe_max_keys memory forgets its oldest: often the
    same keys. dedupe_forgotten counts keys, each once, whichever forgot it first (review:
    each was counted by both, an 8M-event run showed 14.9M keys forgotten)."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_size_mb=1, when_full="reject",
                                           sync="normal", dedupe_max_keys=4000))
    stored: set[int] = set()

    async def append(events: list[Event]) -> None:
        assert await spool.append(events) == len(events)
        stored.update(e.dedupe for e in events)

    try:
        n = 0
        while spool.used_bytes < MB - 60_000:   # a queue that fills the file but ~60 KB
            await append([incompressible("q", n + k, 2000) for k in range(10)])
            n += 10
        for b in range(60):   # delivered at once: ~80 KB of their keys at 12,000
            await append([Event("done", SEGMENT, dedupe_key("done", b, i), b'{"t":1}')
                          for i in range(200)])
            rows = await spool.fetch(spool.streams["done"].id, 0, 500)
            await spool.ack([r.seq for r in rows])
        with closing(sqlite3.connect(path)) as db:
            in_file: set[int] = set()
            for (blob,) in db.execute("SELECT dkeys FROM spent UNION ALL "
                                      "SELECT dkeys FROM records"):
                in_file.update(keys_from_bytes(blob))
        forgotten = stored - (in_file & set(spool.index.keys))
        assert len(in_file) < len(stored) and len(spool.index) < len(stored)  # both forgot
        assert spool.counters.get("dedupe_forgotten", 0) == len(forgotten)
    finally:
        await spool.close()


async def test_a_retried_dead_letter_s_key_forgotten_by_the_file_is_counted_once(
        tmp_path: Path) -> None:
    """A dead letter retried (`outpost dead retry`) and delivered, its stored key forgotten
    at max_size_mb and then by dedupe_max_keys: one key forgotten, counted once in
    dedupe_forgotten. Its key stays in the index where it first came, but the file's
    forgetting was charged to the bucket of the retried record's id, a newer one: the
    cap counted it again when it let go of the old bucket."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), max_size_mb=1, sync="normal",
                        when_full="drop_oldest", dedupe_max_keys=320)   # buckets of 20 keys
    spool = await Spool.open(cfg)
    try:
        await spool.append([incompressible("a", 0, 8)])
        (row,) = await spool.fetch(spool.streams["a"].id, 0, 10)
        await spool.dead_letter([(row.seq, "up", "HTTP 400: no")])
        await spool.append([incompressible("b", i, 8) for i in range(19)])  # the bucket full
        await spool.ack([r.seq for r in await spool.fetch(spool.streams["b"].id, 0, 100)])
        assert await dead_live.retry(spool, dead.Which(every=True)) == 1
        (row,) = await spool.fetch(spool.streams["a"].id, 0, 10)
        await spool.ack([row.seq])
        admitted, n = 20, 0
        # The file forgets the 20 keys first, then the oldest 20 queued events go, with
        # their keys (undelivered, not counted), the next bucket's.
        while spool.counters.get("dropped_full", 0) < 20:
            await spool.append([incompressible("q", n, 40_000)])
            admitted, n = admitted + 1, n + 1
        assert spool.counters["dedupe_forgotten"] == 20
        # Delivered: room again, so that no event the cap forgot the key of is dropped.
        await spool.ack([r.seq for r in await spool.fetch(spool.streams["q"].id, 0, 1000)])
        for k in range(40):   # the cap lets go of every key older than these
            await spool.append([incompressible("s", 20 * k + i, 8) for i in range(20)])
        admitted += 800
        held = len(spool.index)
        assert spool.index.keys.isdisjoint(dedupe_key(key, i) for key, top in (
            ("a", 1), ("b", 19), ("q", n)) for i in range(top))
        # Every key not held nor dropped undelivered was forgotten early, each once.
        assert spool.counters["dedupe_forgotten"] == (
            admitted - spool.counters.get("dropped_full", 0) - held)
    finally:
        await spool.close()


async def test_keys_the_cap_forgets_for_a_dead_letter_retry_are_counted(
        tmp_path: Path) -> None:
    """A dead letter whose key the cap let go long ago, retried: its key goes back into
    the index, which lets go of the oldest key to make room. That key was forgotten
    early, as any the cap lets go for a request's: dedupe_forgotten did not count it."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), sync="normal",
                        dedupe_max_keys=16)   # buckets of 1 key
    spool = await Spool.open(cfg)
    try:
        await spool.append([incompressible("a", 0, 8)])
        (row,) = await spool.fetch(spool.streams["a"].id, 0, 10)
        await spool.dead_letter([(row.seq, "up", "HTTP 400: no")])
        for i in range(16):   # the cap lets a0's key go
            await spool.append([incompressible("b", i, 8)])
        assert spool.counters["dedupe_forgotten"] == 1 and len(spool.index) == 16
        assert await dead_live.retry(spool, dead.Which(every=True)) == 1
        assert dedupe_key("a", 0) in spool.index and dedupe_key("b", 0) not in spool.index
        assert spool.counters["dedupe_forgotten"] == 2
    finally:
        await spool.close()


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_a_dead_letter_retried_beside_queued_events_has_its_key_counted_once(
        tmp_path: Path, restart: bool) -> None:
    """A dead letter retried while its old record still holds queued events: the old
    record keeps its key (a record's keys are in its events' order) and the new one
    stores it too. Delivered, its key is let go by the file at max_size_mb, under
    drop_oldest, once for each place the file stores it: dedupe_forgotten must count
    the one key once."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), max_size_mb=1, sync="normal",
                        when_full="drop_oldest")
    spool = await Spool.open(cfg)
    try:
        await spool.append([incompressible("a", i, 8) for i in range(2)])   # one record
        first, _ = await spool.fetch(spool.streams["a"].id, 0, 10)
        await spool.dead_letter([(first.seq, "up", "HTTP 400: no")])
        assert await dead_live.retry(spool, dead.Which(every=True)) == 1
        (retried,) = await spool.fetch(spool.streams["a"].id, first.seq + 1, 10)
        await spool.ack([retried.seq])   # a0 delivered; a1 still queued in the old record
        if restart:   # the keys loaded from the file
            await spool.close()
            spool = await Spool.open(cfg)
        n = 0
        while spool.counters.get("dropped_full", 0) < 1:   # the old record goes, with a1
            await spool.append([incompressible("q", n, 40_000)])
            n += 1
        # a1 dropped undelivered (and a q or two with it): their keys let go, not counted.
        # a0's key, once.
        assert spool.counters.get("dedupe_forgotten", 0) == 1, spool.counters
    finally:
        await spool.close()


async def test_a_lowered_dedupe_max_keys_counts_no_moved_key_placeholder_as_forgotten(
        tmp_path: Path) -> None:
    """Dead letters retried while their old record still holds queued events: their keys
    move to the new record, and their places in the old one hold a placeholder
    (MOVED_KEY). A start under a lowered dedupe_max_keys counted every place of the old
    record it leaves out as a key forgotten (dedupe_forgotten), placeholders too: only the
    old record's own keys are forgotten."""
    path = str(tmp_path / "spool.db")
    spool = await Spool.open(StorageConfig(path=path, sync="normal"))
    try:
        await spool.append([incompressible("a", i, 8) for i in range(10)])   # one record
        rows = await spool.fetch(spool.streams["a"].id, 0, 10)
        await spool.dead_letter([(r.seq, "up", "HTTP 400: no") for r in rows[:8]])
        assert await dead_live.retry(spool, dead.Which(every=True)) == 8
        await spool.append([incompressible("b", i, 8) for i in range(10)])
    finally:
        await spool.close()
    # The retried record's 8 keys and b's 10 fit; a's two left in the old record do not.
    spool = await Spool.open(StorageConfig(path=path, sync="normal", dedupe_max_keys=18))
    try:
        assert spool.counters.get("dedupe_forgotten", 0) == 2, spool.counters
    finally:
        await spool.close()
