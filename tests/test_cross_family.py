"""Supervisor across APIs (docs/mapping.md): lossless within a family, mapped across,
FIFO per key whatever mix of APIs an app uses, and resends delivered once."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, nucleus_up, segment_up, wait_for

RICH_SEGMENT = {
    "type": "track", "event": "Ünïcode ✓", "userId": 12345, "anonymousId": None,
    "messageId": "rich-1", "originalTimestamp": "2026-01-02T03:04:05.678+02:00",
    "properties": {"n": 1, "big": 2 ** 62, "float": 1.5e300, "null": None, "list": [1, "a", {}],
                   "nested": {"deep": {"deeper": [True, False]}}, "empty": {}},
    "context": {"library": {"name": "x", "version": "1"}, "os": {"name": "Linux"}},
    "integrations": {"All": False, "Mixpanel": True}, "customTopLevel": {"kept": "yes"},
}


async def test_segment_to_segment_is_lossless(make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    msg = {**copy.deepcopy(RICH_SEGMENT), "writeKey": "k", "sentAt": "2026-01-02T01:04:06Z"}
    assert (await call(agent.port, "/v1/batch", {"batch": [msg]})).status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    got = dict(fake_segment.events[0])
    assert got.pop("receivedAt") and got.pop("sentAt") != msg["sentAt"]
    assert got == RICH_SEGMENT   # nothing dropped or renamed; writeKey/sentAt are transport


async def test_nucleus_to_nucleus_is_lossless(make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    ev = {"type": "event", "name": "click", "id": 77, "sessionId": 123456789012, "userId": "u",
          "machineId": "m", "date": 1767225600123, "payload": {"a": [1, {"b": None}], "é": "ü"},
          "customField": {"kept": True}, "appId": "k"}
    reply = await call(agent.port, "/app/k/track", {"data": [ev]})
    assert reply.status == 200 and reply.json() == {"reportedIds": [77]}
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events[0] == ev


async def test_segment_apps_to_a_nucleus_upstream(make_agent: Any,
                                                  fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    ctx = {"os": {"name": "Linux", "version": "6.1"}, "locale": "en-GB",
           "app": {"version": "2.0"}, "device": {"id": "dev-1"}}
    batch = {"context": ctx, "batch": [
        {"type": "track", "event": "Application Opened", "anonymousId": "a1", "messageId": "o"},
        {"type": "track", "event": "Clicked", "userId": "u1", "properties": {"x": 1},
         "timestamp": "2026-01-01T00:00:00.000Z", "messageId": "t"},
        {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}, "messageId": "i"},
        {"type": "identify", "userId": "u1", "messageId": "i2"},
        {"type": "screen", "userId": "u1", "name": "Settings", "messageId": "s"},
        {"type": "page", "userId": "u1", "context": {"page": {"path": "/home"}}, "messageId": "p"},
        {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"n": 2}, "messageId": "g"},
        {"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "a"},
        # A number is a device id, 0 too: the machineId, not the anonymousId.
        {"type": "track", "event": "Zero", "anonymousId": "a2", "messageId": "z",
         "context": {"device": {"id": 0}}},
    ]}
    assert (await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic("k")})
            ).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 9)
    opened, clicked, props, userid, screen, page, group, alias, zero = fake_nucleus.events
    assert (zero["machineId"], zero["anonId"]) == (0, "a2"), zero
    assert fake_nucleus.paths[0] == "/app/k/track"
    assert opened["type"] == "init" and opened["platform"] == "Linux"
    assert (opened["osVersion"], opened["locale"], opened["version"]) == ("6.1", "en-GB", "2.0")
    assert opened["machineId"] == "dev-1" and opened["anonId"] == "a1"
    assert (clicked["type"], clicked["name"], clicked["date"]) == (
        "event", "Clicked", "2026-01-01T00:00:00.000Z")
    assert clicked["payload"]["$segment"]["context"] == ctx   # docs/mapping.md: the rest
    del clicked["payload"]["$segment"]
    assert clicked["payload"] == {"x": 1, "messageId": "t"} and clicked["userId"] == "u1"
    assert props["type"] == "props" and props["payload"]["plan"] == "pro"
    assert userid["type"] == "userid"
    assert (screen["type"], screen["name"]) == ("nucleus:view", "Settings")
    assert (page["type"], page["name"]) == ("nucleus:view", "/home")
    assert (group["name"], group["payload"]["groupId"], group["payload"]["n"]) == ("group", "g1", 2)
    assert alias["type"] == "userid" and alias["payload"]["previousId"] == "a1"
    assert all(isinstance(e["id"], int) for e in fake_nucleus.events)


async def test_nucleus_apps_to_a_segment_upstream(make_agent: Any,
                                                  fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    common = {"machineId": "m1", "sessionId": 4242, "userId": "u1"}
    data = [
        {**common, "type": "init", "id": 1, "date": "2026-01-01T00:00:00Z", "platform": "Darwin",
         "osVersion": "23.1", "totalRam": 16, "version": "1.2.3", "locale": "fr-FR",
         "arch": "arm64", "client": "nodejs", "moduleVersion": "3.0.9"},
        {**common, "type": "event", "name": "click", "id": 2, "date": 1767225600000,
         "payload": {"x": 1}},
        {**common, "type": "error", "name": "TypeError", "id": 3, "payload": {"stack": "s"}},
        {**common, "type": "userid", "id": 4},
        {**common, "type": "props", "id": 5, "payload": {"plan": "pro"}},
        {**common, "type": "nucleus:view", "name": "Settings", "id": 6},
    ]
    reply = await call(agent.port, "/app/k/track", {"data": data})
    assert reply.json() == {"reportedIds": [1, 2, 3, 4, 5, 6]}
    await wait_for(lambda: len(fake_segment.events) == 6)
    # Queued together: the high lane (init, error) goes first, each lane in its order.
    init, error, click, userid, props, view = fake_segment.events
    assert fake_segment.requests[0].write_key == "k"
    assert (init["type"], init["event"]) == ("track", "Application Opened")
    assert init["context"]["os"] == {"name": "Darwin", "version": "23.1"}
    assert init["context"]["app"] == {"version": "1.2.3"} and init["context"]["locale"] == "fr-FR"
    assert init["context"]["device"] == {"id": "m1", "arch": "arm64", "totalRam": 16}
    assert init["context"]["nucleus"] == {"type": "init", "id": 1, "sessionId": 4242,
                                          "client": "nodejs", "moduleVersion": "3.0.9",
                                          "language": "fr-FR", "locale": "fr-FR",
                                          "date": "2026-01-01T00:00:00Z"}
    assert init["timestamp"] == "2026-01-01T00:00:00.000Z" and init["anonymousId"] == "m1"
    assert (click["event"], click["properties"]) == ("click", {"x": 1})
    assert click["timestamp"] == "2026-01-01T00:00:00.000Z"   # epoch ms -> ISO
    assert (error["event"], error["properties"]) == ("Application Error",
                                                     {"name": "TypeError", "stack": "s"})
    assert error["context"]["os"]["name"]          # error events get the device facts filled
    assert userid["type"] == "identify" and userid["userId"] == "u1" and "traits" not in userid
    assert props["type"] == "identify" and props["traits"] == {"plan": "pro"}
    assert (view["type"], view["name"]) == ("screen", "Settings")
    ids = [e["messageId"] for e in fake_segment.events]
    assert len(set(ids)) == 6 and all(i.startswith("nucleus-") for i in ids)


def _mixed_requests(key: str) -> list[tuple[str, Any, dict[str, str]]]:
    """One event per API, each carrying its position in `n`."""
    auth = {"Authorization": basic(key)}
    reqs: list[tuple[str, Any, dict[str, str]]] = []
    for r in range(3):
        n = r * 6
        reqs += [
            ("/v1/track", {"userId": "u", "event": "seg", "properties": {"n": n}}, auth),
            ("/v1/capture", {"batch": [{"type": "track", "userId": "u", "event": "cap",
                                        "properties": {"n": n + 1}}]}, {"X-Write-Key": key}),
            ("/api/public/apps/track", {"messageId": f"tr{r}", "userId": "u", "event": "tr",
                                        "properties": {"n": n + 2}}, {"PublicWriteKey": key}),
            ("/track", {"hitId": f"h{r}", "event": {"name": "ss", "n": n + 3,
                                                    "user": {"userId": "u"}}}, auth),
            (f"/app/{key}/track", {"data": [{"name": "nuc", "id": r, "sessionId": 1,
                                             "machineId": "m", "payload": {"n": n + 4}}]}, {}),
            ("/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "bat",
                                      "properties": {"n": n + 5}}]}, auth),
        ]
    return reqs


@pytest.mark.parametrize("protocol", ["segment-http", "nucleus-ws"])
async def test_order_per_key_across_mixed_apis(make_agent: Any, fake_segment: FakeSegment,
                                               fake_nucleus: FakeNucleus, protocol: str) -> None:
    up = segment_up(fake_segment, batch_max_events=4) if protocol == "segment-http" else \
        {**nucleus_up(fake_nucleus, batch_max_events=4), "protocol": "nucleus-ws",
         "url": fake_nucleus.url}
    agent = await make_agent(upstreams=[up])
    for path, body, headers in _mixed_requests("mix"):
        assert (await call(agent.port, path, body, headers=headers)).status < 300, path
    await wait_for(lambda: agent.spool.depth == 0)
    if protocol == "segment-http":
        got = [ev["properties"]["n"] for ev in fake_segment.events]
    else:
        got = [ev["payload"]["n"] for ev in fake_nucleus.events]
    assert got == list(range(18))


async def test_resend_after_delivery_is_delivered_once(make_agent: Any,
                                                       fake_segment: FakeSegment) -> None:
    """An SDK that timed out resends the same messageIds, even after they went upstream."""
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    batch = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": f"r{i}"}
                       for i in range(5)]}
    auth = {"Authorization": basic("k")}
    assert (await call(agent.port, "/v1/batch", batch, headers=auth)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 5 and agent.spool.depth == 0)
    for _ in range(2):   # the resends: answered 200 again, stored no more
        assert (await call(agent.port, "/v1/batch", batch, headers=auth)).status == 200
    # A later message of the same key: the key's queue is FIFO, so once it is upstream,
    # anything the resends had queued before it would be there too.
    later = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": "later"}]}
    assert (await call(agent.port, "/v1/batch", later, headers=auth)).status == 200
    agent.forwarding.flush()
    await wait_for(lambda: "later" in fake_segment.message_ids())
    assert fake_segment.message_ids() == [f"r{i}" for i in range(5)] + ["later"]
    assert agent.spool.counters["duplicates"] == 10
