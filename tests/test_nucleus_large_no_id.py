"""Events without an `id` in a Nucleus websocket message over 4 MiB.

The Tracking API makes `id` optional, and a client that sends none can only take the
agent's reply as "reported": it cannot be told which events to send again. Of a message
over 4 MiB the agent keeps the events of the first 2 MiB and leaves the rest
unacknowledged, for the module to resend; an event without an id past those was dropped
while the message was answered, so the client dropped it too. Such a message is refused
instead (1009, with the reason), as a small message holding an event without an id that
cannot be stored is refused whole: nothing is answered that was not stored.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import WSCloseCode, WSMsgType

from agent.dialects.nucleus import MAX_MESSAGE

KEY = "k"


def events(n: int, *, with_ids: bool) -> list[dict[str, Any]]:
    return [{"type": "event", "name": f"e{i}", "date": 1767323045000 + i, "sessionId": 7,
             "machineId": "m", "payload": {"label": "x" * 300},
             **({"id": i + 1} if with_ids else {})} for i in range(n)]


async def send(agent: Any, message: bytes) -> aiohttp.WSMessage:
    url = f"http://127.0.0.1:{agent.port}/app/{KEY}/track"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_bytes(message)
        return await ws.receive(timeout=60)


async def test_a_large_message_of_events_without_ids_is_answered_only_if_all_are_stored(
        make_agent: Any) -> None:
    agent = await make_agent()
    queue = events(14_000, with_ids=False)
    message = orjson.dumps({"data": queue})
    assert len(message) > MAX_MESSAGE + 1_000_000
    reply = await send(agent, message)
    if reply.type == WSMsgType.TEXT:   # answered: every event stored
        assert agent.spool.depth == len(queue), (
            f"answered {reply.data}, but {agent.spool.depth} of {len(queue)} events stored")
    else:
        assert reply.type == WSMsgType.CLOSE and reply.data == WSCloseCode.MESSAGE_TOO_BIG, reply
        assert "id" in reply.extra, reply.extra
        assert agent.spool.depth == 0


async def test_events_without_ids_among_the_first_taken_are_stored_and_the_rest_resent(
        make_agent: Any) -> None:
    """Events without an id that are among those a large message keeps, and heartbeats
    anywhere in it, do not refuse it: the rest of its events have ids (one whose id is
    not a string or a number is left unacknowledged, as in a small message)."""
    agent = await make_agent()
    queue = events(5, with_ids=False) + events(14_000, with_ids=True)[5:]
    queue.insert(10_000, {"type": "heartbeat", "machineId": "m"})
    queue.insert(11_000, {"type": "event", "name": "odd id", "id": True})   # left unacked
    reply = await send(agent, orjson.dumps({"data": queue}))
    assert reply.type == WSMsgType.TEXT, reply
    acked = orjson.loads(reply.data)["reportedIds"]
    assert acked and acked == list(range(6, 6 + len(acked)))
    assert agent.spool.depth == 5 + len(acked)
