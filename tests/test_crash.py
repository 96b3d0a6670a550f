"""kill -9 the agent process under concurrent load: nothing acknowledged is ever lost.

The agent is a real ``python -m agent run`` subprocess; the
fake Nucleus upstream and the apps run in the test process, the upstream on a
fixed port so that it can go down and come back. Every event carries a unique
mark (tests/fakes/clients.py), so the upstream side can check each
acknowledged event arrived, and count the ones that arrived twice.

A duplicate upstream is legitimate only when a disruption (an agent restart or
an upstream outage) happened between its two deliveries: the batch was in
flight and its ack was lost. A duplicate inside one undisturbed epoch, or one
redelivered with a different id, is a bug.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.families.event import NUCLEUS, Event
from agent.settings import StorageConfig
from agent.spool import Spool
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.clients import Ledger, NucleusClient, upstream_marks
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import serving, wait_for

pytestmark = pytest.mark.slow

CYCLES = 20
DRAIN_TIMEOUT_S = 40.0


class TimedFake(FakeNucleus):
    """The fake upstream, also noting when each event arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    def _record(self, request: aiohttp.web.Request, msg: Any) -> list[Any]:
        ids = super()._record(request, msg)
        self.arrived += [time.monotonic()] * (len(self.events) - len(self.arrived))
        return ids


class Epochs:
    """Indexes into the upstream's arrival list at which a disruption happened."""

    def __init__(self, fake: FakeNucleus) -> None:
        self.fake = fake
        self.bounds: list[int] = []
        self.log: list[tuple[float, str, int]] = []

    def mark(self, what: str) -> None:
        self.bounds.append(len(self.fake.events))
        self.log.append((time.monotonic(), what, len(self.fake.events)))

    def of(self, index: int) -> int:
        return bisect.bisect_right(self.bounds, index)


def crash_config(tmp_path: Path, fake: FakeNucleus, port: int) -> Path:
    common = {"flush_interval_s": 0.05, "timeout_s": 10, "batch_max_events": 50}
    return write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "ws", "protocol": "nucleus-ws", "url": fake.url,
         "keys": ["wsapp1", "wsapp2"], **common},
        {"name": "http", "protocol": "nucleus-http", "url": fake.http_url, "keys": ["*"],
         **common},
    ])


def clients(base_url: str, ledger: Ledger) -> list[NucleusClient]:
    """Several apps per upstream, over both local transports."""
    plan = [("wsapp1", "ws"), ("wsapp1", "http"), ("wsapp2", "ws"),
            ("httpapp1", "ws"), ("httpapp1", "http"), ("httpapp2", "http")]
    return [NucleusClient(base_url, key, transport, ledger, rng=random.Random(i))
            for i, (key, transport) in enumerate(plan)]


async def drain(agent: AgentProcess, fake: FakeNucleus, ledger: Ledger) -> dict[str, Any]:
    """Flush until every acked mark arrived upstream and the spool is empty."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    status: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            async with s.post(f"{agent.url}/flush") as r:
                assert r.status == 200
            async with s.get(f"{agent.url}/status") as r:
                status = await r.json()
            if status["queue_depth"] == 0 and ledger.acked <= upstream_marks(fake.events).keys():
                return status
            await asyncio.sleep(0.25)
    return status


def verdict(fake: FakeNucleus, ledger: Ledger, epochs: Epochs) -> dict[str, Any]:
    """Losses, duplicates, and duplicates that no disruption explains."""
    first: dict[str, tuple[int, Any]] = {}
    duplicates: list[str] = []
    unexplained: list[str] = []
    changed_id: list[str] = []
    for i, ev in enumerate(fake.events):
        mark = (ev.get("payload") or {}).get("mark")
        if mark is None:
            continue
        if mark not in first:
            first[mark] = (i, ev.get("id"))
            continue
        duplicates.append(mark)
        j, first_id = first[mark]
        if epochs.of(i) == epochs.of(j):
            unexplained.append(f"{mark} at #{j} and #{i}")
        if ev.get("id") != first_id:
            changed_id.append(mark)
    lost = sorted(ledger.acked - first.keys())
    # FIFO per key (§2.7): each app's events first arrive in the order the app sent them
    # (an app's events all go to one key; its marks are "<transport><app>-<n>").
    out_of_order: list[str] = []
    last: dict[str, int] = {}
    for mark in sorted(first, key=lambda m: first[m][0]):
        app, _, n = mark.rpartition("-")
        if int(n) < last.get(app, 0):
            out_of_order.append(mark)
        last[app] = max(last.get(app, 0), int(n))
    return {"sent": len(ledger.sent), "acked": len(ledger.acked), "delivered": len(first),
            "out_of_order": out_of_order[:20],
            "deliveries": len(fake.events), "lost": lost, "duplicates": len(duplicates),
            "duplicate_marks": sorted(set(duplicates))[:20], "unexplained": unexplained,
            "changed_id": changed_id, "disruptions": len(epochs.bounds),
            "requests_ok": ledger.requests_ok, "requests_failed": ledger.requests_failed}


def report(tmp_path: Path, name: str, result: dict[str, Any],
           record_property: Callable[[str, object], None]) -> None:
    shown = {k: v for k, v in result.items() if k not in ("duplicate_marks", "timeline", "arrived")}
    print(f"\n{name}: " + json.dumps(shown, default=str))
    (tmp_path / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    for key in ("sent", "acked", "delivered", "duplicates", "disruptions"):
        record_property(f"{name}.{key}", result[key])


async def start(agent: AgentProcess) -> None:
    await asyncio.to_thread(agent.start)


async def kill9(agent: AgentProcess) -> None:
    await asyncio.to_thread(agent.kill9)


async def test_kill9_with_upstream_down_loses_nothing_acked(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        record_property: Callable[[str, object], None]) -> None:
    """Issue 2: upstream down, apps send concurrently, kill -9, restart, upstream back:
    every acknowledged event arrives, each exactly once (nothing was in flight)."""
    fake = await FakeNucleus().start(free_port())
    await fake.go_down()
    port = free_port()
    agent = agent_process(crash_config(tmp_path, fake, port), port)
    ledger = Ledger()
    stop = asyncio.Event()
    try:
        await start(agent)
        apps = clients(agent.url, ledger)
        tasks = [asyncio.create_task(c.run(stop)) for c in apps]
        # Waited for by what the apps saw, not by the clock (was 1.5 s, 0.3 s and 1.0 s of
        # sleeps): every app has events acknowledged (so stored) before the kill,
        await wait_for(lambda: len({mark.rpartition("-")[0] for mark in ledger.acked})
                       == len(apps) and ledger.requests_ok >= 3 * len(apps))
        acked_before_kill = len(ledger.acked)
        failed = ledger.requests_failed
        await kill9(agent)
        # the apps see the agent gone and queue up,
        await wait_for(lambda: ledger.requests_failed >= failed + 2 * len(apps))
        held = set(ledger.sent)
        await start(agent)
        # and resend their queues to the new process: all they held is acknowledged.
        await wait_for(lambda: held <= ledger.acked)
        stop.set()
        await asyncio.gather(*tasks)
        await fake.come_back()
        await drain(agent, fake, ledger)
    finally:
        stop.set()
        await fake.stop()
    result = verdict(fake, ledger, Epochs(fake))
    report(tmp_path, "kill9_upstream_down", result, record_property)
    assert acked_before_kill > 0 and result["acked"] > acked_before_kill
    assert result["lost"] == []
    assert result["duplicates"] == 0, result["duplicate_marks"]
    assert result["out_of_order"] == []


async def test_kill9_cycles_with_flapping_upstream(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        record_property: Callable[[str, object], None]) -> None:
    """Issue 5: 20 kill -9 cycles under load while the upstream goes up and down."""
    rng = random.Random(5)
    fake = await TimedFake().start(free_port())
    epochs = Epochs(fake)
    port = free_port()
    agent = agent_process(crash_config(tmp_path, fake, port), port)
    ledger = Ledger()
    stop = asyncio.Event()
    up = True
    tasks: list[asyncio.Task[None]] = []
    try:
        for cycle in range(CYCLES):
            await start(agent)
            epochs.mark("started")
            if not tasks:
                tasks = [asyncio.create_task(c.run(stop)) for c in clients(agent.url, ledger)]
            # Each app posts every 0.05 s and the agent flushes every 0.05 s, so each kill
            # finds posts in flight and batches unacked: about 3,000 events acked over
            # the cycles (4,000 at 0.15 to 0.6 s, for 3 s more of the suite's time).
            await asyncio.sleep(rng.uniform(0.1, 0.35))
            if rng.random() < 0.5:    # flip the upstream mid-cycle
                if up:
                    await fake.go_down()
                    epochs.mark("down")
                else:
                    await fake.come_back()
                    epochs.mark("up")
                up = not up
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            await kill9(agent)
            # The upstream reads what the dead process had sent: its connections end.
            await wait_for(lambda: not serving(), 5, every=0.005)
            epochs.mark("killed")
        stop.set()
        await asyncio.gather(*tasks)
        if not up:
            await fake.come_back()
        await start(agent)
        epochs.mark("started")
        status = await drain(agent, fake, ledger)
    finally:
        stop.set()
        await fake.stop()
    result = verdict(fake, ledger, epochs)
    result["counters"] = status.get("counters")
    result["timeline"] = epochs.log
    result["arrived"] = fake.arrived
    report(tmp_path, "kill9_cycles", result, record_property)
    assert result["acked"] > 500, "the load was too light to prove anything"
    assert result["lost"] == [], f"{len(result['lost'])} acknowledged events lost"
    assert result["unexplained"] == [], "duplicates with no disruption in between"
    assert result["changed_id"] == [], "redelivered with a different id"
    assert result["out_of_order"] == [], "an app's events arrived out of order"
    assert status["queue_depth"] == 0


async def test_queue_depth_survives_an_unclean_stop(tmp_path: Path) -> None:
    """Depth counters are persisted with every commit that changes them, acks included:
    a process that dies without closing the spool must not come back with stale depths."""
    cfg = StorageConfig(path=str(tmp_path / "spool.db"))
    first = await Spool.open(cfg)
    await first.append([Event("k", NUCLEUS, i, b'{"id":%d}' % i) for i in range(10)])
    rows = await first.fetch(first.streams["k"].id, 0, 100)
    await first.ack([r.seq for r in rows[:7]])
    await first.dead_letter([(rows[7].seq, "up", "poison")])
    # A second open without closing the first is what a restart after kill -9 sees.
    second = await Spool.open(cfg)
    try:
        assert first.depth == second.depth == 2
        assert second.streams["k"].bytes == sum(len(r.body) for r in rows[8:])
    finally:
        await second.close()
        await first.close()
