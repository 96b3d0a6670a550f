"""Memory while many keys drain is bounded, whatever clients send.

Each batch in flight holds its rows and its request body (up to ``batch_max_bytes``,
500 KB by default). With ``accept_keys = []`` any local process can invent keys, and
every key with a queue had its loop read a batch and wait with it for the upstream:
200 keys with 400 KB queued each held 200 MB while a slow upstream answered (scratch
measurement, docs/operations.md). Now an upstream has at most
``BATCHES_IN_FLIGHT`` batches in flight from all keys together, taken in turn.
"""

from __future__ import annotations

import asyncio
import base64
import os
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from agent.forwarder.slots import BATCHES_IN_FLIGHT
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.loopback_server import serving
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_ingest_memory import RssSampler
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for

KEYS, EVENTS = 3 * BATCHES_IN_FLIGHT, 20


class GatedUpstream:
    """A Segment collector that holds every request until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.pending = self.most = 0
        self.ids: Counter[str] = Counter()

    async def batch(self, request: web.Request) -> web.Response:
        self.pending += 1
        self.most = max(self.most, self.pending)
        try:
            body = orjson.loads(await request.read())
            await self.gate.wait()
        finally:
            self.pending -= 1
        self.ids.update(ev["messageId"] for ev in body["batch"])
        return web.json_response({"success": True})


async def test_an_upstream_has_a_bounded_number_of_batches_in_flight(make_agent: Any) -> None:
    up = GatedUpstream()
    async with serving("/v1/batch", up.batch) as url:
        agent = await make_agent(upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url,
            "flush_interval_s": 0.02, "timeout_s": 30}])
        async with aiohttp.ClientSession() as s:
            for k in range(KEYS):
                auth = base64.b64encode(f"key{k}:".encode()).decode()
                batch = [{"type": "track", "event": "e", "userId": "u", "messageId": f"{k}-{i}"}
                         for i in range(EVENTS)]
                async with s.post(f"http://127.0.0.1:{agent.port}/v1/batch",
                                  json={"batch": batch},
                                  headers={"Authorization": f"Basic {auth}"}) as r:
                    assert r.status == 200, await r.text()
        # Every slot is taken, and the keys beyond them wait without reading a batch (each
        # loop gets there after its own flush timer: waited for, not read at once).
        loops = agent.forwarding.loops.values()
        await wait_for(lambda: up.pending == BATCHES_IN_FLIGHT and sum(
            loop.waiting_for_slot for loop in loops) == KEYS - BATCHES_IN_FLIGHT, timeout=10)
        up.gate.set()
        await wait_for(lambda: agent.spool.depth == 0, timeout=30)
        assert up.most == BATCHES_IN_FLIGHT
        # Every slot is back, and no idle loop waits for one.
        await wait_for(lambda: agent.forwarding._slots["seg"].free == BATCHES_IN_FLIGHT)
        assert not any(loop.waiting_for_slot for loop in agent.forwarding.loops.values())
        assert up.ids == Counter(f"{k}-{i}" for k in range(KEYS) for i in range(EVENTS))


LARGE_EVENTS, LARGE_BYTES = 240, 300_000   # each ~400 KB once base64: 96 MB queued
READ_PEAK_LIMIT = 100 * 1024 * 1024   # ~55 MB read a few batches at a time; 146 MB before


async def test_a_backlog_of_large_events_is_read_a_few_batches_at_a_time(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A batch is bounded by ``batch_max_bytes``, but a read was bounded by count only:
    a forwarder read four batches' worth of events (2,000), whatever their size, at
    every retry and for every batch it sent. A device back with a backlog of 400 KB
    events held all of it in memory at once. The agent restarts on that backlog, its
    upstream still down, and its peak RSS over the first retries is measured."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[{
        "name": "n", "protocol": "nucleus-ws", "url": f"ws://127.0.0.1:{free_port()}",
        "flush_interval_s": 0.05}])
    first = agent_process(cfg, port).start()
    async with aiohttp.ClientSession() as s:
        for i in range(0, LARGE_EVENTS, 8):
            data = [{"type": "event", "name": "blob", "id": n, "sessionId": 1,
                     "data": {"blob": base64.b64encode(os.urandom(LARGE_BYTES)).decode()}}
                    for n in range(i, i + 8)]
            async with s.post(f"{first.url}/app/k/track", data=orjson.dumps({"data": data}),
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
    assert first.terminate() == 0
    again = agent_process(cfg, port)
    offset = again.spawn()   # sampled from its first moment: the first read comes at once
    assert again.proc is not None
    sampler = RssSampler(again.proc.pid)
    with sampler.running():
        again.ready(offset)
        async with aiohttp.ClientSession() as s:
            async def retries() -> int:
                async with s.get(f"{again.url}/status") as r:
                    status = await r.json()
                assert status["queue_depth"] == LARGE_EVENTS
                return int(status["upstreams"][0]["retries"])
            deadline = asyncio.get_running_loop().time() + 30
            while await retries() < 2:
                assert asyncio.get_running_loop().time() < deadline, "no retry in 30 s"
                await asyncio.sleep(0.1)
    assert sampler.peak < READ_PEAK_LIMIT, f"peak RSS {sampler.peak / 2**20:.0f} MB"


async def test_events_that_fill_a_batch_by_bytes_are_sent_without_waiting_for_the_flush(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A batch goes when it is full or when its oldest event is due; full was counted in
    events only, so events too large for one batch waited out ``flush_interval_s``."""
    agent = await make_agent(upstreams=[{"name": "up", "protocol": "nucleus-ws",
                                         "url": fake_nucleus.url, "flush_interval_s": 3600}])
    blob = "x" * 300_000   # two are more than the 500 KB a batch holds
    await send(agent, [event(i, blob=blob) for i in range(3)])
    # The first two each fill a batch, acknowledged; the third, alone, waits for the flush.
    await wait_for(lambda: fake_nucleus.batches == [[0], [1]] and agent.spool.depth == 1,
                   timeout=10)


MAPPED_KEYS, MAPPED_EVENTS = 16, 500
MAPPED_HELD_LIMIT = 16 * 1024 * 1024   # ~10 MB held: 40 MB with orjson's buffers


async def test_batches_mapped_at_send_time_hold_their_bodies_right_sized(
        make_agent: Any) -> None:
    """Segment events sent to a Nucleus upstream are mapped as their batch is prepared,
    and a batch keeps its bodies until it is answered (a resend, a split). Each body was
    orjson's whole working buffer, 4 KiB however short the event: 16 batches of 500
    events in flight held 32 MB for 2.4 MB of JSON. Traced: the agent's Python memory
    while every batch waits for the upstream."""
    gate = asyncio.Event()
    pending = 0

    async def track(request: web.Request) -> web.Response:
        nonlocal pending
        # Only the ids are kept while it waits (request.read() would keep the body too):
        # what is traced is the agent's memory.
        ids = [ev["id"] for ev in orjson.loads(await request.content.read())["data"]]
        pending += 1   # the whole request read: the agent holds only what it keeps
        await gate.wait()
        return web.json_response({"reportedIds": ids})

    async with serving("/app/{key}/track", track) as url:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-http", "url": url, "flush_interval_s": 3600,
            "timeout_s": 30}])
        tracemalloc.start()
        try:
            async with aiohttp.ClientSession() as s:
                for k in range(MAPPED_KEYS):
                    auth = base64.b64encode(f"key{k}:".encode()).decode()
                    batch = [{"type": "track", "event": "e", "userId": "u",
                              "messageId": f"{k}-{i}", "properties": {"n": i}}
                             for i in range(MAPPED_EVENTS)]
                    async with s.post(f"http://127.0.0.1:{agent.port}/v1/batch",
                                      json={"batch": batch},
                                      headers={"Authorization": f"Basic {auth}"}) as r:
                        assert r.status == 200, await r.text()
            await wait_for(lambda: pending == MAPPED_KEYS, timeout=20)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            gate.set()
        assert held < MAPPED_HELD_LIMIT, f"{held / 2**20:.1f} MB held"
        await wait_for(lambda: agent.spool.depth == 0, timeout=20)
