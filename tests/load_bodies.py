"""Maximum-size request bodies for every ingest route, and how each API says "busy".

Shared by the memory and event-loop stall tests. Every body carries fresh ids
(``seed``) so that nothing is a resend, and is as large as its route allows.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from agent.dialects import nucleus, segmentstream, tranthor
from agent.families import segment as segment_spec

KEY = "k"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}


def nucleus_body(seed: int, limit: int = nucleus.MAX_MESSAGE) -> bytes:
    """As many small Nucleus events as fit in ``limit`` bytes (about 38,000 in 4 MiB)."""
    head = {"type": "event", "name": "click", "sessionId": 7, "machineId": "m1",
            "date": "2026-11-30T08:00:00.000Z"}
    first = (seed + 1) * 10_000_000  # every id the same width: the size is exact
    one = len(orjson.dumps({**head, "id": first})) + 1
    n = (limit - 16) // one
    return orjson.dumps({"data": [{**head, "id": first + i} for i in range(n)]})


def segment_batch(seed: int, limit: int = segment_spec.MAX_BATCH_BYTES,
                  tranthor_ids: bool = False) -> bytes:
    """A batch of MAX_BATCH_EVENTS track messages padded to just under ``limit`` bytes."""
    n = segment_spec.MAX_BATCH_EVENTS

    def msg(i: int, pad: int) -> dict[str, Any]:
        return {"type": "track", "event": "e", "userId": "u", "messageId": f"{seed}-{i}",
                "properties": {"p": "x" * pad}}

    bare = len(orjson.dumps({"batch": [msg(i, 0) for i in range(n)]}))
    pad = (limit - 64 - bare) // n
    return orjson.dumps({"batch": [msg(i, pad) for i in range(n)]})


def lenient_batch(seed: int, limit: int = segment_spec.MAX_BATCH_BYTES) -> bytes:
    """A hand-written (single-quoted) batch dense in small values: the lenient parser's
    worst case, since strict JSON fails on the first quote."""
    msgs = []
    size = 20
    i = 0
    while True:
        props = ", ".join(f"'k{j}': {j}" for j in range(20))
        text = (f"{{'type': 'track', 'event': 'e', 'userId': 'u', 'messageId': '{seed}-{i}', "
                f"'properties': {{{props}}}}}")
        if size + len(text) + 2 > limit or i >= segment_spec.MAX_BATCH_EVENTS:
            break
        msgs.append(text)
        size += len(text) + 2
        i += 1
    return ("{'batch': [" + ", ".join(msgs) + "]}").encode()


def single(seed: int, limit: int = segment_spec.MAX_EVENT_BYTES) -> bytes:
    ev = {"type": "track", "event": "e", "userId": "u", "messageId": f"s{seed}",
          "properties": {"p": ""}}
    ev["properties"] = {"p": "x" * (limit - 64 - len(orjson.dumps(ev)))}
    return orjson.dumps(ev)


def stream_hit(seed: int, limit: int = segmentstream.MAX_BODY) -> bytes:
    hit = {"hitId": f"h{seed}", "event": {"name": "n", "user": {"userId": "u"}, "pad": ""}}
    hit["event"]["pad"] = "x" * (limit - 64 - len(orjson.dumps(hit)))  # type: ignore[index]
    return orjson.dumps(hit)


@dataclass(frozen=True)
class Route:
    """One ingest route: its maximum-size body and how the API answers success and busy."""

    name: str
    path: str
    headers: dict[str, str]
    body: Callable[[int], bytes]
    ok: int
    busy: int              # the API's "retry later" status
    busy_shape: Callable[[Any], bool]


def _segment_error(b: Any) -> bool:
    return set(b) == {"Error", "Message", "Details"} and b["Error"] == "Service Unavailable"


def _legacy_code(b: Any) -> bool:
    """The `code` and `message` legacy Python clients read from any reply but a 200."""
    return b.get("code") == "service_unavailable" and isinstance(b.get("message"), str)


def _segment_single(b: Any) -> bool:
    return (_segment_error({k: b[k] for k in b if k not in ("code", "message")})
            and _legacy_code(b))


def _segment_batch(b: Any) -> bool:
    return (b["Success"] is False and all(_segment_error(e) for e in b["Errors"])
            and _legacy_code(b))


def _error_string(b: Any) -> bool:
    return set(b) == {"error"} and isinstance(b["error"], str)


ROUTES = [
    Route("nucleus", f"/app/{KEY}/track", {}, nucleus_body, 200, 503, _error_string),
    Route("batch", "/v1/batch", BASIC, segment_batch, 200, 503, _segment_batch),
    Route("import", "/v1/import", BASIC, segment_batch, 200, 503, _segment_batch),
    Route("webhook", f"/v1/webhook?writeKey={KEY}", {}, segment_batch, 200, 503,
          _segment_single),
    Route("track", "/v1/track", BASIC, single, 200, 503, _segment_single),
    Route("capture", "/v1/capture", {"X-Write-Key": KEY}, segment_batch, 201, 429,
          lambda b: b == {"status": "error", "message": b.get("message")}),
    Route("tranthor", "/api/public/apps/batch", {"authorization": KEY},
          lambda seed: segment_batch(seed, tranthor.MAX_BODY), 204, 503,
          lambda b: b["statusCode"] == 503 and b["error"] == "Service Unavailable"),
    Route("segmentstream", "/track", BASIC, stream_hit, 204, 503, _error_string),
]
