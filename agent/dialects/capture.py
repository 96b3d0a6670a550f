"""The capture batch API (seed 004): `POST /v1/capture` with `X-Write-Key`.

`{"batch": [...]}` of track, page and identify messages in the Segment spec,
answered 201 `{"status": "success"}`. The seed documents no partial success,
so a batch is taken whole or refused whole (400 naming the first bad
message). A full spool answers 429 with Retry-After, the seed's "retry
later" status. Error bodies mirror the success shape:
`{"status": "error", "message": ...}`.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from agent.dialects import replies
from agent.dialects.base import JSON, Dialect, Example, IngestSink
from agent.dialects.body import parse_body, read_raw
from agent.dialects.exact_json import parse_json
from agent.families import segment as spec

TYPES = frozenset({"track", "page", "identify"})


def error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    return replies.json_reply({"status": "error", "message": message}, status, retry_after)


class CaptureHandlers:
    """Route handlers bound to the shared sink."""

    def __init__(self, sink: IngestSink) -> None:
        self.sink = sink

    async def capture(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("X-Write-Key", "").strip()
        if (why := self.sink.key_refusal(key)) is not None:
            return error(401, f"missing or invalid X-Write-Key: {why}")

        async def work() -> None:
            await self.sink.store(await parse_body(
                await read_raw(request, spec.MAX_BATCH_BYTES), parse_json,
                lambda doc, size: spec.accept_all(doc, key, TYPES, size,
                                                  enrich=self.sink.enrich)))

        return await replies.settle(work(), error, full_status=429) or replies.json_reply(
            {"status": "success"}, 201)


def routes(sink: IngestSink) -> list[web.RouteDef]:
    return [web.post("/v1/capture", CaptureHandlers(sink).capture)]


def examples(key: str) -> list[Example]:
    batch = {"batch": [{"type": "track", "event": "e", "userId": "u"}]}
    return [Example("POST", "/v1/capture", {**JSON, "X-Write-Key": key}, orjson.dumps(batch))]


DIALECT = Dialect("capture", routes, examples)
