"""How many keys apps may invent: with ``accept_keys = []`` every key stored stays in
memory while the agent runs (about 1 KB each, measured: 40,000 keys grew an agent by
32 MB), and a key's queue row outlives its events while the agent runs, so neither the
spool's size nor its expiry bounds how many there are: an app inventing a million keys
took about 1 GB. Keys with nothing left are forgotten at a start."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from typing import Any

import aiohttp

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.ops_scene import post_events
from tests.segment_helpers import basic, call
from tests.test_dead_letters import RefusingNucleus
from tests.waiting import wait_for

CAP = 20


async def test_new_keys_past_max_keys_are_refused_saying_why(make_agent: Any) -> None:
    agent = await make_agent(listen={"max_keys": CAP})
    port = agent.port
    track = {"userId": "u", "event": "e"}
    for i in range(CAP):
        r = await call(port, "/v1/track", track, headers={"Authorization": basic(f"key{i:03d}")})
        assert r.status == 200, r.body
    for i in range(CAP, CAP + 5):
        r = await call(port, "/v1/track", track, headers={"Authorization": basic(f"key{i:03d}")})
        assert r.status == 401, r.body
        assert "listen.max_keys" in r.json()["Details"], r.body
    r = await call(port, "/app/nucleus-app-new/track",
                   {"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1}]})
    assert r.status == 401, r.body
    assert b"listen.max_keys" in r.body, r.body
    # The keys it knows go on being taken.
    r = await call(port, "/v1/track", track, headers={"Authorization": basic("key000")})
    assert r.status == 200, r.body
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as resp:
            status = await resp.json()
        async with s.get(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = await resp.text()
    assert status["unrouted"]["keys"] == CAP
    refused = re.findall(r'^outpost_ingest_refused_total\{api="(\w+)",status="401"\} (\S+)$',
                         metrics, re.M)
    assert sum(float(n) for _, n in refused) == 6, refused


async def test_one_batch_of_many_new_keys_takes_no_more_than_max_keys(make_agent: Any) -> None:
    """Every message of a Segment batch may name its own writeKey: each was asked about
    against the keys already stored, before any of the batch's was, so one 512 KB batch
    could bring thousands of new keys past the limit (and a few such batches at once,
    a few times that)."""
    agent = await make_agent(listen={"max_keys": CAP})
    batch = {"batch": [{"type": "track", "event": "e", "userId": "u", "writeKey": f"bk{i:03d}"}
                       for i in range(CAP + 10)]}
    r = await call(agent.port, "/v1/batch", batch)
    assert r.status == 207, r.body
    errors = r.json()["Errors"]
    assert len(errors) == 10 and all("listen.max_keys" in e["Details"] for e in errors), errors
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as resp:
        assert (await resp.json())["unrouted"]["keys"] == CAP


def _too_big_for_the_spool() -> dict[str, Any]:
    """A Nucleus message larger than a 1 MB spool even compressed: refused whole (413)."""
    return {"data": [{"type": "event", "name": "e", "id": i, "sessionId": 1,
                      "payload": {"x": os.urandom(150_000).hex()}} for i in range(10)]}


async def test_keys_of_requests_refused_whole_take_no_place(make_agent: Any) -> None:
    """A request the spool refuses whole (503: full; 413: larger than the spool) stores
    nothing, yet its key's queue entry was kept, in memory and as a row of the file, for
    good: while a spool was full, every refused request under a new key grew the agent,
    and with listen.max_keys each took one of its places, so that new apps were refused
    once the spool had room again."""
    agent = await make_agent(listen={"max_keys": 3}, storage={"max_size_mb": 1})
    for i in range(3):
        r = await call(agent.port, f"/app/refused-{i}/track", _too_big_for_the_spool())
        assert r.status == 413 and b"too large for the spool" in r.body, r.body[:300]
    r = await call(agent.port, "/app/new-app/track",
                   {"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1}]})
    assert r.status == 200, r.body


async def test_keys_the_config_routes_by_name_are_taken_past_max_keys(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """listen.max_keys bounds the keys apps invent; a key an upstream's `keys` names is the
    operator's own app, as bounded as the config. It was refused like an invented one:
    once any local process had invented max_keys keys (known for good), the app the config
    routes was refused 401 for good, a new device's or one just added by a reload alike."""
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url,
          "keys": ["configured-app"]}
    agent = await make_agent(listen={"max_keys": 3}, upstreams=[up])
    one = {"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1}]}
    for i in range(3):
        r = await call(agent.port, f"/app/invented-{i}/track", one)
        assert r.status == 200, r.body
    r = await call(agent.port, "/app/invented-3/track", one)
    assert r.status == 401, r.body
    r = await call(agent.port, "/app/configured-app/track", one)
    assert r.status == 200, r.body


async def test_a_long_key_an_upstream_names_is_taken(make_agent: Any,
                                                      fake_nucleus: FakeNucleus) -> None:
    """Keys over 256 characters are refused only as keys apps invent: one an upstream's
    `keys` names is the operator's (as one listen.accept_keys lists is), and was refused
    401 for every request of the app the config routes."""
    long_key = "k" * 300
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url, "keys": [long_key]}
    agent = await make_agent(upstreams=[up])
    one = {"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1}]}
    r = await call(agent.port, f"/app/{long_key}/track", one)
    assert r.status == 200, r.body
    r = await call(agent.port, f"/app/{'j' * 300}/track", one)
    assert r.status == 401 and b"longer than 256 characters" in r.body, r.body


async def inflight_bytes(port: int) -> int:
    """What /metrics says requests in flight hold of listen.max_inflight_mb: a request
    past its key's check holds its body's bytes until its commit returns."""
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    found = re.search(r"^outpost_ingest_inflight_bytes (\S+)$", text, re.M)
    assert found is not None, text
    return int(float(found[1]))


async def test_a_new_key_whose_commit_runs_counts_once_toward_max_keys(make_agent: Any) -> None:
    """A new key is known from the moment its request's commit is built (its queue is
    made then), and it was also counted as taken for that request until the commit
    returned: while it ran, one key was counted twice, and the last new app under the
    limit was refused 401 (its refusal counting a key too many). The spool's database
    thread is held, so the commit runs as long as the test says."""
    agent = await make_agent(listen={"max_keys": 3})
    port = agent.port
    one = {"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1}]}
    r = await call(port, "/app/known/track", one)
    assert r.status == 200, r.body
    held, release = threading.Event(), threading.Event()

    def hold(_: Any) -> None:
        held.set()
        release.wait(30)

    holding = agent.spool.db.run(hold)
    try:
        await asyncio.to_thread(held.wait, 10)
        second = asyncio.create_task(call(port, "/app/second/track", one))
        await wait_for(lambda: "second" in agent.spool.streams)   # its commit is built
        alone = await inflight_bytes(port)
        third = asyncio.create_task(call(port, "/app/third/track", one))
        # Refused, or taken: its body read, it waits for the spool.
        await wait_for(lambda: third.done() or _more(port, alone))
        assert not third.done(), third.result().body
    finally:
        release.set()
        await holding
    assert (await second).status == 200
    r = await third
    assert r.status == 200, r.body
    r = await call(port, "/app/fourth/track", one)
    assert r.status == 401, r.body
    assert b"a new key, and 3 keys are known already (listen.max_keys = 3)" in r.body, r.body


async def _more(port: int, than: int) -> bool:
    return await inflight_bytes(port) > than


async def test_keys_with_nothing_left_are_forgotten_at_the_next_start(make_agent: Any) -> None:
    """A key stayed known for good, its queue's row outliving its events, so listen.max_keys
    counted every key a device had ever met: once it had met that many (apps reinstalled
    under new keys, say), each new app was refused 401 for good, across restarts. A key
    with nothing queued and no dead letters is forgotten at the next start; one with
    either keeps its place, and what it holds."""
    up = await RefusingNucleus(refuse=None).start()
    try:
        ups = [{"name": "up", "protocol": "nucleus-http", "url": up.http_url, "keys": ["*"],
                "flush_interval_s": 0.05, "timeout_s": 2}]
        agent = await make_agent(listen={"max_keys": 3}, upstreams=ups)
        spool = agent.spool
        await post_events(agent.port, "delivered", range(2))
        await wait_for(lambda: len(up.events) == 2 and spool.depth == 0)
        up.refuse = 400
        await post_events(agent.port, "dead", range(2))
        await wait_for(lambda: spool.dead_count == 2)
        await up.go_down()
        await post_events(agent.port, "queued", range(2))
        one = {"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1}]}
        r = await call(agent.port, "/app/new/track", one)
        assert r.status == 401, r.body
        await agent.stop()
        agent = await make_agent(listen={"max_keys": 3}, upstreams=ups)
        r = await call(agent.port, "/app/new/track", one)
        assert r.status == 200, r.body
        r = await call(agent.port, "/app/newer/track", one)
        assert r.status == 401, r.body
        assert b"3 keys are known already" in r.body, r.body
        spool = agent.spool
        assert spool.depth == 3 and spool.dead_count == 2
        assert sorted(spool.streams) == ["dead", "new", "queued"]
    finally:
        await up.stop()

