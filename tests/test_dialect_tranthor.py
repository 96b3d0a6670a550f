"""The Tranthor / Dittofeed public app API: the seed's examples, the SDK's batch, errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests import seed_examples as seed
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, fill_spool, segment_up, wait_for

APPS = "/api/public/apps"


async def test_seed_requests_as_written(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    for body in (seed.TRANTHOR_CURL, seed.TRANTHOR_EXAMPLE_BODY):
        reply = await call(agent.port, f"{APPS}/track", body, headers=seed.TRANTHOR_HEADERS)
        assert reply.status == 204 and reply.body == b""
    await wait_for(lambda: len(fake_segment.events) == 2)
    assert {r.write_key for r in fake_segment.requests} == {"<api-key>"}  # PublicWriteKey
    viewed, signed = fake_segment.events
    sent = json.loads(seed.TRANTHOR_CURL)
    for name in ("messageId", "timestamp", "files", "context", "event", "properties", "userId"):
        assert viewed[name] == sent[name]   # base64 files kept as sent
    assert viewed["type"] == signed["type"] == "track"
    assert signed["properties"] == {"plan": "Enterprise"}


async def test_sdk_batch_with_verbatim_authorization(make_agent: Any,
                                                     fake_segment: FakeSegment) -> None:
    """The Dittofeed SDK posts `{"batch": [...]}` with its write key as the whole header."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    write_key = "Basic " + base64.b64encode(b"workspace:secret").decode()
    batch = {"batch": [
        {"type": "identify", "messageId": "b1", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "track", "messageId": "b2", "userId": "u1", "event": "Clicked"},
        {"type": "page", "messageId": "b3", "anonymousId": "a1", "name": "Home"},
        {"type": "screen", "messageId": "b4", "anonymousId": "a1", "name": "Settings"},
    ]}
    reply = await call(agent.port, f"{APPS}/batch", batch, headers={"authorization": write_key})
    assert reply.status == 204
    for call_name in ("identify", "page", "screen"):
        msg = {"messageId": f"s-{call_name}", "userId": "u1", "name": "n"}
        reply = await call(agent.port, f"{APPS}/{call_name}", msg,
                           headers={"authorization": "Bearer tok"})
        assert reply.status == 204
    await wait_for(lambda: len(fake_segment.events) == 7)
    assert fake_segment.message_ids()[:4] == ["b1", "b2", "b3", "b4"]
    keys = {r.write_key for r in fake_segment.requests}
    assert keys == {write_key, "tok"}


# NBSP or U+3000 around the key is no HTTP whitespace: the key sent is not `good`.
@pytest.mark.parametrize("headers", [{"PublicWriteKey": "bad"}, {"authorization": "Bearer bad"},
                                     {}, {"PublicWriteKey": "good\u00a0"},
                                     {"authorization": "Bearer \u3000good"}])
async def test_bad_or_missing_key_is_401(make_agent: Any, headers: dict[str, str]) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    reply = await call(agent.port, f"{APPS}/track", seed.TRANTHOR_EXAMPLE_BODY, headers=headers)
    assert reply.status == 401
    # With no key, where one goes, as the Segment routes say (it said "no key given").
    why = "not one of listen.accept_keys" if headers else (
        "no write key given: send it as the `PublicWriteKey` header, or as the "
        "`authorization` header (the key alone, or `Bearer` and the key)")
    assert reply.json() == {"statusCode": 401, "error": "Unauthorized",
                            "message": f"missing or invalid write key: {why}"}


@pytest.mark.parametrize("value", ["Bearer ", "Bearer", "bearer  "])
async def test_a_bearer_header_with_no_token_is_401_not_the_key_bearer(
        make_agent: Any, value: str) -> None:
    """With any key accepted, an empty bearer token was taken as the key "Bearer" (audit)."""
    agent = await make_agent()
    reply = await call(agent.port, f"{APPS}/track", seed.TRANTHOR_EXAMPLE_BODY,
                       headers={"authorization": value})
    assert reply.status == 401, reply.body
    assert "no write key given: send it as the `PublicWriteKey` header" in reply.json()["message"]
    assert agent.spool.depth == 0


def msg(**kw: Any) -> dict[str, Any]:
    return {"messageId": "m", "event": "e", "userId": "u", **kw}


def file(**kw: Any) -> dict[str, Any]:
    """A file as the seed documents it; ``kw`` replaces fields (None removes one)."""
    out = {"type": "Base64Encoded", "name": "a.png", "mimeType": "image/png",
           "data": "aGVsbG8=", **kw}
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("path,body,status,fragment", [
    ("track", b'{"messageId": "m",', 400, "invalid JSON"),
    ("track", {"event": "e", "userId": "u"}, 400, "`messageId` is required"),
    ("track", msg(event=None), 400, "`event`"),
    ("track", msg(userId=None), 400, "`userId` or `anonymousId`"),
    ("track", msg(event=5), 400, "`event`"),
    ("track", msg(messageId=7), 400, "`messageId`"),
    ("track", msg(files="aGVsbG8="), 400, "`files`"),
    ("track", msg(files=[file(data=5)]), 400, "`files[0].data`"),
    ("track", msg(files=[file(), file(data=["aGVsbG8="])]), 400, "`files[1].data`"),
    ("track", msg(files=[file(name=None)]), 400, "`files[0].name`"),
    ("track", msg(files=[file(mimeType=3)]), 400, "`files[0].mimeType`"),
    ("track", msg(files=[file(type="Url")]), 400, "`files[0].type`"),
    ("batch", {"batch": [{**msg(files=[file(data=False)]), "type": "track"}]}, 400,
     "batch[0] messageId=m: `files[0].data`"),
    ("identify", msg(traits="x"), 400, "`traits`"),
    ("batch", {"batch": [{**msg(), "type": "alias"}]}, 400, "batch[0] messageId=m: `type`"),
    ("batch", {"batch": [{"type": "track", "event": "e", "userId": "u"}]}, 400, "messageId"),
    ("track", msg(files=[{"data": "A" * 1_100_000}]), 413, "too large"),
])
async def test_errors(make_agent: Any, path: str, body: Any, status: int, fragment: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, f"{APPS}/{path}", body, headers={"PublicWriteKey": "k"})
    assert reply.status == status
    err = reply.json()
    assert err["statusCode"] == status and fragment in err["message"]
    assert agent.spool.depth == 0


async def test_resend_with_the_same_message_id_is_stored_once(make_agent: Any) -> None:
    agent = await make_agent()
    for _ in range(3):
        reply = await call(agent.port, f"{APPS}/track", seed.TRANTHOR_EXAMPLE_BODY,
                           headers={"PublicWriteKey": "k"})
        assert reply.status == 204
    assert agent.spool.depth == 1 and agent.spool.counters["duplicates"] == 2


async def test_full_spool_is_503_with_retry_after(make_agent: Any) -> None:
    agent = await make_agent(storage={"max_size_mb": 1})
    await fill_spool(agent.port)
    reply = await call(agent.port, f"{APPS}/track", msg(), headers={"PublicWriteKey": "k"})
    assert reply.status == 503 and int(reply.headers["Retry-After"]) > 0
    assert reply.json()["statusCode"] == 503
