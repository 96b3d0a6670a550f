"""The mapping between families, µs per event, both directions.

`python -m bench.micro_mapping [--events 20000] [--rounds 5]`

Decoded events (the bench's Nucleus event, a Nucleus init as nucleus-analytics 4.x
sends it, the bench's Segment track, a Segment "Application Opened") go through
``agent.families.mapping`` without a spool or a network. Printed as the median of
``--rounds`` runs beside the same-run reference of ``orjson.loads`` +
``orjson.dumps`` of each body (the cost of touching every event once). Bounded:
stops by itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from agent.families import mapping

from .payloads import NUCLEUS_EVENT, SEGMENT_EVENT

RECEIVED = 1_768_472_431_000
NUCLEUS_INIT = (
    '{"type":"init","date":1768472430123,"appId":"benchapp","id":%d,"sessionId":%d,'
    '"deviceId":"4f1c9e2a7b3d8e6f","anonId":"a-17","platform":"Linux","osVersion":"6.1.0",'
    '"version":"1.2.3","locale":"en-US","arch":"x64","client":"nucleus-analytics",'
    '"moduleVersion":"4.0.3","payload":{}}')
SEGMENT_OPENED = (
    '{"type":"track","event":"Application Opened","anonymousId":"a-%d-%d",'
    '"messageId":"m","timestamp":"2026-01-15T10:20:30.123Z","receivedAt":"2026-01-15T10:20:31.000Z",'
    '"properties":{"from_background":false},"context":{"os":{"name":"Linux","version":"6.1"},'
    '"locale":"en-US","app":{"version":"2.0"},"device":{"id":"dev","totalRam":16},'
    '"library":{"name":"analytics-python","version":"2.4.0"}}}')


def per_event(work: Callable[[], int], rounds: int) -> float:
    """Median µs per event of ``work`` (which returns how many events it handled)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = work()
        times.append((time.perf_counter() - start) * 1e6 / n)
    return statistics.median(times)


def bodies(template: str, n: int) -> list[bytes]:
    return [(template % (i, 42)).encode() for i in range(n)]


def main(args: argparse.Namespace) -> None:
    nucleus = bodies(NUCLEUS_EVENT, args.events)
    init = bodies(NUCLEUS_INIT, args.events)
    track = bodies(SEGMENT_EVENT, args.events)
    opened = bodies(SEGMENT_OPENED, args.events)

    def touch() -> int:
        for b in nucleus:
            orjson.dumps(orjson.loads(b))
        return len(nucleus)

    def mapped(convert: Callable[[dict[str, Any], int], dict[str, Any]],
               rows: list[bytes]) -> Callable[[], int]:
        def work() -> int:
            for b in rows:
                orjson.dumps(convert(orjson.loads(b), RECEIVED))
            return len(rows)
        return work

    stages = {
        "reference: orjson loads + dumps": touch,
        "nucleus event -> segment (loads, map, dumps)": mapped(mapping.nucleus_to_segment, nucleus),
        "nucleus 4.x init -> segment": mapped(mapping.nucleus_to_segment, init),
        "segment track -> nucleus": mapped(mapping.segment_to_nucleus, track),
        "segment Application Opened -> nucleus": mapped(mapping.segment_to_nucleus, opened),
    }
    for name, work in stages.items():
        print(f"{name:46s} {per_event(work, args.rounds):7.2f} µs/event", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    main(parser.parse_args())
