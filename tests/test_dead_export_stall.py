"""GET /dead/export to a reader that stops reading, against a running agent with a real
socket on 127.0.0.1: the export is cut once its reader has read nothing for STALL_S (by
the agent's clock), as the live view is, rather than hold its connection and a page of
letters for good."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from agent.clock import Clock
from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.ops.shared_terms import EXPORT_PAGE, STALL_S
from agent.service import Agent
from tests.conftest import free_port
from tests.waiting import wait_for

LETTERS = 3 * EXPORT_PAGE   # 12 MB: far more than the socket buffers take


async def dead_letters(agent: Agent) -> None:
    spool = agent.spool
    assert spool is not None
    await spool.append([Event("app", NUCLEUS, dedupe_key("app", n),
                              b'{"n":%d,"pad":"%s"}' % (n, b"x" * 4000))
                        for n in range(LETTERS)])
    rows = await spool.fetch(spool.streams["app"].id, 0, LETTERS)
    await spool.dead_letter([(r.seq, "up", "refused") for r in rows])


async def test_an_export_whose_reader_reads_nothing_is_cut(
        make_agent: Any, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A client that asked for the export and then read nothing (`outpost dead export - |`
    a program that never reads, a process suspended) held its connection for good, and
    with it the page of letters waiting for it, about 5 MB: its route never ended, so
    the connection was never idle and never closed (20 such held 111 MB), and no limit
    applied."""
    agent = await make_agent(port=free_port())
    await dead_letters(agent)
    caplog.set_level(logging.INFO, logger="outpost.dead")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # its writes back up soon
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", agent.port))
    await loop.sock_sendall(sock, b"GET /dead/export HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(loop.sock_recv(sock, 1), 20)
    assert head == b"H"   # the answer began; nothing more of it is read

    def cut() -> bool:   # the agent's clock passes STALL_S at each look
        clock.passed_ms += int(STALL_S * 1000)
        return agent.metrics.connections_open == 0
    await wait_for(cut)
    # What had been sent, then the end of the connection: no last chunk, so the export
    # reads as cut short, never as all of the letters.
    data = b""
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 20):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    assert data.count(b'"reason":"refused"') < LETTERS
    assert not data.endswith(b"0\r\n\r\n")
    said = [r for r in caplog.records if r.name == "outpost.dead"]
    assert any(f"read nothing for {STALL_S:g} s" in r.getMessage()
               and r.levelno == logging.WARNING for r in said), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
