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
        # Acks come in runs of consecutive seqs: one lookup per record, not per seq.
        rid, end, current = 0, 0, None
        for seq in sorted(acked):
            if not rid <= seq < end:
                rid, end, current = self._find(seq, out)
            if current is not None:
                current.acked.append(seq - rid)
        for seq, upstream, reason in dead:
            rid, end, s = self._find(seq, out)
            if s is not None:
                s.dead.append((seq - rid, upstream, reason))
        return list(out.values())

    def _find(self, seq: int, out: dict[int, Settle]) -> tuple[int, int, Settle | None]:
        """(first seq, end, its Settle) of the record holding ``seq``; (0, 0, None) if none."""
        i = bisect_right(self._ids, seq) - 1
        if i < 0:
            return 0, 0, None
        rid = self._ids[i]
        rec = self._info[rid]
        if seq - rid >= rec.n:
            return 0, 0, None
        s = out.get(rid)
        if s is None:
            s = out[rid] = Settle(rid, rec.observed)
        return rid, rid + rec.n, s
