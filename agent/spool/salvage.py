"""Salvage a corrupt spool: copy every readable record into the fresh one, count the rest.

As Vector's disk buffer does (rather than drop the whole file, as Fluent Bit
drops a chunk): the damaged file, already moved aside, is opened read-only and
read in id order; a read that hits a damaged page skips past it to the next
readable row. Each record must also unpack (records.py checks its CRC and layout):
one that does not is skipped, its live events lost. Records keep their id (the seq
of their first event: FIFO order, and the cursors and in-flight acks of running
forwarders), stream, receipt time (the salvage's, when garbled: _a_time), dedupe keys
(none, when garbled: NO_KEY) and acked bits; ``spent`` dedupe keys, dead letters (with the
agent-observed time of their dead-lettering, where the file has it) and clock marks are
copied too. What could not be read is counted as ``dropped_corrupt``: exactly, when the
queue's size is known (the running agent's own count, or the old file's streams table),
else only the events read but not kept, and the log says the count is unknown. Dead letters lost are counted
so too, as ``dead_dropped_corrupt`` (their number: the running agent's, or the old
file's summary of them).

A v0 file (one row per event: only found at startup, when its migration meets the
damage) has its readable rows packed as the migration packs them (migrate.pack_v0).
Runs on the writer's thread, the copy in one transaction, durable once committed; a
crash before that commit leaves it for the next start to finish (aside.py).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from agent.families.event import FAMILIES, now_ms
from agent.families.lanes import readable
from agent.outcomes import Counts, Drop, Tally, from_names, record
from agent.spool import migrate_lanes
from agent.spool.db import (
    CAP_NAME,
    EARLIEST_MS,
    LATEST_MS,
    MAIN_FILE,
    add_counters,
    mark,
    transaction,
    typed,
)
from agent.spool.dedupe import MOVED_KEY, keys_to_bytes
from agent.spool.migrate import V0_COLS, V0_TYPES, V0Row, beating, pack_v0, recount_streams
from agent.spool.records import (
    RECORD_EVENTS,
    DamagedRecord,
    Dictionaries,
    acked_bits_fit,
    learned_id,
    pack,
    unpack_ids,
)
from agent.spool.schema import read_only_uri

RECORD_COLS = "id, stream, family, n, received, live, gone, bytes, dkeys, data, lane"
# ``live`` and ``bytes`` of any type: counted again from the events that unpack (_readable).
RECORD_TYPES = (int, int, int, int, int, object, (bytes, type(None)), object, bytes, bytes, int)
SPENT_COLS = "id, received, observed, dkeys"
SPENT_TYPES = (int, int, int, bytes)
DEAD_COLS = "seq, stream, family, received, dkey, body, upstream, reason, at, lane"
DEAD_TYPES = (int, int, int, int, int, bytes, str, str, int, int)
# Read after those: a letter's agent-observed time of dead-lettering, which its age and
# the order of the newest reasons go by (dead.aged); NULL from a file without the column.
SEEN_COLUMN = "SELECT 1 FROM pragma_table_info('dead') WHERE name = 'observed'"
CHUNK = 500
# And at most the row that reaches this many bytes of blobs: records and dead letters can
# be hundreds of KB each, and 500 of them at once could be more than the device has.
CHUNK_BYTES = 4 * 1024 * 1024
TOP = 1 << 62  # above any seq


@dataclass(slots=True)
class Carry:
    """What the agent knows of the lost spool from memory (nothing, at startup)."""

    streams: dict[int, str]           # stream id -> key
    counters: Counts
    observed: int                     # agent-observed ms (agent/clock.py)
    next_seq: int                     # the running agent's next seq (1 at startup)
    depth: int | None                 # queued events, if the spool had been loaded
    dead: int | None                  # dead letters, if the spool had been loaded


@dataclass(slots=True)
class Salvaged:
    queued: int = 0                   # queued events copied
    lost: int = 0                     # counted as dropped_corrupt
    known: bool = True                # whether ``lost`` is the whole loss
    skipped: int = 0                  # damaged stretches skipped
    unsendable: int = 0               # queued events read but not kept
    retimed: int = 0                  # queued events kept whose receipt time was garbled
    unkeyed: int = 0                  # queued events kept whose dedupe keys were garbled
    dead: int = 0                     # dead letters copied
    dead_lost: int = 0                # counted as dead_dropped_corrupt
    dead_known: bool = True           # whether ``dead_lost`` is the whole loss
    dead_unkept: int = 0              # dead letters read but not kept (garbled, or unkeyed)
    dead_unkeyed: int = 0             # of those, the ones whose key is lost


def salvage(fresh: sqlite3.Connection, moved: Path, carry: Carry,
            alive: Callable[[], None] | None = None) -> Salvaged:
    """Copy what can be read of ``moved`` into ``fresh``, with the counters (plus one
    ``spool_corrupt`` and the ``dropped_corrupt`` loss) and the agent-observed time;
    ``alive`` is called while it runs, as during a migration (migrate.beating)."""
    # Durable once committed, whatever storage.sync says: the marker that would have the
    # next start finish this salvage is removed next (aside.py).
    sync = fresh.execute("PRAGMA synchronous").fetchone()[0]
    fresh.execute("PRAGMA synchronous = FULL")
    old = _open_old(moved)
    try:
        with beating(alive, fresh, *([old] if old is not None else [])):
            return _salvage(old, fresh, carry)
    finally:
        if old is not None:
            old.close()
        fresh.execute(f"PRAGMA synchronous = {int(sync)}")


def salvaged(spool: sqlite3.Connection) -> bool:
    """Whether a salvage has committed into ``spool``: a fresh spool has no counters
    before it (nothing commits until the salvage is done), and every salvage, and every
    commit after one that failed, saves ``spool_corrupt``."""
    return spool.execute("SELECT 1 FROM counters WHERE name = ?",
                         (Tally.SPOOL_CORRUPT.value,)).fetchone() is not None


def is_fresh(spool: sqlite3.Connection) -> bool:
    """Whether ``spool`` is as a recovery creates it: no queue, dead letters, dedupe keys
    or counters (the cap its opening saved aside). Only into such a spool does a salvage
    that a marker names go."""
    empty: int = spool.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM records) AND NOT EXISTS (SELECT 1 FROM streams) "
        "AND NOT EXISTS (SELECT 1 FROM dead) AND NOT EXISTS (SELECT 1 FROM spent) "
        "AND NOT EXISTS (SELECT 1 FROM counters WHERE name != ?)",
        (CAP_NAME,)).fetchone()[0]
    return empty == 1


def unsalvaged(_: sqlite3.Connection, moved: Path, carry: Carry) -> tuple[Salvaged, Counts]:
    """The copy failed (no room): the whole queue is lost, as far as its size is known
    (the running agent's count, else the file's table of queues); and the counters to
    keep, plus that loss."""
    old = _open_old(moved)
    try:
        depth, dead = _depth(old, carry), _dead_count(old, carry)
        got = Salvaged(known=depth is not None, lost=depth or 0,
                       dead_known=dead is not None, dead_lost=dead or 0)
        return got, salvage_counters(old, carry.counters, got.lost, got.dead_lost)
    finally:
        if old is not None:
            old.close()


def keep_counters(fresh: sqlite3.Connection, counters: Counts) -> None:
    """Save counts at once (added to the file's): a stop before the next commit would
    lose them."""
    with transaction(fresh):
        add_counters(fresh, counters)


def _open_old(moved: Path) -> sqlite3.Connection | None:
    # Only a regular file, as it is (lstat): a symbolic link put at the spool's path, moved
    # aside in its place when no copy of the file open could be made, is not followed (to
    # a fifo, SQLite's open waited forever for a writer; to a file elsewhere, it was read
    # as the agent's queue). Nothing to read: the queue is counted lost.
    try:
        if not stat.S_ISREG(os.lstat(moved).st_mode):
            return None
        old = sqlite3.connect(read_only_uri(moved), uri=True)
    except (sqlite3.Error, OSError):
        return None
    # A truncated file's schema names pages past its end: without this every query
    # fails, even on the pages that are still there.
    _try(old, "PRAGMA writable_schema = ON")
    old.text_factory = _text
    return old


def _text(raw: bytes) -> str | bytes:
    """A TEXT value as read from the damaged file: one that is not UTF-8 (damage) stays
    bytes, which fails its row's type check, as a value of another type does. Raised as
    sqlite3 does, it failed the whole query: every key's queue lost with one key's name,
    and every counter with one counter's."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _depth(old: sqlite3.Connection | None, carry: Carry) -> int | None:
    """The queue's size: the running agent's count, else the file's; None if unknown."""
    if carry.depth is not None:
        return carry.depth
    queued = _try(old, "SELECT sum(depth) FROM streams NOT INDEXED")
    # sum() is NULL for no row, and a real for a value garbled into text or a blob: 0.0
    # for a lone key's, taken by ``or 0`` for a depth of 0 (the loss counted as none).
    n = _sum(queued[0][0]) if queued else None
    # Garbled (a real, infinite or not, or text among them, or more than there are
    # seqs): unknown, as _dead_count's.
    return n if _a_count(n) else None


def _dead_count(old: sqlite3.Connection | None, carry: Carry) -> int | None:
    """The dead letters' number: the running agent's count, else the file's summary of
    them (v3 on: a few pages, apart from the letters), else its count of their table
    (which damage to one letter's page fails); None if unknown."""
    if carry.dead is not None:
        return carry.dead
    for sql in ("SELECT sum(letters) FROM dead_groups NOT INDEXED",
                "SELECT count(*) FROM dead NOT INDEXED"):
        found = _try(old, sql)
        if found and _a_count(n := _sum(found[0][0])):   # garbled: not
            return n
    return None


def _sum(n: object) -> object:
    """A sum() as read: 0 for none (NULL), and anything else as it is (not ``or 0``)."""
    return 0 if n is None else n


def _a_count(n: object) -> TypeGuard[int]:
    """Whether ``n`` can be a number of events: none is more than there are seqs (a
    depth garbled to the int64 maximum was counted as that many events lost)."""
    return isinstance(n, int) and 0 <= n < TOP


def _salvage(old: sqlite3.Connection | None, fresh: sqlite3.Connection,
             carry: Carry) -> Salvaged:
    out = Salvaged()
    file_streams = _typed(old, "SELECT id, key FROM streams NOT INDEXED", (int, str))
    depth, dead = _depth(old, carry), _dead_count(old, carry)
    v0 = bool(_try(old, "SELECT 1 FROM sqlite_master WHERE name = 'events'"))
    # A file from before lanes (v1): its rows are copied without theirs, then classified.
    lanes = v0 or bool(_try(old, "SELECT 1 FROM pragma_table_info('records') "
                                 "WHERE name = 'lane'"))
    cols = (lambda c: c) if lanes and not v0 else _before_lanes
    # Not in v0 or v1, nor in a file an agent wrote before it kept it (schema.DEAD_OBSERVED).
    seen = ", observed" if _try(old, SEEN_COLUMN) else ", NULL"
    marks = _typed(old, "SELECT observed, next_seq FROM clock_marks NOT INDEXED", (int, int))
    resumes = max([carry.observed, *(observed for observed, _ in marks)])
    keys = FileKeys(old)
    with transaction(fresh):
        # The running agent's map first: where the file disagrees, it is the damaged one.
        fresh.executemany("INSERT OR IGNORE INTO streams(id, key) VALUES (?, ?)",
                          sorted(carry.streams.items()) + sorted(file_streams))
        streams = {sid for (sid,) in fresh.execute("SELECT id FROM streams")}
        if old is not None:
            for rows in _scan(old, "dead", "seq", cols(DEAD_COLS) + seen, out, keys):
                # As a record's: a letter whose key is lost has no queue to go back to,
                # and its id would name whichever key the fresh spool numbers so first.
                sound = [r for r in rows if _sound(r[:-1], DEAD_TYPES)]
                kept = [(*r[:9], *map(readable, r[9:-1]), _seen(r[-1], resumes))
                        for r in sound if r[1] in streams]
                out.dead_unkeyed += len(sound) - len(kept)
                out.dead_unkept += len(rows) - len(kept)
                fresh.executemany(f"INSERT OR IGNORE INTO dead({cols(DEAD_COLS)}, observed) "
                                  f"VALUES ({_marks(cols(DEAD_COLS))}, ?)", kept)
            if v0:
                _copy_v0(old, fresh, streams, carry, out, keys)
            else:
                _copy_v1(old, fresh, streams, out, cols(RECORD_COLS), keys)
            if v0 or not lanes:
                migrate_lanes.classify(fresh)
        recount_streams(fresh)
        out.queued = fresh.execute("SELECT coalesce(sum(live), 0) FROM records").fetchone()[0]
        out.known = depth is not None
        out.lost = max(depth - out.queued, 0) if depth is not None else out.unsendable
        # The summary the triggers keep: not a scan of every letter copied.
        out.dead = fresh.execute("SELECT coalesce(sum(letters), 0) FROM dead_groups"
                                 ).fetchone()[0]
        out.dead_known = dead is not None
        out.dead_lost = max(dead - out.dead, 0) if dead is not None else out.dead_unkept
        _carry_clock(fresh, carry, marks, resumes)
        counters = salvage_counters(old, carry.counters, out.lost, out.dead_lost)
        fresh.executemany("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)",
                          sorted(counters.items()))
    return out


def _before_lanes(cols: str) -> str:
    """The columns of a v1 file: the same, without ``lane``."""
    return cols.removesuffix(", lane")


def _seen(observed: object, resumes: int) -> int | None:
    """A letter's agent-observed time as kept: one garbled into another type costs the
    letter that time alone (NULL: it is aged by the wall clock, as one made before it was
    kept), not the letter. None is later than where the agent's time resumes (``resumes``:
    the file's clock marks lost, the salvage's): its age counts from there, as an event's
    whose mark is lost, where a time ahead of it read 0 and put its group at the top of
    the newest until the agent's count caught up."""
    return min(observed, resumes) if isinstance(observed, int) else None


def _marks(cols: str) -> str:
    return ", ".join("?" * (cols.count(",") + 1))


def _copy_v1(old: sqlite3.Connection, fresh: sqlite3.Connection, streams: set[int],
             out: Salvaged, cols: str, keys: FileKeys) -> None:
    """Copy the records that unpack whole (v1 or v2: ``cols``), and the spent dedupe keys."""
    # A damaged dictionary fails its name's check, and one garbled to other types is left
    # out: the records packed with it are lost.
    dicts = {i: b for i, b in _try(old, "SELECT id, body FROM dicts") or ()
             if isinstance(i, int) and isinstance(b, bytes)}.get
    now = now_ms()
    for rows in _scan(old, "records", "id", cols, out, keys):
        keep = []
        for row in rows:
            retimed = not _a_time(row[4])
            if retimed:   # the events themselves are checked whole below: kept, if so
                row = (*row[:4], now, *row[5:])
            unkeyed = not _keys_fit(row)
            if unkeyed and isinstance(n := row[3], int) and 0 < n <= RECORD_EVENTS:
                row = (*row[:8], NO_KEY * n, *row[9:])
            kept = _readable(row, streams, dicts)
            if kept is None:
                out.unsendable += _live_of(row)
            else:
                keep.append(kept)
                out.retimed += kept[5] if retimed else 0
                out.unkeyed += kept[5] if unkeyed else 0
        fresh.executemany(f"INSERT OR IGNORE INTO records({cols}) VALUES ({_marks(cols)})",
                          keep)
    for rows in _scan(old, "spent", "id", SPENT_COLS, out, keys):
        fresh.executemany(f"INSERT OR IGNORE INTO spent({SPENT_COLS}) VALUES (?, ?, ?, ?)",
                          [r for r in rows
                           if _sound(r, SPENT_TYPES, family=False) and len(r[3]) % 8 == 0])


def _readable(row: tuple[Any, ...], streams: set[int], dicts: Dictionaries
              ) -> tuple[Any, ...] | None:
    """The record to keep, its live count and bytes recounted from what unpacks; None
    when it is damaged, or of an unknown stream (nowhere to send it)."""
    if not _sound(row, RECORD_TYPES) or row[1] not in streams:
        return None
    rid, stream, family, n, received, _, gone, _, dkeys, data = row[:10]
    try:
        bodies, ids = unpack_ids(data, dicts)
    except DamagedRecord:
        return None
    if learned_id(data) is not None:   # the fresh file has no dictionaries: the built-in one
        data = pack(bodies, ids)
    if len(bodies) != n or len(dkeys) != 8 * n or not acked_bits_fit(gone, n):
        return None
    alive = [i for i in range(n) if gone is None or not gone[i // 8] >> (i % 8) & 1]
    if not alive:
        return None
    return (rid, stream, family, n, received, len(alive), gone,
            sum(len(bodies[i]) for i in alive), dkeys, data, *map(readable, row[10:]))


def _a_time(received: object) -> bool:
    """Whether a receipt time can be one. One garbled (text, a real, or past any date,
    which failed the events' mapping: dead-lettered as corrupt rows) costs its record's
    whole events nothing but their receipt time: they take the salvage's, said in the log
    (Salvaged.retimed), and are sent, rather than lost with it."""
    return isinstance(received, int) and EARLIEST_MS <= received <= LATEST_MS


# A garbled record's dedupe keys stand for none (as a retried dead letter's moved key):
# only its events' dedupe is lost with them (Salvaged.unkeyed, said in the log), not the
# events themselves; a resend of one is then stored again.
NO_KEY = keys_to_bytes([MOVED_KEY])


def _keys_fit(row: tuple[Any, ...]) -> bool:
    """Whether a record's dedupe keys can be its events' (a key each)."""
    n, dkeys = row[3], row[8]
    return isinstance(n, int) and isinstance(dkeys, bytes) and len(dkeys) == 8 * n


def _live_of(row: tuple[Any, ...]) -> int:
    """A lost record's live events, as far as its row says."""
    live = row[5] if len(row) > 5 else None
    return live if isinstance(live, int) and 0 <= live <= (1 << 20) else 0


def _copy_v0(old: sqlite3.Connection, fresh: sqlite3.Connection, streams: set[int],
             carry: Carry, out: Salvaged, keys: FileKeys) -> None:
    """Pack the readable v0 rows as the migration does, under new seqs above every old one."""
    top = max((r[-1][0] for r in _scan(old, "events", "seq", "seq", Salvaged(), keys)),
              default=0)
    dead = fresh.execute("SELECT coalesce(max(seq), 0) FROM dead").fetchone()[0]
    # A file whose marks cannot be read: its events count their age from now (kept longer).
    marks = _typed(old, "SELECT observed, next_seq FROM clock_marks NOT INDEXED", (int, int)) \
        or [(carry.observed, TOP)]

    now = now_ms()

    def sound() -> Iterator[V0Row]:
        for rows in _scan(old, "events", "seq", V0_COLS, out, keys):
            for row in rows:
                retimed = row[-1] is None and not _a_time(row[3])   # as _copy_v1's
                if retimed:
                    row = (*row[:3], now, *row[4:])
                unkeyed = row[-1] is None and not isinstance(row[4], int)
                if unkeyed:
                    row = (*row[:4], MOVED_KEY, *row[5:])
                if _sound(row, V0_TYPES) and row[1] in streams:
                    out.retimed += retimed
                    out.unkeyed += unkeyed
                    yield row
                elif row[-1] is None:
                    out.unsendable += 1
    pack_v0(fresh, sound(), marks, max(top, dead, carry.next_seq - 1) + 1)


def _sound(row: tuple[Any, ...], types: tuple[Any, ...], family: bool = True) -> bool:
    """Whether every value has its column's type (damage can garble a record into other
    types, or NULL) and the family (third column) is one the forwarders know."""
    return typed(row, types) and (not family or row[2] in FAMILIES)


def _scan(old: sqlite3.Connection, table: str, key: str, cols: str,
          out: Salvaged, keys: FileKeys) -> Iterator[list[Any]]:
    """Rows of ``table`` in ``key`` order (its first column), in chunks, skipping damaged
    stretches."""
    sql = f"SELECT {cols} FROM {table} NOT INDEXED WHERE {key} > ? ORDER BY {key} LIMIT {CHUNK}"
    after = -TOP
    while True:
        rows: list[Any] = []
        size, full = 0, False
        try:
            # Row by row: the rows read before the damage are kept.
            for row in old.execute(sql, (after,)):
                rows.append(row)
                size += sum(len(v) for v in row if isinstance(v, bytes))
                if size >= CHUNK_BYTES:
                    full = True   # more may follow: not the end of the table
                    break
            damaged = False
        except sqlite3.DatabaseError:
            damaged = True
        if rows:
            yield rows
            after = rows[-1][0]
        if damaged:
            nxt, past = _past_damage(old, table, key, after, keys)
            # sqlite3 steps a row ahead: the row found there may be sound, the damage past it.
            one = None if nxt is None else _try(old, f"SELECT {cols} FROM {table} NOT INDEXED "
                                                f"WHERE {key} = ?", (nxt,))
            if one:
                yield one
            if past or not one:
                out.skipped += 1
            if nxt is None:
                return
            after = nxt
        elif len(rows) < CHUNK and not full:
            return


def _past_damage(old: sqlite3.Connection, table: str, key: str, after: int,
                 keys: FileKeys) -> tuple[int | None, bool]:
    """A key past the damage met reading rows after ``after``: reading on from it reads
    again; None when nothing past it can be read. And whether a damaged page lay between
    (not only the row after ``after``, found but unreadable)."""
    find = f"SELECT {key} FROM {table} NOT INDEXED WHERE {key} > ? ORDER BY {key} LIMIT 1"

    def readable(at: int) -> bool:  # can the row after ``at`` be found?
        return _try(old, find, (at,)) is not None
    first = _try(old, find, (after,))
    if first:  # the row is found but cannot be read (its overflow pages): skip that row
        return int(first[0][0]), False
    # The page holding the next row is damaged. Probe further and further ahead for a
    # row that can be found, then narrow down to the end of the damage.
    lo, step = max(after, 0), 1
    probed: int | None = None
    while True:
        hi = lo + step
        if hi >= TOP:
            break
        if readable(hi):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if readable(mid):
                    hi = mid
                else:
                    lo = mid
            probed = hi
            break
        lo, step = hi, step * 2
    # Strides that grow can land past a readable stretch, in a second damaged one, and
    # then past that: the keys the file's own pages hold name the rows the probes
    # missed. The first of them, before the probes' find, that can be looked up is where
    # reading resumes.
    for candidate in keys.between(after, TOP if probed is None else probed):
        if _try(old, f"SELECT 1 FROM {table} NOT INDEXED WHERE {key} = ?", (candidate,)):
            return candidate, True
    return probed, True


class FileKeys:
    """The first row key (rowid) of each table leaf page, of every table, read from the
    file and its -wal as bytes when damage is first met: where a stretch of rows that the
    damage hides from SQLite's seeks begins. Only hints: each is looked up. One key a
    page, not every row's: a v0 file's millions of rows would take hundreds of MB."""

    def __init__(self, old: sqlite3.Connection | None) -> None:
        self._old = old
        self._keys: array[int] | None = None

    def between(self, lo: int, hi: int) -> list[int]:
        """The keys above ``lo`` and below ``hi``, ascending."""
        if self._keys is None:
            self._keys = array("q", sorted(set(self._read())))
        keys = self._keys
        return list(keys[bisect_right(keys, lo):bisect_right(keys, hi - 1)])

    def _read(self) -> Iterator[int]:
        listed = _try(self._old, MAIN_FILE)
        if not listed or not listed[0][0]:
            return
        path = Path(os.fsdecode(listed[0][0]))
        try:
            with open(path, "rb") as fh:
                head = fh.read(100)
                size = int.from_bytes(head[16:18], "big") if len(head) >= 18 else 0
                size = 65536 if size == 1 else size
                if size < 512 or size & (size - 1):
                    size = 4096  # the header is damaged: the agent's page size
                fh.seek(0)
                while page := fh.read(size):
                    yield from _first_key(page, 100 if fh.tell() == size else 0)
            wal = Path(f"{path}-wal")
            if wal.exists():
                with open(wal, "rb") as fh:
                    head = fh.read(32)
                    size = int.from_bytes(head[8:12], "big") if len(head) >= 32 else 0
                    if 512 <= size <= 65536 and not size & (size - 1):
                        while len(frame := fh.read(24 + size)) == 24 + size:
                            yield from _first_key(frame[24:], 0)
        except OSError:
            return


def _first_key(page: bytes, at: int) -> Iterator[int]:
    """The rowid of a table leaf page's first cell; none for any other page, or where its
    layout does not hold."""
    if at >= len(page) or page[at] != 0x0D or not int.from_bytes(page[at + 3:at + 5], "big"):
        return
    ptr = int.from_bytes(page[at + 8:at + 10], "big")
    if not at < ptr < len(page):
        return
    pos = _varint(page, ptr)[1]   # past the payload's size
    if pos < len(page):
        value = _varint(page, pos)[0]
        yield value - (1 << 64) if value >= 1 << 63 else value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``pos``: its value and the position after it."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            return value, len(data)
        byte = data[pos + i]
        if i == 8:
            return (value << 8) | byte, pos + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    return value, pos + 9


def _carry_clock(fresh: sqlite3.Connection, carry: Carry, marks: list[Any],
                 resumes: int) -> None:
    """Keep the agent-observed time (where it ``resumes``: the running agent's, or the
    latest of the file's clock marks) and those ``marks``, and mark every salvaged event as
    received by now (an event whose own mark is lost counts its age from now: kept longer,
    never expired early)."""
    fresh.executemany("INSERT OR IGNORE INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                      marks)
    top = fresh.execute(
        "SELECT max(coalesce((SELECT max(id + n - 1) FROM records), 0), "
        "coalesce((SELECT max(seq) FROM dead), 0), "
        "coalesce((SELECT max(id + length(dkeys) / 8 - 1) FROM spent), 0))").fetchone()[0]
    mark(fresh, resumes, max(carry.next_seq, top + 1))


def salvage_counters(old: sqlite3.Connection | None, carried: Counts, lost: int,
                     dead_lost: int) -> Counts:
    """The lost spool's counters (the running agent's, else the file's), plus this loss:
    ``lost`` queued events and ``dead_lost`` dead letters."""
    counters = from_names(_try(old, "SELECT name, value FROM counters NOT INDEXED") or [])
    for outcome, n in carried.items():  # the running agent's are never behind the file's
        counters[outcome] = max(counters.get(outcome, 0), n)
    record(counters, Tally.SPOOL_CORRUPT)
    record(counters, Drop.DROPPED_CORRUPT, lost)
    record(counters, Tally.DEAD_DROPPED_CORRUPT, dead_lost)
    return counters


def _typed(conn: sqlite3.Connection | None, sql: str, types: tuple[type, ...]) -> list[Any]:
    """The rows whose values have their columns' ``types`` (the others garbled: copied,
    they failed the fresh spool's every start); none when the query fails."""
    return [row for row in _try(conn, sql) or () if typed(row, types)]


def _try(conn: sqlite3.Connection | None, sql: str, params: Any = ()) -> list[Any] | None:
    """All rows, or None when the damage (or a missing table) makes the query fail."""
    if conn is None:
        return None
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.DatabaseError:
        return None
