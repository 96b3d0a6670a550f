"""Dead-letter endpoints of a running agent, for `outpost dead`.

GET /dead (summary and entries, those of ?reason=R and ?upstream=U alone), GET /dead/{id}
(one, with its body), GET /dead/export (JSONL, with bodies), POST /dead/retry and POST
/dead/purge (JSON {"reason": R} or {"all": true}, either with "upstream": U for that
upstream's letters alone). They sit behind the same Host/Origin guard as every route,
and are stricter still: bodies are app data and these change the spool, so no web page
of another origin may reach them, even one listed in listen.allowed_origins (that list
is for apps sending events). Only local tools (no Origin, no Sec-Fetch-Site) and the
agent's own page pass, on this machine (own_origin.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from agent.clock import CLOCK
from agent.dialects.body import BodyError, Stalled, read_raw
from agent.families.event import now_ms
from agent.logs import log_limited
from agent.ops.own_origin import foreign
from agent.ops.shared_terms import CHECK_S, EXPORT_PAGE, LIST_LIMIT, STALL_S
from agent.paths import same_file
from agent.spool import Spool, dead, dead_live
from agent.terminal import os_text

log = logging.getLogger("outpost.dead")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A retry or purge request, {"reason": R, "all": false, "upstream": U}, as `outpost dead`
# sends it: UTF-8, at most 6 bytes a character (a control character's \u escape). A reason
# is at most ~400 characters (an upstream's words cut to 300 by segment-http, 200 by the
# Nucleus uplinks, and a few dozen of the agent's own); agent.toml sets no length for an
# upstream's name: 2,000 characters is far past any a person writes. 4 KiB refused the
# longest reason of emoji beside a name of 100 CJK characters, sent as JSON escapes. And
# the spool's path it is meant for: at most PATH_MAX, 4,096 bytes of UTF-8.
BODY_LIMIT = 32 * 1024   # over 6 * (400 + 2000) + 4096 and the JSON around them


class _Refused(Exception):
    """A request refused with ``status`` before the spool is touched: 4xx for the client's
    own mistake (409 is kept for a spool that cannot take the operation now)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class DeadRoutes:
    """The endpoints over ``spool``."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    async def _which(self, request: web.Request) -> dead.Which:
        # JSON only: a cross-site <form> cannot send it without a preflight.
        if request.content_type != "application/json":
            raise _Refused(415, "send JSON: {\"reason\": R} or {\"all\": true}")
        # Refused before reading: a client announcing a huge body must not hold us.
        if request.content_length is None:
            raise _Refused(411, "send a Content-Length")
        if request.content_length > BODY_LIMIT:
            raise _Refused(413, f"body over {BODY_LIMIT} bytes")
        try:
            # As an API's body: a deadline (listen.body_timeout_s), a client gone mid-body.
            body = orjson.loads(await read_raw(request, BODY_LIMIT))
        except BodyError as exc:
            if isinstance(exc, Stalled):   # an operator's tool, no SDK: told what happened
                exc = exc.timed_out()
            said = f"{exc.message}: {exc.details}" if exc.details else exc.message
            raise _Refused(exc.status, said) from exc
        except orjson.JSONDecodeError as exc:
            raise _Refused(400, f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _Refused(400, "send a JSON object")
        reason, upstream = body.get("reason"), body.get("upstream")
        # Refused, never taken for none: the letters of every upstream would go.
        if upstream is not None and not (isinstance(upstream, str) and upstream):
            raise _Refused(400, "upstream is an upstream's name, as `outpost dead list` "
                           "shows it")
        if "spool" in body:
            self._meant_for_this_spool(body["spool"])
        which = dead.Which(reason if isinstance(reason, str) else None, body.get("all") is True,
                           upstream)
        try:
            which.where()  # refuses neither-nor here, before touching the spool
        except dead.DeadError as exc:
            raise _Refused(400, str(exc)) from exc
        return which

    def _meant_for_this_spool(self, theirs: Any) -> None:
        """A retry or purge for the agent on the spool ``theirs`` (`outpost dead` sends its
        config's storage.path, resolved): refused by another agent, which answers there when
        two configs share a listen.port, its own letters left alone."""
        if not isinstance(theirs, str) or not theirs:
            raise _Refused(400, "spool is the path of the spool the request is meant for")
        mine = self.spool.path
        if os_text(os.path.realpath(mine)) == theirs or same_file(mine, Path(theirs)):
            return
        raise _Refused(409, f"this agent runs on the spool {os_text(mine)}, not on {theirs} "
                       "(the storage.path of the config the command was given): nothing was "
                       "done; name this agent's config with --config, or give that config a "
                       "listen.port of its own")

    async def listing(self, request: web.Request) -> web.Response:
        reason, upstream = request.query.get("reason"), request.query.get("upstream")
        if upstream == "":   # refused, never taken for none: every upstream's would show
            raise _Refused(400, "upstream is an upstream's name, as `outpost dead list` "
                           "shows it")
        which = (dead.Which(reason, reason is None, upstream)
                 if reason is not None or upstream is not None else None)
        try:
            limit = min(LIST_LIMIT, max(0, int(request.query.get("limit", LIST_LIMIT))))
        except ValueError:
            raise _Refused(400, "limit is a number") from None
        # Ages by the time the agent saw pass (dead.Now): a wall clock corrected since the
        # letters were made (from 1970, say) does not make them decades old.
        now = dead.Now(now_ms(), self.spool.observed_ms())

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            # The newest groups only: each letter may have a reason of its own (an upstream
            # naming each event it refuses), and a spool holds millions of letters.
            summary = dead.summary(conn, LIST_LIMIT, now=now)
            summary["entries"] = dead.entries(conn, which, limit, now)
            if reason is not None:   # its letters, which the newest groups may leave out
                summary["of_reason"] = dead.of_reason(conn, reason)
            if upstream is not None and which is not None:   # its (with the reason's)
                summary["of_upstream"] = dead.chosen(conn, which)
            # Retry and purge take "upstream": the CLI asks before sending one, as an agent
            # older than this ignores it and takes the letters of every upstream.
            summary["by_upstream"] = True
            return summary
        # One read: damage it meets salvages the spool, and the whole listing is read again
        # from the fresh one (a summary read before would count letters salvaged away).
        return web.json_response(await dead_live.read(self.spool, read))

    async def show(self, request: web.Request) -> web.Response:
        text = request.match_info["seq"]
        try:
            seq = int(text)
        except ValueError:   # more digits than int() takes (4300): no seq has them
            raise dead.NoSuchLetter(f"no dead letter with id {text[:20]}...") from None
        return web.json_response(await dead_live.read(self.spool, dead.show, seq))

    async def export(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-store"})
        if request.method == "HEAD":   # GET's headers, without reading every letter for them
            dead_live.readable(self.spool)
            resp.enable_chunked_encoding()   # as GET's: the length is not known up front
            await resp.prepare(request)
            return resp
        # A page at a time: dead letters can fill the spool, and the body is streamed.
        lines, last = await dead_live.read(self.spool, dead.export, 0, EXPORT_PAGE)
        await resp.prepare(request)
        sent = 0
        try:
            while lines:
                if not await _taken(request, resp.write(lines)):
                    return _stalled(request, resp, sent)
                sent += lines.count(b"\n")
                del lines   # not held while the next page is read
                lines, last = await dead_live.read(self.spool, dead.export, last, EXPORT_PAGE)
            if not await _taken(request, resp.write_eof()):
                return _stalled(request, resp, sent)
        except ConnectionError:
            # The reader left (`outpost dead export - | head`): no fault of the agent's. Raised,
            # aiohttp logs it as one, at ERROR with a traceback; returned, the end it then
            # fails to write is a client gone, which aiohttp drops quietly.
            log.debug("dead-letter export: the reader left after %d letters", sent)
            return resp
        except Exception as exc:
            # The status went out with the headers: the only way left to say "failed" is
            # to close the connection before the stream's last chunk, which the client
            # reads as cut short (a clean end would pass the letters sent as all of them).
            log_limited(log, logging.ERROR, "dead-failed", "dead-letter export cut short "
                        "after %d letters: %s: %s", sent, type(exc).__name__, exc)
            if request.transport is not None:
                request.transport.close()
            return resp   # its end is then not written: aiohttp sees a closed connection
        return resp

    async def retry(self, request: web.Request) -> web.Response:
        n = await dead_live.retry(self.spool, await self._which(request))
        return web.json_response({"retried": n, "queue_depth": self.spool.depth})

    async def purge(self, request: web.Request) -> web.Response:
        n = await dead_live.purge(self.spool, await self._which(request))
        return web.json_response({"purged": n, "dead_letters": self.spool.dead_count})

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/dead", _strict(self.listing)),
                web.get("/dead/export", _strict(self.export)),
                web.get(r"/dead/{seq:\d+}", _strict(self.show)),
                web.post("/dead/retry", _strict(self.retry)),
                web.post("/dead/purge", _strict(self.purge))]


async def _taken(request: web.Request, write: Awaitable[None]) -> bool:
    """Whether ``write`` (of an export) was taken by its reader; False once the reader has
    taken nothing of what waits for it for STALL_S (by CLOCK): never ended, the route would
    hold the connection, which is never idle meanwhile, and the page waiting, for good. A
    slow reader still reads, and is waited for."""
    task = asyncio.ensure_future(write)
    since, waiting = CLOCK.elapsed_ms(), None
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=CHECK_S)
            if done:
                task.result()   # a ConnectionError: the reader left
                return True
            transport = request.transport
            left = transport.get_write_buffer_size() if transport is not None else 0
            if waiting is None or left < waiting:   # the reader took some: still reading
                since = CLOCK.elapsed_ms()
            waiting = left
            if CLOCK.elapsed_ms() - since >= STALL_S * 1000:
                return False
    finally:
        task.cancel()   # given up on, or the route cancelled (a stop): none of it goes on


def _stalled(request: web.Request, resp: web.StreamResponse, sent: int) -> web.StreamResponse:
    """An export whose reader stopped reading, cut: the connection, and what waits in it,
    go at once (a close would wait for that reader), and with no last chunk the reader, if
    it reads again, finds the export cut short."""
    log_limited(log, logging.WARNING, "dead-stalled", "dead-letter export cut after %d "
                "letters: its reader read nothing for %g s", sent, STALL_S)
    if request.transport is not None:
        request.transport.abort()
    return resp


def _strict(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        why = foreign(request, "the dead-letter endpoints")
        if why is not None:
            return _error(403, why)
        try:
            return await handler(request)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        except dead.NoSuchLetter as exc:
            return _error(404, str(exc))
        except dead.DeadError as exc:
            return _error(409, str(exc))
        except sqlite3.Error as exc:
            # The spool failing (an I/O error, a damaged file): said as such. A bare 500
            # was taken by `outpost dead` for another server on the agent's port.
            log_limited(log, logging.ERROR, "dead-failed", "dead-letter request %s failed: "
                        "the spool: %s", request.path, exc)
            return _error(503, f"the spool failed: {exc}")
    return handle
