"""A scriptable fake Segment collector: `POST /v1/batch` on 127.0.0.1, port 0.

Scripts: accept everything (default, 200 `{"success": true}`); fail the next
N requests with a status (and optional Retry-After), or every request during
an outage; refuse with 400 any batch holding a poison messageId, naming it;
refuse batches over a size; refuse unknown write keys with 401.
Every request is recorded with its auth, encoding and time; accepted events
are recorded in order.
"""

from __future__ import annotations

import base64
import gzip
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Request:
    """One POST as the collector saw it."""

    at: float
    auth: str | None
    write_key: str | None
    gzip: bool
    size: int
    body: dict[str, Any]
    status: int = 200
    raw: bytes = b""   # the body as it came (decompressed)
    # When it came by the collector's own clock (the machine's, never the agent's CLOCK):
    # a collector's `receivedAt`.
    received_at: float = field(default_factory=time.time)

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self.body.get("batch", []))


@dataclass
class FakeSegment:
    events: list[dict[str, Any]] = field(default_factory=list)     # accepted, in order
    requests: list[Request] = field(default_factory=list)
    poison: set[str] = field(default_factory=set)                   # messageIds -> 400
    failures: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Retry-After)
    outage: tuple[int, str | None] | None = None    # while set, every request gets this
    max_bytes: int | None = None                                    # larger bodies -> 413
    unknown_keys: set[str] = field(default_factory=set)             # write keys -> 401
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, times: int, status: int, retry_after: str | None = None) -> None:
        self.failures += [(status, retry_after)] * times

    def message_ids(self) -> list[Any]:
        return [ev.get("messageId") for ev in self.events]

    def accepted(self) -> list[Request]:
        return [r for r in self.requests if r.status == 200]

    async def _batch(self, request: web.Request) -> web.Response:
        raw = await request.read()
        size = len(raw)
        zipped = request.headers.get("Content-Encoding") == "gzip"
        if zipped:
            raw = gzip.decompress(raw)
        auth = request.headers.get("Authorization")
        key = None
        if auth and auth.startswith("Basic "):
            key = base64.b64decode(auth[6:]).decode().partition(":")[0]
        rec = Request(time.monotonic(), auth, key, zipped, size, orjson.loads(raw), raw=raw)
        self.requests.append(rec)
        rec.status, reply, headers = self._verdict(rec, len(raw))
        if rec.status == 200:
            self.events.extend(rec.events)
        return web.Response(body=orjson.dumps(reply), status=rec.status, headers=headers,
                            content_type="application/json")

    def _verdict(self, rec: Request, size: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        fault = self.failures.pop(0) if self.failures else self.outage
        if fault is not None:
            status, wait = fault
            return status, {"code": "failure"}, {"Retry-After": wait} if wait else {}
        if rec.write_key in self.unknown_keys:
            return 401, {"code": "unauthorized", "message": "unknown write key"}, {}
        if self.max_bytes is not None and size > self.max_bytes:
            return 413, {"code": "too_large", "message": f"{size} bytes"}, {}
        for ev in rec.events:
            if ev.get("messageId") in self.poison:
                return 400, {"code": "invalid_request",
                             "message": f"poison messageId {ev['messageId']}"}, {}
        return 200, {"success": True}, {}

    async def start(self) -> FakeSegment:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.add_routes([web.post("/v1/batch", self._batch)])
        # auto_decompress=False: record the size on the wire, and decode gzip here.
        self._runner = web.AppRunner(app, handle_signals=False, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
