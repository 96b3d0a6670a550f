"""Requests no route serves: a JSON 404, or a 405 with `Allow` when the path is known,
logged at debug and counted as refused by the API ``unrouted``.

A client posting to a route Outpost lacks then shows up in the log, in /status and in
/metrics, not only on its own side. Websocket endpoints serve upgrades only: a plain GET
to `/{appId}` (`/metric`, `/favicon.ico`) or `/{appId}/track` (`GET /v1/track`) is
answered here, as a path that no route serves that way.

A path with a run of slashes or a trailing one (`//app/{appId}/track`, `/v1/batch/`) is
served as its plain form first: clients join a configured endpoint and a path as strings,
so `ws://127.0.0.1:8765/` gives `//app/...`. No redirect: a POST body or a websocket
handshake does not survive one well. Only paths no route serves get here, so the usual
request pays nothing for it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import cast

import orjson
from aiohttp import web
from multidict import CIMultiDict

from agent.dialects.base import WebSocketRoute
from agent.dialects.replies import masked, plain_error
from agent.metrics import Metrics
from agent.server.connections import ServerHandler
from agent.server.guard import Guard, Handler

log = logging.getLogger("outpost.server")

API = "unrouted"
CATCH_ALL, CATCH_ALL_CANONICAL = "/{tail:.*}", "/{tail}"
LOGGED_PATH = 200  # characters of a path in the log
QUOTED_PATH = 512  # and in a reply
_SLASHES = re.compile("//+")
_VARIABLE_REGEX = re.compile(r"\{(\w+):[^{}]*\}")   # `{appId:[^/]+}`, canonical `{appId}`
# The route parameter that holds an app's key (Nucleus: `/app/{appId}/track`, `/{appId}`).
KEY_PARAM = "appId"
# On a request routed at its path's plain form: the path as the client sent it.
SENT_PATH = web.RequestKey("outpost_sent_path", str)
# What wraps the server's handler (``Unrouted.front_door``, bound to its app).
FrontDoor = Callable[[ServerHandler], ServerHandler]


def is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _plain_path(raw_path: str) -> str:
    """``raw_path`` (encoded: a `%2F` is not a slash) with each run of slashes one, and no
    trailing slash but the root's."""
    path = _SLASHES.sub("/", raw_path)
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


class Unrouted:
    """The catch-all reply, and the gate in front of websocket endpoints."""

    def __init__(self, metrics: Metrics, guard: Guard) -> None:
        self.metrics = metrics
        self.guard = guard
        self.websockets: set[str] = set()  # paths whose GET is a websocket upgrade
        # Guarded, so a page on an allowed Origin passes the preflight and can read the
        # 404 (a CORS error would hide it from the client), and other Origins get 403.
        self._guarded: Handler = guard.wrap(self.reply)

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """The 404 or 405, behind the guard; each refusal counted, the guard's too (as
        each API counts those on its routes, and the catch-all's Expect handler did)."""
        resp = await self._guarded(request)
        if resp.status >= 400:
            self.metrics.refuse(API, resp.status)
        return resp

    async def catch_all(self, request: web.Request) -> web.StreamResponse:
        """The handler of what no route serves: the route of the path's plain form, whose
        own guard checks Host and Origin, else the 404 or 405."""
        plain = await _plain(request)
        if plain is not None:
            resource = plain.match_info.route.resource
            if resource is not None and resource.canonical != CATCH_ALL_CANONICAL:
                return await plain.match_info.handler(plain)
        return await self.fallback(request)

    def front_door(self, app: web.Application, route: web.AbstractRoute,
                   handler: ServerHandler) -> ServerHandler:
        """``handler`` (``app``'s) with a request whose target is no path passed to
        ``route`` (the catch-all) as if it had matched: `CONNECT host:443` (a client taking
        the agent for its proxy) names an authority, `OPTIONS *` the server itself. aiohttp's
        router matches paths only, so these got its plain-text 404, unguarded and uncounted.
        A target in absolute form is judged by its authority too (``_addressed``).
        A plain function, not a coroutine: every request passes here."""
        def front(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            if request.raw_path.startswith("/"):   # the target as sent: the usual form
                return handler(request)
            if request.rel_url.raw_path.startswith("/"):   # absolute form
                return handler(self._addressed(request))
            target = cast(web.Request, request)   # the app's requests are its own kind
            match = web.UrlMappingMatchInfo({}, route)
            match.add_app(app)
            match.freeze()
            target._match_info = match
            target[SENT_PATH] = target.raw_path   # the target as sent: no query in these
            return self.fallback(target)
        return front

    def _addressed(self, request: web.BaseRequest) -> web.BaseRequest:
        """A request in absolute form (`POST http://host/v1/batch`, as to a proxy) with its
        target's authority in its Host's place, as HTTP/1.1 has it (RFC 9112 §3.2.2), so
        that the guard refuses a foreign one with its 421; a Host the guard refuses is kept:
        either foreign is refused. The guard read the Host field alone, and let in a
        foreign authority under a loopback Host."""
        host = request.headers.get("Host")
        if host is not None and not self.guard.host_ok(host):
            return request
        headers = CIMultiDict(request.headers)
        headers["Host"] = request.url.raw_authority   # the target's, in absolute form
        return request.clone(headers=headers)

    def gate(self, raw: list[web.RouteDef], routes: list[web.RouteDef]) -> list[web.RouteDef]:
        """``routes`` (``raw``, wrapped) with each websocket GET passing plain GETs on."""
        paths = {r.path for r in raw if isinstance(r, WebSocketRoute)}
        # As ``allowed`` reads them: the router's canonical form, a variable's regex left out.
        self.websockets |= {_VARIABLE_REGEX.sub(r"{\1}", path) for path in paths}
        gated = {"GET": self._upgrade_only, "OPTIONS": _plain_first}
        return [web.RouteDef(r.method, r.path, gated[r.method](r.handler), r.kwargs)
                if r.method in gated and r.path in paths else r for r in routes]

    def _upgrade_only(self, handler: Handler) -> Handler:
        async def upgrade_only(request: web.Request) -> web.StreamResponse:
            if is_upgrade(request):
                return await handler(request)
            # `/status/` matches `/{appId}/`: served as `/status`.
            return await self.catch_all(request)
        return upgrade_only

    async def allowed(self, request: web.Request) -> set[str]:
        """The methods some route serves at this path, as its OPTIONS names them. A path
        only a websocket route serves (`/{appId}`, any one segment: `/favicon.ico`) serves
        nothing but upgrades; a websocket GET beside other routes of its path
        (`/app/{appId}/track`) is named, as OPTIONS names it (RFC 9110: a 405's Allow
        lists what the path takes)."""
        out: set[str] = set()
        upgrade = is_upgrade(request)
        for resource in request.app.router.resources():
            if resource.canonical == CATCH_ALL_CANONICAL:
                continue
            _match, methods = await resource.resolve(request)
            if methods and not upgrade and resource.canonical in self.websockets \
                    and not methods - {"GET", "HEAD", "OPTIONS"}:
                methods = methods - {"GET", "HEAD"}
            out |= methods
        # A path with only the guard's OPTIONS route (a websocket's) is served nothing.
        return out if out - {"OPTIONS"} else set()

    async def reply(self, request: web.Request) -> web.StreamResponse:
        allowed = await self.allowed(await _plain(request) or request)
        # Never the query: it may carry a write key. A plain GET to a websocket path comes
        # here as its plain form (`//v1/track/` as `/v1/track`): named as it was sent.
        path: str = request.get(SENT_PATH, request.rel_url.raw_path)
        if allowed:
            status, said = 405, f"method {request.method} not allowed on "
        else:
            status, said = 404, f"no route for {request.method} "
        # The reply names the path as sent (the client's own); the log masks a key in it.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s (%d)", (said + _logged_path(request, path))[:LOGGED_PATH], status)
        headers = {"Allow": ", ".join(sorted(allowed))} if allowed else None
        # A GET named in Allow, refused: a plain GET to a websocket endpoint's path.
        told = said + _quoted(path) + (" but as a websocket upgrade"
                                       if request.method in allowed else "")
        return web.Response(body=orjson.dumps(plain_error(status, told)), status=status,
                            headers=headers, content_type="application/json")


def _plain_first(handler: Handler) -> Handler:
    """A websocket path's OPTIONS ``handler``, for a path served as its plain form
    (`/flush/` matches `/{appId}/`, and `POST /flush/` flushes): that form's OPTIONS, so
    that it names what the path's other requests are served by."""
    async def plain_first(request: web.Request) -> web.StreamResponse:
        plain = await _plain(request)
        if plain is not None:
            resource = plain.match_info.route.resource
            if resource is not None and resource.canonical != CATCH_ALL_CANONICAL:
                return await plain.match_info.handler(plain)
        return await handler(request)
    return plain_first


def _quoted(path: str) -> str:
    """``path`` for the reply: one longer than any route's is cut (a request line may be
    64 KiB, and each answer would carry it back whole)."""
    if len(path) <= QUOTED_PATH:
        return path
    return f"{path[:QUOTED_PATH]}... ({len(path)} characters)"


def _logged_path(request: web.Request, path: str) -> str:
    """``path`` with what a route would take as an app's key (KEY_PARAM) shown as its first
    three characters: the key may never have been stored, so the log's redaction does not
    know it. Any one-segment path is such a key (`/{appId}`), `/favicon.ico` too. In a path
    no route has, a key may be anywhere (a Nucleus endpoint configured with a path gives
    `/app/app/{appId}/track`): every segment no route names is shown so."""
    plain = _plain_path(path)
    resources = request.app.router.resources()
    routed = False
    for resource in resources:
        pattern = resource.get_info().get("pattern")
        if not isinstance(pattern, re.Pattern) or resource.canonical == CATCH_ALL_CANONICAL:
            continue
        found = pattern.fullmatch(plain)
        routed = routed or found is not None
        if found is not None and found.groupdict().get(KEY_PARAM):
            key = found[KEY_PARAM]
            return "/".join(masked(part) if part == key else part for part in path.split("/"))
    if routed:
        return path
    named = {part for r in resources for part in r.canonical.split("/") if "{" not in part}
    return "/".join(part if part in named else masked(part) for part in path.split("/"))


async def _plain(request: web.Request) -> web.Request | None:
    """``request`` at its path's plain form, routed; None when the path is already plain.

    Routed as aiohttp's own normalize_path_middleware routes the form it redirects to
    (a clone given its match): one request, its body unread, its query kept."""
    url = request.rel_url
    path = _plain_path(url.raw_path)
    if path == url.raw_path:
        return None
    plain = request.clone(rel_url=url.with_path(path, encoded=True, keep_query=True))
    plain[SENT_PATH] = request.get(SENT_PATH, url.raw_path)
    match = await request.app.router.resolve(plain)
    match.add_app(request.app)
    match.freeze()
    plain._match_info = match
    return plain
