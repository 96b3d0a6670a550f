"""The live event view's cost to ingest and forwarding: `python -m bench.micro_tail`.

µs per 100-event request of the hook that Sink.store calls after each commit
(``TailHub.ingested``): with nobody watching, with one viewer that keeps up, with one
that is behind (every message dropped and counted), and with one watching another key.
Same-run references: a no-op callable in the hook's place (the least a hook costs),
and the commit the hook follows, ``Spool.append`` of the same 100 events to a real
spool file (fsync on) in a temporary directory.

Then µs per acknowledged 500-event batch of the hook each forwarding loop calls on an
upstream ack (``TailHub.acked``), in the same cases, beside a no-op hook and the delete
the ack leads to, ``Spool.ack`` of those 500 events (fsync on).

Last, what the viewer's own task pays per event to summarise it: off the ingest path but
on its event loop, which is why a viewer is paced to ``RATE`` messages a second.
Bounded: every figure stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.families.event import SEGMENT, Event, dedupe_key
from agent.logs import fingerprint
from agent.metrics import Metrics
from agent.ops.tail import QUEUE, TailHub, Viewer, summarise
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.types import Row
from bench.micro_records import per_call_us, segment_event

KEY = "bench-write-key-0001"
ACK_BATCH = 500   # batch_max_events' default: one upstream ack


def _events(rng: random.Random, start: int) -> list[Event]:
    return [Event(KEY, SEGMENT, dedupe_key("bench", start + i), segment_event(rng, start + i))
            for i in range(100)]


def _hub_case(events: list[Event], viewers: list[Viewer | None]) -> tuple[TailHub, Callable[[], None]]:
    hub = TailHub(Metrics())
    for v in viewers:
        if v is not None:
            hub.viewers.add(v)

    def call() -> None:
        hub.ingested(events, len(events))
        for v in hub.viewers:
            if v.want is None and v.queue and len(v.queue) < QUEUE:
                v.queue.clear()   # a viewer that keeps up: its task took them
                v.held = 0
    return hub, call


def _ack_case(rows: list[Row], viewers: list[Viewer | None]) -> Callable[[], None]:
    hub = TailHub(Metrics())
    for v in viewers:
        if v is not None:
            hub.viewers.add(v)
    seqs = tuple(row.seq for row in rows)

    def call() -> None:
        hub.acked("up", KEY, rows, seqs)
        for v in hub.viewers:
            if v.want is None and v.queue and len(v.queue) < QUEUE:
                v.queue.clear()   # a viewer that keeps up: its task took them
                v.held = 0
    return call


async def _spool_us(rng: random.Random, requests: int) -> tuple[float, float]:
    """µs per Spool.append of 100 events, and per Spool.ack of ACK_BATCH of them."""
    with tempfile.TemporaryDirectory() as tmp:
        spool = await Spool.open(StorageConfig(path=str(Path(tmp) / "spool.db")))
        try:
            batches = [_events(rng, 1_000_000 + i * 100) for i in range(requests)]
            start = time.perf_counter()
            for batch in batches:
                await spool.append(batch)
            append = (time.perf_counter() - start) / requests * 1e6
            rows = await spool.fetch(spool.streams[KEY].id, 0, requests * 100)
            acks = [[r.seq for r in rows[i:i + ACK_BATCH]]
                    for i in range(0, len(rows), ACK_BATCH)]
            start = time.perf_counter()
            for seqs in acks:
                await spool.ack(seqs)
            return append, (time.perf_counter() - start) / len(acks) * 1e6
        finally:
            await spool.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro_tail", description=__doc__)
    p.add_argument("--seconds", type=float, default=1.0, help="time per hook figure")
    p.add_argument("--commits", type=int, default=300, help="Spool.append calls timed")
    args = p.parse_args()
    rng = random.Random(14)
    events = _events(rng, 0)
    noop: Callable[[list[Event], int], None] = lambda evs, n: None  # noqa: E731
    behind = Viewer(None)
    behind.queue.extend(events[0] for _ in range(QUEUE))
    other = Viewer(fingerprint("some-other-key"))
    rows = [("reference: a no-op hook", per_call_us(lambda: noop(events, 100), args.seconds))]
    for label, viewers in (("nobody watching", []), ("one viewer keeping up", [Viewer(None)]),
                           ("one viewer behind (drops)", [behind]),
                           ("one viewer of another key", [other])):
        hub, call = _hub_case(events, list(viewers))
        rows.append((f"TailHub.ingested, {label}", per_call_us(call, args.seconds)))
    append, ack = asyncio.run(_spool_us(rng, args.commits))
    rows.append((f"reference: Spool.append (fsync), mean of {args.commits}", append))
    acked = [Row(1000 + i, 1, SEGMENT, 0, segment_event(rng, i)) for i in range(ACK_BATCH)]
    noop_ack: Callable[[str, str, list[Row], tuple[int, ...]], None] = \
        lambda up, key, rows, seqs: None  # noqa: E731
    seqs = tuple(r.seq for r in acked)
    behind_acks = Viewer(None)
    behind_acks.queue.extend(events[0] for _ in range(QUEUE))
    ack_rows = [("reference: a no-op hook",
                 per_call_us(lambda: noop_ack("up", KEY, acked, seqs), args.seconds))]
    for label, viewers in (("nobody watching", []), ("one viewer keeping up", [Viewer(None)]),
                           ("one viewer behind (drops)", [behind_acks]),
                           ("one viewer of another key", [other])):
        ack_rows.append((f"TailHub.acked, {label}",
                         per_call_us(_ack_case(acked, list(viewers)), args.seconds)))
    ack_rows.append((f"reference: Spool.ack (fsync) of {ACK_BATCH}", ack))
    width = max(len(label) for label, _ in rows + ack_rows)
    for title, table, ref, what in (("µs per 100-event request", rows, append, "commit"),
                                    (f"µs per {ACK_BATCH}-event upstream ack", ack_rows, ack,
                                     "delete")):
        print(title)
        for label, us in table:
            print(f"  {label:<{width}}  {us:10.3f}  ({us / ref * 100:.4f}% of the {what})")
    each = per_call_us(lambda: [summarise(ev) for ev in events], args.seconds) / 100
    print(f"viewer's task, off the ingest path: summarise one event {each:.2f} µs")


if __name__ == "__main__":
    main()
