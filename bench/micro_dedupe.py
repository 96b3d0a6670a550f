"""The dedupe index, alone: `python -m bench.micro_dedupe [--keys N] [--seconds S]`.

``load_all`` of N keys (default 1,000,000) as stored, over the 24 hourly buckets of a
window (the startup rebuild), beside ``load`` record by record in the same run, and
``expire`` of the oldest bucket; then µs per
``admit`` of 100 new keys (--calls of them) and of 100 resends, beside a same-run
reference, a plain ``set`` lookup of the same 100 keys; then bytes per key: by
tracemalloc (after loading the N keys again), and the anonymous memory (RssAnon) a fresh
process on the agent's allocator gains from N keys admitted 100 a call, as the agent
does, and at its peak while it admits N more at the cap (``max_keys`` = N: the oldest
buckets forgotten as it goes; the set's table rebuilt, both tables held for that moment).
The second is what the agent's RSS carries: it counts the allocator's own overhead, which
tracemalloc does not.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import tracemalloc

from agent.server.allocator import use_c_allocator
from agent.spool.dedupe import HOUR_MS, DedupeIndex, StoredKeys, keys_to_bytes

from .index_memory import index_bytes
from .procs import RssSampler, read_rss

WINDOW = 24 * HOUR_MS


def _keys(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) - (1 << 63) for _ in range(n)]


def _load(stored: list[bytes], one_by_one: bool = False) -> DedupeIndex:
    """N keys over the 24 hourly buckets of a window, as the spool rebuilds at startup
    (``one_by_one``: each record's keys by ``load``, the reference)."""
    total = sum(len(b) for b in stored) // 8
    index = DedupeIndex(WINDOW, max_keys=2 * total)
    records = [(chunk, hour * HOUR_MS, hour * HOUR_MS) for hour, chunk in enumerate(stored)]
    if one_by_one:
        for record in records:
            index.load(*record)
    else:
        index.load_all(StoredKeys.of(records))
    return index


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro_dedupe", description=__doc__)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--calls", type=int, default=2000, help="admit calls of 100 new keys")
    p.add_argument("--seconds", type=float, default=1.0, help="time per admit figure (default 1)")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        _rss_child(args.keys)
        return
    rng = random.Random(11)
    keys = _keys(rng, args.keys)
    per_hour = -(-args.keys // 24)
    stored = [keys_to_bytes(keys[i:i + per_hour]) for i in range(0, args.keys, per_hour)]

    start = time.perf_counter()
    _load(stored, one_by_one=True)
    one_by_one_s = time.perf_counter() - start
    start = time.perf_counter()
    index = _load(stored)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    gone = index.expire(WINDOW, WINDOW)
    expire_ms = (time.perf_counter() - start) * 1000
    print(f"load {len(index) + gone:,} keys: {load_s * 1000:.0f} ms ({load_s / (len(index) + gone) * 1e6:.2f} "
          f"µs/key; same-run reference, load record by record: {one_by_one_s * 1000:.0f} ms); "
          f"expire the oldest hourly bucket ({gone:,} keys): {expire_ms:.1f} ms")

    reference = set(keys)
    now = 24 * HOUR_MS
    batches = [_keys(rng, 100) for _ in range(args.calls)]
    start = time.perf_counter()
    for batch in batches:
        index.admit(batch, now, now)
    new_us = (time.perf_counter() - start) / args.calls * 1e6
    start = time.perf_counter()
    for batch in batches:  # the floor for any set: look up and add each key
        for k in batch:
            if k not in reference:
                reference.add(k)
    ref_new_us = (time.perf_counter() - start) / args.calls * 1e6
    resend = keys[-100:]
    resend_us = best_us(lambda: index.admit(resend, now, now), args.seconds)
    ref_us = best_us(lambda: [k in reference for k in resend], args.seconds)
    print(f"admit 100 new keys, at {len(index):,} keys: {new_us / 100:.3f} µs/key ({args.calls:,} "
          f"calls); same-run reference, a plain set of as many keys, lookup and add of the same "
          f"keys: {ref_new_us / 100:.3f} µs/key")
    print(f"admit 100 resends: {resend_us / 100:.3f} µs/key; same-run reference, a set lookup of "
          f"the same 100 keys: {ref_us / 100:.3f} µs/key")

    del index, batches
    reference.clear()
    tracemalloc.start()
    index = _load(stored)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"memory: {used / len(index):.1f} B/key over {len(index):,} keys (tracemalloc)")
    child = subprocess.run([sys.executable, "-m", "bench.micro_dedupe", "--rss-child",
                            "--keys", str(args.keys)], capture_output=True, text=True, check=True)
    print(child.stdout, end="")


def _rss_child(n: int) -> None:
    """In a fresh process on the agent's allocator (``outpost run``'s re-execution): RssAnon
    gained per key at n keys admitted, and at its peak while n more are admitted at the cap.
    The peak is the kernel's high-water mark (``RssSampler``): the set's table is rebuilt
    while the GIL is held, where no thread of this process can sample it."""
    use_c_allocator()
    rng, now = random.Random(12), 24 * HOUR_MS
    index = DedupeIndex(WINDOW, max_keys=n)
    with RssSampler(os.getpid(), interval=3600) as rss:
        base = at_n = read_rss(os.getpid())[1]
        for received in range(0, 2 * n, 100):
            index.admit(_keys(rng, 100), now, now)
            if received + 100 == n:
                at_n = read_rss(os.getpid())[1]
        peak = rss.take()[1]
    print(f"memory: {(at_n - base) / n:.1f} B/key of RssAnon at {n:,} keys admitted 100 a call; "
          f"peak {(peak - base) / n:.1f} B/key while {n:,} more went in at the cap "
          f"(a fresh process, {os.environ.get('PYTHONMALLOC', 'pymalloc')}); the bench's model "
          f"(bench/index_memory.py): {index_bytes(n, n, n) / n:.1f} and "
          f"{index_bytes(0, 2 * n, n) / n:.1f} B/key")


def best_us(fn: object, seconds: float, rounds: int = 5) -> float:
    """Best-of-rounds µs per call of ``fn``; each round runs for about seconds / rounds."""
    assert callable(fn)
    best = float("inf")
    for _ in range(rounds):
        n, start, deadline = 0, time.perf_counter(), time.perf_counter() + seconds / rounds
        while time.perf_counter() < deadline:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


if __name__ == "__main__":
    main()
