"""Parked keys are retried one by one: a retry that fails to start for one key (a bug,
here an uplink factory that raises) must not strand the other keys parked with it, nor
that key.

The supervisor's one retry timer and ``_resume`` take keys from the parking lot
(agent/forwarder/parking.py); a key is taken only as its loop is started. A loop that
cannot be built is reported as a crash and its key parked again, for its own retry.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from agent.forwarder.backoff import Backoff
from agent.uplinks.registry import make_uplink
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_resume import nucleus_upstream, quiet, seams
from tests.test_upstream_faults import delivered, event, send, upstream
from tests.waiting import wait_for

KEYS = ("app1", "app2", "app3")
BASE_S = 8.0   # a first backoff of 4-8 s: every key's retry is due after BASE_S


class Factory:
    """Uplinks as usual, except that once ``armed`` the next one raises (once)."""

    def __init__(self) -> None:
        self.armed = False
        self.broke: str | None = None

    def __call__(self, cfg: Any, key: str, session: aiohttp.ClientSession,
                 machine_id: str) -> Any:
        if self.armed and self.broke is None:
            self.broke = key
            raise RuntimeError("injected uplink factory fault")
        return make_uplink(cfg, key, session, machine_id)


async def parked(agent: Any, timing: ManualTiming, timers: int) -> None:
    """Wait until every key failed once and waits, parked, with ``timers`` timers."""
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.retries == len(KEYS))
    await quiet(agent, timing, timers)


async def test_a_retry_timer_that_raises_for_one_key_does_not_strand_the_others(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 503) for _ in KEYS]
    timing = ManualTiming()
    factory = Factory()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")],
                             seams=seams(timing, Backoff(base_s=BASE_S), make_uplink=factory))
    for n, key in enumerate(KEYS):
        await send(agent, [event(n)], key=key)
    await parked(agent, timing, 1)   # the one retry timer serves every key
    factory.armed = True
    timing.advance(BASE_S)   # every key's retry is due; one key's loop cannot be built
    state = agent.forwarding.states["up"]
    assert state.crashes == 1 and "injected uplink factory fault" in (state.last_error or "")
    others = {n for n, key in enumerate(KEYS) if key != factory.broke}
    # No new data comes: only the parked keys' retries can deliver these.
    await wait_for(lambda: set(delivered(faulty)) >= others)
    timing.advance(max(timing.pending()))   # the broken key's own retry
    await wait_for(lambda: set(delivered(faulty)) >= set(range(len(KEYS))))


async def test_an_upstream_back_that_raises_for_one_key_does_not_strand_the_others(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    await fake_nucleus.go_down()
    timing = ManualTiming()
    factory = Factory()
    agent = await make_agent(upstreams=[nucleus_upstream(fake_nucleus, "nucleus-http")],
                             seams=seams(timing, Backoff(base_s=BASE_S), make_uplink=factory))
    for n, key in enumerate(KEYS):
        await send(agent, [event(n)], key=key)
    await parked(agent, timing, 2)   # the keys' retry timer and the next probe
    assert agent.forwarding.states["up"].unreachable_since is not None
    factory.armed = True
    await fake_nucleus.come_back()
    timing.advance(min(timing.pending()))   # the probe connects: its keys are taken
    await wait_for(lambda: factory.broke is not None)
    timing.advance(BASE_S)
    others = {n for n, key in enumerate(KEYS) if key != factory.broke}
    await wait_for(lambda: others <= set(fake_nucleus.ids()))
    assert agent.forwarding.states["up"].crashes == 1
    timing.advance(max(timing.pending()))   # the broken key's own retry
    await wait_for(lambda: set(range(len(KEYS))) <= set(fake_nucleus.ids()))
