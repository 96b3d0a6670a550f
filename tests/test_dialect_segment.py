"""The Segment spec / MetaRouter dialect: the seed's examples, its error shapes, its limits."""

from __future__ import annotations

import base64
import gzip
import json
import logging
from typing import Any

import orjson
import pytest

from agent.dialects.segment import GIF
from tests import seed_examples as seed
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, fill_spool, segment_up, wait_for


def by_key(fake: FakeSegment) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for req in fake.accepted():
        out.setdefault(req.write_key or "", []).extend(req.events)
    return out


# -- golden: the seed's own example requests --------------------------------

@pytest.mark.parametrize("route,example,kind", [
    ("/v1/identify", seed.METAROUTER_IDENTIFY, "identify"),
    ("/v1/i", seed.METAROUTER_IDENTIFY, "identify"),
    ("/v1/track", seed.METAROUTER_TRACK, "track"),
    ("/v1/t", seed.METAROUTER_TRACK, "track"),
    ("/v1/page", seed.METAROUTER_PAGE, "page"),
    ("/v1/p", seed.METAROUTER_PAGE, "page"),
    ("/v1/group", seed.METAROUTER_GROUP, "group"),
    ("/v1/g", seed.METAROUTER_GROUP, "group"),
    ("/v1/alias", seed.METAROUTER_ALIAS, "alias"),
    ("/v1/a", seed.METAROUTER_ALIAS, "alias"),
])
async def test_seed_single_calls_as_written(make_agent: Any, fake_segment: FakeSegment,
                                            route: str, example: str, kind: str) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, route, example, headers={"Authorization": seed.METAROUTER_AUTH})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1)
    ev = fake_segment.events[0]
    assert fake_segment.requests[0].write_key == "ILoveData123"
    assert ev["type"] == kind and ev["userId"] in ("1234qwerty", "assigned_id_or_email")
    assert ev["messageId"] and ev["receivedAt"] and ev["sentAt"] and ev["timestamp"]
    if kind == "identify":
        assert ev["traits"]["hasTowel"] is True
        assert ev["timestamp"] == "2015-11-10T00:45:23.412Z"
    if kind == "page":
        assert ev["section"] == "Blog"   # unknown fields are kept


async def test_seed_batch_merges_batch_context(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    for route in ("/v1/batch", "/v1/import"):
        reply = await call(agent.port, route, seed.METAROUTER_BATCH)
        assert reply.status == 200 and reply.json() == {"Success": True}
    await wait_for(lambda: len(fake_segment.events) == 2)  # the import was a resend: deduped
    sent = json.loads(seed.METAROUTER_BATCH)
    events = by_key(fake_segment)["test1"]
    assert [e["messageId"] for e in events] == [e["messageId"] for e in sent["batch"]]
    for ev in events:
        assert ev["context"] == sent["context"] and ev["integrations"] == sent["integrations"]
        assert ev["timestamp"] == "2020-03-02T18:29:27.333Z"
        assert "writeKey" not in ev     # the key travels in Basic auth, not in the event
    assert agent.spool.counters["duplicates"] == 2


async def test_seed_pixel_and_webhook(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, seed.METAROUTER_PIXEL_PATH, method="GET")
    assert reply.status == 200 and reply.body == GIF
    assert reply.headers["Content-Type"] == "image/gif"
    reply = await call(agent.port, seed.METAROUTER_WEBHOOK_PATH, seed.METAROUTER_PIXEL_PAYLOAD)
    assert reply.status == 200
    await wait_for(lambda: len(fake_segment.events) == 2)
    keys = by_key(fake_segment)
    assert keys["example"][0]["event"] == "example event"           # the pixel's writeKey
    assert keys["abcdefg"][0]["context"]["library"]["name"] == "analytics.js"  # ?writeKey=


# -- keys -------------------------------------------------------------------

@pytest.mark.parametrize("headers,body_key", [
    ({"Authorization": basic("good")}, None),
    ({"Authorization": basic("good", colon=False)}, None),
    ({}, "good"),
])
async def test_key_forms(make_agent: Any, fake_segment: FakeSegment,
                         headers: dict[str, str], body_key: str | None) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]}, upstreams=[segment_up(fake_segment)])
    msg = {"userId": "u", "event": "e", **({"writeKey": body_key} if body_key else {})}
    assert (await call(agent.port, "/v1/track", msg, headers=headers)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.requests[0].write_key == "good"


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch", "/v1/webhook"])
async def test_bad_or_missing_key_is_401(make_agent: Any, path: str) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    msg: dict[str, Any] = {"type": "track", "userId": "u", "event": "e"}
    body = {"batch": [msg]} if path == "/v1/batch" else msg
    for headers in ({"Authorization": basic("bad")}, {}):
        reply = await call(agent.port, path, body, headers=headers)
        assert reply.status == 401
        err = reply.json()["Errors"][0] if path == "/v1/batch" else reply.json()
        assert err["Error"] == "Unauthorized" and err["Message"] == "Invalid or missing writekey"
        # No key at all was refused as "not one of listen.accept_keys" (it stands for the
        # key `anonymous`): the app is told it gave none, and where one goes.
        assert (NO_KEY_GIVEN in err["Details"]) is (not headers), err
        assert "not one of listen.accept_keys" in err["Details"], err
    if path == "/v1/batch":   # an empty batch, keyless: the same
        reply = await call(agent.port, path, {"batch": []})
        assert reply.status == 401 and NO_KEY_GIVEN in reply.json()["Errors"][0]["Details"]
    data = base64.b64encode(orjson.dumps(msg)).decode()
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="GET")
    assert NO_KEY_GIVEN in reply.headers["X-Outpost-Error"], reply.headers
    assert agent.spool.depth == 0


NO_KEY_GIVEN = ("no write key given: send it as Basic auth's username, as `?writeKey=` or "
                "as `writeKey` in the body")


async def test_a_webhook_batch_is_stored_under_the_key_the_request_names(
        make_agent: Any) -> None:
    """The webhook's key (Basic auth, `?writeKey=`) is asked before no other check, and is
    every message's: refused, each message is an item of the 401; accepted, it wins over a
    message's own `writeKey`, even one that is not a string."""
    agent = await make_agent(listen={"accept_keys": ["good"]})
    batch = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": "m0"},
                       {"type": "track", "userId": "u", "event": "e", "messageId": "m1",
                        "writeKey": "bad"},
                       {"type": "track", "userId": "u", "event": "e", "messageId": "m2",
                        "writeKey": 7}]}
    reply = await call(agent.port, "/v1/webhook", batch, headers={"Authorization": basic("bad")})
    assert reply.status == 401, reply.body
    errors = reply.json()["Errors"]
    assert [e["Details"].split(":")[0] for e in errors] == [
        "batch[0] messageId=m0", "batch[1] messageId=m1", "batch[2] messageId=m2"], errors
    assert all("not one of listen.accept_keys" in e["Details"] for e in errors), errors
    assert agent.spool.depth == 0
    for path, headers in (("/v1/webhook?writeKey=good", {}),
                          ("/v1/webhook", {"Authorization": basic("good")})):
        reply = await call(agent.port, path, batch, headers=headers)
        assert reply.status == 200, reply.body
    rows = await agent.spool.fetch(agent.spool.streams["good"].id, 0, 10)
    assert [orjson.loads(bytes(r.body))["messageId"] for r in rows] == ["m0", "m1", "m2"]
    assert list(agent.spool.streams) == ["good"]


# Authorization headers that are there but name no write key (audit): each was taken as
# no key at all, and the message stored under `anonymous`, which a Segment upstream with
# no `key` of its own refuses (401) for ever.
UNREADABLE_AUTH = [
    "Bearer secret",                                        # another scheme
    "Basic %%%",                                            # not base64
    "Basic ",                                               # no credentials
    "Basic " + base64.b64encode(b":").decode(),             # an empty user
    "Basic " + base64.b64encode(b"\xff\xfe:").decode(),     # not UTF-8
]


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch", "/v1/webhook"])
@pytest.mark.parametrize("auth", UNREADABLE_AUTH)
async def test_an_unreadable_authorization_header_is_401_not_anonymous(
        make_agent: Any, path: str, auth: str) -> None:
    agent = await make_agent()   # accept_keys = []: any key, `anonymous` included
    msg: dict[str, Any] = {"type": "track", "userId": "u", "event": "e"}
    body = {"batch": [msg]} if path == "/v1/batch" else msg
    reply = await call(agent.port, path, body, headers={"Authorization": auth})
    assert reply.status == 401, reply.body
    err = reply.json()["Errors"][0] if path == "/v1/batch" else reply.json()
    assert err["Message"] == "Invalid or missing writekey"
    assert "Authorization" in err["Details"], err
    assert agent.spool.depth == 0


async def test_an_unreadable_authorization_header_on_the_pixel_stores_nothing(
        make_agent: Any) -> None:
    agent = await make_agent()
    data = base64.b64encode(b'{"userId":"u","event":"e"}').decode()
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="GET",
                       headers={"Authorization": "Bearer x"})
    assert reply.status == 200 and reply.body == GIF
    assert "Authorization" in reply.headers["X-Outpost-Error"]
    assert agent.spool.depth == 0


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
@pytest.mark.parametrize("key", [5, {}, ["k"], True])
async def test_a_write_key_that_is_not_a_string_is_400(make_agent: Any, path: str,
                                                        key: Any) -> None:
    agent = await make_agent()
    msg: dict[str, Any] = {"type": "track", "userId": "u", "event": "e", "writeKey": key}
    body = {"batch": [msg]} if path == "/v1/batch" else msg
    reply = await call(agent.port, path, body)
    assert reply.status == 400, reply.body
    err = reply.json()["Errors"][0] if path == "/v1/batch" else reply.json()
    assert err["Message"] == "`writeKey` must be a string", err
    if path == "/v1/batch":   # the same at the batch's level
        reply = await call(agent.port, path, {"batch": [dict(msg, writeKey="k")],
                                              "writeKey": key})
        assert reply.status == 400, reply.body
        assert reply.json()["Errors"][0]["Message"] == "`writeKey` must be a string"
    assert agent.spool.depth == 0
    # With a key in Basic auth, neither writeKey is used, nor checked (review: the batch's
    # was refused, a message's not).
    if path == "/v1/batch":
        body = dict(body, writeKey=key)
    reply = await call(agent.port, path, body, headers={"Authorization": basic("k")})
    assert reply.status == 200, reply.body
    assert agent.spool.depth == 1


@pytest.mark.parametrize("field,value", [("context", "x"), ("integrations", [1]),
                                         ("context", 5)])
async def test_a_batch_context_or_integrations_that_is_not_an_object_is_400(
        make_agent: Any, field: str, value: Any) -> None:
    """Refused as on a single message; it was dropped from every event silently (audit)."""
    agent = await make_agent()
    body = {field: value, "batch": [{"type": "track", "userId": "u", "event": "e"}]}
    reply = await call(agent.port, "/v1/batch", body, headers={"Authorization": basic("k")})
    assert reply.status == 400, reply.body
    assert reply.json()["Errors"][0]["Message"] == f"`{field}` must be an object"
    assert agent.spool.depth == 0


# -- 207, 400, 413 ------------------------------------------------------------

async def test_partly_invalid_batch_is_207_with_the_error_list(make_agent: Any) -> None:
    agent = await make_agent()
    batch = {"batch": [
        {"type": "track", "userId": "u", "event": "ok", "messageId": "m1"},
        {"type": "track", "userId": "u", "messageId": "m2"},                  # no event
        {"type": "identify", "anonymousId": None, "userId": None, "messageId": "m3"},
        {"type": "track", "userId": "u", "event": "big", "messageId": "m4",
         "properties": {"x": "y" * 40_000}},
        {"type": "fly", "userId": "u", "messageId": "m5"},
        {"type": "page", "userId": "u", "properties": "not an object", "messageId": "m6"},
    ]}
    reply = await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic("k")})
    assert reply.status == 207
    body = reply.json()
    assert body["Success"] is False
    errors = {e["Details"]: e for e in body["Errors"]}
    assert set(errors) == {f"batch[{i}] messageId=m{i + 1}" for i in range(1, 6)}
    assert "`event`" in errors["batch[1] messageId=m2"]["Message"]
    assert "userId" in errors["batch[2] messageId=m3"]["Message"]
    assert errors["batch[3] messageId=m4"]["Error"] == "Request Entity Too Large"
    assert "`properties`" in errors["batch[5] messageId=m6"]["Message"]
    assert agent.spool.depth == 1


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the rest stored" in r.getMessage()]


async def test_a_batch_whose_messages_name_their_key_logs_its_refusals_under_that_key(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """No key in the request (Basic auth, `?writeKey=`): each message names its own (as
    RudderStack's and hand-made batches do). The warning for the messages refused named
    the key of a message with none ("ano***"), which none of them was sent with."""
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent()
    batch = {"batch": [{"type": "track", "userId": "u", "event": "ok", "writeKey": "own-key-1"},
                       {"type": "track", "userId": "u", "writeKey": "own-key-1"}]}   # no event
    reply = await call(agent.port, "/v1/batch", batch)
    assert reply.status == 207, reply.body
    assert agent.spool.streams["own-key-1"].depth == 1
    (line,) = refused_lines(caplog)
    assert "1 of 2 messages of a batch for key own*** refused" in line, line
    assert "ano***" not in line, line


async def test_a_batch_refused_in_part_under_several_keys_logs_each_of_them(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Not the key of a stored message, and each refused message's key once: three of
    them, the rest counted."""
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent()
    batch = {"batch": [{"type": "track", "userId": "u", "event": "ok", "writeKey": "kept-key"},
                       {"type": "track", "userId": "u", "writeKey": "one-key"},
                       {"type": "track", "userId": "u", "writeKey": "two-key"},
                       {"type": "track", "userId": "u", "writeKey": "one-key"}]}
    reply = await call(agent.port, "/v1/batch", batch)
    assert reply.status == 207, reply.body
    (line,) = refused_lines(caplog)
    assert "3 of 4 messages of a batch for keys one***, two*** refused" in line, line
    assert "kep***" not in line and "ano***" not in line, line
    # A message read but not as sent (a NaN) is refused before its key is asked: named too.
    more = (b'{"batch":[{"type":"track","userId":"u","event":"ok","writeKey":"kept-key"},'
            b'{"type":"track","userId":"u","event":"e","properties":{"x":NaN},'
            b'"writeKey":"nan-key"},'
            + b",".join(b'{"type":"track","userId":"u","writeKey":"%s-key"}' % k
                        for k in (b"aaa", b"bbb", b"ccc")) + b"]}")
    caplog.clear()
    reply = await call(agent.port, "/v1/batch", more)
    assert reply.status == 207, reply.body
    (line,) = refused_lines(caplog)
    assert "4 of 5 messages of a batch for keys nan***, aaa***, bbb*** and 1 more refused" \
        in line, line


async def test_all_invalid_batch_is_400(make_agent: Any) -> None:
    agent = await make_agent()
    reply = await call(agent.port, "/v1/batch", {"batch": [{"type": "alias", "userId": "u"}]},
                       headers={"Authorization": basic("k")})
    assert reply.status == 400
    assert reply.json()["Errors"][0]["Message"].startswith("alias needs `previousId`")


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/track", b'{"userId": "u", "event": ', "invalid JSON"),
    ("/v1/track", {"userId": "u"}, "`event`"),
    ("/v1/track", {"anonymousId": None, "userId": None, "event": "e"}, "`userId` or"),
    ("/v1/track", {"userId": "u", "event": 42}, "`event`"),
    ("/v1/group", {"userId": "u"}, "`groupId`"),
    ("/v1/identify", {"userId": {"id": 1}}, "`userId` must be a string"),
    ("/v1/identify", {"userId": "u", "traits": []}, "`traits` must be an object"),
    ("/v1/page", {"userId": "u", "timestamp": 1700000000}, "`timestamp` must be an ISO 8601 date string"),
    ("/v1/track", {"userId": "u", "event": "e", "messageId": "x" * 100}, "`messageId`"),
    ("/v1/track", [1, 2], "JSON object"),
])
async def test_single_call_errors_are_400_in_the_seed_shape(
        make_agent: Any, path: str, body: Any, fragment: str) -> None:
    agent = await make_agent()
    reply = await call(agent.port, path, body, headers={"Authorization": basic("k")})
    assert reply.status == 400
    err = reply.json()
    assert set(err) == {"Error", "Message", "Details", "code", "message"}
    assert err["Error"] == "Bad Request"
    assert fragment in err["Message"] + err["Details"]


async def test_size_limits_are_413(make_agent: Any) -> None:
    agent = await make_agent()
    auth = {"Authorization": basic("k")}
    big = {"userId": "u", "event": "e", "properties": {"x": "y" * 33_000}}
    reply = await call(agent.port, "/v1/track", big, headers=auth)
    assert reply.status == 413 and reply.json()["Error"] == "Request Entity Too Large"
    batch = {"batch": [{**big, "type": "track", "properties": {"x": "y" * 30_000}}] * 150}
    reply = await call(agent.port, "/v1/batch", batch, headers=auth)
    assert reply.status == 413
    # Segment's own words, then the size and the limit, as a single call's 413 says them:
    # it said Segment's words alone.
    said = f"HTTP request too large: {len(orjson.dumps(batch))} bytes, limit 4194304"
    assert reply.json() == {"Success": False, "Errors": [{
        "Error": "Request Entity Too Large", "Message": "Error reading request body",
        "Details": said}], "code": "request_entity_too_large",
        "message": f"Error reading request body: {said}"}
    # A real client's largest batch: ~475 KB plus the event that crosses it, is taken.
    near = {"batch": [{**big, "type": "track", "properties": {"x": "y" * 31_000}}] * 16}
    assert (await call(agent.port, "/v1/batch", near, headers=auth)).status == 200


async def test_gzip_body_with_any_content_type(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"batch": [{"type": "track", "userId": "u", "event": "zipped"}]}
    reply = await call(agent.port, "/v1/batch", body, gzipped=True, headers={
        "Authorization": basic("k"), "Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.events[0]["event"] == "zipped"


async def test_a_gzip_body_of_several_members_is_read_whole_and_trailing_data_refused(
        make_agent: Any) -> None:
    """`cat a.gz b.gz` is a valid gzip file (RFC 1952): only its first member was read
    (400, "unexpected end"); bytes after the last member were ignored, unread (audit)."""
    agent = await make_agent()
    raw = orjson.dumps({"batch": [{"type": "track", "userId": "u", "event": "two"}]})
    auth = {"Authorization": basic("k"), "Content-Encoding": "gzip"}
    reply = await call(agent.port, "/v1/batch", gzip.compress(raw[:20]) + gzip.compress(raw[20:]),
                       headers=auth)
    assert reply.status == 200, reply.body
    assert agent.spool.depth == 1
    # Many members (an empty one is 20 bytes): each read copied what was left after it,
    # so 26,000 of them in 512 KB held the event loop for seconds (review).
    many = gzip.compress(b"") * 26_000 + gzip.compress(raw)
    reply = await call(agent.port, "/v1/batch", many, headers=auth)
    assert reply.status == 400 and b"members" in reply.body, reply.body
    for tail in (b"garbage", gzip.compress(raw)[:12]):   # not gzip; a truncated member
        reply = await call(agent.port, "/v1/batch", gzip.compress(raw) + tail, headers=auth)
        assert reply.status == 400, reply.body
    assert agent.spool.depth == 1


async def test_pixel_always_answers_a_gif(make_agent: Any) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    bad = [
        "/v1/pixel/track",                                       # no data
        "/v1/pixel/track?data=%%%",                              # not base64
        "/v1/pixel/track?data=" + base64.b64encode(b"{nope").decode(),
        "/v1/pixel/track?data=" + base64.b64encode(b'{"userId":"u","writeKey":"bad",'
                                                     b'"event":"e"}').decode(),
        "/v1/pixel/fly?data=e30=",
        "/v1/pixel/%C3%A9%0D%0Ax?data=e30=",                     # odd bytes in the reason
    ]
    for path in bad:
        reply = await call(agent.port, path, method="GET")
        assert reply.status == 200 and reply.body == GIF, path
        assert reply.headers.get("X-Outpost-Error"), path
    good = base64.urlsafe_b64encode(orjson.dumps(
        {"userId": "u", "writeKey": "good", "event": "e"})).decode().rstrip("=")
    reply = await call(agent.port, f"/v1/pixel/track?data={good}", method="GET")
    assert reply.status == 200 and "X-Outpost-Error" not in reply.headers
    assert agent.spool.depth == 1


async def test_a_pixel_whose_base64_is_wrapped_in_lines_is_stored(make_agent: Any,
                                                                  fake_segment: FakeSegment) -> None:
    """MIME-style base64, a line break every 60 or 76 characters (Ruby's Base64.encode64,
    Perl's encode_base64, `openssl base64`), URL-escaped as %0A: line breaks are no data
    (RFC 2045), and Go's base64, Segment's own, skips them. Refused as "not base64", the
    pixel's event was lost behind its 200 GIF."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    event = {"userId": "u", "writeKey": "k", "event": "Email Opened", "messageId": "px-1",
             "properties": {"campaign": "winter", "subject": "x" * 80}}
    data = base64.encodebytes(orjson.dumps(event)).decode()    # a line every 76 characters
    assert data.count("\n") > 1
    escaped = data.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D") \
        .replace("\n", "%0A")
    reply = await call(agent.port, f"/v1/pixel/track?data={escaped}", method="GET")
    assert reply.status == 200 and reply.body == GIF
    assert "X-Outpost-Error" not in reply.headers, reply.headers["X-Outpost-Error"]
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.events[0]["properties"] == event["properties"]


async def test_a_head_request_to_the_pixel_stores_nothing(make_agent: Any) -> None:
    """HEAD is a safe method (RFC 9110): link checkers, prefetchers and proxies send it
    to see what a URL is. aiohttp answers HEAD with a GET route's handler, so the pixel
    stored its event; the GET that follows was then a second copy of an id-less event."""
    agent = await make_agent()
    data = base64.urlsafe_b64encode(orjson.dumps({"userId": "u", "event": "e"})).decode()
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="HEAD")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/gif"
    assert reply.headers["Content-Length"] == str(len(GIF))
    assert "HEAD" in reply.headers["X-Outpost-Error"]
    reply = await call(agent.port, f"/v1/pixel/track?data={data}", method="GET")
    assert reply.status == 200 and "X-Outpost-Error" not in reply.headers
    assert agent.spool.depth == 1


@pytest.mark.parametrize("name", ["a\x01b", "a\x7fb", "\x1b[31m"])
async def test_pixel_answers_a_gif_when_its_reason_names_a_field_with_control_characters(
        make_agent: Any, name: str) -> None:
    """The reason a pixel is not stored names the field at fault, as the app spelled it;
    aiohttp refuses to write a header holding a control character, so such a name cut the
    connection without a reply (and logged a traceback) instead of the GIF."""
    agent = await make_agent()
    for value in (b"NaN", b"18446744073709551617"):   # not JSON; beyond 64 bits
        data = (b'{"userId": "u", "event": "e", "properties": {' + orjson.dumps(name)
                + b": " + value + b"}}")
        path = "/v1/pixel/track?data=" + base64.urlsafe_b64encode(data).decode()
        reply = await call(agent.port, path, method="GET")
        assert reply.status == 200 and reply.body == GIF, (name, value)
        why = reply.headers["X-Outpost-Error"]
        assert "properties." in why and why.isprintable() and why.isascii(), why
    assert agent.spool.depth == 0


async def test_full_spool_is_503_for_a_call_429_for_a_batch_and_the_pixel_still_200(
        make_agent: Any) -> None:
    """A batch refused for want of room is a 429, which analytics-node and analytics-next
    wait out by its Retry-After (tests/interop/test_segment_node.py); a single call stays
    503, whose backoff analytics-next's default delivery keeps up longer."""
    agent = await make_agent(storage={"max_size_mb": 1, "full_retry_after_s": 7})
    auth = {"Authorization": basic("k")}
    await fill_spool(agent.port)
    reply = await call(agent.port, "/v1/track", {"userId": "u", "event": "e"}, headers=auth)
    assert reply.status == 503 and reply.headers["Retry-After"] == "7"
    assert reply.json()["Error"] == "Service Unavailable"
    for path in ("/v1/batch", "/v1/b", "/v1/import", "/v1/webhook?writeKey=k"):
        reply = await call(agent.port, path, {"batch": [{"type": "track", "userId": "u",
                                                         "event": "e"}]}, headers=auth)
        assert reply.status == 429 and reply.headers["Retry-After"] == "7", path
        body = reply.json()
        assert body["Errors"][0]["Error"] == "Too Many Requests" and body["code"] == (
            "too_many_requests"), body
    reply = await call(agent.port, seed.METAROUTER_PIXEL_PATH, method="GET")
    assert reply.status == 200 and reply.body == GIF


@pytest.mark.parametrize("path,headers", [
    ("/v1/track", {"Authorization": basic("k")}),
    ("/v1/capture", {"X-Write-Key": "k"}),
    ("/api/public/apps/track", {"PublicWriteKey": "k"}),
    ("/track", {"Authorization": basic("k")}),
])
async def test_nesting_deeper_than_storable_is_400_not_500(make_agent: Any, path: str,
                                                           headers: dict[str, str]) -> None:
    agent = await make_agent()
    deep = "[" * 300 + "]" * 300
    ev = f'{{"type":"track","messageId":"d","userId":"u","event":"e","properties":{{"d":{deep}}}'
    bodies = {"/v1/capture": '{"batch":[' + ev + "}]}",
              "/track": '{"hitId":"h","event":{"name":"n","user":{"userId":"u"},"d":' + deep + "}}"}
    reply = await call(agent.port, path, bodies.get(path, ev + "}"), headers=headers)
    assert reply.status == 400, reply.body
    # Past the per-message limit, the size check meets the same nesting first.
    padded = ev + ',"pad":"' + "x" * 40_000 + '"}'
    reply = await call(agent.port, "/v1/batch", '{"batch":[' + padded + "]}",
                       headers={"Authorization": basic("k")})
    assert reply.status == 400, reply.body


async def test_a_hand_written_batch_over_1_mib_is_400_not_read_by_hand(make_agent: Any) -> None:
    """Batches may be 4 MiB (rudder-sdk-python fills them so), but the forgiving reader of
    hand-written JSON is pure Python (~0.6 s a MiB): past 1 MiB a body must be JSON."""
    agent = await make_agent()
    one = "{'type': 'track', 'event': 'e', 'userId': 'u', 'properties': {'p': '" + "x" * 1000
    body = "{'batch': [" + ", ".join(f"{one}', 'i': {i}}}}}" for i in range(1100)) + "]}"
    reply = await call(agent.port, "/v1/batch", body, headers={"Authorization": basic("k")})
    assert reply.status == 400, reply.body
    assert "strict JSON only" in reply.json()["Errors"][0]["Details"]
    assert agent.spool.depth == 0
