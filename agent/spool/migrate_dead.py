"""v2 -> v3: the dead letters' summary (schema.DEAD_SUMMARY), counted once from the letters
of a spool written before it was kept; from then on its triggers keep it. Run inside
migrate.py's transaction."""

from __future__ import annotations

import sqlite3

from agent.spool.schema import DEAD_SUMMARY


def to_v3(conn: sqlite3.Connection) -> int:
    """Make the summary's tables and triggers, and fill them; returns how many groups."""
    for statement in DEAD_SUMMARY:
        conn.execute(statement)
    conn.execute("INSERT INTO dead_groups(reason, upstream, letters, oldest, newest) "
                 "SELECT reason, upstream, count(*), min(at), max(at) FROM dead "
                 "GROUP BY reason, upstream")
    conn.execute("INSERT INTO dead_times(grp, at, n) SELECT g.id, d.at, count(*) "
                 "FROM dead d JOIN dead_groups g ON g.reason = d.reason "
                 "AND g.upstream = d.upstream GROUP BY g.id, d.at")
    return int(conn.execute("SELECT count(*) FROM dead_groups").fetchone()[0])
