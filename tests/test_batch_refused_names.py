"""How a refused message of a batch is named, and whose 200 or 207 a batch stored in part
gets, on every route that names refused messages.

A message is named by its place and the `messageId` it was sent with: never one the agent
made for it (sent without one, or with `null`), which the client never saw; a `messageId`
that is no string, or an empty one, is named by its place alone. The 200-or-207 choice reads the client's
name in the first message's context as the agent completes it (the batch's context
merged in), whatever became of that message.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agent.families.segment import MAX_EVENT_BYTES, MAX_MESSAGE_ID
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up

KEY = "names-key"
AUTH = {"Authorization": basic(KEY)}
CAPTURE = {"X-Write-Key": KEY}
DEEP = "[" * 300 + "]" * 300   # read (1024 levels), never written (255)
TOO_DEEP = ("properties.x" + "[0]" * 300)[:97] + "...: nested deeper than 251 levels"
ONLY_200 = {"library": {"name": "analytics-python", "version": "1.4.0"}}


def track(mid: Any = ..., pad: int = 0, **kw: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "track", "event": "e", "userId": "u", **kw}
    if mid is not ...:
        msg["messageId"] = mid
    if pad:
        msg["properties"] = {"pad": "p" * pad}
    return msg


def deep(mid: Any = ...) -> str:
    """A message read but never stored (too deep), as raw JSON."""
    head = '{"type":"track","event":"e","userId":"u",'
    if mid is not ...:
        head += '"messageId":' + orjson.dumps(mid).decode() + ","
    return head + '"properties":{"x":' + DEEP + "}}"


def body_of(messages: list[Any], context: dict[str, Any] | None = None) -> bytes:
    parts = [m if isinstance(m, str) else orjson.dumps(m).decode() for m in messages]
    head = '{"context":' + orjson.dumps(context).decode() + "," if context else "{"
    return (head + '"batch":[' + ",".join(parts) + "]}").encode()


async def names(port: int, route: str, body: bytes) -> tuple[int, list[str]]:
    """The reply's status and each refused message's name and reason, as its route says
    them (`Details: Message` on the Segment routes)."""
    if route == "/v1/capture":
        reply = await call(port, route, body, headers=CAPTURE)
        return reply.status, [e["message"] for e in reply.json()["errors"]]
    reply = await call(port, route, body, headers=AUTH)
    return reply.status, [f"{e['Details']}: {e['Message']}" for e in reply.json()["Errors"]]


SEGMENT_ROUTES = ["/v1/batch", "/v1/import", "/v1/b", "/beacon/v1/batch", "/v1/webhook"]


@pytest.mark.parametrize("large", [False, True], ids=["small", "over-32KB"])
async def test_a_refused_message_is_named_by_the_id_it_was_sent_with(
        make_agent: Any, large: bool) -> None:
    """Absent, `null`, equal across messages, not a string, empty (named by its place
    alone: `messageId=` says nothing): in a request under or over 32 KB, on every Segment
    batch route and capture."""
    agent = await make_agent()
    messages: list[Any] = [track("ok", pad=MAX_EVENT_BYTES - 200 if large else 0),
                           deep(), deep(None), deep("same"), deep("same"),
                           track(7), track(None, event=None), track("m6", event=None),
                           track("")]
    body = body_of(messages)
    assert (len(body) > MAX_EVENT_BYTES) is large
    expected = [f"batch[1]: {TOO_DEEP}", f"batch[2]: {TOO_DEEP}",
                f"batch[3] messageId=same: {TOO_DEEP}", f"batch[4] messageId=same: {TOO_DEEP}",
                f"batch[5]: `messageId` must be a string of 1 to {MAX_MESSAGE_ID} characters",
                "batch[6]: track needs `event` (a non-empty string)",
                "batch[7] messageId=m6: track needs `event` (a non-empty string)",
                f"batch[8]: `messageId` must be a string of 1 to {MAX_MESSAGE_ID} characters"]
    for route in [*SEGMENT_ROUTES, "/v1/capture"]:
        status, got = await names(agent.port, route, body)
        assert status == 207, (route, status, got)
        assert got == expected, (route, got)


async def test_too_large_as_sent_or_for_its_upstream_named_as_sent(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Over 32 KB as sent (a request over 32 KB), and under it as sent but over it once
    completed, too large for `segment-http`: a 413 item named as sent."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    context = {"pad": "c" * 400}
    messages = [track("ok"), track(pad=MAX_EVENT_BYTES + 10),
                track(None, pad=MAX_EVENT_BYTES + 10), track("big", pad=MAX_EVENT_BYTES + 10),
                track(pad=MAX_EVENT_BYTES - 150), track(None, pad=MAX_EVENT_BYTES - 150),
                track("near", pad=MAX_EVENT_BYTES - 150)]
    body = body_of(messages, context)
    for route in [*SEGMENT_ROUTES, "/v1/capture"]:
        status, got = await names(agent.port, route, body)
        assert status == 207, (route, status, got)
        named = [text.split(": ")[0] for text in got]
        assert named == ["batch[1]", "batch[2]", "batch[3] messageId=big",
                         "batch[4]", "batch[5]", "batch[6] messageId=near"], (route, got)
        assert all(str(MAX_EVENT_BYTES) in text for text in got), (route, got)


async def test_a_tranthor_batch_names_its_refused_messages_by_their_ids(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """Tranthor requires a `messageId`: a refused message is named by it, or by its place
    when it has none (400)."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    messages = [track("ok"), deep("d1"), track(), track(None),
                track("big", pad=MAX_EVENT_BYTES + 10)]
    reply = await call(agent.port, "/api/public/apps/batch", body_of(messages),
                       headers={"authorization": KEY})
    assert reply.status == 207, reply.body
    got = [(e["statusCode"], e["message"]) for e in reply.json()["errors"]]
    assert got[:3] == [(400, f"batch[1] messageId=d1: {TOO_DEEP}"),
                       (400, "batch[2]: `messageId` is required"),
                       (400, "batch[3]: `messageId` is required")], got
    assert got[3][0] == 413 and got[3][1].startswith("batch[4] messageId=big: "), got


@pytest.mark.parametrize("first", ["taken", "too large as sent", "too deep", "refused by shape",
                                   "not an object"])
async def test_the_batch_context_names_the_client_whatever_became_of_the_first_message(
        make_agent: Any, first: str) -> None:
    """A batch whose context names analytics-python (which counts only an exact 200 as
    success), stored in part, is answered 200 with the 207's body, as when its first
    message names it itself: whether that message was stored or refused (too large as
    sent, in a request over 32 KB; too deep to store; by a rule of shape; not an object),
    the client is the same."""
    agent = await make_agent()
    head: Any = {"taken": track("m0"), "too large as sent": track(pad=MAX_EVENT_BYTES + 10),
                 "too deep": deep(), "refused by shape": track("m0", event=None),
                 "not an object": "5"}[first]
    body = body_of([head, track("m1", pad=600), deep("m2")], ONLY_200)
    for route in SEGMENT_ROUTES:
        reply = await call(agent.port, route, body, headers=AUTH)
        assert reply.status == 200, (route, reply.status, reply.body)
        assert reply.json()["Success"] is False, reply.body
    # The batch context names no such client, nor does the message: the 207.
    body = body_of([head, track("m1"), deep("m2")], {"library": {"name": "analytics-node"}})
    assert (await call(agent.port, "/v1/batch", body, headers=AUTH)).status == 207
