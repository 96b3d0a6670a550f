"""Which records hold live events, in seq order: an ack finds its record without SQL."""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from itertools import compress
from operator import attrgetter

from agent.spool.commit import Settle


class LiveRecords:
    """The live records' first seqs (sorted), sizes and receipt times; kept on the loop.

    Records are numbered in seq order, so a new one goes at the end; most leave from
    the front (acked in FIFO order). Three int64 arrays: 24 bytes per record, not per
    event (an agent with thousands of idle keys holds a record or two for each).

    A record that leaves keeps its place, its size set to 0 (no seq falls in it), until
    those that left are half of the arrays: then they go, in one pass. Taken out one at
    a time, each a move of every record after it, a backlog of lone events (a record
    each) cost its drain, or its expiry, a pass over the backlog per record.
    """

    def __init__(self) -> None:
        self._ids = array("q")
        self._ns = array("q")
        self._observed = array("q")  # agent-observed ms of each record's receipt
        self._left = 0   # records that left, still in the arrays (size 0)

    def __len__(self) -> int:
        return len(self._ids) - self._left

    def add(self, rid: int, n: int, observed: int) -> None:
        i = bisect_right(self._ids, rid)
        if i and self._ids[i - 1] == rid:
            if not self._ns[i - 1]:   # left, and back (a salvage's record under its id)
                self._ns[i - 1], self._observed[i - 1] = n, observed
                self._left -= 1
            return
        self._ids.insert(i, rid)
        self._ns.insert(i, n)
        self._observed.insert(i, observed)

    def remove(self, rids: Iterable[int]) -> None:
        ids, ns = self._ids, self._ns
        for rid in rids:
            i = bisect_right(ids, rid) - 1
            if i >= 0 and ids[i] == rid and ns[i]:
                ns[i] = 0
                self._left += 1
        if 2 * self._left > len(ids):
            self._ids = array("q", compress(ids, ns))
            self._observed = array("q", compress(self._observed, ns))
            self._ns = array("q", compress(ns, ns))
            self._left = 0

    def load(self, ids: array[int], sizes: array[int], observed: array[int]) -> None:
        """Hold these records instead (a spool just opened): ids unique and sorted."""
        self._ids, self._ns, self._observed, self._left = ids, sizes, observed, 0

    def observed(self, seq: int) -> int | None:
        """The agent-observed receipt time of the live record holding ``seq``."""
        i = bisect_right(self._ids, seq) - 1
        if i < 0 or seq - self._ids[i] >= self._ns[i]:
            return None
        return self._observed[i]

    def within(self, first: int, end: int) -> bool:
        """Whether a live record starts at a seq in [``first``, ``end``)."""
        return any(self._ns[bisect_left(self._ids, first):bisect_left(self._ids, end)])

    def missing(self, seqs: Iterable[int]) -> set[int]:
        """Those of ``seqs`` in no live record. Called on every ack, so a batch's runs cost
        one lookup per record, not per seq: sorted (a batch comes in order, which sorted
        takes in one pass), each live record's seqs are skipped by one bisect."""
        ids, ns = self._ids, self._ns
        # A range (a spliced batch's seqs) is in order already: sorted made an int per seq.
        ordered = seqs if type(seqs) is range and seqs.step == 1 else sorted(seqs)
        gone: set[int] = set()
        i, total = 0, len(ordered)
        while i < total:
            seq = ordered[i]
            k = bisect_right(ids, seq) - 1
            if k < 0 or seq - ids[k] >= ns[k]:
                gone.add(seq)
                i += 1
            else:
                i = bisect_left(ordered, ids[k] + ns[k], i)
        return gone

    def settle(self, acked: Iterable[Sequence[int]],
               dead: Iterable[tuple[int, str, str]]) -> list[Settle]:
        """Group seqs, given in chunks (each Spool.ack's), by their record (seqs in no
        live record are left out); each Settle's ``acked`` offsets are sorted, without
        repeats."""
        out: dict[int, Settle] = {}
        chunks = list(acked)
        spans = _disjoint(chunks)
        if spans is None:
            seqs: set[int] = set()
            for chunk in chunks:
                seqs.update(chunk)
            self._settle_seqs(sorted(seqs), out)
        else:
            # A drain's acks: ranges (spliced batches), a record at a time, with no int
            # made per seq, and no set and sort of them.
            for span in spans:
                self._settle_span(span.start, span.stop, out)
        for seq, upstream, reason in dead:
            rid, end, s = self._find(seq, out)
            if s is not None:
                s.dead.append((seq - rid, upstream, reason))
        return list(out.values())

    def _settle_seqs(self, seqs: list[int], out: dict[int, Settle]) -> None:
        """Acked ``seqs`` (sorted, without repeats) into ``out``'s Settles."""
        # Acks come in runs of consecutive seqs: one lookup per record, not per seq, and
        # each record's offsets as a range when they are consecutive (the usual case).
        i, total = 0, len(seqs)
        while i < total:
            rid, end, current = self._find(seqs[i], out)
            if current is None:
                i += 1
                continue
            j = bisect_left(seqs, end, i)
            first, last = seqs[i] - rid, seqs[j - 1] - rid
            current.acked = (range(first, last + 1) if last - first == j - 1 - i
                             else [s - rid for s in seqs[i:j]])
            i = j

    def _settle_span(self, seq: int, stop: int, out: dict[int, Settle]) -> None:
        """Acked seqs ``seq`` .. ``stop - 1`` into ``out``'s Settles, after any acked
        below ``seq`` (spans come in order, without overlaps)."""
        while seq < stop:
            rid, end, current = self._find(seq, out)
            if current is None:   # in no live record: on to the next record's first seq
                k = bisect_right(self._ids, seq)
                seq = self._ids[k] if k < len(self._ids) else stop
                continue
            end = min(end, stop)
            part = range(seq - rid, end - rid)
            current.acked = [*current.acked, *part] if current.acked else part
            seq = end

    def _find(self, seq: int, out: dict[int, Settle]) -> tuple[int, int, Settle | None]:
        """(first seq, end, its Settle) of the record holding ``seq``; (0, 0, None) if none."""
        i = bisect_right(self._ids, seq) - 1
        if i < 0 or seq - self._ids[i] >= self._ns[i]:
            return 0, 0, None
        rid = self._ids[i]
        s = out.get(rid)
        if s is None:
            s = out[rid] = Settle(rid, self._observed[i])
        return rid, rid + self._ns[i], s


def _disjoint(chunks: list[Sequence[int]]) -> list[range] | None:
    """``chunks`` in order, when every one is a range of step 1 and none overlaps
    another; else None."""
    spans = [c for c in chunks if type(c) is range and c.step == 1]
    if len(spans) != len(chunks):
        return None
    spans = sorted(filter(None, spans), key=_START)
    if any(a.stop > b.start for a, b in zip(spans, spans[1:])):
        return None
    return spans


_START = attrgetter("start")
