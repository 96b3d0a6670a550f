"""Priority lanes' cost: `python -m bench.micro_lanes [--events N] [--rounds R] [--high-every K]`.

1. The drain's read: N Nucleus events (bench/payloads.py) appended in 100-event group
   commits, then read back as a forwarder reads them (2,000 rows a read, one cursor per
   lane), as CPU µs per event of the whole process. Twice per round, interleaved: every
   event normal (the same-run reference: one lane, as before lanes), and every K-th
   event high (each commit group split into two records, two index ranges per read).
2. The v1 -> v2 conversion: the same N events (every K-th high) in a spool rewritten to
   the v1 layout, then ``migrate.upgrade`` timed on it; same-run reference: ``VACUUM`` of
   a copy of that file (one rewrite of the whole file).

Bounded: stops by itself. Files in bench/out/micro_lanes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import time
from pathlib import Path

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.migrate import upgrade

from .payloads import NUCLEUS_EVENT
from .procs import ROOT

WHERE = ROOT / "bench" / "out" / "micro_lanes"
TO_V1 = ("DROP INDEX records_lane", "ALTER TABLE records DROP COLUMN lane",
         "ALTER TABLE dead DROP COLUMN lane", "CREATE INDEX records_stream ON records(stream, id)",
         "PRAGMA user_version = 1")


async def filled(path: Path, n: int, every: int) -> Spool:
    """A spool of ``n`` events, every ``every``-th an ``error``, high (0: none)."""
    spool = await Spool.open(StorageConfig(path=str(path), max_size_mb=4096))
    error = NUCLEUS_EVENT.replace('"type":"event"', '"type":"error"')

    def event(i: int) -> Event:
        high = every and i % every == 0
        return Event("n", NUCLEUS, dedupe_key("n", i),
                     ((error if high else NUCLEUS_EVENT) % (i, 7)).encode(), i,
                     lane=HIGH if high else NORMAL)

    for first in range(0, n, 3200):   # 32 concurrent 100-event requests
        await asyncio.gather(*(spool.append([event(i) for i in range(start, min(start + 100, n))])
                               for start in range(first, min(first + 3200, n), 100)))
    return spool


async def read_cost(n: int, every: int) -> float:
    """CPU µs per event of reading the whole queue as a forwarder does."""
    path = WHERE / f"read-{every}.db"
    for old in WHERE.glob(f"read-{every}.db*"):
        old.unlink()
    spool = await filled(path, n, every)
    try:
        sid, cursors, done = spool.streams["n"].id, [0, 0], 0
        start = time.process_time()
        while rows := await spool.fetch(sid, cursors, 2000):
            for r in rows:
                cursors[r.lane] = r.seq
            done += len(rows)
        assert done == n, (done, n)
        return (time.process_time() - start) * 1e6 / n
    finally:
        await spool.close()


async def migration(n: int, every: int) -> tuple[float, float]:
    """Seconds of the v1 -> v2 conversion, and of VACUUM of a copy (the reference)."""
    path = WHERE / "v1.db"
    for old in WHERE.glob("v1.db*"):
        old.unlink()
    await (await filled(path, n, every)).close()
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in TO_V1:
        conn.execute(statement)
    conn.close()
    copy = WHERE / "copy.db"
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy, isolation_level=None)
    start = time.perf_counter()
    conn.execute("VACUUM")
    vacuum = time.perf_counter() - start
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    start = time.perf_counter()
    upgrade(conn)
    took = time.perf_counter() - start
    high = conn.execute("SELECT count(*) FROM records WHERE lane = ?", (HIGH,)).fetchone()[0]
    conn.close()
    assert not every or high, "no record went high"
    return took, vacuum


async def main(args: argparse.Namespace) -> None:
    shutil.rmtree(WHERE, ignore_errors=True)
    WHERE.mkdir(parents=True)
    runs: dict[int, list[float]] = {0: [], args.high_every: []}
    for _ in range(args.rounds):
        for every in runs:
            runs[every].append(await read_cost(args.events, every))
    for every, costs in runs.items():
        label = "every event normal (reference)" if not every else f"1 in {every} high"
        print(f"read, {label:32s} {statistics.median(costs):5.2f} CPU µs/event "
              f"(runs: {', '.join(f'{c:.2f}' for c in costs)})", flush=True)
    took, vacuum = await migration(args.events, args.high_every)
    print(f"v1 -> v2 conversion of {args.events} queued events: {took:.2f} s "
          f"({took * 1e6 / args.events:.1f} µs/event); VACUUM of a copy: {vacuum:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--high-every", type=int, default=10)
    asyncio.run(main(parser.parse_args()))
