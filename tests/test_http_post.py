"""An HTTP uplink's POST: the request as the upstream reads it, whatever the body's size
(a large body is written apart from the head, http_common._Body)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from agent.uplinks.http_common import HttpReply, client_session, post


@pytest.mark.parametrize("size", [100, 300_000])
async def test_a_body_small_or_large_arrives_whole_with_its_headers(size: int) -> None:
    got: list[tuple[bytes, Any]] = []

    async def batch(request: web.Request) -> web.Response:
        got.append((await request.read(), request.headers.copy()))
        return web.json_response({"success": True})

    app = web.Application(client_max_size=2**20)
    app.add_routes([web.post("/v1/batch", batch)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    try:
        async with client_session() as session:
            for _ in range(2):   # the second on the kept-alive connection
                reply = await post(session, f"http://127.0.0.1:{port}/v1/batch", body,
                                   {"Content-Type": "application/json"}, 5.0, 4096)
                assert isinstance(reply, HttpReply) and reply.status == 200, reply
    finally:
        await runner.cleanup()
    assert [b for b, _ in got] == [body, body]
    for _, headers in got:
        assert headers["Content-Type"] == "application/json"
        assert headers["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in headers
