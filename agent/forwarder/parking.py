"""The keys waiting out a backoff: what the supervisor keeps instead of a loop per key.

A parked key costs an entry here and one in a heap of retry times, which one timer
serves. A key can leave before its time (its upstream is back, a flush), so a heap
entry counts only while it matches the key's current park; stale ones are skipped.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Parked:
    """One key's park: when it retries, at which backoff step, for which upstream, and
    the last seq of a release (max_hold_h) its retry sends, if one is under way."""

    when: float
    attempt: int
    upstream: str
    told: bool   # the wait is the upstream's own Retry-After: nothing may cut it short
    until: int | None = None


class ParkingLot:
    """Parked keys, by key, by retry time and counted by upstream."""

    def __init__(self, counted: Callable[[str, int], None] = lambda upstream, n: None) -> None:
        self._keys: dict[str, Parked] = {}
        self._heap: list[tuple[float, str]] = []
        self._by_upstream: Counter[str] = Counter()
        self._counted = counted   # told each upstream's new count

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def count(self, upstream: str) -> int:
        return self._by_upstream[upstream]

    def park(self, key: str, parked: Parked) -> None:
        if key in self._keys:
            self._drop(key)
        self._keys[key] = parked
        self._by_upstream[parked.upstream] += 1
        self._counted(parked.upstream, self._by_upstream[parked.upstream])
        heapq.heappush(self._heap, (parked.when, key))

    def next_due(self) -> float | None:
        while self._heap:
            when, key = self._heap[0]
            p = self._keys.get(key)
            if p is not None and p.when == when:
                return when
            heapq.heappop(self._heap)   # the key left, or parked again since
        return None

    def due(self, now: float) -> Iterator[tuple[str, Parked]]:
        """Take the keys whose time has come, soonest first.

        Lazily, one key per step: a caller that raises while starting one key leaves
        the rest parked, for its re-armed timer, instead of taken and forgotten."""
        while (when := self.next_due()) is not None and when <= now:
            _, key = heapq.heappop(self._heap)
            yield key, self._drop(key)

    def take(self, upstream: str) -> Iterator[tuple[str, Parked]]:
        """Take ``upstream``'s keys that wait on our backoff, not on its Retry-After;
        lazily, as ``due``."""
        keys = [k for k, p in self._keys.items() if p.upstream == upstream and not p.told]
        for key in keys:
            p = self._keys.get(key)
            if p is not None and p.upstream == upstream and not p.told:  # still parked so
                yield key, self._drop(key)

    def items(self) -> Iterator[tuple[str, Parked]]:
        return iter(list(self._keys.items()))

    def release(self, until: int) -> None:
        """A release (max_hold_h): each key's retry sends its events up to ``until``."""
        for key, parked in self._keys.items():
            self._keys[key] = replace(parked, until=until)

    def clear(self) -> dict[str, Parked]:
        keys = dict(self._keys)
        upstreams = list(self._by_upstream)
        self._keys.clear()
        self._heap.clear()
        self._by_upstream.clear()
        for upstream in upstreams:
            self._counted(upstream, 0)
        return keys

    def _drop(self, key: str) -> Parked:
        p = self._keys.pop(key)
        self._by_upstream[p.upstream] -= 1
        self._counted(p.upstream, self._by_upstream[p.upstream])
        return p
