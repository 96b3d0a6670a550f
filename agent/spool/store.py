"""The durable queue: SQLite in WAL mode, each connection on its own thread.

Ingest appends go through one writer task that folds every request waiting
at that moment into a single transaction (group commit, writer.py), so one
fsync covers many apps. Forwarders read from a second connection, which WAL lets run
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
from collections.abc import Callable
from pathlib import Path

from agent.clock import CLOCK
from agent.families.event import now_ms
from agent.outcomes import Counts, Drop, Outcome, record
from agent.paths import ensure_private_dir
from agent.settings import StorageConfig
from agent.spool import commit as spool_commit
from agent.spool import db as spool_db
from agent.spool.db import SqliteThread
from agent.spool.reads import SpoolReads, is_corruption
from agent.spool.salvage import Carry, Salvaged, salvage, salvage_counters
from agent.spool.schema import SCHEMA, move_aside
from agent.spool.types import SpoolFull, Stream
from agent.spool.writer import Batch, SpoolWrites

log = logging.getLogger("outpost.spool")


class Spool(SpoolWrites, SpoolReads):
    """The durable queue. Create with ``await Spool.open(cfg)``.

    This module holds its state, lifecycle, recovery and expiry; writer.py its
    group commit, reads.py its reads.
    """

    def __init__(self, cfg: StorageConfig, path: Path,
                 on_reopen: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.path = path
        self.max_bytes = cfg.max_size_mb * 1024 * 1024
        self.streams: dict[str, Stream] = {}
        self.counters: Counts = {}
        self._unsaved: Counts = {}  # counted on the loop, saved with the next commit
        self.dead_count = 0  # rows in the dead letters table
        self._by_id: dict[int, Stream] = {}
        self._top_stream_id = 0  # a new key's id; max(_by_id) made each new key O(keys)
        self._db: SqliteThread | None = None
        self._reader: SqliteThread | None = None
        self._next_seq = 1
        self._used_bytes = 0
        self._batch = Batch()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._new_streams: list[Stream] = []
        self.commits = 0  # transactions this process ran: shows group commit at work
        # Agent-observed time (agent/clock.py): the spool's count, plus what this process
        # has seen pass since it was read.
        self._observed_base = 0
        self._elapsed_at_load = CLOCK.elapsed_ms()
        self._last_mark: int | None = None
        self._loaded = False  # whether depths and counters were read from the file
        # Called when a spool that could not be opened is opened at last, or when rows
        # are salvaged from a corrupt one: their queues need forwarders.
        self.on_reopen = on_reopen

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(cls, cfg: StorageConfig, on_reopen: Callable[[], None] = lambda: None) -> Spool:
        spool = cls(cfg, cfg.resolved_path(), on_reopen)
        ensure_private_dir(spool.path.parent)
        try:
            try:
                await spool._connect()
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    raise
                await spool._recover(exc)
        except (sqlite3.DatabaseError, OSError) as exc:
            # Not corrupt (a full disk, an I/O error): keep the file, refuse events with
            # 503 and try again at each commit, rather than exit into a crash loop.
            log.error("spool %s cannot be opened (%s); refusing events until it can",
                      spool.path, exc)
        spool._writer = asyncio.create_task(spool._write_loop(), name="spool-writer")
        return spool

    async def _connect(self) -> None:
        if not self.path.exists():
            # Create it private before SQLite does; -wal/-shm inherit the mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        if sys.platform != "win32":
            os.chmod(self.path, 0o600)
        sync = "FULL" if self.cfg.sync == "full" else "NORMAL"
        self._db = SqliteThread("spool-writer")
        try:
            await self._db.open(self.path, f"PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};"
                                "PRAGMA busy_timeout=5000; PRAGMA journal_size_limit=67108864;"
                                + SCHEMA)
            await self._load_state(self._db)
            # Published only once open: a status read in between would take a reader
            # with no connection for a failure of its own (a 500).
            reader = SqliteThread("spool-reader")
            try:
                await reader.open(self.path, "PRAGMA busy_timeout=5000;")
            except BaseException:
                await reader.close()
                raise
            self._reader = reader
        except BaseException:
            await self._close_connections()
            raise

    async def _load_state(self, db: SqliteThread) -> None:
        next_seq, streams, counters, dead, used, observed = await db.run(spool_db.load_state)
        if observed is None:
            await db.run(spool_db.start_clock, next_seq)
        self._observed_base, self._elapsed_at_load = observed or 0, CLOCK.elapsed_ms()
        self._last_mark = None
        self._next_seq = next_seq
        self.streams.clear()
        self._by_id.clear()
        self._top_stream_id = 0
        self._new_streams = []
        for sid, key, depth, nbytes in streams:
            self._add_stream(Stream(sid, key, depth, nbytes))
        self.counters = counters
        self.dead_count = dead
        self._unsaved = {}
        self._used_bytes = used
        self._loaded = True

    def _add_stream(self, stream: Stream) -> None:
        self.streams[stream.key] = stream
        self._by_id[stream.id] = stream
        self._top_stream_id = max(self._top_stream_id, stream.id)

    async def _recover(self, exc: BaseException) -> None:
        """Never a crash loop: move a corrupt spool aside, start afresh, and salvage into
        the fresh spool every row that can still be read (agent/spool/salvage.py)."""
        carry = Carry(streams={s.id: s.key for s in self.streams.values()},
                      counters=dict(self.counters), observed=self.observed_ms(),
                      next_seq=self._next_seq,
                      depth=self.depth if self._loaded else None)
        held, next_seq = list(self.streams.values()), self._next_seq
        await self._close_connections()
        moved = move_aside(self.path)
        await self._connect()
        db = self._require_db()
        try:
            got = await db.run(salvage, moved, carry)
        except sqlite3.Error as why:  # e.g. no room for the copy: the fresh spool stays empty
            log.error("spool %s: could not salvage %s: %s", self.path, moved, why)
            got = Salvaged(known=carry.depth is not None, lost=carry.depth or 0)
            for outcome, n in salvage_counters(None, carry.counters, got.lost).items():
                self.count(outcome, n)  # into the empty fresh spool, with its next commit
            self._observed_base, self._elapsed_at_load = carry.observed, CLOCK.elapsed_ms()
        else:
            await self._load_state(db)
        # Running forwarders hold these streams and a seq cursor: keep the objects, and
        # keep seqs rising, or new events would hide behind the cursors.
        self._next_seq = max(self._next_seq, next_seq)
        for stream in held:
            now = self._by_id.get(stream.id)
            stream.depth, stream.bytes = (now.depth, now.bytes) if now else (0, 0)
            if now is None:
                self._new_streams.append(stream)
            self._add_stream(stream)
        how_many = (f"{got.lost} could not be read" if got.known else
                    "how many more it held is unknown (its queue table cannot be read)")
        log.error("spool %s is corrupt (%s); moved aside to %s and started afresh: salvaged "
                  "%d queued events, %s (counted as %s: %d); %d damaged stretches skipped",
                  self.path, exc, moved, got.queued, how_many, Drop.DROPPED_CORRUPT, got.lost,
                  got.skipped)
        self.on_reopen()  # forwarders for the salvaged queues

    async def close(self) -> None:
        """Finish pending commits, then close."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        if self._db is not None:  # keep the time this run saw pass
            try:
                await self._db.run(spool_db.mark, self.observed_ms(), self._next_seq)
            except sqlite3.Error as exc:
                log.warning("spool %s: could not save the agent's clock: %s", self.path, exc)
        await self._close_connections()

    async def _close_connections(self) -> None:
        # Detach first: a read racing with this close sees the spool as closed, not as
        # its own failure (see fetch).
        conns, self._reader, self._db = (self._reader, self._db), None, None
        for conn in conns:
            if conn is not None:
                await conn.close()

    async def _reopen(self) -> bool:
        """Open a spool that could not be opened before (the disk may have space again)."""
        unsaved = self._unsaved
        try:
            await self._connect()
        except (sqlite3.DatabaseError, OSError):
            return False
        for outcome, n in unsaved.items():  # counted while closed: keep them
            self.count(outcome, n)
        log.warning("spool %s is open again (%d events queued)", self.path, self.depth)
        self.on_reopen()
        return True

    # -- maintenance -------------------------------------------------------

    async def prune(self) -> int:
        """Drop events older than max_age_days and forget old dedupe keys.

        An event is old only when both its wall-clock age and the time the agent has seen
        pass since it was received exceed max_age_days: a device clock that is wrong, or
        corrected, expires nothing on its own (agent/clock.py).
        """
        if self._db is None:
            return 0
        db = self._db
        max_age = self.cfg.max_age_days * 86_400_000
        async with self._lock:
            exp = spool_commit.Expiry(wall_cutoff=now_ms() - max_age,
                                  forget=now_ms() - self.cfg.dedupe_window_h * 3_600_000,
                                  observed=self.observed_ms(), max_age_ms=max_age,
                                  window_ms=self.cfg.dedupe_window_h * 3_600_000,
                                  next_seq=self._next_seq)
            counters, self._unsaved = self._unsaved, {}
            try:
                out = await db.run(spool_commit.prune, exp, counters)
            except sqlite3.Error as exc:
                self._unsave(counters)
                log.error("spool prune failed: %s", exc)
                return 0
            self._apply(out)
        expired = out.counters.get(Drop.EXPIRED, 0)
        if expired:
            log.warning("dropped %d events older than %d days", expired, self.cfg.max_age_days)
        return expired

    def observed_ms(self) -> int:
        """The time the agent has seen pass, over all its runs on this spool."""
        return self._observed_base + CLOCK.elapsed_ms() - self._elapsed_at_load

    # -- accounting ----------------------------------------------------------

    def count(self, outcome: Outcome, n: int = 1) -> None:
        """Count an outcome seen on the loop; saved with the next commit."""
        record(self.counters, outcome, n)
        record(self._unsaved, outcome, n)

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.streams.values())

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def _require_db(self) -> SqliteThread:
        if self._db is None:
            raise SpoolFull("spool is not open", retry_after=5)
        return self._db
