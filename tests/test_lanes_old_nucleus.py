"""An old Nucleus module's events (one `event` key: no `type`, no `name`) take the lane
their type and name give them, the name they are stored and forwarded under
(agent/families/nucleus.py ``event_type``, ``old_name``), as a current module's do.

`{"event": "Purchase"}` is forwarded as "Purchase", but the lane rule read `name` alone:
an operator's ``priority_events = ["Purchase"]`` left it in the normal lane.
"""

from __future__ import annotations

from typing import Any

from agent.forwarder.supervisor import Seams
from tests.conftest import FAST_BACKOFF
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import call, segment_up, wait_for


def old(event: str, ev_id: int, **more: Any) -> dict[str, Any]:
    """An event as electron-nucleus 2 queued it."""
    return {"event": event, "date": "2026-01-01T00:00:00.000Z", "id": ev_id,
            "machineId": "m", "sessionId": 77, **more}


async def test_old_module_events_take_the_lane_of_their_type_and_name(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    fake_segment.outage = (503, None)   # a backlog builds up
    agent = await make_agent(seams=Seams(backoff=FAST_BACKOFF), upstreams=[segment_up(
        fake_segment, keys=["k"], priority_types=["userid"], priority_events=["Purchase"])])
    data = [old("Viewed", 1),
            old("init", 2, platform="linux", version="1.0.0"),   # built in
            old("Purchase", 3),                                  # priority_events
            old("nucleus:userid", 4, userId="u7"),               # priority_types
            old("error:TypeError", 5, payload={"message": "m"}),  # built in
            old("Viewed", 6)]
    reply = await call(agent.port, "/app/k/track", {"data": data})
    assert reply.json() == {"reportedIds": [1, 2, 3, 4, 5, 6]}, reply.body
    assert agent.spool.streams["k"].high == 4
    await wait_for(lambda: len(fake_segment.requests) >= 1)   # tried, refused: queued
    fake_segment.outage = None
    await wait_for(lambda: len(fake_segment.events) == 6)
    sent = [(ev["context"]["nucleus"]["id"], ev.get("event")) for ev in fake_segment.events]
    assert sent == [(2, "Application Opened"), (3, "Purchase"), (4, None),
                    (5, "Application Error"), (1, "Viewed"), (6, "Viewed")]
