"""Names from the OS that are not UTF-8: a home or data directory named in another encoding
(Latin-1's "é" is the byte 0xe9). Python keeps such bytes as lone surrogates, which SQLite,
orjson and a UTF-8 stream refuse to encode; each user path below ran into one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import config as config_mod
from agent.service import Agent
from tests.conftest import write_config
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, segment_up, wait_for
from tests.test_basic_auth_keys import track
from tests.test_cli_mistakes import outpost


@pytest.fixture
def latin1_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """HOME in a directory named in Latin-1 ("caf\\xe9"); storage.path "~/spool.db" is there."""
    home = bytes(tmp_path) + b"/caf\xe9"
    os.mkdir(home)
    monkeypatch.setenv("OUTPOST_SYSTEM", "0")
    monkeypatch.setenv("HOME", os.fsdecode(home))
    return os.fsdecode(home)


def test_check_config_takes_a_spool_in_a_directory_named_in_another_encoding(
        tmp_path: Path, latin1_home: str) -> None:
    cfg = write_config(tmp_path / "agent.toml", Path("~/spool.db"))
    run = outpost("check-config", str(cfg))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


async def test_an_agent_on_such_a_spool_delivers_expires_and_shows_its_status(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, latin1_home: str) -> None:
    agent = await make_agent(spool=Path("~/spool.db"), upstreams=[segment_up(fake_segment)])
    reply = await call(agent.port, "/v1/batch", {"batch": [track("l-1")], "writeKey": "k"})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1 and agent.spool.depth == 0)
    await agent.spool.prune()
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert r.status == 200, await r.text()
        status = await r.json()
    # Named with its byte escaped, as the log and the commands name it.
    assert status["spool"]["path"] == f"{tmp_path}/caf\\xe9/spool.db"
    assert status["spool"]["expiry_errors"] == 0, status["spool"]["expiry_last_error"]


async def test_a_lang_that_is_not_utf8_gives_the_events_a_language_they_can_carry(
        make_agent: Any, fake_segment: FakeSegment, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LANG holding bytes of another encoding names no locale: it is passed over, as an
    unset one is, and the events the device facts fill are taken and go."""
    for var in ("LC_ALL", "LC_MESSAGES", "LANGUAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LANG", os.fsdecode(b"de_DE\xe9"))
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    opened = {**track("g-1"), "event": "Application Opened"}   # filled with the device facts
    reply = await call(agent.port, "/v1/batch", {"batch": [opened], "writeKey": "k"})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 1 and agent.spool.depth == 0)
    assert fake_segment.events[0]["context"]["locale"].isascii()


@pytest.mark.parametrize("command", [["check-config"], ["dead", "list", "--config"]],
                         ids=lambda c: c[0])
def test_a_command_names_a_config_in_such_a_directory_on_a_utf8_terminal(
        latin1_home: str, command: list[str]) -> None:
    """Under a UTF-8 locale (en_US.UTF-8) Python's stdout refuses lone surrogates, where
    the C locale's writes them back as the bytes they were: PYTHONIOENCODING says so here."""
    cfg = write_config(Path(latin1_home) / "agent.toml", Path("~/spool.db"))
    run = outpost(*command, str(cfg), env={"PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "caf\\xe9" in run.stdout, run.stdout   # as the log and /status name it


async def test_a_system_bus_address_that_is_not_utf8_is_named_in_status(
        make_agent: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = os.fsdecode(bytes(tmp_path) + b"/bus\xe9")   # nothing there: no system bus
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={bus}")
    agent = await make_agent(sync={"on_metered": "hold"})
    url = f"http://127.0.0.1:{agent.port}/status"
    seen: list[Any] = []

    async def told() -> bool:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            seen[:] = [r.status, await r.text()]
            return r.status != 200 or "bus\\\\xe9" in seen[1]

    await wait_for(told, timeout=5)
    assert seen[0] == 200, seen


async def test_a_refused_reload_of_a_config_in_such_a_directory_is_shown_in_status(
        tmp_path: Path, latin1_home: str) -> None:
    cfg = write_config(Path(latin1_home) / "agent.toml", tmp_path / "spool.db")
    agent = Agent(config_mod.load_file(cfg), str(cfg))
    await agent.start()
    try:
        cfg.write_text("[listen\n")   # a mistake: the reload is refused, and says why
        await agent.reload()
        async with aiohttp.ClientSession() as s, \
                s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            assert r.status == 200, await r.text()
            reload = (await r.json())["reload"]
    finally:
        await agent.stop()
    assert reload["refused"] == 1
    assert reload["last_error"].startswith(f"{tmp_path}/caf\\xe9/agent.toml: invalid TOML")
    assert reload["config"] == f"{tmp_path}/caf\\xe9/agent.toml"


async def test_a_spool_that_cannot_be_opened_in_such_a_directory_is_shown_in_status(
        tmp_path: Path, latin1_home: str) -> None:
    """The spool's directory removed under the agent and another agent started on the path:
    the first refuses events, open_error saying why, naming the path. /status answered 500
    (orjson refuses the path's lone surrogate), and with it the status page and `outpost
    status`, just when they had something to say."""
    agents: list[Agent] = []
    try:
        for n in range(2):
            if n:   # rm -rf of the first's state directory, then a second agent on it
                shutil.rmtree(latin1_home)
                os.mkdir(latin1_home)
            cfg = write_config(tmp_path / f"agent{n}.toml", Path("~/spool.db"))
            agent = Agent(config_mod.load_file(cfg), str(cfg), holds_lock=True)
            await agent.start()
            agents.append(agent)
        reply = await call(agents[0].port, "/v1/batch", {"batch": [track("u-1")],
                                                          "writeKey": "k"})
        assert reply.status == 503, reply.body
        async with aiohttp.ClientSession() as s, \
                s.get(f"http://127.0.0.1:{agents[0].port}/status") as r:
            assert r.status == 200, await r.text()
            spool = (await r.json())["spool"]
    finally:
        for agent in agents:
            await agent.stop()
    assert f"{tmp_path}/caf\\xe9/spool.db is in use by another agent" in spool["open_error"]
