"""The routes browser SDKs post to, as they post: analytics.js 2.0 batching (`/v1/b`,
text/plain `{writeKey, batch, sentAt}`), RudderStack's sendBeacon (`/beacon/v1/batch`,
key only in the query), and `?writeKey=` on every batch and single-call route, held to the same key
check as a header key. The browser interop tests (tests/interop/browser/) run the real
SDKs; these pin each request's shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up, wait_for

ALLOWED = "https://app.example"
TEXT = {"Content-Type": "text/plain;charset=UTF-8"}
BATCH_ROUTES = ("/v1/batch", "/v1/import", "/v1/b", "/beacon/v1/batch")


def track(mid: str, **kw: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "messageId": mid, "anonymousId": "anon-1",
            "properties": {"plan": "pro", "n": 3}, **kw}


async def test_analytics_js_batching_posts_to_v1_b(make_agent: Any,
                                                   fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"allowed_origins": [ALLOWED]})
    body = {"writeKey": "ajsKey", "sentAt": "2026-11-30T10:00:00.000Z",
            "batch": [track("b-1"), {"type": "identify", "messageId": "b-2", "userId": "u-1",
                                     "traits": {"email": "a@b.c"}}]}
    reply = await call(agent.port, "/v1/b", orjson.dumps(body),
                       headers={**TEXT, "Origin": ALLOWED})
    assert reply.status == 200, reply.body
    assert reply.headers["Access-Control-Allow-Origin"] == ALLOWED
    await wait_for(lambda: len(fake_segment.events) == 2)
    assert {r.write_key for r in fake_segment.requests} == {"ajsKey"}
    first, second = fake_segment.events
    assert (first["messageId"], first["event"], first["properties"]) == (
        "b-1", "Clicked", {"plan": "pro", "n": 3})
    assert (second["userId"], second["traits"]) == ("u-1", {"email": "a@b.c"})


async def test_rudderstack_beacon_carries_its_key_in_the_query(make_agent: Any,
                                                               fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"allowed_origins": [ALLOWED]})
    body = {"batch": [track("r-1"), track("r-2", userId="u-2")], "sentAt": "2026-11-30T10:00:00Z"}
    reply = await call(agent.port, "/beacon/v1/batch?writeKey=rudderKey", orjson.dumps(body),
                       headers={**TEXT, "Origin": ALLOWED})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 2)
    assert {r.write_key for r in fake_segment.requests} == {"rudderKey"}
    assert [e["messageId"] for e in fake_segment.events] == ["r-1", "r-2"]


@pytest.mark.parametrize("route", BATCH_ROUTES)
async def test_query_write_key_on_every_batch_route(make_agent: Any, fake_segment: FakeSegment,
                                                    route: str) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"accept_keys": ["goodKey"]})
    body = orjson.dumps({"batch": [track("q-1")]})
    reply = await call(agent.port, f"{route}?writeKey=goodKey", body, headers=TEXT)
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.requests[0].write_key == "goodKey"


@pytest.mark.parametrize("route", BATCH_ROUTES)
async def test_query_write_key_is_checked_as_strictly_as_a_header_key(make_agent: Any,
                                                                      route: str) -> None:
    agent = await make_agent(listen={"accept_keys": ["goodKey"]})
    good_in_body = orjson.dumps({"writeKey": "goodKey", "batch": [track("s-1", writeKey="goodKey")]})
    for headers, query in (({"Authorization": basic("badKey")}, ""), ({}, "?writeKey=badKey")):
        reply = await call(agent.port, route + query, good_in_body, headers={**TEXT, **headers})
        assert reply.status == 401, (route, query, reply.body)
        assert reply.json()["Success"] is False
    assert agent.spool.depth == 0


SINGLE_ROUTES = ("/v1/track", "/v1/t")


@pytest.mark.parametrize("route", SINGLE_ROUTES)
async def test_query_write_key_on_single_call_routes(make_agent: Any, fake_segment: FakeSegment,
                                                     route: str) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             listen={"accept_keys": ["goodKey"]})
    reply = await call(agent.port, f"{route}?writeKey=goodKey", orjson.dumps(track("one-1")),
                       headers=TEXT)
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.requests[0].write_key == "goodKey"


@pytest.mark.parametrize("route", SINGLE_ROUTES)
async def test_query_write_key_on_a_single_call_is_checked(make_agent: Any, route: str) -> None:
    agent = await make_agent(listen={"accept_keys": ["goodKey"]})
    good_in_body = orjson.dumps(track("one-2", writeKey="goodKey"))
    for headers, query in (({"Authorization": basic("badKey")}, "?writeKey=goodKey"),
                           ({"Authorization": basic("goodKey")}, "?writeKey=badKey"),
                           ({}, "?writeKey=badKey")):
        reply = await call(agent.port, route + query, good_in_body, headers={**TEXT, **headers})
        assert reply.status == 401, (route, headers, query, reply.body)
    assert agent.spool.depth == 0


@pytest.mark.parametrize("route", ("/v1/b", "/beacon/v1/batch", "/v1/batch", "/v1/t"))
async def test_preflight_of_every_browser_route(make_agent: Any, route: str) -> None:
    agent = await make_agent(listen={"allowed_origins": [ALLOWED]})
    pre = await call(agent.port, route, method="OPTIONS", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert pre.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "content-type,authorization"
