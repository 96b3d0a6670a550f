"""Seqs never go back, even across kill -9 (they are the ids of events sent without one).

A Nucleus uplink sends an event that came without an ``id`` under its spool seq, and
the upstream dedupes by id: a seq handed out twice makes a new event look like a
resend of a delivered one, and the upstream drops it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def event(name: str) -> dict[str, Any]:
    return {"data": [{"type": "event", "name": name, "sessionId": 5, "machineId": "m",
                      "date": "2026-01-01T00:00:00Z"}]}


async def post(s: aiohttp.ClientSession, agent: AgentProcess, name: str) -> None:
    async with s.post(f"{agent.url}/app/k/track", json=event(name)) as r:
        assert r.status == 200, await r.text()


async def queue_empty(s: aiohttp.ClientSession, agent: AgentProcess) -> bool:
    async with s.get(f"{agent.url}/status") as r:
        return bool(sum(u["queue_depth"] for u in (await r.json())["upstreams"]) == 0)


async def test_ids_of_events_without_one_stay_unique_across_kill9(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """With no delivered keys kept (dedupe_window_h = 0), events delivered since the last
    clock mark (written once a minute) left nothing in the file that held their seqs."""
    fake = await FakeNucleus().start()
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       storage={"dedupe_window_h": 0},
                       upstreams=[{"name": "n", "protocol": "nucleus-http", "url": fake.http_url,
                                   "keys": ["*"], "flush_interval_s": 0.05, "timeout_s": 5}])
    agent = agent_process(cfg, port)
    try:
        await asyncio.to_thread(agent.start)
        async with aiohttp.ClientSession() as s:
            for i in range(3):  # one commit each: only the first writes a clock mark
                await post(s, agent, f"before-{i}")
                await wait_for(lambda i=i: len(fake.events) == i + 1)  # type: ignore[misc]
            # Delivered and deleted: the kill must not land between the upstream's ack and
            # its delete, or before-2 is rightly sent again after the restart.
            await wait_for(lambda: queue_empty(s, agent))
        await asyncio.to_thread(agent.kill9)
        await asyncio.to_thread(agent.start)
        async with aiohttp.ClientSession() as s:
            await post(s, agent, "after")
        await wait_for(lambda: len(fake.events) == 4)
    finally:
        await fake.stop()
    names = [ev["name"] for ev in fake.events]
    ids = fake.ids()
    assert names == ["before-0", "before-1", "before-2", "after"]
    assert len(set(ids)) == 4, f"an id was handed out twice: {list(zip(names, ids))}"
