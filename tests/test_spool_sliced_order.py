"""A large request lets the loop go while it is taken in (writer.SLICE_EVENTS), and its
keys join the dedupe index after the commit a slice at a time: what other requests do
meanwhile keeps FIFO per key, dedupe, the counters and every answer. Real spools on
SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest

from agent.families.errors import Invalid
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.types import Reason, SpoolFull
from agent.spool.writer import SLICE_EVENTS

MANY = 2 * SLICE_EVENTS + 5   # three slices


def ev(key: str, n: int, lane: int = NORMAL) -> Event:
    body = orjson.dumps({"id": n, "name": f"e{n}"})
    return Event(key, NUCLEUS, dedupe_key(key, n), body, n, lane=lane)


async def open_spool(tmp_path: Path, **kw: object) -> Spool:
    return await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), **kw))  # type: ignore[arg-type]


async def ids_of(spool: Spool, key: str) -> list[int]:
    rows = await spool.fetch(spool.streams[key].id, 0, 100 * MANY)
    return [orjson.loads(r.body)["id"] for r in rows]


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# -- FIFO per key across requests ------------------------------------------------


async def test_a_small_request_after_a_large_one_of_its_key_is_stored_after_it(
        tmp_path: Path) -> None:
    """A large request of key k reaches append first; a small one of k (the next event)
    reaches it one turn later, while the large one is being taken in. Before slicing,
    requests were queued for the commit in the order they reached append."""
    spool = await open_spool(tmp_path)
    try:
        large = asyncio.ensure_future(spool.append([ev("k", i) for i in range(MANY)]))
        await asyncio.sleep(0)   # the large request is in append, at its first slice
        small = asyncio.ensure_future(spool.append([ev("k", MANY)]))
        assert await large == MANY and await small == 1
        assert await ids_of(spool, "k") == list(range(MANY + 1))
    finally:
        await spool.close()


async def test_two_large_requests_of_one_key_keep_their_order(tmp_path: Path) -> None:
    """Two large requests of one key, the second shorter (two slices to the first's
    four): the second reaches append after the first, and must be stored after it."""
    spool = await open_spool(tmp_path)
    try:
        n = 3 * SLICE_EVENTS + 5   # four slices
        first = asyncio.ensure_future(spool.append([ev("k", i) for i in range(n)]))
        await asyncio.sleep(0)
        second = asyncio.create_task(
            spool.append([ev("k", i) for i in range(n, n + SLICE_EVENTS + 1)]))
        assert await first == n and await second == SLICE_EVENTS + 1
        assert await ids_of(spool, "k") == list(range(n + SLICE_EVENTS + 1))
    finally:
        await spool.close()


async def test_a_request_cancelled_behind_a_large_one_holds_up_nothing(
        tmp_path: Path) -> None:
    """A small request waits behind a large one and is cancelled (its client gone) while
    the large one is still taken in: the large one and the request after it are stored,
    in order, and nothing of it."""
    spool = await open_spool(tmp_path)
    try:
        n = 8 * SLICE_EVENTS   # slices enough to outlast the turns below
        large = asyncio.ensure_future(spool.append([ev("k", i) for i in range(n)]))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(spool.append([ev("k", n)]))
        await asyncio.sleep(0)
        after = asyncio.ensure_future(spool.append([ev("k", n + 1)]))
        await asyncio.sleep(0)
        assert not large.done()
        gone.cancel()
        assert await large == n and await after == 1
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await ids_of(spool, "k") == [*range(n), n + 1]
    finally:
        await spool.close()


# -- dedupe ---------------------------------------------------------------------


async def test_a_resend_of_a_large_requests_event_meanwhile_is_stored_once(
        tmp_path: Path) -> None:
    """A small request repeating one event of a large request arrives (and commits) while
    the large one is being taken in: the event is stored once, counted a duplicate once."""
    spool = await open_spool(tmp_path)
    try:
        events = [ev("k", i) for i in range(MANY)]
        large = asyncio.ensure_future(spool.append(events))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(spool.append([events[SLICE_EVENTS + 3]]))
        got = [await large, await small]
        assert sum(got) == MANY
        assert sorted(await ids_of(spool, "k")) == list(range(MANY))
        assert spool.counters.get("duplicates", 0) == 1
        assert spool.counters["ingested"] == MANY
    finally:
        await spool.close()


async def test_a_resend_while_the_keys_join_the_index_is_a_duplicate(tmp_path: Path) -> None:
    """A large request commits; while its keys join the index a slice at a time, resends
    of its last events arrive: each is a duplicate, never stored twice."""
    spool = await open_spool(tmp_path)
    try:
        events = [ev("k", i) for i in range(3 * MANY)]
        large = asyncio.ensure_future(spool.append(events))
        resends = []
        while spool.last_seq < len(events) - 1:   # until its commit is under way
            await asyncio.sleep(0)
        # One resend a turn for the rest of the time the large request is in flight.
        while not large.done():
            resends.append(asyncio.ensure_future(spool.append([events[-1], events[-2]])))
            await asyncio.sleep(0)
        assert await large == 3 * MANY
        assert resends and await asyncio.gather(*resends) == [0] * len(resends)
        assert spool.counters["duplicates"] == 2 * len(resends)
        stored = await ids_of(spool, "k")
        assert sorted(stored) == list(range(3 * MANY))
    finally:
        await spool.close()


async def test_two_large_requests_sharing_events_sliced_at_once(tmp_path: Path) -> None:
    """A module reconnects and resends its queue (grown) while its first message is still
    being taken in: each event stored once, in order."""
    spool = await open_spool(tmp_path)
    try:
        a = asyncio.ensure_future(spool.append([ev("k", i) for i in range(MANY)]))
        await asyncio.sleep(0)
        b = asyncio.ensure_future(spool.append([ev("k", i) for i in range(MANY + 10)]))
        assert await a + await b == MANY + 10
        assert await ids_of(spool, "k") == list(range(MANY + 10))
        assert spool.counters["duplicates"] == MANY
    finally:
        await spool.close()


# -- shutdown, cancel, full ----------------------------------------------------------


async def test_close_while_a_large_request_is_sliced_answers_it(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    large = asyncio.ensure_future(spool.append([ev("k", i) for i in range(MANY)]))
    await asyncio.sleep(0)
    await spool.close()
    with pytest.raises(SpoolFull) as exc:
        await asyncio.wait_for(large, 5)
    assert exc.value.reason == Reason.SHUTTING_DOWN
    again = await open_spool(tmp_path)
    try:
        assert again.depth == 0
    finally:
        await again.close()


async def test_a_cancelled_large_request_stores_nothing_and_its_resend_is_stored(
        tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        events = [ev("k", i) for i in range(MANY)]
        large = asyncio.ensure_future(spool.append(events))
        await asyncio.sleep(0)
        large.cancel()
        with pytest.raises(asyncio.CancelledError):
            await large
        await turns(5)
        assert spool.depth == 0
        assert await spool.append(events) == MANY
        assert await ids_of(spool, "k") == list(range(MANY))
    finally:
        await spool.close()


async def test_a_full_spool_refuses_only_the_large_request_mid_slice(tmp_path: Path) -> None:
    """reject mode, 1 MiB: a large request too big to fit is being taken in while small
    requests commit; only it is refused, whole."""
    spool = await open_spool(tmp_path, max_size_mb=1, when_full="reject", sync="normal")
    try:
        big = [Event("big", NUCLEUS, dedupe_key("big", i),
                     orjson.dumps({"id": i, "pad": os.urandom(400).hex()}), i)
               for i in range(MANY)]
        large = asyncio.ensure_future(spool.append(big))
        await asyncio.sleep(0)
        smalls = [asyncio.ensure_future(spool.append([ev("s", i)])) for i in range(5)]
        got = await asyncio.gather(large, *smalls, return_exceptions=True)
        # Larger than the whole spool: refused as too large (413), not as full.
        assert isinstance(got[0], Invalid) and got[0].too_large and got[1:] == [1] * 5, got
        assert "big" not in spool.streams or spool.streams["big"].depth == 0
        assert spool.streams["s"].depth == 5
    finally:
        await spool.close()


@pytest.mark.parametrize("when_full", ["reject", "drop_oldest"])
async def test_a_resend_in_the_same_commit_as_the_large_request(
        tmp_path: Path, when_full: str) -> None:
    """The writer is busy (its lock held, as by a prune), so a small request repeating an
    event of a large one, queued behind the large one while it is taken in, shares its
    commit: the event is stored once, both answered, counted once a duplicate."""
    spool = await open_spool(tmp_path, when_full=when_full)
    try:
        events = [ev("k", i) for i in range(MANY)]
        async with spool.lock:
            large = asyncio.ensure_future(spool.append(events))
            await asyncio.sleep(0)
            small = asyncio.ensure_future(spool.append([events[5], ev("k", MANY)]))
            await turns(10)   # both queued for the next commit
            assert not large.done() and not small.done()
        assert await large + await small == MANY + 1
        assert sorted(await ids_of(spool, "k")) == list(range(MANY + 1))
        assert spool.counters["duplicates"] == 1 and spool.counters["ingested"] == MANY + 1
    finally:
        await spool.close()
