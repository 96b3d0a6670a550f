"""The battery path: readings injected at the one seam that reads them (``battery=``),
and psutil's own reading turned into ours."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import aiohttp
import psutil
import pytest

from agent.forwarder.supervisor import Seams
from agent.sync import power
from agent.sync.monitor import BATTERY_POLL_S
from agent.sync.policy import Battery
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for


class sbattery(NamedTuple):
    """psutil.sensors_battery()'s documented result (its own class is private and moves)."""

    percent: float
    secsleft: int
    power_plugged: bool | None


class Sensor:
    """What the machine's battery reads now; the test sets it."""

    def __init__(self, reading: Battery | None) -> None:
        self.reading = reading
        self.reads = 0

    def __call__(self) -> Battery | None:
        self.reads += 1
        return self.reading


async def post(port: int, ids: range) -> None:
    events = [{"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
               "date": "2026-01-01T00:00:00.000Z"} for i in ids]
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/app/app1/track", json={"data": events}) as r:
        assert r.status == 200, await r.text()


def upstream(fake: FakeNucleus) -> dict[str, Any]:
    return {"name": "up", "protocol": "nucleus-ws", "url": fake.url, "keys": ["app1"],
            "flush_interval_s": 0.05}


async def test_a_low_battery_holds_until_the_machine_is_plugged_in(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    timing = ManualTiming()
    sensor = Sensor(Battery(percent=50, plugged=False))
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], seams=Seams(timing=timing),
                             battery=sensor, sync={"on_low_battery": "hold", "low_battery_pct": 20})
    assert agent.sync.profile.mode == "normal" and agent.sync.view()["battery_percent"] == 50

    sensor.reading = Battery(percent=14, plugged=False)
    # Read every BATTERY_POLL_S by the injected clock, not by the wall.
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    assert agent.sync.profile.reason == "battery 14%"
    await post(agent.port, range(1, 4))
    assert not agent.forwarding.loops and agent.spool.depth == 3
    assert fake_nucleus.events == []

    sensor.reading = Battery(percent=14, plugged=True)   # on mains: low no longer matters
    await wait_for(lambda: BATTERY_POLL_S in timing.pending())
    timing.advance(BATTERY_POLL_S)
    await wait_for(lambda: agent.spool.depth == 0)
    assert [ev["id"] for ev in fake_nucleus.events] == [1, 2, 3]
    assert agent.sync.view()["on_battery"] is False


async def test_without_a_battery_rule_the_battery_is_never_read(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    sensor = Sensor(Battery(percent=5, plugged=False))
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], battery=sensor)
    await post(agent.port, range(1, 3))
    await wait_for(lambda: agent.spool.depth == 0)
    assert sensor.reads == 0 and agent.sync.profile.reason == "no [sync] rule set"


@pytest.mark.parametrize(("raw", "expected"), [
    (None, None),
    (sbattery(14, 3600, False), Battery(14.0, False)),
    (sbattery(80, psutil.POWER_TIME_UNLIMITED, True), Battery(80.0, True)),
    # The OS cannot tell whether it is on mains: only a known "on battery" may hold.
    (sbattery(9, psutil.POWER_TIME_UNKNOWN, None), Battery(9.0, True)),
])
def test_psutil_readings_become_ours(monkeypatch: pytest.MonkeyPatch, raw: Any,
                                     expected: Battery | None) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: raw)
    assert power.read_battery() == expected


def test_an_unreadable_battery_is_a_failed_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised for the monitor to report (the test below), not taken for "no battery"."""
    def broken() -> None:
        raise OSError("no such file: /sys/class/power_supply/BAT0/capacity")
    monkeypatch.setattr(psutil, "sensors_battery", broken)
    with pytest.raises(OSError, match="BAT0"):
        power.read_battery()


async def test_a_battery_the_os_cannot_read_is_reported_not_silent(
        make_agent: Any, fake_nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """psutil's own reading failing (an unreadable /sys entry) counts as no battery, never
    low, and, as docs/operations.md says of a reading that fails, is logged, counted in
    the sync errors and shown as last_error: it was taken for "no battery" silently."""
    def broken() -> None:
        raise OSError("no such file: /sys/class/power_supply/BAT0/capacity")
    monkeypatch.setattr(psutil, "sensors_battery", broken)
    with caplog.at_level(logging.WARNING, logger="outpost.sync"):
        agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                                 seams=Seams(timing=ManualTiming()),
                                 sync={"on_low_battery": "hold", "low_battery_pct": 20})
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{agent.port}/status") as r:
        sync = (await r.json())["sync"]
    assert sync["profile"] == "normal" and sync["battery_percent"] is None
    assert sync["errors"] == 1 and "BAT0/capacity" in sync["last_error"], sync
    assert "BAT0/capacity" in caplog.text
    await post(agent.port, range(1, 3))
    await wait_for(lambda: agent.spool.depth == 0)


async def test_outpost_status_shows_the_sync_errors(
        make_agent: Any, fake_nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch) -> None:
    """`outpost status`'s table (and the page, from the same JSON) said nothing of a
    failing reading: only `--json` and /metrics showed the sync errors."""
    from agent.ops.status_table import render

    def broken() -> None:
        raise OSError("no such file: /sys/class/power_supply/BAT0/capacity")
    monkeypatch.setattr(psutil, "sensors_battery", broken)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             seams=Seams(timing=ManualTiming()),
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{agent.port}/status") as r:
        text = render(await r.json())
    line = next((ln for ln in text.splitlines() if "BAT0" in ln), "")
    assert line.startswith("sync:") and "1 reading failed" in line, text


async def test_a_battery_just_below_the_low_level_is_not_shown_at_it(
        make_agent: Any, fake_nucleus: FakeNucleus, monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil reads Linux's energy counters unrounded (19.6%): the profile's reason said
    `hold (battery 20%)` under a rule for below 20%, a hold that looked wrong."""
    from agent.ops.status_table import render

    monkeypatch.setattr(psutil, "sensors_battery", lambda: sbattery(19.6, 3600, False))
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             seams=Seams(timing=ManualTiming()),
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{agent.port}/status") as r:
        data = await r.json()
    assert (data["sync"]["profile"], data["sync"]["reason"]) == ("hold", "battery 19%"), data
    assert "\nsync:     hold (battery 19%), " in render(data)
