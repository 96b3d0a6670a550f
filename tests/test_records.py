"""Packed records (agent/spool/records.py): exact round trips; any damage is DamagedRecord."""

from __future__ import annotations

import os
import struct
import threading
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spool.dictionary import ZSTD_DICT_V1
from agent.spool.records import (
    DICT_BELOW,
    MAX_RAW_BYTES,
    ZSTD,
    ZSTD_DICT,
    ZSTD_DICT_IDS,
    ZSTD_IDS,
    ZSTD_LEARNED,
    ZSTD_LEARNED_IDS,
    DamagedRecord,
    Learned,
    learned_id,
    pack,
    sizes,
    unpack,
    unpack_ids,
    unpack_record,
)

bodies_st = st.lists(st.binary(max_size=600) | st.sampled_from([b"", b"x" * 70_000]), max_size=40)
# Small: packed with the dictionary (records.ZSTD_DICT).
SAMPLE = pack([b'{"type":"track","event":"a","n":%d}' % i for i in range(30)] + [b""])
# The layout with Nucleus ack ids (records.ZSTD_DICT_IDS): every kind of id, and none.
WITH_IDS = pack([b'{"name":"e","id":%d}' % i for i in range(30)] + [b"{}"] * 4,
                list(range(30)) + ["s-1", 2.5, None, "\u00e9"])
ids_st = st.one_of(st.none(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.text(max_size=20),
                   st.floats(allow_nan=False, allow_infinity=False))


@given(bodies_st)
def test_round_trip_is_exact(bodies: list[bytes]) -> None:
    assert unpack(pack(bodies)) == bodies


@given(bodies_st, st.booleans())
def test_an_unpacked_record_measures_its_bodies(bodies: list[bytes], with_ids: bool) -> None:
    got = unpack_record(pack(bodies, [None] * len(bodies) if with_ids else None))
    assert got.bodies == bodies
    assert got.nbytes == sum(map(len, bodies))
    assert (got.longest, got.shortest) == (max(map(len, bodies)), min(map(len, bodies))) \
        if bodies else (0, 0)


@settings(deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), ids_st), max_size=40))
def test_round_trip_with_ids_is_exact(events: list[tuple[bytes, object]]) -> None:
    bodies, ids = [b for b, _ in events], [i for _, i in events]
    assert unpack_ids(pack(bodies, ids)) == (bodies, ids)
    assert unpack(pack(bodies, ids)) == bodies
    assert unpack_ids(pack(bodies)) == (bodies, None)


def test_ids_must_be_one_per_body() -> None:
    with pytest.raises(ValueError):
        pack([b"{}", b"{}"], ["a"])


@pytest.mark.parametrize(("ids", "why"), [
    (b"[1,2", "ids"), (b"[1]", "one string"), (b'{"a":1}', "one string"),
    (b"[true,1]", "one string"), (b"[[1],2]", "one string"), (b"[{},2]", "one string"),
])
def test_ids_that_do_not_read_back_are_damage(ids: bytes, why: str) -> None:
    bodies = [b"{}", b"{}"]
    raw = struct.pack("<III", 2, len(ids), 2) + struct.pack("<I", 2) + b"".join(bodies) + ids
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw)
    tag = bytes([ZSTD_IDS])
    record = tag + struct.pack("<I", zlib.crc32(frame, zlib.crc32(tag))) + frame
    with pytest.raises(DamagedRecord, match=why):
        unpack_ids(record)


def test_every_single_bit_flip_of_a_record_with_ids_is_damage() -> None:
    for at in range(len(WITH_IDS)):
        for bit in range(8):
            damaged = WITH_IDS[:at] + bytes([WITH_IDS[at] ^ (1 << bit)]) + WITH_IDS[at + 1:]
            with pytest.raises(DamagedRecord):
                unpack_ids(damaged)


@settings(deadline=None)
@given(st.integers(0, len(WITH_IDS) - 1), st.binary(max_size=8))
def test_a_truncated_or_extended_record_with_ids_is_damage(cut: int, extra: bytes) -> None:
    with pytest.raises(DamagedRecord):
        unpack_ids(WITH_IDS[:cut])
    if extra:
        with pytest.raises(DamagedRecord):
            unpack_ids(WITH_IDS + extra)


def test_repetitive_events_compress() -> None:
    bodies = [b'{"type":"track","event":"Button Clicked","messageId":"m-%d"}' % i for i in range(100)]
    assert len(pack(bodies)) < 0.5 * sum(map(len, bodies))


@settings(max_examples=300, deadline=None)   # a loaded machine stalled one example 300 ms
@given(st.data())
def test_a_flipped_byte_is_damage(data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(SAMPLE) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = SAMPLE[:at] + bytes([SAMPLE[at] ^ flip]) + SAMPLE[at + 1:]
    with pytest.raises(DamagedRecord):
        unpack(damaged)


def test_every_single_bit_flip_is_damage() -> None:
    for at in range(len(SAMPLE)):
        for bit in range(8):
            damaged = SAMPLE[:at] + bytes([SAMPLE[at] ^ (1 << bit)]) + SAMPLE[at + 1:]
            with pytest.raises(DamagedRecord):
                unpack(damaged)


@given(st.integers(0, len(SAMPLE) - 1), st.binary(max_size=8))
def test_a_truncated_or_extended_record_is_damage(cut: int, extra: bytes) -> None:
    with pytest.raises(DamagedRecord):
        unpack(SAMPLE[:cut])
    if extra:
        with pytest.raises(DamagedRecord):
            unpack(SAMPLE + extra)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_damage_or_a_record(data: bytes) -> None:
    try:
        bodies = unpack(data)
    except DamagedRecord:
        return
    assert pack(bodies) == data  # only what pack writes is readable


def _record(frame: bytes) -> bytes:
    """A record around ``frame`` whose CRC matches: damage only the CRC would not catch."""
    return bytes([ZSTD]) + struct.pack("<I", zlib.crc32(frame)) + frame


def _frame(raw: bytes, checksum: bool = True, size: bool = True) -> bytes:
    compressor = zstandard.ZstdCompressor(level=1, write_checksum=checksum, write_content_size=size)
    return _record(compressor.compress(raw))


@pytest.mark.parametrize(("record", "why"), [
    (b"", "codec tag"),
    (bytes([7]) + SAMPLE[1:], "codec tag"),
    (bytes([ZSTD_DICT_IDS]) + SAMPLE[1:], "CRC"),
    (bytes([ZSTD_DICT]) + WITH_IDS[1:], "CRC"),
    (bytes([ZSTD]) + SAMPLE[1:], "CRC"),
    (bytes([ZSTD_IDS]) + WITH_IDS[1:], "CRC"),
    (bytes([ZSTD_DICT]) + _frame(struct.pack("<II", 1, 2) + b"{}")[1:], "CRC"),
    (bytes([ZSTD]) + b"\0\0\0", "CRC"),
    (_record(b""), "frame parameters"),
    (_record(b"not a zstd frame"), "frame"),
    (_frame(struct.pack("<II", 1, 5) + b"abc"), "add up"),
    (_frame(struct.pack("<II", 1, 2) + b"abc"), "add up"),
    (_frame(struct.pack("<I", 1000) + b"abcd"), "do not fit"),
    (_frame(b"ab"), "no event count"),
    (_frame(struct.pack("<I", 0), checksum=False), "not one pack"),
    (_frame(struct.pack("<I", 0), size=False), "content size"),
], ids=["empty", "tag", "tag-3-to-4", "tag-4-to-3", "tag-3-to-1", "tag-4-to-2", "tag-1-to-3", "short", "no-frame", "not-zstd", "lengths-past-end", "left-over", "count",
        "no-count", "no-checksum", "no-size"])
def test_each_kind_of_bad_layout_is_damage(record: bytes, why: str) -> None:
    with pytest.raises(DamagedRecord, match=why):
        unpack(record)
    # The ack's byte count reads the same layout and refuses it alike (its own sum).
    with pytest.raises(DamagedRecord, match=why):
        sizes(record)


def test_a_huge_claimed_size_is_damage_without_allocating_it() -> None:
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(struct.pack("<I", 0))
    assert unpack(_record(frame)) == []
    # Frame header: magic(4), descriptor(1), then a 1-byte size (single segment, FCS_flag 0).
    descriptor = frame[4]
    assert descriptor & 0xC0 == 0 and descriptor & 0x20
    # Switch to an 8-byte size field claiming 2^40 bytes.
    huge = frame[:4] + bytes([descriptor | 0xC0]) + (1 << 40).to_bytes(8, "little") + frame[6:]
    with pytest.raises(DamagedRecord, match="content size"):
        unpack(_record(huge))


def test_pack_refuses_what_unpack_would_refuse() -> None:
    with pytest.raises(ValueError):
        pack([b"\0" * (MAX_RAW_BYTES + 1)])


def test_threads_pack_and_unpack_at_once() -> None:
    bodies = [b"event %d " % i * 20 for i in range(50)]
    wrong: list[int] = []

    def work(n: int) -> None:
        for _ in range(200):
            if unpack(pack(bodies[n:])) != bodies[n:]:
                wrong.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_small_records_are_packed_with_the_dictionary_and_large_ones_without() -> None:
    small, large = [b'{"n":1}'] * 3, [b'{"n":%05d}' % i for i in range(DICT_BELOW // 8)]
    assert [pack(small)[0], pack(small, [1, 2, 3])[0]] == [ZSTD_DICT, ZSTD_DICT_IDS]
    assert [pack(large)[0], pack(large, list(range(len(large))))[0]] == [ZSTD, ZSTD_IDS]
    assert unpack_ids(pack(large, list(range(len(large))))) == (large, list(range(len(large))))


def test_records_an_older_agent_packed_without_the_dictionary_read_back() -> None:
    """Spool v3 packed every record with zstd alone, small ones too (tags 1 and 2)."""
    bodies = [b'{"name":"e","id":1}', b'{"name":"f","id":2}']
    lengths = struct.pack("<II", *map(len, bodies))
    assert unpack(_frame(struct.pack("<I", 2) + lengths + b"".join(bodies))) == bodies
    ids = b"[1,2]"
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(
        struct.pack("<II", 2, len(ids)) + lengths + b"".join(bodies) + ids)
    tag = bytes([ZSTD_IDS])
    record = tag + struct.pack("<I", zlib.crc32(frame, zlib.crc32(tag))) + frame
    assert unpack_ids(record) == (bodies, [1, 2])


def test_the_dictionary_never_changes() -> None:
    """Every record packed with it needs exactly these bytes to be read: another dictionary
    is another codec tag, never an edit of this one."""
    import hashlib
    assert len(ZSTD_DICT_V1) == 3191
    assert hashlib.blake2b(ZSTD_DICT_V1, digest_size=16).hexdigest() == "ea8dc6b85bfae9f6ec98f9cd64caec84"


@pytest.mark.parametrize("event", [
    b'{"type":"event","name":"clicked-save","date":"2026-12-03T01:10:00.123Z","appId":"notes",'
    b'"id":1000,"userId":null,"machineId":"3f2a9c1b7e","sessionId":123456,"payload":{"doc":"a"}}',
    b'{"type":"track","event":"Order Completed","userId":"user-1234","anonymousId":null,'
    b'"messageId":"78e15b4f-dba0-480f-b9c7-d18fb8eabe7c","timestamp":"2026-12-03T01:10:00.123Z",'
    b'"properties":{"orderId":"o-1","revenue":19.99},"context":{"library":{"name":'
    b'"analytics-python","version":"2.4.0"}},"integrations":{},'
    b'"receivedAt":"2026-12-03T01:10:00.160Z"}',
], ids=["nucleus", "segment"])
def test_a_lone_event_takes_far_less_room_with_the_dictionary(event: bytes) -> None:
    raw = struct.pack("<II", 1, len(event)) + event
    alone = len(zstandard.ZstdCompressor(level=1, write_checksum=True,
                                         write_content_size=True).compress(raw))
    assert len(pack([event])) - 5 < 0.7 * alone


def _learned() -> Learned:
    """A dictionary never seen before in this process: each thread keeps the ones it has
    loaded by name, and a test of a missing or damaged one must not find it there."""
    return Learned.of(ZSTD_DICT_V1 + b'{"type":"track","event":"Saved","run":"%s"}' %
                      os.urandom(8).hex().encode() * 20)


def test_a_learned_dictionary_packs_small_records_and_names_itself_in_them() -> None:
    book = _learned()
    small = [b'{"type":"track","event":"Saved","n":%d}' % i for i in range(3)]
    plain, ids = pack(small, None, book), pack(small, [1, 2, 3], book)
    assert [plain[0], ids[0]] == [ZSTD_LEARNED, ZSTD_LEARNED_IDS]
    assert learned_id(plain) == learned_id(ids) == book.id
    assert unpack(plain, {book.id: book.body}.get) == small
    assert unpack_ids(ids, {book.id: book.body}.get) == (small, [1, 2, 3])
    large = [b'{"n":%05d}' % i for i in range(DICT_BELOW // 8)]
    assert pack(large, None, book)[0] == ZSTD and learned_id(pack(large, None, book)) is None
    assert learned_id(pack(small)) is None


def test_a_record_whose_learned_dictionary_is_missing_or_damaged_is_damage() -> None:
    book = _learned()
    record = pack([b'{"type":"track"}'], None, book)
    with pytest.raises(DamagedRecord, match="not in the spool"):
        unpack(record)
    with pytest.raises(DamagedRecord, match="not in the spool"):
        unpack(record, {}.get)
    with pytest.raises(DamagedRecord, match="is damaged"):
        unpack(record, {book.id: book.body[:-1] + b"!"}.get)
    # Found sound at last, it is kept ready by name.
    assert unpack(record, {book.id: book.body}.get) == [b'{"type":"track"}']


@pytest.mark.parametrize(("tag", "to"), [(ZSTD_LEARNED, ZSTD_DICT), (ZSTD_LEARNED_IDS, ZSTD_DICT_IDS),
                                         (ZSTD_DICT, ZSTD_LEARNED), (ZSTD_LEARNED, ZSTD_LEARNED_IDS)])
def test_a_tag_flipped_to_or_from_a_learned_one_is_damage(tag: int, to: int) -> None:
    book = _learned()
    record = pack([b'{"type":"track","id":1}'], [1] if tag in (ZSTD_LEARNED_IDS, ZSTD_DICT_IDS)
                  else None, book if tag in (ZSTD_LEARNED, ZSTD_LEARNED_IDS) else None)
    assert record[0] == tag
    with pytest.raises(DamagedRecord, match="CRC"):
        unpack(bytes([to]) + record[1:], {book.id: book.body}.get)


def test_every_bit_flip_in_a_learned_record_is_damage() -> None:
    book = _learned()
    record = pack([b'{"type":"track","event":"Saved","n":%d}' % i for i in range(3)], None, book)
    found = {book.id: book.body}.get
    for at in range(len(record)):
        for bit in range(8):
            damaged = record[:at] + bytes([record[at] ^ (1 << bit)]) + record[at + 1:]
            with pytest.raises(DamagedRecord):
                unpack(damaged, found)
