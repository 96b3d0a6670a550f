"""`outpost dead retry|purge --upstream NAME`: one row of `outpost dead list`, which groups
dead letters by (reason, upstream). Two upstreams refusing with the same words (a 400's
"invalid") give one reason: `--reason R` alone takes both upstreams' letters, and a purge
meant for one deleted the other's too. Run as the real command, against a running agent
and against the spool alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.service import Agent
from tests.conftest import free_port, write_config
from tests.fakes.ops_scene import post_events
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call
from tests.test_dead_letters import RefusingNucleus, dead_letters, outpost, upstream
from tests.waiting import run_outpost, wait_for


def _nothing_from(upstream_name: str, reason: str | None = None) -> str:
    if reason is None:
        return (f"no dead letter is from the upstream {upstream_name!r}: give one exactly as "
                "`outpost dead list --json` shows it")
    return (f"no dead letter from the upstream {upstream_name!r} has the reason {reason!r}: "
            "give them exactly as `outpost dead list --json` shows them")


async def _two_upstreams_one_reason(make_agent: Any, one: RefusingNucleus,
                                    two: RefusingNucleus) -> tuple[Agent, str]:
    """An agent whose upstreams `one` (app-a: ids 0, 1) and `two` (app-b: ids 5, 6) refused
    their events in the same words; and those words."""
    agent = await make_agent(port=free_port(), upstreams=[
        upstream("one", one, ["app-a"]), upstream("two", two, ["app-b"])])
    await post_events(agent.port, "app-a", range(2))
    await post_events(agent.port, "app-b", range(5, 7))
    await dead_letters(agent, 4)
    groups = json.loads(await outpost("list", "--json", config=agent.config_path))["groups"]
    # Two rows of the list, one reason.
    assert sorted((g["upstream"], g["count"]) for g in groups) == [("one", 2), ("two", 2)]
    assert len({g["reason"] for g in groups}) == 1, groups
    return agent, groups[0]["reason"]


def _entries(listed: str) -> list[tuple[str, int]]:
    return [(e["upstream"], e["id"]) for e in json.loads(listed)["entries"]]


async def test_a_running_agent_s_retry_or_purge_by_upstream_keeps_the_other_s_letters(
        make_agent: Any) -> None:
    one, two = await RefusingNucleus().start(), await RefusingNucleus().start()
    try:
        agent, reason = await _two_upstreams_one_reason(make_agent, one, two)
        cfg = agent.config_path
        assert agent.spool is not None
        before = _entries(await outpost("list", "--json", config=cfg))
        # An upstream no letter is from: nothing taken, and said so, as a reason none has.
        for cmd, done in (("purge", "purged 0 dead letters"), ("retry", "re-queued 0 dead "
                                                                 "letters at the tail of "
                                                                 "their keys' queues")):
            text = await outpost(cmd, "--reason", reason, "--upstream", "nosuch", config=cfg)
            assert text.splitlines() == [f"{done} (the running agent)",
                                         _nothing_from("nosuch", reason)], text
        text = await outpost("purge", "--all", "--upstream", "nosuch", config=cfg)
        assert text.splitlines()[-1] == _nothing_from("nosuch"), text
        assert agent.spool.dead_count == 4

        text = await outpost("purge", "--reason", reason, "--upstream", "one", config=cfg)
        assert text.splitlines() == ["purged 2 dead letters (the running agent)"], text
        assert agent.spool.dead_count == 2
        assert _entries(await outpost("list", "--json", config=cfg)) == [
            e for e in before if e[0] == "two"]

        two.refuse = None
        text = await outpost("retry", "--all", "--upstream", "two", config=cfg)
        assert "re-queued 2 dead letters" in text and "running agent" in text
        await wait_for(lambda: two.ids() == [5, 6])
        await wait_for(lambda: agent.spool is not None and agent.spool.depth == 0)
        assert agent.spool.dead_count == 0
        assert agent.spool.counters["dead_purged"] == 2
        assert agent.spool.counters["dead_retried"] == 2
    finally:
        await one.stop()
        await two.stop()


async def _stopped_with_letters(make_agent: Any) -> tuple[Agent, str]:
    """An agent stopped with letters of one reason from two upstreams (both stopped too)."""
    one, two = await RefusingNucleus().start(), await RefusingNucleus().start()
    try:
        agent, reason = await _two_upstreams_one_reason(make_agent, one, two)
        await agent.stop()
    finally:
        await one.stop()
        await two.stop()
    return agent, reason


async def test_a_stopped_agent_s_retry_or_purge_by_upstream_keeps_the_other_s_letters(
        make_agent: Any) -> None:
    agent, reason = await _stopped_with_letters(make_agent)
    cfg = agent.config_path
    assert agent.spool is not None
    where = f"({agent.spool.path} (no agent running))"
    before = _entries(await outpost("list", "--json", config=cfg))
    text = await outpost("purge", "--reason", reason, "--upstream", "nosuch", config=cfg)
    assert text.splitlines() == [f"purged 0 dead letters {where}",
                                 _nothing_from("nosuch", reason)], text
    text = await outpost("retry", "--all", "--upstream", "nosuch", config=cfg)
    assert text.splitlines()[-1] == _nothing_from("nosuch"), text
    assert _entries(await outpost("list", "--json", config=cfg)) == before

    text = await outpost("purge", "--reason", reason, "--upstream", "one", config=cfg)
    assert text.splitlines() == [f"purged 2 dead letters {where}"], text
    assert _entries(await outpost("list", "--json", config=cfg)) == [
        e for e in before if e[0] == "two"]
    text = await outpost("retry", "--reason", reason, "--upstream", "two", config=cfg)
    assert "re-queued 2 dead letters" in text and "no agent running" in text
    assert "0 dead letters" in await outpost("list", config=cfg)


async def test_a_reason_alone_still_takes_every_upstream_s_letters(make_agent: Any) -> None:
    """What a `--reason R` was and stays: all of R's letters, whichever upstream refused
    them (`--upstream` narrows it)."""
    one, two = await RefusingNucleus().start(), await RefusingNucleus().start()
    try:
        agent, reason = await _two_upstreams_one_reason(make_agent, one, two)
        text = await outpost("purge", "--reason", reason, config=agent.config_path)
        assert "purged 4 dead letters" in text, text
        assert agent.spool is not None and agent.spool.dead_count == 0
    finally:
        await one.stop()
        await two.stop()


async def test_a_malformed_upstream_is_a_client_error(make_agent: Any) -> None:
    """An upstream that is no name is refused (400), never taken for none: a purge would
    then take every upstream's letters."""
    agent = await make_agent(port=free_port())
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        for what in ("retry", "purge"):
            for body in ({"all": True, "upstream": 5}, {"reason": "r", "upstream": ["a"]},
                         {"all": True, "upstream": ""}):
                async with s.post(f"{base}/dead/{what}", json=body) as r:
                    assert r.status == 400, (what, body, r.status)
                    assert "upstream" in (await r.json())["error"]
    for cmd in ("retry", "purge"):
        await outpost(cmd, "--all", "--upstream", "", config=agent.config_path, code=2)


async def test_dead_retry_and_purge_help_name_upstream() -> None:
    for cmd in ("retry", "purge"):
        code, text = await run_outpost("dead", cmd, "--help")
        assert code == 0 and "--upstream NAME" in text, text


class _OlderAgent:
    """What answers at the agent's address when the agent running is of a version before
    `upstream` narrowed a retry or purge (an upgrade installed while it runs): it lists
    the dead letters as those did, and takes a retry or purge's "reason" or "all" alone,
    ignoring "upstream": every upstream's letters of the reason. It keeps what was asked."""

    GROUPS = [{"reason": "HTTP 400: invalid", "upstream": u, "count": 2, "oldest": 1000,
               "newest": 2000} for u in ("one", "two")]

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []
        self.runner: web.AppRunner | None = None

    async def start(self, port: int) -> _OlderAgent:
        app = web.Application()
        app.router.add_get("/dead", self.listing)
        app.router.add_post("/dead/{what}", self.change)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response({"count": 4, "groups": self.GROUPS, "reasons": 1,
                                  "entries": []})

    async def change(self, request: web.Request) -> web.Response:
        what = request.match_info["what"]
        self.asked.append((what, await request.json()))
        done = "retried" if what == "retry" else "purged"
        return web.json_response({done: 4, "queue_depth": 4, "dead_letters": 0})


async def test_an_older_agent_is_not_asked_to_narrow_by_upstream(tmp_path: Path) -> None:
    """An agent older than the command ignores "upstream" in a retry or purge, and takes
    the reason's letters of every upstream (or every letter, for --all): a purge meant
    for one row of `dead list` deleted the other upstream's letters, said "purged 4" as
    done. Nothing is asked of it: the command says why, exit 1, and names the fix."""
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    older = await _OlderAgent().start(port)
    try:
        for cmd in ("purge", "retry"):
            for pick in (["--reason", "HTTP 400: invalid"], ["--all"]):
                text = await outpost(cmd, *pick, "--upstream", "one", config=str(cfg),
                                     code=1)
                assert "older than this command" in text and "restart" in text, text
                assert "purged" not in text and "re-queued" not in text, text
        assert older.asked == []
        # Without --upstream, asked as before: the reason's letters of every upstream.
        text = await outpost("purge", "--reason", "HTTP 400: invalid", config=str(cfg))
        assert "purged 4 dead letters (the running agent)" in text, text
        assert older.asked == [("purge", {"reason": "HTTP 400: invalid", "all": False,
                                          "spool": os.path.realpath(tmp_path / "spool.db")})]
    finally:
        await older.stop()


async def _lists_by_upstream(cfg: str, reason: str) -> None:
    """`outpost dead list --upstream NAME` (and with --reason R) lists that upstream's
    letters alone, one row of the summary's; a name no letter is from lists none and says
    so, as a retry or purge of it does."""
    before = _entries(await outpost("list", "--json", config=cfg))
    for name in ("one", "two"):
        mine = [e for e in before if e[0] == name]
        assert _entries(await outpost("list", "--json", "--upstream", name, config=cfg)) == mine
        assert _entries(await outpost("list", "--json", "--upstream", name, "--reason", reason,
                                      config=cfg)) == mine
        text = await outpost("list", "--upstream", name, config=cfg)
        rows = text.split("\n\n")[-1].splitlines()   # the entries' table, after the summary
        assert rows[0].split()[:3] == ["ID", "KEY", "UPSTREAM"], text
        assert [r.split()[2] for r in rows[1:]] == [name, name], text
        text = await outpost("list", "--upstream", name, "--limit", "1", config=cfg)
        assert text.endswith("... and 1 more (--limit N, or `outpost dead export FILE`)\n"), text
    for args, said in ((["--upstream", "nosuch"], _nothing_from("nosuch")),
                       (["--upstream", "nosuch", "--reason", reason],
                        _nothing_from("nosuch", reason)),
                       (["--upstream", "one", "--reason", "HTTP 422"],
                        _nothing_from("one", "HTTP 422"))):
        text = await outpost("list", *args, config=cfg)
        assert text.splitlines()[-1] == said, text
        assert "ID " not in text and text.startswith("4 dead letters"), text
        assert _entries(await outpost("list", "--json", *args, config=cfg)) == []


async def test_a_running_agent_s_dead_list_by_upstream(make_agent: Any) -> None:
    one, two = await RefusingNucleus().start(), await RefusingNucleus().start()
    try:
        agent, reason = await _two_upstreams_one_reason(make_agent, one, two)
        await _lists_by_upstream(agent.config_path, reason)
        base = f"http://127.0.0.1:{agent.port}"
        async with aiohttp.ClientSession() as s:   # an upstream that is no name: refused
            async with s.get(f"{base}/dead", params={"upstream": ""}) as r:
                assert r.status == 400 and "upstream" in (await r.json())["error"]
    finally:
        await one.stop()
        await two.stop()
    await outpost("list", "--upstream", "", config=agent.config_path, code=2)


async def test_a_stopped_agent_s_dead_list_by_upstream(make_agent: Any) -> None:
    agent, reason = await _stopped_with_letters(make_agent)
    assert "no agent running" in await outpost("list", config=agent.config_path)
    await _lists_by_upstream(agent.config_path, reason)


async def test_dead_list_help_names_upstream() -> None:
    code, text = await run_outpost("dead", "list", "--help")
    assert code == 0 and "--upstream NAME" in text, text


class _RefusingInWords(FakeSegment):
    """A Segment collector refusing every batch for good (400) in words of its own that are
    no ASCII: a reason of emoji, the longest an HTTP upstream's reply gives a dead letter
    (the first 300 characters of the reply)."""

    async def _batch(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="\N{NO ENTRY SIGN}" * 400, status=400)


@pytest.mark.parametrize("chars", [100, 2000])
async def test_a_running_agent_s_retry_or_purge_of_the_longest_reason_and_a_long_name(
        make_agent: Any, chars: int) -> None:
    """A reason and an upstream's name in non-ASCII text went to the running agent as JSON
    escapes (\\uXXXX, six bytes a character, twelve for an emoji): a reason of an
    upstream's 300 characters with a name of 100 was "body over 4096 bytes", where the same
    command on the spool alone (agent stopped) worked. agent.toml sets no length for a
    name: one of 2,000 characters, far past any a person writes, is taken too."""
    up = await _RefusingInWords().start()
    name = "数据分析" * (chars // 4)
    try:
        agent = await make_agent(port=free_port(), upstreams=[
            {"name": name, "protocol": "segment-http", "url": up.url,
             "flush_interval_s": 0.05, "timeout_s": 2}])
        cfg = agent.config_path
        assert agent.spool is not None
        reply = await call(agent.port, "/v1/track", {"event": "e", "userId": "u"},
                           headers={"Authorization": basic("app")})
        assert reply.status == 200, reply.body
        await dead_letters(agent, 1)
        [group] = json.loads(await outpost("list", "--json", config=cfg))["groups"]
        reason = group["reason"]
        assert group["upstream"] == name and len(reason) == len("HTTP 400: ") + 300, group
        text = await outpost("retry", "--reason", reason, "--upstream", name, config=cfg)
        assert "re-queued 1 dead letters" in text and "running agent" in text, text
        await wait_for(lambda: agent.spool is not None and agent.spool.dead_count == 1
                       and agent.spool.counters.get("dead_retried") == 1)
        text = await outpost("purge", "--reason", reason, "--upstream", name, config=cfg)
        assert text.splitlines() == ["purged 1 dead letters (the running agent)"], text
        assert agent.spool.dead_count == 0
    finally:
        await up.stop()
