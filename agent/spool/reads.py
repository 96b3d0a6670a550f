"""The spool's public types and its read side (forwarders' fetches, status reads).

Reads run on their own connection and thread (WAL lets them run beside the
writer); Spool (store.py) inherits them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from agent.spool import db as spool_db
from agent.spool.db import SqliteThread
from agent.spool.types import Row


class SpoolReads:
    """The read half of Spool: everything here goes through the reader connection."""

    _reader: SqliteThread | None
    _lock: asyncio.Lock

    async def _recover(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def fetch(self, stream: int, after: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows of one key's queue with seq > ``after``, oldest first."""
        reader = self._reader
        if reader is None:
            return []
        try:
            return await reader.run(_fetch_rows, stream, after, limit)
        except sqlite3.DatabaseError as exc:
            # Damage the header check missed at open shows up here; left alone it
            # would stop this key's forwarder for good.
            if self._reader is reader and not is_corruption(exc):
                raise
            async with self._lock:  # also waits out a recovery that closed this reader
                if self._reader is reader:  # not already recovered by another reader
                    await self._recover(exc)
        # Read the salvaged queue now: the wake-up sent when it was salvaged may be missed
        # by a forwarder that is about to wait for new data.
        reader = self._reader
        if reader is None:
            return []
        try:
            return await reader.run(_fetch_rows, stream, after, limit)
        except sqlite3.DatabaseError:
            return []  # read again at the next step

    async def oldest_received(self) -> int | None:
        # The head of each key's queue (the live index), not a scan past tombstones.
        rows = await self._read(
            "SELECT min((SELECT received FROM events WHERE stream = s.id AND acked IS NULL "
            "ORDER BY seq LIMIT 1)) FROM streams s")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT seq, s.key, upstream, reason, at, body FROM dead JOIN streams s "
            "ON s.id = dead.stream ORDER BY seq DESC LIMIT ?", (limit,))
        return [{"seq": r[0], "key": r[1], "upstream": r[2], "reason": r[3], "at": r[4],
                 "body": bytes(r[5]).decode("utf-8", "replace")} for r in rows]

    async def _read(self, sql: str, params: Any = ()) -> list[Any]:
        """A read for status and operations. A spool closed under it (a recovery) or damaged
        reads as empty: a 500 would not help, and the forwarders' reads move it aside."""
        reader = self._reader
        if reader is None:
            return []
        try:
            return await reader.run(spool_db.fetch_all, sql, params)
        except sqlite3.DatabaseError as exc:
            if self._reader is not reader or is_corruption(exc):
                return []
            raise


def _fetch_rows(conn: sqlite3.Connection, stream: int, after: int, limit: int) -> list[Row]:
    # Rows are built on the reader thread, off the event loop.
    return [Row(*r) for r in conn.execute(
        "SELECT seq, stream, family, received, body FROM events "
        "WHERE stream = ? AND seq > ? AND acked IS NULL ORDER BY seq LIMIT ?",
        (stream, after, limit))]


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text
