"""A Nucleus app id that sits in a URL path is a credential in the log too.

`/app/{appId}/track`, `/{appId}/track`, `/{appId}` and `/{appId}/` take the app's key
from the path. A request to such a path that no route serves (a plain GET to a
websocket route, another method) was logged at debug with the whole path: an app id
never stored, so not in the redaction registry, reached the log in full, which
docs/security.md says never happens (refused keys that were never stored included).
So was one in a path that no route has at all: a Nucleus module whose endpoint was
configured with a path (`ws://127.0.0.1:8765/app`) opens `/app/app/{appId}/track`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import AgentProcess, free_port, write_config

# Never accepted, so never stored: only what the log itself hides keeps them out of it.
KEYS = {
    "put": "putNeverStoredAppKey41",
    "plain-get": "plainGetNeverStoredKey42",
    "one-segment": "oneSegmentNeverStoredKey43",
    "ws-track": "wsTrackNeverStoredKey44",
    "trailing": "trailingNeverStoredKey45",
    "endpoint-path": "endpointPathNeverStoredKey46",
    "prefixed-post": "prefixedPostNeverStoredKey47",
}


async def test_an_app_id_in_a_path_no_route_serves_is_not_logged(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    with open(cfg, "a") as fh:
        fh.write('[log]\nlevel = "debug"\n')
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    k = KEYS
    tried = [("PUT", f"/app/{k['put']}/track", 405),
             ("GET", f"/app/{k['plain-get']}/track", 405),
             ("GET", f"/{k['one-segment']}", 404),
             ("DELETE", f"/{k['ws-track']}/track", 404),
             ("PATCH", f"/{k['trailing']}/", 404),
             ("GET", f"/app/app/{k['endpoint-path']}/track", 404),
             ("POST", f"/v1/app/{k['prefixed-post']}/track", 404)]
    try:
        async with aiohttp.ClientSession() as session:
            for method, path, status in tried:
                async with session.request(method, agent.url + path) as r:
                    assert r.status == status, (method, path, await r.text())
    finally:
        assert await asyncio.to_thread(agent.terminate) == 0
    log = agent.log.read_text()
    # Each refusal was logged (so the check below is not vacuous) ...
    assert log.count("outpost.server: method ") == 2, log
    assert log.count("outpost.server: no route for ") == 5, log
    # ... and no app id in full ...
    assert [name for name, key in KEYS.items() if key in log] == []
    # ... but what no route has still named, as far as it is no key.
    assert "no route for POST /v1/app/pre***/track (404)" in log, log


async def raw_reply(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return status


async def log_after_400s(tmp_path: Path, agent_process: Callable[..., AgentProcess],
                         sent: list[bytes]) -> str:
    """The log of an agent sent each of ``sent`` raw, on its own connection, each answered
    400, once the agent has stopped cleanly."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    try:
        for request in sent:
            assert (await raw_reply(port, request)).split(b" ")[1] == b"400"
    finally:
        assert await asyncio.to_thread(agent.terminate) == 0
    return agent.log.read_text()


async def test_a_request_aiohttp_cannot_parse_is_logged_without_its_request_line(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """aiohttp logs a request it cannot parse with an error that quotes the line it failed
    in, the request line included: an app that joins its endpoint and an app id holding a
    space (`/app/{appId}/track`, as the Nucleus modules build it) had the app id, never
    stored, logged in full; so was a key in any query parameter but `writeKey` (the
    pixel's base64 `data`)."""
    # One of each kind of error: aiohttp's are logged once a minute per kind.
    log = await log_after_400s(tmp_path, agent_process, [
        b"POST /app/spaced SpacedAppKey61/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: 2\r\n\r\n{}",                       # Expected HTTP/
        b"GET /v1/pixel/track?data=UGl4ZWxEYXRhS2V5NjM\x7f HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n\r\n"])                          # char in query
    assert log.count("aiohttp.server: Error handling request from 127.0.0.1") == 2, log
    leaks = [k for k in ("SpacedAppKey61", "UGl4ZWxEYXRhS2V5NjM") if k in log]
    assert leaks == [], log


def _pixel_data(key: str) -> str:
    """A pixel's `data`: its event with the write key first, as analytics.js builds it,
    base64'd, with properties enough to take the request line past 64 KiB."""
    event = {"writeKey": key, "event": "e", "userId": "u", "properties": {"x": "a" * 60_000}}
    return base64.b64encode(orjson.dumps(event)).decode()


PIXEL = _pixel_data("PixelWriteKey82")
# Each a line too long for aiohttp, whose error quoted its first 100 bytes inline.
INLINE = {
    # Browsers send every cookie of localhost (of any port: of every local app) with each
    # request to the agent: past aiohttp's 8 KiB a field, the first app's session was logged.
    "cookie over 8 KiB": (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: session="
                          b"SessionCookieSecret81; " + b"pref=" + b"x" * 9000 + b"\r\n\r\n",
                          "SessionCookieSecret81"),
    # A pixel whose event is too large for a request line: its write key, base64'd.
    "pixel line over 64 KiB": (f"GET /v1/pixel/track?data={PIXEL} HTTP/1.1\r\n"
                               "Host: 127.0.0.1\r\n\r\n".encode(), PIXEL[:40]),
}


@pytest.mark.parametrize("case", INLINE)
async def test_an_error_that_quotes_the_request_inline_is_logged_without_the_quote(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], case: str) -> None:
    """Some of aiohttp's parse errors quote what they failed on in their first line
    (`LineTooLong: Got more than 8190 bytes when reading: b'session=...'`), where the
    paragraph cut above does not reach: docs/security.md says such a request is logged as
    what was wrong, never quoting it."""
    request, secret = INLINE[case]
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    try:
        assert (await raw_reply(port, request)).split(b" ")[1] == b"400"
    finally:
        assert await asyncio.to_thread(agent.terminate) == 0
    log = agent.log.read_text()
    assert log.count("aiohttp.server: Error handling request from 127.0.0.1") == 1, log
    assert secret not in log, log
