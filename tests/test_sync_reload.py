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
