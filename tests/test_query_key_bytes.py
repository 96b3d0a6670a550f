"""A `?writeKey=` whose percent-escapes are no UTF-8 (`%e9t%e9`: "été" in Latin-1) names no
key the agent can send on. The query parser puts U+FFFD in place of each such byte, and the
events were stored and forwarded under "\\ufffdt\\ufffd", a key the app never sent (and the
same for `%e8t%e8`: two apps' keys made one). Refused, 401 in the route's shape, as an
Authorization header whose credentials are not UTF-8 is."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from tests.test_routes import raw_reply

EVENT = {"type": "track", "event": "e", "userId": "u", "messageId": "m-1"}
PIXEL = base64.urlsafe_b64encode(orjson.dumps(EVENT)).decode()
ROUTES = [  # (method, path with the key's query, body)
    ("POST", "/v1/track?writeKey={}", orjson.dumps(EVENT)),
    ("POST", "/v1/batch?writeKey={}", orjson.dumps({"batch": [EVENT]})),
    ("POST", "/beacon/v1/batch?writeKey={}", orjson.dumps({"batch": [EVENT]})),
    ("POST", "/v1/webhook?writeKey={}", orjson.dumps(EVENT)),
    ("GET", "/v1/pixel/track?data=" + PIXEL + "&writeKey={}", b""),
]


def request(method: str, path: str, body: bytes) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


@pytest.mark.parametrize("method,path,body", ROUTES,
                         ids=[path.split("?")[0] for _, path, _ in ROUTES])
async def test_a_query_key_that_is_no_utf8_is_refused_not_stored_under_another(
        make_agent: Any, method: str, path: str, body: bytes) -> None:
    agent = await make_agent()
    head, reply = await raw_reply(agent.port, request(method, path.format("%e9t%e9"), body))
    text = (head + reply).decode("utf-8", "replace")
    if method == "GET":   # the pixel answers 200 and its GIF whatever: the reason in a header
        assert head.startswith(b"HTTP/1.1 200 "), text
        assert "X-Outpost-Error: Invalid or missing writekey" in text, text
    else:
        assert head.startswith(b"HTTP/1.1 401 "), text
    assert "writeKey" in text and "UTF-8" in text, text
    assert agent.spool.depth == 0 and not agent.spool.streams, agent.spool.streams
    # The same key in UTF-8 is taken, as the app spelled it.
    head, reply = await raw_reply(agent.port, request(method, path.format("%C3%A9t%C3%A9"),
                                                      body))
    assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 201 ")), head + reply
    assert b"X-Outpost-Error" not in head, head
    assert list(agent.spool.streams) == ["été"]
