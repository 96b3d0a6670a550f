"""Which events a nucleus-ws reply acknowledges: only those of frames sent on its connection,
whatever the reply's order, its unknown or repeated ids, or an id of an event prepared and
not yet sent (one id in flight for both, checked against the frames waiting for acks)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from agent.settings import UpstreamConfig
from agent.uplinks.base import Acked, Retry
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.fakes.loopback_server import LoopbackServer
from tests.test_uplink_nucleus import row

Answer = Callable[[list[Any]], list[list[Any]]]


class _WsUpstream(LoopbackServer):
    """A websocket upstream on the Nucleus path, its connections served by ``_ws``."""

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/app/{key}/track", self._ws)
        await self._serve(app)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    @abc.abstractmethod
    async def _ws(self, request: web.Request) -> web.WebSocketResponse: ...


class _Scripted(_WsUpstream):
    """A websocket upstream answering each frame with the replies ``answer`` makes of its
    ids (each list a reply's reportedIds); the ids of each frame received, in order."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer
        self.frames: list[list[Any]] = []

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                ids = [ev["id"] for ev in orjson.loads(msg.data)["data"]]
                self.frames.append(ids)
                for reply in self.answer(ids):
                    await ws.send_str(orjson.dumps({"reportedIds": reply}).decode())
        return ws


async def _uplink(fake: _Scripted, session: aiohttp.ClientSession,
                  timeout_s: float = 5) -> NucleusWsUplink:
    cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.ws_url, timeout_s=timeout_s,
                         batch_max_events=3)
    return NucleusWsUplink(cfg, "app", session, "m")


async def test_a_frame_acknowledged_in_another_order_is_acked_whole() -> None:
    async with asyncio.timeout(10), _Scripted(lambda ids: [ids[::-1]]) as fake, \
            aiohttp.ClientSession() as session:
        up = await _uplink(fake, session)
        prepared = up.prepare([row(1, {"id": 11}), row(2, {"id": 12}), row(3, {"id": 13})])
        assert await up.send(prepared) == Acked((1, 2, 3))
        assert up.in_flight == {}
        await up.close()


async def test_unknown_and_repeated_ids_in_a_reply_acknowledge_nothing_more() -> None:
    async with asyncio.timeout(10), _Scripted(lambda ids: [[99, *ids, ids[0], "x"]]) as fake, \
            aiohttp.ClientSession() as session:
        up = await _uplink(fake, session)
        first = up.prepare([row(1, {"id": 11}), row(2, {"id": 12})])
        assert await up.send(first) == Acked((1, 2))
        second = up.prepare([row(3, {"id": 11})])   # the id again, for another event
        assert await up.send(second) == Acked((3,))
        assert fake.frames == [[11, 12], [11]]
        await up.close()


async def test_a_reply_naming_an_event_prepared_and_not_sent_leaves_it_in_flight() -> None:
    """The reply to the first frame names, besides its own ids, the id of an event prepared
    for the next frame and not sent yet: that event is not acknowledged (it would be
    deleted unsent); its frame goes next and is acknowledged by its own reply."""
    script: list[Answer] = [lambda ids: [[*ids, 13]], lambda ids: [ids]]

    def answer(ids: list[Any]) -> list[list[Any]]:
        return script.pop(0)(ids)

    async with asyncio.timeout(10), _Scripted(answer) as fake, \
            aiohttp.ClientSession() as session:
        up = await _uplink(fake, session)
        first = up.prepare([row(1, {"id": 11}), row(2, {"id": 12})])
        later = up.prepare([row(3, {"id": 13})])
        assert await up.send(first) == Acked((1, 2))
        assert up.in_flight == {13: 3}
        assert up.prepare([row(4, {"id": 13})]).rows == ()   # its id is still in flight
        assert await up.send(later) == Acked((3,))
        assert fake.frames == [[11, 12], [13]]
        await up.close()


async def test_a_reply_as_long_as_its_frame_naming_an_unsent_event_acks_only_the_frame_s(
        ) -> None:
    """As above, the reply as many ids as its frame (one of them the unsent event's, one of
    the frame's left out): the frame's named event is acknowledged, the other left for the
    timeout, and the unsent event stays in flight."""
    async with asyncio.timeout(10), _Scripted(lambda ids: [[ids[0], 13]]) as fake, \
            aiohttp.ClientSession() as session:
        up = await _uplink(fake, session, timeout_s=0.3)
        first = up.prepare([row(1, {"id": 11}), row(2, {"id": 12})])
        up.prepare([row(3, {"id": 13})])
        result = await up.send(first)
        assert isinstance(result, Retry) and result.acked == (1,) and result.omitted == (2,)
        assert up.in_flight == {12: 2, 13: 3}
        await up.close()


class _HeartbeatError(_WsUpstream):
    """A websocket upstream that answers its first frame with its ids, the heartbeat after
    it with {"error": ...} (it answers no later one), holds the second frame's answer until
    the third frame is here, then answers it an id a message, the first frame's id again
    (a stale id) first, and closes without storing the third."""

    def __init__(self) -> None:
        super().__init__()
        self.heartbeat_answered = asyncio.Event()

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        frames: list[list[Any]] = []
        async for msg in ws:
            events = orjson.loads(msg.data)["data"]
            if events[0].get("type") == "heartbeat":
                if len(frames) == 1 and not self.heartbeat_answered.is_set():
                    await ws.send_str('{"error": "no events to track"}')
                    self.heartbeat_answered.set()
                continue
            frames.append([ev["id"] for ev in events])
            if len(frames) == 1:
                await ws.send_str(orjson.dumps({"reportedIds": frames[0]}).decode())
            elif len(frames) == 3:
                for ack_id in [*frames[0], *frames[1]]:
                    await ws.send_str(orjson.dumps({"reportedIds": [ack_id]}).decode())
                await ws.close()
        return ws


async def test_an_error_answering_a_heartbeat_lets_no_stale_id_acknowledge_a_later_frame(
        ) -> None:
    """A (id 5) is acknowledged; the heartbeat after it is answered with an error; then C
    (id 6) and B (id 5 again) go, and C's answer comes an id a message, A's stale id first.
    That message is no answer to B (frames are answered in order): B must not be
    acknowledged. The heartbeat's error was counted as a reply that may have answered a
    data frame, so the stale id was taken for B's answer and B deleted unstored."""
    async with asyncio.timeout(10), _HeartbeatError() as fake, \
            aiohttp.ClientSession() as session:
        cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake.ws_url, timeout_s=5,
                             batch_max_events=1)
        up = NucleusWsUplink(cfg, "app", session, "m", heartbeat_s=0.05)
        assert await up.send(up.prepare([row(1, {"id": 5})])) == Acked((1,))
        await fake.heartbeat_answered.wait()
        c = up.prepare([row(2, {"id": 6})])
        b = up.prepare([row(3, {"id": 5})])
        sent_c, sent_b = await asyncio.gather(up.send(c), up.send(b))
        assert sent_c == Acked((2,))
        assert isinstance(sent_b, Retry) and sent_b.acked == ()
        await up.close()
