"""A batch stored as sent (families/segment_as_sent.py) is stored as the general path
would store it: for any batch it takes, every message is one the general path takes too
(orjson's dicts, ``segment.accepted``), with the same dedupe key and lane, and a body that
reads as the same JSON (a `messageId` it made aside). It takes the usual SDK batch; any
batch with something to merge, drop, refuse or read differently it leaves to the general
path. Batches are drawn with values of every kind each field may hold, written compact,
as Python's json writes them (spaces, non-ASCII escaped) and with whitespace around."""

from __future__ import annotations

import uuid
from typing import Any

import hypothesis
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.device import detect
from agent.dialects.exact_json import kept_as_sent
from agent.families import segment as spec
from agent.families import segment_as_sent as as_sent
from agent.families.enrich import ERROR, OPENED, Enrich
from agent.families.errors import Invalid
from agent.families.event import dedupe_key
from agent.families.lanes import Lanes
from agent.settings import DeviceConfig
from tests.json_writers import ABSENT, changed, writers

KEY = "appkey"
RECEIVED = "2026-12-06T12:00:00.000Z"
ENRICH = Enrich(detect(DeviceConfig()))

texts = st.sampled_from(["u-1", "", "Café ☃", "x" * 100, "a\u0000b", "\U0001f600 1e-400, 9e-4123"])
ids = st.one_of(texts, st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                st.none(), st.booleans(), st.just(ABSENT))
dates = st.sampled_from(["2026-01-15T10:20:30.123Z", "2026-01-15T10:20:30Z", "2026-01-15",
                         "2026-13-15T10:20:30.123Z", "yesterday", "2026-01-15T10:20:30.123+0100",
                         None, 17, ABSENT])
objects = st.one_of(st.just(ABSENT), st.none(), st.just([1]), st.just("o"), st.dictionaries(
    st.sampled_from(["a", "b", "ü", "library"]),
    st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
              texts, st.none(), st.lists(st.integers(0, 9), max_size=3)), max_size=4))
usual = st.fixed_dictionaries({
    "type": st.just("track"), "event": st.sampled_from(["Clicked", "Order Completed"]),
    "userId": st.just("u-1"), "messageId": st.uuids().map(str),
    "timestamp": st.just("2026-01-15T10:20:30.123Z"),
    "properties": st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9)),
})
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias", "x", 1]),
    "event": st.one_of(st.sampled_from(["Clicked", "", OPENED, ERROR, "Order Completed"]), ids),
    "userId": ids, "anonymousId": ids, "groupId": ids, "previousId": ids,
    "name": st.one_of(st.sampled_from(["Home"]), ids), "messageId": ids,
    "timestamp": dates, "originalTimestamp": dates, "sentAt": dates, "receivedAt": dates,
    "writeKey": st.sampled_from([KEY, "other", ABSENT]),
    "properties": objects, "traits": objects, "context": objects, "integrations": objects,
    "custom": objects,
}


# A usual message with a few of its members changed, left out or added.
change = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: FIELDS[name].map(
    lambda value: (name, value)))
message = st.builds(changed, usual, st.lists(change, max_size=3))
envelope = st.fixed_dictionaries({}, optional={
    "sentAt": dates, "timestamp": dates, "originalTimestamp": dates,
    "context": objects, "integrations": objects, "writeKey": st.just(KEY),
}).map(lambda m: {k: v for k, v in m.items() if v is not ABSENT})


def general(raw: bytes) -> list[tuple[int, bytes, int]] | None:
    """The general path's events for ``raw``, or None if it refuses any message (or all)."""
    body = orjson.loads(raw)
    try:
        items = spec.batch_items(body)
    except Invalid:
        return None
    given = spec.shared(RECEIVED, body)
    head = spec.dedupe_head(KEY)
    out = []
    for ev in items:
        try:
            out.append(spec.accepted(ev, KEY, spec.TYPES, given, ENRICH, len(raw), False, head))
        except Invalid:
            return None
    return out or None


def same_events(raw: bytes) -> bool:
    """``raw`` stored as sent (if it may be) as the general path stores it; whether it was."""
    if not kept_as_sent(raw):
        return False
    kept = as_sent.accepted(raw, spec.TYPES, KEY, RECEIVED, spec.dedupe_head(KEY), Lanes())
    if kept is None:
        return False
    expected = general(raw)
    assert expected is not None, raw
    assert len(kept) == len(expected)
    for event, (dedupe, body, lane) in zip(kept, expected, strict=True):
        got, want = orjson.loads(event.body), orjson.loads(body)
        if got["messageId"] != want["messageId"]:   # made: a new uuid4 each time
            assert uuid.UUID(got["messageId"]).version == 4
            assert event.dedupe == dedupe_key("segment", KEY, got["messageId"])
            got["messageId"] = want["messageId"]
        else:
            assert event.dedupe == dedupe
        assert got == want, (event.body, body)
        assert list(got) == list(want), "members in another order"
        assert event.lane == lane and event.key == KEY
        assert b"\n" not in event.body
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message, min_size=1, max_size=4), envelope, writers)
def test_a_batch_stored_as_sent_is_what_the_general_path_stores(
        messages: list[dict[str, Any]], outer: dict[str, Any], write: Any) -> None:
    hypothesis.event("stored as sent" if same_events(write({**outer, "batch": messages}))
          else "the general path's")


@settings(max_examples=100, deadline=None)
@given(st.lists(usual, min_size=1, max_size=5), writers)
def test_the_usual_sdk_batch_is_stored_as_sent(messages: list[dict[str, Any]],
                                                write: Any) -> None:
    raw = write({"batch": messages, "sentAt": "2026-01-15T10:20:31.000Z"})
    assert same_events(raw)


def test_what_may_not_be_kept_as_sent_goes_the_general_way() -> None:
    """Bytes orjson refuses or reads as another value, which msgspec skips unread."""
    ok = b'{"type":"track","event":"e","userId":"u","messageId":"m","properties":{"p":%s}}'
    for value in (b'"\xff"', b"1e400", b"1E+309", b"1e-400", b"-0", b"123456789012345678901"):
        raw = b'{"batch":[' + ok % value + b"]}"
        assert not kept_as_sent(raw), value
    assert kept_as_sent(b'{"batch":[' + ok % b'"caf\xc3\xa9 +0 1e99"' + b"]}")
    assert not kept_as_sent(b'{"batch":[\n' + ok % b"1" + b"]}")
