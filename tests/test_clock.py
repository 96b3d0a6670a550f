"""A wrong device clock never expires, stalls or reorders fresh events.

The agent reads time through ``agent.clock.CLOCK``: these tests set its wall clock
wrong (1970, ten years ahead) and correct it, or let days pass, without sleeping and
without touching the machine's clock. Agents are real, on real spool files, and are
restarted in between where the scenario has a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.clock import CLOCK, Clock
from agent.families.event import NUCLEUS, Event, iso_ms
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool import commit as spool_commit
from tests.fakes.loopback_server import serving
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up
from tests.spool_files import as_v5_without_observed
from tests.waiting import LoopTurns, wait_for

DAY_MS = 86_400_000
FLUSH_S = 1.0
# Wall-clock settings a device can wake up with: 1970-01-02, and ten years ahead.
SKEWS = {"1970": lambda: DAY_MS - time.time_ns() // 1_000_000, "10y-ahead": lambda: 3652 * DAY_MS}


def event(i: int) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z"}


async def post(port: int, key: str, ids: range) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/{key}/track",
            json={"data": [event(i) for i in ids]}) as r:
        assert r.status == 200, await r.text()


async def expired_after_prune(agent: Any) -> int:
    """Run the check the agent runs every 10 minutes (its own first run, at start, may
    run at the same moment: the counter, not the return value, says what expired)."""
    await agent.spool.prune()
    return int(agent.spool.counters.get("expired", 0))


async def status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        assert r.status == 200
        return dict(await r.json())


def upstream(fake: FakeNucleus) -> dict[str, Any]:
    # "parked" is routed nowhere: its events stay queued, for status and expiry to see.
    return {"name": "up", "protocol": "nucleus-ws", "url": fake.url, "keys": ["app1"],
            "flush_interval_s": FLUSH_S}


@pytest.mark.parametrize("skew", list(SKEWS), ids=list(SKEWS))
async def test_events_taken_under_a_wrong_clock_survive_its_correction_and_flow(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, skew: str) -> None:
    clock.wall_shift_ms = SKEWS[skew]()
    first = await make_agent()                    # no upstream: the events stay queued
    await post(first.port, "app1", range(6))
    await post(first.port, "parked", range(100, 102))
    await first.stop()
    clock.wall_shift_ms = 0                       # the clock is corrected, the agent restarts
    # Received in 1970 or years ahead of now, the queue is due at once: an hour's flush
    # interval shows it, with no wall-clock bound (a queue waiting for the clock to catch
    # up, or for one interval, misses wait_for's timeout).
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 3600}])
    assert await expired_after_prune(agent) == 0
    snap = await status(agent.port)
    assert snap["oldest_event_age_s"] is not None and snap["oldest_event_age_s"] >= 0
    assert snap["drops"]["expired"] == 0
    await wait_for(lambda: set(range(6)) <= set(fake_nucleus.ids()))
    assert fake_nucleus.ids() == list(range(6))   # once each, in order
    assert agent.spool.streams["parked"].depth == 2


async def test_a_clock_set_back_while_events_wait_does_not_stall_their_queue(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    clock.wall_shift_ms = SKEWS["10y-ahead"]()
    await post(agent.port, "app1", range(3))
    await post(agent.port, "parked", range(100, 101))
    clock.wall_shift_ms = 0                       # corrected while the batch waits
    assert (await status(agent.port))["oldest_event_age_s"] >= 0
    # Sent once its FLUSH_S wait ends (then due at once), not when the clock catches up.
    await wait_for(lambda: fake_nucleus.ids() == [0, 1, 2])


async def test_sent_at_corrects_a_track_taken_before_the_clock_was_set(
        make_agent: Any, fake_segment: FakeSegment, clock: Clock, fast_backoff: Any) -> None:
    """A board boots in 1970; an app posts a track stamped by that clock; NTP corrects it
    while the track waits (the collector down); a track posted after it joins the queue.
    A collector's correction, `receivedAt - (sentAt - timestamp)`, gives each track the
    time it really was posted at."""
    fake_segment.outage = (503, None)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    posted: dict[str, float] = {}

    async def track(name: str) -> None:
        posted[name] = time.time()
        reply = await call(agent.port, "/v1/track",
                           {"event": name, "userId": "u", "messageId": name,
                            "timestamp": iso_ms(CLOCK.wall_ms())},   # the app's clock
                           headers={"Authorization": basic("k")})
        assert reply.status == 200, reply.body

    clock.wall_shift_ms = SKEWS["1970"]()
    await track("before")
    await wait_for(lambda: fake_segment.requests)   # tried, sentAt read by the 1970 clock
    clock.wall_shift_ms = 0                         # corrected while it waits
    await track("after")
    fake_segment.outage = None
    await wait_for(lambda: len(fake_segment.events) == 2)
    for req in fake_segment.accepted():
        for ev in req.events:
            age_s = _epoch_s(ev["sentAt"]) - _epoch_s(ev["timestamp"])
            assert abs(req.received_at - age_s - posted[ev["event"]]) < 3, ev


async def test_a_dead_letter_retried_hours_later_goes_with_the_batch_s_sent_at(
        make_agent: Any, fake_segment: FakeSegment, clock: Clock, fast_backoff: Any) -> None:
    """No clock was set: a retried letter, which keeps its receipt time but is counted from
    its retry, gets the batch's `sentAt`, not one three hours early."""
    fake_segment.poison.add("m1")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u", "messageId": "m1"},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200, reply.body
    await wait_for(lambda: agent.spool.dead_count == 1)
    clock.passed_ms = 3 * 3_600_000
    fake_segment.poison.clear()
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/dead/retry", json={"all": True}) as r:
        assert r.status == 200, await r.text()
    await wait_for(lambda: fake_segment.events)
    (req,) = fake_segment.accepted()
    assert [ev["sentAt"] for ev in req.events] == [req.body["sentAt"]]


async def test_dead_letters_retried_again_and_again_hold_no_memory_for_each_retry(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any) -> None:
    """A letter the upstream refuses each time it is retried: the spool kept the seqs of
    every retry (for each batch's `sentAt`), two numbers a retry chunk, until a restart:
    an agent whose dead letters are retried for months grew without bound. Kept while a
    retried record is queued, they are bounded by the queue; its last retry, delivered,
    still goes with the batch's `sentAt`."""
    fake_segment.poison.add("m1")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u", "messageId": "m1"},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200, reply.body
    rounds = 10
    async with aiohttp.ClientSession() as s:
        for i in range(rounds):
            await wait_for(lambda: agent.spool.dead_count == 1)
            if i == rounds - 1:
                fake_segment.poison.clear()
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                              json={"all": True}) as r:
                assert r.status == 200, await r.text()
    await wait_for(lambda: fake_segment.events)
    (req,) = fake_segment.accepted()
    assert [ev["sentAt"] for ev in req.events] == [req.body["sentAt"]]
    # A [first, end) pair for each retry still queued, and as many again not yet let go.
    assert len(agent.spool._retried) <= 6, agent.spool._retried


async def test_a_track_queued_before_a_restart_goes_with_the_batch_s_sent_at(
        make_agent: Any, fake_segment: FakeSegment, clock: Clock, fast_backoff: Any) -> None:
    """Stopped with a track taken under a clock in 1970, started again with the clock
    set: the time the agent was not running is in no count of its own, so the track's
    receipt cannot be read in the clock it was taken by; it goes with the batch's
    `sentAt`, the send time by the clock now (as the docs say), not a `sentAt` guessed
    from a count that left the stop out."""
    fake_segment.outage = (503, None)
    clock.wall_shift_ms = SKEWS["1970"]()
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u", "messageId": "m1"},
                       headers={"Authorization": basic("k")})
    assert reply.status == 200, reply.body
    await agent.stop()
    clock.wall_shift_ms = 0
    fake_segment.outage = None
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: fake_segment.events)
    (req,) = fake_segment.accepted()
    assert [ev["sentAt"] for ev in req.events] == [req.body["sentAt"]]


def _epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_a_clock_jumping_ahead_while_running_expires_nothing(
        make_agent: Any, clock: Clock) -> None:
    agent = await make_agent()
    await post(agent.port, "app1", range(3))
    clock.wall_shift_ms = 31 * DAY_MS             # the wall clock jumps; no time has passed
    assert await expired_after_prune(agent) == 0
    assert agent.spool.depth == 3
    clock.passed_ms = 31 * DAY_MS                 # now a month really passes: both agree
    assert await expired_after_prune(agent) == 3


async def test_a_device_offline_with_a_right_clock_still_expires_at_max_age(
        make_agent: Any, clock: Clock) -> None:
    """Running, clock right, no upstream for a month: max_age_days (30) still holds, and
    the time the agent saw pass is kept across a restart."""
    agent = await make_agent()
    await post(agent.port, "app1", range(3))
    for _ in range(20):                           # 20 days, with the prune loop's checks
        clock.passed_ms += DAY_MS
        assert await expired_after_prune(agent) == 0
    await agent.stop()
    agent = await make_agent()
    clock.passed_ms += 9 * DAY_MS
    assert await expired_after_prune(agent) == 0  # 29 days: kept
    clock.passed_ms += DAY_MS + 60_000
    assert await expired_after_prune(agent) == 3  # past 30 days: expired, counted
    assert (await status(agent.port))["drops"]["expired"] == 3


@pytest.mark.parametrize("woken_by", ["expiry", "post", "restart"])
async def test_an_event_posted_just_before_the_device_slept_expires_at_max_age(
        make_agent: Any, clock: Clock, woken_by: str) -> None:
    """A device that sleeps a day (suspend, which the agent's own clock counts) just after
    an app posts twice, half a minute apart; the clock is right throughout. The second
    post's events go at max_age_days (2) as the first's do. Its commit wrote no clock mark
    (one a minute), and the first mark after it was the one written on waking (by the
    expiry check, the next post's commit, or the agent's stop): read as received a day
    later, they were kept a day past max_age_days."""
    agent = await make_agent(storage={"max_age_days": 2})
    await post(agent.port, "app1", range(2))
    clock.passed_ms += 30_000
    await post(agent.port, "app1", range(2, 4))
    clock.passed_ms += DAY_MS                     # asleep
    if woken_by == "expiry":
        assert await expired_after_prune(agent) == 0
    elif woken_by == "post":
        await post(agent.port, "app2", range(10, 11))
    else:
        await agent.stop()
        agent = await make_agent(storage={"max_age_days": 2})
    clock.passed_ms += DAY_MS + 120_000           # past two days since both posts
    assert await expired_after_prune(agent) == 4
    assert agent.spool.depth == (woken_by == "post")


async def test_uptime_and_an_outage_are_the_time_the_agent_saw_pass(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """A board boots in 1970 and NTP corrects its clock an hour later (or the machine slept
    an hour): /status's uptime and an upstream's time unreachable are that hour, not the
    56 years the wall clock jumped, nor a few seconds of it."""
    clock.wall_shift_ms = SKEWS["1970"]()
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 0.02}])
    await post(agent.port, "app1", range(1))
    await wait_for(lambda: agent.forwarding.states["up"].unreachable_since is not None)
    clock.wall_shift_ms, clock.passed_ms = 0, 3_600_000
    snap = await status(agent.port)
    assert 3600 <= snap["uptime_s"] < 3660, snap["uptime_s"]
    lost = snap["upstreams"][0]["unreachable_for_s"]
    assert lost is not None and 3600 <= lost < 3660, lost


async def test_ages_in_status_are_the_time_the_agent_saw_pass_after_a_clock_correction(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """A board boots in 1970, queues and delivers events, and NTP corrects its clock an hour
    later: the oldest event has waited an hour, and the last ack was an hour ago. Read by
    the wall clock, /status said 56 years for both (an alert on the oldest event's age
    fires), and `outpost status` said the last ack was 56 years ago."""
    clock.wall_shift_ms = SKEWS["1970"]()
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 0.02}])
    await post(agent.port, "app1", range(1))
    await post(agent.port, "parked", range(100, 101))
    await wait_for(lambda: fake_nucleus.ids() == [0] and agent.spool.depth == 1)
    clock.wall_shift_ms, clock.passed_ms = 0, 3_600_000
    snap = await status(agent.port)
    assert 3600 <= snap["oldest_event_age_s"] < 3660, snap["oldest_event_age_s"]
    acked = snap["upstreams"][0]["last_ack"]
    assert acked is not None and 3600 <= snap["time"] - acked < 3660, (snap["time"], acked)


async def test_the_per_minute_history_counts_the_minutes_the_agent_saw_pass(
        make_agent: Any, clock: Clock) -> None:
    """A minute passes between two posts, then NTP sets back a clock that ran 90 s ahead:
    /status's history (the status page's chart) keeps each minute's events, labelled by
    the wall clock as it reads now. Keyed on wall-clock minutes, the set-back minute came
    again and its counts replaced the first one's (events lost from the chart)."""
    agent = await make_agent()
    await post(agent.port, "app1", range(2))
    clock.passed_ms += 60_000
    await post(agent.port, "app1", range(2, 5))
    clock.wall_shift_ms -= 90_000
    await post(agent.port, "app1", range(5, 10))
    snap = await status(agent.port)
    ins = [m["in"] for m in snap["history"]]
    # [2, 3, 5]: a real minute ended between the last two posts.
    assert [n for n in ins if n] in ([2, 8], [2, 3, 5]), ins
    ts = [m["t"] for m in snap["history"]]
    assert all(b - a == 60 for a, b in zip(ts, ts[1:])), ts
    assert snap["time"] - 60 < ts[-1] <= snap["time"] + 1, (snap["time"], ts[-1])


async def test_the_per_minute_history_counts_new_events_in_not_resends(make_agent: Any) -> None:
    """An app resends a request (its reply lost): stored once, counted as duplicates. The
    history's `in` (the status page's "in", beside "out") counted every event posted, 6
    with 3 ingested: an operator read events coming in faster than any could go out."""
    agent = await make_agent()
    await post(agent.port, "app1", range(2))
    await post(agent.port, "app1", range(2))   # the resend
    await post(agent.port, "app1", range(1, 3))   # one resent, one new
    snap = await status(agent.port)
    assert snap["counters"]["ingested"] == 3 and snap["counters"]["duplicates"] == 3
    assert sum(m["in"] for m in snap["history"]) == 3, snap["history"][-2:]


async def test_a_delivered_events_resend_is_still_known_after_a_clock_correction(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """Delivered events' dedupe keys are kept dedupe_window_h (24 h): a clock corrected
    from 1970 must not make the agent forget them, or an app's resend is delivered twice."""
    clock.wall_shift_ms = SKEWS["1970"]()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    await post(agent.port, "app1", range(1))
    await wait_for(lambda: fake_nucleus.ids() == [0] and agent.spool.depth == 0)
    clock.wall_shift_ms = 0
    await agent.spool.prune()
    await post(agent.port, "app1", range(1))      # the app resends it
    assert agent.spool.counters["duplicates"] == 1 and agent.spool.depth == 0


async def test_keys_received_under_a_clock_set_ahead_go_once_the_window_has_passed(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, tmp_path: Path) -> None:
    """A device that woke ten years ahead and was corrected: the dedupe keys of what it
    received meanwhile are known for the window (by the time the agent saw pass), then
    forgotten. They were kept, in memory and in the spool file, until the wall clock
    caught up with their receipt time: ten years."""
    clock.wall_shift_ms = SKEWS["10y-ahead"]()
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 0.02}])
    await post(agent.port, "app1", range(1))
    await wait_for(lambda: fake_nucleus.ids() == [0] and agent.spool.depth == 0)
    clock.wall_shift_ms = 0                       # corrected
    clock.passed_ms = 23 * 3_600_000              # within the window: still a resend
    await agent.spool.prune()
    await post(agent.port, "app1", range(1))
    assert agent.spool.counters["duplicates"] == 1 and agent.spool.depth == 0
    clock.passed_ms = 25 * 3_600_000              # past it by the time the agent saw pass
    await agent.spool.prune()
    assert len(agent.spool.index) == 0            # memory
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db:
        assert db.execute("SELECT count(*) FROM spent").fetchone()[0] == 0   # disk
    await post(agent.port, "app1", range(1))      # beyond the window: at-least-once
    assert agent.spool.counters["duplicates"] == 1
    await wait_for(lambda: fake_nucleus.ids() == [0, 0] and agent.spool.depth == 0)


async def test_events_queued_before_the_agent_kept_time_expire_by_the_wall_clock(
        tmp_path: Path, clock: Clock) -> None:
    """A spool left by an agent that did not count time yet: its events are judged by the
    wall clock alone, as that agent would have; events after the upgrade by both clocks."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), max_age_days=1)
    spool = await Spool.open(cfg)
    await spool.append([Event("k", NUCLEUS, i, b'{"id":%d}' % i) for i in range(2)])
    await spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
        db.execute("DELETE FROM clock_marks")   # as a spool from before the marks
    spool = await Spool.open(cfg)
    try:
        await spool.append([Event("k", NUCLEUS, 2, b'{"id":2}')])
        clock.wall_shift_ms = 2 * DAY_MS          # two days by the wall clock only
        assert await spool.prune() == 2
        assert spool.depth == 1
    finally:
        await spool.close()


async def lone_backlog(tmp_path: Path, n: int) -> None:
    """A spool of ``n`` lone events, a record each (as many apps' single posts leave)."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    await spool.append([Event(f"k{i}", NUCLEUS, i, b'{"id":%d}' % i) for i in range(n)])
    assert len(spool.live) == n                   # a record each
    await spool.close()


async def test_expiring_a_backlog_of_lone_events_leaves_the_agent_answering(
        make_agent: Any, tmp_path: Path, clock: Clock) -> None:
    """An app that posts one event at a time leaves a record per event: offline for weeks,
    tens of thousands. Expiring many at once (max_age_days lowered, say) forgot each one's
    dedupe keys, and took it out of the live records, one at a time, each a pass over the
    others: 40,000 held the event loop 68 s (its watchdog, WatchdogSec=30, kills it), 10,000
    some 4 s, while /healthz and every app waited."""
    n = 10_000
    await lone_backlog(tmp_path, n)
    agent = await make_agent(listen={"max_keys": 2 * n})
    clock.passed_ms = 31 * DAY_MS
    expiry = asyncio.create_task(agent.spool.prune())
    # The agent runs on this loop: a turn's CPU on its thread is what /healthz waited for.
    async with LoopTurns() as turns, aiohttp.ClientSession() as s:
        while not expiry.done():
            async with s.get(f"http://127.0.0.1:{agent.port}/healthz") as r:
                assert r.status == 200
    await expiry
    assert agent.spool.counters["expired"] == n and agent.spool.depth == 0
    assert turns.worst < 1.0, f"one turn of the event loop ran {turns.worst:.1f}s"


async def test_an_apps_request_is_answered_while_a_large_expiry_runs(
        make_agent: Any, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog that ages out at once (max_age_days lowered, a device offline for weeks)
    was deleted in one transaction, about 6 s a million events, and every app's request
    waited for all of it (the writer's lock). Deleted in chunks, each its own transaction,
    a request that comes meanwhile waits for one chunk at most."""
    # Many chunks of a small backlog (raising=False: the failing run had none).
    monkeypatch.setattr(spool_commit, "EXPIRE_RECORDS", 16, raising=False)
    n = 1000
    await lone_backlog(tmp_path, n)
    agent = await make_agent(listen={"max_keys": 2 * n})
    clock.passed_ms = 31 * DAY_MS
    expiry = asyncio.create_task(agent.spool.prune())   # takes the lock first
    await post(agent.port, "app1", range(1))
    assert agent.spool.counters.get("expired", 0) < n, "the request waited for all of it"
    await expiry
    assert agent.spool.counters["expired"] == n and agent.spool.depth == 1


async def test_dead_letters_expire_at_max_age_by_both_clocks(tmp_path: Path,
                                                             clock: Clock) -> None:
    """Dead letters wait for an operator max_age_days, then go (counted): kept forever,
    they grew without bound. A wall clock set ahead alone expires none."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), max_age_days=2))
    try:
        await spool.append([Event("k", NUCLEUS, i, b'{"id":%d}' % i) for i in range(3)])
        rows = await spool.fetch(spool.streams["k"].id, 0, 10)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        assert spool.dead_count == 3
        clock.wall_shift_ms = 3652 * DAY_MS       # ten years ahead, by the wall clock only
        await spool.prune()
        assert spool.dead_count == 3
        clock.wall_shift_ms = 0
        clock.passed_ms += DAY_MS                 # one day: kept
        await spool.prune()
        assert spool.dead_count == 3
        clock.passed_ms += DAY_MS + 60_000        # past two days by both clocks
        await spool.prune()
        assert spool.dead_count == 0 and spool.counters["dead_expired"] == 3
        assert await spool.dead_letters() == []
    finally:
        await spool.close()


async def test_what_came_under_a_clock_set_ahead_expires_once_the_agent_saw_max_age_pass(
        tmp_path: Path, clock: Clock) -> None:
    """A device that woke ten years ahead, then corrected: events queued and dead letters
    from meanwhile go once the agent has seen max_age_days pass since they came. They were
    kept until the wall clock caught up with their receipt time: ten years, bounded only
    by max_size_mb."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db"), max_age_days=2))
    try:
        clock.wall_shift_ms = SKEWS["10y-ahead"]()
        await spool.append([Event("k", NUCLEUS, i, b'{"id":%d}' % i) for i in range(3)])
        await spool.append([Event("d", NUCLEUS, i, b'{"id":%d}' % i) for i in range(3, 5)])
        rows = await spool.fetch(spool.streams["d"].id, 0, 10)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        clock.wall_shift_ms = 0                   # corrected
        clock.passed_ms += DAY_MS                 # one day: kept
        await spool.prune()
        assert spool.depth == 3 and spool.dead_count == 2
        clock.passed_ms += DAY_MS + 60_000        # past two days by the time the agent saw
        await spool.prune()
        assert spool.depth == 0 and spool.counters["expired"] == 3
        assert spool.dead_count == 0 and spool.counters["dead_expired"] == 2
    finally:
        await spool.close()


@pytest.mark.parametrize("written_before", [False, True], ids=["new", "older spool"])
async def test_a_dead_letter_made_under_a_clock_set_ahead_waits_max_age_from_then(
        tmp_path: Path, clock: Clock, written_before: bool) -> None:
    """An event near max_age_days is dead-lettered while the wall clock runs ahead, then
    the clock is corrected: its dead-lettering time reads as still to come, and the letter
    went at the next expiry run by its event's age alone, minutes after it was made, where
    an operator has max_age_days to export it. The time the agent saw pass since it was
    dead-lettered judges it, as a receipt time still to come is judged; in a spool an
    agent wrote before it kept that time too."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"), max_age_days=2)
    spool = await Spool.open(cfg)
    await spool.append([Event("d", NUCLEUS, 1, b'{"id":1}')])
    if written_before:
        await spool.close()
        as_v5_without_observed(Path(cfg.path))
        spool = await Spool.open(cfg)
    try:
        clock.passed_ms += 2 * DAY_MS - 3_600_000   # an hour short of max_age_days
        clock.wall_shift_ms = SKEWS["10y-ahead"]()
        rows = await spool.fetch(spool.streams["d"].id, 0, 10)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        clock.wall_shift_ms = 0                     # corrected
        clock.passed_ms += 2 * 3_600_000            # dead-lettered two hours ago
        await spool.prune()
        assert spool.dead_count == 1, "a dead letter two hours old expired"
        clock.passed_ms += 2 * DAY_MS               # past max_age_days since then
        await spool.prune()
        assert spool.dead_count == 0 and spool.counters["dead_expired"] == 1
    finally:
        await spool.close()


async def test_a_failing_expiry_is_logged_counted_and_shown_and_tried_again(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Expiry runs on its own every few minutes: when it fails (here a table of the spool
    gone, as a damaged file or disk can make it), the failure must not go unseen until
    the disk fills: it is logged, counted (/metrics), shown (/status) and tried again."""
    agent = await make_agent()
    await post(agent.port, "k", range(3))
    # The agent's own first run, at start, took the lock before this test's first await:
    # once the lock is had, it is over (asyncio's lock is first come, first served).
    async with agent.spool.lock:
        pass
    path = str(agent.spool.path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        [(table,)] = other.execute("SELECT sql FROM sqlite_master WHERE name = 'clock_marks'")
        other.execute("DROP TABLE clock_marks")
        assert await agent.spool.prune() == 0
        assert await agent.spool.prune() == 0
        other.execute(table)   # mended: the next expiry runs
    assert await agent.spool.prune() == 0
    spool = (await status(agent.port))["spool"]
    assert spool["expiry_errors"] == 2, spool
    assert "no such table: clock_marks" in spool["expiry_last_error"], spool
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
        assert "outpost_expiry_errors_total 2" in await r.text()
    failed = [r for r in caplog.records if "expiry failed" in r.getMessage()]
    assert len(failed) == 2 and failed[0].levelname == "ERROR", failed
    assert agent.spool.depth == 3   # nothing lost meanwhile


async def test_events_that_age_out_in_a_batch_the_upstream_refuses_are_settled_by_its_split(
        make_agent: Any, clock: Clock) -> None:
    """A batch is on its way when a month passes: expiry leaves its events to the answer.
    The upstream refuses the batch (400) and takes its parts: delivered, they are counted
    acked and not expired. (Expiry dropped them in flight, and the split sent them again
    once counted expired; not sent again, a batch the upstream took was counted expired
    and acked both.)"""
    got: list[list[Any]] = []
    answer = asyncio.Event()

    async def collector(request: web.Request) -> web.Response:
        ids = [e.get("id") for e in (await request.json())["data"]]
        got.append(ids)
        if len(got) == 1:
            await answer.wait()
            return web.json_response({"error": "refused"}, status=400)
        return web.json_response({"reportedIds": ids})

    async with serving("/app/{key}/track", collector) as url:
        agent = await make_agent(upstreams=[{"name": "up", "protocol": "nucleus-http",
                                             "url": url, "keys": ["app1"],
                                             "flush_interval_s": 0.02, "timeout_s": 30}])
        await post(agent.port, "app1", range(3))
        await wait_for(lambda: len(got) == 1)
        clock.passed_ms = 31 * DAY_MS
        assert await expired_after_prune(agent) == 0
        answer.set()
        await wait_for(lambda: agent.spool.depth == 0)
        assert sorted(i for ids in got[1:] for i in ids) == [0, 1, 2], got
        snap = await status(agent.port)
        assert snap["drops"]["expired"] == 0 and snap["counters"]["acked"] == 3
        assert snap["upstreams"][0]["acked"] == 3, snap["upstreams"][0]


async def test_damage_only_expiry_reads_is_moved_aside_and_old_events_still_expire(
        tmp_path: Path, clock: Clock) -> None:
    """The file is damaged while the agent runs, in its dead letters: a page only expiry
    reads (the forwarders read the queue). Expiry failed on it at every run, for good
    (logged, `expiry_errors`), and nothing moved the file aside: the queued events past
    max_age_days were never dropped, nor the dead letters, nor delivered events' dedupe
    keys forgotten. Damage a commit meets is moved aside and salvaged (docs/operations.md,
    Corrupt spool): expiry's must be too, and the old events then expire."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path), max_age_days=2))
    try:
        await spool.append([Event("d", NUCLEUS, i, b'{"id":%d,"pad":"%s"}' % (
            i, bytes(range(256)).hex().encode())) for i in range(200)])
        rows = await spool.fetch(spool.streams["d"].id, 0, 1000)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        await spool.append([Event("q", NUCLEUS, 1000 + i, b'{"id":%d}' % i) for i in range(3)])
        await spool.prune()   # as the agent's every 10 minutes: marks when they came
        assert spool.db is not None
        await spool.db.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            leaves = [n for (n,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'dead' "
                                               "AND pagetype = 'leaf' ORDER BY pageno")]
        assert len(leaves) > 4
        with open(path, "r+b") as fh:   # the disk garbles a page of dead letters
            fh.seek((leaves[len(leaves) // 2] - 1) * 4096)
            fh.write(bytes(4096))
        # Another writer's commit: the agent's connection reads the file again, as it
        # does once its cache has moved on.
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("PRAGMA user_version = 5")
        clock.wall_shift_ms = clock.passed_ms = 3 * DAY_MS
        await spool.prune()
        await spool.prune()
        assert spool.counters.get("spool_corrupt") == 1, "the damaged file was not moved aside"
        assert spool.counters.get("expired") == 3 and spool.depth == 0
        assert spool.dead_count == 0 and spool.counters.get("dead_expired", 0) > 0
        assert spool.expiry_errors == 0, spool.expiry_last_error
    finally:
        await spool.close()
