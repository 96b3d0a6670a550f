"""The spool's packed records (v1): partial acks, damaged records, space handed back,
the dedupe index rebuilt at start, and a failed commit that must not dedupe a retry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import CLOCK
from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.outcomes import Drop, Tally
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.migrate import SpoolTooNew
from agent.spool.schema import VERSION
from agent.spool.types import Reason, Row, SpoolFull
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for


def ev(key: str, n: int, size: int = 10, family: int = NUCLEUS) -> Event:
    pad = os.urandom(size // 2 + 1).hex()[:size]
    return Event(key, family, dedupe_key(key, n), orjson.dumps({"id": n, "pad": pad}))


def ids(rows: list[Row]) -> list[int]:
    return [orjson.loads(r.body)["id"] for r in rows]


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


async def test_acks_of_a_record_in_ranges_count_its_bytes_and_events_exactly(
        tmp_path: Path) -> None:
    """A range of a record acked (the drain's usual partial ack: its bitmap and bytes by
    range), then an ack overlapping it (one event at a time), then the rest: the queue's
    bytes are those of the events still in it at each step, across a restart too."""
    spool = await open_spool(tmp_path)
    events = [ev("k", i, size=10 + 7 * i) for i in range(10)]
    size = [len(e.body) for e in events]
    await spool.append(events)
    sid = spool.streams["k"].id
    rows = await spool.fetch(sid, 0, 100)
    await spool.ack([r.seq for r in rows[:4]])
    assert (spool.streams["k"].depth, spool.streams["k"].bytes) == (6, sum(size[4:]))
    await spool.close()
    spool = await open_spool(tmp_path)
    try:
        assert (spool.streams["k"].depth, spool.streams["k"].bytes) == (6, sum(size[4:]))
        await spool.ack([r.seq for r in rows[2:6]])
        assert (spool.streams["k"].depth, spool.streams["k"].bytes) == (4, sum(size[6:]))
        assert ids(await spool.fetch(sid, 0, 100)) == [6, 7, 8, 9]
        await spool.ack([r.seq for r in rows[6:]])
        assert spool.depth == 0 and spool.streams["k"].bytes == 0
        assert spool.counters[Tally.ACKED] == 10
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
        assert spool.counters[Tally.DUPLICATES] == 6
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
        assert spool.counters[Drop.DROPPED_CORRUPT] == 10 and spool.streams["k"].depth == 20
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


# One step: ("append", key index, first id, count, family), ("ack", picks), ("dead", picks),
# or ("restart",). Picks choose among the queued events by position.
_steps = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 2), st.integers(0, 40), st.integers(1, 30),
              st.sampled_from([NUCLEUS, SEGMENT])),
    st.tuples(st.just("ack"), st.lists(st.integers(0, 200), max_size=40)),
    st.tuples(st.just("dead"), st.lists(st.integers(0, 200), max_size=3)),
    st.tuples(st.just("restart"))), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_the_queue_matches_a_model_through_acks_dead_letters_and_restarts(
        tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[Any, ...]]) -> None:
    """Per key: the queue is the events first received and not yet settled, in order;
    a resend is never stored twice; depths, counters and dead letters agree."""
    where = tmp_path_factory.mktemp("model")
    keys = ("a", "b", "c")
    queued: dict[str, list[int]] = {k: [] for k in keys}   # ids, in order
    seen: set[tuple[str, int]] = set()
    acked = dead = 0

    async def run() -> None:
        nonlocal acked, dead
        spool = await open_spool(where)
        try:
            for step in steps:
                if step[0] == "restart":
                    await spool.close()
                    spool = await open_spool(where)
                    continue
                if step[0] == "append":
                    _, k, first, count, family = step
                    key = keys[k]
                    batch = [Event(key, family, dedupe_key(key, i), b'{"id":%d}' % i)
                             for i in range(first, first + count)]
                    new = [i for i in range(first, first + count) if (key, i) not in seen]
                    assert await spool.append(batch) == len(new)
                    seen.update((key, i) for i in new)
                    queued[key] += new
                    continue
                rows = [r for k in keys if k in spool.streams
                        for r in await spool.fetch(spool.streams[k].id, 0, 10_000)]
                picked = {rows[p].seq: rows[p] for p in step[1] if p < len(rows)}
                key_of = {s.id: k for k, s in spool.streams.items()}
                for r in picked.values():
                    queued[key_of[r.stream]].remove(orjson.loads(r.body)["id"])
                if step[0] == "ack":
                    await spool.ack(list(picked))
                    acked += len(picked)
                else:
                    await spool.dead_letter([(s, "up", "bad") for s in picked])
                    dead += len(picked)
            for k in keys:
                stream = spool.streams.get(k)
                got = await spool.fetch(stream.id, 0, 10_000) if stream else []
                assert [orjson.loads(r.body)["id"] for r in got] == queued[k]
                assert (stream.depth if stream else 0) == len(queued[k])
            assert spool.counters.get(Tally.ACKED, 0) == acked
            assert spool.counters.get(Drop.DEAD_LETTERED, 0) == dead == spool.dead_count
            assert len(await spool.dead_letters(1000)) == dead
        finally:
            await spool.close()

    asyncio.run(run())


async def test_past_the_window_delivered_keys_are_forgotten_on_disk_and_in_memory(
        tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, dedupe_window_h=1)
    try:
        await spool.append([ev("k", i) for i in range(5)])
        await spool.ack([r.seq for r in await spool.fetch(spool.streams["k"].id, 0, 10)])
        await spool.prune()                                # within the window: kept
        assert await spool.append([ev("k", 0)]) == 0 and len(spool.index) == 5
        CLOCK.passed_ms = 2 * 3_600_000                    # two hours pass (both clocks)
        await spool.prune()
        assert len(spool.index) == 0
        with sqlite3.connect(tmp_path / "spool.db") as db:
            assert db.execute("SELECT count(*) FROM spent").fetchone()[0] == 0
        assert await spool.append([ev("k", 0)]) == 1       # at-least-once beyond the window
    finally:
        CLOCK.passed_ms = 0
        await spool.close()


async def test_a_spool_from_a_newer_agent_is_refused_and_left_untouched(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("CREATE TABLE future(x)")
        db.execute(f"PRAGMA user_version = {VERSION + 1}")
    before = (tmp_path / "spool.db").read_bytes()
    with pytest.raises(SpoolTooNew, match=f"format v{VERSION + 1}, newer than this agent reads"):
        await open_spool(tmp_path)
    assert (tmp_path / "spool.db").read_bytes() == before
    assert not list(tmp_path.glob("spool.db.corrupt-*"))


async def test_a_key_repeated_within_a_request_or_a_commit_is_stored_once(
        tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        one, two = ev("k", 1), ev("k", 2)
        assert await spool.append([one, two, one, one]) == 2
        # Concurrent requests share one commit: the repeat is caught within it.
        got = await asyncio.gather(*(spool.append([ev("k", 3), ev("k", i)])
                                     for i in range(4, 8)))
        assert sorted(got) == [1, 1, 1, 2] and spool.depth == 7
        assert spool.counters[Tally.DUPLICATES] == 2 + 3
        rows = await spool.fetch(spool.streams["k"].id, 0, 100)
        assert ids(rows) == [1, 2, *sorted(ids(rows)[2:])] and len(set(ids(rows))) == 7
    finally:
        await spool.close()


async def test_records_hold_about_a_thousand_events_or_256_kib(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        assert await spool.append([ev("k", i) for i in range(2500)]) == 2500
        assert await spool.append([ev("big", i, size=3000) for i in range(200)]) == 200
        with sqlite3.connect(tmp_path / "spool.db") as db:
            small = [n for (n,) in db.execute("SELECT n FROM records WHERE stream = ? "
                                              "ORDER BY id", (spool.streams["k"].id,))]
            big = db.execute("SELECT max(bytes), sum(n), count(*) FROM records "
                             "WHERE stream = ?", (spool.streams["big"].id,)).fetchone()
        assert small == [1000, 1000, 500]
        # ~600 KB in records of about 256 KiB (cut by the events' average size)
        assert big[1] == 200 and big[2] == 3 and big[0] < 270 * 1024
        rows = await spool.fetch(spool.streams["k"].id, 0, 10_000)
        assert ids(rows) == list(range(2500))
    finally:
        await spool.close()


async def test_the_size_is_estimated_between_measurements_and_never_drifts(
        tmp_path: Path) -> None:
    """Far from max_size_mb the file's size is estimated from what commits insert, and
    measured again every 32 commits: the estimate stays within a few pages of the file."""
    spool = await open_spool(tmp_path, max_size_mb=512)
    try:
        def measured() -> int:
            with sqlite3.connect(tmp_path / "spool.db") as db:
                pages, free, size = db.execute(
                    "SELECT (SELECT page_count FROM pragma_page_count()), "
                    "(SELECT freelist_count FROM pragma_freelist_count()), "
                    "(SELECT page_size FROM pragma_page_size())").fetchone()
            return int((pages - free) * size)
        start = measured()
        for i in range(70):  # ~1 KB compressed each: 31 commits unmeasured drift 34 KB
            await spool.append([ev("k", i, size=2000)])
            assert abs(spool.used_bytes - measured()) <= 16 * 1024, i
        assert measured() - start > 48 * 1024
    finally:
        await spool.close()


@pytest.mark.parametrize("restart", [False, True])
async def test_a_record_found_damaged_by_an_ack_keeps_the_acked_events_keys(
        tmp_path: Path, restart: bool) -> None:
    """An ack of part of a record reads the rest of it (to count what stays queued); if
    that read finds the record damaged, the events just acknowledged were still
    delivered: counted as acked, and a resend of one is a duplicate, across a restart
    too. Only the events still queued in it are lost, counted as dropped_corrupt."""
    spool = await open_spool(tmp_path)
    try:
        await spool.append([ev("k", i) for i in range(5)])
        rows = await spool.fetch(spool.streams["k"].id, 0, 100)
        with sqlite3.connect(tmp_path / "spool.db") as db:   # damaged after it was sent
            rid, data = db.execute("SELECT id, data FROM records").fetchone()
            db.execute("UPDATE records SET data = ? WHERE id = ?",
                       (data[:20] + bytes([data[20] ^ 0xFF]) + data[21:], rid))
        await spool.ack([r.seq for r in rows[:3]])       # ids 0-2 delivered, 3-4 queued
        assert spool.counters[Tally.ACKED] == 3
        assert spool.counters[Drop.DROPPED_CORRUPT] == 2
        assert spool.depth == 0 and spool.streams["k"].depth == 0
        if restart:
            await spool.close()
            spool = await open_spool(tmp_path)
        # The delivered ones are resends; the lost ones are a new chance to deliver them.
        assert await spool.append([ev("k", i) for i in range(5)]) == 2
        assert spool.counters[Tally.DUPLICATES] == 3
    finally:
        await spool.close()


async def test_a_record_found_damaged_by_a_read_keeps_its_delivered_events_keys(
        tmp_path: Path) -> None:
    """Half a record delivered (acked), then the rest found damaged by the next read: the
    reader discards the record. The delivered half's resends are duplicates across a
    restart too, as when an ack finds the damage (audit: their keys were kept only in
    memory, and after a restart a resend was stored and sent again)."""
    spool = await open_spool(tmp_path)
    try:
        await spool.append([ev("k", i) for i in range(100)])
        rows = await spool.fetch(spool.streams["k"].id, 0, 50)
        await spool.ack([r.seq for r in rows])           # ids 0-49 delivered
    finally:
        await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        data = db.execute("SELECT data FROM records").fetchone()[0]
        db.execute("UPDATE records SET data = ?",
                   (data[:20] + bytes([data[20] ^ 0xFF]) + data[21:],))
    spool = await open_spool(tmp_path)
    try:
        assert not await spool.fetch(spool.streams["k"].id, 0, 100)   # meets the damage
        await spool.ack([])                               # the discard is committed with it
        assert spool.counters[Drop.DROPPED_CORRUPT] == 50
        assert spool.streams["k"].depth == 0
    finally:
        await spool.close()
    spool = await open_spool(tmp_path)
    try:
        # The delivered ones are resends; the lost ones are a new chance to deliver them.
        assert await spool.append([ev("k", i) for i in range(100)]) == 50
        assert spool.streams["k"].depth == 50
    finally:
        await spool.close()


async def test_the_events_of_a_record_found_damaged_are_logged_as_they_are_counted(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A record found damaged as its queue is sent: its events are lost, counted as
    dropped_corrupt, and the log must say so, as for every other loss: the count rose in
    /status with no line in the log to say when, or which spool."""
    spool = await open_spool(tmp_path)
    for b in range(3):
        await spool.append([ev("app1", b * 10 + i) for i in range(10)])
    await spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
        rid, data = db.execute("SELECT id, data FROM records ORDER BY id LIMIT 1 OFFSET 1"
                               ).fetchone()
        db.execute("UPDATE records SET data = ? WHERE id = ?",
                   (data[:20] + bytes([data[20] ^ 0xFF]) + data[21:], rid))
    agent = await make_agent(upstreams=[{"name": "up", "protocol": "nucleus-ws",
                                         "url": fake_nucleus.url, "flush_interval_s": 0.02}])
    await wait_for(lambda: agent.spool.counters.get(Drop.DROPPED_CORRUPT) == 10
                   and agent.spool.depth == 0)
    assert sorted(fake_nucleus.ids()) == [*range(10), *range(20, 30)]
    said = [r for r in caplog.records if "dropped_corrupt" in r.getMessage()]
    assert said, "10 events dropped, and nothing in the log"
    assert said[0].levelno >= logging.WARNING and "10" in said[0].getMessage(), said


class OneFrameAtATime(FakeNucleus):
    """The Nucleus upstream, each websocket frame answered once the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0
        self.release = asyncio.Semaphore(0)

    async def _ws(self, request: aiohttp.web.Request) -> aiohttp.web.WebSocketResponse:
        ws = aiohttp.web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        replies = []
        async for msg in ws:
            self.received += 1
            ids = self._record(request, msg.data)
            replies.append(asyncio.create_task(self._answer(ws, ids)))
        for reply in replies:
            reply.cancel()
        return ws

    async def _answer(self, ws: aiohttp.web.WebSocketResponse, ids: list[Any]) -> None:
        await self.release.acquire()   # FIFO: the frames answered in their order
        await ws.send_str(orjson.dumps({"reportedIds": ids}).decode())


@contextlib.asynccontextmanager
async def _damaged_while_in_flight(make_agent: Any, tmp_path: Path,
                                   events: list[Event]) -> AsyncIterator[Any]:
    """An agent whose one record of ``events`` (10) went out as two 5-event batches, both
    in flight, its bytes damaged on disk meanwhile: the first batch's ack finds the damage
    and counts the second's events dropped_corrupt; then one more event is posted, and
    yielded once it is acked (answered after the second batch: that one was answered)."""
    spool = await open_spool(tmp_path)
    await spool.append(events)   # one record
    await spool.close()
    fake = await OneFrameAtATime().start()
    try:
        agent = await make_agent(upstreams=[{"name": "up", "protocol": "nucleus-ws",
                                             "url": fake.url, "flush_interval_s": 0.02,
                                             "batch_max_events": 5}])
        await wait_for(lambda: fake.received == 2, timeout=5)
        with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
            data = db.execute("SELECT data FROM records").fetchone()[0]
            db.execute("UPDATE records SET data = ?",
                       (data[:20] + bytes([data[20] ^ 0xFF]) + data[21:],))
        fake.release.release()
        await wait_for(lambda: agent.spool.counters.get(Drop.DROPPED_CORRUPT), timeout=5)
        fake.release.release()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{agent.port}/app/app1/track",
                              json={"data": [orjson.loads(ev("app1", 10).body)]}) as r:
                assert r.status == 200, await r.text()
        fake.release.release()
        await wait_for(lambda: agent.spool.counters.get(Tally.ACKED) == 6, timeout=5)
        # The upstream's own count follows the delete's save, a loop turn later.
        await wait_for(lambda: agent.forwarding.states["up"].acked >= 6, timeout=5)
        assert fake.received == 3
        yield agent
    finally:
        await fake.stop()


async def test_events_in_flight_when_their_record_is_found_damaged_are_not_counted_twice(
        make_agent: Any, tmp_path: Path) -> None:
    """The upstream acked the second batch's events too, and its `acked` counted them
    again: ingested 10, acked 10 by the upstream's count and 5 dropped. The counts must
    add up."""
    async with _damaged_while_in_flight(make_agent, tmp_path,
                                        [ev("app1", i) for i in range(10)]) as agent:
        counters, state = agent.spool.counters, agent.forwarding.states["up"]
        assert counters.get(Drop.DROPPED_CORRUPT) == 5
        assert state.acked + counters[Drop.DROPPED_CORRUPT] == 11, state.acked


async def test_an_event_refused_in_flight_when_its_record_is_found_damaged_is_not_dead_lettered(
        make_agent: Any, tmp_path: Path) -> None:
    """The second batch carrying an event its upstream can never take (a stored event that
    is not an object: refused as a corrupt row, for dead letters). Its record found
    damaged meanwhile, the spool counts it dropped_corrupt and keeps no dead letter of it,
    but the upstream's dead_lettered in /status counted it as one: 1 dead letter there,
    none in the spool's counters or its dead letters."""
    events = [ev("app1", i) for i in range(10)]
    events[5] = Event("app1", NUCLEUS, dedupe_key("app1", 5), b"[5]")
    async with _damaged_while_in_flight(make_agent, tmp_path, events) as agent, \
            aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        status = await r.json()
    counters, (up,) = status["counters"], status["upstreams"]
    assert counters["dropped_corrupt"] == 5 and counters["dead_lettered"] == 0
    assert status["dead_letters"] == 0
    assert (up["acked"], up["dead_lettered"]) == (6, 0), up


async def test_dropped_names_exactly_the_seqs_no_live_record_holds_in_any_order(
        tmp_path: Path) -> None:
    """Spool.dropped runs on every ack, by record rather than by seq: each of a batch's
    seqs is judged, whatever their order, beside records gone and seqs never stored."""
    spool = await open_spool(tmp_path)
    try:
        for r in range(4):   # four requests: four records of 5 events
            await spool.append([ev("k", 5 * r + i) for i in range(5)])
        rows = await spool.fetch(spool.streams["k"].id, 0, 100)
        seqs = [row.seq for row in rows]
        await spool.ack(seqs[5:10])   # the second record leaves, whole
        unknown = seqs[-1] + 1000
        asked = [seqs[12], unknown, seqs[7], seqs[0], *reversed(seqs[5:10]), seqs[19], seqs[6]]
        assert spool.dropped(asked) == {unknown, *seqs[5:10]}
        assert spool.dropped(seqs[10:]) == set() and spool.dropped(()) == set()
    finally:
        await spool.close()
