"""A Nucleus app id that sits in a URL path is a credential in the log too.

`/app/{appId}/track`, `/{appId}/track`, `/{appId}` and `/{appId}/` take the app's key
from the path. A request to such a path that no route serves (a plain GET to a
websocket route, another method) was logged at debug with the whole path: an app id
never stored, so not in the redaction registry, reached the log in full, which
docs/security.md says never happens (refused keys that were never stored included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.conftest import AgentProcess, free_port, write_config

# Never accepted, so never stored: only what the log itself hides keeps them out of it.
KEYS = {
    "put": "putNeverStoredAppKey41",
    "plain-get": "plainGetNeverStoredKey42",
    "one-segment": "oneSegmentNeverStoredKey43",
    "ws-track": "wsTrackNeverStoredKey44",
    "trailing": "trailingNeverStoredKey45",
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
             ("PATCH", f"/{k['trailing']}/", 404)]
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
    assert log.count("outpost.server: no route for ") == 3, log
    # ... and no app id in full.
    assert [name for name, key in KEYS.items() if key in log] == []


async def raw_reply(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return status


async def test_a_request_aiohttp_cannot_parse_is_logged_without_its_request_line(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """aiohttp logs a request it cannot parse with an error that quotes the line it failed
    in, the request line included: an app that joins its endpoint and an app id holding a
    space (`/app/{appId}/track`, as the Nucleus modules build it) had the app id, never
    stored, logged in full; so was a key in any query parameter but `writeKey` (the
    pixel's base64 `data`)."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    # One of each kind of error: aiohttp's are logged once a minute per kind.
    sent = [b"POST /app/spaced SpacedAppKey61/track HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 2\r\n\r\n{}",                       # Expected HTTP/
            b"GET /v1/pixel/track?data=UGl4ZWxEYXRhS2V5NjM\x7f HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n\r\n"]                          # char in query
    try:
        for request in sent:
            assert (await raw_reply(port, request)).split(b" ")[1] == b"400"
    finally:
        assert await asyncio.to_thread(agent.terminate) == 0
    log = agent.log.read_text()
    assert log.count("aiohttp.server: Error handling request from 127.0.0.1") == 2, log
    leaks = [k for k in ("SpacedAppKey61", "UGl4ZWxEYXRhS2V5NjM") if k in log]
    assert leaks == [], log
