"""A new app's key never shows in the agent's log, not even on its very first request.

A key is registered for redaction when its first events' commit is announced, later in the
turn of the loop that stored them, or never for a request that stores none: a line logged
while that first request was handled (a Nucleus event left unacknowledged, a Segment
batch's 207) showed the key whole wherever the app had put it in a value the line quotes
(an event's id, a message's `type`). Apps do that: a key pasted into the wrong field.
Nor did a pixel's refusal, logged at debug level, for a key never stored."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.segment_helpers import basic, call
from tests.waiting import wait_for

KEY = "wk-first-request-4fQ9"


async def started(tmp_path: Path, agent_process: Callable[..., AgentProcess],
                  level: str = "info") -> AgentProcess:
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
    config.write_text(config.read_text() + f'[log]\nlevel = "{level}"\n')
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start)
    return agent


def logged(agent: AgentProcess, what: str) -> str:
    assert agent.terminate() == 0
    log = agent.log.read_text()
    assert what in log, log
    return log


@pytest.mark.parametrize("ev_id", [KEY, "x" * 30 + KEY], ids=["whole", "across-the-cut"])
async def test_a_nucleus_event_id_holding_the_key_is_not_shown_on_the_first_request(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], ev_id: str) -> None:
    """Nor the key's start, where the id's cut at 40 characters falls in the key."""
    agent = await started(tmp_path, agent_process)
    good = {"type": "event", "name": "good", "id": 1, "machineId": "m"}
    bad = '{"type":"event","name":5,"id":"' + ev_id + '","machineId":"m"}'
    body = '{"data":[' + json.dumps(good) + "," + bad + "]}"
    reply = await call(agent.port, f"/app/{KEY}/track", body)
    assert reply.status == 200 and json.loads(reply.body) == {"reportedIds": [1]}, reply.body
    await wait_for(lambda: "left unacknowledged" in agent.log.read_text(), timeout=10)
    log = logged(agent, "left unacknowledged")
    assert KEY[:6] not in log, [line for line in log.splitlines() if KEY[:6] in line]


async def test_a_segment_batch_message_quoting_the_key_is_not_shown_on_the_first_request(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    agent = await started(tmp_path, agent_process)
    batch = {"batch": [{"type": "track", "event": "ok", "userId": "u1", "messageId": "m1"},
                       {"type": KEY, "userId": "u1", "messageId": "m2"}]}
    reply = await call(agent.port, "/v1/batch", batch, headers={"Authorization": basic(KEY)})
    assert reply.status == 207, reply.body
    await wait_for(lambda: "the rest stored" in agent.log.read_text(), timeout=10)
    log = logged(agent, "the rest stored")
    assert KEY not in log, [line for line in log.splitlines() if KEY in line]


async def test_a_refused_batch_message_quoting_its_own_key_does_not_show_it(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """The messages name their own keys (no key in the request), and the refused one's
    key is never stored, so never registered: the line quoting it hid the key of a
    message with none ("anonymous") instead."""
    agent = await started(tmp_path, agent_process)
    batch = {"batch": [{"type": "track", "event": "ok", "userId": "u1", "writeKey": "stored-key"},
                       {"type": KEY, "userId": "u1", "messageId": "m2", "writeKey": KEY}]}
    reply = await call(agent.port, "/v1/batch", batch)
    assert reply.status == 207, reply.body
    await wait_for(lambda: "the rest stored" in agent.log.read_text(), timeout=10)
    log = logged(agent, "the rest stored")
    assert KEY[:6] not in log, [line for line in log.splitlines() if KEY[:6] in line]


async def test_a_pixel_refused_for_a_value_holding_its_key_does_not_show_it_at_debug(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """The pixel's refusal is logged at debug level; its key (here its message's
    `writeKey`) is never stored, so never registered."""
    agent = await started(tmp_path, agent_process, "debug")
    data = base64.b64encode(json.dumps({"writeKey": KEY, "event": "e", "userId": "u",
                                        "timestamp": KEY}).encode()).decode()
    reply = await call(agent.port, "/v1/pixel/track?data=" + data, method="GET")
    assert reply.status == 200, reply.body
    await wait_for(lambda: "not stored" in agent.log.read_text(), timeout=10)
    log = logged(agent, "not stored")
    assert KEY not in log, [line for line in log.splitlines() if KEY in line]
