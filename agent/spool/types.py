"""The spool's public types: what forwarders read, and the one refusal, SpoolFull."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain, repeat
from typing import Any, overload

from agent.families.lanes import HIGH, NORMAL

RETRY_AFTER_FULL_S = 30


class Reason(Enum):
    """Why the spool refused events; each with the message apps and logs see by default."""

    FULL = "spool is full (storage.max_size_mb)"
    SHUTTING_DOWN = "agent is shutting down"
    NOT_OPEN = "spool is not open"
    DISK_ERROR = "disk full"
    CORRUPT = "spool storage is failing"


class SpoolFull(Exception):
    """The spool cannot take these events now; the app should retry later.

    ``reason`` says why; ``str()`` is the message (a disk error carries SQLite's own).
    """

    def __init__(self, reason: Reason, retry_after: int = RETRY_AFTER_FULL_S,
                 message: str | None = None) -> None:
        super().__init__(message or reason.value)
        self.reason = reason
        self.retry_after = retry_after

    @property
    def no_room(self) -> bool:
        """Refused for want of room (the cap, a full disk), which the queue's draining
        gives back; not an agent that cannot store at all for now."""
        return self.reason in (Reason.FULL, Reason.DISK_ERROR)


@dataclass(slots=True)
class Row:
    """One stored event as a forwarder sees it."""

    seq: int
    stream: int
    family: int
    received: int
    body: bytes
    lane: int = NORMAL   # families/lanes.py
    lead: int | None = None   # its Run's


@dataclass(slots=True)
class Run:
    """Queued events of one record, consecutive: seqs ``first`` .. ``first + len(bodies) - 1``.

    ``ids`` are their Nucleus ack ids, parallel to ``bodies``, when the record holds them
    (records.ZSTD_IDS: ingest wrote every body as a JSON object and read its id); None
    when it does not.

    ``lead`` is the wall clock's lead on ``CLOCK.elapsed_ms()`` when the record was
    received (``received`` less the agent's count then), for a record received in this
    run of the agent (Spool.fetch sets it); None for one received before: time powered
    off is not in the count. Read against the lead now, it tells whether the wall clock
    was set since, and by how much (segment_http's per-event `sentAt`).

    ``nbytes`` is the bytes of its bodies when the read summed them (a fetch with
    ``max_bytes``), else None: the splice sizes a batch by it, not by a len per body.
    ``longest``: no body of it is longer (its record's longest body, which the unpack
    measured), and ``shortest``: none is shorter; None: not known. The splice checks an
    event limit, and bodies too short to be objects, by them, not by a len per body.
    """

    first: int
    stream: int
    family: int
    received: int
    bodies: list[bytes]
    ids: list[Any] | None
    lane: int = NORMAL
    lead: int | None = None
    nbytes: int | None = field(default=None, compare=False)
    longest: int | None = field(default=None, compare=False)
    shortest: int | None = field(default=None, compare=False)

    def part(self, start: int, stop: int) -> Run:
        return Run(self.first + start, self.stream, self.family, self.received,
                   self.bodies[start:stop], None if self.ids is None else self.ids[start:stop],
                   self.lane, self.lead, longest=self.longest, shortest=self.shortest)

    def row(self, i: int) -> Row:
        return Row(self.first + i, self.stream, self.family, self.received, self.bodies[i],
                   self.lane, self.lead)


class Queued(Sequence[Row]):
    """What a fetch returns: a key's queued events as whole runs of records, oldest first.

    A sequence of Rows to whoever wants rows, but each Row is made only when asked for:
    a same-family drain splices the runs' stored bytes and never makes one per event.
    """

    __slots__ = ("runs", "_len")

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self._len = sum(len(r.bodies) for r in runs)

    def __len__(self) -> int:
        return self._len

    def nbytes(self) -> int:
        """The bytes of the events' stored bodies."""
        return sum(sum(map(len, r.bodies)) for r in self.runs)

    @overload
    def __getitem__(self, i: int) -> Row: ...
    @overload
    def __getitem__(self, i: slice) -> Queued: ...

    def __getitem__(self, i: int | slice) -> Row | Queued:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._len)
            if step != 1:
                raise ValueError("Queued slices take every row")
            return self._slice(start, stop)
        if i < 0:
            i += self._len
        if 0 <= i < self._len:
            for run in self.runs:
                if i < len(run.bodies):
                    return run.row(i)
                i -= len(run.bodies)
        raise IndexError("Queued index out of range")

    def _slice(self, start: int, stop: int) -> Queued:
        runs: list[Run] = []
        pos = 0
        for run in self.runs:
            if pos >= stop:
                break
            n = len(run.bodies)
            a, b = max(start - pos, 0), min(stop - pos, n)
            if a < b:
                runs.append(run if a == 0 and b == n else run.part(a, b))
            pos += n
        return Queued(runs)

    def __repr__(self) -> str:
        return f"Queued({self.runs!r})"

    def __iter__(self) -> Iterator[Row]:
        # Rows made by map at C speed: the take loop of another family iterates them.
        return chain.from_iterable(
            map(Row, range(r.first, r.first + len(r.bodies)), repeat(r.stream),
                repeat(r.family), repeat(r.received), r.bodies, repeat(r.lane),
                repeat(r.lead))
            for r in self.runs)


def joined(chunks: Sequence[Sequence[int]]) -> Sequence[int]:
    """``chunks``' seqs as one sequence: a range when they are ranges each starting where
    the one before stopped (a drain's spliced batches, acked in turn), with no int made
    per seq; else a list of them."""
    spans = [c for c in chunks if type(c) is range and c.step == 1]
    if spans and len(spans) == len(chunks) \
            and all(a.stop == b.start for a, b in zip(spans, spans[1:])):
        return range(spans[0].start, spans[-1].stop)
    seqs: list[int] = []
    for chunk in chunks:   # extend: at C speed, where a chain took an iterator step a seq
        seqs.extend(chunk)
    return seqs


def in_lanes(depth: int, high: int, lanes: Iterable[int]) -> int:
    """Of ``depth`` queued events, ``high`` of them in the high lane: those in ``lanes``."""
    return sum(high if lane == HIGH else depth - high for lane in lanes)


@dataclass(slots=True, eq=False)
class Totals:
    """The queues of a group of keys (those one upstream takes), summed: kept up to date
    as each key's are (books.py), so that status reads them without visiting a key."""

    depth: int = 0
    bytes: int = 0
    high: int = 0
    keys: int = 0   # keys with events queued

    def queued(self, lanes: Iterable[int]) -> int:
        """Events queued in ``lanes``."""
        return in_lanes(self.depth, self.high, lanes)


# A Stream's group until Books puts it in one: only the streams Books holds are counted.
UNGROUPED = Totals()


@dataclass(slots=True)
class Stream:
    """One key's queue: its id and in-memory depth counters (persisted per commit;
    ``high``, the high lane's share of ``depth``, is counted from the records at start),
    and the Totals of its group, which Books moves with them."""

    id: int
    key: str
    depth: int = 0
    bytes: int = 0
    high: int = 0
    # High events stored in this run (never lowered, unlike ``high``, which an ack or a
    # dead letter lowers as a new event raises it): whether one came since a read.
    high_in: int = field(default=0, compare=False)
    totals: Totals = field(default=UNGROUPED, repr=False, compare=False)

    def queued(self, lanes: Iterable[int]) -> int:
        """Events queued in ``lanes``."""
        return in_lanes(self.depth, self.high, lanes)
