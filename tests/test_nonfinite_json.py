"""NaN and Infinity: JSON has no such values, so every route that reads lenient JSON
refuses them with a 400 naming the field, in its API's error shape; nothing of that
message is stored. In a batch, the message holding one is refused alone (a 207 item)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.segment_helpers import basic, call

AUTH = {"Authorization": basic("k")}
# (value as written, how the reply names it)
VALUES = [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
          ("nan", "nan"), ("inf", "inf"), ("1e999", "1e999")]


def _single(value: str, quote: str) -> str:
    q = quote
    return (f"{{{q}type{q}: {q}track{q}, {q}userId{q}: {q}u{q}, {q}event{q}: {q}e{q}, "
            f"{q}messageId{q}: {q}m1{q}, {q}properties{q}: {{{q}price{q}: {value}}}}}")


@pytest.mark.parametrize("value,named", VALUES)
@pytest.mark.parametrize("quote", ['"', "'"])  # strict JSON but for the value; hand-written
@pytest.mark.parametrize("route", ["/v1/track", "/v1/t", "/v1/webhook?writeKey=k"])
async def test_single_routes_refuse_nonfinite(make_agent: Any, route: str, quote: str,
                                              value: str, named: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, route, _single(value, quote), headers=AUTH)
    assert reply.status == 400, reply.body
    body = reply.json()
    assert set(body) == {"Error", "Message", "Details", "code", "message"}
    assert body["Error"] == "Bad Request"
    text = body["Message"] + " " + body["Details"]
    assert "properties.price" in text and named in text, body
    assert agent.spool.depth == 0


@pytest.mark.parametrize("value,named", VALUES)
@pytest.mark.parametrize("route", ["/v1/batch", "/v1/import", "/v1/w?writeKey=k"])
async def test_batch_routes_refuse_the_nonfinite_message_alone(make_agent: Any, route: str,
                                                               value: str, named: str) -> None:
    agent = await make_agent()
    good = "{'type': 'track', 'userId': 'u', 'event': 'e', 'messageId': 'ok'}"
    bad = f"{{'type': 'track', 'userId': 'u', 'event': 'e', 'properties': {{'n': [1, {value}]}}}}"
    reply = await call(agent.port, route, f"{{'batch': [{good}, {bad}]}}", headers=AUTH)
    assert reply.status == 207, reply.body
    body = reply.json()
    assert body["Success"] is False and len(body["Errors"]) == 1
    err = body["Errors"][0]
    assert set(err) == {"Error", "Message", "Details"}
    text = err["Message"] + " " + err["Details"]
    assert "batch[1].properties.n[1]" in text and named in text, body
    assert agent.spool.depth == 1   # the good message, never the bad one


@pytest.mark.parametrize("value,named", VALUES)
async def test_pixel_refuses_nonfinite(make_agent: Any, value: str, named: str) -> None:
    agent = await make_agent()
    data = base64.urlsafe_b64encode(_single(value, "'").replace(
        "'userId'", "'writeKey': 'k', 'userId'").encode()).decode()
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="GET")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/gif"
    problem = reply.headers.get("X-Outpost-Error", "")
    assert "properties.price" in problem and named in problem, problem
    assert agent.spool.depth == 0


async def test_words_that_merely_start_like_nonfinite_are_still_words(make_agent: Any) -> None:
    """The hand-written seed style keeps bare words as strings: `infinite`, `Nancy`."""
    agent = await make_agent()
    body = ("{'userId': 'u', 'event': 'e', 'messageId': 'w1', "
            "'properties': {'a': infinite, 'b': Nancy, 'c': Information}}")
    reply = await call(agent.port, "/v1/track", body, headers=AUTH)
    assert reply.status == 200, reply.body
    assert agent.spool.depth == 1


# (route, headers, body, how the route's reply names it) for the strict-JSON routes
STRICT = [
    ("/v1/capture", {"X-Write-Key": "k"},
     '{"batch":[{"type":"track","event":"e","userId":"u","properties":{"price":NaN}}]}',
     "batch[0].properties.price"),
    ("/api/public/apps/batch", {"authorization": "k"},
     '{"batch":[{"type":"track","event":"e","userId":"u","messageId":"m",'
     '"properties":{"price":Infinity}}]}', "batch[0].properties.price"),
    ("/track", AUTH, '{"event":{"name":"n","price":-Infinity,"user":{"userId":"u"}}}',
     "event.price"),
    ("/app/k/track", {}, '{"data":[{"type":"event","name":"n","payload":{"price":NaN}}]}',
     "data[0].payload.price"),
]


@pytest.mark.parametrize("route,headers,body,named", STRICT, ids=[s[0] for s in STRICT])
async def test_strict_routes_name_the_nonfinite_field(make_agent: Any, route: str,
                                                      headers: dict[str, str], body: str,
                                                      named: str) -> None:
    """Python's json.dumps writes NaN: the 400 says where, as the Segment routes do."""
    agent = await make_agent()
    reply = await call(agent.port, route, body, headers=headers)
    assert reply.status == 400, reply.body
    assert named in reply.body.decode() and "JSON has no NaN" in reply.body.decode(), reply.body
    assert agent.spool.depth == 0


async def test_a_number_past_a_double_is_said_to_be_out_of_range(make_agent: Any) -> None:
    """`1E400` is JSON (a number), only too large for the double every reader here and
    upstream keeps it in: the 400 said it was "not a JSON value (JSON has no NaN or
    Infinity)", which sent its sender looking for a NaN. It says the number is out of
    range, on the strict path, the hand-written one, and for a batch's refused item."""
    agent = await make_agent()
    for value in ("1E400", "-1.5e+400"):
        for quote in ('"', "'"):
            reply = await call(agent.port, "/v1/track", _single(value, quote), headers=AUTH)
            assert reply.status == 400, reply.body
            body = reply.json()
            text = body["Message"] + " " + body["Details"]
            assert "out of range" in text and "properties.price" in text and value in text, body
            assert "NaN" not in text and "not a JSON value" not in text, body
    good = "{'type': 'track', 'userId': 'u', 'event': 'e', 'messageId': 'ok'}"
    bad = "{'type': 'track', 'userId': 'u', 'event': 'e', 'properties': {'n': [1, 1E400]}}"
    reply = await call(agent.port, "/v1/batch", f"{{'batch': [{good}, {bad}]}}", headers=AUTH)
    assert reply.status == 207, reply.body
    err = reply.json()["Errors"][0]
    text = err["Message"] + " " + err["Details"]
    assert "out of range" in text and "batch[1].properties.n[1]" in text, err
    reply = await call(agent.port, "/app/k/track",
                       '{"data":[{"type":"event","name":"n","payload":{"price":1E400}}]}')
    assert reply.status == 400 and b"out of range" in reply.body, reply.body
    assert agent.spool.depth == 1   # the batch's good message alone
