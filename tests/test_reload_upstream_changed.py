"""A reload (SIGHUP) that changes an upstream's ``url``, ``protocol``, ``key`` or ``proxy``
(docs/operations.md "Reload (SIGHUP)"): its totals and last ack carry over, but its last
error was the old target's. An operator who mended a wrong URL or key must not read that
error in /status, `outpost status` or the status page as the new one's (it named the old
host, or asked to check the key just changed, for as long as no new error replaced it).
A reload that leaves an upstream as it was leaves its last error as it was.

In-process agents; ``Agent.reload`` is what SIGHUP runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent.forwarder.backoff import Backoff
from agent.forwarder.supervisor import Seams
from tests.conftest import free_port, run_chromium, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.ops_scene import RefusingUpstream
from tests.test_resume import NO_NETWATCH, down_nucleus
from tests.test_status_page import figures
from tests.test_tail_slots import metrics, status
from tests.test_upstream_faults import event, send
from tests.waiting import run_outpost, wait_for

__all__ = ["down_nucleus"]   # the fixture, used below

# A key that fails waits 100-200 s (under the 429's Retry-After of 300 s, which it waits
# out instead): the figures hold still between two looks, until a reload sends again.
SLOW = Seams(backoff=Backoff(base_s=200.0, cap_s=200.0), watch_network=NO_NETWATCH)


def by_name(shown: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in shown["upstreams"]}


async def page_errors(chromium: str, profile: Path, port: int) -> dict[str, str]:
    dom = await run_chromium(chromium, profile, "--virtual-time-budget=3000", "--dump-dom",
                             f"http://127.0.0.1:{port}/")
    return {name: row["last_error"] for name, row in figures(dom).upstreams.items()}


async def test_a_reload_that_mends_a_failing_upstream_shows_its_last_error_as_the_old_targets(
        make_agent: Any, fake_nucleus: FakeNucleus, down_nucleus: FakeNucleus,
        chromium: str, tmp_path: Path) -> None:
    wrong_key = await RefusingUpstream(401).start()
    busy = await RefusingUpstream(429, retry_after=300).start()
    try:
        common = {"protocol": "nucleus-http", "flush_interval_s": 0.02}
        ups = [{"name": "gone", "url": down_nucleus.http_url, "keys": ["k-gone"], **common},
               {"name": "busy", "url": busy.url, "keys": ["k-busy"], **common},
               {"name": "fine", "url": fake_nucleus.http_url, "keys": ["k-fine"], **common},
               {"name": "auth", "url": wrong_key.url, "key": "wrong", **common}]
        agent = await make_agent(port=free_port(), upstreams=ups, seams=SLOW)
        for key in ("k-gone", "k-busy", "k-fine", "k-auth"):
            await send(agent, [event(1)], key=key)
        states = agent.forwarding.states
        await wait_for(lambda: all(states[n].last_error for n in ("gone", "busy", "auth"))
                       and states["gone"].unreachable_since is not None
                       and states["fine"].acked == 1)
        before = by_name(await status(agent.port))
        assert before["gone"]["state"] == "unreachable", before
        assert before["busy"]["last_error"].endswith("; next try in 300s, as its Retry-After "
                                                     "asks"), before
        assert before["auth"]["last_error"].startswith("HTTP 401"), before

        # The operator mends each: the right host, the right key; "fine" moves too.
        mended = [{**ups[0], "url": fake_nucleus.http_url},
                  {**ups[1], "url": fake_nucleus.http_url},
                  {**ups[2], "protocol": "nucleus-ws", "url": fake_nucleus.url},
                  {**ups[3], "url": fake_nucleus.http_url, "key": "right"}]
        write_config(Path(agent.config_path), agent.spool.path, port=agent.port,
                     upstreams=mended)
        await agent.reload()
        await wait_for(lambda: agent.spool.depth == 0)   # the new targets take everything

        after = by_name(await status(agent.port))
        old = {n: before[n]["last_error"] for n in ("gone", "busy", "auth")}
        assert after["gone"]["last_error"] == f"before a reload changed its url: {old['gone']}"
        # Its key is no longer waiting out the old target's Retry-After: not said.
        assert after["busy"]["last_error"] == "before a reload changed its url: " + \
            old["busy"].partition("; next try in ")[0], after["busy"]
        assert after["auth"]["last_error"] == \
            f"before a reload changed its url and key: {old['auth']}", after["auth"]
        assert after["fine"]["last_error"] is None, after["fine"]
        for name, u in after.items():   # the error's time, and the totals, carry over
            assert u["last_error_at"] == before[name]["last_error_at"], name
            assert (u["state"], u["unreachable_for_s"]) == ("idle", None), u
            assert (u["sent"], u["acked"]) == (before[name]["sent"] + (name != "fine"), 1), u
            assert u["retries"] == before[name]["retries"], u

        code, out = await run_outpost("status", "--config", agent.config_path)
        assert code == 0, out
        rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
        for name in ("gone", "busy", "auth"):
            assert "before a reload changed its" in rows[name], out
        assert "next try in" not in rows["busy"], out
        assert rows["fine"].rstrip().endswith("-"), out
        page = await page_errors(chromium, tmp_path / "page", agent.port)
        assert page == {n: u["last_error"] or "" for n, u in after.items()}, page
        text = await metrics(agent.port)
        assert 'outpost_upstream_unreachable_seconds{upstream="gone"} 0' in text, text
        assert 'outpost_upstream_state{upstream="gone",state="idle"} 1' in text, text

        # Another reload: what it changes is added, never a second "before".
        write_config(Path(agent.config_path), agent.spool.path, port=agent.port,
                     upstreams=[{**mended[0], "proxy": ""}, *mended[1:]])
        await agent.reload()
        again = by_name(await status(agent.port))
        assert again["gone"]["last_error"] == \
            f"before a reload changed its url and proxy: {old['gone']}", again["gone"]
        assert {n: again[n]["last_error"] for n in ("busy", "auth", "fine")} == \
            {n: after[n]["last_error"] for n in ("busy", "auth", "fine")}, again
    finally:
        await wrong_key.stop()
        await busy.stop()


async def test_a_new_error_after_the_reload_is_shown_as_it_is(
        make_agent: Any, down_nucleus: FakeNucleus) -> None:
    wrong_key = await RefusingUpstream(401).start()
    try:
        up = {"name": "up", "protocol": "nucleus-http", "url": down_nucleus.http_url,
              "flush_interval_s": 0.02}
        agent = await make_agent(upstreams=[up], seams=SLOW)
        await send(agent, [event(1)])
        await wait_for(lambda: agent.forwarding.states["up"].unreachable_since is not None)
        write_config(Path(agent.config_path), agent.spool.path,
                     upstreams=[{**up, "url": wrong_key.url}])
        await agent.reload()   # a host that answers, with a 401 of its own
        await wait_for(lambda: wrong_key.requests == 1
                       and agent.forwarding.states["up"].retries == 2)
        shown = by_name(await status(agent.port))["up"]
        assert re.match(r"HTTP 401: .*check the upstream's key", shown["last_error"]), shown
    finally:
        await wrong_key.stop()


async def test_a_reload_that_leaves_an_upstream_as_it_was_leaves_its_last_error(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    busy = await RefusingUpstream(429, retry_after=300).start()
    wrong_key = await RefusingUpstream(401).start()
    try:
        common = {"protocol": "nucleus-http", "flush_interval_s": 0.02}
        ups = [{"name": "busy", "url": busy.url, "keys": ["k-busy"], **common},
               {"name": "auth", "url": wrong_key.url, "key": "wrong", **common}]
        agent = await make_agent(upstreams=ups, seams=SLOW)
        for key in ("k-busy", "k-auth"):
            await send(agent, [event(1)], key=key)
        states = agent.forwarding.states
        await wait_for(lambda: all(states[n].last_error for n in ("busy", "auth")))
        before = by_name(await status(agent.port))

        await agent.reload()   # the same config
        assert {n: u["last_error"] for n, u in by_name(await status(agent.port)).items()} == \
            {n: u["last_error"] for n, u in before.items()}
        # Another upstream mended, and this one's batches and routes changed: the same
        # target, so the same error (busy's key still waits out its Retry-After).
        write_config(Path(agent.config_path), agent.spool.path,
                     upstreams=[{**ups[0], "batch_max_events": 10, "keys": ["k-busy", "k-2"]},
                                {**ups[1], "url": fake_nucleus.http_url, "key": "right"}])
        await agent.reload()
        await wait_for(lambda: agent.spool.streams["k-auth"].depth == 0)
        after = by_name(await status(agent.port))
        assert (after["busy"]["last_error"], after["busy"]["last_error_at"]) == \
            (before["busy"]["last_error"], before["busy"]["last_error_at"]), after["busy"]
        assert after["busy"]["state"] == "backoff" and busy.requests == 1, after["busy"]
        assert after["auth"]["last_error"].startswith("before a reload changed its url and key")
    finally:
        await busy.stop()
        await wrong_key.stop()
