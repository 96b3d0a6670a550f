"""The Nucleus tracking API: websocket and HTTP, `{"data": [...]}` in, `reportedIds` out.

The message rules are the family's (agent/families/nucleus.py); this module is the
transport. Real modules crash on any reply other than ``{"reportedIds": [...]}``
(the Swift module), and resend their whole unacknowledged queue when not acked.
A websocket message larger than MAX_MESSAGE (a module's queue after a long absence of
the agent) is read as it arrives (nucleus_frames.py) and only some of its events taken.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from agent.dialects import nucleus_json, replies
from agent.dialects.base import (
    JSON,
    MAX_KEY_CHARS,
    OPEN_SOCKETS,
    Dialect,
    Example,
    IngestSink,
    Routes,
    websocket,
)
from agent.dialects.body import (
    BODY_TIMEOUT_S,
    TICKET,
    BodyError,
    Busy,
    Reservation,
    Stalled,
    TooManyObjects,
    as_is,
    count_events,
    parse_body,
    read_raw,
)
from agent.dialects.exact_json import kept_as_sent
from agent.dialects.nucleus_frames import Late, OverCap, QueueSocket, Taken, close_reason
from agent.dialects.nucleus_queue import TooLarge, TooMany
from agent.dialects.replies import KeyRefused, describe, masked, status_of
from agent.families import nucleus as family
from agent.families import nucleus_as_sent as as_sent
from agent.families.errors import Invalid, shown
from agent.families.event import Event, iso_ms, longer_than, now_ms
from agent.logs import hiding, log_limited
from agent.spool.types import SpoolFull

log = logging.getLogger("outpost.nucleus")

# Modules send their whole unacknowledged queue in one message; after a long
# outage of the agent itself that queue can be large.
MAX_MESSAGE = 4 * 1024 * 1024
# A websocket message over MAX_MESSAGE is taken up to MAX_FRAME: the events of its first
# KEEP bytes, with the later ones sharing their ids (up to MAX_MESSAGE in all), stored and
# acknowledged, the rest left for the module's next message (nucleus_queue.py), so each
# tick shrinks its queue with the agent's memory bounded by what it keeps, not by the
# message. KEEP: storing 2 MiB of events peaks about 15 MB over idle (4 MiB: 25;
# `python -m bench.nucleus_backlog`). MAX_FRAME bounds the time one message takes to read
# (about 15 ms a MiB); a module whose queue is past it has kept it for days, and is told
# so in the log.
MAX_FRAME = 64 * 1024 * 1024
KEEP = 2 * 1024 * 1024
# The most values (events, members of the message) of a message over MAX_MESSAGE read: each
# costs ~1 µs of Python, so no message costs more than about a second of CPU (64 MiB of
# real events hold ~150,000; of `0,`, 33 million). Over it: refused (1009), logged.
MAX_VALUES = 1_000_000
# An event holds ~450 bytes until its commit (its parsed object, its Event, its enriched
# body) however few it came as: a 4 MiB post of `{}`, 1.4 million events, took 640 MB and
# 10 s. So a message taken whole counts each event as at least EVENT_MIN bytes of the 4 MiB
# it may be (no more events than this), and as body.EVENT_HELD against the in-flight budget,
# as one read as it arrives counts those it keeps. Real events are 100 bytes or more.
EVENT_MIN = 32
MAX_EVENTS = MAX_MESSAGE // EVENT_MIN
# The websocket versions aiohttp's handshake takes (RFC 6455's and two drafts').
WS_VERSION, WS_VERSIONS = "13", ("13", "8", "7")


def _error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers,
                             dumps=lambda o: orjson.dumps(o).decode())


def _handshake_fault(headers: Mapping[str, str], said: str) -> str:
    """What is wrong with a websocket upgrade aiohttp refused, in words a module's log can
    be acted on with (aiohttp's own, in plain text: `Handshake error: None`)."""
    if "upgrade" not in {t.strip().lower() for t in headers.get("Connection", "").split(",")}:
        return "no `Connection: Upgrade`"
    version = headers.get("Sec-WebSocket-Version")
    if version is None:
        return f"no Sec-WebSocket-Version ({WS_VERSION})"
    if version not in WS_VERSIONS:
        return f"Sec-WebSocket-Version {version[:16]!r} is not supported ({WS_VERSION} is)"
    key = headers.get("Sec-WebSocket-Key")
    if key is None:
        return "no Sec-WebSocket-Key"
    with suppress(binascii.Error):
        if len(base64.b64decode(key)) == 16:
            return said
    return "Sec-WebSocket-Key is not 16 bytes in base64"


NOT_UTF8 = "its percent-escapes in the path are not UTF-8 text"


def _escapes_not_utf8(request: web.Request, key: str) -> bool:
    """Whether the app id ``key`` came as percent-escapes of bytes that are no UTF-8
    (`/app/%e9/track`: Latin-1). The router keeps each such escape as its text, `%e9`: the
    id of another app (`/app/%25e9/track`), and one this app never sent. Every other
    segment of a Nucleus path is a word of the route's own, so any such byte is the id's."""
    if "%" not in key:   # no escape kept as text: the usual id pays nothing more
        return False
    try:
        unquote_to_bytes(request.rel_url.raw_path).decode()
    except UnicodeDecodeError:
        return True
    return False


def _quoted(key: str) -> str:
    """An app id for its 401: one too long to be a key is cut, or a 60 KB id comes back
    whole in each answer."""
    if len(key) <= MAX_KEY_CHARS:
        return repr(key)
    return f"{key[:16]!r}... ({len(key)} characters)"


def _reply(acks: list[Any]) -> bytes:
    return orjson.dumps({"reportedIds": acks})


class NucleusHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def _take(self, raw: str | bytes, key: str,
                    ticket: Reservation | None) -> list[Any]:
        """Message ``raw`` parsed and its events stored, held to the routes in force when
        it came (a reload applies to the next message); its acks. ``ticket`` holds its
        bytes, and is charged what its events count for beyond them (body.count_events)."""
        limits = self.sink.limits
        got = await parse_body(raw, as_is, lambda raw, _size: self._judge(raw, key, limits))
        count_events(ticket, len(got.events))
        events, acks = self._carried(got, key, limits)
        await self.sink.store(events, limits, alike=True)   # the message's key, Nucleus
        return acks

    def _judge(self, raw: str | bytes, key: str, limits: Routes) -> family.Accepted:
        """A usual message stored as sent (families/nucleus_as_sent.py: no dict of an event
        made or encoded again); any other read and judged event by event. The cheaper test
        first: the events, then the bytes."""
        enrich = self.sink.enrich
        # The parsed events are kept on the Events only for a key whose events are mapped
        # at ingest: the mapping reads them instead of the body (Event.parsed).
        keep = limits.maps_key(key)
        if not keep:   # a mapped key's events keep their parsed form
            data = raw.encode() if isinstance(raw, str) else raw
            got = as_sent.accepted(data, key, iso_ms(now_ms()), enrich.lanes, MAX_EVENTS)
            # Too large for an upstream: each such event is left out alone, and named.
            # Measured only when one is longer than ``least`` (most never are: a
            # Nucleus upstream's limit is 4 MiB), as each Event of the columns is
            # made at its read.
            if got is not None and kept_as_sent(data) and not (
                    limits.active and longer_than(got.events, limits.least) and any(
                        limits.oversize(event) is not None for event in got.events)):
                return got
        msg, faults = nucleus_json.read(raw)
        events = msg.get("data") if isinstance(msg, dict) else None
        if isinstance(events, list) and len(events) > MAX_EVENTS:
            raise TooMany(MAX_EVENTS, "events", "too many to take (each counts as at "
                          f"least {EVENT_MIN} bytes of the {MAX_MESSAGE // 2**20} MiB "
                          "a message may be)")
        return family.accept(msg, key, enrich, faults, keep_parsed=keep)

    def _refusal(self, key: str) -> Callable[[bytes], tuple[int, str] | None]:
        """For a large message's reader (nucleus_queue.py): (status, why) for an event,
        given as its text, that a message holding it leaves out (a problem of its own, or
        too large for its upstream), judged as ``_take`` judges it; None for one kept, or
        one refusing its message (the message's own read refuses it)."""
        def refuses(piece: bytes) -> tuple[int, str] | None:
            limits = self.sink.limits
            try:
                got = self._judge(b'{"data":[' + piece + b"]}", key, limits)
            except (BodyError, Invalid):
                return None
            if got.left_out:
                return 400, got.left_out[0][1]
            for ev in got.events:
                if (too := limits.oversize(ev)) is not None:
                    return 413, too
            return None
        return refuses

    def _carried(self, got: family.Accepted, key: str, limits: Routes
                 ) -> tuple[Sequence[Event], list[Any]]:
        """The events the key's upstream can carry, and the acks without the ids of the
        events left out: for a problem of their own (the family's), or too large for that
        upstream. Each is left unacknowledged: the module keeps it, nothing of it is
        stored, and the refusal is logged and counted. An oversize event without an id
        cannot be left out of the acks, so its message is refused (Invalid)."""
        for ev_id, why in got.left_out:
            replies.refused(400)
            # The id's start: an app's id may be a string of any length (a log line a MB).
            # Neither may show the key: a new one is not registered before its commit.
            log_limited(log, logging.WARNING, f"bad-event:{key}",
                        "event id %s of app %s left unacknowledged: %s",
                        _id_shown(key, ev_id), masked(key),
                        hiding(key, why, len(why)))
        # No loop when no upstream sets a limit, nor when no event is longer than
        # ``least`` (most messages: a Nucleus upstream's limit is 4 MiB).
        if not limits.active or not longer_than(got.events, limits.least):
            return got.events, got.acks
        refused: set[int] = set()    # places in the acks, not ids: ids collide
        oversize = limits.oversize
        for ev, at in zip(got.events, got.ack_at, strict=True):
            too = oversize(ev)
            if too is None:
                continue
            if at < 0:
                raise Invalid(too, too_large=True)
            refused.add(at)
            replies.refused(413)
            log_limited(log, logging.WARNING, f"oversize:{key}",
                        "event id %s of app %s left unacknowledged: %s",
                        _id_shown(key, ev.ack_id), masked(key), too)
        if not refused:
            return got.events, got.acks
        return ([ev for ev, at in zip(got.events, got.ack_at, strict=True) if at not in refused],
                [a for n, a in enumerate(got.acks) if n not in refused])

    def _key_refusal(self, request: web.Request, key: str) -> web.Response | None:
        """The 401 for the app id ``key`` of ``request``'s path, or None when it is taken."""
        why = NOT_UTF8 if _escapes_not_utf8(request, key) else self.sink.key_refusal(key)
        return None if why is None else _error(401, f"appId {_quoted(key)} refused: {why}")

    async def http_track(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["appId"]
        if (unauthorised := self._key_refusal(request, key)) is not None:
            return unauthorised
        try:
            acks = await self._take(await read_raw(request, MAX_MESSAGE), key, TICKET.get())
        except Stalled as exc:
            # Modules speak websocket: this route's clients are other Outposts' nucleus-http
            # uplinks, which halve their batches on a 408 (a link too slow for them).
            return _error(replies.TIMED_OUT, describe(exc))
        except BodyError as exc:
            return _error(exc.status, describe(exc), exc.retry_after)
        except Invalid as exc:
            return _error(status_of(exc), describe(exc))
        except SpoolFull as exc:
            return _error(503, str(exc), exc.retry_after)
        return web.Response(body=_reply(acks), content_type="application/json")

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["appId"]
        if (unauthorised := self._key_refusal(request, key)) is not None:
            return unauthorised
        ws = QueueSocket(key=key, large=MAX_MESSAGE, cap=MAX_FRAME, keep=KEEP, values=MAX_VALUES,
                         deadline=request.app[BODY_TIMEOUT_S], ticket=self.sink.ticket,
                         refuses=self._refusal(key))
        try:
            await ws.prepare(request)
        except web.HTTPBadRequest as refused:
            return _error(400, "websocket handshake refused: "
                               + _handshake_fault(request.headers, refused.text or ""))
        sockets = request.app.get(OPEN_SOCKETS, set())
        sockets.add(ws)   # closed (1001) by a stop
        try:
            async for frame in ws:
                if frame.type == WSMsgType.TEXT or frame.type == WSMsgType.BINARY:
                    taken = ws.taken(frame.data) if frame.type == WSMsgType.BINARY else None
                    if not await self._still_accepted(ws, key, taken):
                        break
                    work = self._small(key, frame.data) if taken is None else self._large(key, taken)
                    if not await self._answer(ws, key, work):
                        break
                    ws.answered()
                    # A message that stores nothing (a heartbeat, `{"data":[]}`) is answered
                    # without a wait, and aiohttp hands over what it queued without one: a
                    # client sending thousands at once had them all answered in one turn of
                    # the loop (15,000 of a read: ~1 s), others served after.
                    await asyncio.sleep(0)
                elif frame.type == WSMsgType.ERROR:
                    ws.answered()
                    exc = ws.exception()
                    if isinstance(exc, WebSocketError):   # the client's: 1009, 1002...
                        replies.refused(exc.code)
                    # Rate-limited: a client may open connection after connection.
                    log_limited(log, logging.INFO, f"ws-closed:{key}",
                                "websocket for %s closed: %s", masked(key), exc)
        finally:
            sockets.discard(ws)
            ws.drop()
        return ws

    async def _still_accepted(self, ws: QueueSocket, key: str, taken: Taken | None) -> bool:
        """Whether ``key`` is still accepted; if not, the connection is closed (1008). A
        reload may have taken it out of listen.accept_keys since the upgrade, and a module
        keeps its websocket open for good: its reconnect then gets the 401."""
        why = self.sink.key_refusal(key)
        if why is None:
            return True
        if taken is not None:
            taken.hold.close()   # its share of the in-flight budget
        replies.refused(401)   # as its HTTP twin, and the upgrade, are counted
        await ws.close(code=WSCloseCode.POLICY_VIOLATION,
                       message=close_reason(f"appId refused: {why}"))
        return False

    async def _small(self, key: str, data: str | bytes) -> list[Any]:
        """One message as aiohttp read it: stored; its acks."""
        with self.sink.ticket() as ticket:
            ticket.take(len(data))
            return await self._take(data, key, ticket)

    async def _large(self, key: str, taken: Taken) -> list[Any]:
        """One large message, read as it came (nucleus_frames.py): the events it kept
        (nucleus_queue.py) stored; their acks."""
        with taken.hold:
            if taken.error is not None:
                raise taken.error
            assert taken.split is not None
            split = taken.split
            for ev_id, status, why in split.refused:   # left out as its message would
                replies.refused(status)
                log_limited(log, logging.WARNING,
                            f"{'oversize' if status == 413 else 'bad-event'}:{key}",
                            "event id %s of app %s left unacknowledged: %s",
                            _id_shown(key, ev_id), masked(key), hiding(key, why, len(why)))
            # Charged the most it may keep, which counts its events so already.
            acks = await self._take(split.message, key, None)
        log_limited(log, logging.INFO, f"queue:{key}",
                    "app %s sent its queue of %d events in one %.1f MiB message: took %d; "
                    "its module resends the rest", masked(key), split.total,
                    taken.size / 2**20, split.kept)
        return acks

    async def _answer(self, ws: web.WebSocketResponse, key: str,
                      work: Awaitable[list[Any]]) -> bool:
        """Await ``work`` (one message read, parsed and stored: its acks) and answer it;
        False when the connection was closed for it."""
        try:
            acks = await work
        except Busy:
            # The websocket's "retry later": the module reconnects and resends its queue.
            replies.refused(WSCloseCode.TRY_AGAIN_LATER)
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"agent busy, retry later")
            return False
        except OverCap as exc:
            replies.refused(WSCloseCode.MESSAGE_TOO_BIG)
            log_limited(log, logging.WARNING, f"over-cap:{key}",
                        "app %s: %s, closed (1009). Its Nucleus module sends its whole unsent "
                        "queue in every message and never caps it, so none of the app's "
                        "events will arrive until that queue is cleared: delete the module's "
                        "saved queue (nucleus-nodejs: `nucleus-queue` in its `nucleus` config "
                        "file; nucleus-python: `queue` in its `nucleus-<appId>` cache file), "
                        "losing those events", masked(key), exc)
            await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG, message=close_reason(str(exc)))
            return False
        except Late as exc:
            # A stalled sender (stopped, a debugger) holds its share of the in-flight
            # budget: cut as a stalled HTTP body is refused.
            replies.refused(WSCloseCode.POLICY_VIOLATION)
            log_limited(log, logging.WARNING, f"late:{key}", "app %s: large %s, closed (1008)",
                        masked(key), exc)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=close_reason(str(exc)))
            return False
        except KeyRefused as exc:   # a reload revoked the key while the message was read
            replies.refused(401)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION,
                           message=close_reason(exc.message))
            return False
        except (BodyError, Invalid) as exc:
            # A bad message closes only this connection, with a reason the app can log.
            code = (WSCloseCode.MESSAGE_TOO_BIG
                    if isinstance(exc, (TooLarge, TooMany, TooManyObjects))
                    else WSCloseCode.INVALID_TEXT)
            if isinstance(exc, (TooMany, TooManyObjects)):
                log_limited(log, logging.WARNING, f"too-many:{key}",
                            "app %s: %s, closed (1009)", masked(key),
                            exc.message)
            replies.refused(code)
            await ws.close(code=code, message=close_reason(describe(exc)))
            return False
        except SpoolFull as exc:
            # Nothing acked: the module keeps the events and resends them later (every
            # few seconds, from every app: hence the rate limit). Closed as when busy: a
            # message left without a reply put the replies after it out of step with their
            # messages (a sender counting them, such as another Outpost, read a later reply
            # as this one's). Counted as its HTTP twin.
            replies.refused(503)
            log_limited(log, logging.WARNING, "spool-full",
                        "spool full, not acknowledging a message of %s: %s", masked(key),
                        str(exc))
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER,
                           message=close_reason(f"retry later: {exc}"))
            return False
        # Answered even with no id to echo, as the HTTP form is: a message is acknowledged
        # the same way whichever transport it came by.
        if not ws.closed:
            try:
                await ws.send_str(_reply(acks).decode())
            except ConnectionError:
                # The module went away first (quit, slept): nothing was acknowledged to it,
                # so it resends these events, and the spool stores them once.
                log.debug("websocket for %s gone before its answer", masked(key))
                return False
        return True


# Any one segment: aiohttp's default for a variable leaves out `{` and `}`, and an app
# id holding one got a 404 naming a route the agent has.
_APP_ID = "{appId:[^/]+}"


def routes(sink: IngestSink) -> list[web.RouteDef]:
    h = NucleusHandlers(sink)
    return [
        web.post(f"/app/{_APP_ID}/track", h.http_track),
        websocket(f"/app/{_APP_ID}/track", h.websocket),
        websocket(f"/{_APP_ID}/track", h.websocket),
        websocket(f"/{_APP_ID}", h.websocket),
        websocket(f"/{_APP_ID}/", h.websocket),  # the seed's literal form
    ]


def examples(key: str) -> list[Example]:
    def message() -> bytes:
        return orjson.dumps({"data": [{"name": "e", "id": uuid.uuid4().hex, "sessionId": 1}]})
    return [Example("POST", f"/app/{key}/track", JSON, message()),
            *(Example("GET", path, body=message(), websocket=True)
              for path in (f"/app/{key}/track", f"/{key}/track", f"/{key}", f"/{key}/"))]


DIALECT = Dialect("nucleus", routes, examples)


def _id_shown(key: str, ev_id: Any) -> str:
    """An event's id for a log line, cut (``shown``), the request's own key hidden in it
    before the cut: one the cut falls in would show its first characters."""
    if not isinstance(ev_id, str):
        return shown(ev_id)
    head = ev_id[:_ID_CUT + len(key)]   # an id may be a MB long: a key past it is cut away
    return shown(hiding(key, head, len(head)))


_ID_CUT = 40   # what ``shown`` keeps

