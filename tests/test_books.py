"""The books add up: every event the spool stored is, at any time, queued, acked, a dead
letter, or gone with a reason (docs/operations.md, "Counters"), whatever happened to it.

A real spool at a 1 MB cap is driven through appends with resends, partial acks, dead
letters, their retry and purge, the cap (reject and drop_oldest), acks and dead letters
of events the cap dropped meanwhile, all of these in one group commit, records found
damaged, expiry and restarts; after each step its counters must account for every
event, and its queue and dead letters agree with the file's; and every dedupe key the
file let go while the index still remembers it is counted in dedupe_forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import CLOCK
from agent.families.errors import Invalid
from agent.families.event import SEGMENT, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool, dead, dead_live
from agent.spool.db import keys_from_bytes
from agent.spool.types import SpoolFull
from tests.conftest import SCRATCH

DAY_MS = 86_400_000
KEYS = ("a", "b")

# (kind, key, first, n): what each step does with the key's events numbered from first.
Step = tuple[str, int, int, int]
steps = st.lists(st.tuples(
    st.sampled_from(["small", "big", "big", "ack", "ack", "dead", "late", "rush", "rush",
                     "damage", "retry", "purge", "age", "reopen"]),
    st.integers(0, len(KEYS) - 1), st.integers(0, 60), st.integers(1, 25)), max_size=14)


def body(key: str, i: int, big: bool) -> bytes:
    """A ~100 KB event that packs to half (big: a dozen pass the cap), or a small one."""
    pad = random.Random(f"{key}-{i}").randbytes(50_000 if big else 8).hex()
    return orjson.dumps({"messageId": f"{key}-{i}", "pad": pad})


def accounts(spool: Spool) -> tuple[int, int, int, int]:
    """Both sides of each identity: (stored, where they are), (dead-lettered, where)."""
    c = {name: spool.counters.get(name, 0) for name in (
        "ingested", "acked", "dead_lettered", "expired", "dropped_full", "dropped_corrupt",
        "dead_retried", "dead_purged", "dead_dropped_full", "dead_expired",
        "dead_dropped_corrupt")}
    return (c["ingested"] + c["dead_retried"],
            spool.depth + c["acked"] + c["dead_lettered"] + c["expired"] + c["dropped_full"]
            + c["dropped_corrupt"],
            c["dead_lettered"],
            spool.dead_count + c["dead_retried"] + c["dead_purged"] + c["dead_dropped_full"]
            + c["dead_expired"] + c["dead_dropped_corrupt"])


def in_file(path: Path) -> tuple[dict[int, int], int]:
    """Events queued by key (its id) and dead letters kept, as the file says."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return (dict(db.execute("SELECT stream, sum(live) FROM records GROUP BY stream "
                                "HAVING sum(live) > 0")),
                db.execute("SELECT count(*) FROM dead").fetchone()[0])


def forgotten_by_the_file(path: Path, spool: Spool) -> int:
    """Keys the index remembers that the file no longer stores (beside a record or as
    spent): forgotten early, each counted in dedupe_forgotten when the file let it go."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        stored = {k for (blob,) in db.execute("SELECT dkeys FROM records UNION ALL "
                                               "SELECT dkeys FROM spent")
                  for k in keys_from_bytes(blob)}
    return len(spool.index.keys - stored)


def in_books(spool: Spool) -> tuple[dict[int, int], int]:
    """The same, as the spool's books say."""
    assert spool.depth == sum(s.depth for s in spool.streams.values())
    return {s.id: s.depth for s in spool.streams.values() if s.depth}, spool.dead_count


async def run(path: Path, when_full: str, plan: list[Step]) -> None:
    cfg = StorageConfig(path=str(path), max_size_mb=1, when_full=when_full, sync="normal",
                        max_age_days=1)
    spool = await Spool.open(cfg)
    opened = 0   # dedupe_forgotten when the spool was opened
    try:
        for kind, k, first, n in plan:
            key = KEYS[k]
            stream = spool.streams.get(key)
            if kind in ("small", "big"):
                with contextlib.suppress(SpoolFull, Invalid):   # full, or larger than it
                    await spool.append([Event(key, SEGMENT, dedupe_key(key, i),
                                              body(key, i, kind == "big"))
                                        for i in range(first, first + n)])
            elif kind in ("ack", "dead", "late") and stream is not None:
                rows = await spool.fetch(stream.id, 0, 2 * n)
                seqs = [r.seq for r in rows][first % 3::2]   # a part, not all
                if kind == "late":   # settled after appends that may have dropped them
                    other = KEYS[1 - k]
                    done = await asyncio.gather(*(spool.append([Event(
                        other, SEGMENT, dedupe_key(other, i), body(other, i, True))])
                        for i in range(first, first + n)), return_exceptions=True)
                    assert all(isinstance(r, int | SpoolFull | Invalid) for r in done), done
                    kind = "ack" if first % 2 else "dead"
                if kind == "ack":
                    await spool.ack(seqs)
                else:
                    await spool.dead_letter([(s, "up", "HTTP 400: no") for s in seqs])
            elif kind == "rush" and stream is not None:   # all at once, in one group commit
                seqs = [r.seq for r in await spool.fetch(stream.id, 0, 2 * n)]
                other = KEYS[1 - k]
                done = await asyncio.gather(
                    spool.ack(seqs[::3]), spool.dead_letter([(s, "up", "HTTP 400: no")
                                                             for s in seqs[1::3]]),
                    spool.append([Event(other, SEGMENT, dedupe_key(other, i),
                                        body(other, i, True)) for i in range(first, first + n)]),
                    spool.append([Event(key, SEGMENT, dedupe_key(key, i), body(key, i, False))
                                  for i in range(first, first + n)]),
                    dead_live.retry(spool, dead.Which(every=True)), spool.prune(),
                    return_exceptions=True)
                assert all(isinstance(r, int | None | SpoolFull | Invalid) for r in done), done
            elif kind == "damage" and stream is not None:   # a record found unreadable
                with contextlib.closing(sqlite3.connect(path)) as db, db:
                    db.execute("UPDATE records SET data = x'00' WHERE id = (SELECT id FROM "
                               "records WHERE stream = ? ORDER BY id LIMIT 1 OFFSET ?)",
                               (stream.id, first % 3))
                await spool.fetch(stream.id, 0, 1000)
                other = KEYS[1 - k]   # the commit that drops it
                await spool.append([Event(other, SEGMENT, dedupe_key(other, "after", first),
                                          body(other, first, False))])
            elif kind == "retry":
                await dead_live.retry(spool, dead.Which(every=True))
            elif kind == "purge":
                await dead_live.purge(spool, dead.Which(every=True))
            elif kind == "age":   # past max_age_days by both clocks
                CLOCK.passed_ms += 61_000   # a clock mark between what came and what comes
                await spool.append([Event(key, SEGMENT, dedupe_key(key, "mark", first),
                                          body(key, first, False))])
                CLOCK.passed_ms += 2 * DAY_MS
                CLOCK.wall_shift_ms += 2 * DAY_MS
                await spool.prune()
            elif kind == "reopen":
                await spool.close()
                spool = await Spool.open(cfg)
                opened = spool.counters.get("dedupe_forgotten", 0)
            stored, where, dead_lettered, dead_where = accounts(spool)
            assert stored == where, (kind, spool.counters, spool.depth)
            assert dead_lettered == dead_where, (kind, spool.counters, spool.dead_count)
            assert in_file(path) == in_books(spool), kind
            # None missed: expiry lets counted ones go too (past the window: not early).
            assert forgotten_by_the_file(path, spool) <= (
                spool.counters.get("dedupe_forgotten", 0) - opened), kind
    finally:
        await spool.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["reject", "drop_oldest"]), steps)
def test_every_event_stored_is_queued_acked_dead_or_gone_with_a_reason(
        when_full: str, plan: list[Step]) -> None:
    try:
        with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
            asyncio.run(run(Path(tmp) / "spool.db", when_full, plan))
    finally:
        CLOCK.wall_shift_ms = CLOCK.passed_ms = 0
