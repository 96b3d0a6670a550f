"""v2 -> v3: the dead letters' summary (schema.DEAD_SUMMARY), counted once from the letters
of a spool written before it was kept; from then on its triggers keep it. v3-v5 -> v6:
the summary's agent-observed times (``to_v6``), counted once from the letters. Run inside
migrate.py's transaction. And counted again (``mend``) where damage garbled it."""

from __future__ import annotations

import sqlite3

from agent.spool.db import PAST
from agent.spool.schema import DEAD_ORDER, DEAD_SEEN, DEAD_SUMMARY, DEAD_TRIGGERS

# The groups whose first and last times are checked at each open: the newest, as many as
# a listing shows (GET /dead and `outpost dead list` show the 10,000 newest:
# ops/shared_terms.LIST_LIMIT), each two seeks in dead_times (~10 ms for all of them).
# Every group's took a pass over dead_times grouped (0.3-0.7 s at 300,000 groups).
CHECKED_GROUPS = 10_000
# A shown group whose first or last time is not its letters' (damage the sums do not
# see: the listing showed it, and ordered the groups by it, until the group's next change),
# or whose reason or upstream is no text (/status failed on it, a 500 at every request).
_MISTIMED = ("SELECT count(*) FROM (SELECT id, oldest, newest, first_seen, last_seen, reason, "
             "upstream FROM dead_groups ORDER BY last_seen DESC, newest DESC, reason, upstream "
             "LIMIT ?) g "
             "WHERE oldest IS NOT (SELECT min(at) FROM dead_times WHERE grp = g.id) "
             "OR newest IS NOT (SELECT max(at) FROM dead_times WHERE grp = g.id) "
             "OR first_seen IS NOT (SELECT min(seen) FROM dead_seen WHERE grp = g.id) "
             "OR last_seen IS NOT (SELECT max(seen) FROM dead_seen WHERE grp = g.id) "
             "OR typeof(reason) != 'text' OR typeof(upstream) != 'text'")
_SEEN = f"coalesce(observed, {PAST})"   # as the triggers count a letter that does not say


def to_v3(conn: sqlite3.Connection) -> int:
    """Make the summary's tables and triggers, and fill them; returns how many groups."""
    for statement in DEAD_SUMMARY:
        conn.execute(statement)
    _fill(conn)
    return int(conn.execute("SELECT count(*) FROM dead_groups").fetchone()[0])


def to_v6(conn: sqlite3.Connection) -> None:
    """Give a v3-v5 summary its agent-observed times, counted from the letters (with
    ``dead.observed``: migrate.py adds it first to a spool without it), and the triggers
    and order that keep and read them; its groups and wall times are left as they are."""
    for column in ("first_seen", "last_seen"):
        conn.execute(f"ALTER TABLE dead_groups ADD COLUMN {column} INTEGER")
    conn.execute(DEAD_SEEN)
    _fill_seen(conn)
    conn.execute("UPDATE dead_groups SET "
                 "first_seen = (SELECT min(seen) FROM dead_seen WHERE grp = dead_groups.id), "
                 "last_seen = (SELECT max(seen) FROM dead_seen WHERE grp = dead_groups.id)")
    for dropped in ("TRIGGER dead_in", "TRIGGER dead_out", "INDEX dead_groups_newest"):
        conn.execute(f"DROP {dropped}")
    for statement in (DEAD_ORDER, *DEAD_TRIGGERS):
        conn.execute(statement)


def mend(conn: sqlite3.Connection, letters: int | None = None) -> bool:
    """Count the summary again from the letters, inside the caller's transaction, if it
    disagrees with them (damage garbled a row); whether it did. ``letters``: their
    number, if the caller counted them. A group's count above its times' (or its times
    another's) failed the delete of its last letter (NOT NULL failed on ``oldest``), and
    so every expiry, of the queue's events too; a count past the int64 maximum failed
    every listing. Checked by sums, one pass over each table (a check by group took 3-5
    times as long with a group per letter: up to ~1 s a start at a million): the groups'
    counts, the wall times' and the agent-observed times' each sum to the letters' number,
    and each count weighted by its group's id sums as the times' do, which a group's count
    or a time's group garbled alone changes. And the newest groups' first and last times
    of both clocks (``CHECKED_GROUPS``) against their times'. The count by group, a sort of every letter, only when one
    fails."""
    if agrees(conn, letters):
        return False
    _refill(conn)
    return True


def agrees(conn: sqlite3.Connection, letters: int | None = None) -> bool:
    """Whether the summary agrees with the letters, by ``mend``'s sums (read only: a
    stopped agent's listing counts the letters themselves when it does not)."""
    if letters is None:
        letters = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
    try:
        found = [conn.execute(f"SELECT coalesce(sum({count}), 0), coalesce(sum({count} * "
                              f"{group}), 0) FROM {table}").fetchone()
                 for table, count, group in (("dead_groups", "letters", "id"),
                                             ("dead_times", "n", "grp"),
                                             ("dead_seen", "n", "grp"))]
    except sqlite3.OperationalError:   # a sum past the int64 maximum
        return False
    # A count of another type sums as a real number, whatever its value.
    return all(type(v) is int for row in found for v in row) and found[0] == found[1] \
        and found[0] == found[2] and found[0][0] == letters \
        and conn.execute(_MISTIMED, (CHECKED_GROUPS,)).fetchone()[0] == 0


def _refill(conn: sqlite3.Connection) -> None:
    for table in ("dead_seen", "dead_times", "dead_groups"):
        conn.execute(f"DELETE FROM {table}")
    _fill(conn)


def _fill(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO dead_groups(reason, upstream, letters, oldest, newest, first_seen, "
                 f"last_seen) SELECT reason, upstream, count(*), min(at), max(at), min({_SEEN}), "
                 f"max({_SEEN}) FROM dead GROUP BY reason, upstream")
    conn.execute("INSERT INTO dead_times(grp, at, n) SELECT g.id, d.at, count(*) "
                 "FROM dead d JOIN dead_groups g ON g.reason = d.reason "
                 "AND g.upstream = d.upstream GROUP BY g.id, d.at")
    _fill_seen(conn)


def _fill_seen(conn: sqlite3.Connection) -> None:
    conn.execute(f"INSERT INTO dead_seen(grp, seen, n) SELECT g.id, {_SEEN}, count(*) "
                 "FROM dead d JOIN dead_groups g ON g.reason = d.reason "
                 f"AND g.upstream = d.upstream GROUP BY g.id, {_SEEN}")
