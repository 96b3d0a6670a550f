"""A fast fake upstream for the drain workload: `python -m bench.upstream --port P`.

Nucleus websocket and HTTP (`/app/{id}/track`, acks every id with
`reportedIds`) and Segment HTTP (`/v1/batch`, 200). GET /count returns how
many events and requests (frames) arrived. Unlike tests/fakes/nucleus_upstream.py
it keeps no events, so it stays small and quick under a 1M-event drain; it
keeps one sample, the largest request it received (GET /sample, with its event
count in X-Events), so the bench can measure this sink's own receive ceiling
by posting the very batches the agent sent.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from aiohttp import WSMsgType, web


class Upstream:
    def __init__(self) -> None:
        self.events = 0
        self.frames = 0
        self.sample = b""
        self.sample_events = 0

    def _count(self, raw: str | bytes, n: int) -> None:
        self.frames += 1
        self.events += n
        if n > self.sample_events:
            self.sample = raw.encode() if isinstance(raw, str) else raw
            self.sample_events = n

    def _ack(self, raw: str | bytes) -> bytes:
        events = orjson.loads(raw).get("data") or []
        self._count(raw, len(events))
        return orjson.dumps({"reportedIds": [ev["id"] for ev in events if "id" in ev]})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(self._ack(msg.data).decode())
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(self._ack(msg.data))
        return ws

    async def http(self, request: web.Request) -> web.Response:
        return web.Response(body=self._ack(await request.read()), content_type="application/json")

    async def segment(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self._count(raw, len(orjson.loads(raw).get("batch") or []))
        return web.Response(body=b'{"success":true}', content_type="application/json")

    async def count(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"events": self.events, "frames": self.frames}),
                            content_type="application/json")

    async def sample_body(self, request: web.Request) -> web.Response:
        return web.Response(body=self.sample, content_type="application/json",
                            headers={"X-Events": str(self.sample_events)})


async def serve(port: int) -> None:
    up = Upstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.get("/app/{appId}/track", up.ws), web.post("/app/{appId}/track", up.http),
                    web.post("/v1/batch", up.segment), web.get("/count", up.count),
                    web.get("/sample", up.sample_body)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    loop_factory: Any = None
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
