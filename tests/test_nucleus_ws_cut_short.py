"""A nucleus-ws send cut short (cancelled) while its frame waits for room to go: the upstream
reads nothing (tests/fakes/deaf_upstream.py), the frame is only partly on its way.

The forwarder cancels a send only as its loop ends (a stop's grace ran out), and then
closes the uplink, whose next connection is a new one; this is the uplink's own contract
for any caller: nothing may follow the cut frame on its connection (its events are sent
again, and a later batch must not reach the upstream first), the connection is cut (what
of the frame still waits in the buffers never goes), and after close() a new connection
carries the resend and what follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks.base import Acked, Retry
from agent.uplinks.nucleus_ws import NucleusWsUplink
from tests.fakes.deaf_upstream import DeafUpstream
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_uplink_nucleus import row
from tests.test_upstream_faults import event
from tests.test_ws_faults import PAD, _small_send_buffer
from tests.waiting import wait_for


@pytest.fixture
async def deaf(fake_nucleus: FakeNucleus) -> AsyncIterator[DeafUpstream]:
    """Deaf until the test clears ``deaf``; then a relay to ``fake_nucleus``."""
    upstream = await DeafUpstream(fake_nucleus.port).start()
    yield upstream
    await upstream.stop()


def _rows(first: int, n: int, pad: str = "") -> list[Row]:
    return [row(i, event(i, pad=pad)) for i in range(first, first + n)]


async def test_a_send_cut_short_as_its_frame_waits_for_room_fails_and_cuts_its_connection(
        deaf: DeafUpstream, fake_nucleus: FakeNucleus) -> None:
    # A small send buffer (as test_ws_faults): on loopback a socket's takes megabytes.
    connector = aiohttp.TCPConnector(socket_factory=_small_send_buffer)
    async with asyncio.timeout(10), aiohttp.ClientSession(connector=connector) as session:
        cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=deaf.ws_url, timeout_s=3)
        up = NucleusWsUplink(cfg, "app", session, "m")
        big = _rows(1, 50, PAD)   # one frame of about 400 KB: more than the path holds
        first = up.prepare(big)
        cut = asyncio.create_task(up.send(first))
        # The frame is written and waits for room (the deaf upstream reads nothing).
        await wait_for(lambda: up._link is not None and up._link.writing > 0, 5)
        cut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cut
        assert up.acknowledged(first) == ()
        # Nothing goes after the cut frame on its connection: a later batch fails at once
        # (before the fix it went on the same connection, behind the cut frame, and timed
        # out waiting for its acks, taken for a link too slow for it).
        later = up.prepare(_rows(51, 1))
        result = await up.send(later)
        assert isinstance(result, Retry) and "cut short" in (result.error or ""), result
        link = up._link
        assert link is not None and link.sending == 0 and not link.waiting
        # Cut, not left to finish the frame (which would then reach the upstream whole).
        await wait_for(lambda: link.ws is not None and link.ws.closed, 5)
        await up.close()
        # The frame's tail never went: the upstream, readable now, gets each event once,
        # in order, over a new connection.
        deaf.deaf = False
        assert await up.send(up.prepare(big)) == Acked(tuple(range(1, 51)))
        assert await up.send(up.prepare(_rows(51, 1))) == Acked((51,))
        assert fake_nucleus.ids() == list(range(1, 52))
        assert deaf.deaf_connections == 1
        await up.close()


async def test_a_stop_that_cuts_two_sends_short_ends_both_cut_not_one_failed(
        deaf: DeafUpstream) -> None:
    # As a stop's grace runs out (stream.py _settle): every send in flight is cancelled in
    # the same turn of the loop. The first here waits for room for its frame; cut, it fails
    # the connection, which wakes the other's wait for acks. Before the fix, on Python 3.11
    # that wait (asyncio.wait_for) then returned instead of raising the cancel: the other
    # send ended as a failure, Retry('a send was cut short'), which the forwarder counted as
    # a retry, showed as the upstream's last error and backed off from after a reload.
    connector = aiohttp.TCPConnector(socket_factory=_small_send_buffer)
    async with asyncio.timeout(10), aiohttp.ClientSession(connector=connector) as session:
        cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=deaf.ws_url, timeout_s=30)
        up = NucleusWsUplink(cfg, "app", session, "m")
        small = asyncio.create_task(up.send(up.prepare(_rows(1, 1))))
        # Its frame is out whole (a few bytes): it waits for its acks.
        await wait_for(lambda: up._link is not None and 1 in up._link.waiting
                       and not up._link.writing and up._last_sent > 0, 5)
        big = asyncio.create_task(up.send(up.prepare(_rows(2, 50, PAD))))
        await wait_for(lambda: up._link is not None and up._link.writing > 0, 5)
        big.cancel()
        small.cancel()
        done = await asyncio.gather(big, small, return_exceptions=True)
        assert [type(d) for d in done] == [asyncio.CancelledError] * 2, done
        await up.close()


async def test_a_cancel_that_lands_as_the_handshake_completes_cuts_the_send(
        fake_nucleus: FakeNucleus) -> None:
    # A stop's cancel landing in the same turn as the upgrade's answer (deterministic:
    # given from aiohttp's own request-end hook, the handshake's last await). Python
    # 3.11's wait_for took the answer and dropped the cancel: the send went on, sent its
    # frame and waited up to timeout_s for the acks, and the stop waited for it.
    sending: asyncio.Task[object] | None = None

    async def cancel_now(*_: object) -> None:
        assert sending is not None
        sending.cancel()

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(cancel_now)
    fake_nucleus.answering.clear()   # no ack would end the send: only the cancel can
    try:
        async with asyncio.timeout(10), aiohttp.ClientSession(trace_configs=[trace]) as session:
            cfg = UpstreamConfig(name="n", protocol="nucleus-ws", url=fake_nucleus.url,
                                 timeout_s=3)
            up = NucleusWsUplink(cfg, "app", session, "m")
            batch = up.prepare(_rows(1, 1))
            sending = asyncio.create_task(up.send(batch))
            await asyncio.wait((sending,))
            assert sending.cancelled(), sending.result()
            assert up.acknowledged(batch) == ()
            fake_nucleus.answering.set()   # the upstream then answers the close at once
            await up.close()
    finally:
        fake_nucleus.answering.set()
