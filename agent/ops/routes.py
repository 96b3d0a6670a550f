"""Operations endpoints: /healthz, /status, /metrics, the status page at /, POST /flush,
and the dead-letter endpoints (ops/dead.py)."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from collections.abc import Callable, Mapping

import orjson
from aiohttp import web

from agent.forwarder.state import UpstreamState
from agent.metrics import Metrics
from agent.ops import prometheus
from agent.ops.dead import DeadRoutes
from agent.ops.dead_reasons import NewestReasons
from agent.ops.own_origin import foreign
from agent.ops.status import Snapshot, snapshot
from agent.settings import Config
from agent.spool import Spool
from agent.sync.monitor import SyncView

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)
# The config and upstream states in force: a reload replaces both.
Live = Callable[[], tuple[Config, Mapping[str, UpstreamState]]]


def _csp(page: str) -> str:
    """A policy that runs exactly the page's own inline script and style, by hash.

    Hashes rather than 'unsafe-inline': should anything ever get markup into
    the page (an upstream's error text, say), it still could not run script.
    """
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    script, style = (" ".join(hashes[tag]) or "'none'" for tag in ("script", "style"))
    return (f"default-src 'none'; script-src {script}; style-src {style}; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


class Ops:
    """Handlers over the running agent's parts, given narrow inputs: ``live`` returns the
    config and upstream states in force, ``flush`` asks every forwarder to send now, and
    ``sync`` tells the transmit profile."""

    def __init__(self, spool: Spool, metrics: Metrics, live: Live,
                 flush: Callable[[], None], sync: Callable[[], SyncView] | None = None) -> None:
        self.spool = spool
        self._sync = sync
        self.metrics = metrics
        self._live = live
        self._flush = flush
        self._reasons = NewestReasons()
        page = (importlib.resources.files("agent") / "static" / "status.html").read_text("utf-8")
        self._page = page.encode()
        self._page_headers = {
            "Content-Security-Policy": _csp(page),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }

    async def _snapshot(self) -> Snapshot:
        cfg, states = self._live()
        return await snapshot(cfg, self.spool, states, self.metrics, self._reasons,
                              self._sync() if self._sync is not None else None)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "queue_depth": self.spool.depth})

    async def status(self, request: web.Request) -> web.Response:
        body = await self._snapshot()
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def metrics_text(self, request: web.Request) -> web.Response:
        snap = await self._snapshot()
        text = prometheus.render(snap, self.metrics.ingest_latency)
        return web.Response(body=text.encode(),
                            headers={"Content-Type": prometheus.CONTENT_TYPE})

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers=self._page_headers)

    async def flush(self, request: web.Request) -> web.Response:
        # It makes the agent act: for local tools and the own page, not an app's page.
        why = foreign(request, "/flush")
        if why is not None:
            return web.json_response({"error": why}, status=403)
        self._flush()
        # What the flush cannot send, so that `outpost flush` can say why nothing goes.
        unrouted = self.spool.books.groups.get(None)
        reply: dict[str, object] = {"flushing": True, "queue_depth": self.spool.depth,
                                    "unrouted": unrouted.depth if unrouted is not None else 0}
        if self._sync is not None:
            view = self._sync()
            reply["sync"] = {"profile": view["profile"], "reason": view["reason"]}
        return web.json_response(reply)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.page), web.get("/healthz", self.healthz),
                web.get("/status", self.status), web.get("/metrics", self.metrics_text),
                web.post("/flush", self.flush),
                *DeadRoutes(self.spool).routes()]
