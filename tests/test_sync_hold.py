"""``max_hold_h``: what a release sends, and what it leaves held; its age by either clock;
and the sources that feed the profile failing. An agent with the tests' battery source
(agent/sync/power.py's seam), a fake Nucleus recording what arrives, and the injected
clocks (agent/clock.py CLOCK, ManualTiming): hours pass without sleeping."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.clock import Clock
from agent.families.lanes import HIGH, NORMAL
from agent.forwarder.supervisor import Seams
from agent.settings import SyncConfig
from agent.sync.metered.none import NoSource
from agent.sync.monitor import BATTERY_POLL_S, HOLD_CHECK_S, RELEASE_RECHECK_S, SyncMonitor
from agent.sync.policy import Battery
from tests.conftest import write_config
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nm_bus import FakeNetworkManager, PrivateBus
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_clock import status
from tests.test_sync_battery import Sensor, upstream
from tests.waiting import wait_for

HALF_HOUR = 1800.0
YEAR_MS = 365 * 86400 * 1000
LOW = Battery(percent=10, plugged=False)
YES = 1   # NMMetered


async def post(port: int, ids: range, kind: str = "event") -> None:
    """Nucleus events of ``kind``: ``event`` goes to the normal lane, ``error`` the high."""
    events = [{"type": kind, "name": "e", "id": i, "sessionId": 1, "machineId": "m",
               "date": "2026-01-01T00:00:00.000Z"} for i in ids]
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/app1/track", json={"data": events}) as r:
        assert r.status == 200, await r.text()


def sent(fake: FakeNucleus) -> list[int]:
    return [ev["id"] for ev in fake.events]


async def held_agent(make_agent: Any, fake: FakeNucleus, timing: ManualTiming,
                     mode: str = "hold", flush_interval_s: float = 0.05) -> Any:
    """An agent on a low battery whose rule is ``mode``, max_hold_h half an hour."""
    up = {**upstream(fake), "flush_interval_s": flush_interval_s}
    return await make_agent(upstreams=[up], seams=Seams(timing=timing), battery=Sensor(LOW),
                            sync={"on_low_battery": mode, "low_battery_pct": 20,
                                  "max_hold_h": HALF_HOUR / 3600})


async def let_pass(clock: Clock, timing: ManualTiming, seconds: float) -> None:
    """Let ``seconds`` pass on both clocks, once the max_hold_h waiter is timing a wait
    (beside the battery poll's)."""
    await wait_for(lambda: len(timing.pending()) == 2)
    clock.passed_ms += int(seconds * 1000)
    timing.advance(seconds)


async def test_after_a_release_new_events_are_held_again(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """A release sends what was queued then; an app that keeps posting (more often than
    flush_interval_s, which kept the released loop alive) is held again, and its events
    get their own max_hold_h."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing, flush_interval_s=30)
    await post(agent.port, range(1, 4))
    await let_pass(clock, timing, HALF_HOUR)
    await wait_for(lambda: agent.spool.depth == 0)
    assert sent(fake_nucleus) == [1, 2, 3] and agent.sync.releases == 1
    # What the release sent is sent: the key's loop ends, though the app goes on posting.
    await post(agent.port, range(4, 6))
    await wait_for(lambda: not agent.forwarding.loops, timeout=4)
    await post(agent.port, range(6, 8))
    assert not agent.forwarding.loops and agent.spool.depth == 4
    assert sent(fake_nucleus) == [1, 2, 3]
    await let_pass(clock, timing, RELEASE_RECHECK_S)   # the waiter looks again...
    await let_pass(clock, timing, HALF_HOUR)           # ...and times their own max_hold_h
    await wait_for(lambda: agent.spool.depth == 0)
    assert sent(fake_nucleus) == list(range(1, 8)) and agent.sync.releases == 2
    assert agent.sync.profile.mode == "hold"


async def test_after_a_release_under_priority_only_the_normal_lane_waits_again(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing, mode="priority_only",
                             flush_interval_s=30)
    await post(agent.port, range(1, 4))
    await let_pass(clock, timing, HALF_HOUR)
    await wait_for(lambda: agent.spool.depth == 0)
    await post(agent.port, range(4, 6))   # normal: held again
    # The key's loop goes back to the high lane alone.
    loops = agent.forwarding.loops
    await wait_for(lambda: all(loop.lanes == (HIGH,) for loop in loops.values()), timeout=4)
    await post(agent.port, range(6, 7), kind="error")   # high: sent as ever...
    agent.forwarding.flush()   # ...now, not after flush_interval_s (real seconds)
    # Its row goes once its ack is processed, a moment after the upstream has it.
    await wait_for(lambda: 6 in sent(fake_nucleus) and agent.spool.depth <= 2)
    assert sent(fake_nucleus) == [1, 2, 3, 6] and agent.spool.depth == 2
    assert all(loop.lanes == (HIGH,) for loop in loops.values())


async def test_a_clock_set_back_does_not_defeat_max_hold_h(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """The age is the agent's own too: a clock set back a year after the events arrived
    (NTP, an operator) must not hold them for a year."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing)
    await post(agent.port, range(1, 4))
    await let_pass(clock, timing, 60)   # the waiter has timed them by the right clock
    clock.wall_shift_ms = -YEAR_MS
    await let_pass(clock, timing, HALF_HOUR)
    await wait_for(lambda: agent.spool.depth == 0, timeout=4)
    assert sent(fake_nucleus) == [1, 2, 3] and agent.sync.releases == 1


class Looks:
    """The monitor's look for the oldest held event, answered when the test says."""

    def __init__(self) -> None:
        self.calls = 0
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.oldest: float | None = None   # age in seconds; None: nothing held

    async def __call__(self, lanes: tuple[int, ...], after: int) -> float | None:
        self.calls += 1
        found = self.oldest
        self.asked.set()
        await self.answer.wait()
        return found


async def test_a_commit_while_the_hold_looks_for_its_oldest_event_is_timed() -> None:
    """The look finds nothing; an app commits before it returns: the commit must not be
    lost, or nothing is released until the next commit (possibly never)."""
    timing = ManualTiming()
    looks = Looks()
    monitor = SyncMonitor(SyncConfig(on_low_battery="hold", max_hold_h=0.5), NoSource("none"),
                          lambda: LOW, looks, timing, lambda: None, lambda: 0)
    await monitor.start()
    try:
        await asyncio.wait_for(looks.asked.wait(), 5)   # reading: nothing is held yet
        looks.oldest = 0.0
        monitor.on_new_data()   # an app's commit, while the read is on its way back
        looks.answer.set()
        await wait_for(lambda: looks.calls == 2, timeout=4)
        # Timed (the waiter reads the clocks each minute), beside the battery poll.
        await wait_for(lambda: timing.pending() == [BATTERY_POLL_S, HOLD_CHECK_S])
    finally:
        await monitor.stop()


class Failing:
    """A battery sensor that reads low once, then raises (a driver gone)."""

    def __init__(self) -> None:
        self.fail = False

    def __call__(self) -> Battery | None:
        if self.fail:
            raise ValueError("battery sensor gone")
        return LOW


async def test_a_battery_sensor_that_fails_reads_as_unknown(
        make_agent: Any, fake_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    """As a failing metered source does: a failed reading keeps no hold."""
    timing = ManualTiming()
    sensor = Failing()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], seams=Seams(timing=timing),
                             battery=sensor, sync={"on_low_battery": "hold", "low_battery_pct": 20})
    assert agent.sync.profile.mode == "hold"
    await post(agent.port, range(1, 3))
    sensor.fail = True
    with caplog.at_level(logging.ERROR, logger="outpost.sync"):
        await wait_for(lambda: BATTERY_POLL_S in timing.pending())
        timing.advance(BATTERY_POLL_S)
        await wait_for(lambda: agent.sync.errors == 1)
    view = agent.sync.view()
    assert "battery sensor gone" in view["last_error"]
    assert "battery sensor gone" in caplog.text
    assert view["battery_percent"] is None and view["profile"] == "normal"
    await wait_for(lambda: agent.spool.depth == 0)
    assert sent(fake_nucleus) == [1, 2]


async def test_a_reload_that_routes_held_events_times_them_for_max_hold_h(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, tmp_path: Path) -> None:
    """Events of a key no upstream takes are not timed (held.py); a reload that gives the
    key an upstream, [sync] unchanged, must time them for max_hold_h, or, with no app
    posting again, the hold keeps them for good."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing)
    events = [{"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
               "date": "2026-01-01T00:00:00.000Z"} for i in (1, 2)]
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/app/app2/track", json={"data": events}) as r:
        assert r.status == 200, await r.text()
    assert agent.spool.depth == 2
    # Nothing routed is held: the waiter waits for data, timing nothing (the battery poll).
    await wait_for(lambda: timing.pending() == [BATTERY_POLL_S])
    up = {**upstream(fake_nucleus), "keys": ["app1", "app2"], "flush_interval_s": 0.05}
    write_config(Path(agent.config_path), tmp_path / "spool.db", upstreams=[up],
                 sync={"on_low_battery": "hold", "low_battery_pct": 20,
                       "max_hold_h": HALF_HOUR / 3600})
    await agent.reload()
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops
    await let_pass(clock, timing, HALF_HOUR)
    await wait_for(lambda: agent.spool.depth == 0)
    assert sent(fake_nucleus) == [1, 2] and agent.sync.releases == 1


async def test_a_hold_that_comes_while_a_loop_reads_its_queue_sends_nothing_of_it(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A loop draining a key reads the spool (on the reader thread) between batches; a
    hold that comes during that read (the battery runs low, a metered network) must stop
    what the read returns from going out, as it stops the batches after it (an HTTP
    uplink has no connection to open first, whose opening checked). Only a send already
    in flight finishes."""
    timing = ManualTiming()
    sensor = Sensor(Battery(percent=50, plugged=False))
    up = {**upstream(fake_nucleus), "protocol": "nucleus-http", "url": fake_nucleus.http_url,
          "batch_max_events": 2, "flush_interval_s": 30}
    agent = await make_agent(upstreams=[up], seams=Seams(timing=timing), battery=sensor,
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    await post(agent.port, range(1, 3))
    await wait_for(lambda: agent.spool.depth == 0)   # sent: the loop lingers
    loop = agent.forwarding.loops["app1"]

    # The loop's next read is caught on the reader thread, before its query runs.
    reading, go = threading.Event(), threading.Event()

    def trace(sql: str) -> None:
        if "FROM records" in sql and not reading.is_set():
            reading.set()
            go.wait(10)
    assert agent.spool.reader is not None
    await agent.spool.reader.run(lambda conn: conn.set_trace_callback(trace))
    await post(agent.port, range(3, 5))   # a full batch: sent as soon as it is read
    await wait_for(reading.is_set)
    sensor.reading = LOW   # the battery runs low while the read is under way
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: loop.stopping)
    go.set()
    await wait_for(lambda: not agent.forwarding.loops)
    assert sent(fake_nucleus) == [1, 2] and agent.spool.depth == 2


async def _released_then_young(agent: Any, fake_nucleus: FakeNucleus, clock: Clock,
                               timing: ManualTiming) -> Any:
    """Events 1-3 held past max_hold_h and released, the release put off by the upstream's
    Retry-After of 300 s (parked), then events 4-5 posted after it: young, held. The
    upstream's state."""
    fake_nucleus.outage = (503, "300")
    await post(agent.port, range(1, 4))
    await let_pass(clock, timing, HALF_HOUR)
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.parked == 1)   # for the upstream's 300 s
    await post(agent.port, range(4, 6))   # after the release: held
    return state


async def test_a_release_still_sending_after_the_waiters_minute_is_not_repeated(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A release that takes longer than the minute after which the waiter looks again (a
    slow link, a large backlog) is still one release: what it let go is the oldest event
    still queued, and must not count as a second one, which would send the events that
    came since (young, held on the very network the hold is for), and count and log a
    release every minute."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing, flush_interval_s=30)
    fake_nucleus.answering.clear()   # the release's batch goes out; its ack waits
    await post(agent.port, range(1, 4))
    with caplog.at_level(logging.INFO, logger="outpost.sync"):
        await let_pass(clock, timing, HALF_HOUR)
        await wait_for(lambda: sent(fake_nucleus) == [1, 2, 3])
        await post(agent.port, range(4, 6))   # after the release: held
        await let_pass(clock, timing, RELEASE_RECHECK_S)
        await wait_for(lambda: len(timing.pending()) == 2)   # the waiter has looked again
        fake_nucleus.answering.set()
        # The release is over: its loop has ended (a hold sends nothing after it).
        await wait_for(lambda: agent.spool.depth <= 2 and not agent.forwarding.loops)
    assert sent(fake_nucleus) == [1, 2, 3] and agent.spool.depth == 2
    assert agent.sync.releases == 1
    assert caplog.text.count("sending everything queued") == 1


async def test_a_release_the_upstream_puts_off_is_sent_when_it_may_and_counted_once(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """The upstream answers the release with a Retry-After (an outage): the release waits
    it out, then sends what it let go, once; meanwhile the waiter must not release again
    each minute (a count and a log line a minute, for one release), and the events that
    came after it stay held."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing, flush_interval_s=30)
    state = await _released_then_young(agent, fake_nucleus, clock, timing)

    async def minutes(n: int) -> None:
        """Let ``n`` minutes pass once the battery poll and the waiter wait again."""
        await wait_for(lambda: timing.pending()[:2] == [60.0, 60.0])
        clock.passed_ms += n * 60_000
        timing.advance(n * 60.0)

    await minutes(1)
    await minutes(1)
    fake_nucleus.outage = None
    await minutes(3)   # the Retry-After is over
    await wait_for(lambda: agent.spool.depth <= 2 and not agent.forwarding.loops
                   and state.parked == 0)
    assert sent(fake_nucleus) == [1, 2, 3] and agent.spool.depth == 2
    assert agent.sync.releases == 1


@pytest.mark.parametrize(("low_battery_pct", "rule"),
                         [(20, "hold"), (25, "hold"), (20, "priority_only")])
async def test_a_reload_while_a_release_is_under_way_sends_only_what_it_let_go(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, tmp_path: Path,
        low_battery_pct: int, rule: str) -> None:
    """A reload (one that changes nothing: config management reloads on every run; or one
    that changes [sync] and still holds, as it did or the normal lane alone) comes while a
    release waits out the upstream's Retry-After. The release goes on with the new
    forwarders, and the events that came after it stay held: a reload started a release
    afresh, up to the events queued as it ended, which sent those young events too, on
    the network the hold is for, and counted a second release."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing, flush_interval_s=30)
    fake_nucleus.outage = (503, "300")
    await post(agent.port, range(1, 4))
    await let_pass(clock, timing, HALF_HOUR)
    await wait_for(lambda: agent.forwarding.states["up"].parked == 1)   # for 300 s
    await post(agent.port, range(4, 6))   # after the release: held
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 30}],
                 sync={"on_low_battery": rule, "low_battery_pct": low_battery_pct,
                       "max_hold_h": HALF_HOUR / 3600})
    await agent.reload()
    assert agent.sync.profile.mode == rule
    fake_nucleus.outage = None
    await wait_for(lambda: timing.pending()[:2] == [60.0, 60.0])
    clock.passed_ms += 300_000
    timing.advance(300.0)   # the Retry-After is over
    state = agent.forwarding.states["up"]
    # Its loop ends (hold), or goes back to the high lane alone (priority_only).
    await wait_for(lambda: agent.spool.depth <= 2 and state.parked == 0 and all(
        loop.until is None and NORMAL not in loop.lanes and rule != "hold"
        for loop in agent.forwarding.loops.values()))
    assert sent(fake_nucleus) == [1, 2, 3] and agent.spool.depth == 2
    assert agent.sync.releases == 1


async def test_events_being_committed_as_a_release_comes_are_timed_after_it(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock) -> None:
    """A release comes while an app's events are being committed (to a key with nothing
    else queued, so no loop of the release finds them): they are what comes after the
    release, held and timed for their own max_hold_h, not left out of both for good."""
    timing = ManualTiming()
    up = {**upstream(fake_nucleus), "keys": ["app1", "app2"]}
    agent = await make_agent(upstreams=[up], seams=Seams(timing=timing), battery=Sensor(LOW),
                             sync={"on_low_battery": "hold", "low_battery_pct": 20,
                                   "max_hold_h": HALF_HOUR / 3600})
    await post(agent.port, range(1, 4))
    # The next commit is caught on the writer thread, before its records are written.
    writing, go = threading.Event(), threading.Event()

    def trace(sql: str) -> None:
        if sql.startswith("INSERT INTO records") and not writing.is_set():
            writing.set()
            go.wait(10)
    assert agent.spool.db is not None
    await agent.spool.db.run(lambda conn: conn.set_trace_callback(trace))
    events = [{"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
               "date": "2026-01-01T00:00:00.000Z"} for i in (4, 5)]
    async with aiohttp.ClientSession() as s:
        posting = asyncio.ensure_future(s.post(
            f"http://127.0.0.1:{agent.port}/app/app2/track", json={"data": events}))
        await wait_for(writing.is_set)
        await let_pass(clock, timing, HALF_HOUR)
        await wait_for(lambda: agent.sync.releases == 1)   # before they are committed
        go.set()
        async with await posting as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: agent.spool.depth == 2 and not agent.forwarding.loops)
    assert sent(fake_nucleus) == [1, 2, 3] and agent.sync.releases == 1
    await let_pass(clock, timing, RELEASE_RECHECK_S)
    await let_pass(clock, timing, HALF_HOUR)   # (the waiter times them)
    await wait_for(lambda: agent.spool.depth == 0)
    assert sent(fake_nucleus) == [1, 2, 3, 4, 5] and agent.sync.releases == 2


async def held_while_sending(make_agent: Any, faulty: FaultyUpstream, answer_after_s: float,
                             timeout_s: float) -> tuple[Any, ManualTiming, Sensor]:
    """An agent whose one key's batch (events 1-3) is in flight, answered ``answer_after_s``
    after it is sent, when a low battery makes the transmit profile hold."""
    faulty.script = [Fault("slow", delay=answer_after_s)]   # then answered properly
    timing = ManualTiming()
    sensor = Sensor(Battery(percent=50, plugged=False))
    up = {"name": "up", "protocol": "nucleus-http", "url": faulty.http_url, "keys": ["app1"],
          "flush_interval_s": 0.05, "timeout_s": timeout_s}
    agent = await make_agent(upstreams=[up], seams=Seams(timing=timing, grace_s=0.2),
                             battery=sensor,
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    await post(agent.port, range(1, 4))
    await wait_for(lambda: len(faulty.requests) == 1)   # in flight
    sensor.reading = LOW
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    return agent, timing, sensor


async def test_a_send_in_flight_when_a_hold_comes_finishes_and_its_ack_is_kept(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """docs/operations.md (Sync policy): 'A send already in flight finishes and its
    acknowledgement is kept.' A hold stopped the key's loop with a stop's grace (5 s, the
    one a shutdown or a reload waits): an upstream slower than that (a large batch on the
    metered link the hold is for) had its request cut short, its answer thrown away, and
    the same events went to it again once the hold ended."""
    agent, timing, sensor = await held_while_sending(make_agent, faulty, 1.0, 10)
    await wait_for(lambda: not agent.forwarding.loops)   # ended once its send did
    assert agent.spool.depth == 0 and agent.forwarding.states["up"].acked == 3
    assert faulty.requests[0].acked == [1, 2, 3]

    sensor.reading = Battery(percent=50, plugged=True)
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.sync.profile.mode == "normal")
    await post(agent.port, range(4, 5))   # the key's next loop: nothing of the first again
    await wait_for(lambda: agent.spool.depth == 0)
    assert [ev["id"] for r in faulty.requests for ev in r.events] == [1, 2, 3, 4]


async def test_a_shutdown_while_a_hold_waits_for_a_send_in_flight_waits_only_its_grace(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """The hold lets a send in flight finish; a shutdown that comes meanwhile still cuts it
    after the stop's grace, as without the hold."""
    agent, _, _ = await held_while_sending(make_agent, faulty, 30.0, 60)
    loop = agent.forwarding.loops["app1"]
    assert loop.stopping
    await asyncio.wait_for(agent.stop(), 5)
    assert loop.cut_short == 1 and agent.spool is not None


@pytest.mark.parametrize("ended_by", ["its time", "a flush"])
async def test_a_key_whose_retry_comes_during_a_hold_is_not_shown_in_backoff(
        make_agent: Any, fake_nucleus: FakeNucleus, ended_by: str) -> None:
    """The upstream refused (503, Retry-After: 120), then a low battery holds. Once that
    wait is over (or `outpost flush` ended it) the key waits for the hold alone: status
    said `backoff` for as long as the hold lasted (hours), as if the upstream still
    refused."""
    timing = ManualTiming()
    sensor = Sensor(Battery(percent=50, plugged=False))
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], seams=Seams(timing=timing),
                             battery=sensor, sync={"on_low_battery": "hold",
                                                   "low_battery_pct": 20})
    fake_nucleus.outage = (503, "120")
    await post(agent.port, range(1, 4))
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.parked == 1)
    assert (await status(agent.port))["upstreams"][0]["state"] == "backoff"
    fake_nucleus.outage = None
    sensor.reading = LOW
    await wait_for(lambda: timing.pending()[:1] == [BATTERY_POLL_S])
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    if ended_by == "a flush":
        async with aiohttp.ClientSession() as s, \
                s.post(f"http://127.0.0.1:{agent.port}/flush") as r:
            assert r.status == 200, await r.text()
    else:
        timing.advance(max(timing.pending()))   # the Retry-After is over, under the hold
    await wait_for(lambda: state.parked == 0)
    snap = await status(agent.port)
    assert snap["sync"]["profile"] == "hold" and snap["sync"]["held_events"] == 3
    assert snap["upstreams"][0]["state"] == "idle", snap["upstreams"][0]
    assert sent(fake_nucleus) == []
    sensor.reading = Battery(percent=14, plugged=True)
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.spool.depth == 0)
    assert sent(fake_nucleus) == [1, 2, 3]


@pytest.mark.parametrize("then", ["priority_only", "hold"])
async def test_a_release_under_way_goes_on_when_the_profile_changes_and_still_holds(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, bus: PrivateBus,
        nm: FakeNetworkManager, then: str) -> None:
    """The laptop of docs/operations.md (metered: priority_only, low battery: hold). A
    release waits out the upstream's Retry-After when the profile changes to another that
    still holds the normal lane: the charger goes in on the metered link (hold ->
    priority_only), or the battery runs low on it (priority_only -> hold). The release
    goes on with what it let go, once; the normal events that came after it stay held
    for their own max_hold_h. The change started the release afresh, up to the events
    queued then: those young events went out too, on the metered link, and releases
    counted two."""
    start_low = then == "priority_only"
    await nm.set_metered(YES)
    timing = ManualTiming()
    sensor = Sensor(LOW if start_low else Battery(percent=50, plugged=False))
    agent = await make_agent(
        upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 30}],
        seams=Seams(timing=timing), battery=sensor,
        sync={"on_metered": "priority_only", "on_low_battery": "hold", "low_battery_pct": 20,
              "max_hold_h": HALF_HOUR / 3600, "dbus_address": bus.address})
    assert agent.sync.profile.mode == ("hold" if start_low else "priority_only")
    state = await _released_then_young(agent, fake_nucleus, clock, timing)
    sensor.reading = Battery(percent=50, plugged=True) if start_low else LOW
    await wait_for(lambda: timing.pending()[:2] == [60.0, 60.0])   # the poll, the recheck
    clock.passed_ms += 60_000
    timing.advance(60.0)
    await wait_for(lambda: agent.sync.profile.mode == then)
    # The waiter has looked again: what it waits for now is a wait of its own.
    await wait_for(lambda: timing.pending()[:2] == [60.0, 60.0])
    fake_nucleus.outage = None
    clock.passed_ms += 240_000
    timing.advance(240.0)   # the Retry-After is over
    await wait_for(lambda: state.parked == 0 and agent.spool.depth <= 2 and all(
        loop.until is None and NORMAL not in loop.lanes
        for loop in agent.forwarding.loops.values()))
    assert sent(fake_nucleus) == [1, 2, 3] and agent.spool.depth == 2
    assert agent.sync.releases == 1


async def test_a_hold_that_comes_while_a_release_reads_sends_nothing_the_release_did_not_let_go(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, bus: PrivateBus,
        nm: FakeNetworkManager) -> None:
    """A release under priority_only (metered) sends the high lane unbounded and the normal
    lane up to its seq. The battery runs low while the key's loop reads young high events:
    the release goes on under the hold, up to its seq in both lanes now, and what that
    read returned past it must not go out, as a hold that stops a loop stops what a read
    under way returns."""
    await nm.set_metered(YES)
    timing = ManualTiming()
    sensor = Sensor(Battery(percent=50, plugged=False))
    agent = await make_agent(
        upstreams=[{**upstream(fake_nucleus), "flush_interval_s": 30, "batch_max_events": 2}],
        seams=Seams(timing=timing), battery=sensor,
        sync={"on_metered": "priority_only", "on_low_battery": "hold", "low_battery_pct": 20,
              "max_hold_h": HALF_HOUR / 3600, "dbus_address": bus.address})
    assert agent.sync.profile.mode == "priority_only"
    fake_nucleus.answering.clear()   # the release's batches go out; their acks wait
    await post(agent.port, range(1, 5))
    await let_pass(clock, timing, HALF_HOUR)
    # The fake reads a frame once it has answered the last: 3 and 4 wait in the socket.
    await wait_for(lambda: sent(fake_nucleus) == [1, 2])

    # The loop's next read of the high lane is caught on the reader thread, before it runs.
    reading, go = threading.Event(), threading.Event()

    def trace(sql: str) -> None:
        if "FROM records WHERE stream = " in sql and "lane = 0 AND id >=" in sql \
                and not reading.is_set():
            reading.set()
            go.wait(10)
    assert agent.spool.reader is not None
    await agent.spool.reader.run(lambda conn: conn.set_trace_callback(trace))
    await post(agent.port, range(10, 12), kind="error")   # high, after the release: a batch
    await wait_for(reading.is_set)
    sensor.reading = LOW   # the battery runs low while the read is under way
    await wait_for(lambda: timing.pending()[:2] == [60.0, 60.0])
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    go.set()
    fake_nucleus.answering.set()
    await wait_for(lambda: agent.spool.depth <= 2 and not agent.forwarding.loops)
    assert sent(fake_nucleus) == [1, 2, 3, 4] and agent.spool.depth == 2
    assert agent.sync.releases == 1
