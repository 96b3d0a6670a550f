"""Every Segment-route error body carries `code` and `message` beside the seed's fields.

analytics-python 1.x and rudder-sdk-python read `payload['code']` and
`payload['message']` from any reply other than 200: without them the client raised a
KeyError, took it for a network error and resent a refused batch for ~17 minutes
(tests/interop/test_segment_python_legacy.py drives the real client). The seed's keys
stay as they are.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.segment_helpers import basic, call

AUTH = {"Authorization": basic("k")}
GOOD = {"type": "track", "event": "e", "userId": "u"}


@pytest.mark.parametrize("path,body,headers,status,code", [
    ("/v1/track", {"userId": "u"}, AUTH, 400, "bad_request"),
    ("/v1/track", b'{"userId": ', AUTH, 400, "bad_request"),
    ("/v1/track", {**GOOD, "p": "x" * 40_000}, AUTH, 413, "request_entity_too_large"),
    ("/v1/track", GOOD, {"Authorization": basic("refused")}, 401, "unauthorized"),
    ("/v1/webhook?writeKey=k", {"userId": "u"}, {}, 400, "bad_request"),
])
async def test_single_call_errors(make_agent: Any, path: str, body: Any,
                                  headers: dict[str, str], status: int, code: str) -> None:
    agent = await make_agent(listen={"accept_keys": ["k"]})
    reply = await call(agent.port, path, body, headers=headers)
    assert reply.status == status, reply.body
    err = reply.json()
    assert set(err) == {"Error", "Message", "Details", "code", "message"}, err
    assert err["code"] == code
    assert err["Message"] in err["message"] and err["Details"] in err["message"], err


@pytest.mark.parametrize("body,headers,status,code", [
    ({"batch": [{"type": "track", "userId": "u"}]}, AUTH, 400, "bad_request"),
    (b'{"batch": [', AUTH, 400, "bad_request"),
    ({"batch": [GOOD] * 3000}, AUTH, 413, "request_entity_too_large"),
    ({"batch": [GOOD]}, {"Authorization": basic("refused")}, 401, "unauthorized"),
    ({"batch": [GOOD, {"type": "track", "userId": "u"}]}, AUTH, 207, "multi_status"),
])
async def test_batch_errors(make_agent: Any, body: Any, headers: dict[str, str], status: int,
                            code: str) -> None:
    agent = await make_agent(listen={"accept_keys": ["k"]})
    reply = await call(agent.port, "/v1/batch", body, headers=headers)
    assert reply.status == status, reply.body
    err = reply.json()
    assert set(err) == {"Success", "Errors", "code", "message"}, err
    assert err["Success"] is False and err["code"] == code
    first = err["Errors"][0]
    assert set(first) == {"Error", "Message", "Details"}   # the items keep the seed's shape
    assert first["Message"] in err["message"], err


@pytest.mark.parametrize("library,status", [
    ("analytics-python", 200),          # analytics-python 1.x; rudder-sdk-python 2.x
    ("rudder-analytics-python", 200),   # rudder-sdk-python 1.x
    ("analytics-node", 207), (None, 207)])
async def test_a_batch_stored_in_part_is_200_for_the_python_clients(
        make_agent: Any, library: str | None, status: int) -> None:
    """They count only an exact 200 as success, and resent a 207 for ~17 minutes; the
    body is the 207's either way."""
    agent = await make_agent()
    context = {"library": {"name": library, "version": "1.4.post1"}} if library else {}
    body = {"batch": [{**GOOD, "context": context, "messageId": "ok"},
                      {"type": "track", "userId": "u", "context": context}]}
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == status, reply.body
    err = reply.json()
    assert err["Success"] is False and err["code"] == "multi_status", err
    assert [e["Details"] for e in err["Errors"]] == ["batch[1]"]
    assert agent.spool.depth == 1
    assert agent.metrics.refused == {("segment", 400): 1}


@pytest.mark.parametrize("name", ["analytics-php",           # segmentio/analytics-php
                                  "rudder-analytics-php"])   # rudder-php-sdk, its fork
async def test_a_batch_stored_in_part_is_200_for_analytics_php(make_agent: Any,
                                                                name: str) -> None:
    """segmentio/analytics-php posts a batch again at once, with no pause, after any reply
    that is not 200 and neither 429, 5xx nor another 4xx (its LibCurl consumer, the default,
    and its Socket consumer alike): answered 207, the app's PHP process reposted the same
    batch without end. RudderStack's PHP SDK is a fork of it, with the same loop. The batch
    as their LibCurl consumer sends it (QueueConsumer::payload, Client::message); the body
    is the 207's."""
    agent = await make_agent()
    library = {"name": name, "version": "3.8.1", "consumer": "LibCurl"}
    sent = "2026-01-15T10:20:30+00:00"   # PHP's date('c')

    def message(**fields: Any) -> dict[str, Any]:
        return {"type": "track", "properties": {}, "context": {"library": library},
                "timestamp": sent, "messageId": "6f1c2c1e-4f0a-4b52-9a57-0d5d0c6f8e2a",
                **fields}

    body = {"batch": [message(userId="u", event="Signed Up"),
                      message(userId="u", messageId="7a2d3d2f-5a1b-4c63-8b68-1e6e1d7a9f3b")],
            "sentAt": sent}
    reply = await call(agent.port, "/v1/batch", body,
                       headers={**AUTH, "User-Agent": f"{name}/3.8.1"})
    assert reply.status == 200, reply.body
    err = reply.json()
    assert err["Success"] is False and err["code"] == "multi_status", err
    assert [e["Details"] for e in err["Errors"]] == [
        "batch[1] messageId=7a2d3d2f-5a1b-4c63-8b68-1e6e1d7a9f3b"]
    assert agent.spool.depth == 1
