"""`outpost status`: the table from a running agent, and from the spool with none running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest

from agent.families.event import SEGMENT, Event
from agent.ops.status_table import render
from agent.settings import StorageConfig
from agent.spool import Spool
from tests.conftest import ROOT, free_port, write_config
from tests.fakes.loopback_server import serving
from tests.fakes.ops_scene import LIVE, QUEUED, REFUSED, Scene, populate, post_events, settled
from tests.spool_files import leave_salvage_pending
from tests.test_upstream_faults import manual
from tests.waiting import run_outpost, wait_for


def row(text: str, name: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return line.split()


async def test_table_from_running_agent(make_agent: Any) -> None:
    async with Scene() as scene:
        agent = await make_agent(port=free_port(), upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        code, text = await run_outpost("status", "--config", agent.config_path)
        assert code == 0, text
        code, raw = await run_outpost("status", "--json", "--config", agent.config_path)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
                live_status = await r.json()
    assert f"agent at http://127.0.0.1:{agent.port}" in text
    assert f"queue:    {QUEUED} events, oldest" in text
    # UPSTREAM PROTOCOL STATE QUEUED BYTES(2 words) ACKED RETRIES LAST-ACK... LAST ERROR
    assert row(text, "live")[:4] == ["live", "nucleus-ws", "idle", "0"]
    assert row(text, "live")[6:8] == [str(LIVE), "0"]
    assert row(text, "live")[9] == "ago"
    assert row(text, "strict")[:4] == ["strict", "nucleus-http", "idle", "0"]
    down = row(text, "down")
    assert down[:4] == ["down", "nucleus-http", "backoff", str(QUEUED)]
    assert " ".join(down[6:]) == ('0 1 - HTTP 503: {"error": "refused by the test"}; next try '
                                  "in 3600s, as its Retry-After asks")
    assert f"events:   ingested {LIVE + REFUSED + QUEUED}, duplicates 0, acked {LIVE}" in text
    assert f"dropped:  dead_lettered {REFUSED}" in text
    assert f"dead:     {REFUSED} kept" in text
    [dead] = [ln.split() for ln in text.splitlines() if "strict" in ln and "HTTP" in ln]
    assert dead[:2] == [str(REFUSED), "strict"] and dead[3:6] == ["ago", "HTTP", "400:"]
    data = json.loads(raw)
    for key in ("queue_depth", "counters", "drops"):
        assert data[key] == live_status[key]
    assert [u["state"] for u in data["upstreams"]] == ["idle", "idle", "backoff"]


async def test_table_from_spool_when_no_agent_runs(make_agent: Any, tmp_path: Path) -> None:
    async with Scene() as scene:
        agent = await make_agent(port=free_port(), upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        await agent.stop()
    code, text = await run_outpost("status", "--config", agent.config_path)
    assert code == 0, text
    assert "spool, no agent running" in text
    # How long events have waited, as the running agent shows it: the operator of a
    # stopped agent asks that first (it was shown only while the agent ran).
    assert f"queue:    {QUEUED} events, oldest " in text, text
    assert row(text, "down")[:4] == ["down", "nucleus-http", "offline", str(QUEUED)]
    assert row(text, "live")[:4] == ["live", "nucleus-ws", "offline", "0"]
    assert f"dropped:  dead_lettered {REFUSED}" in text
    code, raw = await run_outpost("status", "--json", "--config", agent.config_path)
    data = json.loads(raw)
    assert data["queue_depth"] == QUEUED and data["drops"]["dead_lettered"] == REFUSED
    assert data["counters"]["acked"] == LIVE
    assert 0 <= data["oldest_event_age_s"] < 600, data["oldest_event_age_s"]

    fresh = write_config(tmp_path / "fresh.toml", tmp_path / "none" / "spool.db",
                         port=free_port())
    code, text = await run_outpost("status", "--config", str(fresh))
    assert code == 0 and "no agent running, no spool yet" in text
    assert "no upstream configured" in text



async def test_the_table_shows_dead_letters_gone_and_dedupe_keys_forgotten(
        tmp_path: Path) -> None:
    """Dead letters the cap or expiry deleted, or an operator retried or purged, and dedupe
    keys forgotten early: counters the docs list for `outpost status`, which it never
    showed (only /status and /metrics did): a spool that deleted dead letters to make
    room said nothing of it but its log."""
    spool_path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(spool_path)))
    await spool.close()
    with contextlib.closing(sqlite3.connect(spool_path)) as db, db:
        db.executemany("INSERT INTO counters(name, value) VALUES (?, ?)", [
            ("dead_lettered", 20), ("dead_retried", 2), ("dead_purged", 3),
            ("dead_dropped_full", 5), ("dead_expired", 4), ("dedupe_forgotten", 1200)])
    config = write_config(tmp_path / "agent.toml", spool_path, port=free_port())
    code, text = await run_outpost("status", "--config", str(config))
    assert code == 0, text
    assert "dead out: dead_retried 2, dead_purged 3, dead_dropped_full 5, dead_expired 4" in text
    assert "dedupe:   dedupe_forgotten 1200" in text

def test_render_clips_long_errors_and_formats_ages() -> None:
    text = render({
        "version": "9", "source": "agent", "uptime_s": 7300, "time": 1000.0,
        "queue_depth": 2, "oldest_event_age_s": 90061, "spool": {"path": "/s.db",
                                                                   "used_bytes": 3 * 1024 ** 2,
                                                                   "max_bytes": 512 * 1024 ** 2},
        "upstreams": [{"name": "u", "protocol": "segment-http", "state": "backoff",
                       "queue_depth": 2, "queue_bytes": 2048, "acked": 1, "retries": 4,
                       "last_ack": 940.0, "last_error": "boom\n" + "x" * 200}],
        "unrouted": {"keys": 1, "queue_depth": 5},
        "counters": {"spool_corrupt": 1}, "drops": {"expired": 3, "rejected_full": 0},
        "ingest": {"refused": {"capture": {"401": 1}, "nucleus": {"400": 2, "1007": 1}}},
    })
    assert "outpost 9: agent, up 2.0h" in text
    assert "queue:    2 events, oldest 1.0d old" in text
    assert "spool:    3.0 MB of 512.0 MB, /s.db" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("u "))
    assert "2.0 KB" in line and "1.0m ago" in line and line.endswith("…")
    assert "boom x" in line and "\n" not in line
    assert "5 events of 1 key(s) match no upstream" in text
    assert "dropped:  expired 3" in text and "rejected_full" not in text
    assert "corrupt spools moved aside: 1" in text
    assert "refused:  capture 401: 1, nucleus 400: 2, nucleus 1007: 1 (requests)" in text


async def test_the_table_shows_a_long_error_s_retry_after_wait(make_agent: Any) -> None:
    """An upstream's 429 with a long body and a Retry-After of 300 s: the table's error is
    cut to one line, but the wait the key keeps comes last in it, and was cut with the
    rest: the operator saw a key in backoff and not for how long."""
    async def collector(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(
            {"error": "rate limit exceeded for this write key: " + "x" * 200},
            status=429, headers={"Retry-After": "300"})

    timing, seams = manual()
    async with serving("/v1/batch", collector) as url:
        agent = await make_agent(upstreams=[{"name": "up", "protocol": "segment-http",
                                             "url": url, "flush_interval_s": 0.02}],
                                 seams=seams)
        await post_events(agent.port, "app", range(1))
        await wait_for(lambda: agent.forwarding.states["up"].retries == 1)
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        line = next(ln for ln in render(await r.json()).splitlines() if ln.startswith("up "))
    assert "HTTP 429: {" in line and "rate limit" in line, line
    assert line.endswith("…; next try in 300s, as its Retry-After asks"), line


async def test_live_and_offline_snapshots_have_the_same_keys(make_agent: Any) -> None:
    async with Scene() as scene:
        agent = await make_agent(port=free_port(), upstreams=scene.upstreams())
        await populate(agent.port)
        await settled(agent)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
                live = await r.json()
        await agent.stop()
    code, raw = await run_outpost("status", "--json", "--config", agent.config_path)
    assert code == 0, raw
    offline = json.loads(raw)
    assert offline["source"] == "spool, no agent running"
    assert live.keys() == offline.keys()
    assert live["spool"].keys() == offline["spool"].keys()
    assert [u.keys() for u in live["upstreams"]] == [u.keys() for u in offline["upstreams"]]
    for key in ("counters", "drops", "dead_letters", "queue_depth", "unrouted"):
        assert live[key] == offline[key], key
    assert live["dead_letters"] == REFUSED
    # What only a running agent knows is null offline, not missing.
    for key in ("uptime_s", "history", "connections", "ingest"):
        assert live[key] is not None and offline[key] is None, key
    assert 0 <= live["oldest_event_age_s"] <= offline["oldest_event_age_s"] < 600, offline
    # The spool's size and cap are the file's and the config's: an operator whose agent
    # stopped (a full disk, say) sees them (they were null, and the table had no size).
    used = offline["spool"]["used_bytes"]
    assert isinstance(used, int) and 0 < used <= agent.spool.path.stat().st_size, used
    assert offline["spool"]["max_bytes"] == live["spool"]["max_bytes"] == 512 * 1024 * 1024
    code, text = await run_outpost("status", "--config", agent.config_path)
    assert code == 0 and f" KB of 512.0 MB, {agent.spool.path}\n" in text, text
    assert {u["acked"] for u in offline["upstreams"]} == {None}
    assert [u["state"] for u in offline["upstreams"]] == ["offline"] * 3


async def test_a_foreign_server_on_the_agent_s_port_is_no_traceback(tmp_path: Path) -> None:
    """Something else answers at the configured address, with JSON of another shape or an
    event stream of its own: status, flush and tail crashed with KeyError or TypeError
    (audit). Each says so in one line; status reads the spool instead."""
    app = aiohttp.web.Application()
    replies: dict[str, bytes] = {"/status": b"[1, 2]", "/flush": b'"ok"'}

    async def answer(request: aiohttp.web.Request) -> aiohttp.web.Response:
        if request.path == "/tail":
            return aiohttp.web.Response(body=b'data: {"kind": "ingested"}\n\n',
                                        content_type="text/event-stream")
        return aiohttp.web.Response(body=replies[request.path], content_type="application/json")
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port))
        for status in (b"[1, 2]", b'{"x": 1}'):
            replies["/status"] = status
            code, text = await run_outpost("status", "--config", cfg)
            assert code == 0 and "Traceback" not in text, text
            assert "not an Outpost agent" in text and "no agent running" in text, text
        for command in ("flush", "tail"):
            code, text = await run_outpost(command, "--config", cfg)
            assert code == 1 and "Traceback" not in text, text
            assert "not an Outpost agent" in text and text.count("\n") == 1, text
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [200, 500])
async def test_a_foreign_server_s_deeply_nested_json_is_no_traceback(tmp_path: Path,
                                                                     status: int) -> None:
    """Something else at the agent's address answers with JSON nested deeper than Python's
    parser recurses (as an answer, as a refusal's body, as an event of its stream): every
    command that reaches the agent ended with RecursionError's traceback, which is no
    ValueError. Each says in one line that it is not an Outpost agent."""
    deep = b"[" * 100_000 + b"]" * 100_000

    async def answer(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        if request.path == "/tail":
            return aiohttp.web.Response(body=b"data: " + deep + b"\n\n", status=status,
                                        content_type="text/event-stream")
        return aiohttp.web.Response(body=deep, status=status, content_type="application/json")
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    # What check-config --reload would signal, were the answer taken for the agent's.
    bystander = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port))
        code, text = await run_outpost("status", "--config", cfg)
        assert code == 0 and "Traceback" not in text, text
        assert "not an Outpost agent" in text and "no agent running" in text, text
        for command in (["flush"], ["tail"], ["dead", "list"],
                        ["check-config", "--reload", str(bystander.pid)]):
            code, text = await run_outpost(*command, "--config", cfg)
            assert code == 1 and "Traceback" not in text, (command, text)
            assert "not an Outpost agent" in text and text.count("\n") == 1, (command, text)
    finally:
        bystander.kill()
        await bystander.wait()
        await runner.cleanup()


async def test_a_redirect_from_the_agent_s_port_is_not_followed(tmp_path: Path) -> None:
    """The agent never redirects: a 3xx at its address is another server's, and following
    it showed (and acted on) what a third server said as the agent's answer."""
    reached: list[str] = []

    async def elsewhere(request: aiohttp.web.Request) -> aiohttp.web.Response:
        reached.append(request.path)
        return aiohttp.web.json_response({"queue_depth": 7, "spool": {}})

    async def redirect(request: aiohttp.web.Request) -> aiohttp.web.Response:
        raise aiohttp.web.HTTPFound(f"http://127.0.0.1:{other}{request.path}")

    runners = []
    ports = []
    for handler in (elsewhere, redirect):
        app = aiohttp.web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        ports.append(free_port())
        await aiohttp.web.TCPSite(runner, "127.0.0.1", ports[-1]).start()
    other = ports[0]
    try:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=ports[1]))
        code, text = await run_outpost("status", "--config", cfg)
        assert reached == [] and code == 0 and "Traceback" not in text, (reached, text)
        assert "not an Outpost agent" in text and "no agent running" in text, text
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.mark.parametrize("folder", ["100%25", "take#2", "why?"])
async def test_a_spool_path_holding_uri_characters_is_the_spool_used(
        make_agent: Any, tmp_path: Path, folder: str) -> None:
    # SQLite reads a "file:" URI: a path's own %xx, # or ? must not be taken as its escapes,
    # fragment or query (the spool was then another file, or none: every event got a 503).
    spool = tmp_path / folder / "spool.db"
    agent = await make_agent(port=free_port(), spool=spool)
    await post_events(agent.port, "app-kept", range(3))
    await agent.stop()
    code, text = await run_outpost("status", "--config", agent.config_path)
    assert code == 0, text
    assert "spool, no agent running" in text and "queue:    3 events" in text, text
    code, text = await run_outpost("dead", "list", "--config", agent.config_path)
    assert code == 0 and text.startswith(f"0 dead letters ({spool}, no agent running)"), text
    assert sorted(p.name for p in spool.parent.parent.iterdir() if p.is_file()) == ["agent0.toml"]


async def test_an_answer_cut_short_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """What holds the agent's port sends a reply's head and part of its body, then closes
    (an agent killed mid-answer, or another server): `outpost status` and `outpost flush`
    ended with http.client.IncompleteRead's traceback, as the body's read was outside
    what they catch. Each says so in one line, with exit code 1."""
    cut = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cut
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"spool\": ")
        await writer.drain()
        writer.close()
        cut += 1

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port))
        for command in ("status", "flush"):
            code, text = await run_outpost(command, "--config", cfg)
            assert "Traceback" not in text, text
            assert code == 1 and text.count("\n") == 1, text
        assert cut == 2
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reply", [
    b'{"spool": 1}',
    b'{"spool": {}, "upstreams": [{}]}',
    b'{"spool": {"used_bytes": "many", "max_bytes": 1}}',
    b'{"spool": {}, "counters": [1]}',
    b'{"spool": {}, "dead_letters": 1, "dead_reasons": [{"count": 1}]}',
    b'{"spool": {}, "upstreams": [{"name": "a", "protocol": "p", "state": "s", '
    b'"queue_depth": 1, "queue_bytes": "many"}]}',
])
async def test_a_status_of_another_shape_is_no_traceback(tmp_path: Path, reply: bytes) -> None:
    """Something at the agent's address answers /status with a JSON object that holds
    `spool`, the one field `outpost status` looked for, but not an agent's snapshot: the
    table crashed on it (AttributeError, KeyError, TypeError, ValueError) with a
    traceback. It is not an Outpost agent's answer: said in one line, and the spool read."""
    app = aiohttp.web.Application()

    async def answer(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=reply, content_type="application/json")
    app.router.add_get("/status", answer)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port))
        for args in ((), ("--json",)):
            code, text = await run_outpost("status", "--config", cfg, *args)
            assert code == 0 and "Traceback" not in text, text
            assert "not an Outpost agent" in text and "no agent running" in text, text
    finally:
        await runner.cleanup()


async def test_the_sync_line_shows_hidden_characters_escaped(
        make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transmit profile's metered detail names the D-Bus address it could not reach:
    an abstract socket's NUL, and any escape sequence in the address, reached the
    terminal raw (`outpost doctor` escapes the same detail)."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:abstract=x\x1b[2J")
    agent = await make_agent(sync={"on_metered": "hold"})
    await wait_for(lambda: agent.sync is not None and agent.sync.errors > 0)
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        [line] = [ln for ln in render(await r.json()).splitlines() if ln.startswith("sync:")]
    hidden = sorted({c for c in line if not c.isprintable()})
    assert not hidden and "(no D-Bus at \\x00x\\x1b[2J" in line, (hidden, line)


async def test_offline_status_shows_the_rest_when_the_dead_reasons_cannot_be_read(
        tmp_path: Path) -> None:
    """No agent running, and the pages of the dead letters' summary damaged: `outpost
    status` said only that it could not read the spool (exit 1), though the queues,
    counters and size read fine. It shows them, and says what it could not read."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        await spool.append([Event("k", SEGMENT, i, b'{"type":"track"}') for i in range(3)])
        rows = await spool.fetch(spool.streams["k"].id, 0, 10)
        await spool.dead_letter([(rows[0].seq, "up", "HTTP 400: bad")])
    finally:
        await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE "
                                          "tbl_name = 'dead_groups'")]
    with open(path, "r+b") as fh:
        for root in roots:
            fh.seek((root - 1) * size)
            fh.write(b"\xff" * size)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    code, text = await run_outpost("status", "--config", str(cfg))
    assert code == 0, text
    assert "spool, no agent running" in text and "queue:    2 events" in text, text
    assert "dead:     1 kept" in text and "cannot read them" in text, text
    code, raw = await run_outpost("status", "--json", "--config", str(cfg))
    assert code == 0 and json.loads(raw)["dead_reasons_error"], raw


async def test_a_stopped_agent_s_salvage_pending_is_said_not_shown_as_an_empty_queue(
        make_agent: Any, tmp_path: Path) -> None:
    """The agent moved its damaged spool aside and stopped before copying its events into
    the fresh one (its next start does): read from the fresh spool alone, `outpost status`
    showed nothing queued while the events waited in the file moved aside."""
    agent = await make_agent(port=free_port(), upstreams=[])
    await post_events(agent.port, "app-a", range(3))
    await agent.stop()
    moved = await leave_salvage_pending(Path(agent.spool.path), tmp_path / "fresh")
    code, raw = await run_outpost("status", "--json", "--config", agent.config_path)
    assert code == 0, raw
    source = json.loads(raw)["source"]
    assert "salvage" in source and str(moved) in source and "start the agent" in source, source
    code, text = await run_outpost("status", "--config", agent.config_path)
    assert code == 0 and source in text.splitlines()[0], text


async def garbled_spool(tmp_path: Path, garble: str, *, dead_letter: bool = True) -> Path:
    """A stopped agent's spool of three events (the first a dead letter, with
    ``dead_letter``), then damaged by the SQL ``garble``."""
    path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        await spool.append([Event("k", SEGMENT, i, b'{"type":"track"}') for i in range(3)])
        if dead_letter:
            rows = await spool.fetch(spool.streams["k"].id, 0, 10)
            await spool.dead_letter([(rows[0].seq, "up", "HTTP 400: bad")])
    finally:
        await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(garble)
        db.commit()
    return path


@pytest.mark.parametrize("garble", [
    "UPDATE streams SET depth = 'x'",                    # a queue's depth
    "UPDATE records SET received = 'x'",                 # the oldest event's receipt time
], ids=["depth", "received"])
async def test_offline_status_of_a_value_garbled_into_another_type_is_one_line(
        tmp_path: Path, garble: str) -> None:
    """Damage that turns a value into another type is read by SQLite without complaint
    (the tables are not STRICT); the agent takes it for a corrupt spool and salvages it at
    its start. `outpost status` with no agent running printed a traceback (TypeError)."""
    path = await garbled_spool(tmp_path, garble, dead_letter=False)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    for json_too in ([], ["--json"]):
        code, out = await run_outpost("status", *json_too, "--config", str(cfg))
        assert "Traceback" not in out, out
        assert code == 1 and len(out.strip().splitlines()) == 1, out
        assert str(path) in out and "malformed" in out, out


async def test_offline_status_counts_the_dead_letters_when_their_summary_is_damaged(
        tmp_path: Path) -> None:
    """The summary of the dead letters by reason garbled (a time turned to text): the
    agent's open counts it again from the letters, and so does `outpost dead list` with
    none running; `outpost status` read the summary as it was and printed a traceback."""
    path = await garbled_spool(tmp_path, "UPDATE dead_groups SET newest = 'x'")
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    code, text = await run_outpost("status", "--config", str(cfg))
    assert code == 0 and "Traceback" not in text, text
    assert "dead:     1 kept" in text and "HTTP 400: bad" in text, text
    code, raw = await run_outpost("status", "--json", "--config", str(cfg))
    assert code == 0, raw
    [group] = json.loads(raw)["dead_reasons"]
    assert group["reason"] == "HTTP 400: bad" and isinstance(group["newest"], int), group


@pytest.mark.parametrize("garble", ["UPDATE dead_groups SET reason = x'ff'",
                                    "UPDATE dead_groups SET upstream = x'ff'"],
                         ids=["reason", "upstream"])
async def test_offline_status_of_a_dead_letter_summary_holding_bytes_is_no_traceback(
        tmp_path: Path, garble: str) -> None:
    """Damage that turns a summary's reason or upstream into bytes keeps its counts and
    times as they were, so the summary agrees with the letters: `outpost status` showed it,
    and printed a TypeError traceback. It counts from the letters instead."""
    path = await garbled_spool(tmp_path, garble)
    cfg = write_config(tmp_path / "agent.toml", path, port=free_port())
    code, text = await run_outpost("status", "--config", str(cfg))
    assert code == 0 and "Traceback" not in text, text
    assert "dead:     1 kept" in text and "HTTP 400: bad" in text, text
    code, raw = await run_outpost("status", "--json", "--config", str(cfg))
    assert code == 0, raw
    [group] = json.loads(raw)["dead_reasons"]
    assert group["reason"] == "HTTP 400: bad" and group["upstream"] == "up", group


async def test_an_agent_started_on_a_dead_letter_summary_holding_bytes_answers_status(
        make_agent: Any, tmp_path: Path) -> None:
    """The agent's open counts a damaged summary again from the letters, but told damage by
    its sums alone: a reason garbled into bytes kept them agreeing, and every /status was a
    500 (`outpost status`: "not an Outpost agent") until the group changed."""
    path = await garbled_spool(tmp_path, "UPDATE dead_groups SET reason = x'ff'")
    agent = await make_agent(port=free_port(), spool=path)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            assert r.status == 200, await r.text()
            [group] = (await r.json())["dead_reasons"]
    assert group["reason"] == "HTTP 400: bad", group
    code, text = await run_outpost("status", "--config", agent.config_path)
    assert code == 0 and "HTTP 400: bad" in text, text


async def test_every_status_field_is_named_in_the_operations_guide(make_agent: Any) -> None:
    """docs/operations.md's `GET /status` item is where an operator scripting against
    `outpost status --json` learns its fields: each one the agent answers is named there
    (`version`, `time` and `source` were not)."""
    guide = (ROOT / "docs" / "operations.md").read_text()
    item = guide[guide.index("- `GET /status`"):guide.index("- `GET /healthz`")]
    named = set(re.findall(r"`([a-z_]+)`", item))
    async with Scene() as scene:
        agent = await make_agent(port=free_port(), upstreams=scene.upstreams())
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
                live = await r.json()
    fields = set(live) | set(live["upstreams"][0])
    fields |= {k for part in ("spool", "unrouted", "connections", "ingest", "sync", "reload")
               for k in live[part]}
    assert sorted(fields - named) == []
