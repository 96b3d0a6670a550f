"""Request guards: loopback Host names (DNS rebinding), browser Origins (CORS), and
Fetch Metadata (a page on another site making the browser send requests, e.g. via <img>)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from agent.dialects.replies import plain_error
from agent.origins import as_sent, netloc

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Wrap = Callable[[Handler, bool], Handler]
CORS_MAX_AGE = "600"
HOST_CACHE = 256
# HTTP's own whitespace: str.strip() would also take NBSP, NEL or U+3000 for it.
OWS = " \t"


# A Host header: a name or an address, then at most a port (RFC 9110 §7.2); a bare IPv6
# address is taken too.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^\[\]:@/\s]*)(?::([0-9]{0,5}))?|[0-9a-f:.]+")


def _host_name(host: str) -> str | None:
    """'[::1]:8765' -> '::1', 'LocalHost:80' -> 'localhost'; None for what is not a host
    and an optional port ('127.0.0.1:80@evil.example', 'localhost:99999')."""
    host = host.strip(OWS).lower()
    match = _HOST.fullmatch(host)
    if match is None or int(match[2] or 0) > 65535:
        return None
    name = match[1] if match[1] is not None else host
    return name[1:-1] if name.startswith("[") else name


def _listen_name(host: str) -> str:
    """An `agent.toml` listen host as a Host names it: no brackets, no IPv6 zone (%eth0)."""
    return host.strip().lower().removeprefix("[").removesuffix("]").split("%", 1)[0]


def is_loopback_name(host: str) -> bool:
    name = _host_name(host)
    if name is None:
        return False
    # One trailing dot: the name fully qualified (`localhost.`), served as the name.
    named = name[:-1] if name.endswith(".") else name
    if named == "localhost" or named.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _unspecified(listen: str) -> bool:
    """Whether a listen host binds every address: 0.0.0.0, or :: however written (`::0`)."""
    try:
        return ipaddress.ip_address(listen).is_unspecified
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    name = _host_name(host)
    try:
        ipaddress.ip_address(name or "")
    except ValueError:
        return False
    return True


class Guard:
    """Decides whether a request may reach a handler, and adds CORS headers."""

    def __init__(self, listen_host: str, allowed_origins: tuple[str, ...]) -> None:
        # Binding a non-loopback address on purpose makes that address a valid Host too;
        # binding every address (for LAN devices) makes any IP literal one. Names stay
        # refused: a DNS rebinding attack always arrives under its own name.
        listen = _listen_name(listen_host)
        self.extra_hosts = frozenset() if is_loopback_name(listen) else {listen}
        self.any_ip = listen == "" or _unspecified(listen)
        self.allowed_origins = frozenset(as_sent(o) for o in allowed_origins)
        self._verdicts: dict[str, bool] = {}

    def host_ok(self, host: str | None) -> bool:
        # Absent Host is HTTP/1.0 from a local tool; a browser always sends one.
        if host is None:
            return True
        # Apps send the same Host on every request: remember the verdict rather than
        # parse it (ipaddress) each time. Bounded, so odd Hosts cannot grow it.
        ok = self._verdicts.get(host)
        if ok is None:
            ok = is_loopback_name(host) or _host_name(host) in self.extra_hosts \
                or (self.any_ip and _is_ip(host))
            if len(self._verdicts) >= HOST_CACHE:
                self._verdicts.clear()
            self._verdicts[host] = ok
        return ok

    def allowed(self, origin: str) -> bool:
        return origin.rstrip("/").lower() in self.allowed_origins or "*" in self.allowed_origins

    def origin_ok(self, origin: str, host: str | None) -> bool:
        if self.allowed(origin):
            return True
        # The agent's own pages (the status page) are same-origin.
        return host is not None and netloc(origin) == host.lower()

    def routes(self, routes: list[web.RouteDef], *, navigable: bool = False,
               wrap: Wrap | None = None) -> list[web.RouteDef]:
        """``routes`` with every handler guarded, and an OPTIONS route per path (preflights).

        ``navigable``: a link followed from another site may open these (GET) routes.
        A handler wrapper rather than an aiohttp middleware: with wrk at 32 connections
        the middleware machinery cost ~8 us per request, 14% of a hello-world's CPU.
        ``wrap(handler, navigable)`` guards a handler (default: ``self.wrap``); one that
        does more per request in the same coroutine must call ``passes`` and ``check``.
        Routes of one path stay together, in their order, so aiohttp keeps one resource each.
        """
        guard = wrap or self.wrap
        out: list[web.RouteDef] = []
        paths = list(dict.fromkeys(r.path for r in routes))
        for path in paths:
            out += [web.RouteDef(r.method, r.path, guard(r.handler, navigable), r.kwargs)
                    for r in routes if r.path == path]
            out.append(web.RouteDef("OPTIONS", path, guard(_no_options, False), {}))
        return out

    def passes(self, request: web.Request) -> bool:
        """A local app, not a browser (the usual case): no check needed. Else ``check``."""
        headers = request.headers
        host = headers.get("Host")
        return "Origin" not in headers and "Sec-Fetch-Site" not in headers \
            and (host is None or bool(self._verdicts.get(host)))

    def wrap(self, handler: Handler, navigable: bool = False) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self.passes(request):
                return await handler(request)
            return await self.check(request, handler, navigable)
        return guarded

    def _cross_site_ok(self, request: web.Request, navigable: bool) -> bool:
        """A cross-site request without an Origin (an <img>, a link, a no-cors GET)."""
        headers = request.headers
        if navigable and request.method in ("GET", "HEAD") \
                and headers.get("Sec-Fetch-Mode") == "navigate" \
                and headers.get("Sec-Fetch-Dest", "document") == "document":
            return True  # a link to the status page; the other site cannot read the page
        page = _origin_of(headers.get("Referer"))
        return page is not None and self.allowed(page)

    async def check(self, request: web.Request, handler: Handler,
                    navigable: bool = False) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not self.host_ok(host):
            return _refuse(421, f"Host {host!r} is not a loopback name")
        origin = request.headers.get("Origin")
        if origin is None:
            # Image loads and navigations carry no Origin, but browsers mark every request
            # with Sec-Fetch-Site; the Referer (by default the page's origin, cross-site)
            # names the page. Clients that send neither are apps, not web pages.
            if request.headers.get("Sec-Fetch-Site") == "cross-site" \
                    and not self._cross_site_ok(request, navigable):
                page = _origin_of(request.headers.get("Referer")) or "a page that sent no Referer"
                return _refuse(403, f"cross-site browser request from {page} refused: "
                                    "that origin is not in listen.allowed_origins")
            return await handler(request)
        if not self.origin_ok(origin, host):
            return _refuse(403, f"Origin {origin!r} is not in listen.allowed_origins")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            resp: web.StreamResponse = web.Response(status=204)
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Content-Type, Authorization")
            resp.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
        else:
            resp = await handler(request)
        if not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Credentials"] = "true"
            resp.headers["Vary"] = "Origin"
            # CORS shows a page only the safelisted headers: analytics-next's batching
            # waits out a 429's Retry-After uncounted, but one it cannot read is a try it
            # counts, and its events are given up while the spool is full.
            if "Retry-After" in resp.headers:
                resp.headers["Access-Control-Expose-Headers"] = "Retry-After"
        return resp



def _origin_of(url: str | None) -> str | None:
    """'https://App.example/x?y' -> 'https://app.example'; None for anything else."""
    try:
        parts = urlsplit(url or "")
    except ValueError:  # e.g. a bad IPv6 literal
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


async def _no_options(request: web.Request) -> web.StreamResponse:
    """OPTIONS that is not a CORS preflight (those are answered by the guard): what the
    path takes, as RFC 9110 answers it (Allow)."""
    resource = request.match_info.route.resource
    methods = {route.method for route in resource} if resource is not None else {"OPTIONS"}
    return web.Response(status=204, headers={"Allow": ", ".join(sorted(methods))})


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response(plain_error(status, message), status=status)
