"""An upstream's acknowledgement the spool cannot record (a damaged table here; a disk gone
read-only or full does the same): the events stay queued and are sent again, as the
design says, but after a backoff, with the spool's error as the upstream's last error,
counted and logged. Never at once and again, as fast as the upstream answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from typing import Any

import aiohttp
import pytest

from agent.forwarder.backoff import BACKOFF
from agent.forwarder.supervisor import Seams
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up
from tests.waiting import wait_for

# More than a backoff lets through in the time the check takes: a resend at every answer
# reaches it within a second (hundreds of requests a second, measured).
FLOOD = 50


async def upstream_status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        assert r.status == 200
        (up,) = (await r.json())["upstreams"]
        return dict(up)


async def test_an_ack_the_spool_cannot_record_is_retried_after_a_backoff_and_shown(
        make_agent: Any, fake_segment: FakeSegment, caplog: pytest.LogCaptureFixture) -> None:
    fake_segment.outage = (503, None)   # the event stays queued while the table goes
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u", "messageId": "m1"},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200
    await wait_for(lambda: len(fake_segment.requests) >= 1)
    path = str(agent.spool.path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        [(table,)] = other.execute("SELECT sql FROM sqlite_master WHERE name = 'spent'")
        other.execute("DROP TABLE spent")   # an ack moves the event's key there
        before = len(fake_segment.requests)
        fake_segment.outage = None

        async def shown_or_flooded() -> bool:
            error = (await upstream_status(agent.port))["last_error"] or ""
            return "spent" in error or len(fake_segment.requests) - before >= FLOOD

        await wait_for(shown_or_flooded)
        sent = len(fake_segment.requests) - before
        up = await upstream_status(agent.port)
        assert sent < FLOOD, f"sent {sent} times, as fast as the upstream answered"
        assert "no such table: spent" in (up["last_error"] or ""), up
        assert up["retries"] >= 2, up   # the 503, then the ack not recorded
        assert any("no such table: spent" in r.getMessage() and r.levelno >= logging.WARNING
                   for r in caplog.records)   # the spool's own line (once a minute)
        other.execute(table)   # mended: the next try's ack is recorded
    await wait_for(lambda: agent.spool.depth == 0)
    assert set(fake_segment.message_ids()) == {"m1"}


async def test_an_ack_the_spool_could_not_record_is_counted_once_it_is(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """The upstream acknowledged the event twice (its first ack not recorded, it went again):
    one event delivered. The upstream's acked in /status (the table's ACKED) and the
    minute's `out` counted both, 2 beside the spool's acked 1."""
    fake_segment.outage = (503, None)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u", "messageId": "m1"},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200
    await wait_for(lambda: len(fake_segment.requests) >= 1)
    await _first_ack_not_recorded(agent, fake_segment)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        snap = await r.json()
    (up,) = snap["upstreams"]
    assert len(fake_segment.requests) >= 3   # the 503, the ack not recorded, the one that was
    assert snap["counters"]["acked"] == 1
    assert (up["acked"], sum(m["out"] for m in snap["history"])) == (1, 1), up


async def test_status_and_metrics_answer_while_the_spool_cannot_be_read(
        make_agent: Any) -> None:
    """A spool failing to read (a damaged table here; an I/O error on a failing card does
    the same) is when an operator looks at /status, `outpost status`, the page and
    /metrics: they answer, with what the books keep, rather than a 500."""
    agent = await make_agent()   # no upstream: the event stays queued
    reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u"},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200
    with contextlib.closing(sqlite3.connect(str(agent.spool.path),
                                            isolation_level=None)) as other:
        other.execute("DROP TABLE records")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            assert r.status == 200, await r.text()
            snap = await r.json()
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            assert r.status == 200, await r.text()
    assert snap["queue_depth"] == 1 and snap["oldest_event_age_s"] is None, snap


async def test_an_ack_the_spool_could_not_record_shows_once_in_the_live_view(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """`outpost tail` and the page's live panel show each delivered event acked once: the
    upstream's first ack, not recorded, was shown there too, and the ack that was, again."""
    fake_segment.outage = (503, None)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        await track(agent.port, "m1")
        await wait_for(lambda: len(fake_segment.requests) >= 1)
        await _first_ack_not_recorded(agent, fake_segment)
        await track(agent.port, "m2")   # its acked line comes after any of m1's
        acked: list[str] = []
        while "m2" not in acked:
            line = await asyncio.wait_for(resp.content.readline(), 20)
            if line.startswith(b"data: ") and (m := json.loads(line[6:]))["kind"] == "acked":
                acked.append(m["id"])
    assert acked == ["m1", "m2"]


async def track(port: int, message_id: str) -> None:
    reply = await call(port, "/v1/track", {"event": "e", "userId": "u", "messageId": message_id},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200


async def _first_ack_not_recorded(agent: Any, fake_segment: FakeSegment) -> None:
    """The upstream back (its outage ended) while the spool cannot record acks (its `spent`
    table gone) until one ack has failed to be recorded; then the table is back and the
    queue drains."""
    with contextlib.closing(sqlite3.connect(str(agent.spool.path),
                                            isolation_level=None)) as other:
        [(table,)] = other.execute("SELECT sql FROM sqlite_master WHERE name = 'spent'")
        other.execute("DROP TABLE spent")
        fake_segment.outage = None

        async def not_recorded() -> bool:
            return "spent" in ((await upstream_status(agent.port))["last_error"] or "")

        await wait_for(not_recorded)
        other.execute(table)
    await wait_for(lambda: agent.spool.depth == 0)


async def test_an_ack_the_spool_keeps_failing_to_record_is_retried_after_a_growing_backoff(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """The spool cannot record the upstream's acks (its disk full, say): the events are
    sent again after a backoff that grows while the commits keep failing, as the docs
    say. Each retry was a new loop of the key, which forgot the failures before it: at
    every answer its backoff began again at its first step (under half a second), and a
    full disk had the whole queue sent twice a second for as long as it stayed full."""
    timing = ManualTiming()
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             seams=Seams(timing=timing, backoff=BACKOFF))
    path = str(agent.spool.path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        [(table,)] = other.execute("SELECT sql FROM sqlite_master WHERE name = 'spent'")
        other.execute("DROP TABLE spent")   # an ack moves the event's key there
        await track(agent.port, "m1")
        delays: list[float] = []
        while True:   # each ack not recorded parks the key; let its wait pass
            await wait_for(lambda: len(timing.pending()) == 1)
            (delay,) = timing.pending()
            delays.append(delay)
            if len(delays) == 6:
                break
            timing.advance(delay)
        assert len(fake_segment.requests) == 6
        for attempt, delay in enumerate(delays):
            step = min(BACKOFF.cap_s, BACKOFF.base_s * 2 ** attempt)
            assert step * 0.5 <= delay < step, (attempt, delays)
        other.execute(table)   # mended: the next try's ack is recorded
    timing.advance(delays[-1])
    await wait_for(lambda: agent.spool.depth == 0)
    assert set(fake_segment.message_ids()) == {"m1"}
