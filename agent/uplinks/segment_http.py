"""Segment HTTP: `POST {url}/v1/batch`, Basic auth with the write key.

The body is `{"batch": [...], "sentAt": now}`, and each event's `sentAt` is
set at send time too, so a collector can correct the device's clock skew
(`timestamp = receivedAt - (sentAt - originalTimestamp)`): now, or for an event
received under a clock set since, now by that clock (own_sent_at). Stored Segment
bodies never carry `sentAt` (the dialects drop the client's), so it is
spliced in front of each body without re-encoding it. Nucleus rows reach
it already mapped (prepare.py).

An HTML page, whatever the status, is a captive portal's login page or a proxy's
error page, never a collector's reply: retried with backoff. So is a 2xx whose JSON says
`"success": false` (in any case), unless it names the refused messages as below. Any
other 2xx, read whole, acknowledges the whole batch, unless it is a 207:
some messages were refused. Another Outpost's 207 names each by its place in the
batch (`batch[i]`) with a 400, 413 or 422 of its own: those go to dead letters,
the rest is acknowledged (and so for its 200 with the same body, which it answers
when the first message comes from a client that takes only a 200). Any other 207,
and such a 200 longer than the reply read for its batch (reply_cap), is split like a
400 to find them. A
redirect is a failure, retried (see http_common). 408, 429 and 5xx are retried,
honouring Retry-After (after a 408, in smaller batches: base.REQUEST_TIMEOUT). 400, 413 and 422 mean the batch itself is refused:
the forwarder splits it to isolate the events at fault, which go to dead
letters with the upstream's reason. Other statuses (401, 403, 404: a wrong
key or URL) are a configuration problem, retried with backoff (honouring a
Retry-After), so that a typo does not dead-letter the whole queue; and so is
a 400 whose body blames the write key (MetaRouter's "Invalid or missing
writekey").
"""

from __future__ import annotations

import base64
import gzip
import re
from collections.abc import Iterable, Mapping
from operator import attrgetter
from typing import Any, ClassVar

import aiohttp
import orjson

from agent.clock import CLOCK
from agent.families.event import SEGMENT, compact_json, iso_ms, now_ms
from agent.logs import redacted_head
from agent.settings import UpstreamConfig
from agent.spool.types import Queued, Row
from agent.uplinks.base import (
    REJECTED_STATUSES,
    REQUEST_TIMEOUT,
    Acked,
    Refused,
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
from agent.uplinks.prepare import Prepared
from agent.uplinks.splice import objects, stamped

# A wall clock whose lead on the agent's count moved by more than this since an event's
# receipt was set meanwhile: the event gets its own `sentAt` (own_sent_at). Less is the
# two clocks' jitter, and the time between the receipt and the start of its commit (the
# count's reading), which a slow disk can stretch past seconds: a lead moved by that wait
# would send the event's `sentAt` early by it, and a receiver would place it that late.
CLOCK_SET_MS = 60_000
_LEAD = attrgetter("lead")
# Part of the batch stored, part refused (an Outpost upstream answers so).
MULTI_STATUS = 207
# ASCII digits, few enough for int(): past 4,300 it raises (the reply is the upstream's).
_PLACE = re.compile(r"batch\[([0-9]{1,9})\]")
# A refusal that blames the write key, not the events (MetaRouter answers a wrong or missing
# key with 400 "Invalid or missing writekey"): the configuration's fault, as a 401 is.
_KEY_REFUSED = re.compile(rb"(?:invalid|missing|unknown|wrong)[a-z ]{0,16}write[ _-]?key",
                          re.IGNORECASE)
# A reply that may say the batch failed (_says_failed), for a 2xx: a collector's own word.
_FAILED = re.compile(rb'"success"\s*:\s*false', re.IGNORECASE)
_KEY_SEARCHED = 4096   # bytes of a refusal searched: its message comes first
# A 207 item's status, by the phrase Outpost writes (Python's HTTPStatus: 3.13 renamed
# 413 and 422, and Outposts on either side may run either).
_STATUS_OF = {"Bad Request": 400, "Request Entity Too Large": 413, "Content Too Large": 413,
              "Unprocessable Entity": 422, "Unprocessable Content": 422}


class SegmentHttpUplink(UplinkBase):
    """One request per batch; the whole batch is acknowledged or not."""

    family: ClassVar[int] = SEGMENT
    envelope_bytes: ClassVar[int] = len(b'{"batch":[],"sentAt":"2026-01-01T00:00:00.000Z"}')
    # Each event's own `sentAt`, and the comma.
    event_overhead: ClassVar[int] = len(b'"sentAt":"2026-01-01T00:00:00.000Z",') + 1
    # The collector's limit: an event over it alone can never be delivered.
    refuse_oversize: ClassVar[bool] = True
    max_event_bytes: ClassVar[int | None] = 32 * 1024   # Segment's limit per event

    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                 machine_id: str) -> None:
        super().__init__(cfg, app_key, session, machine_id)
        self.url = f"{cfg.url.rstrip('/')}/v1/batch"
        token = base64.b64encode(f"{cfg.key or app_key}:".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
                        "User-Agent": "outpost"}
        if cfg.gzip:
            self.headers["Content-Encoding"] = "gzip"

    def encode_stored(self, row: Row) -> tuple[bytes, Any]:
        body = bytes(row.body)
        if not body.startswith(b"{") or not body.endswith(b"}"):
            raise ValueError("stored event is not an object")
        return body, row.seq

    def encode_mapped(self, event: dict[str, Any], row: Row) -> tuple[bytes, Any]:
        # Right-sized (compact_json): a batch keeps its bodies until it is answered.
        return compact_json(event), row.seq

    @staticmethod
    def payload(prepared: Prepared, sent_at: str, own: Mapping[int, str] | None = None
                ) -> bytes:
        """The request body: every event with `sentAt` spliced in first, ``sent_at`` or,
        for the seqs in ``own``, its own (own_sent_at)."""
        member = _member(sent_at)
        after = b'],' + member + b'}'
        if not own and ((prepared.objects and prepared.bodies) or objects(prepared.bodies)):
            return stamped(prepared.bodies, member, b'{"batch":[', after)
        stamps = {seq: b"{" + _member(at) for seq, at in (own or {}).items()}
        stamp = b"{" + member
        parts = []
        for seq, body in zip(prepared.seqs, prepared.bodies):
            rest = body[1:]
            parts.append(stamps.get(seq, stamp)
                         + (rest if rest.lstrip().startswith(b"}") else b"," + rest))
        return b'{"batch":[' + b",".join(parts) + after

    async def send(self, prepared: Prepared) -> SendResult:
        if self.unsendable is not None:
            return Retry(self.unsendable)
        now = now_ms()
        body = self.payload(prepared, iso_ms(now), own_sent_at(prepared, now))
        size = len(body)   # before gzip: what batch_max_bytes measures
        most = reply_cap(size, len(prepared.seqs))
        if self.cfg.gzip:
            body = gzip.compress(body, compresslevel=6)
        reply = await post(self.session, self.url, body, self.headers, self.cfg.timeout_s, most,
                           self.proxy)
        if isinstance(reply, Retry):
            return reply
        status, raw, wait = reply.status, reply.body, reply.retry_after
        # A body that could not be read is judged by its type alone.
        if page := html_instead_of_reply(status, reply.content_type,
                                         None if reply.unreadable else raw, len(prepared.seqs)):
            return Retry(page, retry_after=wait, too_slow=status == REQUEST_TIMEOUT)
        if 200 <= status < 300 and status != MULTI_STATUS:
            # Another Outpost answers a batch it stored in part 200, with the 207's body,
            # when the first message names a client that counts only 200 as success
            # (analytics-python: its context.library is forwarded as sent). Its `Errors`
            # still refuse those messages; a collector's success body holds none.
            if status == 200 and b'"Errors"' in raw:
                if reply.cut:
                    # Longer than reply_cap: which messages it refuses is past what was
                    # read. Split as a 207 that does not place its errors: smaller
                    # batches get shorter answers, and an event refused alone is known.
                    return Refused(f"HTTP 200 with Errors, longer than the {len(raw)} bytes "
                                   f"read: {excerpt(raw, 300)}")
                if (part := _partly_stored(raw, prepared)) is not None:
                    return part
            if _says_failed(raw):
                # The collector's own "not taken", under a 2xx (a quota, a key): no ack, and
                # no verdict on the events either. Kept and retried, as after a 401.
                return misconfigured(status, f"HTTP {status} saying it did not succeed: "
                                             f"{excerpt(raw, 300)}", wait)
            return Acked(prepared.seqs)   # else the status is the verdict
        reason = reply.said(300)
        if status == MULTI_STATUS:
            return _partly_stored(raw, prepared) or Refused(reason)
        if status in REJECTED_STATUSES:
            if _KEY_REFUSED.search(raw, 0, _KEY_SEARCHED):
                # Split, every event alone got the same answer: the whole queue went to
                # dead letters for a typo in the key.
                return Retry(f"{reason} (check the upstream's key)", retry_after=wait)
            return refusal(status, reason, wait, prepared, size)
        if is_retryable(status):
            return Retry(reason, retry_after=wait, too_slow=status == REQUEST_TIMEOUT)
        return misconfigured(status, reason, wait)


def _member(sent_at: str) -> bytes:
    return b'"sentAt":"' + sent_at.encode() + b'"'


def own_sent_at(prepared: Prepared, now: int) -> dict[int, str]:
    """The `sentAt` of each event received under a wall clock set since by more than a
    minute (types.Run.lead), by seq: now, read by the clock as it was at its receipt, so
    that `receivedAt - (sentAt - timestamp)` corrects a timestamp taken by that clock (a
    board's 1970, corrected by NTP while the event waited). Every other event takes the
    batch's. A spliced batch is looked at per run, not per event; other rows by their few
    distinct leads first (a map at C speed), one by one only when a lead moved: a Python
    look at each row cost as much as the batch's body (175 ns an event)."""
    lead_now = now - CLOCK.elapsed_ms()
    rows = prepared.rows
    spans: Iterable[tuple[int, int, int | None]]
    if isinstance(rows, Queued):
        spans = ((r.first, len(r.bodies), r.lead) for r in rows.runs)
    elif all(lead is None or abs(lead - lead_now) <= CLOCK_SET_MS
             for lead in set(map(_LEAD, rows))):
        return {}
    else:
        spans = ((r.seq, 1, r.lead) for r in rows)
    own: dict[int, str] = {}
    for first, n, lead in spans:
        if lead is not None and abs(lead - lead_now) > CLOCK_SET_MS:
            own.update(dict.fromkeys(range(first, first + n), iso_ms(now + lead - lead_now)))
    return own


def _says_failed(raw: bytes) -> bool:
    """Whether a reply's JSON object says `"success": false` (in any case: MetaRouter's
    batch errors say `"Success"`)."""
    if _FAILED.search(raw) is None:   # the usual reply is not parsed
        return False
    try:
        reply = reply_json(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(reply, dict) and any(
        value is False and key.lower() == "success" for key, value in reply.items())


def _partly_stored(raw: bytes, prepared: Prepared) -> Acked | None:
    """A 207 that names every refused message by its place in the batch and refuses it
    for good (Outpost's: `{"Errors": [{"Error", "Message", "Details": "batch[i] ..."}]}`):
    the rest is acknowledged. None for any other, to be split like a 400."""
    try:
        reply = reply_json(raw)
    except orjson.JSONDecodeError:
        return None
    errors = reply.get("Errors") if isinstance(reply, dict) else None
    if not isinstance(errors, list) or not errors:
        return None
    seqs, refused = prepared.seqs, {}
    for error in errors:
        if not isinstance(error, dict):
            return None
        phrase, message, details = (error.get(k) for k in ("Error", "Message", "Details"))
        place = _PLACE.match(details) if isinstance(details, str) else None
        status = _STATUS_OF.get(phrase) if isinstance(phrase, str) else None
        if place is None or int(place[1]) >= len(seqs) or not isinstance(message, str) \
                or status not in REJECTED_STATUSES:
            return None   # not for good (a key refused: the configuration's fault), or unplaced
        refused[seqs[int(place[1])]] = \
            redacted_head(f"HTTP 207: {status} {phrase} at {details}: {message}", 300)
    return Acked(tuple(s for s in seqs if s not in refused), tuple(refused.items()))
