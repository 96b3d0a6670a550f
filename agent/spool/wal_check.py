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

A log cut short (a copy cut short, damage) holds no frame past the cut to judge. The
-shm a killed agent left says how many frames were committed (its header's ``mxFrame``,
set only once a commit's frames are written: with ``synchronous=FULL``, on disk), and
how many of them are in the database file already (``nBackfill``). Read before any
connection opens the spool (the first one rebuilds it from the log), it tells whether
committed frames are missing from the log: said and counted, how many events unknown.

Frame layout and checksum: https://www.sqlite.org/fileformat2.html#walformat
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import struct
import sys
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
    """Past ``read`` frames SQLite took, ``commits`` whole commits it ignores; or (``cut``)
    committed frames ``read`` + 1 to ``read`` + ``cut`` missing from a log cut short."""

    read: int
    commits: int
    cut: int = 0
    emptied: bool = False   # a log beside an empty database file (``emptied``)


# The -shm's header (two copies of SQLite's WalIndexHdr, in the machine's byte order) and
# its checkpoint's nBackfill after them: https://www.sqlite.org/walformat.html
_SHM_HEADER = 48
_NBACKFILL = 96
_SHM_VERSION = 3007000
# The byte each connection to the -shm holds a shared lock on (SQLite's os_unix.c DMS).
_SHM_DMS = 128


@dataclass(frozen=True)
class Committed:
    """What a -shm says of its log: ``frames`` committed, with ``salts`` (as the log's
    header holds them), the first ``backfilled`` of them in the database file already."""

    frames: int
    backfilled: int
    salts: bytes


def committed(spool: Path) -> Committed | None:
    """What the -shm beside ``spool`` says was committed, if it holds a sound header;
    read before any connection opens the spool (the first one rebuilds the -shm). None too
    when a process has it open (an `outpost dead` command): its log may start over under
    the look, which would take it for one cut short. Only while this process has no
    connection to the spool: closing a descriptor of the -shm lets go of every lock the
    process holds on it (POSIX locks are the process's). None too with no log beside it:
    SQLite removes the log once all of it is in the database file, and a connection that
    held the spool exclusively (`outpost dead retry` or `purge` with no agent running)
    does so leaving the -shm as it found it."""
    if sys.platform == "win32" or not os.path.lexists(f"{spool}-wal"):
        return None
    try:
        fd = os.open(f"{spool}-shm", os.O_RDWR)   # a write lock needs it; nothing is written
    except OSError:
        return None
    try:
        if _in_use(fd):
            return None
        head = os.pread(fd, _NBACKFILL + 4, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < _NBACKFILL + 4 or head[:_SHM_HEADER] != head[_SHM_HEADER:2 * _SHM_HEADER]:
        return None   # none, or caught in the middle of a write: tells nothing
    order = "<" if sys.byteorder == "little" else ">"
    version, _, _, init, _, _, frames, _ = struct.unpack_from(f"{order}3I2BH2I", head)
    if version != _SHM_VERSION or not init or \
            checksum(head[:40], order, 0, 0) != struct.unpack_from(f"{order}2I", head, 40):
        return None
    (backfilled,) = struct.unpack_from(f"{order}I", head, _NBACKFILL)
    return Committed(frames, backfilled, head[32:40])


def emptied(spool: Path, said: Damage | None = None) -> Damage | None:
    """A log beside an empty database file (damage emptied it), which SQLite deletes unread
    as the spool is opened (it takes the log for a stale one): copied and said first,
    unless it is ``said`` (as ``look``'s); None when there is no such log."""
    wal = Path(f"{spool}-wal")
    try:
        # (A log of no whole commit lost nothing answered.)
        if os.stat(spool).st_size or not (commits := _commits(wal, 0)):
            return None
    except OSError:
        return None
    damage = Damage(0, commits, emptied=True)
    if damage == said:
        return damage
    try:
        kept = f"a copy of the log is kept as {keep_copy(wal, spool).name}"
    except OSError as exc:
        kept = f"no copy of the log could be kept ({exc})"
    log.error("spool %s: its write-ahead log holds %d commits, but the spool file is empty "
              "(damaged): SQLite deletes such a log unread, and the events in it, answered "
              "to apps as stored, are lost, how many is unknown; %s", spool, commits, kept)
    return damage


def _in_use(fd: int) -> bool:
    """Whether another process has the -shm open on ``fd`` (its connections' lock)."""
    import fcntl
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS)
    except OSError:
        return True
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS)
    return False


def look(conn: sqlite3.Connection, spool: Path, said: Damage | None = None,
         shm: Committed | None = None) -> Damage | None:
    """The damage in the log of ``spool``, open on ``conn`` before anything wrote to it, if
    any; said and a copy kept, unless it is ``said`` (found by a try to open the spool that
    failed before it wrote: said once, not at each try). The log count is the checkpoint's;
    ``shm``: what the -shm said before the spool was opened (``committed``)."""
    _, read, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    wal = Path(f"{spool}-wal")
    damage = ignored_commits(wal, read) or cut_short(wal, shm)
    if damage is None or damage == said:
        return damage
    if damage.cut:
        # No copy: the frames lost are not in the log, and what is left SQLite has read.
        log.error("spool %s: its write-ahead log is cut short: its -shm says frames up to "
                  "%d were committed, but only %d are left (in it or in the database file); "
                  "the commits in the %d frames cut off were answered to apps as stored and "
                  "are lost, how many events is unknown", spool, damage.read + damage.cut,
                  damage.read, damage.cut)
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
    commits = _commits(wal, read)
    return Damage(read, commits) if commits >= 2 else None


def _commits(wal: Path, first: int) -> int:
    """The whole commits in ``wal`` past its first ``first`` frames; 0 with no log."""
    try:
        fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size < HEADER:
            return 0
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            return _whole_commits_after(memoryview(data), size, max(first, 0))
    finally:
        os.close(fd)


def cut_short(wal: Path, shm: Committed | None) -> Damage | None:
    """The committed frames (``shm``) missing from ``wal``, past those in the database file
    already; None when none are, or the -shm says nothing of this log: a sound header of
    other salts is another log's, or the -shm another's (a spool and its log put back
    beside a killed agent's -shm); which, cannot be told."""
    if shm is None or shm.frames <= shm.backfilled:
        return None
    left = 0
    try:
        with open(wal, "rb") as fh:
            head = fh.read(HEADER)
            page = int.from_bytes(head[8:12], "big") if len(head) == HEADER else 0
            if page and head[16:24] != shm.salts and _sound_header(head):
                return None
            if head[16:24] == shm.salts and page >= 512 and not page & (page - 1):
                # This log's whole frames (its salts), up to the last committed.
                whole = (os.fstat(fh.fileno()).st_size - HEADER) // (FRAME_HEADER + page)
                while left < min(shm.frames, whole):
                    fh.seek(HEADER + left * (FRAME_HEADER + page) + 8)
                    if fh.read(8) != shm.salts:
                        break
                    left += 1
    except FileNotFoundError:
        pass
    except OSError:
        return None
    left = max(left, shm.backfilled)
    return Damage(left, 0, shm.frames - left) if left < shm.frames else None


def _sound_header(head: bytes) -> bool:
    """Whether a log's header holds its own checksum (SQLite reads no log without it)."""
    order = _MAGIC.get(int.from_bytes(head[:4], "big"))
    return order is not None and \
        checksum(head[:24], order, 0, 0) == struct.unpack_from(">2I", head, 24)


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
