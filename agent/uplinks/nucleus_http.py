"""Nucleus over HTTP: `POST {url}/app/{key}/track`, acks from the reply's `reportedIds`."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.base import REJECTED_STATUSES, SendResult, UplinkBase
from agent.uplinks.http_common import html_instead_of_reply, is_retryable, post
from agent.uplinks.nucleus_frame import FrameBuilder


class NucleusHttpUplink(UplinkBase):
    """One request per batch; ids need only be unique within a request."""

    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.url = f"{cfg.url.rstrip('/')}/app/{cfg.key or app_key}/track"
        self.session = session
        self.frames = FrameBuilder(cfg.batch_max_events, cfg.batch_max_bytes)

    def take(self, rows: list[Row]) -> list[Row]:
        return self.frames.take(rows)

    async def send(self, batch: list[Row]) -> SendResult:
        failed = self.frames.pop_corrupt(batch)
        if not self.frames.sendable(batch):
            return SendResult(failed=failed)
        body = self.frames.frame(batch)
        answer = await post(self.session, self.url, body, {"Content-Type": "application/json"},
                            self.cfg.timeout_s)
        if isinstance(answer, str):
            self.frames.release(batch)
            return SendResult(failed=failed, error=answer)
        status, raw, wait = answer.status, answer.body, answer.retry_after
        if portal := html_instead_of_reply(status, answer.content_type):
            self.frames.release(batch)
            return SendResult(failed=failed, error=portal)
        if status != 200:
            self.frames.release(batch)
            if is_retryable(status):
                return SendResult(failed=failed, error=f"HTTP {status}", retry_after=wait)
            if status not in REJECTED_STATUSES:
                return SendResult(failed=failed,
                                  error=f"HTTP {status} (check the upstream's url and key)")
            # No per-event verdict: the forwarder splits the batch to find the culprit.
            return SendResult(failed=failed,
                              rejected=f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}")
        try:
            reply: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = None
        acked = self.frames.match(reply.get("reportedIds") if isinstance(reply, dict) else None)
        self.frames.release(batch)
        if len(acked) + len(failed) < len(batch):
            return SendResult(acked=acked, failed=failed, error="reply did not acknowledge every event")
        return SendResult(acked=acked, failed=failed)

    async def close(self) -> None:
        return None
