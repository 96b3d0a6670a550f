"""The spool's SQL, run on the spool's own database threads.

Each SQLite connection lives on one dedicated thread, and a whole group
commit (dead letters, acks, size cap, inserts, depth and counter updates,
COMMIT) is one plain function run there: one thread hop per commit instead
of one per statement. Measured with `python -m bench`, the per-statement hops
(about eight per commit through aiosqlite) were what kept single-event ingest
at a quarter of the aiohttp ceiling: every hop waits for a turn of the busy
event loop. The functions here touch only the connection and the plain data
they are given, never the Spool's in-memory state, which stays on the loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import floordiv, is_, itemgetter
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar

from agent.families.lanes import HIGH, NORMAL
from agent.outcomes import COUNT_MAX, Counts, Tally, from_names
from agent.spool.codebook import newest
from agent.spool.dedupe import MOVED_KEY, StoredKeys, keys_to_bytes, moved_keys
from agent.spool.records import RECORD_EVENTS, Learned

T = TypeVar("T")

PAST = -(1 << 62)  # an agent-observed time before any other
# More events, or bytes, than any queue holds (seqs stay below it): a depth or size this
# large is damage, which a commit's sum would overflow.
MOST = 1 << 62
# The receipt times a date can be written for (years 1 to 9999: event.iso_ms), in ms: one
# past them is damage, which failed its events' mapping (dead-lettered as corrupt rows).
EARLIEST_MS, LATEST_MS = -62_135_596_800_000, 253_402_300_799_999
BUSY_TIMEOUT_MS = 5000  # how long a connection waits for another's lock
# Rows fetched at a time as a spool opens, each batch taken apart in C loops: 8 MB of keys
# at most, were they all full records (RECORD_EVENTS keys).
READ_ROWS = 1024

# Whether a record is in a lane no forwarder reads (damage garbled it: a number, text,
# NULL): counted in its queue's depth, it was never sent, nor dropped for room. Three
# ranges of the lane index (schema.LANE_INDEX) around the two lanes, and its first entry
# (NULL sorts first), not a scan of the records. NULL asked for by that entry's type: a
# comparison with NULL is never true (the range below HIGH met one only because SQLite
# reads a NOT NULL column's index from its start), and ``lane IS NULL`` of a NOT NULL
# column SQLite answers false without reading.
ASTRAY = (f"SELECT EXISTS (SELECT 1 FROM records WHERE lane < {HIGH}) OR EXISTS (SELECT 1 "
          f"FROM records WHERE lane > {HIGH} AND lane < {NORMAL}) OR EXISTS (SELECT 1 FROM "
          f"records WHERE lane > {NORMAL}) OR coalesce((SELECT typeof(lane) FROM "
          "records ORDER BY lane LIMIT 1), '') = 'null'")

# Whether a record is in no key's queue, or a key's queue has events and no record: damage
# garbled a record's stream id (a sign bit flipped, say). Its events were never sent nor
# counted; all of a key's, and the start forgot the key, its queue gone unsaid. The lane
# index's two ends, a seek of it per key for the ids between that key's and the next's (a
# bit set: 1 read as 513, between keys 1 and 1024), and one per key with events: not a
# scan of the records (a record moved into another key's queue is not seen). The seeks
# between keys, at 1M records: ~2.5 ms for 1,000 keys, ~25 ms for 10,000 (a scan of the
# index, ~80-100 ms).
ORPHANED = ("SELECT EXISTS (SELECT 1 FROM (SELECT (SELECT min(stream) FROM records) AS s "
            "UNION ALL SELECT (SELECT max(stream) FROM records)) WHERE s IS NOT NULL AND s "
            "NOT IN (SELECT id FROM streams)) OR EXISTS (SELECT 1 FROM streams s WHERE EXISTS "
            "(SELECT 1 FROM records WHERE stream > s.id AND stream < coalesce((SELECT min(id) "
            f"FROM streams WHERE id > s.id), {MOST}))) OR EXISTS (SELECT 1 FROM streams "
            "WHERE depth > 0 AND NOT EXISTS (SELECT 1 FROM records WHERE stream = streams.id))")


class Signal:
    """A flag one thread sets and the loop waits for (SqliteThread.hand_over): a raw lock,
    held while the flag is down. A ``threading.Event`` is a Condition in Python: made,
    set twice, cleared and waited for, a commit's two took ~50k instructions without a
    wait (a single call's share ~7k, 3%: callgrind), these a few hundred each. Set by
    one thread only; a wait that sees it set takes it down again (its waiter is the only
    one)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        # Only the setter releases, so a lock seen held stays held until it does.
        if self._lock.locked():
            self._lock.release()

    def clear(self) -> None:
        self._lock.acquire(False)

    def wait(self, timeout: float) -> bool:
        """Whether it was set within ``timeout`` s (taken down again if so)."""
        return self._lock.acquire(True, timeout)


class SqliteThread:
    """One SQLite connection owned by one thread; ``run`` calls ``fn(conn, *args)`` there.

    A thread of its own fed by a SimpleQueue, answering each call with one
    ``call_soon_threadsafe``: a one-worker executor's submit and its future's chaining
    to asyncio cost ~56k instructions a commit (callgrind, RESULTS.md run 10 ingest).
    Calls run in order; a call cancelled before its turn is not run (as an executor's).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: SimpleQueue[_Call | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._pending = 0                  # calls queued and not yet answered
        self._taken = Signal()             # set as the thread takes a call

    async def open(self, path: Path, script: str,
                   setup: Callable[[sqlite3.Connection], None] | None = None) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.executescript(script)
                if setup is not None:
                    setup(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        # A daemon: a spool never closed (a crash on the way out) must not hold the exit.
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        self._conn = await self._call(connect)

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("spool connection is closed")
        return self._call(fn, conn, *args)

    async def close(self) -> None:
        """Close the connection after every call queued before, then end the thread."""
        conn, self._conn = self._conn, None
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            await self._call(_close, conn)
        except sqlite3.Error:
            pass
        finally:
            self._calls.put(None)
            thread.join()  # at most its last call's return: the queue holds nothing else

    def hand_over(self, within: float, until: Signal | None = None) -> None:
        """Block the caller (the loop), the GIL let go, until this thread has taken the call
        just queued, or with ``until`` until the call sets it; for at most ``within`` s, and
        not at all while an earlier call is unanswered (it would wait behind that call).

        A thread woken while the loop is busy waits for the GIL until the loop next sleeps:
        CPython hands the GIL to a waiting thread only after an interval in which its holder
        did not take it back, and uvloop takes it back between every two callbacks. Each
        statement of a call lets the GIL go and waits so to get it back. Under single-event
        load a group commit waited ~0.6 ms before its first statement, longer than the commit
        took (bench/RESULTS.md run 25)."""
        if self._pending == 1:
            (until or self._taken).wait(within)

    def _call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending += 1
        fut.add_done_callback(self._answered)
        self._taken.clear()
        self._calls.put((fut, fn, args))
        return fut

    def _answered(self, _: asyncio.Future[Any]) -> None:
        self._pending -= 1

    def _serve(self) -> None:
        get, taken = self._calls.get, self._taken
        while True:
            call = get()
            taken.set()
            if call is None:
                return
            _answer(*call)
            del call  # its arguments (a commit's events) are not kept until the next call


async def whole(chunk: Awaitable[T]) -> T:
    """A chunk is committed and booked in memory together: cancelled (a request's task,
    the agent stopping), it still finishes, and the cancellation holds from there. Its
    call, once the thread took it, commits whatever the caller does."""
    task = asyncio.ensure_future(chunk)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


_Call = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _answer(fut: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run one call on the connection's thread and hand its outcome to the caller's loop."""
    if fut.cancelled():  # read across threads: at worst it runs, as once started
        return
    settle: Callable[[asyncio.Future[Any], Any], None]
    try:
        settle, value = _set_result, fn(*args)
    except BaseException as exc:  # the caller's to handle, as from an executor
        settle, value = _set_exception, exc
    try:
        fut.get_loop().call_soon_threadsafe(settle, fut, value)
    except RuntimeError:  # its loop is closed: nobody waits for the answer
        pass
    del value  # an exception's traceback holds this frame: no cycle through its locals


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.cancelled():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.cancelled():
        fut.set_exception(exc)


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        conn.close()


def mark(conn: sqlite3.Connection, observed: int, next_seq: int,
         before: tuple[int, int] | None = None) -> None:
    """Record that every event below ``next_seq`` was received by agent-observed time
    ``observed`` (the latest mark is also where that time resumes at the next start).

    ``before``: the (observed, next seq) of the last commit that stored events and wrote
    no mark (Books.unmarked), marked first. Marked only by this one, which can be long
    after it (the next commit's, expiry's or a stop's, the device asleep in between: the
    agent's clock counts it, the loop's timers do not), its events read as received then
    and were kept that much past max_age_days. Not over a mark of that time, whose seq
    may be higher."""
    if before is not None:
        conn.execute("INSERT OR IGNORE INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                     before)
    conn.execute("INSERT OR REPLACE INTO clock_marks(observed, next_seq) VALUES (?, ?)",
                 (observed, next_seq))


def add_counters(conn: sqlite3.Connection, counters: Counts) -> None:
    """Add counts to the file's (in the caller's transaction), up to COUNT_MAX: past it
    SQLite's sum is a real number, which the next start skips (a count lost)."""
    conn.executemany("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) "
                     f"DO UPDATE SET value = min(value + excluded.value, {COUNT_MAX})",
                     [(k, v) for k, v in counters.items() if v])


def advance_mark(conn: sqlite3.Connection, observed: int, next_seq: int) -> None:
    """Move the latest clock mark up to (``observed``, ``next_seq``), or write it if none.

    Seqs must never go back (a Nucleus uplink sends an event without an id under its
    seq): the next start numbers from above every seq still in the file, and a commit
    that deletes the last trace of the newest seqs (records delivered with no keys kept
    in ``spent``, dropped, or spent keys forgotten) records them here. Moving the mark,
    rather than adding one, keeps one row per minute (MARK_EVERY_MS); it still says
    something true, only later: events since the mark before it count as received by
    ``observed``, at most a minute late, so they never expire early.
    """
    if not conn.execute("UPDATE clock_marks SET observed = max(observed, ?), next_seq = "
                        "max(next_seq, ?) WHERE observed = (SELECT max(observed) FROM "
                        "clock_marks) AND observed > ?", (observed, next_seq, PAST)).rowcount:
        mark(conn, observed, next_seq)


def start_clock(conn: sqlite3.Connection, next_seq: int) -> None:
    """First open of a spool without clock marks (new, or from before them): events
    already queued are judged by the wall clock alone, as they were when received."""
    if next_seq > 1:
        mark(conn, PAST, next_seq)


@dataclass(slots=True)
class State:
    """What an opened spool holds, read at startup on the writer's thread."""

    next_seq: int
    streams: list[tuple[int, str, int, int]]     # (id, key, depth, bytes)
    counters: Counts
    dead: int                                     # dead letters (then counted in memory)
    used_bytes: int
    observed: int | None                          # agent-observed ms; None: no clock marks
    live: tuple[array[int], array[int], array[int]]   # live records: ids, sizes, observed
    keys: StoredKeys                              # the newest dedupe keys
    high: dict[int, int]                          # stream id -> events queued in its high lane
    learned: Learned | None                       # the dictionary small records are packed with
    released: int                                 # the max_hold_h release's bound (keep_released)


def forget_idle_streams(conn: sqlite3.Connection) -> int:
    """Drop the keys that hold nothing: no queued events, no dead letters. Each known key
    stays in memory and counts toward listen.max_keys, so without this every key a device
    ever met would, for good. Only at a start: nothing holds a stream yet. Dedupe keys name
    the key, not its stream, so a key that comes back is still deduplicated.

    A write at the start, which a spool that can be read must not wait for: on a disk too
    full for it, it raises, and the caller opens the spool as is."""
    with transaction(conn):
        # Not one whose depth says it holds events: its records are elsewhere (damage),
        # and load_state has the file salvaged, which counts them by that depth.
        return conn.execute("DELETE FROM streams WHERE depth = 0 AND id NOT IN (SELECT stream "
                            "FROM records) AND id NOT IN (SELECT stream FROM dead)").rowcount


def load_state(conn: sqlite3.Connection, now_observed: int, max_keys: int) -> State:
    """The state of an opened spool, with the newest ``max_keys`` dedupe keys (or a record
    more). ``now_observed`` stands for the receipt time of records newer than the last
    clock mark (later than it was: kept, not forgotten, early).

    A value damage garbled into another type, which SQLite reads without complaint (the
    tables are not STRICT), is damage as a malformed page is: the caller moves the file
    aside and salvages it (writer.is_corruption). Taken as it came, it failed every start."""
    try:
        return _load_state(conn, now_observed, max_keys)
    except (TypeError, ValueError) as exc:
        raise sqlite3.DatabaseError(f"database disk image is malformed: {exc}") from exc


def _load_state(conn: sqlite3.Connection, now_observed: int, max_keys: int) -> State:
    top = conn.execute(
        "SELECT max(coalesce((SELECT max(id + n - 1) FROM records), 0), "
        "coalesce((SELECT max(seq) FROM dead), 0), "
        "coalesce((SELECT max(id + length(dkeys) / 8 - 1) FROM spent), 0), "
        "coalesce((SELECT max(next_seq) - 1 FROM clock_marks), 0))").fetchone()[0]
    streams = conn.execute("SELECT id, key, depth, bytes FROM streams").fetchall()
    if not all(typed(row, (int, str, int, int)) for row in streams):  # used on the loop
        raise TypeError("a queue's row holds a value of another type")
    # Below zero too (a flipped sign bit): that depth never came back to 0, and once the
    # key's loop ended, its later events (a queue read as less than none) were not sent.
    if any(not (0 <= depth < MOST and 0 <= size < MOST) for _, _, depth, size in streams):
        raise ValueError("a queue's depth or size is below zero or past any count")
    counters = from_names(conn.execute("SELECT name, value FROM counters").fetchall())
    dead = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
    observed = observed_ms(conn)
    marks = conn.execute("SELECT next_seq, observed FROM clock_marks ORDER BY next_seq").fetchall()
    if not all(typed(m, (int, int)) for m in marks):
        raise TypeError("a clock mark holds a value of another type")
    if conn.execute(ASTRAY).fetchone()[0]:   # salvaged into the normal lane
        raise ValueError("a record is in a lane no forwarder reads")
    if conn.execute(ORPHANED).fetchone()[0]:   # a salvage counts them lost
        raise ValueError("a record is in no key's queue, or a queue counts events it holds "
                         "no record of")
    latest = now_observed if observed is None else max(observed, now_observed)
    live, keys = _read_records(conn, marks, latest, max_keys)
    released = conn.execute("SELECT value FROM counters WHERE name = ?",
                            (RELEASED_NAME,)).fetchone()
    return State(top + 1, streams, counters, dead, used_bytes(conn), observed, live, keys,
                 dict(conn.execute(f"SELECT stream, sum(live) FROM records WHERE lane = {HIGH} "
                                   "GROUP BY stream").fetchall()),
                 newest(conn),
                 # Garbled by damage: none, as in a spool saved before it was kept.
                 released[0] if released is not None and isinstance(released[0], int) else 0)


def typed(row: Sequence[Any], types: Sequence[Any]) -> bool:
    """Whether each value of ``row`` has its column's type: damage can garble one into
    another, or NULL, and SQLite reads it back as that."""
    return all(isinstance(v, t) for v, t in zip(row, types))


# Not a count, in the counters table (from_names skips it): the dedupe_max_keys the keys
# were last loaded under, for a start under a lower one to count the keys it leaves out.
CAP_NAME = "dedupe_max_keys"
# Nor this: the last seq of the max_hold_h release under way (agent/sync/monitor.py), so that
# the next start goes on with it rather than release afresh, up to what is queued then.
RELEASED_NAME = "sync_released"


def keep_released(conn: sqlite3.Connection, seq: int) -> None:
    """Save ``seq`` as the bound of the release under way; 0: none is."""
    with transaction(conn):
        if seq:
            conn.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) "
                         "DO UPDATE SET value = excluded.value", (RELEASED_NAME, seq))
        else:
            conn.execute("DELETE FROM counters WHERE name = ?", (RELEASED_NAME,))


def lower_cap(conn: sqlite3.Connection, keys: StoredKeys, max_keys: int,
              since_wall: int) -> int:
    """Count as forgotten (dedupe_forgotten) the keys a run under a higher dedupe_max_keys
    remembered that ``max_keys`` leaves out of ``keys`` (the newest, as loaded): those of
    the records and spent rows before them received since ``since_wall`` (older ones the
    window let go, uncounted), the newest first, up to that cap. Saved with ``max_keys``
    as the cap now; returns how many. A start under the same cap counts none: the run
    that stored the keys it leaves out counted them as its index let them go."""
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (CAP_NAME,)).fetchone()
    if row is not None and not isinstance(row[0], int):
        row = None   # garbled by damage: unknown, as in a spool saved before it was
    if row is not None and row[0] == max_keys:
        return 0
    forgotten = 0
    # The last run's cap, less the keys in the window that this one's loads too. Places
    # that hold MOVED_KEY (dead.py: a retried letter's key, stored in its new record) are
    # no keys, there or in the records left out.
    room = 0 if row is None or row[0] < max_keys else row[0] - sum(
        n for n, wall in zip(keys.counts, keys.wall) if wall >= since_wall)
    if room and moved_keys(keys.blob):   # rare: a record at a time only then
        room += sum(moved_keys(bytes(view)) for view, wall, _, _ in keys if wall >= since_wall)
    if room > 0:
        first = keys.ids[0] if keys.ids else 1 << 62
        # dkeys only of a record that may hold a placeholder (instr: at any byte).
        cols = "id, length(dkeys) / 8, CASE WHEN instr(dkeys, ?) THEN dkeys END"
        moved = keys_to_bytes([MOVED_KEY])
        rows = conn.execute(
            f"SELECT {cols} FROM records WHERE id < ? AND received >= ? "
            f"UNION ALL SELECT {cols} FROM spent WHERE id < ? AND received >= ? "
            "ORDER BY 1 DESC", (moved, first, since_wall, moved, first, since_wall))
        while forgotten < room and (chunk := rows.fetchmany(READ_ROWS)):
            forgotten += sum(n - (moved_keys(blob) if blob else 0) for _, n, blob in chunk)
        rows.close()
        forgotten = min(forgotten, room)
    with transaction(conn):
        add_counters(conn, {Tally.DEDUPE_FORGOTTEN: forgotten})
        conn.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) "
                     "DO UPDATE SET value = excluded.value", (CAP_NAME, max_keys))
    return forgotten


def _receipts(ids: array[int], marks: list[tuple[int, int]], latest: int) -> array[int]:
    """When each record (``ids`` ascending) was received by agent-observed time: at the
    first clock mark after it, or ``latest`` after the last (later than it was: kept, not
    forgotten, early). A mark's records are a run of ``ids``, filled at once."""
    received, start = array("q"), 0
    mark = bisect_right(marks, (ids[0], 1 << 63)) if ids else len(marks)  # after ids[0]
    while start < len(ids) and mark < len(marks):
        next_seq, observed = marks[mark]
        end = bisect_left(ids, next_seq, start)
        received += array("q", (observed,)) * (end - start)
        start, mark = end, mark + 1
    received += array("q", (latest,)) * (len(ids) - start)
    return received


def _read_records(conn: sqlite3.Connection, marks: list[tuple[int, int]], latest: int,
                  max_keys: int) -> tuple[tuple[array[int], array[int], array[int]], StoredKeys]:
    """The live records (ids, sizes, receipt times), and the dedupe keys stored beside the
    newest records, spent ones too, up to the first that reaches ``max_keys``: a backlog's
    keys all at once would take memory the cap is there to bound.

    One pass, newest first, a batch of rows at a time taken apart in C loops: a spool of
    one-event records has a row per event. Records older than the keys kept are read on
    their own after."""
    ids, sizes, parts = array("q"), array("q"), []  # newest first, reversed at the end
    counts, wall, seen, kept = array("q"), array("q"), array("q"), array("q")
    held = 0
    spent = conn.execute("SELECT EXISTS (SELECT 1 FROM spent)").fetchone()[0]
    rows = conn.execute(  # only spent rows say when they were received
        "SELECT id, dkeys, received, n, NULL, live, bytes, stream FROM records " + (
            "UNION ALL SELECT id, dkeys, received, 0, observed, 0, 0, 0 FROM spent " if spent
            else "") + "ORDER BY 1 DESC")
    # Not many more rows than the cap still takes, were they as wide as the last batch's
    # widest (a full record at first).
    widest = RECORD_EVENTS
    while held < max_keys and (chunk := rows.fetchmany(
            min(READ_ROWS, (max_keys - held) // widest + 1))):
        blobs = list(map(itemgetter(1), chunk))   # keys: by the bytes stored, whatever n says
        keys = array("q", map(floordiv, map(len, blobs), repeat(8)))
        widest = max(1, max(keys))
        # MOVED_KEY places (a retried letter's key, stored in its new record) are no keys:
        # counted against the cap, they kept the oldest keys of the window out, under it.
        real = keys if not moved_keys(b"".join(blobs)) else array(
            "q", (n - moved_keys(blob) for n, blob in zip(keys, blobs)))
        before = list(accumulate(real, initial=held))
        taken = bisect_left(before, max_keys, 0, len(chunk))  # each while under the cap
        chunk, held = chunk[:taken], before[taken]
        _integers(chunk, 5, 6, 7)
        record_ids = array("q", map(itemgetter(0), chunk))
        kept.extend(record_ids)
        given = list(map(itemgetter(4), chunk))
        queued = list(map(is_, given, repeat(None)))
        ids.extend(compress(record_ids, queued))
        sizes.extend(compress(map(itemgetter(3), chunk), queued))
        _dated(compress(map(itemgetter(2), chunk), queued))   # records' (not spent rows')
        del blobs[taken:]
        blobs.reverse()
        parts.append(b"".join(blobs))
        counts += keys[:taken]
        wall.extend(map(itemgetter(2), chunk))
        if not any(queued):   # spent records say when they were received
            seen.extend(given)
            continue
        record_ids.reverse()   # records, by the clock marks
        received = _receipts(record_ids, marks, latest)
        received.reverse()
        seen.extend([r if g is None else g for g, r in zip(given, received)] if spent else received)
    rows.close()
    for column in (ids, sizes, counts, wall, seen, kept):
        column.reverse()
    if held >= max_keys:
        older = conn.execute("SELECT id, n, received, live, bytes, stream FROM records "
                             "WHERE id < ? ORDER BY id",
                             (ids[0] if ids else 1 << 62,))
        head_ids, head_sizes = array("q"), array("q")
        while chunk := older.fetchmany(READ_ROWS):
            _integers(chunk, 3, 4, 5)
            head_ids.extend(map(itemgetter(0), chunk))
            head_sizes.extend(map(itemgetter(1), chunk))
            _dated(map(itemgetter(2), chunk))
        ids, sizes = head_ids + ids, head_sizes + sizes
    return (ids, sizes, _receipts(ids, marks, latest)), \
        StoredKeys(b"".join(reversed(parts)), counts, wall, seen, kept)


def _integers(rows: list[Any], live: int, size: int, stream: int) -> None:
    """TypeError unless the records' ``live``, ``bytes`` and ``stream`` (those columns of
    ``rows``) are integers, checked in C loops. Garbled into another type, the counts
    failed every commit that acked or dropped the record (and answered the apps posting
    beside it 503), its batch sent again and again; the salvage counts them again from
    the events. A stream of another type is no queue a read finds, while its depth counts
    the record: the salvage keeps records of known queues alone."""
    for column in (live, size, stream):
        array("q", map(itemgetter(column), rows))


def _dated(received: Iterable[Any]) -> None:
    """TypeError for a receipt time of another type, ValueError for one past any date: a
    chunk at a time, in C loops (an array of them all would take 8 bytes a record)."""
    times = array("q", received)
    if times and (min(times) < EARLIEST_MS or max(times) > LATEST_MS):
        raise ValueError("a record's receipt time is past any date")


def keys_from_bytes(data: bytes) -> array[int]:
    """Dedupe keys as stored beside a record (dedupe.keys_to_bytes)."""
    keys = array("q")
    keys.frombytes(data)
    if sys.byteorder != "little":
        keys.byteswap()
    return keys


def observed_ms(conn: sqlite3.Connection) -> int | None:
    """Where agent-observed time resumes; None for a spool without clock marks."""
    marks, latest = conn.execute("SELECT count(*), max(observed) FROM clock_marks").fetchone()
    return max(int(latest), 0) if marks else None  # 0 when only the PAST mark is there


def used_bytes(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT (SELECT page_count FROM pragma_page_count()) - "
                       "(SELECT freelist_count FROM pragma_freelist_count()), "
                       "(SELECT page_size FROM pragma_page_size())").fetchone()
    return int(row[0] * row[1]) if row else 0


# The main database's file as bytes: SQLite hands a name back as text, which it cannot do
# for one that is not UTF-8 (a directory named in another encoding).
MAIN_FILE = "SELECT CAST(file AS BLOB) FROM pragma_database_list WHERE name = 'main'"


def main_file(conn: sqlite3.Connection) -> str:
    """The path of ``conn``'s database file, as the OS names it."""
    return os.fsdecode(conn.execute(MAIN_FILE).fetchone()[0])


def fetch_all(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[Any]:
    return conn.execute(sql, params).fetchall()


@contextmanager
def transaction(conn: sqlite3.Connection,
                committing: Signal | None = None) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; rolled back and re-raised on any error. ``committing``
    is set as the COMMIT starts."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        if committing is not None:
            committing.set()
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
