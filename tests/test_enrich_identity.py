"""Device facts never give an app's lifecycle event another identity than the app's other
events (docs/mapping.md §9): posted to a running agent, read at the fake upstream."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent import device
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


async def test_a_nucleus_init_with_an_anon_id_keeps_the_anonymous_id_of_its_events(
        make_agent: Any, fake_segment: FakeSegment) -> None:
    # An app that names its install by `anonId` alone (nucleus-analytics 4 drops a null
    # `deviceId`): mapped to Segment, each event's anonymousId is its anonId (§3). The
    # agent filled the init's and error's `machineId` with the device's id, which the
    # mapping takes first: at Segment, the app's launch and errors came from another
    # anonymous user than all of its other events.
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    date = "2026-01-01T00:00:00.000Z"
    data = [{"type": "init", "id": 1, "anonId": "an1", "sessionId": 7, "date": date},
            {"type": "event", "name": "click", "id": 2, "anonId": "an1", "sessionId": 7,
             "date": date},
            {"type": "error", "name": "TypeError", "id": 3, "anonId": "an1", "sessionId": 7,
             "date": date}]
    reply = await call(agent.port, "/app/k/track", {"data": data})
    assert reply.json() == {"reportedIds": [1, 2, 3]}
    await wait_for(lambda: len(fake_segment.events) == 3)
    got = {ev["context"]["nucleus"]["id"]: ev for ev in fake_segment.events}
    assert [got[i]["anonymousId"] for i in (1, 2, 3)] == ["an1", "an1", "an1"]
    assert got[1]["context"]["os"]["name"] == agent.facts.platform   # the other facts, filled
    assert "machineId" not in got[1]["context"]["nucleus"]


async def test_a_nucleus_init_with_no_id_of_its_own_gets_the_machine_id(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    ev = {"type": "init", "id": 1, "sessionId": 7, "date": "2026-01-01T00:00:00.000Z"}
    assert (await call(agent.port, "/app/k/track", {"data": [ev]})).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    assert fake_nucleus.events[0]["machineId"] == agent.facts.machineId


@pytest.mark.parametrize("first", [b"uninitialized\n", b"\xff\xfe\x00\n"],
                         ids=["first-boot-marker", "not-text"])
async def test_a_machine_id_file_that_holds_no_id_is_passed_over(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, first: bytes) -> None:
    # systemd's first-boot marker, `uninitialized`, stays in /etc/machine-id where no
    # systemd booted the image (a container): the same text on every such machine, hashed
    # as its id, made all of them one machine upstream. Bytes that are not text stopped
    # the agent's start with a traceback. Both pass on to the next file, as systemd does.
    etc, dbus = tmp_path / "etc-machine-id", tmp_path / "dbus-machine-id"
    etc.write_bytes(first)
    dbus.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(etc), str(dbus)))
    agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
    ev = {"type": "init", "id": 1, "sessionId": 7, "date": "2026-01-01T00:00:00.000Z"}
    assert (await call(agent.port, "/app/k/track", {"data": [ev]})).status == 200
    await wait_for(lambda: len(fake_nucleus.events) == 1)
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(dbus),))
    assert fake_nucleus.events[0]["machineId"] == device.machine_id()


async def test_a_machine_with_no_os_id_keeps_one_machine_id_across_a_restart(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A container: no machine-id file, and perhaps no network interface, where
    # uuid.getnode() gives a random number each call. The MAC address was hashed in its
    # place: a new machine upstream at each restart (or, with Docker's software MACs, one
    # for many hosts; and a MAC hashed with a public salt can be found again). The agent
    # now makes an id once and keeps it beside its spool.
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(tmp_path / "no-machine-id"),))
    nodes = itertools.count(0x0242AC110002)
    monkeypatch.setattr(uuid, "getnode", lambda: next(nodes))
    sent = []
    for restart in range(2):
        agent = await make_agent(upstreams=[nucleus_up(fake_nucleus)])
        ev = {"type": "init", "id": restart + 1, "sessionId": 7,
              "date": "2026-01-01T00:00:00.000Z"}
        assert (await call(agent.port, "/app/k/track", {"data": [ev]})).status == 200
        await wait_for(lambda: len(fake_nucleus.events) == restart + 1)
        sent.append(fake_nucleus.events[-1]["machineId"])
        await agent.stop()
    assert sent[0] == sent[1] and len(sent[0]) == 32
    macs = {hashlib.sha256(f"outpost-machine-id:mac:{n:012x}".encode()).hexdigest()[:32]
            for n in range(0x0242AC110002, next(nodes))}
    assert sent[0] not in macs
