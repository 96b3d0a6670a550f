"""The live view's cost to the event loop once a very long key is known (listed in
accept_keys, or stored before keys were bounded): every key stored is registered for
redaction, for good."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.segment_helpers import call
from tests.waiting import LoopTurns, wait_for

NAME_BYTES = 300_000   # a Nucleus event's name may be most of its 500 KB
STALL_LIMIT_S = 0.3    # CPU: summarising what one take holds (8 MiB at most) costs ~20 ms


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

        # The agent runs on this loop: a turn's CPU on its thread is what others waited for.
        task = asyncio.create_task(read())
        try:
            async with LoopTurns() as turns:
                for j in range(2):
                    r = await call(port, "/app/nucleus-app-1/track", {"data": [
                        {"type": "event", "name": f"{i}" + "n" * NAME_BYTES, "id": f"{j}-{i}"}
                        for i in range(12)]})
                    assert r.status == 200, r.body[:200]
                await wait_for(lambda: len(names) + agent.metrics.tail_dropped >= 24, 30)
        finally:
            task.cancel()
    assert names and all(n <= 120 for n in names), names
    assert turns.worst < STALL_LIMIT_S, f"one turn of the event loop ran {turns.worst:.2f} s"
