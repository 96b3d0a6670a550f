"""The 32 KB message limit inside a batch over 32 KB, as real SDKs send them.

analytics-python, analytics-node and the browser fill `/v1/batch` (and `/v1/capture`)
requests well past 32 KB; each message is measured as sent (its compact JSON) against
Segment's 32 KB per event. These tests pin the verdicts at the edges: a message just over
the limit is refused 413 and one exactly at it taken; one under it taken even when the
batch context and the fields the agent sets push its stored body over; a message over the
limit is refused 413 before any rule of shape (its 400); one over the limit as sent only
by the fields the agent drops or replaces (`sentAt`, `writeKey`, `receivedAt`) is still
refused; and the messages taken are stored byte for byte as completed.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.families.segment import MAX_EVENT_BYTES
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up

KEY = "size-key"
AUTH = {"Authorization": basic(KEY)}
CONTEXT = {"library": {"name": "analytics-python", "version": "2.3.2"}, "pad": "c" * 400}
STAMP = "2026-01-15T10:20:30.123Z"
LONG_STAMP = "2026-01-15T10:20:30." + "1" * 2_000 + "Z"   # a date: any count of digits


def sized(i: int, size: int, **kw: Any) -> dict[str, Any]:
    """A track whose compact JSON as sent is ``size`` bytes, padded in `properties`."""
    msg = {"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}",
           "timestamp": STAMP, "properties": {"pad": ""}, **kw}
    msg = {k: v for k, v in msg.items() if v is not None}
    missing = size - len(orjson.dumps(msg))
    assert missing >= 0, (i, size)
    msg["properties"] = {"pad": "p" * missing}
    assert len(orjson.dumps(msg)) == size
    return msg


def batch() -> list[dict[str, Any]]:
    limit = MAX_EVENT_BYTES
    return [
        sized(0, 1_000),                                    # taken
        sized(1, limit + 1),                                # 413
        sized(2, limit),                                    # taken: at the limit
        sized(3, limit - 20),                               # taken, stored over the limit
        sized(4, limit + 1, event=None),                    # 413, not its 400
        sized(5, 2_000, event=None),                        # 400
        # Over as sent, under once the agent drops or replaces the long field: 413.
        sized(6, limit + 1, sentAt=LONG_STAMP),
        sized(7, limit + 1, receivedAt="r" * 2_000),
        sized(8, limit, receivedAt="r" * 2_000, sentAt=LONG_STAMP),  # taken
        sized(9, limit + 1, writeKey="w" * 2_000),
        sized(10, limit, writeKey="w" * 2_000),             # taken
        sized(11, limit - 10, timestamp=None, messageId=None),  # taken, fields set
        sized(12, 500),                                     # taken
    ]


TAKEN = [0, 2, 3, 8, 10, 11, 12]
OVER = [1, 4, 6, 7, 9]


def completed(msg: dict[str, Any], stored: dict[str, Any]) -> bytes:
    """``msg`` as the agent completes it: the batch context merged in (its own keys win),
    the transport fields dropped, `messageId`, `timestamp` and `receivedAt` set (the
    values it set read back from ``stored``)."""
    out = dict(msg)
    out["context"] = {**CONTEXT, **msg.get("context", {})}
    out.pop("writeKey", None)
    out.pop("sentAt", None)
    if "messageId" not in out:
        out["messageId"] = stored["messageId"]
    if "timestamp" not in out:
        out["timestamp"] = stored["timestamp"]
    out["receivedAt"] = stored["receivedAt"]
    return orjson.dumps(out)


async def stored_bodies(agent: Any) -> list[bytes]:
    rows = await agent.spool.fetch(agent.spool.streams[KEY].id, 0, 100)
    return [bytes(r.body) for r in rows]


async def test_a_segment_batch_over_32_kb_judges_each_message_as_sent(make_agent: Any) -> None:
    agent = await make_agent()
    messages = batch()
    body = {"batch": messages, "context": CONTEXT}
    assert len(orjson.dumps(body)) > 5 * MAX_EVENT_BYTES
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    # analytics-python (the batch's context names it) is answered 200 for a partial store.
    assert reply.status == 200, reply.body
    errors = reply.json()["Errors"]
    assert errors == [
        *({"Error": "Request Entity Too Large", "Message": f"message over {MAX_EVENT_BYTES} bytes",
           "Details": f"batch[{i}] messageId=m{i}"} for i in (1, 4)),
        {"Error": "Bad Request", "Message": "track needs `event` (a non-empty string)",
         "Details": "batch[5] messageId=m5"},
        *({"Error": "Request Entity Too Large", "Message": f"message over {MAX_EVENT_BYTES} bytes",
           "Details": f"batch[{i}] messageId=m{i}"} for i in (6, 7, 9)),
    ], errors
    bodies = await stored_bodies(agent)
    assert len(bodies) == len(TAKEN)
    for i, got in zip(TAKEN, bodies, strict=True):
        assert got == completed(messages[i], orjson.loads(got)), i
    # Taken as sent at or under the limit, stored over it; refused as sent over it,
    # that would have been stored under it.
    assert all(len(bodies[TAKEN.index(i)]) > MAX_EVENT_BYTES for i in (2, 3, 11))
    assert all(len(completed(messages[i], {"receivedAt": STAMP})) < MAX_EVENT_BYTES
               for i in (6, 7, 9))
    assert agent.metrics.refused == {("segment", 413): 5, ("segment", 400): 1}


async def test_a_capture_batch_over_32_kb_judges_each_message_as_sent(make_agent: Any) -> None:
    agent = await make_agent()
    messages = [m for m in batch() if "writeKey" not in m]   # capture's key is its header
    reply = await call(agent.port, "/v1/capture", {"batch": messages, "context": CONTEXT},
                       headers={"X-Write-Key": KEY})
    assert reply.status == 207, reply.body
    got = [(e["message"].split(":")[0], e["message"].split(": ", 1)[1])
           for e in reply.json()["errors"]]
    over = f"message over {MAX_EVENT_BYTES} bytes"
    assert got == [("batch[1] messageId=m1", over), ("batch[4] messageId=m4", over),
                   ("batch[5] messageId=m5", "track needs `event` (a non-empty string)"),
                   ("batch[6] messageId=m6", over), ("batch[7] messageId=m7", over)], got
    bodies = await stored_bodies(agent)
    taken = [m for m in messages if int(m.get("messageId", "m11")[1:]) in TAKEN]
    assert len(bodies) == len(taken)
    for msg, body in zip(taken, bodies, strict=True):
        assert body == completed(msg, orjson.loads(body)), msg.get("messageId")


async def test_an_invalid_message_over_32_kb_alone_is_a_413(make_agent: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/batch",
                       {"batch": [sized(0, MAX_EVENT_BYTES + 1, userId=None)]}, headers=AUTH)
    assert reply.status == 413, reply.body
    [error] = reply.json()["Errors"]
    assert error["Message"] == f"message over {MAX_EVENT_BYTES} bytes", error
    assert agent.spool.depth == 0


DEEP = "[" * 300 + "]" * 300   # read (1024 levels), never written (255)


def raw(mid: str, extra: str) -> str:
    return '{"type":"track","userId":"u","messageId":"' + mid + '"' + extra + "}"


async def test_a_batch_over_32_kb_names_what_its_deep_messages_nest_first(
        make_agent: Any) -> None:
    """A message too deep to store in a request over 32 KB is refused for its depth (its
    measure as sent), before any rule of shape, even where the agent would drop or
    replace the deep field."""
    agent = await make_agent()
    pad = orjson.dumps(sized(0, MAX_EVENT_BYTES - 100)).decode()
    deep = [raw("d1", f',"event":"e","receivedAt":{DEEP}'),
            raw("d2", f',"properties":{{"x":{DEEP}}}'),                    # no event
            raw("d3", f',"event":"e","timestamp":{DEEP}'),                 # not a date
            raw("d4", f',"event":"e","properties":{{"x":{DEEP}}}'),
            raw("d5", f',"event":"e","context":{{"x":{DEEP}}}')]
    body = '{"context":' + orjson.dumps(CONTEXT).decode() + ',"batch":[' + ",".join(
        [pad, *deep]) + "]}"
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 200, reply.body
    got = [(e["Error"], e["Message"], e["Details"]) for e in reply.json()["Errors"]]
    # Each named by its path as sent, cut short.
    assert got == [("Bad Request", (field + "[0]" * 300)[:97] + "...: nested deeper than 251 levels",
                    f"batch[{i}] messageId=d{i}")
                   for i, field in enumerate(("receivedAt", "properties.x", "timestamp",
                                              "properties.x", "context.x"), 1)], got
    assert agent.spool.depth == 1


async def test_a_batch_over_32_kb_with_a_deep_context_judges_each_message_as_sent(
        make_agent: Any) -> None:
    """A batch context too deep to store refuses every message, each by its verdict as
    sent first: too large, or too deep where it nests too deep itself."""
    agent = await make_agent()
    over = orjson.dumps(sized(1, MAX_EVENT_BYTES + 1)).decode()
    body = ('{"context":{"x":' + DEEP + '},"batch":[' + ",".join(
        [over, raw("e2", ',"event":"e","context":{"a":1},"properties":{"x":' + DEEP + "}"),
         raw("e3", ',"event":"e"')]) + "]}")
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 400, reply.body
    got = [(e["Message"], e["Details"]) for e in reply.json()["Errors"]]
    deep = "[0]" * 300
    assert got == [(f"message over {MAX_EVENT_BYTES} bytes", "batch[0] messageId=m1"),
                   (f"properties.x{deep}"[:97] + "...: nested deeper than 251 levels",
                    "batch[1] messageId=e2"),
                   (f"context.x{deep}"[:97] + "...: nested deeper than 251 levels",
                    "batch[2] messageId=e3")], got
    assert agent.spool.depth == 0


async def test_a_browser_batch_over_32_kb_is_stored_as_completed(make_agent: Any) -> None:
    """The browser sends its key in the body and in each message of its batches: the
    message's key is dropped from what is stored, as for any batch."""
    agent = await make_agent()
    messages = [sized(i, 1_500 + i, writeKey=KEY, context={"library": {
        "name": "analytics.js", "version": "next-1.70.0"}}) for i in range(30)]
    messages.append(sized(30, MAX_EVENT_BYTES + 1, writeKey=KEY))
    body = {"writeKey": KEY, "batch": messages, "sentAt": STAMP, "context": CONTEXT}
    reply = await call(agent.port, "/v1/batch", body)
    assert reply.status == 207, reply.body
    assert reply.json()["Errors"] == [{
        "Error": "Request Entity Too Large", "Message": f"message over {MAX_EVENT_BYTES} bytes",
        "Details": "batch[30] messageId=m30"}]
    bodies = await stored_bodies(agent)
    assert len(bodies) == 30
    for msg, got in zip(messages[:30], bodies, strict=True):
        assert got == completed(msg, orjson.loads(got)), msg["messageId"]


async def test_a_message_refused_as_sent_is_named_as_sent(make_agent: Any) -> None:
    """A message sent without a `messageId`, refused in a batch over 32 KB (too large, or
    too deep, as sent), is named by its place alone: never by an id the agent made for
    it and that the client never sent."""
    agent = await make_agent()
    over = sized(1, MAX_EVENT_BYTES + 1, messageId=None)
    deep = '{"type":"track","event":"e","userId":"u","properties":{"x":' + DEEP + "}}"
    body = ('{"context":' + orjson.dumps(CONTEXT).decode() + ',"batch":['
            + ",".join([orjson.dumps(sized(0, 1_000)).decode(), orjson.dumps(over).decode(),
                        deep]) + "]}")
    why = [f"message over {MAX_EVENT_BYTES} bytes",
           ("properties.x" + "[0]" * 300)[:97] + "...: nested deeper than 251 levels"]
    for route in ("/v1/batch", "/v1/import"):
        reply = await call(agent.port, route, body, headers=AUTH)
        assert reply.status == 200, reply.body
        got = [(e["Message"], e["Details"]) for e in reply.json()["Errors"]]
        assert got == [(why[0], "batch[1]"), (why[1], "batch[2]")], got
    reply = await call(agent.port, "/v1/capture", body, headers={"X-Write-Key": KEY})
    assert reply.status == 207, reply.body
    assert [e["message"] for e in reply.json()["errors"]] == [
        f"batch[1]: {why[0]}", f"batch[2]: {why[1]}"], reply.body
    assert agent.spool.depth == 1   # the taken message, sent again: a resend


def exactly(i: int, size: int, **kw: Any) -> dict[str, Any]:
    """``sized``, its nulls kept: a track of ``size`` bytes as sent."""
    msg = {"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}",
           "properties": {}, **kw}
    msg["properties"] = {**msg["properties"], "pad": ""}
    msg["properties"]["pad"] = "p" * (size - len(orjson.dumps(msg)))
    assert len(orjson.dumps(msg)) == size
    return msg


# What completion replaces or fills, and what it leaves as sent: none of it lets a
# message over the limit as sent through, nor refuses one at it.
EDGES: list[dict[str, Any]] = [
    {"context": None}, {"integrations": None}, {"timestamp": None},
    {"timestamp": None, "originalTimestamp": None}, {"originalTimestamp": STAMP},
    {"context": {"library": {"name": ""}, "pad": ""}}, {"context": {"library": "s"}},
    {"receivedAt": None}, {"writeKey": None}, {"sentAt": None}, {"sentAt": "2026-01-01"},
    {"properties": {"\u2028\"\\\u00e9": "\U0001F600\u0000"}},
    {"event": "Application Opened", "context": None},
    {"event": "Application Error", "anonymousId": "a", "context": {"os": {"name": ""}}},
]


async def test_what_completion_fills_never_changes_a_verdict_as_sent(make_agent: Any) -> None:
    """Each edge at the limit as sent is taken, one byte over it refused 413, whatever
    the batch's context, integrations and timestamp fill in or replace."""
    agent = await make_agent()
    messages = [exactly(2 * n + over, MAX_EVENT_BYTES + over, **edge)
                for n, edge in enumerate(EDGES) for over in (0, 1)]
    body = {"batch": messages, "context": CONTEXT, "integrations": {"All": True},
            "timestamp": STAMP}
    reply = await call(agent.port, "/v1/batch", body, headers=AUTH)
    assert reply.status == 200, reply.body
    got = [(e["Message"], e["Details"]) for e in reply.json()["Errors"]]
    assert got == [(f"message over {MAX_EVENT_BYTES} bytes", f"batch[{i}] messageId=m{i}")
                   for i in range(1, len(messages), 2)], got
    assert agent.spool.depth == len(EDGES)


async def test_a_small_batchs_message_refused_is_named_as_sent(make_agent: Any) -> None:
    """The same in a batch under 32 KB: a message sent without a `messageId` and refused
    (too deep to store) is named by its place alone, as in a larger batch."""
    agent = await make_agent()
    deep = '{"type":"track","event":"e","userId":"u","properties":{"x":' + DEEP + "}}"
    body = ('{"context":' + orjson.dumps(CONTEXT).decode() + ',"batch":['
            + orjson.dumps(sized(0, 500)).decode() + "," + deep + "]}")
    assert len(body) < MAX_EVENT_BYTES
    why = ("properties.x" + "[0]" * 300)[:97] + "...: nested deeper than 251 levels"
    for route in ("/v1/batch", "/v1/import"):
        reply = await call(agent.port, route, body, headers=AUTH)
        assert reply.status == 200, reply.body
        got = [(e["Message"], e["Details"]) for e in reply.json()["Errors"]]
        assert got == [(why, "batch[1]")], got
    reply = await call(agent.port, "/v1/capture", body, headers={"X-Write-Key": KEY})
    assert reply.status == 207, reply.body
    assert [e["message"] for e in reply.json()["errors"]] == [f"batch[1]: {why}"], reply.body


async def test_a_message_too_large_for_its_upstream_is_named_as_sent(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """A message sent without a `messageId`, under 32 KB as sent but over it as stored
    (the batch context, the fields the agent sets) and so too large for `segment-http`,
    is refused alone (413) and named by its place, not by the id the agent made for it."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    over = sized(1, MAX_EVENT_BYTES - 100, messageId=None)
    body = {"context": CONTEXT, "batch": [sized(0, 500), over]}
    for route in ("/v1/batch", "/v1/import"):
        reply = await call(agent.port, route, orjson.dumps(body), headers=AUTH)
        assert reply.status == 200, reply.body
        [error] = reply.json()["Errors"]
        assert error["Details"] == "batch[1]" and str(MAX_EVENT_BYTES) in error["Message"], error
    reply = await call(agent.port, "/v1/capture", orjson.dumps(body), headers={"X-Write-Key": KEY})
    assert reply.status == 207, reply.body
    [error] = reply.json()["errors"]
    assert error["message"].startswith("batch[1]: ") and str(MAX_EVENT_BYTES) in error["message"]
