"""The bench's model of the dedupe index's memory follows the set the index keeps."""

from __future__ import annotations

import random
import sys

from agent.spool.dedupe import DedupeIndex
from bench.index_memory import MIN_SLOTS, SLOT_BYTES, index_bytes, rebuilds, slots_after

EMPTY = sys.getsizeof(set())   # with its small table inline: a larger one is counted beside


def test_the_model_rebuilds_the_table_where_the_index_does() -> None:
    # 3,000 keys at a cap of 1,000, 100 a call as a batch brings them: the table grows,
    # then is rebuilt as the oldest keys are forgotten and new ones come.
    cap, rng = 1000, random.Random(5)
    index = DedupeIndex(window_ms=10**9, max_keys=cap)
    seen = [(0, sys.getsizeof(index.keys))]
    for k in range(100, 3001, 100):
        index.admit([rng.getrandbits(63) for _ in range(100)], 0, 0)
        seen.append((k, sys.getsizeof(index.keys)))
    for k, size in seen:
        slots = slots_after(k, cap)
        assert size - EMPTY == (SLOT_BYTES * slots if slots > MIN_SLOTS else 0), k
    # A rebuild at the cap happened here, and the model saw it come.
    assert any(k > cap for k, *_ in rebuilds(3000, cap))


def test_the_peak_holds_both_tables_while_one_is_copied_into_the_other() -> None:
    at_cap = [(k, used, old, new) for k, used, old, new in rebuilds(2_000_000, 1_000_000)
              if k > 1_000_000]
    assert at_cap and all(old == new == 1 << 21 for *_, old, new in at_cap)
    steady = index_bytes(1_000_000, 1_000_000, 1_000_000)
    churned = index_bytes(1_000_000, 2_000_000, 1_000_000)
    assert churned - steady >= SLOT_BYTES * (1 << 21)
    # Before the first rebuild at the cap, only the keys at rest.
    first = at_cap[0][0]
    assert index_bytes(1_000_000, first - 1, 1_000_000) < churned - SLOT_BYTES * (1 << 21) // 2
