"""An event the upstream answers for, batch after batch, but never acknowledges: it is
dead-lettered after a few answers, with the reason, and its key flows again. Left alone it
was resent forever, and every answer counted as a failure, so the key's backoff climbed to
its cap: one batch a minute. Another Outpost answers so for an event its own upstream
cannot carry (docs/mapping.md); a JavaScript upstream would for an id it rounds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.families.nucleus import MAX_ID_CHARS
from agent.forwarder.stream import OMITTED_LIMIT, PASSED_OVER
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.fakes.segment_upstream import FakeSegment
from tests.test_upstream_faults import delivered, drained, event, send, upstream
from tests.waiting import wait_for


def nucleus(i: Any, **kw: Any) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m", **kw}


async def chain(make_agent: Any, fake_segment: FakeSegment, tmp_path: Path,
                protocol: str = "nucleus-http", limits: dict[str, int] | None = None) -> Any:
    """Agent A sending to agent B over Nucleus (a 4 MiB message: no limit here), B taking
    Nucleus events to Segment, whose limit is 32 KB an event: B leaves a larger event out
    of its answers. (Over the websocket, each answer without the id costs A a wait of
    timeout_s for it.) Returns A."""
    b = await make_agent(spool=tmp_path / "b.db", upstreams=[{
        "name": "seg", "protocol": "segment-http", "url": fake_segment.url,
        "flush_interval_s": 0.05, "timeout_s": 2}])
    scheme = "ws" if protocol == "nucleus-ws" else "http"
    return await make_agent(spool=tmp_path / "a.db", upstreams=[{
        "name": "b", "protocol": protocol, "url": f"{scheme}://127.0.0.1:{b.port}",
        "flush_interval_s": 0.05, "timeout_s": 0.5, **(limits or {})}])


async def post(a: Any, events: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{a.port}/app/k/track", json={"data": events}) as r:
        assert r.status == 200, await r.text()


async def dead_after(a: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Post ``events`` to A, wait until its queue is empty; its dead letters."""
    await post(a, events)
    await wait_for(lambda: a.spool.depth == 0, timeout=30)
    return list(await a.spool.dead_letters())


def ids(dead: list[dict[str, Any]]) -> list[Any]:
    return sorted(orjson.loads(d["body"])["id"] for d in dead)


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_an_event_the_upstream_never_acknowledges_is_dead_lettered(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any, tmp_path: Path,
        protocol: str) -> None:
    a = await chain(make_agent, fake_segment, tmp_path, protocol)
    big = nucleus("big", payload={"x": "y" * 40_000})
    dead = await dead_after(a, [big, *(nucleus(i) for i in range(5))])
    assert ids(dead) == ["big"]
    assert dead[0]["upstream"] == "b" and "never acknowledged" in dead[0]["reason"], dead[0]
    state = a.forwarding.states["b"]
    assert state.dead_lettered == 1 and state.acked == 5
    # One answer passed it over, then it was sent alone until let go.
    assert state.retries == OMITTED_LIMIT - PASSED_OVER
    # And the key flows again: new events are delivered with no failure (over the
    # websocket, not on the connection that timed out: review).
    await post(a, [nucleus(9)])
    await wait_for(lambda: a.spool.depth == 0 and a.forwarding.states["b"].acked == 6)
    assert state.retries == OMITTED_LIMIT - PASSED_OVER, state.last_error


async def test_an_event_given_up_is_named_by_the_start_of_a_long_id(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An app's event id may be a string of up to 1,024 characters (MAX_ID_CHARS): given
    up, an event with an id of 60,000 characters (taken then) had a reason that long, in its
    dead letter, in the warning logged (a 60 KB log line) and in every /status
    (`dead_reasons`). It is named by the id's start."""
    a = await chain(make_agent, fake_segment, tmp_path)
    long_id = "big" + "i" * (MAX_ID_CHARS - 3)
    # Over B's 32 KB: B leaves it out.
    dead = await dead_after(a, [nucleus(long_id, props={"p": "x" * 40_000})])
    assert ids(dead) == [long_id]
    reason = dead[0]["reason"]
    assert "never acknowledged it (id \"bigiii" in reason and len(reason) < 200, len(reason)
    long_lines = [r.getMessage()[:300] for r in caplog.records if len(r.getMessage()) > 1000]
    assert not long_lines, long_lines


@pytest.mark.parametrize("limits,pad", [({"batch_max_events": 1}, 0),
                                        ({"batch_max_bytes": 50_000}, 20_000)],
                         ids=["one event a batch", "too large to share a batch"])
async def test_an_event_always_sent_alone_is_dead_lettered_too(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any, tmp_path: Path,
        limits: dict[str, int], pad: int) -> None:
    """An event sent alone cannot be passed over: an answer that leaves it out is the
    upstream's word on it alone (review: it was never given up, and held its key, the
    five events behind it and a backoff at its cap)."""
    a = await chain(make_agent, fake_segment, tmp_path, limits=limits)
    big = nucleus("big", payload={"x": "y" * 40_000})
    rest = [nucleus(i, payload={"x": "z" * pad}) for i in range(5)]
    assert ids(await dead_after(a, [big, *rest])) == ["big"]
    state = a.forwarding.states["b"]
    assert state.acked == 5 and state.retries == OMITTED_LIMIT - 1   # alone each time


async def test_an_event_passed_over_rides_in_its_batches_and_is_given_up_in_three(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any, tmp_path: Path) -> None:
    """Good events behind a refused one: each answer passes it over, so three answers
    give it up. Sent alone once passed over (review), it took six rounds, each a
    backoff step (or over the websocket timeout_s) for the whole key."""
    a = await chain(make_agent, fake_segment, tmp_path, limits={"batch_max_events": 2})
    big = nucleus("big", payload={"x": "y" * 40_000})
    assert ids(await dead_after(a, [big, *(nucleus(i) for i in range(6))])) == ["big"]
    state = a.forwarding.states["b"]
    assert state.acked == 6 and state.retries == OMITTED_LIMIT // PASSED_OVER - 1


async def test_a_batch_left_out_whole_is_sent_one_event_at_a_time_and_given_up(
        make_agent: Any, fake_segment: FakeSegment, fast_backoff: Any, tmp_path: Path) -> None:
    """Two events B cannot carry, alone in A's queue: B answers for the batch and
    acknowledges neither. Neither is passed over nor alone, so (review) they were resent
    together forever; now the head of such a batch is sent alone, and judged alone."""
    a = await chain(make_agent, fake_segment, tmp_path)
    bigs = [nucleus(f"big{i}", payload={"x": "y" * 40_000}) for i in range(2)]
    assert ids(await dead_after(a, bigs)) == ["big0", "big1"]
    assert a.forwarding.states["b"].acked == 0


async def test_a_lone_event_left_out_a_few_times_is_delivered(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """One event alone in its batch (a quiet key flushes one at a time), and an upstream
    that answers three times without it, then takes it: a brief episode must not cost
    it (review: three such answers dead-lettered it). Alone, an answer weighs half of
    one that passed it over."""
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    faulty.script = [Fault("partial") for _ in range(OMITTED_LIMIT // PASSED_OVER)]
    await send(agent, [event(0)])
    await drained(agent, faulty, 1)   # and no dead letter
    assert not faulty.script


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws"])
async def test_an_upstream_that_acknowledges_only_a_prefix_loses_no_event(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    """An upstream that stores the first part of each batch and answers for that part (as
    one running out of room or time does) has not passed the rest over: it never reached
    it. Only an event left out while a later one of its batch was acknowledged may be
    given up. Before the fix, four such answers in a row dead-lettered the tail of a
    12-event batch (found by the forwarder's state machine)."""
    # Over the websocket each try waits out timeout_s for the ids never answered (0.6 s,
    # seven times, cost 4.2 s); the answered prefix comes within milliseconds.
    agent = await make_agent(upstreams=[upstream(faulty, protocol, timeout_s=0.3)])
    faulty.script = [Fault("partial") for _ in range(OMITTED_LIMIT + 1)]
    await send(agent, [event(i) for i in range(12)])
    await drained(agent, faulty, 12)   # and no dead letter
    assert not faulty.script
    assert delivered(faulty) == Counter(range(12))


# Every shape over HTTP; one over the websocket, whose tries each wait out timeout_s
# (the same check, nucleus_frame.ids_only, decides both).
@pytest.mark.parametrize(("protocol", "body"), [
    ("nucleus-http", b'{"reportedIds": [{"id": 0}]}'), ("nucleus-http", b'{"reportedIds": [[0]]}'),
    ("nucleus-http", b'{"reportedIds": [null]}'), ("nucleus-ws", b'{"reportedIds": [{"id": 0}]}')])
async def test_reported_ids_that_are_no_ids_are_no_answer(
        make_agent: Any, faulty: FaultyUpstream, protocol: str, body: bytes) -> None:
    """A `reportedIds` list of what no event id can be (objects: another dialect's acks,
    arrays, null) is malformed, as the malformed-ack tests call it: it weighs nothing
    against the batch's events, which are sent again. It was an answer that left every
    event out: after six of them the event went to dead letters."""
    faulty.script = [Fault("malformed", body=body)] * (OMITTED_LIMIT + 1)
    agent = await make_agent(upstreams=[upstream(faulty, protocol, timeout_s=0.15)])
    await send(agent, [event(0)])
    await drained(agent, faulty, 1)
    assert [r.fault for r in faulty.requests] == ["malformed"] * (OMITTED_LIMIT + 1) + ["ok"]
