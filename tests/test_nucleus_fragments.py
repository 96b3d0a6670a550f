"""A Nucleus module's queue sent as Chromium sends a websocket message: in fragments.

Chromium (so a browser page, and an Electron renderer, where nucleus-nodejs and
nucleus-analytics use the page's own WebSocket) writes a message of more than about
128 KiB as a text frame and continuation frames of 131,000 bytes each. A message over
4 MiB in fragments (a renderer's queue after the agent was away) was left to aiohttp,
which closed the connection with 1009: the module sent the same queue, larger, at its
next tick, closed again, for ever; none of the app's events arrived. Such a message is
now taken as one in a single frame is: the events of its first 2 MiB stored and
acknowledged, the module resending the rest.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import orjson

from agent.dialects.nucleus import MAX_MESSAGE
from tests.test_nucleus_backlog import KEY, module_queue, raw_websocket
from tests.test_nucleus_frames import frame, read_frame

CHROMIUM_FRAGMENT = 131_000   # the payload of each frame of a long message (measured)


def fragments(message: bytes, size: int = CHROMIUM_FRAGMENT) -> bytes:
    """``message`` as Chromium writes it: a text frame, then continuation frames."""
    pieces = [message[i:i + size] for i in range(0, len(message), size)]
    return b"".join(frame(p, opcode=0x1 if n == 0 else 0x0, fin=n == len(pieces) - 1)
                    for n, p in enumerate(pieces))


async def test_a_queue_over_4_mib_in_fragments_drains_each_event_stored_once(
        make_agent: Any) -> None:
    agent = await make_agent()
    queue = module_queue(14_000)
    for i, ev in enumerate(queue):
        ev["name"] += f" {i}"
    names = Counter(ev["name"] for ev in queue)
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    try:
        for tick in range(1, 11):
            message = json.dumps({"data": queue}, ensure_ascii=False,
                                 separators=(",", ":")).encode()
            assert tick > 1 or len(message) > MAX_MESSAGE + 1_000_000
            writer.write(fragments(message))
            await writer.drain()
            opcode, payload = await read_frame(reader)
            assert opcode == 0x1, (tick, opcode, payload[2:].decode(errors="replace"))
            acked = orjson.loads(payload)["reportedIds"]
            left = [ev for ev in queue if ev["id"] not in acked]   # as modules filter
            assert len(left) < len(queue), f"tick {tick} took nothing"
            queue = left
            if not queue:
                break
    finally:
        writer.close()
    assert not queue, f"{len(queue)} events left after 10 ticks"
    rows = await agent.spool.fetch(agent.spool.streams[KEY].id, 0, 20_000)
    assert Counter(orjson.loads(r.body)["name"] for r in rows) == names


async def test_a_small_message_in_fragments_is_taken_whole(make_agent: Any) -> None:
    """Under 4 MiB, a message in fragments is acknowledged whole, as one in a frame is."""
    agent = await make_agent()
    queue = module_queue(3_000)
    message = json.dumps({"data": queue}).encode()
    assert CHROMIUM_FRAGMENT * 3 < len(message) < MAX_MESSAGE
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    try:
        writer.write(fragments(message))
        await writer.drain()
        opcode, payload = await read_frame(reader)
    finally:
        writer.close()
    assert opcode == 0x1, (opcode, payload[2:].decode(errors="replace"))
    assert orjson.loads(payload)["reportedIds"] == [ev["id"] for ev in queue]
    assert agent.spool.depth == len({(ev["id"], ev["name"]) for ev in queue})
