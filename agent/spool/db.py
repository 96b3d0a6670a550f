"""The spool's SQL, run on the spool's own database threads.

Each SQLite connection lives on one dedicated thread, and a whole group
commit (dead letters, acks, size cap, inserts, depth and counter updates,
COMMIT) is one plain function run there: one thread hop per commit instead
of one per statement. Measured with `python -m bench`, the per-statement hops
(about eight per commit through aiosqlite) were what kept single-event ingest
at a quarter of the aiohttp ceiling: every hop waits for a turn of the busy
event loop. The functions here touch only the connection and the plain data
they are given, never the Spool's in-memory state, which stays on the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from agent.outcomes import Counts, from_names

T = TypeVar("T")

PAST = -(1 << 62)  # an agent-observed time before any other


class SqliteThread:
    """One SQLite connection owned by one thread; ``run`` calls ``fn(conn, *args)`` there.

    A single-worker executor (public asyncio API) rather than aiosqlite's
    private ``_execute``: the same one hop, without relying on internals.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None

    async def open(self, path: Path, script: str) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.executescript(script)
            except BaseException:
                conn.close()
                raise
            return conn
        self._conn = await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("spool connection is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, conn, *args)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
            except sqlite3.Error:
                pass
        self._pool.shutdown(wait=False)


def mark(conn: sqlite3.Connection, observed: int, next_seq: int) -> None:
    """Record that every event below ``next_seq`` was received by agent-observed time
    ``observed`` (the latest mark is also where that time resumes at the next start)."""
    conn.execute("INSERT OR REPLACE INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                 (observed, next_seq))


def start_clock(conn: sqlite3.Connection, next_seq: int) -> None:
    """First open of a spool without clock marks (new, or from before them): events
    already queued are judged by the wall clock alone, as they were when received."""
    if next_seq > 1:
        mark(conn, PAST, next_seq)


def load_state(conn: sqlite3.Connection) -> tuple[int, list[tuple[int, str, int, int]],
                                                  Counts, int, int, int | None]:
    """(next seq, streams, counters, dead letters, used bytes, agent-observed ms) of an
    opened spool. Dead letters are counted once here, then kept up to date in memory."""
    # Scalar max() is NULL if either side is: coalesce each (an empty table is NULL).
    top = conn.execute("SELECT max(coalesce((SELECT max(seq) FROM events), 0), "
                       "coalesce((SELECT max(seq) FROM dead), 0))").fetchone()[0]
    streams = conn.execute("SELECT id, key, depth, bytes FROM streams").fetchall()
    counters = from_names(conn.execute("SELECT name, value FROM counters").fetchall())
    dead = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
    return top + 1, streams, counters, dead, used_bytes(conn), observed_ms(conn)


def observed_ms(conn: sqlite3.Connection) -> int | None:
    """Where agent-observed time resumes; None for a spool without clock marks."""
    marks, latest = conn.execute("SELECT count(*), max(observed) FROM clock_marks").fetchone()
    return max(int(latest), 0) if marks else None  # 0 when only the PAST mark is there


def used_bytes(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT (SELECT page_count FROM pragma_page_count()) - "
                       "(SELECT freelist_count FROM pragma_freelist_count()), "
                       "(SELECT page_size FROM pragma_page_size())").fetchone()
    return int(row[0] * row[1]) if row else 0


def fetch_all(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[Any]:
    return conn.execute(sql, params).fetchall()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; rolled back and re-raised on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
