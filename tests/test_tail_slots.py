"""The live view's places (at most MAX_VIEWERS at once), against a running agent with
real clients on 127.0.0.1: views that connect and then read nothing cannot lock the
operator out. A new view takes the place of the oldest; a view whose stream has waited
for its reader for STALL_S is closed. Either is told why, and counted."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.clock import Clock
from agent.logs import fingerprint
from agent.ops import tail_routes
from agent.ops.shared_terms import STALL_S
from agent.ops.tail import MAX_VIEWERS, QUEUE
from tests.conftest import free_port
from tests.interop.browser.cdp import Chromium
from tests.segment_helpers import basic, call
from tests.test_tail import Tail
from tests.waiting import wait_for

KEY_A, KEY_B = "writekey-aaaa-1234", "writekey-bbbb-5678"
REPLACED = f"a newer view took its place: at most {MAX_VIEWERS} are open at once"


class Stuck:
    """A viewer that reads up to its stream's first message and then nothing: a real
    socket whose reader stays paused until the test reads the rest."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self.sock = sock
        self.head = head

    @classmethod
    async def open(cls, port: int, path: str = "/tail", rcvbuf: int = 0) -> Stuck:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        if rcvbuf:   # a small window: the agent's writes to it back up soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = b""
        while b'"watching"' not in head:   # a byte at a time: nothing past it is read
            got = await asyncio.wait_for(loop.sock_recv(sock, 1), 20)
            head += got
            assert got and not head.startswith(b"HTTP/1.1 5"), f"not admitted: {head!r}"
        return cls(sock, head)

    async def rest(self) -> bytes:
        """Read again, up to the end of the stream."""
        loop = asyncio.get_running_loop()
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 20):
            data += chunk
        self.sock.close()
        return data


def closed_messages(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in data.split(b"\n")
            if line.startswith(b"data: ") and b'"kind":"closed"' in line]


async def status(port: int) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        return await r.json()


async def metrics(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


async def test_views_that_read_nothing_cannot_lock_the_operator_out(make_agent: Any) -> None:
    agent = await make_agent(port=free_port())
    port, cfg = agent.port, agent.config_path
    first = await Tail.start("--config", cfg)
    stuck = []
    for n in range(2, MAX_VIEWERS + 1):
        stuck.append(await Stuck.open(port))
        await wait_for(lambda: agent.metrics.tail_viewers == n)   # noqa: B023
    # Every place is taken: a new view takes the place of the oldest, the first tail,
    # which says why and ends.
    stuck.append(await Stuck.open(port))
    rest, _ = await asyncio.wait_for(first.proc.communicate(), 20)
    assert first.proc.returncode == 1
    assert rest.decode().splitlines() == [
        f"outpost: the agent ended the live view ({REPLACED})"], rest
    # Four views that never read hold every place, and the operator's next tail still
    # gets one: the oldest of the four is closed, and told why.
    second = await Tail.start("--json", "--config", cfg)
    assert closed_messages(await stuck[0].rest()) == [
        {"kind": "closed", "reason": "replaced", "detail": REPLACED}]
    r = await call(port, "/v1/track", {"event": "e", "userId": "u", "messageId": "m-1"},
                   headers={"Authorization": basic(KEY_A)})
    assert r.status == 200, r.body
    await second.until(lambda line: '"ingested"' in line)
    got = (await status(port))["ingest"]
    assert (got["tail_viewers"], got["tail_closed"]) == (
        MAX_VIEWERS, {"replaced": 2, "stalled": 0}), got
    text = await metrics(port)
    assert 'outpost_tail_closed_total{reason="replaced"} 2' in text, text
    assert 'outpost_tail_closed_total{reason="stalled"} 0' in text, text
    assert await second.stop() == 0
    for view in stuck[1:]:
        view.sock.close()


async def test_a_head_request_takes_no_place(make_agent: Any) -> None:
    """`HEAD /tail` (a link checker's, `curl -I`) opened a live view that took one of the
    MAX_VIEWERS places for as long as its connection stayed open, and pushed out the
    operator's oldest view once they were full. It gets the stream's headers, and no place:
    a view is counted before those headers are sent, so with them read, none was."""
    agent = await make_agent(port=free_port())
    loop = asyncio.get_running_loop()
    heads = []
    for _ in range(MAX_VIEWERS + 1):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", agent.port))
        await loop.sock_sendall(sock, b"HEAD /tail HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            got = await asyncio.wait_for(loop.sock_recv(sock, 4096), 20)
            assert got, head
            head += got
        heads.append((sock, head))
    try:
        for _, head in heads:
            assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, head
        got = (await status(agent.port))["ingest"]
        assert (got["tail_viewers"], got["tail_closed"]) == (
            0, {"replaced": 0, "stalled": 0}), got
    finally:
        for sock, _ in heads:
            sock.close()


async def test_a_view_that_stops_reading_is_closed_and_an_idle_one_is_not(
        make_agent: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail_routes, "CHECK_S", 0.05)   # how often a stall is looked for
    monkeypatch.setattr(tail_routes, "RATE", 1e6)   # unpaced: its stream backs up sooner
    agent = await make_agent(port=free_port())
    port = agent.port
    # A view of key B, reading, to which nothing is sent for (the clock's) ages.
    session = aiohttp.ClientSession()
    idle = await session.get(f"http://127.0.0.1:{port}/tail?key={fingerprint(KEY_B)}")
    assert b'"watching"' in await idle.content.readline()
    # A view of every key that stops reading after its first message.
    stuck = await Stuck.open(port, rcvbuf=4096)
    await wait_for(lambda: agent.metrics.tail_viewers == 2)
    [view] = [v for v in agent.tail.viewers if v.want is None]
    await back_up(port, view)
    assert agent.metrics.tail_closed == {"replaced": 0, "stalled": 0}
    clock.passed_ms += int(STALL_S * 1000)
    await wait_for(lambda: agent.metrics.tail_closed["stalled"] == 1)
    assert agent.metrics.tail_viewers == 1
    # The idle view is still open (idle is not stalled): the next event of key B reaches it.
    r = await call(port, "/v1/track", {"event": "b", "userId": "u", "messageId": "b-1"},
                   headers={"Authorization": basic(KEY_B)})
    assert r.status == 200, r.body
    while b'"ingested"' not in (line := await asyncio.wait_for(idle.content.readline(), 20)):
        assert line, "the idle view ended"
    assert b'"id":"b-1"' in line
    # The stuck view, read at last: what was sent, then why it was closed, then the end.
    data = await stuck.rest()
    assert closed_messages(data) == [{"kind": "closed", "reason": "stalled",
                                      "detail": f"it read nothing for "
                                                f"{STALL_S:g} s"}], data[-300:]
    assert (await status(port))["ingest"]["tail_closed"] == {"replaced": 0, "stalled": 1}
    idle.close()
    await session.close()


async def test_a_viewer_gone_while_its_stream_waits_is_no_error_in_the_log(
        make_agent: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`outpost tail | less`, scrolled back while events come, then quit: the agent's write
    to the view waits for a reader, and the view's socket is then closed with data unread
    (a reset). aiohttp fails that waiting write with a plain ConnectionError, which the
    route did not take for a viewer gone: "Error handling request" at ERROR, with a
    traceback, in the agent's log."""
    monkeypatch.setattr(tail_routes, "RATE", 1e6)   # unpaced: its stream backs up sooner
    agent = await make_agent(port=free_port())
    stuck = await Stuck.open(agent.port, rcvbuf=4096)
    await wait_for(lambda: agent.metrics.tail_viewers == 1)
    [view] = agent.tail.viewers
    await back_up(agent.port, view)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stuck.sock.close()   # a reset, as a reader that exits with data unread sends
    await wait_for(lambda: agent.metrics.tail_viewers == 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# Every EventSource the page makes, kept where the test can read its readyState.
KEEP_SOURCES = """
window.sources = [];
window.EventSource = class extends window.EventSource {
  constructor(...args) { super(...args); window.sources.push(this); }
};
"""


async def test_the_page_s_panel_whose_place_is_taken_says_so_and_stays_closed(
        make_agent: Any, chromium: str, tmp_path: Path) -> None:
    agent = await make_agent(port=free_port())
    async with Chromium(chromium, tmp_path / "profile") as browser:
        page = await browser.open(f"http://127.0.0.1:{agent.port}/", init_script=KEEP_SOURCES)
        for _ in range(200):   # bounded: until the page has loaded
            if await page.evaluate("document.readyState === 'complete'"):
                break
            await asyncio.sleep(0.05)
        await page.evaluate("document.getElementById('live-toggle').click()")
        await wait_for(lambda: agent.metrics.tail_viewers == 1)
        stuck = [await Stuck.open(agent.port) for _ in range(MAX_VIEWERS)]
        state = ""
        for _ in range(200):   # bounded: the panel is told at once
            state = await page.evaluate("document.getElementById('live-state').textContent")
            if REPLACED in state:
                break
            await asyncio.sleep(0.05)
        toggle = await page.evaluate("document.getElementById('live-toggle').textContent")
        # Read at once, so an EventSource left open is seen before its reconnect (~3 s):
        # it is still OPEN, or CONNECTING again, never CLOSED (2).
        sources = await page.evaluate("window.sources.map(s => s.readyState)")
        report = page.report()
    # Closed for good (an EventSource left open would reconnect and take another's place).
    assert state == f"closed: {REPLACED}", report
    assert sources == [2], report
    assert toggle == "Watch live"
    assert agent.metrics.tail_closed == {"replaced": 1, "stalled": 0}
    for view in stuck:
        view.sock.close()


async def back_up(port: int, view: Any) -> None:
    """Post key A's events until ``view``'s stream waits for a reader that never comes."""
    auth = {"Authorization": basic(KEY_A)}
    for i in range(200):   # bounded
        r = await call(port, "/v1/batch", {"batch": [
            {"type": "track", "event": "n" * 120, "userId": "u",
             "messageId": f"{i}-{j}-" + "m" * 80} for j in range(200)]}, headers=auth)
        assert r.status == 200, r.body
        if view.writing_since is not None:
            return
    raise AssertionError("the view's stream never backed up")


async def test_a_view_whose_client_ends_before_its_stream_begins_gives_its_place_back(
        make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends `GET /tail` and at once shuts its sending side down was kept as
    a view for as long as it read (a write to it never failed): such views held places, so
    the operator's reading view was the one pushed out. A view whose client's side ends
    once its stream has begun was already closed."""
    monkeypatch.setattr(tail_routes, "CHECK_S", 0.05)   # how often a view that left is noticed
    agent = await make_agent(port=free_port())
    session = aiohttp.ClientSession()
    reading = await session.get(f"http://127.0.0.1:{agent.port}/tail")
    assert b'"watching"' in await reading.content.readline()
    loop = asyncio.get_running_loop()
    gone = []
    for _ in range(MAX_VIEWERS):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", agent.port))
        await loop.sock_sendall(sock, b"GET /tail HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        gone.append(sock)
        # Its place is given back: the reading view is never the one replaced.
        await wait_for(lambda: agent.metrics.tail_viewers == 1, timeout=5)
    assert agent.metrics.tail_closed == {"replaced": 0, "stalled": 0}
    for sock in gone:   # each is sent the stream's end
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"0\r\n\r\n"), data
        sock.close()
    reading.close()
    await session.close()


async def test_views_the_agent_closed_let_go_of_the_events_they_held(make_agent: Any) -> None:
    """A view the agent closes (a newer view took its place, or it stalled) stays open up
    to GRACE_S more, for its last message to reach a reader that is behind. Its queue (up
    to QUEUE messages, QUEUE_BYTES of event bodies), which it is never shown, was held all
    that time: a program opening views that never read, each taking the oldest's place,
    made the agent hold that much for every view opened in the last 30 s, not for each
    of the MAX_VIEWERS places."""
    agent = await make_agent(port=free_port())
    first = [await Stuck.open(agent.port, rcvbuf=4096) for _ in range(MAX_VIEWERS)]
    await wait_for(lambda: agent.metrics.tail_viewers == MAX_VIEWERS)
    views = list(agent.tail.viewers)
    auth = {"Authorization": basic(KEY_A)}
    for i in range(100):   # bounded: until every view that reads nothing is QUEUE behind
        r = await call(agent.port, "/v1/batch", {"batch": [
            {"type": "track", "event": "e", "userId": "u", "messageId": f"{i}-{j}",
             "properties": {"blob": "x" * 2000}} for j in range(200)]}, headers=auth)
        assert r.status == 200, r.body
        if all(len(view.queue) >= QUEUE for view in views):
            break
    assert all(view.held > 0 for view in views)
    # As many new views: each takes the place of one of the first, which is closed.
    second = [await Stuck.open(agent.port, rcvbuf=4096) for _ in range(MAX_VIEWERS)]
    await wait_for(lambda: agent.metrics.tail_closed["replaced"] == MAX_VIEWERS)
    assert all(view.ended == "replaced" for view in views)
    assert [(len(view.queue), view.held) for view in views] == [(0, 0)] * MAX_VIEWERS
    for view in first + second:
        view.sock.close()
