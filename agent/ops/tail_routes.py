"""GET /tail: the live event view as Server-Sent Events, for `outpost tail` and the page.

Behind the same guard as every operations route (loopback Host, allowed Origins), and
stricter: a browser may read it only from the agent's own page, because it lists every
app's events, and an app's allowed web origin has no business reading other apps'.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from agent.clock import CLOCK
from agent.dialects.base import CLIENT_EOF
from agent.logs import FINGERPRINT
from agent.ops.own_origin import foreign
from agent.ops.shared_terms import CHECK_S, STALL_S
from agent.ops.tail import MAX_VIEWERS, RATE, REPLACED, STALLED, STOPPING, TailHub, Viewer

KEEPALIVE_S = 15.0    # a comment line, so proxies and clients see a live connection
# How long the last message (why the stream ends) waits for a reader that is behind
# before the connection is cut; none when the agent is stopping.
GRACE_S = 30.0

# What the stream's last message says of why it ends.
DETAILS = {REPLACED: f"a newer view took its place: at most {MAX_VIEWERS} are open at once",
           STALLED: f"it read nothing for {STALL_S:g} s",
           STOPPING: "it is stopping"}


class TailRoutes:
    """The SSE endpoint over a ``TailHub``."""

    def __init__(self, hub: TailHub) -> None:
        self.hub = hub

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/tail", self.stream)]

    async def stream(self, request: web.Request) -> web.StreamResponse:
        why = foreign(request, "the live event view")
        if why is not None:
            return web.json_response({"error": why}, status=403)
        extra = sorted(set(request.query) - {"key"})
        if extra:
            # Nothing else is taken; a writeKey= here would be a secret in a URL.
            return web.json_response(
                {"error": f"unknown parameter(s) {', '.join(extra)}: only key is taken"},
                status=400)
        want = request.query.get("key") or None
        if want is not None and not FINGERPRINT.fullmatch(want):
            # A raw key here would sit in URLs and histories: only its fingerprint is taken.
            return web.json_response(
                {"error": "key must be a fingerprint (k:xxxxxxxx) as `outpost tail --key` "
                          "sends it, never the key itself"}, status=400)
        if self.hub.closed:
            return web.json_response(
                {"error": "the agent is stopping: it opens no new live view"}, status=503)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff"})
        if request.method == "HEAD":
            # The stream's headers, no stream: a view would take one of MAX_VIEWERS places
            # for as long as the connection stayed open, and show it nothing.
            await resp.prepare(request)
            return resp
        viewer = self.hub.watch(want)
        assert viewer is not None   # None only once closed: checked above, with no await since
        try:
            await resp.prepare(request)
            pump = asyncio.ensure_future(self._pump(resp, viewer))
            try:
                ended = await self._watch(request, viewer, pump)
            finally:
                pump.cancel()
            if ended is not None:
                await _end(request, resp, ended)
        except ConnectionError:
            # The viewer went away: a write finds the transport gone (ConnectionResetError),
            # or one waiting for the reader is failed by the connection's loss (a reset: a
            # plain ConnectionError). Escaped, aiohttp logs either at ERROR with a traceback.
            pass
        finally:
            self.hub.leave(viewer)
        return resp

    async def _pump(self, resp: web.StreamResponse, viewer: Viewer) -> None:
        """Send the viewer what it is given, until it has ended."""
        await _send(resp, viewer, [{"kind": "watching", "key": viewer.want,
                                    "viewers": len(self.hub.viewers)}])
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    await viewer.wake.wait()
            except TimeoutError:
                await _write(resp, viewer, b": keepalive\n\n")
                continue
            viewer.wake.clear()
            batch = viewer.take()
            if batch is None:
                return
            await _send(resp, viewer, batch)
            # Paced: a viewer's summaries share the event loop with ingest, so each
            # viewer costs it at most RATE of them a second; past that its queue
            # fills and the overflow is dropped (counted) at no cost to ingest.
            await asyncio.sleep(len(batch) / RATE)

    async def _watch(self, request: web.Request, viewer: Viewer,
                     pump: asyncio.Future[None]) -> str | None:
        """Why the stream is to end (``viewer.ended``), or None once the viewer has left.
        Looked at every CHECK_S: the pump may be held in a write that waits for a reader
        that never reads, and would notice nothing."""
        while True:
            done, _ = await asyncio.wait((pump,), timeout=CHECK_S)
            if done:
                pump.result()   # a ConnectionError: the viewer left
                return viewer.ended
            if viewer.ended is not None:   # replaced, or stopping, while a write waits
                return viewer.ended
            if request.transport is None or request.transport.is_closing() \
                    or request.get(CLIENT_EOF):   # its client ended its side: it left
                return None
            since = viewer.writing_since
            if since is not None and CLOCK.elapsed_ms() - since >= STALL_S * 1000:
                self.hub.end(viewer, STALLED)
                return STALLED


async def _write(resp: web.StreamResponse, viewer: Viewer, data: bytes) -> None:
    """One write, and while it waits for the reader (the connection's buffers are
    full), since when."""
    viewer.writing_since = CLOCK.elapsed_ms()
    await resp.write(data)
    viewer.writing_since = None


async def _send(resp: web.StreamResponse, viewer: Viewer,
                messages: list[dict[str, object]]) -> None:
    """One write (one drain) for everything taken: a viewer that is behind catches up in
    few large writes rather than many small ones."""
    await _write(resp, viewer, b"".join(b"data: " + orjson.dumps(m) + b"\n\n"
                                        for m in messages))


async def _end(request: web.Request, resp: web.StreamResponse, reason: str) -> None:
    """End the stream with a message that says why. A reader that is behind has GRACE_S
    to take it (none when the agent is stopping); then the connection is cut."""
    last = orjson.dumps({"kind": "closed", "reason": reason, "detail": DETAILS[reason]})
    resp.force_close()   # and the connection with it: a client opens a new one to watch again
    try:
        async with asyncio.timeout(0 if reason == STOPPING else GRACE_S):
            await resp.write_eof(b"data: " + last + b"\n\n")
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
