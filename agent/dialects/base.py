"""What a dialect is given (an IngestSink) and what it exports (a Dialect record).

A dialect is one module: it reads its API's requests, hands the events to the sink,
and renders its API's replies. It sees the rest of the agent only through
IngestSink, which agent/server/intake.py implements; it never imports agent.server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from agent.dialects.body import Reservation
from agent.dialects.replies import Fixed
from agent.families.enrich import Enrich
from agent.families.event import Event

JSON = {"Content-Type": "application/json"}  # for examples' headers
# The longest key taken while listen.accept_keys is empty. Any app may then invent keys,
# and each key stored stays in memory while the agent runs (its queue's entry, and the
# forms log redaction looks for, percent-encoded ones 6 characters a non-ASCII letter):
# 400 KB keys cost ~2.2 MB of RSS each. A real write key or app id is a few dozen.
MAX_KEY_CHARS = 256
# The app's open websockets, each added by its endpoint for as long as it is open: a stop
# closes them, 1001 (agent/server/app.py). A module keeps its websocket open as long as
# the app runs, and a handler waiting on it held the stop until aiohttp cut it (1006).
OPEN_SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("open_sockets")
# True on a request whose client ended its side (shut down sending, or closed: the agent
# sees the same FIN) before its reply began (agent/server/connections.py): the request is
# still answered, but a stream that never ends (/tail's) takes it for the client leaving.
CLIENT_EOF: web.RequestKey[bool] = web.RequestKey("outpost_client_eof", bool)


class Routes(Protocol):
    """The upstream routes of one config (agent/server/limits.py): what each key's upstream
    can carry, and the shape its events are stored in. A reload makes new ones for the next
    request; a request that asks them before its commit hands the same ones to ``store``."""

    @property
    def active(self) -> bool:
        """False when no route sets a limit."""

    @property
    def least(self) -> int:
        """No event stored in this many bytes or fewer is too large for any route."""

    def oversize(self, event: Event) -> str | None:
        """Why ``event`` is larger than the upstream its key is routed to can ever carry,
        or None."""

    def as_stored(self, events: Sequence[Event], known: Container[int] = (),
                  alike: bool = False) -> Sequence[Event]:
        """``events`` in the shape their routes store them in (``alike``: they share the
        first one's key and family)."""

    def maps_any(self, events: Sequence[Event]) -> bool:
        """Whether ``as_stored`` maps any of ``events`` to the other family."""

    def maps_key(self, key: str) -> bool:
        """Whether ``key``'s events are stored mapped to the other family."""


class IngestSink(Protocol):
    """Everything a dialect needs from the agent: key policy, admission, enrichment, limits,
    store."""

    enrich: Enrich  # handed to each family's accept function

    def key_refusal(self, key: str | None) -> str | None:
        """Why events may not be stored under ``key``, for the 401; None if they may."""

    @property
    def limits(self) -> Routes:
        """The routes in force. ``store`` refuses an event too large for its upstream; a
        batch API that answers per message asks ``oversize`` first."""

    def ticket(self) -> AbstractContextManager[Reservation]:
        """A share of the in-flight body budget, given back on exit. HTTP handlers get one
        already (see body.TICKET); a websocket takes one per frame."""

    async def store(self, events: Sequence[Event], limits: Routes | None = None,
                    alike: bool = False) -> int:
        """Commit ``events`` durably, held to ``limits`` (None: those in force); how many
        were new. Raises SpoolFull, or Invalid (too large; KeyRefused: a key no longer
        accepted), storing none. ``alike``: the
        caller knows they all have the first one's key and family (a Nucleus message's
        events, a Segment batch of one key), so they are routed and announced once."""


# A route the server may answer itself, without aiohttp's request machinery, for a plain
# request whose whole body came with its head (agent/server/express.py): called with that
# body and the write keys the headers gave, it renders the same reply as the route (a
# Fixed one for a reply the same at every request).
Express = Callable[[bytes, list[str]], Awaitable[web.Response | Fixed]]


def no_express(sink: IngestSink) -> Mapping[str, Express]:
    return {}


class WebSocketRoute(web.RouteDef):
    """A websocket endpoint: a GET that upgrades. The app answers a plain GET to its
    path (a browser tab, a mistyped URL) as a path no route serves."""


def websocket(path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
              ) -> web.RouteDef:
    """The route of a websocket endpoint at ``path`` (GET only: no HEAD)."""
    return WebSocketRoute("GET", path, handler, {"allow_head": False})


@dataclass(frozen=True)
class Example:
    """A request that the dialect accepts and that stores one new event: answered 2xx or,
    with ``websocket``, upgraded (101) and ``body``, sent as one frame, acknowledged."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    websocket: bool = False


@dataclass(frozen=True)
class Dialect:
    """One local API, as the registry (agent/dialects/registry.py) lists it.

    ``examples(key)`` gives requests carrying ``key`` the way the API carries it, at least
    one per route, with fresh ids at every call; the security tests send them to prove
    that every route is guarded and keyed.
    """

    name: str
    routes: Callable[[IngestSink], list[web.RouteDef]]
    examples: Callable[[str], list[Example]]
    # Paths (exact, no query) answered by the express lane as well as by ``routes``.
    express: Callable[[IngestSink], Mapping[str, Express]] = no_express
