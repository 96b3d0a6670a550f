"""kill -9 of a real `outpost run` inside the first start's migration of a v0 spool.

The v0 -> v5 migration is one transaction, then a VACUUM outside it (migrate.py): the
file takes auto_vacuum = INCREMENTAL only so, and without it the space of delivered
events is never handed back to the file system. The kill lands after the transaction's
commit (the log says the spool is migrated), inside the VACUUM: the next start must
still queue every event once, keep the dedupe keys, and hand the space back after a
drain, as a spool migrated without a kill does.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.families.event import NUCLEUS
from agent.families.nucleus import identity_key
from tests.conftest import AgentProcess, exited, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.spool_files import Stored, build_v0, table
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

QUEUED = 12_000
DELIVERED = 3_000
DATE = "2026-01-01T00:00:00.000Z"


def event(i: int) -> dict[str, Any]:
    """Event ``i``, padded with hex noise (zstd halves it, no more): a migrated file
    large enough for its VACUUM to take a while."""
    pad = random.Random(i).randbytes(1_000).hex()
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": DATE, "payload": {"pad": pad}}


def v0_spool(path: Path) -> None:
    """A v0 spool (one row per event) of DELIVERED tombstones then QUEUED events, keyed
    as the agent keys a Nucleus event posted to /app/app1/track."""
    now = int(time.time() * 1000)
    rows = []
    for i in range(DELIVERED + QUEUED):
        ev = event(i)
        key = identity_key("app1", ev, "event", i, "e", DATE)
        delivered = i < DELIVERED
        rows.append((Stored(i + 1, 1, NUCLEUS, now - 60_000, key,
                            b"" if delivered else orjson.dumps(ev)), now if delivered else None))
    build_v0(path, rows, marks=[(0, len(rows) + 1)], streams=[(1, "app1")])


def kill_once_migrated(agent: AgentProcess) -> None:
    """Start the agent and kill -9 it as soon as its log says the migration committed."""
    offset = agent.spawn()
    assert agent.proc is not None
    while True:
        seen = agent.log.read_bytes()[offset:]
        if b"spool migrated to format" in seen:
            break
        assert agent.proc.poll() is None, seen.decode()
        time.sleep(0.002)
    agent.proc.send_signal(signal.SIGKILL)
    exited(agent.proc, 10)
    assert b"listening on" not in agent.log.read_bytes()[offset:], "the kill came too late"


async def status(s: aiohttp.ClientSession, agent: AgentProcess) -> dict[str, Any]:
    async with s.get(f"{agent.url}/status") as r:
        assert r.status == 200
        got: dict[str, Any] = await r.json()
        return got


async def test_a_kill_inside_the_vacuum_after_a_v0_migration_still_gives_space_back(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Killed in the VACUUM after the v0 migration committed, the spool kept
    auto_vacuum = NONE for good (the next start finds it at v5, and only the migration
    vacuums): every delivery's space, and the dropped v0 tables' too, stayed in the
    file. After a drain it kept the v0 file's whole size, where a drained spool shrinks
    to what its dedupe keys take."""
    spool = tmp_path / "spool.db"
    await asyncio.to_thread(v0_spool, spool)
    v0_size = os.path.getsize(spool)
    fake = await FakeNucleus().start()
    try:
        port = free_port()
        config = write_config(tmp_path / "agent.toml", spool, port=port, upstreams=[
            {"name": "up", "protocol": "nucleus-http", "url": fake.http_url,
             "flush_interval_s": 0.02, "batch_max_events": 200}])
        agent = agent_process(config, port)
        await asyncio.to_thread(kill_once_migrated, agent)
        await asyncio.to_thread(agent.start, 60)
        async with aiohttp.ClientSession() as s:
            await wait_for(lambda: len(fake.ids()) >= QUEUED, timeout=60)
            assert sorted(fake.ids()) == list(range(DELIVERED, DELIVERED + QUEUED))
            # Delivered before the kill, and queued: still known, answered as resends.
            async with s.post(f"{agent.url}/app/app1/track",
                              json={"data": [event(0), event(DELIVERED + QUEUED - 1)]}) as r:
                assert r.status == 200
            got = await status(s, agent)
            assert got["queue_depth"] == 0 and got["counters"].get("duplicates") == 2
            # The drained spool's file: the keys of 15,000 delivered events (~12 bytes
            # each), not the megabytes of the events themselves.
            await wait_for(lambda: os.path.getsize(spool) < v0_size // 10, timeout=20)
        assert agent.terminate() == 0
    finally:
        await fake.stop()
    assert table(spool, "PRAGMA auto_vacuum") == [(2,)]
    assert table(spool, "PRAGMA integrity_check") == [("ok",)]
