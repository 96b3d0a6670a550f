"""A network that gets in the way: redirects and captive portals, then a working upstream.

``CaptiveUpstream`` answers on every path and method. While ``intercept`` is
set, every request (websocket handshakes included) gets that canned answer: a
redirect, or a hotel Wi-Fi login page with 200. Once ``intercept`` is None it
is a plain, correct upstream for all three protocols (Nucleus websocket and
HTTP, Segment `/v1/batch`) that acknowledges everything. Every request is
recorded, so a test can prove that a redirect target received nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from tests.fakes.loopback_server import LoopbackServer

LOGIN_PAGE = (b"<!doctype html><html><head><title>Guest Wi-Fi</title></head><body>"
              b"<form method=post action=/login>Accept the terms to continue"
              b"<button>Connect</button></form></body></html>")


@dataclass(frozen=True)
class Answer:
    """What the network answers to every request while it intercepts."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = LOGIN_PAGE
    content_type: str | None = "text/html"   # None: an empty Content-Type header
    over: int = -1   # only requests with a longer body (a proxy's body size limit)


PORTAL = Answer()


def redirect(status: int, location: str) -> Answer:
    return Answer(status, {"Location": location}, b"", "text/html")


@dataclass
class Hit:
    method: str
    path: str
    body: bytes
    intercepted: bool


class CaptiveUpstream(LoopbackServer):
    """aiohttp server on 127.0.0.1, port 0; ``await CaptiveUpstream(PORTAL).start()``."""

    def __init__(self, intercept: Answer | None = None) -> None:
        super().__init__()
        self.intercept = intercept
        self.hits: list[Hit] = []
        self.delivered: list[dict[str, Any]] = []   # events acknowledged, in order
        # The Content-Type of an ack (Express's `res.send(string)`: text/html).
        self.ack_type = "application/json"
        self.segment_ack = b'{"success":true}'   # the body of a Segment ack

    def url(self, protocol: str) -> str:
        return self.ws_url if protocol == "nucleus-ws" else self.http_url

    async def _any(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        body = b"" if upgrade else await request.read()
        answer = self.intercept
        if answer is not None and len(body) <= answer.over:
            answer = None
        self.hits.append(Hit(request.method, request.path, body, answer is not None))
        if answer is not None:
            if answer.content_type is None:
                return web.Response(status=answer.status, body=answer.body,
                                    headers={**answer.headers, "Content-Type": ""})
            return web.Response(status=answer.status, headers=answer.headers, body=answer.body,
                                content_type=answer.content_type)
        nucleus = request.path.startswith("/app/") and request.path.endswith("/track")
        if upgrade and nucleus:
            return await self._websocket(request)
        if request.method == "POST" and nucleus:
            return web.Response(body=orjson.dumps({"reportedIds": self._take(
                orjson.loads(body)["data"])}), content_type=self.ack_type)
        if request.method == "POST" and request.path == "/v1/batch":
            self.delivered += orjson.loads(body)["batch"]
            return web.Response(body=self.segment_ack, content_type=self.ack_type)
        return web.Response(status=404)

    def _take(self, events: list[dict[str, Any]]) -> list[Any]:
        events = [ev for ev in events if ev.get("type") != "heartbeat"]
        self.delivered += events
        return [ev["id"] for ev in events if "id" in ev]

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        async for frame in ws:
            if frame.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                ids = self._take(orjson.loads(frame.data).get("data", []))
                if ids:
                    await ws.send_str(orjson.dumps({"reportedIds": ids}).decode())
        return ws

    async def start(self) -> CaptiveUpstream:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._any)
        await self._serve(app)
        return self

