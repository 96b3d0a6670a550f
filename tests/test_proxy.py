"""Upstreams reached through an explicit forward HTTP proxy (docs/operations.md).

A kiosk or a corporate laptop reaches the internet only through its proxy. The fake
upstream here has a name only the proxy resolves (`upstream.invalid`, which the proxy
maps to the upstream's 127.0.0.1 port: tests/fakes/forward_proxy.py), so an event
delivered went through the proxy, and a direct connection fails.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.logs import RedactingFilter
from agent.settings import UpstreamConfig
from agent.uplinks import proxy
from tests.conftest import free_port, write_config
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.forward_proxy import ForwardProxy
from tests.test_resume import get_json
from tests.test_upstream_faults import delivered, drained, event, manual, send
from tests.waiting import run_outpost, wait_for

HIDDEN = "invalid"   # a name no resolver answers (RFC 6761): the proxy's alone
SECRET = "pr0xyPassw0rd-7e1a"
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The agent's environment without the runner's own proxy settings."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


@pytest.fixture
async def gate(faulty: FaultyUpstream) -> AsyncIterator[ForwardProxy]:
    fake = await ForwardProxy(hosts={f"upstream.{HIDDEN}": ("127.0.0.1", faulty.port)}).start()
    yield fake
    await fake.stop()


def hidden(fake: FaultyUpstream, protocol: str, scheme: str | None = None, **kw: Any
           ) -> dict[str, Any]:
    """An upstream entry naming ``fake`` by the name only the proxy resolves."""
    scheme = scheme or ("ws" if protocol == "nucleus-ws" else "http")
    return {"name": "up", "protocol": protocol,
            "url": f"{scheme}://upstream.{HIDDEN}:{fake.port}", "flush_interval_s": 0.02,
            "timeout_s": 2, **kw}


class Seen:
    """The agent's log lines, redacted as its own handler writes them."""

    def __init__(self) -> None:
        self.text = io.StringIO()
        self.handler = logging.StreamHandler(self.text)
        self.handler.addFilter(RedactingFilter())

    def __enter__(self) -> Seen:
        logging.getLogger("outpost").addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("outpost").removeHandler(self.handler)

    def __str__(self) -> str:
        return self.text.getvalue()


PROTOCOLS = ["segment-http", "nucleus-ws", "nucleus-http"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_events_reach_an_upstream_only_the_proxy_can_reach(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch, protocol: str) -> None:
    environ.setenv("HTTP_PROXY", gate.url)
    agent = await make_agent(upstreams=[hidden(faulty, protocol)])
    await send(agent, [event(i) for i in range(3)])
    await drained(agent, faulty, 3)
    assert gate.through >= 1
    assert all(f"upstream.{HIDDEN}:{faulty.port}" in r for r in gate.requests), gate.requests
    assert agent.forwarding.states["up"].last_error is None


async def test_agent_toml_s_proxy_comes_before_the_environment_s(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch) -> None:
    """agent.toml's proxy wins over the environment's, which names no proxy at all here."""
    environ.setenv("http_proxy", "http://127.0.0.1:9")   # nothing listens on port 9
    agent = await make_agent(upstreams=[hidden(faulty, "segment-http", proxy=gate.url)])
    await send(agent, [event(i) for i in range(2)])
    await drained(agent, faulty, 2)
    assert gate.requests


@pytest.mark.parametrize("how", ["no_proxy", "empty-proxy"])
async def test_a_bypassed_upstream_is_connected_to_directly(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch, how: str) -> None:
    """NO_PROXY naming the upstream's domain, or its `proxy = ""`: the agent connects
    directly, and so cannot even resolve the name the proxy would have."""
    environ.setenv("HTTP_PROXY", gate.url)
    kw: dict[str, Any] = {}
    if how == "no_proxy":
        environ.setenv("NO_PROXY", f"localhost, .{HIDDEN}")
    else:
        kw["proxy"] = ""
    agent = await make_agent(upstreams=[hidden(faulty, "segment-http", **kw)])
    await send(agent, [event(0)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.last_error is not None and state.unreachable_since is not None)
    assert gate.through == 0 and not gate.refused
    assert "proxy" not in (state.last_error or ""), state.last_error
    assert agent.spool.depth == 1 and not faulty.requests


@pytest.mark.parametrize(("protocol", "scheme", "asked"), [
    ("segment-http", "http", "the request to"),
    ("segment-http", "https", "CONNECT"),
    ("nucleus-ws", "ws", "the handshake with"),
    ("nucleus-ws", "wss", "CONNECT"),
])
async def test_a_proxy_that_needs_credentials_is_named_with_its_407(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch, protocol: str, scheme: str, asked: str) -> None:
    gate.credentials = f"bob:{SECRET}"
    var = "HTTPS_PROXY" if scheme in ("https", "wss") else "HTTP_PROXY"
    environ.setenv(var, gate.url)
    agent = await make_agent(upstreams=[hidden(faulty, protocol, scheme)])
    await send(agent, [event(i) for i in range(2)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.retries >= 2)   # retried, with backoff
    error = state.last_error or ""
    assert f"proxy {gate.url} ({var})" in error, error
    assert "407" in error and "credentials" in error and asked in error, error
    assert f"upstream.{HIDDEN}:{faulty.port}" in error, error
    assert state.unreachable_since is None   # the proxy answered: reachable
    assert agent.spool.depth == 2 and await agent.spool.dead_letters() == []
    assert not faulty.requests


async def test_a_proxy_that_forbids_the_upstream_is_named_with_its_403(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch) -> None:
    gate.refuse = 403
    environ.setenv("https_proxy", gate.url)
    agent = await make_agent(upstreams=[hidden(faulty, "segment-http", "https")])
    await send(agent, [event(0)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.retries >= 1)
    error = state.last_error or ""
    assert f"proxy {gate.url} (https_proxy)" in error and "403" in error, error
    assert f"CONNECT upstream.{HIDDEN}:{faulty.port}" in error, error
    assert agent.spool.depth == 1 and await agent.spool.dead_letters() == []


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(("protocol", "scheme"), [("segment-http", "http"),
                                                  ("segment-http", "https"),
                                                  ("nucleus-ws", "ws"),
                                                  ("nucleus-ws", "wss")])
async def test_a_proxy_s_retry_after_is_honoured_whatever_the_url_s_scheme(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy, protocol: str,
        scheme: str, status: int) -> None:
    """A proxy that sheds load answers 429 or 503 with a Retry-After: to the request itself
    (http://, ws://), or to the CONNECT of an https:// or wss:// url's tunnel. The key waits
    it out, whichever: after a refused CONNECT it was sent again at the backoff's first
    step (half a second, then doubling), to a proxy that had asked for two minutes."""
    gate.refuse, gate.retry_after = status, "120"
    timing, seams = manual()
    agent = await make_agent(upstreams=[hidden(faulty, protocol, scheme, proxy=gate.url)],
                             seams=seams)
    await send(agent, [event(0)])
    await wait_for(lambda: timing.pending() == [120.0])
    state = agent.forwarding.states["up"]
    assert (state.last_error or "").endswith("; next try in 120s, as its Retry-After asks"), \
        state.last_error
    assert len(gate.refused) == 1 and not faulty.requests
    assert agent.spool.depth == 1 and await agent.spool.dead_letters() == []


@pytest.mark.parametrize("protocol", ["segment-http", "nucleus-ws"])
async def test_events_wait_while_the_proxy_is_down_and_go_when_it_is_back(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch, protocol: str) -> None:
    await gate.stop()   # its port kept: started again below
    environ.setenv("HTTP_PROXY", gate.url)
    with Seen() as seen:
        agent = await make_agent(upstreams=[hidden(faulty, protocol)])
        await send(agent, [event(i) for i in range(4)])
        state = agent.forwarding.states["up"]
        # Reachable means the proxy is: probed, not the upstream's name (which would not
        # resolve here, the proxy up or not).
        await wait_for(lambda: state.unreachable_since is not None and state.probes >= 2)
        error = state.last_error or ""
        assert f"proxy {gate.url} (HTTP_PROXY) unreachable" in error, error
        assert agent.spool.depth == 4 and await agent.spool.dead_letters() == []
        await gate.start()
        await drained(agent, faulty, 4)
    assert f"proxy {gate.url} (HTTP_PROXY) unreachable" in str(seen)
    assert set(delivered(faulty)) == {0, 1, 2, 3}


async def test_proxy_credentials_are_sent_and_never_shown(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gate.credentials = f"bob:{SECRET}"
    with Seen() as seen:
        agent = await make_agent(upstreams=[
            hidden(faulty, "segment-http", proxy=gate.url_with("bob", SECRET))])
        await send(agent, [event(i) for i in range(2)])
        await drained(agent, faulty, 2)
        status = await get_json(agent, "/status")
        metrics = await get_json(agent, "/metrics")
        page = await get_json(agent, "/")
    assert gate.auth_seen and all(a.startswith("Basic ") for a in gate.auth_seen)
    config = write_config(tmp_path / "doctor.toml", tmp_path / "doctor.db", upstreams=[
        hidden(faulty, "segment-http", proxy=gate.url_with("bob", SECRET))])
    code, doctor = await run_outpost("doctor", "--config", str(config))
    assert code == 0, doctor
    assert f"through proxy {gate.url} (agent.toml)" in doctor, doctor
    for text in (str(status), metrics, page, str(seen), doctor):
        assert SECRET not in text, text


async def test_proxy_errors_never_show_its_credentials(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch) -> None:
    gate.credentials = "bob:right-password"
    environ.setenv("HTTPS_PROXY", gate.url_with("bob", SECRET))   # the wrong one
    with Seen() as seen:
        agent = await make_agent(upstreams=[hidden(faulty, "nucleus-ws", "wss")])
        await send(agent, [event(0)])
        state = agent.forwarding.states["up"]
        await wait_for(lambda: state.retries >= 2)
        status = await get_json(agent, "/status")
    assert "407" in (state.last_error or "")
    assert "refused the credentials sent" in (state.last_error or ""), state.last_error
    for text in (str(status), str(seen), state.last_error or ""):
        assert SECRET not in text, text


async def test_doctor_tunnels_to_a_tls_upstream_through_the_proxy(
        faulty: FaultyUpstream, gate: ForwardProxy, tmp_path: Path) -> None:
    """CONNECT, then the TLS handshake through the tunnel: the fake answers it in plain
    text, which shows the tunnel reached it."""
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        hidden(faulty, "segment-http", "https", proxy=gate.url)])
    code, out = await run_outpost("doctor", "--config", str(config))
    assert code == 0, out
    assert f"through proxy {gate.url} (agent.toml): reachable, but its TLS handshake" in out, out
    assert gate.tunnels == [f"upstream.{HIDDEN}:{faulty.port}"]


@pytest.mark.parametrize(("value", "said"), [
    ("socks5://127.0.0.1:1080", "must be an http:// url"),
    (f"http://bob:{SECRET}@", "has no host"),
    (f"http://bob:{SECRET}@proxy.example:3128/path", "no path"),
    ("http://proxy.example:99999", "not a valid url"),
])
async def test_check_config_refuses_a_bad_proxy_url_in_one_line(
        tmp_path: Path, value: str, said: str) -> None:
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        {"name": "up", "protocol": "segment-http", "url": "https://api.example",
         "proxy": value}])
    code, out = await run_outpost("check-config", str(config))
    assert code != 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    assert "upstream[0].proxy" in lines[0] and said in lines[0], out
    assert SECRET not in out


def up(url: str, **kw: Any) -> UpstreamConfig:
    return UpstreamConfig(name="up", protocol="segment-http", url=url, **kw)


@pytest.mark.parametrize(("url", "env", "expected"), [
    ("https://api.example", {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128 (HTTPS_PROXY)"),
    ("wss://api.example", {"https_proxy": "p:8080", "HTTPS_PROXY": "http://q:1"},
     "http://p:8080 (https_proxy)"),
    ("http://api.example", {"HTTPS_PROXY": "http://p:3128"}, None),
    ("ws://api.example", {"HTTP_PROXY": "http://p"}, "http://p:80 (HTTP_PROXY)"),
    ("https://api.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, None),
    ("https://eu.api.example", {"HTTPS_PROXY": "http://p:1", "no_proxy": "api.example"}, None),
    ("https://notapi.example", {"HTTPS_PROXY": "http://p:1", "no_proxy": "api.example"},
     "http://p:1 (HTTPS_PROXY)"),
    ("https://10.1.2.3", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, None),
    ("https://api.example:8443", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example:443"},
     "http://p:1 (HTTPS_PROXY)"),
    ("https://localhost:8443", {"HTTPS_PROXY": "http://p:1"}, None),
    ("http://127.0.0.5:80", {"HTTP_PROXY": "http://p:1"}, None),
    ("http://[::1]:80", {"HTTP_PROXY": "http://p:1"}, None),
])
def test_which_proxy_the_environment_gives(url: str, env: dict[str, str],
                                           expected: str | None) -> None:
    chosen = proxy.configured(up(url), env)
    assert (None if chosen is None else chosen.shown.removeprefix("proxy ")) == expected


def test_agent_toml_proxy_comes_first_and_empty_means_direct() -> None:
    env = {"HTTPS_PROXY": "http://p:1"}
    chosen = proxy.configured(up("https://api.example", proxy="http://q:2"), env)
    assert chosen is not None and chosen.shown == "proxy http://q:2 (agent.toml)"
    assert proxy.configured(up("https://api.example", proxy=""), env) is None
    # Never for a loopback upstream, even when agent.toml names one.
    assert proxy.configured(up("http://127.0.0.1:9", proxy="http://q:2"), env) is None


async def test_an_unusable_proxy_in_the_environment_keeps_the_events(
        make_agent: Any, faulty: FaultyUpstream, environ: pytest.MonkeyPatch) -> None:
    environ.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")
    agent = await make_agent(upstreams=[hidden(faulty, "segment-http")])
    await send(agent, [event(0)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.last_error is not None)
    assert "HTTP_PROXY must be an http:// url" in (state.last_error or ""), state.last_error
    assert agent.spool.depth == 1 and await agent.spool.dead_letters() == []


NO_RESOLVER_TAKES = ["proxy..example", "a" * 64 + ".example"]


@pytest.mark.parametrize("host", NO_RESOLVER_TAKES)
async def test_a_proxy_host_no_resolver_takes_is_refused_in_agent_toml(
        tmp_path: Path, host: str) -> None:
    """A doubled dot, or a label over 63 characters, as the upstream's own url is refused:
    check-config took it, `outpost doctor` ended in a traceback (the IDNA codec's
    UnicodeError, not an OSError), and the forwarder crashed at each send."""
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        {"name": "up", "protocol": "segment-http", "url": "https://api.example",
         "proxy": f"http://bob:{SECRET}@{host}:3128"}])
    for command in (("check-config", str(config)), ("doctor", "--config", str(config))):
        code, out = await run_outpost(*command)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in out, out
        assert "upstream[0].proxy" in lines[0] and "no resolver takes" in lines[0], out
        assert SECRET not in out


@pytest.mark.parametrize("host", NO_RESOLVER_TAKES)
async def test_a_proxy_host_no_resolver_takes_in_the_environment_keeps_the_events(
        make_agent: Any, faulty: FaultyUpstream, environ: pytest.MonkeyPatch,
        tmp_path: Path, host: str) -> None:
    environ.setenv("HTTP_PROXY", f"http://{host}:3128")
    agent = await make_agent(upstreams=[hidden(faulty, "segment-http")])
    await send(agent, [event(0)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.last_error is not None)
    assert "HTTP_PROXY has a host no resolver takes" in (state.last_error or ""), \
        state.last_error
    assert agent.spool.depth == 1 and await agent.spool.dead_letters() == []
    # doctor names it on the upstream's line, as any unusable proxy of the environment.
    code, out = await run_outpost("doctor", "--config", str(tmp_path / "agent0.toml"))
    assert code == 0 and "Traceback" not in out, out
    assert "not sent: HTTP_PROXY has a host no resolver takes" in out, out


def _tls_files(where: Path) -> tuple[Path, Path]:
    """A CA (the agent's trust store: SSL_CERT_FILE) and a certificate it signed for the
    hidden name, with its key (the upstream's)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def made(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = made("outpost test CA", ca_key, "outpost test CA", ca_key, True)
    cert = made(f"upstream.{HIDDEN}", key, "outpost test CA", ca_key, False)
    ca_file, chain = where / "ca.pem", where / "upstream.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_file, chain


class TlsUpstream(FaultyUpstream):
    """The faulty upstream, answering only TLS, with a certificate for the hidden name."""

    def __init__(self, chain: Path) -> None:
        super().__init__()
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(chain)

    async def _serve(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        self.port = int(self._runner.addresses[0][1])


@pytest.mark.parametrize(("protocol", "scheme"), [("segment-http", "https"),
                                                  ("nucleus-ws", "wss")])
async def test_events_reach_a_tls_upstream_through_a_connect_tunnel(
        tmp_path: Path, agent_process: Any, environ: pytest.MonkeyPatch,
        protocol: str, scheme: str) -> None:
    """The agent as the service runs it, its proxy and trust store from its environment."""
    ca_file, chain = _tls_files(tmp_path)
    upstream = await TlsUpstream(chain).start()
    gate = await ForwardProxy(hosts={f"upstream.{HIDDEN}": ("127.0.0.1", upstream.port)},
                              credentials=f"bob:{SECRET}").start()
    try:
        port = free_port()
        config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                              upstreams=[hidden(upstream, protocol, scheme)])
        agent = agent_process(config, port, env={
            "SSL_CERT_FILE": str(ca_file), "HTTPS_PROXY": gate.url_with("bob", SECRET),
            "NO_PROXY": "localhost"}).start()
        await send(agent, [event(i) for i in range(3)])
        await wait_for(lambda: set(delivered(upstream)) == {0, 1, 2}, 20)
        assert gate.tunnels and all(t == f"upstream.{HIDDEN}:{upstream.port}"
                                    for t in gate.tunnels)
        assert agent.terminate() == 0
        assert SECRET not in agent.log.read_text()
    finally:
        await gate.stop()
        await upstream.stop()


@pytest.mark.parametrize("protocol", ["segment-http", "nucleus-ws"])
async def test_a_reload_that_gives_or_takes_an_upstream_s_proxy_applies_it(
        make_agent: Any, faulty: FaultyUpstream, gate: ForwardProxy,
        environ: pytest.MonkeyPatch, protocol: str) -> None:
    """agent.toml's proxy is the upstream's own: a SIGHUP that adds or removes it starts the
    upstream afresh with it (an open websocket that went direct is not kept)."""
    agent = await make_agent(upstreams=[hidden(faulty, protocol)])
    await send(agent, [event(0)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.unreachable_since is not None)   # direct: no such name
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[hidden(faulty, protocol, proxy=gate.url)])
    await agent.reload()
    await drained(agent, faulty, 1)
    through = gate.through
    assert through >= 1
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[hidden(faulty, protocol, proxy="")])
    await agent.reload()
    await send(agent, [event(1)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.unreachable_since is not None)
    assert gate.through == through and agent.spool.depth == 1


async def test_doctor_names_a_proxy_port_that_answers_connect_in_another_protocol(
        tmp_path: Path) -> None:
    """The proxy's port mistyped, a Redis or SMTP server's instead: it answers each line of
    the CONNECT with its own error and holds the connection. Doctor said the proxy "did not
    answer", as for a proxy that is silent or slow, when it answered, and not in HTTP."""
    held = asyncio.Event()

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line.strip():
                writer.write(b"-ERR unknown command\r\n")
        await held.wait()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
            {"name": "up", "protocol": "segment-http", "url": f"https://upstream.{HIDDEN}",
             "proxy": f"http://127.0.0.1:{port}"}])
        _, out = await run_outpost("doctor", "--config", str(config))
    finally:
        held.set()
        server.close()
    assert f"the proxy gave no HTTP answer to CONNECT upstream.{HIDDEN}:443" in out, out
