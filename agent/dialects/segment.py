"""The Segment spec HTTP API as MetaRouter documents it (seed 003), for Segment SDKs.

Routes: single calls (long and short forms), `/v1/batch` and `/v1/import`,
the tracking pixel and the webhook. Error bodies follow the seed:
``{"Error","Message","Details"}`` for single calls and
``{"Success": false, "Errors": [...]}`` for batches (segment_replies.py). A successful
batch is answered exactly 200: legacy Segment clients resend on 201/202/204.

Browser SDKs add two batch routes: `/v1/b` (analytics.js 2.0 batching, text/plain
`{writeKey, batch, sentAt}`) and `/beacon/v1/batch` (RudderStack's sendBeacon, the key
only in the query).

Keys: Basic auth (username = write key, with or without the colon), else a
`writeKey` in the message (or at the batch level); a `?writeKey=` on a batch route,
a single call or the webhook overrides the body's. With none of them, the key is ``NO_KEY`` (auth is
optional in seed 003). Limits are those real clients are built for (32 KB per message,
Segment's; 4 MiB per batch, RudderStack's; see agent/families/segment.py), not the seed's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from agent.dialects import batch_json, replies
from agent.dialects.auth import BadAuth, basic, basic_user
from agent.dialects.base import JSON, Dialect, Example, Express, IngestSink, Routes
from agent.dialects.body import (
    TICKET,
    BodyError,
    Busy,
    TooManyObjects,
    as_is,
    count_events,
    parse_body,
    read_raw,
    whole_body,
)
from agent.dialects.exact_json import kept_as_sent
from agent.dialects.relaxed_json import parse_lenient
from agent.dialects.segment_replies import (
    batch_error,
    error_object,
    full_batch_status,
    partial_status,
    single_error,
    verdict,
)
from agent.families import segment as spec
from agent.families import segment_as_sent as as_sent
from agent.families.errors import Invalid
from agent.families.event import NOT_READ, SEGMENT, Columns, Event, longer_than
from agent.logs import hiding
from agent.spool.types import SpoolFull

log = logging.getLogger("outpost.segment")
T = TypeVar("T")

SHORT = {"t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias"}
# In a fixed order (TYPES is a set, whose order changes with each process's string hashes):
# the routes and their examples are the same in every process, as pytest-xdist's workers
# require of the tests built from them.
ROUTE_TYPES = {**SHORT, **{kind: kind for kind in sorted(spec.TYPES)}}
# A transparent 1x1 GIF.
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
INVALID_KEY = "Invalid or missing writekey"
_UNASKED = "\0"   # not a refusal: a key not yet asked about (see _collect)
# Seed 003 makes auth optional: a message with no key at all is taken under this key
# when `listen.accept_keys` accepts it (empty: any key), and routed like any other.
NO_KEY = "anonymous"
# What a 401 for a request with no key says first: NO_KEY's refusal alone ("not one of
# listen.accept_keys") reads as a key given and refused.
NO_KEY_GIVEN = ("no write key given: send it as Basic auth's username, as `?writeKey=` or "
                f"as `writeKey` in the body ({NO_KEY!r}, the key of a message without one, "
                "is refused")
TEXT = {"Content-Type": "text/plain;charset=UTF-8"}  # how browsers avoid a preflight
SENT_AT = "2026-01-01T00:00:00.000Z"


class Collected(NamedTuple):
    """A validated batch: the events to store, the messages refused (with the status of
    each), the keys they were refused under, for the log, and the status when both lists
    hold some."""

    events: Columns
    errors: list[dict[str, str]]
    statuses: list[int]
    # The request's key, or each refused message's own (once, in order) when the messages
    # name theirs: the batch's `writeKey`, or NO_KEY, may be none of theirs.
    keys: tuple[str, ...]
    limits: Routes   # those the messages were judged by: the commit is held to them too
    # Each key the messages named, asked once: why it is refused (None: it is not). One
    # key: the events are alike for the store (IngestSink.store).
    asked: dict[str | None, str | None]
    partial: int = 207


class Single(NamedTuple):
    """A webhook body that is one message, parsed."""

    body: Any
    size: int


class Failure(NamedTuple):
    status: int
    message: str
    details: str = ""
    retry_after: int | None = None


def _single_reply(failure: Failure | None) -> web.Response:
    """A single call's reply on aiohttp's routes: a Response of its own (see replies.Fixed)."""
    return replies.json_reply({"Success": True}, 200) if failure is None else single_error(*failure)


def _not_stored(exc: Invalid | SpoolFull) -> Failure:
    """A single message's store refused: too large for its upstream, or the spool full."""
    if isinstance(exc, Invalid):
        return Failure(replies.status_of(exc), exc.message)
    return Failure(503, "spool full, retry later", str(exc), exc.retry_after)


def _body_key(body: Any) -> str | None:
    """The `writeKey` of a message or batch, or None (absent, null or ""); Invalid when it
    is something else, rather than stored under `anonymous`."""
    key = body.get("writeKey") if isinstance(body, dict) else None
    if key is None or isinstance(key, str):
        return key or None
    raise Invalid("`writeKey` must be a string")


def _own_key(message: Any, batch_key: str | None) -> str | None:
    """The key ``message`` would be stored under, or None when its `writeKey` is no string."""
    try:
        return _body_key(message) or batch_key or NO_KEY
    except Invalid:
        return None


# A Segment batch as real clients send it, or as people write it by hand; a message
# holding what JSON cannot carry (Python's NaN, JavaScript's cut emoji) refused alone.
_read_batch = partial(batch_json.read, field="batch", lenient=True)


class SegmentHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def single(self, request: web.Request) -> web.StreamResponse:
        kind = ROUTE_TYPES[request.match_info["kind"]]
        try:
            body = parse_lenient(await read_raw(request, spec.MAX_EVENT_BYTES))
            given = _given_keys(request)
        except BodyError as exc:
            return single_error(exc.status, exc.message, exc.details, exc.retry_after)
        except BadAuth as exc:
            return single_error(401, INVALID_KEY, str(exc))
        if (why := self._refusal(given)) is not None:
            return single_error(401, INVALID_KEY, why)
        return _single_reply(await self._one(body, kind, given[0] if given else None,
                                             header_checked=True))

    async def express(self, kind: str, raw: bytes, given: list[str]) -> web.Response | replies.Fixed:
        """``single`` for a body already in hand (agent/server/express.py). One coroutine,
        ``_one``'s work inline: each coroutine a call awaits through was ~2k instructions
        a request (callgrind)."""
        try:
            body = parse_lenient(whole_body(raw, spec.MAX_EVENT_BYTES))
        except BodyError as exc:
            return single_error(exc.status, exc.message, exc.details, exc.retry_after)
        if (why := self._refusal(given)) is not None:
            return single_error(401, INVALID_KEY, why)
        made = self._event(body, ROUTE_TYPES[kind], given[0] if given else None,
                           header_checked=True)
        if isinstance(made, Failure):
            return single_error(*made)
        try:
            await self.sink.store([made])
        except (Invalid, SpoolFull) as exc:
            return single_error(*_not_stored(exc))
        return replies.STORED

    def _refusal(self, given: list[str]) -> str | None:
        """Why the first of the request's keys that is refused is, or None."""
        for key in given:   # a loop, not a generator: this runs for every single call
            if (why := self.sink.key_refusal(key)) is not None:
                return why
        return None

    def _key_refusal(self, key: str | None) -> str | None:
        """Why events may not be stored under ``key``, NO_KEY's when it is None (the
        request gave none), or None."""
        why = self.sink.key_refusal(key or NO_KEY)
        return f"{NO_KEY_GIVEN}: {why})" if why is not None and key is None else why

    async def _one(self, body: Any, kind: str | None, header_key: str | None,
                   raw_size: int = 0, *, header_checked: bool = False) -> Failure | None:
        """Validate and store one message; None when it was stored. ``header_checked``:
        ``header_key`` was just found not refused (``_refusal``), and is not asked again."""
        made = self._event(body, kind, header_key, raw_size, header_checked=header_checked)
        if isinstance(made, Failure):
            return made
        try:
            await self.sink.store([made])
        except (Invalid, SpoolFull) as exc:
            return _not_stored(exc)
        return None

    def _event(self, body: Any, kind: str | None, header_key: str | None,
               raw_size: int = 0, *, header_checked: bool = False) -> Event | Failure:
        """``_one``'s message validated and made an Event, or why it is refused."""
        if not isinstance(body, dict):
            return Failure(400, "expected a JSON object")
        try:
            given = header_key or _body_key(body)
        except Invalid as exc:
            return Failure(replies.status_of(exc), exc.message)
        # The Basic auth key most SDKs send is asked once: ~4k instructions a single call.
        if not (header_checked and header_key) and (why := self._key_refusal(given)) is not None:
            return Failure(401, INVALID_KEY, why)
        key = given or NO_KEY
        if kind is not None:
            body["type"] = kind  # the route names the call, as in Segment's API
        try:
            return spec.accept(body, key, spec.TYPES, spec.received_now(),
                               enrich=self.sink.enrich, raw_size=raw_size)
        except Invalid as exc:
            return Failure(replies.status_of(exc), exc.message)

    async def batch(self, request: web.Request) -> web.StreamResponse:
        try:
            given = _given_keys(request)
        except BadAuth as exc:
            return batch_error(401, [error_object(401, INVALID_KEY, str(exc))])
        return await self._batch(given, partial(read_raw, request, spec.MAX_BATCH_BYTES))

    async def express_batch(self, raw: bytes, given: list[str]) -> web.Response:
        """``batch`` for a body already in hand (agent/server/express.py)."""
        return await self._batch(given, partial(_whole, raw, spec.MAX_BATCH_BYTES))

    async def _batch(self, given: list[str], read: Callable[[], Awaitable[bytes]]
                     ) -> web.Response:
        if (why := self._refusal(given)) is not None:
            return batch_error(401, [error_object(401, INVALID_KEY, why)])
        try:
            collected = await self._judged(await read(), partial(
                self._parse_batch, forced_key=given[0] if given else None))
        except Busy as exc:
            return batch_error(exc.status, [error_object(exc.status, exc.message, exc.details)],
                               exc.retry_after)
        except BodyError as exc:
            # Segment's own words for a body over its size, then the size and the limit,
            # as a single call's 413 says them; ours for any other refusal.
            detail = (f"HTTP request too large: {exc.details}" if exc.status == 413
                      and not isinstance(exc, TooManyObjects) else replies.describe(exc))
            return batch_error(exc.status, [error_object(
                exc.status, "Error reading request body", detail)])
        return await self._store(collected)

    async def _judged(self, raw: bytes, judge: Callable[[bytes], Awaitable[T]]) -> T:
        """``judge(raw)``, judged again while it let messages in under a key refused now.
        A body over 64 KiB is judged on the parse worker (offload.py), and a reload meanwhile
        may take one of its keys out of listen.accept_keys: the commit then refused the
        whole batch (KeyRefused, 401), the other keys' messages with it, where a small body,
        judged in its commit's turn of the loop, gets a 207 refusing that key's alone."""
        judged = await judge(raw)
        while isinstance(judged, Collected) and any(
                why is None and self._key_refusal(key) is not None
                for key, why in judged.asked.items()):
            del judged   # not held beside the next
            judged = await judge(raw)
        return judged

    async def _parse_batch(self, raw: bytes, forced_key: str | None) -> Collected | web.Response:
        return _counted(await parse_body(raw, as_is,
                                         lambda raw, size: self._judge(raw, size, forced_key)))

    def _judge(self, raw: bytes, raw_size: int, forced_key: str | None
               ) -> Collected | web.Response:
        """A batch under a key the request names stored as sent, when every message may be
        (families/segment_as_sent.py: ~11k instructions an event less, no dict of it made
        or encoded again); any other read and judged message by message (``_collect``).
        The cheaper test first: the messages, then the bytes. A `writeKey` in the body
        (the browser's, in each message) is dropped by the general path: no try."""
        if forced_key is not None and raw.find(b'"writeKey"') < 0 \
                and self._key_refusal(forced_key) is None:
            events = as_sent.accepted(raw, spec.TYPES, forced_key, spec.received_now(),
                                      spec.dedupe_head(forced_key), self.sink.enrich.lanes)
            limits = self.sink.limits
            # Too large for an upstream: each such message is refused alone, and named.
            # Measured only when one is longer than ``least`` (most never are: a Nucleus
            # route's limit is 4 MiB), as each Event of the columns is made at its read.
            if events is not None and kept_as_sent(raw) and not (
                    limits.active and longer_than(events, limits.least)
                    and any(limits.oversize(event) is not None for event in events)):
                return Collected(events, [], [], (forced_key,), limits, {forced_key: None})
        return self._collect(_read_batch(raw), raw_size, forced_key)

    def _collect(self, read: batch_json.Read, raw_size: int,
                 forced_key: str | None) -> Collected | web.Response:
        """Validate a batch into events and per-message errors (no await: the raw
        body and parsed batch are freed before the commit is awaited)."""
        body, faults = read
        try:
            items = spec.batch_items(body)
            # Checked only where it would be used, as a message's own writeKey is.
            batch_key = None if forced_key else _body_key(body)
        except Invalid as exc:
            status = replies.status_of(exc)
            return batch_error(status, [error_object(status, exc.message)])
        if not items:
            why = self._key_refusal(forced_key or batch_key)
            return verdict([] if why is None else [error_object(401, INVALID_KEY, why)],
                            [401], 0)
        given = spec.shared(spec.received_now(), body)
        enrich, refusal = self.sink.enrich, self._key_refusal
        limits = self.sink.limits   # read once: a reload applies to the next request
        # None when no upstream sets a limit: no call for each message. Nor for one no
        # longer than ``least``, which no route's limit refuses (most: a Nucleus route's is
        # 4 MiB).
        oversize = limits.oversize if limits.active else None
        least = limits.least
        asked: dict[str | None, str | None] = {}
        # A key the request names (Basic auth, `?writeKey=`) is every message's: asked
        # once here, and the events need no column of keys (an append an event).
        out = Collected(Columns(SEGMENT, forced_key or NO_KEY, by_event_keys=not forced_key),
                        [], [], (forced_key or batch_key or NO_KEY,), limits, asked)
        keys, dedupes, bodies, lanes = (out.events.keys, out.events.dedupes, out.events.bodies,
                                        out.events.lanes)
        heads: dict[str | None, hashlib.blake2b] = {}   # each key's, beside ``asked``
        refused_keys: dict[str, None] = {}   # each refused message's own key, in order
        if forced_key:
            own, refused = forced_key, refusal(forced_key)
            asked[forced_key] = refused
            head = spec.dedupe_head(forced_key)
        for i, ev in enumerate(items):
            if faults and i in faults:   # read, but not as sent: refused alone
                out.errors.append(error_object(400, faults[i], spec.where(i, ev)))
                out.statuses.append(400)
                if keys is not None and (named := _own_key(ev, batch_key)):
                    refused_keys[named] = None
                continue
            try:
                if keys is not None:   # each message may name its own
                    own = ""   # a `writeKey` that is no string names none
                    key = _body_key(ev) or batch_key
                    refused = asked.get(key, _UNASKED)
                    own = key or NO_KEY
                    if refused is _UNASKED:
                        refused = asked[key] = refusal(key)
                        heads[key] = spec.dedupe_head(own)
                    head = heads[key]
                if refused is None:
                    dedupe, stored, lane = spec.accepted(ev, own, spec.TYPES, given, enrich,
                                                         raw_size, False, head)
            except Invalid as exc:
                status, message, why = replies.status_of(exc), exc.message, ""
            else:
                if refused is not None:
                    status, message, why = 401, INVALID_KEY, refused
                # Too large for its upstream (the batch context grew it, say): this
                # message alone is refused, as the store would refuse the request.
                elif oversize is not None and len(stored) > least and (too := oversize(
                        Event(own, SEGMENT, dedupe, stored, NOT_READ, lane))) is not None:
                    status, message, why = 413, too, ""
                else:
                    if keys is not None:
                        keys.append(own)
                    dedupes.append(dedupe)
                    bodies.append(stored)
                    lanes.append(lane)
                    continue
            at = spec.where(i, ev, given.made)
            out.errors.append(error_object(status, message, f"{at}: {why}" if why else at))
            out.statuses.append(status)
            if keys is not None and own:
                refused_keys[own] = None
        if out.errors and out.events:
            return out._replace(partial=partial_status(items[0], body.get("context")),
                                keys=tuple(refused_keys) or out.keys)
        return out

    async def _store(self, collected: Collected | web.Response) -> web.Response:
        if isinstance(collected, web.Response):
            return collected
        try:
            await self.sink.store(collected.events, collected.limits,
                                  alike=len(collected.asked) == 1)
        except Invalid as exc:   # too large for the whole spool: every message refused
            status = replies.status_of(exc)
            return batch_error(status, [error_object(status, exc.message)])
        except SpoolFull as exc:
            status = full_batch_status(exc)
            return batch_error(status, [error_object(status, "spool full, retry later", str(exc))],
                               exc.retry_after)
        if collected.errors and collected.events:
            first, *others = collected.keys
            replies.refused_items(log, first, [
                (status, f"{error['Details']}: {error['Message']}")
                for status, error in zip(collected.statuses, collected.errors, strict=True)],
                len(collected.events) + len(collected.errors), others=others)
        return verdict(collected.errors, collected.statuses, len(collected.events),
                        collected.partial)

    async def webhook(self, request: web.Request) -> web.StreamResponse:
        """Analytics.js-formatted data, one message or a batch; `?writeKey=` wins."""
        try:
            header = basic_user(request.headers.get("Authorization"))
            forced = query_key(request) or header
        except BadAuth as exc:
            return single_error(401, INVALID_KEY, str(exc))
        try:
            parsed = await self._judged(await read_raw(request, spec.MAX_BATCH_BYTES),
                                        partial(self._parse_webhook, forced_key=forced))
        except BodyError as exc:
            return single_error(exc.status, exc.message, exc.details, exc.retry_after)
        if isinstance(parsed, Single):
            return _single_reply(await self._one(parsed.body, None, forced, parsed.size))
        return await self._store(parsed)

    async def _parse_webhook(self, raw: bytes,
                             forced_key: str | None) -> Single | Collected | web.Response:
        def build(read: batch_json.Read, size: int) -> Single | Collected | web.Response:
            # Without `batch`, the body is one message: any value JSON cannot carry in it
            # was refused as outside the batch.
            if isinstance(read.body, dict) and "batch" in read.body:
                return self._collect(read, size, forced_key)
            return Single(read.body, size)
        return _counted(await parse_body(raw, _read_batch, build))

    async def pixel(self, request: web.Request) -> web.StreamResponse:
        """Always a 200 GIF (an <img> cannot act on errors); valid messages are stored.
        HEAD (aiohttp's GET routes answer it) is safe by RFC 9110: link checkers and
        prefetchers send it, and the browser's GET follows, so it stores nothing."""
        headers = {"Cache-Control": "no-store"}
        if request.method == "HEAD":
            headers["X-Outpost-Error"] = "a HEAD request stores nothing: the pixel stores a GET"
            return web.Response(body=GIF, content_type="image/gif", headers=headers)
        problem, key = await self._pixel(request)
        if problem:
            # Counted as refused with the status the other routes would answer.
            replies.refused(problem.status)
            why = f"{problem.message}: {problem.details}" if problem.details else problem.message
            if log.isEnabledFor(logging.DEBUG):
                # Its key is not registered (never stored): the app may have put it in a
                # value the reason quotes.
                log.debug("pixel %s not stored: %s", request.path,
                          why if key is None else hiding(key, why, len(why)))
            headers["X-Outpost-Error"] = _header_safe(why)[:200]
        return web.Response(body=GIF, content_type="image/gif", headers=headers)

    async def _pixel(self, request: web.Request) -> tuple[Failure | None, str | None]:
        """Why the pixel's message was not stored (None: it was), and the key it named."""
        kind = ROUTE_TYPES.get(request.match_info["kind"])
        if kind is None:
            return Failure(400, f"unknown pixel type {request.match_info['kind']!r}"), None
        try:
            body = decode_pixel(request.query.get("data", ""))
        except BodyError as exc:
            return Failure(exc.status, f"{exc.message}: {exc.details}" if exc.details
                           else exc.message), None
        try:
            header = basic_user(request.headers.get("Authorization")) or query_key(request)
        except BadAuth as exc:
            return Failure(401, f"{INVALID_KEY}: {exc}"), None
        try:
            key = header or _body_key(body)
        except Invalid:   # ``_one`` refuses it, saying so
            key = None
        return await self._one(body, kind, header), key


# Control characters (C0 and DEL) as escapes: aiohttp refuses to write a header holding
# one, and the reason may name a field as the app spelled it (`properties.a\x01b`).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def _header_safe(text: str) -> str:
    """``text`` as a header value: printable ASCII only, whatever the request held."""
    return text.encode("ascii", "backslashreplace").decode().translate(_CONTROLS)


def _counted(parsed: T) -> T:
    """``parsed``, a batch's events counted against the in-flight budget (Busy if they do
    not fit), on the loop: the parse worker must not touch the budget."""
    if isinstance(parsed, Collected):
        count_events(TICKET.get(), len(parsed.events))
    return parsed


def _given_keys(request: web.Request) -> list[str]:
    """The keys the request names outside its body: Basic auth, then `?writeKey=`.
    Each must be accepted, so that neither can smuggle a refused key past the other."""
    return [k for k in (basic_user(request.headers.get("Authorization")), query_key(request))
            if k is not None]


def query_key(request: web.Request) -> str | None:
    """A `?writeKey=` (sendBeacon cannot set headers); an empty one is no key. Raises
    BadAuth for one whose percent-escapes are no UTF-8: the query parser puts U+FFFD for
    each such byte, a key the app never sent (and `%e9` and `%e8` the same one)."""
    key = request.query.get("writeKey") or None
    if key is not None and "\ufffd" in key:   # a U+FFFD sent as such (%EF%BF%BD) is kept
        pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True,
                          errors="surrogateescape")
        raw = next((value for name, value in pairs if name == "writeKey"), "")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise BadAuth("the `writeKey` query parameter is not percent-encoded UTF-8 "
                          "text") from None
    return key


# Line breaks of MIME-style base64 (Ruby's Base64.encode64, Perl's encode_base64: one every
# 60 or 76 characters): no data (RFC 2045), and skipped by Go's base64, Segment's own.
_LINE_BREAKS = str.maketrans("", "", "\r\n")


def decode_pixel(data: str) -> Any:
    """The base64 JSON of a pixel's `data` (standard or URL-safe, padding optional, in
    lines or not)."""
    if not data:
        raise BodyError(400, "missing `data` query parameter")
    # A literal '+' in an unescaped query string arrives as a space.
    text = data.strip().translate(_LINE_BREAKS).replace(" ", "+").replace("-", "+") \
        .replace("_", "/")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BodyError(400, "`data` is not base64", str(exc)) from exc
    if len(raw) > spec.MAX_EVENT_BYTES:
        raise BodyError(413, "message too large")
    return parse_lenient(raw)


def routes(sink: IngestSink) -> list[web.RouteDef]:
    h = SegmentHandlers(sink)
    kinds = "|".join(sorted(ROUTE_TYPES))
    return [
        web.post(f"/v1/{{kind:(?:{kinds})}}", h.single),
        web.post("/v1/batch", h.batch),
        web.post("/v1/import", h.batch),
        web.post("/v1/b", h.batch),
        web.post("/beacon/v1/batch", h.batch),
        web.get("/v1/pixel/{kind}", h.pixel),
        web.post("/v1/webhook", h.webhook),
        web.post("/v1/w", h.webhook),
    ]


async def _whole(raw: bytes, limit: int) -> bytes:
    return whole_body(raw, limit)


def express(sink: IngestSink) -> dict[str, Express]:
    """The single calls and the SDKs' batch routes, for plain requests the server
    answers itself."""
    h = SegmentHandlers(sink)
    single = {f"/v1/{kind}": partial(h.express, kind) for kind in ROUTE_TYPES}
    return {**single, "/v1/batch": h.express_batch, "/v1/import": h.express_batch}


def examples(key: str) -> list[Example]:
    # Valid for every call: each type ignores the fields it does not need.
    one = {"event": "e", "userId": "u", "groupId": "g", "previousId": "p", "name": "n"}
    auth = {**JSON, "Authorization": basic(key)}
    pixel = base64.urlsafe_b64encode(orjson.dumps({**one, "writeKey": key})).decode()
    batch = orjson.dumps({"batch": [{**one, "type": "track"}]})
    return [*(Example("POST", f"/v1/{kind}", auth, orjson.dumps(one)) for kind in ROUTE_TYPES),
            *(Example("GET", f"/v1/pixel/{kind}?data={pixel}") for kind in ROUTE_TYPES),
            Example("POST", "/v1/batch", auth, batch),
            Example("POST", "/v1/import", JSON, orjson.dumps(
                {"batch": [{**one, "type": "identify"}], "writeKey": key})),
            Example("POST", "/v1/b", TEXT, orjson.dumps(
                {"batch": [{**one, "type": "page"}], "writeKey": key, "sentAt": SENT_AT})),
            Example("POST", f"/beacon/v1/batch?writeKey={key}", TEXT, orjson.dumps(
                {"batch": [{**one, "type": "screen"}], "sentAt": SENT_AT})),
            Example("POST", f"/v1/webhook?writeKey={key}", JSON,
                    orjson.dumps({**one, "type": "track"})),
            Example("POST", "/v1/w", JSON, orjson.dumps({**one, "type": "page", "writeKey": key}))]


DIALECT = Dialect("segment", routes, examples, express)
