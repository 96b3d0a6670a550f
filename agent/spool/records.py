"""Packed records: many event bodies in one compressed, checksummed blob, and back.

A record is a 1-byte codec tag, then the CRC-32 of the rest (u32), then one zstd
frame, level 1, with a content checksum, of (all little-endian)::

    tag ZSTD:      u32 count |                count x u32 length | the bodies, concatenated
    tag ZSTD_IDS:  u32 count | u32 ids bytes | count x u32 length | the bodies | the ids

Tags ZSTD_DICT and ZSTD_DICT_IDS are the same two layouts compressed with the built-in
dictionary (dictionary.py), which a record under DICT_BELOW bytes gets: zstd alone made
a lone event 0.8-0.9x its JSON, having nothing earlier to refer to (spool v4). Tags
ZSTD_LEARNED and ZSTD_LEARNED_IDS are compressed with a dictionary learned from the
device's own events (codebook.py, spool v5), named by an i64 between the CRC and the
frame: the first 8 bytes of its BLAKE2b digest, so that a name means one dictionary in
any file, and a damaged dictionary is told from a sound one.

where the ids are a JSON array, one per body, of the Nucleus ``id`` each event is
acknowledged by (null: it has none). Ingest has parsed every event already; keeping
its id beside the bodies lets a Nucleus uplink splice the stored bytes into a frame
without parsing each again at send time. Records of the ``ZSTD_IDS`` layout only
hold bodies that ingest wrote as JSON objects (``unpack_ids``).

The CRC covers the compressed bytes (and every tag but ``ZSTD``'s): zstd's own checksum
covers only the decoded content, and some flipped bits (an unused header flag, parts
of an entropy table) decode to the same content, so without it damage could pass unseen.

One record per commit group rather than one row per event is what makes the spool
cheap (Sentry Relay's packed rows): zstd sees the repetition across similar events
(``bench/micro_records.py`` measures the ratio and the µs per event). The tag lets a
later codec be added without migrating stored records. Anything unreadable raises
DamagedRecord, so the spool can skip and count it (Vector's disk buffer).

zstandard contexts are not thread-safe: each thread (the writer's, the reader's)
keeps its own compressor and decompressor, reused across records.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import orjson
import zstandard

from agent.spool.dictionary import ZSTD_DICT_V1

# A record holds at most about this much, and never more events (Sentry Relay packs ~10 KiB
# rows; bigger ones compress better, and a drain reads fewer; this bounds what one read unpacks).
RECORD_EVENTS = 1000
RECORD_BYTES = 256 * 1024

ZSTD = 1
ZSTD_IDS = 2
ZSTD_DICT = 3       # ZSTD's layout, compressed with the built-in dictionary
ZSTD_DICT_IDS = 4   # ZSTD_IDS's, with it
ZSTD_LEARNED = 5    # ZSTD's layout, compressed with a learned dictionary (codebook.py)
ZSTD_LEARNED_IDS = 6
# Raw bytes under which a record is packed with the dictionary. Past a few KiB of events
# the record is its own context: the dictionary saved 7% at 16 events (~3 KiB) and under
# 4% at 100, and it costs ~0.6 µs a record more (bench/micro_records.py).
DICT_BELOW = 8 * 1024
# A claimed content size beyond this is damage, not data: decompressing it would try
# to allocate that much. Far above any commit group the spool packs.
MAX_RAW_BYTES = 256 * 1024 * 1024

# Learned dictionaries each thread keeps ready, by name: one is in use at a time, and a
# reader may meet the one before it.
LEARNED_KEPT = 4

_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_TAGS = (ZSTD, ZSTD_IDS, ZSTD_DICT, ZSTD_DICT_IDS, ZSTD_LEARNED, ZSTD_LEARNED_IDS)
_WITH_IDS = (ZSTD_IDS, ZSTD_DICT_IDS, ZSTD_LEARNED_IDS)
_WITH_DICT = (ZSTD_DICT, ZSTD_DICT_IDS)
_LEARNED = (ZSTD_LEARNED, ZSTD_LEARNED_IDS)
# What an id may be (families/nucleus.fault refuses any other); bool is an int to
# isinstance, so the types are compared exactly.
_ID_TYPES = frozenset({int, float, str, type(None)})
_LITTLE = sys.byteorder == "little"


class DamagedRecord(Exception):
    """A record that cannot be read back exactly: bad tag, checksum, size or layout, or
    a learned dictionary missing or damaged."""


@dataclass(frozen=True, slots=True)
class Learned:
    """A learned dictionary's raw content and its name (``name``)."""

    id: int
    body: bytes

    @classmethod
    def of(cls, body: bytes) -> Learned:
        return cls(name(body), body)


def name(body: bytes) -> int:
    """A dictionary's name: its digest's first 8 bytes, as SQLite's signed integer."""
    return int(_I64.unpack(hashlib.blake2b(body, digest_size=8).digest())[0])


# A learned dictionary's raw content by name (None: there is none of that name).
Dictionaries = Callable[[int], bytes | None]


def _raw_content(body: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(body, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class _Contexts(threading.local):
    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=1, write_checksum=True,
                                                   write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()
        # Prepared once per thread, not loaded again for each record: ~0.6 µs a record
        # more than zstd alone (bench/micro_records.py).
        ready = _raw_content(ZSTD_DICT_V1)
        ready.precompute_compress(level=1)
        self.dict_compressor = zstandard.ZstdCompressor(
            level=1, dict_data=ready, write_checksum=True, write_content_size=True,
            write_dict_id=False)
        self.dict_decompressor = zstandard.ZstdDecompressor(dict_data=ready)
        self.packers: dict[int, zstandard.ZstdCompressor] = {}
        self.unpackers: dict[int, zstandard.ZstdDecompressor] = {}


_ctx = _Contexts()


def _packer(learned: Learned) -> zstandard.ZstdCompressor:
    packer = _ctx.packers.get(learned.id)
    if packer is None:
        if len(_ctx.packers) >= LEARNED_KEPT:
            _ctx.packers.clear()
        ready = _raw_content(learned.body)
        ready.precompute_compress(level=1)
        packer = _ctx.packers[learned.id] = zstandard.ZstdCompressor(
            level=1, dict_data=ready, write_checksum=True, write_content_size=True,
            write_dict_id=False)
    return packer


def _unpacker(dict_id: int, dicts: Dictionaries | None) -> zstandard.ZstdDecompressor:
    unpacker = _ctx.unpackers.get(dict_id)
    if unpacker is None:
        body = None if dicts is None else dicts(dict_id)
        if body is None:
            raise DamagedRecord(f"learned dictionary {dict_id} is not in the spool")
        if name(body) != dict_id:
            raise DamagedRecord(f"learned dictionary {dict_id} is damaged")
        if len(_ctx.unpackers) >= LEARNED_KEPT:
            _ctx.unpackers.clear()
        unpacker = _ctx.unpackers[dict_id] = zstandard.ZstdDecompressor(
            dict_data=_raw_content(body))
    return unpacker


def pack(bodies: Sequence[bytes], ids: Sequence[Any] | None = None,
         learned: Learned | None = None) -> bytes:
    """One record holding ``bodies`` in order, and with ``ids`` (one per body, each a str,
    number or None) the ``ZSTD_IDS`` layout; under DICT_BELOW, compressed with ``learned``,
    or else the built-in dictionary. ValueError past MAX_RAW_BYTES."""
    # Little-endian u32s by struct: an array made from the lengths set each item through
    # PyArg_Parse (~570 instructions a body, callgrind).
    lengths = struct.pack(f"<{len(bodies)}I", *map(len, bodies))
    if ids is None:
        head, tail = _U32.pack(len(bodies)), b""
    else:
        if len(ids) != len(bodies):
            raise ValueError(f"{len(ids)} ids for {len(bodies)} bodies")
        tail = orjson.dumps(list(ids))
        head = _U32.pack(len(bodies)) + _U32.pack(len(tail))
    raw = b"".join((head, lengths, *bodies, tail))
    if len(raw) > MAX_RAW_BYTES:
        raise ValueError(f"record of {len(raw)} bytes is over {MAX_RAW_BYTES}")
    if len(raw) >= DICT_BELOW:
        tag = ZSTD if ids is None else ZSTD_IDS
        frame = _ctx.compressor.compress(raw)
    elif learned is None:
        tag = ZSTD_DICT if ids is None else ZSTD_DICT_IDS
        frame = _ctx.dict_compressor.compress(raw)
    else:
        tag = ZSTD_LEARNED if ids is None else ZSTD_LEARNED_IDS
        frame = _I64.pack(learned.id) + _packer(learned).compress(raw)
    return b"".join((bytes([tag]), _U32.pack(_crc(tag, frame)), frame))


def unpack(data: bytes, dicts: Dictionaries | None = None) -> list[bytes]:
    """The bodies ``pack`` was given (``dicts``: where its learned dictionary is, if it
    was given one). DamagedRecord for anything else."""
    return unpack_ids(data, dicts)[0]


def acked_bits_fit(gone: object, n: int) -> bool:
    """Whether a record's acked bits (``gone``; None: none acked) are a bit per event of
    its ``n``: damage can garble them into another type or cut them short."""
    return gone is None or isinstance(gone, bytes) and len(gone) == (n + 7) // 8


def learned_id(data: bytes) -> int | None:
    """The name of the learned dictionary a record was packed with; None: none."""
    if len(data) < 13 or data[0] not in _LEARNED:
        return None
    return int(_I64.unpack_from(data, 5)[0])


def sizes(data: bytes, dicts: Dictionaries | None = None) -> array[int]:
    """The length of each body ``pack`` was given, without cutting the bodies out or
    reading the ids (an ack that leaves part of a record queued counts the bytes it
    frees: cutting 1,000 bodies cost it twice the decompression). DamagedRecord as
    ``unpack_ids``, but for ids that are not what ``pack`` writes."""
    raw, lengths, start, tail, _ = _layout(data, dicts)
    if start + sum(lengths) + tail != len(raw):
        raise DamagedRecord(_NOT_ADDING_UP)
    return lengths


_NOT_ADDING_UP = "lengths do not add up to the record"


def _layout(data: bytes, dicts: Dictionaries | None
            ) -> tuple[bytes, array[int], int, int, bool]:
    """A record's content, its bodies' lengths, where the bodies start in it, the length
    of the ids after them, and whether there are ids. That the lengths add up to the
    record is the caller's check (unpack_record's before it cuts the bodies)."""
    tag, raw = _decompress(data, dicts)
    with_ids = tag in _WITH_IDS
    head = 8 if with_ids else 4
    if len(raw) < head:
        raise DamagedRecord("no event count")
    (count,) = _U32.unpack_from(raw)
    tail = _U32.unpack_from(raw, 4)[0] if with_ids else 0
    start = head + 4 * count
    if start > len(raw):
        raise DamagedRecord(f"{count} lengths do not fit in {len(raw)} bytes")
    lengths = array("I")
    lengths.frombytes(raw[head:start])
    if not _LITTLE:
        lengths.byteswap()
    return raw, lengths, start, tail, with_ids


def unpack_ids(data: bytes, dicts: Dictionaries | None = None
               ) -> tuple[list[bytes], list[Any] | None]:
    """The bodies and ids ``pack`` was given (ids None: a record without them).
    DamagedRecord for anything else."""
    got = unpack_record(data, dicts)
    return got.bodies, got.ids


@dataclass(frozen=True, slots=True)
class Unpacked:
    """A record's bodies and ids (as unpack_ids), with their bytes, summed, and the longest
    and shortest lengths (0 both: no bodies), read from the lengths the record holds. A
    reader's batch is sized and checked by these, not by a len per body."""

    bodies: list[bytes]
    ids: list[Any] | None
    nbytes: int
    longest: int
    shortest: int


def unpack_record(data: bytes, dicts: Dictionaries | None = None) -> Unpacked:
    """unpack_ids, with the bodies' total, longest and shortest length."""
    raw, lengths, start, tail, with_ids = _layout(data, dicts)
    # The lengths made ints once, at C speed (a list, not each from the array as iterated:
    # the sum, max, min and cut each made them again), and the bodies read in turn from
    # the content, no offsets added up or slices made in Python: half a loop's cost.
    sized = lengths.tolist()
    count, nbytes = len(sized), sum(sized)
    # Checked before any is cut: lengths that do not add up (damage) read nothing.
    if start + nbytes + tail != len(raw):
        raise DamagedRecord(_NOT_ADDING_UP)
    content = BytesIO(raw)   # shares raw's bytes: nothing is copied but each body
    content.seek(start)
    bodies = list(map(content.read, sized))
    # Both ends of one sorted copy: sorted compares same-type ints at C speed, where max
    # and min each went through the generic comparison (~30% dearer for a record's 100).
    ordered = sorted(sized)
    longest, shortest = (ordered[-1], ordered[0]) if sized else (0, 0)
    if not with_ids:
        return Unpacked(bodies, None, nbytes, longest, shortest)
    start += nbytes
    try:
        ids = orjson.loads(raw[start:])
    except orjson.JSONDecodeError as exc:
        raise DamagedRecord(f"ids: {exc}") from exc
    if not isinstance(ids, list) or len(ids) != count or not _ID_TYPES.issuperset(map(type, ids)):
        raise DamagedRecord("ids are not one string, number or null per event")
    return Unpacked(bodies, ids, nbytes, longest, shortest)


def _crc(tag: int, frame: bytes | memoryview) -> int:
    # The others' cover their tag too: a flip between layouts or codecs is caught here.
    return zlib.crc32(frame) if tag == ZSTD else zlib.crc32(frame, zlib.crc32(bytes([tag])))


def _decompress(data: bytes, dicts: Dictionaries | None) -> tuple[int, bytes]:
    tag = data[0] if data else -1
    if tag not in _TAGS:
        raise DamagedRecord(f"unknown codec tag {data[:1]!r}")
    if len(data) < 5 or _U32.unpack_from(data, 1)[0] != _crc(tag, memoryview(data)[5:]):
        raise DamagedRecord("CRC mismatch: damaged, cut short or extended")
    if tag in _LEARNED:
        if len(data) < 13:
            raise DamagedRecord("no dictionary name")
        decompressor = _unpacker(_I64.unpack_from(data, 5)[0], dicts)
        frame = data[13:]
    else:
        decompressor = _ctx.dict_decompressor if tag in _WITH_DICT else _ctx.decompressor
        frame = data[5:]
    try:
        params = zstandard.get_frame_parameters(frame)
        # A flipped flag can turn the checksum off, or the size into a huge claim.
        if not params.has_checksum or params.dict_id:
            raise DamagedRecord("frame header is not one pack() writes")
        if not 0 <= params.content_size <= MAX_RAW_BYTES:
            raise DamagedRecord(f"content size {params.content_size} out of range")
        raw = decompressor.decompress(frame)
    except zstandard.ZstdError as exc:
        raise DamagedRecord(str(exc)) from exc
    if len(raw) != params.content_size:
        raise DamagedRecord("frame decodes to a different size than it claims")
    return tag, raw
