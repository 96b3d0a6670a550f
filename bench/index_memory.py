"""The dedupe index's resident memory while keys go in, beside which the bench judges the
agent's RSS (the target: under 60 MB "plus the documented dedupe index").

The index (agent/spool/dedupe.py) keeps its keys in one Python ``set``. Each key costs an
int object and its place in a bucket array (``OUTSIDE``, by ``python -m
bench.micro_dedupe``), and the set's table 16 bytes a slot. CPython rebuilds that table
when its filled slots (keys, and the places of keys forgotten since the last rebuild) pass
3/5 of it: into a new table of the next power of two over twice the keys, the old one held
until the copy is done. While the index grows it doubles; once keys churn at the cap (or
the window's oldest hours expire) it is rebuilt, at the same size or twice it, every so many
new keys. For that moment both tables are resident: the peak this module gives.
"""

from __future__ import annotations

from collections.abc import Iterator

SLOT_BYTES = 16      # a set entry: the key's pointer and its hash
MIN_SLOTS = 8        # an empty set's table
# Resident bytes a key beside the table (RssAnon on the agent's allocator, bench.micro_dedupe):
# 57 while the index fills (the int object, its place in a bucket array). Once keys churn,
# freed ints leave the allocator's pages in part used, up to ~62 B a key at 1M keys: not
# counted, so that the index is not taken for more than it holds (the model's peaks are
# 0.5 B a key over, to 4.5 B under, bench.micro_dedupe's at 100k-1M keys).
OUTSIDE = 57


def rebuilds(keys_to: int, cap: int) -> Iterator[tuple[int, int, int, int]]:
    """Each rebuild of the set's table while ``keys_to`` new keys go in, one at a time, at
    most ``cap`` of them kept (the oldest forgotten to make room): (keys in so far, keys
    held, slots before, slots after)."""
    slots, k_at, fill_at = MIN_SLOTS, 0, 0
    while True:
        need = -(-(slots - 1) * 3 // 5)        # fill * 5 >= mask * 3: CPython's trigger
        k = k_at + need - fill_at
        if k > keys_to:
            return
        used = min(k, cap)
        least = used * 2 if used > 50_000 else used * 4
        new = MIN_SLOTS
        while new <= least:
            new <<= 1
        yield k, used, slots, new
        slots, k_at, fill_at = new, k, used


def slots_after(keys_in: int, cap: int) -> int:
    """The set's table, in slots, once ``keys_in`` new keys went in."""
    slots = MIN_SLOTS
    for *_, slots in rebuilds(keys_in, cap):
        pass
    return slots


def index_bytes(keys_from: int, keys_to: int, cap: int) -> int:
    """The index's largest resident memory while its ``keys_from``-th to ``keys_to``-th new
    keys went in (every bench event is new, and every run ends well within the window):
    at rest at the end, or while its table was rebuilt, whichever is larger."""
    peak = OUTSIDE * min(keys_to, cap) + SLOT_BYTES * slots_after(keys_to, cap)
    for k, used, old, new in rebuilds(keys_to, cap):
        if k > keys_from:
            peak = max(peak, OUTSIDE * used + SLOT_BYTES * (old + new))
    return peak
