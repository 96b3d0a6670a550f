"""Upstreams whose `keys` overlap (docs/operations.md "Many apps and keys"): a key's
events go to the first `[[upstream]]` in the file that takes it, and to no other; its
priority rules are that upstream's. A real agent on 127.0.0.1, fake upstreams on port 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_config import check_config
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for


def up(name: str, fake: FakeNucleus, keys: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "protocol": "nucleus-http", "url": fake.http_url, "keys": keys,
            "flush_interval_s": 0.02, **kw}


async def test_the_first_upstream_that_takes_a_key_gets_all_its_events(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    other = await FakeNucleus().start()
    try:
        agent = await make_agent(upstreams=[up("first", fake_nucleus, ["*"]),
                                            up("named", other, ["k"])])
        await send(agent, [event(i) for i in range(3)], key="k")
        await send(agent, [event(i) for i in range(3, 5)], key="j")
        await wait_for(lambda: agent.spool.depth == 0)
        assert sorted(fake_nucleus.ids()) == [0, 1, 2, 3, 4] and other.ids() == []
    finally:
        await other.stop()


async def test_a_named_key_before_a_catch_all_takes_that_upstreams_priority_rules(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    other = await FakeNucleus().start()
    try:
        # One request, one commit: the first read finds all four, "urgent" in the high lane.
        agent = await make_agent(upstreams=[
            up("named", fake_nucleus, ["k"], priority_events=["urgent"], batch_max_events=2),
            up("rest", other, ["*"], priority_events=["other"], batch_max_events=2)])
        await send(agent, [event(0), {**event(1), "name": "other"}, {**event(2), "name": "urgent"},
                           event(3)], key="k")
        await wait_for(lambda: agent.spool.depth == 0)
        assert fake_nucleus.batches[0] == [2, 0], fake_nucleus.batches   # high first
        assert sorted(fake_nucleus.ids()) == [0, 1, 2, 3] and other.ids() == []
    finally:
        await other.stop()


def test_check_config_says_which_upstream_can_get_no_events(tmp_path: Path) -> None:
    """An upstream after a `"*"` one, or one whose every key an earlier one lists, can
    never get an event: check-config (the service's reload check) and the agent's start
    say so, and the config stays valid (it was before)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text("".join(
        f'[[upstream]]\nname = "{name}"\nprotocol = "segment-http"\n'
        f'url = "http://127.0.0.1:9"\nkeys = {json.dumps(keys)}\n\n'
        for name, keys in [("named", ["a", "b"]), ("shadowed", ["b"]), ("rest", ["*", "c"]),
                           ("after-all", ["d"])]))
    cfg.chmod(0o600)   # its keys readable by every user would be a note of their own
    run = check_config(str(cfg))
    assert run.returncode == 0, run.stderr
    notes = [ln for ln in run.stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 2, run.stdout
    assert "'shadowed'" in notes[0] and "'named'" in notes[0]
    assert "'after-all'" in notes[1] and "'rest'" in notes[1] and '"*"' in notes[1]
    assert "named" not in " ".join(notes[1:]) and "'rest' gets" not in run.stdout
