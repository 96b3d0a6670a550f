"""A module's next message, sent before the agent answered its last one, is not "busy".

Nucleus modules send their whole queue every tick, whether or not the last message was
answered. When a large message (over 4 MiB, charged 4 MiB of the in-flight budget from its
first byte) came in while the same connection's previous message still held its share, the
two were counted against each other and the later one refused with 1013 ("agent busy"),
though no other app held anything: the connection was closed and the module had to
reconnect and send its queue again (seen with nucleus-nodejs and an 11,000-event backlog on
a loaded machine). A connection's messages are taken one at a time: the next one waits,
unread, for the previous one's answer.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import orjson
import pytest

from agent.dialects.nucleus import MAX_MESSAGE
from tests.test_nucleus_backlog import KEY, raw_websocket, read_close
from tests.test_nucleus_frames import frame, message_of, read_frame
from tests.waiting import wait_for

SMALL = 3 * 1024 * 1024   # taken whole by aiohttp, its share taken by the handler


@pytest.mark.parametrize("first_size", [MAX_MESSAGE + 1000, SMALL],
                         ids=["large-then-large", "small-then-large"])
async def test_a_large_message_right_behind_another_is_acknowledged_not_busy(
        make_agent: Any, first_size: int) -> None:
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    first, second = message_of(first_size, first_id=1), message_of(MAX_MESSAGE + 1000,
                                                                    first_id=50_000)
    writer.write(frame(first) + frame(second))   # back to back, as a module's next tick can
    await writer.drain()
    replies = []
    for _ in range(2):
        opcode, payload = await read_frame(reader)
        # A close (0x8) carries 1013 and "agent busy, retry later".
        assert opcode == 0x1, (opcode, payload[:2].hex(), payload[2:].decode(errors="replace"))
        replies.append(orjson.loads(payload)["reportedIds"])
    writer.close()
    assert replies[0][0] == 1 and replies[1][0] == 50_000, [r[:1] for r in replies]
    assert agent.metrics.busy_refusals == 0
    assert agent.metrics.refused == {}


@pytest.mark.parametrize("size", [100, MAX_MESSAGE + 1000], ids=["small", "large"])
async def test_a_module_gone_before_its_answer_leaves_no_traceback(make_agent: Any,
                                                                   caplog: Any, size: int) -> None:
    """A module that sends its queue and quits (its process ending, the laptop sleeping)
    before the answer: the events are stored and the answer has nowhere to go. That was an
    unhandled ClientConnectionResetError, logged by aiohttp as an error with a traceback."""
    agent = await make_agent()
    before = asyncio.all_tasks()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    body = message_of(size, first_id=1) if size > 1000 else \
        b'{"data":[{"type":"event","name":"e","id":1}]}'
    writer.write(frame(body))
    writer.close()   # gone at once: the answer is written to a closed connection
    await writer.wait_closed()
    me = asyncio.current_task()
    # Every task the connection started (aiohttp's handler among them) has ended.
    await wait_for(lambda: not {t for t in asyncio.all_tasks() - before if t is not me
                                and not t.done()})
    await wait_for(lambda: agent.spool.depth >= 1)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


async def test_a_connection_closed_for_its_message_ends_with_a_large_one_behind_it(
        make_agent: Any) -> None:
    """A message whose answer is a close (here not a Nucleus message: 1007) with a large one
    right behind it: the large one waited, unread, for an answer that never came, and the
    module's close frame with it, so the closing handshake hung until aiohttp gave up on it
    (10 s), and a module that reconnects once its socket closes (nucleus-nodejs) waited."""
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    # Not drained: the agent reads no more of the connection until it closes it.
    writer.write(frame(b'{"data": 5}') + frame(message_of(MAX_MESSAGE + 1000)))
    code, _ = await read_close(reader)
    assert code == 1007
    writer.write(frame(struct.pack("!H", 1000), opcode=0x8))   # the module's close
    # Well within aiohttp's 10 s wait for the module's close frame.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert agent.metrics.busy_refusals == 0
