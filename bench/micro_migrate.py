"""The one-off v0 -> v1 migration, alone: `python -m bench.micro_migrate [--events N]`.

Builds a v0 spool (the pre-issue-11 layout: one row per event) of N ~204-byte Segment
events over 4 keys in 100-event group commits, a tenth of them acked (tombstones), and
times ``migrate.upgrade`` on it: the first start of the new agent on a device that
kept a backlog. Same-run reference: ``VACUUM`` of a copy of the same v0 file (one
rewrite of the whole file, which the migration also ends with). Prints seconds, µs per
event, the file's size before and after, and this process's peak RSS (the build
streams its rows: the peak is the migration's, or the VACUUM's).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from agent.families.event import SEGMENT
from agent.spool.migrate import upgrade
from bench.micro_records import segment_event
from tests.spool_files import Stored, build_v0


def rows(events: int) -> Iterator[tuple[Stored, int | None]]:
    rng = random.Random(7)
    for seq in range(1, events + 1):
        received = 1_796_000_000_000 + seq // 100 * 10
        yield (Stored(seq, 1 + seq % 4, SEGMENT, received, rng.getrandbits(63),
                      segment_event(rng, seq)), received + 5 if seq % 10 == 0 else None)


def build(path: Path, events: int) -> None:
    build_v0(path, rows(events), marks=[(60_000 * (i + 1), i * events // 10 + 1) for i in range(1, 11)],
             streams=[(i, f"key-{i}") for i in range(1, 5)], counters=[("ingested", events)])


def timed(path: Path, fn: str) -> float:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        start = time.perf_counter()
        if fn == "upgrade":
            upgrade(db)
        else:
            db.execute("VACUUM")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        v0, ref = Path(tmp) / "v0.db", Path(tmp) / "ref.db"
        build(v0, args.events)
        shutil.copy(v0, ref)
        before = v0.stat().st_size
        vacuum = timed(ref, "vacuum")
        took = timed(v0, "upgrade")
        after = v0.stat().st_size
    n = args.events
    print(f"{n} events in v0: {before / n:.0f} B/event; migrated: {after / n:.0f} B/event")
    print(f"migrate: {took:.2f} s ({took / n * 1e6:.1f} µs/event); "
          f"reference VACUUM of the v0 file: {vacuum:.2f} s ({vacuum / n * 1e6:.1f} µs/event)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
