"""Bring a spool written by an older agent up to this one's schema; refuse a newer one.

``upgrade`` runs first at open, on the writer's connection. By ``PRAGMA user_version``:

- newer than this code: ``SpoolTooNew``, before anything is written (the file stays
  byte-identical: an older agent must never damage what a newer one wrote);
- 0 with the v0 tables (one row per event, acked rows kept as tombstones): migrated
  to v1's layout (with v2's lanes, migrate_lanes.classify, and v3's dead-letter summary,
  which its triggers fill as the letters are copied) in one transaction, so a failure
  part-way (a full disk, a crash) leaves the v0 file as it was, and the next start tries
  again;
- 1 (before priority lanes): a lane per record and dead letter, and the (stream, lane,
  id) index (migrate_lanes.py), then as 2, in one transaction;
- 2 (before the kept dead-letter summary): its tables and triggers, filled from the dead
  letters (migrate_dead.py), then as 3, in one transaction;
- 3 (before the built-in dictionary): as 4; its records are read as they are;
- 4 (before learned dictionaries): their table (codebook.DICTS), empty, then as 5;
- 5 (before the summary kept the dead letters' agent-observed times): those times
  (migrate_dead.to_v6), counted from the letters; a spool from v2 or before gets the
  whole summary at once (to_v3);
- anything else: nothing to do (an empty file gets v6 from the spool's open).

Every spool of the current version then gets ``schema.LANE_INDEX`` if it lacks it (one
written before it, or by an older agent's salvage).

v0 -> v1, nothing lost:

- Queued events (``acked IS NULL``) become records, per stream in seq order, one record
  per run of events with the same family and receipt time (a v0 group commit), at most
  ``RECORD_EVENTS`` events and, as the writer packs them, about ``RECORD_BYTES`` (a record
  past it ends at the event that reaches it): what one read unpacks stays bounded. Their seqs are renumbered above every old one (dead letters
  keep theirs), contiguous within a record, FIFO per stream kept.
- Tombstones (acked, kept for dedupe) become ``spent`` rows: received = the acked time
  (as v0 dated them), observed = the clock mark covering them, so they still dedupe for
  the rest of their window and are forgotten after it, by both clocks.
- Clock marks are *rewritten*, not carried: a mark (observed, next_seq) says every event
  below next_seq was received by ``observed``. Renumbering would break that, so records
  never straddle two marks' intervals, and each mark's next_seq becomes the first new seq
  after its interval: expiry by agent-observed time stays exactly what it was. Events
  past the last mark (an agent killed between marks) join its interval, since that mark
  is where agent-observed time resumes: their age counts from then, never early.
  (Mapping every record to the latest mark instead would be simpler, but would keep a
  week-old backlog a week longer than ``max_age_days`` says.)
- ``streams`` (depth and bytes recomputed from the records), ``dead``, ``counters``.

Then ``VACUUM``, outside the transaction, so that the file takes v1's
``auto_vacuum = INCREMENTAL`` (it can only be changed by rebuilding the file); a start
that finds a spool of this version without it (the VACUUM killed, or refused for room)
does it again.

A migration takes about 8.6 s per million v0 events: ``alive`` is called when it
starts and then every ``ALIVE_EVERY_S`` while SQLite works on it (a progress
handler, so the long statements and the VACUUM count too), from the writer's
thread, so that the service can ask systemd for more start time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.spool import migrate_dead, migrate_lanes, records
from agent.spool.codebook import DICTS
from agent.spool.db import PAST, main_file, transaction, typed
from agent.spool.dedupe import keys_to_bytes
from agent.spool.records import RECORD_BYTES, RECORD_EVENTS
from agent.spool.schema import (
    DEAD_OBSERVED,
    LANE_INDEX,
    SCHEMA,
    VERSION,
    SpoolTooNew,
    blank,
    has_observed,
)

log = logging.getLogger("outpost.spool")

SPENT_MAX = 65_536    # dedupe keys per spent row: 512 KiB blobs at most
V0_TABLES = ("streams", "events", "dead", "counters", "clock_marks")
V0_COLS = "seq, stream, family, received, dkey, body, acked"
DEAD_COLS = "seq, stream, family, received, dkey, body, upstream, reason, at"
ALIVE_EVERY_S = 5.0
# SQLite VM instructions between two looks at the clock (about a millisecond's work).
_PROGRESS_STEPS = 100_000


def refuse_newer(conn: sqlite3.Connection) -> None:
    """SpoolTooNew for a spool a newer agent wrote: called before anything, even a pragma,
    writes to the file (journal_mode=WAL would rewrite its header)."""
    found = _user_version(conn)
    if found > VERSION:
        raise SpoolTooNew(main_file(conn), found, VERSION)


def ensure(conn: sqlite3.Connection, alive: Callable[[], None] | None = None) -> None:
    """Create the current schema in an empty file, or bring an older spool up to it."""
    refuse_newer(conn)
    found = _user_version(conn)
    if found != VERSION:
        if blank(conn):
            # One transaction: a first start cut short (its disk full, a crash) leaves the
            # file empty, for the next to create whole. Table by table, it kept those made,
            # and no later start could open the file.
            with transaction(conn):
                for statement in _ddl_statements(SCHEMA):
                    conn.execute(statement)
            return
        upgrade(conn, alive)
    if found and not int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]):
        # Only a migrated v0 spool is without it: its migration committed, and the VACUUM
        # after it was cut short (a kill, no room), by this code or an older one (migrated
        # on since). Left so, a drained spool never shrank. (A v0 one found now was
        # compacted, or tried, as it migrated.)
        with beating(alive, conn):
            _compact(conn)
    if _user_version(conn) == VERSION and not _has_table(conn, "records_by_lane", "index"):
        with beating(alive, conn):
            conn.execute(LANE_INDEX)
    if not has_observed(conn):
        conn.execute(DEAD_OBSERVED)


def upgrade(conn: sqlite3.Connection, alive: Callable[[], None] | None = None) -> None:
    """Migrate an older spool to ``VERSION`` in place; SpoolTooNew for a newer one.
    ``conn`` is in autocommit mode (isolation_level=None) and has no statement open;
    ``alive`` is called while the migration runs (see the module docstring)."""
    refuse_newer(conn)
    found = _user_version(conn)
    if found == 0 and _has_table(conn, "events"):
        step = _upgrade_v0
    elif found in (1, 2, 3, 4, 5):
        step = functools.partial(_upgrade_from, found)
    else:
        return
    with beating(alive, conn):
        step(conn)


@contextlib.contextmanager
def beating(alive: Callable[[], None] | None, *conns: sqlite3.Connection) -> Iterator[None]:
    """Call ``alive`` now and every ``ALIVE_EVERY_S`` while SQLite works on ``conns``
    (a progress handler on each), for long work at start: a migration, a salvage."""
    if alive is None:
        yield
        return
    alive()
    last = time.monotonic()

    def progress() -> int:
        nonlocal last
        if time.monotonic() - last >= ALIVE_EVERY_S:
            last = time.monotonic()
            alive()
        return 0  # carry on

    for conn in conns:
        conn.set_progress_handler(progress, _PROGRESS_STEPS)
    try:
        yield
    finally:
        for conn in conns:
            conn.set_progress_handler(None, 0)


def _upgrade_v0(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        # Checked again under the write lock: another process may have migrated it.
        if _user_version(conn) != 0 or not _has_table(conn, "events"):
            return
        packed = _migrate_v0(conn)
    log.warning("spool migrated to format v%d: %d queued events in %d records, "
                "%d dedupe keys of delivered events kept", VERSION, packed.events,
                packed.records, packed.spent)
    _compact(conn)


def _compact(conn: sqlite3.Connection) -> None:
    """VACUUM a migrated v0 spool, for it to take auto_vacuum = INCREMENTAL: outside the
    migration's transaction, so a start cut short in it (``ensure``) does it again."""
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.OperationalError as exc:  # e.g. no room for the copy VACUUM makes
        log.warning("spool migrated, but not compacted (%s): space freed by deliveries "
                    "is reused, not handed back to the disk, until a start compacts it", exc)


def _upgrade_from(found: int, conn: sqlite3.Connection) -> None:
    """v1 to v5 to ``VERSION``, each step after the other, in one transaction."""
    with transaction(conn):
        if _user_version(conn) != found:  # checked again under the write lock, as for v0
            return
        high = migrate_lanes.to_v2(conn) if found == 1 else None
        # The summary counts the letters' agent-observed times (an agent before it was
        # kept wrote no such column; added after the lane, as a new spool has them).
        if not has_observed(conn):
            conn.execute(DEAD_OBSERVED)
        groups = migrate_dead.to_v3(conn) if found <= 2 else None
        if found <= 4:
            for statement in DICTS:
                conn.execute(statement)
        if found >= 3:
            migrate_dead.to_v6(conn)
        conn.execute(f"PRAGMA user_version = {VERSION}")
    if high is not None:
        log.warning("spool migrated to format v2 (priority lanes): %d queued records and "
                    "dead letters put in the high lane", high)
    if groups is not None:
        log.warning("spool migrated to format v3 (dead letters summarised as they come and "
                    "go): %d (reason, upstream) groups", groups)
    if found <= 4:
        log.warning("spool migrated to format v5 (small records packed with a dictionary "
                    "learned from the device's events)")
    log.warning("spool migrated to format v%d (the dead letters' ages by the time the agent "
                "saw pass)", VERSION)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _has_table(conn: sqlite3.Connection, name: str, kind: str = "table") -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = ? AND name = ?",
                        (kind, name)).fetchone() is not None


def _ddl_statements(script: str) -> Iterator[str]:
    """``script``'s statements one by one: ``executescript`` would COMMIT the migration's
    transaction first."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending


@dataclass(slots=True)
class Packed:
    """What ``pack_v0`` wrote: queued events, their records, dedupe keys kept."""

    events: int = 0
    records: int = 0
    spent: int = 0


@dataclass(slots=True)
class _Run:
    """Consecutive queued events of one stream, with one family and receipt time."""

    family: int
    received: int
    keys: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    nbytes: int = 0


class _Renumber:
    """Packs queued events into records under new seqs, starting at ``next_seq``."""

    def __init__(self, conn: sqlite3.Connection, next_seq: int, packed: Packed) -> None:
        self.conn = conn
        self.next_seq = next_seq
        self.packed = packed
        self.runs: dict[int, _Run] = {}  # stream -> its open run

    def add(self, stream: int, family: int, received: int, key: int, body: bytes) -> None:
        run = self.runs.get(stream)
        if run is not None and (run.family != family or run.received != received
                                or len(run.keys) >= RECORD_EVENTS or run.nbytes >= RECORD_BYTES):
            self._write(stream, run)
            run = None
        if run is None:
            run = self.runs[stream] = _Run(family, received)
        run.keys.append(key)
        run.bodies.append(body)
        run.nbytes += len(body)

    def flush(self) -> int:
        """Write every open run; returns the next free seq (every event below it is written)."""
        for stream, run in self.runs.items():
            self._write(stream, run)
        self.runs.clear()
        return self.next_seq

    def _write(self, stream: int, run: _Run) -> None:
        n = len(run.keys)
        self.conn.execute(
            "INSERT INTO records(id, stream, family, n, received, live, gone, bytes, dkeys, "
            "data) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
            (self.next_seq, stream, run.family, n, run.received, n,
             sum(map(len, run.bodies)), keys_to_bytes(run.keys), records.pack(run.bodies)))
        self.next_seq += n
        self.packed.events += n
        self.packed.records += 1


def _migrate_v0(conn: sqlite3.Connection) -> Packed:
    for table in V0_TABLES:
        conn.execute(f"ALTER TABLE {table} RENAME TO v0_{table}")
    for statement in _ddl_statements(SCHEMA):
        conn.execute(statement)
    conn.execute("INSERT INTO streams(id, key) SELECT id, key FROM v0_streams")
    conn.execute(f"INSERT INTO dead({DEAD_COLS}) SELECT {DEAD_COLS} FROM v0_dead")
    conn.execute("INSERT INTO counters(name, value) SELECT name, value FROM v0_counters")
    top = conn.execute("SELECT max(coalesce((SELECT max(seq) FROM v0_events), 0), "
                       "coalesce((SELECT max(seq) FROM v0_dead), 0))").fetchone()[0]
    packed = pack_v0(conn, _typed_v0(conn.execute(f"SELECT {V0_COLS} FROM v0_events ORDER BY seq")),
                     conn.execute("SELECT observed, next_seq FROM v0_clock_marks").fetchall(),
                     top + 1)
    recount_streams(conn)
    for table in V0_TABLES:
        conn.execute(f"DROP TABLE v0_{table}")
    migrate_lanes.classify(conn)
    conn.execute(f"PRAGMA user_version = {VERSION}")
    return packed


V0Row = tuple[int, int, int, int, int, bytes, int | None]  # V0_COLS
V0_TYPES = (int, int, int, int, int, bytes, (int, type(None)))


def _typed_v0(rows: Iterable[tuple[Any, ...]]) -> Iterator[V0Row]:
    """``rows`` as they come, until one holds a value damage garbled into another type
    (the tables are not STRICT): then damage, as db.load_state takes it, which the start
    moves aside and salvages (its v0 copy keeps the sound events). Packed as it came, it
    raised TypeError, rolled back, at every start."""
    for row in rows:
        if not typed(row, V0_TYPES):
            raise sqlite3.DatabaseError("database disk image is malformed: a v0 event "
                                        "holds a value of another type")
        yield row


def pack_v0(conn: sqlite3.Connection, rows: Iterable[V0Row], marks: Sequence[tuple[int, int]],
            first_seq: int) -> Packed:
    """Write v0 event rows (``V0_COLS``, in seq order, every seq below ``first_seq``) into
    the v1 tables: queued ones as records from ``first_seq`` on, tombstones as ``spent``,
    and ``marks`` (the v0 clock marks) rewritten for the new seqs."""
    packed = Packed()
    renumber = _Renumber(conn, first_seq, packed)
    # Each event's mark is the earliest one whose next_seq is above its seq; with
    # next_seq made non-decreasing (a running max), that is a pointer moving forward.
    bounds: list[tuple[int, int]] = []
    for observed, next_seq in sorted(marks):
        bounds.append((observed, max(next_seq, bounds[-1][1] if bounds else next_seq)))
    new_marks: list[tuple[int, int]] = []
    spent: dict[tuple[int, int], tuple[array[int], array[int]]] = {}  # -> (seqs, keys)
    for seq, stream, family, received, dkey, body, acked in rows:
        # Past a mark's bound: its interval is complete (the last mark takes the rest).
        while len(new_marks) < len(bounds) - 1 and seq >= bounds[len(new_marks)][1]:
            new_marks.append((bounds[len(new_marks)][0], renumber.flush()))
        if acked is None:
            renumber.add(stream, family, received, dkey, body)
        else:
            observed = bounds[len(new_marks)][0] if bounds else PAST
            seqs, keys = spent.setdefault((observed, acked), (array("q"), array("q")))
            seqs.append(seq)
            keys.append(dkey)
    end = renumber.flush()
    new_marks += [(observed, end) for observed, _ in bounds[len(new_marks):]]
    if not new_marks and end > first_seq:  # no marks (as db.start_clock): wall clock alone
        new_marks.append((PAST, end))
    conn.executemany("INSERT OR REPLACE INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                     new_marks)
    for (observed, acked), (seqs, keys) in spent.items():
        for i in range(0, len(keys), SPENT_MAX):  # id: its first event's seq, as the spool's
            conn.execute("INSERT INTO spent(id, received, observed, dkeys) VALUES (?, ?, ?, ?)",
                         (seqs[i], acked, observed, keys_to_bytes(keys[i:i + SPENT_MAX])))
        packed.spent += len(keys)
    return packed


def recount_streams(conn: sqlite3.Connection) -> None:
    """Set each stream's depth and bytes from its records."""
    conn.execute("UPDATE streams SET "
                 "depth = (SELECT coalesce(sum(live), 0) FROM records r "
                 "WHERE r.stream = streams.id), "
                 "bytes = (SELECT coalesce(sum(bytes), 0) FROM records r "
                 "WHERE r.stream = streams.id)")
