"""v2 -> v3: the dead letters' summary (schema.DEAD_SUMMARY), counted once from the letters
of a spool written before it was kept; from then on its triggers keep it. Run inside
migrate.py's transaction. And counted again (``mend``) where damage garbled it."""

from __future__ import annotations

import sqlite3

from agent.spool.schema import DEAD_SUMMARY


def to_v3(conn: sqlite3.Connection) -> int:
    """Make the summary's tables and triggers, and fill them; returns how many groups."""
    for statement in DEAD_SUMMARY:
        conn.execute(statement)
    _fill(conn)
    return int(conn.execute("SELECT count(*) FROM dead_groups").fetchone()[0])


def mend(conn: sqlite3.Connection) -> bool:
    """Count the summary again from the letters, inside the caller's transaction, if its
    totals disagree with their number (damage garbled a row); whether it did. A group's
    count above its letters' failed the delete of its last one (its times gone: NOT NULL
    failed on ``oldest``), and so every expiry, of the queue's events too; one past the
    int64 maximum failed every listing. The totals are sums of the summary's rows; the
    count by group, a sort of every letter, only when they disagree."""
    letters = conn.execute("SELECT count(*) FROM dead").fetchone()[0]
    try:
        kept = conn.execute("SELECT (SELECT coalesce(sum(letters), 0) FROM dead_groups), "
                            "(SELECT coalesce(sum(n), 0) FROM dead_times)").fetchone()
    except sqlite3.OperationalError:   # a sum past the int64 maximum
        kept = None
    # A count of another type sums as a real number, whatever its value.
    if kept is not None and all(type(n) is int and n == letters for n in kept):
        return False
    conn.execute("DELETE FROM dead_times")
    conn.execute("DELETE FROM dead_groups")
    _fill(conn)
    return True


def _fill(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO dead_groups(reason, upstream, letters, oldest, newest) "
                 "SELECT reason, upstream, count(*), min(at), max(at) FROM dead "
                 "GROUP BY reason, upstream")
    conn.execute("INSERT INTO dead_times(grp, at, n) SELECT g.id, d.at, count(*) "
                 "FROM dead d JOIN dead_groups g ON g.reason = d.reason "
                 "AND g.upstream = d.upstream GROUP BY g.id, d.at")
