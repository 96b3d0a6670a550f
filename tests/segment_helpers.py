"""Helpers shared by the Segment-family tests: upstream configs and raw HTTP calls."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.waiting import wait_for

__all__ = ["Reply", "basic", "call", "fill_spool", "nucleus_up", "segment_up", "wait_for"]


def segment_up(fake: FakeSegment, **kw: Any) -> dict[str, Any]:
    return {"name": "segment", "protocol": "segment-http", "url": fake.url,
            "flush_interval_s": 0.05, "timeout_s": 2, **kw}


def nucleus_up(fake: FakeNucleus, **kw: Any) -> dict[str, Any]:
    return {"name": "nucleus", "protocol": "nucleus-http", "url": fake.http_url,
            "flush_interval_s": 0.05, "timeout_s": 2, **kw}


def basic(user: str, colon: bool = True) -> str:
    return "Basic " + base64.b64encode((user + (":" if colon else "")).encode()).decode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(port: int, path: str, body: Any = None, *, method: str = "POST",
               headers: dict[str, str] | None = None, gzipped: bool = False) -> Reply:
    """One request to the agent; ``body`` is sent as given (str/bytes) or as JSON."""
    data: bytes | None
    if body is None or isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = orjson.dumps(body)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if gzipped and data is not None:
        data = gzip.compress(data)
        hdrs["Content-Encoding"] = "gzip"
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.request(method, f"http://127.0.0.1:{port}{path}", data=data,
                             headers=hdrs) as r:
            return Reply(r.status, dict(r.headers), await r.read())


async def fill_spool(port: int) -> None:
    """Fill an agent's spool (start it with max_size_mb = 1) until a small track is refused.
    Random properties: records are compressed, and repeated letters would take no room.
    (A batch refused for want of room is a 429, a single call a 503.)"""
    auth = {"Authorization": basic("filler")}
    big = {"batch": [{"type": "track", "userId": "u", "event": "e",
                      "properties": {"x": os.urandom(15_000).hex()}} for _ in range(15)]}
    for _ in range(10):
        if (await call(port, "/v1/batch", big, headers=auth)).status in (429, 503):
            break
    # Then single tracks, each size until one is refused, down to a small one: a few
    # requests a size, where the room a batch left took ~275 small ones (a commit each).
    for pad in (15_000, 3_000, 600, 120, 0):
        for i in range(500):
            small = {"userId": "u", "event": "e", "messageId": f"fill-{pad}-{i}",
                     **({"properties": {"x": os.urandom(pad).hex()}} if pad else {})}
            if (await call(port, "/v1/track", small, headers=auth)).status == 503:
                break
        else:
            raise AssertionError("the spool never filled")


async def tail_messages(resp: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` data messages of an open live view (GET /tail) stream."""
    got: list[dict[str, Any]] = []
    while len(got) < n:
        line = await asyncio.wait_for(resp.content.readline(), 20)
        if line.startswith(b"data: "):
            got.append(json.loads(line[6:]))
    return got
