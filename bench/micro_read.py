"""Reading a `/v1/batch` body: `python -m bench.micro_read [--events N] [--rounds R]`.

One request of N messages (bench/payloads.py's Segment event) read and judged as the agent
does, without a network, as CPU µs per event (the median of R rounds, each its best of a
few repeats), in two forms of `messageId`:

- the bench's own (``bench-<i>-<session>``), and
- uuid4s, as Segment's SDKs (analytics-python, analytics-node, RudderStack's) make them:
  hex that, one id in 25, looks like an exponent to a search of bytes.

Rows: ``orjson.loads`` of the body (the same-run reference); the agent's reader alone
(``batch_json.read``: orjson and the bytes-level check of its numbers, and the exact reader
when that check fires); the general path whole (the reader, then each message checked,
completed and encoded); the batch stored as sent (``exact_json.kept_as_sent``, then
``segment_as_sent.accepted``). Bounded: stops by itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial
from random import Random
from typing import Any

import orjson

from agent.device import detect
from agent.dialects.exact_json import kept_as_sent
from agent.dialects.segment import _read_batch
from agent.families import segment as spec
from agent.families import segment_as_sent
from agent.families.enrich import Enrich
from agent.families.lanes import Lanes
from agent.settings import DeviceConfig

from .payloads import body

KEY = "benchkey"


def uuid_ids(raw: bytes, seed: int) -> bytes:
    """``raw`` with each message's `messageId` a uuid4 (seeded: the same in every run)."""
    parsed = orjson.loads(raw)
    rnd = Random(seed)
    for message in parsed["batch"]:
        message["messageId"] = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    return orjson.dumps(parsed)


def general(raw: bytes, enrich: Enrich) -> int:
    """The general path: the reader, then every message checked, completed and encoded."""
    read = _read_batch(raw)
    items = spec.batch_items(read.body)
    given = spec.shared(spec.received_now(), read.body)
    head = spec.dedupe_head(KEY)
    return len([spec.accepted(ev, KEY, spec.TYPES, given, enrich, len(raw), False, head)
                for ev in items])


def as_sent(raw: bytes) -> int:
    assert kept_as_sent(raw)
    events = segment_as_sent.accepted(raw, spec.TYPES, KEY, spec.received_now(),
                                      spec.dedupe_head(KEY), Lanes())
    assert events is not None
    return len(events)


def cost(work: Callable[[], Any], events: int, rounds: int) -> float:
    """CPU µs per event of ``work``: the median over rounds of each round's best of 5."""
    per_round = []
    for _ in range(rounds):
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(20):
                work()
            best = min(best, (time.process_time() - start) / 20)
        per_round.append(best)
    return statistics.median(per_round) * 1e6 / events


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    enrich = Enrich(detect(DeviceConfig()))
    bodies = {"bench ids": body("segment", 1, args.events, 42)}
    bodies["uuid4 ids"] = uuid_ids(bodies["bench ids"], 7)
    print(f"{'messageIds':10s} {'bytes':>7s} {'orjson.loads':>13s} {'reader':>15s} "
          f"{'general path':>15s} {'as sent':>15s}   (CPU µs an event; × orjson.loads)")
    for name, raw in bodies.items():
        n = args.events
        reference = cost(partial(orjson.loads, raw), n, args.rounds)
        row = [cost(partial(_read_batch, raw), n, args.rounds),
               cost(partial(general, raw, enrich), n, args.rounds),
               cost(partial(as_sent, raw), n, args.rounds)]
        print(f"{name:10s} {len(raw):7,d} {reference:13.2f} "
              + " ".join(f"{c:8.2f} ({c / reference:4.1f}×)" for c in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
