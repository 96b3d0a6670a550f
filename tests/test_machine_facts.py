"""Device facts read from the machine (the environment's locale, the OS's names) are held
to the rule of agent.toml's [device] values: one that breaks it is not used, as if the
machine gave none, and one warning line says which and why; the agent still starts."""

from __future__ import annotations

import asyncio
import locale
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.waiting import wait_for

KEY = "app-facts"


async def init_under(tmp_path: Path, agent_process: Callable[..., AgentProcess],
                     env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The init event an app posts, as the upstream received it from an `outpost run`
    started with ``env``, and that agent's log."""
    upstream = await FaultyUpstream().start()
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "up", "protocol": "nucleus-http", "url": upstream.http_url, "keys": [KEY],
         "flush_interval_s": 0.05}])
    agent = agent_process(config, port, env=env)
    await asyncio.to_thread(agent.start)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{agent.url}/app/{KEY}/track", json={"data": [
                    {"id": "i1", "type": "init"}]}) as r:
                assert r.status == 200, await r.text()
        await wait_for(lambda: "i1" in upstream.received_ids())
        assert agent.terminate() == 0
    finally:
        await upstream.stop()
    [init] = [ev for r in upstream.requests for ev in r.events]
    return init, agent.log.read_text()


async def test_a_bad_locale_in_the_environment_is_skipped_and_said(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    # An escape sequence in the first variable looked at, 10,000 characters in the next:
    # both skipped, the third one (a real locale) names the language.
    init, log = await init_under(tmp_path, agent_process, {
        "LC_ALL": "en_US\x1b[31m", "LC_MESSAGES": "fr_FR" + "x" * 9_995,
        "LANG": "de_DE.UTF-8"})
    assert (init["language"], init["locale"]) == ("de-DE", "de-DE"), init
    ignored = [line for line in log.splitlines() if "not used as the device's language" in line]
    assert len(ignored) == 2, log
    assert "LC_ALL" in ignored[0] and "control characters" in ignored[0], ignored
    assert "LC_MESSAGES" in ignored[1] and "at most 128 characters" in ignored[1], ignored
    assert "x" * 200 not in log   # the long value is not repeated in the log


async def test_an_os_release_of_bytes_no_utf8_is_left_out_and_said(
        make_agent: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A kernel release holding a byte that is no UTF-8 (a Latin-1 'é' in the kernel's
    local version): os.uname gives it as a lone surrogate, which no event can carry. Not
    used, and said, as any other bad fact: the init events it would fill are still taken."""
    monkeypatch.setattr(platform, "release", lambda: "6.1.0-caf\udce9")
    with caplog.at_level(logging.WARNING, logger="outpost"):
        agent = await make_agent()
    assert agent.facts.osVersion == ""
    said = [r.getMessage() for r in caplog.records if "device's osVersion" in r.getMessage()]
    assert len(said) == 1 and "kernel's release" in said[0], said
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/{KEY}/track", json={"data": [
                {"id": "i1", "type": "init"}]}) as r:
            assert r.status == 200, await r.text()
    assert agent.spool.depth == 1


async def test_a_locale_variable_that_names_no_locale_gives_no_language(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A POSIX locale is language[_territory][.codeset][@modifier]: a variable holding
    anything else (a word, a codeset alone, a path) names no language, and the upstream
    would be sent it as the user's (`garbage`, `UTF-8`, `POSIX`). Skipped, and said, as a
    value breaking the [device] rule: the next variable names the language."""
    init, log = await init_under(tmp_path, agent_process, {
        "LC_ALL": "POSIX.UTF-8", "LC_MESSAGES": "garbage", "LANG": "UTF-8",
        "LANGUAGE": "fr_FR:en"})
    assert (init["language"], init["locale"]) == ("fr-FR", "fr-FR"), init
    ignored = [line for line in log.splitlines() if "not used as the device's language" in line]
    assert [v for v in ("LC_ALL", "LC_MESSAGES", "LANG") if any(v + " " in i for i in ignored)] \
        == ["LC_ALL", "LC_MESSAGES", "LANG"], log


async def test_the_c_librarys_locale_of_windows_names_no_language(
        make_agent: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On Windows no LANG is set, and Python's locale.getlocale() gives the C library's
    name of the locale, `English_United States` (cpython#82986), no language tag: it was
    sent upstream as the language `English-United States`."""
    for var in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(locale, "getlocale", lambda *a: ("English_United States", "1252"))
    with caplog.at_level(logging.WARNING, logger="outpost"):
        agent = await make_agent()
    assert agent.facts.language == "en-US"
    said = [r.getMessage() for r in caplog.records if "device's language" in r.getMessage()]
    assert len(said) == 1 and "C library's locale" in said[0], said


async def test_a_locale_of_another_script_keeps_its_script_in_the_language(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """sr_RS@latin is Serbian written in Latin letters; the tag sr-RS is Serbian in its
    default script, Cyrillic: the modifier that names the script is the tag's script."""
    init, _ = await init_under(tmp_path, agent_process, {
        "LC_ALL": "", "LC_MESSAGES": "", "LANG": "sr_RS.UTF-8@latin", "LANGUAGE": ""})
    assert (init["language"], init["locale"]) == ("sr-Latn-RS", "sr-Latn-RS"), init


async def test_a_language_tag_set_as_the_locale_is_sent_as_it_is(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """`LANG=pt-BR`, a language tag where glibc expects pt_BR: it names the language all the
    same, and was sent so until locale names were checked; taken as it is, not skipped for
    the next variable (here none: `en-US`)."""
    init, _ = await init_under(tmp_path, agent_process, {
        "LC_ALL": "", "LC_MESSAGES": "", "LANG": "pt-BR", "LANGUAGE": ""})
    assert (init["language"], init["locale"]) == ("pt-BR", "pt-BR"), init
