"""The aiohttp application: guards, operations routes, then every dialect's routes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from aiohttp import web

from agent.dialects import registry
from agent.dialects.body import BODY_TIMEOUT_S, TICKET
from agent.dialects.replies import REFUSALS
from agent.metrics import Metrics
from agent.server.admission import Admission
from agent.server.guard import Guard, Handler
from agent.server.intake import Sink
from agent.server.unrouted import CATCH_ALL, Unrouted
from agent.settings import Config

# Above every dialect's own limit; those are enforced while reading.
CLIENT_MAX_SIZE = 8 * 1024 * 1024


def build_app(cfg: Config, sink: Sink, ops_routes: list[web.RouteDef]) -> web.Application:
    """The app for ``sink``'s dialects, with ``ops_routes`` (the operations endpoints,
    built by the composition root: ingest does not import ops) in front of them."""
    guard = Guard(cfg.listen.host, cfg.listen.allowed_origins)
    admission = sink.admission

    async def stop_trims(app: web.Application) -> None:
        admission.close()

    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app.on_cleanup.append(stop_trims)
    app[BODY_TIMEOUT_S] = cfg.listen.body_timeout_s
    # Order matters: Nucleus' catch-all `/{appId}` websocket route comes last.
    app.add_routes(guard.routes(ops_routes, navigable=True))
    unrouted = Unrouted(sink.metrics, guard)
    # Looked up at each build, in the registry's order (route priority).
    for dialect in registry.DIALECTS:
        raw = dialect.routes(sink)
        app.add_routes(unrouted.gate(raw, counted(guard.routes(admitted(raw, admission)),
                                                  dialect.name, sink.metrics)))
    app.router.add_route("*", CATCH_ALL, unrouted.fallback)  # last: what no route serves
    return app


def counted(routes: list[web.RouteDef], api: str, metrics: Metrics) -> list[web.RouteDef]:
    """``routes`` with each refusal (a 4xx or 5xx reply, the guard's included) counted by
    ``api`` and status, and ``replies.refused`` counting the ones a reply does not show."""
    count = partial(metrics.refuse, api)
    return [web.RouteDef(r.method, r.path, _counting(r.handler, count), r.kwargs)
            for r in routes]


def _counting(handler: Handler, count: Callable[[int], None]) -> Handler:
    async def counting(request: web.Request) -> web.StreamResponse:
        token = REFUSALS.set(count)
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                count(exc.status)
            raise
        finally:
            REFUSALS.reset(token)
        if resp.status >= 400:
            count(resp.status)
        return resp
    return counting


def admitted(routes: list[web.RouteDef], admission: Admission) -> list[web.RouteDef]:
    """``routes`` with each request's body reads charged to a ticket of its own.

    A handler wrapper on the ingest routes only, not an aiohttp middleware: that would
    cost every request (/healthz included) its machinery (see Guard.routes).
    """
    return [web.RouteDef(r.method, r.path, _ticketed(r.handler, admission), r.kwargs)
            for r in routes]


def _ticketed(handler: Handler, admission: Admission) -> Handler:
    async def ticketed(request: web.Request) -> web.StreamResponse:
        # All given back once the handler is done (its events committed, or refused).
        with admission.ticket() as ticket:
            token = TICKET.set(ticket)
            try:
                return await handler(request)
            finally:
                TICKET.reset(token)
    return ticketed
