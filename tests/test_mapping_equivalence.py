"""The fast family mapping sends the very bytes the plain one did (tests/mapping_reference.py):
a messageId or a field that changed would make an upstream count a resent event twice."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families import mapping
from agent.families.event import iso_ms
from tests import mapping_reference as reference

MIN_MS = int(datetime(1, 1, 2, tzinfo=timezone.utc).timestamp() * 1000)
MAX_MS = int(datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp() * 1000)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12), st.just({}), st.just("nucleus"))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
dates = st.one_of(
    json_values,
    st.integers(-10**15, 10**15), st.floats(-1e12, 1e14),
    st.integers(0, 4 * 10**12).map(str),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())).map(datetime.isoformat),
    st.datetimes().map(lambda d: d.isoformat(timespec="milliseconds") + "Z"))
kinds = st.one_of(st.sampled_from(["event", "init", "error", "props", "userid", "nucleus:view",
                                   "heartbeat", "purchase", ""]), json_values)
NUCLEUS_KEYS = ("name", "id", "sessionId", "appId", "client", "moduleVersion", "machineId",
                "deviceId", "anonId", "userId", "platform", "osVersion", "version", "locale",
                "language", "arch", "totalRam", "payload", "event", "extra")
nucleus_events = st.fixed_dictionaries(
    {}, optional={"type": kinds, "date": dates, **{k: json_values for k in NUCLEUS_KEYS},
                  "event": st.sampled_from(["init", "error", "props", "other"])})
received = st.integers(MIN_MS, MAX_MS)


def same(fast: Any, plain: Any) -> None:
    assert fast == plain
    assert orjson.dumps(fast) == orjson.dumps(plain)  # key order too: the bytes sent


@settings(max_examples=400, deadline=None)
@given(nucleus_events, received)
def test_nucleus_to_segment_is_unchanged(ev: dict[str, Any], at: int) -> None:
    before = copy.deepcopy(ev)
    same(mapping.nucleus_to_segment(ev, at), reference.nucleus_to_segment(before, at))
    assert ev == before  # the stored event is not changed


@settings(max_examples=200, deadline=None)
@given(nucleus_events, st.sampled_from(["event", "init", "x"]))
def test_nucleus_context_is_unchanged(ev: dict[str, Any], kind: str) -> None:
    same(mapping.nucleus_context(ev, kind), reference.nucleus_context(ev, kind))


@settings(max_examples=300, deadline=None)
@given(dates, received)
def test_to_iso_is_unchanged(value: Any, at: int) -> None:
    assert mapping.to_iso(value, at) == reference.to_iso(value, at)


@settings(max_examples=300, deadline=None)
@given(st.one_of(received, st.integers(-10**17, 10**17)))
def test_iso_ms_fast_is_iso_ms(ms: int) -> None:
    try:
        expected: str | type[BaseException] = iso_ms(ms)
    except (ValueError, OverflowError, OSError) as exc:
        expected = type(exc)
    for _ in range(2):  # formatted, then from the cache of seconds
        try:
            got: str | type[BaseException] = mapping.iso_ms_fast(ms)
        except (ValueError, OverflowError, OSError) as exc:
            got = type(exc)
        assert got == expected


def test_iso_ms_fast_cache_stays_bounded() -> None:
    for second in range(mapping._SECONDS_MAX + 10):
        assert mapping.iso_ms_fast(second * 1000 + 7) == iso_ms(second * 1000 + 7)
        assert len(mapping._SECONDS) <= mapping._SECONDS_MAX


segment_events = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias", "x"]),
    "event": st.one_of(st.sampled_from([mapping.OPENED, mapping.ERROR, "Clicked"]), json_values),
    "properties": json_values, "traits": json_values, "messageId": json_values,
    "timestamp": json_values, "userId": json_values, "anonymousId": json_values,
    "context": st.fixed_dictionaries({}, optional={
        "nucleus": st.dictionaries(st.sampled_from(["type", "sessionId", "appId"]), json_values),
        "os": json_values, "device": json_values, "app": json_values, "locale": json_values})})


@settings(max_examples=300, deadline=None)
@given(segment_events, received)
def test_segment_to_nucleus_is_unchanged(ev: dict[str, Any], at: int) -> None:
    same(mapping.segment_to_nucleus(copy.deepcopy(ev), at),
         reference.segment_to_nucleus(copy.deepcopy(ev), at))
