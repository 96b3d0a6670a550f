"""GET /tail: the live event view as Server-Sent Events, for `outpost tail` and the page.

Behind the same guard as every operations route (loopback Host, allowed Origins), and
stricter: a browser may read it only from the agent's own page, because it lists every
app's events, and an app's allowed web origin has no business reading other apps'.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from agent.logs import FINGERPRINT
from agent.ops.own_origin import foreign
from agent.ops.tail import MAX_VIEWERS, RATE, TailHub

KEEPALIVE_S = 15.0    # a comment line, so proxies and clients see a live connection
CHECK_S = 1.0         # how soon a viewer that left is noticed when nothing is sent


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
        viewer = self.hub.watch(want)
        if viewer is None:
            return web.json_response(
                {"error": f"at most {MAX_VIEWERS} live views at once, or the agent is "
                          "stopping"}, status=503)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff"})
        try:
            await resp.prepare(request)
            await _send(resp, [{"kind": "watching", "key": want,
                                "viewers": len(self.hub.viewers)}])
            quiet = 0.0
            while True:
                try:
                    await asyncio.wait_for(viewer.wake.wait(), CHECK_S)
                except asyncio.TimeoutError:
                    # Nothing to send: notice a viewer that left, so it stops counting.
                    if request.transport is None or request.transport.is_closing():
                        return resp
                    quiet += CHECK_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        await resp.write(b": keepalive\n\n")
                    continue
                viewer.wake.clear()
                batch = viewer.take()
                if batch is None:   # the agent is stopping
                    return resp
                await _send(resp, batch)
                quiet = 0.0
                # Paced: a viewer's summaries share the event loop with ingest, so each
                # viewer costs it at most RATE of them a second; past that its queue
                # fills and the overflow is dropped (counted) at no cost to ingest.
                await asyncio.sleep(len(batch) / RATE)
        except ConnectionResetError:   # the viewer went away
            return resp
        finally:
            self.hub.leave(viewer)


async def _send(resp: web.StreamResponse, messages: list[dict[str, object]]) -> None:
    """One write (one drain) for everything taken: a viewer that is behind catches up in
    few large writes rather than many small ones."""
    await resp.write(b"".join(b"data: " + orjson.dumps(m) + b"\n\n" for m in messages))
