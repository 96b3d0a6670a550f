"""A body in a Content-Encoding the agent does not decode (`br`) is refused, on every
route that takes a body, with a reply that says what is wrong and what is accepted.

The Segment single calls answered 415 with an empty `Details`, and the batches
"Error reading request body" with an empty `Details`: neither named what was accepted,
nor did the other APIs' replies; a batch's did not even name the encoding.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from agent.dialects.base import Example
from tests.dialect_examples import examples

KEY = "k"
# Every example request that carries a body (a pixel carries its event in the URL, a
# websocket's frames have no Content-Encoding).
WITH_BODY = [ex for ex in examples(KEY) if ex.body is not None and not ex.websocket]
# SegmentStream answers 400 for every client mistake, as its seed documents.
STATUS = {"/track": 400}


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
