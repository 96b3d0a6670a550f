"""A Nucleus app id whose percent-escapes are no UTF-8 (`/app/%e9t%e9/track`: "été" in
Latin-1) names no key the agent can send on. The router keeps each such escape as its
three characters, so the events were stored under "%e9t%e9", the key of an app whose id
is that text (sent as `%25e9t%25e9`), and forwarded to the upstream under it, as that
app's. Refused, the Nucleus API's 401, as a `?writeKey=` whose escapes are no UTF-8 is
(test_query_key_bytes.py); on every Nucleus path, websocket upgrades included."""

from __future__ import annotations

import base64
import os
from typing import Any

import orjson
import pytest

from tests.test_routes import raw_reply

MESSAGE = orjson.dumps({"data": [{"type": "event", "name": "e", "id": 1, "machineId": "m"}]})
PATHS = ["/app/{}/track", "/{}/track", "/{}", "/{}/"]   # the HTTP route's, then the upgrades'


def request(path: str, upgrade: bool) -> bytes:
    if upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(MESSAGE)}\r\n\r\n").encode() + MESSAGE


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "websocket"])
@pytest.mark.parametrize("app_id", ["%e9t%e9", "ok%C3", "%ED%A0%80"])
async def test_an_app_id_whose_escapes_are_no_utf8_is_refused_not_stored_under_their_text(
        make_agent: Any, app_id: str, upgrade: bool) -> None:
    agent = await make_agent()
    for path in PATHS[1:] if upgrade else PATHS[:1]:
        head, reply = await raw_reply(agent.port, request(path.format(app_id), upgrade))
        assert head.startswith(b"HTTP/1.1 401 "), head + reply
        error = orjson.loads(reply)["error"]
        assert "UTF-8" in error and "percent" in error, error
    assert agent.spool.depth == 0 and not agent.spool.streams, agent.spool.streams


@pytest.mark.parametrize("path", PATHS)
async def test_an_app_id_in_utf8_or_holding_an_escaped_percent_is_taken_as_spelled(
        make_agent: Any, path: str) -> None:
    agent = await make_agent()
    upgrade = path != PATHS[0]
    for app_id in ("%C3%A9t%C3%A9", "%25e9t%25e9"):
        head, reply = await raw_reply(agent.port, request(path.format(app_id), upgrade))
        assert head.startswith(b"HTTP/1.1 101 " if upgrade else b"HTTP/1.1 200 "), head + reply
    if not upgrade:
        assert sorted(agent.spool.streams) == ["%e9t%e9", "été"]
