"""The drain's Python work per event, stage by stage, without a network.

`python -m bench.micro_drain [--events 20000] [--rounds 5] [--batch 100] [--profile]`

Rows shaped as the bench's Nucleus events are stored (bench/payloads.py) go
through what a forwarder does with them between the spool read and the
socket: each uplink's ``prepare`` (the shared take loop: decode, map across
families, encode) and its request builder (Segment's payload, the Nucleus
frame), in 100-event batches. Printed as µs per event, the median of
``--rounds`` runs, beside the same-run reference of ``orjson.loads`` +
``orjson.dumps`` of each body (the cost of touching every event once).
``--profile`` adds a cProfile of the Segment path.

The Nucleus-to-Segment path is also split into its parts (parse, map, encode), and
beside it what ingest pays to store such an event mapped (``RouteLimits.as_stored``:
parse, map, encode, for a key routed to a Segment upstream).

Then the same stages on a real spool (bench/out/micro_drain, ``sync = "full"``):
``--events`` Nucleus and as many Segment events appended in 100-event requests,
and as many Nucleus events stored mapped, as ingest stores them for a key routed to
a Segment upstream; then each queue read as a forwarder reads it (fetch: the read,
decompression and split into runs of records, on the reader thread), prepared in
``--batch``-event batches, each batch's frame or request body built, each
segment-http batch sent to bench/upstream.py (a process of its own), and finally
every row acked ``ACK_GROUP`` batches per spool call (the writer's commit): CPU µs
per event of the whole process. Bounded: stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import orjson

from agent.families import mapping
from agent.families.event import NOT_READ, NUCLEUS, SEGMENT, Event, dedupe_key
from agent.forwarder.stream import ACK_GROUP, FETCH_FACTOR
from agent.server.limits import RouteLimits
from agent.settings import Config, StorageConfig, UpstreamConfig
from agent.spool import Spool
from agent.spool.types import Row
from agent.uplinks.base import Acked
from agent.uplinks.nucleus_frame import frame
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.prepare import Prepared
from agent.uplinks.registry import uplink_class
from agent.uplinks.segment_http import SegmentHttpUplink

from .payloads import NUCLEUS_EVENT, SEGMENT_EVENT
from .procs import ROOT, free_port, upstream_proc

RECEIVED = 1_768_472_431_000
SENT_AT = "2026-01-15T10:20:31.000Z"


def rows(n: int) -> list[Row]:
    return [Row(seq, 1, NUCLEUS, RECEIVED + seq, (NUCLEUS_EVENT % (seq, 42)).encode())
            for seq in range(1, n + 1)]


def routed_to_segment() -> RouteLimits:
    """Ingest's routes with every key routed to a segment-http upstream (as service.py
    builds them): Nucleus events are stored mapped."""
    up = UpstreamConfig("s", "segment-http", "http://127.0.0.1:9")
    return RouteLimits(Config(upstreams=(up,)),
                       lambda cfg: uplink_class(cfg.protocol).event_limit(cfg),
                       lambda cfg: uplink_class(cfg.protocol).family)


def per_event(work: Callable[[], int], rounds: int) -> float:
    """Median µs per event of ``work`` (which returns how many events it handled)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = work()
        times.append((time.perf_counter() - start) * 1e6 / n)
    return statistics.median(times)


def map_part(part: list[Row]) -> None:
    for r in part:
        orjson.dumps(mapping.nucleus_to_segment(orjson.loads(r.body), r.received))


def batches(prepare: Callable[[list[Row]], Prepared], queued: list[Row]) -> list[Prepared]:
    out = []
    i = 0
    while i < len(queued):
        p = prepare(queued[i:i + 400])
        out.append(p)
        i += len(p.rows)
    return out


async def main(args: argparse.Namespace) -> None:
    queued = rows(args.events)
    async with aiohttp.ClientSession() as session:
        seg = SegmentHttpUplink(UpstreamConfig("s", "segment-http", "http://127.0.0.1:9"),
                                "benchapp", session, "machine")
        ws = NucleusWsUplink(UpstreamConfig("n", "nucleus-ws", "ws://127.0.0.1:9"),
                             "benchapp", session, "machine")

        def ws_prepare(part: list[Row]) -> Prepared:
            p = ws.prepare(part)
            ws.in_flight.clear()  # acked at once: ids may recur across rounds
            return p

        def touch() -> int:
            for r in queued:
                orjson.dumps(orjson.loads(r.body))
            return len(queued)

        def segment_map() -> int:
            for r in queued:
                mapping.nucleus_to_segment(orjson.loads(r.body), r.received)
            return len(queued)

        parsed = [orjson.loads(r.body) for r in queued]
        mapped = [mapping.nucleus_to_segment(ev, RECEIVED) for ev in parsed]

        def parse_only() -> int:
            for r in queued:
                orjson.loads(r.body)
            return len(queued)

        def map_only() -> int:
            for ev in parsed:
                mapping.nucleus_to_segment(ev, RECEIVED)
            return len(queued)

        def encode_only() -> int:
            for ev in mapped:
                orjson.dumps(ev)
            return len(queued)

        routes = routed_to_segment()
        events = [Event("benchapp", NUCLEUS, r.seq, r.body) for r in queued]

        def at_ingest() -> int:
            for start in range(0, len(events), 100):   # as 100-event requests
                routes.as_stored(events[start:start + 100])
            return len(events)

        def segment_prepare() -> int:
            return sum(len(p.rows) for p in batches(seg.prepare, queued))

        def segment_all() -> int:
            done = batches(seg.prepare, queued)
            for p in done:
                seg.payload(p, SENT_AT)
            return sum(len(p.rows) for p in done)

        def ws_all() -> int:
            done = batches(ws_prepare, queued)
            for p in done:
                frame(p)
            return sum(len(p.rows) for p in done)

        def mapped_in_threads() -> int:
            # Off the loop: the same mapping split over two threads at once (wall time).
            half = len(queued) // 2
            with ThreadPoolExecutor(2) as pool:
                for f in [pool.submit(map_part, queued[:half]), pool.submit(map_part, queued[half:])]:
                    f.result()
            return len(queued)

        stages = {
            "reference: orjson loads + dumps": touch,
            "segment: nucleus_to_segment (with loads)": segment_map,
            "  its parts: parse (orjson.loads)": parse_only,
            "  its parts: map (nucleus_to_segment)": map_only,
            "  its parts: encode (orjson.dumps)": encode_only,
            "ingest: stored mapped (as_stored, 100/request)": at_ingest,
            "segment-http: prepare": segment_prepare,
            "segment-http: prepare + payload": segment_all,
            "nucleus-ws: prepare + frame": ws_all,
            "segment: the mapping over 2 threads, wall": mapped_in_threads,
        }
        for name, work in stages.items():
            print(f"{name:45s} {per_event(work, args.rounds):7.2f} µs/event", flush=True)
        stored = sum(len(r.body) for r in queued) / len(queued)
        as_segment = sum(len(orjson.dumps(mapping.nucleus_to_segment(orjson.loads(r.body),
                                                                       r.received)))
                         for r in queued) / len(queued)
        print(f"stored Nucleus event {stored:.0f} B; mapped to Segment {as_segment:.0f} B "
              f"({as_segment / stored:.2f}x: what storing it mapped at ingest would keep)")
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(segment_all)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        await spool_stages(args, session)


async def spool_stages(args: argparse.Namespace, session: aiohttp.ClientSession) -> None:
    """µs per event of each stage of a drain from a real spool (see the module docstring)."""
    where = ROOT / "bench" / "out" / "micro_drain"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    spool = await Spool.open(StorageConfig(path=str(where / "spool.db"), max_size_mb=4096))
    try:
        routes = routed_to_segment()
        for key, family, template in (("n", NUCLEUS, NUCLEUS_EVENT), ("s", SEGMENT, SEGMENT_EVENT),
                                      ("m", NUCLEUS, NUCLEUS_EVENT)):
            for first in range(0, args.events, 3200):  # 32 concurrent 100-event requests
                # Nucleus events carry the id ingest read (nucleus.accept), as stored.
                await asyncio.gather(*(spool.append(routes.as_stored(
                    [Event(key, family, dedupe_key(key, i), (template % (i, 7)).encode())
                     for i in range(start, min(start + 100, args.events))])
                    if key == "m" else
                    [Event(key, family, dedupe_key(key, i), (template % (i, 7)).encode(),
                           i if family == NUCLEUS else NOT_READ)
                     for i in range(start, min(start + 100, args.events))])
                    for start in range(first, min(first + 3200, args.events), 100)))
        print(f"from a spool, {args.batch}-event batches (CPU µs/event):")
        labels = {"n": "Nucleus events", "s": "Segment events", "m": "Nucleus, stored mapped,"}
        # segment-http batches are also sent, to bench/upstream.py in its own process: its
        # CPU is not counted, the agent side of the request is (`send`: the request body
        # again, the POST and reading the reply).
        sink = upstream_proc(free_port(), where / "upstream.log").start()
        try:
            for key, protocol in (("n", "nucleus-ws"), ("s", "segment-http"),
                                  ("n", "segment-http"), ("m", "segment-http")):
                stages = await _drain_stages(spool, key, protocol, args.batch, session,
                                             f"http://127.0.0.1:{sink.port}")
                label = f"{labels[key]} to {protocol}"
                print(f"  {label:32s} " + ", ".join(f"{k} {v:5.2f}" for k, v in stages.items()),
                      flush=True)
        finally:
            sink.stop()
        seqs = [r.seq for r in await spool.fetch(spool.streams["n"].id, 0, args.events)]
        group = ACK_GROUP * args.batch
        start = time.process_time()
        for i in range(0, len(seqs), group):
            await spool.ack(seqs[i:i + group])
        print(f"  ack, {group} rows per spool call: "
              f"{(time.process_time() - start) * 1e6 / len(seqs):5.2f} (the writer's commit)")
    finally:
        await spool.close()


async def _drain_stages(spool: Spool, key: str, protocol: str, batch: int,
                        session: aiohttp.ClientSession, sink: str) -> dict[str, float]:
    cfg = UpstreamConfig("u", protocol, "ws://127.0.0.1:9" if protocol == "nucleus-ws" else sink,
                         batch_max_events=batch)
    seg = SegmentHttpUplink(cfg, "benchapp", session, "machine")
    ws = NucleusWsUplink(cfg, "benchapp", session, "machine")
    took = {"fetch": 0.0, "prepare": 0.0, "encode": 0.0}
    if protocol == "segment-http":
        took["send"] = 0.0
    cursor = done = 0
    # CPU time of the whole process (the reader thread's too): steadier than wall time on
    # a shared machine.
    clock = time.process_time
    while True:
        t0 = clock()
        rows = await spool.fetch(spool.streams[key].id, cursor, batch * FETCH_FACTOR)
        took["fetch"] += clock() - t0
        if not rows:
            break
        while rows:
            t0 = clock()
            p = ws.prepare(rows) if protocol == "nucleus-ws" else seg.prepare(rows)
            t1 = clock()
            if protocol == "nucleus-ws":
                frame(p)
                ws.in_flight.clear()  # acked at once
            else:
                seg.payload(p, SENT_AT)
            t2 = clock()
            if protocol == "segment-http":
                sent = await seg.send(p)
                assert isinstance(sent, Acked), sent
                took["send"] += clock() - t2
            took["prepare"] += t1 - t0
            took["encode"] += t2 - t1
            done += len(p.rows)
            cursor = p.rows[-1].seq
            rows = rows[len(p.rows):]
    return {k: v * 1e6 / max(done, 1) for k, v in took.items()}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100, help="events per batch, from the spool")
    parser.add_argument("--profile", action="store_true")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
