"""Keys of any length: with ``accept_keys = []`` any local app may invent keys, and every
key the spool stores stays in memory while the agent runs (its queue's entry and the
forms the log redaction looks for), so how long a key may be bounds what each costs."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import psutil

from tests.conftest import AgentProcess, free_port, write_config
from tests.waiting import wait_for

MB = 1024 * 1024
KEYS = 24
# A write key of 'é' as long as a 512 KB batch allows: percent-encoded, each form the
# redaction keeps of it is 6 characters a letter (about 2 MB a key in all, measured).
LONG_KEY_CHARS = 200_000
# What the keys may leave behind: allocator noise, the refusals' counters.
GROWN_MAX = 8 * MB


async def _metric(s: aiohttp.ClientSession, url: str, name: str) -> float:
    async with s.get(f"{url}/metrics") as r:
        text = await r.text()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


async def _post(s: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict[str, object]]:
    body = orjson.dumps({"writeKey": key, "batch": [{"type": "track", "event": "e",
                                                     "userId": "u"}]})
    async with s.post(f"{url}/v1/batch", data=body,
                      headers={"Content-Type": "application/json"}) as r:
        return r.status, orjson.loads(await r.read())


async def test_distinct_long_keys_do_not_grow_the_agent(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Each distinct 400 KB key an app sent was stored, and held in memory for good
    (registered again at each start): about 2 MB of RSS a key, so a 512 MB spool's worth
    of them would take gigabytes. A key longer than any real one is refused, saying so."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port).start()
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    trims = "outpost_memory_trims_total"
    async with aiohttp.ClientSession() as s:
        # One key's bodies first (enough for a trim after them), so that the allocator
        # has grown for bodies this size.
        trimmed = await _metric(s, agent.url, trims)
        for _ in range(12):
            await _post(s, agent.url, "é" * LONG_KEY_CHARS)
        await _wait_trim(s, agent.url, trimmed)
        idle = proc.memory_info().rss
        trimmed = await _metric(s, agent.url, trims)
        answers = [await _post(s, agent.url, f"{i:03d}" + "é" * LONG_KEY_CHARS)
                   for i in range(KEYS)]
        await _wait_trim(s, agent.url, trimmed)
        grown = proc.memory_info().rss - idle
        refused = await _metric(s, agent.url,
                                'outpost_ingest_refused_total{api="segment",status="401"}')
    assert grown < GROWN_MAX, f"{KEYS} long keys grew the agent by {grown / MB:.1f} MB"
    for status, body in answers:
        assert status == 401, (status, body)
        assert "longer than 256 characters" in str(body["Errors"]), body
    assert refused >= KEYS


async def _wait_trim(s: aiohttp.ClientSession, url: str, since: float) -> None:
    """Until the agent has handed back what the burst freed (it trims once ingest has
    been quiet a second): RSS is read after that, not after a guess of a sleep."""
    async def trimmed() -> bool:
        return await _metric(s, url, "outpost_memory_trims_total") > since
    await wait_for(trimmed, timeout=10)


async def test_a_too_long_app_id_is_not_echoed_whole_in_its_401(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Nucleus's 401 quoted the refused app id whole: a 60 KB id came back as a 60 KB
    answer, for each request. The answer says why in a few hundred bytes, with the id's
    start and its length, over HTTP and at the websocket's upgrade alike."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    agent = agent_process(cfg, port).start()
    app_id = "app-" + "k" * 60_000
    async with aiohttp.ClientSession() as s:
        for method in ("POST", "GET"):   # GET: the websocket's upgrade
            upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            async with s.request(method, f"{agent.url}/app/{app_id}/track",
                                 data=b'{"data": []}' if method == "POST" else None,
                                 headers=upgrade if method == "GET" else None) as r:
                raw = await r.read()
            assert r.status == 401, (method, r.status, raw[:200])
            error = orjson.loads(raw)["error"]
            assert len(raw) < 1024, (method, len(raw))
            assert "'app-kkkk" in error and "60004 characters" in error, error
            assert "longer than 256 characters" in error, error
