"""The aiohttp application: guards, operations routes, then every dialect's routes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .config import Config
from .dialects import capture, nucleus, segment, segmentstream, tranthor
from .dialects.body import BODY_TIMEOUT_S, TICKET
from .guard import Guard
from .ops import Ops
from .sink import Sink

# Above every dialect's own limit; those are enforced while reading.
CLIENT_MAX_SIZE = 8 * 1024 * 1024


def build_app(cfg: Config, sink: Sink, ops: Ops) -> web.Application:
    guard = Guard(cfg.listen.host, cfg.listen.allowed_origins)
    admission = sink.admission

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The body budget each request's reads are charged to, all given back once the
        # handler is done (its events committed, or refused).
        with admission.ticket() as ticket:
            token = TICKET.set(ticket)
            try:
                return await handler(request)
            finally:
                TICKET.reset(token)

    async def stop_trims(app: web.Application) -> None:
        admission.close()

    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[admit])
    app.on_cleanup.append(stop_trims)
    app[BODY_TIMEOUT_S] = cfg.listen.body_timeout_s
    # Order matters: Nucleus' catch-all `/{appId}` websocket route comes last.
    app.add_routes(guard.routes(ops.routes(), navigable=True))
    for dialect in (segment, capture, tranthor, segmentstream):
        app.add_routes(guard.routes(dialect.routes(sink)))
    app.add_routes(guard.routes(nucleus.routes(sink)))
    return app
