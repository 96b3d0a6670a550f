"""Dead-letter operations on a running agent's spool (agent/spool/dead.py holds the SQL).

A retry or purge goes in chunks (``CHUNK_LETTERS`` letters, and for a retry up to about
``dead.STEP_BYTES`` of bodies), each a transaction of the single writer on its thread
under the writer's lock: group commits run between chunks, so apps' requests are not
held for the whole of it (700k letters in one transaction held ingest 30 s), and seqs
are handed out from the same count as new events'. Each chunk is committed and booked
before the next: one stopped midway (cancelled, or the agent killed) leaves the rest
dead letters, for a second retry. Damage a chunk meets moves the spool aside and salvages
it, as a commit's does, and the chunk runs again on the fresh spool. Reads go through the
reader thread, and damage they meet is salvaged too (``read``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from agent.families.event import now_ms
from agent.outcomes import Tally
from agent.spool import dead
from agent.spool.commit import Outcome
from agent.spool.db import SqliteThread, transaction, used_bytes, whole
from agent.spool.store import Spool
from agent.spool.writer import is_corruption

T = TypeVar("T")
# Dead letters a retry or purge takes per transaction: what a group commit may wait for.
CHUNK_LETTERS = 2_000


async def read(spool: Spool, fn: Callable[..., T], *args: Any) -> T:
    """Run one of dead.py's reads on the reader thread. Damage it meets moves the spool
    aside and salvages it, and it reads the fresh spool: only these, expiry and a retry
    or purge read the dead letters, and a listing or export refused every time (503)
    until one of the others met it. The salvage keeps seqs, so ``args`` hold."""
    reader = readable(spool)
    try:
        return await reader.run(fn, *args)
    except sqlite3.DatabaseError as exc:
        await spool.reader_side.heal(reader, exc)
    return await readable(spool).run(fn, *args)


def readable(spool: Spool) -> SqliteThread:
    """The spool's reader thread; DeadError while the spool is not open."""
    reader = spool.reader
    if reader is None:
        raise dead.DeadError("the spool is not open")
    return reader


def _in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    with transaction(conn):
        return fn(conn, *args)


async def _write(spool: Spool, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """Run ``fn`` in its own transaction on the writer's thread, and the file's bytes in
    use after it; caller holds the lock."""
    out = await _run(spool, fn, *args)
    db = spool.db
    assert db is not None   # _run opened it, or raised
    return out, await db.run(used_bytes)


async def _run(spool: Spool, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in its own transaction on the writer's thread; caller holds the lock (a
    read too: the reader's recovery from damage waits for the lock)."""
    db: SqliteThread | None = spool.db
    if db is None:
        raise dead.DeadError("the spool is not open")
    try:
        out: T = await db.run(_in_transaction, fn, *args)
    except sqlite3.DatabaseError as exc:
        # Left alone, the damage (which only these and expiry read) failed every retry and
        # purge until expiry or a restart met it. The salvage keeps seqs, so ``args`` hold.
        if not is_corruption(exc):
            raise
        await spool.recover(exc)
        db = spool.db
        assert db is not None   # recover opened the fresh spool, or raised
        out = await db.run(_in_transaction, fn, *args)
    return out


async def purge(spool: Spool, which: dead.Which) -> int:
    """Delete the chosen dead letters; returns how many."""
    # Events received since the purge began, refused meanwhile, are not taken.
    below, total, after = spool.books.next_seq, 0, dead.FIRST
    while True:
        n, after = await whole(_purge_chunk(spool, which, below, after))
        if not n:
            return total
        total += n


async def _purge_chunk(spool: Spool, which: dead.Which, below: int,
                       after: int) -> tuple[int, int]:
    async with spool.lock:
        done, size = await _write(spool, dead.purge, which, below, CHUNK_LETTERS, after)
        n = sum(done.out.counters.values())
        _settle_books(spool, done.out, size, n)
    return n, done.last


async def retry(spool: Spool, which: dead.Which) -> int:
    """Put the chosen dead letters back at the tail of their keys' queues; returns how many."""
    # Retried letters refused again meanwhile have seqs from here on: not taken twice.
    below, total, after = spool.books.next_seq, 0, dead.FIRST
    # A key several letters share goes to the newest one's record, whichever chunk, or
    # retry of another reason, takes it: read once, beside the writer (a scan of the
    # letters), not under the lock.
    newest = await read(spool, dead.newest_letters, below)
    try:
        while True:
            n, after = await whole(_retry_chunk(spool, which, below, after, newest))
            if not n:
                break
            total += n
    finally:
        if total:  # queues that need forwarders: the loops of idle keys have ended
            spool.on_reopen()
    return total


async def _retry_chunk(spool: Spool, which: dead.Which, below: int, after: int,
                       newest: dict[int, int]) -> tuple[int, int]:
    async with spool.lock:
        # Letters whose key a copy of their event stored again holds (``held_since``):
        # their key stays with it, the copy's window; their new records store none.
        letters = await _run(spool, dead.letter_keys, which, below, CHUNK_LETTERS, after)
        done, size = await _write(spool, dead.requeue, which, spool.books.next_seq,
                                  dead.STEP_BYTES, below, CHUNK_LETTERS, 1, after,
                                  spool.index.held_since(letters), newest)
        spool.retried(spool.books.next_seq, done.next_seq)
        spool.books.next_seq = done.next_seq
        spool.books.committed_seq = done.next_seq - 1
        _settle_books(spool, done.out, size, done.count)
        observed, wall = spool.observed_ms(), now_ms()
        # Known from now on by the new records alone, as a restart loads them (the file
        # keeps them there only): in their bucket, where the file's forgetting of them is
        # counted (DedupeIndex.forgotten_stored finds it by the record's id). Taken out of
        # their old buckets in one pass for the chunk: each pass reads buckets, and letters
        # received apart are a record each.
        spool.index.discard([k for _, _, keys in done.records for k in keys])
        forgotten = spool.index.forgotten
        for rid, n, keys in done.records:
            spool.live.add(rid, n, observed)
            spool.index.admit(keys, wall, observed, rid)
        # Keys the cap let go for theirs (a letter's key it let go long ago comes back).
        spool.books.count(Tally.DEDUPE_FORGOTTEN, spool.index.forgotten - forgotten)
    return done.count, done.last


def _settle_books(spool: Spool, out: Outcome, size: int, gone: int) -> None:
    out.used_bytes = size
    spool.books.apply(out)
    spool.books.dead_count -= gone
