"""Building Nucleus `{"data": [...]}` frames and matching `reportedIds` back to rows.

Stored Nucleus bodies are spliced into the frame as they are (no re-encoding).
Each event's `id` must be unique among the unacknowledged events of the
connection, because the ack carries nothing else; events without an id get
their spool seq as id.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.families import mapping
from agent.families.event import NUCLEUS
from agent.spool.types import Row


class FrameBuilder:
    """Tracks ids in flight on one connection and cuts frames under a byte cap."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.in_flight: dict[Any, int] = {}   # ack id -> seq
        self._bodies: dict[int, bytes] = {}   # seq -> body to send, for taken rows
        self.corrupt: dict[int, str] = {}     # seq -> why a taken row cannot be sent

    def take(self, rows: list[Row]) -> list[Row]:
        taken: list[Row] = []
        size = 12
        for row in rows[: self.max_events]:
            try:
                body, ack_id = self._outgoing(row)
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                # A damaged row goes to dead letters instead of sticking the queue.
                self.corrupt[row.seq] = f"corrupt row: {exc}"
                taken.append(row)
                continue
            if ack_id in self.in_flight or (taken and size + len(body) + 1 > self.max_bytes):
                break
            self.in_flight[ack_id] = row.seq
            self._bodies[row.seq] = body
            size += len(body) + 1
            taken.append(row)
        return taken

    def _outgoing(self, row: Row) -> tuple[bytes, Any]:
        ev = orjson.loads(row.body)
        if not isinstance(ev, dict):
            raise ValueError("stored event is not an object")
        if row.family != NUCLEUS:
            ev = mapping.segment_to_nucleus(ev, row.received)
        elif ev.get("id") is not None:
            return bytes(row.body), ev["id"]
        ev["id"] = row.seq
        return orjson.dumps(ev), row.seq

    def frame(self, batch: list[Row]) -> bytes:
        return b'{"data":[' + b",".join(self._bodies[r.seq] for r in batch
                                          if r.seq in self._bodies) + b"]}"

    def sendable(self, batch: list[Row]) -> bool:
        return any(r.seq in self._bodies for r in batch)

    def pop_corrupt(self, batch: list[Row]) -> dict[int, str]:
        return {r.seq: self.corrupt.pop(r.seq) for r in batch if r.seq in self.corrupt}

    def match(self, reported: Any) -> list[int]:
        """Seqs acknowledged by a `reportedIds` list; unknown ids are ignored."""
        if not isinstance(reported, list):
            return []
        acked = []
        for ack_id in reported:
            # No event has a boolean id (ingest refuses them), but `true == 1` in Python:
            # a stray `true` must not acknowledge the event whose id is 1.
            if isinstance(ack_id, (dict, list, bool)):
                continue
            seq = self.in_flight.pop(ack_id, None)
            if seq is not None:
                self._bodies.pop(seq, None)
                acked.append(seq)
        return acked

    def release(self, batch: list[Row]) -> None:
        """Forget a batch's unacked ids (it will be fetched and taken again)."""
        seqs = {r.seq for r in batch}
        for ack_id in [k for k, seq in self.in_flight.items() if seq in seqs]:
            del self.in_flight[ack_id]
        for seq in seqs:
            self._bodies.pop(seq, None)
