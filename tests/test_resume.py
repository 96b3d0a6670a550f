"""Delivery resumes within seconds after an outage of any length (issue 13 §1).

A key's backoff grows to a minute; its upstream's prober (agent/forwarder/probe.py)
probes an unreachable upstream every 2 s and retries the parked keys the moment it
answers, and a network change probes at once. A live upstream that answers badly
keeps its backoff, and a Retry-After holds.

The agents run in process on a manual forwarder clock (tests/fakes/manual_timing.py):
the backoff's real policy reaches its cap without waiting, and because time moves only
when a test says so, a delivery that happens while a key's own retry is still 30 s
away can only have come from a probe or a network change. The network watcher is
left out (``NO_NETWATCH``) except in the netlink test: a network change made by
another process on this machine would probe too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import shutil
import socket
import sys
from typing import Any

import aiohttp
import pytest

from agent.clock import Clock
from agent.forwarder import timing as timing_mod
from agent.forwarder.backoff import BACKOFF, Backoff
from agent.forwarder.probe import PROBE_S
from agent.forwarder.state import UpstreamState
from agent.forwarder.supervisor import NET_GAP_S, Seams
from agent.forwarder.timing import LOOP_TIMING
from agent.netwatch import NetWatch
from tests.conftest import FAST_BACKOFF
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_upstream_faults import drained, event, send, upstream
from tests.waiting import wait_for


def no_netwatch(on_change: Any) -> NetWatch | None:
    return None


NO_NETWATCH = no_netwatch


def seams(timing: ManualTiming, backoff: Backoff = BACKOFF, **kw: Any) -> Seams:
    return Seams(timing=timing, backoff=backoff, **{"watch_network": NO_NETWATCH, **kw})


def nucleus_upstream(fake: FakeNucleus, protocol: str) -> dict[str, Any]:
    return {"name": "up", "protocol": protocol,
            "url": fake.url if protocol == "nucleus-ws" else fake.http_url,
            "flush_interval_s": 0.02, "timeout_s": 0.6}


async def parked_while_down(make_agent: Any, down_nucleus: FakeNucleus,
                            timing: ManualTiming) -> Any:
    """An agent whose upstream is down, with 5 events queued, the key parked after one
    failure (a backoff of a minute) and the upstream probed: nothing else runs."""
    agent = await make_agent(upstreams=[nucleus_upstream(down_nucleus, "nucleus-http")],
                             seams=seams(timing, Backoff(base_s=60.0)))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: state.retries == 1 and state.unreachable_since is not None)
    await quiet(agent, timing, 2)   # the key's retry (30 s or more) and the next probe
    return agent


async def quiet(agent: Any, timing: ManualTiming, timers: int) -> None:
    """Wait until no key's loop runs and no probe is in flight: ``timers`` timers wait."""
    await wait_for(lambda: not agent.forwarding.loops and len(timing.pending()) == timers
                   and not any(p.probing for p in agent.forwarding.probers.values()))


async def get_json(agent: Any, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}{path}") as r:
        return await (r.json() if path == "/status" else r.text())


def probed_failures(state: UpstreamState, n: int) -> bool:
    """``n`` sends failed and ``n`` probes finished."""
    return state.retries == n and state.probes == n


@pytest.fixture
async def down_nucleus() -> Any:
    """A FakeNucleus whose port refuses connections until ``come_back``."""
    fake = await FakeNucleus().start()
    await fake.go_down()
    yield fake
    await fake.stop()


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_delivery_resumes_within_3s_after_an_outage_that_took_the_backoff_to_its_cap(
        make_agent: Any, down_nucleus: FakeNucleus, protocol: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outpost.probe")
    timing = ManualTiming()
    agent = await make_agent(upstreams=[nucleus_upstream(down_nucleus, protocol)],
                             seams=seams(timing))
    state = agent.forwarding.states["up"]
    posted = list(range(5))
    await send(agent, [event(i) for i in posted])
    # Fail until the key waits out a capped backoff: the 8th wait is [30, 60) s. The app
    # keeps posting meanwhile; its events wait with the parked key. The count is read once
    # quiet: a retry's failure is a step of its own, and one that landed after the post
    # below cost another turn, whose advance (the next probe) ate into that wait.
    while True:
        await quiet(agent, timing, 2)   # the key's retry and the prober's next probe
        if state.retries >= 8:
            break
        timing.advance(timing.pending()[0])
        if state.retries % 2:
            posted.append(len(posted))
            await send(agent, [event(posted[-1])])
    probe_in, retry_in = timing.pending()
    assert probe_in <= PROBE_S and retry_in >= BACKOFF.cap_s / 2
    status = (await get_json(agent, "/status"))["upstreams"][0]
    assert status["state"] == "unreachable" and status["probes"] >= 8
    assert status["unreachable_for_s"] is not None
    assert 'outpost_upstream_state{upstream="up",state="unreachable"} 1' in \
        await get_json(agent, "/metrics")

    await down_nucleus.come_back()
    back_at = timing.now()
    timing.advance(probe_in)   # the next probe; the key's own retry is 30 s or more away
    await wait_for(lambda: agent.spool.depth == 0)
    assert timing.now() - back_at <= 3.0
    assert down_nucleus.ids() == posted   # each event once, in order
    assert state.unreachable_since is None
    assert (await get_json(agent, "/status"))["upstreams"][0]["state"] != "unreachable"
    await wait_for(lambda: timing.pending() == [PROBE_S])   # the recovery report's check
    timing.advance(PROBE_S)   # everything was delivered: it is logged
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1, recovered
    assert re.fullmatch(rf"upstream up recovered after \d+s; {len(posted)} events delivered",
                        recovered[0]), recovered


async def test_a_live_upstream_answering_503_keeps_its_backoff(make_agent: Any,
                                                                faulty: FaultyUpstream) -> None:
    """A 503 comes from an upstream that is up: the probe after each failure connects, so
    the upstream is not marked unreachable, not probed again, and its key retries only
    when its own backoff says (a failing upstream is not hammered with batches)."""
    faulty.script = [Fault("status", 503) for _ in range(4)]
    timing = ManualTiming()
    backoff = Backoff(base_s=8.0)  # waits of 4 s and more: each failure gets its own probe
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")],
                             seams=seams(timing, backoff))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    for failure in range(1, 5):
        await wait_for(functools.partial(probed_failures, state, failure))
        await quiet(agent, timing, 1)   # the key's retry only: no probe is scheduled
        assert state.unreachable_since is None
        (delay,) = timing.pending()
        assert delay >= backoff.delay(failure - 1, rng=lambda: 0.0)
        timing.advance(delay - 0.01)
        assert timing.pending() == [pytest.approx(0.01)]
        assert len(faulty.requests) == failure
        timing.advance(0.01)
    await drained(agent, faulty, 5)
    assert [r.status for r in faulty.requests] == [503, 503, 503, 503, 200]


async def test_retry_after_holds_through_a_network_change(make_agent: Any,
                                                          faulty: FaultyUpstream) -> None:
    """The upstream's own wait is not probed at all, and a network change, which ends
    an unreachable upstream's probe wait, leaves it alone."""
    faulty.script = [Fault("status", 503, {"Retry-After": "30"})]
    timing = ManualTiming()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams(timing))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await quiet(agent, timing, 1)
    assert timing.pending() == [30.0] and state.probes == 0
    agent.forwarding.network_changed()
    await quiet(agent, timing, 1)
    assert timing.pending() == [30.0] and state.probes == 0   # the key still waits the 30 s
    timing.advance(29.9)
    assert len(faulty.requests) == 1 and timing.pending() == [pytest.approx(0.1)]
    timing.advance(0.1)
    await drained(agent, faulty, 5)
    assert [r.status for r in faulty.requests] == [503, 200]


async def test_network_changes_do_not_cut_the_backoff_of_an_upstream_that_answered(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """An upstream that answered with an error (a 5xx) was reachable: a network change
    ends only a *probe* wait. A noisy netlink feed (a flapping link, a VPN renewing its
    routes) reporting a change every ``NET_GAP_S`` must not turn the key's minute of
    backoff into a resend every 2 s, nor probe the upstream each time."""
    faulty.script = [Fault("status", 503)]
    timing = ManualTiming()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")],
                             seams=seams(timing, Backoff(base_s=60.0)))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: state.retries == 1 and state.probes == 1)
    await quiet(agent, timing, 1)
    (retry_in,) = timing.pending()
    assert retry_in >= 30.0
    while timing.now() + NET_GAP_S < retry_in:   # bounded: 30-60 s of changes
        agent.forwarding.network_changed()
        await quiet(agent, timing, 1)   # nothing started: no loop, no probe in flight
        timing.advance(NET_GAP_S)
    assert len(faulty.requests) == 1 and state.probes == 1
    timing.advance(retry_in - timing.now())   # the key's own retry
    await drained(agent, faulty, 5)
    assert [r.status for r in faulty.requests] == [503, 200]


async def test_a_network_change_ends_the_probe_wait_of_an_unreachable_upstream(
        make_agent: Any, down_nucleus: FakeNucleus) -> None:
    """In process, the same as the netlink test below: no forwarder time passes, so only
    the change can be what delivers. A burst probes once now and once ``NET_GAP_S``
    later."""
    timing = ManualTiming()
    agent = await parked_while_down(make_agent, down_nucleus, timing)
    state = agent.forwarding.states["up"]
    await down_nucleus.come_back()
    for _ in range(3):
        agent.forwarding.network_changed()
    await wait_for(lambda: agent.spool.depth == 0)
    assert timing.now() == 0.0 and down_nucleus.ids() == list(range(5))
    assert state.probes == 2 and state.unreachable_since is None


def _can_change_addresses() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and bool(shutil.which("ip"))


async def _ip(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("ip", *args)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


@pytest.mark.skipif(not _can_change_addresses(), reason="needs Linux, root and iproute2 "
                    "(CI runs as root)")
async def test_a_real_network_change_retries_at_once(make_agent: Any,
                                                     down_nucleus: FakeNucleus) -> None:
    """Netlink: an address added to ``lo`` tells the agent at once. No forwarder time
    passes, so neither the key's retry (30 s or more away) nor the next probe (2 s) can
    be what delivers the events."""
    timing = ManualTiming()
    agent = await make_agent(upstreams=[nucleus_upstream(down_nucleus, "nucleus-http")],
                             seams=Seams(timing=timing, backoff=Backoff(base_s=60.0)))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: state.retries == 1
                   and state.unreachable_since is not None)
    await quiet(agent, timing, 2)
    assert min(timing.pending()) == PROBE_S and max(timing.pending()) >= 30.0
    await down_nucleus.come_back()
    address = f"127.{random.randrange(64, 250)}.{random.randrange(256)}.77/32"
    await _ip("addr", "add", address, "dev", "lo")
    try:
        await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    finally:
        await _ip("addr", "del", address, "dev", "lo")
    assert timing.now() == 0.0 and down_nucleus.ids() == list(range(5))


async def test_a_retry_timer_that_fires_a_hair_early_still_retries(make_agent: Any,
                                                                   faulty: FaultyUpstream) -> None:
    """Timers may fire within the clock's resolution of their time (asyncio's loop runs a
    callback up to its clock resolution early; ManualTiming allows 1e-9 s). Time that
    arrives in parts (ten times 0.1 is 0.9999999999999999) must still retry the key."""
    faulty.script = [Fault("status", 503, {"Retry-After": "1"})]
    timing = ManualTiming()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams(timing))
    await send(agent, [event(i) for i in range(5)])
    await quiet(agent, timing, 1)
    assert timing.pending() == [1.0]
    for _ in range(10):
        timing.advance(0.1)
    await drained(agent, faulty, 5)
    assert [r.status for r in faulty.requests] == [503, 200]


def test_the_loop_clock_timers_know_their_time_on_uvloop() -> None:
    """The agent runs on uvloop, whose ``call_at`` for a time already past returns a plain
    Handle without ``when()``; the supervisor's retry timer reads it (a park compares
    retry times with it, and a retry that fires early is due at its time)."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[float]:
        now = LOOP_TIMING.now()
        fired = asyncio.Event()
        past = LOOP_TIMING.call_at(now - 1.0, fired.set)
        future = LOOP_TIMING.call_at(now + 60.0, fired.set)
        future.cancel()
        await asyncio.wait_for(fired.wait(), 5)
        return [past.when(), future.when()]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        past_when, future_when = runner.run(main())
    assert past_when < future_when


async def test_a_retry_after_the_machine_slept_through_is_not_waited_again_once_awake(
        make_agent: Any, faulty: FaultyUpstream, clock: Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop's clock stands still while the machine sleeps: a laptop that slept
    through an upstream's Retry-After of ten minutes waited those ten minutes again, awake,
    before it sent anything. The agent's own clock counts the sleep (agent/clock.py:
    ``passed_ms`` moves it, not the loop's); the forwarders' timers read it every
    SLEEP_CHECK_S (a minute; here 50 ms)."""
    monkeypatch.setattr(timing_mod, "SLEEP_CHECK_S", 0.05, raising=False)
    faulty.script = [Fault("status", 429, {"Retry-After": "600"})]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")],
                             seams=Seams(backoff=FAST_BACKOFF, watch_network=NO_NETWATCH))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: state.retries == 1 and not agent.forwarding.loops)
    clock.passed_ms += 601_000   # suspended for ten minutes and a second, then woken
    await drained(agent, faulty, 5, timeout=3.0)
    assert [r.status for r in faulty.requests] == [429, 200]


async def test_a_recovery_that_stalls_is_logged_at_its_first_quiet_point(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    """The upstream takes connections again but acknowledges nothing: its recovery line
    does not wait for a backlog that is not moving. It is logged at the first check
    without an ack while nothing is sent, with what is still queued."""
    caplog.set_level(logging.INFO, logger="outpost.probe")
    timing = ManualTiming()
    agent = await parked_while_down(make_agent, down_nucleus, timing)
    state = agent.forwarding.states["up"]
    down_nucleus.reply_raw = b'{"reportedIds": []}'
    await down_nucleus.come_back()
    timing.advance(PROBE_S)   # the probe connects: the key is retried, and fails again
    await wait_for(lambda: state.retries == 2)
    # The key's retry, the recovery report's check, and a probe: the send failed right
    # after the upstream came back (probe.py), so it may have gone away again.
    await quiet(agent, timing, 3)
    assert not [r for r in caplog.records if "recovered" in r.getMessage()]
    timing.advance(PROBE_S)
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert recovered == [f"upstream up recovered after {PROBE_S:.0f}s; 0 events delivered; "
                         "5 events still queued"], recovered


DUAL_STACK = "dual-stack.outpost.test"   # the test's own name: never asked of a resolver


@pytest.fixture
def blackholed_ipv6(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``DUAL_STACK`` resolves, IPv6 first as most resolvers order them, to an IPv6 address
    that never answers a connect (a broken IPv6 route: the SYN is lost) and to the test's
    upstream on 127.0.0.1. Yields a function that points it at a port; the IPv6 "route" is a
    listener on ::1 whose backlog is full, so that connects to it hang."""
    hole = socket.socket(socket.AF_INET6)
    fillers: list[socket.socket] = []
    try:
        hole.bind(("::1", 0))
    except OSError:
        hole.close()
        pytest.skip("no IPv6 loopback")
    hole.listen(0)
    for _ in range(8):   # until a connect hangs
        filler = socket.socket(socket.AF_INET6)
        fillers.append(filler)
        filler.settimeout(0.2)
        try:
            filler.connect(hole.getsockname()[:2])
        except TimeoutError:
            break
    else:
        pytest.skip("a full backlog does not hold connects off here")
    real = socket.getaddrinfo
    ipv4_port = [0]

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host != DUAL_STACK:
            return real(host, port, *args, **kw)
        tcp = socket.SOCK_STREAM, socket.IPPROTO_TCP, ""
        return [(socket.AF_INET6, *tcp, ("::1", hole.getsockname()[1], 0, 0)),
                (socket.AF_INET, *tcp, ("127.0.0.1", ipv4_port[0]))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield lambda port: ipv4_port.__setitem__(0, port)
    for s in (*fillers, hole):
        s.close()


async def test_a_probe_reaches_over_ipv4_when_ipv6_is_broken(
        make_agent: Any, faulty: FaultyUpstream, blackholed_ipv6: Any) -> None:
    """An upstream whose name has an IPv6 address that does not answer (a broken IPv6
    route) and an IPv4 one that does: requests reach it over IPv4 (aiohttp tries the next
    address 250 ms on, Happy Eyeballs), and so must the probe after a failed send, or a
    live upstream answering 503 is shown unreachable, and logged so, while it answers."""
    blackholed_ipv6(faulty.port)
    faulty.script = [Fault("status", 503)]
    timing = ManualTiming()
    agent = await make_agent(
        upstreams=[{**upstream(faulty, "segment-http"), "url": f"http://{DUAL_STACK}:1",
                    "timeout_s": 2.0}],
        seams=seams(timing, Backoff(base_s=8.0)))
    state = agent.forwarding.states["up"]
    await send_segment(agent)
    await wait_for(lambda: probed_failures(state, 1))
    assert [r.status for r in faulty.requests] == [503]   # over IPv4
    assert state.unreachable_since is None
    status = (await get_json(agent, "/status"))["upstreams"][0]
    assert status["state"] == "backoff" and status["last_error"].startswith("HTTP 503")


async def send_segment(agent: Any) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/v1/batch", json={
                "writeKey": "wk1", "batch": [{"type": "track", "event": "e", "userId": "u"}]}) as r:
            assert r.status == 200, await r.text()


async def test_the_first_ack_ends_the_outage_not_the_next_probe(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    """``outpost flush`` once the upstream is back sends its events at once: their ack
    proves it reachable, so status stops saying ``unreachable`` then, not at the next
    probe (no forwarder time passes here: that probe never runs), and the outage has one
    recovery line, with what its return delivered."""
    caplog.set_level(logging.INFO, logger="outpost.probe")
    timing = ManualTiming()
    agent = await parked_while_down(make_agent, down_nucleus, timing)
    state = agent.forwarding.states["up"]
    await down_nucleus.come_back()
    async with aiohttp.ClientSession() as s, \
            s.post(f"http://127.0.0.1:{agent.port}/flush") as r:
        assert r.status == 200, await r.text()
    await wait_for(lambda: state.acked == 5)
    status = (await get_json(agent, "/status"))["upstreams"][0]
    assert status["state"] != "unreachable" and status["unreachable_for_s"] is None, status
    assert 'outpost_upstream_state{upstream="up",state="unreachable"} 0' in \
        await get_json(agent, "/metrics")
    assert timing.now() == 0.0 and state.probes == 1   # only the probe that found it down
    while timing.pending():   # the loop's release, the recovery report's check: nothing else
        timing.advance(timing.pending()[0])
        await quiet(agent, timing, len(timing.pending()))
    assert down_nucleus.ids() == list(range(5)) and state.probes == 1
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1, recovered
    assert re.fullmatch(r"upstream up recovered after \d+s; 5 events delivered",
                        recovered[0]), recovered


async def test_a_key_leaving_its_backoff_shows_it_about_to_send_not_idle(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A key whose retry comes due (its timer, or a flush) has events queued that go at
    once: status showed its upstream "idle" for the loop turns between the key leaving its
    backoff and its loop sending (a test read it there, 1 in several hundred runs). Read
    right as the key leaves, with no loop turn between: it shows "sending"."""
    faulty.script = [Fault("status", 503), Fault("status", 503)]
    timing = ManualTiming()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")],
                             seams=seams(timing, Backoff(base_s=8.0)))
    state = agent.forwarding.states["up"]
    await send(agent, [event(i) for i in range(5)])
    await wait_for(functools.partial(probed_failures, state, 1))
    await quiet(agent, timing, 1)   # the key's retry
    assert state.shown == "backoff"
    timing.advance(timing.pending()[0])   # the retry is due: the key's loop starts
    assert state.shown == "sending"
    await wait_for(functools.partial(probed_failures, state, 2))
    await quiet(agent, timing, 1)
    assert state.shown == "backoff"
    agent.forwarding.flush()   # `outpost flush`: the parked key goes at once
    assert state.shown == "sending"
    await drained(agent, faulty, 5)
    await wait_for(lambda: state.shown == "idle")
