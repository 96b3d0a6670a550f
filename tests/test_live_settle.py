"""LiveRecords.settle takes a drain's acks as ranges, a record at a time: the same
Settles, offset for offset, as the same seqs given one int at a time; and a commit
settles records acked whole together, as if each had been settled alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families.event import SEGMENT, Event, dedupe_key
from agent.outcomes import Tally
from agent.settings import StorageConfig
from agent.spool import Spool
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


async def test_one_commit_settles_whole_records_a_part_and_a_dead_letter(tmp_path: Path) -> None:
    """Acks that land in one commit: records acked whole (deleted together), a record
    acked in part and one with a dead letter (settled one by one), a range and a list,
    and a seq in no record. What stays queued, the counts, and every delivered event's
    dedupe key (across a reopen) are as if each had been settled alone."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    for part in range(4):   # one record each
        await spool.append([ev(10 * part + i) for i in range(5)])
    queued = await spool.fetch(spool.streams["k"].id, 0, 100)
    firsts = [run.first for run in queued.runs]
    assert len(firsts) == 4 and all(len(run.bodies) == 5 for run in queued.runs)
    await asyncio.gather(
        spool.ack(range(firsts[0], firsts[0] + 5)),                 # whole
        spool.ack([*range(firsts[1], firsts[1] + 5), 999_999]),     # whole, and unknown
        spool.ack(range(firsts[2] + 1, firsts[2] + 3)),             # a part
        spool.ack([firsts[3]]),
        spool.dead_letter([(firsts[3] + 4, "up", "refused")]))
    assert spool.counters[Tally.ACKED] == 13 and spool.depth == 6
    left = await spool.fetch(spool.streams["k"].id, 0, 100)
    assert [r.seq for r in left] == [firsts[2], firsts[2] + 3, firsts[2] + 4,
                                     firsts[3] + 1, firsts[3] + 2, firsts[3] + 3]
    assert [d["seq"] for d in await spool.dead_letters()] == [firsts[3] + 4]
    await spool.close()
    again = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    delivered = [*range(0, 5), *range(10, 15), 21, 22, 30]
    assert await again.append([ev(n) for n in delivered]) == 0   # duplicates, all
    assert await again.append([ev(20)]) == 0                     # still queued: a duplicate
    assert again.depth == 6
    await again.close()


def ev(n: int) -> Event:
    return Event("k", SEGMENT, dedupe_key("k", n),
                 orjson.dumps({"type": "track", "messageId": f"m{n}", "pad": "x" * 40}))
