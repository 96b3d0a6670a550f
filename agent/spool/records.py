"""Packed records: many event bodies in one compressed, checksummed blob, and back.

A record is a 1-byte codec tag, then (tag ``ZSTD``) the CRC-32 of the rest (u32), then
one zstd frame, level 1, with a content checksum, of::

    u32 count | count x u32 length | the bodies, concatenated      (all little-endian)

The CRC covers the compressed bytes: zstd's own checksum covers only the decoded
content, and some flipped bits (an unused header flag, parts of an entropy table)
decode to the same content, so without it damage could pass unseen.

One record per commit group rather than one row per event is what makes the spool
cheap (Sentry Relay's packed rows): zstd sees the repetition across similar events
(``bench/micro_records.py`` measures the ratio and the µs per event). The tag lets a
later codec be added without migrating stored records. Anything unreadable raises
DamagedRecord, so the spool can skip and count it (Vector's disk buffer).

zstandard contexts are not thread-safe: each thread (the writer's, the reader's)
keeps its own compressor and decompressor, reused across records.
"""

from __future__ import annotations

import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Sequence

import zstandard

ZSTD = 1
# A claimed content size beyond this is damage, not data: decompressing it would try
# to allocate that much. Far above any commit group the spool packs.
MAX_RAW_BYTES = 256 * 1024 * 1024

_U32 = struct.Struct("<I")
_TAG = bytes([ZSTD])
_LITTLE = sys.byteorder == "little"


class DamagedRecord(Exception):
    """A record that cannot be read back exactly: bad tag, checksum, size or layout."""


class _Contexts(threading.local):
    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=1, write_checksum=True,
                                                   write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()


_ctx = _Contexts()


def pack(bodies: Sequence[bytes]) -> bytes:
    """One record holding ``bodies`` in order. ValueError past MAX_RAW_BYTES."""
    lengths = array("I", map(len, bodies))
    if not _LITTLE:
        lengths.byteswap()
    raw = b"".join((_U32.pack(len(bodies)), lengths.tobytes(), *bodies))
    if len(raw) > MAX_RAW_BYTES:
        raise ValueError(f"record of {len(raw)} bytes is over {MAX_RAW_BYTES}")
    frame = _ctx.compressor.compress(raw)
    return b"".join((_TAG, _U32.pack(zlib.crc32(frame)), frame))


def unpack(data: bytes) -> list[bytes]:
    """The bodies ``pack`` was given. DamagedRecord for anything else."""
    raw = _decompress(data)
    if len(raw) < 4:
        raise DamagedRecord("no event count")
    (count,) = _U32.unpack_from(raw)
    start = 4 + 4 * count
    if start > len(raw):
        raise DamagedRecord(f"{count} lengths do not fit in {len(raw)} bytes")
    lengths = array("I")
    lengths.frombytes(raw[4:start])
    if not _LITTLE:
        lengths.byteswap()
    if start + sum(lengths) != len(raw):
        raise DamagedRecord("lengths do not add up to the record")
    bodies = []
    for n in lengths:
        bodies.append(raw[start:start + n])
        start += n
    return bodies


def _decompress(data: bytes) -> bytes:
    if data[:1] != _TAG:
        raise DamagedRecord(f"unknown codec tag {data[:1]!r}")
    if len(data) < 5 or _U32.unpack_from(data, 1)[0] != zlib.crc32(memoryview(data)[5:]):
        raise DamagedRecord("CRC mismatch: damaged, cut short or extended")
    frame = data[5:]
    try:
        params = zstandard.get_frame_parameters(frame)
        # A flipped flag can turn the checksum off, or the size into a huge claim.
        if not params.has_checksum or params.dict_id:
            raise DamagedRecord("frame header is not one pack() writes")
        if not 0 <= params.content_size <= MAX_RAW_BYTES:
            raise DamagedRecord(f"content size {params.content_size} out of range")
        raw = _ctx.decompressor.decompress(frame)
    except zstandard.ZstdError as exc:
        raise DamagedRecord(str(exc)) from exc
    if len(raw) != params.content_size:
        raise DamagedRecord("frame decodes to a different size than it claims")
    return raw
