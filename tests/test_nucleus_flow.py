"""A Nucleus websocket keeps aiohttp's flow control: a module that sends faster than its
messages are stored is read no faster than they are.

aiohttp stops reading a websocket once its queue of received messages holds 256 KiB,
until the handler has taken them. The large-message reader (nucleus_frames.py) pauses and
resumes the connection's reading itself, a slice a turn: resumed once a large message was
read whole while aiohttp's pause was in force, the connection was read on with aiohttp
believing it still paused, so it never paused it again: every message the module sent
after was read into memory however far behind their storing was.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

from agent.dialects.nucleus import MAX_MESSAGE
from tests.test_nucleus_backlog import KEY, raw_websocket
from tests.test_nucleus_frames import frame, message_of, read_frame
from tests.waiting import wait_for

MB = 1024 * 1024


def small(n: int) -> bytes:
    """A message of one tiny event: aiohttp counts each message 128 bytes more than its
    payload, so a read of them fills its queue's 256 KiB."""
    return frame(orjson.dumps({"data": [{"name": "s", "id": n}]}))


async def test_messages_after_a_large_one_are_read_no_faster_than_they_are_stored(
        make_agent: Any) -> None:
    agent = await make_agent()
    reader, writer = await raw_websocket(agent.port, f"/app/{KEY}/track")
    large = frame(message_of(MAX_MESSAGE + MB, first_id=1_000_000))
    large_acked = asyncio.Event()

    async def replies() -> None:   # read as a module does, until the agent closes
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                _op, payload = await read_frame(reader)
                if 1_000_000 in orjson.loads(payload).get("reportedIds", []):
                    large_acked.set()
    reading = asyncio.ensure_future(replies())
    # The large message, then more small ones than aiohttp's queue holds, and on: each is
    # stored (a commit) before the next is taken, so the agent falls behind the module.
    writer.write(large)
    wire = len(small(100_000))
    sent, n, most = 0, 1, 0
    transport = writer.transport

    def ahead() -> int:
        """What the agent took and has not stored yet (counting the large message stored)."""
        return sent - transport.get_write_buffer_size() - agent.spool.depth * wire
    while sent < 64 * MB and most < 24 * MB:
        chunk = b"".join(small(i) for i in range(n, n + 500))
        n += 500
        writer.write(chunk)
        sent += len(chunk)
        most = max(most, ahead())
        await asyncio.sleep(0)   # let the agent run (in this process)
    # The large message is parsed and committed in threads, which the passes above do not
    # wait for (on a loaded machine they may all pass first): its ack is waited for, the
    # agent reading on meanwhile as it will, and how far ahead it got looked at again.
    await wait_for(large_acked.is_set)
    most = max(most, ahead())
    transport.abort()
    reading.cancel()
    assert most < 24 * MB, (f"the agent took {most / MB:.0f} MiB of messages ahead of "
                            "storing them: read into memory, unbounded")
