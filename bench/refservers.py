"""Same-run reference servers: `python -m bench.refservers hello|naive --port P [--db F]`.

- hello: the aiohttp hello-world ceiling, on the same event loop as the agent
  (uvloop where installed). Websocket frames get a fixed reply, unparsed.
- naive: what one would write first: aiohttp, stdlib json, and one aiosqlite
  transaction per request in WAL mode with synchronous=FULL (durable like
  Outpost's sync = "full", but without group commit).
Both accept any POST path and a websocket on any GET path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiosqlite
from aiohttp import WSMsgType, web

HELLO_WS_REPLY = '{"reportedIds":[]}'


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await ws.send_str(HELLO_WS_REPLY)
            return ws
        return web.Response(text="Hello, world")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def _events(doc: Any) -> list[Any]:
    if isinstance(doc, dict):
        for name in ("data", "batch"):
            if isinstance(doc.get(name), list):
                return list(doc[name])
        return [doc]
    return []


def naive_app(db_path: str) -> web.Application:
    state: dict[str, aiosqlite.Connection] = {}
    lock = asyncio.Lock()  # one connection: one transaction at a time

    async def store(doc: Any) -> list[Any]:
        events = _events(doc)
        db = state["db"]
        async with lock:
            await db.execute("BEGIN")
            await db.executemany("INSERT INTO events(body) VALUES (?)",
                                 [(json.dumps(ev),) for ev in events])
            await db.execute("COMMIT")
        return [ev.get("id") for ev in events if isinstance(ev, dict) and "id" in ev]

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    ids = await store(json.loads(msg.data))
                    await ws.send_str(json.dumps({"reportedIds": ids}))
            return ws
        if request.method != "POST":
            return web.Response(text="ok")
        ids = await store(await request.json())
        return web.json_response({"reportedIds": ids})

    async def db_ctx(app: web.Application) -> Any:
        db = await aiosqlite.connect(db_path, isolation_level=None)
        await db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                               "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, body)")
        state["db"] = db
        yield
        await db.close()

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.cleanup_ctx.append(db_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["hello", "naive"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", default="naive.db")
    args = p.parse_args()
    app = hello_app() if args.kind == "hello" else naive_app(args.db)
    try:
        import uvloop
        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(app, args.port))


async def _serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
