"""A field the rules refuse, nested past what orjson writes (255 levels), is refused
with the route's 4xx like any other wrong value, never a 500.

Naming a wrong date (`timestamp`, `originalTimestamp`, `sentAt`) wrote the value into
the error with orjson, and writing a value nested deeper than 255 levels raises; a wrong
`type` was written with repr(), which raises past ~1000 levels. Either took the request
to a 500 with a traceback, on every Segment-family route: a batch holding one such
message was refused whole with a status SDKs retry, the good messages with it, and the
pixel, which always answers its GIF, did not.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from agent.dialects.segment import GIF
from tests.segment_helpers import basic, call

AUTH = {"Authorization": basic("deep-key")}
DEEP = "[" * 300 + "]" * 300        # read by orjson (1024 levels), not written (255)
DEEPER = "[" * 1000 + "]" * 1000    # past repr()'s recursion limit too


def message(mid: str, extra: str = "", kind: str = '"track"') -> str:
    return ('{"type":' + kind + ',"userId":"u","event":"e","messageId":"' + mid + '"'
            + extra + "}")


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt"])
async def test_a_deeply_nested_date_is_a_400_on_every_single_call_route(
        make_agent: Any, field: str) -> None:
    agent = await make_agent()
    bad = message("d", f',"{field}":{DEEP}')
    calls = [("/v1/track", bad, AUTH),
             ("/api/public/apps/track", bad, {"PublicWriteKey": "deep-key"})]
    if field == "sentAt":   # SegmentStream's one date field
        calls.append(("/track", '{"hitId":"h","event":{"name":"n","user":{"userId":"u"}},'
                      f'"sentAt":{DEEP}}}', AUTH))
    for path, body, headers in calls:
        reply = await call(agent.port, path, body, headers=headers)
        assert reply.status == 400, (path, reply.status, reply.body)
        assert f"`{field}` must be an ISO 8601 date string" in reply.body.decode(), reply.body
    assert agent.spool.depth == 0


@pytest.mark.parametrize("path,headers", [("/v1/batch", AUTH),
                                          ("/v1/capture", {"X-Write-Key": "deep-key"})])
@pytest.mark.parametrize("extra,kind", [(f',"timestamp":{DEEP}', '"track"'), ("", DEEPER)])
async def test_a_batch_message_with_a_deeply_nested_wrong_field_is_refused_alone(
        make_agent: Any, path: str, headers: dict[str, str], extra: str, kind: str) -> None:
    agent = await make_agent()
    bad = message("bad", extra, kind)
    body = '{"batch":[' + message("good") + "," + bad + "]}"
    reply = await call(agent.port, path, body, headers=headers)
    assert reply.status == 207, reply.body
    assert "batch[1] messageId=bad" in reply.body.decode(), reply.body
    assert agent.spool.depth == 1


async def test_a_deeply_nested_batch_level_date_refuses_the_batch_with_a_400(
        make_agent: Any) -> None:
    agent = await make_agent()
    body = '{"batch":[' + message("good") + f'],"sentAt":{DEEP}}}'
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 400, reply.body
    assert "`sentAt` must be an ISO 8601 date string" in reply.body.decode(), reply.body


async def test_the_pixel_answers_its_gif_for_a_deeply_nested_date(make_agent: Any) -> None:
    agent = await make_agent()
    data = base64.urlsafe_b64encode(
        message("p", f',"writeKey":"deep-key","timestamp":{DEEP}').encode()).decode()
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="GET")
    assert reply.status == 200 and reply.body == GIF, (reply.status, reply.body)
    assert "`timestamp` must be an ISO 8601 date string" in reply.headers["X-Outpost-Error"]
    assert agent.spool.depth == 0
