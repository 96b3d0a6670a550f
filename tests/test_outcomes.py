"""Outcomes seen from outside: every refusal counted by API and status, every tally and
drop reason present in /status whether or not it happened in this run."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from agent.dialects.segment import GIF
from agent.outcomes import Drop, Tally
from tests.conftest import ROOT
from tests.fakes.ops_scene import REFUSED, Scene, populate, post_events, settled
from tests.test_prometheus import parse


async def get_status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
            return data


async def refused_metrics(port: int) -> dict[tuple[str, str], float]:
    """outpost_ingest_refused_total's samples by (api, status)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            fams = parse(await r.text())
    fam = fams["outpost_ingest_refused_total"]
    assert fam.kind == "counter"
    return {(dict(labels)["api"], dict(labels)["status"]): v
            for (_, labels), v in fam.samples.items()}


async def test_invalid_pixels_are_still_gifs_and_counted_as_refused(make_agent: Any) -> None:
    agent = await make_agent(listen={"accept_keys": ["good"]})
    base = f"http://127.0.0.1:{agent.port}/v1/pixel/track?data="
    bad_key = base64.b64encode(orjson.dumps({"userId": "u", "writeKey": "bad", "event": "e"}))
    good = base64.b64encode(orjson.dumps({"userId": "u", "writeKey": "good", "event": "e"}))
    async with aiohttp.ClientSession() as s:
        for data, problem in (("%%%", True), (bad_key.decode(), True), (good.decode(), False)):
            async with s.get(base + data) as r:
                assert r.status == 200 and await r.read() == GIF
                assert ("X-Outpost-Error" in r.headers) == problem
    status = await get_status(agent.port)
    assert status["ingest"]["refused"] == {"segment": {"400": 1, "401": 1}}
    assert await refused_metrics(agent.port) == {("segment", "400"): 1, ("segment", "401"): 1}
    assert agent.spool.depth == 1


async def test_ingest_refusals_are_counted_by_api_and_status(make_agent: Any) -> None:
    agent = await make_agent(listen={"accept_keys": ["k"]})
    url = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/app/k/track", data=b"not json") as r:
            assert r.status == 400
        async with s.post(f"{url}/app/other/track", json={"data": []}) as r:
            assert r.status == 401
        async with s.post(f"{url}/v1/capture", json={"batch": []}) as r:
            assert r.status == 401  # no X-Write-Key
        async with s.ws_connect(f"{url}/app/k/track") as ws:
            await ws.send_str("not json")
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1007
    expected = {"nucleus": {"400": 1, "401": 1, "1007": 1}, "capture": {"401": 1}}
    assert (await get_status(agent.port))["ingest"]["refused"] == expected
    assert await refused_metrics(agent.port) == {
        (api, status): n for api, by in expected.items() for status, n in by.items()}


async def test_counters_do_not_disappear_after_a_restart(make_agent: Any) -> None:
    agent = await make_agent()
    await post_events(agent.port, "k", range(1))
    assert (await get_status(agent.port))["counters"]["duplicates"] == 0
    await agent.stop()
    agent = await make_agent()
    assert (await get_status(agent.port))["counters"]["duplicates"] == 0
    await post_events(agent.port, "k", range(1))  # the same event again
    assert (await get_status(agent.port))["counters"]["duplicates"] == 1
    await agent.stop()
    agent = await make_agent()
    assert (await get_status(agent.port))["counters"]["duplicates"] == 1


async def test_live_status_counts_dead_letters_as_offline_does(make_agent: Any) -> None:
    async with Scene() as scene:
        agent = await make_agent(upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        assert (await get_status(agent.port))["dead_letters"] == REFUSED
        await agent.stop()
        agent = await make_agent(upstreams=scene.upstreams())  # counted again at open
        assert (await get_status(agent.port))["dead_letters"] == REFUSED


def test_operations_doc_lists_every_outcome() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for outcome in (*Drop, *Tally):
        assert f"| `{outcome}` |" in doc, outcome
    for tally in Tally:
        assert f"`outpost_{tally.metric}`" in doc, tally.metric
    assert "`outpost_ingest_refused_total{api,status}`" in doc


async def test_a_counter_this_version_does_not_know_is_kept_but_not_shown(
        make_agent: Any, tmp_path: Path) -> None:
    agent = await make_agent()
    await post_events(agent.port, "k", range(2))
    await agent.stop()
    spool = tmp_path / "spool.db"
    with sqlite3.connect(spool) as conn:  # as a newer agent might have left it
        conn.execute("INSERT INTO counters(name, value) VALUES ('from_the_future', 7)")
    conn.close()
    agent = await make_agent()
    await post_events(agent.port, "k", range(2, 3))
    status = await get_status(agent.port)
    assert "from_the_future" not in status["counters"]
    assert status["counters"]["ingested"] == 3
    await agent.stop()
    with sqlite3.connect(spool) as conn:
        names = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    conn.close()
    assert names["from_the_future"] == 7 and names["ingested"] == 3


async def test_keys_a_lowered_dedupe_max_keys_lets_go_at_a_restart_are_counted_once(
        make_agent: Any) -> None:
    """storage.dedupe_max_keys lowered from 40 to 20 (a restart applies it): the 20 oldest
    of the 40 keys the agent remembered are not loaded again, forgotten early, and counted
    in dedupe_forgotten, once (not again at the next start)."""
    agent = await make_agent(storage={"dedupe_max_keys": 40})
    await post_events(agent.port, "k", range(40))   # queued: no upstream
    assert (await get_status(agent.port))["counters"]["dedupe_forgotten"] == 0
    await agent.stop()
    for _ in range(2):
        agent = await make_agent(storage={"dedupe_max_keys": 20})
        assert (await get_status(agent.port))["counters"]["dedupe_forgotten"] == 20
        await agent.stop()


async def test_a_saved_dedupe_max_keys_garbled_by_damage_does_not_fail_the_start(
        make_agent: Any, tmp_path: Path) -> None:
    """The cap the keys were loaded under, saved beside the counts, garbled into text
    (damage SQLite reads back without complaint): unknown, as in a spool saved before
    it was, so nothing is counted for it, and the agent starts with its queue."""
    agent = await make_agent(storage={"dedupe_max_keys": 40})
    await post_events(agent.port, "k", range(3))   # queued: no upstream
    await agent.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn, conn:
        conn.execute("UPDATE counters SET value = 'garbage' WHERE name = 'dedupe_max_keys'")
    agent = await make_agent(storage={"dedupe_max_keys": 20})
    assert agent.spool.depth == 3
    assert (await get_status(agent.port))["counters"]["dedupe_forgotten"] == 0
