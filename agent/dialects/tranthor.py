"""The Tranthor / Dittofeed public app API (seed 002): `/api/public/apps/{call}`.

Single calls (track, identify, page, screen) and `batch` (`{"batch": [...]}`,
each message with its `type`), all answered 204. The key is the
`PublicWriteKey` header, else `authorization`, taken verbatim (the Dittofeed
SDK sends its write key as the whole header) or without a `Bearer ` prefix.
`messageId` is required: it is the idempotency key. Base64 `files` are checked
(type, and name, mimeType and data strings) and kept as sent; a message is limited by the
1 MiB body limit (Fastify's default, which Dittofeed keeps) and by what the upstream
its key is routed to can carry (413 naming that limit). Errors use Fastify's shape,
`{"statusCode", "error", "message"}`. A message of a batch the rules refuse (one
holding what JSON cannot carry, such as a string cut inside an emoji, which the Dittofeed
SDK writes as a lone surrogate: batch_json.py; one too large) is refused alone: the rest is
stored and the reply is 207 `{"statusCode": 207, "error": "Multi-Status", "message",
"errors": [...]}`, each item in the error shape naming its place (the SDK drops any batch
not answered 2xx). A batch whose every message is refused is refused whole, naming the
first (413 if every one is too large, else 400).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from agent.dialects import batch_json, replies
from agent.dialects.auth import OWS
from agent.dialects.base import JSON, Dialect, Example, IngestSink
from agent.dialects.body import TICKET, count_events, parse_body, read_raw
from agent.dialects.exact_json import parse_json
from agent.families import segment as spec
from agent.families.enrich import Enrich
from agent.families.errors import Invalid
from agent.families.event import Event

log = logging.getLogger("outpost.tranthor")
TYPES = frozenset({"track", "identify", "page", "screen"})
# A 401 with no key says where one goes (the sink's own reason, "no key given", does not).
NO_KEY_GIVEN = ("no write key given: send it as the `PublicWriteKey` header, or as the "
                "`authorization` header (the key alone, or `Bearer` and the key)")
MAX_BODY = 1024 * 1024
FILE_TYPE = "Base64Encoded"


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}


def error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    return replies.json_reply(_error_body(status, message), status, retry_after)


def partial_reply(key: str, refused: Mapping[int, Invalid], stored: int) -> web.Response:
    """207: the messages in ``refused`` refused, the ``stored`` others taken."""
    summary, items = replies.stored_in_part(log, key, refused, stored)
    return replies.json_reply({
        **_error_body(207, summary),
        "errors": [_error_body(status, why) for status, why in items]}, 207)


_read_batch = partial(batch_json.read, field="batch")


def _read_single(raw: bytes) -> batch_json.Read:
    return batch_json.Read(parse_json(raw), {})


def request_key(request: web.Request) -> str | None:
    for header in ("PublicWriteKey", "Authorization"):
        value = request.headers.get(header, "").strip(OWS)
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer":   # with no token ("Bearer "), no key: not "Bearer"
            value = token.strip(OWS)
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
          faults: Mapping[int, str] = spec.EMPTY,
          oversize: Callable[[Event], str | None] | None = None) -> spec.Accepted:
    """The events of one request to ``/api/public/apps/{call}``, and a batch's messages
    refused alone (those in ``faults``, those the rules refuse, those ``oversize`` names);
    raises Invalid for a request refused whole."""
    if call == "batch":
        return spec.accept_each(body, key, TYPES, 0, enrich=enrich, need_message_id=True,
                                faults=faults, also=check_files, oversize=oversize)
    if not isinstance(body, dict):
        raise Invalid("body must be an object")
    check_files(body)
    body["type"] = call
    # Too large for its upstream: ``store`` refuses it (413).
    return spec.Accepted([spec.accept(body, key, TYPES, spec.received_now(), enrich=enrich,
                                      need_message_id=True)], {})


class TranthorHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def call(self, request: web.Request) -> web.StreamResponse:
        key = request_key(request)
        why = NO_KEY_GIVEN if key is None else self.sink.key_refusal(key)
        if why is not None:
            return error(401, f"missing or invalid write key: {why}")
        assert key is not None

        call = request.match_info["call"]

        async def work() -> web.Response:
            limits = self.sink.limits   # read once: the commit is held to them too
            events, refused = await parse_body(
                await read_raw(request, MAX_BODY),
                _read_batch if call == "batch" else _read_single,
                lambda read, _size: parse(read.body, call, key, self.sink.enrich,
                                          read.faults, limits.oversize))
            count_events(TICKET.get(), len(events))
            await self.sink.store(events, limits)
            return partial_reply(key, refused, len(events)) if refused else web.Response(
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
