"""The dedupe index: which event keys arrived within the dedupe window, exactly, in memory.

A resend that arrives within ``window_ms`` of its event's first receipt is stored
once (docs/operations.md, "Dedupe memory"): the spool asks ``admit`` about each request's keys before it
stores them. Beyond the window, or past ``max_keys``, delivery is at-least-once.

Keys are the events' signed 64-bit dedupe keys, in one Python ``set`` (at 1M keys,
``bench/micro_dedupe.py``: ``admit`` costs ~0.4 µs per new key, ~0.05 µs per resend,
where a bare set's lookup and add cost ~0.2 µs), and in buckets by
first receipt, each an ``array('q')``, so that a whole bucket can be forgotten at
once. A bucket holds at most an hour of agent-observed time, and at most 1/16 of
``max_keys`` (so the cap never forgets much more than it must). It is forgotten when
both clocks say its newest key is past the window: the wall clock, and the time the
agent has seen pass (agent/clock.py), so that a wrong wall clock forgets nothing
early (issue 9's rule); by the time the agent has seen pass alone when the wall clock
reads before the key's receipt (``expire``). Callers pass both times in; nothing here
reads a clock.

Memory (``bench/micro_dedupe.py``, 1M random keys): 77.6 bytes per key by tracemalloc
(the set: ~69 B, each key an int object in a hash table; the bucket arrays: 8.5 B),
~90 B of the process's anonymous memory on the agent's allocator, which counts the
allocator's own overhead. While keys churn (at the cap, or as buckets expire), CPython
rebuilds the set's table every so many new keys and holds the old one until the copy is
done: ~129 B a key at that peak (up to ~145 B at other sizes, ``bench/index_memory.py``).
A spool that receives a million events a day holds ~90 MB for a 24 h window, ~130 MB
at the peak; ``max_keys`` is the bound.

At the cap, the oldest buckets are forgotten first, whole, before new keys go in:
``forgotten`` counts those keys (the spool's ``dedupe_forgotten``), and the keys the
spool file let go early while they are still here (``forgotten_stored``), each key
once: a bucket knows how many of its keys the file's forgetting counted already, and
the newest record whose keys it holds, to be found by it.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import accumulate, compress, filterfalse, islice, repeat
from operator import attrgetter, itemgetter, le

HOUR_MS = 3_600_000
# In a record's keys, the place of an event whose key another record stores now (a dead
# letter retried while its old record was still queued: a record's keys are in its
# events' order; or one retried while a copy of its event stored again holds the key,
# ``held_since``, or with a newer letter of that event). Never remembered: stored twice,
# the file's letting go of the key was counted for each place (dedupe_forgotten). A real
# key of that value (one in 2**64; not an edge of the range, which tests and tools reach
# for) is at-least-once.
MOVED_KEY = int.from_bytes(b"moved ky", "big")
_STRETCH_BYTES = 1 << 19   # keys copied into the set at a time while it is rebuilt: 64k
_LITTLE = sys.byteorder == "little"


@dataclass(slots=True)
class _Bucket:
    """Keys first received between ``opened`` and ``observed`` (agent-observed ms)."""

    opened: int
    wall: int       # the newest receipt in it, by each clock: it expires after its newest key
    observed: int
    keys: array[int] = field(default_factory=lambda: array("q"))
    record: int = 0   # the newest record (its id in the spool) whose keys it holds
    first: int = 0    # the oldest: a key here came from no record before it (``drop``)
    counted: int = 0  # keys in it counted forgotten already: the file let them go early


@dataclass(slots=True)
class StoredKeys:
    """Dedupe keys stored beside records, as a spool opens: flat arrays, no Python object
    per record (a spool of one-event records has millions). Oldest record first: ``blob``
    is each record's keys (``keys_to_bytes``) in turn, ``counts`` how many each has,
    ``ids`` each record's id (empty: not known, taken as 0)."""

    blob: bytes = b""
    counts: array[int] = field(default_factory=lambda: array("q"))
    wall: array[int] = field(default_factory=lambda: array("q"))
    observed: array[int] = field(default_factory=lambda: array("q"))
    ids: array[int] = field(default_factory=lambda: array("q"))

    @classmethod
    def of(cls, records: Sequence[tuple[bytes, int, int]]) -> StoredKeys:
        """From (``keys_to_bytes``, wall ms, observed ms) a record, oldest first."""
        return cls(b"".join(r[0] for r in records), array("q", (len(r[0]) // 8 for r in records)),
                   array("q", (r[1] for r in records)), array("q", (r[2] for r in records)))

    def __iter__(self) -> Iterator[tuple[memoryview, int, int, int]]:
        """(keys, wall ms, observed ms, record id) of each record, oldest first."""
        view, start = memoryview(self.blob), 0
        for count, wall, observed, rid in zip(self.counts, self.wall, self.observed,
                                              self.ids or repeat(0)):
            yield view[start:start + 8 * count], wall, observed, rid
            start += 8 * count


def keys_to_bytes(keys: Sequence[int]) -> bytes:
    """Keys as the spool stores them beside a record: int64, little-endian (``load`` reads it)."""
    packed = array("q", keys)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


_MOVED = keys_to_bytes([MOVED_KEY])


def _holds_moved(blob: bytes) -> bool:
    """Whether keys as stored (``keys_to_bytes``) hold MOVED_KEY: found in C, checked
    to be a whole key."""
    at = blob.find(_MOVED)
    while at >= 0 and at % 8:
        at = blob.find(_MOVED, at + 1)
    return at >= 0


def moved_keys(blob: bytes) -> int:
    """How many MOVED_KEY placeholders keys as stored (``keys_to_bytes``) hold: places,
    not keys, where a key count is wanted."""
    return _as_array(blob).count(MOVED_KEY) if _holds_moved(blob) else 0


def _newest_only(stored: StoredKeys) -> tuple[StoredKeys, dict[int, int]]:
    """``stored`` with each key in its newest record alone, and no MOVED_KEY; and the keys
    an older record stored too, each with the id of the record that holds it now. A key
    is stored twice when the index let it go (its first event still queued past the
    window, or the cap) and the app sent it again: the running agent remembered it from
    then on. Newest first, a stretch of records at a time while none of its keys was met
    (each record alone in a stretch that holds one); the keys met are as many as the
    index's."""
    ends = array("q", accumulate(stored.counts, initial=0))
    raw, counts = memoryview(stored.blob), array("q", stored.counts)
    met: set[int] = {MOVED_KEY}
    again: set[int] = set()
    kept: list[bytes] = []   # newest first
    hi = len(counts)
    while hi:
        lo = min(hi - 1, bisect_left(ends, ends[hi] - _STRETCH_BYTES // 8, 0, hi))
        stretch = set(keys := _as_array(raw[8 * ends[lo]:8 * ends[hi]]))
        if len(stretch) == len(keys) and met.isdisjoint(stretch):
            met |= stretch
            kept.append(bytes(raw[8 * ends[lo]:8 * ends[hi]]))
        else:
            for i in range(hi - 1, lo - 1, -1):
                part = _as_array(raw[8 * ends[i]:8 * ends[i + 1]])
                again.update(filter(met.__contains__, part))
                fresh = array("q", dict.fromkeys(filterfalse(met.__contains__, part)))
                met.update(fresh)
                counts[i] = len(fresh)
                kept.append(keys_to_bytes(fresh))
        hi = lo
    newest = StoredKeys(b"".join(reversed(kept)), counts, stored.wall, stored.observed,
                        stored.ids)
    again.discard(MOVED_KEY)
    holders: dict[int, int] = {}
    if again:   # each key is once in ``newest``: where it is, is its newest copy
        ends = array("q", accumulate(counts, initial=0))
        flat = _as_array(newest.blob)
        for at in compress(range(len(flat)), map(again.__contains__, flat)):
            i = bisect_right(ends, at) - 1
            holders[flat[at]] = stored.ids[i] if stored.ids else 0
    return newest, holders


def _as_array(keys: bytes | memoryview | Sequence[int]) -> array[int]:
    if isinstance(keys, bytes | bytearray | memoryview):
        stored = array("q")
        stored.frombytes(keys)
        if not _LITTLE:
            stored.byteswap()
        return stored
    return keys if isinstance(keys, array) else array("q", keys)


class DedupeIndex:
    """The keys first received within the window, at most ``max_keys`` of them.

    ``admit`` answers (and remembers) a request's keys; ``load`` puts back keys stored
    with records at startup; ``expire`` forgets buckets past the window by both clocks.
    """

    def __init__(self, window_ms: int, max_keys: int, bucket_ms: int = HOUR_MS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.window_ms = window_ms
        self.max_keys = max_keys
        self.bucket_ms = bucket_ms
        self.bucket_keys = max(1, max_keys // 16)
        # keys forgotten before their window ended: past max_keys, or by the file (each once)
        self.forgotten = 0
        self._keys: set[int] = set()
        self._buckets: list[_Bucket] = []  # oldest first
        # Keys loaded at startup that an older record stored too, with the id of the record
        # holding them: the rebuild may put both records in one bucket, where ``first``
        # cannot tell the copies apart (``drop``). A key leaves once the index lets it go.
        self._copies: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    @property
    def keys(self) -> AbstractSet[int]:
        """The keys remembered, to test many at once without a call per key (change them
        only through admit, load, discard and expire)."""
        return self._keys

    def admit(self, keys: Sequence[int], wall_ms: int, observed_ms: int,
              record: int = 0) -> list[bool]:
        """For each key, True if it is new (it is remembered from now on), False if it was
        seen within the window, or earlier in ``keys``. ``record``: the id of the spool's
        record that stores them (``forgotten_stored`` finds their bucket by it)."""
        seen = self._keys
        flags = [k not in seen for k in keys]
        # All new (the usual call): an array of keys is copied, not converted key by key.
        fresh = array("q", keys if all(flags) else compress(keys, flags))
        self._stored_again(fresh)
        if fresh and not self._remember(fresh, wall_ms, observed_ms, record):
            # A key repeated within the call: only its first occurrence is new.
            firsts: set[int] = set()
            for i, k in enumerate(keys):
                if flags[i]:
                    flags[i] = k not in firsts
                    firsts.add(k)
        return flags

    def remember(self, keys: Sequence[int], wall_ms: int, observed_ms: int,
                 record: int = 0) -> None:
        """``admit`` of keys the caller has found absent, none twice: a commit's, checked
        against the index when the commit was built, with nothing admitted since (the
        writer builds the next commit only once this one is remembered). No lookup per key:
        with the commit's own lookups made one per request, 1-2% of a 100-event batch's
        instructions (bench/RESULTS.md run 29)."""
        if keys:
            self._stored_again(keys)
            self._remember(array("q", keys), wall_ms, observed_ms, record)

    def load(self, keys: bytes | memoryview | Sequence[int], wall_ms: int,
             observed_ms: int, record: int = 0) -> None:
        """Remember keys received at ``wall_ms`` / ``observed_ms`` (by the agent's count),
        as stored with a record (``keys_to_bytes``). Call in the order they were received:
        a bucket expires after its newest key, so out of order, keys are kept longer."""
        stored = _as_array(keys)
        if MOVED_KEY in stored:
            stored = array("q", (k for k in stored if k != MOVED_KEY))
        # A key here already was stored again (``_newest_only``): it leaves its older
        # bucket, which would forget it early.
        again = self._keys.intersection(stored)
        self.discard(list(again))
        if stored:
            self._remember(stored, wall_ms, observed_ms, record)
        self._copies.update(dict.fromkeys(again, record))

    def load_all(self, stored: StoredKeys) -> None:
        """``load`` of each stored record, oldest first: the startup rebuild. Into an
        empty index, by whole buckets (``_load_counted``), a key that repeats kept in its
        newest record alone (``_newest_only``: ``load`` moving it was a scan of the older
        buckets for each, 18 s for 1,000 at a million keys)."""
        empty = not self._keys and not self._buckets
        if empty and self._load_counted(stored):
            return
        if empty:
            stored, self._copies = _newest_only(stored)
            if self._load_counted(stored):
                return
        for raw, wall_ms, observed_ms, record in stored:
            self.load(raw, wall_ms, observed_ms, record)

    def _load_counted(self, stored: StoredKeys) -> bool:
        """``load_all`` into an empty index, at a few Python steps a bucket rather than
        ~7 µs a record (a spool of one-event records has millions: bench/open_records.py).
        False, the index left empty, if a key repeats or the receipt times go backwards.

        While no key repeats, which buckets loading record by record would fill and
        forget depends on counts and times alone: they are found by bisecting the
        running count of keys and the (ascending) receipt times. Then the keys go into
        the set a stretch at a time, each stretch ending at a record that makes the cap
        forget buckets: a shortfall in the set's growth is a repeat (``load`` would have
        moved it to a newer bucket), and the set never holds more than ``max_keys`` and one
        record."""
        if 0 in stored.counts:  # records without keys neither open nor fill a bucket
            stored = StoredKeys(stored.blob, *(array("q", compress(column, stored.counts))
                                               for column in (stored.counts, stored.wall,
                                                              stored.observed, stored.ids)))
        counts, wall, seen, ids = stored.counts, stored.wall, stored.observed, stored.ids
        if not counts:
            return True
        if _holds_moved(stored.blob):   # rare (a retry): loaded record by record, without
            return False
        if max(counts) > self.max_keys or not all(map(le, seen, islice(seen, 1, None))):
            return False
        ends = array("q", accumulate(counts, initial=0))   # keys before each record
        spans, cuts = self._plan(ends, seen)
        raw = memoryview(stored.blob)

        def keys(lo: int, hi: int) -> array[int]:   # of records [lo, hi): copied, not iterated
            return _as_array(raw[8 * ends[lo]:8 * ends[hi]])

        remembered, start, forgotten = self._keys, 0, 0
        for record, first, last in (*cuts, (len(counts) - 1, 0, 0)):
            before = len(remembered)
            for at in range(8 * ends[start], 8 * ends[record + 1], _STRETCH_BYTES):
                remembered.update(_as_array(raw[at:min(at + _STRETCH_BYTES, 8 * ends[record + 1])]))
            if len(remembered) - before != ends[record + 1] - ends[start]:
                self._keys = set()
                return False
            for lo, hi in spans[first:last]:
                remembered.difference_update(keys(lo, hi))
                forgotten += ends[hi] - ends[lo]
            start = record + 1
        kept = spans[cuts[-1][2]:] if cuts else spans
        self._buckets = [_Bucket(seen[lo], max(wall[lo:hi]), seen[hi - 1], keys(lo, hi),
                                 ids[hi - 1] if ids else 0, ids[lo] if ids else 0)
                         for lo, hi in kept]
        self.forgotten += forgotten
        return True

    def _plan(self, ends: array[int], seen: array[int]) -> tuple[list[list[int]],
                                                                   list[tuple[int, int, int]]]:
        """The buckets record-by-record loading fills, as [first, end) record ranges,
        and where the cap forgets some: (record, first, end) in that list, before the
        record goes in. Keys distinct, every record with some, ``seen`` ascending."""
        n, cap = len(ends) - 1, self.max_keys
        spans: list[list[int]] = []
        cuts: list[tuple[int, int, int]] = []
        kept, record = 0, 0
        while record < n:
            if kept < len(spans) and ends[record + 1] - ends[spans[kept][0]] > cap:
                first = kept
                while kept < len(spans) and ends[record + 1] - ends[spans[kept][0]] > cap:
                    kept += 1
                cuts.append((record, first, kept))
            newest = spans[-1] if kept < len(spans) else None
            if (newest is None or ends[record] - ends[newest[0]] >= self.bucket_keys
                    or seen[record] - seen[newest[0]] >= self.bucket_ms):
                newest = [record, record + 1]
                spans.append(newest)
            opened, oldest = newest[0], spans[kept][0]
            # The next record that closes this bucket (full, or an hour past its first)
            # or makes the cap forget: the ones before it just go in.
            record = min(bisect_left(ends, ends[opened] + self.bucket_keys, record + 1, n),
                         bisect_left(seen, seen[opened] + self.bucket_ms, record + 1, n),
                         bisect_right(ends, ends[oldest] + cap, record + 2, n + 1) - 1)
            newest[1] = record
        return spans, cuts

    def discard(self, keys: Sequence[int]) -> None:
        """Forget ``keys`` now, wherever they came from (a key moving to a newer record).

        They leave their buckets too, or a resend admitted later would be forgotten with
        the old bucket, early. They are the oldest keys (drop_oldest, expiry): the scan
        stops at the bucket holding the last of them."""
        left = self._keys.intersection(keys)
        if not left:
            return
        self._keys.difference_update(left)
        for bucket in self._buckets:
            if left.isdisjoint(bucket.keys):
                continue
            kept = array("q", filterfalse(left.__contains__, bucket.keys))
            left.difference_update(bucket.keys)
            bucket.keys = kept
            if not left:
                break

    def held_since(self, letters: Sequence[tuple[int, int]]) -> set[int]:
        """Of dead letters about to be retried, as (seq, key), the seqs whose key the index
        holds from a record newer than the letter: a copy of its event stored again, once
        the letter's key was let go (its window, or the cap). That copy keeps the key for
        its own window: moved to the retried record, the newest holding it, the key went
        when that record was dropped undelivered (``drop``), with the copy still queued or
        delivered within its window. A bucket's keys came from records no older than its
        ``first``; ``_copies`` names a rebuilt key's holder."""
        left = self._keys.intersection(k for _, k in letters)
        least = {k: self._copies[k] for k in left.intersection(self._copies)}
        left.difference_update(least)
        for bucket in self._buckets:
            if not left:
                break
            if found := left.intersection(bucket.keys):
                least.update(dict.fromkeys(found, bucket.first))
                left -= found
        return {seq for seq, k in letters if least.get(k, seq) > seq}

    def drop(self, records: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Forget the keys of records dropped undelivered, as (record id, keys): a resend
        of one must be stored. Not a key the index holds from a newer record: stored
        twice (its first copy queued past the window, or the cap), the newer copy still
        dedupes within its own window. A key in a bucket came from a record no older
        than the bucket's ``first``: one of the dropped records older than that is
        another copy's. The scan stops at the first bucket newer than them all."""
        ordered = sorted(records, key=itemgetter(0))
        ids = [rid for rid, _ in ordered]
        ends = array("q", accumulate((len(part) for _, part in ordered), initial=0))
        keys = array("q")
        for _, part in ordered:
            keys.extend(part)
        left = self._keys.intersection(keys)
        older: set[int] = set()   # keys of the dropped records before ``passed``, still held
        passed = 0
        for bucket in self._buckets:
            if not left or bucket.first > ids[-1]:
                break
            held = left.intersection(bucket.keys)
            if not held:
                continue
            left.difference_update(held)
            if (at := bisect_left(ids, bucket.first)) > passed:
                older.update(self._keys.intersection(keys[ends[passed]:ends[at]]))
                passed = at
            if copies := held.intersection(older):   # a newer record's: kept, unless a
                held -= copies.difference(keys[ends[at]:])   # dropped one's too
            if self._copies and (known := held.intersection(self._copies)):
                held -= {k for k in known   # kept by a newer record than those dropped
                         if k not in keys[ends[bisect_left(ids, self._copies[k])]:]}
            if held:
                self._keys.difference_update(held)
                bucket.keys = array("q", filterfalse(held.__contains__, bucket.keys))

    def forgotten_stored(self, records: Iterable[tuple[int, bytes | Sequence[int]]]) -> None:
        """Keys the spool file let go early (at max_size_mb), by (record id, keys): those
        still remembered are counted forgotten now, in the bucket of their record (the
        oldest holding a record as new), so that the cap does not count them again when
        it forgets that bucket. The others were counted when the index let them go, or
        their window ended; if the index let the record's bucket go, a key of it still
        remembered is a newer copy's (a resend stored again), not forgotten, as is one
        whose newer copy a rebuild put in the same bucket (``_copies``)."""
        for record, keys in records:
            n = sum(map(self._keys.__contains__, stored := _as_array(keys)))
            if n and self._copies:   # not a newer copy's, rebuilt into this one's bucket
                n = sum(k in self._keys and self._copies.get(k, record) <= record
                        for k in stored)
            if n:
                at = bisect_left(self._buckets, record, key=attrgetter("record"))
                bucket = self._buckets[min(at, len(self._buckets) - 1)]
                if bucket.first > record:   # its bucket is gone: those are newer copies'
                    continue
                bucket.counted += n
                self.forgotten += n

    def expire(self, wall_ms: int, observed_ms: int) -> int:
        """Forget the buckets whose newest key both clocks say is past the window;
        returns how many keys were forgotten.

        A wall clock that reads before a key's receipt was set back since (or was ahead
        then): it says nothing of the key's age, and waiting for it to catch up held the
        keys of a device that woke years ahead for years. The agent-observed clock then
        judges alone: it never runs ahead of real time, so it forgets nothing early. Not
        for a key from before the agent counted time (observed below 0: db.PAST), which
        the wall clock alone judges."""
        if self._copies:   # those of keys let go
            self._copies = {k: r for k, r in self._copies.items() if k in self._keys}
        gone = 0
        kept = []
        for bucket in self._buckets:
            wall_age = wall_ms - bucket.wall
            if ((wall_age >= self.window_ms or (wall_age < 0 and bucket.observed >= 0))
                    and observed_ms - bucket.observed >= self.window_ms):
                gone += self._forget(bucket)
            else:
                kept.append(bucket)
        self._buckets = kept
        return gone

    def _remember(self, fresh: array[int], wall_ms: int, observed_ms: int,
                  record: int = 0) -> bool:
        """Add keys absent from the index, first making room under ``max_keys``. Returns
        False if ``fresh`` held a key twice (it is remembered once)."""
        if len(fresh) > self.max_keys:  # more than the cap in one go: the newest are kept
            unique = array("q", dict.fromkeys(fresh))
            self.forgotten += max(0, len(unique) - self.max_keys)
            return self._remember(unique[-self.max_keys:], wall_ms, observed_ms, record) and \
                len(unique) == len(fresh)
        while self._buckets and len(self._keys) + len(fresh) > self.max_keys:
            bucket = self._buckets.pop(0)
            self.forgotten += max(0, self._forget(bucket) - bucket.counted)
        before = len(self._keys)
        self._keys.update(fresh)
        if len(self._keys) - before == len(fresh):
            self._place(fresh, wall_ms, observed_ms, record)
            return True
        # Each key once in the buckets, or expiry would count it twice.
        self._place(array("q", dict.fromkeys(fresh)), wall_ms, observed_ms, record)
        return False

    def _place(self, fresh: array[int], wall_ms: int, observed_ms: int, record: int) -> None:
        """Put keys just remembered into the newest bucket, or a new one once it is full
        or an hour old."""
        bucket = self._buckets[-1] if self._buckets else None
        if (bucket is None or len(bucket.keys) >= self.bucket_keys
                or observed_ms - bucket.opened >= self.bucket_ms):
            bucket = _Bucket(opened=observed_ms, wall=wall_ms, observed=observed_ms,
                             first=record)
            self._buckets.append(bucket)
        bucket.wall = max(bucket.wall, wall_ms)
        bucket.observed = max(bucket.observed, observed_ms)
        bucket.record = max(bucket.record, record)
        bucket.first = min(bucket.first, record)
        bucket.keys.extend(fresh)

    def _stored_again(self, fresh: Sequence[int]) -> None:
        """Keys let go and stored again by a running agent are in the bucket of their
        newest record alone, where ``first`` tells the copies apart: not ``_copies``'."""
        if self._copies and not self._copies.keys().isdisjoint(fresh):
            for k in fresh:
                self._copies.pop(k, None)

    def _forget(self, bucket: _Bucket) -> int:
        self._keys.difference_update(bucket.keys)
        return len(bucket.keys)
