"""A ``max_hold_h`` release under way across a restart of the agent (a stop and a start,
or a kill -9): the new agent goes on with what the release let go, and holds what came
after it, as the agent it replaces did. The in-process agent of test_sync_hold.py (the
tests' battery source and clocks), and `outpost run` killed with -9 on a fake
NetworkManager's metered network."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.clock import Clock
from agent.families.lanes import NORMAL
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nm_bus import FakeNetworkManager, PrivateBus
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_clock import status
from tests.test_sync_battery import upstream
from tests.test_sync_hold import HALF_HOUR, YES, held_agent, let_pass, post, sent
from tests.waiting import wait_for

HOUR_MS = 3_600_000


@pytest.mark.parametrize("rule", ["hold", "priority_only"])
async def test_a_restart_while_a_release_is_under_way_sends_only_what_it_let_go(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, rule: str) -> None:
    """The upstream puts the release off with a Retry-After; events come after it (young:
    held); the agent is stopped and started again. The new agent sends what the release
    let go, and holds the young events: it released afresh, up to what was queued at its
    start, which sent them too, on the network the hold is for."""
    timing = ManualTiming()
    agent = await held_agent(make_agent, fake_nucleus, timing, mode=rule, flush_interval_s=30)
    fake_nucleus.outage = (503, "300")
    await post(agent.port, range(1, 4))
    await let_pass(clock, timing, HALF_HOUR)
    await wait_for(lambda: agent.forwarding.states["up"].parked == 1)   # for 300 s
    await post(agent.port, range(4, 6))   # after the release: held
    await agent.stop()
    fake_nucleus.outage = None
    again = await held_agent(make_agent, fake_nucleus, ManualTiming(), mode=rule,
                             flush_interval_s=30)
    # What the release let go is sent; its loop ends (hold), or goes back to the high
    # lane alone (priority_only).
    await wait_for(lambda: again.spool.depth <= 2 and all(
        loop.until is None and NORMAL not in loop.lanes and rule != "hold"
        for loop in again.forwarding.loops.values()))
    assert sent(fake_nucleus) == [1, 2, 3] and again.spool.depth == 2
    assert again.sync.releases == 0   # the release goes on: no second one


async def test_a_kill9_while_a_release_is_under_way_sends_only_what_it_let_go(
        make_agent: Any, fake_nucleus: FakeNucleus, clock: Clock, tmp_path: Path,
        bus: PrivateBus, nm: FakeNetworkManager,
        agent_process: Callable[..., AgentProcess]) -> None:
    """`outpost run` on a metered network (hold, max_hold_h half an hour) finds events an
    hour old and releases them; the upstream puts the release off with a Retry-After;
    events come after it (young: held); the agent is killed with -9 and started again.
    The new agent sends what the release let go, and holds the young events."""
    await nm.set_metered(YES)
    sync = {"on_metered": "hold", "max_hold_h": HALF_HOUR / 3600, "dbus_address": bus.address}
    # Events received an hour ago: by an agent whose wall clock read an hour earlier.
    clock.wall_shift_ms = -HOUR_MS
    first = await make_agent(upstreams=[upstream(fake_nucleus)], sync=sync)
    assert first.sync.profile.mode == "hold"
    await post(first.port, range(1, 4))
    await first.stop()
    clock.wall_shift_ms = 0
    fake_nucleus.outage = (503, "300")
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                          upstreams=[upstream(fake_nucleus)], sync=sync)
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start)

    async def put_off() -> bool:
        snap = await status(port)
        return snap["sync"]["releases"] == 1 and snap["upstreams"][0]["state"] == "backoff"

    await wait_for(put_off)   # released, and waiting out the upstream's 300 s
    await post(port, range(4, 6))   # after the release: held
    await asyncio.to_thread(agent.kill9)
    fake_nucleus.outage = None
    await asyncio.to_thread(agent.start)

    async def released() -> bool:
        snap = await status(port)
        return snap["queue_depth"] <= 2 and snap["upstreams"][0]["state"] == "idle"

    await wait_for(released)
    snap = await status(port)
    assert sent(fake_nucleus) == [1, 2, 3] and snap["queue_depth"] == 2, agent.log.read_text()
    assert snap["sync"]["held_events"] == 2 and snap["sync"]["releases"] == 0
