"""Records read ahead, then dropped by the spool (expiry, the size cap), are not sent.

With one batch in flight (segment-http) the loop reads two batches' events ahead, and the
read ahead after it starts from the rows that read left, without the spool. Neither read
leases its rows (only what is sent: the cursors), so expiry or ``when_full =
"drop_oldest"`` may drop them while they wait; they are counted dropped, and must not go
out. Each test holds the batch in flight until the read ahead is ready, drops, answers,
and checks that what the collector stored and what the spool counted dropped make up
every event, once.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from agent.clock import Clock
from agent.families.lanes import HIGH
from agent.forwarder.supervisor import Seams
from agent.sync.monitor import BATTERY_POLL_S
from agent.sync.policy import Battery
from tests.fakes.loopback_server import serving
from tests.fakes.manual_timing import ManualTiming
from tests.test_read_ahead import BATCH, HeldCollector, ids, post, read_ahead
from tests.waiting import wait_for

DAY_MS = 86_400_000
RECORDS = 4   # requests of one batch each: a record each, dropped whole


def events(lo: int, hi: int, pad: int = 0) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "e", "userId": "u", "messageId": str(i),
             "properties": {"pad": os.urandom(pad).hex()}} for i in range(lo, hi)]


async def answered_until_sent(agent: Any, up: HeldCollector, before: int) -> Any:
    """The first ``before`` batches answered 200 (each after its read ahead); the answer
    of the one in flight now, once its read ahead is ready: for ``before`` = 1, the rows
    the first read ahead left."""
    sent, answer = await up.next()
    assert sent == ids(0, BATCH)
    for n in range(1, before + 1):
        await read_ahead(agent)
        answer.set_result(200)
        sent, answer = await up.next()
        assert sent == ids(n * BATCH, (n + 1) * BATCH)
    await read_ahead(agent)
    return answer


async def drain(agent: Any, up: HeldCollector, answer: Any, dropped: str) -> None:
    answer.set_result(200)
    answering = asyncio.create_task(up.answer_all())
    agent.forwarding.flush()   # the last events, less than a batch, go now
    try:
        await wait_for(lambda: agent.spool.depth == 0, timeout=20)
    finally:
        answering.cancel()
    stored = set(up.stored)
    assert len(up.stored) == len(stored), "an event stored twice"
    sent = {i for batch in up.received for i in batch}
    assert sent == stored, "an event sent, then dropped (or sent and not stored)"
    total = agent.spool.counters["ingested"]
    assert len(stored) + agent.spool.counters[dropped] == total


# How many batches are answered before the drop: 0, while the first read ahead (two
# batches' events) waits; 1, while the read ahead started from the rows it left waits.
DEPTH = {"first read ahead": 0, "read ahead from left rows": 1}


@pytest.mark.parametrize("depth", DEPTH)
async def test_events_read_ahead_then_expired_are_not_sent(
        make_agent: Any, clock: Clock, depth: str) -> None:
    before = DEPTH[depth]
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 3600, "timeout_s": 30}], storage={"max_age_days": 1})
        for r in range(RECORDS):
            # A minute apart: each commit marks the seqs received by then (expiry's bound).
            clock.passed_ms += 60_000
            await post(agent, events(r * BATCH, (r + 1) * BATCH))
        answer = await answered_until_sent(agent, up, before)
        clock.passed_ms += DAY_MS + 60_000
        await agent.spool.prune()
        # All but what was sent: the batch in flight is leased by the loop's cursors.
        assert agent.spool.counters["expired"] == (RECORDS - before - 1) * BATCH
        await drain(agent, up, answer, "expired")
    assert up.stored == ids(0, (before + 1) * BATCH)


@pytest.mark.parametrize("depth", DEPTH)
async def test_events_read_ahead_then_dropped_at_the_cap_are_not_sent(
        make_agent: Any, depth: str) -> None:
    before = DEPTH[depth]
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 3600, "timeout_s": 30}],
            storage={"max_size_mb": 1, "when_full": "drop_oldest"})
        for r in range(RECORDS):
            await post(agent, events(r * BATCH, (r + 1) * BATCH, pad=100))
        assert not agent.spool.counters.get("dropped_full")
        answer = await answered_until_sent(agent, up, before)
        # Requests until one fits only with the oldest records not in flight dropped:
        # the batch read ahead is the first of them.
        n = RECORDS * BATCH
        while not agent.spool.counters.get("dropped_full"):
            assert n < 20 * BATCH, "the spool never filled"
            await post(agent, events(n, n + 100, pad=750))
            n += 100
        assert agent.spool.counters.get("dropped_full", 0) >= BATCH
        await drain(agent, up, answer, "dropped_full")
    next_read = ids((before + 1) * BATCH, (before + 2) * BATCH)
    assert not set(next_read) & set(up.stored), "the rows read ahead went out"


def high(lo: int, hi: int) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "Application Error", "userId": "u",
             "messageId": f"h{i}"} for i in range(lo, hi)]


def hids(lo: int, hi: int) -> list[str]:
    return [f"h{i}" for i in range(lo, hi)]


@pytest.mark.parametrize("depth", DEPTH)
async def test_no_normal_event_read_ahead_goes_after_priority_only(
        make_agent: Any, depth: str) -> None:
    """The lanes narrow to the high lane (``priority_only``, a low battery) while the rows
    read ahead hold the last high events and the first normal ones: only those high
    events go after the change."""
    before = DEPTH[depth]
    highs = (before + 1) * BATCH + 100   # the read ahead (or the rows left) ends in 100
    timing = ManualTiming()
    battery = {"now": Battery(percent=9, plugged=True)}
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 3600, "timeout_s": 30}],
            seams=Seams(timing=timing), battery=lambda: battery["now"],
            sync={"on_low_battery": "priority_only", "low_battery_pct": 20})
        await post(agent, high(0, highs) + events(0, 2 * BATCH))
        sent, answer = await up.next()
        assert sent == hids(0, BATCH)
        for n in range(1, before + 1):
            await read_ahead(agent)
            answer.set_result(200)
            sent, answer = await up.next()
            assert sent == hids(n * BATCH, (n + 1) * BATCH)
        await read_ahead(agent)
        loop = agent.forwarding.loops["k"]
        battery["now"] = Battery(percent=9, plugged=False)
        await wait_for(lambda: BATTERY_POLL_S in timing.pending())
        timing.advance(BATTERY_POLL_S)
        await wait_for(lambda: loop.lanes == (HIGH,))
        answer.set_result(200)
        answering = asyncio.create_task(up.answer_all())
        agent.forwarding.flush()   # the last high events, less than a batch, go now
        try:
            await wait_for(lambda: agent.spool.streams["k"].high == 0, timeout=20)
        finally:
            answering.cancel()
        assert agent.spool.streams["k"].depth == 2 * BATCH
    assert up.received == [*(hids(n * BATCH, (n + 1) * BATCH) for n in range(before + 1)),
                           hids(highs - 100, highs)]
