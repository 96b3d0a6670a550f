"""The spool's write half: one writer task folds every waiting request into one transaction.

Appends, acks and dead letters queue on the loop; the writer task turns whatever
is waiting into one Job (spool/commit.py) and runs it on the writer's thread, so
one fsync covers many apps (group commit). Dedupe is decided here, on the loop,
against the in-memory index, but keys join the index only once their COMMIT
succeeded: a commit that fails (a full disk) must not make the app's retry look
like a resend, or the events would be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import struct
from array import array
from collections import Counter
from collections.abc import Awaitable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.families.errors import Invalid
from agent.families.event import NOT_READ, NUCLEUS, Columns, Event, key_counts, now_ms
from agent.logs import log_limited
from agent.outcomes import Drop, Tally
from agent.settings import StorageConfig
from agent.spool import commit as spool_commit
from agent.spool.books import Books, by_upstream
from agent.spool.codebook import Codebook
from agent.spool.commit import Group, Job, Part
from agent.spool.db import Signal, SqliteThread
from agent.spool.dedupe import DedupeIndex
from agent.spool.leases import Bound, Leases
from agent.spool.live import LiveRecords
from agent.spool.records import RECORD_BYTES, RECORD_EVENTS, pack
from agent.spool.types import Reason, SpoolFull

log = logging.getLogger("outpost.spool")
# How often commits record the agent-observed time (clock_marks): an event expires at
# most this much later than max_age_days says, plus any time the device was off. Between
# two marks, a commit that deletes records moves the latest one (db.advance_mark).
MARK_EVERY_MS = 60_000
# Up to this many bytes of a commit's groups are compressed on the loop, not the writer's
# thread: zstd lets go of the GIL, and getting it back from a busy loop cost the writer
# ~0.2 ms a commit (single-event load: 16 events, ~5 µs of compressing), on the path of
# every reply. Bounded per commit, so a big batch or many keys never hold the loop long.
PACK_ON_LOOP_BYTES = 16 * 1024
# How long the loop waits, the GIL let go, for the writer's thread to take a commit and,
# for a small one (records packed on the loop, no acks or dead letters), to run its statements
# up to the COMMIT, whose fsync then overlaps the loop's work (SqliteThread.hand_over): that
# takes ~0.1 ms; a thread kept from a CPU longer (a busy machine) is not worth more.
HAND_OVER_S = 0.001
MEASURE_EVERY = 32  # commits: the file's size is estimated in between (commit.MEASURE_WITHIN)
# A request of more events than this is summed up as it is appended, a slice at a time
# with the loop let go in between, and its keys join the index after the commit the same
# way: a 4 MiB Nucleus message holds 38,000 events, and the commit's loop-side half of it
# held the loop 50-70 ms in one go, /healthz and every other request waiting
# (bench/RESULTS.md run 26). A slice takes about a millisecond.
SLICE_EVENTS = 2048
# While the spool cannot be opened (a full disk, an I/O error), how often the writer tries
# again with no request to commit: the Retry-After apps are given.
REOPEN_EVERY_S = 5.0


@dataclass(slots=True)
class Usual:
    """A request's events as the commit takes them when they are the usual kind: one key,
    one family, one lane, no key twice. Their keys, bodies, sizes and (Nucleus) ack ids."""

    key: str
    family: int
    lane: int
    # An array, as the groups' keys are (commit.Group): the commit copies a slice of it
    # into its group as bytes, where extending the group's array from a list converted
    # each key again (array_iter_extend, PyArg_Parse each: ~950 instructions a key).
    keys: array[int] = field(default_factory=lambda: array("q"))
    keyset: set[int] = field(default_factory=set)
    bodies: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    ids: list[Any] | None = None

    @classmethod
    def like(cls, first: Event) -> Usual:
        """An empty one for the events of ``first``'s key, family and lane."""
        return cls(first.key, first.family, first.lane, ids=[] if first.family == NUCLEUS else None)

    def add(self, events: Sequence[Event]) -> bool:
        """Take in more of the request's events; False once they are not the usual kind."""
        ids: list[Any] | None
        if type(events) is Columns:   # the fields as they are: no loop per event here
            keys, bodies, ids = events.dedupes, events.bodies, events.ids
            alike = (events.family == self.family and set(events.lanes) == {self.lane}
                     and events.key_set() == {self.key})
        else:
            # Comprehensions, not a generator over the events: fewer instructions an event.
            keys = [ev.dedupe for ev in events]
            alike = ({ev.key for ev in events} == {self.key}
                     and {ev.family for ev in events} == {self.family}
                     and {ev.lane for ev in events} == {self.lane})
            bodies = [ev.body for ev in events] if alike else []
            ids = [ev.ack_id for ev in events] if alike and self.ids is not None else None
            if ids is not None and NOT_READ in ids:
                ids = None
        before = len(self.keyset)
        self.keyset.update(keys)
        if not alike or len(self.keyset) != before + len(keys):
            return False
        if not self.keys:   # the first (for a small request, the only) events: no copy
            self.keys, self.bodies, self.sizes = int64s(keys), bodies, list(map(len, bodies))
        else:
            self.keys += int64s(keys)
            self.bodies += bodies
            self.sizes += map(len, bodies)
        if self.ids is not None:   # None once any event's id was not read at ingest
            if ids is None:
                self.ids = None
            elif self.ids:
                self.ids += ids
            else:
                self.ids = ids
        return True


def int64s(keys: list[int]) -> array[int]:
    """``array("q", keys)``, the keys converted by struct (~380 instructions a key, callgrind)
    rather than each by the array's item setter (PyArg_Parse: ~460 by ``fromlist``)."""
    out = array("q")
    out.frombytes(struct.pack(f"{len(keys)}q", *keys))
    return out


def usual(events: Sequence[Event]) -> Usual | None:
    """``events`` (one or more) taken in at once, or None when they are not the usual kind."""
    found = Usual.like(events[0])
    return found if found.add(events) else None


async def usual_sliced(events: Sequence[Event]) -> Usual | None:
    """``usual`` a slice at a time, the loop let go between slices."""
    found = Usual.like(events[0])
    for start in range(0, len(events), SLICE_EVENTS):
        if start:
            await asyncio.sleep(0)
        if not found.add(events[start:start + SLICE_EVENTS]):
            return None
    return found


@dataclass(slots=True)
class Pending:
    events: Sequence[Event]
    received: int
    done: asyncio.Future[int]
    # A large request's events, taken in as it was appended (None: not the usual kind,
    # or a small request, taken in by the commit).
    usual: Usual | None = None


@dataclass(slots=True)
class Batch:
    appends: list[Pending] = field(default_factory=list)
    acks: list[Sequence[int]] = field(default_factory=list)   # each ack's seqs, as given
    dead: list[tuple[int, str, str]] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)  # records the reader found damaged
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.appends or self.acks or self.dead or self.corrupt)


class Host(Protocol):
    """What the writer needs of the spool that owns the connections."""

    @property
    def db(self) -> SqliteThread | None: ...
    async def recover(self, exc: BaseException) -> None: ...
    async def reopen(self) -> bool: ...
    def observed_ms(self) -> int: ...
    def replaced(self) -> bool: ...
    def lock_kept(self) -> None: ...


class Writer:
    """The group commit: numbers events, dedupes them, commits, then updates the books."""

    def __init__(self, cfg: StorageConfig, books: Books, index: DedupeIndex,
                 live: LiveRecords, host: Host) -> None:
        self.cfg = cfg
        self.max_bytes = cfg.max_bytes
        self.books = books
        self.index = index
        self.live = live
        self.host = host
        self.codebook = Codebook()
        self.lock = asyncio.Lock()  # one commit, prune or recovery at a time
        self.leases = Leases()
        # Done once the commit or expiry now running, which may drop records, has dropped
        # them (None: none runs): see hold_sends.
        self.dropping: asyncio.Future[None] | None = None
        self.commits = 0  # transactions this process ran: shows group commit at work
        # Commits of acks or dead letters that failed in a row (a full disk, say), for
        # the forwarders' backoff: a key's every loop, and every key, sees the same count.
        self.unsaved = 0
        self.closing = False
        self._batch = Batch()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Done once the last request to reach append has joined the batch (or failed);
        # None when none is still being taken in (see append).
        self._taking: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_loop(), name="spool-writer")

    async def close(self) -> None:
        """Finish pending commits."""
        self.closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def append(self, events: Sequence[Event] | Awaitable[Sequence[Event]]) -> Awaitable[int]:
        """Commit ``events`` (await it); returns how many were new (the rest were resends).
        Given as an awaitable (made ready off the loop: intake.py), the request takes its
        place in the commit order at the call, before its events are ready."""
        if ((isinstance(events, list) or type(events) is Columns) and events
                and len(events) <= SLICE_EVENTS
                and self._taking is None and not self.closing):
            # The usual request joins the batch now: its commit's future, no coroutine
            # to make and resume (a single call's path).
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._batch.appends.append(Pending(events, now_ms(), fut))
            self._wake.set()
            return fut
        return self._append(events)

    async def _append(self, events: Sequence[Event] | Awaitable[Sequence[Event]]) -> int:
        loop = asyncio.get_running_loop()
        received = now_ms()
        # FIFO: requests join the batch in the order they reached append, though one may
        # let the loop go before it does (a large one is taken in a slice at a time, one
        # given as an awaitable waits for it); those behind it wait for it.
        ahead, mine = self._taking, None
        if not isinstance(events, Sequence) or len(events) > SLICE_EVENTS or ahead is not None:
            mine = self._taking = loop.create_future()
        try:
            got = events if isinstance(events, Sequence) else await events
            if not got:
                return 0
            if self.closing:
                raise SpoolFull(Reason.SHUTTING_DOWN, retry_after=5)
            taken = await usual_sliced(got) if len(got) > SLICE_EVENTS else None
            if ahead is not None and not ahead.done():
                await asyncio.wait((ahead,))   # not cancelled with this request
            if self.closing:
                raise SpoolFull(Reason.SHUTTING_DOWN, retry_after=5)
            fut: asyncio.Future[int] = loop.create_future()
            self._batch.appends.append(Pending(got, received, fut, taken))
            self._wake.set()
        finally:
            if mine is not None:
                if ahead is None or ahead.done():
                    self._joined(mine)
                else:   # cancelled while waiting: those behind it still wait for the one ahead
                    ahead.add_done_callback(lambda _: self._joined(mine))
        return await fut

    def _joined(self, mine: asyncio.Future[None]) -> None:
        """A request, and every one that reached append before it, has joined the batch."""
        mine.set_result(None)
        if self._taking is mine:
            self._taking = None

    async def ack(self, seqs: Sequence[int]) -> None:
        # A range kept as it is (LiveRecords.settle takes it whole), a tuple too; anything
        # else copied, as the caller's own to change.
        self._batch.acks.append(seqs if isinstance(seqs, (range, tuple)) else list(seqs))
        await self._settled()

    async def dead_letter(self, rows: Sequence[tuple[int, str, str]]) -> None:
        self._batch.dead.extend(rows)
        await self._settled()

    def discard(self, records: Sequence[int]) -> None:
        """Delete damaged records with the next commit (their events: dropped_corrupt)."""
        self._batch.corrupt.extend(records)
        self._wake.set()

    def reopen_soon(self) -> None:
        """The spool was closed and cannot be opened now (a recovery with no room for the
        fresh spool): tried again every REOPEN_EVERY_S from now, not at the next commit."""
        self._wake.set()

    def _settled(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.waiters.append(fut)
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        while True:
            if self.host.db is None:
                # Not only at the next request: a queue whose apps stopped sending must
                # still flow once the spool can be opened.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REOPEN_EVERY_S):
                        await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, Batch()
            try:
                if batch:
                    await self._commit(batch)
                elif self.host.db is None and not self.closing:
                    async with self.lock:   # one opening or recovery at a time
                        if self.host.db is None:
                            await self.host.reopen()
                    if not self._batch:
                        # Its own wake (reopen_soon, a recovery failing again): the next
                        # try is REOPEN_EVERY_S away, not at once, where a try failing
                        # before any file is opened never lets the loop go.
                        self._wake.clear()
            except Exception as exc:  # the writer must outlive any one bad commit
                # A bug that repeats at every commit: its traceback once a minute.
                log_limited(log, logging.ERROR, "commit-crashed", "spool commit failed",
                            exc_info=True)
                # Its apps are answered (503), not left until their own timeout: they send
                # again either way, and the resend meets dedupe if the commit went through.
                _fail(batch.appends, SpoolFull(Reason.CORRUPT))
                _fail_waiters(batch.waiters, SpoolFull(Reason.CORRUPT, message=str(exc)))
            finally:
                if batch.waiters:   # those of a commit that failed were told so above
                    failed = any(f.done() and not f.cancelled() for f in batch.waiters)
                    self.unsaved = self.unsaved + 1 if failed else 0
                # Ack/dead-letter callers are told of a commit that failed (the forwarder
                # backs off, then resends what it could not delete); else it is done.
                for fut in batch.waiters:
                    if not fut.done():
                        fut.set_result(None)
            # Not kept while waiting for the next wake: every request's events would stay
            # in memory until the next commit (whenever the next app posts).
            del batch
            if self.closing and not self._batch:
                return

    async def _commit(self, batch: Batch) -> None:
        try:
            async with self.lock:
                await self._run_batch(batch)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            async with self.lock:
                try:
                    # No fresh spool (a full disk): said by recover; the run refuses the
                    # batch as while the spool cannot be opened.
                    with contextlib.suppress(sqlite3.Error, OSError):
                        await self.host.recover(exc)
                    await self._run_batch(batch)
                except BaseException:
                    _fail(batch.appends, SpoolFull(Reason.CORRUPT, retry_after=5))
                    raise
        finally:
            self.sends_go()

    def hold_sends(self) -> list[Bound]:
        """A commit or expiry that may drop records starts: the leases it must leave. Rows a
        forwarder read before its leases are taken may be among those dropped: it leases
        them and waits for ``dropping`` before it sends them (StreamForwarder._after_read)."""
        if self.dropping is None:
            self.dropping = asyncio.get_running_loop().create_future()
        return self.leases.bounds()

    def sends_go(self) -> None:
        """What the commit dropped is out of ``live``: the forwarders' rows can be told."""
        done, self.dropping = self.dropping, None
        if done is not None:
            done.set_result(None)

    @staticmethod
    def _may_drop(job: Job) -> bool:
        """Whether ``job`` may drop records to make room (when_full = "drop_oldest"): its
        groups' rows may come near the cap (commit.MEASURE_WITHIN), or dead letters it
        writes (unpacked: larger) take room first. Generous: a group's packed bytes are
        taken to be up to twice its bodies', plus its keys."""
        if job.reject_when_full or not job.groups:
            return False
        incoming = sum(spool_commit.row_bytes(2 * g.nbytes + 16 * len(g.bodies) + 64)
                       for g in job.groups)
        return (job.room - incoming < spool_commit.MEASURE_WITHIN
                or any(s.dead for s in job.settle))

    def _job(self, batch: Batch) -> tuple[Job, list[int]]:
        """Dedupe, group and number the events: the loop-side half of a commit. Returns
        the job and how many events of each request are new."""
        books, seen = self.books, self.index.keys
        born = len(books.new_streams)   # streams stream_for makes from here are this job's
        groups: list[Group] = []
        latest: dict[tuple[int, int], Group] = {}   # (stream id, lane) -> its open group
        here: set[int] = set()          # keys new in this commit: a repeat is a resend
        stored: list[int] = []
        parts: list[Part] = []
        for p in batch.appends:
            part = Part(0)
            parts.append(part)
            if len(p.events) == 1:  # a single call: the per-event path is the short one
                stored.append(self._each(p, seen, here, latest, groups, part))
                part.duplicates = 1 - stored[-1]
                continue
            # Taken in whole first: a request is seldom a resend, and the index is then
            # asked once for all its keys rather than once for each.
            taken = p.usual or usual(p.events)
            if taken is not None and not seen.isdisjoint(taken.keyset):
                fresh = (p.events.without(seen) if type(p.events) is Columns
                         else [ev for ev in p.events if ev.dedupe not in seen])
                taken = usual(fresh) if fresh else None
            if taken is None or not here.isdisjoint(taken.keyset):
                stored.append(self._each(p, seen, here, latest, groups, part))
                part.duplicates = len(p.events) - stored[-1]
                continue
            # The usual request: one key, one family, no repeat. No loop per event here.
            here |= taken.keyset
            sid = (books.streams.get(taken.key) or books.stream_for(taken.key)).id
            at = (sid, taken.lane)
            keys, bodies, ids, sizes = taken.keys, taken.bodies, taken.ids, taken.sizes
            start = 0
            while start < len(bodies):
                g = latest.get(at)
                if (g is None or g.family != taken.family or len(g.bodies) >= RECORD_EVENTS
                        or g.nbytes >= RECORD_BYTES):
                    g = latest[at] = _group(sid, taken.family, p.received, taken.lane)
                    groups.append(g)
                take = min(RECORD_EVENTS - len(g.bodies), len(bodies) - start)
                # Bytes: about the cap, going by these events' average size.
                avg = max(1.0, sum(sizes[start:start + take]) / take)
                take = max(1, min(take, int((RECORD_BYTES - g.nbytes) / avg)))
                end = start + take
                part.slices.append((g, len(g.bodies), len(g.bodies) + take))
                g.bodies += bodies[start:end]
                g.keys.extend(keys[start:end])
                if g.ids is not None:
                    g.ids = None if ids is None else g.ids + ids[start:end]
                g.nbytes += sum(sizes[start:end])
                start = end
            stored.append(len(keys))
            part.duplicates = len(p.events) - len(keys)
        seq = books.next_seq
        on_loop = PACK_ON_LOOP_BYTES
        if not self.live:   # nothing queued: the spool holds no dictionary (codebook.py)
            self.codebook.forget()
        learned = self.codebook.current
        for g in groups:  # each record's events are numbered consecutively
            g.id = seq
            seq += len(g.bodies)
            if g.nbytes <= on_loop:
                g.data = pack(g.bodies, g.ids, learned)
                on_loop -= g.nbytes
        books.next_seq = seq
        observed = self.host.observed_ms()
        settle = self.live.settle(batch.acks, batch.dead)
        mark = None
        if ((groups or settle or batch.corrupt)
                and (books.last_mark is None or observed - books.last_mark >= MARK_EVERY_MS)):
            mark = (observed, seq)
        job = Job(groups=groups, parts=parts,
                  new_streams=[(s.id, s.key) for s in books.new_streams],
                  settle=settle, corrupt=batch.corrupt,
                  room=self.max_bytes - books.used_bytes, max_bytes=self.max_bytes,
                  reject_when_full=self.cfg.when_full == "reject",
                  remember=self.cfg.dedupe_window_h > 0, counters=books.take_unsaved(),
                  now=now_ms(), mark=mark, unmarked=books.unmarked if mark else None,
                  tail=(observed, seq),
                  measure=self.commits % MEASURE_EVERY == 0 or bool(settle or batch.corrupt),
                  committing=None if settle or batch.corrupt
                  or any(g.data is None for g in groups) else Signal(),
                  learned=learned,
                  fresh=frozenset(s.id for s in books.new_streams[born:])
                  if len(books.new_streams) > born else frozenset())
        return job, stored

    def _each(self, p: Pending, seen: AbstractSet[int], here: set[int],
              latest: dict[tuple[int, int], Group], groups: list[Group], part: Part) -> int:
        """One request event by event (several keys, families or lanes, or a repeat): returns
        how many of its events are new; ``part`` gets where they went."""
        runs = part.slices
        key, sid, new = "", 0, 0
        run: Group | None = None   # the group this request's events go to now
        start = 0                  # where in it they began
        # Its own new keys: a repeat of one of them leans on no other request.
        own: set[int] | None = set() if len(p.events) > 1 else None
        for ev in p.events:
            k = ev.dedupe
            if k in here:
                if own is None or k not in own:
                    part.leans.add(k)
                continue
            if k in seen:
                continue
            here.add(k)
            if own is not None:
                own.add(k)
            if ev.key != key:
                key = ev.key
                sid = (self.books.streams.get(key) or self.books.stream_for(key)).id
            g = latest.get((sid, ev.lane))
            # A new record at a change of family keeps each (key, lane)'s events in order.
            if (g is None or g.family != ev.family or len(g.bodies) >= RECORD_EVENTS
                    or g.nbytes >= RECORD_BYTES):
                g = latest[sid, ev.lane] = _group(sid, ev.family, p.received, ev.lane)
                groups.append(g)
            if g is not run:
                if run is not None:
                    runs.append((run, start, len(run.bodies)))
                run, start = g, len(g.bodies)
            g.bodies.append(ev.body)
            g.keys.append(k)
            if g.ids is not None:
                if ev.ack_id is NOT_READ:
                    g.ids = None
                else:
                    g.ids.append(ev.ack_id)
            g.nbytes += len(ev.body)
            new += 1
        if run is not None:
            runs.append((run, start, len(run.bodies)))
        return new

    async def _run_batch(self, batch: Batch) -> None:
        books = self.books
        if self.host.db is None and not await self.host.reopen():
            books.count(Drop.REJECTED_STORAGE_ERROR, sum(len(p.events) for p in batch.appends))
            shut = SpoolFull(Reason.NOT_OPEN, 5, "spool cannot be opened")
            _fail(batch.appends, shut)
            _fail_waiters(batch.waiters, shut)
            return
        db = self.host.db
        if db is None:
            raise SpoolFull(Reason.NOT_OPEN, retry_after=5)
        appends = batch.appends
        job, stored = self._job(batch)
        if self._may_drop(job):
            job.leased = self.hold_sends()
        observed = self.host.observed_ms()
        try:
            done = db.run(spool_commit.commit, job)
            db.hand_over(HAND_OVER_S, job.committing)
            out = await done
        except sqlite3.DatabaseError as exc:
            books.unsave(job.counters)
            _unmade(books, job)
            if is_corruption(exc):
                raise   # _commit moves the file aside and runs these again on a fresh spool
            # Not only the disk (OperationalError): a constraint or a trigger in the file
            # refuses every commit alike, and apps get the same 503 as for a full disk.
            reason = "disk full" if "full" in str(exc) else f"storage error: {exc}"
            # Every app retrying against a full disk fails a commit: count each refused
            # event, but log once a minute (a flood of identical lines helps nobody).
            log_limited(log, logging.ERROR, "commit-failed", "spool commit failed: %s", reason)
            books.count(Drop.REJECTED_STORAGE_ERROR, sum(len(p.events) for p in appends))
            _fail(appends, SpoolFull(Reason.DISK_ERROR, self.cfg.full_retry_after_s, reason))
            _fail_waiters(batch.waiters, SpoolFull(Reason.DISK_ERROR, message=reason))
            return
        except BaseException as exc:
            books.unsave(job.counters)
            _unmade(books, job)
            _fail(appends, exc)
            raise
        # Committed into the file open, which an operator may have deleted or replaced
        # since: checked before any app hears it is stored (below).
        gone = self.host.replaced()
        if not gone:
            self.host.lock_kept()
        self.commits += 1
        if job.mark is not None:
            books.last_mark, books.unmarked = job.mark[0], None
        elif job.groups:
            books.unmarked = job.tail
        if job.new_streams:
            books.new_streams = books.new_streams[len(job.new_streams):]
        if out.unused:
            books.forget(out.unused)
        books.apply(out)
        spool_commit.say_recounted(out)
        books.committed_seq = job.tail[1] - 1
        if trimmed := out.counters.get(Tally.DEAD_DROPPED_FULL, 0):
            log_limited(log, logging.WARNING, "dead-dropped-full",
                        "spool at max_size_mb: deleted the %d oldest dead letters to make room",
                        trimmed)
        if dropped := out.counters.get(Drop.DROPPED_FULL, 0):
            log_limited(log, logging.WARNING, "dropped-full",
                        "spool at max_size_mb: deleted the %d oldest queued events to make room "
                        "(when_full = \"drop_oldest\"; counted as %s)%s", dropped, Drop.DROPPED_FULL,
                        by_upstream(books.by_group(out.full)))
        never = sum(len(appends[i].events) for i in out.never)
        if never:
            log_limited(log, logging.WARNING, "never-fits",
                        "spool: refused %d events as too large: %s (counted as %s)", never,
                        self._never_fits(*max(out.never.values())), Drop.REJECTED_FULL)
        if turned := out.counters.get(Drop.REJECTED_FULL, 0) - never:
            whose: Counter[str] = Counter()
            for i in out.refused:
                if i not in out.never:   # said above
                    whose.update(key_counts(appends[i].events))
            log_limited(log, logging.WARNING, "rejected-full",
                        "spool at max_size_mb: refused %d events with each API's retry-later "
                        "status, for their apps to send again later (counted as %s)%s", turned,
                        Drop.REJECTED_FULL, by_upstream(books.keys_by_group(whose)))
        # Damage is found by the reader (job.corrupt) or by settling a record it then reads.
        if (job.corrupt or job.settle) and (lost := out.counters.get(Drop.DROPPED_CORRUPT, 0)):
            log_limited(log, logging.ERROR, "dropped-corrupt",
                        "spool: %d queued events lost with records found damaged (counted as "
                        "%s); the rest of the queue is sent", lost, Drop.DROPPED_CORRUPT)
        self.live.remove(out.deleted)
        self.index.drop(out.undelivered)
        forgotten = self.index.forgotten
        self.index.forgotten_stored(out.forgotten)
        if out.stored:
            await self._admit(job, out, observed)
        books.count(Tally.DEDUPE_FORGOTTEN, self.index.forgotten - forgotten)
        if gone:
            # The copy of the file open that the recovery salvages holds this commit, as
            # the books now do: not run again on it, where its events were counted resends
            # of themselves, and its acks' events acked and lost too.
            try:
                await self.host.recover(Replaced())
            except (sqlite3.Error, OSError):   # said by recover: its events went with the file
                _fail(appends, SpoolFull(Reason.NOT_OPEN, 5, "spool cannot be opened"))
                return
            except BaseException:
                _fail(appends, SpoolFull(Reason.CORRUPT, retry_after=5))
                raise
            if out.stored and any(self.live.observed(g.id) is None for g in
                                  (job.groups if out.groups is None else out.groups)):
                # No copy could be taken (no room): its events went with that file, counted
                # lost with its queue, and are stored in the fresh spool now.
                await self._run_batch(batch)
                return
        refused = set(out.refused) if out.stored else set(range(len(appends)))
        for i, (pending, n) in enumerate(zip(appends, stored)):
            if pending.done.done():
                continue
            if i in out.never:   # no draining makes its room: retried, it would be lost
                pending.done.set_exception(Invalid(self._never_fits(*out.never[i]),
                                                   too_large=True))
            elif i in refused:   # it alone does not fit under max_size_mb
                pending.done.set_exception(SpoolFull(Reason.FULL, self.cfg.full_retry_after_s))
            else:
                pending.done.set_result(n)

    def _never_fits(self, size: int, most: int) -> str:
        return (f"request too large for the spool: about {size / 2**20:.2f} MiB stored, where "
                f"storage.max_size_mb = {self.cfg.max_size_mb} holds {most / 2**20:.2f} MiB "
                "of events at most")

    async def _admit(self, job: Job, out: spool_commit.Outcome, observed: int) -> None:
        """The events ``job`` stored join the dedupe index and the live records."""
        wall = now_ms()
        # committed: from now on a resend is a duplicate (the next commit's _job runs
        # only once this one is done, so letting the loop go meanwhile changes nothing)
        since_yield = 0   # events admitted since the loop was last let go
        for g in job.groups if out.groups is None else out.groups:
            if since_yield >= SLICE_EVENTS:
                since_yield = 0
                await asyncio.sleep(0)
            self.index.remember(g.keys, wall, observed, g.id)
            self.live.add(g.id, len(g.bodies), observed)
            # Samples only of events stored: a refused commit's must not be copied to disk.
            self.codebook.sample(g.bodies, g.nbytes)
            since_yield += len(g.bodies)


def _unmade(books: Books, job: Job) -> None:
    """A failed commit's new keys are not known: a key is known once an event of it is
    stored. Kept, the next commit that succeeded wrote their rows, and each took one of
    listen.max_keys for good (a full disk refusing every new app's requests)."""
    if not job.written:   # rolled back: its stream rows were never written
        books.forget(job.fresh)


def _group(sid: int, family: int, received: int, lane: int) -> Group:
    """A new group; a Nucleus one keeps its events' ack ids while ingest read them all."""
    return Group(0, sid, family, received, [], array("q"), ids=[] if family == NUCLEUS else None,
                 lane=lane)


class Replaced(sqlite3.DatabaseError):
    """The file the spool has open, or its -wal, is no longer at its path (an operator
    deleted it, or put a backup there): a commit into it reaches no file a restart reads.
    Handled as damage: a copy of the file open is salvaged to the path, what is there now
    kept aside."""

    def __init__(self) -> None:
        super().__init__("the spool file or its -wal was deleted, or another put in its "
                         "place, while the agent had it open")


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, Replaced):
        return True
    text = str(exc).lower()
    # The last: a TEXT value that is not UTF-8, which Python's sqlite3 refuses to read
    # (OperationalError). The agent writes only UTF-8: damage put it there. Taken for a
    # disk error, the spool stayed closed at the start, and a dead-letter read failed
    # at every request.
    return ("malformed" in text or "not a database" in text or "corrupt" in text
            or "could not decode to utf-8" in text)


def _fail_waiters(waiters: list[asyncio.Future[None]], exc: SpoolFull) -> None:
    """The acks and dead letters of a commit that failed were not saved: their callers
    raise ``exc``."""
    for fut in waiters:
        if not fut.done():
            fut.set_exception(exc)


def _fail(pendings: list[Pending], exc: BaseException) -> None:
    for p in pendings:
        if not p.done.done():
            p.done.set_exception(exc)
