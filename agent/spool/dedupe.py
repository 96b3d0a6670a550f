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
early (issue 9's rule). Callers pass both times in; nothing here reads a clock.

Memory (``bench/micro_dedupe.py``, 1M random keys): 77.6 bytes per key by tracemalloc
(the set: ~69 B, each key an int object in a hash table; the bucket arrays: 8.5 B),
~90 B of the process's anonymous memory on the agent's allocator (95 B at its peak
while keys churn at the cap), which counts the allocator's own overhead. A spool that
receives a million events a day holds ~90-95 MB for a 24 h window; ``max_keys`` is the
bound.

At the cap, the oldest buckets are forgotten first, whole, before new keys go in:
``forgotten`` counts those keys (the spool's ``dedupe_forgotten``).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import compress

HOUR_MS = 3_600_000
_LITTLE = sys.byteorder == "little"


@dataclass(slots=True)
class _Bucket:
    """Keys first received between ``opened`` and ``observed`` (agent-observed ms)."""

    opened: int
    wall: int       # the newest receipt in it, by each clock: it expires after its newest key
    observed: int
    keys: array[int] = field(default_factory=lambda: array("q"))


def keys_to_bytes(keys: Sequence[int]) -> bytes:
    """Keys as the spool stores them beside a record: int64, little-endian (``load`` reads it)."""
    packed = array("q", keys)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


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
        self.forgotten = 0  # keys forgotten before their window ended, because of max_keys
        self._keys: set[int] = set()
        self._buckets: list[_Bucket] = []  # oldest first

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    @property
    def keys(self) -> AbstractSet[int]:
        """The keys remembered, to test many at once without a call per key (change them
        only through admit, load, discard and expire)."""
        return self._keys

    def admit(self, keys: Sequence[int], wall_ms: int, observed_ms: int) -> list[bool]:
        """For each key, True if it is new (it is remembered from now on), False if it was
        seen within the window, or earlier in ``keys``."""
        seen = self._keys
        flags = [k not in seen for k in keys]
        # All new (the usual call): an array of keys is copied, not converted key by key.
        fresh = array("q", keys if all(flags) else compress(keys, flags))
        if fresh and not self._remember(fresh, wall_ms, observed_ms):
            # A key repeated within the call: only its first occurrence is new.
            firsts: set[int] = set()
            for i, k in enumerate(keys):
                if flags[i]:
                    flags[i] = k not in firsts
                    firsts.add(k)
        return flags

    def remember(self, keys: Sequence[int], wall_ms: int, observed_ms: int) -> None:
        """``admit`` of keys the caller has found absent, none twice: a commit's, checked
        against the index when the commit was built, with nothing admitted since (the
        writer builds the next commit only once this one is remembered). No lookup per key:
        with the commit's own lookups made one per request, 1-2% of a 100-event batch's
        instructions (bench/RESULTS.md run 29)."""
        if keys:
            self._remember(array("q", keys), wall_ms, observed_ms)

    def load(self, keys: bytes | memoryview | Sequence[int], wall_ms: int,
             observed_ms: int) -> None:
        """Remember keys received at ``wall_ms`` / ``observed_ms`` (by the agent's count),
        as stored with a record (``keys_to_bytes``). Call in the order they were received:
        a bucket expires after its newest key, so out of order, keys are kept longer."""
        stored = _as_array(keys)
        if not self._keys.isdisjoint(stored):  # rare: keep only the keys not yet here
            stored = array("q", (k for k in stored if k not in self._keys))
        if stored:
            self._remember(stored, wall_ms, observed_ms)

    def load_all(self, records: Iterable[tuple[bytes | memoryview, int, int]]) -> None:
        """``load`` of each (keys, wall_ms, observed_ms), in the order received: the
        startup rebuild. 1M keys: 0.42-0.57x the time of loading record by record
        (``bench/micro_dedupe.py``), by the shortcut of ``_load_distinct``."""
        if not self._keys and not self._buckets and self._load_distinct(records):
            return
        for raw, wall_ms, observed_ms in records:
            self.load(raw, wall_ms, observed_ms)

    def _load_distinct(self, records: Iterable[tuple[bytes | memoryview, int, int]]) -> bool:
        """``load_all`` into an empty index while no key repeats; False, the index empty
        again, at the first that does.

        ``load`` must ask of each record which of its keys are here already, a lookup per
        key that costs as much as adding it. Here each record's keys are added first and
        the set's growth tells whether any was here. While none is, which buckets load by
        load would fill and forget depends on counts alone, so they are filled and
        forgotten by count: the set never holds more than ``max_keys`` and one record.
        """
        keys, forgotten = self._keys, self.forgotten
        for raw, wall_ms, observed_ms in records:
            stored = _as_array(raw)
            before = len(keys)
            keys.update(stored)
            if len(keys) - before != len(stored) or len(stored) > self.max_keys:
                self._keys, self._buckets, self.forgotten = set(), [], forgotten
                return False
            while self._buckets and len(keys) > self.max_keys:
                gone = self._buckets.pop(0)
                keys.difference_update(gone.keys)
                self.forgotten += len(gone.keys)
            if stored:
                self._place(stored, wall_ms, observed_ms)
        return True

    def discard(self, keys: Sequence[int]) -> None:
        """Forget ``keys`` now (events dropped undelivered: a resend must be stored).

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
            kept = array("q", (k for k in bucket.keys if k not in left))
            left.difference_update(bucket.keys)
            bucket.keys = kept
            if not left:
                break

    def expire(self, wall_ms: int, observed_ms: int) -> int:
        """Forget the buckets whose newest key both clocks say is past the window;
        returns how many keys were forgotten."""
        gone = 0
        kept = []
        for bucket in self._buckets:
            if (wall_ms - bucket.wall >= self.window_ms
                    and observed_ms - bucket.observed >= self.window_ms):
                gone += self._forget(bucket)
            else:
                kept.append(bucket)
        self._buckets = kept
        return gone

    def _remember(self, fresh: array[int], wall_ms: int, observed_ms: int) -> bool:
        """Add keys absent from the index, first making room under ``max_keys``. Returns
        False if ``fresh`` held a key twice (it is remembered once)."""
        if len(fresh) > self.max_keys:  # more than the cap in one go: the newest are kept
            unique = array("q", dict.fromkeys(fresh))
            self.forgotten += max(0, len(unique) - self.max_keys)
            return self._remember(unique[-self.max_keys:], wall_ms, observed_ms) and \
                len(unique) == len(fresh)
        while self._buckets and len(self._keys) + len(fresh) > self.max_keys:
            self.forgotten += self._forget(self._buckets.pop(0))
        before = len(self._keys)
        self._keys.update(fresh)
        if len(self._keys) - before == len(fresh):
            self._place(fresh, wall_ms, observed_ms)
            return True
        # Each key once in the buckets, or expiry would count it twice.
        self._place(array("q", dict.fromkeys(fresh)), wall_ms, observed_ms)
        return False

    def _place(self, fresh: array[int], wall_ms: int, observed_ms: int) -> None:
        """Put keys just remembered into the newest bucket, or a new one once it is full
        or an hour old."""
        bucket = self._buckets[-1] if self._buckets else None
        if (bucket is None or len(bucket.keys) >= self.bucket_keys
                or observed_ms - bucket.opened >= self.bucket_ms):
            bucket = _Bucket(opened=observed_ms, wall=wall_ms, observed=observed_ms)
            self._buckets.append(bucket)
        bucket.wall = max(bucket.wall, wall_ms)
        bucket.observed = max(bucket.observed, observed_ms)
        bucket.keys.extend(fresh)

    def _forget(self, bucket: _Bucket) -> int:
        self._keys.difference_update(bucket.keys)
        return len(bucket.keys)
