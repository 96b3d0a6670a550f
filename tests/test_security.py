"""No one gets in: Host (DNS rebinding), Origin (CORS), accept_keys, file modes, secrets in logs,
loopback-only listening (docs/security.md says what each refusal looks like).

Every ingest route is reached through the dialect registry's example requests
(agent/dialects/registry.py): each dialect's examples must reach every one of its routes,
so a new dialect or route is checked here without this file knowing it.

- a Host that is not a loopback name is refused with 421 Misdirected Request on every
  route, websocket upgrades included, and stores nothing;
- a browser Origin not in listen.allowed_origins is refused with 403 on every route,
  preflights included; an allowed Origin gets the CORS headers;
- listen.accept_keys is enforced on every ingest route, websockets included;
- a dialect added to the registry (one module, one line) is served, guarded and keyed;
- the spool directory is 0700 and its files 0600, whatever the umask;
- the agent's log, across requests carrying write keys every way the APIs allow and an
  upstream that fails and echoes its request, shows none of the keys;
- the default config listens on loopback only; any other address logs a warning.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from agent.dialects import registry
from agent.dialects.auth import basic
from agent.dialects.base import Dialect, Example
from agent.logs import setup_logging
from agent.server.guard import Guard, is_loopback_name
from agent.settings import ListenConfig
from tests.conftest import AgentProcess, free_port, write_config
from tests.dialect_examples import as_http, examples, other_routes, served_by_examples
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.threaded_agent import ThreadedAgent
from tests.test_dead_export_target import post_event
from tests.test_routes import raw_reply
from tests.waiting import wait_for

GOOD, BAD = "goodWriteKey1", "badWriteKey2"
ALLOWED = "https://app.example"
Request = tuple[str, str, bytes | None, dict[str, str]]


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[ThreadedAgent]:
    with ThreadedAgent(tmp_path, listen={"accept_keys": [GOOD], "allowed_origins": [ALLOWED]}) \
            as agent:
        yield agent


def test_every_route_of_every_dialect_has_an_example(guarded: ThreadedAgent) -> None:
    """The checks below send the registry's examples: a route without one would go
    unchecked, so a new route must come with its example."""
    assert guarded.agent is not None and guarded.agent.sink is not None
    assert len(registry.DIALECTS) >= 5
    for dialect in registry.DIALECTS:
        every, reached = served_by_examples(dialect, guarded.agent.sink)
        assert every and every == reached, (dialect.name, every - reached)
    assert ("GET", "/healthz") in other_routes(guarded)


# -- Host: DNS rebinding ------------------------------------------------------------------------

EVIL_HOSTS = ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "192.168.1.5",
              "0.0.0.0", "[2001:db8::1]:80", "localhost.evil.example", "", "127.0.0.1 evil",
              # Not a host and a port (audit: each was read as the loopback name before it).
              "127.0.0.1:8765@evil.example", "localhost:abc", "localhost:99999", "[::1",
              "[::1]x", "localhost:80:80", "localhost..", "localhost..:8765", "127.0.0.1.",
              "[::ffff:10.0.0.7]:8765", "[::ffff:192.168.1.5]",
              # A name as a browser may write it: upper case, fully qualified (trailing dot);
              # the unspecified address, which reaches loopback from a web page ("0.0.0.0 day");
              # two hosts joined as a proxy joins repeated fields.
              "EVIL.EXAMPLE:8765", "evil.example.", "evil.example.:8765", "[::]:8765",
              "localhost:8765, evil.example"]
# With a trailing dot: the fully qualified form of a name (`http://localhost.:8765/`),
# which browsers and resolvers serve as the name. An IPv4-mapped IPv6 literal of a
# loopback address is one too.
GOOD_HOSTS = ["127.0.0.1", "127.0.0.1:8765", "localhost", "LOCALHOST:1", "[::1]:8765",
              "127.5.6.7", "app.localhost", "localhost.", "localhost.:8765", "app.localhost.",
              "[::ffff:127.0.0.1]:8765", "[::ffff:7f00:1]"]


def test_loopback_names() -> None:
    assert all(is_loopback_name(h) for h in GOOD_HOSTS)
    assert not any(is_loopback_name(h) for h in EVIL_HOSTS if h)


@pytest.mark.parametrize("listen", ["fe80::1%eth0", "[fe80::1%eth0]", "192.168.1.5"])
def test_a_listen_host_lets_in_its_own_address_and_nothing_malformed(listen: str) -> None:
    """A scoped IPv6 listen host was read as no host at all (''), which then matched every
    malformed Host and made any IP literal one (review)."""
    guard = Guard(listen, ())
    own = "[fe80::1]:8765" if "fe80" in listen else "192.168.1.5:8765"
    assert guard.host_ok(own) and guard.host_ok("localhost:8765")
    for host in ("127.0.0.1:8765@evil.example", "evil.example:abc", "10.0.0.7", "[::1",
                 "evil.example"):
        assert not guard.host_ok(host), host


def every_request(agent: ThreadedAgent, examples: list[Example]) -> list[Request]:
    """The examples as plain HTTP requests, then every other route of the app (operations)."""
    return [as_http(ex) for ex in examples] + [
        (method, path, b"{}" if method == "POST" else None, {})
        for method, path in other_routes(agent)]


def check_hosts(agent: ThreadedAgent, requests: list[Request]) -> None:
    for host in EVIL_HOSTS:
        for method, path, body, headers in requests:
            before = agent.depth
            status, _, reply = agent.request(method, path, body, {**headers, "Host": host})
            assert status == 421, (host, method, path, status)
            assert b"loopback" in reply
            assert agent.depth == before


def test_a_non_loopback_host_is_refused_with_421_on_every_route(guarded: ThreadedAgent) -> None:
    check_hosts(guarded, every_request(guarded, examples(GOOD)))
    for host in GOOD_HOSTS:
        assert guarded.request("GET", "/healthz", headers={"Host": host})[0] == 200


def raw_status(agent: ThreadedAgent, head: bytes, body: bytes) -> bytes:
    """The status code of one request written as it is (http.client writes one Host)."""
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(head + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        with sock.makefile("rb") as reply:
            return reply.readline().split(b" ")[1]


def test_two_hosts_or_an_absolute_target_naming_a_foreign_host_store_nothing(
        guarded: ThreadedAgent) -> None:
    """A browser sends one Host, the name it asked for, and an origin-form target: a request
    that gives two Hosts (which one counts would be a parser's choice) is refused whatever
    their order, and one in absolute form (as to a proxy) is judged by its Host and by the
    target's authority, which HTTP/1.1 puts in the Host's place (RFC 9112 §3.2.2): a foreign
    authority under a loopback Host was let in."""
    method, path, body, headers = as_http(examples(GOOD)[0])
    assert body is not None
    fields = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
    for hosts in (("localhost", "evil.example"), ("evil.example", "localhost")):
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), path.encode()) + fields + b"".join(
            b"Host: %s\r\n" % h.encode() for h in hosts)
        assert raw_status(guarded, head, body) == b"400", hosts
    for authority, host in (("evil.example", "evil.example"), ("evil.example", "127.0.0.1"),
                            ("127.0.0.1@evil.example", "127.0.0.1"),
                            ("127.0.0.1", "evil.example")):
        status, _, reply = guarded.request(method, f"http://{authority}{path}", body,
                                           {**headers, "Host": host})
        assert status == 421 and b"loopback" in reply and b"evil.example" in reply, \
            (authority, host, reply)
    assert guarded.depth == 0
    status, _, reply = guarded.request(method, f"http://127.0.0.1:{guarded.port}{path}", body,
                                       {**headers, "Host": "localhost"})
    assert status < 300 and guarded.depth == 1, reply


async def ws_status(agent: ThreadedAgent, ex: Example, headers: dict[str, str] | None = None,
                    origin: str | None = None) -> int:
    """101 once the frame of websocket example ``ex`` is stored, else the handshake's
    refusal status."""
    before = agent.depth
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(f"http://127.0.0.1:{agent.port}{ex.path}",
                                    headers={**ex.headers, **(headers or {})},
                                    origin=origin) as ws:
                assert ex.body is not None
                await ws.send_bytes(ex.body)
                await wait_for(lambda: agent.depth == before + 1)
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            assert agent.depth == before
            return exc.status


def test_a_websocket_upgrade_with_a_foreign_host_is_refused(guarded: ThreadedAgent) -> None:
    for ex in examples(GOOD):
        if ex.websocket:
            assert asyncio.run(ws_status(guarded, ex, headers={"Host": "evil.example:80"})) \
                == 421, ex.path
            assert asyncio.run(ws_status(guarded, ex, headers={"Host": "localhost"})) == 101


# -- Origin: CORS --------------------------------------------------------------------------------

FOREIGN_ORIGINS = ["https://evil.example", "null", "https://app.example.evil.example",
                   "http://app.example", "https://app.example:8443",
                   # An allowed origin's case is no other site, but a path makes it no origin;
                   # a page on this machine's other port is another origin.
                   "HTTPS://EVIL.EXAMPLE", "https://app.example/evil", "http://localhost:3000"]


def check_origins(agent: ThreadedAgent, examples: list[Example]) -> None:
    """Foreign origins are refused, preflights included; an allowed one gets CORS headers."""
    for ex in examples:
        method, path, body, headers = as_http(ex)
        for origin in FOREIGN_ORIGINS:
            before = agent.depth
            status, h, _ = agent.request(method, path, body, {**headers, "Origin": origin})
            assert status == 403 and "access-control-allow-origin" not in h, (path, origin)
            assert agent.depth == before
            status, h, _ = agent.request("OPTIONS", path, None, {
                "Origin": origin, "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "content-type"})
            assert status == 403 and "access-control-allow-origin" not in h, (path, origin)
        if ex.websocket:
            continue    # CORS does not apply: test_a_websocket_from_a_foreign_origin_...
        for origin in (ALLOWED, ALLOWED + "/", "HTTPS://APP.EXAMPLE"):
            status, h, _ = agent.request("OPTIONS", path, None, {
                "Origin": origin, "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "content-type, authorization"})
            assert status == 204, (path, origin)
            assert h["access-control-allow-origin"] == origin
            assert method in h["access-control-allow-methods"]
            assert "content-type" in h["access-control-allow-headers"].lower()
            assert "origin" in h["vary"].lower()
        status, h, _ = agent.request(method, path, body, {**headers, "Origin": ALLOWED})
        assert 200 <= status < 300 and h["access-control-allow-origin"] == ALLOWED, path


def test_origins_not_allowed_are_refused_with_403_allowed_ones_get_cors_headers(
        guarded: ThreadedAgent) -> None:
    check_origins(guarded, examples(GOOD))


def test_a_websocket_from_a_foreign_origin_is_refused(guarded: ThreadedAgent) -> None:
    """Cross-site websocket hijacking: browsers send Origin on upgrades, and CORS does not
    apply to websockets, so the Origin check is the only guard."""
    for ex in examples(GOOD):
        if ex.websocket:
            assert asyncio.run(ws_status(guarded, ex, origin="https://evil.example")) == 403
            assert asyncio.run(ws_status(guarded, ex, origin=ALLOWED)) == 101


# -- accept_keys ----------------------------------------------------------------------------


def check_keys(agent: ThreadedAgent, dialects: tuple[Dialect, ...]) -> None:
    """Each example with a key not accepted stores nothing; with an accepted one it gets in,
    so the refusal was the key's."""
    for dialect in dialects:
        for bad, good in zip(dialect.examples(BAD), dialect.examples(GOOD), strict=True):
            before = agent.depth
            if bad.websocket:
                assert asyncio.run(ws_status(agent, bad)) == 401, bad.path
                assert asyncio.run(ws_status(agent, good)) == 101, good.path
                continue
            status, headers, reply = agent.request(*as_http(bad))
            # An API that must answer 200 whatever happens (the pixel) says why in a header.
            assert status == 401 or "x-outpost-error" in headers, (bad.path, status, reply[:200])
            # ...and the refusal says why (review: "unknown", "invalid", nothing more).
            why = reply if status == 401 else headers["x-outpost-error"].encode()
            assert b"listen.accept_keys" in why, (bad.path, why[:300])
            assert agent.depth == before, bad.path
            status, headers, reply = agent.request(*as_http(good))
            assert 200 <= status < 300 and "x-outpost-error" not in headers, (
                good.path, status, reply[:200], headers.get("x-outpost-error"))
            assert agent.depth == before + 1, good.path


def test_accept_keys_is_enforced_on_every_ingest_route(guarded: ThreadedAgent) -> None:
    check_keys(guarded, registry.DIALECTS)


@pytest.mark.parametrize("method,path,headers,body", [
    ("POST", "/app/a%01b/track", {}, {"data": [{"name": "e", "id": 1}]}),
    ("POST", "/app/a%0Ab/track", {}, {"data": [{"name": "e", "id": 1}]}),
    ("POST", "/v1/track", {"Authorization": basic("a\x01b")}, None),
    ("POST", "/v1/track?writeKey=a%0Ab", {}, None),
    ("POST", "/v1/track", {}, {"userId": "u", "event": "e", "writeKey": "a\tb"}),
    ("POST", "/v1/batch", {}, {"batch": [{"type": "track", "userId": "u", "event": "e",
                                          "writeKey": "a\x7fb"}]}),
    # (Keys in plain headers, as capture and Tranthor take them, cannot carry control
    # characters from aiohttp's client; their refusals say why in check_keys.)
    ("POST", "/track", {"Authorization": basic("a\x01b")},
     {"hitId": "h", "event": {"name": "e"}}),
])
async def test_a_key_with_control_characters_is_refused(
        make_agent: Any, method: str, path: str, headers: dict[str, str], body: Any) -> None:
    """With any key accepted, keys holding control characters were stored and sent upstream
    (audit): a line break in a key is a line of the key's own in every log line naming it."""
    agent = await make_agent()
    async with aiohttp.ClientSession() as s, s.request(
            method, f"http://127.0.0.1:{agent.port}{path}", headers=headers,
            json=body or {"userId": "u", "event": "e"}) as r:
        reply = await r.text()
        assert r.status == 401, reply
    assert "control character" in reply, reply   # says why (review)
    assert agent.spool.depth == 0


@pytest.mark.parametrize("path,field,body", [
    ("/v1/capture", "X-Write-Key", b'{"batch": [{"type": "track", "event": "e", "userId": "u"}]}'),
    ("/api/public/apps/track", "PublicWriteKey",
     b'{"event": "e", "userId": "u", "messageId": "m-1"}'),
], ids=["capture", "tranthor"])
async def test_a_header_key_in_another_encoding_is_refused_saying_so(
        make_agent: Any, path: str, field: str, body: bytes) -> None:
    """A key header holding a byte of no UTF-8 (Latin-1's "caf\xe9") was refused as one that
    "holds a control character": it holds none, and the app's developer looked for one."""
    agent = await make_agent()
    head, reply = await raw_reply(agent.port, (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n").encode() + field.encode() + b": caf\xe9\r\n\r\n"
        + body)
    assert head.startswith(b"HTTP/1.1 401 "), head + reply
    assert b"control character" not in reply and b"UTF-8" in reply, reply
    assert agent.spool.depth == 0


@pytest.mark.parametrize("char,kind", [
    ("\u00a0", "space"),            # a no-break space: a key copied from a web page
    ("\u3000", "space"),            # an ideographic space
    ("\u200b", "format"),           # a zero-width space: a key copied from a chat
    ("\u202e", "format"),           # a right-to-left override
    ("\u2028", "separator"),        # a line separator
    ("\ue000", "private-use"),
], ids=["nbsp", "ideographic-space", "zwsp", "rlo", "line-separator", "private-use"])
@pytest.mark.parametrize("path,field,body", [
    ("/v1/capture", "X-Write-Key", b'{"batch": [{"type": "track", "event": "e", "userId": "u"}]}'),
    ("/app/{}/track", None, b'{"data": [{"name": "e", "id": 1}]}'),
    ("/v1/track", "Authorization", b'{"userId": "u", "event": "e"}'),
], ids=["capture", "nucleus", "segment"])
async def test_a_key_with_a_character_that_is_no_control_character_is_refused_naming_it(
        make_agent: Any, path: str, field: str | None, body: bytes, char: str,
        kind: str) -> None:
    """A key holding a character that is not printable but no control character (a no-break
    space, a zero-width space, a bidi override) was refused as one that "holds a control
    character": it holds none, and the app's developer looked for one. The refusal names the
    character, by its code point (invisible, or shown as a space, in any text), and its kind."""
    agent = await make_agent()
    key = f"ab{char}cd"
    fields = ""
    if field == "Authorization":
        fields = f"Authorization: {basic(key)}\r\n"
    elif field is not None:
        fields = f"{field}: {key}\r\n"
    target = path.format(quote(key, safe=""))
    head, reply = await raw_reply(agent.port, (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{fields}\r\n").encode() + body)
    assert head.startswith(b"HTTP/1.1 401 "), head + reply
    text = reply.decode()
    assert "control character" not in text, text
    assert f"U+{ord(char):04X}" in text and kind in text, text
    assert agent.spool.depth == 0


async def test_a_nucleus_websocket_for_a_key_with_control_characters_is_refused(
        make_agent: Any) -> None:
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"http://127.0.0.1:{agent.port}/app/a%0Db/track")
    assert refused.value.status == 401


# -- files ----------------------------------------------------------------------------------------


def test_spool_is_private_whatever_the_umask(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The spool's files are 0600 whatever the umask. The directory holding them already
    existed: it keeps its mode, as documented (audit: it was made 0700, so that
    storage.path = "~/outpost.db" changed the home directory's mode), and the log says
    that others can list it."""
    where = tmp_path / "data"
    where.mkdir(mode=0o755)
    caplog.set_level(logging.WARNING)
    old = os.umask(0)
    try:
        with ThreadedAgent(tmp_path, spool=where / "spool.db") as agent:
            status, _, _ = agent.request("POST", "/app/k1/track",
                                         b'{"data":[{"name":"e","id":1}]}')
            assert status == 200
            assert stat.S_IMODE(where.stat().st_mode) == 0o755
            for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
                assert stat.S_IMODE((where / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)
    assert any(str(where) in r.getMessage() and "other users" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_spool_left_with_wider_modes_is_made_private_wal_and_shm_too(tmp_path: Path) -> None:
    """A spool whose files every user can read (a backup restored without its modes, a
    copy by another tool), left with a -wal still holding events (a crash, a power cut):
    each is made 0600 at start. Before the fix only the spool itself was: SQLite keeps the
    mode of a -wal that has content, so the queue went on being written, for the whole
    run, into a -wal (and -shm) that every user could read."""
    made, where = tmp_path / "made", tmp_path / "data"
    where.mkdir(mode=0o700)
    with ThreadedAgent(tmp_path, spool=made / "spool.db") as agent:
        status, _, _ = agent.request("POST", "/app/k1/track", b'{"data":[{"name":"e","id":1}]}')
        assert status == 200
        for name in ("spool.db", "spool.db-wal", "spool.db-shm"):   # as a crash leaves them
            (where / name).write_bytes((made / name).read_bytes())
            (where / name).chmod(0o644)
    assert (where / "spool.db-wal").stat().st_size > 0
    with ThreadedAgent(tmp_path, spool=where / "spool.db") as agent:
        assert agent.depth == 1   # the event the -wal held
        for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
            assert stat.S_IMODE((where / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize("found", [False, True])
def test_the_log_file_is_private_whatever_the_umask(tmp_path: Path, found: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With no stderr (pythonw, or `outpost run` started with it closed) the agent logs to
    outpost.log in its data directory. The file was made with the umask's mode (0644 under
    022), and one found with a wider mode kept it: every user could read what is logged."""
    data = tmp_path / "data"
    log = data / "outpost" / "outpost.log"
    if found:
        log.parent.mkdir(parents=True, mode=0o700)
        log.write_text("an earlier run's lines\n")
        log.chmod(0o644)
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.setenv("OUTPOST_SYSTEM", "0")
    old = os.umask(0o022)
    try:
        with monkeypatch.context() as no_stderr:
            no_stderr.setattr(sys, "stderr", None)   # what Python gives when fd 2 is closed
            setup_logging("info")
        logging.getLogger("outpost").info("a line")
    finally:
        os.umask(old)
        setup_logging("info", stream=io.StringIO())   # closes the file
    assert "a line" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_directories_made_for_a_new_spool_are_private(tmp_path: Path) -> None:
    """A storage.path whose directories do not exist yet: each one the agent makes is
    0700, not only the last (the XDG rule). Before the fix the outer ones were made with
    the umask's 0755. A directory that already existed is left as it was."""
    tmp_path.chmod(0o755)
    old = os.umask(0o022)
    try:
        with ThreadedAgent(tmp_path, spool=tmp_path / "new" / "deeper" / "spool.db") as agent:
            status, _, _ = agent.request("POST", "/app/k1/track",
                                         b'{"data":[{"name":"e","id":1}]}')
            assert status == 200
    finally:
        os.umask(old)
    for made in (tmp_path / "new", tmp_path / "new" / "deeper"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_the_directory_a_linked_spool_resolves_to_is_made_private(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """storage.path a symlink to a spool on another disk, linked before the first start
    (the directory it names there not made yet). The agent made the link's directory,
    which was there, and the lock file then made the one the spool goes in with the
    umask's mode: 0777 under 000, so that every user could delete, rename or plant files
    beside the spool, and no warning named it. It is made 0700, as any the agent makes."""
    real = tmp_path / "disk" / "outpost" / "spool.db"
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(real)
    port = free_port()
    old = os.umask(0)
    try:
        agent = agent_process(write_config(tmp_path / "agent.toml", link, port=port), port)
        agent.start()
    finally:
        os.umask(old)
    post_event(port)
    assert agent.terminate() == 0
    for made in (real.parent.parent, real.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    for name in ("spool.db", "spool.db.lock"):
        assert stat.S_IMODE((real.parent / name).stat().st_mode) == 0o600, name


async def test_a_linked_spool_s_directory_others_can_write_to_is_warned_of(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """storage.path a symlink, in a private directory, to a spool in one every user may
    write to. The start warns of a spool's directory others can see into: it looked at
    the link's, not the one the spool's files are in, and said nothing of it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(shared / "spool.db")
    caplog.set_level(logging.WARNING)
    await make_agent(spool=link)
    assert any(str(shared) in r.getMessage() and "writable by other users" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_a_spool_s_directory_named_through_a_linked_directory_is_warned_of_once(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A storage.path whose directory is named through a symlinked one (/var/lib a link
    to /data, say), not a link itself: one directory, one warning."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (tmp_path / "alias").symlink_to(shared)
    caplog.set_level(logging.WARNING)
    await make_agent(spool=tmp_path / "alias" / "spool.db")
    said = [r.getMessage() for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(said) == 1, said


def test_a_lock_file_left_with_wider_modes_is_made_private(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A spool's directory restored from a backup without its modes, the lock file 0644
    among them. It stayed so: where others may search the directory (its mode, said in the
    log), any user could open it and hold a lock on it (flock needs no write access), and
    the next `outpost run` refused to start, "in use by another agent". It is made 0600
    at the start, as the spool's -wal and -shm are."""
    where = tmp_path / "data"
    where.mkdir(mode=0o700)
    lock = where / "spool.db.lock"
    lock.touch()
    lock.chmod(0o644)
    port = free_port()
    agent = agent_process(write_config(tmp_path / "agent.toml", where / "spool.db", port=port),
                          port).start()
    post_event(port)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert agent.terminate() == 0


# -- secrets in logs ------------------------------------------------------------------------

SECRETS = {
    # One key per dialect, sent the ways its examples carry it.
    **{d.name: f"{d.name}KeySecret{i:03d}" for i, d in enumerate(registry.DIALECTS)},
    "upstream": "upstreamKeySecret007", "refused": "refusedKeySecret009",
    "full": "spoolFullKeySecret010",
    "wsapp": "wsRoutedAppSecret012",
}


def scan_for_secrets(text: str) -> list[str]:
    leaks = []
    for name, secret in SECRETS.items():
        for form in (secret, base64.b64encode(f"{secret}:".encode()).decode(),
                     base64.b64encode(secret.encode()).decode().rstrip("=")):
            if form in text:
                leaks.append(f"{name}: {form}")
    return leaks


async def test_write_keys_never_reach_the_log(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    fake = await FaultyUpstream().start()
    # The upstream refuses everything, echoing the request (its path holds the key).
    fake.script = [Fault("status", 400, echo=True) for _ in range(40)] + \
        [Fault("status", 401, echo=True) for _ in range(200)]
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                       storage={"max_size_mb": 1}, upstreams=[
                           {"name": "ws", "protocol": "nucleus-ws", "keys": [SECRETS["wsapp"]],
                            "url": fake.ws_url,
                            "flush_interval_s": 0.05, "timeout_s": 2},
                           {"name": "up", "protocol": "nucleus-http", "url": fake.http_url,
                            "key": SECRETS["upstream"], "flush_interval_s": 0.05,
                            "timeout_s": 2}])
    with open(cfg, "a") as fh:
        fh.write('[log]\nlevel = "debug"\n')
    agent = agent_process(cfg, port)
    s = SECRETS
    try:
        await asyncio.to_thread(agent.start)
        base = agent.url
        async with aiohttp.ClientSession() as session:
            async def send(method: str, path: str, **kw: Any) -> int:
                async with session.request(method, base + path, **kw) as r:
                    await r.read()
                    return r.status
            nucleus = {"data": [{"name": "e", "id": 1, "sessionId": 1}]}
            assert await send("POST", f"/app/{s['nucleus']}/track", json=nucleus) == 200
            # Forwarded over a websocket (credentials in URLs: tests/test_url_credentials.py).
            assert await send("POST", f"/app/{s['wsapp']}/track", json=nucleus) == 200
            async with session.ws_connect(f"{base}/app/{s['nucleus']}/track") as ws:
                await ws.send_json({"data": [{"name": "w", "id": 2}]})
                await ws.receive_json(timeout=5)
                await ws.send_str("not json")        # closed for a bad frame: logged?
                await ws.receive(timeout=5)
            for dialect in registry.DIALECTS:
                for ex in dialect.examples(s[dialect.name]):
                    if not ex.websocket:
                        assert 200 <= await send(ex.method, ex.path, data=ex.body,
                                                 headers=ex.headers) < 300, ex.path
                        continue
                    async with session.ws_connect(base + ex.path, headers=ex.headers) as ws:
                        assert ex.body is not None
                        await ws.send_bytes(ex.body)
                        await ws.receive(timeout=5)
            # Keys that are never stored (refused requests) must not be logged either.
            await send("POST", f"/app/{s['refused']}/track", data=b"{not json")
            await send("POST", "/v1/track", data=b"{bad", headers={
                "Authorization": basic(s["refused"])})
            await send("GET", f"/v1/pixel/track?data=!!!&writeKey={s['refused']}")
            # Fill the spool (random pads: records are compressed), then a websocket app with a key never seen gets no ack.
            for n in range(100):
                chunk = {"data": [{"name": "f", "id": n * 100 + i, "pad": os.urandom(750).hex()}
                                  for i in range(100)]}
                if await send("POST", f"/app/{s['nucleus']}/track", json=chunk) == 503:
                    break
            for n in range(100):  # top up until even one event is refused: no room left
                one = {"data": [{"name": "f", "id": 10**6 + n, "pad": os.urandom(750).hex()}]}
                if await send("POST", f"/app/{s['nucleus']}/track", json=one) == 503:
                    break
            async with session.ws_connect(f"{base}/app/{s['full']}/track") as ws:
                await ws.send_json({"data": [{"name": "full", "id": 3,
                                             "pad": os.urandom(50_000).hex()}]})
                msg = await ws.receive(timeout=5)   # closed: "try again later"
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013, msg
        # Let the forwarder meet the failing upstream a few times.
        await wait_for(lambda: len(fake.requests) >= 5, timeout=20)
    finally:
        await asyncio.to_thread(agent.terminate)
        await fake.stop()
    log = agent.log.read_text()
    assert '"refused"' in log, "the upstream's echo was not logged (dead letters' reason)"
    assert "spool full" in log
    assert scan_for_secrets(log) == []


# -- listening ----------------------------------------------------------------------------------


def test_the_default_listen_host_is_loopback() -> None:
    assert is_loopback_name(ListenConfig().host)


async def test_only_loopback_is_listened_on_by_default(make_agent: Any) -> None:
    agent = await make_agent()
    assert agent.listener is not None and agent.listener.sockets
    for sock in agent.listener.sockets:
        assert is_loopback_name(sock.getsockname()[0]), sock


async def test_a_non_loopback_listen_host_logs_a_warning(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    agent = await make_agent(listen={"host": "0.0.0.0"})
    assert any("not loopback" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert agent.port
    caplog.clear()
    await make_agent(spool=Path(str(agent.spool.path) + "2"))
    assert not any("not loopback" in r.getMessage() for r in caplog.records)


# The unspecified IPv6 address however written: each binds every address as `::` does,
# and the guard took the others for one address of their own, refusing every LAN device.
@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "::0", "0:0:0:0:0:0:0:0"])
def test_listening_on_every_address_serves_ip_hosts_but_not_names(
        tmp_path: Path, wildcard: str) -> None:
    """Bound on purpose to every address (for LAN devices), the agent must serve requests
    addressed to any of its IPs; names still get 421, since a rebinding attack needs one."""
    v6 = ":" in wildcard
    if v6 and not socket_has_ipv6():
        pytest.skip("no IPv6")
    with ThreadedAgent(tmp_path, listen={"host": wildcard}) as agent:
        agent.connect_to = "::1" if v6 else "127.0.0.1"
        for host in ("192.168.1.5:8765", "10.0.0.2", "[fd00::5]:8765", "127.0.0.1"):
            assert agent.request("GET", "/healthz", headers={"Host": host})[0] == 200, host
        for host in ("evil.example", "evil.example:8765", "printer.lan"):
            assert agent.request("GET", "/healthz", headers={"Host": host})[0] == 421, host


def socket_has_ipv6() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
