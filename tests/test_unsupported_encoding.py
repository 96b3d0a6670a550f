"""A body in a Content-Encoding the agent does not decode (`br`) is refused, on every
route that takes a body, with a reply that says what is wrong and what is accepted.

The Segment single calls answered 415 with an empty `Details`, and the batches
"Error reading request body" with an empty `Details`: neither named what was accepted,
nor did the other APIs' replies; a batch's did not even name the encoding.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import aiohttp
import orjson
import pytest

from agent.dialects import registry
from agent.dialects.base import Example
from tests.dialect_examples import examples
from tests.test_routes import raw_reply

KEY = "k"
# Every example request that carries a body (a pixel carries its event in the URL, a
# websocket's frames have no Content-Encoding).
WITH_BODY = [ex for ex in examples(KEY) if ex.body is not None and not ex.websocket]
# The first of them of each API.
ONE_PER_API = list({d.name: ex for d in reversed(registry.DIALECTS) for ex in reversed(
    d.examples(KEY)) if ex.body is not None and not ex.websocket}.values())
# SegmentStream answers 400 for every client mistake, as its seed documents.
STATUS = {"/track": 400}
# A Content-Length over every route's body limit (the largest: 4 MiB).
OVER_ANY_LIMIT = 5 * 1024 * 1024


def details(reply: Any) -> list[Any]:
    """Every `Details` of a Segment error body, a batch's items' included."""
    if isinstance(reply, dict):
        return [v for k, v in reply.items() if k == "Details"] + [
            d for v in reply.values() for d in details(v)]
    if isinstance(reply, list):
        return [d for v in reply for d in details(v)]
    return []


@pytest.mark.parametrize("ex", WITH_BODY, ids=lambda ex: f"{ex.method} {ex.path}")
async def test_a_br_body_is_refused_naming_the_encodings_accepted(
        make_agent: Any, ex: Example) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.request(
            ex.method, f"http://127.0.0.1:{agent.port}{ex.path}", data=ex.body,
            headers={**ex.headers, "Content-Encoding": "br"}) as r:
        status, body = r.status, await r.read()
    assert status == STATUS.get(ex.path, 415), body
    text = body.decode()
    assert "'br'" in text and "gzip" in text and "deflate" in text, text
    assert all(details(orjson.loads(body))), text   # no empty explanation
    assert agent.spool.depth == 0


# Each route once, the codings in turn: `deflate` with a body that is plain JSON (stored).
CODED = [(ex, ("gzip, chunked", "deflate, chunked")[n % 2]) for n, ex in enumerate(WITH_BODY)]


@pytest.mark.parametrize("ex,coding", CODED, ids=lambda v: f"{v.method} {v.path}"
                         if isinstance(v, Example) else v)
async def test_a_transfer_coding_other_than_chunked_is_refused_501(
        make_agent: Any, ex: Example, coding: str) -> None:
    """aiohttp's parser takes `Transfer-Encoding: gzip, chunked` as chunked and drops the
    gzip: the route parsed the compressed bytes as JSON (`invalid JSON: body is not UTF-8`),
    and a body that was in fact plain JSON was stored. RFC 9112 6.1: a transfer coding the
    server does not understand is a 501, here in the API's error shape, naming it and what
    to send instead; nothing stored."""
    agent = await make_agent()
    assert ex.body is not None
    body = gzip.compress(ex.body) if coding.startswith("gzip") else ex.body
    fields = "".join(f"{k}: {v}\r\n" for k, v in ex.headers.items())
    head, reply = await raw_reply(agent.port, (
        f"{ex.method} {ex.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{fields}"
        f"Transfer-Encoding: {coding}\r\n\r\n").encode()
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert head.startswith(b"HTTP/1.1 %d " % STATUS.get(ex.path, 501)), head + reply
    text = reply.decode()
    assert "Transfer-Encoding" in text and repr(coding) in text, text
    assert "Content-Encoding" in text, text   # what to send instead
    assert agent.spool.depth == 0


def head_of(ex: Example, fields: str) -> bytes:
    """``ex``'s request line and fields, with ``fields`` added, and no body."""
    given = "".join(f"{k}: {v}\r\n" for k, v in ex.headers.items())
    return f"{ex.method} {ex.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{given}{fields}\r\n".encode()


async def first_reply_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


@pytest.mark.parametrize("ex", WITH_BODY, ids=lambda ex: f"{ex.method} {ex.path}")
async def test_expect_100_continue_over_the_limit_is_refused_before_the_body_is_sent(
        make_agent: Any, ex: Example) -> None:
    """aiohttp answered `100 Continue` to every `Expect: 100-continue` before the route
    ran, so a client whose Content-Length was over the route's limit uploaded the whole
    body (curl, .NET's HttpClient wait for the 100), which the agent read and threw away.
    The API's refusal comes instead of the 100 (RFC 9110 §10.1.1)."""
    agent = await make_agent()
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        writer.write(head_of(ex, f"Expect: 100-continue\r\nContent-Length: {OVER_ANY_LIMIT}\r\n"))
        head = await first_reply_head(reader)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 %d " % STATUS.get(ex.path, 413)), head
    assert agent.spool.depth == 0


@pytest.mark.parametrize("ex", ONE_PER_API, ids=lambda ex: f"{ex.method} {ex.path}")
async def test_expect_100_continue_within_the_limit_gets_its_100_then_is_stored(
        make_agent: Any, ex: Example) -> None:
    agent = await make_agent()
    assert ex.body is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        writer.write(head_of(ex, f"Expect: 100-continue\r\nContent-Length: {len(ex.body)}\r\n"))
        assert await first_reply_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(ex.body)
        head = await first_reply_head(reader)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 20"), head
    assert agent.spool.depth == 1


@pytest.mark.parametrize("ex", ONE_PER_API, ids=lambda ex: f"{ex.method} {ex.path}")
async def test_an_unknown_expectation_is_a_json_417_counted_as_refused(
        make_agent: Any, ex: Example) -> None:
    """aiohttp answered `Expect: 200-ok` with its plain-text `Unknown Expect: 200-ok`,
    uncounted, where every other refusal is JSON and counted."""
    agent = await make_agent()
    assert ex.body is not None
    head, reply = await raw_reply(agent.port, head_of(
        ex, f"Expect: 200-ok\r\nContent-Length: {len(ex.body)}\r\n") + ex.body)
    assert head.startswith(b"HTTP/1.1 417 "), head + reply
    assert b"application/json" in head, head
    body = orjson.loads(reply)
    assert body["code"] == "expectation_failed", body
    assert "'200-ok'" in body["message"] and "100-continue" in body["message"], body
    assert list(agent.sink.metrics.refusals().values()) == [{"417": 1}]
    assert agent.spool.depth == 0


@pytest.mark.parametrize("path", ["/v1/batch", "/v2/batch"])
@pytest.mark.parametrize("field,status", [
    ("Host: evil.example", 421), ("Origin: https://evil.example", 403)])
async def test_a_request_the_guard_refuses_is_told_so_before_its_unknown_expect(
        make_agent: Any, path: str, field: str, status: int) -> None:
    """The Expect handler ran before the route's guard: a request from a foreign Host or
    Origin with `Expect: 200-ok` was told 417, what was wrong with its Expect, rather than
    that it is not allowed at all."""
    agent = await make_agent()
    host = "" if field.startswith("Host") else "Host: 127.0.0.1\r\n"
    head, reply = await raw_reply(agent.port, (
        f"POST {path} HTTP/1.1\r\n{host}{field}\r\nContent-Type: application/json\r\n"
        "Expect: 200-ok\r\nContent-Length: 2\r\n\r\n{}").encode())
    assert head.startswith(b"HTTP/1.1 %d " % status), head + reply
    assert b"application/json" in head, head
    assert "evil.example" in orjson.loads(reply)["error"], reply


@pytest.mark.parametrize("ex", ONE_PER_API, ids=lambda ex: f"{ex.method} {ex.path}")
async def test_content_encoding_in_two_field_lines_is_judged_as_the_list_it_makes(
        make_agent: Any, ex: Example) -> None:
    """Two `Content-Encoding` lines are one list (RFC 9110 5.3: `identity, gzip`), and
    that list in one line is refused 415 naming it. Only the first line was read: a
    gzip body, taken as `identity`, was parsed as it came and refused as JSON that
    `is not UTF-8`, which says nothing of its real fault."""
    agent = await make_agent()
    assert ex.body is not None
    body = gzip.compress(ex.body)
    head, reply = await raw_reply(agent.port, head_of(
        ex, f"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(body)}\r\n") + body)
    assert head.startswith(b"HTTP/1.1 %d " % STATUS.get(ex.path, 415)), head + reply
    text = reply.decode()
    assert "'identity, gzip'" in text and "accepted" in text, text
    assert agent.spool.depth == 0
