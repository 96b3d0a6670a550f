"""agent/families/mapping.py on its own: the tables of docs/mapping.md, dates, round trips
(tests/test_mapping_property.py generates the events)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families import dates
from agent.families import segment as spec
from agent.families.event import iso_ms
from agent.families.mapping import nucleus_to_segment, segment_to_nucleus, to_iso

RECEIVED = 1767225600000   # 2026-01-01T00:00:00.000Z


@pytest.mark.parametrize("date,expected", [
    ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000Z"),
    ("2026-01-01T02:00:00.250+02:00", "2026-01-01T00:00:00.250Z"),
    (1767225600123, "2026-01-01T00:00:00.123Z"),           # JS epoch ms
    (1767225600.5, "2026-01-01T00:00:00.500Z"),            # Swift float seconds
    ("1767225600123", "2026-01-01T00:00:00.123Z"),
    (None, "2026-01-01T00:00:00.000Z"),                     # missing: the receive time
    ("yesterday", "2026-01-01T00:00:00.000Z"),              # unreadable: the receive time
    (True, "2026-01-01T00:00:00.000Z"),
    (1e30, "2026-01-01T00:00:00.000Z"),                     # out of range
    ("0999-06-01T00:00:00Z", "0999-06-01T00:00:00.000Z"),   # four digits, as ISO 8601 has it
    (-40_000_000_000_000, "0702-06-15T00:53:20.000Z"),
])
def test_nucleus_dates(date: object, expected: str) -> None:
    assert to_iso(date, RECEIVED) == expected


def test_naive_iso_is_the_devices_local_time() -> None:
    naive = "2026-06-01T12:00:00"
    local = datetime.fromisoformat(naive).astimezone()
    expected = local.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert to_iso(naive, RECEIVED) == expected


def test_nucleus_to_segment_message_id_is_stable_and_distinct() -> None:
    a = {"type": "event", "name": "a", "id": 1, "machineId": "m", "date": "2026-01-01T00:00:00Z"}
    b = {**a, "id": 2}
    assert nucleus_to_segment(dict(a), 1)["messageId"] == nucleus_to_segment(dict(a), 2)["messageId"]
    assert nucleus_to_segment(a, 1)["messageId"] != nucleus_to_segment(b, 1)["messageId"]
    assert len(nucleus_to_segment(a, 1)["messageId"]) < 100


def test_odd_nucleus_events() -> None:
    old = nucleus_to_segment({"event": "init", "machineId": "m", "language": "de"}, RECEIVED)
    assert old["event"] == "Application Opened" and old["context"]["locale"] == "de"
    custom = nucleus_to_segment({"type": "purchase", "payload": [1, 2]}, RECEIVED)
    assert (custom["event"], custom["properties"]) == ("purchase", {"payload": [1, 2]})
    assert custom["anonymousId"] == "nucleus-anonymous"    # Segment needs one id
    named = nucleus_to_segment({"type": "purchase", "name": "p", "deviceId": "d"}, RECEIVED)
    assert named["event"] == "p" and named["anonymousId"] == "d"


@pytest.mark.parametrize("ev", [
    {"type": "init", "id": 1, "machineId": "m", "sessionId": 7, "platform": "Linux",
     "osVersion": "6", "version": "1.0", "locale": "en", "date": "2026-01-01T00:00:00.000Z"},
    {"type": "event", "name": "click", "id": 2, "machineId": "m", "sessionId": 7,
     "payload": {"x": 1}, "date": "2026-01-01T00:00:00.000Z"},
    {"type": "props", "id": 3, "machineId": "m", "userId": "u", "payload": {"plan": "pro"},
     "date": "2026-01-01T00:00:00.000Z"},
    {"type": "nucleus:view", "name": "Home", "id": 4, "machineId": "m",
     "date": "2026-01-01T00:00:00.000Z"},
    {"type": "custom", "name": "c", "id": 5, "machineId": "m", "date": "2026-01-01T00:00:00.000Z"},
])
def test_nucleus_round_trip_gives_the_event_back(ev: dict[str, object]) -> None:
    assert segment_to_nucleus(nucleus_to_segment(dict(ev), RECEIVED), RECEIVED) == ev


@pytest.mark.parametrize(("ids", "user", "anon"), [
    ({"userId": ""}, None, "nucleus-anonymous"),
    ({"userId": {"a": 1}}, None, "nucleus-anonymous"),
    ({"userId": [1], "machineId": "m"}, None, "m"),
    ({"userId": True, "anonId": 0}, None, 0),
    ({"machineId": True}, None, "nucleus-anonymous"),
    ({"machineId": ["m"], "deviceId": "d"}, None, "d"),
    ({"machineId": "", "deviceId": {}, "anonId": "a"}, None, "a"),
    ({"anonId": "", "userId": "u"}, "u", None),
    ({"deviceId": False, "userId": 5}, 5, None),
])
def test_an_id_segment_refuses_stays_in_context_nucleus(
        ids: dict[str, Any], user: Any, anon: Any) -> None:
    # `userId` / `anonymousId` get only what Segment takes as an id; anonymousId falls back
    # to the next id, then to "nucleus-anonymous"; each id is in context.nucleus verbatim.
    ev = {"type": "event", "name": "e", "id": 1, "date": "2026-01-01T00:00:00.000Z", **ids}
    out = nucleus_to_segment(dict(ev), RECEIVED)
    spec.check(out, spec.TYPES)
    assert (out.get("userId"), out.get("anonymousId")) == (user, anon)
    for name, value in ids.items():
        if value not in (user, anon) or isinstance(value, bool):
            assert out["context"]["nucleus"][name] == value, name
    assert segment_to_nucleus(out, RECEIVED) == ev


def test_an_event_stored_mapped_by_another_agent_version_comes_back() -> None:
    # Stored mapped at ingest, then upgraded, then routed to a Nucleus upstream: the
    # event its app sent, though the stored one names the older agent in context.library.
    ev = {"type": "event", "name": "click", "id": 7, "machineId": "m", "sessionId": 7,
          "payload": {"x": 1}, "date": "2026-01-01T00:00:00.000Z"}
    stored = nucleus_to_segment(dict(ev), RECEIVED)
    stored["context"]["library"] = {"name": "outpost", "version": "0.0.1"}
    assert segment_to_nucleus(stored, RECEIVED) == ev


def test_segment_without_time_uses_received_at() -> None:
    out = segment_to_nucleus({"type": "track", "event": "e", "userId": 5,
                              "receivedAt": "2026-01-01T00:00:01.000Z"}, int(time.time() * 1000))
    assert out["date"] == "2026-01-01T00:00:01.000Z" and out["userId"] == "5"


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**17, 10**17))
def test_iso_ms_fast_is_iso_ms(ms: int) -> None:
    try:
        expected: str | type[BaseException] = iso_ms(ms)
    except (ValueError, OverflowError, OSError) as exc:
        expected = type(exc)
    for _ in range(2):  # formatted, then from the cache of seconds
        try:
            got: str | type[BaseException] = dates.iso_ms_fast(ms)
        except (ValueError, OverflowError, OSError) as exc:
            got = type(exc)
        assert got == expected


def test_iso_ms_fast_cache_stays_bounded() -> None:
    for second in range(dates._SECONDS_MAX + 10):
        assert dates.iso_ms_fast(second * 1000 + 7) == iso_ms(second * 1000 + 7)
        assert len(dates._SECONDS) <= dates._SECONDS_MAX


def _read_the_long_way(value: str) -> str | None:
    """What read_date gives an ISO string with a zone through fromisoformat alone."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return iso_ms((when.astimezone(timezone.utc) - epoch) // timedelta(milliseconds=1))


@settings(max_examples=400, deadline=None)
@given(st.integers(-62_135_596_800_000 + 86_400_000, 253_402_214_399_999),
       st.sampled_from(["", "2026-13-01T00:00:00", "2026-02-30T10:00:00", "2026-01-01T24:00:00",
                        "2026-01-01 00:00:00", "٢026-01-01T00:00:00"]),
       st.sampled_from([".000Z", ".999Z", ".12²Z", ",123Z", ".123z", ".1234"]))
def test_read_date_fast_path_is_the_long_way(ms: int, prefix: str, tail: str) -> None:
    # The dates mapping writes skip fromisoformat (dates._utc_ms); the answer must be the
    # long way's to the millisecond.
    value = iso_ms(ms) if not prefix else prefix + tail
    for _ in range(2):   # the epoch second computed, then from its cache
        assert dates.read_date(value) == _read_the_long_way(value)
        assert dates.read_date(value[:20] + tail[1:]) == _read_the_long_way(value[:20] + tail[1:])


@settings(max_examples=400, deadline=None)
@given(st.integers(-30_610_224_000_000, 253_402_214_399_999))   # years 1000 to 9999
def test_a_date_in_iso_ms_form_is_read_as_the_same_instant(ms: int) -> None:
    # A module's date is the time the event happened: its Segment timestamp is that
    # very millisecond, not one earlier by float rounding (never a silent change).
    value = iso_ms(ms)
    assert dates.read_date(value) == value
    assert dates.read_date(value.replace("Z", "+00:00")) == value
    assert dates.read_date(value[:-1]) is not None  # naive: local time, still read


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(-10**11 - 2, 10**11 + 2), st.integers(-2**63, 2**64 - 1),
                 st.sampled_from([-10**11, 10**11, 1 - 10**11, 10**11 - 1, 0, -1])))
def test_an_integer_date_is_read_as_its_digits_are(sent: int) -> None:
    # An integer (JS modules' epoch milliseconds) is read without Decimal: the same
    # millisecond as its digits read the long way (seconds below 10**11), or None.
    assert dates.read_date(sent) == dates.read_date(str(sent))


@pytest.mark.parametrize(("sent", "read"), [
    (1767225600.123, "2026-01-01T00:00:00.123Z"),     # Swift: seconds as a float
    (1767225600.001, "2026-01-01T00:00:00.001Z"),
    ("1767225600.999", "2026-01-01T00:00:00.999Z"),
    (1767225600123, "2026-01-01T00:00:00.123Z"),      # JS: epoch milliseconds
    (1767225600123.0, "2026-01-01T00:00:00.123Z"),
    (-0.001, "1969-12-31T23:59:59.999Z"),
])
def test_an_epoch_date_is_read_to_the_millisecond_it_names(sent: Any, read: str) -> None:
    assert dates.read_date(sent) == read


def test_a_mapped_event_keeps_its_own_millisecond() -> None:
    for ms in range(132627000, 132627000 + 1000):
        ev = {"type": "event", "name": "click", "id": 1, "date": iso_ms(ms), "sessionId": 1}
        out = nucleus_to_segment(ev, ms + 5)
        assert out["timestamp"] == iso_ms(ms)
        assert "date" not in out.get("context", {}).get("nucleus", {}), ms


def test_an_error_stored_mapped_by_the_previous_version_is_given_back_whole() -> None:
    """Until this version a payload's own `name` won `properties.name` over the error's
    type; the spool outlives an upgrade, so such an event, stored mapped, routed later to a
    Nucleus upstream, is still the Nucleus error it was (review17 M2), not a Segment event
    with its type lost."""
    error = {"type": "error", "name": "TypeError", "id": 7, "machineId": "m1",
             "date": "2026-01-15T10:20:30.123Z",
             "payload": {"name": "boom", "message": "x is undefined", "stack": "at f"}}
    stored = nucleus_to_segment(dict(error), 1768472431000)
    assert stored["properties"]["name"] == "TypeError"
    stored["properties"]["name"] = "boom"   # as the previous version stored it
    assert segment_to_nucleus(stored, 1768472431000) == error
