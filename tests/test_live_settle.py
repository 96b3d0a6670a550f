"""LiveRecords.settle takes a drain's acks as ranges, a record at a time: the same
Settles, offset for offset, as the same seqs given one int at a time."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spool.commit import Settle
from agent.spool.live import LiveRecords
from agent.spool.types import joined


@st.composite
def records(draw: st.DrawFn) -> tuple[LiveRecords, int]:
    """Live records with gaps between them, some of them gone (acked whole before)."""
    live = LiveRecords()
    seq = draw(st.integers(1, 300))
    rids = []
    for _ in range(draw(st.integers(0, 8))):
        n = draw(st.integers(1, 12))
        live.add(seq, n, 1000 + seq)
        rids.append(seq)
        seq += n + draw(st.integers(0, 3))
    live.remove(draw(st.lists(st.sampled_from(rids), max_size=3)) if rids else [])
    return live, seq + 5


def chunks(end: int) -> st.SearchStrategy[list[range]]:
    return st.lists(st.builds(lambda a, n: range(a, a + n), st.integers(0, end),
                              st.integers(0, 30)), max_size=6)


def as_given(settles: list[Settle]) -> dict[int, tuple[list[int], list[tuple[int, str, str]]]]:
    return {s.id: (list(s.acked), s.dead) for s in settles}


@settings(max_examples=500, deadline=None)
@given(records(), st.data())
def test_ranges_settle_as_the_same_seqs_one_by_one(made: tuple[LiveRecords, int],
                                                  data: st.DataObject) -> None:
    live, end = made
    acked = data.draw(chunks(end))
    dead = [(seq, "up", "why") for seq in data.draw(st.lists(st.integers(0, end), max_size=3))]
    flat: list[Sequence[int]] = [list(c) for c in acked]   # any other sequence: one by one
    got = as_given(live.settle(acked, dead))
    assert got == as_given(live.settle(flat, dead))
    for offsets, _ in got.values():
        assert offsets == sorted(set(offsets))   # in order, no repeats (overlaps included)


def test_a_drains_acks_settle_a_record_at_a_time_as_ranges() -> None:
    """Batches acked in turn across records (and a gap left by a record gone): each
    record's offsets one range, none for the record gone or the seqs between records."""
    live = LiveRecords()
    for rid in (100, 200, 300):
        live.add(rid, 100, 7)
    live.remove([200])
    settles = live.settle([range(150, 250), range(250, 350)], [])
    assert [(s.id, s.acked) for s in settles] == [(100, range(50, 100)), (300, range(0, 50))]
    # Ranges each taking part of one record, with a gap between them: one list, in order.
    settles = live.settle([range(330, 340), range(310, 320)], [])
    assert [(s.id, s.acked) for s in settles] == [(300, [*range(10, 20), *range(30, 40)])]


def test_held_acks_join_into_one_range_only_when_they_follow_each_other() -> None:
    assert joined([range(10, 15), range(15, 20)]) == range(10, 20)
    assert joined([range(10, 15), range(16, 20)]) == [*range(10, 15), *range(16, 20)]
    assert joined([range(10, 15), (15, 16)]) == [*range(10, 15), 15, 16]
    assert joined([(3, 1)]) == [3, 1]
