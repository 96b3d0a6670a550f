"""The Nucleus tracking API: websocket and HTTP, `{"data": [...]}` in, `reportedIds` out.

Real modules resend their whole unacknowledged queue every few seconds, send
small integer ids that collide across sessions, and crash on any reply other
than ``{"reportedIds": [...]}`` (the Swift module).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from agent.dialects import replies
from agent.dialects.body import BodyError, Busy, parse_body, parse_json, read_raw
from agent.families.enrich import fill_nucleus
from agent.families.event import NUCLEUS, Event, compact_json, dedupe_key, iso_ms, now_ms
from agent.families.nucleus import event_type, identity
from agent.logs import log_limited
from agent.server.intake import Sink
from agent.spool.types import SpoolFull

log = logging.getLogger("outpost.nucleus")

# Modules send their whole unacknowledged queue in one message; after a long
# outage of the agent itself that queue can be large.
MAX_MESSAGE = 4 * 1024 * 1024
_ID_TYPES = (int, float, str)


def parse_message(msg: Any, key: str, sink: Sink) -> tuple[list[Event], list[Any]]:
    """Validate one `{"data": [...]}` message; returns (events to store, ids to ack)."""
    if not isinstance(msg, dict):
        raise BodyError(400, "expected a JSON object with a `data` array")
    data = msg.get("data")
    if not isinstance(data, list):
        raise BodyError(400, "`data` must be an array of events")
    for i, ev in enumerate(data):
        if not isinstance(ev, dict):
            raise BodyError(400, f"data[{i}] must be an object, got {_json_type(ev)}")
        if "id" in ev and ev["id"] is not None and (
                isinstance(ev["id"], bool) or not isinstance(ev["id"], _ID_TYPES)):
            raise BodyError(400, f"data[{i}].id must be a string or a number")
        for field in ("type", "name"):
            value = ev.get(field)
            if value is not None and not isinstance(value, str):
                raise BodyError(400, f"data[{i}].{field} must be a string")
    events: list[Event] = []
    acks: list[Any] = []
    received = None
    for i, ev in enumerate(data):
        ev_id = ev.get("id")
        if ev_id is not None:
            acks.append(ev_id)
        kind = event_type(ev)
        if kind == "heartbeat":
            continue  # keeps the connection alive; not analytics
        try:
            ident = dedupe_key(*identity(key, ev, kind))
            fill_nucleus(ev, sink.facts, kind)
            if ev.get("date") is None:
                received = received or iso_ms(now_ms())
                ev["date"] = received
            events.append(Event(key, NUCLEUS, ident, compact_json(ev)))
        except orjson.JSONEncodeError as exc:  # nested deeper than orjson writes (255)
            raise BodyError(400, f"data[{i}] cannot be stored", str(exc)) from exc
    return events, acks


def _masked(key: str) -> str:
    """An app key for the log: keys are credentials, and one never stored is not in the
    log redaction registry yet."""
    return key[:3] + "***"


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers,
                             dumps=lambda o: orjson.dumps(o).decode())


def _reply(acks: list[Any]) -> bytes:
    return orjson.dumps({"reportedIds": acks})


class NucleusHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def _parse(self, raw: str | bytes, key: str) -> tuple[list[Event], list[Any]]:
        return await parse_body(raw, parse_json,
                                lambda doc, _size: parse_message(doc, key, self.sink))

    async def http_track(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["appId"]
        if not self.sink.key_allowed(key):
            return _error(401, f"unknown appId {key!r}")
        try:
            events, acks = await self._parse(await read_raw(request, MAX_MESSAGE), key)
            await self.sink.store(events)
        except BodyError as exc:
            return _error(exc.status, exc.message + (f": {exc.details}" if exc.details else ""),
                          exc.retry_after)
        except SpoolFull as exc:
            return _error(503, exc.reason, exc.retry_after)
        return web.Response(body=_reply(acks), content_type="application/json")

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["appId"]
        if not self.sink.key_allowed(key):
            return _error(401, f"unknown appId {key!r}")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, autoping=True)
        await ws.prepare(request)
        async for frame in ws:
            if frame.type == WSMsgType.TEXT or frame.type == WSMsgType.BINARY:
                if not await self._frame(ws, key, frame.data):
                    break
            elif frame.type == WSMsgType.ERROR:
                log.info("websocket for %s closed: %s", _masked(key), ws.exception())
        return ws

    async def _frame(self, ws: web.WebSocketResponse, key: str, data: str | bytes) -> bool:
        """Handle one frame; False when the connection was closed for it."""
        try:
            with self.sink.admission.ticket() as ticket:
                ticket.take(len(data))
                events, acks = await self._parse(data, key)
                await self.sink.store(events)
        except Busy:
            # The websocket's "retry later": the module reconnects and resends its queue.
            replies.refused(WSCloseCode.TRY_AGAIN_LATER)
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"agent busy, retry later")
            return False
        except BodyError as exc:
            # A bad message closes only this connection, with a reason the app can log.
            replies.refused(WSCloseCode.INVALID_TEXT)
            await ws.close(code=WSCloseCode.INVALID_TEXT, message=exc.message.encode()[:120])
            return False
        except SpoolFull as exc:
            # Nothing acked: the module keeps the events and resends them later (every
            # few seconds, from every app: hence the rate limit). Counted as its HTTP twin.
            replies.refused(503)
            log_limited(log, logging.WARNING, "spool-full",
                        "spool full, not acknowledging %d events for %s: %s",
                        len(events), _masked(key), exc.reason)
            return True
        if acks and not ws.closed:
            await ws.send_str(_reply(acks).decode())
        return True


def routes(sink: Sink) -> list[web.RouteDef]:
    h = NucleusHandlers(sink)
    return [
        web.post("/app/{appId}/track", h.http_track),
        web.get("/app/{appId}/track", h.websocket),
        web.get("/{appId}/track", h.websocket),
        web.get("/{appId}", h.websocket),
    ]
