"""Turning queued rows into the next batch: the one take loop every uplink shares.

``take_prefix`` reads rows in order, converts rows of the other family (the only
place in uplinks/ that knows the mapping between families; Nucleus events routed to
a Segment upstream arrive mapped already, stored so at ingest), hands each row to
its uplink's encoder, refuses rows that can never be sent, and stops at the
event and byte caps. The result is a ``Prepared`` value: the uplink keeps no
per-row state between preparing a batch and sending it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

from agent.families import mapping
from agent.families.event import NUCLEUS, SEGMENT, Limit
from agent.settings import UpstreamConfig
from agent.spool.types import Row

# What decoding, mapping or encoding a damaged row raises: orjson's JSONDecodeError is
# a ValueError and its JSONEncodeError a TypeError. Anything else is a bug, for the
# supervisor, not a reason to dead-letter the row.
CORRUPT = (ValueError, TypeError)

# (stored family, uplink family) -> the mapping from one to the other.
# Each called with the event, its receive time and the device's id.
CONVERSIONS: dict[tuple[int, int], Callable[[dict[str, Any], int, str], dict[str, Any]]] = {
    (NUCLEUS, SEGMENT): lambda ev, received, _: mapping.nucleus_to_segment(ev, received),
    (SEGMENT, NUCLEUS): mapping.segment_to_nucleus,
}


def escaped_extra(ack_id: Any) -> int:
    """The bytes an answer naming ``ack_id`` may take past those it takes in the batch: an
    upstream that escapes non-ASCII (Python's json.dumps) writes a character UTF-8 sends
    in 2 or 4 bytes in 6 or 12. Weighed in a batch's size, so that its answer fits the
    reply read for it (http_common.reply_cap): cut, it acknowledged nothing, and the same
    batch went again for good."""
    return 2 * len(ack_id.encode()) if type(ack_id) is str and not ack_id.isascii() else 0


@dataclass(frozen=True, slots=True)
class Prepared:
    """One batch, ready to send: a value, so it can be split or sent again as it is.

    ``seqs``, ``bodies`` and ``ids`` are parallel: the rows to send, in order.
    """

    rows: Sequence[Row]                   # every row taken, in order (sent or refused)
    seqs: Sequence[int]                   # the rows to send (a range: splice.take)
    bodies: tuple[bytes, ...]             # their encoded events
    ids: Sequence[Any]                    # what the upstream acknowledges them by
    refused: tuple[tuple[int, str], ...]  # (seq, why) for rows that can never be sent
    # Every body is a JSON object with members (splice.objects), known when it was cut:
    # segment_http then splices `sentAt` in without checking each body again.
    objects: bool = False

    def halves(self) -> tuple[Prepared, Prepared]:
        """The rows to send, in two batches of about half each (to isolate a refusal)."""
        half = len(self.seqs) // 2
        return self._part(slice(None, half)), self._part(slice(half, None))

    def without(self, gone: Container[int]) -> Prepared:
        """The batch less the rows whose seqs are in ``gone`` (dropped from the spool since
        it was read), to send as the rest of it."""
        keep = [i for i, seq in enumerate(self.seqs) if seq not in gone]
        kept = {self.seqs[i] for i in keep}
        return Prepared(tuple(r for r in self.rows if r.seq in kept),
                        tuple(self.seqs[i] for i in keep), tuple(self.bodies[i] for i in keep),
                        tuple(self.ids[i] for i in keep), (), self.objects)

    def _part(self, part: slice) -> Prepared:
        seqs = self.seqs[part]
        keep = set(seqs)
        return Prepared(tuple(r for r in self.rows if r.seq in keep), seqs, self.bodies[part],
                        self.ids[part], (), self.objects)


class Encoder(Protocol):
    """What an uplink tells the take loop about its wire format."""

    family: ClassVar[int]          # the family the upstream speaks (agent.families.event)
    envelope_bytes: ClassVar[int]  # a request's size without its events
    event_overhead: ClassVar[int]  # bytes each event adds besides its body (separators)
    cfg: UpstreamConfig
    machine_id: str                # the device's id (a mapped Segment event's machineId)

    @property
    def limit(self) -> Limit | None:
        """The largest event it can ever carry (UplinkBase.event_limit), None for any:
        refused at ingest, and by the take loop one stored before a reload routed its key
        to this upstream."""
        ...

    def encode_stored(self, row: Row) -> tuple[bytes, Any]:
        """(body, ack id) of a row stored in the uplink's own family."""
        ...

    def encode_mapped(self, event: dict[str, Any], row: Row) -> tuple[bytes, Any]:
        """(body, ack id) of a row converted from another family into ``event``."""
        ...


def take_prefix(uplink: Encoder, rows: Sequence[Row],
                in_flight: Container[Any] | None = None) -> Prepared:
    """The longest prefix of ``rows`` within the uplink's caps, encoded.

    A damaged row, or one larger than the uplink's ``limit``, is taken
    and refused, so that it goes to dead letters instead of sticking the queue.
    With ``in_flight``, ack ids must be unique: the batch stops before an id that
    is in it or already earlier in the batch (the upstream's ack names only the id).
    """
    cfg, family = uplink.cfg, uplink.family
    cap, overhead, envelope = cfg.batch_bytes, uplink.event_overhead, uplink.envelope_bytes
    # Looked up once per batch, not per row: this loop is on the drain's hot path.
    encode_stored, unique = uplink.encode_stored, in_flight is not None
    busy: Container[Any] = () if in_flight is None else in_flight
    # Refused only past the limit (batch_max_bytes, not a cut: an event over batch_cut_bytes
    # goes alone).
    limit = uplink.limit
    seqs: list[int] = []
    bodies: list[bytes] = []
    ids: list[Any] = []
    refused: list[tuple[int, str]] = []
    seen: set[Any] = set()
    size = envelope
    taken = 0
    for row in rows[: cfg.batch_max_events]:
        try:
            if row.family == family:
                body, ack_id = encode_stored(row)
            else:
                body, ack_id = uplink.encode_mapped(_convert(row, family, uplink.machine_id),
                                                    row)
        except CORRUPT as exc:
            refused.append((row.seq, f"corrupt row: {exc}"))
            taken += 1
            continue
        if limit is not None and (why := limit.refuses(cfg.name, len(body))) is not None:
            refused.append((row.seq, why))
            taken += 1
            continue
        cost = len(body) + overhead
        if unique and (ack_id in busy or ack_id in seen):
            break
        weight = cost + escaped_extra(ack_id)
        if seqs and size + weight > cap:
            break
        if unique:
            seen.add(ack_id)
        seqs.append(row.seq)
        bodies.append(body)
        ids.append(ack_id)
        size += weight
        taken += 1
    return Prepared(tuple(rows[:taken]), tuple(seqs), tuple(bodies), tuple(ids), tuple(refused))


def _convert(row: Row, family: int, machine: str) -> dict[str, Any]:
    event: Any = orjson.loads(row.body)
    if not isinstance(event, dict):
        raise ValueError("stored event is not an object")
    convert = CONVERSIONS.get((row.family, family))
    if convert is None:
        raise ValueError(f"no mapping from family {row.family} to {family}")
    return convert(event, row.received, machine)
