"""The spool's read half: forwarders' fetches and status reads, on their own connection.

Reads run on their own connection and thread (WAL lets them run beside the
writer), and records are unpacked there, off the event loop. A record that
cannot be unpacked is skipped and handed to the writer to delete, its events
counted ``dropped_corrupt``: the rest of the queue is served (Vector's disk buffer).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from agent.families.lanes import LANES
from agent.spool import db as spool_db
from agent.spool.db import SqliteThread
from agent.spool.records import DamagedRecord, unpack
from agent.spool.types import Row
from agent.spool.writer import is_corruption

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


class Reader:
    """Reads through the reader connection; damage it meets goes to ``host.recover``
    (a damaged file) or ``host.discard`` (a damaged record)."""

    def __init__(self, host: ReadHost) -> None:
        self.host = host
        self._cache: OrderedDict[tuple[int, int, int], list[bytes]] = OrderedDict()  # used on the reader thread

    async def fetch(self, stream: int, after: int | Sequence[int], limit: int,
                    lanes: Sequence[int] = LANES) -> list[Row]:
        """Up to ``limit`` rows of one key's queue: each of ``lanes`` in turn (high first),
        its rows with seq > ``after`` (one cursor, or one per lane, indexed by lane),
        oldest first."""
        reader = self.host.reader
        if reader is None:
            return []
        cursors = (after,) * len(LANES) if isinstance(after, int) else tuple(after)
        try:
            return await self._fetch(reader, stream, cursors, lanes, limit)
        except sqlite3.DatabaseError as exc:
            # Damage the header check missed at open shows up here; left alone it
            # would stop this key's forwarder for good.
            if self.host.reader is reader and not is_corruption(exc):
                raise
            async with self.host.lock:  # also waits out a recovery that closed this reader
                if self.host.reader is reader:  # not already recovered by another reader
                    await self.host.recover(exc)
        # Read the salvaged queue now: the wake-up sent when it was salvaged may be missed
        # by a forwarder that is about to wait for new data.
        reader = self.host.reader
        if reader is None:
            return []
        try:
            return await self._fetch(reader, stream, cursors, lanes, limit)
        except sqlite3.DatabaseError:
            return []  # read again at the next step

    async def _fetch(self, reader: SqliteThread, stream: int, cursors: tuple[int, ...],
                     lanes: Sequence[int], limit: int) -> list[Row]:
        rows, damaged = await reader.run(self._fetch_rows, stream, cursors, lanes, limit)
        if damaged:
            self._cache.clear()
            self.host.discard(damaged)
        return rows

    def _fetch_rows(self, conn: sqlite3.Connection, stream: int, cursors: tuple[int, ...],
                    lanes: Sequence[int], limit: int) -> tuple[list[Row], list[int]]:
        rows: list[Row] = []
        damaged: list[int] = []
        for lane in sorted(lanes):   # high first
            if len(rows) >= limit:
                break
            self._lane_rows(conn, stream, lane, cursors[lane], limit, rows, damaged)
        return rows, damaged

    def _lane_rows(self, conn: sqlite3.Connection, stream: int, lane: int, after: int,
                   limit: int, rows: list[Row], damaged: list[int]) -> None:
        """Append one lane's rows after ``after``: one range of the (stream, lane, id) index."""
        # From the record holding ``after`` (a cursor may stop inside a record).
        start = conn.execute("SELECT max(id) FROM records WHERE stream = ? AND lane = ? "
                             "AND id <= ?", (stream, lane, after)).fetchone()[0] or 0
        cur = conn.execute("SELECT id, family, n, received, gone, data FROM records "
                           "WHERE stream = ? AND lane = ? AND id >= ? ORDER BY id",
                           (stream, lane, start))
        for rid, family, n, received, gone, data in cur:
            if rid + n <= after + 1:
                continue
            bodies = self._unpack(rid, data, n)
            if bodies is None:
                damaged.append(rid)
                continue
            for o in range(max(0, after + 1 - rid), n):
                if gone is not None and gone[o >> 3] & (1 << (o & 7)):
                    continue
                rows.append(Row(rid + o, stream, family, received, bodies[o], lane))
                if len(rows) >= limit:
                    break
            if len(rows) >= limit:
                break
        cur.close()

    def _unpack(self, rid: int, data: bytes, n: int) -> list[bytes] | None:
        key = (rid, n, len(data))
        bodies = self._cache.get(key)
        if bodies is not None:
            self._cache.move_to_end(key)
            return bodies
        try:
            bodies = unpack(data)
        except DamagedRecord:
            return None
        if len(bodies) != n:
            return None
        self._cache[key] = bodies
        if len(self._cache) > CACHED_RECORDS:
            self._cache.popitem(last=False)
        return bodies

    async def oldest_received(self, lanes: Sequence[int] = LANES,
                              stream: int | None = None) -> int | None:
        """The receipt time of the oldest event queued in ``lanes`` (of one ``stream``, or
        of every key): the head of each (key, lane) (records_lane), not a scan of every
        record."""
        heads = " UNION ALL ".join(
            f"SELECT (SELECT received FROM records WHERE stream = s.id AND lane = {int(lane)} "
            "ORDER BY id LIMIT 1) AS r FROM streams s"
            + ("" if stream is None else f" WHERE s.id = {int(stream)}") for lane in lanes)
        rows = await self.read(f"SELECT min(r) FROM ({heads})")
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
