"""The Tranthor / Dittofeed public app API (seed 002): `/api/public/apps/{call}`.

Single calls (track, identify, page, screen) and `batch` (`{"batch": [...]}`,
each message with its `type`), all answered 204. The key is the
`PublicWriteKey` header, else `authorization`, taken verbatim (the Dittofeed
SDK sends its write key as the whole header) or without a `Bearer ` prefix.
`messageId` is required: it is the idempotency key. Base64 `files` are checked
(type, and name, mimeType and data strings) and kept as sent; a message is limited by the
1 MiB body limit (Fastify's default, which Dittofeed keeps) and by what the upstream
its key is routed to can carry (413 naming that limit). Errors use Fastify's shape,
`{"statusCode", "error", "message"}`; a batch is taken whole or refused whole, but for a
message holding what JSON cannot carry (a string cut inside an emoji, which the Dittofeed
SDK writes as a lone surrogate; NaN: batch_json.py), refused alone: the rest is stored
and the reply is 207 `{"statusCode": 207, "error": "Multi-Status", "message",
"errors": [...]}`, each item in the error shape (the SDK drops any batch not answered 2xx).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from functools import partial
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from agent.dialects import batch_json, replies
from agent.dialects.base import JSON, Dialect, Example, IngestSink
from agent.dialects.body import parse_body, read_raw
from agent.dialects.exact_json import parse_json
from agent.families import segment as spec
from agent.families.enrich import Enrich
from agent.families.errors import Invalid
from agent.families.event import Event

log = logging.getLogger("outpost.tranthor")
TYPES = frozenset({"track", "identify", "page", "screen"})
MAX_BODY = 1024 * 1024
FILE_TYPE = "Base64Encoded"


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}


def error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    return replies.json_reply(_error_body(status, message), status, retry_after)


def partial_reply(key: str, faults: Mapping[int, str], stored: int) -> web.Response:
    """207: the messages in ``faults`` refused, the ``stored`` others taken."""
    total = stored + len(faults)
    replies.refused_items(log, key, [(400, why) for why in faults.values()], total)
    return replies.json_reply({
        **_error_body(207, f"{len(faults)} of {total} messages refused"),
        "errors": [_error_body(400, why) for why in faults.values()]}, 207)


_read_batch = partial(batch_json.read, field="batch")


def _read_single(raw: bytes) -> batch_json.Read:
    return batch_json.Read(parse_json(raw), {})


def request_key(request: web.Request) -> str | None:
    for header in ("PublicWriteKey", "Authorization"):
        value = request.headers.get(header, "").strip()
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer":   # with no token ("Bearer "), no key: not "Bearer"
            value = token.strip()
        if value:
            return value
    return None


def check_files(ev: Any) -> None:
    """Files shaped as the seed's schema has them, or Invalid naming the field. `data`
    is not decoded: the API's schema says only "string" (its own example sends
    "<string>"). Files are kept as sent (docs/mapping.md, "Tranthor files")."""
    files = ev.get("files") if isinstance(ev, dict) else None
    if files is None:
        return
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise Invalid("`files` must be an array of objects")
    for i, f in enumerate(files):
        if f.get("type") != FILE_TYPE:
            raise Invalid(f"`files[{i}].type` must be {FILE_TYPE!r}, the only type the API has")
        for name in ("name", "mimeType", "data"):
            if not isinstance(f.get(name), str):
                raise Invalid(f"`files[{i}].{name}` must be a string")


def parse(body: Any, call: str, key: str, enrich: Enrich,
          faults: Mapping[int, str] = spec.EMPTY) -> list[Event]:
    """The events of one request to ``/api/public/apps/{call}``, but for a batch's messages
    in ``faults`` (refused alone); raises Invalid."""
    if call == "batch":
        items = spec.batch_items(body)
        for i, ev in enumerate(items):
            if i in faults:
                continue
            try:
                check_files(ev)
            except Invalid as exc:
                raise exc.within(f"batch[{i}]") from None
        return spec.accept_all(body, key, TYPES, 0, enrich=enrich, need_message_id=True,
                               faults=faults)
    if not isinstance(body, dict):
        raise Invalid("body must be an object")
    check_files(body)
    body["type"] = call
    return [spec.accept(body, key, TYPES, spec.received_now(), enrich=enrich,
                        need_message_id=True)]


class TranthorHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def call(self, request: web.Request) -> web.StreamResponse:
        key = request_key(request)
        if (why := self.sink.key_refusal(key)) is not None:
            return error(401, f"missing or invalid write key: {why}")
        assert key is not None

        call = request.match_info["call"]

        async def work() -> web.Response:
            events, faults = await parse_body(
                await read_raw(request, MAX_BODY),
                _read_batch if call == "batch" else _read_single,
                lambda read, _size: (parse(read.body, call, key, self.sink.enrich,
                                           read.faults), read.faults))
            kept = [i for i in range(len(events) + len(faults)) if i not in faults]
            for n, event in enumerate(events):
                why = self.sink.limits.oversize(event)
                if why is not None:
                    exc = Invalid(why, too_large=True)
                    raise exc.within(f"batch[{kept[n]}]") if call == "batch" else exc
            await self.sink.store(events)
            return partial_reply(key, faults, len(events)) if faults else web.Response(
                status=204)

        return await replies.settle(work(), error)


def routes(sink: IngestSink) -> list[web.RouteDef]:
    calls = "|".join(sorted({*TYPES, "batch"}))
    return [web.post(f"/api/public/apps/{{call:(?:{calls})}}", TranthorHandlers(sink).call)]


def examples(key: str) -> list[Example]:
    def message(**extra: str) -> dict[str, str]:
        return {"event": "e", "userId": "u", "messageId": uuid.uuid4().hex, **extra}
    headers = {**JSON, "PublicWriteKey": key}
    return [*(Example("POST", f"/api/public/apps/{call}", headers, orjson.dumps(message()))
              for call in sorted(TYPES)),
            Example("POST", "/api/public/apps/batch", {**JSON, "Authorization": key},
                    orjson.dumps({"batch": [message(type="track")]}))]


DIALECT = Dialect("tranthor", routes, examples)
