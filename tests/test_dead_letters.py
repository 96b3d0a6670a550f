"""`outpost dead list|show|export|retry|purge`, run as the real command, against a running
agent (its endpoints) and a stopped one (the spool file); a retry delivered end to end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import sqlite3
import stat
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from filelock import FileLock

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.logs import fingerprint
from agent.ops.shared_terms import EXPORT_PAGE
from agent.paths import spool_lock
from agent.service import Agent
from agent.settings import StorageConfig
from agent.spool import Spool, dead
from agent.spool.as_found import as_found
from agent.spool.schema import read_offline
from tests.conftest import free_port, write_config
from tests.fakes.loopback_server import serving
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.ops_scene import post_events
from tests.spool_files import leave_salvage_pending
from tests.test_wal_sync import strace
from tests.waiting import ROOT, run_outpost, wait_for


class RefusingNucleus(FakeNucleus):
    """A Nucleus upstream that refuses every event for good (HTTP ``refuse``) until told
    to accept (``refuse = None``); refused events are not recorded."""

    def __init__(self, refuse: int | None = 400) -> None:
        super().__init__()
        self.refuse = refuse

    async def _http(self, request: web.Request) -> web.Response:
        if self.refuse is not None:
            # Like real upstreams, it echoes part of the request (here its key).
            return web.json_response({"error": f"bad event ({self.refuse}) at {request.path}"},
                                     status=self.refuse)
        return await super()._http(request)


def upstream(name: str, fake: FakeNucleus, keys: list[str]) -> dict[str, Any]:
    return {"name": name, "protocol": "nucleus-http", "url": fake.http_url, "keys": keys,
            "flush_interval_s": 0.05, "timeout_s": 2}


async def dead_letters(agent: Agent, n: int) -> None:
    assert agent.spool is not None
    spool = agent.spool
    await wait_for(lambda: spool.dead_count == n)


async def outpost(*args: str, config: str, code: int = 0) -> str:
    got, text = await run_outpost("dead", *args, "--config", config)
    assert got == code, text
    return text


async def test_retry_on_running_agent_delivers_at_the_tail(make_agent: Any,
                                                           tmp_path: Path) -> None:
    up = RefusingNucleus()
    await up.start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        cfg = agent.config_path
        await post_events(agent.port, "app-a", range(3))
        await dead_letters(agent, 3)
        listed = await outpost("list", config=cfg)
        assert f"3 dead letters (http://127.0.0.1:{agent.port})" in listed
        [group] = [ln.split() for ln in listed.splitlines() if "HTTP 400" in ln and
                   ln.split()[1] == "up"]
        assert group[0] == "3" and group[4:6] == ["HTTP", "400:"]
        lines = listed.splitlines()
        entries = [ln.split() for ln in lines[lines.index(next(
            ln for ln in lines if ln.startswith("ID "))) + 1:]]
        assert [e[1:3] for e in entries] == [[fingerprint("app-a"), "up"]] * 3
        first = int(entries[0][0])
        shown = json.loads(await outpost("show", str(first), config=cfg))
        assert shown["body"]["id"] == 0 and shown["key"] == fingerprint("app-a")
        assert shown["upstream"] == "up" and shown["reason"].startswith("HTTP 400")
        await outpost("show", "999999", config=cfg, code=1)
        out = tmp_path / "dead.jsonl"
        out.write_text("old, readable by all")
        out.chmod(0o644)
        assert "exported 3 dead letters" in await outpost("export", str(out), config=cfg)
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert [json.loads(ln)["body"]["id"] for ln in out.read_text().splitlines()] == [0, 1, 2]
        await outpost("retry", config=cfg, code=2)  # neither --reason nor --all
        assert agent.spool.dead_count == 3

        up.refuse = None
        await post_events(agent.port, "app-a", range(10, 11))
        await wait_for(lambda: up.ids() == [10])
        text = await outpost("retry", "--all", config=cfg)
        assert "re-queued 3 dead letters" in text and "running agent" in text
        # Delivered once each, in their old order, after what was queued before them.
        await wait_for(lambda: up.ids() == [10, 0, 1, 2])
        await wait_for(lambda: agent.spool.depth == 0)
        assert agent.spool.dead_count == 0
        assert agent.spool.counters["dead_retried"] == 3
        # Dedupe: an app's late resend of a retried event is still a resend.
        await post_events(agent.port, "app-a", range(1))
        assert agent.spool.counters["duplicates"] == 1 and agent.spool.depth == 0
        assert "0 dead letters" in await outpost("list", config=cfg)
    finally:
        await up.stop()


@pytest.mark.parametrize("change", [("retry", "--all"), ("purge", "--all"),
                                    ("purge", "--all", "--upstream", "up")], ids=" ".join)
async def test_a_retry_or_purge_never_reaches_an_agent_on_another_spool(
        make_agent: Any, tmp_path: Path, change: tuple[str, ...]) -> None:
    """Two configs with one listen.port (a staging copy, or a user's defaults beside the
    machine-wide service's): the agent answering at it runs on another spool than the
    config names, and `dead purge --all --config other.toml` purged that agent's letters
    ("purged 3 dead letters (the running agent)"). Nothing is asked of it now."""
    up = RefusingNucleus()
    await up.start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(agent.port, "app-a", range(3))
        await dead_letters(agent, 3)
        other = write_config(tmp_path / "other.toml", tmp_path / "other" / "spool.db",
                             port=agent.port)
        text = await outpost(*change, config=str(other), code=1)
        line = text.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, text
        assert str(agent.spool.path) in line and str(tmp_path / "other" / "spool.db") in line
        assert agent.spool.dead_count == 3 and not (tmp_path / "other").exists()
        async with aiohttp.ClientSession() as s:   # a spool that names none: a mistake
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/purge",
                              json={"all": True, "spool": 5}) as r:
                assert r.status == 400, await r.text()
        assert agent.spool.dead_count == 3
        # Its own config, or one naming its spool through a symlink, still reaches it.
        (tmp_path / "link.db").symlink_to(agent.spool.path)
        linked = write_config(tmp_path / "linked.toml", tmp_path / "link.db", port=agent.port)
        assert "3 dead letters" in await outpost(*change, config=str(linked))
    finally:
        await up.stop()


async def test_stopped_agent_list_export_purge_retry(make_agent: Any, tmp_path: Path) -> None:
    bad, worse = await RefusingNucleus(400).start(), await RefusingNucleus(422).start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[
            upstream("bad", bad, ["app-a"]), upstream("worse", worse, ["app-b"])])
        await post_events(agent.port, "app-a", range(2))
        await post_events(agent.port, "app-b", range(5, 6))
        await dead_letters(agent, 3)
        await agent.stop()
    finally:
        await bad.stop()
        await worse.stop()
    cfg = agent.config_path
    listed = await outpost("list", config=cfg)
    assert "3 dead letters" in listed and "no agent running" in listed
    assert {"bad", "worse"} <= set(listed.split())

    out = tmp_path / "dead.jsonl"
    assert "exported 3 dead letters" in await outpost("export", str(out), config=cfg)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    a, b = fingerprint("app-a"), fingerprint("app-b")
    assert [(r["key"], r["body"]["id"]) for r in rows] == [(a, 0), (a, 1), (b, 5)]

    await outpost("purge", config=cfg, code=2)
    reason = rows[0]["reason"]
    assert "purged 2 dead letters" in await outpost("purge", "--reason", reason, config=cfg)
    listed = await outpost("list", "--json", config=cfg)
    assert [e["key"] for e in json.loads(listed)["entries"]] == [b]
    # A reason that matches none (mistyped) said nothing: the summary, and no entries.
    listed = await outpost("list", "--reason", "HTTP 422", config=cfg)
    assert listed.splitlines()[-1] == ("no dead letter has the reason 'HTTP 422': give one "
                                       "exactly as `outpost dead list --json` shows it"), listed
    assert "ID " not in listed and listed.startswith("1 dead letters"), listed
    # So does a purge (and a retry) of it: "purged 0 dead letters", and no word why.
    purged = await outpost("purge", "--reason", "HTTP 422", config=cfg)
    assert purged.splitlines() == [
        f"purged 0 dead letters ({agent.spool.path} (no agent running))",
        "no dead letter has the reason 'HTTP 422': give one exactly as `outpost dead list "
        "--json` shows it"], purged

    text = await outpost("retry", "--all", config=cfg)
    assert "re-queued 1 dead letters" in text and "no agent running" in text
    # The next agent sends it to a now accepting upstream.
    good = await FakeNucleus().start()
    try:
        again = await make_agent(port=free_port(), upstreams=[upstream("worse", good, ["*"])])
        await wait_for(lambda: good.ids() == [5])
        await wait_for(lambda: again.spool.depth == 0)
        assert again.spool.dead_count == 0
        assert again.spool.counters["dead_purged"] == 2
        assert again.spool.counters["dead_retried"] == 1
    finally:
        await good.stop()


async def test_offline_change_refused_while_an_agent_holds_the_spool(
        make_agent: Any, tmp_path: Path) -> None:
    up = await RefusingNucleus().start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(agent.port, "app-a", range(2))
        await dead_letters(agent, 2)
        # The same spool, but a listen port no agent answers on: the command falls back
        # to the file, which the running agent holds.
        other = write_config(tmp_path / "other.toml", agent.spool.path, port=free_port())
        for cmd in ("purge", "retry"):
            text = await outpost(cmd, "--all", config=str(other), code=1)
            assert "in use" in text and "Traceback" not in text
        assert agent.spool.dead_count == 2
        assert "2 dead letters" in await outpost("list", config=str(other))
        # The agent goes on committing: the refused attempt left nothing locked.
        await post_events(agent.port, "app-a", range(7, 8))
        await dead_letters(agent, 3)
    finally:
        await up.stop()


async def test_browser_pages_cannot_reach_dead_letters(make_agent: Any) -> None:
    up = await RefusingNucleus().start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])],
                                 listen={"allowed_origins": ["https://app.example"]})
        await post_events(agent.port, "app-a", range(2))
        await dead_letters(agent, 2)
        base = f"http://127.0.0.1:{agent.port}"
        own = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
        async with aiohttp.ClientSession() as s:
            # An origin allowed to send events still may not read or change dead letters.
            for headers in ({"Origin": "https://app.example"},
                            {"Origin": "https://evil.example"},
                            {"Sec-Fetch-Site": "cross-site", "Referer": "https://app.example/"}):
                async with s.post(f"{base}/dead/purge", json={"all": True},
                                  headers=headers) as r:
                    assert r.status == 403, await r.text()
                async with s.get(f"{base}/dead/export", headers=headers) as r:
                    assert r.status == 403, await r.text()
            # A form post (no JSON) from anywhere changes nothing.
            async with s.post(f"{base}/dead/purge", data={"all": "true"}) as r:
                assert r.status == 415, await r.text()
            assert agent.spool.dead_count == 2
            async with s.get(f"{base}/dead", headers=own) as r:
                assert r.status == 200
                assert (await r.json())["count"] == 2
            async with s.get(f"{base}/status") as r:
                status = await r.json()
            async with s.get(f"{base}/metrics") as r:
                metrics = await r.text()
        assert status["dead_letters"] == 2
        [group] = status["dead_reasons"]
        assert group["count"] == 2 and group["upstream"] == "up"
        assert group["reason"].startswith("HTTP 400") and "body" not in group
        assert "app-a" not in group["reason"]  # a key, echoed by the upstream: redacted
        assert "outpost_dead_letters 2" in metrics.splitlines()
    finally:
        await up.stop()


async def test_a_malformed_dead_letter_request_is_a_client_error(make_agent: Any) -> None:
    """A wrong Content-Type, bad JSON, a reason that is no string or a limit that is no
    number was answered 409 Conflict, as if the spool were busy: 415 and 400, as every
    other route answers a malformed request, with the same clear words."""
    agent = await make_agent(port=free_port())
    base = f"http://127.0.0.1:{agent.port}"
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for what in ("retry", "purge"):
            async with s.post(f"{base}/dead/{what}", data="{}",
                              headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415 and "send JSON" in (await r.json())["error"]
            for body, says in (("{", "not JSON"), ("[]", "JSON object"),
                               ('{"reason": 5}', "name a reason"), ("{}", "name a reason")):
                async with s.post(f"{base}/dead/{what}", data=body, headers=json_type) as r:
                    assert r.status == 400, (what, body, r.status)
                    assert says in (await r.json())["error"]
        async with s.get(f"{base}/dead?limit=abc") as r:
            assert r.status == 400 and (await r.json())["error"] == "limit is a number"


def spool_books(path: Path) -> tuple[int, int, list[tuple[int, int]]]:
    """(depth the streams table says, live events the records hold, each record's
    (first seq, n)) of a closed spool, and its integrity check passed."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        depth = conn.execute("SELECT coalesce(sum(depth), 0) FROM streams").fetchone()[0]
        live = conn.execute("SELECT coalesce(sum(live), 0) FROM records").fetchone()[0]
        spans = conn.execute("SELECT id, n FROM records ORDER BY id").fetchall()
    finally:
        conn.close()
    return depth, live, spans


async def test_retry_beside_ingest_keeps_the_spool_whole(make_agent: Any) -> None:
    """A retry while apps post: one writer, so seqs never overlap and depths add up."""
    up = RefusingNucleus()
    await up.start()
    try:
        # app-b has no upstream: its events stay queued, so every record stays to count.
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["app-a"])])
        await post_events(agent.port, "app-a", range(20))
        await dead_letters(agent, 20)
        up.refuse = 503  # retried events stay queued too (backoff)
        base = f"http://127.0.0.1:{agent.port}"
        async with aiohttp.ClientSession() as s:
            async def retry() -> int:
                async with s.post(f"{base}/dead/retry", json={"all": True}) as r:
                    assert r.status == 200, await r.text()
                    return int((await r.json())["retried"])
            got = await asyncio.gather(post_events(agent.port, "app-b", range(30)), retry(),
                                       post_events(agent.port, "app-b", range(30, 60)))
        assert got[1] == 20 and agent.spool.dead_count == 0
        assert agent.spool.depth == 80
        await agent.stop()
        depth, live, spans = spool_books(agent.spool.path)
        assert depth == live == 80
        for (a, n), (b, _) in zip(spans, spans[1:]):
            assert a + n <= b  # no two records share a seq
    finally:
        await up.stop()


async def test_no_agent_and_no_spool_yet(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path / "a.toml", tmp_path / "none.db", port=free_port()))
    assert "no dead letters (no agent answering, and no spool yet" in await outpost(
        "list", config=cfg)
    text = await outpost("retry", "--all", config=cfg, code=1)
    assert text.startswith("outpost: no spool at") and len(text.splitlines()) == 1
    assert not (tmp_path / "none.db").exists()  # nothing created


LARGE_LETTERS, LARGE_LETTER_BYTES = 100, 300_000   # ~400 KB each once base64: 40 MB
LETTERS_PEAK = 20 * 1024 * 1024


async def test_large_dead_letters_are_exported_and_retried_a_few_megabytes_at_a_time(
        make_agent: Any) -> None:
    """A retry read every chosen dead letter at once, and an export read them 1,000 at a
    time whatever their size: 40 MB of dead letters were 40 MB of memory and more at
    once, and dead letters can fill the spool. Traced: the agent's Python allocations."""
    up = RefusingNucleus()
    await up.start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        base = f"http://127.0.0.1:{agent.port}"
        async with aiohttp.ClientSession() as s:
            for i in range(0, LARGE_LETTERS, 10):
                data = [{"type": "event", "name": "blob", "id": n, "sessionId": 1,
                         "blob": base64.b64encode(os.urandom(LARGE_LETTER_BYTES)).decode()}
                        for n in range(i, i + 10)]
                async with s.post(f"{base}/app/app-a/track", json={"data": data}) as r:
                    assert r.status == 200, await r.text()
            await dead_letters(agent, LARGE_LETTERS)
            await up.stop()   # the retried letters wait: only the retry's memory is traced
            tracemalloc.start()
            try:
                lines = 0
                async with s.get(f"{base}/dead/export") as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_chunked(64 * 1024):
                        lines += chunk.count(b"\n")
                _, exported = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                async with s.post(f"{base}/dead/retry", json={"all": True}) as r:
                    assert (await r.json())["retried"] == LARGE_LETTERS
                _, retried = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert lines == LARGE_LETTERS
        assert exported < LETTERS_PEAK and retried < LETTERS_PEAK, (exported, retried)
        assert agent.spool.dead_count == 0 and agent.spool.depth == LARGE_LETTERS
        # The file agrees (a restart reads its depths): a retry in steps once wrote the
        # running total at each step (review).
        on_disk = read_offline(Path(agent.spool.cfg.path))["streams"]["app-a"]
        assert on_disk == {"depth": LARGE_LETTERS,
                           "bytes": agent.spool.streams["app-a"].bytes}
    finally:
        await up.stop()


async def test_an_export_that_fails_leaves_the_file_it_would_have_replaced(
        tmp_path: Path) -> None:
    """The file was emptied before the export knew it could read anything (audit): a
    failed export to last week's file lost last week's export."""
    spool = tmp_path / "spool.db"
    spool.write_bytes(os.urandom(8192))   # not a database, and no agent running
    cfg = str(write_config(tmp_path / "agent.toml", spool, port=free_port()))
    previous = tmp_path / "letters.jsonl"
    previous.write_text('{"previous": "export"}\n')
    text = await outpost("export", str(previous), config=cfg, code=1)
    assert "Traceback" not in text and text.count("\n") == 1, text
    assert previous.read_text() == '{"previous": "export"}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".letters")] == []
    text = await outpost("export", str(tmp_path / "no" / "such" / "dir.jsonl"), config=cfg,
                         code=1)
    assert "Traceback" not in text and "no/such" in text, text


async def test_a_reader_leaving_an_export_is_no_error_in_the_log(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`outpost dead export - | head -c 100`: the reader leaves, the command ends with 141,
    and the agent's next write to it fails. That write's ConnectionResetError escaped the
    route, so aiohttp logged "Error handling request" at ERROR, with a traceback, for every
    such export: in the journal among real errors (`journalctl -p warning`)."""
    agent = await make_agent(port=free_port())
    letters = 3 * EXPORT_PAGE   # 12 MB: more than the socket buffers take at once
    await agent.spool.append([Event("app", NUCLEUS, dedupe_key("app", n),
                                    b'{"n":%d,"pad":"%s"}' % (n, b"x" * 4000))
                              for n in range(letters)])
    rows = await agent.spool.fetch(agent.spool.streams["app"].id, 0, letters)
    await agent.spool.dead_letter([(r.seq, "up", "refused") for r in rows])
    caplog.set_level(logging.DEBUG, logger="outpost.dead")
    head, out = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "dead", "export", "-", "--config", agent.config_path,
        cwd=ROOT, stdout=out, stderr=asyncio.subprocess.DEVNULL)
    os.close(out)
    try:
        assert await asyncio.to_thread(os.read, head, 100)
    finally:
        os.close(head)   # as `head` exits: the command's next write fails
    assert await asyncio.wait_for(proc.wait(), 30) == 141

    def ended() -> bool:
        return any(r.name == "aiohttp.server" or "export" in r.getMessage()
                   for r in caplog.records)
    await wait_for(ended)   # the agent's own line on how the export ended, or aiohttp's
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class EchoingSegment:
    """A Segment upstream that refuses every batch for good, echoing the request's
    Authorization header in its reason (some collectors echo the request)."""

    async def start(self) -> str:
        async def refuse(request: web.Request) -> web.Response:
            return web.json_response(
                {"error": f"bad batch, auth={request.headers.get('Authorization')}"}, status=400)
        app = web.Application()
        app.router.add_post("/v1/batch", refuse)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"


async def test_a_dead_letter_s_reason_never_shows_a_key(make_agent: Any) -> None:
    """The reason is the upstream's answer: one that echoed the request showed the upstream
    key in `dead list`, `dead show`, export and GET /dead, where the log and /status had it
    redacted (audit)."""
    up = EchoingSegment()
    url = await up.start()
    try:
        secret = "SECRET-XYZ-7"
        agent = await make_agent(upstreams=[{"name": "seg", "protocol": "segment-http",
                                             "url": url, "key": secret, "keys": ["*"],
                                             "flush_interval_s": 0.05}])
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{agent.port}/v1/track",
                json={"userId": "u", "event": "e", "writeKey": "app-key-1"}) as r:
            assert r.status == 200
        await dead_letters(agent, 1)
        [letter] = await agent.spool.dead_letters()
        token = base64.b64encode(f"{secret}:".encode()).decode()
        assert "auth=Basic" in letter["reason"], letter["reason"]
        assert token not in letter["reason"] and secret not in letter["reason"], letter
    finally:
        await up.runner.cleanup()


@pytest.mark.parametrize(("protocol", "cut"), [("nucleus-http", 200), ("segment-http", 300)])
async def test_a_key_the_reason_s_cut_falls_in_is_redacted_whole(make_agent: Any,
                                                                 protocol: str, cut: int) -> None:
    """The reason keeps the start of the upstream's answer (200 or 300 characters): cut
    before it was redacted, a key the cut fell in was not recognised, and its first half
    stayed in the reason (audit)."""
    secret = "sk_live_0123456789abcdef"
    token = base64.b64encode(f"{secret}:".encode()).decode()   # segment-http's Basic auth

    async def refuse(request: web.Request) -> web.Response:
        # An answer echoing the request, the key (or its token) astride the cut.
        echoed = secret if protocol == "nucleus-http" else token
        assert echoed in (request.path + request.headers.get("Authorization", ""))
        return web.Response(status=400, text="x" * (cut - 10) + echoed + " is refused")

    path = "/app/{key}/track" if protocol == "nucleus-http" else "/v1/batch"
    async with serving(path, refuse) as url:
        agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol, "url": url,
                                             "key": secret, "flush_interval_s": 0.05}])
        await post_events(agent.port, "app1", range(1))
        await dead_letters(agent, 1)
        [letter] = await agent.spool.dead_letters()
        async with aiohttp.ClientSession() as s, \
                s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            [group] = (await r.json())["dead_reasons"]
    for reason in (letter["reason"], group["reason"]):
        assert reason.startswith("HTTP 400: xxx") and "***" in reason, reason
        assert secret[:8] not in reason and token[:8] not in reason, reason


async def test_an_export_to_a_symlink_or_a_pipe_writes_through_it(tmp_path: Path) -> None:
    """The whole-then-move export replaced what the path named: a symlink became a file
    (its target untouched), and as root `/dev/stdout` itself was replaced (review)."""
    spool = tmp_path / "spool.db"
    cfg = str(write_config(tmp_path / "agent.toml", spool, port=free_port()))
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # empty, no agent
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert "exported 0 dead letters" in await outpost("export", str(link), config=cfg)
    assert link.is_symlink() and real.read_text() == ""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = asyncio.get_running_loop().run_in_executor(None, fifo.read_bytes)
    assert "exported 0 dead letters" in await outpost("export", str(fifo), config=cfg)
    assert await reader == b"" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("name", ["/dev/stdout", "-"])
@pytest.mark.parametrize("stdout", ["pipe", "appended file"])
async def test_an_export_to_dev_stdout_writes_the_letters_to_standard_output(
        make_agent: Any, tmp_path: Path, stdout: str, name: str) -> None:
    """`outpost dead export /dev/stdout | jq` failed ("cannot write /dev/stdout: No such
    file or directory": the pipe has no path to resolve), and with stdout appended to a
    file (`>> all.jsonl`) that file was replaced, what it held before lost, and the
    summary line went to the file it no longer was. Standard output gets the letters
    alone, added to what it holds; the summary goes to stderr. `-` names it too, as for
    every Unix tool (and on Windows, which has no /dev/stdout): it wrote a file named -."""
    up = await RefusingNucleus().start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(agent.port, "app-a", range(3))
        await dead_letters(agent, 3)
        target = tmp_path / "all.jsonl"
        target.write_text('{"earlier": true}\n')
        with open(target, "ab") as appended:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "dead", "export", name, "--config",
                agent.config_path, cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE if stdout == "pipe" else appended)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        if stdout == "appended file":
            out = target.read_bytes()
            assert out.startswith(b'{"earlier": true}\n'), out
            out = out.split(b"\n", 1)[1]
        assert [json.loads(ln)["body"]["id"] for ln in out.splitlines()] == [0, 1, 2]
        assert "exported 3 dead letters" in err.decode()
        assert not (tmp_path / "-").exists()
    finally:
        await up.stop()


async def test_an_export_is_on_disk_before_it_replaces_the_file(make_agent: Any,
                                                                tmp_path: Path) -> None:
    """`outpost dead export F`, then `outpost dead purge --all`, is how dead letters are
    kept before they go: the export was moved onto F unsynced, so a power cut after the
    purge (which is on disk) could leave F empty, or not there, and the letters nowhere.
    Traced (strace, as test_wal_sync.py): the file is synced before it is moved onto F,
    and F's directory after."""
    up = await RefusingNucleus().start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(agent.port, "app-a", range(3))
        await dead_letters(agent, 3)
        target, trace = tmp_path / "dead.jsonl", tmp_path / "trace"
        proc = await asyncio.create_subprocess_exec(
            strace(), "-f", "-qq", "-y", "-o", str(trace), "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2", sys.executable, "-m", "agent",
            "dead", "export", str(target), "--config", agent.config_path, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and b"exported 3 dead letters" in out, out
    finally:
        await up.stop()
    lines = trace.read_text().splitlines()
    moved = [i for i, ln in enumerate(lines) if "rename" in ln and f'"{target}"' in ln]
    synced = [i for i, ln in enumerate(lines) if re.search(
        rf"\bf(data)?sync\(\d+<{re.escape(str(tmp_path))}/\.dead\.jsonl\.", ln)]
    dir_synced = [i for i, ln in enumerate(lines) if re.search(
        rf"\bfsync\(\d+<{re.escape(str(tmp_path))}>\)", ln)]
    assert len(moved) == 1, lines
    assert synced and synced[0] < moved[0], lines
    assert dir_synced and dir_synced[-1] > moved[0], lines


async def test_an_id_too_long_for_a_number_is_no_such_dead_letter(make_agent: Any) -> None:
    """GET /dead/{id} with an id of more digits than Python turns into an int (4300) was
    a 500, which `outpost dead` takes for another server: no dead letter has it (404)."""
    agent = await make_agent(port=free_port())
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/dead/{'9' * 5000}") as r:
        assert r.status == 404, await r.text()
        assert (await r.json())["error"].startswith("no dead letter with id")


async def test_a_head_of_the_export_reads_no_dead_letters(make_agent: Any) -> None:
    """HEAD /dead/export ran the whole export and threw the body away: as much reading of
    the spool as a GET, for headers alone. It answers GET's headers without reading a
    letter: here with the spool's reader busy, which a GET waits for."""
    agent = await make_agent(port=free_port())
    await agent.spool.append([Event("app", NUCLEUS, dedupe_key("app", n), b'{"n":%d}' % n)
                              for n in range(3)])
    rows = await agent.spool.fetch(agent.spool.streams["app"].id, 0, 3)
    await agent.spool.dead_letter([(r.seq, "up", "refused") for r in rows])
    held, release = threading.Event(), threading.Event()

    def hold(_: Any) -> None:
        held.set()
        release.wait(30)

    holding = agent.spool.reader.run(hold)
    url = f"http://127.0.0.1:{agent.port}/dead/export"
    try:
        await asyncio.to_thread(held.wait, 10)
        async with aiohttp.ClientSession() as s:
            async with s.head(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "application/x-ndjson"
                assert r.headers["Cache-Control"] == "no-store"
                # As GET's: a length of 0 would say the export is empty.
                assert "Content-Length" not in r.headers, r.headers
    finally:
        release.set()
        await holding
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200 and len((await r.read()).splitlines()) == 3


async def test_a_retried_letter_whose_lane_damage_garbled_is_sent(make_agent: Any) -> None:
    """A dead letter's lane garbled by damage (SQLite reads it back without complaint):
    retried, it went into that lane, which no forwarder reads: counted queued, never sent.
    It goes back into the normal lane."""
    up = RefusingNucleus()
    await up.start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(agent.port, "app-a", range(2))
        await dead_letters(agent, 2)
        with contextlib.closing(sqlite3.connect(agent.spool.path)) as db, db:
            db.execute("UPDATE dead SET lane = 7")
        up.refuse = None
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/retry",
                              json={"all": True}) as r:
                assert r.status == 200, await r.text()
        await wait_for(lambda: up.ids() == [0, 1], timeout=5)
        await wait_for(lambda: agent.spool.depth == 0)
    finally:
        await up.stop()


async def _stopped_with_three_letters(make_agent: Any) -> tuple[str | None, Path]:
    """An agent that dead-lettered three events and stopped: its config and spool paths."""
    up = RefusingNucleus()
    await up.start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        await post_events(agent.port, "app-a", range(3))
        await dead_letters(agent, 3)
        await agent.stop()
    finally:
        await up.stop()
    return agent.config_path, Path(agent.spool.path)


def _dead_commands(tmp_path: Path) -> tuple[tuple[str, ...], ...]:
    """Each offline dead-letter command, as an operator gives it."""
    return (("list",), ("list", "--json"), ("retry", "--all"), ("purge", "--all"),
            ("export", str(tmp_path / "out.jsonl")), ("show", "1"))


def _files(where: Path) -> dict[str, bytes]:
    """The files in ``where`` and their bytes, but for the -shm index and empty -wal that
    SQLite makes beside a spool a read-only connection opens (whether the fresh spool is
    still empty, waiting for the salvage): no data of any file changes."""
    return {p.name: p.read_bytes() for p in where.iterdir() if p.is_file()
            and not p.name.endswith("-shm") and not (p.name.endswith("-wal")
                                                    and not p.stat().st_size)}


@pytest.mark.parametrize("fresh_made", [True, False], ids=["fresh-spool", "no-spool-yet"])
async def test_a_stopped_agent_s_salvage_pending_is_said_not_listed_as_no_letters(
        make_agent: Any, tmp_path: Path, fresh_made: bool) -> None:
    """The agent found its spool damaged, moved it aside and made a fresh one (or stopped
    before it could), and stopped before it copied the old file's letters in (they are
    copied at its next start): the offline commands read the fresh, empty spool and said
    "0 dead letters", "purged 0" (or "no spool yet"). They must say a salvage is pending
    and what to do, exit 1, and change no file."""
    cfg, spool_path = await _stopped_with_three_letters(make_agent)
    moved = await leave_salvage_pending(spool_path, tmp_path / "fresh" if fresh_made else None)
    before = _files(tmp_path)

    for args in _dead_commands(tmp_path):
        text = await outpost(*args, config=cfg, code=1)
        line = text.strip()
        assert len(line.splitlines()) == 1, text
        assert "salvage" in line and str(moved) in line and "start the agent" in line, text
        assert "0 dead letters" not in line, text
    assert _files(tmp_path) == before

    # Once an agent has started (and finished the salvage), they are there again.
    again = await make_agent(port=free_port(), upstreams=[])
    assert again.spool.dead_count == 3
    await again.stop()
    assert "3 dead letters" in await outpost("list", config=cfg)


async def test_a_salvage_under_way_in_a_starting_agent_is_not_said_to_need_a_start(
        make_agent: Any, tmp_path: Path) -> None:
    """An agent starting on a spool it found damaged holds the spool's lock and salvages
    the file moved aside before it listens (held here as it does). Meanwhile the dead-letter
    commands said the salvage was pending and to "start the agent": it runs. They must say
    an agent runs on the spool, exit 1, and change no file."""
    cfg, spool_path = await _stopped_with_three_letters(make_agent)
    await leave_salvage_pending(spool_path, tmp_path / "fresh")
    with FileLock(spool_lock(spool_path)):
        before = _files(tmp_path)
        for args in _dead_commands(tmp_path):
            text = await outpost(*args, config=cfg, code=1)
            line = text.strip()
            assert len(line.splitlines()) == 1, text
            assert "start the agent" not in line and "agent is running" in line, text
            assert "0 dead letters" not in line, text
    assert _files(tmp_path) == before


async def test_a_salvage_committed_whose_marker_stayed_is_not_said_pending(
        make_agent: Any, tmp_path: Path) -> None:
    """A salvage committed whose marker could not be removed (a directory the agent may no
    longer write to: logged, and each start finds that salvage done): the letters are in
    the spool, and a start changes nothing. The stopped agent's dead-letter commands and
    status said the salvage was pending and to start the agent, for as long as it stayed."""
    cfg, spool_path = await _stopped_with_three_letters(make_agent)
    moved = await leave_salvage_pending(spool_path, tmp_path / "fresh")
    marker = spool_path.with_name(f"{spool_path.name}.salvaging")
    kept = marker.read_bytes()
    again = await make_agent(port=free_port(), upstreams=[])   # salvages, marker removed
    assert again.spool.dead_count == 3
    await again.stop()
    assert moved.exists() and not marker.exists()
    marker.write_bytes(kept)   # as if it could not be removed
    assert "3 dead letters" in await outpost("list", config=cfg)
    got, text = await run_outpost("status", "--config", cfg)
    assert got == 0 and "salvage is pending" not in text, text


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the spool to another user: root only")
async def test_offline_reads_as_root_leave_no_file_the_agent_s_user_cannot_open(
        make_agent: Any) -> None:
    """An operator runs `outpost dead list` or `outpost status` as root (sudo) beside a
    stopped service whose spool its own user owns. Read-only, SQLite still makes a -shm
    index and an empty -wal beside a WAL spool: made root's, 0600, the agent could not
    open its spool at its next start (SQLite gives them the database's owner and mode).
    The reads remove them as they end: none is left, and the spool's files stay the
    agent's user's, 0600."""
    cfg, spool = await _stopped_with_three_letters(make_agent)
    assert cfg is not None
    service = 65534   # nobody: any other user
    assert not list(spool.parent.glob(f"{spool.name}-*"))   # the agent's stop removed them
    for p in spool.parent.glob(f"{spool.name}*"):
        os.chown(p, service, service)
    got, text = await run_outpost("status", "--config", cfg)
    assert got == 0 and "no agent running" in text and "3 kept" in text, text
    assert "3 dead letters" in await outpost("list", config=cfg)
    assert not list(spool.parent.glob(f"{spool.name}-*"))
    owned = {p.name: (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode))
             for p in spool.parent.glob(f"{spool.name}*")}
    assert spool.name in owned and owned == dict.fromkeys(owned, (service, service, 0o600))


def _beside(spool: Path) -> dict[str, tuple[int, bytes, int]]:
    """The spool's files (its -wal, -shm and lock too): mode, bytes and mtime each."""
    return {p.name: (stat.S_IMODE(p.stat().st_mode), p.read_bytes(), p.stat().st_mtime_ns)
            for p in spool.parent.glob(f"{spool.name}*")}


def _offline_reads(out: Path) -> tuple[tuple[tuple[str, ...], str], ...]:
    """Each command that reads a stopped agent's spool, and what its output holds."""
    return ((("status",), "3 kept"), (("status", "--json"), '"dead_letters": 3'),
            (("dead", "list"), "3 dead letters"), (("dead", "list", "--json"), '"count": 3'),
            (("dead", "show", "1"), "HTTP 400"), (("dead", "export", str(out)), "exported 3"))


async def test_offline_reads_leave_the_spool_s_files_as_they_found_them(
        make_agent: Any, tmp_path: Path) -> None:
    """No agent running (stopped cleanly: no -wal or -shm beside the spool),
    `outpost status` and the dead-letter reads left a -wal and a -shm beside the spool:
    SQLite makes them for a read-only connection to a WAL file, and cannot remove them as
    it closes. Each read leaves the spool's files as it found them: the same names, bytes
    and modes (0600, the directory 0700)."""
    cfg, spool = await _stopped_with_three_letters(make_agent)
    assert cfg is not None
    found = _beside(spool)
    assert spool.name in found and not {f"{spool.name}-wal", f"{spool.name}-shm"} & found.keys()
    assert {mode for mode, _, _ in found.values()} == {0o600}
    (tmp_path / "out").mkdir()
    for command, says in _offline_reads(tmp_path / "out" / "letters.jsonl"):
        got, text = await run_outpost(*command, "--config", cfg)
        assert got == 0 and says in text, (command, text)
        assert _beside(spool) == found, command
    assert stat.S_IMODE(spool.parent.stat().st_mode) == 0o700


async def test_offline_reads_of_a_killed_agent_s_spool_keep_its_wal(
        make_agent: Any, tmp_path: Path) -> None:
    """An agent killed leaves commits in the -wal beside the spool (here, no -shm): the
    reads see them (a letter purged in it: two left), and leave the spool and its -wal
    as they found them, adding no file."""
    cfg, stopped = await _stopped_with_three_letters(make_agent)
    crashed = tmp_path / "crashed"
    crashed.mkdir(mode=0o700)
    spool = crashed / stopped.name
    with contextlib.closing(sqlite3.connect(stopped, isolation_level=None)) as db:
        db.execute("PRAGMA wal_autocheckpoint=0")
        # As the agent's purge commits it (the letters' summary kept by triggers).
        db.execute("DELETE FROM dead WHERE rowid = (SELECT max(rowid) FROM dead)")
        for suffix in ("", "-wal"):   # copied while open: the -wal holds the commit
            path = Path(f"{spool}{suffix}")
            path.write_bytes(Path(f"{stopped}{suffix}").read_bytes())
            path.chmod(0o600)
    cfg = str(write_config(tmp_path / "crashed.toml", spool, port=free_port()))
    found = _beside(spool)
    assert found.keys() == {spool.name, f"{spool.name}-wal"} and found[f"{spool.name}-wal"][1]
    for command, says in _offline_reads(tmp_path / "letters.jsonl"):
        got, text = await run_outpost(*command, "--config", cfg)
        assert got == 0 and says.replace("3", "2") in text, (command, text)
        assert _beside(spool) == found, command


async def test_files_an_offline_read_made_stay_while_another_connection_uses_them(
        make_agent: Any) -> None:
    """The -wal and -shm an offline read made are in use by any connection opened since
    (an agent starting, another command): they stay until its own close, and it reads on."""
    _, spool = await _stopped_with_three_letters(make_agent)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sqlite3, sys\n"
        f"db = sqlite3.connect({f'file:{spool}?mode=ro'!r}, uri=True)\n"
        "for line in sys.stdin:\n"
        "    print(db.execute('SELECT count(*) FROM dead').fetchone()[0], flush=True)\n",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None

    async def count() -> bytes:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(b"\n")
        return await asyncio.wait_for(holder.stdout.readline(), 10)

    try:
        with as_found(spool):
            with contextlib.closing(dead.read_only(spool)) as conn:
                assert dead.summary(conn, 1)["count"] == 3
            assert await count() == b"3\n"   # on the files the read made
        made = {f"{spool.name}-wal", f"{spool.name}-shm"}
        assert made <= {p.name for p in spool.parent.iterdir()}
        assert await count() == b"3\n"
    finally:
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), 10)


async def test_offline_retry_and_purge_leave_no_wal_or_shm(make_agent: Any) -> None:
    """`outpost dead retry` and `purge` with no agent running change the spool under an
    exclusive lock (SQLite then uses no -shm), after a read-only look at its version:
    the -shm that look made was left beside the spool. Neither leaves a file but the
    spool's own, 0600."""
    cfg, spool = await _stopped_with_three_letters(make_agent)
    assert cfg is not None
    for args, says in ((("retry", "--reason", "nothing"), "re-queued 0"),
                       (("retry", "--all"), "re-queued 3"), (("purge", "--all"), "purged 0")):
        assert says in await outpost(*args, config=cfg)
        left = {p.name: stat.S_IMODE(p.stat().st_mode)
                for p in spool.parent.glob(f"{spool.name}*")}
        assert spool.name in left and left == dict.fromkeys(left, 0o600), (args, left)
        assert not {f"{spool.name}-wal", f"{spool.name}-shm"} & left.keys(), (args, left)
