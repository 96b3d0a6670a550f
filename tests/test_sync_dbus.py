"""Transmit profiles against a real D-Bus: a private dbus-daemon, a NetworkManager-shaped
service on it (tests/fakes/nm_bus.py), and a real agent that reads and watches ``Metered``.

Holding is proved by the gate, not by waiting: a held key has no forwarding loop, so
nothing can be sent until the profile changes; max_hold_h by an injected clock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jeepney import DBusAddress, new_signal
from jeepney.io.asyncio import open_dbus_connection

from agent.clock import Clock
from agent.forwarder.supervisor import Seams
from agent.sync.metered import networkmanager
from agent.sync.metered.networkmanager import NetworkManagerSource
from agent.sync.monitor import HOLD_CHECK_S
from agent.sync.policy import Metered, MeteredReading
from tests.conftest import free_port, write_config
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nm_bus import NM_NAME, NM_PATH, PROPS, FakeNetworkManager, PrivateBus
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import run_outpost, wait_for

YES, NO = 1, 2   # NMMetered


def event(i: int) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z"}


async def post(port: int, ids: range) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/app1/track",
            json={"data": [event(i) for i in ids]}) as r:
        assert r.status == 200, await r.text()


async def fetch(port: int, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        assert r.status == 200
        return await r.json() if path == "/status" else await r.text()


def upstream(fake: FakeNucleus) -> dict[str, Any]:
    return {"name": "up", "protocol": "nucleus-ws", "url": fake.url, "keys": ["app1"],
            "flush_interval_s": 0.05}


def delivered(fake: FakeNucleus) -> list[int]:
    return [ev["id"] for ev in fake.events]


async def test_a_metered_network_holds_events_and_releases_them_when_it_is_not(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        nm: FakeNetworkManager) -> None:
    agent = await make_agent(port=free_port(), upstreams=[upstream(fake_nucleus)],
                             sync={"on_metered": "hold", "dbus_address": bus.address})
    sync = (await fetch(agent.port, "/status"))["sync"]
    assert (sync["profile"], sync["metered"]) == ("normal", "no"), sync
    await post(agent.port, range(1, 4))
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2, 3])

    await nm.set_metered(YES)
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    # The hold stops the key's loop, which ends only once the upstream's answer to 1-3 is
    # read and their deletes are saved: steps of its own, waited for, not assumed done.
    await wait_for(lambda: not agent.forwarding.loops and agent.spool.depth == 0)
    await post(agent.port, range(4, 9))
    # Held: the key has no loop, and none starts while the profile holds.
    assert not agent.forwarding.loops and agent.spool.depth == 5
    status = await fetch(agent.port, "/status")
    assert status["sync"] == {"profile": "hold", "reason": "metered network", "metered": "yes",
                              "metered_detail": "NetworkManager: yes", "battery_percent": None,
                              "on_battery": None, "releases": 0, "held_events": 5,
                              "held_lanes": {"high": 0, "normal": 5},
                              "errors": 0, "last_error": ""}
    metrics = await fetch(agent.port, "/metrics")
    assert 'outpost_sync_profile{profile="hold",reason="metered network"} 1' in metrics
    assert 'outpost_sync_held_events{lane="high"} 0' in metrics
    assert 'outpost_sync_held_events{lane="normal"} 5' in metrics
    # One series whatever the reading says: its detail (an error's text too) is in /status.
    assert "\noutpost_sync_metered 1\n" in metrics, metrics
    code, out = await run_outpost("status", "--config", agent.config_path)
    assert code == 0 and "\nsync:     hold (metered network), 5 events held (high 0, " \
        "normal 5); metered yes " \
        "(NetworkManager: yes)\n" in out, out

    await nm.set_metered(NO)
    await wait_for(lambda: delivered(fake_nucleus) == list(range(1, 9)))
    await wait_for(lambda: agent.spool.depth == 0)
    sync = (await fetch(agent.port, "/status"))["sync"]
    assert (sync["profile"], sync["held_events"]) == ("normal", 0), sync
    assert "\noutpost_sync_metered 0\n" in await fetch(agent.port, "/metrics")
    assert nm.gets == 1   # read once, then watched: no polling


async def test_a_hold_stops_a_loop_that_is_sending(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        nm: FakeNetworkManager) -> None:
    fake_nucleus.ack = lambda ev_id: False   # nothing acked: the loop stays busy
    # The frame in flight is let finish (docs/operations.md, Sync policy): unanswered, it
    # fails after timeout_s, and only then does the loop end.
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus), "timeout_s": 1}],
                             sync={"on_metered": "hold", "dbus_address": bus.address})
    await post(agent.port, range(1, 3))
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2])
    assert agent.forwarding.loops
    await nm.set_metered(YES)
    await wait_for(lambda: not agent.forwarding.loops)
    assert agent.spool.depth == 2   # unacked events stay queued, held
    # Nothing is sending any more: status must not say so (the failed frame's key waits
    # out its backoff: "backoff").
    state = (await fetch(agent.port, "/status"))["upstreams"][0]["state"]
    assert state in ("idle", "backoff"), state

    fake_nucleus.ack = lambda ev_id: True
    await nm.set_metered(NO)
    await wait_for(lambda: agent.spool.depth == 0)


async def test_networkmanager_appearing_later_is_noticed(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networkmanager, "RESTART_S", 0.1)   # not back: stopped
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             sync={"on_metered": "hold", "dbus_address": bus.address})
    sync = (await fetch(agent.port, "/status"))["sync"]
    assert sync["metered"] == "unknown" and "NameHasNoOwner" in sync["metered_detail"], sync
    assert sync["profile"] == "normal" and "treated as not metered" in sync["reason"], sync

    service = await FakeNetworkManager(bus.address, metered=YES).start()
    try:
        await wait_for(lambda: agent.sync.profile.mode == "hold")
        await service.stop()   # NetworkManager exits: unknown again, which sends
        await wait_for(lambda: agent.sync.metered.detail == "NetworkManager is not running")
        assert agent.sync.profile.mode == "normal"
    finally:
        await service.stop()


async def _held_then_stopped(make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
                             nm: FakeNetworkManager) -> Any:
    """An agent holding on a metered link, events 1-3 queued, and NetworkManager stopped
    (a restart's first half): its reading no longer NetworkManager's own."""
    await nm.set_metered(YES)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             sync={"on_metered": "hold", "dbus_address": bus.address})
    await post(agent.port, range(1, 4))
    await nm.stop()
    await wait_for(lambda: agent.sync.metered.detail != "NetworkManager: yes")
    return agent


async def test_a_networkmanager_restart_keeps_a_hold_on_a_metered_link(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NetworkManager restarting (an upgrade, `systemctl restart`) leaves the link up and
    metered, and answers again a moment later. Its name losing its owner read as
    "unknown", not metered: a hold let everything queued go out over the metered link in
    that gap. The last reading now holds for a bounded time; only a NetworkManager that
    does not come back is "not running"."""
    agent = await _held_then_stopped(make_agent, fake_nucleus, bus, nm)
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops, agent.sync.metered
    await nm.start()   # back, and still metered
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: yes")
    assert agent.sync.profile.mode == "hold" and delivered(fake_nucleus) == []

    monkeypatch.setattr(networkmanager, "RESTART_S", 0.1)
    await nm.stop()   # gone for good: unknown once the bound is over, which sends
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager is not running")
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2, 3])


async def test_a_networkmanager_that_says_unknown_as_it_starts_again_keeps_a_hold(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        nm: FakeNetworkManager) -> None:
    """NetworkManager back from a restart (an upgrade) answers Metered "unknown" until it
    has picked its primary connection again (its Metered is that connection's device's,
    unknown without one), then announces the link's. That is still the restart: the hold
    on the metered link goes on. The "unknown" ended the reading kept, and everything held
    went out over the metered link until the announcement came."""
    agent = await _held_then_stopped(make_agent, fake_nucleus, bus, nm)
    nm.metered = 0   # back, no primary connection picked yet
    await nm.start()
    await wait_for(lambda: "unknown" in agent.sync.metered.detail)
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops, agent.sync.metered
    await nm.set_metered(YES)   # its connection picked again: still metered
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: yes")
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops
    assert delivered(fake_nucleus) == []
    await nm.set_metered(NO)
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2, 3])


async def test_a_networkmanager_back_with_no_connection_is_unknown_once_the_restart_is_over(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Back from a restart, NetworkManager's "unknown" keeps the last reading only for the
    restart's time: one that picks no connection is then read as it says (unknown, not
    "not running"), and what the hold kept goes."""
    monkeypatch.setattr(networkmanager, "RESTART_S", 1.0)
    agent = await _held_then_stopped(make_agent, fake_nucleus, bus, nm)
    nm.metered = 0
    await nm.start()
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: unknown")
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2, 3])
    assert agent.sync.profile.mode == "normal" and agent.sync.errors == 0


async def test_a_networkmanager_whose_object_is_not_on_the_bus_yet_is_still_restarting(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NetworkManager starting takes its name on the bus before it puts its objects there
    (main.c: the bus acquired, then the manager set up and its objects exported): a read
    that comes between is answered by GDBus itself, UnknownMethod (no such interface on
    that path). That is still the restart: the hold goes on, nothing failed, and it is
    read again soon. It was a failed reading, unknown: the hold lifted until
    NetworkManager announced the link, and the read was asked again a minute later."""
    monkeypatch.setattr(networkmanager, "RETRY_FIRST_S", 0.05)
    agent = await _held_then_stopped(make_agent, fake_nucleus, bus, nm)
    nm.error = "org.freedesktop.DBus.Error.UnknownMethod"   # its objects not there yet
    await nm.start()
    await wait_for(lambda: "UnknownMethod" in agent.sync.metered.detail)
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops, agent.sync.metered
    assert agent.sync.errors == 0
    nm.error = None   # there now: the next read, soon, finds the link as it was
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: yes")
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops
    assert delivered(fake_nucleus) == [] and agent.sync.errors == 0


async def test_the_bus_restarting_keeps_a_hold_on_a_metered_link(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """dbus-daemon restarting (an upgrade), or dropping the agent's connection, leaves the
    link as it was. That read "unknown" (not metered) at once, and the bus was tried
    again only a minute later: up to a minute of what a hold keeps sent over the metered
    link. The last reading holds as through a NetworkManager restart, within the same
    bound, and the bus is tried again soon at first."""
    monkeypatch.setattr(networkmanager, "RETRY_FIRST_S", 0.05, raising=False)
    await nm.set_metered(YES)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             sync={"on_metered": "hold", "dbus_address": bus.address})
    await post(agent.port, range(1, 4))
    bus.stop()   # NetworkManager's connection goes with it
    await nm.stop()
    await wait_for(lambda: "D-Bus connection lost" in agent.sync.metered.detail)
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops, agent.sync.metered
    bus.start()   # back before NetworkManager is: its read finds no owner, still a restart
    await wait_for(lambda: "D-Bus connection lost" not in agent.sync.metered.detail, timeout=5)
    assert agent.sync.profile.mode == "hold" and not agent.forwarding.loops, agent.sync.metered
    await nm.start()   # back, and still metered
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: yes")
    assert agent.sync.profile.mode == "hold" and delivered(fake_nucleus) == []

    monkeypatch.setattr(networkmanager, "RESTART_S", 0.1)
    bus.stop()   # gone for good: unknown once the bound is over, which sends
    await wait_for(lambda: agent.sync.metered.state is Metered.UNKNOWN)
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2, 3])


async def test_no_bus_means_unknown_and_normal(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             sync={"on_metered": "hold",
                                   "dbus_address": f"unix:path={tmp_path / 'no-bus'}"})
    sync = (await fetch(agent.port, "/status"))["sync"]
    assert sync["metered"] == "unknown" and sync["metered_detail"].startswith("no D-Bus"), sync
    await post(agent.port, range(1, 3))
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2])


async def held_half_an_hour(make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
                            nm: FakeNetworkManager, timing: ManualTiming) -> Any:
    """An agent on a metered network that holds, with ``max_hold_h`` half an hour."""
    await nm.set_metered(YES)
    return await make_agent(upstreams=[upstream(fake_nucleus)], seams=Seams(timing=timing),
                            sync={"on_metered": "hold", "max_hold_h": 0.5,
                                  "dbus_address": bus.address})


async def test_max_hold_h_sends_everything_once_the_oldest_held_event_is_that_old(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        nm: FakeNetworkManager, clock: Clock) -> None:
    timing = ManualTiming()
    agent = await held_half_an_hour(make_agent, fake_nucleus, bus, nm, timing)
    assert agent.sync.profile.mode == "hold"
    await post(agent.port, range(1, 4))
    # The waiter times the oldest held event (reading the clocks each minute).
    await wait_for(lambda: timing.pending() == [HOLD_CHECK_S])
    clock.passed_ms += 1799_000
    timing.advance(1799)
    # Still held at 29m59s: the waiter waits out the last second, half an hour from receipt.
    await wait_for(lambda: len(timing.pending()) == 1 and 0 < timing.pending()[0] <= 1)
    assert not agent.forwarding.loops and agent.spool.depth == 3

    clock.passed_ms += 1000
    timing.advance(1)
    await wait_for(lambda: agent.spool.depth == 0)
    assert delivered(fake_nucleus) == [1, 2, 3]
    status = await fetch(agent.port, "/status")
    assert (status["sync"]["profile"], status["sync"]["releases"]) == ("hold", 1)

    # Released once: the loops it started end once their queue stays empty, and what
    # comes after is held again, for its own half hour.
    await wait_for(lambda: not agent.forwarding.loops)
    await post(agent.port, range(4, 6))
    assert not agent.forwarding.loops and agent.spool.depth == 2


async def test_a_machine_that_slept_past_max_hold_h_sends_within_a_minute_of_waking(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        nm: FakeNetworkManager, clock: Clock) -> None:
    """A laptop on a hotspot, asleep most of the day: the event loop's clock
    (CLOCK_MONOTONIC) stands still while it sleeps, the events' age does not (the wall
    clock, and the agent's own time, which counts suspend). Woken past max_hold_h, it
    must send within a minute, not after up to an hour more of waking time (for a
    laptop awake a few minutes a day, days)."""
    timing = ManualTiming()
    agent = await held_half_an_hour(make_agent, fake_nucleus, bus, nm, timing)
    await post(agent.port, range(1, 4))
    await wait_for(lambda: len(timing.pending()) == 1)   # the waiter times them
    clock.passed_ms += 2 * 3600_000   # asleep two hours: only the loop's clock stood still
    timing.advance(60)   # awake a minute
    await wait_for(lambda: delivered(fake_nucleus) == [1, 2, 3], timeout=4)
    assert agent.sync.releases == 1


async def test_doctor_reads_networkmanager_and_says_what_it_means(
        bus: PrivateBus, nm: FakeNetworkManager, tmp_path: Path) -> None:
    await nm.set_metered(YES)
    config = write_config(tmp_path / "doctor.toml", tmp_path / "doctor.db",
                          sync={"on_metered": "hold", "dbus_address": bus.address})
    code, out = await run_outpost("doctor", "--config", str(config))
    assert code == 0, out
    assert "  metered        yes (NetworkManager: yes)\n" in out, out
    assert "  profile now    hold (metered network)\n" in out, out

    await nm.stop()
    code, out = await run_outpost("doctor", "--config", str(config))
    assert "  metered        unknown (NetworkManager not reachable: " \
           "org.freedesktop.DBus.Error.NameHasNoOwner), treated as not metered\n" in out, out


async def test_events_no_upstream_takes_are_not_held_or_timed(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus,
        nm: FakeNetworkManager, clock: Clock) -> None:
    timing = ManualTiming()
    agent = await held_half_an_hour(make_agent, fake_nucleus, bus, nm, timing)
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/app/nobody/track", json={"data": [event(99)]}) as r:
        assert r.status == 200    # "nobody" matches no upstream: kept until one does
    clock.passed_ms += 1000_000
    timing.advance(1000)
    await post(agent.port, range(1, 3))
    await wait_for(lambda: timing.pending() == [HOLD_CHECK_S])
    assert agent.spool.depth == 3
    assert (await fetch(agent.port, "/status"))["sync"]["held_events"] == 2
    # Timed from app1's events, half an hour from now, not from "nobody"'s (800 s).
    clock.passed_ms += 1799_000
    timing.advance(1799)
    await wait_for(lambda: len(timing.pending()) == 1 and 0 < timing.pending()[0] <= 1)
    assert agent.sync.releases == 0

    clock.passed_ms += 1000
    timing.advance(1)
    await wait_for(lambda: [ev["id"] for ev in fake_nucleus.events] == [1, 2])
    assert agent.sync.releases == 1


async def test_without_dbus_address_the_standard_variable_names_the_system_bus(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await nm.set_metered(YES)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], sync={"on_metered": "hold"})
    assert agent.sync.profile.mode == "hold" and nm.gets == 1


async def test_only_networkmanager_itself_can_change_the_reading(
        bus: PrivateBus, nm: FakeNetworkManager) -> None:
    """Any local process may emit a signal on the bus: one shaped as NetworkManager's
    PropertiesChanged, or a malformed one, must neither set a hold nor end the watch."""
    readings: list[MeteredReading] = []
    watch = asyncio.create_task(NetworkManagerSource(bus.address).watch(readings.append))
    try:
        await wait_for(lambda: [r.state for r in readings] == [Metered.NO])
        other = await open_dbus_connection(bus.address)
        where = DBusAddress(NM_PATH, interface=PROPS)
        await other.send(new_signal(where, "PropertiesChanged", "sa{sv}as",
                                    (NM_NAME, {"Metered": ("u", YES)}, [])))
        await other.send(new_signal(where, "PropertiesChanged", "s", (NM_NAME,)))
        await other.close()
        await nm.set_metered(4)   # NetworkManager's own change, after the others
        await wait_for(lambda: len(readings) >= 2)
        assert [r.detail for r in readings] == ["NetworkManager: no", "NetworkManager: guess no"]
        assert not watch.done()
    finally:
        watch.cancel()


async def test_a_networkmanager_that_exits_with_a_read_unanswered_is_still_a_restart(
        bus: PrivateBus, nm: FakeNetworkManager) -> None:
    """A NetworkManager that takes its name and exits before answering the read (a start
    that fails, and systemd starts it again) leaves the read to the bus, which answers
    NoReply. That was a failed reading, "unknown" (not metered) at once: a hold let go of
    everything queued over the metered link, and the new owner taking over was read as
    "not running" too. It is part of the restart: the last reading holds, within the same
    bound, until NetworkManager answers."""
    await nm.set_metered(YES)
    readings: list[MeteredReading] = []
    watch = asyncio.create_task(NetworkManagerSource(bus.address).watch(readings.append))
    try:
        await wait_for(lambda: [r.detail for r in readings] == ["NetworkManager: yes"])
        await nm.stop()
        await wait_for(lambda: len(readings) == 2)   # kept: NetworkManager left
        nm.silent = True   # back, and gone again before it answers the read
        await nm.start()
        await wait_for(lambda: nm.gets == 2)
        await nm.stop()
        nm.silent = False
        await nm.start()   # the bus answered the read NoReply before this owner came
        await wait_for(lambda: readings[-1].detail == "NetworkManager: yes")
        assert [(r.state, r.failed) for r in readings] == [(Metered.YES, False)] * len(readings), \
            readings
    finally:
        watch.cancel()
