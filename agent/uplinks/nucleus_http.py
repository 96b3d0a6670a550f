"""Nucleus over HTTP: `POST {url}/app/{key}/track`, acks from the reply's `reportedIds`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks import splice
from agent.uplinks.base import (
    REJECTED_STATUSES,
    REQUEST_TIMEOUT,
    Acked,
    Retry,
    SendResult,
    UplinkBase,
    misconfigured,
    refusal,
)
from agent.uplinks.http_common import (
    excerpt,
    html_instead_of_reply,
    is_retryable,
    post,
    reply_cap,
    reply_json,
)
from agent.uplinks.nucleus_frame import NucleusFraming, frame, ids_only, match, track_url
from agent.uplinks.prepare import Prepared, escaped_extra, take_prefix


class NucleusHttpUplink(NucleusFraming, UplinkBase):
    """One request per batch; ids need only be unique within a request."""


    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                 machine_id: str) -> None:
        super().__init__(cfg, app_key, session, machine_id)
        self.url = track_url(cfg.url, cfg.key or app_key)

    def prepare(self, rows: Sequence[Row]) -> Prepared:
        return splice.take(self, rows, in_flight=()) or take_prefix(self, rows, in_flight=())

    async def send(self, prepared: Prepared) -> SendResult:
        if self.unsendable is not None:
            return Retry(self.unsendable)
        body = frame(prepared)
        # Its ids as an upstream that escapes non-ASCII may answer them (escaped_extra).
        most = reply_cap(len(body) + sum(map(escaped_extra, prepared.ids)), len(prepared.seqs))
        answer = await post(self.session, self.url, body, {"Content-Type": "application/json"},
                            self.cfg.timeout_s, most, self.proxy)
        if isinstance(answer, Retry):
            return answer
        status, raw, wait = answer.status, answer.body, answer.retry_after
        # Any 2xx: its reportedIds are the verdict (a NestJS collector answers a POST 201).
        answered = 200 <= status < 300
        unreadable = answer.unreadable
        if unreadable is not None and answered:   # its reportedIds are the verdict: unknown
            return Retry(f"HTTP {status} with a reply that could not be read "
                         f"({unreadable})", retry_after=wait)
        # Any other status is the verdict, read or not (a 413 from a server that resets as
        # it refuses: taken for no answer, the same batch went again for good). A JSON
        # reply is one whatever its label (Express's `res.send(string)` says text/html); a
        # body not read is judged by its type alone.
        if page := html_instead_of_reply(status, answer.content_type,
                                         None if unreadable else raw, len(prepared.seqs)):
            return Retry(page, retry_after=wait, too_slow=status == REQUEST_TIMEOUT)
        ids = _reported_ids(raw) if answered and not answer.cut else None
        # A 2xx that is no whole answer is a failure: its Retry-After is honoured, as any
        # status's (an upstream that stored part of a batch and asks for a pause).
        if answered and answer.cut:
            return Retry(f"a reply over {most} bytes, not read (a batch's answer is "
                         "its reportedIds)", retry_after=wait)
        if not answered:
            reason = answer.said(200)
            if is_retryable(status):
                return Retry(reason, retry_after=wait, too_slow=status == REQUEST_TIMEOUT)
            if status not in REJECTED_STATUSES:
                return misconfigured(status, reason, wait)
            # No per-event verdict: the forwarder splits the batch to find the culprit.
            return refusal(status, reason, wait, prepared, len(body))
        if not isinstance(ids, list):
            # No answer at all (an error in JSON, or not JSON): what it said is the clue.
            said = excerpt(raw, 200) or "nothing (an empty body)"
            return Retry(f"HTTP {status} without reportedIds; the upstream said {said}",
                         retry_after=wait)
        acked = match(dict(zip(prepared.ids, prepared.seqs)), ids)
        if len(acked) < len(prepared.seqs) and not ids_only(ids):
            # Not an answer for the events it leaves out: they are sent again, not weighed.
            return Retry(f"HTTP {status} with reportedIds that are not all ids; the upstream "
                         f"said {excerpt(raw, 200)}", retry_after=wait, acked=tuple(acked))
        if len(acked) < len(prepared.seqs):
            got = set(acked)
            # A well-formed reply answered for the whole batch: the rest was left out.
            return Retry("reply did not acknowledge every event", retry_after=wait,
                         acked=tuple(acked),
                         omitted=tuple(s for s in prepared.seqs if s not in got))
        return Acked(tuple(acked))


def _reported_ids(raw: bytes) -> Any:
    """The reply's `reportedIds` as sent (None when it is no JSON object)."""
    try:
        reply = reply_json(raw)
    except orjson.JSONDecodeError:
        return None
    return reply.get("reportedIds") if isinstance(reply, dict) else None
