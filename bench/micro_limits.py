"""What ingest's route-limit check costs per event, without a server or a spool.

`python -m bench.micro_limits [--events 20000] [--rounds 5]`

Each event a dialect stores is checked against what the upstream its key is routed to
can carry (agent/server/limits.py). Printed as µs per event, the median of
``--rounds`` runs, for: Segment events routed to segment-http (a length compared);
Nucleus events routed to segment-http, small (no mapping) and over a quarter of the
limit (mapped to measure); any event routed to nucleus-ws (a 4 MiB message), checked
alone, and a request's events measured against it at once (ingest's shortcut: no event
longer than ``RouteLimits.least`` is checked alone, ``longer_than``).
Same-run reference: ``segment.accept`` of the same Segment events, the validation every
Segment-family event already goes through at ingest. Bounded: stops by itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from agent.device import detect
from agent.families import segment as spec
from agent.families.enrich import Enrich
from agent.families.event import NUCLEUS, Event, longer_than
from agent.server.limits import RouteLimits
from agent.settings import Config, DeviceConfig, UpstreamConfig
from agent.uplinks.registry import uplink_class

from .payloads import NUCLEUS_EVENT, SEGMENT_EVENT

ENRICH = Enrich(detect(DeviceConfig()))


def limits(protocol: str) -> RouteLimits:
    up = UpstreamConfig(name="up", protocol=protocol, url="http://127.0.0.1:9")
    return RouteLimits(Config(upstreams=(up,)),
                       lambda cfg: uplink_class(cfg.protocol).event_limit(cfg))


def segment_events(n: int) -> list[Event]:
    return [spec.accept(orjson.loads(SEGMENT_EVENT % (i, 1)), "k", spec.TYPES, "2026-01-15T10:20:31.000Z",
                        enrich=ENRICH)
            for i in range(n)]


def nucleus_events(n: int, pad: int) -> list[Event]:
    out = []
    for i in range(n):
        ev: dict[str, Any] = orjson.loads(NUCLEUS_EVENT % (i, 1))
        if pad:
            ev["payload"]["blob"] = "x" * pad
        out.append(Event("k", NUCLEUS, i, orjson.dumps(ev)))
    return out


def per_event(run: Callable[[], object], n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = args.events, args.rounds
    segment_http, nucleus_ws = limits("segment-http"), limits("nucleus-ws")
    seg, small, large = segment_events(n), nucleus_events(n, 0), nucleus_events(n // 10, 9000)
    raw = [orjson.loads(SEGMENT_EVENT % (i, 1)) for i in range(n)]

    def check(lim: RouteLimits, events: list[Event]) -> Callable[[], object]:
        return lambda: [lim.oversize(ev) for ev in events]

    def reference() -> object:
        return [spec.accept(dict(ev), "k", spec.TYPES, "2026-01-15T10:20:31.000Z", enrich=ENRICH)
                for ev in raw]

    rows = [
        ("reference: segment.accept per Segment event", per_event(reference, n, rounds)),
        ("Segment event -> segment-http", per_event(check(segment_http, seg), n, rounds)),
        ("Nucleus event, 240 B -> segment-http", per_event(check(segment_http, small), n, rounds)),
        ("Nucleus event, 9 KB -> segment-http (mapped)",
         per_event(check(segment_http, large), len(large), rounds)),
        ("any event -> nucleus-ws, checked alone", per_event(check(nucleus_ws, seg), n, rounds)),
        ("any event -> nucleus-ws, ingest's shortcut",
         per_event(lambda: longer_than(seg, nucleus_ws.least), n, rounds)),
    ]
    for name, us in rows:
        print(f"{name:48s} {us:8.3f} µs/event")


if __name__ == "__main__":
    main()
