"""Nucleus over a websocket: frames out, `reportedIds` back, several batches in flight.

The connection is opened on first use and kept; a heartbeat goes out after
60 s without traffic, as the official modules do. When the connection drops,
every waiting batch returns what was acked so far plus an error, and the
forwarder sends the rest again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..config import UpstreamConfig
from ..spool import Row
from .base import SendResult
from .http_common import html_instead_of_reply
from .nucleus_frame import FrameBuilder

log = logging.getLogger("outpost.uplink.nucleus_ws")
HEARTBEAT_S = 60.0


class NucleusWsUplink:
    """One websocket to `{url}/app/{key}/track`."""

    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                 machine_id: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.url = f"{cfg.url.rstrip('/')}/app/{cfg.key or app_key}/track"
        self.session = session
        self.machine_id = machine_id
        self.heartbeat_s = heartbeat_s
        self.frames = FrameBuilder(cfg.batch_max_events, cfg.batch_max_bytes)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._acked = asyncio.Event()
        self._acked_seqs: set[int] = set()
        self._last_sent = 0.0

    def take(self, rows: list[Row]) -> list[Row]:
        return self.frames.take(rows)

    async def send(self, batch: list[Row]) -> SendResult:
        failed = self.frames.pop_corrupt(batch)
        wanted = {r.seq for r in batch} - failed.keys()
        if not wanted:
            return SendResult(failed=failed)
        try:
            ws = await self._connection()
            await _send_text(ws, self.frames.frame(batch))
            self._last_sent = asyncio.get_running_loop().time()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, RuntimeError) as exc:
            self.frames.release(batch)
            return SendResult(failed=failed, error=f"connect/send failed: {_describe(exc)}")
        error = await self._wait_acks(wanted)
        acked = [s for s in wanted if s in self._acked_seqs]
        self._acked_seqs.difference_update(acked)
        if error:
            self.frames.release(batch)
            # Ids are only unique per connection: a late ack on this one could match
            # a different event that reuses the id after the resend, so start afresh.
            if self._ws is not None and not self._ws.closed:
                await self._ws.close()
        return SendResult(acked=sorted(acked), failed=failed, error=error)

    async def _wait_acks(self, wanted: set[int]) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.timeout_s
        while not wanted <= self._acked_seqs:
            if self._ws is None or self._ws.closed:
                return "connection lost before all acks arrived"
            remaining = deadline - loop.time()
            if remaining <= 0:
                return f"no reportedIds for {len(wanted - self._acked_seqs)} events within {self.cfg.timeout_s:g}s"
            self._acked.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._acked.wait(), remaining)
        return None

    async def _connection(self) -> aiohttp.ClientWebSocketResponse:
        async with self._connect_lock:
            if self._ws is None or self._ws.closed:
                # A redirect raises UpstreamRedirect: the session never follows one.
                try:
                    self._ws = await self.session.ws_connect(
                        self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5),
                        max_msg_size=0, autoping=True, heartbeat=None)
                except aiohttp.WSServerHandshakeError as exc:
                    # Its text holds the URL, and so the key in its path: keep the status.
                    raise aiohttp.ClientError(_handshake_refused(exc)) from None
                self._reader = asyncio.create_task(self._read(self._ws), name=f"ws-read-{self.name}")
                log.info("connected to %s (%s)", self.name, _redact(self.url))
            return self._ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        heartbeat = asyncio.create_task(self._heartbeats(ws))
        try:
            async for msg in ws:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self._on_message(msg.data)
        finally:
            heartbeat.cancel()
            self._acked.set()  # wake waiters so they see the drop

    def _on_message(self, data: str | bytes) -> None:
        try:
            reply: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("%s sent a reply that is not JSON; ignored", self.name)
            return
        if isinstance(reply, dict) and "reportedIds" in reply:
            acked = self.frames.match(reply["reportedIds"])
            if acked:
                self._acked_seqs.update(acked)
                self._acked.set()

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        frame = orjson.dumps({"data": [{"type": "heartbeat", "machineId": self.machine_id}]})
        while not ws.closed:
            idle = loop.time() - self._last_sent
            if idle >= self.heartbeat_s:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await _send_text(ws, frame)
                self._last_sent = loop.time()
                idle = 0
            await asyncio.sleep(self.heartbeat_s - idle)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def _send_text(ws: aiohttp.ClientWebSocketResponse, frame: bytes) -> None:
    """A text frame from UTF-8 bytes, without the decode/encode round trip of send_str."""
    send_frame = getattr(ws, "send_frame", None)  # aiohttp >= 3.11
    if send_frame is not None:
        await send_frame(frame, aiohttp.WSMsgType.TEXT)
    else:
        await ws.send_str(frame.decode())


def _handshake_refused(exc: aiohttp.WSServerHandshakeError) -> str:
    content_type = exc.headers.get("Content-Type", "") if exc.headers else ""
    content_type = content_type.partition(";")[0].strip()
    return "websocket handshake refused: " + (html_instead_of_reply(exc.status, content_type)
                                              or f"HTTP {exc.status} ({exc.message})")


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _redact(url: str) -> str:
    """The key is in the path; keep only its first characters in logs. No URL password."""
    password = urlsplit(url).password
    if password:
        url = url.replace(f":{password}@", ":***@", 1)
    head, sep, tail = url.rpartition("/app/")
    if not sep:
        return url
    key, _, rest = tail.partition("/")
    return f"{head}/app/{key[:3]}***/{rest}"
