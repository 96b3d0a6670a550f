"""The read ahead two batches deep against what may change while its rows wait.

With one batch in flight (segment-http) the loop reads two batches' events ahead, and the
read ahead after it starts from the rows that read left, without the spool. Neither read
leases its rows (only what is sent: the cursors), so expiry or ``when_full =
"drop_oldest"`` may drop them while they wait; they are counted dropped, and must not go
out. Nor may they go after the lanes narrow, past a release's bound, before a high event
that came since they were read, or twice (a failure, a hold). Each test holds the batch in
flight until the read ahead is ready, changes something, answers, and checks what the
collector received and stored, in order.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from agent.clock import Clock
from agent.families.lanes import HIGH
from agent.forwarder.supervisor import Seams
from agent.sync.monitor import BATTERY_POLL_S
from agent.sync.policy import Battery
from tests.fakes.loopback_server import serving
from tests.fakes.manual_timing import ManualTiming
from tests.test_read_ahead import BATCH, HeldCollector, drained, ids, post, read_ahead
from tests.waiting import wait_for

DAY_MS = 86_400_000
RECORDS = 4   # requests of one batch each: a record each, dropped whole


def events(lo: int, hi: int, pad: int = 0) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "e", "userId": "u", "messageId": str(i),
             "properties": {"pad": os.urandom(pad).hex()}} for i in range(lo, hi)]


def seg_up(url: str) -> dict[str, Any]:
    return {"name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 3600, "timeout_s": 30}


class Mains:
    """A battery at 9% the test plugs in and out, which the agent's sync policy (``policy``
    on a low battery) reads at each poll of a manual clock."""

    def __init__(self, plugged: bool) -> None:
        self.timing = ManualTiming()
        self.battery = Battery(percent=9, plugged=plugged)

    async def agent(self, make_agent: Any, url: str, policy: str, **kw: Any) -> Any:
        return await make_agent(upstreams=[seg_up(url)], seams=Seams(timing=self.timing),
                                battery=lambda: self.battery,
                                sync={"on_low_battery": policy, "low_battery_pct": 20}, **kw)

    async def plug(self, plugged: bool) -> None:
        """Plugged in or out, as the next poll (made now) reads it."""
        self.battery = Battery(percent=9, plugged=plugged)
        await wait_for(lambda: BATTERY_POLL_S in self.timing.pending())
        self.timing.advance(BATTERY_POLL_S)


async def queued_first(make_agent: Any, url: str, posts: list[list[dict[str, Any]]],
                       between: Any = None, **kw: Any) -> Any:
    """An agent with ``posts`` (a record each) queued for a segment-http upstream before
    its loop reads: held (a low battery) while they are posted, so that the first read
    ahead reads two batches of them, whatever the timing. ``between``: called before each
    post."""
    mains = Mains(plugged=False)
    agent = await mains.agent(make_agent, url, "hold", **kw)
    for batch in posts:
        if between is not None:
            between()
        await post(agent, batch)
    assert not agent.forwarding.loops
    await mains.plug(True)
    return agent


async def answered_until_sent(agent: Any, up: HeldCollector, before: int,
                              names: Callable[[int, int], list[str]] = ids) -> Any:
    """The first ``before`` batches answered 200 (each after its read ahead); the answer
    of the one in flight now, once its read ahead is ready: for ``before`` = 1, the rows
    the first read ahead left. ``names``: the messageIds of the events queued, in order."""
    sent, answer = await up.next()
    assert sent == names(0, BATCH)
    for n in range(1, before + 1):
        await read_ahead(agent)
        answer.set_result(200)
        sent, answer = await up.next()
        assert sent == names(n * BATCH, (n + 1) * BATCH)
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
        def a_minute() -> None:   # each commit marks the seqs received by then (expiry)
            clock.passed_ms += 60_000

        agent = await queued_first(make_agent, url, [
            events(r * BATCH, (r + 1) * BATCH) for r in range(RECORDS)], a_minute,
            storage={"max_age_days": 1})
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
        agent = await queued_first(make_agent, url, [
            events(r * BATCH, (r + 1) * BATCH, pad=100) for r in range(RECORDS)],
            storage={"max_size_mb": 1, "when_full": "drop_oldest"})
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
    mains = Mains(plugged=True)
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await mains.agent(make_agent, url, "priority_only")
        await post(agent, high(0, highs) + events(0, 2 * BATCH))
        answer = await answered_until_sent(agent, up, before, hids)
        loop = agent.forwarding.loops["k"]
        await mains.plug(False)
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


# (the failure, the batches answered before it): the second batch fails while the read
# ahead started from the rows its read left waits, the third while the one after it waits.
# A 400 refuses it: it is split, and its halves go (and are taken) before the rest.
FAILURES = {"connection lost, second": (0, 1), "503, second": (503, 1),
            "connection lost, third": (0, 2), "refused, second": (400, 1)}


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_batch_failed_while_rows_read_ahead_wait_goes_again_first(
        make_agent: Any, failure: str) -> None:
    """The batch in flight fails (its connection lost, a 503, a 400) while the next one is
    read ahead: it goes again (split, for a 400), then the rest in order, each event
    stored once."""
    status, before = FAILURES[failure]
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[seg_up(url)])
        await post(agent, events(0, (RECORDS + 1) * BATCH))   # one request: all queued
        answer = await answered_until_sent(agent, up, before)
        answer.set_result(status)
        answering = asyncio.create_task(up.answer_all())
        await drained(agent, up, answering)
    batches = [ids(n * BATCH, (n + 1) * BATCH) for n in range(RECORDS + 1)]
    again = [batches[before]] if status != 400 else \
        [batches[before][:BATCH // 2], batches[before][BATCH // 2:]]
    assert up.received == [*batches[:before + 1], *again, *batches[before + 1:]]
    assert up.stored == ids(0, (RECORDS + 1) * BATCH)


async def test_a_hold_while_rows_read_ahead_wait_loses_and_repeats_nothing(
        make_agent: Any) -> None:
    """A hold (``on_low_battery = "hold"``) stops the loop while the read ahead started
    from the rows the last read left waits, and the batch in flight is answered during the
    stop: once the hold ends, the rest goes in order, each event stored once."""
    mains = Mains(plugged=True)
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await mains.agent(make_agent, url, "hold")
        await post(agent, events(0, RECORDS * BATCH))   # one request: all queued at once
        answer = await answered_until_sent(agent, up, 1)
        loop = agent.forwarding.loops["k"]
        await mains.plug(False)
        await wait_for(lambda: loop.stopping)
        answer.set_result(200)
        await wait_for(lambda: "k" not in agent.forwarding.loops)
        await mains.plug(True)
        answering = asyncio.create_task(up.answer_all())
        await drained(agent, up, answering)
    assert up.received == [ids(n * BATCH, (n + 1) * BATCH) for n in range(RECORDS)]
    assert up.stored == ids(0, RECORDS * BATCH)


async def test_a_release_read_ahead_two_deep_sends_what_it_let_go_and_no_more(
        make_agent: Any, clock: Clock) -> None:
    """A ``max_hold_h`` release under a hold lets go what was queued then (three and a
    half batches), read ahead two batches deep; events that come while it sends stay held,
    though a read ahead without its bound would take them."""
    timing = ManualTiming()
    up = HeldCollector()
    released = 3 * BATCH + BATCH // 2
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 60, "timeout_s": 30}],   # all due once released
            seams=Seams(timing=timing), battery=lambda: Battery(percent=9, plugged=False),
            sync={"on_low_battery": "hold", "low_battery_pct": 20, "max_hold_h": 0.5})
        await post(agent, events(0, released))
        await wait_for(lambda: len(timing.pending()) == 2)   # the battery poll, the hold
        clock.passed_ms += 1_800_000
        timing.advance(1800)
        sent, answer = await up.next()
        assert sent == ids(0, BATCH)
        await post(agent, events(released, released + 2 * BATCH))   # held
        for n in range(1, 4):
            await read_ahead(agent)
            answer.set_result(200)
            sent, answer = await up.next()
            assert sent == ids(n * BATCH, min((n + 1) * BATCH, released))
        answer.set_result(200)
        await wait_for(lambda: not agent.forwarding.loops, timeout=20)
        assert agent.spool.depth == 2 * BATCH
    assert up.stored == ids(0, released)
    assert agent.sync.releases == 1


async def test_a_high_event_committed_while_a_batch_waits_for_a_drop_goes_before_the_rest(
        make_agent: Any) -> None:
    """``when_full = "drop_oldest"`` near the cap: every commit may drop records, and the
    loop, about to send a batch it read ahead (two batches' events), waits for the commit
    running. That commit brings an "Application Error": the batch goes (read before it),
    but the rows it left must not then go before the high event, as a fresh read would
    not have them."""
    up = HeldCollector()
    async with serving("/v1/batch", up.batch) as url:
        agent = await queued_first(make_agent, url, [
            events(r * BATCH, (r + 1) * BATCH) for r in range(RECORDS)],
            storage={"max_size_mb": 2, "when_full": "drop_oldest"})
        answer = await answered_until_sent(agent, up, 0)
        loop = agent.forwarding.loops["k"]
        sent_to = max(loop._cursors)
        db = agent.spool.db
        assert db is not None
        release = threading.Event()
        holding = db.run(lambda conn: release.wait(30))   # the writer's thread, held
        try:
            posting = asyncio.create_task(post(agent, high(0, 1)))
            await wait_for(lambda: agent.spool.dropping is not None)   # its commit waits
            answer.set_result(200)
            # The loop took the read ahead, leased it (its cursors past the batch answered)
            # and waits for the commit.
            await wait_for(lambda: max(loop._cursors) > sent_to + BATCH)
        finally:
            release.set()
            await holding
        await posting
        answering = asyncio.create_task(up.answer_all())
        try:
            await wait_for(lambda: "h0" in up.stored, timeout=20)
        finally:
            answering.cancel()
    assert up.received[:3] == [ids(0, BATCH), ids(BATCH, 2 * BATCH),
                               ["h0", *ids(2 * BATCH, 3 * BATCH - 1)]]
