"""A key shorter than the redaction's MIN_SECRET_LEN (4) is never shown in the form the
agent sends it in either.

Nothing limits a key's length: `listen.accept_keys`, an upstream's `keys` and `key`, or an
app's own key may be 1 to 3 characters. Such a key is not registered as it is (every log
line holding those letters would be garbled), but a `segment-http` upstream is sent it as
Basic credentials, base64 of `key:`, eight characters or more that no prose holds. An
upstream that refuses a batch echoing its request's headers (`\\nAuthorization: Basic
…` inside its JSON body) had them shown in the log, `/status`, `outpost status` and
`outpost dead list`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.waiting import run_outpost, wait_for

UPSTREAM_KEY = "Up9"   # an upstream's own key, sent instead of the app's
APP_KEY = "Zq7"        # an app's key, sent as it is
ROUTED = "routedAppKey2026"   # the app key routed to the upstream with its own key


def basic(key: str) -> str:
    return base64.b64encode(f"{key}:".encode()).decode()


async def test_a_short_key_sent_as_basic_credentials_is_never_shown_when_echoed(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    fake = await FaultyUpstream().start()
    # Every batch refused for good, the upstream echoing the request's headers back.
    fake.script = [Fault("status", 400, echo=True) for _ in range(50)]
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "own", "protocol": "segment-http", "url": fake.http_url, "keys": [ROUTED],
         "key": UPSTREAM_KEY, "flush_interval_s": 0.05, "timeout_s": 2},
        {"name": "apps", "protocol": "segment-http", "url": fake.http_url,
         "flush_interval_s": 0.05, "timeout_s": 2}])
    cfg.write_text(cfg.read_text() + '[log]\nlevel = "debug"\n')
    agent = agent_process(cfg, port)
    shown: dict[str, str] = {}
    try:
        await asyncio.to_thread(agent.start)
        async with aiohttp.ClientSession() as s:
            for n, key in enumerate((ROUTED, APP_KEY)):
                async with s.post(f"{agent.url}/v1/batch", json={"batch": [
                        {"type": "track", "event": "e", "userId": "u", "messageId": f"m{n}"}]},
                                  headers={"Authorization": f"Basic {basic(key)}"}) as r:
                    assert r.status == 200, await r.text()

            async def both_dead() -> bool:
                async with s.get(f"{agent.url}/status") as r:
                    return bool((await r.json())["dead_letters"] == 2)
            await wait_for(both_dead)
            for path in ("/status", "/", "/metrics", "/dead"):
                async with s.get(agent.url + path) as r:
                    assert r.status == 200, path
                    shown[path] = await r.text()
        for command in (("status",), ("dead", "list"), ("dead", "export", "/dev/stdout")):
            code, out = await run_outpost(*command, "--config", str(cfg))
            assert code == 0, out
            shown["outpost " + " ".join(command)] = out
    finally:
        await asyncio.to_thread(agent.terminate)
        await fake.stop()
    shown["log"] = agent.log.read_text()
    # The upstream echoed both keys' credentials: the reasons show them redacted.
    leaks = [(where, form) for where, text in shown.items()
             for form in (basic(UPSTREAM_KEY), basic(APP_KEY), f"/{UPSTREAM_KEY}",
                          f"/{APP_KEY}") if form in text]
    assert leaks == [], "; ".join(f"{w}: {f}" for w, f in leaks)
    status: dict[str, Any] = json.loads(shown["/status"])
    reasons = [g["reason"] for g in status["dead_reasons"]]
    assert len(reasons) == 2 and all("Authorization: Basic ***" in r for r in reasons), reasons


# -- a key an upstream echoes in JSON, escaped -------------------------------------------------

NON_ASCII_KEY = "Ключ-Секрет-2026"   # an upstream's own key (its app id), as docs/security.md


async def shown_after_refusal(tmp_path: Path, agent_process: Callable[..., AgentProcess],
                              upstream: dict[str, Any], body: bytes,
                              post: tuple[str, Any, dict[str, str]],
                              settled: Callable[[dict[str, Any]], bool],
                              pages: tuple[str, ...], commands: tuple[tuple[str, ...], ...]
                              ) -> tuple[dict[str, str], list[str]]:
    """Every place the agent shows an upstream's refusal: an agent (its log at debug) whose
    one ``upstream`` answers every batch 400 with ``body``, sent one request (``post``: its
    path, JSON and headers) until its /status is ``settled``; then its ``pages``, the
    outpost ``commands``' output and its log, by where, and the paths the upstream was
    sent to."""
    fake = await FaultyUpstream().start()
    fake.script = [Fault("status", 400, body=body) for _ in range(50)]
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {**upstream, "url": fake.http_url, "flush_interval_s": 0.05, "timeout_s": 2}])
    cfg.write_text(cfg.read_text() + '[log]\nlevel = "debug"\n')
    agent = agent_process(cfg, port)
    shown: dict[str, str] = {}
    path, sent, headers = post
    try:
        await asyncio.to_thread(agent.start)
        async with aiohttp.ClientSession() as s:
            async with s.post(agent.url + path, json=sent, headers=headers) as r:
                assert r.status == 200, await r.text()

            async def done() -> bool:
                async with s.get(f"{agent.url}/status") as r:
                    return settled(await r.json())
            await wait_for(done)
            for page in pages:
                async with s.get(agent.url + page) as r:
                    assert r.status == 200, page
                    shown[page] = await r.text()
        for command in commands:
            code, out = await run_outpost(*command, "--config", str(cfg))
            assert code == 0, out
            shown["outpost " + " ".join(command)] = out
    finally:
        await asyncio.to_thread(agent.terminate)
        await fake.stop()
    shown["log"] = agent.log.read_text()
    return shown, [request.path for request in fake.requests]


def leaks(shown: dict[str, str], forms: set[str]) -> str:
    """Where any of ``forms`` shows, as one line ("" for nowhere)."""
    return "; ".join(f"{where}: {form}" for where, text in shown.items()
                     for form in forms if form in text)


def dead_lettered(status: dict[str, Any]) -> bool:
    return bool(status["dead_letters"] == 1)


DEAD_PAGES = ("/status", "/metrics", "/dead")
DEAD_COMMANDS = (("status",), ("dead", "list"), ("dead", "export", "/dev/stdout"))
BATCH = ("/v1/batch", {"batch": [
    {"type": "track", "event": "e", "userId": "u", "messageId": "m1"}]},
         {"Authorization": f"Basic {basic(ROUTED)}"})


async def test_a_key_an_upstream_echoes_json_escaped_is_never_shown(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Python's json (and PHP's json_encode) write a non-ASCII letter as ``\\u041a``: an
    upstream naming the app id it refuses in its JSON error showed the key so, a form
    the redaction did not know."""
    escaped = json.dumps(NON_ASCII_KEY)[1:-1]
    assert escaped.startswith("\\u041a")
    body = json.dumps({"error": f"unknown app id {NON_ASCII_KEY}"}).encode()
    shown, sent_to = await shown_after_refusal(
        tmp_path, agent_process, {"name": "nu", "protocol": "nucleus-http", "key": NON_ASCII_KEY},
        body, ("/app/someApp2026/track", {"data": [
            {"type": "event", "name": "e", "id": 1, "sessionId": 1}]}, {}),
        dead_lettered, DEAD_PAGES, DEAD_COMMANDS)
    assert sent_to and sent_to[0].startswith("/app/")
    assert leaks(shown, {NON_ASCII_KEY, escaped, escaped.replace("\\", "\\\\")}) == ""
    reasons = [g["reason"] for g in json.loads(shown["/status"])["dead_reasons"]]
    assert reasons == ['HTTP 400: {"error": "unknown app id ***"}'], reasons


SLASHED_KEY = "kQ9/xT2+Segment2026=="   # a base64 token as key: '/' is one of its digits


async def test_a_key_an_upstream_echoes_as_phps_json_encode_writes_a_slash_is_never_shown(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """PHP's json_encode also writes '/' as ``\\/`` unless told not to: a PHP upstream
    naming the key it refuses in its JSON error showed a key holding one so (a 400 for
    the key: retried, the upstream's last error)."""
    php = json.dumps(SLASHED_KEY)[1:-1].replace("/", "\\/")
    assert php == "kQ9\\/xT2+Segment2026=="
    body = json.dumps({"error": f"unknown write key {SLASHED_KEY}"}).replace("/", "\\/")
    shown, sent_to = await shown_after_refusal(
        tmp_path, agent_process, {"name": "seg", "protocol": "segment-http", "key": SLASHED_KEY},
        body.encode(), BATCH, lambda status: bool(status["upstreams"][0]["last_error"]),
        ("/status", "/", "/metrics"), (("status",),))
    assert sent_to and "unknown write key" in shown["log"]
    assert leaks(shown, {SLASHED_KEY, php, php.replace("\\", "\\\\")}) == ""
    error = json.loads(shown["/status"])["upstreams"][0]["last_error"]
    assert error.startswith('HTTP 400: {"error": "unknown write key ***"}'), error


# -- a key other servers' JSON encoders escape their own way ----------------------------------

# Each encoder's bytes written by hand from its documented rules, not by our code:
# - .NET System.Text.Json (default encoder): every non-ASCII character and each of
#   " & ' + < > ` as \uXXXX, UPPERCASE hex;
# - Java's Gson (HTML-safe by default): < > & = ' as \u003c... lowercase, non-ASCII as is;
# - Go's encoding/json: < > & as \u003c... lowercase, non-ASCII as is (U+2028 and U+2029
#   aside, which no key holds: keys must be printable);
# - Python's json and a URL (a short key: its percent-encoded and escaped forms are long).
ECHOED = [
    ("dotnet-base64", "kQ9/xT2+Segment2026==", r"kQ9/xT2\u002BSegment2026=="),
    ("dotnet-non-ascii", "Ключ-Секрет-2026",
     r"\u041A\u043B\u044E\u0447-\u0421\u0435\u043A\u0440\u0435\u0442-2026"),
    ("gson", "kQ9/xT2+Segment2026==", r"kQ9/xT2+Segment2026\u003d\u003d"),
    ("gson-non-ascii", "Ключ='2026'", r"Ключ\u003d\u00272026\u0027"),
    ("go", "R&D<2026>Ключ", r"R\u0026D\u003c2026\u003eКлюч"),
    ("dotnet-short", "Клю", r"\u041A\u043B\u044E"),
    ("python-short", "Клю", r"\u041a\u043b\u044e"),
    ("url-short", "Клю", "%D0%9A%D0%BB%D1%8E"),
]


@pytest.mark.parametrize(("key", "echoed"), [pytest.param(k, e, id=i) for i, k, e in ECHOED])
async def test_a_key_another_json_encoder_escapes_is_never_shown_when_echoed(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], key: str,
        echoed: str) -> None:
    """An upstream refusing a batch names the key it was sent with in its JSON error,
    escaped as its server's encoder writes it: the key showed so in the log, /status, `outpost
    status`, GET /dead and `outpost dead list/export`."""
    body = ('{"error":"no source for ' + echoed + '"}').encode()
    shown, sent_to = await shown_after_refusal(
        tmp_path, agent_process, {"name": "seg", "protocol": "segment-http", "key": key},
        body, BATCH, dead_lettered, DEAD_PAGES, DEAD_COMMANDS)
    assert sent_to and "no source for" in shown["log"]
    # As echoed, and as our JSON and escaped output show it (its backslashes doubled).
    assert leaks(shown, {key, echoed, echoed.replace("\\", "\\\\"),
                         json.dumps(echoed)[1:-1]}) == ""
    reasons = [g["reason"] for g in json.loads(shown["/status"])["dead_reasons"]]
    assert reasons == ['HTTP 400: {"error":"no source for ***"}'], reasons
