"""The spool's -wal removed under a running `outpost run` (an operator clearing what looks
like a temporary file): the events answered 200 live in that log until a checkpoint, and
the agent's connections go on writing into the file no path names any more."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.test_disk import event


async def post(s: aiohttp.ClientSession, agent: AgentProcess, ids: range) -> int:
    async with s.post(f"{agent.url}/app/app1/track",
                      json={"data": [event(i, pad="") for i in ids]}) as r:
        return r.status


async def status(agent: AgentProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/status") as r:
        assert r.status == 200
        got: dict[str, Any] = await r.json()
        return got


@pytest.mark.parametrize("removed", [("-wal",), ("-wal", "-shm")], ids=["wal", "wal-and-shm"])
async def test_events_taken_after_the_wal_is_removed_survive_a_kill(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        removed: tuple[str, ...]) -> None:
    """Events answered 200, then the -wal removed (and the -shm with it), then more
    answered 200, then kill -9: every one is queued at the next start, none counted
    lost. They were all lost (the -wal holding them gone with the process; the next start
    said 'its write-ahead log is cut short'), and until then the forwarder's reads failed
    with 'disk I/O error', a crash and a traceback every half second."""
    spool = tmp_path / "spool.db"
    port = free_port()
    config = write_config(tmp_path / "agent.toml", spool, port=port, upstreams=[
        {"name": "up", "protocol": "nucleus-http", "url": f"http://127.0.0.1:{free_port()}",
         "flush_interval_s": 0.02}])
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start, 30)
    async with aiohttp.ClientSession() as s:
        assert await post(s, agent, range(5)) == 200
        for suffix in removed:
            Path(f"{spool}{suffix}").unlink()
        assert await post(s, agent, range(5, 7)) == 200
    assert (await status(agent))["queue_depth"] == 7
    agent.kill9()
    first_run = agent.log.read_text()
    assert "crashed" not in first_run, first_run
    await asyncio.to_thread(agent.start, 30)
    got = await status(agent)
    assert agent.terminate() == 0
    assert got["queue_depth"] == 7, agent.log.read_text()
    assert not got["counters"].get("dropped_corrupt") and not got["counters"].get("wal_damaged")
