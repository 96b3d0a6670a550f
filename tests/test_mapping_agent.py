"""Lossless mapping and device facts as a user sees them (docs/mapping.md): events posted
to a running agent and read back from fake upstreams of the other family or the same one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.families import segment as spec
from tests.conftest import free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import basic, call, nucleus_up, segment_up, wait_for

AUTH = {"Authorization": basic("k")}


def ws_up(fake: FakeNucleus) -> dict[str, Any]:
    return {**nucleus_up(fake), "protocol": "nucleus-ws", "url": fake.url}


async def test_segment_application_opened_reaches_nucleus_with_device_facts(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[ws_up(fake_nucleus)])
    opened = {"userId": "u", "event": "Application Opened", "messageId": "o1"}
    error = {"userId": "u", "event": "Application Error", "messageId": "e1",
             "properties": {"name": "TypeError"}, "context": {"os": {"name": "Windows"}}}
    for body in (opened, error):
        assert (await call(agent.port, "/v1/track", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 2)
    init, err = fake_nucleus.events
    facts = agent.facts
    assert (init["type"], err["type"]) == ("init", "error")
    assert (init["platform"], init["osVersion"], init["totalRam"]) == (
        facts.platform, facts.osVersion, facts.totalRam)
    assert (init["language"], init["locale"], init["machineId"]) == (
        facts.language, facts.language, facts.machineId)
    assert err["platform"] == "Windows"          # what the app sent is never overwritten
    assert err["osVersion"] == facts.osVersion


async def test_segment_application_opened_to_segment_gets_device_facts(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    opened = {"userId": "u", "event": "Application Opened", "messageId": "o1",
              "context": {"locale": "de-AT", "device": {"model": "x"}}}
    clicked = {"userId": "u", "event": "Clicked", "messageId": "c1"}
    for body in (opened, clicked):
        assert (await call(agent.port, "/v1/track", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 2)
    got, plain = fake_segment.events
    facts = agent.facts
    ctx = got["context"]
    assert ctx["os"] == {"name": facts.platform, "version": facts.osVersion}
    assert ctx["locale"] == "de-AT"              # the app's own, kept
    assert ctx["device"] == {"model": "x", "id": facts.machineId, "totalRam": facts.totalRam,
                             "arch": facts.arch}
    assert "context" not in plain                # only init and error events get facts


async def test_nucleus_fields_without_a_segment_place_travel_in_context_nucleus(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    # nucleus-analytics 4.x: deviceId and anonId, no machineId; an old module's `language`
    # beside `locale`; a name on an init; a field no table knows.
    ev = {"type": "init", "id": 9, "name": "boot", "deviceId": "d1", "anonId": "a1",
          "sessionId": 5, "locale": "fr-FR", "language": "fr", "platform": "Linux",
          "osVersion": "6", "totalRam": 8, "arch": "x64", "version": "1.0",
          "date": 1767225600123, "custom": {"x": [1]}, "payload": {"p": 1}}
    assert (await call(agent.port, "/app/k/track", {"data": [ev]})).status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    got = fake_segment.events[0]
    kept = got["context"]["nucleus"]
    assert (kept["name"], kept["deviceId"], kept["anonId"]) == ("boot", "d1", "a1")
    assert (kept["language"], kept["custom"]) == ("fr", {"x": [1]})
    assert got["context"]["device"]["id"] == "d1" and got["context"]["locale"] == "fr-FR"
    assert got["properties"] == {"p": 1}


async def test_nucleus_ids_segment_refuses_travel_in_context_nucleus(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # Ids no Segment collector takes as `userId` / `anonymousId` (agent/families/segment.py
    # check, as another Outpost checks them): the event is delivered, and each id arrives
    # verbatim in context.nucleus.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    date = "2026-01-01T00:00:00.000Z"
    data = [{"type": "event", "name": "empty-user", "id": 1, "userId": "", "date": date},
            {"type": "event", "name": "obj-user", "id": 2, "userId": {"a": 1}, "date": date},
            {"type": "event", "name": "bool-machine", "id": 3, "machineId": True, "date": date},
            {"type": "event", "name": "list-user", "id": 4, "userId": [1], "machineId": "m",
             "date": date},
            {"type": "event", "name": "odd-ids", "id": 5, "machineId": {}, "deviceId": "",
             "anonId": [2], "userId": 7, "date": date},
            # A number is an id, 0 too: it is the device's anonymousId (and device id),
            # not "nucleus-anonymous" with the id left in context.nucleus alone.
            {"type": "event", "name": "zero-machine", "id": 6, "machineId": 0, "anonId": "a",
             "date": date}]
    reply = await call(agent.port, "/app/k/track", {"data": data})
    assert reply.status == 200 and reply.json() == {"reportedIds": [1, 2, 3, 4, 5, 6]}
    await wait_for(lambda: len(fake_segment.events) == 6)
    got = {ev["event"]: ev for ev in fake_segment.events}
    for ev in got.values():
        spec.check(ev, spec.TYPES)       # raises Invalid, naming the id, for a refused one
    empty, obj, flag, listed, odd, zero = (got[ev["name"]] for ev in data)
    assert "userId" not in empty and empty["anonymousId"] == "nucleus-anonymous"
    assert empty["context"]["nucleus"]["userId"] == ""
    assert "userId" not in obj and obj["context"]["nucleus"]["userId"] == {"a": 1}
    assert flag["anonymousId"] == "nucleus-anonymous"
    assert flag["context"]["nucleus"]["machineId"] is True
    assert (listed["anonymousId"], listed["context"]["nucleus"]["userId"]) == ("m", [1])
    assert (odd["userId"], "anonymousId" in odd) == (7, False)
    assert {k: odd["context"]["nucleus"][k] for k in ("machineId", "deviceId", "anonId")} == {
        "machineId": {}, "deviceId": "", "anonId": [2]}
    assert (zero["anonymousId"], zero["context"].get("device")) == (0, {"id": 0}), zero


async def test_a_nucleus_date_before_the_year_1000_reaches_segment_as_iso_8601(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    ev = {"type": "event", "name": "old", "id": 1, "machineId": "m",
          "date": "0999-12-31T23:59:59.5+00:00"}
    assert (await call(agent.port, "/app/k/track", {"data": [ev]})).status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    got = fake_segment.events[0]
    assert got["timestamp"] == "0999-12-31T23:59:59.500Z"
    spec.check(got, spec.TYPES)


async def test_a_nucleus_date_of_two_minus_signs_is_unreadable_not_a_500(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # docs/mapping.md §4: an unreadable `date` maps to the receive time, the date itself
    # in context.nucleus.date. "--5" passed read_date's test for a number (its minus
    # signs stripped) and broke Decimal: the message got a 500, and the module, which
    # resends its whole queue in each message, every one after it.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    odd = {"type": "event", "name": "odd", "id": 1, "machineId": "m", "date": "--5"}
    fine = {"type": "event", "name": "fine", "id": 2, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z"}
    reply = await call(agent.port, "/app/k/track", {"data": [odd, fine]})
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_segment.events) == 2)
    got = {ev["event"]: ev for ev in fake_segment.events}
    assert got["odd"]["timestamp"] == got["odd"]["receivedAt"]
    assert got["odd"]["context"]["nucleus"]["date"] == "--5"
    assert got["fine"]["timestamp"] == "2026-01-01T00:00:00.000Z"
    for ev in got.values():
        spec.check(ev, spec.TYPES)


async def test_a_nucleus_error_keeps_its_type_in_properties_name(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # docs/mapping.md §8: the error's type in properties.name, as the mapping from Segment
    # reads it; a payload's own `name` travels with the whole payload in context.nucleus.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    ev = {"type": "error", "name": "TypeError", "id": 1, "machineId": "m",
          "date": "2026-01-01T00:00:00.000Z", "payload": {"stack": "s", "name": "own"}}
    assert (await call(agent.port, "/app/k/track", {"data": [ev]})).status == 200
    await wait_for(lambda: len(fake_segment.events) == 1)
    got = fake_segment.events[0]
    assert (got["event"], got["properties"]) == ("Application Error",
                                                 {"name": "TypeError", "stack": "s"})
    assert got["context"]["nucleus"]["payload"] == {"stack": "s", "name": "own"}


async def test_segment_context_and_unknown_fields_reach_nucleus_in_the_payload(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[ws_up(fake_nucleus)])
    ev = {"userId": "u", "event": "Clicked", "messageId": "c1", "properties": {"x": 1},
          "context": {"page": {"url": "https://a.example/"}, "ip": "1.2.3.4"},
          "integrations": {"All": False}, "section": "top"}
    assert (await call(agent.port, "/v1/track", ev, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    got = fake_nucleus.events[0]
    assert got["payload"]["x"] == 1
    kept = got["payload"]["$segment"]
    assert kept["context"] == ev["context"] and kept["integrations"] == {"All": False}
    assert (kept["section"], kept["messageId"]) == ("top", "c1")


async def test_a_resent_mapped_event_keeps_its_messageid(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any) -> None:
    fake_segment.fail(1, 500)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    data = [{"type": "init", "id": 1, "deviceId": "d", "anonId": "a", "date": 1767225600123},
            {"type": "event", "name": "click", "id": 2, "deviceId": "d", "payload": {"x": 1}}]
    assert (await call(agent.port, "/app/k/track", {"data": data})).status == 200
    await wait_for(lambda: len(fake_segment.accepted()) == 1)
    refused, delivered = fake_segment.requests[0], fake_segment.accepted()[0]
    assert refused.status == 500
    for first, again in zip(refused.events, delivered.events, strict=True):
        assert first.pop("sentAt") and again.pop("sentAt")   # set afresh at each send
        assert first == again and first["messageId"].startswith("nucleus-")


async def test_a_resent_mapped_event_keeps_its_nucleus_id(
        make_agent: Any, fake_nucleus: FakeNucleus, fast_backoff: Any) -> None:
    refused: set[Any] = set()

    def ack_the_second_time(ev_id: Any) -> bool:
        if ev_id in refused:
            return True
        refused.add(ev_id)
        return False

    fake_nucleus.ack = ack_the_second_time
    agent = await make_agent(upstreams=[ws_up(fake_nucleus)])
    ev = {"userId": "u", "event": "Application Opened", "messageId": "o1",
          "context": {"page": {"path": "/"}}}
    assert (await call(agent.port, "/v1/track", ev, headers=AUTH)).status == 200
    await wait_for(lambda: agent.spool.depth == 0)
    first, again = fake_nucleus.events[:2]
    assert first == again and isinstance(first["id"], int)
    assert first["payload"]["$segment"]["messageId"] == "o1"


async def test_facts_fill_only_the_lifecycle_event_of_a_batch_sharing_a_context(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    batch = {"context": {"device": {"model": "x"}}, "batch": [
        {"type": "track", "event": "Application Opened", "userId": "u", "messageId": "o"},
        {"type": "track", "event": "Clicked", "userId": "u", "messageId": "c"},
        {"type": "track", "event": "Application Error", "userId": "u", "messageId": "e",
         "context": {"os": "a string the app chose", "device": ["kept"]}}]}
    assert (await call(agent.port, "/v1/batch", batch, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 3)
    opened, error, clicked = fake_segment.events   # the high lane first
    assert opened["context"]["device"]["id"] == agent.facts.machineId
    assert clicked["context"] == {"device": {"model": "x"}}   # the shared object, untouched
    assert error["context"]["os"] == "a string the app chose"  # never overwritten
    assert error["context"]["device"] == ["kept"]
    assert error["context"]["locale"] == agent.facts.language


async def test_a_view_whose_path_is_not_a_string_is_named_by_its_type_upstream(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    # A Nucleus event's `name` is a string (the Tracking API; Outpost's own Nucleus route
    # leaves any other out of reportedIds). A page's `properties.path` or a screen's
    # `context.page.path` is whatever the app put there: taken as the view's name, a
    # number or an array made an event no Nucleus upstream takes. Here the upstream is
    # another Outpost: A acknowledged the event, then dead-lettered it, never delivered.
    b = await make_agent(spool=tmp_path / "b.db", upstreams=[nucleus_up(fake_nucleus)])
    a = await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": "nucleus-http", "url": f"http://127.0.0.1:{b.port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])
    page = {"userId": "u", "messageId": "p1", "properties": {"path": 404}}
    screen = {"userId": "u", "messageId": "s1", "context": {"page": {"path": ["a", "b"]}},
              "properties": {"path": "/from-properties"}}
    assert (await call(a.port, "/v1/page", page, headers=AUTH)).status == 200
    assert (await call(a.port, "/v1/screen", screen, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 2)
    got = {ev["payload"]["$segment"]["messageId"]: ev for ev in fake_nucleus.events}
    assert (got["p1"]["type"], got["p1"]["name"]) == ("nucleus:view", "page")
    assert got["p1"]["payload"]["path"] == 404                 # the app's value, kept
    assert got["s1"]["name"] == "/from-properties"             # the next place that is one
    assert got["s1"]["payload"]["$segment"]["context"]["page"]["path"] == ["a", "b"]
    assert not await a.spool.dead_letters()


async def test_a_segment_event_that_crossed_a_nucleus_hop_reaches_segment_as_sent(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    # Two Outposts: A routes a Segment app to B's Nucleus route, B routes to a Segment
    # collector. The Nucleus hop gives each event an `id` (A's spool seq: §2), which is
    # no part of the event: B must give the Segment event back, its messageId (what the
    # collector dedupes on) and properties as the app sent them, as it gives a Nucleus
    # event back from Segment (§7). It mapped it as a Nucleus app's event instead: a
    # `nucleus-...` messageId, and the app's event folded into properties.$segment.
    b = await make_agent(spool=tmp_path / "b.db", upstreams=[segment_up(fake_segment)])
    a = await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": "nucleus-http", "url": f"http://127.0.0.1:{b.port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])
    sent = [{"userId": "u", "event": "Clicked", "messageId": "c1", "properties": {"x": 1},
             "timestamp": "2026-01-01T00:00:00.000Z", "context": {"ip": "1.2.3.4"}},
            {"anonymousId": "a", "event": "Application Opened", "messageId": "o1",
             "properties": {"from": "dock"}, "originalTimestamp": "2026-01-01T00:00:01Z"}]
    for body in sent:
        assert (await call(a.port, "/v1/track", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 2)
    got = {ev["messageId"]: ev for ev in fake_segment.events}
    assert sorted(got) == ["c1", "o1"]
    clicked, opened = got["c1"], got["o1"]
    for ev, body in ((clicked, sent[0]), (opened, sent[1])):
        assert {k: ev[k] for k in body if k != "context"} == \
            {k: v for k, v in body.items() if k != "context"}
        assert "nucleus" not in ev.get("context", {})
    assert clicked["context"] == {"ip": "1.2.3.4"}
    assert "timestamp" not in opened        # only originalTimestamp, as the app sent it
    # Filled once, by A (no device id beside the anonymousId: docs/mapping.md §9).
    assert opened["context"]["device"] == {"totalRam": a.facts.totalRam, "arch": a.facts.arch}


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Sets the local time zone (TZ) of this process, restored afterwards."""
    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()
    yield set_zone
    monkeypatch.undo()
    time.tzset()


async def test_a_nucleus_event_that_crossed_a_segment_hop_in_another_zone_reaches_nucleus_as_sent(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path, fast_backoff: Any,
        zone: Callable[[str], None]) -> None:
    # Two Outposts: A, on the device (Berlin time), routes a Nucleus app to B's Segment
    # route; B, on a server whose zone is UTC, routes it to a Nucleus upstream. B must give
    # the Nucleus event back as the app sent it (§7), its `id` (what the upstream dedupes
    # and acknowledges by) included. nucleus-python's `date` has no zone: A read it in its
    # own (the device's local time, §4), and B, reading it in UTC to check the mapping,
    # got another `timestamp`, so it mapped the event anew as a Segment app's: a spool
    # seq for the app's id, a `track` turned `event`, the Segment form in its payload.
    port = free_port()
    zone("Europe/Berlin")
    a = await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": "segment-http", "url": f"http://127.0.0.1:{port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])
    sent = {"type": "event", "name": "click", "id": 9999, "date": "2026-06-01T12:00:00",
            "machineId": "md5", "sessionId": "s", "payload": {"x": 1}}
    assert (await call(a.port, "/app/k/track", {"data": [sent]})).json() == {
        "reportedIds": [9999]}   # stored, mapped to Segment by A in its zone
    zone("UTC")
    await make_agent(spool=tmp_path / "b.db", port=port, upstreams=[nucleus_up(fake_nucleus)])
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events == [sent]


async def test_a_segment_event_with_a_user_id_alone_reaches_nucleus_from_this_machine(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """The Nucleus Tracking API requires `machineId` on every event. Mapped to Nucleus, a
    Segment event's is its `context.device.id`, else its `anonymousId`: an event with a
    `userId` alone reached the upstream with none. The agent runs on the app's device,
    so it is the device's id, as an "Application Opened" of the same app gets; an
    `anonymousId` or `context.device.id` the app sent still wins."""
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    sent = [{"userId": "u", "event": "Clicked", "messageId": "user-only"},
            {"userId": "u", "anonymousId": "", "event": "Clicked", "messageId": "anon-empty"},
            {"anonymousId": "a1", "event": "Clicked", "messageId": "anon"},
            {"userId": "u", "event": "Clicked", "messageId": "device",
             "context": {"device": {"id": "d1"}}},
            {"userId": "u", "event": "Application Opened", "messageId": "opened"}]
    reply = await call(agent.port, "/v1/batch", {"batch": [{"type": "track", **ev} for ev in sent]},
                       headers=AUTH)
    assert reply.status == 200, reply.body
    await wait_for(lambda: len(fake_nucleus.events) == len(sent))
    got = {ev["payload"]["$segment"]["messageId"]: ev for ev in fake_nucleus.events}
    machine = agent.facts.machineId
    assert {k: got[k].get("machineId") for k in got} == {
        "user-only": machine, "anon-empty": machine, "anon": "a1", "device": "d1",
        "opened": machine}
    assert "anonymousId" not in got["user-only"]["payload"]["$segment"]   # never added


async def test_a_user_id_only_event_stored_unmapped_reaches_nucleus_after_a_reload(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """Stored as the app sent it (no upstream yet), then routed to a Nucleus upstream by a
    reload: mapped at send time, it carries the machine's id too."""
    agent = await make_agent()
    body = {"userId": "u", "event": "Clicked", "messageId": "stored"}
    assert (await call(agent.port, "/v1/track", body, headers=AUTH)).status == 200
    write_config(Path(agent.config_path), agent.spool.path,
                 upstreams=[nucleus_up(fake_nucleus)])
    await agent.reload()
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events[0]["machineId"] == agent.facts.machineId


async def test_empty_device_facts_are_filled_as_left_out_ones(
        make_agent: Any, fake_nucleus: FakeNucleus, fake_segment: FakeSegment,
        tmp_path: Path) -> None:
    """The Nucleus Tracking API requires `platform`, `osVersion` and `language` on an init
    or error; an Electron app asking `app.getLocale()` before `ready` sends `""`. An empty
    string names no locale or platform: it is filled from the device, as JSON null is,
    in both families' places; a fact the app gave a value keeps it."""
    nuc = await make_agent(spool=tmp_path / "n.db", upstreams=[nucleus_up(fake_nucleus)])
    init = {"type": "init", "id": 1, "machineId": "", "language": "", "locale": "",
            "platform": "", "osVersion": "", "arch": "x64", "sessionId": 1}
    reply = await call(nuc.port, "/app/k/track", {"data": [init]})
    assert reply.json() == {"reportedIds": [1]}, reply.body
    seg = await make_agent(spool=tmp_path / "s.db", upstreams=[segment_up(fake_segment)])
    opened = {"userId": "u", "event": "Application Opened", "messageId": "o1",
              "context": {"locale": "", "os": {"name": "", "version": "14"},
                          "device": {"id": ""}}}
    assert (await call(seg.port, "/v1/track", opened, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 1 and len(fake_segment.events) == 1)
    facts = nuc.facts
    [got] = fake_nucleus.events
    assert {k: got[k] for k in ("language", "locale", "platform", "osVersion", "arch",
                                "machineId")} == {
        "language": facts.language, "locale": facts.language, "platform": facts.platform,
        "osVersion": facts.osVersion, "arch": "x64", "machineId": facts.machineId}
    ctx = fake_segment.events[0]["context"]
    assert (ctx["locale"], ctx["os"], ctx["device"]["id"]) == (
        facts.language, {"name": facts.platform, "version": "14"}, seg.facts.machineId)


async def test_a_lifecycle_event_with_no_place_for_facts_crosses_a_nucleus_hop_as_sent(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """A Segment app's "Application Opened" whose `context.os` is not an object (and an
    "Application Error" whose `context.device` is not one): A fills no fact there (§9), so
    the Nucleus `init` (`error`) it maps it to has none of them either. B's Nucleus route
    filled them, as for a Nucleus app's init, and the event was no longer the mapping of
    the app's: B mapped it anew as a Nucleus app's event, and the collector got it under a
    `nucleus-...` messageId, the app's event folded into `properties.$segment` (§7)."""
    b = await make_agent(spool=tmp_path / "b.db", upstreams=[segment_up(fake_segment)])
    a = await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": "nucleus-http", "url": f"http://127.0.0.1:{b.port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])
    sent = [{"userId": "u", "event": "Application Opened", "messageId": "o1",
             "properties": {"from": "dock"}, "context": {"os": "the app's own"}},
            {"anonymousId": "a", "event": "Application Error", "messageId": "e1",
             "properties": {"name": "TypeError"}, "context": {"device": ["kept"]}}]
    for body in sent:
        assert (await call(a.port, "/v1/track", body, headers=AUTH)).status == 200
    await wait_for(lambda: len(fake_segment.events) == 2)
    got = {ev["messageId"]: ev for ev in fake_segment.events}
    assert sorted(got) == ["e1", "o1"]
    opened, error = got["o1"], got["e1"]
    for ev, body in ((opened, sent[0]), (error, sent[1])):
        assert {k: ev[k] for k in body if k != "context"} == \
            {k: v for k, v in body.items() if k != "context"}
        assert "nucleus" not in ev["context"]
    facts = a.facts   # filled once, by A, where the app left a place
    assert opened["context"] == {"os": "the app's own", "locale": facts.language, "device": {
        "id": facts.machineId, "totalRam": facts.totalRam, "arch": facts.arch}}
    assert error["context"] == {"device": ["kept"], "locale": facts.language,
                                "os": {"name": facts.platform, "version": facts.osVersion}}


async def test_a_nucleus_event_named_as_a_lifecycle_event_crosses_a_segment_hop_as_sent(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """A Nucleus app's own `event` named "Application Opened" (or "Application Error")
    maps to a Segment track of that name, with no device facts: it is no init. B's Segment
    route filled them, as for a Segment app's "Application Opened", and the event was no
    longer the mapping of the app's: B mapped it anew as a Segment app's, and the Nucleus
    upstream got an `init` (an `error`) under B's spool seq instead of the app's event and
    id (§7)."""
    b = await make_agent(spool=tmp_path / "b.db", upstreams=[nucleus_up(fake_nucleus)])
    a = await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": "segment-http", "url": f"http://127.0.0.1:{b.port}",
        "flush_interval_s": 0.05, "timeout_s": 2}])
    date = "2026-01-01T00:00:00.000Z"
    sent = [{"type": "event", "name": "Application Opened", "id": 5, "machineId": "m",
             "sessionId": 1, "date": date, "payload": {"from": "dock"}},
            {"type": "event", "name": "Application Error", "id": 6, "machineId": "m",
             "sessionId": 1, "date": date, "payload": {"name": "TypeError"}}]
    reply = await call(a.port, "/app/k/track", {"data": sent})
    assert reply.json() == {"reportedIds": [5, 6]}
    await wait_for(lambda: len(fake_nucleus.events) == 2)
    assert fake_nucleus.events == sent
