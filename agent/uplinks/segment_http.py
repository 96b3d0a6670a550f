"""Segment HTTP: `POST {url}/v1/batch`, Basic auth with the write key.

The body is `{"batch": [...], "sentAt": now}`, and each event's `sentAt` is
set at send time too, so a collector can correct the device's clock skew
(`timestamp = receivedAt - (sentAt - originalTimestamp)`). Stored Segment
bodies never carry `sentAt` (the dialects drop the client's), so it is
spliced in front of each body without re-encoding it. Nucleus rows are
mapped with ``mapping.nucleus_to_segment``.

Any 2xx acknowledges the whole batch, unless its body is an HTML page: that
is a captive portal's login page, never a collector's reply. A redirect is a
failure, retried (see http_common). 408, 429 and 5xx are retried,
honouring Retry-After. 400, 413 and 422 mean the batch itself is refused:
the forwarder splits it to isolate the events at fault, which go to dead
letters with the upstream's reason. Other statuses (401, 403, 404: a wrong
key or URL) are a configuration problem, retried with backoff, so that a
typo does not dead-letter the whole queue.
"""

from __future__ import annotations

import base64
import gzip
from typing import Any

import aiohttp
import orjson

from agent.families import mapping
from agent.families.event import NUCLEUS, iso_ms, now_ms
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.base import REJECTED_STATUSES, SendResult, UplinkBase
from agent.uplinks.http_common import html_instead_of_reply, is_retryable, post

_SENT_AT = len(b'"sentAt":"2026-01-01T00:00:00.000Z",')
_ENVELOPE = len(b'{"batch":[],"sentAt":"2026-01-01T00:00:00.000Z"}')


class SegmentHttpUplink(UplinkBase):
    """One request per batch; the whole batch is acknowledged or not."""

    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.url = f"{cfg.url.rstrip('/')}/v1/batch"
        token = base64.b64encode(f"{cfg.key or app_key}:".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
                        "User-Agent": "outpost"}
        if cfg.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.session = session
        self._bodies: dict[int, bytes] = {}   # seq -> event JSON, for taken rows
        self._failed: dict[int, str] = {}     # seq -> why a taken row can never be sent

    def take(self, rows: list[Row]) -> list[Row]:
        """The longest prefix of ``rows`` within batch_max_events and batch_max_bytes."""
        taken: list[Row] = []
        size = _ENVELOPE
        for row in rows[: self.cfg.batch_max_events]:
            try:
                body = self._outgoing(row)
            except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError, ValueError) as exc:
                self._failed[row.seq] = f"corrupt row: {exc}"
                taken.append(row)
                continue
            cost = len(body) + _SENT_AT + 1
            if _ENVELOPE + cost > self.cfg.batch_max_bytes:
                # Alone over the upstream's limit: it can never be delivered.
                self._failed[row.seq] = (f"event of {len(body)} bytes exceeds batch_max_bytes "
                                         f"({self.cfg.batch_max_bytes}) of {self.name}")
                taken.append(row)
                continue
            if taken and size + cost > self.cfg.batch_max_bytes:
                break
            self._bodies[row.seq] = body
            size += cost
            taken.append(row)
        return taken

    def _outgoing(self, row: Row) -> bytes:
        if row.family == NUCLEUS:
            ev: Any = orjson.loads(row.body)
            if not isinstance(ev, dict):
                raise ValueError("stored event is not an object")
            return orjson.dumps(mapping.nucleus_to_segment(ev, row.received))
        body = bytes(row.body)
        if not body.startswith(b"{") or not body.endswith(b"}"):
            raise ValueError("stored event is not an object")
        return body

    def payload(self, batch: list[Row], sent_at: str) -> bytes:
        """The request body: every sendable event with `sentAt` spliced in first."""
        stamp = b'{"sentAt":"' + sent_at.encode() + b'"'
        events = []
        for row in batch:
            body = self._bodies.get(row.seq)
            if body is not None:
                rest = body[1:]
                events.append(stamp + (rest if rest.lstrip().startswith(b"}") else b"," + rest))
        return (b'{"batch":[' + b",".join(events) + b'],"sentAt":"' + sent_at.encode()
                + b'"}')

    async def send(self, batch: list[Row]) -> SendResult:
        failed = {r.seq: self._failed.pop(r.seq) for r in batch if r.seq in self._failed}
        if not any(r.seq in self._bodies for r in batch):
            return SendResult(failed=failed)
        body = self.payload(batch, iso_ms(now_ms()))
        for row in batch:
            self._bodies.pop(row.seq, None)
        if self.cfg.gzip:
            body = gzip.compress(body, compresslevel=6)
        reply = await post(self.session, self.url, body, self.headers, self.cfg.timeout_s)
        if isinstance(reply, str):
            return SendResult(failed=failed, error=reply)
        status, raw, wait = reply.status, reply.body, reply.retry_after
        if portal := html_instead_of_reply(status, reply.content_type):
            return SendResult(failed=failed, error=portal)
        if 200 <= status < 300:
            return SendResult(acked=[r.seq for r in batch if r.seq not in failed], failed=failed)
        reason = f"HTTP {status}: {raw[:300].decode('utf-8', 'replace')}".rstrip(": ")
        if status in REJECTED_STATUSES:
            return SendResult(failed=failed, rejected=reason)
        if is_retryable(status):
            return SendResult(failed=failed, error=reason, retry_after=wait)
        return SendResult(failed=failed, error=f"{reason} (check the upstream's url and key)")

    async def close(self) -> None:
        return None
