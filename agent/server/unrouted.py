"""Requests no route serves: a JSON 404, or a 405 with `Allow` when the path is known,
logged at debug and counted as refused by the API ``unrouted``.

A client posting to a route Outpost lacks then shows up in the log, in /status and in
/metrics, not only on its own side. Websocket endpoints serve upgrades only: a plain GET
to `/{appId}` (`/metric`, `/favicon.ico`) or `/{appId}/track` (`GET /v1/track`) is
answered here, as a path that no route serves that way.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from agent.dialects.base import WebSocketRoute
from agent.metrics import Metrics
from agent.server.guard import Guard, Handler

log = logging.getLogger("outpost.server")

API = "unrouted"
CATCH_ALL, CATCH_ALL_CANONICAL = "/{tail:.*}", "/{tail}"
LOGGED_PATH = 200  # characters of a path in the log


def is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


class Unrouted:
    """The catch-all reply, and the gate in front of websocket endpoints."""

    def __init__(self, metrics: Metrics, guard: Guard) -> None:
        self.metrics = metrics
        self.websockets: set[str] = set()  # paths whose GET is a websocket upgrade
        # Guarded, so a page on an allowed Origin passes the preflight and can read the
        # 404 (a CORS error would hide it from the client), and other Origins get 403.
        self.fallback: Handler = guard.wrap(self.reply)

    def gate(self, raw: list[web.RouteDef], routes: list[web.RouteDef]) -> list[web.RouteDef]:
        """``routes`` (``raw``, wrapped) with each websocket GET passing plain GETs on."""
        paths = {r.path for r in raw if isinstance(r, WebSocketRoute)}
        self.websockets |= paths
        return [web.RouteDef(r.method, r.path, self._upgrade_only(r.handler), r.kwargs)
                if r.method == "GET" and r.path in paths else r for r in routes]

    def _upgrade_only(self, handler: Handler) -> Handler:
        async def upgrade_only(request: web.Request) -> web.StreamResponse:
            if is_upgrade(request):
                return await handler(request)
            return await self.fallback(request)
        return upgrade_only

    async def allowed(self, request: web.Request) -> set[str]:
        """The methods some route serves at this path (websocket GETs only for upgrades)."""
        out: set[str] = set()
        upgrade = is_upgrade(request)
        for resource in request.app.router.resources():
            if resource.canonical == CATCH_ALL_CANONICAL:
                continue
            _match, methods = await resource.resolve(request)
            if methods and not upgrade and resource.canonical in self.websockets:
                methods = methods - {"GET", "HEAD"}
            out |= methods
        # A path with only the guard's OPTIONS route (a websocket's) is served nothing.
        return out if out - {"OPTIONS"} else set()

    async def reply(self, request: web.Request) -> web.StreamResponse:
        allowed = await self.allowed(request)
        path = request.rel_url.path  # never the query: it may carry a write key
        if allowed:
            status, message = 405, f"method {request.method} not allowed on {path}"
        else:
            status, message = 404, f"no route for {request.method} {path}"
        log.debug("%s (%d)", message[:LOGGED_PATH], status)
        self.metrics.refuse(API, status)
        headers = {"Allow": ", ".join(sorted(allowed))} if allowed else None
        return web.Response(body=orjson.dumps({"error": message}), status=status,
                            headers=headers, content_type="application/json")
