"""A reload (SIGHUP) with work under way (docs/operations.md "Reload (SIGHUP)"): what the
upstream acknowledged of a batch the reload cut short is never sent again; a key whose
upstream is unchanged keeps its Retry-After and backoff step, and the upstream its
outage; the log names every section a reload does not apply.

In-process agents; ``Agent.reload`` is what SIGHUP runs. Where a wait matters the
forwarder clock is manual (tests/fakes/manual_timing.py): a wait is proved by the timers
pending, never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from agent.forwarder.backoff import Backoff
from agent.forwarder.probe import PROBE_S
from agent.forwarder.supervisor import Seams
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.conftest import write_config
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.ops_scene import RefusingUpstream
from tests.test_resume import (
    NO_NETWATCH,
    down_nucleus,
    get_json,
    parked_while_down,
    quiet,
    seams,
)
from tests.test_upstream_faults import event, send, upstream
from tests.waiting import wait_for

__all__ = ["down_nucleus"]   # the fixture, used below


async def test_a_reload_never_resends_what_the_upstream_acknowledged_of_a_batch_cut_short(
        make_agent: Any, fake_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost")
    fake_nucleus.ack = lambda i: i <= 4   # answers for 1-4 of the frame, never for 5-10
    ws = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url,
          "flush_interval_s": 0.02, "timeout_s": 30}
    agent = await make_agent(upstreams=[ws],
                             seams=Seams(grace_s=0.1, watch_network=NO_NETWATCH))
    await send(agent, [event(i) for i in range(1, 11)])
    uplink = cast(NucleusWsUplink, agent.forwarding.loops["app1"].uplink)
    await wait_for(lambda: len(fake_nucleus.ids()) == 10 and len(uplink.in_flight) == 6)
    fake_nucleus.ack = lambda i: True
    await agent.reload()   # the same config: the frame is still unanswered after the grace
    await wait_for(lambda: agent.spool.depth == 0)
    seen = Counter(fake_nucleus.ids())
    assert seen == {**dict.fromkeys(range(1, 5), 1), **dict.fromkeys(range(5, 11), 2)}, seen
    assert re.search(r"1 batch\(es\) .*cut short.*sent again", caplog.text), caplog.text


async def test_status_during_a_reload_sums_the_queues_under_the_names_they_were_grouped_by(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """While the old forwarders settle a batch in flight, /status shows one config: the
    queues grouped for the old names under the old names, never under a renamed one."""
    fake_nucleus.ack = lambda i: False   # the batch stays in flight: the reload waits on it
    ws = {"name": "a", "protocol": "nucleus-ws", "url": fake_nucleus.url, "timeout_s": 30}
    agent = await make_agent(upstreams=[ws], seams=Seams(grace_s=30, watch_network=NO_NETWATCH))
    await send(agent, [event(i) for i in range(1, 6)])
    await wait_for(lambda: len(fake_nucleus.ids()) == 5)
    assert agent.config_path is not None
    write_config(Path(agent.config_path), agent.spool.path, upstreams=[{**ws, "name": "b"}])
    reload = asyncio.create_task(agent.reload())
    try:
        await wait_for(lambda: agent.cfg.upstreams[0].name == "b")   # in the old stop now
        assert not reload.done()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
                ups = (await r.json())["upstreams"]
        assert [(u["name"], u["queue_depth"]) for u in ups] in ([("a", 5)], [("b", 5)]), ups
    finally:
        await fake_nucleus.go_down()   # the batch in flight fails: the old stop ends
        await reload
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            ups = (await r.json())["upstreams"]
    assert [(u["name"], u["queue_depth"]) for u in ups] == [("b", 5)], ups


async def parked_for_retry_after(make_agent: Any, busy: RefusingUpstream
                                 ) -> tuple[Any, ManualTiming, dict[str, Any]]:
    """An agent whose one key is parked for ``busy``'s Retry-After (told: no probe): the
    agent, its timing and its upstream's config."""
    timing = ManualTiming()
    up = {"name": "up", "protocol": "nucleus-http", "url": busy.url, "flush_interval_s": 0.02}
    agent = await make_agent(upstreams=[up], seams=seams(timing))
    await send(agent, [event(i) for i in range(2)])
    await quiet(agent, timing, 1)
    return agent, timing, up


async def test_a_reload_keeps_an_unchanged_upstreams_retry_after(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    busy = await RefusingUpstream(429, retry_after=300).start()
    try:
        agent, timing, up = await parked_for_retry_after(make_agent, busy)
        assert busy.requests == 1 and timing.pending() == [300.0]
        await agent.reload()   # the same config
        await wait_for(lambda: len(timing.pending()) == 1)
        assert busy.requests == 1, "the reload sent before the Retry-After"
        assert timing.pending() == [300.0]
        timing.advance(300.0)
        await wait_for(lambda: busy.requests == 2)
        # A changed upstream starts afresh: the key goes to it at once.
        write_config(Path(agent.config_path), tmp_path / "spool.db",
                     upstreams=[{**up, "url": fake_nucleus.http_url}])
        await agent.reload()
        await wait_for(lambda: agent.spool.depth == 0)
        assert fake_nucleus.ids() == [0, 1]
    finally:
        await busy.stop()


async def test_an_upstream_whose_keys_wait_out_a_retry_after_across_a_reload_shows_backoff(
        make_agent: Any) -> None:
    """The reload keeps the Retry-After (above), so nothing is sent for 300 s: /status must
    say the upstream is backing off, as it did before the reload, not that it is idle."""
    busy = await RefusingUpstream(429, retry_after=300).start()
    try:
        agent, timing, _ = await parked_for_retry_after(make_agent, busy)
        assert (await get_json(agent, "/status"))["upstreams"][0]["state"] == "backoff"
        await agent.reload()   # the same config
        await quiet(agent, timing, 1)
        assert timing.pending() == [300.0] and busy.requests == 1
        shown = (await get_json(agent, "/status"))["upstreams"][0]
        assert (shown["state"], shown["last_error"]) == (
            "backoff", 'HTTP 429: {"error": "refused by the test"}; next try in 300s, as its '
            "Retry-After asks"), shown
    finally:
        await busy.stop()


async def test_a_retry_under_way_at_a_reload_keeps_its_backoff_step(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 503), Fault("timeout", delay=30.0), Fault("status", 503)]
    timing = ManualTiming()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", timeout_s=20)],
                             seams=seams(timing, Backoff(base_s=8.0), grace_s=0.1))
    await send(agent, [event(0)])
    await quiet(agent, timing, 1)   # parked after the 503: a backoff of 4-8 s
    timing.advance(timing.pending()[0])
    await wait_for(lambda: len(faulty.requests) == 2)   # the retry, which the upstream holds
    await agent.reload()   # the same config: the retry is cut short, and sent again
    await wait_for(lambda: len(faulty.requests) == 3)
    await quiet(agent, timing, 1)
    # Its 503 is the second failure in a row: 8-16 s, not the first step's 4-8 s again.
    assert timing.pending()[0] >= 8.0, timing.pending()


async def test_a_reload_during_an_outage_keeps_when_it_began(
        make_agent: Any, down_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "outpost")
    timing = ManualTiming()
    agent = await parked_while_down(make_agent, down_nucleus, timing)
    since = agent.forwarding.states["up"].unreachable_since
    timing.advance(10 * PROBE_S)   # a probe, which fails: the outage goes on
    await quiet(agent, timing, 2)
    await agent.reload()
    assert agent.forwarding.states["up"].unreachable_since == since
    await down_nucleus.come_back()
    await wait_for(lambda: bool(timing.pending()))
    timing.advance(min(timing.pending()))   # the next probe connects: the key is retried
    await wait_for(lambda: agent.spool.depth == 0)
    timing.advance(PROBE_S)   # the recovery report's check: the backlog is delivered
    await wait_for(lambda: "recovered after" in caplog.text)
    assert len(re.findall(r"upstream up unreachable \(", caplog.text)) == 1, caplog.text
    outage = re.findall(r"upstream up recovered after (\d+)s", caplog.text)
    assert len(outage) == 1 and int(outage[0]) >= 10 * PROBE_S, caplog.text


async def test_a_reload_names_every_section_it_does_not_apply(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent()
    config = Path(agent.config_path)
    config.write_text(config.read_text() + '[log]\nlevel = "debug"\n'
                      '[device]\nplatform = "changed"\n')
    await agent.reload()
    line = next((r.getMessage() for r in caplog.records if "needs a restart" in
                 r.getMessage()), "")
    assert "[log]" in line and "[device]" in line, caplog.text
