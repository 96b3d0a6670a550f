"""The local Nucleus API: every wire variant accepted, every bad input refused cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from agent import service
from agent.service import Agent

VARIANTS: list[dict[str, Any]] = [
    # nodejs 3: ISO date with Z, float totalRam, locale not language
    {"type": "init", "id": 1, "date": "2026-01-02T03:04:05.000Z", "sessionId": 123456,
     "machineId": "m", "platform": "Linux", "totalRam": 23.54, "locale": "en-US"},
    # python: naive local date, int totalRam
    {"type": "init", "id": 2, "date": "2026-01-02T03:04:05.123456", "sessionId": 1234,
     "machineId": "m", "totalRam": 16},
    # JS 4.x: epoch ms, deviceId/anonId instead of machineId, no appId
    {"type": "event", "name": "e", "id": 3, "date": 1767323045000, "sessionId": "abc",
     "deviceId": "d", "anonId": "a"},
    # Swift: float date
    {"type": "nucleus:view", "name": "v", "id": 4, "date": 1767323045.5, "sessionId": 1},
    # old modules: `event` as the type key, `language`
    {"event": "error", "name": "TypeError", "id": "s5", "language": "de-DE", "sessionId": 9},
    # unknown type, no date
    {"type": "custom-thing", "id": 6, "sessionId": 1},
    # no id at all: still stored, nothing to echo
    {"type": "event", "name": "noid", "sessionId": 1},
]


def url(agent: Agent, path: str) -> str:
    return f"http://127.0.0.1:{agent.port}{path}"


@pytest.mark.parametrize("path", ["/app/k/track", "/k", "/k/track"])
@pytest.mark.parametrize("binary", [False, True])
async def test_every_path_and_frame_type_takes_every_variant(make_agent: Any, path: str,
                                                             binary: bool) -> None:
    agent = await make_agent()
    msg = orjson.dumps({"data": VARIANTS + [{"type": "heartbeat", "machineId": "m"}],
                        "confirmation": "legacy-token"})
    async with aiohttp.ClientSession() as s, s.ws_connect(url(agent, path)) as ws:
        await (ws.send_bytes(msg) if binary else ws.send_str(msg.decode()))
        reply = await ws.receive(timeout=5)
    assert reply.type == WSMsgType.TEXT
    # Exactly {"reportedIds": [...]}, ids with the JSON type they came with (Swift decodes
    # [String: [Int]] with try!, JS filters with a type-strict includes).
    assert orjson.loads(reply.data) == {"reportedIds": [1, 2, 3, 4, "s5", 6]}
    assert agent.spool.depth == len(VARIANTS)       # the heartbeat is not stored
    rows = await agent.spool.fetch(agent.spool.streams["k"].id, 0, 100)
    # Read lane by lane (init and error first): back in the order sent, by id.
    sent = [v.get("id") for v in VARIANTS]
    stored = sorted((orjson.loads(r.body) for r in rows), key=lambda ev: sent.index(ev.get("id")))
    assert stored[0]["totalRam"] == 23.54 and stored[0]["locale"] == "en-US"
    assert stored[1]["date"] == "2026-01-02T03:04:05.123456"   # kept as sent
    assert "osVersion" in stored[4]                              # old-style error enriched
    assert stored[4]["language"] == "de-DE"


async def test_http_form_replies_reported_ids(make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(agent, "/app/k/track"), data=orjson.dumps({"data": VARIANTS}),
                          headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 200
            assert await r.json() == {"reportedIds": [1, 2, 3, 4, "s5", 6]}


@pytest.mark.parametrize("body, message", [
    (b"{not json", "invalid JSON"),
    (b'{"data": {"type": "event"}}', "`data` must be an array"),
    (b'{"data": [1, {"type": "event"}]}', "data[0] must be an object"),
    (b'{"data": [{"name": 5}]}', "data[0].name must be a string"),   # no id to leave out
    (b'{"data": [{"type": 5}]}', "data[0].type must be a string"),
    (b'[]', "expected a JSON object"),
    (b'', "empty body"),
])
async def test_bad_http_bodies_get_400_and_store_nothing(make_agent: Any, body: bytes,
                                                         message: str) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(agent, "/app/k/track"), data=body) as r:
            assert r.status == 400
            assert message in (await r.json())["error"]
    assert agent.spool.depth == 0


@pytest.mark.parametrize("body, acked", [
    (b'{"data": [{"id": {"x": 1}}]}', []),
    (b'{"data": [{"id": true}]}', []),  # bool: not an id
    (b'{"data": [{"id": 1}, {"id": "b"}, {"id": [2]}]}', [1, "b"]),
])
async def test_an_event_with_a_bad_id_alone_is_left_unacknowledged(
        make_agent: Any, body: bytes, acked: list[Any]) -> None:
    """A module resends its unacknowledged queue in every message: refusing the message
    would refuse every later one (tests/test_nucleus_bad_event.py)."""
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        async with s.post(url(agent, "/app/k/track"), data=body) as r:
            assert r.status == 200
            assert (await r.json()) == {"reportedIds": acked}
    assert agent.spool.depth == len(acked)


async def test_bad_frame_closes_only_that_connection(make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s, s.ws_connect(url(agent, "/app/good/track")) as good, \
            s.ws_connect(url(agent, "/app/bad/track")) as bad:
        await bad.send_str('{"data": "nope"}')
        closed = await bad.receive(timeout=5)
        assert closed.type == WSMsgType.CLOSE and closed.data == 1007
        assert "data" in closed.extra
        await good.send_str('{"data": [{"type": "event", "name": "x", "id": 1}]}')
        assert (await good.receive_json(timeout=5)) == {"reportedIds": [1]}
    assert agent.spool.depth == 1


async def test_oversized_frame_closes_with_1009_and_oversized_body_gets_413(make_agent: Any) -> None:
    agent = await make_agent()
    from agent.dialects.nucleus import MAX_MESSAGE
    huge = b'{"data": [{"name": "' + b"x" * (MAX_MESSAGE + 10) + b'"}]}'
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url(agent, "/app/k/track"), max_msg_size=0) as ws:
            # The agent reads the frame header, refuses, and closes while we still write.
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(huge)
            closed = await ws.receive(timeout=10)
            assert closed.type == WSMsgType.CLOSE and closed.data == 1009, closed
    # Only the headers and a few bytes are sent: the 413 must come without the rest.
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write(b"POST /app/k/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                 + str(len(huge)).encode() + b"\r\n\r\n" + huge[:100])
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413")
    writer.close()
    assert agent.spool.depth == 0


async def test_accept_keys_and_host_checks(make_agent: Any) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    ok = {"data": [{"type": "event", "name": "x", "id": 1}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(url(agent, "/app/other/track"), json=ok) as r:
            assert r.status == 401 and "other" in (await r.json())["error"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(url(agent, "/app/other/track"))
        assert err.value.status == 401
        async with s.post(url(agent, "/app/good/track"), json=ok,
                          headers={"Host": "evil.example:8765"}) as r:
            assert r.status == 421
        async with s.post(url(agent, "/app/good/track"), json=ok,
                          headers={"Host": "localhost:8765"}) as r:
            assert r.status == 200
    assert agent.spool.depth == 1


async def test_a_stop_closes_open_module_websockets_going_away_at_once(
        make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module keeps its websocket open for as long as the app runs, so one is open at
    nearly every stop (a restart, an upgrade). The stop waited for its handler 5 s
    (listen's shutdown grace), then cut it and waited 5 s more: 10 s per stop, and the
    module saw 1006 (abnormal) with no close frame. It is told 1001 (going away), and
    reconnects once the agent is back, as after any close. The grace made an hour, a stop
    that waited for it would not end within the test's bound: no clock read."""
    monkeypatch.setattr(service, "SHUTDOWN_S", 3600.0)
    agent = await make_agent()
    async with aiohttp.ClientSession() as s, s.ws_connect(url(agent, "/app/k/track")) as ws:
        await ws.send_str('{"data": [{"type": "event", "name": "x", "id": 1}]}')
        assert (await ws.receive_json(timeout=5)) == {"reportedIds": [1]}
        closing = asyncio.ensure_future(ws.receive(timeout=30))   # a module reads on
        await asyncio.wait_for(agent.stop(), 30)
        msg = await closing
    assert msg.type == WSMsgType.CLOSE and msg.data == 1001, (msg, ws.close_code)


async def test_connections_that_keep_breaking_the_protocol_are_logged_once_an_interval(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A local client that opens websocket after websocket, each ended by a frame that is
    no websocket's (text that is not UTF-8), wrote a log line for each: as many as it
    liked. One a key an interval, as other refusals are."""
    caplog.set_level("INFO", logger="outpost")
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.ws_connect(url(agent, "/app/k/track")) as ws:
                await ws.send_frame(b"\xff\xfe", WSMsgType.TEXT)
                closed = await ws.receive(timeout=5)
                assert closed.type == WSMsgType.CLOSE and closed.data == 1007, closed
    lines = [r.getMessage() for r in caplog.records if "closed:" in r.getMessage()]
    assert len(lines) == 1, lines
