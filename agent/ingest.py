"""The aiohttp application: guards, operations routes, then every dialect's routes."""

from __future__ import annotations

from aiohttp import web

from .config import Config
from .dialects import capture, nucleus, segment, segmentstream, tranthor
from .dialects.body import BODY_TIMEOUT_S
from .guard import Guard
from .ops import Ops
from .sink import Sink

# Above every dialect's own limit; those are enforced while reading.
CLIENT_MAX_SIZE = 8 * 1024 * 1024


def build_app(cfg: Config, sink: Sink, ops: Ops) -> web.Application:
    guard = Guard(cfg.listen.host, cfg.listen.allowed_origins)
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[BODY_TIMEOUT_S] = cfg.listen.body_timeout_s
    # Order matters: Nucleus' catch-all `/{appId}` websocket route comes last.
    app.add_routes(guard.routes(ops.routes(), navigable=True))
    for dialect in (segment, capture, tranthor, segmentstream):
        app.add_routes(guard.routes(dialect.routes(sink)))
    app.add_routes(guard.routes(nucleus.routes(sink)))
    return app
