"""Packed records, alone: `python -m bench.micro_records [--seconds S]`.

µs per event to pack and unpack records of 500, 100, 16 and 1 ~204-byte Segment events
(one record per commit group: a busy key's, one 100-event request's, a commit of 16
single-event requests, one request alone), the record's size over the raw JSON, and
same-run references on the same bodies: `b"".join` (the least any packing costs),
`orjson.loads` of each body (the parse ingest already pays per event), and the same
layout compressed by zstd alone, without the built-in dictionary that records under
``records.DICT_BELOW`` get (dictionary.py): its size and µs. Records under that size also
show the dictionary learned from a backlog (codebook.py), made from other events of the
same kind: pack and unpack µs, and size. Each figure is the best of several timed rounds,
each round bounded by --seconds.
"""

from __future__ import annotations

import argparse
import random
import struct
import time
import uuid
from collections.abc import Callable

import orjson
import zstandard

from agent.spool.codebook import Codebook
from agent.spool.records import DICT_BELOW, Learned, pack, unpack

_USERS = [f"user-{n:04d}" for n in range(50)]
_EVENTS = ["Button Clicked", "Screen Viewed", "Order Completed", "Signed In"]


def segment_event(rng: random.Random, n: int) -> bytes:
    """A Segment track call of about 204 bytes: a random messageId, a moving timestamp."""
    return orjson.dumps({
        "type": "track", "event": rng.choice(_EVENTS), "userId": rng.choice(_USERS),
        "messageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "timestamp": f"2026-11-30T11:{n // 60 % 60:02d}:{n % 60:02d}.{rng.randrange(1000):03d}Z",
        "properties": {"screen": rng.choice(["home", "settings", "cart"]), "count": rng.randrange(100),
                       "plan": "pro"},
    })


def per_call_us(fn: Callable[[], object], seconds: float, rounds: int = 5) -> float:
    """Best-of-rounds µs per call of ``fn``; each round runs for about seconds / rounds."""
    best = float("inf")
    for _ in range(rounds):
        n, start, deadline = 0, time.perf_counter(), time.perf_counter() + seconds / rounds
        while time.perf_counter() < deadline:
            for _ in range(100):
                fn()
            n += 100
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def measure(batch: int, seconds: float) -> dict[str, float]:
    rng = random.Random(batch)
    bodies = [segment_event(rng, i) for i in range(batch)]
    record = pack(bodies)
    assert unpack(record) == bodies
    raw = sum(map(len, bodies))
    # The same layout as pack's, compressed as a record was before the dictionary.
    layout = struct.pack("<I", batch) + struct.pack(f"<{batch}I", *map(len, bodies)) \
        + b"".join(bodies)
    alone = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    learned = _learned(random.Random(batch + 1000)) if raw < DICT_BELOW else None
    found = None if learned is None else {learned.id: learned.body}.get
    with_learned = pack(bodies, None, learned)
    assert unpack(with_learned, found) == bodies
    figures = {
        "pack": per_call_us(lambda: pack(bodies), seconds) / batch,
        "unpack": per_call_us(lambda: unpack(record), seconds) / batch,
        "zstd alone (ref)": per_call_us(lambda: alone.compress(layout), seconds) / batch,
        "join (ref)": per_call_us(lambda: b"".join(bodies), seconds) / batch,
        "orjson.loads (ref)": per_call_us(lambda: [orjson.loads(b) for b in bodies], seconds) / batch,
        "raw bytes/event": raw / batch,
        "record/raw": len(record) / raw,
        "zstd alone/raw (ref)": (len(alone.compress(layout)) + 5) / raw,
    }
    if learned is not None:
        figures |= {
            "pack learned": per_call_us(lambda: pack(bodies, None, learned), seconds) / batch,
            "unpack learned": per_call_us(lambda: unpack(with_learned, found), seconds) / batch,
            "learned/raw": len(with_learned) / raw,
        }
    return figures


def _learned(rng: random.Random) -> Learned:
    """The dictionary a backlog of other such events, one a record, would teach."""
    book, n = Codebook(), 0
    while book.current is None:
        event = segment_event(rng, n)
        book.sample([event], len(event))
        n += 1
    return book.current


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro_records", description=__doc__)
    p.add_argument("--seconds", type=float, default=1.0, help="time per figure (default 1)")
    args = p.parse_args()
    for batch in (500, 100, 16, 1):
        figures = measure(batch, args.seconds)
        print(f"{batch} event(s) per record: " + ", ".join(
            f"{k} {v:.3f}" if "/" in k else f"{k} {v:.2f} µs/event" for k, v in figures.items()))


if __name__ == "__main__":
    main()
