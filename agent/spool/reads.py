"""The spool's read half: forwarders' fetches and status reads, on their own connection.

Reads run on their own connection and thread (WAL lets them run beside the
writer), and records are unpacked there, off the event loop. A record that
cannot be unpacked is skipped and handed to the writer to delete, its events
counted ``dropped_corrupt``: the rest of the queue is served (Vector's disk buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from agent.families.event import FAMILIES
from agent.families.lanes import LANES
from agent.spool import db as spool_db
from agent.spool.codebook import lookup
from agent.spool.db import SqliteThread, typed
from agent.spool.records import DamagedRecord, Unpacked, acked_bits_fit, unpack_record
from agent.spool.types import Queued, Run
from agent.spool.writer import Replaced, is_corruption

# Unpacked records kept for the next fetch: a forwarder's batch usually ends inside a
# record, and its next fetch starts there. Records are immutable (only ``gone`` changes,
# and that is read each time); keyed by id, size and data length, so that a record
# rewritten under the same id (a salvage into a fresh spool) is never served stale.
CACHED_RECORDS = 8


class ReadHost(Protocol):
    """What the reader needs of the spool that owns the connections."""

    @property
    def reader(self) -> SqliteThread | None: ...
    @property
    def lock(self) -> asyncio.Lock: ...
    async def recover(self, exc: BaseException) -> None: ...
    def discard(self, records: Sequence[int]) -> None: ...
    def replaced(self) -> bool: ...


class Reader:
    """Reads through the reader connection; damage it meets goes to ``host.recover``
    (a damaged file) or ``host.discard`` (a damaged record)."""

    def __init__(self, host: ReadHost) -> None:
        self.host = host
        # Used on the reader thread: unpacked records by (id, n, data length).
        self._cache: OrderedDict[tuple[int, int, int], Unpacked] = OrderedDict()

    async def fetch(self, stream: int, after: int | Sequence[int], limit: int,
                    lanes: Sequence[int] = LANES, max_bytes: int | None = None,
                    until: Sequence[int | None] | None = None) -> Queued:
        """Up to ``limit`` events of one key's queue: each of ``lanes`` in turn (high first),
        its rows with seq > ``after`` (one cursor, or one per lane, indexed by lane),
        oldest first, and with ``until`` (per lane) none past ``until[lane]``. With
        ``max_bytes``, the read stops at the event that reaches it (always one event at
        least): a count alone let 2,000 large events into memory."""
        reader = self.host.reader
        if reader is None:
            return Queued([])
        cursors = (after,) * len(LANES) if isinstance(after, int) else tuple(after)
        bounds = tuple(until) if until is not None else (None,) * len(LANES)
        try:
            return await self._fetch(reader, stream, cursors, bounds, lanes, limit, max_bytes)
        except sqlite3.DatabaseError as exc:
            # Damage the header check missed at open shows up here; left alone it
            # would stop this key's forwarder for good.
            await self.heal(reader, exc)
        # Read the salvaged queue now: the wake-up sent when it was salvaged may be missed
        # by a forwarder that is about to wait for new data.
        reader = self.host.reader
        if reader is None:
            return Queued([])
        try:
            return await self._fetch(reader, stream, cursors, bounds, lanes, limit, max_bytes)
        except sqlite3.DatabaseError:
            return Queued([])  # read again at the next step

    async def heal(self, reader: SqliteThread, exc: sqlite3.DatabaseError) -> None:
        """After ``exc`` from a read on ``reader``: move a damaged spool aside and salvage
        it, once however many reads met the damage; raise ``exc`` when it is no damage
        (and the spool was not closed under the read). Read again after it.

        A file deleted or replaced under the agent is recovered as a commit finds it: a
        read of it fails ("disk I/O error", no damage), every read alike, and apps idle
        commit nothing to find it."""
        if self.host.reader is reader and not is_corruption(exc) and not self.host.replaced():
            raise exc
        async with self.host.lock:  # also waits out a recovery that closed this reader
            if self.host.reader is reader:  # not already recovered by another reader
                # No fresh spool (a full disk): said by recover; nothing to read until the
                # writer opens one, and no crash of the forwarder's.
                with contextlib.suppress(sqlite3.Error, OSError):
                    await self.host.recover(Replaced() if self.host.replaced() else exc)

    async def _fetch(self, reader: SqliteThread, stream: int, cursors: tuple[int, ...],
                     bounds: tuple[int | None, ...], lanes: Sequence[int], limit: int,
                     max_bytes: int | None) -> Queued:
        runs, damaged = await reader.run(self._fetch_runs, stream, cursors, bounds, lanes,
                                         limit, max_bytes)
        if damaged:
            self.host.discard(damaged)
        return Queued(runs)

    def _fetch_runs(self, conn: sqlite3.Connection, stream: int, cursors: tuple[int, ...],
                    bounds: tuple[int | None, ...], lanes: Sequence[int], limit: int,
                    max_bytes: int | None) -> tuple[list[Run], list[int]]:
        runs: list[Run] = []
        damaged: list[int] = []
        left, room = limit, max_bytes
        for lane in sorted(lanes):   # high first
            if not left:
                break
            left, room = self._lane_runs(conn, stream, lane, cursors[lane], bounds[lane], left,
                                         room, runs, damaged)
        if damaged:
            # Here, on the reader thread, which alone uses the cache: cleared from the
            # loop, it could change under another key's fetch.
            self._cache.clear()
        return runs, damaged

    def _lane_runs(self, conn: sqlite3.Connection, stream: int, lane: int, after: int,
                   until: int | None, left: int, room: int | None, runs: list[Run],
                   damaged: list[int]) -> tuple[int, int | None]:
        """Append up to ``left`` of one lane's events after ``after`` (up to ``until``),
        and while their bytes have not filled ``room``, as runs: one range of the
        (stream, lane, id) index. Returns how many more events, and bytes, may be taken."""
        # From the record holding ``after`` (a cursor may stop inside a record).
        start = conn.execute("SELECT max(id) FROM records WHERE stream = ? AND lane = ? "
                             "AND id <= ?", (stream, lane, after)).fetchone()[0] or 0
        cur = conn.execute("SELECT id, family, n, received, gone, data FROM records "
                           "WHERE stream = ? AND lane = ? AND id >= ? ORDER BY id",
                           (stream, lane, start))
        for rid, family, n, received, gone, data in cur:
            if until is not None and rid > until:
                break
            # A value damage garbled into another type (the tables are not STRICT): read
            # as it came, it failed this key's every fetch (TypeError). Lost, counted, as
            # a record that does not unpack.
            sound = typed((n, received, data), (int, int, bytes))
            if sound and rid + n <= after + 1:
                continue
            # Bits that do not fit (damage): read, they failed this key's every fetch. A
            # family no uplink sends (damage too) is lost as the salvage loses it, not
            # dead-lettered as a body the upstream refused.
            got = self._unpack(conn, rid, data, n) \
                if sound and family in FAMILIES and acked_bits_fit(gone, n) else None
            if got is None:
                damaged.append(rid)
                continue
            whole = Run(rid, stream, family, received, got.bodies, got.ids, lane,
                        longest=got.longest, shortest=got.shortest)
            o = max(0, after + 1 - rid)
            stop = n if until is None else min(n, until + 1 - rid)
            # Whole stretches of live events, not one object per event: runs end only at
            # events already acked (a bit in ``gone``), or at the limit.
            while o < stop and left:
                if gone is not None and gone[o >> 3] & (1 << (o & 7)):
                    o += 1
                    continue
                end = min(stop, o + left)
                if gone is not None:
                    end = next((e for e in range(o, end) if gone[e >> 3] & (1 << (e & 7))), end)
                size = None
                if room is not None:
                    end, after_it = _within(whole.bodies, o, end, room, got.nbytes)
                    size, room = room - after_it, after_it
                    if room <= 0:
                        left = end - o   # the last run of this read
                run = whole if o == 0 and end == n else whole.part(o, end)
                run.nbytes = size
                runs.append(run)
                left -= end - o
                o = end
            if not left:
                break
        cur.close()
        return left, room

    def _unpack(self, conn: sqlite3.Connection, rid: int, data: bytes, n: int
                ) -> Unpacked | None:
        key = (rid, n, len(data))
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
            return got
        try:
            got = unpack_record(data, lookup(conn))
        except DamagedRecord:
            return None
        if len(got.bodies) != n:
            return None
        self._cache[key] = got
        if len(self._cache) > CACHED_RECORDS:
            self._cache.popitem(last=False)
        return got

    async def oldest_received(self, lanes: Sequence[int] = LANES, stream: int | None = None,
                              after: int = 0) -> int | None:
        """The receipt time of the oldest event queued in ``lanes`` (of one ``stream``, or
        of every key), of the records after seq ``after``: the head of each (key, lane)
        (records_lane), not a scan of every record."""
        rows = await self.read(
            f"SELECT min(r) FROM ({_heads(lanes, stream, 'received', after)})")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def first_queued(self) -> tuple[int, int] | None:
        """The seq and receipt time of the event queued first (the lowest seq): one step of
        the records' own key, however many keys have queues (status reads it at every poll)."""
        rows = await self.read("SELECT id, received FROM records ORDER BY id LIMIT 1")
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    async def oldest_seq(self, lanes: Sequence[int] = LANES, stream: int | None = None,
                         after: int = 0) -> int | None:
        """The first seq of the earliest record queued in ``lanes`` (as oldest_received):
        received first, whatever the wall clock said then."""
        rows = await self.read(f"SELECT min(r) FROM ({_heads(lanes, stream, 'id', after)})")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.read(
            "SELECT seq, s.key, upstream, reason, at, body FROM dead JOIN streams s "
            "ON s.id = dead.stream ORDER BY seq DESC LIMIT ?", (limit,))
        return [{"seq": r[0], "key": r[1], "upstream": r[2], "reason": r[3], "at": r[4],
                 "body": bytes(r[5]).decode("utf-8", "replace")} for r in rows]

    async def read(self, sql: str, params: Any = ()) -> list[Any]:
        """A read for status and operations. A spool closed under it (a recovery) or damaged
        reads as empty: a 500 would not help, and the forwarders' reads move it aside."""
        reader = self.host.reader
        if reader is None:
            return []
        try:
            return await reader.run(spool_db.fetch_all, sql, params)
        except sqlite3.DatabaseError as exc:
            if self.host.reader is not reader or is_corruption(exc):
                return []
            raise


def _heads(lanes: Sequence[int], stream: int | None, column: str, after: int) -> str:
    """SQL for ``column`` of the head record after seq ``after`` of each (key, lane), as
    ``r``: one index lookup each (records_lane)."""
    return " UNION ALL ".join(
        f"SELECT (SELECT {column} FROM records WHERE stream = s.id AND lane = {int(lane)} "
        f"AND id > {int(after)} ORDER BY id LIMIT 1) AS r FROM streams s"
        + ("" if stream is None else f" WHERE s.id = {int(stream)}") for lane in lanes)


def _within(bodies: list[bytes], start: int, end: int, room: int, whole: int
            ) -> tuple[int, int]:
    """Where bodies[start:end] stop once their bytes reach ``room`` (the body that reaches
    it is taken: ``room`` is positive, so a read takes one event at least), and the room
    left, zero or less once reached. ``whole``: the bytes of all ``bodies`` (the unpack's
    sum), the size of a read of them all without a len per body."""
    size = whole if start == 0 and end == len(bodies) \
        else sum(map(len, bodies[start:end]))
    if size < room:
        return end, room - size
    stop = start
    while room > 0:
        room -= len(bodies[stop])
        stop += 1
    return stop, room
