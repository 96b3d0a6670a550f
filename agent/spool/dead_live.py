"""Dead-letter operations on a running agent's spool (agent/spool/dead.py holds the SQL).

A retry or purge takes the writer's lock and runs on the writer's thread, so it is one
more transaction of the single writer: no commit runs beside it, and seqs are handed
out from the same count as new events'. Reads go through the reader thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from agent.families.event import now_ms
from agent.spool import dead
from agent.spool.commit import Outcome
from agent.spool.db import SqliteThread, transaction, used_bytes
from agent.spool.store import Spool

T = TypeVar("T")


async def read(spool: Spool, fn: Callable[..., T], *args: Any) -> T:
    """Run one of dead.py's reads on the reader thread."""
    reader = spool.reader
    if reader is None:
        raise dead.DeadError("the spool is not open")
    return await reader.run(fn, *args)


def _in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    with transaction(conn):
        return fn(conn, *args)


async def _write(spool: Spool, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """Run ``fn`` in its own transaction on the writer's thread; caller holds the lock."""
    db: SqliteThread | None = spool.db
    if db is None:
        raise dead.DeadError("the spool is not open")
    out = await db.run(_in_transaction, fn, *args)
    return out, await db.run(used_bytes)


async def purge(spool: Spool, which: dead.Which) -> int:
    """Delete the chosen dead letters; returns how many."""
    async with spool.lock:
        out, size = await _write(spool, dead.purge, which)
        n = sum(out.counters.values())
        _settle_books(spool, out, size, n)
    return n


async def retry(spool: Spool, which: dead.Which) -> int:
    """Put the chosen dead letters back at the tail of their keys' queues; returns how many."""
    async with spool.lock:
        done, size = await _write(spool, dead.requeue, which, spool.books.next_seq)
        spool.books.next_seq = done.next_seq
        _settle_books(spool, done.out, size, done.count)
        observed, wall = spool.observed_ms(), now_ms()
        for rid, n, keys in done.records:
            spool.live.add(rid, n, observed)
            # Already known unless the window passed: then known again from now on, as
            # a restart would load them from the record.
            spool.index.admit(keys, wall, observed)
    if done.count:
        spool.on_reopen()  # queues that need forwarders: the loops of idle keys have ended
    return done.count


def _settle_books(spool: Spool, out: Outcome, size: int, gone: int) -> None:
    out.used_bytes = size
    spool.books.apply(out)
    spool.books.dead_count -= gone
