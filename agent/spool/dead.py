"""Dead letters: summarise, list, show, export, retry and purge, each in one transaction.

The SQL here runs two ways: on a running agent's writer thread under the writer's lock
(dead_live.py), or on a stopped agent's spool file through ``Offline``, a connection in
exclusive locking mode that SQLite refuses while any other connection (an agent) has
the file open, and that keeps an agent from opening it meanwhile: never two writers.

A retry puts the dead letters back at the tail of their key's queue, with fresh seqs
(after everything queued now), in their old order; each keeps its dedupe key, so an
app's late resend of the same event is still a duplicate, while the retried event
itself goes through no dedupe (it is the same event, not a resend).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

import orjson

from agent.families.event import now_ms
from agent.families.lanes import HIGH, readable
from agent.logs import fingerprint
from agent.outcomes import Tally, record
from agent.paths import spool_file
from agent.spool import aside, migrate_dead
from agent.spool.commit import Outcome
from agent.spool.db import PAST, add_counters, keys_from_bytes, load_state, typed
from agent.spool.dedupe import MOVED_KEY, DedupeIndex, keys_to_bytes
from agent.spool.records import RECORD_EVENTS, pack
from agent.spool.salvage import is_fresh
from agent.spool.schema import (
    SEEN_SINCE,
    VERSION,
    SpoolTooNew,
    SpoolUnusable,
    blank,
    has_observed,
    open_read_only,
    readable_spool,
)

# Summaries on /status and the page: the newest reasons, not every one.
NEWEST_REASONS = 5
# Dead letters' bodies read at a time by an export page or a retry's step: dead letters can
# fill the spool, and a retry of all of them, or an export, must not hold them all at once.
STEP_BYTES = 4 * 1024 * 1024
END = (1 << 63) - 1  # above every seq: no bound
FIRST = -(1 << 63)  # below every seq


class DeadError(Exception):
    """A dead-letter operation that cannot run (spool busy or closed, nothing chosen)."""


class NoSuchLetter(DeadError):
    """No dead letter has that id."""


class NoSpool(DeadError):
    """No spool file yet (so no dead letters either)."""


@dataclass(frozen=True, slots=True)
class Which:
    """Which dead letters an operation takes: those of one ``reason``, or ``every`` one;
    with an ``upstream``, only those it refused (one row of `outpost dead list`, which
    groups by both: two upstreams may refuse in the same words)."""

    reason: str | None = None
    every: bool = False
    upstream: str | None = None

    def where(self) -> tuple[str, tuple[Any, ...]]:
        params: tuple[Any, ...]
        if self.reason is not None:
            where, params = "reason = ?", (self.reason,)
        elif self.every:
            where, params = "1", ()
        else:
            raise DeadError("name a reason (--reason R) or ask for all (--all)")
        if self.upstream is None:
            return where, params
        return f"{where} AND upstream = ?", (*params, self.upstream)


@dataclass(slots=True)
class Requeued:
    """What a retry committed, for a running agent to bring its memory up to it."""

    count: int
    next_seq: int
    records: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (id, n, keys)
    out: Outcome = field(default_factory=Outcome)
    last: int = FIRST   # the last seq taken: a next chunk need not read what is before it


# A body's size only of a blob: one garbled into another type is then no whole number.
_COLUMNS = ("seq, s.key, upstream, reason, at, received, "
            "CASE typeof(body) WHEN 'blob' THEN length(body) END")
# A LEFT JOIN: a letter whose key id damage garbled into one no key has is seen (_entry).
_LETTERS = "FROM dead LEFT JOIN streams s ON s.id = dead.stream"
_ENTRY = f"SELECT {_COLUMNS} {_LETTERS}"
_ENTRY_TYPES = (int, str, str, str, int, int, int)
# What a letter (or a group of them) garbled into another type is: damage, as the agent's
# start (db.load_state) and a salvage (which drops such a letter) take it. A running agent's
# read then salvages the spool (dead_live.read); a stopped one's is said damaged in one
# line. Read as it came, it failed the listing, or a JSON dump (a traceback, or a 500).
_GARBLED = "database disk image is malformed: a dead letter's value of another type"


def _entry(row: tuple[Any, ...]) -> dict[str, Any]:
    """A dead letter as every reader (list, show, export) shows it: its key as a
    fingerprint, as the tail shows keys (keys are credentials)."""
    if row[1] is None:
        _keyless()
    if not typed(row, _ENTRY_TYPES):
        raise sqlite3.DatabaseError(_GARBLED)
    seq, key, upstream, reason, at, received, size = row
    return {"id": seq, "key": fingerprint(key), "upstream": upstream, "reason": reason, "at": at,
            "received": received, "bytes": size}


@dataclass(frozen=True, slots=True)
class Now:
    """What the ages a listing shows count up to: the wall clock now, and the time the agent
    has seen pass (Spool.observed_ms; None without a running agent: it went with it)."""

    wall: int
    seen: int | None = None


def wall_now() -> Now:
    """A stopped agent's spool: its letters' ages by the wall clock alone."""
    return Now(now_ms())


def _age_s(now: Now, at: int, seen: int | None) -> float:
    """Seconds since a letter dead-lettered at wall time ``at``, agent-observed ``seen``:
    by the time the agent saw pass where it knows it (as the queue's oldest event's age,
    Spool.first_age_s), which a wall clock corrected since (from 1970, or from ten years
    ahead) does not make decades, nor 0; else by the wall clock, never below 0. Like
    expiry's, the agent's count leaves out the time it was stopped."""
    if now.seen is not None and seen is not None and seen > PAST:
        return round(max(0, now.seen - seen) / 1000, 1)
    return round(max(0, now.wall - at) / 1000, 1)


def aged(group: Mapping[str, Any], now: Now) -> dict[str, Any]:
    """A group as read (``_groups``) as the listings show it: its ages counted to ``now``
    (``oldest`` and ``newest`` stay the wall clock's readings, as recorded)."""
    shown = {k: v for k, v in group.items() if k not in ("first_seen", "last_seen")}
    shown["oldest_age_s"] = _age_s(now, group["oldest"], group["first_seen"])
    shown["newest_age_s"] = _age_s(now, group["newest"], group["last_seen"])
    return shown


# The summary the spool keeps (schema.DEAD_SUMMARY): the newest groups are the first rows
# of its index, however many letters there are. Newest by the agent-observed clock, then
# (for letters that do not say) by the wall clock.
_KEPT = ("SELECT coalesce(sum(letters), 0) FROM dead_groups",
         "SELECT reason, upstream, letters, oldest, newest, first_seen, last_seen "
         "FROM dead_groups ORDER BY last_seen DESC, newest DESC, reason, upstream LIMIT ?",
         "SELECT count(*) FROM dead_groups")


def _counted(seen: str) -> tuple[str, str, str]:
    """A spool an older agent wrote, read before an agent converts it (read-only), or one
    whose summary is damaged: every letter. ``seen``: a letter's agent-observed time (a
    spool an agent wrote before it kept it has no such column)."""
    return ("SELECT count(*) FROM dead",
            f"SELECT reason, upstream, count(*), min(at), max(at), min({seen}), max({seen}) "
            f"FROM dead GROUP BY reason, upstream ORDER BY max({seen}) DESC, max(at) DESC, "
            "reason, upstream LIMIT ?",
            "SELECT count(*) FROM (SELECT 1 FROM dead GROUP BY reason, upstream)")


def summary(conn: sqlite3.Connection, newest: int | None = None,
            kept: bool = True, now: Now | None = None) -> dict[str, Any]:
    """Counts grouped by (reason, upstream), newest first, aged to ``now`` (by the wall
    clock alone if None); ``newest`` caps the groups, and ``reasons`` says how many there
    are (each letter may have a reason of its own). ``kept``: the file's summary may be
    read (not ``summary_damaged``)."""
    total, groups, reasons = _KEPT if kept and _user_version(conn) >= SEEN_SINCE \
        else _counted(f"coalesce(observed, {PAST})" if has_observed(conn) else str(PAST))
    now = now or wall_now()
    return {"count": conn.execute(total).fetchone()[0],
            "groups": [aged(g, now) for g in _groups(conn, groups, newest)],
            "reasons": conn.execute(reasons).fetchone()[0]}


def of_reason(conn: sqlite3.Connection, reason: str, kept: bool = True) -> int:
    """How many dead letters have ``reason``: ``summary``'s newest groups may leave its
    out (one row per upstream, through the summary's UNIQUE(reason, upstream) index)."""
    return chosen(conn, Which(reason), kept)


def chosen(conn: sqlite3.Connection, which: Which, kept: bool = True) -> int:
    """How many dead letters ``which`` takes, from the summary's groups (their columns are
    the letters' own: one clause fits both) unless ``kept`` is False (damaged) or the
    file has none yet."""
    where, params = which.where()
    sql = (f"SELECT coalesce(sum(letters), 0) FROM dead_groups WHERE {where}"
           if kept and _user_version(conn) >= SEEN_SINCE
           else f"SELECT count(*) FROM dead WHERE {where}")
    return int(conn.execute(sql, params).fetchone()[0])


def summary_damaged(conn: sqlite3.Connection) -> bool:
    """Whether the file's summary disagrees with its letters (damage), which a stopped
    agent's listing then counts itself: read only, it cannot count the summary again as
    the agent's open and Offline do (migrate_dead.mend). An older agent's summary is not
    read (its letters are counted)."""
    return _user_version(conn) >= SEEN_SINCE and not migrate_dead.agrees(conn)


def newest_groups(conn: sqlite3.Connection, newest: int) -> list[dict[str, Any]]:
    """The ``newest`` (reason, upstream) groups of a running agent's spool, newest first,
    not aged (``aged``: /status keeps them until the letters change, and ages them at
    each poll): a few rows however many letters there are (/status reads them after
    each change)."""
    return _groups(conn, _KEPT[1], newest)


def _groups(conn: sqlite3.Connection, sql: str, newest: int | None) -> list[dict[str, Any]]:
    rows = conn.execute(sql, (-1 if newest is None else newest,)).fetchall()
    if not all(typed(row, (str, str, int, int, int, int, int)) for row in rows):
        raise sqlite3.DatabaseError(_GARBLED)   # the letters' own
    return [{"reason": r, "upstream": u, "count": n, "oldest": lo, "newest": hi,
             "first_seen": first, "last_seen": last} for r, u, n, lo, hi, first, last in rows]


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def entries(conn: sqlite3.Connection, which: Which | None, limit: int,
            now: Now | None = None) -> list[dict[str, Any]]:
    """Dead letters without their bodies, oldest first, each with its age to ``now`` (by
    the wall clock alone if None, as for a stopped agent's spool)."""
    where, params = which.where() if which else ("1", ())
    now = now or wall_now()
    seen = "observed" if now.seen is not None else "NULL"   # a running agent's: it has them
    rows = conn.execute(f"SELECT {_COLUMNS}, {seen} {_LETTERS} WHERE {where} ORDER BY seq "
                        "LIMIT ?", (*params, limit))
    listed = []
    for *row, observed in rows:
        entry = _entry(tuple(row))
        if observed is not None and not isinstance(observed, int):
            raise sqlite3.DatabaseError(_GARBLED)
        entry["age_s"] = _age_s(now, entry["at"], observed)
        listed.append(entry)
    return listed


def _body(raw: bytes) -> Any:
    if not isinstance(raw, bytes):
        raise sqlite3.DatabaseError(_GARBLED)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return bytes(raw).decode("utf-8", "replace")


def show(conn: sqlite3.Connection, seq: int) -> dict[str, Any]:
    """One dead letter with its body; DeadError if there is none with that id."""
    row = conn.execute(f"{_ENTRY} WHERE seq = ?", (seq,)).fetchone() if seq < 2**63 else None
    if row is None:
        raise NoSuchLetter(f"no dead letter with id {seq}")
    body = conn.execute("SELECT body FROM dead WHERE seq = ?", (seq,)).fetchone()[0]
    return {**_entry(row), "body": _body(body)}


def export(conn: sqlite3.Connection, after: int = 0, limit: int = -1,
           step_bytes: int = STEP_BYTES) -> tuple[bytearray, int]:
    """Dead letters with seq > ``after`` (at most ``limit``, and up to the one whose body
    reaches ``step_bytes``), oldest first, as JSON lines with their bodies; and the last
    seq written (``after`` if none)."""
    # One statement (one snapshot): letters deleted meanwhile (expiry, the size cap) are
    # simply not there, and an empty page means none are left. Appended one line at a
    # time: orjson hands back its whole working buffer, several times a large body's size.
    lines, last, size = bytearray(), after, 0
    for *row, body in conn.execute(
            f"SELECT {_COLUMNS}, body {_LETTERS} WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit)):
        lines += orjson.dumps({**_entry(tuple(row)), "body": _body(body)})
        lines += b"\n"
        last, size = row[0], size + len(body)
        if size >= step_bytes:
            break
    return lines, last


def _step(conn: sqlite3.Connection, where: str, params: tuple[Any, ...], after: int,
          step_bytes: int, letters: int) -> int:
    """The last seq of the next step through the dead letters ``where`` holds after
    ``after``: at most ``letters`` of them (all if negative), up to the one whose body
    reaches ``step_bytes`` (``after`` if there are none). Reads lengths, not bodies
    (inside the retry's transaction: one snapshot)."""
    last, size = after, 0
    for seq, nbytes in conn.execute(f"SELECT seq, length(body) FROM dead WHERE {where} "
                                    "AND seq > ? ORDER BY seq LIMIT ?",
                                    (*params, after, letters)):
        last, size = seq, size + nbytes
        if size >= step_bytes:
            break
    return int(last)


class Purged(NamedTuple):
    out: Outcome
    last: int   # the last seq deleted (``after`` if none): where the next chunk begins


def purge(conn: sqlite3.Connection, which: Which, below: int = END,
          letters: int = -1, after: int = FIRST) -> Purged:
    """Delete the chosen dead letters with ``after`` < seq < ``below``, the oldest
    ``letters`` of them (all if negative), inside the caller's transaction. The range is
    found first and the delete bounded by it: a chunk must not read again the letters of
    other reasons in front of its own."""
    where, params = which.where()
    last = conn.execute(f"SELECT max(seq) FROM (SELECT seq FROM dead WHERE {where} "
                        "AND seq > ? AND seq < ? ORDER BY seq LIMIT ?)",
                        (*params, after, below, letters)).fetchone()[0]
    n = 0 if last is None else conn.execute(
        f"DELETE FROM dead WHERE {where} AND seq > ? AND seq <= ?",
        (*params, after, last)).rowcount
    out = Outcome()
    record(out.counters, Tally.DEAD_PURGED, n)
    _count(conn, out)
    return Purged(out, after if last is None else last)


def letter_keys(conn: sqlite3.Connection, which: Which, below: int, letters: int,
                after: int, among: AbstractSet[int] | None = None) -> list[tuple[int, int]]:
    """(seq, dedupe key) of the oldest ``letters`` chosen dead letters with ``after`` <
    seq < ``below`` (all if negative): those a ``requeue`` of as many may take. With
    ``among``, only those whose key is in it (a whole spool's letters are not held)."""
    where, params = which.where()
    rows = conn.execute(f"SELECT seq, dkey FROM dead WHERE {where} AND seq > ? AND seq < ? "
                        "ORDER BY seq LIMIT ?", (*params, after, below, letters))
    return rows.fetchall() if among is None else [r for r in rows if r[1] in among]


def newest_letters(conn: sqlite3.Connection, below: int) -> dict[int, int]:
    """Of the keys several dead letters with seq < ``below`` share (an event refused again
    once its key was let go), the newest letter's seq, by key: a retry puts the key in
    that letter's record alone (``requeue``'s ``newest``), in whichever step it goes. Of
    every reason, not the retry's alone: an older letter retried first, by its reason,
    took the key, and the newer one's retry later found it held by a record newer than
    itself, took that for a copy stored again and left it there; the older record, first
    to expire, then took the key with it while the newer copy was queued."""
    rows = conn.execute("SELECT dkey, max(seq) FROM dead WHERE seq < ? "
                        "GROUP BY dkey HAVING count(*) > 1", (below,))
    return dict(rows.fetchall())


def requeue_stopped(conn: sqlite3.Connection, which: Which, window_ms: int,
                    max_keys: int) -> Requeued:
    """``requeue`` of every chosen dead letter of a stopped agent's spool (``Offline``).
    A letter whose key a newer copy of its event holds leaves it there, as a running
    agent's retry does (``DedupeIndex.held_since``), by the index the agent's start
    rebuilds (``load_state``, ``load_all``) and its expiry leaves: stored in the retried
    record, the key was the newest copy's to the next start's rebuild, and went when
    that record was dropped undelivered, within the copy's window. Built once for the
    command, at a start's cost: ~0.3-0.5 s and ~90 MB at a million keys stored."""
    state = load_state(conn, 0, max_keys)
    index = DedupeIndex(window_ms, max_keys)
    index.load_all(state.keys)
    index.expire(now_ms(), state.observed or 0)
    letters = letter_keys(conn, which, END, -1, FIRST, index.keys)
    return requeue(conn, which, state.next_seq, stay=index.held_since(letters),
                   newest=newest_letters(conn, END))


def requeue(conn: sqlite3.Connection, which: Which, next_seq: int,
            step_bytes: int = STEP_BYTES, below: int = END, letters: int = -1,
            steps: int = -1, after: int = FIRST, stay: AbstractSet[int] = frozenset(),
            newest: Mapping[int, int] = MappingProxyType({})) -> Requeued:
    """Move the chosen dead letters with ``after`` < seq < ``below`` back into their keys'
    queues from ``next_seq`` on (inside the caller's transaction), oldest first, about
    ``step_bytes`` of their bodies at a time: at most ``letters`` of them in at most
    ``steps`` steps (no bound if negative). ``done.last`` is where a next chunk begins.
    The letters whose seqs are in ``stay`` leave their dedupe keys where they are stored
    (with a copy of their event stored again: DedupeIndex.held_since); their places in
    the new records hold MOVED_KEY, as do those of a key a newer letter holds, of the
    step or in ``newest`` (``newest_letters``: of every dead letter, whatever the retry takes)."""
    where, params = which.where()
    done = Requeued(0, next_seq, last=after)
    while steps and (letters < 0 or done.count < letters):
        # ``below`` bounds the step only: on the DELETE, SQLite would take it for the
        # seq range's end and read every dead letter up to it, a chunk at a time.
        last = _step(conn, f"{where} AND seq < ?", (*params, below), after, step_bytes,
                     -1 if letters < 0 else letters - done.count)
        if last == after:
            break
        rows = conn.execute(f"DELETE FROM dead WHERE {where} AND seq > ? AND seq <= ? "
                            "RETURNING seq, stream, family, received, dkey, body, lane",
                            (*params, after, last)).fetchall()
        # Queued as they came, a body of text failed the retry, one of a number went as
        # that many NUL bytes, and a stream, time or key of text went into the queue.
        if not all(typed(row[:6], (int, int, int, int, int, bytes)) for row in rows):
            raise sqlite3.DatabaseError(_GARBLED)   # the caller's transaction undone
        after, steps = last, steps - 1
        done.last = last
        _requeue_step(conn, rows, done, stay, newest)
    conn.executemany("UPDATE streams SET depth = depth + ?, bytes = bytes + ? WHERE id = ?",
                     [(d, b, sid) for sid, (d, b) in done.out.streams.items()])
    record(done.out.counters, Tally.DEAD_RETRIED, done.count)
    _count(conn, done.out)
    return done


def _requeue_step(conn: sqlite3.Connection, rows: list[Any], done: Requeued,
                  stay: AbstractSet[int], newest: Mapping[int, int]) -> None:
    """Put one step's dead letters back as records from ``done.next_seq`` on."""
    rows.sort()  # RETURNING's order is not defined: keep the old FIFO order
    if any(conn.execute("SELECT 1 FROM streams WHERE id = ?", (sid,)).fetchone() is None
           for sid in {row[1] for row in rows}):
        _keyless()
    done.count += len(rows)
    # A key two letters hold (an event refused again once its key was let go) is stored
    # by the newest one's record alone, as the index knows it: the same bucket may hold
    # both records, where DedupeIndex.drop cannot tell which one the key came from. The
    # newest of the step's, or of the retry's (``newest``): a later step puts it there.
    last = {dkey: seq for seq, _, _, _, dkey, _, _ in rows}
    groups: list[tuple[int, int, int, int, list[int], list[bytes]]] = []
    for seq, stream, family, received, dkey, body, stored in rows:
        lane = readable(stored)   # one damage garbled: in no lane read, it would never go
        g = groups[-1] if groups else None
        # One record per run of one key, lane and family received together (expiry reads
        # a record's receipt time); the order of the old seqs is kept, so each lane's
        # retried events are in their old order at the tail of that lane.
        if g is None or g[:4] != (stream, lane, family, received) or len(g[5]) >= RECORD_EVENTS:
            g = (stream, lane, family, received, [], [])
            groups.append(g)
        g[4].append(MOVED_KEY if seq in stay or max(last[dkey], newest.get(dkey, 0)) != seq
                    else dkey)
        g[5].append(bytes(body))
    _unspend(conn, [(seq, dkey) for seq, _, _, _, dkey, _, _ in rows if seq not in stay])
    streams = done.out.streams
    for stream, lane, family, received, keys, bodies in groups:
        rid, n, size = done.next_seq, len(bodies), sum(map(len, bodies))
        conn.execute("INSERT INTO records(id, stream, family, n, received, live, bytes, dkeys, "
                     "data, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (rid, stream, family, n, received, n, size, keys_to_bytes(keys),
                      pack(bodies), lane))
        done.records.append((rid, n, [k for k in keys if k != MOVED_KEY]))
        done.next_seq += n
        d = streams.setdefault(stream, [0, 0])
        d[0] += n
        d[1] += size
        if lane == HIGH:
            done.out.high[stream] = done.out.high.get(stream, 0) + n
            done.out.high_in[stream] = done.out.high_in.get(stream, 0) + n


def _keyless() -> NoReturn:
    """A dead letter whose key id names no key: damage garbled it. Joined to the keys, the
    listings left it out while counting it, and a retry put it in a record of no key's
    queue, never sent nor counted. Damage as a malformed page is: the caller moves the
    file aside and salvages it, which counts that letter lost (it has no key to go to)."""
    raise sqlite3.DatabaseError("database disk image is malformed: a dead letter of no key")


def _unspend(conn: sqlite3.Connection, letters: list[tuple[int, int]]) -> None:
    """Take the keys of retried letters (seq, key) out of their old records, now that
    their new records store them: each key stored once, the file's forgetting of it is
    counted once (dedupe_forgotten). Out of a ``spent`` row; in a record still queued,
    whose keys are in its events' order, its place holds MOVED_KEY instead."""
    gone: dict[int, set[int]] = {}
    moved: dict[int, dict[int, int]] = {}   # a queued record's id: place -> key
    for seq, key in letters:
        row = conn.execute("SELECT id, n FROM records WHERE id <= ? ORDER BY id DESC LIMIT 1",
                           (seq,)).fetchone()
        if row is not None and seq < row[0] + row[1]:
            moved.setdefault(row[0], {})[seq - row[0]] = key
            continue
        row = conn.execute("SELECT id FROM spent WHERE id <= ? ORDER BY id DESC LIMIT 1",
                           (seq,)).fetchone()
        if row is not None:
            gone.setdefault(row[0], set()).add(key)
    for rid, places in moved.items():
        (blob,) = conn.execute("SELECT dkeys FROM records WHERE id = ?", (rid,)).fetchone()
        stored = keys_from_bytes(blob)
        for at, key in places.items():
            if at < len(stored) and stored[at] == key:
                stored[at] = MOVED_KEY
        conn.execute("UPDATE records SET dkeys = ? WHERE id = ?", (keys_to_bytes(stored), rid))
    for rid, keys in gone.items():
        (blob,) = conn.execute("SELECT dkeys FROM spent WHERE id = ?", (rid,)).fetchone()
        stored = keys_from_bytes(blob)
        kept = [k for k in stored if k not in keys]
        if not kept:
            conn.execute("DELETE FROM spent WHERE id = ?", (rid,))
        elif len(kept) < len(stored):
            conn.execute("UPDATE spent SET dkeys = ? WHERE id = ?", (keys_to_bytes(kept), rid))


def _count(conn: sqlite3.Connection, out: Outcome) -> None:
    add_counters(conn, out.counters)


def no_salvage_pending(path: Path, running: bool = False) -> None:
    """DeadError when the spool at ``path`` is the fresh one of a salvage not finished: the
    letters are in the file moved aside until an agent's start copies them in, and read
    or changed here, the fresh file's would pass for all of them. ``running``: an agent
    holds the spool (starting: it salvages before it answers), and needs no start."""
    moved = waiting_salvage(path)
    if moved is None:
        return
    if running:
        raise DeadError(f"an agent is running on the spool {path} and salvaging it: it found "
                        f"it damaged and moved it to {moved}, whose dead letters it copies "
                        "back before it answers; run this again once it does")
    raise DeadError(f"a salvage of the spool {path} is pending: the agent found it damaged "
                    f"and moved it to {moved}, whose dead letters it copies back at its "
                    "next start; start the agent (`outpost run`, or the service), then "
                    "run this again")


def waiting_salvage(path: Path) -> Path | None:
    """The file moved aside by a salvage that the next start finishes (aside.waiting); None
    when there is none. Not when the spool at ``path`` is no fresh one waiting for it
    (salvage.is_fresh, as the start checks): one the salvage committed into, whose marker
    could not be removed, or one holding data of its own; a start leaves either as it is.
    None too when the marker's directory cannot be read: the spool's own read says so,
    and why."""
    try:
        found = aside.waiting(spool_file(path))   # where the agent moves it aside
    except OSError:
        return None
    if found is None:
        return None
    moved, clear = found
    if clear:   # the path holds no spool of its own yet: cleared by the start
        return moved
    try:
        conn = read_only(path)
    except (DeadError, sqlite3.Error):   # none made yet, or unreadable: the start's to say
        return moved
    except OSError:   # not this user's to read: the spool's own read says so, and why
        return None
    try:
        return moved if is_fresh(conn) else None
    except sqlite3.Error:   # not a spool's tables: the start's to judge
        return moved
    finally:
        conn.close()


def read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to a spool file: safe beside a running agent (WAL)."""
    none = NoSpool(f"no agent answering, and no spool yet at {path}")
    try:
        if not readable_spool(path):
            raise none
        conn = open_read_only(path)
    except SpoolUnusable as exc:
        raise DeadError(str(exc)) from exc
    if blank(conn):
        conn.close()
        raise none
    return conn


def newest_reasons(path: Path) -> list[dict[str, Any]]:
    """The newest reasons of a spool no agent is serving (none if there is no spool)."""
    try:
        conn = read_only(path)
    except NoSpool:
        return []
    try:
        # A damaged summary counted from the letters, as `outpost dead list` does: read as
        # it is, a value garbled into another type broke the status table.
        # The letters' own of another type: shown as unreadable (_groups).
        return list(summary(conn, NEWEST_REASONS, kept=not summary_damaged(conn))["groups"])
    finally:
        conn.close()


class Offline:
    """A stopped agent's spool, held exclusively: ``with Offline(path) as conn:`` runs one
    transaction that no agent can share. DeadError if an agent has the file open."""

    def __init__(self, path: Path, timeout_s: float = 0.5) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.conn: sqlite3.Connection | None = None
        self.mended = False   # the letters' summary was counted again (migrate_dead.mend)

    def __enter__(self) -> sqlite3.Connection:
        none = DeadError(f"no spool at {self.path}")
        try:
            if not readable_spool(self.path):
                raise none
        except SpoolUnusable as exc:
            raise DeadError(str(exc)) from exc
        # Said before SQLite tries: it fails on either with an I/O error, or cannot open
        # the file, which reads as an agent holding it, or as a spool it cannot read.
        if blocked := next((p for p in (self.path, self.path.parent)
                            if not os.access(p, os.W_OK)), None):
            which = "it" if blocked == self.path else f"its directory {blocked}"
            raise DeadError(f"cannot change the spool {self.path}: {which} is not writable "
                            "by this user (its mode, or a read-only filesystem); run the "
                            "command as the agent's user")
        # Read-only first: closing a read-write connection to a newer agent's file would
        # checkpoint the WAL it left behind (read_only raises DeadError for such a file).
        try:
            read_only(self.path).close()
        except NoSpool:   # an empty file
            raise none from None
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as exc:
            conn.close()
            raise DeadError(f"the spool {self.path} is in use ({exc}): an agent has it open, "
                            "but did not answer at the configured listen address") from exc
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found != VERSION:   # written by an older agent (not converted yet), or a newer one
            conn.execute("ROLLBACK")
            conn.close()
            if found > VERSION:   # made newer since read_only looked
                raise DeadError(str(SpoolTooNew(str(self.path), found, VERSION)))
            raise DeadError(f"the spool {self.path} is format v{found}, older than this "
                            f"agent's (v{VERSION}): start the agent once (it converts it), "
                            "then try again")
        try:   # as the agent's open does: a summary damage garbled failed letters' deletes
            self.mended = migrate_dead.mend(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        self.conn = conn
        return conn

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            conn.close()
