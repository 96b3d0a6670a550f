"""A websocket upstream's 1009 (a frame over its size limit) blames the frame it refused.

The upstream here answers a frame once it has stored its events, as a server that writes
them to a database before it acks does: a frame that comes meanwhile is read before that
ack goes. A frame over its limit (aiohttp's max_msg_size, as the `ws` library's
maxPayload) ends the connection with 1009 at once, the earlier frame's ack unsent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from tests.fakes.loopback_server import LoopbackServer
from tests.test_upstream_faults import event, marks, send
from tests.waiting import wait_for

PAD = "x" * 8000   # an event of about 8 KB
MAX_FRAME = 30_000   # three of these events, not four


class AcksWhenStored(LoopbackServer):
    """Acks each frame only once the next one has been read (its events stored by then),
    or after ``store_s``; closes with 1009 a frame over MAX_FRAME (aiohttp does)."""

    def __init__(self, store_s: float = 5.0) -> None:
        super().__init__()
        self.store_s = store_s
        self.frames: list[list[dict[str, Any]]] = []   # as read, heartbeats left out
        self.acked: list[Any] = []
        self.first = asyncio.Event()   # a frame was read

    async def start(self) -> AcksWhenStored:
        app = web.Application()
        app.router.add_get("/app/{key}/track", self._ws)
        await self._serve(app)
        return self

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME)
        await ws.prepare(request)
        self._sockets.add(ws)
        storing: asyncio.Task[None] | None = None
        while True:
            msg = await ws.receive()
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break   # 1009 (a frame too long: aiohttp closed it), or a close
            events = [ev for ev in orjson.loads(msg.data)["data"]
                      if ev.get("type") != "heartbeat"]
            if not events:
                continue
            self.frames.append(events)
            self.first.set()
            if storing is not None:   # the frame before is stored now: its ack goes
                storing.cancel()
                await self._ack(ws, self.frames[-2])
            storing = asyncio.create_task(self._stored(ws, events))
        if storing is not None:
            storing.cancel()
        return ws

    async def _stored(self, ws: web.WebSocketResponse, events: list[dict[str, Any]]) -> None:
        await asyncio.sleep(self.store_s)
        await self._ack(ws, events)

    async def _ack(self, ws: web.WebSocketResponse, events: list[dict[str, Any]]) -> None:
        ids = [ev["id"] for ev in events]
        if not ws.closed:
            await ws.send_str(orjson.dumps({"reportedIds": ids}).decode())
            self.acked += ids

    def delivered(self) -> Counter[int]:
        return Counter(marks([ev for frame in self.frames for ev in frame
                              if ev["id"] in self.acked]))


@pytest.fixture
async def storing() -> AsyncIterator[AcksWhenStored]:
    fake = await AcksWhenStored().start()
    yield fake
    await fake.stop()


async def test_a_1009_for_a_later_frame_dead_letters_no_event_of_an_earlier_one(
        make_agent: Any, storing: AcksWhenStored, fast_backoff: Any) -> None:
    """One event goes alone in a frame; while the upstream stores it, a burst fills the
    next frame past the upstream's limit, which closes the connection with 1009 before
    the first frame's ack. The 1009 refused the burst's frame, not the lone event: that
    event must be sent again and delivered, never dead-lettered as "a frame this long"
    (it is a few hundred bytes), and the burst halved until its frames fit."""
    agent = await make_agent(upstreams=[{
        "name": "up", "protocol": "nucleus-ws", "url": storing.ws_url,
        "flush_interval_s": 0.02, "timeout_s": 10, "batch_max_events": 100}])
    await send(agent, [event(0)])
    await asyncio.wait_for(storing.first.wait(), 5)
    await send(agent, [event(i, pad=PAD) for i in range(1, 11)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=20)
    assert await agent.spool.dead_letters() == []
    assert set(storing.delivered()) == set(range(11))
