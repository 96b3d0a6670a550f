"""The aiohttp application: guards, operations routes, then every dialect's routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import Any

from aiohttp import HttpVersion11, WSCloseCode, web
from aiohttp.http_exceptions import HttpProcessingError

from agent.dialects import registry
from agent.dialects.base import OPEN_SOCKETS
from agent.dialects.body import BODY_TIMEOUT_S, TICKET, expects_continue
from agent.dialects.replies import REFUSALS, json_reply, plain_error
from agent.logs import limit_library_log
from agent.server.admission import Admission
from agent.server.express import ExpressLane, Routes
from agent.server.guard import Guard, Handler
from agent.server.intake import Sink
from agent.server.unrouted import API as UNROUTED
from agent.server.unrouted import CATCH_ALL, FrontDoor, Unrouted
from agent.settings import Config

# Above every dialect's own limit; those are enforced while reading.
CLIENT_MAX_SIZE = 8 * 1024 * 1024
# The lane that answers plain requests to the busiest ingest routes before aiohttp sees
# them; the listener's connections (server/connections.py) take it from here.
EXPRESS = web.AppKey("express", ExpressLane)
# Wraps the server's request handler (the app's), for the requests no route can match.
FRONT_DOOR: web.AppKey[FrontDoor] = web.AppKey("front_door")
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
# How long a stop waits for a client to answer its websocket's close before cutting it.
SOCKET_CLOSE_S = 1.0


def build_app(cfg: Config, sink: Sink, ops_routes: list[web.RouteDef]) -> web.Application:
    """The app for ``sink``'s dialects, with ``ops_routes`` (the operations endpoints,
    built by the composition root: ingest does not import ops) in front of them, and its
    express lane (``app[EXPRESS]``) for the plain requests the dialects offer it."""
    guard = Guard(cfg.listen.host, cfg.listen.allowed_origins)
    admission = sink.admission
    # Each request aiohttp cannot parse is logged with a traceback: once a minute here.
    # A handler's crash (a 500) is logged with the same words, and always.
    # Per fault, not per exception type: one type (BadHttpMessage) covers a bad field
    # name, a NUL in a value, an obs-fold..., and each is a different thing to fix.
    limit_library_log("aiohttp.server", _unparsable, _unquoted, _fault)

    async def stop_trims(app: web.Application) -> None:
        admission.close()

    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app.on_cleanup.append(stop_trims)
    app[OPEN_SOCKETS] = set()
    app.on_shutdown.append(_close_sockets)
    app[BODY_TIMEOUT_S] = cfg.listen.body_timeout_s
    # Order matters: Nucleus' catch-all `/{appId}` websocket route comes last.
    # Their refusals are the operator's, not an app's: not counted with the APIs'.
    app.add_routes(expecting(guard.routes(ops_routes, navigable=True),
                             expectation(_uncounted, guard, navigable=True)))
    unrouted = Unrouted(sink.metrics, guard)
    # Looked up at each build, in the registry's order (route priority).
    for dialect in registry.DIALECTS:
        raw = dialect.routes(sink)
        app.add_routes(unrouted.gate(raw, ingest_routes(
            raw, guard, admission, partial(sink.metrics.refuse, dialect.name))))
    catch_all = app.router.add_route(  # last: the rest
        "*", CATCH_ALL, unrouted.catch_all,
        expect_handler=expectation(partial(sink.metrics.refuse, UNROUTED), guard))
    front: FrontDoor = partial(unrouted.front_door, app, catch_all)   # typed: mypy infers no _T
    app[FRONT_DOOR] = front
    app[EXPRESS] = ExpressLane(
        [Routes(dialect.express(sink), partial(sink.metrics.refuse, dialect.name))
         for dialect in registry.DIALECTS], guard, admission, sink.metrics)
    return app


async def _close_sockets(app: web.Application) -> None:
    """As a stop begins (nothing more is accepted), each open websocket is closed with 1001,
    "going away": its module reconnects and resends what was not acknowledged once the agent
    is back. Left open, its handler, waiting for the module's next message, held the stop
    for aiohttp's shutdown grace twice over (10 s), and was then cut (1006)."""
    sockets = app[OPEN_SOCKETS]
    await asyncio.gather(*(_going_away(ws) for ws in list(sockets)))


async def _going_away(ws: web.WebSocketResponse) -> None:
    with suppress(TimeoutError):   # no answer to the close: cut (aiohttp's close does)
        await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY, message=b"agent stopping"),
                               SOCKET_CLOSE_S)


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger (``logger=`` of its request handlers) with a request it
    cannot parse logged at error level always: it logs a bad method in a connection's
    first request at debug (on a public port that is scanners' and TLS clients' noise),
    so at the agent's level `GARBAGE /v1/track`, or an app speaking https to the agent,
    got its 400 and no line, though every other malformed request gets one
    (once a minute per kind: ``limit_library_log`` in build_app)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), HttpProcessingError):
            self.error(msg, *args, **kwargs)
        else:
            super().debug(msg, *args, **kwargs)


def _unparsable(record: logging.LogRecord) -> bool:
    """A record of a request aiohttp could not parse: the client's mistake, not ours."""
    return record.exc_info is not None and isinstance(record.exc_info[1], HttpProcessingError)


def _unquoted(record: logging.LogRecord) -> str:
    """An unparsable request's record (``_unparsable``) without the line aiohttp's error
    quotes (`b'POST /app/{appId}/track ...'`): its path and query may hold a key never
    stored, which the log's redaction does not know. What was wrong stays, in one line
    (`BadStatusLine: Bad status line: Expected HTTP/, RTSP/ or ICE/ (400)`)."""
    return f"{record.getMessage()}: {_fault(record)}"


def _fault(record: logging.LogRecord) -> str:
    """What was wrong with an unparsable request (``_unparsable``), never quoting it:
    `BadStatusLine: Bad status line: Expected HTTP/, RTSP/ or ICE/ (400)`."""
    assert record.exc_info is not None
    exc = record.exc_info[1]
    assert isinstance(exc, HttpProcessingError)
    what = exc.message.split("\n\n", 1)[0]
    # Some quote what they failed on inline, as their args hold it: LineTooLong the first
    # 100 bytes of a line (`... when reading: b'session=...'`, from a Cookie field holding
    # every localhost app's cookies), InvalidHeader a field. Cut where the quote begins.
    for part in exc.args:
        if isinstance(part, str | bytes | bytearray) and part and part != exc.message:
            what = what.split(repr(part), 1)[0].rstrip(" :")
    what = " ".join(line.strip() for line in what.splitlines())
    return f"{type(exc).__name__}: {what.rstrip(':')} ({exc.code})"


def ingest_routes(routes: list[web.RouteDef], guard: Guard, admission: Admission,
                  count: Callable[[int], None]) -> list[web.RouteDef]:
    """``routes`` guarded, each refusal (a 4xx or 5xx reply, the guard's included) passed
    to ``count`` (with ``replies.refused`` for the ones a reply does not show), each
    request's body reads charged to a ticket of its own, and `100 Continue` sent only once
    the route reads the body (``expectation``).

    One wrapper, one coroutine, for the three: a coroutine per concern cost every request
    its creation and, for each request waiting on a commit, its resumption (aiohttp
    middlewares would cost every request, /healthz included, more: see Guard.routes).
    """
    def wrap(handler: Handler, navigable: bool) -> Handler:
        return _ingest(handler, guard, navigable, admission, count)
    return expecting(guard.routes(routes, wrap=wrap), expectation(count, guard))


def expecting(routes: list[web.RouteDef], expect: ExpectHandler) -> list[web.RouteDef]:
    """``routes`` with ``expect`` (an ``expectation``) as their `Expect` handler."""
    return [web.RouteDef(r.method, r.path, r.handler, {**r.kwargs, "expect_handler": expect})
            for r in routes]


def _uncounted(status: int) -> None:
    """The count of refusals no API counts."""


def expectation(count: Callable[[int], None], guard: Guard,
                navigable: bool = False) -> ExpectHandler:
    """The `Expect` handler of routes whose refusals ``count`` counts, guarded by ``guard``
    (``navigable`` as their routes are). aiohttp's answered `100 Continue` before the
    route ran, so a client uploaded a body the route then refused unread (over its limit,
    an agent too busy): ``read_raw`` sends it once the body is wanted. Any other
    expectation is a 417 in the guard's JSON, counted, where aiohttp's was plain text,
    uncounted; but only once the guard passes it (aiohttp runs this handler before the
    route and its guard): a request not allowed at all (a foreign Host or Origin) is told
    so, not what is wrong with its Expect. An HTTP/1.0 request's `Expect` is ignored, as
    aiohttp ignored it (RFC 9110 §10.1.1: its client cannot read a 100)."""
    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11 or expects_continue(request):
            return None
        resp = await guard.check(request, _unmet, navigable)
        if resp.status >= 400:   # not a CORS preflight's 204
            count(resp.status)
        return resp
    return expect


async def _unmet(request: web.Request) -> web.StreamResponse:
    """The 417 of an expectation other than 100-continue."""
    return json_reply(plain_error(417, f"unsupported Expect {request.headers['Expect']!r}:"
                                       " the only expectation taken is 100-continue"), 417)


def _ingest(handler: Handler, guard: Guard, navigable: bool, admission: Admission,
            count: Callable[[int], None]) -> Handler:
    passes, check = guard.passes, guard.check

    async def ingest(request: web.Request) -> web.StreamResponse:
        token = REFUSALS.set(count)
        try:
            # All given back once the handler is done (its events committed, or refused).
            with admission.ticket() as ticket:
                held = TICKET.set(ticket)
                try:
                    if passes(request):
                        resp = await handler(request)
                    else:
                        resp = await check(request, handler, navigable)
                finally:
                    TICKET.reset(held)
        except web.HTTPException as exc:
            if exc.status >= 400:
                count(exc.status)
            raise
        finally:
            REFUSALS.reset(token)
        if resp.status >= 400:
            count(resp.status)
        return resp
    return ingest
