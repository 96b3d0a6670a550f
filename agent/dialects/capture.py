"""The capture batch API (seed 004): `POST /v1/capture` with `X-Write-Key`.

`{"batch": [...]}` of track, page and identify messages in the Segment spec,
answered 201 `{"status": "success"}`. The seed documents no partial success, but
SDKs drop a batch refused whole, and the good messages with it: a message the rules
refuse (one holding what JSON cannot carry, such as Python's NaN or a string cut inside an
emoji: batch_json.py; one too large) is refused alone, the rest is stored and the reply is
207 `{"status": "partial", "message", "errors": [{"status": "error", "message"}]}`, each
message naming its place. A batch whose every message is refused is refused whole, naming
the first (413 if every one is too large, else 400). A full spool answers 429 with
Retry-After, the seed's "retry later" status. Error bodies mirror the success shape:
`{"status": "error", "message": ...}`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import orjson
from aiohttp import web

from agent.dialects import batch_json, replies
from agent.dialects.auth import OWS
from agent.dialects.base import JSON, Dialect, Example, IngestSink
from agent.dialects.body import TICKET, count_events, parse_body, read_raw
from agent.families import segment as spec
from agent.families.errors import Invalid

log = logging.getLogger("outpost.capture")
TYPES = frozenset({"track", "page", "identify"})
_read = partial(batch_json.read, field="batch")


def error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    return replies.json_reply({"status": "error", "message": message}, status, retry_after)


def partial_reply(key: str, refused: Mapping[int, Invalid], stored: int) -> web.Response:
    """207: the messages in ``refused`` refused, the ``stored`` others taken."""
    summary, items = replies.stored_in_part(log, key, refused, stored)
    return replies.json_reply({
        "status": "partial", "message": summary,
        "errors": [{"status": "error", "message": why} for _, why in items]}, 207)


class CaptureHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def capture(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("X-Write-Key", "").strip(OWS)
        if (why := self.sink.key_refusal(key)) is not None:
            return error(401, f"missing or invalid X-Write-Key: {why}")

        async def work() -> web.Response:
            limits = self.sink.limits   # read once: the commit is held to them too
            events, refused = await parse_body(
                await read_raw(request, spec.MAX_BATCH_BYTES), _read,
                lambda read, size: spec.accept_each(read.body, key, TYPES, size,
                                                    enrich=self.sink.enrich,
                                                    faults=read.faults,
                                                    oversize=limits.oversize))
            count_events(TICKET.get(), len(events))
            await self.sink.store(events, limits)
            if refused:
                return partial_reply(key, refused, len(events))
            return replies.json_reply({"status": "success"}, 201)

        return await replies.settle(work(), error, full_status=429)


def routes(sink: IngestSink) -> list[web.RouteDef]:
    return [web.post("/v1/capture", CaptureHandlers(sink).capture)]


def examples(key: str) -> list[Example]:
    batch = {"batch": [{"type": "track", "event": "e", "userId": "u"}]}
    return [Example("POST", "/v1/capture", {**JSON, "X-Write-Key": key}, orjson.dumps(batch))]


DIALECT = Dialect("capture", routes, examples)
