"""Credentials in an upstream URL are refused, and never shown anywhere.

`http://user:password@host` would put the password in /status (readable by
browser pages on an allowed Origin), on the status page and in `doctor`; for
segment-http every send also failed unseen. The rule: userinfo in
`upstream[N].url` is a config error, at startup, in `check-config` and on
reload (SIGHUP), with a one-line message naming the key and never the secret.
The upstream's credential belongs in `key`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.logs import RedactingFilter
from tests.conftest import ROOT, AgentProcess, free_port, write_config
from tests.waiting import run_outpost, wait_for

SECRET = "s3cretPassw0rd-9f2c"

# (protocol, url with credentials, what must never be shown)
CASES = [
    ("segment-http", f"http://user:{SECRET}@collector.example", SECRET),
    ("nucleus-http", f"https://:{SECRET}@nucleus.example/base", SECRET),
    ("nucleus-ws", f"wss://analytics:{SECRET}@app.nucleus.example", SECRET),
    ("segment-http", f"https://{SECRET}@collector.example", SECRET),   # a token as user name
]
RUN_EXIT_CODE = 2   # `outpost run` with an invalid config (docs/operations.md)


def config_with(tmp_path: Path, protocol: str, url: str, *, index: int = 0,
                port: int = 0) -> Path:
    good = {"name": "good", "protocol": "segment-http", "url": "http://127.0.0.1:9"}
    bad = {"name": "bad", "protocol": protocol, "url": url}
    ups = [good, bad] if index == 1 else [bad]
    return write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=ups)


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize(("protocol", "url", "secret"), CASES,
                         ids=["user-password", "password-only", "websocket", "token-as-user"])
async def test_check_config_refuses_credentials_in_url(tmp_path: Path, protocol: str, url: str,
                                                       secret: str) -> None:
    code, out = await run_outpost("check-config", str(config_with(tmp_path, protocol, url)))
    assert code != 0
    line = one_line(out)
    assert "upstream[0].url" in line and '"key"' in line
    assert secret not in out


# A credential in the query (`?api_key=`): no upstream protocol takes one there (each
# appends its own path to the url), and /status showed it (audit L5).
QUERY_CASES = [
    ("segment-http", f"http://127.0.0.1:9/v1?api_key={SECRET}"),
    ("nucleus-http", f"https://nucleus.example/base?token={SECRET}"),
    ("nucleus-ws", f"wss://app.nucleus.example/?{SECRET}"),
    ("segment-http", f"https://collector.example/#{SECRET}"),
]


@pytest.mark.parametrize(("protocol", "url"), QUERY_CASES,
                         ids=["segment", "nucleus-http", "websocket", "fragment"])
async def test_check_config_refuses_a_query_in_url(tmp_path: Path, protocol: str,
                                                   url: str) -> None:
    code, out = await run_outpost("check-config", str(config_with(tmp_path, protocol, url)))
    assert code != 0
    line = one_line(out)
    assert "upstream[0].url" in line and "query" in line and '"key"' in line
    assert SECRET not in out


async def test_the_message_names_the_upstream_at_fault(tmp_path: Path) -> None:
    code, out = await run_outpost("check-config", str(config_with(
        tmp_path, "segment-http", f"http://u:{SECRET}@h.example", index=1)))
    assert code != 0
    assert "upstream[1].url" in one_line(out) and SECRET not in out


async def test_run_refuses_with_one_line_and_the_documented_exit_code(tmp_path: Path) -> None:
    cfg = config_with(tmp_path, "segment-http", f"http://user:{SECRET}@127.0.0.1:9")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(cfg), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:   # it started instead of refusing
            proc.kill()
            await proc.wait()
    code, out = proc.returncode, raw.decode()
    assert code == RUN_EXIT_CODE
    line = one_line(out)
    assert "upstream[0].url" in line and SECRET not in out
    assert not (tmp_path / "spool.db").exists()   # refused before anything started


async def test_no_secret_anywhere_and_reload_keeps_the_running_config(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    port = free_port()
    good_url = "http://127.0.0.1:9"   # nothing listens: the upstream stays in backoff
    cfg = config_with(tmp_path, "segment-http", good_url, port=port)
    cfg.write_text(cfg.read_text() + '[log]\nlevel = "debug"\n')
    good_text = cfg.read_text()
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    assert agent.proc is not None
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{agent.url}/v1/batch", json={"batch": [
                {"type": "track", "event": "e", "userId": "u", "messageId": "m1"}]},
                          headers={"Authorization": "Basic YXBwS2V5MTI6"}) as r:
            assert r.status == 200

        # The operator edits the URL to carry credentials, then reloads.
        cfg.write_text(good_text.replace(good_url, f"http://user:{SECRET}@127.0.0.1:9"))
        agent.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload refused" in agent.log.read_text())
        refused = [ln for ln in agent.log.read_text().splitlines() if "reload refused" in ln]
        assert len(refused) == 1 and "upstream[0].url" in refused[0], refused
        assert "keeping the running config" in refused[0]

        shown: dict[str, str] = {}
        for path in ("/status", "/", "/metrics"):
            async with s.get(agent.url + path) as r:
                assert r.status == 200, path
                shown[path] = await r.text()
    status: dict[str, Any] = json.loads(shown["/status"])
    assert [u["url"] for u in status["upstreams"]] == [good_url]   # the running config
    assert agent.proc.poll() is None

    # The CLI, with the edited file (refused) and with the file the agent runs on.
    for name, text in (("edited", cfg.read_text()), ("running", good_text)):
        copy = tmp_path / f"{name}.toml"
        copy.write_text(text)
        for command in ("status", "doctor"):
            code, out = await run_outpost(command, "--config", str(copy))
            shown[f"outpost {command} ({name} config)"] = out
            assert code == (RUN_EXIT_CODE if name == "edited" else 0), out
    shown["log"] = agent.log.read_text()
    assert agent.terminate() == 0
    shown["log"] = agent.log.read_text()
    leaks = [where for where, text in shown.items() if SECRET in text]
    assert leaks == []


# -- a key in the URL's path, percent-encoded by the HTTP client -------------------------------


async def _garbage_server() -> asyncio.Server:
    """Answers every request with a reply aiohttp cannot parse: aiohttp's error names the
    URL as sent (the agent now words it without: "an answer that is not HTTP")."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\n{}")
            await writer.drain()
        finally:
            writer.close()
    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
@pytest.mark.parametrize(("key", "encoded"), [("Sekrit Key 2026", "Sekrit%20Key%202026"),
                                              ("ключ-2026", "%D0%BA%D0%BB%D1%8E%D1%87-2026")])
async def test_a_key_needing_percent_encoding_is_never_shown(
        make_agent: Any, protocol: str, key: str, encoded: str) -> None:
    """The key is in the upstream URL's path, and the client's errors show that URL as
    sent, percent-encoded: a form the redaction did not know (audit)."""
    server = await _garbage_server()
    port = server.sockets[0].getsockname()[1]
    scheme = "ws" if protocol == "nucleus-ws" else "http"
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)   # as the agent's own log handler redacts
    handler.addFilter(RedactingFilter())
    logging.getLogger("outpost").addHandler(handler)
    try:
        agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol,
                                             "url": f"{scheme}://127.0.0.1:{port}", "key": key,
                                             "flush_interval_s": 0.02, "timeout_s": 2}])
        base = f"http://127.0.0.1:{agent.port}"
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/app/app1/track", json={"data": [
                    {"type": "event", "name": "e", "id": 1, "sessionId": 1}]}) as r:
                assert r.status == 200
            state = agent.forwarding.states["up"]
            await wait_for(lambda: state.last_error is not None, 10)
            async with s.get(f"{base}/status") as r:
                status = await r.text()
            async with s.get(f"{base}/metrics") as r:
                metrics = await r.text()
    finally:
        logging.getLogger("outpost").removeHandler(handler)
        server.close()
    assert "an answer that is not HTTP" in (state.last_error or ""), state.last_error
    for text in (status, metrics, seen.getvalue()):
        assert key not in text and encoded not in text, text   # never its key
