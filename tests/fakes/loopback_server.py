"""What the fake upstreams share: an aiohttp server on 127.0.0.1, port 0, whose
websockets are closed on stop."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopbackServer:
    """Serve ``app`` with ``await self._serve(app)``; ``await stop()`` ends it."""

    def __init__(self) -> None:
        self.port = 0
        self.tls: ssl.SSLContext | None = None   # serve HTTPS and wss:// with this (fakes/tls.py)
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}"

    async def _serve(self, app: web.Application) -> None:
        # A handler still running at stop (a scripted hang, 30-60 s) is cancelled after
        # this: waiting for it cost each such test 1 s of its teardown.
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def serving(path: str, handler: Handler, max_body: int = 2**24) -> AsyncIterator[str]:
    """A one-route collector (POST ``path``) on 127.0.0.1 while the block runs; yields its
    base URL."""
    app = web.Application(client_max_size=max_body)
    app.router.add_post(path, handler)
    server = LoopbackServer()
    await server._serve(app)
    try:
        yield server.http_url
    finally:
        await server.stop()
