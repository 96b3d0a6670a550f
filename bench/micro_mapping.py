"""The mapping between families, µs per event, both directions.

`python -m bench.micro_mapping [--events 20000] [--rounds 5] [--against FILE]`

Stored events (the bench's Nucleus event, a Nucleus init as nucleus-analytics 4.x
sends it, the bench's Segment track, a Segment "Application Opened") are decoded,
mapped by ``agent.families.mapping`` and encoded, without a spool or a network.
Printed as the median of ``--rounds`` runs beside the same-run reference of
``orjson.loads`` + ``orjson.dumps`` of each body (the cost of touching every event
once). ``--against`` times another version of mapping.py too (an older checkout's
``agent/families/mapping.py``). All rounds are interleaved, so that a busy machine
slows each column alike. Bounded: stops by itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from types import ModuleType
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


def per_event(works: list[Callable[[], int]], rounds: int) -> list[float]:
    """Median µs per event of each of ``works`` (each returns how many events it
    handled), their rounds interleaved."""
    times: list[list[float]] = [[] for _ in works]
    for _ in range(rounds):
        for spent, work in zip(times, works, strict=True):
            start = time.perf_counter()
            n = work()
            spent.append((time.perf_counter() - start) * 1e6 / n)
    return [statistics.median(spent) for spent in times]


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("mapping_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    def mapped(module: Any, direction: str, rows: list[bytes]) -> Callable[[], int]:
        convert: Callable[[dict[str, Any], int], dict[str, Any]] = getattr(module, direction)

        def work() -> int:
            for b in rows:
                orjson.dumps(convert(orjson.loads(b), RECEIVED))
            return len(rows)
        return work

    modules: list[Any] = [mapping] + ([load(args.against)] if args.against else [])
    stages = {
        "nucleus event -> segment (loads, map, dumps)": ("nucleus_to_segment", nucleus),
        "nucleus 4.x init -> segment": ("nucleus_to_segment", init),
        "segment track -> nucleus": ("segment_to_nucleus", track),
        "segment Application Opened -> nucleus": ("segment_to_nucleus", opened),
    }
    head = "reference | this mapping" + (" | --against" if args.against else "")
    print(f"{'µs/event':46s} {head}")
    for name, (direction, rows) in stages.items():
        got = per_event([touch] + [mapped(m, direction, rows) for m in modules], args.rounds)
        print(f"{name:46s} " + " | ".join(f"{t:7.2f}" for t in got), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", help="another mapping.py to time beside this one")
    main(parser.parse_args())
