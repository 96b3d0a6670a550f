"""The registry's example requests (agent/dialects/registry.py), for tests that must cover
every route of every dialect without a hand-kept table of routes."""

from __future__ import annotations

import asyncio
import base64

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from agent.dialects import registry
from agent.dialects.base import Dialect, Example, IngestSink
from agent.server.unrouted import CATCH_ALL_CANONICAL
from tests.fakes.threaded_agent import ThreadedAgent

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}


def examples(key: str) -> list[Example]:
    """Every example of every registered dialect, carrying ``key``, with fresh ids."""
    return [ex for dialect in registry.DIALECTS for ex in dialect.examples(key)]


def as_http(ex: Example) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, path, body, headers) of one plain HTTP request; a websocket example is its
    upgrade request, its frame left unsent."""
    if ex.websocket:
        return ex.method, ex.path, None, {**ex.headers, **UPGRADE}
    return ex.method, ex.path, ex.body, dict(ex.headers)


def routes_of(dialect: Dialect, sink: IngestSink) -> web.Application:
    app = web.Application()
    app.add_routes(dialect.routes(sink))
    return app


def served_by_examples(dialect: Dialect, sink: IngestSink) -> tuple[set[str], set[str]]:
    """(every route of ``dialect``, the routes its examples reach), as `METHOD path`."""
    app = routes_of(dialect, sink)
    every = {f"{r.method} {r.resource.canonical}" for r in app.router.routes()
             if r.method != "HEAD" and r.resource is not None}

    async def reached() -> set[str]:
        out = set()
        for ex in dialect.examples("exampleKey"):
            match = await app.router.resolve(make_mocked_request(ex.method, ex.path))
            route = match.route
            if route.resource is not None and match.http_exception is None:
                out.add(f"{route.method} {route.resource.canonical}")
        return out
    return every, asyncio.run(reached())


# Operations routes with a placeholder, and a path that reaches each.
OPS_PLACEHOLDERS = {"/dead/{seq}": "/dead/1"}


def other_routes(agent: ThreadedAgent) -> list[tuple[str, str]]:
    """(method, path) of the running app's routes that no dialect serves (operations, and
    two paths for the catch-all that answers what no route serves)."""
    assert agent.agent is not None and agent.agent.sink is not None
    assert agent.agent.app is not None
    ingest = {f"{r.method} {r.resource.canonical}" for d in registry.DIALECTS
              for r in routes_of(d, agent.agent.sink).router.routes() if r.resource is not None}
    out = set()
    for route in agent.agent.app.router.routes():
        if route.method in ("HEAD", "OPTIONS") or route.resource is None:
            continue
        path = route.resource.canonical
        if path == CATCH_ALL_CANONICAL:   # what no route serves: guarded all the same
            out |= {("GET", "/no-such-route"), ("POST", "/no/such/route")}
        elif f"{route.method} {path}" not in ingest:
            path = OPS_PLACEHOLDERS.get(path, path)
            assert "{" not in path, f"{path}: an operations route with a placeholder"
            out.add((route.method, path))
    return sorted(out)
