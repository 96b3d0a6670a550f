"""v1 -> v2: priority lanes (agent/families/lanes.py) for a spool written before them.

Records and dead letters get a ``lane``, normal unless ``classify`` finds a built-in
high event in them, and records are indexed by (stream, lane, id) instead of (stream,
id): each lane of a key is then one sequential read. Run inside migrate.py's transaction.
"""

from __future__ import annotations

import sqlite3

import orjson

from agent.families.event import NUCLEUS
from agent.families.lanes import HIGH, NORMAL, NUCLEUS_HIGH, SEGMENT_HIGH
from agent.families.nucleus import event_type
from agent.spool import records
from agent.spool.db import typed

# A lane per record and dead letter (normal until classify says otherwise),
# and the index each lane's reads go by instead of one per key.
V1_TO_V2 = (
    f"ALTER TABLE records ADD COLUMN lane INTEGER NOT NULL DEFAULT {NORMAL}",
    f"ALTER TABLE dead ADD COLUMN lane INTEGER NOT NULL DEFAULT {NORMAL}",
    "DROP INDEX records_stream",
    "CREATE INDEX records_lane ON records(stream, lane, id)",
)


def to_v2(conn: sqlite3.Connection) -> int:
    """Add the lanes to a v1 spool; returns how many rows went to the high lane."""
    for statement in V1_TO_V2:
        conn.execute(statement)
    return classify(conn)


def classify(conn: sqlite3.Connection) -> int:
    """Put in the high lane the records and dead letters of a spool from before lanes that
    hold a built-in high event (init, error, and their Segment equivalents); the rest stay
    normal. A whole record moves: its events keep their seqs and their order, so a
    Nucleus session's init queued before the upgrade still goes before that session's
    later events (high ones come after it in the high lane, normal ones after the high
    lane). Operators' rules (``priority_types``) are not applied: the spool does not know
    the config. Returns how many rows went high."""
    high: list[tuple[int]] = []
    for rid, family, n, gone, data in conn.execute(
            "SELECT id, family, n, gone, data FROM records"):
        # Damage (a value of another type, or bits that do not fit): left as it is, for
        # the start's check or the reader to drop, counted (db.load_state, reads.py).
        if not typed((n, data), (int, bytes)) or not records.acked_bits_fit(gone, n):
            continue
        try:
            bodies = records.unpack(data)
        except records.DamagedRecord:
            continue   # left as it is: the reader drops it, counted, when it meets it
        if any(_is_high(family, body) for o, body in enumerate(bodies[:n])
               if gone is None or not gone[o >> 3] & (1 << (o & 7))):
            high.append((rid,))
    conn.executemany(f"UPDATE records SET lane = {HIGH} WHERE id = ?", high)
    # A body of another type (damage) stays normal: its readers take it as they find it.
    dead = [(seq,) for seq, family, body in conn.execute("SELECT seq, family, body FROM dead")
            if isinstance(body, bytes) and _is_high(family, body)]
    conn.executemany(f"UPDATE dead SET lane = {HIGH} WHERE seq = ?", dead)
    return len(high) + len(dead)


def _is_high(family: int, body: bytes) -> bool:
    """Whether a stored body is a built-in high event (agent/families/lanes.py)."""
    if family == NUCLEUS:
        # Most events: no parse. `"error` without its closing quote: an old module's
        # `{"event": "error:<kind>"}` is an error too (nucleus.event_type).
        if b'"init"' not in body and b'"error' not in body:
            return False
    elif b"Application " not in body:
        return False
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(event, dict):
        return False
    if family == NUCLEUS:
        return event_type(event) in NUCLEUS_HIGH
    name = event.get("event")
    return event.get("type") == "track" and isinstance(name, str) and name in SEGMENT_HIGH
