"""A Segment backlog drained in batches that cross its records (each batch's seqs one
range down to the spool's settle), some batches refused for a poison event (split, the
rest sent in halves, the poison dead-lettered): every other event is delivered once, the
queue ends empty, the counts add up, and after a restart a resend of any delivered
event is a duplicate, stored and sent no more."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from agent.outcomes import Tally
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up
from tests.test_upstream_faults import drained, event, resent_after, send, upstream
from tests.waiting import wait_for

SIZES = (7, 13, 5, 20, 9, 1, 11)     # one request, one record each
POISON = {"m9", "m30", "m45"}
AUTH = {"Authorization": basic("k")}


def batch(first: int, n: int) -> dict[str, Any]:
    return {"batch": [{"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}"}
                      for i in range(first, first + n)]}


async def status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        assert r.status == 200
        return dict(await r.json())


@pytest.mark.parametrize("poison", [set(), POISON], ids=["all-taken", "poisoned"])
async def test_a_backlog_drained_across_records_with_refusals_adds_up_and_stays_deduped(
        make_agent: Any, fake_segment: FakeSegment, poison: set[str]) -> None:
    fake_segment.outage = (503, None)
    fake_segment.poison = set(poison)
    up = segment_up(fake_segment, batch_max_events=8)
    agent = await make_agent(upstreams=[up])
    first = 0
    for n in SIZES:
        assert (await call(agent.port, "/v1/batch", batch(first, n), headers=AUTH)).status == 200
        first += n
    total = first
    assert agent.spool.depth == total
    fake_segment.outage = None
    await wait_for(lambda: agent.spool.depth == 0 and agent.spool.dead_count == len(poison), 10)
    good = [f"m{i}" for i in range(total) if f"m{i}" not in poison]
    assert sorted(fake_segment.message_ids()) == sorted(good)   # each once
    (shown,) = (await status(agent.port))["upstreams"]
    assert shown["acked"] == len(good), shown
    assert agent.spool.counters[Tally.ACKED] == len(good)
    await agent.stop()

    again = await make_agent(upstreams=[up])
    before = again.spool.counters.get(Tally.DUPLICATES, 0)
    assert (await call(again.port, "/v1/batch", batch(0, total), headers=AUTH)).status == 200
    # Only the dead-lettered may come back; every delivered one is a duplicate.
    assert again.spool.counters.get(Tally.DUPLICATES, 0) - before >= len(good)
    assert again.spool.depth <= len(poison)


async def test_acks_held_as_ranges_at_a_stop_are_saved_and_not_sent_again(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """Three 5-event batches acknowledged (their ranges held for a grouped delete), the
    fourth hanging when the agent stops: after a restart none of the 15 goes again."""
    gate = asyncio.Event()
    faulty.script = [Fault("slow"), Fault("slow"), Fault("slow"), Fault("slow", until=gate)]
    up = upstream(faulty, "segment-http", batch_max_events=5)
    agent = await make_agent(upstreams=[up])
    await send(agent, [event(i) for i in range(40)])
    await wait_for(lambda: len(faulty.requests) >= 4)
    await agent.stop()
    gate.set()
    first = len(faulty.requests)
    again = await make_agent(upstreams=[up])
    await drained(again, faulty, 40)
    assert not set(resent_after(faulty, faulty.requests[first - 1])) & set(range(15))
    assert again.spool.counters[Tally.ACKED] == 40
