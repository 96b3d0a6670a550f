"""The SQL of a dead-letter retry and purge (agent/spool/dead.py) on a real spool file:
any mix of keys, families and receipt times comes back in its old order, at the tail."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.spool import dead
from agent.spool.db import keys_from_bytes, load_state, transaction
from agent.spool.records import unpack
from agent.spool.schema import SCHEMA

Letter = tuple[int, int, int, bytes, str]  # stream, family, received, body, reason
letters = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 1), st.integers(1, 3),
                             st.binary(min_size=1, max_size=40), st.sampled_from("ab")),
                   max_size=40)


def spool_with(path: Path, rows: list[Letter], queued: int) -> sqlite3.Connection:
    """A fresh spool file: three keys, ``queued`` events' worth of seqs already taken by
    one live record, then the dead letters (seqs after it, dedupe key = seq * 7)."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    # A file thrown away: creating its tables fsynced each, 40 ms an example.
    conn.execute("PRAGMA synchronous = OFF")
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO streams(id, key) VALUES (?, ?)",
                     [(i, f"k{i}") for i in (1, 2, 3)])
    conn.execute("INSERT INTO records(id, stream, family, n, received, live, bytes, dkeys, "
                 "data) VALUES (1, 1, 0, ?, 0, ?, 0, x'', x'')", (queued, queued))
    conn.executemany("INSERT INTO dead(seq, stream, family, received, dkey, body, upstream, "
                     "reason, at) VALUES (?, ?, ?, ?, ?, ?, 'up', ?, 0)",
                     [(queued + 1 + i, s, f, r, (queued + 1 + i) * 7, b, why)
                      for i, (s, f, r, b, why) in enumerate(rows)])
    return conn


@settings(max_examples=40, deadline=None)
@given(rows=letters, queued=st.integers(1, 5), reason=st.sampled_from(["a", None]),
       step=st.sampled_from([1, 60, dead.STEP_BYTES]))
# Two steps on one key: each wrote the running total of depth and bytes (review).
@example(rows=[(1, 0, 1, b"x", "a"), (1, 0, 1, b"y", "a")], queued=1, reason=None, step=1)
def test_retry_puts_letters_at_the_tail_in_their_order(
        tmp_path_factory: pytest.TempPathFactory, rows: list[Letter], queued: int,
        reason: str | None, step: int) -> None:
    path = tmp_path_factory.mktemp("spool") / "spool.db"
    conn = spool_with(path, rows, queued)
    chosen = [(queued + 1 + i, r) for i, r in enumerate(rows) if reason in (None, r[4])]
    start = load_state(conn, 0, 0).next_seq
    assert start == queued + len(rows) + 1
    # An export in pages of ``step`` bytes: every letter once, in order.
    exported: list[int] = []
    after = 0
    while (page := dead.export(conn, after, 1000, step))[1] != after:
        exported += [orjson.loads(line)["id"] for line in page[0].splitlines()]
        after = page[1]
    assert exported == [queued + 1 + i for i in range(len(rows))]
    with transaction(conn):
        # In steps of ``step`` bytes of bodies: one letter at a time, a few, all at once.
        done = dead.requeue(conn, dead.Which(reason, reason is None), start, step)
    assert done.count == len(chosen) and done.next_seq == start + len(chosen)
    back = conn.execute("SELECT id, stream, family, received, n, live, bytes, dkeys, data "
                        "FROM records WHERE id >= ? ORDER BY id", (start,)).fetchall()
    got = []
    expect_id = start
    for rid, stream, family, received, n, live, nbytes, dkeys, data in back:
        assert rid == expect_id and n == live  # contiguous seqs, all live
        expect_id += n
        bodies = unpack(data)
        assert nbytes == sum(map(len, bodies))
        got += [(stream, family, received, body, key)
                for body, key in zip(bodies, keys_from_bytes(dkeys))]
    assert got == [(s, f, r, b, seq * 7) for seq, (s, f, r, b, _) in chosen]
    depth = {sid: (d, b) for sid, d, b in conn.execute("SELECT id, depth, bytes FROM streams")}
    for sid in (1, 2, 3):
        assert depth[sid] == (sum(1 for _, r in chosen if r[0] == sid),
                              sum(len(r[3]) for _, r in chosen if r[0] == sid))
    left = [seq for (seq,) in conn.execute("SELECT seq FROM dead ORDER BY seq")]
    assert left == [queued + 1 + i for i, r in enumerate(rows) if reason not in (None, r[4])]
    retried = conn.execute("SELECT value FROM counters WHERE name = 'dead_retried'").fetchone()
    assert (retried[0] if retried else 0) == len(chosen)
    conn.close()


def test_purge_takes_one_reason_or_all_and_never_none(tmp_path: Path) -> None:
    conn = spool_with(tmp_path / "spool.db", [(1, 0, 1, b"x", "a"), (2, 0, 1, b"y", "b"),
                                              (1, 0, 1, b"z", "a")], 1)
    with pytest.raises(dead.DeadError):
        dead.Which().where()  # neither a reason nor all: nothing is purged by default
    with transaction(conn):
        assert dead.purge(conn, dead.Which("a")).out.counters == {"dead_purged": 2}
    assert [r for (r,) in conn.execute("SELECT reason FROM dead")] == ["b"]
    with transaction(conn):
        dead.purge(conn, dead.Which(every=True))
    assert conn.execute("SELECT count(*) FROM dead").fetchone()[0] == 0
    assert conn.execute("SELECT value FROM counters WHERE name = 'dead_purged'").fetchone() == (3,)
    conn.close()
