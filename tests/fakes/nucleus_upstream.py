"""A scriptable fake Nucleus server: websocket and HTTP, on 127.0.0.1 port 0.

Scripts: ack everything (default), ack only ids a predicate allows (over a websocket, in
one reply a frame or one an id), drop the
connection after N frames, stay down (refuse connections), ack nothing, or answer a
websocket's frames only once the test lets it (``answering``).
Every received event is recorded in order.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web


class FakeNucleus:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []     # data events, in arrival order
        self.heartbeats: list[dict[str, Any]] = []
        self.batches: list[list[Any]] = []         # the ids of each frame or request with events
        self.frames = 0
        self.raw: list[bytes] = []   # each frame or request body, as it came
        self.paths: list[str] = []
        self.raw_paths: list[str] = []   # as the request line had them, escapes and all
        self.ack: Callable[[Any], bool] = lambda ev_id: True
        self.drop_after_frames: int | None = None
        self.reply_raw: bytes | None = None        # send this instead of a real ack
        self.split_replies = False   # a websocket frame's ids acknowledged one reply each
        self.delay_s = 0.0
        self.answering = asyncio.Event()   # cleared: replies wait until it is set again
        self.answering.set()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.connections = 0
        self.most_open = 0   # websockets open at once, at most
        self.outage: tuple[int, str] | None = None   # (status, Retry-After) for handshakes
        self.refused = 0   # handshakes refused so far
        self._sockets: set[web.WebSocketResponse] = set()
        self._held: socket.socket | None = None   # the port, while down

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _record(self, request: web.Request, raw: str | bytes) -> list[Any]:
        msg = orjson.loads(raw)
        self.raw.append(raw.encode() if isinstance(raw, str) else raw)
        self.frames += 1
        self.paths.append(request.path)
        self.raw_paths.append(request.raw_path)
        ids = []
        batch = []
        for ev in msg.get("data", []):
            if ev.get("type") == "heartbeat":
                self.heartbeats.append(ev)
                continue
            self.events.append(ev)
            batch.append(ev.get("id"))
            if "id" in ev and self.ack(ev["id"]):
                ids.append(ev["id"])
        if batch:
            self.batches.append(batch)
        return ids

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.outage is not None:
            status, wait = self.outage
            self.refused += 1
            return web.Response(status=status, headers={"Retry-After": wait})
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.connections += 1
        self._sockets.add(ws)
        self.most_open = max(self.most_open, len(self._sockets))
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                ids = self._record(request, msg.data)
                if self.drop_after_frames is not None and self.frames >= self.drop_after_frames:
                    await ws.close()
                    break
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                await self.answering.wait()
                if self.reply_raw is not None:
                    await ws.send_str(self.reply_raw.decode())
                elif ids:
                    for part in ([i] for i in ids) if self.split_replies else (ids,):
                        await ws.send_str(orjson.dumps({"reportedIds": part}).decode())
        finally:
            self._sockets.discard(ws)
        return ws

    async def _http(self, request: web.Request) -> web.Response:
        ids = self._record(request, await request.read())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.reply_raw is not None:
            return web.Response(body=self.reply_raw, content_type="application/json")
        return web.Response(body=orjson.dumps({"reportedIds": ids}), content_type="application/json")

    async def start(self, port: int = 0) -> FakeNucleus:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        # Any one segment (aiohttp's default leaves out `{` and `}`): the app id as sent.
        app.add_routes([web.get("/app/{appId:[^/]+}/track", self._ws),
                        web.post("/app/{appId:[^/]+}/track", self._http)])
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def go_down(self) -> None:
        """Stop listening and cut every open websocket. The port stays ours, bound and not
        listening (connects are refused, as when nothing listens): free, another process's
        ``free_port`` could hand it to a server of its own, which an agent's probe would
        take for the upstream back, and which might take the agent's events."""
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._held = socket.socket()
            # Its closed connections may linger in TIME_WAIT on the port; a plain bind,
            # as free_port's, still fails while this one holds it.
            self._held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._held.bind(("127.0.0.1", self.port))

    async def come_back(self) -> None:
        self._release()
        await self.start(self.port)

    async def stop(self) -> None:
        await self.go_down()
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    @property
    def open_connections(self) -> int:
        return len(self._sockets)

    def ids(self) -> list[Any]:
        return [ev.get("id") for ev in self.events]
