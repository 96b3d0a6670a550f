"""A device offline for a week, then back: it syncs, and loses nothing it promised to keep.

In process, on real sockets and a real spool file, with both clocks injected: the agent's
own (agent/clock.py, ``passed_ms``: days pass for expiry, dedupe and status) and the
forwarders' (tests/fakes/manual_timing.py: backoff, probes, parking), moved together. The
upstream is unreachable (connections refused, a name that does not resolve), or a port
that never answers, or a captive portal, for days while the app keeps posting, events
age out (max_age_days) and the agent is restarted; then it comes back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import pytest

from agent.clock import Clock
from agent.forwarder.backoff import BACKOFF
from agent.forwarder.probe import PROBE_S
from agent.forwarder.supervisor import NET_GAP_S
from agent.sync.monitor import BATTERY_POLL_S
from agent.sync.policy import Battery
from agent.uplinks.lookup import FORGOTTEN_MAX
from tests.fakes.captive_portal import PORTAL, CaptiveUpstream
from tests.fakes.deaf_upstream import RawUpstream
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_resume import down_nucleus, get_json, nucleus_upstream, quiet, seams
from tests.test_sync_battery import Sensor
from tests.test_upstream_faults import event, marks, send
from tests.waiting import wait_for

__all__ = ["down_nucleus"]   # the fixture, shared with tests/test_resume.py

HOUR_S = 3600
STEP_H = 6
LOW = Battery(percent=10, plugged=False)
DAYS = 7
MAX_AGE_DAYS = 3


def let_pass(clock: Clock, timing: ManualTiming, seconds: float) -> None:
    """Both clocks move together, as they do on a device that stays awake."""
    clock.passed_ms += int(seconds * 1000)
    timing.advance(seconds)


async def offline_agent(make_agent: Any, fake: FakeNucleus, timing: ManualTiming,
                        protocol: str) -> Any:
    return await make_agent(upstreams=[nucleus_upstream(fake, protocol)], seams=seams(timing),
                            storage={"max_age_days": MAX_AGE_DAYS, "dedupe_window_h": 24})


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_a_week_offline_with_restarts_then_back_delivers_every_survivor_once_in_order(
        make_agent: Any, down_nucleus: FakeNucleus, clock: Clock, protocol: str) -> None:
    timing = ManualTiming()
    agent = await offline_agent(make_agent, down_nucleus, timing, protocol)
    posted: list[tuple[int, float]] = []   # (id, hours since the start when posted)
    hours = 0.0
    restarts = {3 * 24, 5 * 24}
    for step in range(DAYS * 24 // STEP_H):
        ids = [2 * step, 2 * step + 1]
        await send(agent, [event(i) for i in ids])
        posted += [(i, hours) for i in ids]
        state = agent.forwarding.states["up"]
        await wait_for(lambda: state.unreachable_since is not None)   # noqa: B023
        await quiet(agent, timing, 2)   # the key's retry and the prober's next probe
        let_pass(clock, timing, HOUR_S)
        await send(agent, [event(i) for i in ids])   # resent within the window: kept once
        await quiet(agent, timing, 2)
        let_pass(clock, timing, (STEP_H - 1) * HOUR_S)
        await quiet(agent, timing, 2)
        hours += STEP_H
        await agent.spool.prune()
        up = (await get_json(agent, "/status"))["upstreams"][0]
        assert up["state"] == "unreachable", up
        assert up["last_error"], up
        assert up["unreachable_for_s"] is not None
        # Backoff stays capped however many failures: the key's retry is a minute away
        # at most, the probe PROBE_S.
        assert max(timing.pending()) <= BACKOFF.cap_s
        assert min(timing.pending()) <= PROBE_S
        if hours in restarts:
            await agent.stop()
            timing = ManualTiming()
            agent = await offline_agent(make_agent, down_nucleus, timing, protocol)

    expired = [i for i, at in posted if hours - at >= MAX_AGE_DAYS * 24]  # (and a few real ms)
    kept = [i for i, at in posted if hours - at < MAX_AGE_DAYS * 24]
    assert agent.spool.depth == len(kept)
    snap = await get_json(agent, "/status")
    assert snap["drops"]["expired"] == len(expired), snap["drops"]

    await down_nucleus.come_back()
    await quiet(agent, timing, 2)
    let_pass(clock, timing, min(timing.pending()))   # the next probe finds it back
    await wait_for(lambda: agent.spool.depth == 0)
    assert down_nucleus.ids() == kept   # each survivor once, in order
    up = (await get_json(agent, "/status"))["upstreams"][0]
    assert up["acked"] == len(kept)
    assert up["state"] != "unreachable"


class BlackHole(RawUpstream):
    """A port that accepts every connection and never answers it (a firewall that eats
    the traffic, a dead proxy) while ``silent``; once cleared, new connections are relayed
    to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.silent = True

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.silent:
            await self.relay(reader, writer, self.target_port)
            return
        while await reader.read(65536):   # read and drop, until the client gives up
            pass


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_two_days_of_a_port_that_never_answers_then_back_delivers_within_the_cap(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, protocol: str) -> None:
    """Connects, and no answer (timeout_s): a live upstream answering badly, whose key
    keeps its capped backoff; once the port answers, the next retry delivers."""
    hole = await BlackHole(fake_nucleus.port).start()
    try:
        timing = ManualTiming()
        url = f"{'ws' if protocol == 'nucleus-ws' else 'http'}://127.0.0.1:{hole.port}"
        agent = await make_agent(upstreams=[{**nucleus_upstream(fake_nucleus, protocol),
                                             "url": url}], seams=seams(timing))
        state = agent.forwarding.states["up"]
        posted: list[int] = []
        for step in range(4):   # two days, 12 hours a step
            posted.append(step)
            await send(agent, [event(step)])
            await wait_for(lambda: state.retries > step)   # noqa: B023
            # The port connects: a live upstream answering badly keeps its backoff, and
            # nothing probes it.
            await quiet(agent, timing, 1)
            assert 0 < timing.pending()[0] <= BACKOFF.cap_s
            let_pass(clock, timing, 12 * HOUR_S)
            up = (await get_json(agent, "/status"))["upstreams"][0]
            assert up["state"] in ("backoff", "sending"), up
            assert up["last_error"], up
        await quiet(agent, timing, 1)
        hole.silent = False
        let_pass(clock, timing, timing.pending()[0])   # the key's retry: a minute at most
        await wait_for(lambda: agent.spool.depth == 0)
        assert fake_nucleus.ids() == posted
    finally:
        await hole.stop()


@pytest.mark.parametrize("protocol", ["segment-http", "nucleus-http", "nucleus-ws"])
async def test_two_days_behind_a_captive_portal_then_back_delivers_each_event_once(
        make_agent: Any, clock: Clock, protocol: str) -> None:
    """A login page answers every request (200, HTML): no event counts as delivered by it,
    and status says why; once the portal lets go, each event arrives once, in order."""
    portal = await CaptiveUpstream(PORTAL).start()
    try:
        timing = ManualTiming()
        agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol,
                                             "url": portal.url(protocol),
                                             "flush_interval_s": 0.02, "timeout_s": 0.6}],
                                 seams=seams(timing))
        state = agent.forwarding.states["up"]
        for step in range(2 * 24 // 3):
            await send(agent, [event(step)])
            await wait_for(lambda: state.retries > step)   # noqa: B023
            await quiet(agent, timing, 1)
            let_pass(clock, timing, 3 * HOUR_S)
        up = (await get_json(agent, "/status"))["upstreams"][0]
        assert "captive portal" in up["last_error"], up
        await quiet(agent, timing, 1)
        portal.intercept = None
        let_pass(clock, timing, timing.pending()[0])
        await wait_for(lambda: agent.spool.depth == 0)
        assert marks(portal.delivered) == list(range(16))
    finally:
        await portal.stop()


def settled(agent: Any) -> bool:
    return not agent.forwarding.loops and not any(
        p.probing for p in agent.forwarding.probers.values())


async def test_days_on_a_low_battery_and_offline_with_restarts_deliver_all_once_in_order(
        make_agent: Any, down_nucleus: FakeNucleus, clock: Clock) -> None:
    """A hold (low battery) with max_hold_h, and the upstream down: each release finds
    it unreachable, its keys back off; restarts in between; then the upstream comes back
    while the hold goes on (what was released goes, the young waits), then the machine
    is plugged in (everything goes)."""
    sensor = Sensor(LOW)

    async def start(timing: ManualTiming) -> Any:
        return await make_agent(upstreams=[{**nucleus_upstream(down_nucleus, "nucleus-ws"),
                                            "keys": ["app1"]}],
                                seams=seams(timing), battery=sensor,
                                sync={"on_low_battery": "hold", "low_battery_pct": 20,
                                      "max_hold_h": 1})

    timing = ManualTiming()
    agent = await start(timing)
    for step in range(3 * 24 // 3):
        await send(agent, [event(2 * step), event(2 * step + 1)])
        await wait_for(lambda: len(timing.pending()) >= 2 and settled(agent))  # noqa: B023
        releases = agent.sync.releases
        let_pass(clock, timing, 3 * HOUR_S)
        await wait_for(lambda: agent.sync.releases > releases)  # noqa: B023
        await wait_for(lambda: settled(agent))  # noqa: B023
        if step in (7, 15):
            await agent.stop()
            timing = ManualTiming()
            agent = await start(timing)
    await send(agent, [event(100)])   # young: held
    await wait_for(lambda: settled(agent) and len(timing.pending()) >= 2)
    await down_nucleus.come_back()
    let_pass(clock, timing, BACKOFF.cap_s)
    await wait_for(lambda: agent.spool.depth == 1)
    assert down_nucleus.ids() == list(range(48))
    sensor.reading = Battery(percent=90, plugged=True)
    let_pass(clock, timing, BATTERY_POLL_S)
    await wait_for(lambda: agent.spool.depth == 0)
    assert down_nucleus.ids() == [*range(48), 100]


async def test_many_keys_parked_for_a_day_come_back_without_a_storm(
        make_agent: Any, down_nucleus: FakeNucleus, clock: Clock) -> None:
    """Keys parked for a day while the upstream is down: its return starts them in line
    (max_loops), and each key's events go once, in order."""
    timing = ManualTiming()
    agent = await make_agent(upstreams=[nucleus_upstream(down_nucleus, "nucleus-http")],
                             seams=seams(timing, max_loops=4))
    state = agent.forwarding.states["up"]
    keys = [f"app{k}" for k in range(20)]
    for k, key in enumerate(keys):
        await send(agent, [event(100 * k + i) for i in range(3)], key=key)
    await wait_for(lambda: state.parked == len(keys) and settled(agent))
    for _ in range(24):
        let_pass(clock, timing, HOUR_S)
        await wait_for(lambda: state.parked == len(keys) and settled(agent))
    assert state.unreachable_since is not None
    for k, key in enumerate(keys):   # more events for each while parked
        await send(agent, [event(100 * k + i) for i in range(3, 5)], key=key)
    await down_nucleus.come_back()
    sent = state.sent
    let_pass(clock, timing, min(timing.pending()))
    await wait_for(lambda: agent.spool.depth == 0)
    ids = down_nucleus.ids()
    assert sorted(ids) == sorted(100 * k + i for k in range(20) for i in range(5))
    for k in range(20):   # FIFO per key
        assert [i for i in ids if i // 100 == k] == [100 * k + i for i in range(5)]
    assert state.sent - sent == len(ids)   # each sent once after the return: no resends


async def test_a_day_of_dns_failing_then_back(make_agent: Any, fake_nucleus: FakeNucleus,
                                              clock: Clock,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream's name does not resolve (the C library's answer replaced, as a
    resolver that has no network answers): unreachable, and shown why; once it resolves,
    a network change (netlink's) probes it at once and its key's events go."""
    real = socket.getaddrinfo
    resolving = [False]

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host != "upstream.outpost.test":
            return real(host, port, *args, **kw)
        if not resolving[0]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real("127.0.0.1", port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    timing = ManualTiming()
    agent = await make_agent(upstreams=[{**nucleus_upstream(fake_nucleus, "nucleus-ws"),
                                         "url": f"ws://upstream.outpost.test:{fake_nucleus.port}"}],
                             seams=seams(timing))
    state = agent.forwarding.states["up"]
    for step in range(24):
        await send(agent, [event(step)])
        await wait_for(lambda: state.unreachable_since is not None)
        await quiet(agent, timing, 2)
        let_pass(clock, timing, HOUR_S)
    up = (await get_json(agent, "/status"))["upstreams"][0]
    assert up["state"] == "unreachable" and "name resolution" in up["last_error"], up
    await quiet(agent, timing, 2)
    resolving[0] = True
    now = timing.now()
    agent.forwarding.network_changed()   # as the netlink watcher reports a new route
    await wait_for(lambda: agent.spool.depth == 0)
    assert fake_nucleus.ids() == list(range(24))
    assert timing.now() == now   # the change probed at once: no probe or retry was due


class SilentResolver:
    """The C library's lookup of ``name``, as on a network whose resolver does not answer
    (a router whose uplink is down): each lookup asked while ``silent`` waits until the
    test ends (resolv.conf's timeouts: up to 150 s) and fails. Once ``silent`` is cleared,
    a lookup asked afresh answers 127.0.0.1 at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.silent = True
        self.asked = 0
        self._real = socket.getaddrinfo
        self._end = threading.Event()

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host != self.name:
            return self._real(host, port, *args, **kw)
        self.asked += 1
        if self.silent:
            self._end.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self._real("127.0.0.1", port, *args, **kw)

    def close(self) -> None:
        self._end.set()


async def by_name(make_agent: Any, fake_nucleus: FakeNucleus, timeout_s: float
                  ) -> tuple[Any, ManualTiming]:
    """An agent whose nucleus-ws upstream is named by a host name (SilentResolver's), on a
    forwarder clock the test moves."""
    timing = ManualTiming()
    agent = await make_agent(
        upstreams=[{**nucleus_upstream(fake_nucleus, "nucleus-ws"), "timeout_s": timeout_s,
                    "url": f"ws://upstream.outpost.test:{fake_nucleus.port}"}],
        seams=seams(timing))
    return agent, timing


@pytest.mark.parametrize("during_probe", [False, True])
async def test_a_network_change_probes_afresh_past_a_lookup_the_old_network_left_hanging(
        make_agent: Any, fake_nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch,
        during_probe: bool) -> None:
    """A network change probes an unreachable upstream at once, and its keys go if it
    answers: not after the lookups asked on the old network give up (resolv.conf's
    timeouts, 10 s to 150 s), nor a probe interval after a probe in flight on the old
    network fails. The forwarder clock never moves here: only the change can deliver."""
    resolver = SilentResolver("upstream.outpost.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver.getaddrinfo)
    try:
        agent, timing = await by_name(make_agent, fake_nucleus, 2.0)
        state = agent.forwarding.states["up"]
        prober = agent.forwarding.probers["up"]
        await send(agent, [event(i) for i in range(3)])
        await wait_for(lambda: state.unreachable_since is not None and not prober.probing)
        assert resolver.asked >= 1
        if during_probe:   # the next probe, asked on the old network, hangs in its lookup
            timing.advance(PROBE_S)
            await wait_for(lambda: prober.probing)
        resolver.silent = False   # the device joins a network whose resolver answers
        agent.forwarding.network_changed()   # as the netlink watcher reports it
        await wait_for(lambda: agent.spool.depth == 0)
        assert fake_nucleus.ids() == [0, 1, 2]
        assert state.unreachable_since is None
    finally:
        resolver.close()


async def test_a_network_that_keeps_changing_while_its_resolver_is_silent_piles_no_threads(
        make_agent: Any, fake_nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change lets the lookups under way go and asks afresh: their threads wait out
    the resolver's timeouts. A link that flaps for minutes must not leave a thread per
    change: at most FORGOTTEN_MAX are let go at a time."""
    resolver = SilentResolver("upstream.outpost.test")
    monkeypatch.setattr(socket, "getaddrinfo", resolver.getaddrinfo)
    try:
        agent, timing = await by_name(make_agent, fake_nucleus, 0.2)
        state = agent.forwarding.states["up"]
        prober = agent.forwarding.probers["up"]
        await send(agent, [event(0)])
        await wait_for(lambda: state.unreachable_since is not None)
        for _ in range(3 * FORGOTTEN_MAX):
            await wait_for(lambda: not prober.probing)   # its lookup timed out
            probes = state.probes
            timing.advance(NET_GAP_S)   # the next change is no burst's: it kicks at once
            agent.forwarding.network_changed()   # a probe, its lookup asked afresh
            await wait_for(lambda: state.probes > probes)  # noqa: B023
        assert lookups() <= FORGOTTEN_MAX + 3   # + this network's: the probe's, a send's
        assert agent.spool.depth == 1
    finally:
        resolver.close()


def lookups() -> int:
    return sum(thread.name == "lookup" for thread in threading.enumerate())


async def test_a_lookup_the_old_network_gives_up_on_as_it_changes_leaves_the_change_its_probe(
        make_agent: Any, fake_nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The lookup under way fails in the very turn of the loop the change is reported in
    (its link went down: the query fails at once, as netlink says so): its answer is in,
    but not yet handed on, when the change lets the lookups under way go. Letting it go
    raised InvalidStateError out of the change (an error and a traceback in the log), and
    no probe was made: delivery waited for the next probe interval. The forwarder clock
    never moves here: only the change can deliver."""
    resolver = SilentResolver("upstream.outpost.test")
    hung: list[threading.Thread] = []
    silent = resolver.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == resolver.name and resolver.silent:
            hung.append(threading.current_thread())
        return silent(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        agent, timing = await by_name(make_agent, fake_nucleus, 0.2)
        state = agent.forwarding.states["up"]
        prober = agent.forwarding.probers["up"]
        await send(agent, [event(i) for i in range(3)])
        await wait_for(lambda: state.unreachable_since is not None and not prober.probing)
        assert hung
        loop = asyncio.get_running_loop()

        def link_changes() -> None:
            resolver.silent = False   # the new network's resolver answers
            resolver.close()   # the old one's lookups fail now, their answers queued...
            for thread in hung:
                thread.join()
            loop.call_soon(agent.forwarding.network_changed)   # ... before the change

        loop.call_soon(link_changes)
        await wait_for(lambda: agent.spool.depth == 0)
        assert fake_nucleus.ids() == [0, 1, 2]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        resolver.close()
