"""`Origin: null` (a `file://` page, an Electron renderer showing one, a sandboxed iframe)
is refused like any Origin not listed, and listing `"null"` in listen.allowed_origins lets
it post, open the Nucleus websocket and read what an allowed Origin may read
(docs/security.md, "Pages with Origin: null"). An Origin that is no URL at all is refused
the same way."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.segment_helpers import basic, call

TRACK = {"userId": "u", "event": "Clicked"}
NULL = {"Origin": "null", "Authorization": basic("k")}


async def ws_status(port: int) -> int:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(f"http://127.0.0.1:{port}/app/k/track", origin="null") as ws:
                await ws.send_str('{"data":[{"type":"event","name":"e","id":1}]}')
                assert await ws.receive_json(timeout=10) == {"reportedIds": [1]}
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


@pytest.mark.parametrize("listed", [False, True])
async def test_origin_null_is_served_only_when_listed(make_agent: Any, listed: bool) -> None:
    agent = await make_agent(listen={"allowed_origins": ["null"] if listed else []})
    reply = await call(agent.port, "/v1/track", TRACK, headers=NULL)
    status = await call(agent.port, "/status", method="GET", headers={"Origin": "null"})
    if not listed:
        assert reply.status == 403 and b"not in listen.allowed_origins" in reply.body
        assert status.status == 403 and await ws_status(agent.port) == 403
        assert agent.spool.depth == 0
        return
    assert reply.status == 200, reply.body
    assert reply.headers["Access-Control-Allow-Origin"] == "null"
    assert status.status == 200 and status.headers["Access-Control-Allow-Origin"] == "null"
    assert await ws_status(agent.port) == 101


async def test_a_star_lets_every_origin_post_and_read_but_never_act(make_agent: Any) -> None:
    """`"*"` in listen.allowed_origins allows every Origin, `null` included, as if each were
    listed (docs/security.md, "Every origin: `*`"): it may post, open the websocket and read
    /status, but the endpoints that make the agent act stay the agent's own page's."""
    agent = await make_agent(listen={"allowed_origins": ["*"]})
    for origin in ("https://any.example", "null"):
        headers = {"Origin": origin, "Authorization": basic("k")}
        reply = await call(agent.port, "/v1/track", TRACK, headers=headers)
        assert reply.status == 200, reply.body
        assert reply.headers["Access-Control-Allow-Origin"] == origin
        status = await call(agent.port, "/status", method="GET", headers={"Origin": origin})
        assert status.status == 200
        dead = await call(agent.port, "/dead", method="GET", headers={"Origin": origin})
        assert dead.status == 403, dead.body
    assert await ws_status(agent.port) == 101
    assert agent.spool.depth == 3


# An Origin no browser sends, that urllib cannot split (an IPv6 literal left open).
MALFORMED = "http://[::1"
ACTING = [("GET", "/dead"), ("GET", "/tail"), ("POST", "/flush")]


@pytest.mark.parametrize("allowed", [["https://app.example"], ["*"]])
async def test_a_malformed_origin_is_refused_not_a_500(make_agent: Any,
                                                       allowed: list[str]) -> None:
    """A local program can send any Origin. One that is no URL is no page's, the agent's
    own least of all: refused as any Origin not listed (with `"*"`, the endpoints that make
    the agent act still refuse it), never a 500 with a traceback in the log."""
    agent = await make_agent(listen={"allowed_origins": allowed})
    headers = {"Origin": MALFORMED, "Authorization": basic("k")}
    for method, path in ACTING:
        reply = await call(agent.port, path, method=method, headers=headers)
        assert reply.status == 403, (path, reply.status, reply.body)
    if allowed == ["*"]:
        return
    for method, path, body in (("POST", "/v1/track", TRACK), ("GET", "/status", None),
                               ("GET", "/no/such/route", None)):
        reply = await call(agent.port, path, body, method=method, headers=headers)
        assert reply.status == 403, (path, reply.status, reply.body)
        assert b"not in listen.allowed_origins" in reply.body
    assert agent.spool.depth == 0
