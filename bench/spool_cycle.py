"""The spool alone, a whole cycle: `python -m bench.spool_cycle [--events N] [--seconds S]`.

No HTTP: 32 concurrent appends of 100 bench events (bench/payloads.py, distinct ids)
into a fresh spool in bench/out/ (sync = full), until N events or S seconds; the rate
over the first and the last 10% (a growing spool); then a restart (startup time with
the queue and its dedupe keys), a drain by fetch(1000) + ack, the file size at the
peak and after the drain, and the process's CPU time per million events. Same-run
reference: the naive design, one row per event inserted with executemany in
3,200-row transactions (sync = full, no dedupe), for the first 10% of the events.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import time
from pathlib import Path

import orjson

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.settings import StorageConfig
from agent.spool import Spool

from .payloads import NUCLEUS_EVENT
from .procs import ROOT

BATCH = 100
CONCURRENCY = 32


def _batch(first: int) -> list[Event]:
    return [Event("bench", NUCLEUS, dedupe_key("bench", first + i),
                  (NUCLEUS_EVENT % (first + i, 7)).encode()) for i in range(BATCH)]


def _naive(path: Path, n: int) -> float:
    """Events/s of one row per event, as the naive baseline stores them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                       "CREATE TABLE events(id INTEGER PRIMARY KEY, body BLOB NOT NULL);")
    start = time.perf_counter()
    for first in range(0, n, BATCH * CONCURRENCY):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events(body) VALUES (?)",
                         [(e.body,) for b in range(CONCURRENCY)
                          for e in _batch(first + b * BATCH)])
        conn.execute("COMMIT")
    conn.close()
    return n / (time.perf_counter() - start)


async def _fill(spool: Spool, n: int, seconds: float) -> tuple[int, float, float]:
    """(events stored, rate over the first 10%, rate over the last 10%)."""
    tenth = max(n // 10, BATCH * CONCURRENCY)
    marks: list[tuple[int, float]] = [(0, time.perf_counter())]
    deadline = time.perf_counter() + seconds
    done = 0
    while done < n and time.perf_counter() < deadline:
        step = BATCH * CONCURRENCY
        await asyncio.gather(*(spool.append(_batch(done + b * BATCH))
                               for b in range(CONCURRENCY)))
        done += step
        marks.append((done, time.perf_counter()))

    def rate(lo: int, hi: int) -> float:
        a = next(m for m in marks if m[0] >= lo)
        b = next(m for m in marks if m[0] >= hi)
        return (b[0] - a[0]) / max(b[1] - a[1], 1e-9)

    return done, rate(0, tenth), rate(max(0, done - tenth), done)


async def _run(n: int, seconds: float) -> dict[str, object]:
    where = ROOT / "bench" / "out" / "spool_cycle"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    naive = _naive(where / "naive.db", max(n // 10, BATCH * CONCURRENCY))
    cfg = StorageConfig(path=str(where / "spool.db"), max_size_mb=4096)
    spool = await Spool.open(cfg)
    cpu = time.process_time()
    done, first, last = await _fill(spool, n, seconds)
    fill_cpu = time.process_time() - cpu
    await spool.close()
    peak = os.path.getsize(where / "spool.db")
    start = time.perf_counter()
    spool = await Spool.open(cfg)
    startup = time.perf_counter() - start
    sid = spool.streams["bench"].id
    cpu, start = time.process_time(), time.perf_counter()
    drained = 0
    while rows := await spool.fetch(sid, 0, 1000):
        await spool.ack([r.seq for r in rows])
        drained += len(rows)
    drain_s, drain_cpu = time.perf_counter() - start, time.process_time() - cpu
    await spool.close()
    after = os.path.getsize(where / "spool.db")
    raw = len(_batch(0)[0].body)
    return {"events": done, "naive_ev_s": round(naive), "fill_first_ev_s": round(first),
            "fill_last_ev_s": round(last), "fill_cpu_s_per_M": round(fill_cpu * 1e6 / done, 1),
            "startup_s": round(startup, 3), "drain_ev_s": round(drained / drain_s),
            "drain_cpu_s_per_M": round(drain_cpu * 1e6 / max(drained, 1), 1),
            "raw_bytes_per_event": raw, "disk_bytes_per_event": round(peak / done, 1),
            "disk_peak_mb": round(peak / 1e6, 1), "disk_after_drain_mb": round(after / 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=60.0, help="cap on the fill")
    args = ap.parse_args()
    print(orjson.dumps(asyncio.run(_run(args.events, args.seconds)),
                       option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
