"""Upstreams whose `keys` overlap (docs/operations.md "Many apps and keys"): a key's
events go to the first `[[upstream]]` in the file that takes it, and to no other; its
priority rules are that upstream's. A real agent on 127.0.0.1, fake upstreams on port 0."""

from __future__ import annotations

from typing import Any

from tests.fakes.nucleus_upstream import FakeNucleus
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
