"""A Nucleus websocket client that sends but never reads what the agent answers.

Its replies (or pongs) fill the socket's buffers, and the agent's handler then waits to
write the next one, with no deadline: the connection stayed open for good, holding its
last message (up to 4 MiB) and its reply in the agent's memory, uncharged: about 4 MB a
connection, 4 GB at listen.max_connections.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
from typing import Any

import aiohttp
import orjson
import pytest

from tests.test_nucleus_backlog import KEY
from tests.test_nucleus_frames import frame
from tests.waiting import wait_for

# One message answered with about 4 MB: heartbeats (never stored) of 1,000-character ids.
HEAVY = frame(orjson.dumps({"data": [{"type": "heartbeat", "id": f"{i:0999d}"}
                                     for i in range(4000)]}))
PINGS = frame(b"p" * 125, opcode=0x9) * 40_000   # answered with 5 MB of pongs


async def deaf_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand that reads nothing after its upgrade."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /app/{KEY}/track HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    transport = writer.transport
    assert isinstance(transport, asyncio.ReadTransport)
    transport.pause_reading()
    return reader, writer


async def connections_open(port: int) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    found = re.search(r"^outpost_connections_open (\d+)$", text, re.MULTILINE)
    assert found, text
    return int(found[1]) - 1   # this request's own


@pytest.mark.parametrize("sent", [HEAVY * 2, PINGS], ids=["replies", "pongs"])
async def test_a_client_that_never_reads_is_cut_at_the_body_timeout(
        make_agent: Any, caplog: Any, sent: bytes) -> None:
    agent = await make_agent(listen={"body_timeout_s": 0.5})
    caplog.set_level(logging.INFO)
    _reader, writer = await deaf_websocket(agent.port)
    writer.write(sent)   # not drained: the agent stops reading once its answers back up

    async def cut() -> bool:
        return await connections_open(agent.port) == 0
    await wait_for(cut, timeout=5)
    writer.close()
    assert agent.metrics.inflight_bytes == 0
    assert any("body_timeout_s" in r.getMessage() for r in caplog.records), caplog.text
    # The agent serves on.
    async with aiohttp.ClientSession() as s, s.ws_connect(
            f"http://127.0.0.1:{agent.port}/app/{KEY}/track") as ws:
        await ws.send_str('{"data": [{"type": "event", "name": "x", "id": 1}]}')
        assert await ws.receive_json(timeout=5) == {"reportedIds": [1]}
