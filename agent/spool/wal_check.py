"""Damage in the spool's write-ahead log, found when the spool is opened.

SQLite reads a -wal only up to the first frame whose checksum fails (or whose salts are
not the log's) and ignores every frame after it, without an error. A crash can tear
only the commit being written; with ``synchronous=FULL`` every COMMIT is on disk before
the next transaction begins. So when at least two whole commits lie past the frames
SQLite took (each frame checked against the checksum its predecessor stored), the log
was damaged after those commits were answered, and their events are lost: said, and a
copy of the log kept for inspection. (One commit past that point looks like a torn
write and is not reported; with ``synchronous=NORMAL`` a power cut may leave any
commits out, so nothing is judged then.)

Frame layout and checksum: https://www.sqlite.org/fileformat2.html#walformat
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("outpost")

HEADER = 32
FRAME_HEADER = 24
_MAGIC = {0x377F0682: "<", 0x377F0683: ">"}   # checksum words little / big endian
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Damage:
    """Past ``read`` frames SQLite took, ``commits`` whole commits it ignores."""

    read: int
    commits: int


def look(conn: sqlite3.Connection, spool: Path, said: Damage | None = None) -> Damage | None:
    """The damage in the log of ``spool``, open on ``conn`` before anything wrote to it, if
    any; said and a copy kept, unless it is ``said`` (found by a try to open the spool that
    failed before it wrote: said once, not at each try). The log count is the checkpoint's."""
    _, read, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    wal = Path(f"{spool}-wal")
    damage = ignored_commits(wal, read)
    if damage is None or damage == said:
        return damage
    try:
        kept = f"a copy of the log is kept as {keep_copy(wal, spool).name}"
    except OSError as exc:
        kept = f"no copy of the log could be kept ({exc})"
    log.error("spool %s: its write-ahead log is damaged: SQLite reads it only up to frame "
              "%d and ignores the %d commits written after that, answered to apps as stored; "
              "their events are lost, how many is unknown; %s",
              spool, damage.read, damage.commits, kept)
    return damage


def checksum(data: bytes | memoryview, order: str, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), from (s0, s1)."""
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    pairs = iter(words)
    for x0, x1 in zip(pairs, pairs):
        s0 = (s0 + x0 + s1) & _MASK
        s1 = (s1 + x1 + s0) & _MASK
    return s0, s1


def ignored_commits(wal: Path, read: int) -> Damage | None:
    """The damage in ``wal`` whose first ``read`` frames SQLite took (its log count),
    or None: no log, or at most one commit past them."""
    try:
        fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER:
            return None
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            commits = _whole_commits_after(memoryview(data), size, max(read, 0))
    finally:
        os.close(fd)
    return Damage(read, commits) if commits >= 2 else None


def _whole_commits_after(data: memoryview, size: int, first: int) -> int:
    magic, _, page, _, salt1, salt2, h0, h1 = struct.unpack_from(">8I", data)
    order = _MAGIC.get(magic, "<")
    if checksum(data[:24], order, 0, 0) != (h0, h1) and size >= HEADER + FRAME_HEADER:
        # A damaged header (SQLite then ignores the whole log): the frames' own salts.
        salt1, salt2 = struct.unpack_from(">2I", data, HEADER + 8)
    step = FRAME_HEADER + page
    if page < 512 or page & (page - 1):
        return 0
    commits = 0
    for i in range(first, (size - HEADER) // step):
        at = HEADER + i * step
        number, commit, s1, s2 = struct.unpack_from(">4I", data, at)
        if (s1, s2) != (salt1, salt2):
            break   # an earlier generation's frames: the log ends here
        if commit == 0 or number == 0:
            continue
        # Judged against the checksum the frame before it stored, not a running one.
        seed = struct.unpack_from(">2I", data, at - step + 16) if i else (h0, h1)
        sums = checksum(data[at:at + 8], order, *seed)
        if checksum(data[at + FRAME_HEADER:at + step], order, *sums) == \
                struct.unpack_from(">2I", data, at + 16):
            commits += 1
    return commits


def keep_copy(wal: Path, spool: Path) -> Path:
    """Copy ``wal`` beside ``spool`` as ``<name>.wal-damaged-<ts>`` (0600), before any
    write reuses the frames SQLite ignored."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    n = 0
    while True:
        copy = spool.with_name(f"{spool.name}.wal-damaged-{stamp}{f'.{n}' if n else ''}")
        try:
            fd = os.open(copy, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            break
        except FileExistsError:
            n += 1
    try:
        try:
            with open(wal, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        # Cut short (a full disk): not left to pass for the copy, nor to take the room.
        copy.unlink(missing_ok=True)
        raise
    return copy
