"""Upstreams over TLS (`https://` segment-http, `wss://` nucleus-ws), as an operator runs them.

Each test generates its own certificate authority (tests/fakes/tls.py) and runs a real
`outpost run` trusting it the way an operator trusts a private CA: SSL_CERT_FILE, which
OpenSSL's default verify paths (and so the agent's client and `outpost doctor`) read.
The upstream is a real aiohttp server with that CA's certificate, or with one the agent
must refuse: another CA's, a self-signed one, an expired one, one for another host. A
refused certificate sends nothing and deletes nothing; /status, the log and `outpost
doctor` say why; once the server's certificate is fixed, everything is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.captive_portal import CaptiveUpstream, redirect
from tests.fakes.tls import TestCA, serve, server_context
from tests.waiting import run_outpost, wait_for

PROTOCOLS = ("segment-http", "nucleus-ws")
N = 5
MARKS = [f"mk-{i}" for i in range(N)]
SELF_SIGNED = Path(__file__).parent / "data" / "self-signed-tls.pem"


def event(i: int) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z", "payload": {"mark": f"mk-{i}"}}


def marks(up: CaptiveUpstream) -> list[str]:
    return [ev.get("payload", ev.get("properties", {})).get("mark") for ev in up.delivered]


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestCA:
    """The CA this machine trusts: SSL_CERT_FILE, for the agent and every `outpost`
    command the test runs."""
    authority = TestCA(tmp_path / "ca")
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.cert_file))
    return authority


@pytest.fixture
async def upstream(ca: TestCA) -> AsyncIterator[CaptiveUpstream]:
    """A correct upstream for every protocol over TLS, with a certificate of ``ca``'s for
    127.0.0.1; ``serve(up.tls, chain)`` changes what the next handshakes get."""
    fake = CaptiveUpstream()
    fake.tls = server_context(ca.issue())
    await fake.start()
    yield fake
    await fake.stop()


async def started(tmp_path: Path, agent_process: Callable[..., AgentProcess], url: str,
                  protocol: str, timeout_s: float = 2) -> AgentProcess:
    """`outpost run` forwarding to ``url``, with N events posted to it."""
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                          upstreams=[{"name": "up", "protocol": protocol, "url": url,
                                      "flush_interval_s": 0.02, "timeout_s": timeout_s}])
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start)
    async with aiohttp.ClientSession() as s, s.post(
            f"{agent.url}/app/app1/track", json={"data": [event(i) for i in range(N)]}) as r:
        assert r.status == 200, await r.text()
    return agent


async def status(agent: AgentProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/status") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
    up: dict[str, Any] = data["upstreams"][0]
    return up


async def failing(agent: AgentProcess, tries: int = 2) -> dict[str, Any]:
    """/status's upstream once ``tries`` sends failed, with nothing acknowledged."""
    async def failed() -> bool:
        up = await status(agent)
        assert up["acked"] == 0, up
        return bool(up["retries"] >= tries)
    await wait_for(failed)
    up = await status(agent)
    assert up["queue_depth"] == N, up
    return up


async def delivered(agent: AgentProcess, up: CaptiveUpstream) -> None:
    """Every event delivered, once each, and the queue empty: `outpost flush` first, as
    an operator would after fixing the upstream (no wait for the backoff)."""
    code, out = await run_outpost("flush", "--config", str(agent.config))
    assert code == 0, out

    async def empty() -> bool:
        return bool((await status(agent))["queue_depth"] == 0)
    await wait_for(empty)
    assert sorted(marks(up)) == MARKS, marks(up)
    assert (await status(agent))["acked"] == N


async def doctor_line(agent: AgentProcess) -> str:
    code, out = await run_outpost("doctor", "--config", str(agent.config))
    assert code == 0, out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("up ")]
    return line


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_events_are_delivered_over_tls_to_a_trusted_certificate(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], upstream: CaptiveUpstream,
        protocol: str) -> None:
    agent = await started(tmp_path, agent_process, upstream.url(protocol), protocol)

    async def empty() -> bool:
        return bool((await status(agent))["queue_depth"] == 0)
    await wait_for(empty)
    assert marks(upstream) == MARKS   # in order, once each
    up = await status(agent)
    assert up["acked"] == N and up["last_error"] is None, up
    assert "reachable" == (await doctor_line(agent)).split()[-1]
    assert agent.terminate() == 0
    assert marks(upstream) == MARKS


# Each refused certificate, and OpenSSL's words for it, which the operator is shown.
REFUSED: dict[str, tuple[Callable[[TestCA, Path], Path], str]] = {
    "another-ca": (lambda ca, tmp: TestCA(tmp / "other", "Other CA").issue(),
                   "unable to get local issuer certificate"),
    "self-signed": (lambda ca, tmp: SELF_SIGNED, r"self[- ]signed certificate"),
    "expired": (lambda ca, tmp: ca.issue(expired=True), "certificate has expired"),
    "wrong-host": (lambda ca, tmp: ca.issue("outpost.example"),
                   "IP address mismatch, certificate is not valid for '127.0.0.1'"),
}


@pytest.mark.parametrize("kind", REFUSED)
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_certificate_not_to_trust_sends_nothing_says_why_and_recovers_once_fixed(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        upstream: CaptiveUpstream, protocol: str, kind: str) -> None:
    chain, words = REFUSED[kind]
    assert upstream.tls is not None
    serve(upstream.tls, chain(ca, tmp_path))
    agent = await started(tmp_path, agent_process, upstream.url(protocol), protocol)
    up = await failing(agent)
    assert upstream.hits == [] and upstream.delivered == []   # no request got through
    said = re.compile(f"certificate verify failed: {words}")
    assert said.search(up["last_error"]), up["last_error"]
    assert said.search(agent.log.read_text()), agent.log.read_text()
    line = await doctor_line(agent)
    assert "TLS handshake failed" in line and re.search(words, line), line

    serve(upstream.tls, ca.issue())   # the server's certificate fixed
    await delivered(agent, upstream)
    assert agent.terminate() == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_reload_after_the_certificate_is_fixed_delivers_everything(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        upstream: CaptiveUpstream, protocol: str) -> None:
    """`systemctl reload outpost` once the server's certificate is renewed: the reload
    hands the kept events to new forwarders, which deliver them all, once each."""
    assert upstream.tls is not None
    serve(upstream.tls, ca.issue(expired=True))
    agent = await started(tmp_path, agent_process, upstream.url(protocol), protocol)
    await failing(agent)
    serve(upstream.tls, ca.issue())
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)

    async def empty() -> bool:
        return bool((await status(agent))["queue_depth"] == 0)
    await wait_for(empty)
    assert marks(upstream) == MARKS
    assert agent.terminate() == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_restart_after_the_ca_is_trusted_delivers_everything(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        upstream: CaptiveUpstream, protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other fix: the machine did not trust the upstream's CA. Once it does (here its
    SSL_CERT_FILE), a restart delivers everything the first run kept."""
    monkeypatch.setenv("SSL_CERT_FILE", str(TestCA(tmp_path / "other", "Other CA").cert_file))
    agent = await started(tmp_path, agent_process, upstream.url(protocol), protocol)
    up = await failing(agent)
    assert "unable to get local issuer certificate" in up["last_error"], up["last_error"]
    assert agent.terminate() == 0
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_file))
    await asyncio.to_thread(agent.start)
    await delivered(agent, upstream)
    assert marks(upstream) == MARKS
    assert agent.terminate() == 0


@contextlib.asynccontextmanager
async def silent_tls_port() -> AsyncIterator[tuple[int, asyncio.Queue[None]]]:
    """A port that accepts TCP connections and never answers a TLS handshake (a middlebox
    or a wedged server); each connection is put on the queue."""
    held: list[asyncio.StreamWriter] = []
    accepted: asyncio.Queue[None] = asyncio.Queue()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.put_nowait(None)
        with contextlib.suppress(ConnectionError):
            await reader.read()   # until the agent gives up on it

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        for writer in held:
            writer.close()
        server.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_tls_handshake_that_never_answers_times_out_and_is_retried(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        protocol: str) -> None:
    """Each try gives up after timeout_s and the next connects again: never stuck on one
    handshake. And an https:// url's error names the TLS handshake: it said only that the
    host `did not answer the connection (a firewall, or the host down ...)`, which this
    host did answer, sending the operator to look in the wrong place. (`outpost doctor`
    tells the two apart: it connects, then shakes hands.)"""
    scheme = "https" if protocol == "segment-http" else "wss"
    async with silent_tls_port() as (port, accepted):
        agent = await started(tmp_path, agent_process, f"{scheme}://127.0.0.1:{port}",
                              protocol, timeout_s=0.5)
        for _ in range(3):   # a connection for each try
            await asyncio.wait_for(accepted.get(), 15)
        up = await failing(agent)
        said = ("did not answer the connection or its TLS handshake"
                if protocol == "segment-http" else "no websocket handshake within 0.5s")
        assert said in up["last_error"], up["last_error"]
        line = await doctor_line(agent)
        assert "TLS handshake failed (no answer" in line, line
        assert agent.terminate() == 0


@contextlib.asynccontextmanager
async def tls_cutting_port(reset: bool) -> AsyncIterator[int]:
    """A port that takes each TCP connection, reads the TLS handshake's first message, and
    then ends the connection (a ``reset``, else a close) without answering it: a firewall
    that filters TLS by the name asked for, a load balancer with no certificate for it, a
    port forwarded to a server that is gone."""
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(512)   # the ClientHello, or its start
        if reset:
            writer.transport.abort()
        else:
            writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_tls_handshake_cut_by_the_far_end_says_so(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        protocol: str, reset: bool) -> None:
    """The host takes the connection and ends it as the TLS handshake starts: the events
    are kept and retried, and last_error says the handshake was cut. It said `Cannot
    connect to host 127.0.0.1:port ssl:default [None]` (aiohttp's words for a connection
    lost without an errno): "cannot connect" to a host that took every connection, and
    no reason at all, while `outpost doctor` said the host reachable."""
    scheme = "https" if protocol == "segment-http" else "wss"
    async with tls_cutting_port(reset) as port:
        agent = await started(tmp_path, agent_process, f"{scheme}://127.0.0.1:{port}",
                              protocol)
        error = (await failing(agent))["last_error"]
        assert "TLS handshake" in error and f"127.0.0.1:{port}" in error, error
        assert "Cannot connect" not in error and "None" not in error, error
        assert agent.terminate() == 0


@contextlib.asynccontextmanager
async def cutting_upstream(ca: TestCA) -> AsyncIterator[CaptiveUpstream]:
    """An upstream whose first answer (a Segment reply, a websocket's acks) is cut: the
    connection closed under it without TLS's close_notify. Then it answers as it should."""
    up = CaptiveUpstream()
    up.tls = server_context(ca.issue())
    cut = False

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal cut
        if cut:
            return await up._any(request)
        cut = True
        assert request.transport is not None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.receive()   # the frame, never acknowledged
        else:
            await request.read()
            reply = web.StreamResponse(headers={"Content-Type": "application/json"})
            reply.content_length = 100
            await reply.prepare(request)
            await reply.write(b'{"success": tr')
        request.transport.abort()   # no close_notify, no FIN after it
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    await up._serve(app)
    try:
        yield up
    finally:
        await up.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_connection_cut_without_close_notify_mid_answer_is_sent_again(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        protocol: str) -> None:
    """What was in flight is not acknowledged by half an answer: sent again, delivered."""
    async with cutting_upstream(ca) as up:
        agent = await started(tmp_path, agent_process, up.url(protocol), protocol)

        async def empty() -> bool:
            return bool((await status(agent))["queue_depth"] == 0)
        await wait_for(empty)
        assert marks(up) == MARKS   # delivered after the cut
        state = await status(agent)
        assert state["acked"] == N and state["retries"] >= 1, state
        assert agent.terminate() == 0


@pytest.mark.parametrize("status_code", [302, 307])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_redirect_over_https_is_never_followed(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ca: TestCA,
        upstream: CaptiveUpstream, protocol: str, status_code: int) -> None:
    """Even to a trusted https:// host: only the configured URL acknowledges events."""
    target = CaptiveUpstream()
    target.tls = server_context(ca.issue())
    await target.start()
    try:
        upstream.intercept = redirect(status_code, f"{target.url(protocol)}/v1/batch")
        agent = await started(tmp_path, agent_process, upstream.url(protocol), protocol)
        up = await failing(agent)
        assert f"HTTP {status_code} redirect to 127.0.0.1:{target.port}" in up["last_error"], \
            up["last_error"]
        assert target.hits == []
        upstream.intercept = None
        await delivered(agent, upstream)
        assert target.hits == []
        assert agent.terminate() == 0
    finally:
        await target.stop()

