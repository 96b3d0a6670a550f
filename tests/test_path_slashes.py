"""An app configured with a trailing slash on Outpost's address is served.

Clients build their URLs by joining strings (nucleus-nodejs, nucleus-analytics and
nucleus-python `{endpoint}/app/{appId}/track`, Dittofeed `{host}/api/...`, analytics-next
`apiHost + "/t"`), so `ws://127.0.0.1:8765/` gives `//app/{appId}/track`: a 404 the
Nucleus modules retried forever. A run of slashes is served as one, and one trailing
slash as none, on every route of every dialect (websockets included), with no redirect
(a POST body or a websocket handshake does not survive one well) and with the same
Host and Origin checks as the plain path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.dialects.base import Example
from tests.dialect_examples import as_http, examples
from tests.fakes.threaded_agent import ThreadedAgent
from tests.segment_helpers import call
from tests.test_routes import status_of
from tests.test_security import ALLOWED, GOOD, check_hosts, check_origins, ws_status


def doubled(path: str) -> str:
    """`/v1/batch` as `{host}/` + `/v1/batch` gives it."""
    return "/" + path


def trailing(path: str) -> str:
    """`/v1/batch?writeKey=k` with a slash after the path."""
    path, sep, query = path.partition("?")
    return path + "/" + sep + query


def inner(path: str) -> str:
    """Every slash of the path doubled: `//v1//batch`."""
    path, sep, query = path.partition("?")
    return path.replace("/", "//") + sep + query


SPELLINGS = [doubled, trailing, inner]


def spelled(how: Callable[[str], str]) -> list[Example]:
    return [replace(ex, path=how(ex.path)) for ex in examples(GOOD)]


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[ThreadedAgent]:
    with ThreadedAgent(tmp_path, listen={"accept_keys": [GOOD], "allowed_origins": [ALLOWED]}) \
            as agent:
        yield agent


@pytest.mark.parametrize("how", SPELLINGS, ids=lambda f: f.__name__)
def test_every_route_is_served_with_extra_slashes(guarded: ThreadedAgent,
                                                 how: Callable[[str], str]) -> None:
    for ex in spelled(how):
        before = guarded.depth
        if ex.websocket:
            assert asyncio.run(ws_status(guarded, ex)) == 101, ex.path
        else:
            status, _, reply = guarded.request(*as_http(ex))
            assert 200 <= status < 300, (ex.path, status, reply)
        assert guarded.depth == before + 1, ex.path
    assert not guarded.errors.tracebacks()


@pytest.mark.parametrize("how", SPELLINGS, ids=lambda f: f.__name__)
def test_extra_slashes_keep_the_host_and_origin_checks(guarded: ThreadedAgent,
                                                      how: Callable[[str], str]) -> None:
    check_hosts(guarded, [as_http(ex) for ex in spelled(how)])
    check_origins(guarded, spelled(how))
    for ex in spelled(how):
        if ex.websocket:
            assert asyncio.run(ws_status(guarded, ex, headers={"Host": "evil.example:80"})) \
                == 421, ex.path
            assert asyncio.run(ws_status(guarded, ex, origin="https://evil.example")) == 403


async def test_what_no_route_serves_is_still_a_404_or_a_405(make_agent: Any) -> None:
    agent = await make_agent()
    missing = await call(agent.port, "//v1/nowhere", b"{}")
    assert missing.status == 404, missing.body
    assert "//v1/nowhere" in missing.json()["error"]   # the path as the client sent it
    wrong = await call(agent.port, "//v1/batch/", method="GET")
    assert wrong.status == 405, wrong.body
    assert {m.strip() for m in wrong.headers["Allow"].split(",")} == {"POST", "OPTIONS"}
    assert (await status_of(agent.port))["ingest"]["refused"] == {
        "unrouted": {"404": 1, "405": 1}}


async def test_a_404_or_405_at_a_websocket_path_names_the_path_as_sent(
        make_agent: Any) -> None:
    """The plain forms of `//v1/track/` and `//favicon.ico/` are Nucleus websocket paths
    (`/{appId}/track`, `/{appId}`), whose plain GET is answered as what no route serves:
    that answer named the plain form (`method GET not allowed on /v1/track`), a path the
    client never sent, where every other 404 or 405 names the client's own."""
    agent = await make_agent()
    wrong = await call(agent.port, "//v1/track/", method="GET")
    assert wrong.status == 405, wrong.body
    assert wrong.json()["error"] == "method GET not allowed on //v1/track/", wrong.body
    missing = await call(agent.port, "//favicon.ico/", method="GET")
    assert missing.status == 404, missing.body
    assert missing.json()["error"] == "no route for GET //favicon.ico/", missing.body


async def test_operations_routes_take_extra_slashes_too(make_agent: Any) -> None:
    agent = await make_agent()
    for path in ("//healthz", "/healthz/", "//status"):
        reply = await call(agent.port, path, method="GET")
        assert reply.status == 200, (path, reply.body)


async def test_a_404_or_405_at_a_very_long_path_names_its_start_and_length(
        make_agent: Any) -> None:
    """A 404 or 405 quoted the path whole: a 60 KB path came back as a 60 KB answer, for
    each request. A path longer than any route's is named by its start and its length."""
    agent = await make_agent()
    long = "/" + "p" * 60_000
    for path, method, status in ((long, "GET", 404), (f"/app{long}/track", "GET", 405)):
        got = await call(agent.port, path, method=method)
        assert got.status == status, (status, got.body[:200])
        # Bounded: the quoted path twice at most (`error`, and `message` for legacy SDKs).
        assert len(got.body) < 2048, (status, len(got.body))
        error = got.json()["error"]
        assert error.startswith(f"{'no route for' if status == 404 else 'method GET'}"), error
        assert path[:40] in error and f"({len(path)} characters)" in error, error


async def test_a_404_or_405_names_an_encoded_slash_as_sent(make_agent: Any) -> None:
    """`%2F` is no slash (`/v1%2Ftrack` is no route), but the 404 said so in the decoded
    form: `no route for POST /v1/track`, a route the agent serves, which sent the client
    looking for a fault in its own request body or key. Named as the client wrote it."""
    agent = await make_agent()
    missing = await call(agent.port, "/v1%2Ftrack", b"{}")
    assert missing.status == 404, missing.body
    assert missing.json()["error"] == "no route for POST /v1%2Ftrack", missing.body
    wrong = await call(agent.port, "//app/k%2Fk/track/", method="GET")
    assert wrong.status == 405, wrong.body
    assert wrong.json()["error"] == ("method GET not allowed on //app/k%2Fk/track/"
                                     " but as a websocket upgrade"), wrong.body
