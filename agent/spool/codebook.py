"""The dictionary learned from the device's own events, that small records are packed with.

The built-in dictionary (dictionary.py) knows the APIs' field names; it cannot know an
app's event names, ids and values, so a lone event still took 0.9x its JSON on disk.
Once a backlog builds up, the writer takes the first LEARN_BYTES of small records'
events as samples and packs every small record after them with the built-in dictionary
followed by those samples (zstd's raw-content dictionary: nothing to train): a lone
bench event's record went from ~175 to ~43 bytes (bench/lone.py).

The dictionary is stored in the spool (``dicts``), named by its digest, before or with
the first record that needs it; every commit of records packed with it inserts it
again if it is missing (``INSERT OR IGNORE``: a lookup when it is there), so no record
can name one the file lacks. A trigger deletes every dictionary when the last record
goes: the samples are events, kept no longer than the queue that held them, and
the writer forgets its dictionary too (``Codebook.forget``). A device whose queue
empties before LEARN_BYTES of samples gather never writes one; one that holds a flush
interval's events writes one (~7 KB) each time its queue fills again, against the
4 KiB pages each commit writes anyway.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from agent.spool.dictionary import ZSTD_DICT_V1
from agent.spool.records import DICT_BELOW, Dictionaries, Learned, name

# Samples a dictionary is learned from. bench/lone.py's records (one bench event
# each): 2 samples took one from 175 to 43 bytes, 16 to 42. Varied events of six apps
# and a browser's: 2, 4, 8 and 16 KiB of samples all came to 0.25-0.26x their JSON, so
# the least that covers a few apps: fewer records before it, and less to store.
LEARN_BYTES = 4 * 1024

DICTS = (
    # n: the order they were learned in; id: the name records give (records.name).
    "CREATE TABLE dicts(n INTEGER PRIMARY KEY, id INTEGER NOT NULL UNIQUE, body BLOB NOT NULL)",
    # WHEN: one step to the table's first row, per record deleted.
    """CREATE TRIGGER dicts_unused AFTER DELETE ON records
    WHEN NOT EXISTS (SELECT 1 FROM records) BEGIN DELETE FROM dicts; END""",
)


class Codebook:
    """The learned dictionary the writer packs with (kept on the loop), and the samples
    for the next one."""

    def __init__(self) -> None:
        self.current: Learned | None = None
        self._samples: list[bytes] = []
        self._size = 0

    def sample(self, bodies: Sequence[bytes], size: int) -> None:
        """Take a new record's events (``size`` bytes) as samples if it is one that a
        dictionary serves and none is learned yet; learn one once there are enough."""
        if self.current is not None or size >= DICT_BELOW:
            return
        self._samples.extend(bodies)
        self._size += size
        if self._size >= LEARN_BYTES:
            # Nearest the end is cheapest to refer to: the samples after the built-in part.
            self.current = Learned.of(ZSTD_DICT_V1 + b"".join(self._samples)[:LEARN_BYTES])
            self._samples, self._size = [], 0

    def forget(self) -> None:
        """The queue is empty: no record needs the dictionary, and the spool dropped it."""
        self.resume(None)

    def resume(self, learned: Learned | None) -> None:
        """Go on with the dictionary a spool file holds (just opened)."""
        self.current = learned
        self._samples, self._size = [], 0


def save(conn: sqlite3.Connection, learned: Learned) -> None:
    """Store ``learned``, if it is not yet (in the caller's transaction)."""
    conn.execute("INSERT OR IGNORE INTO dicts(id, body) VALUES (?, ?)",
                 (learned.id, learned.body))


def newest(conn: sqlite3.Connection) -> Learned | None:
    """The dictionary the last run packed with, to go on with; None if none, or if damage
    changed it (its body no longer has its name, or either is garbled to another type): a
    new one is learned instead. Gone on with, a body changed lost every record packed
    with it after the restart too, and a garbled type failed every start."""
    row = conn.execute("SELECT id, body FROM dicts ORDER BY n DESC LIMIT 1").fetchone()
    if row is None or not isinstance(row[1], bytes) or name(row[1]) != row[0]:
        return None
    return Learned(row[0], row[1])


def lookup(conn: sqlite3.Connection) -> Dictionaries:
    """Where ``conn``'s file keeps its learned dictionaries, for records.unpack."""
    def body(dict_id: int) -> bytes | None:
        row = conn.execute("SELECT body FROM dicts WHERE id = ?", (dict_id,)).fetchone()
        # Garbled to another type: as lost as a missing one (its records DamagedRecord).
        return row[0] if row is not None and isinstance(row[0], bytes) else None
    return body
