"""Ordinary Nucleus events map to Segment byte for byte as they always have
(tests/data/make_mapped_nucleus.py made the file): an event's messageId and content
are stable across versions, so an upstream dedupes a resend sent after an upgrade, and
an event stored mapped is still given back exactly."""

from __future__ import annotations

from pathlib import Path

import orjson

from agent import __version__
from agent.families.mapping import nucleus_to_segment, segment_to_nucleus

GOLDEN = Path(__file__).parent / "data" / "mapped-nucleus.json"


def test_ordinary_nucleus_events_map_as_they_always_have() -> None:
    golden = orjson.loads(GOLDEN.read_bytes())
    library = orjson.dumps({"name": "outpost", "version": golden["agent_version"]}).decode()
    now = orjson.dumps({"name": "outpost", "version": __version__}).decode()
    assert len(golden["events"]) == 250
    for ev, received, mapped in golden["events"]:
        got = orjson.dumps(nucleus_to_segment(ev, received)).decode()
        assert got == mapped.replace(library, now), ev


def test_each_pinned_mapping_is_given_back_exactly() -> None:
    """An event stored mapped (ingest maps for a Segment upstream) and later sent to a
    Nucleus upstream is the event the app sent."""
    golden = orjson.loads(GOLDEN.read_bytes())
    for ev, received, mapped in golden["events"]:
        assert segment_to_nucleus(orjson.loads(mapped), received + 1) == ev
