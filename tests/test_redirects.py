"""Redirects and captive portals delete nothing (only the configured URL acks).

A hotel Wi-Fi or a kiosk behind a login page answers every request with a
redirect to its portal, or with the portal's HTML page itself. Either way no
event may be deleted: a 3xx is a failure retried with backoff, shown in
`last_error` with the Location's host (never its user, path or query), and
the redirect target receives nothing. Once the network is right again,
everything is delivered. Backoff is shrunk so that retries take milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from agent.families.event import NUCLEUS, Event
from agent.forwarder.state import UpstreamState
from agent.forwarder.stream import LIMIT_EASE_S, StreamForwarder
from agent.metrics import Metrics
from agent.ops.status_table import render, size
from agent.settings import StorageConfig, UpstreamConfig
from agent.spool import Spool
from agent.spool.types import Row
from agent.uplinks.base import Acked, Retry, SendResult
from agent.uplinks.http_common import location_host
from agent.uplinks.prepare import Prepared
from tests.conftest import write_config
from tests.fakes.captive_portal import LOGIN_PAGE, PORTAL, Answer, CaptiveUpstream, redirect
from tests.fakes.uplinks import as_prepared
from tests.test_upstream_faults import _raw_upstream, manual, send
from tests.waiting import run_outpost, wait_for

HTTP_UPLINKS = ("segment-http", "nucleus-http")
REDIRECTS = (301, 302, 303, 307, 308)
N = 6
# What a Location may carry that must never be shown.
SECRETS = ("guest", "hunter22", "sess-4411", "/login")


@pytest.fixture(autouse=True)
def quick_retries(fast_backoff: None) -> None:
    """Retries in milliseconds (conftest gives each test fresh log rate limits)."""


@pytest.fixture
async def portal() -> AsyncIterator[CaptiveUpstream]:
    """The redirect target: a login page on every path (it would 'ack' anything)."""
    fake = await CaptiveUpstream(PORTAL).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def gateway() -> AsyncIterator[CaptiveUpstream]:
    """The configured upstream: intercepted by the network until a test lets it through."""
    fake = await CaptiveUpstream().start()
    yield fake
    await fake.stop()


def location(target: CaptiveUpstream, path: str = "/login") -> str:
    return f"http://guest:hunter22@127.0.0.1:{target.port}{path}?session=sess-4411"


def event(i: int) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z", "payload": {"mark": f"mk-{i}"}}


async def start(make_agent: Any, up: CaptiveUpstream, protocol: str) -> Any:
    agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol,
                                         "url": up.url(protocol), "flush_interval_s": 0.02,
                                         "timeout_s": 2}])
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/app/app1/track",
            json={"data": [event(i) for i in range(N)]}) as r:
        assert r.status == 200, await r.text()
    return agent


async def status_of(agent: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
    return data["upstreams"][0]


async def held_while_failing(agent: Any) -> dict[str, Any]:
    """Once several sends failed: nothing was deleted; the upstream's /status entry."""
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.retries >= 3 or agent.spool.depth < N or state.acked > 0)
    assert agent.spool.depth == N
    assert state.acked == 0
    # Waited for, not read once: between a key leaving its backoff and its loop sending,
    # the upstream shows "idle" for a few loop turns (a retry due at once, here).
    await wait_for(lambda: state.shown in ("backoff", "sending"))
    return await status_of(agent)


async def delivered_once_let_through(agent: Any, gateway: CaptiveUpstream,
                                     portal: CaptiveUpstream | None = None) -> None:
    gateway.intercept = None
    agent.forwarding.flush()   # as `outpost flush` does: no wait for the backoff
    await wait_for(lambda: agent.spool.depth == 0)
    marks = {ev.get("payload", ev.get("properties", {})).get("mark") for ev in gateway.delivered}
    assert marks == {f"mk-{i}" for i in range(N)}
    assert await agent.spool.dead_letters() == []
    if portal is not None:
        assert portal.hits == []


def assert_names_redirect(last_error: str | None, status: int, target: CaptiveUpstream) -> None:
    assert last_error is not None
    assert f"HTTP {status}" in last_error
    assert f"127.0.0.1:{target.port}" in last_error
    for secret in SECRETS:
        assert secret not in last_error


@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_http_redirect_is_a_retried_failure(make_agent: Any, gateway: CaptiveUpstream,
                                                  portal: CaptiveUpstream, protocol: str,
                                                  status: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="outpost")
    gateway.intercept = redirect(status, location(portal))
    agent = await start(make_agent, gateway, protocol)
    up = await held_while_failing(agent)
    assert portal.hits == []                      # not followed, not even a body-less GET
    assert all(hit.intercepted for hit in gateway.hits)
    assert_names_redirect(up["last_error"], status, portal)
    # Logged once (rate-limited), naming the Location's host and nothing more of it.
    lines = [r.getMessage() for r in caplog.records if f"HTTP {status}" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{portal.port}" in lines[0]
    assert not any(secret in caplog.text for secret in SECRETS)
    await delivered_once_let_through(agent, gateway, portal)


@pytest.mark.parametrize("status", REDIRECTS)
async def test_websocket_handshake_redirect_is_not_followed(make_agent: Any,
                                                            gateway: CaptiveUpstream,
                                                            status: int) -> None:
    # The target speaks Nucleus: had the handshake been followed, it would have
    # acknowledged (and so deleted) every event.
    target = await CaptiveUpstream().start()
    try:
        gateway.intercept = redirect(status, location(target, "/app/app1/track"))
        agent = await start(make_agent, gateway, "nucleus-ws")
        up = await held_while_failing(agent)
        assert target.hits == [] and target.delivered == []
        assert_names_redirect(up["last_error"], status, target)
        assert "/app/" not in up["last_error"]
        await delivered_once_let_through(agent, gateway, target)
    finally:
        await target.stop()


@pytest.mark.parametrize("protocol", ("segment-http", "nucleus-http", "nucleus-ws"))
async def test_captive_portal_on_every_path_deletes_nothing(make_agent: Any,
                                                           gateway: CaptiveUpstream,
                                                           protocol: str) -> None:
    # DNS hijacked: the configured URL itself answers 200 with a login page,
    # the websocket handshake path included.
    gateway.intercept = PORTAL
    agent = await start(make_agent, gateway, protocol)
    up = await held_while_failing(agent)
    assert gateway.hits and all(hit.intercepted for hit in gateway.hits)
    assert "HTTP 200" in up["last_error"] and "HTML" in up["last_error"]
    assert "app1" not in up["last_error"]   # the handshake URL (and its key) is not shown
    await delivered_once_let_through(agent, gateway)


async def held_for_its_retry_after(make_agent: Any, gateway: CaptiveUpstream, protocol: str,
                                   answer: Answer, said: tuple[str, ...],
                                   wait: float = 30.0) -> tuple[Any, Any]:
    """An agent whose upstream gave ``answer`` (a Retry-After of ``wait`` s) to its first
    batch, its last_error saying each of ``said``, with all but 0.1 s of the wait gone by:
    (agent, timing)."""
    gateway.intercept = answer
    timing, seams = manual()
    agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol,
                                         "url": gateway.url(protocol),
                                         "flush_interval_s": 0.02, "timeout_s": 2}],
                             seams=seams)
    await send(agent, [event(i) for i in range(N)])
    await wait_for(lambda: agent.forwarding.states["up"].retries == 1)
    assert timing.pending() == [wait]
    up = await status_of(agent)
    assert all(s in up["last_error"] for s in said), up["last_error"]
    gateway.intercept = None
    timing.advance(wait - 0.1)
    return agent, timing


@pytest.mark.parametrize("status", (200, 403))
@pytest.mark.parametrize("protocol", ("segment-http", "nucleus-http", "nucleus-ws"))
async def test_a_page_s_retry_after_is_honoured_whatever_the_protocol(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str, status: int) -> None:
    """A portal's login page (200) or a proxy's error page (403) with a Retry-After: the key
    waits that long, over a websocket as over HTTP. A refused handshake's wait counted only
    with a status worth retrying (429, 5xx): the key went on at the backoff's pace."""
    agent, timing = await held_for_its_retry_after(
        make_agent, gateway, protocol, Answer(status, headers={"Retry-After": "30"}),
        (f"HTTP {status}", "HTML"))
    assert len(gateway.hits) == 1   # the page alone: nothing tried again before its time
    timing.advance(0.1)
    await wait_for(lambda: agent.spool.depth == 0)
    marks = {ev.get("payload", ev.get("properties", {})).get("mark") for ev in gateway.delivered}
    assert marks == {f"mk-{i}" for i in range(N)}


@pytest.mark.parametrize("protocol", ("segment-http", "nucleus-http", "nucleus-ws"))
async def test_a_redirect_s_retry_after_is_honoured(
        make_agent: Any, gateway: CaptiveUpstream, portal: CaptiveUpstream,
        protocol: str) -> None:
    """A 307 with a Retry-After (a site in maintenance pointing elsewhere for now): not
    followed, and the key waits that long before it tries the configured URL again, as
    for any status that carries one. It went on at the backoff's pace, the wait unread."""
    agent, timing = await held_for_its_retry_after(
        make_agent, gateway, protocol,
        Answer(307, {"Location": location(portal), "Retry-After": "30"}, b""),
        ("HTTP 307 redirect",))
    assert len(gateway.hits) == 1 and not portal.hits
    timing.advance(0.1)
    await wait_for(lambda: agent.spool.depth == 0)
    assert len(gateway.delivered) == N and not portal.hits


@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_a_413_s_retry_after_is_honoured_and_smaller_batches_follow(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """A 413 with a Retry-After: too large for now (RFC 9110), so the key waits that long,
    then sends batches of half the size. The batch was split and its halves sent at once,
    then theirs, down to single events: a server that asked for a pause was sent a burst,
    and every event it refused alone went to dead letters."""
    agent, timing = await held_for_its_retry_after(
        make_agent, gateway, protocol,
        Answer(413, {"Retry-After": "30"}, b'{"error": "too large for now"}',
               "application/json"), ("HTTP 413", "too large for now"))
    first = len(gateway.hits[0].body)
    assert len(gateway.hits) == 1   # nothing sent before its time, halves included
    # `outpost status` says batches, as the error does: an HTTP upstream has no frames.
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        shown = render(await r.json())
    limit = (await status_of(agent))["frame_limit_bytes"]
    assert f"batches at most {size(limit)}" in shown and "frames" not in shown, shown
    timing.advance(0.1)
    await wait_for(lambda: agent.spool.depth == 0)
    assert len(gateway.delivered) == N and await agent.spool.dead_letters() == []
    assert len(gateway.hits) > 2 and all(len(h.body) < first for h in gateway.hits[1:])


@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_a_413_s_smaller_batches_grow_back_once_it_is_over(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """A 413 with a Retry-After says too large for now: once the upstream has taken the
    smaller batches for a while, they grow back to full batches. The cut lasted until the
    agent stopped: an upstream overloaded once got small batches (more requests for the
    same events) for good."""
    agent, timing = await held_for_its_retry_after(
        make_agent, gateway, protocol,
        Answer(413, {"Retry-After": "30"}, b'{"error": "too large for now"}',
               "application/json"), ("HTTP 413", "too large for now"))
    timing.advance(0.1)
    await wait_for(lambda: agent.spool.depth == 0)
    state = agent.forwarding.states["up"]
    assert state.frame_limit_bytes is not None
    sent = N
    for _ in range(30):   # an hour at a time, an event answered in each: it doubles
        if state.frame_limit_bytes is None:
            break
        timing.advance(3600)
        await send(agent, [event(sent)])
        sent += 1
        await wait_for(lambda: agent.spool.depth == 0)
    assert state.frame_limit_bytes is None
    hits = len(gateway.hits)
    await send(agent, [event(i) for i in range(sent, sent + N)])
    await wait_for(lambda: agent.spool.depth == 0)
    assert len(gateway.hits) == hits + 1   # one full batch again
    assert await agent.spool.dead_letters() == []


@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_an_event_alone_refused_with_413_and_a_retry_after_is_a_dead_letter_then_a_wait(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """An upstream that answers everything 413 with a Retry-After (too large for now, a
    server shedding load) is waited out after an event refused alone, which still goes to
    dead letters. The next event went at once, and was refused and dead-lettered too: the
    whole queue emptied into dead letters in a burst, the wait never honoured."""
    gateway.intercept = Answer(413, {"Retry-After": "30"}, b'{"error": "too large for now"}',
                               "application/json")
    timing, seams = manual()
    agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol,
                                         "url": gateway.url(protocol), "batch_max_events": 1,
                                         "flush_interval_s": 0.02, "timeout_s": 2}],
                             seams=seams)
    await send(agent, [event(i) for i in range(N)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.retries == 1 or len(gateway.hits) > 1)
    assert len(gateway.hits) == 1 and timing.pending() == [30.0], gateway.hits
    assert len(await agent.spool.dead_letters()) == 1
    assert "next try in 30s" in (state.last_error or ""), state.last_error
    gateway.intercept = None
    timing.advance(30)
    await wait_for(lambda: agent.spool.depth == 0)
    assert len(gateway.delivered) == N - 1


@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_a_413_s_smaller_batches_hold_a_minute_of_answers_after_a_long_retry_after(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """The limit a 413 with a Retry-After sets eases once the upstream has answered the
    smaller batches for a minute, as docs/operations.md says: not a minute after the 413.
    Behind a Retry-After of 90 s, the first smaller batch answered doubled it back, and the
    next batch was as large as the one refused."""
    agent, timing = await held_for_its_retry_after(
        make_agent, gateway, protocol,
        Answer(413, {"Retry-After": "90"}, b'{"error": "too large for now"}',
               "application/json"), ("HTTP 413",), wait=90.0)
    first = len(gateway.hits[0].body)
    timing.advance(0.1)
    await wait_for(lambda: agent.spool.depth == 0)
    limit = (await status_of(agent))["frame_limit_bytes"]
    assert limit is not None and limit <= first // 2, (limit, first)
    await send(agent, [event(i) for i in range(N, 2 * N)])
    await wait_for(lambda: agent.spool.depth == 0)
    assert all(len(h.body) < first for h in gateway.hits[1:]), (
        first, [len(h.body) for h in gateway.hits])
    timing.advance(LIMIT_EASE_S)   # a minute of answers: the next one eases it
    await send(agent, [event(i) for i in range(2 * N, 3 * N)])
    await wait_for(lambda: agent.spool.depth == 0)
    assert (await status_of(agent))["frame_limit_bytes"] in (None, 2 * limit)


def padded(i: int, pad: int) -> dict[str, Any]:
    return {**event(i), "payload": {"mark": f"mk-{i}", "pad": "x" * pad}}


async def refused_beside_a_loop(make_agent: Any, gateway: CaptiveUpstream
                                ) -> tuple[Any, Any, int]:
    """An agent with two keys' loops on one segment-http upstream whose proxy refuses, for
    now, bodies over 6.5 KB: key B's started first (a batch of 4 of about 5.5 KB taken),
    then key A's batch of 4, of about 7.5 KB, was refused with a Retry-After of 90 s, and A
    waits. (agent, timing, the limit A's refusal set.)"""
    gateway.intercept = Answer(413, {"Retry-After": "90"}, b'{"error": "too large for now"}',
                               "application/json", over=6500)
    timing, seams = manual()
    agent = await make_agent(upstreams=[{"name": "up", "protocol": "segment-http",
                                         "url": gateway.url("segment-http"),
                                         "batch_max_events": 4, "flush_interval_s": 30,
                                         "timeout_s": 2}], seams=seams)
    # B's loop stays: its queue must be empty flush_interval_s for it to end.
    await send(agent, [padded(i, 1000) for i in range(4)], key="b")
    await wait_for(lambda: agent.spool.depth == 0)
    await send(agent, [padded(i, 1500) for i in range(4, 8)], key="a")
    await wait_for(lambda: timing.pending() == [90.0])
    limit = (await status_of(agent))["frame_limit_bytes"]
    assert limit is not None and limit < len(gateway.hits[0].body), limit   # B's batches
    return agent, timing, limit


async def test_a_413_s_limit_holds_while_another_key_s_larger_batches_are_answered(
        make_agent: Any, gateway: CaptiveUpstream) -> None:
    """The limit eases after a minute of answers to the smaller batches (docs/operations.md).
    Another key's loop, started before the 413, still sends batches over it: their answers
    started that minute during the refused key's Retry-After, and eased the limit before
    that key sent again, so its next batch was as large as the one refused, and it was
    refused again, and waited again."""
    agent, timing, limit = await refused_beside_a_loop(make_agent, gateway)
    for minute in range(2):   # B's batches, over the limit, answered a minute apart
        await send(agent, [padded(i, 1000) for i in range(8 + 4 * minute, 12 + 4 * minute)],
                   key="b")
        await wait_for(lambda: agent.spool.depth == 4)   # A's alone wait
        timing.advance(LIMIT_EASE_S)
    assert max(len(h.body) for h in gateway.hits if not h.intercepted) > limit
    assert (await status_of(agent))["frame_limit_bytes"] == limit


async def test_a_413_for_another_key_s_larger_batch_restarts_the_limit_s_minute(
        make_agent: Any, gateway: CaptiveUpstream) -> None:
    """The limit eases after a minute of answers with no such 413 (docs/operations.md). A
    413 with a Retry-After for another key's batch, over the limit (its loop started before
    it), left the minute running: the limit doubled back while the upstream still refused
    batches that large."""
    agent, timing, limit = await refused_beside_a_loop(make_agent, gateway)
    timing.advance(90)
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.acked >= 5)   # A's, in smaller batches: the minute runs
    await send(agent, [padded(i, 2000) for i in range(8, 12)], key="b")   # about 9.5 KB
    await wait_for(lambda: timing.pending() == [90.0])   # refused for now: B waits
    timing.advance(LIMIT_EASE_S)
    acked = state.acked
    await send(agent, [padded(i, 1500) for i in range(12, 16)], key="a")
    await wait_for(lambda: state.acked > acked)
    assert (await status_of(agent))["frame_limit_bytes"] == limit


@pytest.mark.parametrize(("status", "hint"), [
    (401, "check the upstream's key"), (403, "check the upstream's key"),
    (404, "check the upstream's url")])
async def test_a_refused_websocket_handshake_says_what_to_check(
        make_agent: Any, gateway: CaptiveUpstream, status: int, hint: str) -> None:
    """A nucleus-ws upstream that refuses the handshake with 401/403 (the app id in its URL
    is the key) or 404 names what to check, and what its reply said, as the HTTP uplinks'
    last_error does: it said "HTTP 403 (Invalid response status)" alone (aiohttp's error
    for a refused handshake leaves the body out)."""
    gateway.intercept = Answer(status, body=b'{"error": "no such app"}',
                               content_type="application/json")
    agent = await start(make_agent, gateway, "nucleus-ws")
    up = await held_while_failing(agent)
    assert f"HTTP {status}" in up["last_error"] and hint in up["last_error"], up["last_error"]
    assert '"no such app"' in up["last_error"], up["last_error"]


# nginx's answer to http:// sent to its https port; a proxy's error page looks alike.
NGINX_400 = (b"<html><head><title>400 The plain HTTP request was sent to HTTPS port</title>"
             b"</head><body><center><h1>400 Bad Request</h1></center></body></html>")


@pytest.mark.parametrize("status", (400, 413, 403))
@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_an_html_error_page_is_the_network_s_fault_not_a_refusal(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str, status: int) -> None:
    """No analytics API answers with an HTML page: a 400 with one refuses no event (it
    dead-lettered the whole queue in seconds, split down to single events). It is retried
    with backoff, and last_error says what the page's title says."""
    gateway.intercept = Answer(status, body=NGINX_400)
    agent = await start(make_agent, gateway, protocol)
    up = await held_while_failing(agent)
    assert await agent.spool.dead_letters() == []
    assert f"HTTP {status}" in up["last_error"] and "HTML" in up["last_error"]
    assert "The plain HTTP request was sent to HTTPS port" in up["last_error"]
    await delivered_once_let_through(agent, gateway)


# What Go's HTTP servers (Caddy, and collectors written in Go) answer, with no type, to
# plain HTTP sent to their HTTPS port: nginx's answer is a page (NGINX_400), this is text.
GO_400 = b"Client sent an HTTP request to an HTTPS server.\n"


@pytest.mark.parametrize("protocol", (*HTTP_UPLINKS, "nucleus-ws"))
async def test_plain_http_sent_to_a_go_server_s_https_port_refuses_no_event(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """An upstream url of http:// where the port speaks HTTPS, behind Caddy or any Go
    server: its 400 is the url's fault, as nginx's page is. It was a refusal of the batch:
    split down to single events, each refused in turn, and the whole queue went to dead
    letters. A ws:// url so said "HTTP 400 (Invalid response status)" alone: no word of
    wss://."""
    gateway.intercept = Answer(400, body=GO_400, content_type=None)
    agent = await start(make_agent, gateway, protocol)
    up = await held_while_failing(agent)
    assert await agent.spool.dead_letters() == []
    assert "HTTPS" in up["last_error"] and "check the upstream's url" in up["last_error"]
    await delivered_once_let_through(agent, gateway)


@pytest.mark.parametrize("protocol", ("segment-http", "nucleus-ws"))
async def test_tls_sent_to_a_plain_http_port_names_the_url_s_scheme(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """An upstream url of https:// (wss://) where the port speaks plain HTTP: last_error
    said OpenSSL's `[SSL: WRONG_VERSION_NUMBER] wrong version number` alone, nothing of
    the url."""
    url = gateway.url(protocol).replace("http://", "https://").replace("ws://", "wss://")
    agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol, "url": url,
                                         "flush_interval_s": 0.02, "timeout_s": 2}])
    await send(agent, [event(i) for i in range(N)])
    up = await held_while_failing(agent)
    assert "does not speak TLS" in up["last_error"], up["last_error"]
    assert "check the upstream's url" in up["last_error"], up["last_error"]


@pytest.mark.parametrize("scheme", ["https", "wss"])
async def test_doctor_says_a_port_that_speaks_plain_http_fails_the_url_s_tls(
        tmp_path: Path, gateway: CaptiveUpstream, scheme: str) -> None:
    """`outpost doctor` said `reachable` for an https:// (wss://) url whose port speaks
    plain HTTP, as it connects over TCP and no further, while every send failed its TLS
    handshake: the operator checking why was told all was well."""
    port = URL(gateway.http_url).port
    protocol = "nucleus-ws" if scheme == "wss" else "segment-http"
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        {"name": "up", "protocol": protocol, "url": f"{scheme}://127.0.0.1:{port}"}])
    code, out = await run_outpost("doctor", "--config", str(config))
    assert code == 0, out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("up ")]
    assert "does not speak TLS" in line and "http://" in line, line


@pytest.fixture
async def tls_port() -> AsyncIterator[int]:
    """A port that speaks TLS (HTTPS), as an upstream's https:// url names, with a
    self-signed certificate: what its handshake proves is TLS, not trust."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(Path(__file__).parent / "data" / "self-signed-tls.pem")
    runner = web.AppRunner(web.Application(), handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


@pytest.mark.parametrize(("scheme", "protocol"), [("http", "segment-http"),
                                                  ("ws", "nucleus-ws")])
async def test_doctor_says_a_port_that_speaks_tls_takes_no_plain_http(
        tmp_path: Path, tls_port: int, scheme: str, protocol: str) -> None:
    """`outpost doctor` said `reachable` for an http:// (ws://) url whose port speaks TLS,
    as it connects over TCP and no further, while every send there failed: it says the
    port speaks TLS and which scheme the url needs."""
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        {"name": "up", "protocol": protocol, "url": f"{scheme}://127.0.0.1:{tls_port}"}])
    code, out = await run_outpost("doctor", "--config", str(config))
    assert code == 0, out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("up ")]
    assert "speaks TLS" in line and f"{scheme}s://" in line, line


@pytest.mark.parametrize(("content_type", "page"), [
    ("application/xhtml+xml", LOGIN_PAGE),
    ("text/plain", b"\r\n  <HTML><HEAD><TITLE>Guest Wi-Fi</TITLE></HEAD><BODY>Log in</BODY></HTML>"),
    (None, LOGIN_PAGE),   # no type at all
], ids=["xhtml", "text-plain", "no-type"])
@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_a_login_page_is_known_by_its_body_whatever_its_type(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str, content_type: str | None,
        page: bytes) -> None:
    """A portal's 200 login page served as other than text/html was a segment-http ack:
    the events were deleted."""
    gateway.intercept = Answer(body=page, content_type=content_type)
    agent = await start(make_agent, gateway, protocol)
    up = await held_while_failing(agent)
    assert "HTTP 200" in up["last_error"] and "HTML" in up["last_error"]
    await delivered_once_let_through(agent, gateway)


NGINX_413 = (b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>"
             b"<center><h1>413 Request Entity Too Large</h1></center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_a_proxy_s_413_page_for_a_large_batch_splits_it(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """nginx before the collector with a client_max_body_size under a full batch: its 413
    is an HTML page, and a smaller batch gets through. The batch is split and delivered,
    as for the collector's own 413 (retried whole, it was stuck for good); and the log says
    so, since every full batch will cost three requests until the limits agree."""
    gateway.intercept = Answer(413, body=NGINX_413, over=600)
    agent = await start(make_agent, gateway, protocol)
    await wait_for(lambda: agent.spool.depth == 0)
    marks = {ev.get("payload", ev.get("properties", {})).get("mark") for ev in gateway.delivered}
    assert marks == {f"mk-{i}" for i in range(N)}
    assert await agent.spool.dead_letters() == []
    assert "took them in smaller batches" in caplog.text and "batch_max_bytes" in caplog.text


# A proxy's 413 in plain words, as text: Traefik's and Envoy's (Go's and Envoy's status
# text), and a Go server's http.MaxBytesReader error; or in none, Caddy's (no body, no type).
PLAIN_413 = (("segment-http", b"Request Entity Too Large\n"),
             ("nucleus-http", b"Payload Too Large"),
             ("segment-http", b"http: request body too large\n"),
             ("segment-http", b""), ("nucleus-http", b""))


@pytest.mark.parametrize(("protocol", "body"), PLAIN_413)
async def test_a_proxy_s_plain_413_for_an_event_alone_refuses_no_event(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str, body: bytes) -> None:
    """A proxy whose body size limit is under a single event, answering its 413 in plain
    words: as with its HTML page (NGINX_413), the event is kept and retried, and last_error
    says a proxy's limit is in the way. Split down to one event, each went to dead letters
    on the proxy's word, not the upstream's, and the whole queue with them."""
    gateway.intercept = Answer(413, body=body, content_type="text/plain" if body else None)
    agent = await start(make_agent, gateway, protocol)
    up = await held_while_failing(agent)
    assert await agent.spool.dead_letters() == []
    assert "HTTP 413" in up["last_error"] and "proxy" in up["last_error"], up["last_error"]
    await delivered_once_let_through(agent, gateway)


@pytest.mark.parametrize("protocol", HTTP_UPLINKS)
async def test_an_ack_labelled_text_html_is_an_ack(make_agent: Any, gateway: CaptiveUpstream,
                                                    protocol: str) -> None:
    """Express's `res.send(string)` labels a collector's JSON reply text/html: a JSON body
    is no login page, whatever its label (Segment's was retried, and resent, forever)."""
    gateway.ack_type = "text/html"
    agent = await start(make_agent, gateway, protocol)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    state = agent.forwarding.states["up"]
    assert state.retries == 0 and state.last_error is None


@pytest.mark.parametrize("body", [b"OK", b"", b"Accepted\n"])
async def test_a_segment_ack_of_plain_words_labelled_text_html_is_an_ack(
        make_agent: Any, gateway: CaptiveUpstream, body: bytes) -> None:
    """Express's `res.send("OK")` (or `res.send("")`) labels a collector's 200 text/html too:
    words without a single tag are no login page. It was taken for one, and the batch was
    sent again, and stored again by the collector, every backoff, for ever."""
    gateway.ack_type, gateway.segment_ack = "text/html", body
    agent = await start(make_agent, gateway, "segment-http")
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.depth == 0 or state.retries > 0, timeout=5)
    assert (state.retries, state.last_error) == (0, None)
    assert agent.spool.depth == 0
    assert sorted(ev["properties"]["mark"] for ev in gateway.delivered) == [
        f"mk-{i}" for i in range(N)]   # once each


async def test_a_nucleus_ack_labelled_text_html_is_an_ack(make_agent: Any,
                                                          gateway: CaptiveUpstream) -> None:
    """Express's `res.send(JSON.stringify({reportedIds}))` labels the reply text/html: a
    body that is a valid reply is one, whatever its label (it was refused forever)."""
    gateway.ack_type = "text/html"
    agent = await start(make_agent, gateway, "nucleus-http")
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    state = agent.forwarding.states["up"]
    assert state.retries == 0 and state.last_error is None
    assert {ev["payload"]["mark"] for ev in gateway.delivered} == {f"mk-{i}" for i in range(N)}


@pytest.mark.parametrize("protocol", ("segment-http", "nucleus-http", "nucleus-ws"))
async def test_a_redirect_to_a_location_with_an_empty_host_is_a_retried_failure(
        make_agent: Any, gateway: CaptiveUpstream, protocol: str) -> None:
    """A Location whose authority names no host (`aws://@`, `file://@`: the upstream's
    text) made yarl raise IndexError while the redirect's error was being worded: it
    escaped the send (and a websocket's connect) as a forwarder crash, at every retry."""
    gateway.intercept = redirect(302, "aws://@")
    agent = await start(make_agent, gateway, protocol)
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.crashes > 0 or state.retries >= 3)
    assert state.crashes == 0, state.last_error
    up = await held_while_failing(agent)
    assert "HTTP 302 redirect to an invalid Location" in up["last_error"]
    await delivered_once_let_through(agent, gateway)


@pytest.mark.parametrize("protocol", ("segment-http", "nucleus-http", "nucleus-ws"))
async def test_a_redirect_to_a_zone_not_utf8_leaves_status_readable(make_agent: Any,
                                                                    protocol: str) -> None:
    """A Location naming an IPv6 address whose zone holds a byte that is not UTF-8 (a
    portal's or proxy's garbage): aiohttp reads the byte as a lone surrogate, and yarl keeps
    the zone in the host it gives, so the redirect's error carried it into last_error, which
    orjson refuses: /status answered 500 for as long as the redirects went on, and the
    status page said "agent not answering", `outpost status` could not read the agent."""
    server = await _raw_upstream(b"HTTP/1.1 302 Found\r\nLocation: http://[fe80::1%25\xe9]:8080/x")
    try:
        port = server.sockets[0].getsockname()[1]
        scheme = "ws" if protocol == "nucleus-ws" else "http"
        agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol,
                                             "url": f"{scheme}://127.0.0.1:{port}",
                                             "flush_interval_s": 0.02, "timeout_s": 2}])
        await send(agent, [event(1)])
        state = agent.forwarding.states["up"]
        await wait_for(lambda: state.retries >= 1)
        up = await status_of(agent)
        assert "HTTP 302 redirect to [fe80::1%25\\xe9]:8080" in up["last_error"], up
        assert agent.spool.depth == 1 and state.acked == 0
    finally:
        server.close()


@pytest.mark.parametrize(("loc", "shown"), [
    ("http://guest:hunter22@[::1]:8080/login?session=sess-4411", "[::1]:8080"),
    ("https://portal.example/login?session=sess-4411", "portal.example"),
    ("/login?session=sess-4411", "api.example.com"),        # relative: the upstream's own host
    ("//other.example:81/login", "other.example:81"),
    (None, "nowhere (no Location header)"),
    ("http://[::1/login", "an invalid Location"),
    ("file://@", "an invalid Location"),   # yarl raised IndexError for its empty host
])
def test_location_host_shows_the_host_and_port_only(loc: str | None, shown: str) -> None:
    assert location_host(URL("https://api.example.com/v1/batch"), loc) == shown


class _FailsAtOnce:
    """An uplink that refuses its first sends without awaiting anything, as a redirect
    from a local portal does: the failure lands while the forwarder reads the spool."""

    name = "up"
    prepares_ahead = True

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sends = 0

    def connecting(self) -> None:
        return None

    def acknowledged(self, batch: Prepared) -> tuple[int, ...]:
        return ()

    def prepare(self, rows: list[Row]) -> Prepared:
        return as_prepared(rows)

    async def send(self, batch: Prepared) -> SendResult:
        self.sends += 1
        if self.sends <= self.failures:
            return Retry("HTTP 302 redirect to portal.example")
        return Acked(batch.seqs)

    async def close(self) -> None:
        return None


async def test_a_send_that_fails_at_once_is_retried(tmp_path: Path) -> None:
    """With batches pipelined (nucleus-ws), the loop reads the spool again while the first
    batch is out; that batch failing during the read must still lead to a retry."""
    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:
        await spool.append([Event("k", NUCLEUS, i, b'{"id":%d}' % i) for i in range(N)])
        cfg = UpstreamConfig(name="up", protocol="nucleus-ws", url="ws://127.0.0.1:9",
                             flush_interval_s=0.0)
        uplink = _FailsAtOnce(failures=2)
        loop = StreamForwarder(cfg, spool.streams["k"], spool, uplink,
                               UpstreamState("up", "nucleus-ws"), Metrics(), 4)
        task = asyncio.create_task(loop.run())
        # Before the fix the loop went idle after the first failure, waiting for new data.
        await wait_for(lambda: spool.depth == 0, timeout=5)
        assert uplink.sends == 3 and loop.state.retries == 2
        loop.stop()
        await asyncio.wait_for(task, 5)
    finally:
        await spool.close()
