"""The spool's write half: one writer task folds every waiting request into one transaction.

Appends, acks and dead letters queue on the loop; the writer task turns whatever
is waiting into one Job (spool/commit.py) and runs it on the writer's thread, so
one fsync covers many apps (group commit). Spool (store.py) inherits this.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.families.event import Event, now_ms
from agent.logs import log_limited
from agent.outcomes import Counts, Drop, Outcome, merge
from agent.settings import StorageConfig
from agent.spool import commit as spool_commit
from agent.spool.commit import ROW_OVERHEAD, Job
from agent.spool.db import SqliteThread
from agent.spool.reads import is_corruption
from agent.spool.types import SpoolFull, Stream

log = logging.getLogger("outpost.spool")
# How often commits record the agent-observed time (clock_marks): an event expires at
# most this much later than max_age_days says, plus any time the device was off.
MARK_EVERY_MS = 60_000

@dataclass(slots=True)
class Pending:
    events: list[Event]
    received: int
    done: asyncio.Future[int]


@dataclass(slots=True)
class Batch:
    appends: list[Pending] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    dead: list[tuple[int, str, str]] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.appends or self.acks or self.dead)


class SpoolWrites:
    """The group commit; state and recovery live in Spool (store.py)."""

    # Spool's state and methods, which the commits read and update.
    cfg: StorageConfig
    streams: dict[str, Stream]
    counters: Counts
    dead_count: int
    commits: int
    max_bytes: int
    _by_id: dict[int, Stream]
    _unsaved: Counts
    _new_streams: list[Stream]
    _top_stream_id: int
    _next_seq: int
    _used_bytes: int
    _last_mark: int | None
    _db: SqliteThread | None
    _lock: asyncio.Lock
    _wake: asyncio.Event
    _batch: Batch
    _closing: bool

    if TYPE_CHECKING:
        def _add_stream(self, stream: Stream) -> None: ...
        async def _recover(self, exc: BaseException) -> None: ...
        async def _reopen(self) -> bool: ...
        def _require_db(self) -> SqliteThread: ...
        def count(self, outcome: Outcome, n: int = 1) -> None: ...
        def observed_ms(self) -> int: ...


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
        self._batch.appends.append(Pending(events, now_ms(), fut))
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
            batch, self._batch = self._batch, Batch()
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

    async def _commit(self, batch: Batch) -> None:
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

    def _job(self, batch: Batch) -> Job:
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

    async def _run_batch(self, batch: Batch) -> None:
        if self._db is None and not await self._reopen():
            self.count(Drop.REJECTED_STORAGE_ERROR, sum(len(p.events) for p in batch.appends))
            _fail(batch.appends, SpoolFull("spool cannot be opened", retry_after=5))
            return
        db = self._require_db()
        appends = batch.appends
        job = self._job(batch)
        try:
            out = await db.run(spool_commit.commit, job)
        except sqlite3.OperationalError as exc:
            self._unsave(job.counters)
            reason = "disk full" if "full" in str(exc) else f"storage error: {exc}"
            # Every app retrying against a full disk fails a commit: count each refused
            # event, but log once a minute (a flood of identical lines helps nobody).
            log_limited(log, logging.ERROR, "commit-failed", "spool commit failed: %s", reason)
            self.count(Drop.REJECTED_STORAGE_ERROR, len(job.rows))
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
    def _apply(self, out: spool_commit.Outcome) -> None:
        """Bring the in-memory depths and counters up to what was just committed."""
        for sid, (depth, nbytes) in out.streams.items():
            stream = self._by_id.get(sid)
            if stream is not None:
                stream.depth += depth
                stream.bytes += nbytes
        merge(self.counters, out.counters)
        self.dead_count += out.counters.get(Drop.DEAD_LETTERED, 0)
        self._used_bytes = out.used_bytes

    def _unsave(self, counters: Counts) -> None:
        """A failed commit did not save these counts: keep them for the next one."""
        merge(self._unsaved, counters)

    def _stream_for(self, key: str) -> Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = Stream(self._top_stream_id + 1, key)
            self._add_stream(stream)
            self._new_streams.append(stream)
        return stream


def _fail(pendings: list[Pending], exc: BaseException) -> None:
    for p in pendings:
        if not p.done.done():
            p.done.set_exception(exc)
