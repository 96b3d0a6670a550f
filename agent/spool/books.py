"""The spool's in-memory accounts: keys and their depths, counters, the next seq."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice

from agent.outcomes import Counts, Drop, Outcome, Tally, merge, record
from agent.spool.commit import Outcome as Committed
from agent.spool.types import Stream, Totals

# A key's group (the upstream that takes it, say); None is a group too.
Grouping = Callable[[str], str | None]


def _ungrouped(key: str) -> str | None:
    return None


def group(streams: Iterable[Stream], grouping: Grouping) -> dict[str | None, Totals]:
    """The Totals of ``streams`` by ``grouping``; each stream joins its group's."""
    groups: dict[str | None, Totals] = {}
    for stream in streams:
        _join(groups, grouping(stream.key), stream)
    return groups


def _join(groups: dict[str | None, Totals], label: str | None, stream: Stream) -> None:
    totals = groups.get(label)
    if totals is None:
        totals = groups[label] = Totals()
    stream.totals = totals
    _add(totals, stream, 1)


def _add(totals: Totals, stream: Stream, sign: int) -> None:
    totals.depth += sign * stream.depth
    totals.bytes += sign * stream.bytes
    totals.high += sign * stream.high
    totals.keys += sign * (stream.depth != 0)


def by_upstream(counts: Mapping[str | None, int]) -> str:
    """`` (analytics: 120, errors: 3)`` for a log line of events dropped or refused, from
    their counts by upstream (``Books.by_group``), most first; those of keys no upstream
    takes (None) said as such. Empty when there are none."""
    named = sorted(((n, up) for up, n in counts.items() if up is not None and n),
                   key=lambda c: (-c[0], c[1]))
    said = ", ".join(f"{up}: {n}" for n, up in named)
    if unrouted := counts.get(None, 0):
        said += f"{'; ' if said else ''}{unrouted} of them matched no upstream"
    return f" ({said})" if said else ""


@dataclass
class Books:
    """What the spool knows on the event loop, brought up to date after each commit.

    Counts seen on the loop wait in ``unsaved`` until a commit saves them. ``groups``
    sums the keys' queues by ``grouping`` (the upstreams of the config in force: see
    ``regroup``), moved with each commit, so that status reads a few sums, not every key.
    """

    streams: dict[str, Stream] = field(default_factory=dict)
    by_id: dict[int, Stream] = field(default_factory=dict)
    counters: Counts = field(default_factory=dict)
    unsaved: Counts = field(default_factory=dict)
    new_streams: list[Stream] = field(default_factory=list)  # not yet in the file
    top_stream_id: int = 0   # a new key's id; max(by_id) made each new key O(keys)
    next_seq: int = 1
    committed_seq: int = 0   # every event up to it is committed (the next_seq's may not be)
    dead_count: int = 0      # rows in the dead letters table
    used_bytes: int = 0
    last_mark: int | None = None  # agent-observed ms of the last clock mark written
    # (agent-observed ms, next seq) of the last commit that stored events and wrote no
    # mark: written with the next mark, which may be long after it (db.mark's ``before``).
    unmarked: tuple[int, int] | None = None
    grouping: Grouping = _ungrouped
    groups: dict[str | None, Totals] = field(default_factory=dict)

    def reset(self, streams: list[tuple[int, str, int, int]], counters: Counts,
              next_seq: int, dead: int, used: int, high: dict[int, int]) -> None:
        """Take the state just read from the file."""
        self.streams.clear()
        self.by_id.clear()
        self.groups = {}
        self.top_stream_id = 0
        self.new_streams = []
        for sid, key, depth, nbytes in streams:
            self.add_stream(Stream(sid, key, depth, nbytes, high.get(sid, 0)))
        self.counters = counters
        self.unsaved = {}
        self.next_seq = next_seq
        self.committed_seq = next_seq - 1
        self.dead_count = dead
        self.used_bytes = used
        self.last_mark = self.unmarked = None

    def regroup(self, grouping: Grouping) -> None:
        """Sum the queues by ``grouping`` from now on: once per config, a pass over the keys."""
        self.grouping = grouping
        self.groups = group(self.streams.values(), grouping)

    def keys_of(self, label: str | None, most: int) -> list[str]:
        """Up to ``most`` keys with events queued in group ``label``: a pass over the keys,
        as ``regroup``'s, that ends once it has them (none if the group holds no events)."""
        totals = self.groups.get(label)
        if totals is None or not totals.keys:
            return []
        return list(islice((s.key for s in self.streams.values()
                            if s.depth and s.totals is totals), most))

    def by_group(self, counts: Mapping[int, int]) -> dict[str | None, int]:
        """``counts`` (events by stream id) summed by group (by upstream: see ``regroup``)."""
        return self.keys_by_group({s.key: n for sid, n in counts.items()
                                   if (s := self.by_id.get(sid)) is not None})

    def keys_by_group(self, counts: Mapping[str, int]) -> dict[str | None, int]:
        """``counts`` (events by key) summed by group; empty before ``regroup`` sets a
        grouping (every key is in None then). By key: a refused request's new key has
        no stream left."""
        out: dict[str | None, int] = {}
        if self.grouping is _ungrouped:
            return out
        for key, n in counts.items():
            if n:
                label = self.grouping(key)
                out[label] = out.get(label, 0) + n
        return out

    def add_stream(self, stream: Stream) -> None:
        replaced = self.streams.get(stream.key)
        if replaced is stream:
            return
        if replaced is not None:   # a recovery's held object takes the place of the file's
            _add(replaced.totals, replaced, -1)
        self.streams[stream.key] = stream
        self.by_id[stream.id] = stream
        self.top_stream_id = max(self.top_stream_id, stream.id)
        _join(self.groups, self.grouping(stream.key), stream)

    def forget(self, ids: Collection[int]) -> None:
        """Streams a commit made for requests it stored nothing of: their rows deleted, or
        never written (the commit failed). Their depths are 0: nothing to take from their
        group's sums."""
        if not ids:
            return
        for sid in ids:
            stream = self.by_id.pop(sid, None)
            if stream is not None and self.streams.get(stream.key) is stream:
                del self.streams[stream.key]
        if self.new_streams:   # a failed commit's, still waiting for their rows
            self.new_streams = [s for s in self.new_streams if s.id not in ids]

    def stream_for(self, key: str) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = Stream(self.top_stream_id + 1, key)
            self.add_stream(stream)
            self.new_streams.append(stream)
        return stream

    def count(self, outcome: Outcome, n: int = 1) -> None:
        """Count an outcome seen on the loop; saved with the next commit."""
        record(self.counters, outcome, n)
        record(self.unsaved, outcome, n)

    def take_unsaved(self) -> Counts:
        counts, self.unsaved = self.unsaved, {}
        return counts

    def unsave(self, counters: Counts) -> None:
        """A failed commit did not save these counts: keep them for the next one."""
        merge(self.unsaved, counters)

    def apply(self, out: Committed) -> None:
        """Bring depths, their groups' sums and counters up to what was just committed."""
        for sid, (depth, nbytes) in out.streams.items():
            stream = self.by_id.get(sid)
            if stream is not None:
                was = stream.depth
                stream.depth = now = was + depth
                stream.bytes += nbytes
                totals = stream.totals
                totals.depth += depth
                totals.bytes += nbytes
                if not was:   # the key's queue filled, or emptied
                    totals.keys += now != 0
                elif not now:
                    totals.keys -= 1
        for sid, n in out.high.items():
            stream = self.by_id.get(sid)
            if stream is not None:
                stream.high += n
                stream.totals.high += n
        for sid, n in out.high_in.items():
            if (stream := self.by_id.get(sid)) is not None:
                stream.high_in += n
        merge(self.counters, out.counters)
        self.dead_count += out.counters.get(Drop.DEAD_LETTERED, 0) - out.counters.get(
            Tally.DEAD_DROPPED_FULL, 0) - out.counters.get(Tally.DEAD_EXPIRED, 0)
        self.used_bytes = out.used_bytes

    @property
    def depth(self) -> int:
        return sum(t.depth for t in self.groups.values())
