"""A reload applies `[sync]`: an operator who changes the transmit profile's rules and
reloads gets them at once, without a restart (held events go, or new ones are held)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from agent.forwarder.supervisor import Seams
from agent.sync.policy import Battery
from tests.conftest import write_config
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_sync_battery import Sensor, post, upstream
from tests.test_sync_hold import Failing
from tests.waiting import wait_for


async def test_a_reload_applies_sync_rules(make_agent: Any, fake_nucleus: FakeNucleus,
                                           tmp_path: Path, caplog: Any) -> None:
    sensor = Sensor(Battery(percent=14, plugged=False))
    hold = {"on_low_battery": "hold", "low_battery_pct": 20}
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], battery=sensor,
                             seams=Seams(timing=ManualTiming()), sync=hold)
    assert agent.sync.profile.mode == "hold"
    await post(agent.port, range(1, 4))
    assert not agent.forwarding.loops and agent.spool.depth == 3

    # The operator drops the rule: what was held goes at once.
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[upstream(fake_nucleus)])
    await agent.reload()
    assert agent.sync.profile.mode == "normal"
    await wait_for(lambda: agent.spool.depth == 0)
    assert [ev["id"] for ev in fake_nucleus.events] == [1, 2, 3]
    assert "needs a restart" not in caplog.text
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{agent.port}/status") as r:
        assert (await r.json())["sync"]["profile"] == "normal"   # the monitor in force

    # And back: the new rule holds what comes next.
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[upstream(fake_nucleus)], sync=hold)
    await agent.reload()
    assert agent.sync.profile.mode == "hold"
    await wait_for(lambda: not agent.forwarding.loops)
    await post(agent.port, range(4, 6))
    assert not agent.forwarding.loops and agent.spool.depth == 2


async def test_a_reload_that_changes_sync_keeps_its_counters(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """`outpost_sync_errors_total` and `outpost_sync_max_hold_releases_total` count "since
    the agent started": a reload that changes [sync] must not set them back to 0 (a
    Prometheus counter that falls reads as a restart), nor forget the last error, as a
    reload keeps each upstream's counts and last error."""
    sensor = Failing()
    sensor.fail = True
    rule = {"on_low_battery": "hold", "low_battery_pct": 20}
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], battery=sensor,
                             seams=Seams(timing=ManualTiming()), sync=rule)
    assert agent.sync.errors == 1
    sensor.fail = False   # the sensor is back; the operator changes the rule
    write_config(Path(agent.config_path), tmp_path / "spool.db",
                 upstreams=[upstream(fake_nucleus)], sync={**rule, "low_battery_pct": 25})
    await agent.reload()
    assert agent.sync.cfg.low_battery_pct == 25
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            sync = (await r.json())["sync"]
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            metrics = await r.text()
    assert sync["errors"] == 1 and "battery sensor gone" in sync["last_error"], sync
    assert "outpost_sync_errors_total 1\n" in metrics
