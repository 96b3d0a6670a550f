"""The live view's cost to the event loop once a very long key is known (listed in
accept_keys, or stored before keys were bounded): every key stored is registered for
redaction, for good."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from tests.segment_helpers import call

NAME_BYTES = 300_000   # a Nucleus event's name may be most of its 500 KB
STALL_LIMIT_S = 0.3    # summarising what one take holds (8 MiB at most) costs ~20 ms


async def test_a_long_key_does_not_make_the_tail_stall_the_loop(make_agent: Any) -> None:
    """Every name and id the tail shows is redacted before it is cut, over a margin as long
    as the longest secret registered: one request with a 400 KB writeKey made that margin
    half a million characters, scanned a character at a time in Python, so a viewer
    summarising events with long names held the event loop ~60 ms per event, over a second
    per take. Ingest and every other request waited for the tail meanwhile. (An app may
    no longer invent such a key, but accept_keys may list one.)"""
    long_key = "K" * 400_000
    agent = await make_agent(listen={"accept_keys": [long_key, "nucleus-app-1"]})
    port = agent.port
    r = await call(port, "/v1/batch", {"writeKey": long_key, "batch": [
        {"type": "track", "event": "e", "userId": "u"}]})
    assert r.status == 200, r.body[:200]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        names: list[int] = []

        async def read() -> None:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    m = json.loads(line[6:])
                    if m["kind"] == "ingested":
                        names.append(len(m["name"]))

        stall = 0.0

        async def probe() -> None:
            nonlocal stall
            while True:
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                stall = max(stall, time.perf_counter() - before - 0.01)

        tasks = [asyncio.create_task(read()), asyncio.create_task(probe())]
        try:
            for j in range(2):
                r = await call(port, "/app/nucleus-app-1/track", {"data": [
                    {"type": "event", "name": f"{i}" + "n" * NAME_BYTES, "id": f"{j}-{i}"}
                    for i in range(12)]})
                assert r.status == 200, r.body[:200]
            for _ in range(600):   # bounded: 30 s
                if len(names) + agent.metrics.tail_dropped >= 24:
                    break
                await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
    assert names and all(n <= 120 for n in names), names
    assert stall < STALL_LIMIT_S, f"the event loop was held {stall:.2f} s by the tail"
