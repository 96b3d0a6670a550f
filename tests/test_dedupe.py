"""The dedupe index (agent/spool/dedupe.py): exact within the window, both clocks to forget,
a hard cap that forgets the oldest first and counts it, and a rebuild from stored keys."""

from __future__ import annotations

import copy
import tracemalloc
from array import array

from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.device import detect
from agent.families import nucleus, segment
from agent.families.enrich import Enrich
from agent.families.event import dedupe_key, dedupe_key_after, key_head
from agent.settings import DeviceConfig
from agent.spool.dedupe import HOUR_MS, DedupeIndex, StoredKeys, keys_to_bytes

WINDOW = 24 * HOUR_MS
DAY0 = 1_800_000_000_000  # a wall clock in 2027


def test_new_keys_then_resends_and_repeats_within_a_call() -> None:
    index = DedupeIndex(WINDOW, max_keys=1000)
    assert index.admit([1, 2, 1, -(2**63), 2**63 - 1], DAY0, 0) == [True, True, False, True, True]
    assert index.admit([2, 3, 3, -(2**63)], DAY0, 10) == [False, True, False, False]
    assert len(index) == 5 and index.forgotten == 0


key_st = st.integers(0, 30) | st.integers(-(2**63), 2**63 - 1)
step_st = st.tuples(st.lists(key_st, max_size=12), st.integers(0, 3 * HOUR_MS))


@settings(max_examples=200)
@given(st.lists(step_st, max_size=40))
def test_exact_within_the_window_against_a_model(steps: list[tuple[list[int], int]]) -> None:
    """Both clocks move together; expire runs before each admit. A key first received less
    than the window ago is a resend; one never seen, or a window plus a bucket ago, is new."""
    index = DedupeIndex(WINDOW, max_keys=10**6)
    first: dict[int, int] = {}  # key -> the time the index last answered True for it
    now = 0
    for keys, advance in steps:
        now += advance
        index.expire(DAY0 + now, now)
        flags = index.admit(keys, DAY0 + now, now)
        answered: set[int] = set()
        for key, new in zip(keys, flags):
            if key in answered:
                assert not new  # repeated within the call
                continue
            answered.add(key)
            age = now - first[key] if key in first else None
            if age is None or age >= WINDOW + HOUR_MS:
                assert new, (key, age)
            elif age < WINDOW:
                assert not new, (key, age)
            if new:
                first[key] = now
    assert index.forgotten == 0
    assert len(index) <= len(first)


def test_forgetting_needs_both_clocks_past_the_window() -> None:
    index = DedupeIndex(WINDOW, max_keys=1000)
    index.admit([7], DAY0, 0)
    # The wall clock jumps a year ahead (set wrong): the agent saw a minute pass.
    assert index.expire(DAY0 + 365 * WINDOW, 60_000) == 0
    # Either clock one ms short of the window: kept.
    assert index.expire(DAY0 + WINDOW - 1, WINDOW) == 0
    assert index.expire(DAY0 + WINDOW, WINDOW - 1) == 0
    assert index.admit([7], DAY0 + WINDOW - 1, WINDOW - 1) == [False]
    # The resend did not refresh the key's first receipt... but it shares its bucket's expiry:
    # both clocks a window past the bucket's newest receipt forget it.
    assert index.expire(DAY0 + WINDOW, WINDOW) == 1
    assert len(index) == 0 and index.admit([7], DAY0 + WINDOW, WINDOW) == [True]


def test_a_wall_clock_behind_the_receipt_leaves_it_to_the_time_the_agent_saw_pass() -> None:
    """Set back since the key came (or ahead then), the wall clock says nothing of its age:
    waiting for it to catch up held keys for years. Agent-observed time never runs ahead."""
    index = DedupeIndex(WINDOW, max_keys=1000)
    index.admit([7], DAY0, 0)
    assert index.expire(DAY0 - 365 * WINDOW, WINDOW - 1) == 0   # a ms short: kept
    assert index.expire(DAY0 - 365 * WINDOW, WINDOW) == 1
    # A key from before the agent counted time (db.PAST) has only the wall clock to go by.
    index.load([8], DAY0, -(1 << 62))
    assert index.expire(DAY0 - 1, 2 * WINDOW) == 0
    assert index.expire(DAY0 + WINDOW, 2 * WINDOW) == 1


def test_a_bucket_is_kept_until_its_newest_key_is_past_the_window() -> None:
    index = DedupeIndex(WINDOW, max_keys=1000)
    index.admit([1], DAY0, 0)
    index.admit([2], DAY0 + HOUR_MS // 2, HOUR_MS // 2)   # same hourly bucket
    index.admit([3], DAY0 + HOUR_MS, HOUR_MS)             # the next bucket
    assert index.expire(DAY0 + WINDOW + HOUR_MS // 2 - 1, WINDOW + HOUR_MS // 2 - 1) == 0
    assert index.expire(DAY0 + WINDOW + HOUR_MS // 2, WINDOW + HOUR_MS // 2) == 2
    assert index.admit([1, 2, 3], DAY0 + WINDOW + HOUR_MS // 2, WINDOW + HOUR_MS // 2) == [
        True, True, False]


def test_each_clock_counts_from_the_newest_key_of_the_bucket() -> None:
    index = DedupeIndex(WINDOW, max_keys=1000)
    index.admit([1], DAY0, 0)
    # Half an hour later (same bucket) the wall clock reads 10 h later: it was corrected.
    index.admit([2], DAY0 + 10 * HOUR_MS, HOUR_MS // 2)
    later = WINDOW + HOUR_MS // 2
    # Agent-observed time is past the window for both; the wall clock is not, for key 2.
    assert index.expire(DAY0 + later, later) == 0
    assert index.expire(DAY0 + 10 * HOUR_MS + WINDOW, later) == 2
    # The other way round: the wall clock is a year past both, the agent saw the window
    # pass for key 3 but not for key 4, received half an hour after it.
    index.admit([3], DAY0, later)
    index.admit([4], DAY0, later + HOUR_MS // 2)
    assert index.expire(DAY0 + 365 * WINDOW, later + WINDOW) == 0
    assert index.expire(DAY0 + 365 * WINDOW, later + WINDOW + HOUR_MS // 2) == 2


def test_the_cap_forgets_the_oldest_bucket_first_and_counts_it() -> None:
    index = DedupeIndex(WINDOW, max_keys=32)  # buckets of at most 2 keys
    assert index.bucket_keys == 2
    for n in range(16):
        index.admit([2 * n, 2 * n + 1], DAY0 + n, n)
    assert len(index) == 32 and index.forgotten == 0
    index.admit([100], DAY0 + 16, 16)
    assert index.forgotten == 2 and len(index) == 31
    # The oldest bucket (0, 1) is forgotten; the next oldest (2, 3) is not, until room is
    # needed for 0 and 1 again.
    assert index.admit([0, 1, 2, 3], DAY0 + 17, 17) == [True, True, False, False]
    assert index.forgotten == 4 and len(index) == 31
    assert 2 not in index and 3 not in index and 4 in index and 100 in index


@settings(max_examples=200)
@given(st.lists(st.lists(st.integers(0, 40), max_size=12), max_size=30), st.integers(1, 20))
def test_under_a_cap_no_key_is_ever_taken_for_a_resend_wrongly(calls: list[list[int]],
                                                                 cap: int) -> None:
    """Whatever the cap forgets, a key answered False was seen before, every key is
    either remembered or counted as forgotten, and the index never holds more than the cap."""
    index = DedupeIndex(WINDOW, max_keys=cap)
    seen: set[int] = set()
    news = 0
    for n, keys in enumerate(calls):
        flags = index.admit(keys, DAY0 + n, n)
        for i, (key, new) in enumerate(zip(keys, flags)):
            if not new:
                assert key in seen or key in keys[:i]
            news += new
        seen.update(keys)
        assert len(index) <= cap
        assert len(index) + index.forgotten == news


def test_remembered_keys_are_resends_from_then_on_and_the_cap_still_holds() -> None:
    """``remember``: ``admit`` without the lookups, for keys known new (a commit's)."""
    index = DedupeIndex(WINDOW, max_keys=32)  # buckets of at most 2 keys
    for n in range(16):
        index.remember([2 * n, 2 * n + 1], DAY0 + n, n)
    index.remember([], DAY0 + 16, 16)
    assert len(index) == 32 and index.forgotten == 0
    assert index.admit([0, 31, 32], DAY0 + 16, 16) == [False, False, True]
    # The oldest bucket went to make room for 32, as admit would have done.
    assert index.forgotten == 2 and 0 not in index and 2 in index
    assert index.expire(DAY0 + 16 + WINDOW, 16 + WINDOW) == 31 and len(index) == 0


def test_more_keys_than_the_cap_in_one_call_keeps_the_newest() -> None:
    index = DedupeIndex(WINDOW, max_keys=4)
    assert index.admit(list(range(10)), DAY0, 0) == [True] * 10
    assert len(index) == 4 and index.forgotten == 6
    assert index.admit([5, 6, 9], DAY0, 1) == [True, False, False]
    assert index.admit([20, 21, 20, 22, 23, 24, 21], DAY0, 2) == [True, True, False, True, True,
                                                                   True, False]
    assert len(index) == 4 and 20 not in index and 24 in index


def test_load_then_admit_sees_the_loaded_keys() -> None:
    index = DedupeIndex(WINDOW, max_keys=1000)
    index.load(keys_to_bytes([10, -(2**63), 2**63 - 1]), DAY0, 0)
    index.load([11, 10], DAY0 + HOUR_MS, HOUR_MS)
    assert len(index) == 4
    assert index.admit([10, 11, 12, -(2**63), 2**63 - 1], DAY0 + HOUR_MS, HOUR_MS) == [
        False, False, True, False, False]
    # Loaded keys expire by the receipt times they were loaded with; a key loaded twice
    # (stored again after the index let it go) by its newest.
    assert index.expire(DAY0 + WINDOW, WINDOW) == 2
    assert index.admit([10, -(2**63), 11], DAY0 + WINDOW, WINDOW) == [False, True, False]


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50))
def test_stored_keys_load_back_exactly(keys: list[int]) -> None:
    index = DedupeIndex(WINDOW, max_keys=1000)
    index.load(keys_to_bytes(keys), DAY0, 0)
    assert len(index) == len(set(keys))
    assert all(k in index for k in keys)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.lists(st.integers(0, 30), max_size=8),
                          st.lists(st.integers(0, 30), max_size=4),
                          st.integers(0, 3 * HOUR_MS)), max_size=30))
def test_discarded_keys_are_new_again_and_keep_their_own_window(
        steps: list[tuple[list[int], list[int], int]]) -> None:
    """Keys of events dropped undelivered are discarded: the next admit of one is new, and
    counts its window from then (an older bucket that held it must not forget it early)."""
    index = DedupeIndex(WINDOW, max_keys=10**6)
    first: dict[int, int] = {}  # key -> the time of its latest True, while remembered
    now = 0
    for keys, dropped, advance in steps:
        now += advance
        index.expire(DAY0 + now, now)
        for key, new in zip(keys, index.admit(keys, DAY0 + now, now)):
            if key in first and now - first[key] < WINDOW:
                assert not new, (key, now - first[key])
            if new:
                first[key] = now
        index.discard(dropped)
        for key in dropped:
            assert key not in index
            first.pop(key, None)
    # Each remembered key is in exactly one bucket: expiring them all counts each once.
    held = len(index)
    assert index.expire(DAY0 + now + WINDOW + HOUR_MS, now + WINDOW + HOUR_MS) == held
    assert len(index) == 0


@settings(max_examples=150)
@given(st.lists(st.tuples(st.lists(st.integers(0, 15), max_size=8),
                          st.lists(st.integers(0, 40), max_size=3),
                          st.integers(0, 8 * HOUR_MS)), max_size=30),
       st.integers(4, 32))
# Key 0 let go by the cap, stored again by record 3, and record 1 dropped: 0 stays.
@example(steps=[([0], [], 0), ([1, 2, 3, 4], [], 0), ([0], [0], 0)], max_keys=4)
def test_dropping_records_forgets_only_keys_whose_newest_copy_they_held(
        steps: list[tuple[list[int], list[int], int]], max_keys: int) -> None:
    """A key the window or the cap let go while its record waited is stored again by a
    resend: two records hold it. Dropping the older one undelivered (drop_oldest, expiry,
    damage) must leave the key to the newer one, or a third send within the newer
    one's window is stored too; dropping the newer one lets it go. A model of which
    record stores each key's newest copy, against the index, over expiry and the cap."""
    index = DedupeIndex(WINDOW, max_keys=max_keys, bucket_ms=HOUR_MS)
    newest: dict[int, int] = {}   # key -> the record that stored it last
    queued: list[tuple[int, list[int]]] = []   # (record id, keys it stored), oldest first
    now = 0
    for rid, (keys, drops, advance) in enumerate(steps, start=1):
        now += advance
        index.expire(DAY0 + now, now)
        stored = [k for k, new in zip(keys, index.admit(keys, DAY0 + now, now, rid)) if new]
        newest.update(dict.fromkeys(stored, rid))
        queued.append((rid, stored))
        gone = {queued[d % len(queued)][0] for d in drops}
        dropped = [(r, ks) for r, ks in queued if r in gone]
        queued = [(r, ks) for r, ks in queued if r not in gone]
        held = set(index.keys)
        index.drop([(r, array("q", ks)) for r, ks in dropped])
        for key in held:
            assert (key in index) == (newest[key] not in gone), (key, newest[key], gone)
    # Each remembered key is still in exactly one bucket: expiring them all counts each once.
    held_n = len(index)
    assert index.expire(DAY0 + now + WINDOW + HOUR_MS, now + WINDOW + HOUR_MS) == held_n


def test_dropping_an_older_copy_leaves_the_cap_s_count_of_the_newer_one_whole() -> None:
    """Key 7 stored again after its window (record 2), delivered there, and let go by the
    file early (counted forgotten in record 2's bucket); then record 1, its older copy,
    is dropped undelivered. The key stays with record 2: when the cap lets that bucket
    go, the one key in it the file had not counted (9) is counted. Taken out of the
    bucket by the drop, 7 left the file's count above what the bucket held: 9 was not."""
    index = DedupeIndex(WINDOW, max_keys=48)  # buckets of at most 3 keys
    index.admit([7], DAY0, 0, 1)
    index.expire(DAY0 + WINDOW, WINDOW)
    index.admit([7, 8, 9], DAY0 + WINDOW, WINDOW, 2)
    index.forgotten_stored([(2, [7, 8])])
    assert index.forgotten == 2
    index.drop([(1, array("q", [7]))])
    assert 7 in index
    index.admit(range(100, 148), DAY0 + WINDOW, WINDOW, 3)   # the cap lets record 2's go
    assert 7 not in index and 9 not in index
    assert index.forgotten == 3


def test_the_file_letting_go_of_an_older_copy_counts_nothing_the_newer_one_holds() -> None:
    """Key 7, delivered from record 1, let go by the cap (counted) and stored again by
    its resend (record 20). The file then lets go of both records' stored keys at
    max_size_mb: record 1's copy was counted when the cap let it go, and the key the
    index holds is record 20's, counted once for it. Found in the index, record 1's
    was counted a second time."""
    index = DedupeIndex(WINDOW, max_keys=16)  # buckets of 1 key
    index.admit([7], DAY0, 0, 1)
    for i in range(16):
        index.admit([100 + i], DAY0, 0, 2 + i)
    assert 7 not in index and index.forgotten == 1
    assert index.admit([7], DAY0, 0, 20) == [True]
    assert index.forgotten == 2   # 100's
    index.forgotten_stored([(1, [7]), (20, [7])])
    assert index.forgotten == 3
    index.admit(range(200, 216), DAY0, 0, 21)   # the cap lets 7 go: counted already
    assert 7 not in index and index.forgotten == 3 + 15


def test_after_a_rebuild_the_file_letting_go_of_an_older_copy_counts_nothing_the_newer_holds(
        ) -> None:
    """As above, after a restart under a higher dedupe_max_keys: records 1 (keys 7 and 8,
    delivered) and 20 (7 stored again) are rebuilt into one bucket. The file letting go
    of record 1's stored keys forgets 8 alone: 7 is record 20's, kept its whole window.
    Counted for record 1 too, dedupe_forgotten read 2, and the window's end left it so."""
    index = DedupeIndex(WINDOW, max_keys=1000)
    stored = StoredKeys.of([(keys_to_bytes(keys), DAY0, 0) for keys in ([7, 8], [9], [7])])
    stored.ids = array("q", [1, 2, 20])
    index.load_all(stored)
    index.forgotten_stored([(1, [7, 8])])
    assert index.forgotten == 1
    assert index.expire(DAY0 + WINDOW, WINDOW) == 3 and index.forgotten == 1


def _state(index: DedupeIndex) -> tuple[set[int], list[tuple[int, int, int, list[int]]], int]:
    """What an index remembers: its keys, its buckets in order, what the cap forgot."""
    return (set(index.keys), [(b.opened, b.wall, b.observed, list(b.keys))
                              for b in index._buckets], index.forgotten)


# Receipt times go backwards now and then (a spool whose clock marks were salvaged).
@settings(max_examples=300)
@given(st.lists(st.tuples(st.lists(st.integers(0, 40) | st.integers(-(2**63), 2**63 - 1),
                                   max_size=10),
                          st.integers(0, 2 * HOUR_MS) | st.integers(-HOUR_MS, -1)), max_size=25),
       st.integers(1, 120))
def test_loading_every_record_at_once_is_loading_them_one_by_one(
        records: list[tuple[list[int], int]], max_keys: int) -> None:
    """The startup rebuild (load_all) goes by whole buckets while no key repeats and the
    times ascend; with repeats, or times going back, it must still end as record-by-record:
    a key that repeats loaded from its newest record alone (stored again once the index
    let it go, the running agent remembered it from then), unless the cap forgets its
    older copy before the newer is loaded, when the records are taken as stored."""
    stored, now = [], 0
    for keys, advance in records:
        now += advance
        stored.append((keys_to_bytes(keys), DAY0 + now, now))
    taken: list[list[int]] = []   # each record's keys not in a newer one, newest first
    for keys, _ in reversed(records):
        taken.append([k for k in dict.fromkeys(keys) if all(k not in t for t in taken)])
    taken.reverse()
    if DedupeIndex(WINDOW, max_keys, bucket_ms=HOUR_MS)._load_counted(StoredKeys.of(stored)):
        taken = [keys for keys, _ in records]
    one_by_one = DedupeIndex(WINDOW, max_keys, bucket_ms=HOUR_MS)
    for keys, (_, wall, observed) in zip(taken, stored):
        one_by_one.load(keys, wall, observed)
    at_once = DedupeIndex(WINDOW, max_keys, bucket_ms=HOUR_MS)
    at_once.load_all(StoredKeys.of(stored))
    assert _state(at_once) == _state(one_by_one)


@given(st.lists(st.integers(0, 12), max_size=30), st.integers(1, 60),
       st.integers(0, 2 * HOUR_MS))
def test_loading_more_distinct_keys_than_the_cap_at_once_forgets_as_one_by_one(
        sizes: list[int], max_keys: int, step: int) -> None:
    """No key repeats, more than max_keys of them: load_all's bucket-at-a-time rebuild must
    forget the same oldest buckets that loading record by record does."""
    stored, first = [], 0
    for i, size in enumerate(sizes):
        stored.append((keys_to_bytes(range(first, first + size)), DAY0 + i * step, i * step))
        first += size
    one_by_one = DedupeIndex(WINDOW, max_keys)
    for keys, wall, observed in stored:
        one_by_one.load(keys, wall, observed)
    at_once = DedupeIndex(WINDOW, max_keys)
    at_once.load_all(StoredKeys.of(stored))
    assert _state(at_once) == _state(one_by_one)


def test_loading_far_over_the_cap_at_once_holds_no_more_than_the_cap() -> None:
    """dedupe_max_keys bounds the rebuild's memory too, not only what it keeps: a spool
    holding 40x the cap (an outage) must not cost a set of all its keys at startup."""
    records = [(keys_to_bytes(range(i * 100, i * 100 + 100)), DAY0 + i, i) for i in range(2000)]
    stored = StoredKeys.of(records)

    def peak(load: str) -> int:
        tracemalloc.start()
        try:
            index = DedupeIndex(WINDOW, max_keys=5_000)
            if load == "all":
                index.load_all(stored)
            else:
                for record in records:
                    index.load(*record)
            assert len(index) <= 5_000 and index.forgotten == 200_000 - len(index)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    one_by_one, at_once = peak("one"), peak("all")
    assert at_once <= 2 * one_by_one, (at_once, one_by_one)


# Events whose dedupe keys spools already hold (computed by the code of b9a0e70): an upgrade
# that changed which fields make the key, or their order, would store every resend twice.
PINNED_NUCLEUS = [
    ({"type": "event", "name": "clicked", "id": 7, "sessionId": 3, "machineId": "m1",
      "date": "2026-01-01T00:00:00.000Z"}, 6079006130505062738),
    ({"type": "init", "id": "a-1", "sessionId": 3, "deviceId": "d1",
      "date": "2026-01-01T00:00:00.000Z"}, 7380047621854246484),
    ({"event": "error", "name": "boom", "id": 2.5, "anonId": "x"}, 1509523296067383750),
    ({"type": "event", "name": "no id", "payload": {"b": 1, "a": [1, 2]},
      "date": "2026-01-01T00:00:00.000Z"}, -4750389588273318933),
    # Old modules' `event` key: the keys the release before it was read as a type (82ec193)
    # gave, so that a resend across the upgrade is known.
    ({"event": "error:TypeError", "id": 4, "sessionId": 3, "machineId": "m1",
      "date": "2026-01-01T00:00:00.000Z", "payload": {"message": "x"}}, -8688377711842411052),
    ({"event": "nucleus:userid", "id": 5, "sessionId": 3, "machineId": "m1",
      "date": "2026-01-01T00:00:00.000Z", "payload": "u-1"}, 8079274261567275780),
    ({"event": "nucleus:props", "id": 6, "sessionId": 3, "machineId": "m1",
      "date": "2026-01-01T00:00:00.000Z", "payload": {"a": 1}}, -5590520909465075713),
    ({"event": "Clicked", "id": 8, "sessionId": 3, "machineId": "m1",
      "date": "2026-01-01T00:00:00.000Z"}, 2809624747977751002),
    ({"type": "", "event": "error:RangeError", "id": 9, "sessionId": 3, "machineId": "m1",
      "date": "2026-01-01T00:00:00.000Z"}, 3820323936778001082),
]
PINNED_SEGMENT = [
    ({"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "mid-1"},
     -2484527768115438668),
    ({"type": "identify", "userId": "u2", "messageId": "mid-2", "traits": {"a": 1}},
     -8134002706745473776),
    ({"type": "track", "event": "Application Opened", "anonymousId": "a", "messageId": "mid-3"},
     54741570205308541),
]


def test_the_dedupe_keys_of_stored_events_never_change() -> None:
    enrich = Enrich(detect(DeviceConfig()))
    events = nucleus.accept({"data": copy.deepcopy([ev for ev, _ in PINNED_NUCLEUS])},
                            "appkey1", enrich).events
    assert [ev.dedupe for ev in events] == [key for _, key in PINNED_NUCLEUS]
    assert [segment.accept(copy.deepcopy(msg), "wk1", segment.TYPES, "2026-01-01T00:00:00.000Z",
                           enrich=enrich).dedupe
            for msg, _ in PINNED_SEGMENT] == [key for _, key in PINNED_SEGMENT]


@given(st.lists(st.text(), min_size=1, max_size=3), st.text())
@example(["segment", "k" * 200], '"\\\u00e9\U0001f600\x00')
def test_a_key_from_a_hashed_head_is_the_key_of_all_its_parts(head: list[str], last: str
                                                              ) -> None:
    # A batch hashes its messages' shared parts once (key_head): the same bytes hashed.
    assert dedupe_key_after(key_head(*head), last) == dedupe_key(*head, last)
