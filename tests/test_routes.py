"""Requests no route serves: a JSON 404 (or a 405 naming what the path allows), logged at
debug and counted as `unrouted` in /status and /metrics, never handed to the Nucleus
websocket route; and the websocket path in the seed's literal form, `/{appId}/`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
import pytest

from agent.dialects.replies import masked
from agent.ops.dead import BODY_LIMIT
from tests.segment_helpers import call

ALLOWED = "https://app.example"


async def status_of(port: int) -> Any:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as r:
            return await r.json()


async def metrics_of(port: int) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            return await r.text()


@pytest.mark.parametrize("method,path", [
    ("GET", "/metric"), ("GET", "/favicon.ico"), ("POST", "/v1/b2"), ("POST", "/a/b/c/d"),
    ("GET", "/app/k/track/extra"), ("HEAD", "/metric"), ("POST", "/metric"),
])
async def test_unknown_paths_get_a_json_404(make_agent: Any, method: str, path: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    agent = await make_agent()
    with caplog.at_level(logging.DEBUG, logger="outpost"):
        reply = await call(agent.port, path, b"{}" if method == "POST" else None, method=method)
    assert reply.status == 404, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    if method != "HEAD":
        assert path in reply.json()["error"]
    # A one-segment path is what the Nucleus websocket route `/{appId}` takes as an app's
    # key: the log shows its first three characters (tests/test_log_path_keys.py); in a
    # longer one no route has, a key may be anywhere: each segment no route names so.
    logged = {"/v1/b2": "/v1/b2***", "/a/b/c/d": "/a***/b/c***/d***",
              "/app/k/track/extra": "/app/k***/track/ext***"}.get(path) \
        or "/" + masked(path[1:])
    assert any(logged in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    status = await status_of(agent.port)
    assert status["ingest"]["refused"] == {"unrouted": {"404": 1}}
    assert 'outpost_ingest_refused_total{api="unrouted",status="404"} 1' in \
        await metrics_of(agent.port)


async def raw_reply(port: int, data: bytes) -> tuple[bytes, bytes]:
    """``data`` sent as it is on a new connection; the head and body of the one reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)   # 0: a 100
        return head, await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("method,target", [
    ("CONNECT", "127.0.0.1:443"), ("CONNECT", "*"), ("OPTIONS", "*")])
async def test_a_request_target_that_is_no_path_gets_the_json_404_too(
        make_agent: Any, method: str, target: str) -> None:
    """`CONNECT host:443` (a proxy client pointed at the agent) and `OPTIONS *` name no
    path, so no route of aiohttp's router matched them, the catch-all included: they got
    aiohttp's plain-text `404: Not Found`, uncounted, past the guard."""
    agent = await make_agent()
    head, body = await raw_reply(
        agent.port, f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 404 "), head + body
    assert b"application/json" in head, head
    assert orjson.loads(body)["error"] == f"no route for {method} {target}"
    status = await status_of(agent.port)
    assert status["ingest"]["refused"] == {"unrouted": {"404": 1}}
    assert 'outpost_ingest_refused_total{api="unrouted",status="404"} 1' in \
        await metrics_of(agent.port)


async def test_a_connect_to_a_foreign_host_is_refused_by_the_guard(make_agent: Any) -> None:
    agent = await make_agent()
    head, body = await raw_reply(
        agent.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 421 "), head + body
    assert "evil.example" in orjson.loads(body)["error"]


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/v1/track", {"POST", "OPTIONS"}),
    ("GET", "/track", {"POST", "OPTIONS"}),
    ("GET", "/v1/batch", {"POST", "OPTIONS"}),
    ("PUT", "/app/k/track", {"GET", "POST", "OPTIONS"}),   # GET: its websocket upgrade
    ("POST", "/healthz", {"GET", "HEAD", "OPTIONS"}),
])
async def test_wrong_method_on_a_known_path_is_405_with_allow(make_agent: Any, method: str,
                                                              path: str, allowed: set[str]) -> None:
    agent = await make_agent()
    reply = await call(agent.port, path, b"{}" if method != "GET" else None, method=method)
    assert reply.status == 405, reply.body
    assert {m.strip() for m in reply.headers["Allow"].split(",")} == allowed
    assert method in reply.json()["error"]
    status = await status_of(agent.port)
    assert status["ingest"]["refused"] == {"unrouted": {"405": 1}}


async def test_unknown_path_from_an_allowed_page_is_readable_there(make_agent: Any) -> None:
    """A browser must see the 404, not a CORS error: the preflight passes and the 404
    carries the CORS headers, so the client can report it (and the agent counts it)."""
    agent = await make_agent(listen={"allowed_origins": [ALLOWED]})
    pre = await call(agent.port, "/v2/nowhere", method="OPTIONS", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    reply = await call(agent.port, "/v2/nowhere", {"a": 1}, headers={"Origin": ALLOWED})
    assert reply.status == 404
    assert reply.headers["Access-Control-Allow-Origin"] == ALLOWED
    refused = await call(agent.port, "/v2/nowhere", {"a": 1},
                         headers={"Origin": "https://evil.example"})
    assert refused.status == 403


async def test_websocket_path_with_a_trailing_slash_is_served(make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{agent.port}/slashKey/") as ws:
            await ws.send_str('{"data":[{"type":"event","name":"e","id":"m1","sessionId":1,'
                              '"date":"2026-01-01T00:00:00Z"}]}')
            reply = await ws.receive_json(timeout=10)
    assert reply == {"reportedIds": ["m1"]}


async def test_websocket_routes_still_upgrade(make_agent: Any) -> None:
    agent = await make_agent()
    for path in ("/wsKey", "/wsKey/track", "/app/wsKey/track"):
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://127.0.0.1:{agent.port}{path}") as ws:
                await ws.send_str('{"data":[{"type":"event","name":"e","id":"x","sessionId":1,'
                                  '"date":"2026-01-01T00:00:00Z"}]}')
                assert await ws.receive_json(timeout=10) == {"reportedIds": ["x"]}


UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize("fault,said", [
    ({"Sec-WebSocket-Key": None}, "no Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, "Sec-WebSocket-Key is not 16 bytes in base64"),
    ({"Sec-WebSocket-Version": "12"}, "Sec-WebSocket-Version '12' is not supported (13 is)"),
    ({"Sec-WebSocket-Version": None}, "no Sec-WebSocket-Version (13)"),
    ({"Connection": "keep-alive"}, "no `Connection: Upgrade`"),
], ids=["no-key", "short-key", "version", "no-version", "no-connection-upgrade"])
async def test_a_broken_websocket_handshake_is_a_json_400_that_says_what_is_wrong(
        make_agent: Any, fault: dict[str, str | None], said: str) -> None:
    """aiohttp refuses such an upgrade itself, in plain text (`Handshake error: None`),
    which a module's log shows as a bare 400 without saying what to fix."""
    agent = await make_agent()
    headers = {k: v for k, v in {**UPGRADE, **fault}.items() if v is not None}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/app/wsKey/track",
                         headers=headers) as r:
            assert r.status == 400, (r.status, await r.text())
            assert r.content_type == "application/json"
            assert (await r.json())["error"] == f"websocket handshake refused: {said}"
    status = await status_of(agent.port)
    assert status["ingest"]["refused"] == {"nucleus": {"400": 1}}


@pytest.mark.parametrize("path,allowed,headers", [
    ("/v1/track", {"POST", "OPTIONS"}, {}),
    ("/app/k/track", {"GET", "POST", "OPTIONS"}, {}),   # GET: its websocket upgrade
    ("/healthz", {"GET", "HEAD", "OPTIONS"}, {}),
    ("/v1/batch", {"POST", "OPTIONS"}, {"Origin": ALLOWED}),   # not a preflight either
])
async def test_an_options_request_that_is_no_preflight_is_told_what_the_path_allows(
        make_agent: Any, path: str, allowed: set[str], headers: dict[str, str]) -> None:
    """OPTIONS asks what a path takes (RFC 9110 9.3.7): curl -X OPTIONS, an HTTP library's
    probe. It got a bare 405 with no Allow and no body, which says neither what is wrong
    nor what would do, and counted nothing."""
    agent = await make_agent(listen={"allowed_origins": [ALLOWED]})
    reply = await call(agent.port, path, method="OPTIONS", headers=headers)
    assert reply.status == 204, (reply.status, reply.body)
    assert {m.strip() for m in reply.headers.get("Allow", "").split(",")} == allowed
    if headers:
        assert reply.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert (await status_of(agent.port))["ingest"]["refused"] == {}


async def test_a_path_no_route_serves_refuses_an_expect_100_continue_body_unsent(
        make_agent: Any) -> None:
    """aiohttp answered `100 Continue` for the catch-all too: a client posting to a wrong
    path uploaded its whole body before it got the 404."""
    agent = await make_agent()
    head, _ = await raw_reply(agent.port, b"POST /v2/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Expect: 100-continue\r\nContent-Length: 4000000\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head


async def test_a_path_no_route_serves_answers_an_unknown_expect_in_json(
        make_agent: Any) -> None:
    agent = await make_agent()
    head, body = await raw_reply(agent.port, b"POST /v2/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Expect: 200-ok\r\nContent-Length: 2\r\n\r\n{}")
    assert head.startswith(b"HTTP/1.1 417 ") and b"application/json" in head, head + body
    assert "'200-ok'" in orjson.loads(body)["message"], body
    assert agent.sink.metrics.refusals() == {"unrouted": {"417": 1}}


@pytest.mark.parametrize("expect", ["", "Expect: 200-ok\r\n"])
@pytest.mark.parametrize("field,status", [
    ("Host: evil.example\r\n", 421), ("Origin: https://evil.example\r\n", 403)])
async def test_the_guard_s_refusal_on_a_path_no_route_serves_is_counted_as_unrouted(
        make_agent: Any, expect: str, field: str, status: int) -> None:
    """As each API counts the guard's refusals on its routes. The catch-all counted the
    guard's 421 or 403 only when the request carried an unknown Expect (refused by the
    Expect handler, which counts), never without one."""
    agent = await make_agent()
    host = "" if field.startswith("Host") else "Host: 127.0.0.1\r\n"
    head, body = await raw_reply(agent.port, (
        f"POST /v2/batch HTTP/1.1\r\n{host}{field}{expect}Content-Length: 2\r\n\r\n{{}}"
    ).encode())
    assert head.startswith(b"HTTP/1.1 %d " % status), head + body
    assert agent.sink.metrics.refusals() == {"unrouted": {str(status): 1}}


async def test_an_operations_route_sends_no_100_continue_before_refusing_the_body(
        make_agent: Any) -> None:
    """The operations routes kept aiohttp's Expect handler: `POST /dead/retry` with a body
    over its limit was told `100 Continue` before the 413, so the client uploaded it."""
    agent = await make_agent()
    head, _ = await raw_reply(agent.port, b"POST /dead/retry HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                              b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 1))
    assert head.startswith(b"HTTP/1.1 413 "), head


async def test_an_operations_route_sends_one_100_continue_once_it_reads_the_body(
        make_agent: Any) -> None:
    """aiohttp's Expect handler sent its `100 Continue`, then read_raw, finding the body
    not yet there, a second one."""
    agent = await make_agent()
    body = b'{"all": true}'
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        writer.write(b"POST /dead/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) \
            == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head


@pytest.mark.parametrize("path", ["/dead/retry", "/flush"])
@pytest.mark.parametrize("field,status", [
    ("", 417), ("Host: evil.example\r\n", 421), ("Origin: https://evil.example\r\n", 403)])
async def test_an_operations_route_answers_an_unknown_expect_in_json_after_its_guard(
        make_agent: Any, path: str, field: str, status: int) -> None:
    """aiohttp's plain-text `Unknown Expect: 200-ok`, before the guard ran."""
    agent = await make_agent()
    host = "" if field.startswith("Host") else "Host: 127.0.0.1\r\n"
    head, body = await raw_reply(agent.port, (
        f"POST {path} HTTP/1.1\r\n{host}{field}Content-Type: application/json\r\n"
        "Expect: 200-ok\r\nContent-Length: 2\r\n\r\n{}").encode())
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"application/json" in head, \
        head + body
    said = orjson.loads(body)["error"]
    assert ("'200-ok'" if status == 417 else "evil.example") in said, body


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


@pytest.mark.parametrize("path", [
    "/v1/track", "/v1/batch", "/v1/pixel/track", "/app/k/track", "/track", "/v1/capture",
    "/api/public/apps/track", "/healthz", "/status", "/metrics", "/flush", "/dead",
    "/dead/retry", "//v1/track", "/v1/batch/", "/status/", "/flush/"])
async def test_every_405_names_what_options_names(make_agent: Any, path: str) -> None:
    """RFC 9110: a 405 carries in Allow the methods the path takes, as OPTIONS says them.
    On `/app/{appId}/track` (a POST route and a websocket's) the 405 to a plain GET, a
    PUT or a DELETE left GET out while OPTIONS named it: a client told the path took no
    GET, when its websocket upgrade is one. A path with a trailing slash is served as its
    plain form (`POST /flush/` flushes): its OPTIONS named the websocket route `/{appId}/`'s
    methods (GET, OPTIONS)."""
    agent = await make_agent()
    options = await call(agent.port, path, method="OPTIONS")
    assert options.status == 204, options.body
    allowed = {m.strip() for m in options.headers["Allow"].split(",")}
    for method in METHODS:
        reply = await call(agent.port, path, b"{}" if method in ("POST", "PUT", "PATCH")
                           else None, method=method)
        if reply.status == 405:
            assert {m.strip() for m in reply.headers["Allow"].split(",")} == allowed, method
            if method != "HEAD":   # no body
                assert method in reply.json()["error"]
        else:   # served, or refused by the route itself (a bad body, no key)
            assert method in allowed, (method, reply.status)
