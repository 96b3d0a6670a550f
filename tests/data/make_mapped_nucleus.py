"""Make tests/data/mapped-nucleus.json: ordinary Nucleus events (every id a usable Segment
id, or absent, or null) and the Segment message each maps to, for
tests/test_mapping_golden.py, which keeps that output byte-identical (a mapped event's
messageId and content must not change across versions, or upstreams would not dedupe a
resend across an upgrade).

Made with the mapping of 3df3e33 (``python tests/data/make_mapped_nucleus.py
tests/data/mapped-nucleus.json``), then again once an error's name won over its payload's
own `name` in `properties.name` (docs/mapping.md §8): that changed those four entries alone;
and once an old module's `event` key, naming the app's event, became the Segment `event`
(it was `"event"`): that changed the two entries of `{"event": "other"}` with no `name`.
Each entry: [event, receive time in ms, mapped JSON]; `agent_version` is the version in
each mapped event's `context.library`.
"""
import random
import sys
from pathlib import Path
from typing import Any

import orjson

from agent import __version__
from agent.families.mapping import nucleus_to_segment

RECEIVED = 1767225600000
TYPES = ["init", "event", "error", "userid", "props", "nucleus:view", "purchase"]
DATES = ["2026-01-01T00:00:00.000Z", "2026-01-01T02:00:00.250+02:00", 1767225600123,
         1767225600.5, "1767225600123", "not a date", "2026-06-01T12:00:00Z"]
IDS = ["m-hash", "5f2c", 42, 7.5, "u-1", None]
FIELDS: dict[str, list[Any]] = {
    "name": ["click", "Home", "TypeError", "", "event"],
    "id": [1, 812345, "1", 3.0],
    "userId": IDS, "machineId": IDS, "deviceId": IDS, "anonId": IDS,
    "sessionId": [12345678901234, "s", 4242],
    "platform": ["Linux", "darwin", None], "osVersion": ["6.1.0", "18.2.0"],
    "version": ["1.2.3", "0.1.0"], "locale": ["en-US", "", None], "language": ["de", "fr"],
    "arch": ["x64", "arm64"], "totalRam": [8, 23.54, {}],
    "appId": ["app"], "client": ["nucleus-analytics"], "moduleVersion": ["4.0.3"],
    "payload": [{}, {"x": 1}, {"name": "own", "stack": "s"}, [1, 2], "text", None],
    "confirmation": ["tok"],
}


def event(rng: random.Random) -> dict[str, Any]:
    ev: dict[str, Any] = {}
    if rng.random() < 0.9:
        ev["type"] = rng.choice(TYPES)
    else:
        ev["event"] = rng.choice(["init", "error", "props", "other"])   # old modules
    for field, values in FIELDS.items():
        if rng.random() < 0.5:
            ev[field] = rng.choice(values)
    ev["date"] = rng.choice(DATES)
    return ev


def main(path: Path) -> None:
    rng = random.Random(28)
    entries = [orjson.dumps([ev, RECEIVED + i, orjson.dumps(nucleus_to_segment(ev, RECEIVED + i))
                             .decode()]) for i, ev in enumerate(event(rng) for _ in range(250))]
    # One entry a line, so that a change shows in a diff as the events it changes.
    path.write_bytes(b'{"agent_version": ' + orjson.dumps(__version__) + b',\n "events": [\n'
                     + b",\n".join(entries) + b"\n]}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
