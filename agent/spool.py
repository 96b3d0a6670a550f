"""The durable queue: SQLite in WAL mode through aiosqlite.

Ingest appends go through one writer task that folds every request waiting
at that moment into a single transaction (group commit), so one fsync covers
many apps. Forwarders read from a second connection, which WAL lets run
beside the writer. Rows are deleted only when an upstream acknowledges them;
leases are kept in the forwarder's memory, so a crash simply makes every
unacknowledged row eligible again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from .config import StorageConfig
from .events import Event, now_ms
from .paths import ensure_private_dir
from .spool_schema import SCHEMA, move_aside

log = logging.getLogger("outpost.spool")

# Per-row overhead (record header, index entry, page slack) used when
# estimating whether a group still fits under max_size_mb.
ROW_OVERHEAD = 64
RETRY_AFTER_FULL_S = 30


class SpoolFull(Exception):
    """The spool cannot take these events now; the app should retry later."""

    def __init__(self, reason: str, retry_after: int = RETRY_AFTER_FULL_S) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True)
class Row:
    """One stored event as a forwarder sees it."""

    seq: int
    stream: int
    family: int
    received: int
    body: bytes


@dataclass(slots=True)
class Stream:
    """One key's queue: its id and in-memory depth counters (persisted per commit)."""

    id: int
    key: str
    depth: int = 0
    bytes: int = 0


@dataclass(slots=True)
class _Pending:
    events: list[Event]
    received: int
    done: asyncio.Future[int]


@dataclass(slots=True)
class _Batch:
    appends: list[_Pending] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    dead: list[tuple[int, str, str]] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.appends or self.acks or self.dead)


class Spool:
    """The durable queue. Create with ``await Spool.open(cfg)``."""

    def __init__(self, cfg: StorageConfig, path: Path) -> None:
        self.cfg = cfg
        self.path = path
        self.max_bytes = cfg.max_size_mb * 1024 * 1024
        self.streams: dict[str, Stream] = {}
        self.counters: dict[str, int] = {}
        self._by_id: dict[int, Stream] = {}
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._next_seq = 1
        self._used_bytes = 0
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._new_streams: list[Stream] = []
        self.last_commit_events = 0
        self.commits = 0  # transactions this process ran: shows group commit at work

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(cls, cfg: StorageConfig) -> Spool:
        spool = cls(cfg, cfg.resolved_path())
        ensure_private_dir(spool.path.parent)
        try:
            await spool._connect()
        except sqlite3.DatabaseError as exc:
            await spool._recover(exc)
        spool._writer = asyncio.create_task(spool._write_loop(), name="spool-writer")
        return spool

    async def _connect(self) -> None:
        if not self.path.exists():
            # Create it private before SQLite does; -wal/-shm inherit the mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        if sys.platform != "win32":
            os.chmod(self.path, 0o600)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            sync = "FULL" if self.cfg.sync == "full" else "NORMAL"
            await self._db.executescript(
                f"PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};"
                "PRAGMA busy_timeout=5000; PRAGMA journal_size_limit=67108864;" + SCHEMA)
            await self._load_state(self._db)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            await self._close_connections()
            raise

    async def _load_state(self, db: aiosqlite.Connection) -> None:
        async with db.execute("SELECT max(seq) FROM events") as cur:
            row = await cur.fetchone()
        async with db.execute("SELECT max(seq) FROM dead") as cur:
            dead_row = await cur.fetchone()
        self._next_seq = max((row[0] if row and row[0] else 0),
                             (dead_row[0] if dead_row and dead_row[0] else 0)) + 1
        self.streams.clear()
        self._by_id.clear()
        self._new_streams = []
        for sid, key, depth, nbytes in await _all(db, 
                "SELECT id, key, depth, bytes FROM streams"):
            self._add_stream(Stream(sid, key, depth, nbytes))
        self.counters = {name: value for name, value in
                         await _all(db, "SELECT name, value FROM counters")}
        await self._refresh_size(db)

    def _add_stream(self, stream: Stream) -> None:
        self.streams[stream.key] = stream
        self._by_id[stream.id] = stream

    async def _recover(self, exc: BaseException) -> None:
        """Never a crash loop: move a corrupt spool aside and start afresh."""
        await self._close_connections()
        moved = move_aside(self.path)
        corrupt = self.counters.get("spool_corrupt", 0) + 1
        lost, streams, next_seq = self.depth, list(self.streams.values()), self._next_seq
        log.error("spool %s is corrupt (%s); moved aside to %s with %d queued events, "
                  "starting a fresh spool", self.path, exc, moved, lost)
        await self._connect()
        # Running forwarders hold these streams and a seq cursor: keep the stream ids,
        # and keep seqs rising, or new events would hide behind the cursors.
        self._next_seq = max(self._next_seq, next_seq)
        for stream in streams:
            stream.depth = stream.bytes = 0
            self._add_stream(stream)
            self._new_streams.append(stream)
        # The count carries into the fresh spool (saved with its next commit).
        self.count("spool_corrupt", corrupt)
        if lost:
            self.count("dropped_corrupt", lost)

    async def close(self) -> None:
        """Finish pending commits, then close."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._db):
            if conn is not None:
                try:
                    await conn.close()
                except sqlite3.Error:
                    pass
        self._reader = self._db = None

    # -- writes (group commit) ---------------------------------------------

    async def append(self, events: list[Event]) -> int:
        """Commit ``events``; returns how many were new (the rest were resends).

        Raises SpoolFull when they do not fit and ``when_full = "reject"``,
        or when the disk itself is full.
        """
        if not events:
            return 0
        if self._closing:
            raise SpoolFull("agent is shutting down", retry_after=5)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._batch.appends.append(_Pending(events, now_ms(), fut))
        self._wake.set()
        return await fut

    async def ack(self, seqs: Sequence[int]) -> None:
        """Delete acknowledged rows; returns once that is committed."""
        self._batch.acks.extend(seqs)
        await self._settled()

    async def dead_letter(self, rows: Sequence[tuple[int, str, str]]) -> None:
        """Move (seq, upstream, reason) rows the upstream refused for good to dead letters."""
        self._batch.dead.extend(rows)
        await self._settled()

    def _settled(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.waiters.append(fut)
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, _Batch()
            try:
                if batch:
                    await self._commit(batch)
            except Exception:  # the writer must outlive any one bad commit
                log.exception("spool commit failed")
            finally:
                # Ack/dead-letter callers only wait; a failed delete is retried by resending.
                for fut in batch.waiters:
                    if not fut.done():
                        fut.set_result(None)
            if self._closing and not self._batch:
                return

    async def _commit(self, batch: _Batch) -> None:
        try:
            async with self._lock:
                await self._run_batch(batch)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            async with self._lock:
                await self._recover(exc)
                try:
                    await self._run_batch(batch)
                except BaseException:
                    _fail(batch.appends, SpoolFull("spool storage is failing", retry_after=5))
                    raise

    async def _run_batch(self, batch: _Batch) -> None:
        db = self._require_db()
        appends = batch.appends
        try:
            await db.execute("BEGIN IMMEDIATE")
            if batch.dead:
                await self._move_dead(db, batch.dead)
            if batch.acks:
                self.count("acked", await self._delete(db, batch.acks, remember=True))
            rejected = await self._make_room(db, appends)
            accepted = [p for p in appends if p not in rejected]
            stored = await self._insert(db, accepted)
            if not stored and (batch.acks or batch.dead):
                # _insert saves the depths when it ran; a kill -9 must not revive stale ones.
                await self._save_streams(db)
            await self._save_counters(db)
            await db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            await _rollback(db)
            await self._reload_after_rollback(db)
            reason = "disk full" if "full" in str(exc) else f"storage error: {exc}"
            log.error("spool commit failed: %s", reason)
            self.count("rejected_storage_error", sum(len(p.events) for p in appends))
            _fail(appends, SpoolFull(reason))
            return
        except BaseException as exc:
            await _rollback(db)
            await self._reload_after_rollback(db)
            if not (isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc)):
                _fail(appends, exc)  # corruption: _commit runs them again on a fresh spool
            raise
        self.commits += 1
        await self._refresh_size(db)
        _fail(rejected, SpoolFull("spool is full (storage.max_size_mb)"))
        for pending, n in zip(accepted, stored):
            if not pending.done.done():
                pending.done.set_result(n)

    async def _insert(self, db: aiosqlite.Connection, accepted: list[_Pending]) -> list[int]:
        rows: list[tuple[Any, ...]] = []
        first = self._next_seq
        for p in accepted:
            for ev in p.events:
                stream = self._stream_for(ev.key)
                rows.append((self._next_seq, stream.id, ev.family, p.received, ev.dedupe,
                             ev.body, ev.dedupe))
                self._next_seq += 1
        if not rows:
            return []
        await self._insert_new_streams(db)
        cur = await db.executemany(
            "INSERT OR IGNORE INTO events(seq, stream, family, received, dkey, body) "
            "SELECT ?,?,?,?,?,? WHERE NOT EXISTS (SELECT 1 FROM acked WHERE dkey = ?)", rows)
        if cur.rowcount == len(rows):
            inserted = None
        else:  # some were resends: find which seqs made it
            found = await _all(db, 
                "SELECT seq FROM events WHERE seq BETWEEN ? AND ?", (first, self._next_seq - 1))
            inserted = {r[0] for r in found}
        counts: list[int] = []
        i = 0
        for p in accepted:
            n = 0
            for ev in p.events:
                seq = rows[i][0]
                i += 1
                if inserted is None or seq in inserted:
                    n += 1
                    s = self.streams[ev.key]
                    s.depth += 1
                    s.bytes += len(ev.body)
            counts.append(n)
        await self._save_streams(db)
        self.count("ingested", sum(counts))
        self.count("duplicates", len(rows) - sum(counts))
        self.last_commit_events = len(rows)
        return counts

    def _stream_for(self, key: str) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = Stream(max(self._by_id, default=0) + 1, key)
            self._add_stream(stream)
            self._new_streams.append(stream)
        return stream

    async def _insert_new_streams(self, db: aiosqlite.Connection) -> None:
        if self._new_streams:
            await db.executemany("INSERT OR IGNORE INTO streams(id, key) VALUES (?, ?)",
                                 [(s.id, s.key) for s in self._new_streams])
            self._new_streams = []

    async def _save_streams(self, db: aiosqlite.Connection) -> None:
        await db.executemany("UPDATE streams SET depth = ?, bytes = ? WHERE id = ?",
                             [(s.depth, s.bytes, s.id) for s in self.streams.values()])

    async def _save_counters(self, db: aiosqlite.Connection) -> None:
        await db.executemany("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)",
                             list(self.counters.items()))

    async def _delete(self, db: aiosqlite.Connection, seqs: Sequence[int], *,
                      remember: bool) -> int:
        """Delete rows by seq; ``remember`` keeps their dedupe keys (acked ones)."""
        arg = orjson.dumps(list(seqs)).decode()
        if remember and self.cfg.dedupe_window_h > 0:
            await db.execute(
                "INSERT OR REPLACE INTO acked(dkey, at) SELECT dkey, ? FROM events "
                "WHERE seq IN (SELECT value FROM json_each(?))", (now_ms(), arg))
        gone = await _all(db, 
            "DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?)) "
            "RETURNING stream, length(body)", (arg,))
        self._uncount(gone)
        return len(gone)

    def _uncount(self, gone: Any) -> None:
        for sid, nbytes in gone:
            s = self._by_id.get(sid)
            if s is not None:
                s.depth -= 1
                s.bytes -= nbytes

    async def _move_dead(self, db: aiosqlite.Connection, dead: list[tuple[int, str, str]]) -> None:
        now = now_ms()
        await db.executemany(
            "INSERT OR IGNORE INTO dead(seq, stream, family, received, dkey, body, upstream, "
            "reason, at) SELECT seq, stream, family, received, dkey, body, ?, ?, ? "
            "FROM events WHERE seq = ?", [(up, reason, now, seq) for seq, up, reason in dead])
        n = await self._delete(db, [seq for seq, _, _ in dead], remember=True)
        self.count("dead_lettered", n)

    async def _make_room(self, db: aiosqlite.Connection, appends: list[_Pending]) -> list[_Pending]:
        """Apply max_size_mb; returns the appends that must be refused."""
        incoming = sum(len(ev.body) + ROW_OVERHEAD for p in appends for ev in p.events)
        excess = self._used_bytes + incoming - self.max_bytes
        if excess <= 0 or not appends:
            return []
        if self.cfg.when_full == "reject":
            self.count("rejected_full", sum(len(p.events) for p in appends))
            return list(appends)
        freed = 0
        while freed < excess:
            gone = await _all(db, 
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT 500) "
                "RETURNING stream, length(body)")
            if not gone:
                break
            self._uncount(gone)
            freed += sum(n + ROW_OVERHEAD for _, n in gone)
            self.count("dropped_full", len(gone))
        self._used_bytes -= freed
        return []

    async def _refresh_size(self, db: aiosqlite.Connection) -> None:
        async with db.execute(
                "SELECT (SELECT page_count FROM pragma_page_count()) - "
                "(SELECT freelist_count FROM pragma_freelist_count()), "
                "(SELECT page_size FROM pragma_page_size())") as cur:
            row = await cur.fetchone()
        if row is not None:
            self._used_bytes = row[0] * row[1]

    async def _reload_after_rollback(self, db: aiosqlite.Connection) -> None:
        """In-memory counters ran ahead of a rolled-back transaction; re-read them."""
        try:
            await self._load_state(db)
        except sqlite3.Error as exc:
            log.error("spool state reload failed: %s", exc)

    # -- maintenance -------------------------------------------------------

    async def prune(self) -> int:
        """Drop events older than max_age_days and forget old dedupe keys."""
        db = self._require_db()
        cutoff = now_ms() - self.cfg.max_age_days * 86_400_000
        forget = now_ms() - self.cfg.dedupe_window_h * 3_600_000
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                gone = await _all(db, 
                    "DELETE FROM events WHERE received < ? RETURNING stream, length(body)",
                    (cutoff,))
                self._uncount(gone)
                self.count("expired", len(gone))
                await db.execute("DELETE FROM acked WHERE at < ?", (forget,))
                await self._save_streams(db)
                await self._save_counters(db)
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                await _rollback(db)
                await self._reload_after_rollback(db)
                log.error("spool prune failed: %s", exc)
                return 0
            await self._refresh_size(db)
        if gone:
            log.warning("dropped %d events older than %d days", len(gone), self.cfg.max_age_days)
        return len(gone)

    # -- reads ---------------------------------------------------------------

    async def fetch(self, stream: int, after: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows of one key's queue with seq > ``after``, oldest first."""
        reader = self._reader
        if reader is None:
            return []
        try:
            rows = await _all(reader,
                              "SELECT seq, stream, family, received, body FROM events "
                              "WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
                              (stream, after, limit))
        except sqlite3.DatabaseError as exc:
            # Damage the header check missed at open shows up here; left alone it
            # would stop this key's forwarder for good.
            if not _is_corruption(exc):
                raise
            async with self._lock:
                if self._reader is reader:  # not already recovered by another reader
                    await self._recover(exc)
            return []
        return [Row(*r) for r in rows]

    async def oldest_received(self) -> int | None:
        if self._reader is None:
            return None
        rows = (await _all(self._reader, 
            "SELECT received FROM events ORDER BY seq LIMIT 1"))
        return int(rows[0][0]) if rows else None

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        if self._reader is None:
            return []
        rows = await _all(self._reader, 
            "SELECT seq, s.key, upstream, reason, at, body FROM dead JOIN streams s "
            "ON s.id = dead.stream ORDER BY seq DESC LIMIT ?", (limit,))
        return [{"seq": r[0], "key": r[1], "upstream": r[2], "reason": r[3], "at": r[4],
                 "body": bytes(r[5]).decode("utf-8", "replace")} for r in rows]

    # -- accounting ----------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def stream_by_id(self, sid: int) -> Stream | None:
        return self._by_id.get(sid)

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.streams.values())

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def _require_db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise SpoolFull("spool is not open", retry_after=5)
        return self._db


async def _all(db: aiosqlite.Connection, sql: str, params: Any = ()) -> list[Any]:
    return list(await db.execute_fetchall(sql, params))


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


def _fail(pendings: list[_Pending], exc: BaseException) -> None:
    for p in pendings:
        if not p.done.done():
            p.done.set_exception(exc)


async def _rollback(db: aiosqlite.Connection) -> None:
    try:
        if db.in_transaction:
            await db.execute("ROLLBACK")
    except sqlite3.Error:
        pass
