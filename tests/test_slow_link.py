"""An upstream behind a link too slow to carry a full batch within ``timeout_s``.

A device back online with a backlog on a poor cellular or satellite link: each full batch
takes longer to carry than ``timeout_s``, so every try timed out alike and the key never
drained until an operator lowered ``batch_max_bytes``. The agent runs in process against
tests/fakes/faulty_upstream.py, which answers each request only once a link of
``link_bytes_per_s`` would have carried its body (a websocket frame: once the link
has carried it and every frame before it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from agent.ops.status_table import render, size
from tests.conftest import write_config
from tests.fakes.cutting_relay import CuttingRelay
from tests.fakes.faulty_upstream import Fault, FaultyUpstream, Request
from tests.fakes.loopback_server import LoopbackServer
from tests.fakes.stalling_relay import StallingRelay
from tests.test_upstream_faults import drained, event, marks, send, upstream
from tests.test_ws_faults import status_of
from tests.waiting import wait_for

PAD = "x" * 200   # an event of about 330 bytes
RATE = 40_000     # the link's bytes a second: 20 KB within the 0.5 s timeout, not 60
# Events queued on the slow link: more than a full batch of each protocol (60 KB: 178
# Nucleus events, 103 as Segment), which times out, its half too, then batches within the
# cut. The link carries each event at RATE: 300 cost each test 1-1.5 s more than 200.
BACKLOG = 200


class Cuts(logging.Handler):
    """At each slow-link cut the agent logs (in process, as it decides it), the number of
    connections ``fake`` has seen so far: those after it carry only batches built since."""

    def __init__(self, fake: FaultyUpstream) -> None:
        super().__init__(logging.WARNING)
        self.fake = fake
        self.at: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "(a slow link?)" in record.getMessage():
            self.at.append(self.fake.connections)


def bytes_of(r: Request) -> int:
    return sum(len(orjson.dumps(ev)) for ev in r.events)


def sizes(fake: FaultyUpstream, since: int = 0) -> list[int]:
    """The bytes of each request's events, from request ``since`` on."""
    return [bytes_of(r) for r in fake.requests[since:]]


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http", "nucleus-ws"])
async def test_a_link_too_slow_for_a_full_batch_drains_in_smaller_ones_then_grows_back(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture,
        tmp_path: Path, protocol: str, request: pytest.FixtureRequest) -> None:
    """Each batch the link cannot carry within timeout_s halves the batches sent to that
    upstream (status shows the cut, the log says it once a halving), until they go in
    time; the backlog drains, nothing dead-lettered. Once the link is fast again, answers
    fast enough for twice the cut to go within timeout_s double it back, up to
    batch_max_bytes: the limit is gone and full batches go again."""
    caplog.set_level(logging.INFO)
    cuts = Cuts(faulty)
    logging.getLogger().addHandler(cuts)
    request.addfinalizer(lambda: logging.getLogger().removeHandler(cuts))
    faulty.link_bytes_per_s = RATE
    cfg = upstream(faulty, protocol, timeout_s=0.5, batch_max_bytes=60_000)
    agent = await make_agent(upstreams=[cfg])
    await send(agent, [event(i, pad=PAD) for i in range(BACKLOG)])
    await drained(agent, faulty, BACKLOG, timeout=30)
    up = await status_of(agent)
    limit = up["slow_limit_bytes"]
    assert limit is not None and limit <= 0.5 * RATE, up
    assert max(sizes(faulty)) > 0.5 * RATE   # the full batches that timed out
    # Judged by the agent's own timeouts, not by the upstream's clock (which starts
    # later than the agent's, after connect and send: under load they can disagree): what
    # went on a connection opened after its last cut. A timed-out batch's connection is
    # closed before the cut (a websocket's, with the frames behind it): those before it
    # may be larger; every later one is within the cut.
    assert cuts.at, caplog.text
    after = [r for r in faulty.requests if r.conn > cuts.at[-1]]
    assert after, cuts.at
    assert all(bytes_of(r) <= limit for r in after), (
        limit, cuts.at, [(r.conn, bytes_of(r)) for r in faulty.requests])
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert f"batches at most {size(limit)} (slow link)" in render(await r.json())
    # The last line that set the cut says the cut /status shows: a halving's, or, when a
    # halving went too far (a stall on a loaded machine timed out a batch the link carries
    # in time), a doubling's once batches went fast enough again.
    cut = [r.getMessage() for r in caplog.records
           if "batches to it are now at most" in r.getMessage()]
    assert f"at most {limit} bytes" in cut[-1], cut
    write_config(Path(agent.config_path), tmp_path / "spool.db", upstreams=[cfg])
    await agent.reload()   # the same upstream: the same link, the cut holds
    assert (await status_of(agent))["slow_limit_bytes"] == limit

    faulty.link_bytes_per_s = 0   # the signal is back
    await send(agent, [event(i, pad=PAD) for i in range(BACKLOG, 900)])
    await drained(agent, faulty, range(BACKLOG, 900), timeout=30)
    assert (await status_of(agent))["slow_limit_bytes"] is None
    assert any("full batches" in r.getMessage() for r in caplog.records), caplog.text
    # Full batches once the agent has lifted the cut (its own decision, just checked), not
    # by when it did: a machine stalled under load lifts it only as this backlog ends.
    before = len(faulty.requests)
    await send(agent, [event(i, pad=PAD) for i in range(900, 1100)])
    await drained(agent, faulty, range(900, 1100), timeout=30)
    assert max(sizes(faulty, before)) > 0.9 * 60_000, sizes(faulty, before)


async def test_an_upstream_that_hung_for_a_while_gets_full_batches_again_once_it_answers(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A server that hangs (three tries with no answer within timeout_s: a restart, a
    stuck backend) is not a slow link: once it answers again, in 0.15 s whatever the size
    (within timeout_s = 0.5, as it always did), full batches must go, as they did before
    the slow-link cut. They never do: each hang halved the cut (60 KB to 7 KB), and
    _faster (stream.py) grew it only for a batch answered within a quarter of timeout_s,
    which this upstream's latency never allows: 600 events take 29 requests, for good,
    where 4 went before. (Its times are half of a 1 s timeout_s's, in the same ratios:
    each hang and each answer costs the test's time.)"""
    faulty.script = [Fault("timeout", delay=0.75)] * 3 + [Fault("slow", delay=0.15)] * 1000
    cfg = upstream(faulty, "nucleus-http", timeout_s=0.5, batch_max_bytes=60_000)
    agent = await make_agent(upstreams=[cfg])
    await send(agent, [event(i, pad=PAD) for i in range(300)])
    await drained(agent, faulty, 300, timeout=40)
    before = len(faulty.requests)
    await send(agent, [event(i, pad=PAD) for i in range(300, 900)])
    await drained(agent, faulty, range(300, 900), timeout=60)
    assert max(sizes(faulty, before)) > 0.9 * 60_000, sizes(faulty, before)
    assert (await status_of(agent)).get("slow_limit_bytes") is None


async def test_a_cut_over_a_batch_max_bytes_lowered_by_a_reload_is_not_shown(
        make_agent: Any, faulty: FaultyUpstream, tmp_path: Path) -> None:
    """An operator answers the slow-link warning by lowering batch_max_bytes (the old
    advice) below half the cut, and reloads (same upstream: the cut is kept). The cut no
    longer applies (supervisor._sized), yet /status keeps slow_limit_bytes and `outpost
    status` 'batches at most N (slow link)' (N about 13 KB) for good, on a fast link: _faster returns
    before its batch_max_bytes check, since no batch can be half the cut."""
    faulty.link_bytes_per_s = RATE
    cfg = upstream(faulty, "segment-http", timeout_s=0.5, batch_max_bytes=60_000)
    agent = await make_agent(upstreams=[cfg])
    await send(agent, [event(i, pad=PAD) for i in range(BACKLOG)])
    await drained(agent, faulty, BACKLOG, timeout=30)
    assert (await status_of(agent))["slow_limit_bytes"] is not None
    faulty.link_bytes_per_s = 0   # the link is fine again
    cfg = {**cfg, "batch_max_bytes": 5_000}
    write_config(Path(agent.config_path), tmp_path / "spool.db", upstreams=[cfg])
    await agent.reload()
    await send(agent, [event(i, pad=PAD) for i in range(BACKLOG, 900)])
    await drained(agent, faulty, range(BACKLOG, 900), timeout=30)
    up = await status_of(agent)
    assert up["slow_limit_bytes"] is None, up
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}/status") as r:
        assert "slow link" not in render(await r.json())


# Another Outpost's answer to a request whose body its link did not carry whole within its
# listen.body_timeout_s, by protocol (agent/dialects/body.py's Stalled, a 408 to another
# Outpost's uplink and on the Nucleus HTTP route), in the Segment API's and in the Nucleus
# API's error shapes.
BODY_TIMED_OUT = {
    "segment-http": {"Success": False, "Errors": [{
        "Error": "Request Timeout", "Message": "Error reading request body",
        "Details": "request body not received in time: incomplete after 30 s "
                   "(listen.body_timeout_s)"}], "code": "request_timeout"},
    "nucleus-http": {"error": "request body not received in time: incomplete after 30 s "
                              "(listen.body_timeout_s)"},
}


class FarOutpost(LoopbackServer):
    """Another Outpost (Nucleus HTTP and Segment `/v1/batch`) at the far end of a link
    that carries ``carried`` bytes of a request's body within its listen.body_timeout_s:
    a longer request is answered 408 in its own words, and nothing of it stored; a shorter
    one is stored and acknowledged. By size, not by a clock: no timing in the test."""

    def __init__(self, carried: int) -> None:
        super().__init__()
        self.carried = carried
        self.stored: list[int] = []   # each event's mark, as stored
        self.timed_out = 0

    async def _take(self, request: web.Request, protocol: str, events: str) -> web.Response:
        raw = await request.read()
        if len(raw) > self.carried:
            self.timed_out += 1
            return web.json_response(BODY_TIMED_OUT[protocol], status=408)
        batch = orjson.loads(raw)[events]
        self.stored += marks(batch)
        if protocol == "segment-http":
            return web.json_response({"success": True})
        return web.json_response({"reportedIds": [ev["id"] for ev in batch]})

    async def _nucleus(self, request: web.Request) -> web.Response:
        return await self._take(request, "nucleus-http", "data")

    async def _segment(self, request: web.Request) -> web.Response:
        return await self._take(request, "segment-http", "batch")

    async def start(self) -> FarOutpost:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.add_routes([web.post("/app/{appId}/track", self._nucleus),
                        web.post("/v1/batch", self._segment)])
        await self._serve(app)
        return self


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_a_408_for_a_body_the_link_did_not_carry_in_time_halves_the_batches(
        make_agent: Any, fast_backoff: Any, protocol: str) -> None:
    """Another Outpost upstream (or a proxy) gives up on a request whose body its link has
    not carried whole within its own wait (listen.body_timeout_s, 30 s by default), and
    answers 408: the same slow link as a timeout_s run out here, only the upstream's wait
    is the shorter (a timeout_s raised for a slow link, as its error advises). The 408
    was retried as any 5xx, each time with the same full batch, which the link never
    carries in time: the key never drained, where half-size batches go through."""
    far = await FarOutpost(carried=25_000).start()
    try:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": protocol, "url": far.http_url,
            "flush_interval_s": 0.02, "timeout_s": 5, "batch_max_bytes": 60_000}])
        await send(agent, [event(i, pad=PAD) for i in range(BACKLOG)])
        await wait_for(lambda: agent.spool.depth == 0, timeout=20)
        assert sorted(far.stored) == list(range(BACKLOG))   # each once, none dead
        assert await agent.spool.dead_letters() == []
        assert far.timed_out
        up = await status_of(agent)
        assert up["slow_limit_bytes"] is not None, up
    finally:
        await far.stop()


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_an_outpost_whose_body_stalled_at_another_is_answered_408_and_halves(
        make_agent: Any, fast_backoff: Any, tmp_path: Path, protocol: str) -> None:
    """Two real Outposts, the far one's listen.body_timeout_s run out on the near one's
    first request: the far one answers an app's stalled body "retry later" (503), which
    would have had the near one send the same full batch again, but it answers 408 to
    another Outpost (its segment-http uplink says `User-Agent: outpost`) and on the Nucleus
    HTTP route, so the near one halves its batches, as for a link too slow for them."""
    far = await make_agent(spool=tmp_path / "far.db", listen={"body_timeout_s": 0.3})
    relay = await StallingRelay(far.port).start()
    try:
        near = await make_agent(upstreams=[{
            "name": "up", "protocol": protocol, "url": relay.http_url,
            "flush_interval_s": 0.02, "timeout_s": 5}])
        await send(near, [event(i) for i in range(3)])
        await wait_for(lambda: near.spool.depth == 0, timeout=20)
        assert relay.stalled is not None and relay.stalled.startswith(b"HTTP/1.1 408 "), \
            relay.stalled
        assert (await status_of(near))["slow_limit_bytes"] is not None
        assert far.spool.depth == 3
    finally:
        await relay.stop()


async def _drained_through(relay: CuttingRelay, make_agent: Any, faulty: FaultyUpstream,
                           protocol: str) -> Any:
    """An agent whose upstream is reached through ``relay``, its backlog of full batches
    (60 KB) posted and drained."""
    url = relay.ws_url if protocol == "nucleus-ws" else relay.http_url
    agent = await make_agent(upstreams=[{
        "name": "up", "protocol": protocol, "url": url, "flush_interval_s": 0.02,
        "timeout_s": 5, "batch_max_bytes": 60_000}])
    await send(agent, [event(i, pad=PAD) for i in range(BACKLOG)])
    await drained(agent, faulty, BACKLOG, timeout=20)
    return agent


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http", "nucleus-ws"])
async def test_a_link_whose_far_end_cuts_a_body_still_coming_drains_in_smaller_batches(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture,
        protocol: str, reset: bool) -> None:
    """A slow link to an upstream whose server (a Go server's ReadTimeout) or proxy closes,
    or resets, a connection on which a request's body (a websocket's frame) has not come
    whole within its own wait: shorter than timeout_s here (raised for a slow link, as its
    error advises). The link carries 25 KB of a request in that wait: a full batch of 60 KB
    is cut every time, halves go through. The cut was a lost connection like any other,
    never "too slow": the same full batch was sent again after each backoff, for good,
    and the key never drained."""
    relay = await CuttingRelay(faulty.port, carried=25_000, reset=reset).start()
    try:
        await _drained_through(relay, make_agent, faulty, protocol)
        assert relay.cuts
        # Halved for the cuts. (Where the cut ends is the agent's reading of how fast the
        # batches since were answered: on loopback, any time.)
        assert any("lost the connection under a batch" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        await relay.stop()


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http", "nucleus-ws"])
async def test_one_connection_cut_under_a_full_batch_does_not_cut_the_batches(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    """A connection reset once under a full batch (a proxy's restart, a NAT's), then the
    link carries everything: no slow link, and full batches go on."""
    relay = await CuttingRelay(faulty.port, carried=25_000, reset=True, times=1).start()
    try:
        agent = await _drained_through(relay, make_agent, faulty, protocol)
        assert len(relay.cuts) == 1
        assert (await status_of(agent))["slow_limit_bytes"] is None
        assert max(sizes(faulty)) > 0.5 * 60_000, sizes(faulty)
    finally:
        await relay.stop()
