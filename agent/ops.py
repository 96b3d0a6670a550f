"""Operations endpoints: /healthz, /status, and POST /flush for `outpost flush`."""

from __future__ import annotations

import orjson
from aiohttp import web

from .config import Config
from .metrics import Metrics
from .routing import Forwarding
from .spool import Spool
from .status import snapshot


class Ops:
    """Handlers over the running agent's parts."""

    def __init__(self, cfg: Config, spool: Spool, forwarding: Forwarding, metrics: Metrics) -> None:
        self.cfg = cfg
        self.spool = spool
        self.forwarding = forwarding
        self.metrics = metrics

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "queue_depth": self.spool.depth})

    async def status(self, request: web.Request) -> web.Response:
        body = await snapshot(self.cfg, self.spool, self.forwarding, self.metrics)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def flush(self, request: web.Request) -> web.Response:
        self.forwarding.flush()
        return web.json_response({"flushing": True, "queue_depth": self.spool.depth})

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/healthz", self.healthz), web.get("/status", self.status),
                web.post("/flush", self.flush)]
