"""Lanes with no upstream naming a rule (the usual config): the built-in high classes
(Nucleus `init`/`error`, Segment's "Application Opened"/"Application Error") still go
high, on both families' batch routes; a reload that names a rule applies it to the next
request. The accept loops take the lane without asking Lanes while no rule exists
(Lanes.ruled), so both sides of that switch are held here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agent.families.lanes import HIGH, NORMAL
from tests.conftest import free_port, write_config
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, segment_up


def track(i: int, name: str) -> dict[str, Any]:
    return {"type": "track", "event": name, "messageId": f"m{i}", "anonymousId": "a"}


def nucleus(i: int, kind: str, name: str = "e") -> dict[str, Any]:
    return {"type": kind, "name": name, "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z"}


async def lanes_of(agent: Any, key: str, field: str) -> list[tuple[Any, int]]:
    rows = await agent.spool.fetch(agent.spool.streams[key].id, 0, 100)
    return [(orjson.loads(r.body)[field], r.lane) for r in rows]


async def test_without_rules_the_built_in_classes_go_high_and_a_reloaded_rule_applies(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    fake_segment.outage = (503, None)   # nothing leaves: the spool holds what came
    up = segment_up(fake_segment, keys=["nobody"])   # no rule anywhere
    agent = await make_agent(upstreams=[up])
    batch = [track(0, "Viewed"), track(1, "Application Opened"),
             {"type": "page", "name": "Application Error", "messageId": "m2",
              "anonymousId": "a"},   # a page's name is no track's event: normal
             track(3, "Application Error"), track(4, "Order Completed")]
    reply = await call(agent.port, "/v1/batch", {"batch": batch},
                       headers={"Authorization": basic("s")})
    assert reply.status == 200, reply.body
    assert await lanes_of(agent, "s", "messageId") == [
        ("m1", HIGH), ("m3", HIGH), ("m0", NORMAL), ("m2", NORMAL), ("m4", NORMAL)]
    data = [nucleus(1, "event"), nucleus(2, "init"), nucleus(3, "error"),
            nucleus(4, "event", "Purchase")]
    reply = await call(agent.port, "/app/n/track", {"data": data})
    assert reply.json() == {"reportedIds": [1, 2, 3, 4]}, reply.body
    assert await lanes_of(agent, "n", "id") == [(2, HIGH), (3, HIGH), (1, NORMAL), (4, NORMAL)]

    write_config(Path(agent.config_path), agent.spool.path, upstreams=[
        {**up, "keys": ["s"], "priority_events": ["Order Completed"]},
        # Nothing listens there: n's events stay, stored as Nucleus events.
        {"name": "nucleus", "protocol": "nucleus-http", "url": f"http://127.0.0.1:{free_port()}",
         "keys": ["n"], "priority_events": ["Purchase"]}])
    await agent.reload()
    reply = await call(agent.port, "/v1/batch", {"batch": [track(5, "Order Completed"),
                                                          track(6, "Viewed")]},
                       headers={"Authorization": basic("s")})
    assert reply.status == 200, reply.body
    reply = await call(agent.port, "/app/n/track", {"data": [nucleus(5, "event", "Purchase")]})
    assert reply.json() == {"reportedIds": [5]}, reply.body
    assert await lanes_of(agent, "s", "messageId") == [   # m4 came before the rule
        ("m1", HIGH), ("m3", HIGH), ("m5", HIGH),
        ("m0", NORMAL), ("m2", NORMAL), ("m4", NORMAL), ("m6", NORMAL)]
    assert await lanes_of(agent, "n", "id") == [
        (2, HIGH), (3, HIGH), (5, HIGH), (1, NORMAL), (4, NORMAL)]
