"""A usual Segment batch stored as sent: each message's own bytes, with what the API sets
added at its end, instead of each message parsed into dicts and encoded again.

Most batches come from an SDK under one key (Basic auth): every message valid, each with
its `messageId` and `timestamp`, nothing to merge or drop. For those, ``accepted`` reads
with msgspec only what ``segment.check`` reads of each message, keeps the rest as the
bytes it came in, and adds `messageId` and `timestamp` where absent, then `receivedAt`,
as ``segment.complete`` would. The stored body means what the parsed-and-encoded one
would (an upstream reads it with the same members and values); its bytes are the app's.
``accepted`` returns None for any batch it cannot vouch for so, and the caller takes the
general path (``segment.accepted`` on orjson's dicts), which judges and names every
problem: a message refused, one that needs a batch's `context` merged in, one whose
`writeKey`, `sentAt` or `receivedAt` completion would drop or replace, one whose facts
enrich fills, one too large or too deep, an id or date of another form.

The caller first makes sure orjson would read the whole body the same (exact_json's
``kept_as_sent``): msgspec skips the members it does not read without checking that their
bytes are UTF-8 or that their numbers fit a double, as orjson does.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import msgspec
from msgspec import UNSET, Raw

from agent.families.depth import SHALLOW_BYTES, may_be_too_deep
from agent.families.enrich import SEGMENT_NEEDS_FACTS
from agent.families.event import SEGMENT, Columns, dedupe_key_after
from agent.families.lanes import HIGH, NORMAL, SEGMENT_HIGH, Lanes
from agent.families.segment import MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_MESSAGE_ID, is_date


class _Batch(msgspec.Struct):
    """What ``segment.batch_items`` and ``segment.shared`` read of a batch."""

    batch: list[Raw]
    context: Any = UNSET
    integrations: Any = UNSET
    timestamp: Any = UNSET
    originalTimestamp: Any = UNSET   # noqa: N815 (the API's names)
    sentAt: Any = UNSET   # noqa: N815


_NULL = Raw(b"null")


class _Message(msgspec.Struct):
    """What ``segment.check`` and ``segment.complete`` read of a message; objects as their
    bytes. UNSET: absent (the general path treats JSON null as absent, or replaces it)."""

    type: Any = None
    userId: Any = None   # noqa: N815
    anonymousId: Any = None   # noqa: N815
    event: Any = None
    groupId: Any = None   # noqa: N815
    previousId: Any = None   # noqa: N815
    name: Any = None
    messageId: Any = UNSET   # noqa: N815
    timestamp: Any = UNSET
    originalTimestamp: Any = UNSET   # noqa: N815
    sentAt: Any = UNSET   # noqa: N815
    writeKey: Any = UNSET   # noqa: N815
    receivedAt: Any = UNSET   # noqa: N815
    properties: Raw = _NULL
    traits: Raw = _NULL
    context: Raw = _NULL
    integrations: Raw = _NULL


_read_batch = msgspec.json.Decoder(_Batch).decode
_read_message = msgspec.json.Decoder(_Message).decode
_STARTS = frozenset(b"{n")   # an object's first byte, and null's: msgspec has checked the rest


def _absent(value: Any) -> bool:
    return value is UNSET or value is None


def accepted(raw: bytes, types: frozenset[str], key: str, received: str,
             head: hashlib.blake2b, lanes: Lanes) -> Columns | None:
    """The events of batch ``raw`` under ``key``, each message stored as sent; None when any
    message or the batch needs the general path (the module's docstring). ``received``: the
    request's receive time; ``head``: ``segment.dedupe_head(key)``."""
    try:
        batch = _read_batch(raw)
    # ValidationError is a DecodeError: not a batch of this shape. RecursionError: nested
    # past msgspec's depth, which the general path refuses message by message.
    except (msgspec.DecodeError, RecursionError):
        return None
    items = batch.batch
    if not 0 < len(items) <= MAX_BATCH_EVENTS or not _plain_envelope(batch):
        return None
    out = Columns(SEGMENT, key)
    out.most = MAX_EVENT_BYTES   # each body is held to it below
    dedupes, bodies, lane_of = out.dedupes, out.bodies, out.lanes
    at = received.encode()
    end = b'"receivedAt":"' + at + b'"}'
    untimed_end = b'"timestamp":"' + at + b'",' + end
    ruled = lanes.ruled
    # Inline, not calls: each message pays this loop (a call is ~0.5k instructions).
    for item in items:
        try:
            m = _read_message(item)
            kind = m.type
            if type(kind) is not str or kind not in types:
                return None
            user, anon = m.userId, m.anonymousId
            if not ((type(user) is str and user and (anon is None or type(anon) is str))
                    or ((user is None or user == "") and type(anon) is str and anon)):
                return None
            if kind == "track":
                name = m.event   # its lane's name, and what enrich fills facts for
                if not (type(name) is str and name) or name in SEGMENT_NEEDS_FACTS:
                    return None
            else:
                name = None
                needed = m.groupId if kind == "group" else m.previousId if kind == "alias" \
                    else "-"
                if not (type(needed) is str and needed):
                    return None
            props, traits, context, integrations = (m.properties, m.traits, m.context,
                                                    m.integrations)
            if not ((props is _NULL or memoryview(props)[0] in _STARTS)
                    and (traits is _NULL or memoryview(traits)[0] in _STARTS)
                    and (context is _NULL or memoryview(context)[0] in _STARTS)
                    and (integrations is _NULL or memoryview(integrations)[0] in _STARTS)
                    and (m.name is None or type(m.name) is str)
                    # Fields completion drops or replaces, and a null it sets in place.
                    and m.sentAt is UNSET and m.writeKey is UNSET and m.receivedAt is UNSET):
                return None
            timestamp, original = m.timestamp, m.originalTimestamp
            if not ((timestamp is UNSET or is_date(timestamp))
                    and (original is UNSET or original is None or is_date(original))):
                return None
            untimed = timestamp is UNSET and _absent(original)
        except (msgspec.DecodeError, RecursionError):
            return None
        message_id = m.messageId
        if message_id is UNSET:
            message_id = str(uuid.uuid4())
            added = b'"messageId":"' + message_id.encode() + b'",'
        elif type(message_id) is str and 0 < len(message_id) <= MAX_MESSAGE_ID:
            added = b""
        else:
            return None
        body = b"".join((memoryview(item)[:-1], b",", added, untimed_end if untimed else end))
        if len(body) > MAX_EVENT_BYTES or (len(body) > SHALLOW_BYTES and may_be_too_deep(body)):
            return None
        dedupes.append(dedupe_key_after(head, message_id))
        bodies.append(body)
        lane_of.append(lanes.segment(key, kind, name) if ruled
                       else HIGH if name in SEGMENT_HIGH else NORMAL)
    return out


def _plain_envelope(batch: _Batch) -> bool:
    """Nothing of the batch's own members goes into its messages (a `context` or
    `integrations` to merge, a `timestamp` for the untimed), and its dates are dates."""
    return (_absent(batch.context) and _absent(batch.integrations) and _absent(batch.timestamp)
            and (_absent(batch.originalTimestamp) or is_date(batch.originalTimestamp))
            and (_absent(batch.sentAt) or is_date(batch.sentAt)))
