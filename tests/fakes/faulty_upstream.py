"""A scripted, misbehaving upstream: Nucleus (websocket and HTTP) and Segment `/v1/batch`.

Each request (HTTP) or frame (websocket) takes the next Fault from ``script``;
once the script is used up every request is answered properly. A ``poison``
predicate makes any batch holding a matching event fail with 400, as an
upstream that validates events would. ``flap_every = N`` makes every Nth
websocket frame a ``close``, ``flap_delay`` seconds after the frame arrived
(a connection that keeps dropping, at a moment the agent does not choose).
Each websocket handshake takes the next Fault from ``connect_script``: a
``status`` fault answers the upgrade request with that status (5xx, 429 +
Retry-After, a 3xx redirect), a ``timeout`` holds it for ``delay`` seconds, a
``close`` accepts the handshake and closes the websocket at once.
Every request is logged with its arrival and reply times, so tests measure
the agent's waits from the upstream's side instead of sleeping, and with its
connection's number (``conn``: 1, 2, ... in the order the upstream first saw
each), so tests tell what the agent sent on a connection opened after a moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from tests.fakes.loopback_server import LoopbackServer

# Fault kinds:
#   status     answer `status` with `headers` (500, 429 + Retry-After, 400...)
#   timeout    hold the reply for `delay` seconds (longer than the agent waits)
#   slow       hold the reply for `delay` seconds (or until `until` is set), then answer
#              properly
#   stall      acknowledge every id, but write only the first half of the reply before
#              holding the rest for `delay` seconds (HTTP, Segment's 200 too; a websocket
#              holds the whole reply): an ack the agent, waiting less, never reads whole
#   reset      cut the connection before answering (HTTP: mid-request, body half read)
#   close      websocket: acknowledge the first half of the frame (after `delay`), then close
#              (with `close_code` and `reason`)
#   partial    acknowledge only the first half of the ids
#   unknown    acknowledge every id plus ids that were never sent (and a `true`)
#   bogus      acknowledge only ids that were never sent
#   malformed  answer 200 with `body` (default: truncated JSON)
#   noise      websocket: `times` messages that are not JSON (a proxy's error page), then
#              the proper ack
#   backlog    the request (HTTP: received whole) or frame waits `delay` seconds before the
#              upstream starts on it, as in a busy server's queue: it is acknowledged after
#              the agent stopped waiting (its Request's `arrived` is when it was started on)
#   huge       acknowledge every id in a reply padded with spaces to `size` bytes (valid
#              JSON, absurdly long); HTTP: streamed, and the bytes written before the
#              agent stopped reading are kept in the Request's `written`
KINDS = frozenset({"status", "timeout", "slow", "stall", "reset", "close", "partial", "unknown",
                   "bogus", "malformed", "huge", "noise", "backlog"})
NEVER_SENT: list[Any] = [987654321, "never-sent", True, None, {"id": 1}, [1]]


@dataclass
class Fault:
    kind: str
    status: int = 500
    # A value may be a callable: evaluated when the reply is sent (e.g. an HTTP-date).
    headers: dict[str, Any] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b'{"reportedIds": [1, 2'
    echo: bool = False   # status: answer with the request line and headers (as some do)
    size: int = 64 * 1024 * 1024   # huge: the reply's length
    times: int = 1   # noise: how many messages
    close_code: int = 1000   # close: the websocket close code, and its reason
    reason: bytes = b""
    until: asyncio.Event | None = None   # holds end when it is set, not after `delay`

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    async def hold(self) -> None:
        if self.until is not None:
            await self.until.wait()
        else:
            await asyncio.sleep(self.delay)


@dataclass
class Request:
    """One request or frame as the upstream saw it."""

    arrived: float
    path: str
    events: list[dict[str, Any]]
    fault: str = "ok"
    status: int = 200
    acked: list[Any] = field(default_factory=list)
    answered: float | None = None
    written: int = 0   # huge: reply bytes written before the agent stopped reading
    query: str = ""    # HTTP: the URL's query string
    conn: int = 0      # its connection's number (FaultyUpstream.connections)


class FaultyUpstream(LoopbackServer):
    """aiohttp server on 127.0.0.1; ``await FaultyUpstream().start()``."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[Fault] = []
        self.poison: Callable[[dict[str, Any]], bool] = lambda ev: False
        self.connect_script: list[Fault] = []
        self.flap_every = 0
        # Websocket: the longest frame it takes (aiohttp's max_msg_size: it closes the
        # connection with 1009 for a longer one); 0: any.
        self.max_frame = 0
        self.flap_delay = 0.0
        # A link this many bytes a second, upstream: each request (or websocket frame, in
        # turn) is answered only once a link that slow would have carried it (0: at once).
        self.link_bytes_per_s = 0.0
        self._frames = 0
        self.requests: list[Request] = []
        self._conns: dict[object, int] = {}   # each connection (its protocol): its number

    @property
    def connections(self) -> int:
        """The connections seen so far (a websocket's: from its handshake)."""
        return len(self._conns)

    def _conn(self, request: web.Request) -> int:
        return self._conns.setdefault(request.protocol, len(self._conns) + 1)

    # -- what the tests read ------------------------------------------------------

    def acked_ids(self) -> list[Any]:
        """Every id acknowledged upstream, once per acknowledgement."""
        return [i for r in self.requests for i in r.acked]

    def received_ids(self) -> list[Any]:
        return [ev.get("id", ev.get("messageId")) for r in self.requests for ev in r.events]

    def faulted(self) -> list[Request]:
        return [r for r in self.requests if r.fault != "ok"]

    # -- serving --------------------------------------------------------------------

    def _next(self, events: list[dict[str, Any]]) -> Fault | None:
        if any(self.poison(ev) for ev in events):
            return Fault("status", 400, body=b'{"error": "invalid event"}')
        return self.script.pop(0) if self.script else None

    @staticmethod
    def _ids(events: list[dict[str, Any]]) -> list[Any]:
        return [ev["id"] for ev in events if "id" in ev and ev.get("type") != "heartbeat"]

    async def _backlog(self, request: web.Request | None = None) -> Fault | None:
        """A scripted backlog: the request's body is received (aiohttp keeps it for the
        handler's read), then it waits out the delay; the request's fault."""
        if not self.script or self.script[0].kind != "backlog":
            return None
        fault = self.script.pop(0)
        if request is not None:
            await request.read()
        await asyncio.sleep(fault.delay)
        return fault

    async def _carried(self, request: web.Request) -> bytes:
        """The request's body, once a link of ``link_bytes_per_s`` would have carried it."""
        body = await request.read()
        if self.link_bytes_per_s:
            await asyncio.sleep(len(body) / self.link_bytes_per_s)
        return body

    def _ack(self, fault: Fault | None, ids: list[Any]) -> list[Any]:
        if fault is None or fault.kind in ("slow", "stall", "huge", "backlog"):
            return ids
        if fault.kind in ("partial", "close"):
            return ids[: len(ids) // 2]
        if fault.kind == "unknown":
            return ids + NEVER_SENT
        if fault.kind == "bogus":
            return list(NEVER_SENT)
        return []

    async def _reset(self, request: web.Request) -> bool:
        """A scripted reset: read part of the body, then cut the connection."""
        if not self.script or self.script[0].kind != "reset":
            return False
        self.script.pop(0)
        await request.content.read(16)
        self.requests.append(Request(time.monotonic(), request.path, [], "reset", 0))
        assert request.transport is not None
        request.transport.abort()
        return True

    async def _nucleus_http(self, request: web.Request) -> web.StreamResponse:
        if await self._reset(request):
            return web.Response(status=500)
        queued = await self._backlog(request)
        rec = Request(time.monotonic(), request.path, [], query=request.query_string,
                      conn=self._conn(request))
        self.requests.append(rec)
        msg = orjson.loads(await self._carried(request))
        rec.events = [ev for ev in msg.get("data", []) if ev.get("type") != "heartbeat"]
        fault = queued or self._next(rec.events)
        rec.fault = fault.kind if fault else "ok"
        if fault is not None and fault.kind in ("timeout", "slow"):
            await fault.hold()
        try:
            if fault is not None and fault.kind == "status":
                rec.status = fault.status
                return web.Response(status=fault.status, headers=_headers(fault),
                                    body=_echo(request) if fault.echo else
                                    fault.body if fault.status in (200, 400) else b"")
            if fault is not None and fault.kind == "malformed":
                return web.Response(body=fault.body, content_type="application/json")
            rec.acked = self._ack(fault, self._ids(rec.events))
            reply = orjson.dumps({"reportedIds": rec.acked})
            if fault is not None and fault.kind == "huge":
                return await _huge(request, rec, reply, fault.size)
            if fault is not None and fault.kind == "stall":
                return await _stalled(request, reply, fault.delay)
            return web.Response(body=reply, content_type="application/json")
        finally:
            rec.answered = time.monotonic()

    async def _nucleus_ws(self, request: web.Request) -> web.StreamResponse:
        conn = self._conn(request)   # before the handshake's answer: before any frame on it
        fault = self.connect_script.pop(0) if self.connect_script else None
        if fault is not None:
            self.requests.append(Request(time.monotonic(), request.path, [],
                                         f"connect-{fault.kind}", fault.status))
            if fault.kind == "status":
                return web.Response(status=fault.status, headers=_headers(fault))
            await asyncio.sleep(fault.delay)
        ws = web.WebSocketResponse(max_msg_size=self.max_frame)
        await ws.prepare(request)
        if fault is not None and fault.kind == "close":
            await ws.close()
            return ws
        self._sockets.add(ws)
        async for frame in ws:
            if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            events = [ev for ev in orjson.loads(frame.data).get("data", [])
                      if ev.get("type") != "heartbeat"]
            if not events:
                continue
            queued = await self._backlog()
            rec = Request(time.monotonic(), request.path, events, conn=conn)
            self.requests.append(rec)
            if self.link_bytes_per_s:   # carried by the link: the frames behind it wait
                await asyncio.sleep(len(frame.data) / self.link_bytes_per_s)
            fault = queued or self._next(events)
            self._frames += 1
            if fault is None and self.flap_every and self._frames % self.flap_every == 0:
                fault = Fault("close", delay=self.flap_delay)
            rec.fault = fault.kind if fault else "ok"
            if fault is not None and fault.kind in ("timeout", "slow", "stall", "close"):
                await fault.hold()
            if fault is not None and fault.kind == "noise":
                for _ in range(fault.times):
                    await ws.send_str("<html>502 Bad Gateway</html>")
            if fault is not None and fault.kind == "malformed":
                await ws.send_str(fault.body.decode())
            elif fault is not None and fault.kind == "huge":
                reply = orjson.dumps({"reportedIds": self._ids(events)})
                try:
                    await ws.send_str(reply.ljust(fault.size).decode())
                except ConnectionResetError:  # the agent gave up on this connection
                    break
            elif fault is None or fault.kind not in ("status", "reset"):
                acked = self._ack(fault, self._ids(events))
                # A reply to every frame it answers, even one that acks nothing (a partial
                # ack of one event), as Outpost does: the sender counts replies.
                if acked or (fault is not None and fault.kind == "partial"):
                    try:
                        await ws.send_str(orjson.dumps({"reportedIds": acked}).decode())
                    except ConnectionResetError:  # the agent gave up on this connection
                        break
                rec.acked = acked
            rec.answered = time.monotonic()
            if fault is not None and fault.kind in ("close", "reset"):
                await ws.close(code=fault.close_code, message=fault.reason)
                break
        return ws

    async def _segment_batch(self, request: web.Request) -> web.StreamResponse:
        if await self._reset(request):
            return web.Response(status=500)
        rec = Request(time.monotonic(), request.path, [], conn=self._conn(request))
        self.requests.append(rec)
        msg = orjson.loads(await self._carried(request))
        rec.events = list(msg.get("batch", []))
        fault = self._next(rec.events)
        rec.fault = fault.kind if fault else "ok"
        if fault is not None and fault.kind in ("timeout", "slow"):
            await fault.hold()
        rec.answered = time.monotonic()
        if fault is not None and fault.kind == "status":
            rec.status = fault.status
            return web.Response(status=fault.status, headers=_headers(fault),
                                body=_echo(request) if fault.echo else fault.body)
        rec.acked = [ev.get("messageId") for ev in rec.events]
        if fault is not None and fault.kind == "huge":
            return await _huge(request, rec, b'{"success": true}', fault.size)
        if fault is not None and fault.kind == "stall":
            return await _stalled(request, b'{"success": true}', fault.delay)
        return web.json_response({"success": True})

    async def start(self) -> FaultyUpstream:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.add_routes([web.get("/app/{appId}/track", self._nucleus_ws),
                        web.post("/app/{appId}/track", self._nucleus_http),
                        web.post("/v1/batch", self._segment_batch)])
        await self._serve(app)
        return self



async def _huge(request: web.Request, rec: Request, reply: bytes, size: int
                ) -> web.StreamResponse:
    """``reply`` padded with spaces to ``size`` bytes, streamed a MiB at a time until it
    is all written or the agent stops reading (``rec.written``)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = size
    await resp.prepare(request)
    chunk = b" " * (1024 * 1024)
    try:
        await resp.write(reply)
        rec.written = len(reply)
        while rec.written < size:
            part = chunk[:size - rec.written]
            await resp.write(part)
            rec.written += len(part)
        await resp.write_eof()
    except ConnectionError:
        pass   # the agent closed the connection
    return resp


async def _stalled(request: web.Request, reply: bytes, delay: float) -> web.StreamResponse:
    """``reply`` in two halves, the second ``delay`` seconds after the first."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(reply)
    await resp.prepare(request)
    try:
        await resp.write(reply[: len(reply) // 2])
        await asyncio.sleep(delay)
        await resp.write(reply[len(reply) // 2:])
        await resp.write_eof()
    except ConnectionError:
        pass   # the agent stopped waiting and closed the connection
    return resp


def _echo(request: web.Request) -> bytes:
    head = f"{request.method} {request.path_qs}\n" + "\n".join(
        f"{k}: {v}" for k, v in request.headers.items())
    return ('{"error": "refused", "request": ' + repr(head).replace("'", '"') + "}").encode()


def _headers(fault: Fault) -> dict[str, str]:
    return {k: v() if callable(v) else v for k, v in fault.headers.items()}
