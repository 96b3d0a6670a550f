"""The group commit and expiry, each one plain function run on the writer's thread.

A whole group commit (dead letters, acks, size cap, inserts, depth and counter
updates, COMMIT) is one call there: see db.py for why one hop, not one per statement.
Events are stored packed, one record per commit group per (stream, lane, family)
(records.py); an ack sets bits in the record's ``gone`` bitmap rather than rewriting
events, and a record is deleted once none of its events is live (Vector's disk buffer).
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from array import array
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from itertools import compress
from operator import not_
from typing import Any

from agent.families.lanes import HIGH, NORMAL
from agent.outcomes import Counts, Drop, Tally, record
from agent.spool.codebook import lookup, save
from agent.spool.db import (
    BUSY_TIMEOUT_MS,
    PAST,
    Signal,
    add_counters,
    advance_mark,
    keys_from_bytes,
    main_file,
    mark,
    transaction,
    used_bytes,
)
from agent.spool.dedupe import keys_to_bytes
from agent.spool.leases import Bound
from agent.spool.records import DamagedRecord, Learned, acked_bits_fit, pack, sizes, unpack

# Estimating what a record row takes in the file (``row_bytes``), to tell whether a group
# still fits under max_size_mb between measurements. SQLite keeps whole rows in a page:
# counting bytes, not pages, took two rows just over half a page for one page where they
# take two, and let the file pass the cap by 10% and more (tests/test_spool_cap.py).
PAGE = 4096          # SQLite's default page size, which the spool keeps
ROW_FIELDS = 30      # a record row's integers and its header, besides the two blobs
CELL = 8             # a cell's pointer and its size and rowid varints, in a leaf page
ROW_EXTRA = 36       # its two index entries (schema.py), and interior pages, per row
DROP_CHUNK = 64  # records per statement when dropping the oldest
DEAD_FIELDS = 64  # a dead letter's columns besides its body, and its share of the page
# Free pages handed back to the file system (PRAGMA incremental_vacuum) once they are
# both this many and a quarter of the file: a drained spool shrinks, a busy one does
# not pay for moving pages at every ack.
VACUUM_MIN_PAGES = 32
# The file's size is measured (a query: one more time the writer lets go of the GIL and
# waits for a busy loop to give it back) only within this much of max_size_mb, after
# deletes, or when the writer asks; otherwise the last size plus what was inserted.
MEASURE_WITHIN = 4 * 1024 * 1024
# SQLite reuses the -wal from its start after each checkpoint and never shrinks it: a
# drained backlog left megabytes of it on disk for as long as the agent ran. A commit
# that empties the queue checkpoints and truncates a -wal past this (SQLite's own
# checkpoint point, 1000 pages): a smaller one is left, or an agent that delivers as it
# goes would pay for a checkpoint at every ack.
WAL_TRUNCATE_BYTES = 4 * 1024 * 1024
# Expiry deletes at most this many records holding at most this many events (and as many
# dead letters, and rows of spent keys) per transaction, the writer's lock let go in
# between (Spool.prune): a backlog that aged out at once (max_age_days lowered) went in
# one, ~6 s a million lone events, every app's request waiting for it. A chunk of lone
# events takes ~10 ms.
EXPIRE_RECORDS = 1024
EXPIRE_EVENTS = 8192

log = logging.getLogger("outpost.spool")


@dataclass(slots=True)
class Group:
    """New events of one (stream, lane, family), numbered ``id`` .. ``id + len(bodies) - 1``."""

    id: int
    stream: int
    family: int
    received: int
    bodies: list[bytes]
    # An array: each key is converted to int64 once, as it joins the group; the commit
    # stores the keys and the index takes them by copying bytes (a conversion of a
    # 64-bit int, through PyArg_Parse, costs ~1.2k instructions).
    keys: array[int]
    nbytes: int = 0
    data: bytes | None = None         # records.pack(bodies, ids), when packed on the loop
    # Nucleus ack ids, one per body, when ingest read every one (records.ZSTD_IDS).
    ids: list[Any] | None = None
    lane: int = NORMAL


@dataclass(slots=True)
class Part:
    """One request's new events, as runs (group, start, end) of the groups' positions: a
    request that does not fit under max_size_mb is refused alone."""

    duplicates: int                   # its resends, left out of the groups
    slices: list[tuple[Group, int, int]] = field(default_factory=list)
    # Its resends of events new in this same commit (another request's), stored only if
    # that request is: it is refused with any request it leans on that is.
    leans: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Settle:
    """Events of one record leaving the queue: acked, or dead-lettered with a reason."""

    id: int                           # the record
    observed: int                     # agent-observed ms of its receipt (for ``spent``)
    acked: Sequence[int] = ()                                           # offsets, sorted
    dead: list[tuple[int, str, str]] = field(default_factory=list)      # (offset, upstream, reason)


@dataclass(slots=True)
class Job:
    """One group commit, as plain data prepared on the event loop."""

    groups: list[Group]
    parts: list[Part]                 # the requests, in arrival order
    new_streams: list[tuple[int, str]]
    settle: list[Settle]
    corrupt: list[int]                # records the reader could not unpack
    room: int                         # bytes left under max_size_mb before this commit
    max_bytes: int                    # max_size_mb: the room once this commit's deletes ran
    reject_when_full: bool
    remember: bool                    # keep delivered records' dedupe keys (``spent``)
    counters: Counts                  # deltas counted on the loop since the last commit
    now: int
    mark: tuple[int, int] | None = None  # (agent-observed ms, next seq): see clock_marks
    unmarked: tuple[int, int] | None = None  # Books.unmarked, marked first (db.mark)
    measure: bool = True              # measure the file's size (see MEASURE_WITHIN)
    # Where the latest mark moves to when this commit deletes records or spent keys and
    # writes no mark of its own (see advance_mark).
    tail: tuple[int, int] = (0, 0)
    # Set as its COMMIT starts, or as it fails before: the loop waits for it while this
    # thread runs a small commit's statements (writer.HAND_OVER_S).
    committing: Signal | None = None
    # The learned dictionary small groups are packed with (codebook.py); stored with them.
    learned: Learned | None = None
    # Of new_streams, the keys first met in this commit's requests: one whose events are
    # all refused (full) keeps no row (``Outcome.unused``).
    fresh: frozenset[int] = frozenset()
    # Set on the writer's thread once the COMMIT is done: a failure after it (freeing
    # pages, measuring the file) leaves the rows written, new streams' included.
    written: bool = False
    # Records the forwarders have events of in flight (leases.py): drop_oldest leaves them.
    leased: Sequence[Bound] = ()

    def cap(self) -> int:
        """The size dead letters this commit writes keep the file within: max_size_mb, or
        the file's size over it (lowered since it filled), whose excess goes in chunks
        (``_trim``) or, under reject, as the queue is delivered. All of it went to make
        room for one dead letter, every dead letter its own included when the queue held
        the excess."""
        return self.max_bytes + max(0, -self.room)


@dataclass(slots=True)
class Outcome:
    """What a commit changed, for the loop to apply to its in-memory state."""

    stored: bool = True               # False: refused, spool full
    streams: dict[int, list[int]] = field(default_factory=dict)  # id -> [depth, bytes] deltas
    high: dict[int, int] = field(default_factory=dict)           # id -> high lane's depth delta
    high_in: dict[int, int] = field(default_factory=dict)        # id -> high events stored
    counters: Counts = field(default_factory=dict)               # deltas computed here
    deleted: list[int] = field(default_factory=list)             # records no longer live
    # Dedupe keys of events dropped undelivered (full, expired, damaged), by record id: a
    # resend of one is a new chance to deliver it, not a duplicate, so the index lets them
    # go (DedupeIndex.drop: in one pass, not one per record).
    undelivered: list[tuple[int, array[int]]] = field(default_factory=list)
    # Dedupe keys of delivered events the file let go early (at max_size_mb), by record
    # id: the index counts them forgotten, each key once (DedupeIndex.forgotten_stored).
    forgotten: list[tuple[int, bytes | array[int]]] = field(default_factory=list)
    used_bytes: int = 0
    refused: list[int] = field(default_factory=list)             # requests refused: full
    # Of ``refused``, those larger than the whole spool: (estimated bytes, the most an
    # empty spool holds). No draining makes their room: "too large", not "retry later".
    never: dict[int, tuple[int, int]] = field(default_factory=dict)
    groups: list[Group] | None = None  # what was stored, when not all of ``Job.groups``
    # Job.fresh streams that stored nothing, their rows deleted: a refused request under a
    # new key left one for good, in the file and in memory (and, with listen.max_keys,
    # took a key's place).
    unused: list[int] = field(default_factory=list)
    more: bool = False   # expiry stopped at a chunk's bound: more may be due (prune)
    expired: dict[int, int] = field(default_factory=dict)   # prune: id -> events expired
    # Stream id -> events dropped_full (whole records, each of one key): the log says
    # whose they were, by upstream.
    full: dict[int, int] = field(default_factory=dict)
    trimming: bool = False   # prune took part of an excess over the cap (Expiry.trimming)
    recounted: int = 0   # keys whose queue counts disagreed with their records (recount)

    def left(self, stream: int, lane: int, events: int, nbytes: int) -> None:
        """``events`` of ``stream``'s queue (``nbytes`` of it) in ``lane`` left it."""
        d = self.streams.setdefault(stream, [0, 0])
        d[0] -= events
        d[1] -= nbytes
        if lane == HIGH:
            self.high[stream] = self.high.get(stream, 0) - events


def commit(conn: sqlite3.Connection, job: Job) -> Outcome:
    """Run one group commit; rolls back and re-raises on any error."""
    try:
        return _commit(conn, job)
    finally:
        if job.committing is not None:
            job.committing.set()   # failed before its COMMIT: the loop waits no longer


def _commit(conn: sqlite3.Connection, job: Job) -> Outcome:
    out = Outcome()
    # Compressing is the costly part: done before BEGIN, so the write lock is held less
    # (small groups come packed from the loop: see writer.PACK_ON_LOOP_BYTES).
    packed = [(g, pack(g.bodies, g.ids, job.learned) if g.data is None else g.data,
               keys_to_bytes(g.keys)) for g in job.groups]
    with transaction(conn, job.committing):
        if job.mark is not None:
            mark(conn, *job.mark, job.unmarked)
        if job.new_streams:
            conn.executemany("INSERT OR IGNORE INTO streams(id, key) VALUES (?, ?)",
                             job.new_streams)
        if job.settle:
            _settle_all(conn, job, out)
        moved = out.counters.get(Drop.DEAD_LETTERED, 0)
        if moved and (over := used_bytes(conn) - job.cap()) > 0:
            _trim_dead(conn, over, out)   # dead letters that alone pass the cap
        if job.corrupt:
            # Their delivered events' keys are kept, as _drop_damaged keeps them; received
            # now, by the agent's clock, for want of the records' own time: kept longer,
            # never forgotten early.
            _drop(conn, "id IN (SELECT value FROM json_each(?))",
                  (str(job.corrupt).replace(" ", ""),), Drop.DROPPED_CORRUPT, out,
                  spent=job.tail[0] if job.remember else None)
        inserted = 0
        if packed:
            # Records this commit deleted (acks, dead letters, damage) made room for its
            # inserts: measured, or a full spool refuses the events that the acks ahead of
            # them in the same commit made room for (or forgets dedupe keys for it).
            room = job.max_bytes - used_bytes(conn) if out.deleted or moved else job.room
            inserted = _store(conn, job, packed, room, out)
        if job.fresh and (unused := [s for s in job.fresh if s not in out.streams]):
            conn.executemany("DELETE FROM streams WHERE id = ?", [(s,) for s in unused])
            out.unused = unused
        if out.stored:
            refused = set(out.refused)
            if dups := sum(p.duplicates for i, p in enumerate(job.parts) if i not in refused):
                record(out.counters, Tally.DUPLICATES, dups)
        forgot = bool(out.forgotten)
        if job.mark is None and (out.deleted or forgot):
            advance_mark(conn, *job.tail)
        recount(conn, out)
        _save(conn, out.streams, {**job.counters, **_sum(job.counters, out.counters)})
    job.written = True
    trimmed = out.counters.get(Tally.DEAD_DROPPED_FULL, 0)
    # A partial ack rewrites its record's row: near the cap, its freed pages are handed back.
    if out.deleted or trimmed or (job.settle and job.room < MEASURE_WITHIN):
        _hand_back(conn, job.max_bytes)
    if out.deleted:
        _shrink_wal(conn)
    guess = job.max_bytes - job.room + (inserted if out.stored else 0)
    if job.measure or out.deleted or forgot or moved or trimmed \
            or job.max_bytes - guess < MEASURE_WITHIN:
        out.used_bytes = used_bytes(conn)
    else:
        out.used_bytes = guess
    return out


def _store(conn: sqlite3.Connection, job: Job, packed: list[tuple[Group, bytes, bytes]],
           room: int, out: Outcome) -> int:
    """Insert the requests' groups that fit under max_size_mb, making room as
    ``when_full`` says; returns the bytes estimated for what was inserted. A request that
    does not fit is refused whole (``out.refused``), the largest first, and nothing it
    made room for is deleted: the others are stored."""
    inserted = sum(row_bytes(len(d) + len(k)) for _, d, k in packed)
    if room - inserted >= MEASURE_WITHIN:   # far from the cap: nothing can go wrong
        _insert(conn, packed, job.learned)
        _count_inserted(packed, out)
        return inserted
    kept = list(range(len(job.parts)))
    share = {id(g): row_bytes(len(d) + len(k)) / max(1, len(g.bodies)) for g, d, k in packed}
    while True:
        undo = _checkpoint(out)
        conn.execute("SAVEPOINT store")
        missing = _fit(conn, job, packed, room, inserted, out)
        if missing <= 0:
            conn.execute("RELEASE store")
            return inserted
        conn.execute("ROLLBACK TO store")
        conn.execute("RELEASE store")
        _restore(out, undo)
        refuse = _leaning(job, kept, _largest(job, kept, share, missing))
        most = job.max_bytes - _least_bytes(conn)
        out.never.update((i, (size, most)) for i in refuse
                         if (size := _size(job, i, share)) > most)
        kept = [i for i in kept if i not in refuse]
        out.refused = sorted([*out.refused, *refuse])
        record(out.counters, Drop.REJECTED_FULL,
               sum(e - s for i in refuse for _, s, e in job.parts[i].slices)
               + sum(job.parts[i].duplicates for i in refuse))
        if not kept:
            out.stored = False
            return 0
        packed = _regroup(job, kept)
        out.groups = [g for g, _, _ in packed]
        if not packed:   # those kept are resends alone: nothing to make room for
            return 0
        inserted = sum(row_bytes(len(d) + len(k)) for _, d, k in packed)
        room = job.max_bytes - used_bytes(conn)


def _fit(conn: sqlite3.Connection, job: Job, packed: list[tuple[Group, bytes, bytes]],
         room: int, inserted: int, out: Outcome) -> int:
    """Make room for ``packed`` and insert it; returns the bytes still missing (then the
    caller rolls back). Near the cap, the file is measured after the insert, not trusted
    to the estimate: deleting rows from partly used pages frees less than they took.

    A spool over the cap (max_size_mb lowered since it filled) makes room for these rows
    as at the cap, the file not growing; one that may drop the oldest loses a chunk of
    its excess first (``_trim``). The rest goes with expiry's runs (and the next
    commits). The first commit deleted all of it in one transaction, every app waiting
    (~1 s for 100,000 lone events, 0.7 s for 50,000 dead letters)."""
    if room < 0:
        # It could never fit, beside the records in flight that nothing drops: refused,
        # nothing dropped for it (accepted, the file held at its size, the trim of the
        # excess would then take it out, the newest events, as at the cap it is refused).
        fixed = 0 if job.reject_when_full else _leased_bytes(conn, job.leased)
        if inserted + fixed > job.max_bytes:
            return inserted + fixed - job.max_bytes
        if not job.reject_when_full:
            _trim(conn, -room, job.remember, job.leased, out, True)
            room = job.max_bytes - used_bytes(conn)
    over_cap = max(0, -room)
    room += over_cap
    measure = room - inserted < MEASURE_WITHIN
    excess = inserted - room
    while True:
        if excess > 0:
            excess = _make_room(conn, excess, job.reject_when_full, out)
            if excess > 0 and not job.reject_when_full:
                excess = _drop_oldest(conn, excess, job.remember, out, job.leased)
            if excess > 0:
                return excess
        conn.execute("SAVEPOINT rows")
        _insert(conn, packed, job.learned)
        over = used_bytes(conn) - job.max_bytes - over_cap if measure else 0
        if over <= 0:
            conn.execute("RELEASE rows")
            _count_inserted(packed, out)
            return 0
        conn.execute("ROLLBACK TO rows")
        conn.execute("RELEASE rows")
        excess = over


def _insert(conn: sqlite3.Connection, packed: list[tuple[Group, bytes, bytes]],
            learned: Learned | None) -> None:
    if learned is not None:
        save(conn, learned)
    conn.executemany(
        "INSERT INTO records(id, stream, family, n, received, live, bytes, dkeys, data, lane) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(g.id, g.stream, g.family, len(g.bodies), g.received, len(g.bodies), g.nbytes, k, d,
          g.lane) for g, d, k in packed])


def _count_inserted(packed: list[tuple[Group, bytes, bytes]], out: Outcome) -> None:
    n = 0
    for g, _, _ in packed:
        d = out.streams.setdefault(g.stream, [0, 0])
        d[0] += len(g.bodies)
        d[1] += g.nbytes
        n += len(g.bodies)
        if g.lane == HIGH:
            out.high[g.stream] = out.high.get(g.stream, 0) + len(g.bodies)
            out.high_in[g.stream] = out.high_in.get(g.stream, 0) + len(g.bodies)
    record(out.counters, Tally.INGESTED, n)


_Undo = tuple[dict[int, list[int]], dict[int, int], dict[int, int], Counts, int, int, int]


def _checkpoint(out: Outcome) -> _Undo:
    """What ``_restore`` needs to undo an attempt rolled back to a savepoint."""
    return ({k: list(v) for k, v in out.streams.items()}, dict(out.high), dict(out.high_in),
            dict(out.counters), len(out.deleted), len(out.undelivered), len(out.forgotten))


def _restore(out: Outcome, undo: _Undo) -> None:
    out.streams, out.high, out.high_in, out.counters = undo[0], undo[1], undo[2], undo[3]
    del out.deleted[undo[4]:]
    del out.undelivered[undo[5]:]
    del out.forgotten[undo[6]:]


def _largest(job: Job, kept: list[int], share: dict[int, float], missing: int) -> set[int]:
    """The largest requests still kept whose estimated bytes (``share``: each group's row
    per event) add up to ``missing``: the ones to refuse. Never one that stores nothing
    (resends alone): refused, it would free nothing, and be answered 503 for events the
    spool holds whenever ``missing`` is more than the estimates (a spool over its cap)."""
    size = {i: _size(job, i, share) for i in kept if job.parts[i].slices}
    refuse: set[int] = set()
    for i in sorted(size, key=lambda i: -size[i]):
        refuse.add(i)
        missing -= int(size[i])
        if missing <= 0:
            break
    return refuse


def _size(job: Job, i: int, share: dict[int, float]) -> int:
    """Request ``i``'s estimated bytes once stored (``share``: each group's row per event)."""
    return int(sum((e - s) * share[id(g)] for g, s, e in job.parts[i].slices))


def _least_bytes(conn: sqlite3.Connection) -> int:
    """What the file takes holding no row: the pages its schema's statements make in an
    empty database. No spool takes less, so a request larger than max_size_mb less this
    could never be stored. (Counted as a page a table and one for the schema, it was 3
    pages short, the schema's text taking 3 and incremental vacuum's pointer map one: a
    request an empty spool could not hold was told to retry later, for good.)"""
    schema = tuple(sql for (sql,) in conn.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"))
    vacuum = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    return _empty_pages(schema, vacuum) * PAGE


@functools.lru_cache(maxsize=4)
def _empty_pages(schema: tuple[str, ...], vacuum: int) -> int:
    """Pages of a database made by ``schema`` (one per spool layout: computed once)."""
    with closing(sqlite3.connect(":memory:")) as empty:
        empty.execute(f"PRAGMA page_size = {PAGE}")
        empty.execute(f"PRAGMA auto_vacuum = {vacuum}")
        for sql in schema:
            empty.execute(sql)
        return int(empty.execute("PRAGMA page_count").fetchone()[0])


def _leaning(job: Job, kept: list[int], refuse: set[int]) -> set[int]:
    """``refuse`` and the requests still kept that lean on one refused: answered as
    resends, they would be acknowledged, and nothing stored. Those leaning on a request
    that is stored are resends of a stored event, and stored (as duplicates) with it."""
    refuse = set(refuse)
    while True:
        gone = {g.keys[j] for i in refuse for g, s, e in job.parts[i].slices
                for j in range(s, e)}
        more = {i for i in kept if i not in refuse and not job.parts[i].leans.isdisjoint(gone)}
        if not more:
            return refuse
        refuse |= more


def _regroup(job: Job, kept: list[int]) -> list[tuple[Group, bytes, bytes]]:
    """The groups of the requests ``kept`` only, packed. A group keeps its first seq: its
    events are numbered from it, within the seqs it was given."""
    picks: dict[int, list[int]] = {id(g): [] for g in job.groups}
    for i in kept:
        for g, s, e in job.parts[i].slices:
            picks[id(g)].extend(range(s, e))
    packed = []
    for g in job.groups:
        if not (at := sorted(picks[id(g)])):
            continue
        bodies = [g.bodies[i] for i in at]
        ids = None if g.ids is None else [g.ids[i] for i in at]
        new = Group(g.id, g.stream, g.family, g.received, bodies,
                    array("q", [g.keys[i] for i in at]), sum(map(len, bodies)), None, ids,
                    g.lane)
        packed.append((new, pack(bodies, ids, job.learned), keys_to_bytes(new.keys)))
    return packed


def _garbled(live: object, nbytes: object, dkeys: object = b"") -> None:
    """A record's counts (or keys) that damage garbled into another type (the tables are
    not STRICT) since the start checked them (db.load_state): the file is damaged, as a
    malformed page is, and the writer moves it aside and salvages it (which counts them
    again from the events). Taken as they came, every commit that settled or dropped the
    record failed (TypeError), the apps posting in it answered 503, until a restart."""
    if type(live) is not int or type(nbytes) is not int or type(dkeys) is not bytes:
        raise sqlite3.DatabaseError("database disk image is malformed: a record's count "
                                    "holds a value of another type")


def _miscounted(live: int, n: int, gone: bytes | None) -> None:
    """A record whose count of live events is not that of its events not yet gone (damage
    garbled it into another count) is damage, as ``_garbled``: the salvage counts it again
    from the acked bits. Settled as it read, the record was kept with events live and none
    to send, and once its key's depth, right, came to zero, ``recount`` took its count
    from the records': the queue never emptied (or its events were counted lost)."""
    if live != n - int.from_bytes(gone or b"", "little").bit_count():
        raise sqlite3.DatabaseError("database disk image is malformed: a record's count of "
                                    "live events disagrees with its acked bits")


def _settle_all(conn: sqlite3.Connection, job: Job, out: Outcome) -> None:
    """Settle ``job.settle``: the records acked whole first, all at once (the drain's
    usual case: their rows read by one statement, deleted and their keys kept by one
    executemany each, not three statements a record, each its own call), then the others
    one by one. Deleted first, they are gone when a dead letter measures the room left."""
    rows = {row[0]: row[1:] for row in conn.execute(
        "SELECT id, stream, family, n, received, live, gone, bytes, dkeys, data, lane "
        "FROM records WHERE id IN (SELECT value FROM json_each(?))",
        (str([s.id for s in job.settle]).replace(" ", ""),))}
    rest: list[tuple[Settle, tuple[Any, ...]]] = []
    whole: list[tuple[int, int, int, bytes]] = []   # (id, received, observed, dkeys)
    for s in job.settle:
        row = rows.get(s.id)
        if row is None:  # already gone (a repeated ack, or dropped meanwhile)
            continue
        stream, _, n, received, live, gone_blob, nbytes, dkeys, _, lane = row
        _garbled(live, nbytes, dkeys)
        acked = s.acked
        if (not s.dead and gone_blob is None and len(acked) == live == n and acked[0] == 0
                and acked[-1] == n - 1):
            record(out.counters, Tally.ACKED, n)   # nothing per event
            whole.append((s.id, received, s.observed, dkeys))
            out.left(stream, lane, n, nbytes)
        else:
            rest.append((s, row))
    if whole:
        conn.executemany("DELETE FROM records WHERE id = ?", [(w[0],) for w in whole])
        if job.remember:
            conn.executemany("INSERT OR REPLACE INTO spent(id, received, observed, dkeys) "
                             "VALUES (?, ?, ?, ?)", whole)
        out.deleted.extend(w[0] for w in whole)
    for s, row in rest:
        _settle(conn, s, job, out, row)


def _settle(conn: sqlite3.Connection, s: Settle, job: Job, out: Outcome,
            row: tuple[Any, ...]) -> None:
    """Mark events of one record gone (``row``: its columns as _settle_all read them);
    delete the record once none is live."""
    stream, family, n, received, live, gone_blob, nbytes, dkeys, data, lane = row
    _miscounted(live, n, gone_blob)
    if not s.dead and _settle_range(conn, s, job, out, row):
        return
    gone = bytearray(gone_blob or bytes((n + 7) // 8))
    dead = {off: (up, why) for off, up, why in s.dead if 0 <= off < n}
    offsets = sorted(set(s.acked).union(dead).intersection(range(n)))
    new = [o for o in offsets if not gone[o >> 3] & (1 << (o & 7))]
    if not new:
        return
    for o in new:
        gone[o >> 3] |= 1 << (o & 7)
    left = live - len(new)
    bodies: list[bytes] | None = None
    freed = nbytes
    try:
        if dead or left:
            bodies = unpack(data, lookup(conn))
    except DamagedRecord:
        _drop_damaged(conn, s, job, out, [o for o in new if o not in dead])
        return
    if bodies is not None:
        keys = keys_from_bytes(dkeys)
        dead_rows = [(s.id + o, stream, family, received, keys[o], bodies[o], *dead[o], job.now,
                      lane, job.tail[0]) for o in new if o in dead]
        if dead_rows:
            # Unpacked, a dead letter takes several times its share of a record: room is
            # made first, so the file stays within max_size_mb (the pages freed are reused).
            incoming = sum(row_bytes(len(r[5]) + DEAD_FIELDS - ROW_FIELDS) for r in dead_rows)
            over = used_bytes(conn) + incoming - job.cap()
            if over > 0:
                _trim_dead(conn, over, out)
            conn.executemany("INSERT OR IGNORE INTO dead(seq, stream, family, received, dkey, "
                             "body, upstream, reason, at, lane, observed) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", dead_rows)
            record(out.counters, Drop.DEAD_LETTERED, len(dead_rows))
        if left:
            freed = sum(len(bodies[o]) for o in new)
    record(out.counters, Tally.ACKED, sum(1 for o in new if o not in dead))
    if left:
        conn.execute("UPDATE records SET live = ?, gone = ?, bytes = ? WHERE id = ?",
                     (left, bytes(gone), nbytes - freed, s.id))
    else:
        _delete(conn, s, job, received, dkeys, out)
    out.left(stream, lane, len(new), freed)


def _settle_range(conn: sqlite3.Connection, s: Settle, job: Job, out: Outcome,
                  row: tuple[Any, ...]) -> bool:
    """Acked events of one record that are one range of offsets, none of them gone yet
    (``row`` as _settle read it): the bitmap set and the bytes freed summed at C speed,
    with no body cut out. A drain's ack group ends inside a record and the next group
    takes the rest, so most groups leave one record part acked and finish another: by
    the offset in Python, with the record unpacked, this was half the writer's ack work.
    False, having done nothing, when they are not such a range."""
    acked = s.acked
    stream, _, n, received, live, gone_blob, nbytes, dkeys, data, lane = row
    if not isinstance(acked, range) or acked.step != 1 or not acked \
            or acked.start < 0 or acked.stop > n:
        return False
    gone = int.from_bytes(gone_blob or b"", "little")
    span = (1 << acked.stop) - (1 << acked.start)
    if gone & span:
        return False
    k = len(acked)
    left = live - k
    freed = nbytes
    if left:
        try:
            freed = sum(sizes(data, lookup(conn))[acked.start:acked.stop])
        except DamagedRecord:
            _drop_damaged(conn, s, job, out, list(acked))
            return True
        conn.execute("UPDATE records SET live = ?, gone = ?, bytes = ? WHERE id = ?",
                     (left, (gone | span).to_bytes((n + 7) // 8, "little"), nbytes - freed,
                      s.id))
    else:
        _delete(conn, s, job, received, dkeys, out)
    record(out.counters, Tally.ACKED, k)
    out.left(stream, lane, k, freed)
    return True


def _drop_damaged(conn: sqlite3.Connection, s: Settle, job: Job, out: Outcome,
                  acked: list[int]) -> None:
    """Settling found record ``s.id`` unreadable. The events just acked were delivered:
    counted so, and their dedupe keys kept (a resend of one is a duplicate, across a
    restart too). What is still queued in it is lost, counted, and the record goes."""
    stream, n, received, live, gone_blob, dkeys, lane = conn.execute(
        "SELECT stream, n, received, live, gone, dkeys, lane FROM records WHERE id = ?",
        (s.id,)).fetchone()
    gone = bytearray(gone_blob or bytes((n + 7) // 8))
    for o in acked:
        gone[o >> 3] |= 1 << (o & 7)
    conn.execute("UPDATE records SET live = ?, gone = ? WHERE id = ?",
                 (live - len(acked), bytes(gone), s.id))
    record(out.counters, Tally.ACKED, len(acked))
    out.left(stream, lane, len(acked), 0)   # the bytes: _drop's, with the rest
    if job.remember:
        keys = keys_from_bytes(dkeys)
        delivered = [k for i, k in enumerate(keys) if gone[i >> 3] >> (i & 7) & 1]
        conn.execute("INSERT OR REPLACE INTO spent(id, received, observed, dkeys) "
                     "VALUES (?, ?, ?, ?)", (s.id, received, s.observed,
                                             keys_to_bytes(delivered)))
    _drop(conn, "id = ?", (s.id,), Drop.DROPPED_CORRUPT, out)


def _delete(conn: sqlite3.Connection, s: Settle, job: Job, received: int, dkeys: bytes,
            out: Outcome) -> None:
    """A record none of whose events is live any more goes; its dedupe keys stay."""
    conn.execute("DELETE FROM records WHERE id = ?", (s.id,))
    if job.remember:
        conn.execute("INSERT OR REPLACE INTO spent(id, received, observed, dkeys) "
                     "VALUES (?, ?, ?, ?)", (s.id, received, s.observed, dkeys))
    out.deleted.append(s.id)


def _drop(conn: sqlite3.Connection, where: str, params: tuple[Any, ...], why: Drop,
          out: Outcome, spent: int | None = None, forget: bool = False) -> int:
    """Delete whole records, counting their live events as ``why``; returns the bytes
    their rows took (estimated: ``row_bytes``). With ``spent`` (an agent-observed ms), the
    keys of their events already gone are kept in ``spent`` as received then; with
    ``forget``, they leave the file (``out.forgotten``)."""
    rows = conn.execute(f"DELETE FROM records WHERE {where} RETURNING id, stream, live, bytes, "
                        "length(data) + length(dkeys), dkeys, gone, lane, received",
                        params).fetchall()
    freed = 0
    for rid, stream, live, nbytes, size, dkeys, gone, lane, received in rows:
        _garbled(live, nbytes, dkeys)   # before any is counted: the transaction is undone
        keys = keys_from_bytes(dkeys)
        # Bits damage garbled (reads.py discards such a record) tell nothing: each key is
        # taken as undelivered, its event lost.
        if gone is not None and acked_bits_fit(gone, len(keys)):  # acked, dead-lettered: known
            queued = [not gone[i >> 3] >> (i & 7) & 1 for i in range(len(keys))]
            if spent is not None:
                conn.execute("INSERT OR REPLACE INTO spent(id, received, observed, dkeys) "
                             "VALUES (?, ?, ?, ?)", (rid, received, spent, keys_to_bytes(
                                 [k for k, q in zip(keys, queued) if not q])))
            elif forget:
                out.forgotten.append((rid, array("q", compress(keys, map(not_, queued)))))
            keys = array("q", compress(keys, queued))
        out.undelivered.append((rid, keys))
        out.left(stream, lane, live, nbytes)
        record(out.counters, why, live)
        if why is Drop.DROPPED_FULL:
            out.full[stream] = out.full.get(stream, 0) + live
        out.deleted.append(rid)
        freed += row_bytes(size)
    return freed


def row_bytes(blobs: int) -> int:
    """The file's bytes a record row with ``blobs`` bytes of blobs takes: its share of
    a leaf page, which holds as many whole rows as fit, or, for a row too big for one,
    the overflow pages that SQLite spills it to plus the part left in the leaf."""
    payload = blobs + ROW_FIELDS
    if payload > PAGE - 35:   # spills (SQLite's table b-tree rule, for a 4 KB page)
        least = (PAGE - 12) * 32 // 255 - 23
        local = least + (payload - least) % (PAGE - 4)
        if local > PAGE - 35:
            local = least
        overflow = -(-(payload - local) // (PAGE - 4))
        return overflow * PAGE + row_bytes(local - ROW_FIELDS)
    per_page = max(1, (PAGE - 8) // (payload + CELL))
    return -(-PAGE // per_page) + ROW_EXTRA


def _make_room(conn: sqlite3.Connection, excess: int, refuse: bool, out: Outcome) -> int:
    """Free ``excess`` bytes for an append at max_size_mb from what waits for no delivery:
    delivered events' stored dedupe keys first, then the oldest dead letters (refused for
    good, they wait only for an operator); returns the bytes still missing. When the append
    will be refused (``refuse``) unless they make the room, none of them goes for nothing:
    all is undone."""
    if refuse and not _yields(conn, excess):
        return excess   # they cannot make it: not even tried (a spool over a lowered cap)
    undo = _checkpoint(out)
    if refuse:
        conn.execute("SAVEPOINT room")
    excess -= _forget_spent(conn, excess, out)
    if excess > 0:
        excess -= _trim_dead(conn, excess, out)
    if refuse:
        if excess > 0:
            conn.execute("ROLLBACK TO room")
            _restore(out, undo)
        conn.execute("RELEASE room")
    return excess


def _yields(conn: sqlite3.Connection, need: int) -> bool:
    """Whether forgetting the spent keys and deleting the dead letters could free ``need``
    bytes, by more than they could: their columns, twice over (deletes free whole pages:
    measured up to 1.9x the bytes for small dead letters). An overestimate costs only a
    try undone; length() reads no blob. Summed the oldest first (as they go), only until
    they reach ``need``, in chunks of at most the rows that could (each yields its
    ``extra`` at least): every request at a spool full of dead letters summed them all
    (~160 ms at a million)."""
    for sql, extra in _SIZES:
        after = -1
        while need > 0:
            rows = min(EXPIRE_RECORDS, need // (2 * extra) + 1)
            size, after = conn.execute(sql, (extra, after, rows)).fetchone()
            if after is None:
                break
            need -= 2 * size
    return need <= 0


# Each row's bytes (and the row's own ``extra``) and the last id, of a chunk of spent keys
# or dead letters after an id: what _yields sums.
_SIZES = (("SELECT sum(n), max(id) FROM (SELECT id, length(dkeys) + ? AS n FROM spent "
           "WHERE id > ? ORDER BY id LIMIT ?)", ROW_FIELDS + ROW_EXTRA),
          ("SELECT sum(n), max(seq) FROM (SELECT seq, length(body) + length(reason) + "
           "length(upstream) + ? AS n FROM dead WHERE seq > ? ORDER BY seq LIMIT ?)",
           DEAD_FIELDS))


def _forget_spent(conn: sqlite3.Connection, excess: int, out: Outcome,
                  chunk: bool = False) -> int:
    """At max_size_mb, forget the stored dedupe keys of delivered events, the oldest
    first, until ``excess`` bytes are free (or none is left): as many rows as their sizes
    say (a page's worth at least: deletes free whole pages), EXPIRE_RECORDS at most a
    step, then more while the pages they held stay in use (one such step with ``chunk``);
    returns the bytes freed. Left alone they would keep new events out (or push the queue
    out) on a busy agent with an empty queue. The keys stay in memory (the index) until
    their window ends; only a restart within the window forgets them, so no more go than
    the room needs: 1,024 rows a step whatever it needed forgot ~100,000 keys for a page."""
    before, freed = used_bytes(conn), 0
    while freed < excess:
        need, last = max(PAGE, excess - freed), None
        rows = conn.execute("SELECT id, length(dkeys) FROM spent ORDER BY id LIMIT ?",
                            (EXPIRE_RECORDS,))
        for rid, size in rows:
            last, need = rid, need - size - ROW_FIELDS - ROW_EXTRA
            if need <= 0:
                break
        rows.close()
        if last is None:
            break
        out.forgotten += conn.execute("DELETE FROM spent WHERE id <= ? RETURNING id, dkeys",
                                      (last,)).fetchall()
        freed = before - used_bytes(conn)
        if chunk:
            break
    return max(0, freed)


def _trim_dead(conn: sqlite3.Connection, excess: int, out: Outcome,
               chunk: bool = False) -> int:
    """Delete the oldest dead letters until ``excess`` bytes of the file are free (or none
    is left): as many as their sizes say, then more while the pages they held stay in
    use (with ``chunk``, one step of EXPIRE_RECORDS at most); returns the bytes freed."""
    before, freed = used_bytes(conn), 0
    while freed < excess:
        need, last = excess - freed, None
        rows = conn.execute("SELECT seq, length(body) FROM dead ORDER BY seq LIMIT ?",
                            (EXPIRE_RECORDS if chunk else -1,))
        for seq, size in rows:
            last, need = seq, need - size - DEAD_FIELDS
            if need <= 0:
                break
        rows.close()
        if last is None:
            break
        n = conn.execute("DELETE FROM dead WHERE seq <= ?", (last,)).rowcount
        record(out.counters, Tally.DEAD_DROPPED_FULL, n)
        freed = before - used_bytes(conn)
        if chunk:
            break
    return max(0, freed)


def _drop_oldest(conn: sqlite3.Connection, excess: int, remember: bool, out: Outcome,
                 leased: Sequence[Bound], chunk: bool = False) -> int:
    """when_full = "drop_oldest": delete the oldest records until ``excess`` bytes are free:
    the normal lane's first, the high lane's only once no normal event is left (an app's
    error report outlives its page views), those in flight included. Each lane loses its
    oldest: FIFO is kept. Records ``leased`` (events in flight) are left to their answer.
    The keys of a record's events already delivered go with it, as the cap forgets stored
    ones (the index keeps them until a restart). Returns the bytes still missing once none is left, or, with
    ``chunk``, once EXPIRE_RECORDS records or EXPIRE_EVENTS events went (estimated: the
    caller measures)."""
    freed = records = events = 0
    kept = leased_ids(conn, leased)
    while freed < excess:
        # The normal lane's oldest by schema.LANE_INDEX, not a read of the high lane's.
        rows = conn.execute("SELECT id, live FROM records WHERE lane = ? AND id NOT IN (SELECT "
                            "value FROM json_each(?)) ORDER BY id LIMIT ?",
                            (NORMAL, kept, DROP_CHUNK)).fetchall()
        if not rows:
            # Normal events in flight are still queued: acked, they free their room; failed,
            # they go before any high event. Until then the append waits (refused), or the
            # high lane lost its oldest while the page views ahead of it were delivered.
            if conn.execute("SELECT EXISTS (SELECT 1 FROM records WHERE lane = ?)",
                            (NORMAL,)).fetchone()[0]:
                break
            rows = conn.execute("SELECT id, live FROM records WHERE id NOT IN (SELECT value "
                                "FROM json_each(?)) ORDER BY id LIMIT ?",
                                (kept, DROP_CHUNK)).fetchall()
        if not rows:
            break
        for rid, live in rows:
            if chunk and records and (records >= EXPIRE_RECORDS
                                      or events + live > EXPIRE_EVENTS):
                return excess - freed
            freed += _drop(conn, "id = ?", (rid,), Drop.DROPPED_FULL, out, forget=remember)
            records, events = records + 1, events + live
            if freed >= excess:
                break
    return excess - freed


def leased_ids(conn: sqlite3.Connection, leased: Sequence[Bound]) -> str:
    """The records ``leased`` holds, as a JSON list (for ``NOT IN json_each``)."""
    ids = [rid for stream, lane, top in leased for (rid,) in conn.execute(
        "SELECT id FROM records WHERE stream = ? AND lane = ? AND id <= ?", (stream, lane, top))]
    return str(ids).replace(" ", "")


def _leased_bytes(conn: sqlite3.Connection, leased: Sequence[Bound]) -> int:
    """The file's bytes the records ``leased`` holds take (estimated: ``row_bytes``)."""
    if not leased:
        return 0
    return sum(row_bytes(n) for (n,) in conn.execute(
        "SELECT length(data) + length(dkeys) FROM records WHERE id IN (SELECT value FROM "
        "json_each(?))", (leased_ids(conn, leased),)))


def _hand_back(conn: sqlite3.Connection, max_bytes: int) -> None:
    """Give free pages back to the file system once they are many (see VACUUM_MIN_PAGES),
    or any once the file is past ``max_bytes`` (0: no cap): an ack rewrites its record's
    row, and SQLite writes the new row's pages before it frees the old ones, so the file
    can grow past max_size_mb by a record, with that much of it free.

    Its own transaction, after the commit: through ``execute`` the pragma frees one page
    per step, and only ``executescript`` (sqlite3_exec) runs it to the end."""
    free, pages, size = conn.execute(
        "SELECT (SELECT freelist_count FROM pragma_freelist_count()), "
        "(SELECT page_count FROM pragma_page_count()), "
        "(SELECT page_size FROM pragma_page_size())").fetchone()
    if (free >= VACUUM_MIN_PAGES and free * 4 >= pages) or (
            free and 0 < max_bytes < pages * size):
        try:
            conn.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            # The commit before it is durable and must be reported so: moving pages writes
            # to the WAL, which a nearly full disk refuses. The pages stay free for reuse.
            log.warning("spool: could not hand free pages back to the file system: %s", exc)


def _shrink_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint and truncate the -wal once the queue is empty, if it is past
    WAL_TRUNCATE_BYTES. Never waits: a reader's snapshot makes it give up until the next
    time the queue empties, or the next expiry run."""
    if conn.execute("SELECT EXISTS (SELECT 1 FROM records)").fetchone()[0]:
        return
    path = main_file(conn)
    try:
        if os.stat(f"{path}-wal").st_size <= WAL_TRUNCATE_BYTES:
            return
    except FileNotFoundError:
        return
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error as exc:
        log.warning("spool: could not truncate the write-ahead log: %s", exc)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


@dataclass(slots=True)
class Expiry:
    """What prune drops: events older than ``max_age_ms`` by both clocks (agent/clock.py;
    by the agent-observed clock alone when the wall clock reads their receipt as to come)."""

    wall_cutoff: int   # wall-clock ms: events received before it are old by the wall clock
    forget: int        # wall-clock ms: dedupe keys of events received before it may go
    observed: int      # agent-observed ms now
    max_age_ms: int
    window_ms: int     # dedupe_window_h
    unmarked: tuple[int, int] | None   # Books.unmarked: marked first (db.mark)
    next_seq: int      # every event with a lower seq is committed
    leased: Sequence[Bound] = ()   # records with events in flight (leases.py): kept
    # max_size_mb (0: none): a spool over it (the cap lowered since it filled) loses a
    # chunk of the excess too (``_trim``), queued events only with ``drop_oldest``.
    max_bytes: int = 0
    drop_oldest: bool = False      # when_full = "drop_oldest"
    remember: bool = False         # keep delivered records' dedupe keys (Job.remember)
    # An earlier chunk of this run found that the stored keys and dead letters can bring
    # the file within max_size_mb (``_trim``): not summed again at each chunk.
    trimming: bool = False


def prune(conn: sqlite3.Connection, exp: Expiry, counters: Counts) -> Outcome:
    """Drop records and dead letters old by both clocks (or by the agent-observed one
    alone, for a wall time still to come: see below); forget delivered records' dedupe
    keys that both clocks say are past the dedupe window (the agent-observed clock alone
    for keys received in the future by the wall clock: DedupeIndex.expire). One chunk of
    each at most (EXPIRE_RECORDS, EXPIRE_EVENTS): ``out.more`` says whether to run again."""
    out = Outcome()
    with transaction(conn):
        mark(conn, exp.observed, exp.next_seq, exp.unmarked)
        below, by = _received_by(conn, exp.observed - exp.max_age_ms)
        # A receipt (or dead-lettering) time the wall clock reads as still to come says
        # nothing of its age (the clock was ahead then, or is set back now): as for the
        # keys (DedupeIndex.expire), the agent-observed clock alone judges it, which never
        # runs ahead of real time. Not below a mark from before the agent counted time
        # (db.PAST): those the wall clock alone judges.
        future = exp.wall_cutoff + exp.max_age_ms if by >= 0 else -PAST
        # Marks older than the one expiry needs are never needed again.
        conn.execute("DELETE FROM clock_marks WHERE observed < (SELECT max(observed) FROM "
                     "clock_marks WHERE observed <= ?)", (exp.observed - exp.max_age_ms,))
        # A record never straddles a mark: each is written in the commit that marks it.
        # The keys of its events already delivered stay in ``spent`` for the rest of the
        # window (longer than max_age_days: the forgetting below keeps them), received by
        # that mark's time at the latest: kept longer, never forgotten early.
        # Records with events in flight are left to their answer: acked, they are delivered.
        ids, out.more = _expiring(conn, below, future, exp)
        _drop(conn, "id IN (SELECT value FROM json_each(?))", (ids,), Drop.EXPIRED, out,
              spent=by if exp.window_ms > 0 else None)
        # By key, before the cap's trimming and a recount add to ``out.streams``: the loop
        # tells those of keys no upstream takes (Spool._expire), a look at each key.
        out.expired = {sid: -d for sid, (d, _) in out.streams.items() if d}
        # Dead letters wait for an operator as long, by both clocks: received before
        # ``below``, and dead-lettered before the wall-clock cutoff (or in its future) and
        # max_age_days ago by the agent-observed clock (a letter that does not say when,
        # made before that was kept: by its event's age alone, as it was then).
        expired = conn.execute("DELETE FROM dead WHERE seq IN (SELECT seq FROM dead WHERE "
                               "seq < ? AND (at < ? OR at > ?) AND coalesce(observed, ?) <= ? "
                               "ORDER BY seq LIMIT ?)",
                               (below, exp.wall_cutoff, future, PAST,
                                exp.observed - exp.max_age_ms, EXPIRE_RECORDS)).rowcount
        record(out.counters, Tally.DEAD_EXPIRED, expired)
        # As the index forgets them (DedupeIndex.expire): received in the future by the
        # wall clock (set back since), they go by the agent-observed clock alone.
        forgot = conn.execute("DELETE FROM spent WHERE id IN (SELECT id FROM spent WHERE "
                              "observed <= ? AND (received < ? OR (received > ? AND "
                              "observed >= 0)) LIMIT ?)",
                              (exp.observed - exp.window_ms, exp.forget,
                               exp.forget + exp.window_ms, EXPIRE_RECORDS)).rowcount
        out.more = out.more or expired == EXPIRE_RECORDS or forgot == EXPIRE_RECORDS
        if exp.max_bytes and (over := used_bytes(conn) - exp.max_bytes) > 0:
            out.trimming = _trim(conn, over, exp.remember, exp.leased, out, exp.drop_oldest,
                                 exp.trimming)
            out.more = out.more or (out.trimming and used_bytes(conn) > exp.max_bytes)
        recount(conn, out)
        _save(conn, out.streams, {**counters, **_sum(counters, out.counters)})
    _hand_back(conn, exp.max_bytes)
    # Expiry empties the queue too; and a truncation a reader's snapshot held off when a
    # commit emptied it is tried here again, not only when the queue next empties.
    _shrink_wal(conn)
    out.used_bytes = used_bytes(conn)
    return out


def _trim(conn: sqlite3.Connection, over: int, remember: bool, leased: Sequence[Bound],
          out: Outcome, drop: bool, sure: bool = False) -> bool:
    """One chunk of the ``over`` bytes a spool holds past max_size_mb (lowered since it
    filled), taken as a commit at the cap makes room (stored keys, dead letters, then,
    with ``drop`` (when_full = "drop_oldest"), the oldest records but those ``leased``),
    EXPIRE_RECORDS rows of each at most (EXPIRE_EVENTS events); returns whether it
    deleted anything. Without ``drop``, only if the keys and dead letters can bring the
    file within the cap: when the queue holds the excess, which only its delivery takes
    out, none of them goes for nothing (as ``_make_room``). Measured by their own bytes,
    not _yields' overestimate (twice them), which a transaction can undo and a run of
    chunks cannot: dead letters half the excess passed it, and went for nothing. With
    ``sure``, an earlier chunk found they can: summing them again at each chunk made a
    run's cost grow with the square of the excess."""
    if not drop and not sure and not _yields(conn, 2 * over):
        return False
    changes = conn.total_changes
    over -= _forget_spent(conn, over, out, chunk=True)
    if over > 0:
        over -= _trim_dead(conn, over, out, chunk=True)
    if over > 0 and drop:
        _drop_oldest(conn, over, remember, out, leased, chunk=True)
    return conn.total_changes > changes


def _expiring(conn: sqlite3.Connection, below: int, future: int,
              exp: Expiry) -> tuple[str, bool]:
    """The oldest records due to expire (received before ``below``, and before the
    wall-clock cutoff or after ``future``), up to EXPIRE_RECORDS and EXPIRE_EVENTS (one at
    least), as a JSON list; and whether more may be due."""
    rows = conn.execute("SELECT id, n FROM records WHERE id < ? AND (received < ? OR "
                        "received > ?) AND id NOT IN (SELECT value FROM json_each(?)) "
                        "ORDER BY id LIMIT ?",
                        (below, exp.wall_cutoff, future, leased_ids(conn, exp.leased),
                         EXPIRE_RECORDS)).fetchall()
    ids: list[int] = []
    events = 0
    for rid, n in rows:
        if ids and events + n > EXPIRE_EVENTS:
            break
        ids.append(rid)
        events += n
    return str(ids).replace(" ", ""), len(ids) < len(rows) or len(rows) == EXPIRE_RECORDS


def _received_by(conn: sqlite3.Connection, observed: int) -> tuple[int, int]:
    """The seq below which every event was received by agent-observed time ``observed``,
    and the time of the mark that says so (``observed`` or earlier)."""
    row = conn.execute("SELECT next_seq, observed FROM clock_marks WHERE observed <= ? "
                       "ORDER BY observed DESC LIMIT 1", (observed,)).fetchone()
    return (int(row[0]), int(row[1])) if row is not None else (0, observed)


# Each key of a JSON list [[id, events, bytes], ...] (a commit's deltas), with what its
# counts would be and what its records hold: those the deltas take to zero or below (or
# all, with ?2). The condition is on the key's row, so only theirs have records read.
_RECOUNT = ("SELECT s.id, s.depth + json_extract(j.value, '$[1]'), "
            "s.bytes + json_extract(j.value, '$[2]'), coalesce(sum(r.live), 0), "
            "coalesce(sum(r.bytes), 0) FROM json_each(?1) j JOIN streams s "
            "ON s.id = json_extract(j.value, '$[0]') LEFT JOIN records r ON r.stream = s.id "
            "WHERE ?2 OR s.depth + json_extract(j.value, '$[1]') <= 0 "
            "OR s.bytes + json_extract(j.value, '$[2]') <= 0 GROUP BY s.id")


def recount(conn: sqlite3.Connection, out: Outcome, ids: Sequence[int] = ()) -> None:
    """Count a key's queue again from its records (an index seek, then the key's rows)
    where its saved counts and ``out``'s deltas disagree with them: the difference joins
    ``out.streams``, and events a count held beyond the records are counted lost
    (dropped_corrupt: damage took them, or the count; the file cannot tell). The keys
    ``ids``, or else those whose counts ``out`` takes to zero or below: one statement,
    only for a commit that takes events out of a queue.

    Damage that garbles a count into another one a queue could hold (a flipped bit) is
    taken as it reads at the start: fewer than the records hold, it went below zero (or to
    zero with events left) once they were acked, and the key's later events were never
    sent; more, it never came back to zero, and whatever waits for an empty queue (a
    flush, a graceful stop) waited for ever. Checked where a commit takes a count to zero
    or below, and where a forwarder reads none of the events a count says are queued
    (Spool.recount): not at each start, where it is a read of every record."""
    keys = [[sid, *out.streams.get(sid, (0, 0))] for sid in ids] if ids else [
        [sid, d, b] for sid, (d, b) in out.streams.items() if d < 0 or b < 0]
    if not keys:
        return
    for sid, held, held_bytes, events, size in conn.execute(
            _RECOUNT, (str(keys).replace(" ", ""), bool(ids))).fetchall():
        if (held, held_bytes) == (events, size):
            continue
        d = out.streams.setdefault(sid, [0, 0])
        d[0] += events - held
        d[1] += size - held_bytes
        record(out.counters, Drop.DROPPED_CORRUPT, max(held - events, 0))
        out.recounted += 1


def recount_queue(conn: sqlite3.Connection, sid: int) -> Outcome:
    """Key ``sid``'s queue counted again from its records (``recount``), in a commit of
    its own if its counts disagree with them (Spool.recount)."""
    out = Outcome()
    with transaction(conn):
        recount(conn, out, [sid])
        if out.recounted:
            _save(conn, out.streams, out.counters)
    out.used_bytes = used_bytes(conn)
    return out


def say_recounted(out: Outcome) -> None:
    """Log the queues ``recount`` counted again, if any."""
    if out.recounted:
        log.error("spool: the queue count of %d key(s) disagreed with its records (damage): "
                  "counted again from them; %d events it held beyond them counted as %s",
                  out.recounted, out.counters.get(Drop.DROPPED_CORRUPT, 0), Drop.DROPPED_CORRUPT)


def _save(conn: sqlite3.Connection, streams: dict[int, list[int]], counters: Counts) -> None:
    """Persist depth and counter *changes* in the same transaction as the rows they count."""
    if streams:
        conn.executemany("UPDATE streams SET depth = depth + ?, bytes = bytes + ? WHERE id = ?",
                         [(d, b, sid) for sid, (d, b) in streams.items() if d or b])
    if counters:
        add_counters(conn, counters)


def _sum(a: Counts, b: Counts) -> Counts:
    """Keys of ``b``, each with a's value added (for saving both in one statement)."""
    return {k: a.get(k, 0) + v for k, v in b.items()}
