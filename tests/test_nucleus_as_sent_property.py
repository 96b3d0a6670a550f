"""A Nucleus message stored as sent (families/nucleus_as_sent.py) is stored as the general
path would store it: for any message it takes, every event is one the general path takes
too (orjson's dicts, ``nucleus.accept``), with the same dedupe key, id, lane and acks,
and a body that reads as the same JSON, members in the same order (the receive time as
`date` aside). It takes the usual module's message; any message with an event to leave
out, to enrich, to key by its whole body or to read differently it leaves to the general
path. Messages are drawn with values of every kind each field may hold, written compact,
as Python's json writes them (spaces, non-ASCII escaped) and with whitespace around."""

from __future__ import annotations

from typing import Any

import hypothesis
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.device import detect
from agent.dialects import nucleus_json
from agent.dialects.exact_json import kept_as_sent
from agent.families import nucleus as family
from agent.families import nucleus_as_sent as as_sent
from agent.families.enrich import Enrich
from agent.families.errors import Invalid
from agent.families.lanes import Lanes
from agent.settings import DeviceConfig
from tests.json_writers import ABSENT, changed, writers

KEY = "app-1"
RECEIVED = "2026-12-06T12:00:00.000Z"
ENRICH = Enrich(detect(DeviceConfig()))
MOST = 1000

texts = st.sampled_from(["s-1", "", "Café ☃", "x" * 1025, "a\u0000b", "\U0001f600 1e-400, 9e-4123",
                         "\ud83d cut"])
ids = st.one_of(texts, st.integers(-5, 5), st.integers(2**62, 2**66),
                st.floats(allow_nan=False, allow_infinity=False), st.none(), st.booleans(),
                st.just(ABSENT), st.just({}), st.just([1]))
dates = st.sampled_from(["2026-01-15T10:20:30.123Z", "2026-01-15", "yesterday", None, 17,
                         ABSENT])
objects = st.one_of(st.just(ABSENT), st.none(), st.just([1]), st.just("o"), st.dictionaries(
    st.sampled_from(["a", "b", "ü", "id", "date"]),
    st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
              texts, st.none(), st.lists(st.integers(0, 9), max_size=3)), max_size=4))
# Who sent it, as modules name it: the first of these that is truthy keys a resend.
who = st.sampled_from([{"machineId": "m-1"}, {"deviceId": "d-1", "anonId": "a-1"},
                       {"anonId": "a-1"}, {"machineId": "", "deviceId": "d-1", "anonId": "a-1"},
                       {"machineId": 0, "anonId": "a-1"}])
usual = st.builds(lambda ev, ids: {**ev, **ids}, st.fixed_dictionaries({
    "type": st.just("event"), "name": st.sampled_from(["Clicked", "Saved"]),
    "date": st.just("2026-01-15T10:20:30.123Z"), "appVersion": st.just("1.2.0"),
    "sessionId": st.just("s-1"), "id": st.integers(1, 10_000),
    "payload": st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9)),
}), who)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["event", "init", "error", "heartbeat", "userid", "props",
                             "nucleus:view", "", None, 1, ABSENT]),
    "name": st.one_of(st.sampled_from(["Clicked", ""]), ids),
    "event": st.sampled_from(["init", "error:crash", "Clicked", "nucleus:props", ABSENT]),
    "id": ids, "date": dates, "machineId": ids, "deviceId": ids, "anonId": ids,
    "sessionId": ids, "payload": objects, "custom": objects,
}


# A usual event with a few of its members changed, left out or added; now and then not an
# object at all.
change = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: FIELDS[name].map(
    lambda value: (name, value)))
event = st.one_of(st.builds(changed, usual, st.lists(change, max_size=3)),
                  st.sampled_from([1, "e", [], None, {}]))
envelope = st.fixed_dictionaries({}, optional={
    "sentAt": dates, "machineId": ids, "data": st.just("not a list"),
}).map(lambda m: {k: v for k, v in m.items() if v is not ABSENT})


def general(raw: bytes) -> family.Accepted | None:
    """The general path's events for ``raw``, or None if it leaves any out (or refuses the
    message)."""
    try:
        msg, faults = nucleus_json.read(raw)
        got = family.accept(msg, KEY, ENRICH, faults)
    except Invalid:
        return None
    return None if got.left_out else got


def same_events(raw: bytes) -> bool:
    """``raw`` stored as sent (if it may be) as the general path stores it; whether it was.
    In the dialect's order: the events (which must never raise), then the bytes."""
    kept = as_sent.accepted(raw, KEY, RECEIVED, Lanes(), MOST)
    if kept is None or not kept_as_sent(raw):
        return False
    expected = general(raw)
    assert expected is not None, raw
    assert (kept.acks, kept.ack_at, kept.left_out) == \
        (expected.acks, expected.ack_at, expected.left_out)
    assert len(kept.events) == len(expected.events)
    for got_event, want_event in zip(kept.events, expected.events, strict=True):
        got, want = orjson.loads(got_event.body), orjson.loads(want_event.body)
        if got.get("date") == RECEIVED:   # the general path's own receive time
            assert list(got)[-1] == "date"
            got["date"] = want["date"]
        assert got == want, (got_event.body, want_event.body)
        assert list(got) == list(want), "members in another order"
        assert (got_event.dedupe, got_event.ack_id, got_event.lane, got_event.key) == \
            (want_event.dedupe, want_event.ack_id, want_event.lane, want_event.key)
        assert b"\n" not in got_event.body
    return True


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, max_size=4), envelope, writers)
def test_a_message_stored_as_sent_is_what_the_general_path_stores(
        events: list[Any], outer: dict[str, Any], write: Any) -> None:
    hypothesis.event("stored as sent" if same_events(write({"data": events, **outer}))
                     else "the general path's")


@settings(max_examples=100, deadline=None)
@given(st.lists(usual, min_size=1, max_size=5), writers)
def test_the_usual_module_message_is_stored_as_sent(events: list[dict[str, Any]],
                                                     write: Any) -> None:
    assert same_events(write({"data": events}))


def test_what_is_left_to_the_general_path() -> None:
    """What msgspec would read otherwise, or what the general path must judge or fill."""
    ok = b'{"type":"event","name":"n","date":"d","machineId":"m","id":%s%s}'
    assert same_events(b'{"data":[' + ok % (b"1", b"") + b"]}")
    undated = (b'{"data":[{"type":"event", "id":"7" }, {"type":"heartbeat","id":8},'
               b' {"type":"heartbeat","machineId":"m"}]}')
    assert same_events(undated)
    kept = as_sent.accepted(undated, KEY, RECEIVED, Lanes(), MOST)
    assert kept is not None and kept.acks == ["7", 8]
    assert [e.body for e in kept.events] == [
        b'{"type":"event", "id":"7" ,"date":"' + RECEIVED.encode() + b'"}']
    for value, rest in ((b"1", b',"x":"\\ud83d"'), (b"1", b',"x":1e400'),
                        (b"true", b""), (b"null", b""), (b"1", b',"type":"init"'),
                        (b"1", b',"date":null'), (b"1", b',"x":-0')):
        raw = b'{"data":[' + ok % (value, rest) + b"]}"
        assert as_sent.accepted(raw, KEY, RECEIVED, Lanes(), MOST) is None \
            or not kept_as_sent(raw), raw
    over = b'{"data":[' + b",".join([ok % (b"1", b"")] * 3) + b"]}"
    assert as_sent.accepted(over, KEY, RECEIVED, Lanes(), 2) is None
