"""Device facts never give an app's lifecycle event another identity than the app's other
events (docs/mapping.md §9): posted to a running agent, read at the fake upstream."""

from __future__ import annotations

from typing import Any

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, nucleus_up, segment_up, wait_for

AUTH = {"Authorization": basic("k")}


async def test_an_application_opened_keeps_the_machine_of_the_apps_other_events(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    # A desktop app on analytics-node or analytics.js: an anonymousId, no context.device.
    # Mapped to Nucleus, each event's machineId is its anonymousId (§2); the agent filled
    # the init's context.device.id with its own machine id, so the init reached the
    # upstream from another machine than every other event of the app (whose machine
    # then never sent an init, which Nucleus' dashboard needs first).
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    sent = [{"anonymousId": "anon-1", "event": "Application Opened", "messageId": "o1"},
            {"anonymousId": "anon-1", "event": "Clicked", "messageId": "c1"},
            {"anonymousId": "anon-1", "event": "Application Error", "messageId": "e1",
             "properties": {"name": "TypeError"}}]
    for body in sent:
        assert (await call(agent.port, "/v1/track", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 3)
    got = {ev["payload"]["$segment"]["messageId"]: ev for ev in fake_nucleus.events}
    init, clicked, error = got["o1"], got["c1"], got["e1"]
    assert (init["type"], error["type"]) == ("init", "error")
    assert clicked["machineId"] == "anon-1"
    assert init["machineId"] == "anon-1" and error["machineId"] == "anon-1"
    assert init["platform"] == agent.facts.platform        # the other facts, filled
    assert init["payload"]["$segment"]["context"]["device"] == {
        "totalRam": agent.facts.totalRam, "arch": agent.facts.arch}


async def test_an_application_opened_with_only_a_user_id_gets_the_machine_id(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # With no id of the install, the device's is still filled in (§9).
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    body = {"userId": "u", "event": "Application Opened", "messageId": "o1"}
    assert (await call(agent.port, "/v1/track", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    assert fake_segment.events[0]["context"]["device"]["id"] == agent.facts.machineId
