"""Damage that garbles a key's queue depth (or size) into another count a queue could
hold: fewer events than its records hold, or more. The agent counts such a queue again from
its records (where a commit takes it to zero or below, or its forwarder finds none of the
events it counts): every event answered 200 is delivered, the key's later events too, and
status shows what is queued, not the garbled count. And a record's own count garbled so,
which that recount must not trust.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import segment_up
from tests.test_codebook import backlog
from tests.test_spool_damage_numbers import damage, ids
from tests.waiting import wait_for

# app-1 is stream 1, with 50 one-event records (app-2 has the other 50): its depth, or
# size, garbled to another positive count.
GARBLED = {
    "depth-fewer": ("UPDATE streams SET depth = 3 WHERE id = 1", 0, {}),
    # In batches of 10, acked in several commits.
    "depth-fewer-small-batches": ("UPDATE streams SET depth = 10 WHERE id = 1", 0,
                                  {"batch_max_events": 10}),
    # The 40 events the depth says are queued beyond its records: counted lost (damage
    # took them, or the count: which, the file cannot tell).
    "depth-more": ("UPDATE streams SET depth = depth + 40 WHERE id = 1", 40, {}),
    "bytes-fewer": ("UPDATE streams SET bytes = 3 WHERE id = 1", 0, {}),
    "bytes-more": ("UPDATE streams SET bytes = bytes + 40000 WHERE id = 1", 0, {}),
}


async def post(port: int, message_id: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/track",
                          json={"writeKey": "app-1", "event": "e", "userId": "u",
                                "messageId": message_id}) as r:
            assert r.status == 200, await r.text()


async def status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())


async def then_the_queue_empties(agent: Any, fake: FakeSegment, lost: int) -> None:
    """The key's next event is delivered too, its queue empties, and status says so, with
    ``lost`` events counted dropped_corrupt."""
    await post(agent.port, "after")
    await wait_for(lambda: "after" in fake.message_ids(), timeout=5)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    got = await status(agent.port)
    assert got["queue_depth"] == 0, got
    assert [u["queue_bytes"] for u in got["upstreams"]] == [0], got["upstreams"]
    assert got["counters"]["dropped_corrupt"] == lost, got["counters"]


@pytest.mark.parametrize("garble", GARBLED.values(), ids=GARBLED.keys())
async def test_a_queue_count_garbled_to_another_count_is_counted_again(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, garble: tuple[str, int, dict[str, Any]]) -> None:
    """A key's depth garbled to fewer than its records hold (50 read as 3) was taken as
    the count: once its 50 were acked it read -47, and the key's later events, answered
    200, were never sent. Garbled to more (50 read as 90): once its 50 were sent, status
    showed 40 queued for good, and whatever waits for the queue to empty (a flush, a
    graceful stop, a sync hold) waited for ever. Its size garbled so, status showed bytes
    queued, or fewer than none, for good. The start counts each queue again from its
    records where a commit takes it to zero or below, or where its forwarder finds none of
    the events it counts; the damage is logged, and what the count held beyond the records
    counted lost."""
    sql, lost, upstream = garble
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    damage(path, sql)
    agent = await make_agent(upstreams=[segment_up(fake_segment, **upstream)])
    await wait_for(lambda: sorted(fake_segment.message_ids()) == ids(events), timeout=5)
    await then_the_queue_empties(agent, fake_segment, lost)
    assert any("disagreed with its records" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR), caplog.text


# A record's own count of its live events garbled to another count (app-1's first record
# holds one event): the key's depth, right, is not to be counted again from it.
LIVE = {
    "live-more": "UPDATE records SET live = live + 40 WHERE id = "
                 "(SELECT min(id) FROM records WHERE stream = 1)",
    "live-none": "UPDATE records SET live = 0 WHERE id = "
                 "(SELECT min(id) FROM records WHERE stream = 1)",
}


@pytest.mark.parametrize("sql", LIVE.values(), ids=LIVE.keys())
async def test_a_record_live_count_garbled_to_another_count_leaves_the_queue_right(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, sql: str) -> None:
    """A record's count of its live events, garbled to another count (1 read as 41, or as
    0), was settled as it read: its event acked, the record kept with 40 events live (or
    -1) and none to send. Once the key's other acks took its depth, which was right, to
    zero, the commit counted it again from the records' counts: 40 queued for good (or
    fewer than none), a flush and a graceful stop waiting for ever. The events its bits say
    are live are the record's: every event is sent, none counted lost, and the queue
    empties."""
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    damage(path, sql)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: sorted(set(fake_segment.message_ids())) == ids(events), timeout=5)
    await then_the_queue_empties(agent, fake_segment, 0)
