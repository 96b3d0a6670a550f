"""`outpost flush` when nothing it asks for can go (docs/operations.md "outpost flush"):
the events match no upstream, or the transmit profile holds them. It said "flush
requested; N events queued" and exited 0 as when it sends them: an operator waiting
for the queue to drain had no word of why it did not. A real agent on 127.0.0.1 and
the real CLI in a subprocess."""

from __future__ import annotations

from typing import Any

from tests.conftest import free_port
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_sync_battery import Sensor, upstream
from tests.test_sync_hold import LOW
from tests.test_upstream_faults import event, send
from tests.waiting import run_outpost


async def test_flush_says_when_the_events_match_no_upstream(make_agent: Any) -> None:
    agent = await make_agent(upstreams=[], port=free_port())
    await send(agent, [event(i) for i in range(3)])
    code, out = await run_outpost("flush", "--config", agent.config_path)
    assert code == 0, out
    assert out.splitlines() == [
        "flush requested; 3 events queued",
        "3 of them match no upstream: they stay queued until a reload routes them"], out


async def test_flush_says_when_the_transmit_profile_holds_the_events(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)], port=free_port(),
                             battery=Sensor(LOW),
                             sync={"on_low_battery": "hold", "low_battery_pct": 20})
    await send(agent, [event(i) for i in range(2)])
    code, out = await run_outpost("flush", "--config", agent.config_path)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "flush requested; 2 events queued", out
    assert lines[1].startswith("the transmit profile holds them: hold (battery 10%"), out
    assert lines[1].endswith("; a flush does not override a hold"), out
