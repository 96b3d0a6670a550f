"""The mapping loses nothing (docs/mapping.md), for generated events of each family:
every field is in its documented place, and mapping to the other family and back gives
the original event again. Message ids are the same on every resend."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.families import nucleus
from agent.families import segment as spec
from agent.families.dates import iso_ms_fast, read_date
from agent.families.facts import MAX_FACT_CHARS
from agent.families.mapping import ERROR, OPENED, SEGMENT_KEY, nucleus_to_segment, segment_to_nucleus
from agent.server.limits import MAPPING_GROWTH_BYTES

MIN_MS = int(datetime(1, 1, 2, tzinfo=timezone.utc).timestamp() * 1000)
MAX_MS = int(datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp() * 1000)
received = st.integers(MIN_MS, MAX_MS)

# JSON as it comes out of the spool: no NaN, no Infinity; {} and "" where they hurt.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=8), st.just({}), st.just(""), st.just("event"))
keys = st.one_of(st.text(max_size=6), st.sampled_from(
    ["name", "messageId", SEGMENT_KEY, "path", "payload", "nucleus", "type"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=8)
objects = st.dictionaries(keys, json_values, max_size=4)

# -- Nucleus events, as ingest stores them (agent/families/nucleus.py check): `type` and
# `name` strings when present, `id` a string or a number, and always a `date`.
dates = st.one_of(
    json_values, st.integers(-10**15, 10**15), st.floats(-1e12, 1e14),
    st.integers(0, 4 * 10**12).map(str),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())).map(datetime.isoformat),
    st.integers(MIN_MS, MAX_MS).map(iso_ms_fast))
nucleus_types = st.one_of(st.sampled_from(
    ["event", "init", "error", "props", "userid", "nucleus:view", "purchase", ""]), st.text())
ids = st.one_of(st.none(), st.integers(1, 10**6), st.text(max_size=6), st.floats(0, 1e4))
NUCLEUS_FIELDS = ("appId", "userId", "machineId", "deviceId", "anonId", "sessionId", "client",
                  "platform", "osVersion", "totalRam", "version", "locale", "language", "arch",
                  "moduleVersion", "payload", "confirmation", "extra")
nucleus_events = st.builds(
    lambda required, optional, unknown: {**unknown, **required, **optional},
    st.fixed_dictionaries({"date": dates}),
    st.fixed_dictionaries({}, optional={
        "type": nucleus_types, "name": st.text(max_size=8), "id": ids,
        "event": st.sampled_from(["init", "error", "props", "other", "error:TypeError",  # old
                                  "nucleus:userid", "nucleus:props", "nucleus:view", ""]),
        **{k: json_values for k in NUCLEUS_FIELDS}, "payload": st.one_of(objects, json_values)}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2))

# The wire notes' and seeds' variants, spelled out.
MODULE_4X = {"type": "init", "id": 812345, "date": 1767225600123, "sessionId": 12345678901234,
             "deviceId": "d-hash", "anonId": "a-17", "platform": "Linux", "osVersion": "6.1.0",
             "version": "1.2.3", "locale": "en-US", "arch": "x64", "client": "nucleus-analytics",
             "moduleVersion": "4.0.3", "payload": {}}
NODEJS_3 = {"type": "error", "name": "TypeError", "id": 17, "date": "2026-01-01T00:00:00.000Z",
            "appId": "app", "machineId": "m-hash", "sessionId": 4242, "userId": "u",
            "totalRam": 23.54, "payload": {"name": "own", "stack": "s"}, "platform": "Darwin"}
PYTHON = {"type": "event", "name": "click", "id": 9999, "date": "2026-06-01T12:00:00",
          "machineId": "md5", "sessionId": "s", "totalRam": 16, "payload": {"x": 1}}
OLD = {"event": "init", "machineId": "m", "language": "de", "date": 1767225600.5,
       "confirmation": "tok", "version": "0.1.0"}
SEED_000 = {"event": "click", "id": "1", "userId": "u", "machineId": "m", "sessionId": 1234,
            "platform": "darwin", "osVersion": "18.2.0", "totalRam": 8, "version": "0.1.0",
            "language": "en-US", "payload": {}, "date": "not a date"}

# Where docs/mapping.md puts each Nucleus field that has a Segment place of its own.
PLACES = {"userId": ("userId",), "platform": ("context", "os", "name"),
          "osVersion": ("context", "os", "version"), "version": ("context", "app", "version"),
          "arch": ("context", "device", "arch"), "totalRam": ("context", "device", "totalRam"),
          "machineId": ("context", "device", "id"), "locale": ("context", "locale"),
          "date": ("timestamp",)}


def within_growth(original: dict[str, Any], out: dict[str, Any]) -> bool:
    """The bound ingest's size check relies on (agent/server/limits.py): a mapped event
    is at most three copies of the original and MAPPING_GROWTH_BYTES more."""
    return len(orjson.dumps(out)) <= 3 * len(orjson.dumps(original)) + MAPPING_GROWTH_BYTES


def at(ev: dict[str, Any], path: tuple[str, ...]) -> Any:
    for step in path:
        ev = ev[step]
    return ev


def nucleus_field_is_placed(name: str, value: Any, out: dict[str, Any]) -> bool:
    kept = out["context"]["nucleus"]
    if name in kept:
        return bool(kept[name] == value)
    if name in PLACES:
        return bool(at(out, PLACES[name]) == value)
    if name == "payload":
        return bool(out.get("traits", out.get("properties")) == value)
    assert name == "name"
    return bool(out.get("name", out.get("event")) == value)


@settings(max_examples=600, deadline=None)
@given(nucleus_events, received)
@example(MODULE_4X, 1767225600000)
@example(NODEJS_3, 1767225600000)
@example(PYTHON, 1767225600000)
@example(OLD, 1767225600000)
@example(SEED_000, 1767225600000)
@example({"type": "event", "userId": "", "date": "2024-01-01T00:00:00.000Z"}, 0)
@example({"userId": {"a": 1}, "machineId": True, "deviceId": [1], "anonId": "", "date": 0}, 0)
@example({"date": "0999-01-01T00:00:00Z"}, 0)   # a year of three digits: "0999"
@example({"event": "Clicked", "name": "Clicked", "date": 0}, 0)   # the seed's key and its table's
def test_nucleus_to_segment_and_back(ev: dict[str, Any], at_ms: int) -> None:
    original = copy.deepcopy(ev)
    out = nucleus_to_segment(ev, at_ms)
    assert ev == original                                   # pure: the row is not changed
    spec.check(out, spec.TYPES)                 # a message every Segment collector takes
    assert within_growth(original, out)
    for name, value in original.items():
        assert nucleus_field_is_placed(name, value, out), name
    assert out["timestamp"] == (read_date(original["date"]) or iso_ms_fast(at_ms))
    wire = orjson.loads(orjson.dumps(out))                  # what the upstream receives
    assert segment_to_nucleus(wire, at_ms + 1) == original
    # A resend, later, maps to the very same messageId.
    assert nucleus_to_segment(copy.deepcopy(original), at_ms + 5000)["messageId"] == \
        out["messageId"]


# -- Segment events, as ingest stores them (agent/families/segment.py): one of the two
# ids, a messageId, receivedAt, a timestamp, and whatever else the app sent.
segment_ids = st.one_of(st.text(min_size=1, max_size=6), st.integers(-10**6, 10**6))
segment_types = st.sampled_from(["track", "identify", "page", "screen", "group", "alias"])
contexts = st.fixed_dictionaries({}, optional={
    "os": st.one_of(st.fixed_dictionaries({}, optional={"name": st.text(max_size=6),
                                                         "version": st.text(max_size=4)}),
                    json_values),
    "device": st.one_of(st.fixed_dictionaries({}, optional={
        "id": st.text(max_size=6), "totalRam": st.integers(0, 64), "arch": st.text(max_size=4)}),
        json_values),
    "app": objects, "locale": json_values, "page": objects, "library": objects,
    "ip": st.text(max_size=8), "sessionId": json_values, "traits": objects,
    "nucleus": st.one_of(objects, st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["init", "error", "event"]), "sessionId": json_values,
        "appId": json_values, "client": json_values, "moduleVersion": json_values}))})
segment_events = st.builds(
    lambda required, optional, unknown: {**unknown, **required, **optional},
    st.fixed_dictionaries({"type": segment_types,
                           "messageId": st.one_of(st.text(min_size=1, max_size=12),
                                                  st.just("nucleus-0")),
                           "receivedAt": st.integers(MIN_MS, MAX_MS).map(iso_ms_fast)}),
    st.fixed_dictionaries({}, optional={
        "event": st.one_of(st.sampled_from([OPENED, ERROR, "Clicked"]), st.text(max_size=6)),
        "userId": segment_ids, "anonymousId": st.one_of(segment_ids, st.none()),
        "name": st.text(max_size=6), "groupId": segment_ids, "previousId": segment_ids,
        "timestamp": st.text(max_size=6), "originalTimestamp": st.text(max_size=6),
        "properties": st.one_of(objects, st.fixed_dictionaries({"name": st.text(max_size=5)},
                                                               optional={"x": json_values})),
        "traits": objects, "context": contexts, "integrations": objects}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2))

OPENED_EVENT = {"type": "track", "event": OPENED, "anonymousId": "a", "messageId": "m1",
                "receivedAt": "2026-01-01T00:00:00.000Z", "timestamp": "2026-01-01T00:00:00Z",
                "context": {"os": {"name": "Linux", "version": "6"}, "locale": "en-GB",
                            "app": {"version": "2"}, "device": {"id": "d", "totalRam": 8},
                            "page": {"url": "u"}},
                "integrations": {"All": False}, "section": "top"}
ERROR_EVENT = {"type": "track", "event": ERROR, "userId": 5, "messageId": "m2",
               "receivedAt": "2026-01-01T00:00:00.000Z",
               "properties": {"name": "TypeError", "messageId": "own"}}
TRANTHOR = {"type": "track", "messageId": "msg_0a1b", "timestamp": "2025-07-15T10:30:00.000Z",
            "files": [{"type": "Base64Encoded", "name": "a.txt", "mimeType": "text/plain",
                       "data": "aGk="}],
            "context": {"userAgent": "Mozilla/5.0", "locale": "en-GB"}, "event": "PRODUCT_VIEWED",
            "properties": {"productId": "p", "price": 29.99}, "userId": "usr_a1",
            "receivedAt": "2025-07-15T10:30:01.000Z"}
SEGMENTSTREAM_HIT = {"type": "track", "messageId": "4c59d330-35c7-11e9", "event": "Click",
                     "properties": {"category": "Nav", "label": "top", "nonInteraction": False},
                     "anonymousId": "a", "context": {"traits": {"emailHash": "h"}},
                     "timestamp": "2019-02-20T10:00:00.000Z",
                     "receivedAt": "2019-02-20T10:00:01.000Z"}
FROM_NUCLEUS = {"type": "track", "event": "x", "userId": "u", "messageId": "nucleus-abc",
                "receivedAt": "2026-01-01T00:00:00.000Z",
                "context": {"nucleus": {"type": "event", "sessionId": 1}}}


@settings(max_examples=600, deadline=None)
@given(segment_events, received)
@example(OPENED_EVENT, 1767225600000)
@example({"type": "track", "messageId": "nucleus-0", "event": OPENED, "userId": "0",
          "receivedAt": "1970-01-01T00:00:00.000Z", "originalTimestamp": "",
          "timestamp": "²", "context": {"nucleus": {}}}, 0)   # isdigit, yet no float()
@example(ERROR_EVENT, 1767225600000)
@example(FROM_NUCLEUS, 1767225600000)
@example(TRANTHOR, 1767225600000)
@example(SEGMENTSTREAM_HIT, 1767225600000)
def test_segment_to_nucleus_and_back(ev: dict[str, Any], at_ms: int) -> None:
    original = copy.deepcopy(ev)
    out = segment_to_nucleus(ev, at_ms)
    assert ev == original
    assert within_growth(original, out)
    payload = out["payload"]
    rest = payload[SEGMENT_KEY]                              # every field, but the body
    for name, value in original.items():
        in_rest = name in rest and rest[name] == value
        assert in_rest or payload_holds(payload, name, value, out), name
    assert "id" not in out           # the uplink numbers events: the spool seq, every resend
    assert nucleus.fault(0, out) is None     # an event every Nucleus upstream takes
    wire = orjson.loads(orjson.dumps(out))
    assert nucleus_to_segment(wire, at_ms + 1) == original



# A device id as the config allows it (MAX_FACT_CHARS characters, no line breaks or control
# characters: format, unassigned and private-use ones are taken), and the dearest ones: four
# bytes a character in UTF-8, and a character JSON escapes.
machine_ids = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                      min_size=1, max_size=MAX_FACT_CHARS)


@settings(max_examples=300, deadline=None)
@given(segment_events, received, machine_ids)
@example({"type": "track", "event": "x", "userId": "u"}, 0, "\U0001F600" * MAX_FACT_CHARS)
@example({"type": "track", "event": "x", "userId": "u"}, 0, "\\" * MAX_FACT_CHARS)
def test_the_device_s_machine_id_keeps_a_mapped_event_within_its_growth(
        ev: dict[str, Any], at_ms: int, machine: str) -> None:
    """The device's id, filled into a Segment event mapped to Nucleus that names no device
    of its own, is within what ingest's size check allows a mapping to add."""
    assert within_growth(ev, segment_to_nucleus(ev, at_ms, machine))

def payload_holds(payload: dict[str, Any], name: str, value: Any, out: dict[str, Any]) -> bool:
    """The properties or traits, which became the payload (an error's name: the Nucleus name)."""
    body = {k: v for k, v in payload.items() if k not in (SEGMENT_KEY, "messageId")}
    if out["type"] == "error":
        body["name"] = out["name"]
    return name in ("properties", "traits") and body == value
