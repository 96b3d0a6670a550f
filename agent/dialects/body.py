"""Reading request bodies for every dialect: size limits, gzip, JSON.

Limits are enforced while reading, so an oversized body is refused without
being read whole, and a gzip bomb is stopped at the same limit.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import orjson
from aiohttp import web

CHUNK = 65536
# listen.body_timeout_s, set by the app builder: a body stalled past it gets a 408.
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)


class BodyError(Exception):
    """A client mistake in the body; each dialect renders it in its own shape."""

    def __init__(self, status: int, message: str, details: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


async def read_raw(request: web.Request, limit: int) -> bytes:
    """The body, decoded per Content-Encoding, refused past ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyError(413, "request body too large", f"{length} bytes, limit {limit}")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
        raise BodyError(415, f"unsupported Content-Encoding {encoding!r}")
    if request.content.is_eof():  # the whole body came with the head: the usual case
        raw = await _read(request, limit)
    else:
        seconds = request.app[BODY_TIMEOUT_S]
        try:
            async with asyncio.timeout(seconds):
                raw = await _read(request, limit)
        except TimeoutError:
            raise BodyError(408, "request body not received in time",
                            f"incomplete after {seconds:g} s (listen.body_timeout_s)") from None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _inflate(bytes(raw), encoding, limit)
    return bytes(raw)


async def _read(request: web.Request, limit: int) -> bytearray:
    raw = bytearray()
    while chunk := await request.content.read(CHUNK):
        raw += chunk
        if len(raw) > limit:
            raise BodyError(413, "request body too large", f"over {limit} bytes")
    return raw


def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
    wbits = 47 if encoding != "deflate" else 15  # 47: gzip or zlib header, auto-detected
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BodyError(400, f"invalid {encoding} body", str(exc)) from exc
    if len(out) > limit:
        raise BodyError(413, "request body too large", f"over {limit} bytes once decompressed")
    if not inflater.eof:
        raise BodyError(400, f"truncated {encoding} body")
    return out


def parse_json(raw: bytes | str) -> Any:
    if not raw:
        raise BodyError(400, "empty body: expected JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "invalid JSON", str(exc)) from exc
