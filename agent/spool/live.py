"""Which records hold live events, in seq order: an ack finds its record without SQL."""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass

from agent.spool.commit import Settle


@dataclass(slots=True)
class _Record:
    stream: int
    n: int
    observed: int  # agent-observed ms of its receipt


class LiveRecords:
    """The live records' first seqs (sorted) and sizes; kept on the event loop.

    Records are numbered in seq order, so a new one goes at the end; most leave from
    the front (acked in FIFO order). About 100 bytes per record, not per event.
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._info: dict[int, _Record] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, rid: int, stream: int, n: int, observed: int) -> None:
        if not self._ids or rid > self._ids[-1]:
            self._ids.append(rid)
        elif rid not in self._info:
            insort(self._ids, rid)
        self._info[rid] = _Record(stream, n, observed)

    def remove(self, rids: Iterable[int]) -> None:
        ids, info = self._ids, self._info
        for rid in rids:
            if info.pop(rid, None) is not None:
                i = bisect_right(ids, rid) - 1
                del ids[i]

    def clear(self) -> None:
        self._ids.clear()
        self._info.clear()

    def settle(self, acked: Iterable[int],
               dead: Iterable[tuple[int, str, str]]) -> list[Settle]:
        """Group seqs by their record (seqs in no live record are left out)."""
        out: dict[int, Settle] = {}
        for seq in acked:
            s = self._find(seq, out)
            if s is not None:
                s.acked.append(seq - s.id)
        for seq, upstream, reason in dead:
            s = self._find(seq, out)
            if s is not None:
                s.dead.append((seq - s.id, upstream, reason))
        return list(out.values())

    def _find(self, seq: int, out: dict[int, Settle]) -> Settle | None:
        i = bisect_right(self._ids, seq) - 1
        if i < 0:
            return None
        rid = self._ids[i]
        rec = self._info[rid]
        if seq - rid >= rec.n:
            return None
        s = out.get(rid)
        if s is None:
            s = out[rid] = Settle(rid, rec.observed)
        return s
