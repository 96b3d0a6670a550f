"""What the operator's commands print, as run for real against an agent: app keys only as
fingerprints, an app's or upstream's control characters escaped, a reader that leaves
ending the command (141), a mistyped fingerprint refused."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.logs import fingerprint
from agent.ops import tail_routes
from tests.conftest import ROOT, free_port, write_config
from tests.fakes.loopback_server import LoopbackServer, serving
from tests.segment_helpers import basic, call
from tests.test_dead_letters import RefusingNucleus, dead_letters, outpost, upstream
from tests.test_tail import Tail
from tests.waiting import run_outpost

APP_KEY = "app-key-secret-7"
# What a terminal obeys: clear the screen, set the window title, ring, CSI as one C1 byte.
HOSTILE = "\x1b[2J\x1b]0;TITLE-HIJACK\x07\x9b31m"
RAW = ("\x1b", "\x07", "\x9b")
# What a terminal does not show but obeys all the same: bidi overrides, embeddings,
# isolates and marks reorder what follows them ("txt.exe" shown as "exe.txt"), and the
# other format characters (Cf), line and paragraph separators hide or split text.
INVISIBLE = ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
             "\u200b\u00ad\ufeff\u2028\u2029\U000e0041")


def no_control(text: str) -> None:
    assert not any(c in text for c in RAW), repr(text)


async def test_dead_letters_show_the_key_s_fingerprint_never_the_key(
        make_agent: Any, tmp_path: Path) -> None:
    up = await RefusingNucleus().start()
    try:
        agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["*"])])
        cfg = agent.config_path
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{agent.port}/app/{APP_KEY}/track",
                json={"data": [{"type": "event", "name": "e", "id": 1, "sessionId": 1,
                                "machineId": "m"}]}) as r:
            assert r.status == 200
        await dead_letters(agent, 1)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{agent.port}/dead") as r:
                endpoint = await r.text()
        [letter] = json.loads(endpoint)["entries"]
        shown = json.loads(await outpost("show", str(letter["id"]), config=cfg))
        out = tmp_path / "dead.jsonl"
        await outpost("export", str(out), config=cfg)
        await agent.stop()
        listed = await outpost("list", config=cfg)   # from the spool file: the same
    finally:
        await up.stop()
    want = fingerprint(APP_KEY)
    assert letter["key"] == shown["key"] == json.loads(out.read_text())["key"] == want
    assert f" {want}  up " in listed, listed
    for text in (listed, endpoint, json.dumps(shown), out.read_text()):
        assert APP_KEY not in text, text


async def test_tail_escapes_an_app_s_control_characters(make_agent: Any) -> None:
    agent = await make_agent(port=free_port())
    tail = await Tail.start("--config", agent.config_path)
    r = await call(agent.port, "/v1/track", {"event": f"E{HOSTILE}", "userId": "u",
                                             "messageId": f"m{HOSTILE}1"},
                   headers={"Authorization": basic(APP_KEY)})
    assert r.status == 200, r.body
    # Nucleus takes a type it does not know (the tail warns of it).
    r = await call(agent.port, f"/app/{APP_KEY}/track", {"data": [
        {"type": f"warp{HOSTILE}", "id": f"n{HOSTILE}2"}]})
    assert r.status == 200, r.body
    await tail.until(lambda line: "unknown type" in line)
    assert await tail.stop() == 0
    text = "\n".join(tail.lines)
    no_control(text)
    assert "id=m\\x1b[2J\\x1b]0;TITLE-HIJACK\\x07\\x9b31m1" in text, text


async def refuse_with_escapes(request: web.Request) -> web.Response:
    """A Segment upstream refusing every batch with terminal escapes in its answer."""
    return web.Response(status=400, text=f"{HOSTILE} reason")


async def test_dead_list_and_status_escape_an_upstream_s_control_characters(
        make_agent: Any) -> None:
    async with serving("/v1/batch", refuse_with_escapes) as url:
        agent = await make_agent(port=free_port(), upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url, "keys": ["*"],
            "flush_interval_s": 0.05}])
        r = await call(agent.port, "/v1/track", {"event": "e", "userId": "u"},
                       headers={"Authorization": basic(APP_KEY)})
        assert r.status == 200, r.body
        await dead_letters(agent, 1)
        listed = await outpost("list", config=agent.config_path)
        [letter] = await agent.spool.dead_letters()
        shown = await outpost("show", str(letter["seq"]), config=agent.config_path)
        code, status = await run_outpost("status", "--config", agent.config_path)
    assert code == 0, status
    assert json.loads(shown)["reason"] == f"HTTP 400: {HOSTILE} reason"   # still JSON
    for text in (listed, status, shown):
        no_control(text)
    for text in (listed, status):
        assert "\\x1b]0;TITLE-HIJACK\\x07" in text, text


async def test_tail_escapes_an_app_s_bidi_and_format_characters(make_agent: Any) -> None:
    agent = await make_agent(port=free_port())
    tail = await Tail.start("--config", agent.config_path)
    r = await call(agent.port, "/v1/track", {"event": f"Pay{INVISIBLE}ment", "userId": "u",
                                             "messageId": f"m{INVISIBLE}1"},
                   headers={"Authorization": basic(APP_KEY)})
    assert r.status == 200, r.body
    r = await call(agent.port, f"/app/{APP_KEY}/track", {"data": [
        {"type": f"warp{INVISIBLE}", "name": f"n{INVISIBLE}", "id": 2}]})
    assert r.status == 200, r.body
    await tail.until(lambda line: "unknown type" in line)
    assert await tail.stop() == 0
    text = "\n".join(tail.lines)
    assert not any(c in text for c in INVISIBLE), ascii(text)
    assert "id=m\\u202a\\u202b" in text and "\\U000e00411" in text, ascii(text)
    assert "warp\\u202a" in text, ascii(text)


async def test_tail_tells_an_escape_s_own_characters_from_the_character_it_names(
        make_agent: Any) -> None:
    """An id holding the six characters `\\u202e` was shown as the one holding U+202E is
    (`id=m\\u202e1` both): a backslash was left as it is, so an app could pass one event
    off as another. Shown doubled, as repr shows it (and the tail's names already were)."""
    agent = await make_agent(port=free_port())
    tail = await Tail.start("--config", agent.config_path)
    for ident in ("m\\u202e1", "m\u202e1"):
        r = await call(agent.port, "/v1/track", {"event": "e", "userId": "u",
                                                 "messageId": ident},
                       headers={"Authorization": basic(APP_KEY)})
        assert r.status == 200, r.body
    await tail.until(lambda line: "id=" in line)
    second = await tail.until(lambda line: "id=" in line)
    assert await tail.stop() == 0
    first = next(line for line in tail.lines if "id=" in line)
    assert first.endswith("id=m\\\\u202e1"), ascii(first)
    assert second.endswith("id=m\\u202e1"), ascii(second)


async def refuse_echoing_the_event(request: web.Request) -> web.Response:
    """A Segment upstream refusing every batch, its answer echoing the event's name."""
    batch = (await request.json())["batch"]
    return web.Response(status=400, text=f"bad event name {batch[0]['event']}")


async def test_dead_letters_and_status_escape_bidi_and_format_characters(
        make_agent: Any) -> None:
    async with serving("/v1/batch", refuse_echoing_the_event) as url:
        agent = await make_agent(port=free_port(), upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url, "keys": ["*"],
            "flush_interval_s": 0.05}])
        # The six characters `\\u202e` too: shown so as not to pass for the one they name.
        r = await call(agent.port, "/v1/track", {"event": f"txt{INVISIBLE}\\u202e.exe",
                                                 "userId": "u"},
                       headers={"Authorization": basic(APP_KEY)})
        assert r.status == 200, r.body
        await dead_letters(agent, 1)
        [letter] = await agent.spool.dead_letters()
        assert INVISIBLE in letter["reason"]   # stored as the upstream said it
        listed = await outpost("list", config=agent.config_path)
        shown = await outpost("show", str(letter["seq"]), config=agent.config_path)
        code, status = await run_outpost("status", "--config", agent.config_path)
    assert code == 0, status
    assert json.loads(shown)["reason"] == letter["reason"]   # still the same JSON
    for text in (listed, status, shown):
        assert not any(c in text for c in INVISIBLE), ascii(text)
    for text in (listed, status):
        assert "bad event name txt\\u202a\\u202b" in text, ascii(text)
    assert "\\U000e0041\\\\u202e.exe" in listed, ascii(listed)   # status cuts it short


def on_a_terminal(*args: str) -> tuple[int, bytes]:
    """`python -m agent ARGS` with a pseudo-terminal for its stdout: (exit code, what the
    terminal got). Blocking: run it on a thread beside the agent's loop."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=ROOT,
                                stdout=slave, stderr=subprocess.DEVNULL)
    finally:
        os.close(slave)
    got = bytearray()
    try:
        while select.select([master], [], [], 30)[0]:   # bounded: 30 s of silence ends it
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:   # EIO: the command closed the terminal's last end
                break
            if not chunk:
                break
            got += chunk
    finally:
        os.close(master)
    return proc.wait(30), bytes(got)


async def test_dead_export_to_a_terminal_escapes_what_a_terminal_obeys(
        make_agent: Any, tmp_path: Path) -> None:
    """`outpost dead export -` on a terminal wrote the letters' C1 controls (CSI as one
    character) and bidi overrides raw: JSON escapes C0 alone. On a terminal they are \\u
    escapes, the same JSON; a file or a pipe gets the letters' bytes as they are."""
    async with serving("/v1/batch", refuse_echoing_the_event) as url:
        agent = await make_agent(port=free_port(), upstreams=[{
            "name": "seg", "protocol": "segment-http", "url": url, "keys": ["*"],
            "flush_interval_s": 0.05}])
        r = await call(agent.port, "/v1/track", {"event": f"E{HOSTILE}{INVISIBLE}",
                                                 "userId": "u"},
                       headers={"Authorization": basic(APP_KEY)})
        assert r.status == 200, r.body
        await dead_letters(agent, 1)
        out = tmp_path / "dead.jsonl"
        await outpost("export", str(out), config=agent.config_path)
        code, shown = await asyncio.to_thread(
            on_a_terminal, "dead", "export", "-", "--config", agent.config_path)
    assert code == 0, shown
    text = shown.decode()
    assert not any(c in text for c in (*RAW, *INVISIBLE)), ascii(text)
    [line] = text.splitlines()
    assert json.loads(line) == json.loads(out.read_text())
    assert f"\x9b31m{INVISIBLE}" in out.read_text()   # the file: as they are


def closed_pipe() -> int:
    """A pipe's write end whose reader has already left."""
    r, w = os.pipe()
    os.close(r)
    return w


@pytest.mark.parametrize("command", [["dead", "list", "--config"], ["status", "--config"],
                                     ["check-config"]])
async def test_a_reader_that_left_ends_a_command_with_141(tmp_path: Path,
                                                          command: list[str]) -> None:
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    w = closed_pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *command, str(cfg), cwd=ROOT, stdout=w,
            stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(w)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode()) == (141, "")


@pytest.mark.parametrize("command", [["--help"], ["--version"], ["dead", "list", "--help"]])
async def test_help_to_a_reader_that_left_ends_with_141(command: list[str]) -> None:
    """`outpost --help | true`: argparse's own output dropped the failed write and
    exited 0, where every other command's output exits 141."""
    w = closed_pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *command, cwd=ROOT, stdout=w,
            stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(w)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode()) == (141, "")


def test_help_lists_every_exit_code_of_the_docs_table() -> None:
    """The top-level help's exit statuses said 0, 1 and 2; docs/operations.md's table has
    130 and 141 too."""
    docs = (ROOT / "docs" / "operations.md").read_text()
    table = docs.split("### Exit codes", 1)[1].split("No operator mistake", 1)[0]
    codes = re.findall(r"^\| `(\d+)` \|", table, re.MULTILINE)
    assert codes == ["0", "1", "2", "130", "141"], table
    run = subprocess.run([sys.executable, "-m", "agent", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    listed = " ".join(run.stdout.split("Exit status:", 1)[1].split("\n\n", 1)[0].split())
    for code in codes:
        assert re.search(rf"(^|; ){code} ", listed), (code, listed)


async def test_tail_ends_once_its_reader_left_with_no_event_coming(
        make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail_routes, "KEEPALIVE_S", 0.1)
    monkeypatch.setattr(tail_routes, "CHECK_S", 0.05)
    agent = await make_agent(port=free_port())
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "tail", "--config", agent.config_path, cwd=ROOT,
            stdout=w, stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as reader:
            first = await asyncio.to_thread(reader.readline)
        assert b"watching" in first   # the reader leaves (`| head -1`): no event follows
        _, err = await asyncio.wait_for(proc.communicate(), 4)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (proc.returncode, err.decode()) == (141, "")


async def test_tail_with_its_output_closed_is_one_line(
        make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`outpost tail >&-`: Python gives no sys.stdout, and the first keepalive's look at
    it ended in an AttributeError traceback (after the view had shown nothing)."""
    monkeypatch.setattr(tail_routes, "KEEPALIVE_S", 0.1)
    agent = await make_agent(port=free_port())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "tail", "--config", agent.config_path, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: os.close(1))  # noqa: PLW1509 (a close only)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    said = err.decode()
    assert proc.returncode == 1 and said.count("\n") == 1, said
    assert "Traceback" not in said and "standard output is closed" in said, said


async def test_tail_cut_off_mid_stream_says_so_not_that_no_agent_answers(
        tmp_path: Path) -> None:
    """A view's connection reset after it began (the agent closed a view that read
    nothing, and its reader came back too late) is not "no agent answering"."""
    shown = asyncio.Event()   # the tail has printed the stream's first message

    async def cut_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'data: {"kind":"watching","key":null,"viewers":1}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body))
        await writer.drain()
        await shown.wait()
        writer.get_extra_info("socket").setsockopt(   # closed with a reset, not a FIN
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(cut_off, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "tail", "--config", str(cfg), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        assert b"watching" in await asyncio.wait_for(proc.stdout.readline(), 20)
        shown.set()
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        server.close()
    assert proc.returncode == 1
    [line] = out.decode().splitlines()
    assert line.startswith("outpost: the live view was cut off (ConnectionResetError"), line


async def test_tail_refuses_a_mistyped_fingerprint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    for bad in ("k:XYZ", "k:23d572f", "k:23d572fbb"):
        code, out = await run_outpost("tail", "--key", bad, "--config", str(cfg))
        assert code == 2, out
        [line] = out.splitlines()
        assert "k:xxxxxxxx" in line and bad in line, line


async def test_status_escapes_every_field_of_whatever_answers_status(tmp_path: Path) -> None:
    """Another local program may hold the agent's port and answer /status in a snapshot's
    shape: its version, upstream names, states, counter and drop names, refused APIs and the
    rest reached the table raw, so it could clear the operator's screen or set the title.
    Every field is shown escaped; a value (an upstream's name) with its backslash doubled."""
    bad = HOSTILE + INVISIBLE
    snapshot = {
        "version": bad, "time": 1000.0, "uptime_s": 5, "queue_depth": bad,
        "oldest_event_age_s": None, "unrouted": {"keys": bad, "queue_depth": bad},
        "spool": {"path": bad, "used_bytes": 1, "max_bytes": 2, "expiry_errors": bad,
                  "expiry_last_error": bad, "open_error": bad},
        "dead_letters": bad, "dead_reasons": [{"reason": bad, "upstream": bad,
                                               "count": bad, "newest": 1}],
        "dead_reasons_error": bad,
        "counters": {"ingested": bad, "dead_retried": bad, "dedupe_forgotten": bad,
                     "spool_corrupt": bad, "dead_dropped_corrupt": bad, "wal_damaged": bad},
        "drops": {bad: bad},
        "upstreams": [{"name": f"up\\u202e{bad}", "protocol": bad, "state": bad,
                       "queue_depth": bad, "queue_bytes": 1, "acked": bad, "retries": bad,
                       "last_ack": None, "last_error": bad, "frame_limit_bytes": None,
                       "slow_limit_bytes": None, "unreachable_for_s": None}],
        "ingest": {"refused": {bad: {bad: bad}}},
        "sync": {"profile": bad, "reason": bad, "metered": bad, "metered_detail": bad,
                 "held_events": bad, "held_lanes": {"high": bad, "normal": bad},
                 "errors": 2, "last_error": bad},
        "reload": {"last_error": bad, "needs_restart": [bad]},
    }

    async def answer(_: web.Request) -> web.Response:
        return web.json_response(snapshot)
    app = web.Application()
    app.router.add_get("/status", answer)
    server = LoopbackServer()
    await server._serve(app)
    try:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=server.port)
        code, out = await run_outpost("status", "--config", str(cfg))
    finally:
        await server.stop()
    assert code == 0 and "UPSTREAM" in out, out
    no_control(out)
    assert not any(c in out for c in INVISIBLE), ascii(out)
    assert "up\\\\u202e\\x1b[2J" in out, ascii(out)


@pytest.mark.parametrize("messages,shown", [
    ([{"kind": "resent", "count": HOSTILE + INVISIBLE},
      {"kind": "dropped", "count": HOSTILE + INVISIBLE}], "not an Outpost agent"),
    ([{"kind": "ingested", "api": 7, "key": "k", "type": None, "name": None, "id": 1,
       "warnings": []}], "not an Outpost agent"),
], ids=["counts", "not-text"])
async def test_tail_escapes_every_field_of_whatever_answers_tail(
        tmp_path: Path, messages: list[dict[str, Any]], shown: str) -> None:
    """Another local program on the agent's port answering /tail as a live view: the counts
    of its resent and dropped messages reached the terminal raw, and a field the tail shows
    as text that was no text (a number) ended in a traceback. Named not the agent, in one
    line, its text never shown."""
    async def stream(_: web.Request) -> web.Response:
        body = "".join(f"data: {json.dumps(m)}\n\n" for m in
                       [{"kind": "watching", "key": None, "viewers": 1}, *messages])
        return web.Response(text=body, content_type="text/event-stream")
    app = web.Application()
    app.router.add_get("/tail", stream)
    server = LoopbackServer()
    await server._serve(app)
    try:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=server.port)
        code, out = await run_outpost("tail", "--config", str(cfg))
    finally:
        await server.stop()
    assert code == 1 and "Traceback" not in out and shown in out, out
    no_control(out)
    assert not any(c in out for c in INVISIBLE), ascii(out)
