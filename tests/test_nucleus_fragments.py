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
import struct
from collections import Counter
from typing import Any

import orjson
import pytest
from aiohttp import WSCloseCode

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


# A message begun in fragments, then a data frame that is not its continuation: RFC 6455
# §5.4 allows none until its last fragment, and the endpoint fails the connection (1002).
BEGUN = b'{"data":[{"type":"event","name":"begun","id":1}]}'
INTRUDER = b'{"data":[{"type":"event","name":"intruder","id":2}]}'
INTRUSIONS = {   # (the begun message's opcode, the intruding frame's opcode and fin)
    "text then a whole text": (0x1, 0x1, True),
    "binary then a whole text": (0x2, 0x1, True),
    "text then a whole binary": (0x1, 0x2, True),
    "text then a text fragment": (0x1, 0x1, False),
}


@pytest.mark.parametrize("begun,opcode,fin", INTRUSIONS.values(), ids=INTRUSIONS)
async def test_a_data_frame_inside_a_message_in_fragments_fails_the_connection_1002(
        make_agent: Any, begun: int, opcode: int, fin: bool) -> None:
    """The fragments gathered before it were dropped, and a whole message intruding was
    taken as a message of its own: stored and acknowledged, where the connection is
    failed (the reader's own comment said aiohttp would be told, and fail it: told by an
    empty fragment, aiohttp missed a final frame after it). Nothing stored, no reply but
    the close."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    try:
        writer.write(frame(BEGUN[:12], opcode=begun, fin=False)
                     + frame(INTRUDER, opcode=opcode, fin=fin))
        await writer.drain()
        opcode_got, payload = await read_frame(reader)
    finally:
        writer.close()
    assert opcode_got == 0x8, (opcode_got, payload)
    assert struct.unpack("!H", payload[:2])[0] == WSCloseCode.PROTOCOL_ERROR, payload
    assert agent.spool.depth == 0
