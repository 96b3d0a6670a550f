"""A negative zero keeps its sign. Go's encoding/json writes a float64 -0 as `-0`, and the
upstream APIs read every number as a double, where `-0` is -0.0: orjson reads the literal
as the integer 0, so the agent forwarded `0`, a value silently changed (its sign)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.segment_helpers import basic, call, wait_for

AUTH = {"Authorization": basic("k")}


class RawUpstream:
    """A Segment collector and a Nucleus HTTP server in one, keeping each body as sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _segment(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.json_response({"success": True})

    async def _nucleus(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.bodies.append(raw)
        ids = [ev["id"] for ev in orjson.loads(raw)["data"]]
        return web.json_response({"reportedIds": ids})

    async def start(self) -> RawUpstream:
        app = web.Application()
        app.add_routes([web.post("/v1/batch", self._segment),
                        web.post("/app/{appId}/track", self._nucleus)])
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = int(self.runner.addresses[0][1])
        return self

    def events(self, field: str) -> list[Any]:
        """Every event received, its numbers read as doubles (as the upstream APIs do)."""
        return [ev for raw in self.bodies for ev in json.loads(raw, parse_int=float)[field]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = await RawUpstream().start()
    yield up
    assert up.runner is not None
    await up.runner.cleanup()


def _upstream(up: RawUpstream, protocol: str) -> dict[str, Any]:
    return {"name": "up", "protocol": protocol, "url": f"http://127.0.0.1:{up.port}",
            "flush_interval_s": 0.05, "timeout_s": 2}


TRACK = '{"type": "track", "userId": "u", "event": "e", "properties": {"t": -0, "n": [-0]}}'
HAND_WRITTEN = "{'userId': 'u', 'event': 'e', 'properties': {'t': -0, 'n': [-0], 'ok': True}}"
# Each route's own body, one event with properties (payload) {"t": -0, "n": [-0]}.
ROUTES = [
    ("/v1/track", TRACK, AUTH),
    ("/v1/track", HAND_WRITTEN, AUTH),   # the hand-written reader (relaxed_json)
    ("/v1/batch", '{"batch": [' + TRACK + "]}", AUTH),
    ("/v1/capture", '{"batch": [' + TRACK + "]}", {"X-Write-Key": "k"}),
    ("/api/public/apps/track", TRACK[:-1] + ', "messageId": "m1"}', {"PublicWriteKey": "k"}),
    ("/track", '{"hitId": "h1", "event": {"name": "e", "t": -0, "n": [-0], '
               '"user": {"userId": "u"}}}', AUTH),
    ("/app/k/track", '{"data": [{"type": "event", "name": "e", "id": 1, '
                     '"payload": {"t": -0, "n": [-0]}}]}', {}),
]


def _negative_zero(value: Any) -> bool:
    return isinstance(value, float) and value == 0 and math.copysign(1.0, value) < 0


@pytest.mark.parametrize("protocol", ["segment-http", "nucleus-http"])
@pytest.mark.parametrize("path,body,headers", ROUTES,
                         ids=[f"{path}-{i}" for i, (path, _, _) in enumerate(ROUTES)])
async def test_a_negative_zero_reaches_the_upstream_as_one(
        make_agent: Any, raw_upstream: RawUpstream, protocol: str, path: str, body: str,
        headers: dict[str, str]) -> None:
    agent = await make_agent(upstreams=[_upstream(raw_upstream, protocol)])
    reply = await call(agent.port, path, body, headers=headers)
    assert reply.status < 300, reply.body
    field = "batch" if protocol == "segment-http" else "data"
    await wait_for(lambda: len(raw_upstream.events(field)) == 1)
    [ev] = raw_upstream.events(field)
    props = ev["properties"] if protocol == "segment-http" else ev["payload"]
    assert _negative_zero(props["t"]) and _negative_zero(props["n"][0]), raw_upstream.bodies


@pytest.mark.parametrize("body,inexact", [
    (b'{"a":-0}', True), (b'[-0, 1]', True), (b'{"a": -0\n}', True), (b'{"a":[-0]}', True),
    (b'{"a":-1}', False), (b'{"a":-7,"b":[-9]}', False), (b'{"id":"bench-7-5"}', False),
    (b'{"a":-0.5,"b":-0e1,"c":-0E1,"d":-01}', False),
    (b'{"date":"2026-01-05T10:00:00.000Z"}', False),
    # Every byte that may end a number, the body's end too; a -0 beside a -1.
    (b'-0', True), (b'[-0,1]', True), (b'[-0 ]', True), (b'[-0\t]', True), (b'[-0\r]', True),
    (b'{"a":-0}', True), (b'{"a":-1,"b":-0}', True), (b'{"a":-1,"b":"x-0"}', True),
    (b'-1', False), (b'[-1, -2]\n', False),
])
def test_only_a_minus_zero_or_a_wide_integer_sends_a_body_to_the_exact_reading(
        body: bytes, inexact: bool) -> None:
    """The exact reading is Python, about 100 times orjson's cost: a negative digit (-1, a
    common sentinel) or an id ending in one must not send a body there, as every digit
    read as "0" by the wide-integer check did."""
    from agent.dialects.exact_json import may_be_inexact
    assert may_be_inexact(body) is inexact
