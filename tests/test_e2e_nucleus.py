"""End to end, in process: app -> agent -> fake Nucleus upstream, acks both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from yarl import URL

from tests.conftest import write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for


def upstream(fake: FakeNucleus, protocol: str = "nucleus-ws", **kw: Any) -> dict[str, Any]:
    url = fake.url if protocol == "nucleus-ws" else fake.http_url
    return {"name": "nucleus", "protocol": protocol, "url": url, "flush_interval_s": 0.05,
            "timeout_s": 2, **kw}


async def test_websocket_events_flow_upstream_with_acks(make_agent: Any,
                                                        fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{agent.port}/app/app1/track") as ws:
            await ws.send_str(orjson.dumps({"data": [
                {"type": "init", "id": 7, "sessionId": 1234, "machineId": "m1",
                 "date": "2026-01-01T00:00:00Z", "platform": "Linux"},
                {"type": "event", "name": "click", "id": "x1", "sessionId": 1234,
                 "machineId": "m1"},
                {"type": "heartbeat", "machineId": "m1"},
            ]}).decode())
            reply = await ws.receive_json(timeout=5)
    assert reply == {"reportedIds": [7, "x1"]}
    await wait_for(lambda: len(fake_nucleus.events) == 2)
    init, click = fake_nucleus.events
    assert fake_nucleus.paths[0] == "/app/app1/track"
    assert init["platform"] == "Linux"              # the app's value is kept
    assert init["osVersion"] and init["totalRam"] and init["locale"] and init["language"]
    assert "osVersion" not in click                 # only init/error are enriched
    assert click["date"]                            # receive time filled in
    await wait_for(lambda: agent.spool.depth == 0)  # acked upstream -> deleted


async def test_resend_is_acked_again_but_stored_once(make_agent: Any,
                                                     fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])

    def msg(i: int) -> dict[str, Any]:
        return {"data": [{"type": "event", "name": "a", "id": i, "sessionId": 5,
                          "machineId": "m", "date": "2026-01-01T00:00:00Z"}]}
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{agent.port}/app/k/track"
        for _ in range(3):
            async with s.post(url, json=msg(1)) as r:
                assert r.status == 200
                assert await r.json() == {"reportedIds": [1]}
        await wait_for(lambda: len(fake_nucleus.events) >= 1)
        # A later event of the same key: the key's queue is FIFO, so once it is upstream,
        # anything the resends had queued before it would be there too.
        async with s.post(url, json=msg(2)) as r:
            assert r.status == 200
    await wait_for(lambda: 2 in fake_nucleus.ids())
    assert fake_nucleus.ids() == [1, 2]
    assert agent.spool.counters["duplicates"] == 2


async def test_offline_then_back_drains_oldest_first(make_agent: Any,
                                                     fake_nucleus: FakeNucleus) -> None:
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{agent.port}/app/k/track"
        for i in range(30):
            async with s.post(url, json={"data": [{"name": "e", "id": i, "sessionId": 1,
                                                    "machineId": "m"}]}) as r:
                assert r.status == 200
    assert agent.spool.depth == 30
    await fake_nucleus.come_back()
    agent.forwarding.flush()
    await wait_for(lambda: agent.spool.depth == 0, timeout=15)
    ids = fake_nucleus.ids()
    first_seen = sorted(set(ids), key=ids.index)
    assert first_seen == list(range(30))


async def test_partial_acks_resend_only_the_rest(make_agent: Any,
                                                 fake_nucleus: FakeNucleus) -> None:
    allow_odd = True
    fake_nucleus.ack = lambda ev_id: not allow_odd or ev_id % 2 == 0
    agent = await make_agent(upstreams=[upstream(fake_nucleus, timeout_s=0.5)])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/k/track", json={"data": [
                {"name": "e", "id": i, "sessionId": 1, "machineId": "m"} for i in range(6)]}) as r:
            assert r.status == 200
    await wait_for(lambda: agent.spool.depth == 3)
    allow_odd = False
    agent.forwarding.flush()
    await wait_for(lambda: agent.spool.depth == 0)
    ids = fake_nucleus.ids()
    assert ids.count(0) == 1 and ids.count(2) == 1 and ids.count(4) == 1
    assert {1, 3, 5} <= set(ids[6:])


async def test_http_uplink_delivers(make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus, protocol="nucleus-http")])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/k/track", json={"data": [
                {"name": "e", "id": i, "sessionId": 1, "machineId": "m"} for i in range(5)]}) as r:
            assert r.status == 200
    await wait_for(lambda: agent.spool.depth == 0)
    assert fake_nucleus.ids() == [0, 1, 2, 3, 4]


async def test_colliding_ids_wait_for_the_first_ack(make_agent: Any,
                                                    fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    async with aiohttp.ClientSession() as s:
        for session in (1, 2, 3):
            async with s.post(f"http://127.0.0.1:{agent.port}/app/k/track", json={"data": [
                    {"name": "e", "id": 9, "sessionId": session, "machineId": "m"}]}) as r:
                assert r.status == 200
    await wait_for(lambda: agent.spool.depth == 0)
    assert [e["sessionId"] for e in fake_nucleus.events] == [1, 2, 3]


@pytest.mark.parametrize("app_id", ["shop?x=1#frag/../other", "a;b", "..;"])
@pytest.mark.parametrize("protocol", ["nucleus-ws", "nucleus-http"])
async def test_an_app_id_that_needs_escaping_reaches_its_own_upstream_path(
        make_agent: Any, fake_nucleus: FakeNucleus, protocol: str, app_id: str) -> None:
    """The app id goes into the upstream's path as one segment, escaped: an id holding `?`,
    `#` or `/` must not cut the path short (its events sent to another app's path, or
    to none) nor add segments to it. Nor may one holding `;`, which went unescaped (yarl
    unescaped it): servers that read `;` as the start of a segment's parameters (Java's
    servlet containers, and proxies that match paths so) took `/app/a;b/track` for app
    `a`'s path, and `/app/..;/track` for `/track`."""
    agent = await make_agent(upstreams=[upstream(fake_nucleus, protocol=protocol)])
    async with aiohttp.ClientSession() as s:
        async with s.post(URL(f"http://127.0.0.1:{agent.port}/app/{quote(app_id, safe='')}"
                              "/track", encoded=True), json={"data": [
                {"name": "e", "id": i, "sessionId": 1, "machineId": "m"} for i in range(3)]}) as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: agent.spool.depth == 0)
    assert fake_nucleus.ids() == [0, 1, 2]
    assert set(fake_nucleus.paths) == {f"/app/{app_id}/track"}
    assert set(fake_nucleus.raw_paths) == {f"/app/{quote(app_id, safe='')}/track"}


@pytest.mark.parametrize("path", ["/app/{}/track", "/{}/track", "/{}", "/{}/"])
async def test_an_app_id_holding_a_brace_is_taken_on_every_nucleus_route(
        make_agent: Any, fake_nucleus: FakeNucleus, path: str) -> None:
    """The routes' `{appId}` took any segment but one holding `{` or `}` (aiohttp's
    default for a variable), so such an app's key, accepted by the config and by every
    other API, got a 404 saying `no route for POST /app/%7Bkiosk%7D/track`, a route
    the agent has, and its websocket the same 404."""
    app_id = "{kiosk}"
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    target = URL(f"http://127.0.0.1:{agent.port}{path.format(quote(app_id, safe=''))}",
                 encoded=True)
    event = {"name": "e", "id": 1, "sessionId": 1, "machineId": "m"}
    async with aiohttp.ClientSession() as s:
        if path == "/app/{}/track":
            async with s.post(target, json={"data": [event]}) as r:
                assert r.status == 200, await r.text()
        async with s.ws_connect(target) as ws:
            await ws.send_json({"data": [event | {"id": 2}]})
            assert (await ws.receive_json(timeout=10)) == {"reportedIds": [2]}
    await wait_for(lambda: agent.spool.depth == 0 and 2 in fake_nucleus.ids())
    assert set(fake_nucleus.paths) == {f"/app/{app_id}/track"}


@pytest.mark.parametrize("app_id", [".", ".."])
@pytest.mark.parametrize("protocol", ["nucleus-ws", "nucleus-http"])
async def test_a_dot_segment_app_id_is_refused_not_sent_to_another_path(
        make_agent: Any, fake_nucleus: FakeNucleus, protocol: str, app_id: str) -> None:
    """An app id of `.` or `..` is a path segment no escaping keeps: the upstream's URL
    would resolve it (`/app/../track` is `/track`), sending the app's events to another
    path. Refused at ingest (401, saying why), so that nothing is stored that can never
    reach its own path."""
    agent = await make_agent(upstreams=[upstream(fake_nucleus, protocol=protocol)])
    async with aiohttp.ClientSession() as s:
        escaped = "%2E" * len(app_id)   # as sent, clients' own URLs would resolve it
        async with s.post(URL(f"http://127.0.0.1:{agent.port}/app/{escaped}/track",
                              encoded=True), json={"data": [
                {"name": "e", "id": 1, "sessionId": 1, "machineId": "m"}]}) as r:
            body = await r.text()
            assert r.status == 401, body
    assert "path segment" in body and repr(app_id) in body, body
    assert agent.spool.depth == 0


@pytest.mark.parametrize("app_id", [".", ".."])
@pytest.mark.parametrize("protocol", ["nucleus-ws", "nucleus-http"])
async def test_a_dot_segment_app_ids_queue_a_reload_sends_under_the_apps_id_stays_queued(
        make_agent: Any, fake_nucleus: FakeNucleus, fast_backoff: Any, protocol: str,
        app_id: str) -> None:
    """Taken while the upstream sent a `key` of its own, then that key removed by a reload:
    the queued events went to `{url}/app/../track`, which the URL resolves to `{url}/track`
    (`{url}/app/track` for `.`): another path, delivered there by an upstream that serves
    it, else retried for good with last_error blaming the url. They stay queued instead,
    last_error saying why, until a `key` is set again."""
    up = upstream(fake_nucleus, protocol=protocol, key="own")
    fake_nucleus.outage = (503, "0")                           # a websocket's handshake
    fake_nucleus.reply_raw = b'{"error": "try again later"}'   # an HTTP request's answer
    agent = await make_agent(upstreams=[up])
    async with aiohttp.ClientSession() as s:
        async with s.post(URL(f"http://127.0.0.1:{agent.port}/app/{'%2E' * len(app_id)}/track",
                              encoded=True), json={"data": [
                {"name": "e", "id": 1, "sessionId": 1, "machineId": "m"}]}) as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: fake_nucleus.refused + fake_nucleus.frames >= 1)
    write_config(Path(agent.config_path), agent.spool.path, upstreams=[{k: v for k, v in up.items() if k != "key"}])
    await agent.reload()
    fake_nucleus.outage = fake_nucleus.reply_raw = None
    fake_nucleus.events.clear()

    async def sent_or_said() -> bool:
        return bool(fake_nucleus.events) or "path segment" in (
            (await upstream_status(agent.port))["last_error"] or "")

    await wait_for(sent_or_said)
    assert not fake_nucleus.events, fake_nucleus.paths
    assert agent.spool.depth == 1
    # A key of the upstream's own again: they go, to its path.
    write_config(Path(agent.config_path), agent.spool.path, upstreams=[up])
    await agent.reload()
    await wait_for(lambda: agent.spool.depth == 0)
    assert fake_nucleus.paths[-1] == "/app/own/track"


async def test_a_reload_giving_the_upstream_a_dot_segment_key_is_refused(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """An upstream's own `key` of `..` passed check-config and every reload: every app's
    events then went to `{url}/app/../track`, which the URL resolves to `{url}/track`.
    The reload is refused, saying why, and the running config kept."""
    up = upstream(fake_nucleus, protocol="nucleus-http", key="own")
    agent = await make_agent(upstreams=[up])
    write_config(Path(agent.config_path), agent.spool.path, upstreams=[{**up, "key": ".."}])
    await agent.reload()
    assert agent.metrics.reloads_refused == 1
    assert "upstream[0].key" in agent.metrics.reload_error, agent.metrics.reload_error
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/app1/track", json={"data": [
                {"name": "e", "id": 1, "sessionId": 1, "machineId": "m"}]}) as r:
            assert r.status == 200, await r.text()
    await wait_for(lambda: agent.spool.depth == 0)
    assert fake_nucleus.paths == ["/app/own/track"]


async def upstream_status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        (up,) = (await r.json())["upstreams"]
        return dict(up)


@pytest.mark.parametrize("protocol", ["nucleus-ws", "nucleus-http"])
async def test_an_id_too_long_to_be_acknowledged_is_left_out_not_stored_for_good(
        make_agent: Any, fake_nucleus: FakeNucleus, protocol: str) -> None:
    """An id is echoed in every answer that acknowledges it, here and upstream. One of
    70,000 characters made its event larger than batch_max_bytes, so it went alone, and
    the upstream's answer, longer than any answer to a batch this upstream is sent (what a
    websocket reads at most: 64 KiB + the batch's bytes), was never read: the key stuck,
    its event resent for good. Such an id is no module's (theirs are numbers, or short
    strings): the event is left unacknowledged at ingest, saying why, the rest go on."""
    agent = await make_agent(upstreams=[upstream(fake_nucleus, protocol=protocol,
                                                 batch_max_bytes=2048, batch_max_events=2)])
    events = [{"name": "e", "id": i, "sessionId": 1, "machineId": "m"} for i in (1, 2)]
    events.insert(1, {"name": "e", "id": "x" * 70_000, "sessionId": 1, "machineId": "m"})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/k/track",
                          json={"data": events}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json()) == {"reportedIds": [1, 2]}
    await wait_for(lambda: agent.spool.depth == 0, timeout=10)
    assert fake_nucleus.ids() == [1, 2]
