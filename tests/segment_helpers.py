"""Helpers shared by the Segment-family tests: upstream configs and raw HTTP calls."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from agent.dialects import offload
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.waiting import wait_for

__all__ = ["Reply", "basic", "call", "fill_spool", "nucleus_up", "reloaded_while_read",
           "segment_up", "wait_for"]


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


async def reloaded_while_read(agent: Any, post: Callable[[], Awaitable[Reply]]) -> Reply:
    """``post``'s reply, a batch over 64 KiB (read and judged on the parse worker,
    agent/dialects/offload.py) with ``agent.reload()`` landing after the worker has read
    it, before its commit: the reload resumes (and applies its config) in the turn of the
    loop before the batch's commit does. The parse worker and the reload's hop off the loop
    (its preflight, asyncio.to_thread) each run on one thread, first come first served, held
    so that the test knows when each is done: unheld, the batch was stored before the
    reload applied, whatever the commit was held to."""
    held, go, read, hop_held, hop_go, hopped = (threading.Event() for _ in range(6))

    def hold(taken: threading.Event, until: threading.Event) -> None:
        taken.set()
        until.wait(30)

    hop = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-hop")
    asyncio.get_running_loop().set_default_executor(hop)
    worker = offload._worker
    try:
        worker.submit(hold, held, go)   # the batch's reading queues behind
        assert held.wait(30)
        sent = asyncio.create_task(post())
        await wait_for(lambda: worker._work_queue.qsize() == 1)
        worker.submit(read.set)   # runs once the batch is read
        hop.submit(hold, hop_held, hop_go)
        assert hop_held.wait(30)
        reloading = asyncio.ensure_future(agent.reload())
        await wait_for(lambda: hop._work_queue.qsize() == 1)   # its preflight, queued
        hop.submit(hopped.set)
        # The loop held from here until the batch is read: the reload's preflight is done
        # first.
        hop_go.set()
        assert hopped.wait(30)
        go.set()
        assert read.wait(30)
        reply = await sent
        assert await reloading
    finally:
        go.set()
        hop_go.set()
    return reply
