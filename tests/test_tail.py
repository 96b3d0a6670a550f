"""The live event view: `outpost tail` against a real agent process, GET /tail's guard
rules, and a slow viewer that loses tail messages (counted) while ingest loses nothing."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from agent.logs import fingerprint
from agent.ops.tail import QUEUE
from tests.conftest import ROOT, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.interop.browser.cdp import Chromium
from tests.segment_helpers import basic, call, nucleus_up, segment_up
from tests.waiting import wait_for

KEY_A, KEY_B = "writekey-aaaa-1234", "writekey-bbbb-5678"


class Tail:
    """`python -m agent tail ...` as a subprocess, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Tail:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "tail", *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        tail = cls(proc)
        await tail.until(lambda line: "watching" in line)
        return tail

    async def until(self, cond: Any, timeout: float = 20.0) -> str:
        """Read lines until one satisfies ``cond``; return it."""
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            assert raw, "tail ended early:\n" + "\n".join(self.lines)
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if cond(line):
                return line

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(self.proc.communicate(), 20)
        self.lines += rest.decode().splitlines()
        return self.proc.returncode or 0


async def viewers_gone(port: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):   # bounded: a viewer that left is noticed within a second
            async with s.get(f"http://127.0.0.1:{port}/status") as r:
                if (await r.json())["ingest"]["tail_viewers"] == 0:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("viewers that left still count")


def kinds(tail: Tail) -> list[dict[str, Any]]:
    return [json.loads(line) for line in tail.lines]


async def test_tail_command_shows_ingest_warnings_and_acks(tmp_path: Path,
                                                           agent_process: Any) -> None:
    fake = await FakeSegment().start()
    try:
        port = free_port()
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                           upstreams=[segment_up(fake, key="*")])
        agent = agent_process(cfg, port).start()
        every = await Tail.start("--json", "--config", str(cfg))
        only_b = await Tail.start("--json", "--key", KEY_B, "--config", str(cfg))
        only_a = await Tail.start("--json", "--key", fingerprint(KEY_A), "--config", str(cfg))
        human = await Tail.start("--config", str(cfg))
        # A: a complete track, and an identify with no timestamp (ingest gives it one).
        r = await call(port, "/v1/batch", {"batch": [
            {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m-1",
             "timestamp": "2026-01-02T03:04:05.000Z"},
            {"type": "identify", "userId": "u1", "messageId": "m-2"}]},
            headers={"Authorization": basic(KEY_A)})
        assert r.status == 200, r.body
        r = await call(port, "/v1/track", {"event": "Signed Up", "anonymousId": "a",
                                           "messageId": "m-3"},
                       headers={"Authorization": basic(KEY_B)})
        assert r.status == 200, r.body

        # Each acknowledged event is shown as ingest shows it, with the upstream's name.
        acks_of = {every: 3, only_b: 1, only_a: 2, human: 3}
        for tail, n in acks_of.items():
            await tail.until(lambda line: sum(
                ("acked" in seen) for seen in tail.lines) >= n)   # noqa: B023
        await wait_for(lambda: len(fake.events) == 3)
        codes = [await t.stop() for t in (every, only_b, only_a, human)]
        await viewers_gone(port)   # at most 4 at once: their places are free again
        # A view still open when the agent stops ends at once, and holds up nothing.
        left_open = await Tail.start("--config", str(cfg))
        assert agent.terminate() == 0
        out, _ = await asyncio.wait_for(left_open.proc.communicate(), 20)
    finally:
        await fake.stop()
    assert codes == [0, 0, 0, 0]
    assert left_open.proc.returncode == 1
    assert out.decode().strip() == "outpost: the agent ended the live view (it is stopping)"
    msgs = kinds(every)
    ingested = {m["id"]: m for m in msgs if m["kind"] == "ingested"}
    assert set(ingested) == {"m-1", "m-2", "m-3"}
    assert ingested["m-1"] == {"kind": "ingested", "api": "segment", "key": fingerprint(KEY_A),
                               "type": "track", "name": "Order Completed", "id": "m-1",
                               "warnings": []}
    assert ingested["m-2"]["warnings"] == [
        "no `timestamp`: defaulted to the time it was received"]
    acked = {m["id"]: m for m in msgs if m["kind"] == "acked"}
    assert set(acked) == {"m-1", "m-2", "m-3"}
    assert acked["m-1"] == {"kind": "acked", "upstream": "segment", "api": "segment",
                            "key": fingerprint(KEY_A), "type": "track",
                            "name": "Order Completed", "id": "m-1"}
    assert acked["m-3"] == {"kind": "acked", "upstream": "segment", "api": "segment",
                            "key": fingerprint(KEY_B), "type": "track", "name": "Signed Up",
                            "id": "m-3"}
    # --key shows that key's events only; no output ever carries a key itself.
    for tail, ids in ((only_b, ["m-3"]), (only_a, ["m-1", "m-2"])):
        for kind in ("ingested", "acked"):
            assert [m["id"] for m in kinds(tail) if m["kind"] == kind] == ids, kind
    everything = "\n".join(every.lines + only_b.lines + human.lines)
    assert KEY_A not in everything and KEY_B not in everything
    for what in ("in   ", "acked"):
        assert any(f"{what} segment  {fingerprint(KEY_A)}  track 'Order Completed'  id=m-1"
                   in line for line in human.lines), human.lines
    assert any(line.endswith(f"acked segment  {fingerprint(KEY_A)}  identify  id=m-2  "
                             "by segment") for line in human.lines), human.lines


async def test_tail_warns_of_unknown_types_and_missing_names(make_agent: Any) -> None:
    agent = await make_agent(port=free_port())
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert b'"watching"' in await resp.content.readline()
            r = await call(agent.port, "/app/nucleus-app-1/track", {"data": [
                {"type": "warp", "id": 1}, {"type": "event", "id": 2},
                {"type": "event", "name": "ok", "id": 3}]})
            assert r.status == 200, r.body
            got: list[dict[str, Any]] = []
            while len(got) < 3:
                line = await asyncio.wait_for(resp.content.readline(), 20)
                if line.startswith(b"data: "):
                    got.append(json.loads(line[6:]))
    assert [(m["id"], m["type"], m["warnings"]) for m in got] == [
        ("1", "warp", ["unknown type 'warp'"]), ("2", "event", ["missing field `name`"]),
        ("3", "event", [])]
    assert {m["api"] for m in got} == {"nucleus"}


async def test_tail_is_readable_only_from_the_agents_own_page(make_agent: Any) -> None:
    agent = await make_agent(port=free_port(),
                             listen={"allowed_origins": ["https://app.example"]})
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        for headers, status in (
                ({"Origin": "https://evil.example"}, 403),
                # An app's own web origin may send events, not read every app's events.
                ({"Origin": "https://app.example"}, 403),
                ({"Host": "evil.example"}, 421),
                ({"Sec-Fetch-Site": "cross-site", "Referer": "https://evil.example/"}, 403)):
            async with s.get(base + "/tail", headers=headers) as r:
                assert r.status == status, headers
                assert b"data:" not in await r.read()
        async with s.get(base + f"/tail?key={KEY_A}") as r:
            assert r.status == 400   # a raw key in a URL is refused, not matched
        async with s.get(base + f"/tail?writeKey={KEY_A}") as r:
            assert r.status == 400   # nor is anything but key taken
        async with s.get(base + "/tail", headers={"Origin": base}) as r:
            assert r.status == 200
            assert b'"watching"' in await r.content.readline()
            assert agent.metrics.tail_viewers == 1
    # A viewer that left stops counting, though nothing was sent to notice it by.
    await wait_for(lambda: agent.metrics.tail_viewers == 0)


async def test_slow_viewer_loses_tail_messages_counted_and_ingest_loses_none(
        make_agent: Any) -> None:
    agent = await make_agent(port=free_port())
    port = agent.port
    # A viewer that reads nothing: a tiny receive buffer, so its connection backs up soon.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(b"GET /tail HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    seen = await reader.readuntil(b'"watching"')
    # A viewer that reads, beside it.
    session = aiohttp.ClientSession()
    fast = await session.get(f"http://127.0.0.1:{port}/tail")
    assert b'"watching"' in await fast.content.readline()
    fast_msgs: list[dict[str, Any]] = []

    async def read_fast() -> None:
        async for line in fast.content:
            if line.startswith(b"data: "):
                fast_msgs.append(json.loads(line[6:]))

    reading = asyncio.create_task(read_fast())
    posted = 0
    auth = {"Authorization": basic(KEY_A)}
    name = "n" * 100
    for i in range(200):   # bounded: stops as soon as the slow viewer has lost messages
        batch = [{"type": "track", "event": name, "userId": "u", "messageId": f"{i}-{j}"}
                 for j in range(500)]
        r = await call(port, "/v1/batch", {"batch": batch}, headers=auth)
        assert r.status == 200, r.body
        posted += len(batch)
        if agent.metrics.tail_dropped > 0 and posted >= 2 * QUEUE:
            break
    assert agent.metrics.tail_dropped > 0, "the slow viewer never fell behind"
    # Ingest lost nothing and was never refused.
    async with session.get(f"http://127.0.0.1:{port}/status") as got:
        status = await got.json()
    assert status["counters"]["ingested"] == posted and status["queue_depth"] == posted
    assert status["ingest"]["tail_dropped"] == agent.metrics.tail_dropped
    assert status["ingest"]["tail_viewers"] == 2
    async with session.get(f"http://127.0.0.1:{port}/metrics") as got:
        metrics = await got.text()
    assert f"outpost_tail_dropped_total {agent.metrics.tail_dropped}" in metrics
    # One more event: the slow viewer, read at last, is told what it missed before it.
    r = await call(port, "/v1/track", {"event": "last", "userId": "u", "messageId": "z"},
                   headers=auth)
    assert r.status == 200
    shown = missed = 0
    while shown + missed < posted + 1:
        seen += await asyncio.wait_for(reader.read(65536), 20)
        shown = seen.count(b'"kind":"ingested"')
        missed = sum(int(n) for n in re.findall(rb'"kind":"dropped","count":(\d+)', seen))
    assert shown + missed == posted + 1 and missed > 0 and shown >= QUEUE
    # The other viewer, paced but reading, accounts for every event too; every message
    # either viewer missed is in the total.
    fast_shown = fast_missed = 0

    def fast_accounted() -> bool:
        nonlocal fast_shown, fast_missed
        fast_shown = sum(m["kind"] == "ingested" for m in fast_msgs)
        fast_missed = sum(m["count"] for m in fast_msgs if m["kind"] == "dropped")
        return fast_shown + fast_missed == posted + 1

    await wait_for(fast_accounted)
    assert missed + fast_missed == agent.metrics.tail_dropped
    reading.cancel()
    fast.close()
    await session.close()
    writer.close()


async def test_status_page_live_panel_shows_events_as_text(make_agent: Any, chromium: str,
                                                          tmp_path: Path,
                                                          fake_segment: FakeSegment) -> None:
    agent = await make_agent(port=free_port(), upstreams=[segment_up(fake_segment, key="*")])
    async with Chromium(chromium, tmp_path / "profile") as browser:
        page = await browser.open(f"http://127.0.0.1:{agent.port}/")
        for _ in range(200):   # bounded: until the page has loaded
            if await page.evaluate("document.readyState === 'complete'"):
                break
            await asyncio.sleep(0.05)
        # A page left open holds no viewer; "Watch live" opens one.
        assert agent.metrics.tail_viewers == 0
        await page.evaluate("document.getElementById('live-toggle').click()")
        await wait_for(lambda: agent.metrics.tail_viewers == 1)   # the page's EventSource
        r = await call(agent.port, "/v1/batch", {"batch": [
            {"type": "track", "event": "<img src=x onerror=alert(1)>", "userId": "u",
             "messageId": "m-1"},
            {"type": "identify", "userId": "u", "messageId": "m-2",
             "timestamp": "2026-01-02T03:04:05Z"}]}, headers={"Authorization": basic(KEY_A)})
        assert r.status == 200, r.body
        rows: list[list[str]] = []
        acks: list[list[str]] = []
        for _ in range(200):   # bounded: the rows arrive within moments
            rows, acks = [await page.evaluate(
                f"[...document.querySelectorAll('#live tr[data-kind={kind}]')]"
                ".map(tr => [tr.dataset.id, ...[...tr.cells].slice(1).map(td => td.textContent)])")
                for kind in ("ingested", "acked")]
            if len(rows) == 2 and len(acks) == 2:
                break
            await asyncio.sleep(0.05)
        state = await page.evaluate("document.getElementById('live-state').textContent")
        images = await page.evaluate("document.querySelectorAll('#live img').length")
        await page.evaluate("document.getElementById('live-toggle').click()")   # Pause
        await wait_for(lambda: agent.metrics.tail_viewers == 0)
        report = page.report()
    # Newest first, warnings under the name; the name is shown as text, never as markup.
    assert rows == [["m-2", "in", "segment", fingerprint(KEY_A), "identify", "m-2"],
                    ["m-1", "in", "segment", fingerprint(KEY_A),
                     "track <img src=x onerror=alert(1)>"
                     "! no `timestamp`: defaulted to the time it was received", "m-1"]], report
    # Each acknowledged event too, with the upstream that acknowledged it.
    assert acks == [["m-2", "acked by segment", "segment", fingerprint(KEY_A), "identify", "m-2"],
                    ["m-1", "acked by segment", "segment", fingerprint(KEY_A),
                     "track <img src=x onerror=alert(1)>", "m-1"]], report
    assert state == "live" and images == 0
    assert KEY_A not in report


async def test_tail_without_an_agent_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "tail", "--config", str(cfg), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    lines = out.decode().splitlines()
    assert proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith(
        f"outpost: no agent answering at http://127.0.0.1:{port}"), lines
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen]\nport = 'x'\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "tail", "--config", str(bad), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and out.decode().startswith("outpost: config error:"), out


async def until_acked(resp: aiohttp.ClientResponse, n: int) -> list[dict[str, Any]]:
    """The tail's messages until ``n`` of them are acked lines."""
    got: list[dict[str, Any]] = []
    while sum(m["kind"] == "acked" for m in got) < n:
        line = await asyncio.wait_for(resp.content.readline(), 20)
        if line.startswith(b"data: "):
            got.append(json.loads(line[6:]))
    return got


async def test_an_acked_event_stored_mapped_shows_as_the_app_sent_it(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    """A Nucleus app's key routed to a Segment upstream: its events are stored mapped to
    Segment, and its acked lines show them as its ingest lines do, so the two match."""
    agent = await make_agent(port=free_port(), upstreams=[segment_up(fake_segment, key="*")])
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        r = await call(agent.port, "/app/nucleus-app-1/track", {"data": [
            {"type": "event", "name": "opened cart", "id": 7},
            {"type": "event", "name": "paid", "id": 8}]})
        assert r.status == 200, r.body
        got = await until_acked(resp, 2)
    seen = {(m["kind"], m["api"], m["type"], m["name"], m["id"]) for m in got}
    assert seen == {(kind, "nucleus", "event", name, ident)
                    for kind in ("ingested", "acked")
                    for name, ident in (("opened cart", "7"), ("paid", "8"))}, got


async def test_an_acked_segment_event_stored_mapped_to_nucleus_shows_as_the_app_sent_it(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """A Segment app's key routed to a Nucleus upstream: its events are stored mapped to
    Nucleus, and its acked lines show them as its ingest lines do, so the two match."""
    agent = await make_agent(port=free_port(), upstreams=[nucleus_up(fake_nucleus)])
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        r = await call(agent.port, "/v1/batch", {"batch": [
            {"type": "track", "event": "Cart Opened", "userId": "u", "messageId": "m-7"},
            {"type": "identify", "userId": "u", "messageId": "m-8", "traits": {"a": 1}}]},
            headers={"Authorization": basic("segment-app-1")})
        assert r.status == 200, r.body
        got = await until_acked(resp, 2)
    seen = {(m["kind"], m["api"], m["type"], m["id"]) for m in got}
    assert seen == {(kind, "segment", kind_, ident) for kind in ("ingested", "acked")
                    for kind_, ident in (("track", "m-7"), ("identify", "m-8"))}, got


async def test_a_new_app_s_key_in_its_first_event_is_redacted(make_agent: Any) -> None:
    """An app's very first request, its key seen for the first time: a key the event's id or
    name holds is redacted as in every later one (and as the log redacts it)."""
    agent = await make_agent(port=free_port())
    key = "brand-new-app-key-5678"
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/tail") as resp:
        assert b'"watching"' in await resp.content.readline()
        r = await call(agent.port, "/v1/track", {"event": f"signed up with {key}",
                                                 "userId": "u", "messageId": key},
                       headers={"Authorization": basic(key)})
        assert r.status == 200, r.body
        line = b""
        while not line.startswith(b"data: "):
            line = await asyncio.wait_for(resp.content.readline(), 20)
    shown = json.loads(line[6:])
    assert (shown["kind"], shown["name"], shown["id"]) == (
        "ingested", "signed up with ***", "***"), shown


async def test_tail_json_fields_are_named_in_the_operations_guide(
        tmp_path: Path, make_agent: Any) -> None:
    """The `--json` bullet of docs/operations.md is what a script reading `outpost tail
    --json` goes by: every field of its first line, `watching`, is named there (its
    `key` and `viewers` were not)."""
    guide = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    bullet = guide[guide.index("- **`--json`:**"):guide.index("- **Never slows ingest:**")]
    named = set(re.findall(r"`([a-z_]+)`", bullet))
    port = free_port()
    agent = await make_agent(port=port)
    tail = await Tail.start("--json", "--config", agent.config_path)
    assert await tail.stop() == 0
    watching = json.loads(tail.lines[0])
    assert watching["kind"] == "watching" and sorted(set(watching) - named) == []
