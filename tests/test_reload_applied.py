"""What a reload (SIGHUP) applies at once, and what it says needs a restart
(docs/operations.md "Reload (SIGHUP)"). In-process agents; ``Agent.reload`` is what
SIGHUP runs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web

from agent import config as config_mod
from agent.dialects.base import Example
from agent.forwarder.supervisor import Seams
from agent.service import Agent
from tests.conftest import free_port, write_config
from tests.dialect_examples import examples
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.loopback_server import LoopbackServer
from tests.segment_helpers import call, reloaded_while_read
from tests.test_dead_many import outpost_in_thread
from tests.test_upstream_faults import event
from tests.waiting import wait_for


async def test_a_key_a_reload_no_longer_accepts_is_refused_on_a_websocket_already_open(
        make_agent: Any) -> None:
    """A Nucleus module keeps its websocket open for good: a key taken out of
    listen.accept_keys must stop being stored on it too, not only on new connections."""
    agent = await make_agent(listen={"accept_keys": ["kept", "revoked"]})
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{agent.port}/app/revoked/track") as ws:
            await ws.send_json({"data": [event(1)]})
            assert await ws.receive_json() == {"reportedIds": [1]}
            write_config(Path(agent.config_path), agent.spool.path,
                         listen={"accept_keys": ["kept"]})
            await agent.reload()
            await ws.send_json({"data": [event(2)]})
            msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE, msg
        assert msg.data == WSCloseCode.POLICY_VIOLATION, msg
        assert "listen.accept_keys" in msg.extra, msg
    assert agent.spool.streams["revoked"].depth == 1   # the first event only


async def test_a_key_a_reload_no_longer_accepts_is_refused_while_the_reload_waits_for_a_send(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """An operator revokes a leaked key and reloads: from then on its requests get 401.
    Not once the reload has waited (up to its 5 s grace) for a slow upstream's batch in
    flight: the app's events meanwhile are stored and forwarded under the revoked key."""
    faulty.script = [Fault("slow", delay=30.0)]   # the batch in flight is never answered
    up = {"name": "up", "protocol": "nucleus-http", "url": faulty.http_url,
          "flush_interval_s": 0.05, "timeout_s": 60}
    agent = await make_agent(upstreams=[up], listen={"accept_keys": ["kept", "revoked"]},
                             seams=Seams(grace_s=3.0))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/kept/track",
                          json={"data": [event(1)]}) as r:
            assert r.status == 200
        await wait_for(lambda: len(faulty.requests) == 1)   # in flight, unanswered
        sending = agent.forwarding.loops["kept"]
        write_config(Path(agent.config_path), agent.spool.path, upstreams=[up],
                     listen={"accept_keys": ["kept"]})
        reloading = asyncio.ensure_future(agent.reload())
        await wait_for(lambda: sending.stopping)   # the reload waits for that batch
        async with s.post(f"http://127.0.0.1:{agent.port}/app/revoked/track",
                          json={"data": [event(2)]}) as r:
            status = r.status
        assert not reloading.done()   # answered while the reload waited
        await reloading
    assert status == 401
    assert "revoked" not in agent.spool.streams


# Every API's plain POST of one event (each dialect's examples): a key in the request's head
# is let in before its body is read.
POSTS = [ex for ex in examples("revoked") if not ex.websocket and ex.body]


@pytest.mark.parametrize("ex", POSTS, ids=[f"{ex.method} {ex.path}" for ex in POSTS])
async def test_a_key_a_reload_no_longer_accepts_is_refused_for_a_post_still_sending_its_body(
        make_agent: Any, ex: Example) -> None:
    """An operator revokes a leaked key and reloads while one of its posts is still sending
    its body (a slow link, or a client that drips it): let in before the reload, it ends
    after it, and must not be stored under the revoked key, as a websocket's next message
    is not. It gets the 401, as a post begun after the reload does."""
    agent = await make_agent(listen={"accept_keys": ["kept", "revoked"]})
    assert ex.body is not None
    head = "".join(f"{name}: {value}\r\n" for name, value in ex.headers.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        writer.write(f"{ex.method} {ex.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                     f"Content-Length: {len(ex.body)}\r\nConnection: close\r\n\r\n".encode()
                     + ex.body[:5])
        await writer.drain()
        # Let in, its body being read: the whole body is reserved against the budget.
        await wait_for(lambda: agent.metrics.inflight_bytes == len(ex.body))
        write_config(Path(agent.config_path), agent.spool.path,
                     listen={"accept_keys": ["kept"]})
        assert await agent.reload()
        writer.write(ex.body[5:])
        await writer.drain()
        reply = await reader.read()
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 401 "), reply
    assert b"listen.accept_keys" in reply, reply
    assert "revoked" not in agent.spool.streams


async def test_a_large_batch_of_several_keys_a_reload_revokes_one_of_as_it_is_judged_is_207(
        make_agent: Any) -> None:
    """A Segment batch over 64 KiB is judged on the parse worker (agent/dialects/offload.py).
    A reload landing after the worker let a key's messages in, before the commit, took that
    key out of listen.accept_keys: the commit refused the whole batch (401), the other
    keys' messages with it, and an SDK drops a batch on a 4xx. It gets what the same batch
    gets after the reload (as a small batch, judged in the commit's turn of the loop,
    does): a 207 refusing the revoked key's messages alone, the others stored."""
    agent = await make_agent(listen={"accept_keys": ["kept", "revoked"]})
    batch = {"batch": [{"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}",
                        "writeKey": ("kept", "revoked")[i % 2], "properties": {"p": "x" * 10_000}}
                       for i in range(8)]}
    write_config(Path(agent.config_path), agent.spool.path, listen={"accept_keys": ["kept"]})
    reply = await reloaded_while_read(agent, lambda: call(agent.port, "/v1/batch", batch))
    after = await call(agent.port, "/v1/batch", batch)   # the same batch, judged after it
    assert after.status == 207, after.body
    assert reply.status == 207, reply.body
    assert reply.json() == after.json()
    assert "revoked" not in agent.spool.streams
    assert agent.spool.streams["kept"].depth == 4


async def test_a_reload_names_what_still_needs_a_restart_by_what_runs(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A change a reload does not apply is named at every reload until a restart, and a
    change back to what runs is not named: the comparison is with what is in force, not
    with the file the last reload read."""
    caplog.set_level(logging.WARNING, "outpost")
    agent = await make_agent(storage={"max_age_days": 30})
    config, spool = Path(agent.config_path), agent.spool.path

    async def reload_with(max_age_days: int, idle_timeout_s: float) -> str:
        write_config(config, spool, storage={"max_age_days": max_age_days},
                     listen={"idle_timeout_s": idle_timeout_s})
        caplog.clear()
        await agent.reload()
        return " ".join(r.getMessage() for r in caplog.records if "needs a restart" in
                        r.getMessage())

    first = await reload_with(7, 5)
    assert "[storage]" in first and "listen.idle_timeout_s" in first, first
    again = await reload_with(7, 5)   # still not applied: said again
    assert "[storage]" in again and "listen.idle_timeout_s" in again, again
    assert await reload_with(30, 60) == ""   # what runs: nothing to restart for


async def test_a_reload_warns_of_a_config_that_strands_events_as_a_start_does(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`kill -HUP` runs no check-config: what a start warns of in a valid config (here an
    upstream that can never get an event) went unsaid at a reload, and the events it
    strands with it."""
    caplog.set_level(logging.WARNING, "outpost")
    first = {"name": "first", "protocol": "nucleus-http", "url": "http://127.0.0.1:9",
             "keys": ["*"]}
    agent = await make_agent(upstreams=[first])
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[first, {**first, "name": "second", "keys": ["app1"]}])
    await agent.reload()
    assert "upstream 'second' gets no events" in caplog.text, caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP")
async def test_check_config_reload_of_a_file_the_agent_does_not_read_is_refused(
        make_agent: Any, tmp_path: Path) -> None:
    """`outpost check-config FILE --reload PID` checked FILE and signalled the agent, which
    re-reads the file it started with: "ok", exit 0, and nothing of FILE applied. Refused
    in one line naming the agent's file, unsignalled; its own file is checked and
    signalled as before. The agent runs in this process: SIGHUPs to it are counted."""
    agent = await make_agent(port=free_port())
    other = write_config(tmp_path / "edited.toml", agent.spool.path, port=agent.port,
                         listen={"accept_keys": ["new"]})
    hups: list[int] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, hups.append, 1)
    try:
        code, out = await outpost_in_thread("check-config", str(other), "--reload",
                                            str(os.getpid()))
        assert code == 2, out
        lines = out.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out, out
        assert agent.config_path in lines[0] and str(other) in lines[0], out
        code, out = await outpost_in_thread("check-config", agent.config_path, "--reload",
                                            str(os.getpid()))
        assert code == 0, out
        await wait_for(lambda: hups)
        assert hups == [1], "the file the agent does not read was signalled too"
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP")
async def test_check_config_reload_of_the_agent_s_own_file_in_a_latin1_directory(
        tmp_path: Path) -> None:
    """The agent says which file it re-reads as /status spells a path, a byte that is not
    UTF-8 as `\\xe9`; check-config --reload took that text for a path, another file, and
    refused every reload (systemd's ExecReload) of an agent whose config is in a directory
    named in Latin-1: "re-reads .../d\\xe9/agent.toml at a reload, not .../d\\xe9/agent.toml"."""
    where = tmp_path / os.fsdecode(b"d\xe9")
    where.mkdir()
    cfg = write_config(where / "agent.toml", Path("spool.db"), port=free_port())
    agent = Agent(config_mod.load_file(cfg), str(cfg))
    await agent.start()
    hups: list[int] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, hups.append, 1)
    try:
        code, out = await outpost_in_thread("check-config", str(cfg), "--reload",
                                            str(os.getpid()))
        assert code == 0, out
        await wait_for(lambda: hups)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await agent.stop()


async def _older_agent(tmp_path: Path) -> tuple[str, LoopbackServer]:
    """What an agent older than /status's `reload.pid` answers at the config's address
    (an upgrade installed while it runs: systemd's ExecReload runs the new command)."""
    async def status(request: web.Request) -> web.Response:
        return web.json_response({"reload": {"count": 0, "config": None}})
    app = web.Application()
    app.router.add_get("/status", status)
    server = LoopbackServer()
    await server._serve(app)
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=server.port)
    return str(cfg), server


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP")
@pytest.mark.parametrize("there", ["another-pid", "none-answers", "older-agent"])
async def test_check_config_reload_of_a_pid_that_is_not_the_agent_is_refused(
        make_agent: Any, tmp_path: Path, there: str) -> None:
    """`outpost check-config --reload PID` signalled PID whatever answered at the config's
    address: an agent that is another PID (a typo), or none at all. SIGHUP's default action
    ends a process: an ssh session, say. Refused in one line, the PID unsignalled. An agent
    too old to say its PID was said to be "PID None"."""
    older = None
    if there == "another-pid":
        cfg = (await make_agent(port=free_port())).config_path   # this process's PID
    elif there == "older-agent":
        cfg, older = await _older_agent(tmp_path)
    else:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=free_port()))
    # SIGHUP's default action back (nohup leaves it ignored): signalled, it would end.
    target = subprocess.Popen(["sleep", "30"], start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # noqa: PLW1509
    try:
        code, out = await outpost_in_thread("check-config", cfg, "--reload", str(target.pid))
        lines = out.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out, out
        assert code == (1 if there == "none-answers" else 2), out
        assert f"PID {target.pid}" in lines[0], out
        assert {"another-pid": f"PID {os.getpid()}", "none-answers": "no agent answering",
                "older-agent": "does not say its PID"}[there] in lines[0], out
        assert "None" not in lines[0], out
    finally:
        target.terminate()
        # A SIGHUP sent before this SIGTERM would be the one it died of.
        assert target.wait(10) == -signal.SIGTERM, "the PID was signalled"
        if older is not None:
            await older.stop()
