"""The durable queue: SQLite in WAL mode, each connection on its own thread.

Ingest appends go through one writer task that folds every request waiting
at that moment into a single transaction (group commit), so one fsync covers
many apps; the whole transaction is one call on the writer's thread (see
spool/db.py). Forwarders read from a second connection, which WAL lets run
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.clock import CLOCK
from agent.families.event import Event, now_ms
from agent.logs import log_limited
from agent.paths import ensure_private_dir
from agent.settings import StorageConfig
from agent.spool import db as spool_db
from agent.spool.db import ROW_OVERHEAD, Job, Outcome, SqliteThread
from agent.spool.reads import SpoolReads, is_corruption
from agent.spool.salvage import Carry, Salvaged, salvage, salvage_counters
from agent.spool.schema import SCHEMA, move_aside
from agent.spool.types import SpoolFull, Stream

log = logging.getLogger("outpost.spool")
# How often commits record the agent-observed time (clock_marks): an event expires at
# most this much later than max_age_days says, plus any time the device was off.
MARK_EVERY_MS = 60_000


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


class Spool(SpoolReads):
    """The durable queue. Create with ``await Spool.open(cfg)``."""

    def __init__(self, cfg: StorageConfig, path: Path,
                 on_reopen: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.path = path
        self.max_bytes = cfg.max_size_mb * 1024 * 1024
        self.streams: dict[str, Stream] = {}
        self.counters: dict[str, int] = {}
        self._unsaved: dict[str, int] = {}  # counted on the loop, saved with the next commit
        self._by_id: dict[int, Stream] = {}
        self._top_stream_id = 0  # a new key's id; max(_by_id) made each new key O(keys)
        self._db: SqliteThread | None = None
        self._reader: SqliteThread | None = None
        self._next_seq = 1
        self._used_bytes = 0
        self._batch = _Batch()
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
        next_seq, streams, counters, used, observed = await db.run(spool_db.load_state)
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
            for name, n in salvage_counters(None, carry.counters, got.lost).items():
                self.count(name, n)  # into the empty fresh spool, with its next commit
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
                  "%d queued events, %s (counted as dropped_corrupt: %d); %d damaged "
                  "stretches skipped", self.path, exc, moved, got.queued, how_many, got.lost,
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
            # Not kept while waiting for the next wake: every request's events would stay
            # in memory until the next commit (whenever the next app posts).
            del batch
            if self._closing and not self._batch:
                return

    async def _commit(self, batch: _Batch) -> None:
        try:
            async with self._lock:
                await self._run_batch(batch)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            async with self._lock:
                try:
                    await self._recover(exc)
                    await self._run_batch(batch)
                except BaseException:
                    _fail(batch.appends, SpoolFull("spool storage is failing", retry_after=5))
                    raise

    def _job(self, batch: _Batch) -> Job:
        """Number the events and name their streams: the loop-side half of a commit."""
        rows: list[tuple[int, int, int, int, int, bytes]] = []
        totals: dict[int, list[int]] = {}
        seq = self._next_seq
        incoming = 0
        streams = self.streams
        for p in batch.appends:
            received = p.received
            key, sid, total = "", 0, [0, 0]
            for ev in p.events:
                if ev.key != key:  # requests are nearly always one key: look it up once
                    key = ev.key
                    sid = (streams.get(key) or self._stream_for(key)).id
                    total = totals.setdefault(sid, [0, 0])
                nbytes = len(ev.body)
                rows.append((seq, sid, ev.family, received, ev.dedupe, ev.body))
                seq += 1
                total[0] += 1
                total[1] += nbytes
                incoming += nbytes
        self._next_seq = seq
        counters, self._unsaved = self._unsaved, {}
        observed = self.observed_ms()
        mark = None
        if rows and (self._last_mark is None or observed - self._last_mark >= MARK_EVERY_MS):
            mark = (observed, seq)
        return Job(rows=rows, sizes=[len(p.events) for p in batch.appends], totals=totals,
                   new_streams=[(s.id, s.key) for s in self._new_streams],
                   acks=batch.acks, dead=batch.dead,
                   room=self.max_bytes - self._used_bytes,
                   incoming=incoming + ROW_OVERHEAD * len(rows),
                   reject_when_full=self.cfg.when_full == "reject",
                   remember=self.cfg.dedupe_window_h > 0, counters=counters, now=now_ms(),
                   mark=mark)

    async def _run_batch(self, batch: _Batch) -> None:
        if self._db is None and not await self._reopen():
            self.count("rejected_storage_error", sum(len(p.events) for p in batch.appends))
            _fail(batch.appends, SpoolFull("spool cannot be opened", retry_after=5))
            return
        db = self._require_db()
        appends = batch.appends
        job = self._job(batch)
        try:
            out = await db.run(spool_db.commit, job)
        except sqlite3.OperationalError as exc:
            self._unsave(job.counters)
            reason = "disk full" if "full" in str(exc) else f"storage error: {exc}"
            # Every app retrying against a full disk fails a commit: count each refused
            # event, but log once a minute (a flood of identical lines helps nobody).
            log_limited(log, logging.ERROR, "commit-failed", "spool commit failed: %s", reason)
            self.count("rejected_storage_error", len(job.rows))
            _fail(appends, SpoolFull(reason))
            return
        except BaseException as exc:
            self._unsave(job.counters)
            if not (isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc)):
                _fail(appends, exc)  # corruption: _commit runs them again on a fresh spool
            raise
        self.commits += 1
        if job.mark is not None:
            self._last_mark = job.mark[0]
        if job.new_streams:
            self._new_streams = self._new_streams[len(job.new_streams):]
        self._apply(out)
        if out.stored is None:
            _fail(appends, SpoolFull("spool is full (storage.max_size_mb)"))
            return
        for pending, n in zip(appends, out.stored):
            if not pending.done.done():
                pending.done.set_result(n)

    async def _reopen(self) -> bool:
        """Open a spool that could not be opened before (the disk may have space again)."""
        unsaved = self._unsaved
        try:
            await self._connect()
        except (sqlite3.DatabaseError, OSError):
            return False
        for name, n in unsaved.items():  # counted while closed: keep them
            self.count(name, n)
        log.warning("spool %s is open again (%d events queued)", self.path, self.depth)
        self.on_reopen()
        return True

    def _apply(self, out: Outcome) -> None:
        """Bring the in-memory depths and counters up to what was just committed."""
        for sid, (depth, nbytes) in out.streams.items():
            stream = self._by_id.get(sid)
            if stream is not None:
                stream.depth += depth
                stream.bytes += nbytes
        counters = self.counters
        for name, n in out.counters.items():
            counters[name] = counters.get(name, 0) + n
        self._used_bytes = out.used_bytes

    def _unsave(self, counters: dict[str, int]) -> None:
        """A failed commit did not save these counts: keep them for the next one."""
        for name, n in counters.items():
            self._unsaved[name] = self._unsaved.get(name, 0) + n

    def _stream_for(self, key: str) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = Stream(self._top_stream_id + 1, key)
            self._add_stream(stream)
            self._new_streams.append(stream)
        return stream

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
            exp = spool_db.Expiry(wall_cutoff=now_ms() - max_age,
                                  forget=now_ms() - self.cfg.dedupe_window_h * 3_600_000,
                                  observed=self.observed_ms(), max_age_ms=max_age,
                                  window_ms=self.cfg.dedupe_window_h * 3_600_000,
                                  next_seq=self._next_seq)
            counters, self._unsaved = self._unsaved, {}
            try:
                out = await db.run(spool_db.prune, exp, counters)
            except sqlite3.Error as exc:
                self._unsave(counters)
                log.error("spool prune failed: %s", exc)
                return 0
            self._apply(out)
        expired = out.counters.get("expired", 0)
        if expired:
            log.warning("dropped %d events older than %d days", expired, self.cfg.max_age_days)
        return expired

    def observed_ms(self) -> int:
        """The time the agent has seen pass, over all its runs on this spool."""
        return self._observed_base + CLOCK.elapsed_ms() - self._elapsed_at_load

    # -- accounting ----------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
        self._unsaved[name] = self._unsaved.get(name, 0) + n

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


def _fail(pendings: list[_Pending], exc: BaseException) -> None:
    for p in pendings:
        if not p.done.done():
            p.done.set_exception(exc)
