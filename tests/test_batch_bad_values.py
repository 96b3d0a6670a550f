"""One message holding a value JSON cannot carry refuses itself alone, on every batch route.

Python's json.dumps writes NaN and Infinity, and integers a double would round;
JavaScript writes a lone surrogate ("\\ud83d") for a string cut inside an emoji. A batch
holding one such value was refused whole (400), and SDKs drop a refused batch: one bad
value lost every message sent with it (0 of 10, 0 of 50). The message holding it is now a
refused item of a 207 naming the field, never stored and never changed (NaN never becomes
null); the others are stored as sent. A single call keeps its 400, naming the field. Each
refused item is counted and logged, as a Nucleus event left unacknowledged is.
"""

from __future__ import annotations

import base64
import gzip
from typing import Any

import orjson
import pytest

from tests.segment_helpers import basic, call

KEY = "batch-secret-key"
AUTH = {"Authorization": basic(KEY)}
TEXT = {"Content-Type": "text/plain;charset=UTF-8"}
# (what, `properties` of the bad message as a client writes it, how its error names it)
BAD = [
    ("NaN", '{"x":NaN}', "NaN"),
    ("-Infinity", '{"x":-Infinity}', "-Infinity"),
    ("lone surrogate", '{"x":"Sale \\ud83d"}', "surrogate"),
    ("wide integer", '{"x":18446744073709551617}', "64 bits"),
]


def message(i: int, properties: str = "") -> str:
    props = properties or f'{{"i":{i},"r":0.5}}'
    return (f'{{"type":"track","event":"e","userId":"u","messageId":"m{i}",'
            f'"properties":{props}}}')


def batch(properties: str, **envelope: str) -> str:
    more = "".join(f',"{k}":{v}' for k, v in envelope.items())
    return f'{{"batch":[{message(0)},{message(1, properties)},{message(2)}]{more}}}'


async def stored(agent: Any, key: str = KEY) -> list[dict[str, Any]]:
    if key not in agent.spool.streams:
        return []
    rows = await agent.spool.fetch(agent.spool.streams[key].id, 0, 100)
    return [orjson.loads(bytes(r.body)) for r in rows]


async def post(port: int, route: str, body: str) -> Any:
    """``body`` as each Segment batch route's real clients send it."""
    if route == "/v1/batch":   # an SDK, plain: the server's express lane
        return await call(port, route, body, headers=AUTH)
    if route == "/v1/batch gzip":   # an SDK, gzipped: aiohttp's lane
        return await call(port, "/v1/batch", gzip.compress(body.encode()),
                          headers={**AUTH, "Content-Encoding": "gzip"})
    if route == "/v1/b":   # analytics.js 2.0 batching: the key in the body, text/plain
        return await call(port, route, body[:-1] + f',"writeKey":"{KEY}"}}', headers=TEXT)
    return await call(port, f"{route}?writeKey={KEY}", body, headers=TEXT)


ROUTES = ["/v1/batch", "/v1/batch gzip", "/v1/import", "/v1/b", "/beacon/v1/batch", "/v1/w"]


@pytest.mark.parametrize("what,props,named", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("route", ROUTES)
async def test_the_bad_message_alone_is_a_207_item_and_the_rest_is_stored(
        make_agent: Any, route: str, what: str, props: str, named: str) -> None:
    agent = await make_agent()
    reply = await post(agent.port, route, batch(props))
    assert reply.status == 207, reply.body
    body = reply.json()
    assert body["Success"] is False
    [item] = body["Errors"]
    assert item["Error"] == "Bad Request" and item["Details"] == "batch[1] messageId=m1", item
    assert "batch[1].properties.x" in item["Message"] and named in item["Message"], item
    events = await stored(agent)
    assert [e["messageId"] for e in events] == ["m0", "m2"]
    assert [e["properties"] for e in events] == [{"i": 0, "r": 0.5}, {"i": 2, "r": 0.5}]


async def test_a_hand_written_batch_refuses_its_nan_message_alone(make_agent: Any) -> None:
    """Python's str() of a dict, as an app may post it: `nan`, 'quotes', True."""
    agent = await make_agent()
    body = ("{'batch': [{'type': 'track', 'event': 'e', 'userId': 'u', 'messageId': 'm0', "
            "'properties': {'ok': True}}, {'type': 'track', 'event': 'e', 'userId': 'u', "
            "'messageId': 'm1', 'properties': {'x': nan}}]}")
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 207, reply.body
    [item] = reply.json()["Errors"]
    assert "batch[1].properties.x" in item["Message"] and "nan" in item["Message"], item
    assert [e["messageId"] for e in await stored(agent)] == ["m0"]


async def test_a_bad_value_outside_the_messages_refuses_the_batch(make_agent: Any) -> None:
    """A batch-level `context` is merged into every message: none could be stored as sent."""
    agent = await make_agent()
    reply = await call(agent.port, "/v1/batch", batch('{"ok":1}', context='{"x":NaN}'),
                       headers=AUTH)
    assert reply.status == 400, reply.body
    [item] = reply.json()["Errors"]
    assert "context.x" in item["Message"] + item["Details"] and "NaN" in item["Details"], item
    assert agent.spool.depth == 0


async def test_a_batch_of_bad_messages_only_is_a_400_naming_each(make_agent: Any) -> None:
    agent = await make_agent()
    body = f'{{"batch":[{message(0, BAD[0][1])},{message(1, BAD[2][1])}]}}'
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 400, reply.body
    errors = reply.json()["Errors"]
    assert [e["Details"] for e in errors] == ["batch[0] messageId=m0", "batch[1] messageId=m1"]
    assert agent.spool.depth == 0


async def test_a_lone_surrogate_in_a_message_id_or_a_member_name_is_named_safely(
        make_agent: Any) -> None:
    """The reply itself must be JSON: the refused text is written escaped, never a 500."""
    agent = await make_agent()
    bad_id = message(1).replace('"m1"', '"m1\\ud83d"')
    bad_name = message(2, '{"\\ud83d":1}')
    body = f'{{"batch":[{message(0)},{bad_id},{bad_name}]}}'
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 207, reply.body
    errors = reply.json()["Errors"]
    assert [e["Details"][:8] for e in errors] == ["batch[1]", "batch[2]"], errors
    assert "batch[1].messageId" in errors[0]["Message"], errors
    assert "batch[2].properties" in errors[1]["Message"], errors
    assert [e["messageId"] for e in await stored(agent)] == ["m0"]


@pytest.mark.parametrize("what,props,named", BAD, ids=[b[0] for b in BAD])
async def test_a_single_call_keeps_its_400_naming_the_field(
        make_agent: Any, what: str, props: str, named: str) -> None:
    """Not "line 1 column 5 (char 4)": orjson's words for a lone surrogate pointed inside
    the string, not at the field."""
    agent = await make_agent()
    reply = await call(agent.port, "/v1/track", message(1, props), headers=AUTH)
    assert reply.status == 400, reply.body
    err = reply.json()
    text = err["Message"] + " " + err["Details"]
    assert "properties.x" in text and named in text and "line 1" not in text, err
    assert agent.spool.depth == 0


async def test_a_pixel_names_a_lone_surrogate_field(make_agent: Any) -> None:
    agent = await make_agent()
    data = message(1, BAD[2][1]).replace('"userId"', f'"writeKey":"{KEY}","userId"')
    reply = await call(agent.port, "/v1/pixel/track?data="
                       + base64.urlsafe_b64encode(data.encode()).decode(), method="GET")
    assert reply.status == 200
    assert "properties.x" in reply.headers.get("X-Outpost-Error", ""), reply.headers


# -- the other Segment-family batch APIs, in their own shapes ------------------

@pytest.mark.parametrize("what,props,named", BAD, ids=[b[0] for b in BAD])
async def test_a_capture_batch_refuses_the_bad_message_alone(
        make_agent: Any, what: str, props: str, named: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/capture", batch(props), headers={"X-Write-Key": KEY})
    assert reply.status == 207, reply.body
    body = reply.json()
    assert body["status"] == "partial", body
    [item] = body["errors"]
    assert item["status"] == "error", item
    assert "batch[1].properties.x" in item["message"] and named in item["message"], item
    assert [e["messageId"] for e in await stored(agent)] == ["m0", "m2"]


@pytest.mark.parametrize("what,props,named", BAD, ids=[b[0] for b in BAD])
async def test_a_tranthor_batch_refuses_the_bad_message_alone(
        make_agent: Any, what: str, props: str, named: str) -> None:
    """The Dittofeed SDK drops any batch not answered 2xx: a sliced emoji lost them all."""
    agent = await make_agent()
    reply = await call(agent.port, "/api/public/apps/batch", batch(props),
                       headers={"authorization": KEY})
    assert reply.status == 207, reply.body
    body = reply.json()
    assert body["statusCode"] == 207 and body["error"] == "Multi-Status", body
    [item] = body["errors"]
    assert item["statusCode"] == 400 and item["error"] == "Bad Request", item
    assert "batch[1].properties.x" in item["message"] and named in item["message"], item
    assert [e["messageId"] for e in await stored(agent)] == ["m0", "m2"]


@pytest.mark.parametrize("route,headers", [
    ("/v1/capture", {"X-Write-Key": KEY}), ("/api/public/apps/batch", {"authorization": KEY})])
async def test_the_other_apis_refuse_a_batch_of_bad_messages_only_whole(
        make_agent: Any, route: str, headers: dict[str, str]) -> None:
    agent = await make_agent()
    reply = await call(agent.port, route, f'{{"batch":[{message(0, BAD[0][1])}]}}',
                       headers=headers)
    assert reply.status == 400, reply.body
    assert "batch[0].properties.x" in reply.body.decode()
    assert agent.spool.depth == 0


# -- refused items are counted and logged (a 2xx reply shows nothing to an SDK) -----

@pytest.mark.parametrize("route,headers,api", [
    ("/v1/batch", AUTH, "segment"), ("/v1/capture", {"X-Write-Key": KEY}, "capture"),
    ("/api/public/apps/batch", {"authorization": KEY}, "tranthor")])
async def test_each_refused_item_is_counted_and_logged_without_the_key(
        make_agent: Any, caplog: Any, route: str, headers: dict[str, str], api: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, route, batch(BAD[0][1]), headers=headers)
    assert reply.status == 207, reply.body
    assert agent.metrics.refused == {(api, 400): 1}
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(logged) == 1 and "batch[1].properties.x" in logged[0], logged
    assert KEY not in caplog.text


async def test_segment_items_are_counted_by_their_own_status(make_agent: Any,
                                                             caplog: Any) -> None:
    """The audit's repros: a 120-character messageId (analytics-node) and a 40 KB event
    (rudder-sdk-node sends it anyway) vanished: the SDKs read the 207 as success."""
    agent = await make_agent()
    body = {"batch": [
        {"type": "track", "event": "e", "userId": "u", "messageId": "ok"},
        {"type": "track", "event": "e", "userId": "u", "messageId": "m" * 120},
        {"type": "track", "event": "e", "userId": "u", "messageId": "big",
         "properties": {"blob": "x" * 40_000}},
    ]}
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 207, reply.body
    assert agent.metrics.refused == {("segment", 400): 1, ("segment", 413): 1}
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert logged and "messageId" in logged[0], logged
