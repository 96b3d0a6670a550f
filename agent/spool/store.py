"""The durable queue: SQLite in WAL mode, each connection on its own thread.

Spool composes a writer (group commit, writer.py), a reader (reads.py), the
in-memory dedupe index (dedupe.py), the live records' index (live.py) and its
accounts (books.py); this module holds its lifecycle, recovery and expiry.
Events are packed per commit group into compressed records (records.py); a
record is deleted once an upstream has acknowledged all its events. Leases are
kept in the forwarder's memory, so a crash makes every unacknowledged event
eligible again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.clock import CLOCK, age_s
from agent.families.event import Event, now_ms
from agent.families.lanes import LANES
from agent.outcomes import Counts, Drop, Outcome, Tally, merge, record
from agent.paths import (
    lock_again,
    make_private_dir,
    make_private_file,
    not_a_file,
    spool_file,
)
from agent.settings import StorageConfig
from agent.spool import commit as spool_commit
from agent.spool import db as spool_db
from agent.spool import migrate_dead, wal_check
from agent.spool.aside import (
    SUFFIXES,
    copy_open,
    done,
    forget_wal,
    marker,
    move_aside,
    move_fresh_aside,
    note,
    pending,
    target,
)
from agent.spool.books import Books, by_upstream
from agent.spool.db import BUSY_TIMEOUT_MS, PAST, SqliteThread, whole
from agent.spool.dedupe import DedupeIndex, StoredKeys
from agent.spool.leases import Leases
from agent.spool.live import LiveRecords
from agent.spool.migrate import ensure, refuse_newer
from agent.spool.reads import Reader
from agent.spool.salvage import (
    Carry,
    Salvaged,
    is_fresh,
    keep_counters,
    salvage,
    salvaged,
    unsalvaged,
)
from agent.spool.schema import SpoolUnusable, open_read_only, refuse_special
from agent.spool.types import Queued, Stream
from agent.spool.writer import REOPEN_EVERY_S, Replaced, Writer, is_corruption

log = logging.getLogger("outpost.spool")


def _refuse_newer(moved: Path) -> None:
    """SpoolTooNew when the file a salvage left unfinished was written by a newer agent:
    salvaged as this agent's format it would be misread, and the marker that has the
    newer agent finish it would go. Damage that keeps it from being read is no refusal."""
    try:
        open_read_only(moved).close()
    except sqlite3.Error:
        pass


class InUse(OSError):
    """The spool's lock file is held by another agent, started on the path after the spool
    was removed under this one: the files there are that agent's."""


@dataclass(slots=True)
class _Salvage:
    """A recovery under way: the corrupt file moved aside, and what the fresh spool keeps."""

    moved: Path
    carry: Carry
    held: list[Stream]   # the Stream objects running forwarders hold
    next_seq: int
    why: str
    noted: bool          # whether the marker that has a crash finish it is written
    # Whether the path is still to be cleared for the fresh spool (_set_aside): the
    # -wal and -shm of a file replaced under the agent, and a file put there.
    clear: bool = False
    # Why no copy of a file replaced under the agent could be made (copy_open).
    uncopied: str | None = None
HOUR_MS = 3_600_000
# The -wal's bounds above a 512 MB cap: cut back to this as it starts over
# (journal_size_limit), and checkpointed at this many pages (SQLite's own default).
WAL_LIMIT_BYTES = 64 * 1024 * 1024
WAL_PAGES = 1000


class Spool:
    """The durable queue. Create with ``await Spool.open(cfg)``."""

    def __init__(self, cfg: StorageConfig, path: Path,
                 on_reopen: Callable[[], None] = lambda: None,
                 on_migrating: Callable[[], None] | None = None,
                 holds_lock: bool = False) -> None:
        self.cfg = cfg
        # storage.path as named, and the file it names (a symlink's target), which the
        # spool's files go beside, as SQLite's -wal and -shm do; whether it is a symlink,
        # which alone is followed when pointed elsewhere (_named_file).
        self.named, self.path = path, spool_file(path)
        self.linked = os.path.islink(path)
        self._unfollowed: Path | None = None   # a link's target said not followed, once
        self.books = Books()
        self.index = DedupeIndex(cfg.dedupe_window_h * HOUR_MS, cfg.dedupe_max_keys)
        self.live = LiveRecords()
        self.writer = Writer(cfg, self.books, self.index, self.live, self)
        self.reader_side = Reader(self)
        self._db: SqliteThread | None = None
        self._reader: SqliteThread | None = None
        # Agent-observed time (agent/clock.py): the spool's count, plus what this process
        # has seen pass since it was read.
        self._observed_base = 0
        self._elapsed_at_load = CLOCK.elapsed_ms()
        self._loaded = False  # whether depths and counters were read from the file
        # The records read at the last load are below this seq; those above it the writer
        # stored in this run, but the dead letters retried: their seqs, as flat
        # [first, end) bounds (_lead).
        self._fresh_from = 0
        self._retried: list[int] = []
        self._retried_room = 0   # its length at which those no longer queued are let go
        self._salvaging: _Salvage | None = None
        # Called when a spool that could not be opened is opened at last, when rows are
        # salvaged from a corrupt one, or dead letters retried: their queues need forwarders.
        self.on_reopen = on_reopen
        # Called from the writer's thread while an older spool is migrated (migrate.py), or
        # a corrupt one salvaged (salvage.py): long work that may come before a start.
        self.on_migrating = on_migrating
        # Expiry runs unattended (every few minutes): its failures, for status and metrics.
        self.expiry_errors = 0
        self.expiry_last_error: str | None = None
        # Why the spool cannot be opened (a full disk, an I/O error), while it cannot: for
        # status, since apps get 503 and nothing else shows it.
        self.open_error: str | None = None
        # The open file's (st_dev, st_ino): whether it is still the one at the path; and
        # its -wal's, which the connections hold open until the last one closes.
        self._identity: tuple[int, int] | None = None
        self._wal_identity: tuple[int, int] | None = None
        # Whether this process holds the spool's lock file (`outpost run`); the one taken
        # again when it was removed under the agent (_keep_lock); the identity (st_dev,
        # st_ino) of the one held.
        self.holds_lock = holds_lock
        self._lock_fd: int | None = None
        self._lock_id: tuple[int, int] | None = None
        self._lock_path: str | None = None   # where it was taken: stat at each commit
        # The lock file last found in place of the one held (lock_kept): tried once.
        self._lock_tried: tuple[int, int] | None = _NEVER
        # Why the spool is no longer this agent's (InUse), once another took its path.
        self.ousted: str | None = None
        # The damage last found in the spool's -wal (said once, not at each try to open
        # it), and whether it is counted (wal_damaged) yet.
        self._wal: wal_check.Damage | None = None
        self._wal_counted = True
        # Why the last recovery that could not finish could not (_refusing): said once,
        # not at each try again, until the spool is open again.
        self._said: str | None = None
        # The bound of the max_hold_h release under way as last kept (keep_released): read
        # at the start, for the transmit profile to go on with it (agent/sync/monitor.py).
        self.released = 0

    # -- what the writer and reader use --------------------------------------

    @property
    def db(self) -> SqliteThread | None:
        return self._db

    @property
    def reader(self) -> SqliteThread | None:
        return self._reader

    @property
    def lock(self) -> asyncio.Lock:
        return self.writer.lock

    def discard(self, records: Sequence[int]) -> None:
        self.writer.discard(records)

    @property
    def leases(self) -> Leases:
        """What the forwarders have in flight, which the size cap and expiry leave."""
        return self.writer.leases

    @property
    def dropping(self) -> asyncio.Future[None] | None:
        """Done once the commit or expiry running, which may drop records, has (Writer.hold_sends)."""
        return self.writer.dropping

    # -- the queue -----------------------------------------------------------

    def append(self, events: Sequence[Event] | Awaitable[Sequence[Event]]) -> Awaitable[int]:
        """Commit ``events`` (await it); returns how many were new (the rest were resends).
        An awaitable of them takes its place in the commit order at the call.

        Raises SpoolFull when they do not fit and ``when_full = "reject"``,
        or when the disk itself is full. The writer's own awaitable (for the usual request,
        its commit's future): no frame of this one to create and to resume.
        """
        return self.writer.append(events)

    async def ack(self, seqs: Sequence[int]) -> None:
        """Take acknowledged events out of the queue; returns once that is committed."""
        await self.writer.ack(seqs)

    async def dead_letter(self, rows: Sequence[tuple[int, str, str]]) -> None:
        """Move (seq, upstream, reason) events the upstream refused for good to dead letters."""
        await self.writer.dead_letter(rows)

    async def fetch(self, stream: int, after: int | Sequence[int], limit: int,
                    lanes: Sequence[int] = LANES, max_bytes: int | None = None,
                    until: Sequence[int | None] | None = None) -> Queued:
        """Up to ``limit`` events of one key's queue, lane by lane, high first: each lane's
        with seq > ``after`` (or ``after[lane]``) and, with ``until``, none past
        ``until[lane]``, oldest first, and with ``max_bytes`` up to the event whose bytes
        reach it; a sequence of Rows, read as whole runs of records (types.Queued)."""
        rows = await self.reader_side.fetch(stream, after, limit, lanes, max_bytes, until)
        self._lead(rows)
        return rows

    def _lead(self, rows: Queued) -> None:
        """Set the ``lead`` (types.Run) of each run the writer stored in this run of the
        agent: one lookup a run, none an event. The others keep None: those loaded at the
        start have a clock mark's agent-observed receipt, up to a minute late, and time
        powered off is not in the count; a dead letter retried keeps its first receipt,
        observed at its retry."""
        fresh, retried = self._fresh_from, self._retried
        start = self._elapsed_at_load - self._observed_base   # CLOCK.elapsed_ms at observed 0
        for run in rows.runs:
            if run.first < fresh or (retried and bisect_right(retried, run.first) & 1):
                continue
            observed = self.live.observed(run.first)
            if observed is not None:
                run.lead = run.received - (observed + start)

    def retried(self, first: int, end: int) -> None:
        """Seqs ``first`` .. ``end - 1`` are dead letters put back in the queue (_lead).

        Kept while a record of theirs is queued: gone, they are read no more, and kept
        for good an agent whose letters were retried for months held two numbers a
        retry chunk. Let go in a pass once the list has doubled since the last one (a
        pass at every chunk made a long retry quadratic in its chunks)."""
        if first == end:   # the empty chunk that ends each retry
            return
        if len(self._retried) >= self._retried_room:   # (their records are live by now)
            bounds, live = self._retried, self.live.within
            self._retried = [seq for at in range(0, len(bounds), 2) if live(*bounds[at:at + 2])
                             for seq in bounds[at:at + 2]]
            self._retried_room = 2 * len(self._retried)
        self._retried += (first, end)

    async def oldest_received(self, lanes: Sequence[int] = LANES, stream: int | None = None,
                              after: int = 0) -> int | None:
        return await self.reader_side.oldest_received(lanes, stream, after)

    async def first_age_s(self) -> float | None:
        """How long the event queued first has waited, in seconds (None: none is queued):
        by the time the agent saw pass, which a wall clock corrected since (from 1970, say)
        does not make decades; by the wall clock for one queued before the agent counted."""
        first = await self.reader_side.first_queued()
        if first is None:
            return None
        waited = self.observed_age_ms(first[0])
        return age_s(first[1]) if waited is None else waited / 1000

    async def oldest_seq(self, lanes: Sequence[int] = LANES, stream: int | None = None,
                         after: int = 0) -> int | None:
        return await self.reader_side.oldest_seq(lanes, stream, after)

    def dropped_since(self, rows: Queued) -> bool:
        """Whether a record ``rows`` were read from is gone from the queue since (the size
        cap or expiry dropped it, or damage): its events are counted dropped, and must
        not go out. Whole records go, so one seq of each run tells."""
        return any(self.live.observed(run.first) is None for run in rows.runs)

    def dropped(self, seqs: Sequence[int]) -> set[int]:
        """Those of ``seqs``, read from the queue and not yet settled, whose record is gone
        from it since (``dropped_since``): counted dropped, they must not go out."""
        return self.live.missing(seqs)

    def observed_age_ms(self, seq: int) -> int | None:
        """How long ago, in agent-observed time, the live event ``seq`` was received (at
        most a minute short); None if unknown (queued before the agent counted it)."""
        received = self.live.observed(seq)
        if received is None or received <= PAST:
            return None
        return max(0, self.observed_ms() - received)

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return await self.reader_side.dead_letters(limit)

    async def keep_released(self, seq: int) -> None:
        """Keep ``seq`` as the last seq of the max_hold_h release under way (0: none), for
        the next start: killed or stopped meanwhile, it released afresh, up to what was
        queued then, and sent the young events after the release too. Not kept (a full
        disk, the spool not open), that start does so: logged, not raised."""
        async with self.lock:
            if (db := self._db) is None:
                return
            try:
                await whole(db.run(spool_db.keep_released, seq))
            except sqlite3.Error as exc:
                log.warning("spool %s: could not keep the bound of the max_hold_h release "
                            "under way (a restart would release afresh): %s", self.path, exc)
                return
        self.released = seq

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(cls, cfg: StorageConfig, on_reopen: Callable[[], None] = lambda: None,
                   on_migrating: Callable[[], None] | None = None,
                   holds_lock: bool = False) -> Spool:
        spool = cls(cfg, cfg.resolved_path(), on_reopen, on_migrating, holds_lock)
        make_private_dir(spool.path.parent)
        recovering = False   # a recovery that fails says why itself
        try:
            if (found := pending(spool.path)) is not None:
                moved, clear = found
                # A newer agent's (SpoolTooNew): its files are left for it to finish.
                _refuse_newer(moved)
                # The last run stopped inside a salvage: the spool at the path is its fresh
                # one, with nothing committed but that salvage, if it got that far; or,
                # ``clear``, the path still holds what the copy's file left or a file put
                # there, cleared first as that run would have.
                spool._salvaging = _Salvage(
                    moved, spool._carry(), [], 1,
                    "found by the last run, stopped before its salvage was done", True, clear)
                if clear:
                    recovering = True   # a path that still cannot be cleared: said there
                    spool._set_aside(spool._salvaging)
            try:
                await spool._connect()
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    raise
                recovering = True
                await spool.recover(exc)
            else:
                if spool._salvaging is not None:
                    recovering = True
                    await spool._finish_recovery()
        except (sqlite3.DatabaseError, OSError) as exc:
            # Not corrupt (a full disk, an I/O error): keep the file, refuse
            # events with 503 and try again (writer.REOPEN_EVERY_S), rather than exit into a crash loop.
            if not recovering:   # else said by the recovery
                log.error("spool %s cannot be opened (%s); refusing events until it can",
                          spool.path, exc)
        spool.writer.start()
        return spool

    async def _connect(self) -> None:
        try:
            await self._open_files()
        except (sqlite3.Error, OSError, SpoolUnusable) as exc:
            self.open_error = str(exc) or type(exc).__name__
            raise
        self.open_error = None

    async def _open_files(self) -> None:
        if self.ousted is not None:
            # Not taken back once the other stops: this one's forwarders hold its keys'
            # stream ids, which in that agent's spool name other keys' queues.
            raise InUse(self.ousted)
        # Its directory too: an operator may have removed it under the running agent.
        make_private_dir(self.path.parent)
        if not self.linked and os.path.islink(self.path):
            # Put at a path named directly while the spool was not open (SQLite, the create
            # and the chmod below would follow it, out of the spool's directory): refused,
            # as a directory put there is. A recovery keeps one aside (_set_aside).
            raise SpoolUnusable(f"spool {self.path} is a symbolic link (to "
                                f"{os.readlink(self.path)}) put there while the agent ran: "
                                "not followed; remove it, or restart the agent to take it "
                                "for storage.path")
        if self.holds_lock:
            self._keep_lock()
        if not self.path.exists():
            # Create it private before SQLite does; -wal/-shm inherit the mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        refuse_special(self.path)   # before the chmod: /dev/null's mode is every user's
        if sys.platform != "win32":
            os.chmod(self.path, 0o600)
            for suffix in SUFFIXES[1:]:
                # SQLite makes them with the spool's mode, but keeps the mode of one
                # left holding data (a crash).
                make_private_file(Path(f"{self.path}{suffix}"))
        sync = "FULL" if self.cfg.sync == "full" else "NORMAL"
        # What a killed agent's -shm says was committed, before a connection rebuilds it.
        shm = wal_check.committed(self.path) if sync == "FULL" else None
        # A log beside an empty file, which SQLite deletes unread: kept, said and counted.
        if (gone := wal_check.emptied(self.path, self._wal)) is not None:
            shm = None   # (its loss said so, not as a log cut short)
            if gone != self._wal:
                self._wal, self._wal_counted = gone, False
        # Read-only first: a newer agent's file is refused before a connection that could
        # write to it exists (closing one checkpoints a WAL the newer agent left behind).
        open_read_only(self.path).close()
        # The -wal beside the file is disk too: SQLite checkpoints it into the file once it
        # holds wal_autocheckpoint pages (by default 1000, 4 MiB: four times a 1 MB cap),
        # and cuts it to journal_size_limit as it starts over. Both at most an eighth of
        # max_size_mb (and the defaults above it): a -wal past it by a commit at most.
        wal_limit = min(WAL_LIMIT_BYTES, self.cfg.max_size_mb * 1024 * 1024 // 8)
        self._db = SqliteThread("spool-writer")
        try:
            # auto_vacuum before WAL: both must precede the first table of a new file.
            pragmas = ("PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode=WAL; "
                       f"PRAGMA synchronous={sync}; PRAGMA busy_timeout={BUSY_TIMEOUT_MS}; "
                       f"PRAGMA journal_size_limit={wal_limit}; "
                       f"PRAGMA wal_autocheckpoint={max(1, min(WAL_PAGES, wal_limit // spool_commit.PAGE))};")

            def prepare(conn: sqlite3.Connection) -> None:
                refuse_newer(conn)
                # Before any write, which would reuse the frames SQLite ignored.
                found = wal_check.look(conn, self.path, self._wal, shm) \
                    if sync == "FULL" else None
                if found is not None and found != self._wal:
                    self._wal, self._wal_counted = found, False
                conn.executescript(pragmas)
                ensure(conn, self.on_migrating)
                if not self._loaded:
                    self._forget_idle(conn)
                if not self._wal_counted:   # also when the log is gone since it was said
                    keep_counters(conn, {Tally.WAL_DAMAGED: 1})
                    self._wal_counted = True

            await self._db.open(self.path, "", prepare)
            found = os.stat(self.path)
            self._identity = (found.st_dev, found.st_ino)
            self._wal_identity = _identity(self._wal_path)
            await self._load_state(self._db)
            # Published only once open: a status read in between would take a reader
            # with no connection for a failure of its own (a 500).
            reader = SqliteThread("spool-reader")
            try:
                await reader.open(self.path, f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS};")
            except BaseException:
                await reader.close()
                raise
            self._reader = reader
        except BaseException:
            await self._close_connections()
            raise

    def _keep_lock(self) -> None:
        """The lock file taken again if it went with the spool (rm -rf of the state
        directory), whether made again or found there: the lock held on the removed one
        keeps no second agent out."""
        lock = self._lock_file()
        self._lock_path = str(lock)
        if self._lock_id is None:   # the first open: the one there is `outpost run`'s
            with contextlib.suppress(OSError):
                found = os.stat(lock)
                self._lock_id = (found.st_dev, found.st_ino)
        try:
            taken = lock_again(lock, self._lock_id)
        except BlockingIOError:
            # Found at a stop (close), the other simply goes on: a restart is no fix then.
            then = ("this one is stopping and leaves the spool to that agent; its own queue "
                    "is sent by neither" if self.writer.closing else "this one refuses "
                    "events; stop the other and restart this one, or stop this one")
            raise InUse(f"spool {self.path} is in use by another agent, started on it after "
                        f"it was removed under this one: {then}") from None
        except OSError as exc:
            log.error("spool %s: its lock file was removed under the agent, and cannot be "
                      "taken again (%s): another agent may run on this spool; stop it",
                      self.path, exc)
            return
        if taken is not None:
            if self._lock_fd is not None:   # removed a second time
                os.close(self._lock_fd)
            self._lock_fd, self._lock_id = taken

    def lock_kept(self) -> None:
        """The lock file taken again if it alone was removed (or another put there) under
        the agent: the lock held on the removed file keeps no second agent out, and the
        spool, still at the path, is never found replaced to take it again. One another
        agent holds (started on the spool before this found it gone) is said, once for
        each file found there, as is one that cannot be made (_keep_lock)."""
        if not self.holds_lock or self._lock_id is None or self._lock_path is None:
            return
        found = _identity(self._lock_path)
        if found in (self._lock_id, _UNKNOWN, self._lock_tried):
            return
        self._lock_tried = found
        try:
            self._keep_lock()
        except InUse:
            log.error("spool %s: its lock file was removed under the agent, and another "
                      "agent, started on the same spool since, holds the one there now: "
                      "two agents forward one queue; stop one of them", self.path)

    @property
    def _wal_path(self) -> str:
        return f"{self.path}-wal"

    def _lock_file(self) -> Path:
        """paths.spool_lock of the spool's file, as `outpost run` took it, but not through
        a symlink put at a path named directly: its lock was made beside the link's target."""
        return Path(os.path.realpath(self.path.parent)) / f"{self.path.name}.lock"

    def _named_file(self) -> Path:
        """The file storage.path names now, for the spool's files to go beside. A symlink
        is followed only where storage.path was one at the start (a spool moved to a bigger
        disk and linked back, pointed at a copy on another), and only to a regular file or
        to none yet. Followed whatever it was, a recovery renamed the link's target aside
        and made a fresh spool in its place, outside the spool's directory (/dev/null
        itself, run as root). A link put at a path named directly is what is there, kept
        aside itself as any file put there is (_set_aside); one pointed at a fifo, a device
        or a directory, which a start refuses, is said once, and the file the link named
        before is kept on."""
        if not self.linked:
            return self.named
        now = spool_file(self.named)
        try:
            kind = not_a_file(os.stat(now).st_mode)
        except OSError:   # nothing there yet: made there, as at a start
            kind = None
        if kind is None:
            self._unfollowed = None
            return now
        if self._unfollowed != now:
            self._unfollowed = now
            log.error("spool %s: storage.path %s, a symbolic link, now names %s, %s, not a "
                      "spool file: not followed; the agent keeps its queue in %s, the file "
                      "it named before (a start refuses it so: point it at a file)",
                      self.path, self.named, now, kind, self.path)
        return self.path

    def replaced(self) -> bool:
        """Whether the file open is no longer the one at the path (deleted, or another put
        there), or its -wal is not (removed: the connections go on writing into the one
        open, which the next start never reads): its commits would be gone at the next
        start. A stat that fails for another reason tells nothing: the commit's own errors
        say what is wrong."""
        if self._identity is None:
            return False
        # Through a symlink: pointed elsewhere, replaced; put at a path named directly,
        # what is there is not the file open.
        found = _identity(self._named_file())
        if found != self._identity:
            return found != _UNKNOWN
        if self._wal_identity is None:   # none when the spool was opened: nothing to hold
            return False
        wal = _identity(self._wal_path)
        return wal not in (self._wal_identity, _UNKNOWN)

    def _forget_idle(self, conn: sqlite3.Connection) -> None:
        try:
            idle = spool_db.forget_idle_streams(conn)
        except sqlite3.OperationalError as exc:   # a full disk: at a later start
            log.warning("spool %s: could not forget the keys with nothing queued: %s",
                        self.path, exc)
            return
        if idle:
            log.info("spool %s: forgot %d keys with nothing queued", self.path, idle)

    async def _mend_dead_summary(self, db: SqliteThread, letters: int) -> None:
        try:
            mended = await db.run(_mended, letters)
        except sqlite3.OperationalError as exc:   # a full disk: at a later open
            log.warning("spool %s: could not check the dead letters' summary: %s",
                        self.path, exc)
            return
        if mended:
            log.warning("spool %s: the dead letters' summary (their count by reason) "
                        "disagreed with the letters (damage): counted again from them",
                        self.path)

    async def _lower_cap(self, db: SqliteThread, keys: StoredKeys) -> int:
        try:
            return await db.run(spool_db.lower_cap, keys, self.index.max_keys,
                                now_ms() - self.index.window_ms)
        except sqlite3.OperationalError as exc:   # a full disk: counted at a later start
            log.warning("spool %s: could not count the dedupe keys a lowered "
                        "dedupe_max_keys forgets: %s", self.path, exc)
            return 0

    async def _load_state(self, db: SqliteThread) -> None:
        state = await db.run(spool_db.load_state, self.observed_ms(), self.index.max_keys)
        await self._mend_dead_summary(db, state.dead)
        record(state.counters, Tally.DEDUPE_FORGOTTEN, await self._lower_cap(db, state.keys))
        if state.observed is None:
            await db.run(spool_db.start_clock, state.next_seq)
        self._observed_base, self._elapsed_at_load = state.observed or 0, CLOCK.elapsed_ms()
        self._fresh_from, self._retried, self._retried_room = state.next_seq, [], 0
        self.books.reset(state.streams, state.counters, state.next_seq, state.dead,
                         state.used_bytes, state.high)
        self.live.load(*state.live)
        self.writer.codebook.resume(state.learned)
        self.released = state.released
        self.index = self.writer.index = DedupeIndex(self.index.window_ms, self.index.max_keys)
        # Keys past the cap are not counted as forgotten here: the run that stored them
        # counted them when its index let them go (dedupe_forgotten), at every restart;
        # only those a lowered cap lets go now (spool_db.lower_cap).
        self.index.load_all(state.keys)
        self._loaded = True

    async def recover(self, exc: BaseException) -> None:
        """Never a crash loop: move a corrupt spool aside, start afresh, and salvage into
        the fresh spool every row that can still be read (agent/spool/salvage.py). A file
        deleted or replaced under the agent (writer.Replaced) is salvaged from a copy of
        the one still open.
        Called under the writer's lock (or before the writer starts): nothing commits to
        the fresh spool before the salvage, which a crash leaves for the next start to
        finish (agent/spool/aside.py)."""
        if (pending := self._salvaging) is not None:
            # The fresh spool of a salvage not finished (a marker found at start), itself
            # damaged: it holds that salvage at most, done again from the file the marker
            # names. Salvaged in turn instead, with the marker rewritten to name it, that
            # file's queue was never salvaged, nor said lost.
            await self._close_connections()
            fresh = target(self.path)
            try:
                move_fresh_aside(self.path, fresh)
            except OSError as failed:
                self._unmovable(f"the fresh spool of the salvage of {pending.moved}, damaged",
                                exc, fresh, failed)
                raise
            log.error("spool %s, the fresh spool of the salvage of %s, is damaged (%s): "
                      "moved aside to %s; that salvage starts again", self.path,
                      pending.moved, exc, fresh)
            await self._open_fresh(exc, fresh)
            return
        books = self.books
        carry = self._carry()
        no_dir: OSError | None = None   # the directory gone with the file, not ours to make
        if isinstance(exc, Replaced):
            self.path = self._named_file()   # where a symlink points now
            try:
                make_private_dir(self.path.parent)
            except OSError as refused:   # another user's, or read-only: no copy, nothing to move
                no_dir = refused
        in_use: InUse | None = None
        if isinstance(exc, Replaced) and no_dir is None and self.holds_lock:
            try:
                self._keep_lock()   # before anything at the path is touched
            except InUse as taken:
                in_use = taken
        moved = target(self.path)
        # Deleted or replaced under the agent: its queue is salvaged from a copy of the
        # file still open; what is at the path now (a backup put back) is kept aside.
        uncopied: str | None = "none taken"   # why no copy was made (logged)
        if isinstance(exc, Replaced) and no_dir is None and self._db is not None:
            uncopied = await self._db.run(copy_open, moved)
        copied = uncopied is None
        # Noted before the file open is let go: a stop while the path cannot be cleared
        # (_set_aside) leaves the copy to the next start. Not another agent's path's.
        noted = copied and in_use is None and note(self.path, moved, clear=True) is None
        await self._close_connections()
        if no_dir is not None:
            # Its queue is counted lost (dropped_corrupt) once a spool can be created.
            self._salvaging = _Salvage(moved, carry, list(books.streams.values()),
                                       books.next_seq, str(exc), False)
            log.error("spool %s was removed with its directory while the agent had it open, "
                      "and the directory cannot be made again (%s): the queue it held is lost "
                      "(counted as %s once a spool can be created); events are refused until "
                      "then, tried again every %g s: make it, writable by the agent's user",
                      self.path, no_dir, Drop.DROPPED_CORRUPT, REOPEN_EVERY_S)
            self.open_error = str(no_dir)
            self.writer.reopen_soon()
            raise no_dir
        if in_use is not None:
            # The files at the path are the other agent's, open: moved aside or its -wal
            # removed, it did the same to this one's at its next commit, two writers taking
            # turns. This one's queue is kept in the copy, a whole spool: no start salvages
            # it (no marker names it, and the spool at the path holds the other's queue).
            log.error("%s (its queue is %s)", in_use,
                      f"kept in {moved}; to send it, run an agent with storage.path = "
                      f"{moved} and a listen.port of its own" if copied
                      else f"lost: no copy could be made ({uncopied})")
            self.open_error = self.ousted = str(in_use)
            raise in_use
        # Kept until the fresh spool is open: if it cannot be created now (a full disk),
        # reopen() finishes the salvage, rather than start an empty spool that would hand
        # out stream ids and seqs the running forwarders still hold.
        pending = _Salvage(moved, carry, list(books.streams.values()), books.next_seq,
                           str(exc), noted, isinstance(exc, Replaced),
                           uncopied if isinstance(exc, Replaced) else None)
        self._set_aside(pending)
        await self._open_fresh(exc, moved)

    def _set_aside(self, pending: _Salvage) -> None:
        """Clear the path for the fresh spool: the damaged file moved aside to
        ``pending.moved``, its marker written first; for a file replaced under the agent,
        its -wal and -shm removed and a file put there kept aside. A failure is said once
        (_refusing), and reopen() tries again: the queue of a replaced file is held by
        ``pending`` alone then (its copy, or its count of what is lost with it), where the
        path holds no damage a later open would find."""
        moved = pending.moved
        copied = moved.exists()   # copy_open's copy of a file replaced under the agent
        if pending.clear:
            self._salvaging = pending
            try:
                forget_wal(self.path)
                # A symbolic link there too (dangling or not): kept aside itself, not followed.
                if copied and os.path.lexists(self.path):
                    put = target(self.path)
                    what = f"symbolic link to {os.readlink(self.path)} (not followed)" \
                        if os.path.islink(self.path) else "file"
                    # Its own file, its -wal removed: what it holds is older than the copy.
                    own = not os.path.islink(self.path) and _identity(self.path) == self._identity
                    move_aside(self.path, put)
                    if own:
                        log.error("spool %s: its -wal was removed while the agent had it open "
                                  "(the events since its last checkpoint were in it): the file "
                                  "without it is kept as %s; the agent's queue goes on",
                                  self.path, put)
                    else:
                        log.error("spool %s: the %s put there while the agent had its own open "
                                  "is kept as %s; the agent's queue goes on", self.path, what,
                                  put)
            except OSError as failed:
                if self._refusing(failed):
                    log.error("spool %s was deleted or replaced while the agent had it open "
                              "(its queue %s), but the path cannot be cleared for a fresh "
                              "spool (%s): events are refused until it can, tried again "
                              "every %g s", self.path, f"copied to {moved}" if copied else
                              f"lost with it: no copy could be made ({pending.uncopied})",
                              failed, REOPEN_EVERY_S)
                raise
        why = note(self.path, moved)   # tried again once the fresh spool is open
        if not copied:
            try:
                move_aside(self.path, moved)
            except OSError as failed:   # what failed the marker, likely: said once, here
                self._unmovable("corrupt", pending.why, moved, failed)
                raise
        if why is not None and os.path.lexists(moved):   # else it names nothing to salvage
            log.error("spool %s: cannot write %s's salvage marker (%s)", self.path, moved, why)
        pending.noted, pending.clear = why is None, False
        self._salvaging = pending

    async def _open_fresh(self, exc: BaseException, moved: Path) -> None:
        """Open the fresh spool of a recovery that moved ``moved`` aside, and salvage."""
        try:
            await self._connect()
        except (sqlite3.Error, OSError) as failed:
            # Said here, once: its callers (a commit, a forwarder's read, a start) refuse
            # or read nothing while the spool is not open, and the writer tries again.
            # Nothing moved (a file deleted, no copy made of it): its loss, not a file.
            pending = self._salvaging
            kept = os.path.lexists(moved)
            log.error("spool %s is corrupt (%s); %s, but no fresh spool can be created (%s): "
                      "events are refused until one can, tried again every %g s, and %s",
                      self.path, exc, f"moved aside to {moved}" if kept else
                      "no copy of it could be made"
                      f" ({pending.uncopied if pending else None}), its queue not kept", failed,
                      REOPEN_EVERY_S,
                      "the salvage done then" if kept else "its loss counted then")
            self.writer.reopen_soon()   # no commit may come (apps idle)
            raise
        await self._finish_recovery()

    def _unmovable(self, what: str, exc: object, moved: Path, failed: OSError) -> None:
        """The damaged file cannot be moved aside (a directory the agent may no longer
        write to): its callers say nothing of a recovery's failures, and each try again
        meets the same."""
        if self._refusing(failed):
            log.error("spool %s is %s (%s), but cannot be moved aside to %s (%s): events are "
                      "refused until it can, tried again every %g s", self.path, what, exc,
                      moved, failed, REOPEN_EVERY_S)

    def _refusing(self, why: BaseException) -> bool:
        """A recovery that cannot finish now: open_error says why and the writer tries
        again every REOPEN_EVERY_S. Whether to say so: once per new reason, as a spool that
        cannot be opened is (reopen), since each try failing alike would flood the log."""
        self.open_error = str(why) or type(why).__name__
        self.writer.reopen_soon()
        # Not the file names: a move's target is named anew, by the time, at each try.
        reason = why.strerror if isinstance(why, OSError) and why.strerror else self.open_error
        said, self._said = self._said, reason
        return said != reason

    def _carry(self) -> Carry:
        books = self.books
        return Carry(streams={s.id: s.key for s in books.streams.values()},
                     counters=dict(books.counters), observed=self.observed_ms(),
                     next_seq=books.next_seq, depth=self.depth if self._loaded else None,
                     dead=books.dead_count if self._loaded else None)

    async def _finish_recovery(self) -> None:
        """Salvage the file moved aside into the fresh spool just opened. Failing (an SQLite
        error, the disk failing under it), the fresh spool is closed again with the salvage
        kept, as when it could not be created: said once, events refused, and done at the
        next reopen. Left open, its commits came before the salvage, under books read
        before it (seqs the salvaged records hold), and the salvage was never done."""
        pending, self._salvaging = self._salvaging, None
        assert pending is not None
        try:
            await self._salvage(pending)
        except (sqlite3.Error, OSError) as exc:
            if self._salvaging is None:   # else said where it was kept (_put_aside)
                self._salvaging = pending
                await self._close_connections()
                if self._refusing(exc):
                    log.error("spool %s: the salvage of %s into the fresh spool failed (%s): "
                              "events are refused until it is done, tried again every %g s",
                              self.path, pending.moved, self.open_error, REOPEN_EVERY_S)
            raise
        self._said = None

    async def _salvage(self, pending: _Salvage) -> None:
        assert self._db is not None
        carry, moved = pending.carry, pending.moved
        if not pending.noted:  # the disk had no room for it then (its error is logged)
            pending.noted = note(self.path, moved) is None
        if await self._db.run(salvaged):
            # The last run stopped after the salvage's commit, or this one failed after it.
            if self._done(moved):   # else said there, the marker still in place
                log.warning("spool %s: the salvage of %s had been committed before it was "
                            "marked done; finished now", self.path, moved)
            self._keep_held(pending)
            self.on_reopen()
            return
        if not await self._db.run(is_fresh):   # not the spool that salvage made
            if pending.held:   # this run's own recovery, its forwarders running
                await self._put_aside(pending)
                return
            done(self.path)   # found at a start: not that salvage's marker
            log.warning("spool %s: ignored %s, which names %s for a salvage: the spool "
                        "holds its own data, so it is not that salvage's", self.path,
                        marker(self.path), moved)
            return
        try:
            got = await self._db.run(salvage, moved, carry, self.on_migrating)
        except sqlite3.Error as failed:  # e.g. no room for the copy: the fresh spool stays empty
            got, counters = await self._db.run(unsalvaged, moved, carry)
            for outcome, n in counters.items():
                self.count(outcome, n)  # into the empty fresh spool
            self._observed_base, self._elapsed_at_load = carry.observed, CLOCK.elapsed_ms()
            # Said before the marker goes: a try again after that finds it committed only.
            self._say_salvaged(pending, got, failed)
            if await self._save_counts():  # else a crash before the next commit retries it
                self._done(moved)
        else:
            self._say_salvaged(pending, got, None)
            self._done(moved)
            await self._load_state(self._db)
        self._keep_held(pending)
        self.on_reopen()  # forwarders for the salvaged queues

    def _done(self, moved: Path) -> bool:
        """Forget the marker of a salvage committed; whether it is gone. One that cannot be
        removed is said, and the spool opens all the same: its queue is safe in the fresh
        spool, and a start that finds the marker finds that salvage committed (salvaged),
        not to be done twice. Kept closed for it, the agent refused every event for a file
        it no longer needs."""
        try:
            done(self.path)
        except OSError as exc:
            log.error("spool %s: the salvage of %s is committed, but its marker %s cannot be "
                      "removed (%s); the spool opens, and each start says this until it is "
                      "removed", self.path, moved, marker(self.path), exc)
            return False
        return True

    def _say_salvaged(self, pending: _Salvage, got: Salvaged, failed: sqlite3.Error | None
                      ) -> None:
        """What the salvage (``failed``: of which the copy failed) kept and lost."""
        moved = pending.moved
        unknown = "how many %s held is unknown (its %s cannot be read)"
        if failed is not None:
            queued = (f"its {got.lost} queued events" if got.known else
                      "its queued events; " + unknown % ("events it", "queue table"))
            dead = (f"{got.dead_lost} dead letters" if got.dead_known else
                    "its dead letters; " + unknown % ("dead letters it", "count of them"))
            log.error("spool %s is corrupt (%s); moved aside to %s and started afresh, but "
                      "could not salvage it (%s): kept in %s with %s and %s (counted as %s: "
                      "%d, %s: %d)", self.path, pending.why, moved, failed, moved, queued, dead,
                      Drop.DROPPED_CORRUPT, got.lost, Tally.DEAD_DROPPED_CORRUPT, got.dead_lost)
        else:
            how_many = (f"{got.lost} could not be read" if got.known else
                        unknown % ("more it", "queue table"))
            log.error("spool %s is corrupt (%s); moved aside to %s and started afresh: "
                      "salvaged %d queued events, %s (counted as %s: %d); %d damaged "
                      "stretches skipped", self.path, pending.why, moved, got.queued,
                      how_many, Drop.DROPPED_CORRUPT, got.lost, got.skipped)
            if got.retimed:
                log.warning("spool %s: the receipt time of %d salvaged queued events was "
                            "garbled in %s: they are kept as received at the salvage (their "
                            "receivedAt, and their age for max_age_days, count from it)",
                            self.path, got.retimed, moved)
            if got.unkeyed:
                log.warning("spool %s: the dedupe keys of %d salvaged queued events were "
                            "garbled in %s: they are kept without them (a resend of one is "
                            "stored again)", self.path, got.unkeyed, moved)
            if got.dead_lost or not got.dead_known:
                # Dead letters wait for an operator: those lost are said, as events are.
                how_many = (f"{got.dead_lost} dead letters could not be read" if got.dead_known
                            else unknown % ("more dead letters it", "count of them"))
                unkeyed = (f" ({got.dead_unkeyed} of them read, but the keys they were sent "
                           "under are lost with its table of keys)" if got.dead_unkeyed else "")
                log.error("spool %s: salvaged %d dead letters of %s, %s%s (counted as %s: "
                          "%d)", self.path, got.dead, moved, how_many, unkeyed,
                          Tally.DEAD_DROPPED_CORRUPT, got.dead_lost)

    def _keep_held(self, pending: _Salvage) -> None:
        """Running forwarders hold these streams and a seq cursor: keep the objects, and
        keep seqs rising, or new events would hide behind the cursors."""
        books = self.books
        books.next_seq = max(books.next_seq, pending.next_seq)
        for stream in pending.held:
            now = books.by_id.get(stream.id)
            stream.depth, stream.bytes, stream.high = \
                (now.depth, now.bytes, now.high) if now else (0, 0, 0)
            if now is None:
                books.new_streams.append(stream)
            books.add_stream(stream)

    async def _put_aside(self, pending: _Salvage) -> None:
        """This run's own recovery found a spool holding data at the path, put there while
        none could be created (a backup restored): kept aside, as one put there while the
        spool was open is, and the recovery finished into a fresh spool. Taken for the
        spool (its marker ignored, as at a start), the moved file's queue was neither
        salvaged nor counted lost, and the running forwarders' stream ids named other keys'
        queues in it: their acks deleted those keys' events."""
        self._salvaging = pending   # finished by a later reopen() if this one fails
        await self._close_connections()
        put = target(self.path)
        try:
            move_aside(self.path, put)
            await self._connect()
        except (sqlite3.Error, OSError) as failed:   # a move that failed too
            if self._refusing(failed):
                log.error("spool %s: cannot keep aside the file put there while the agent "
                          "could not create a fresh spool, nor create one (%s): events are "
                          "refused until it can, tried again every %g s", self.path, failed,
                          REOPEN_EVERY_S)
            raise
        log.error("spool %s: the file put there while no fresh spool could be created is "
                  "kept as %s; the recovery of %s goes on", self.path, put, pending.moved)
        await self._finish_recovery()

    async def _save_counts(self) -> bool:
        """Save the counts not yet saved, now rather than with the next commit."""
        assert self._db is not None
        counts = self.books.take_unsaved()
        try:
            await self._db.run(keep_counters, counts)
        except sqlite3.Error as exc:
            self.books.unsave(counts)
            log.error("spool %s: could not save its counters: %s", self.path, exc)
            return False
        return True

    async def close(self) -> None:
        """Finish pending commits, then close."""
        await self.writer.close()
        if self._db is not None and self.replaced():
            # No commit found it since (apps idle): closed unnoticed, the queue went with
            # the file no path names, and a file put there was read with its -wal.
            async with self.lock:
                try:
                    await self.recover(Replaced())
                except InUse:
                    pass   # another agent's files: recover said where its queue went
                except (sqlite3.Error, OSError) as exc:
                    log.error("spool %s: could not keep the queue of the file deleted or "
                              "replaced under the agent: %s", self.path, exc)
        if self._db is not None:  # keep the time this run saw pass
            if self.books.unsaved:   # counted after the last commit (keys forgotten by it)
                await self._save_counts()
            try:
                await self._db.run(spool_db.mark, self.observed_ms(), self.books.next_seq,
                                   self.books.unmarked)
            except sqlite3.Error as exc:
                log.warning("spool %s: could not save the agent's clock: %s", self.path, exc)
        await self._close_connections()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _close_connections(self) -> None:
        # Detach first: a read racing with this close sees the spool as closed, not as
        # its own failure (see fetch).
        conns, self._reader, self._db = (self._reader, self._db), None, None
        for conn in conns:
            if conn is not None:
                await conn.close()

    async def reopen(self) -> bool:
        """Open a spool that could not be opened before (the disk may have space again).
        A file found damaged now is moved aside and salvaged, as at start: given up on as
        a full disk is, it refused every event at every commit, for good."""
        books = self.books
        unsaved, counters = books.unsaved, books.counters
        recovered, before = False, self.open_error
        # Where a symlinked storage.path points now: pointed at a disk with room (as a
        # commit finds it pointed elsewhere, recover), the file it named before was tried
        # again for good.
        self.path = self._named_file()
        try:
            if (pending := self._salvaging) is not None and pending.clear:
                recovered = True   # a path that still cannot be cleared: said there
                self._set_aside(pending)
                recovered = False
            try:
                await self._connect()
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    raise
                if not self._loaded:
                    # Only what was counted while closed (unsaved, counted again below),
                    # which the salvage would take for the file's own counts.
                    books.counters = {}
                recovered = True   # before: a recovery that fails logs why itself
                await self.recover(exc)   # opens the fresh spool, or raises as _connect does
            if self._salvaging is not None:  # a recovery that could not open the fresh spool
                recovered = True
                # Reloads the books: count what follows after. Fails as recover() does
                # when it meets a file put at the path it cannot keep aside (_put_aside).
                await self._finish_recovery()
        # SpoolUnusable: a directory (or a newer agent's file) put at the path while it was
        # closed. Not opened, as at start, but no exit: refused with 503 as a full disk is.
        except (sqlite3.DatabaseError, OSError, SpoolUnusable):
            books.counters, books.unsaved = counters, unsaved   # as before the try
            if not recovered and self.open_error != before:
                # Once per new reason (a full disk, then a read-only file system): the
                # same one at every try would flood the log, and none left it unsaid.
                log.error("spool %s still cannot be opened, now: %s; refusing events until "
                          "it can", self.path, self.open_error)
            return False
        self._said = None
        for outcome, n in unsaved.items():  # counted while closed: keep them
            self.count(outcome, n)
        if recovered:   # salvaged, and the forwarders told (on_reopen)
            return True
        log.warning("spool %s is open again (%d events queued)", self.path, self.depth)
        self.on_reopen()
        return True

    # -- maintenance -------------------------------------------------------

    async def prune(self) -> int:
        """Drop events older than max_age_days and forget dedupe keys past the window.

        An event is old only when both its wall-clock age and the time the agent has seen
        pass since it was received exceed max_age_days: a device clock that is wrong, or
        corrected, expires nothing on its own (agent/clock.py). A receipt time the wall
        clock reads as still to come (it was ahead then, or is set back now) says nothing
        of an age: the time the agent saw pass alone judges it, as for dedupe keys.

        A damaged file is moved aside and salvaged (``recover``), as a commit's is, and
        expiry runs on the fresh spool: damage that only expiry reads (dead letters, spent
        keys) failed every run for good, and nothing past max_age_days was dropped.

        Nothing watches it run: a failure (a disk error, a recovery that fails, a bug) is
        logged, counted and kept for status (``expiry_errors``, ``expiry_last_error``), and
        the next run tries again; it never ends the agent's expiry unseen.
        """
        try:
            return await self._prune()
        except Exception as exc:  # noqa: BLE001 - reported here: see the docstring
            self.expiry_errors += 1
            if isinstance(exc, sqlite3.Error):
                self.expiry_last_error = str(exc)
                log.error("expiry failed: %s", exc)
            else:
                self.expiry_last_error = f"{type(exc).__name__}: {exc}"
                log.exception("expiry failed")
            return 0

    async def _prune(self) -> int:
        max_age = self.cfg.max_age_days * 86_400_000
        window = self.cfg.dedupe_window_h * HOUR_MS
        done: Counts = {}
        # By upstream (None: keys no upstream takes), the expired and those over the cap.
        expired_by: dict[str | None, int] = {}
        full_by: dict[str | None, int] = {}
        more, recovered, trimming = True, False, False
        while more:   # a chunk at a time (commit.EXPIRE_RECORDS): commits go in between
            async with self.lock:
                if (db := self._db) is None:   # closed (or not open)
                    break
                try:
                    # Whole: a chunk the thread took commits its counts even when a stop
                    # cancels this, and the stop would save them a second time.
                    out = await whole(self._expire(db, max_age, window, trimming))
                except sqlite3.DatabaseError as exc:
                    if recovered or not is_corruption(exc):
                        raise
                    await self.recover(exc)   # and on with the fresh spool
                    recovered, trimming = True, False
                    continue
                finally:
                    self.writer.sends_go()   # after live.remove: what went must not be sent
            merge(done, out.counters)
            # By the routes the books hold now.
            for into, counts in ((expired_by, out.expired), (full_by, out.full)):
                for up, n in self.books.by_group(counts).items():
                    into[up] = into.get(up, 0) + n
            more, trimming = out.more, out.trimming
        if expired := done.get(Drop.EXPIRED, 0):
            # Those no upstream took could not go: said, as the start or reload that left
            # them so said (agent/service.py), not taken for an upstream's backlog.
            log.warning("dropped %d events older than %d days%s", expired, self.cfg.max_age_days,
                        by_upstream(expired_by))
        if dead := done.get(Tally.DEAD_EXPIRED, 0):
            log.warning("deleted %d dead letters kept longer than %d days", dead,
                        self.cfg.max_age_days)
        # A spool over a lowered max_size_mb (commit._trim): said once for the whole run.
        if dead := done.get(Tally.DEAD_DROPPED_FULL, 0):
            log.warning("spool over max_size_mb: deleted the %d oldest dead letters", dead)
        if dropped := done.get(Drop.DROPPED_FULL, 0):
            log.warning("spool over max_size_mb: deleted the %d oldest queued events "
                        "(when_full = \"drop_oldest\"; counted as %s)%s", dropped,
                        Drop.DROPPED_FULL, by_upstream(full_by))
        return expired

    async def recount(self, stream: Stream) -> None:
        """Count ``stream``'s queue again from its records: its forwarder, reading from the
        start of its lanes, found none of the events its count says are queued (damage
        garbled the count: commit.recount)."""
        async with self.lock:
            if (db := self._db) is None:   # closed, or a recovery under way
                return
            try:
                out = await whole(db.run(spool_commit.recount_queue, stream.id))
            except sqlite3.Error as exc:   # the next commit that empties it counts it again
                log.warning("spool: could not count a queue again: %s", exc)
                return
            self.books.apply(out)
        spool_commit.say_recounted(out)

    async def _expire(self, db: SqliteThread, max_age: int, window: int, trimming: bool
                      ) -> spool_commit.Outcome:
        """One chunk of expiry (commit.prune), its outcome applied on the loop;
        ``trimming``: the chunk before took part of an excess over the cap
        (commit.Expiry.trimming)."""
        observed = self.observed_ms()
        exp = spool_commit.Expiry(wall_cutoff=now_ms() - max_age, forget=now_ms() - window,
                                  observed=observed, max_age_ms=max_age, window_ms=window,
                                  unmarked=(unmarked := self.books.unmarked),
                                  next_seq=self.books.next_seq, leased=self.writer.hold_sends(),
                                  max_bytes=self.writer.max_bytes,
                                  drop_oldest=self.cfg.when_full == "drop_oldest",
                                  remember=window > 0, trimming=trimming)
        counters = self.books.take_unsaved()
        try:
            out = await db.run(spool_commit.prune, exp, counters)
        except BaseException:
            self.books.unsave(counters)   # saved by the next commit instead
            raise
        if self.books.unmarked == unmarked:   # not a commit's since
            self.books.unmarked = None
        self.books.apply(out)
        spool_commit.say_recounted(out)
        self.live.remove(out.deleted)
        if not self.live:   # the dictionary went with the last record (codebook.py)
            self.writer.codebook.forget()
        self.index.drop(out.undelivered)
        forgotten = self.index.forgotten
        self.index.forgotten_stored(out.forgotten)
        self.books.count(Tally.DEDUPE_FORGOTTEN, self.index.forgotten - forgotten)
        self.index.expire(now_ms(), observed)
        return out

    def observed_ms(self) -> int:
        """The time the agent has seen pass, over all its runs on this spool."""
        return self._observed_base + CLOCK.elapsed_ms() - self._elapsed_at_load

    # -- accounting ----------------------------------------------------------

    def count(self, outcome: Outcome, n: int = 1) -> None:
        """Count an outcome seen on the loop; saved with the next commit."""
        self.books.count(outcome, n)

    @property
    def streams(self) -> dict[str, Stream]:
        return self.books.streams

    @property
    def counters(self) -> Counts:
        return self.books.counters

    @property
    def dead_count(self) -> int:
        return self.books.dead_count

    @property
    def commits(self) -> int:
        return self.writer.commits

    @property
    def unsaved(self) -> int:
        """Commits of acks or dead letters that failed in a row (Writer.unsaved)."""
        return self.writer.unsaved

    @property
    def max_bytes(self) -> int:
        return self.writer.max_bytes

    @property
    def depth(self) -> int:
        return self.books.depth

    @property
    def last_seq(self) -> int:
        """The seq of the last event received (committed, or being committed)."""
        return self.books.next_seq - 1

    @property
    def committed_seq(self) -> int:
        """The seq of the last event committed: queued, or settled since."""
        return self.books.committed_seq

    @property
    def used_bytes(self) -> int:
        return self.books.used_bytes


# What a stat that failed for another reason than "no such file" tells: nothing.
_UNKNOWN = (-1, -1)
_NEVER = (-2, -2)


def _identity(path: str | Path) -> tuple[int, int] | None:
    """The (st_dev, st_ino) of the file at ``path``; None if there is none; _UNKNOWN if the
    stat failed otherwise."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return _UNKNOWN
    return (found.st_dev, found.st_ino)


def _mended(conn: sqlite3.Connection, letters: int) -> bool:
    """migrate_dead.mend in a transaction of its own (``letters``: load_state's count)."""
    with spool_db.transaction(conn):
        return migrate_dead.mend(conn, letters)
