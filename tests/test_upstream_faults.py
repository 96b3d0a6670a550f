"""A misbehaving upstream loses nothing (backoff, Retry-After).

The agent runs in process; tests/fakes/faulty_upstream.py answers each request
or frame from a script of faults. Backoff is shrunk (conftest's FAST_BACKOFF,
through the forwarder's Seams) so that retries take milliseconds; the tests of
how long a key waits (Retry-After, the backoff's growth) run the forwarder on a
manual clock (tests/fakes/manual_timing.py) and read its pending waits, so no
test waits out real seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import json
import math
import random
import re
import socket
import sys
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from agent.families.lanes import LANES
from agent.forwarder.backoff import BACKOFF, Backoff
from agent.forwarder.stream import Release
from agent.forwarder.supervisor import Seams
from agent.spool.leases import Leases
from agent.spool.types import Queued, Run
from agent.uplinks.base import Retry
from agent.uplinks.http_common import client_session, post, reply_cap, retry_after
from tests.conftest import FAST_BACKOFF
from tests.fakes.faulty_upstream import NEVER_SENT, Fault, FaultyUpstream, Request
from tests.fakes.loopback_server import LoopbackServer, serving
from tests.fakes.manual_timing import ManualTiming
from tests.waiting import wait_for

NUCLEUS = ("nucleus-http", "nucleus-ws")
MARK = re.compile(rb"mk-(\d+)-")


def upstream(fake: FaultyUpstream, protocol: str, **kw: Any) -> dict[str, Any]:
    url = fake.ws_url if protocol == "nucleus-ws" else fake.http_url
    return {"name": "up", "protocol": protocol, "url": url, "flush_interval_s": 0.02,
            "timeout_s": 0.6, **kw}


def event(i: int, **payload: Any) -> dict[str, Any]:
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z", "payload": {"mark": f"mk-{i}-", **payload}}


async def send(agent: Any, events: list[dict[str, Any]], key: str = "app1") -> None:
    """POST to the agent; it must answer 200."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{agent.port}/app/{key}/track",
                          json={"data": events}) as r:
            assert r.status == 200, await r.text()


def marks(events: list[dict[str, Any]]) -> list[int]:
    out = []
    for ev in events:
        found = MARK.search(orjson.dumps(ev))
        if found:
            out.append(int(found.group(1)))
    return out


def _has(values: list[Any], wanted: Any) -> bool:
    """``wanted in values``, type-strict as the Nucleus modules compare (True is not 1)."""
    return any(v == wanted and type(v) is type(wanted) for v in values)


def delivered(fake: FaultyUpstream) -> Counter[int]:
    """How often the upstream acknowledged each event (by mark)."""
    count: Counter[int] = Counter()
    for rec in fake.requests:
        count.update(marks([ev for ev in rec.events
                            if _has(rec.acked, ev.get("id", ev.get("messageId")))]))
    return count


async def drained(agent: Any, fake: FaultyUpstream, n: int | range,
                  timeout: float = 10.0) -> None:
    """Wait until the spool is empty and every event was acknowledged upstream."""
    want = set(range(n) if isinstance(n, int) else n)
    await wait_for(lambda: agent.spool.depth == 0 and set(delivered(fake)) >= want, timeout)
    assert await agent.spool.dead_letters() == []


def resent_after(fake: FaultyUpstream, first: Request) -> list[int]:
    later = fake.requests[fake.requests.index(first) + 1:]
    return [m for r in later for m in marks(r.events)]


# -- backoff and Retry-After, as pure functions ----------------------------------------------


def test_backoff_doubles_from_base_and_is_capped() -> None:
    assert 30 <= BACKOFF.cap_s <= 120  # issue 2: reconnects capped at about 60 s
    low, high = (lambda: 0.0), (lambda: 0.999999)
    assert BACKOFF.delay(0, low) == pytest.approx(BACKOFF.base_s * 0.5)
    assert BACKOFF.delay(1, low) == pytest.approx(BACKOFF.base_s)
    assert BACKOFF.delay(3, high) == pytest.approx(BACKOFF.base_s * 8, rel=1e-5)
    for attempt in range(200):
        assert BACKOFF.cap_s * 0.5 * (attempt > 10) <= BACKOFF.delay(attempt, low)
        assert BACKOFF.delay(attempt, high) < BACKOFF.cap_s
    assert BACKOFF.delay(10_000, high) == pytest.approx(BACKOFF.cap_s, rel=1e-5)
    delays = [BACKOFF.delay(a, low) for a in range(30)]
    assert delays == sorted(delays)


def test_backoff_is_jittered() -> None:
    rng = random.Random(7)
    at_cap = [BACKOFF.delay(20, rng.random) for _ in range(200)]
    assert all(BACKOFF.cap_s * 0.5 <= d < BACKOFF.cap_s for d in at_cap)
    assert len(set(at_cap)) == 200
    # Spread over the whole jitter range, not clustered: no thundering herd.
    assert min(at_cap) < BACKOFF.cap_s * 0.6 and max(at_cap) > BACKOFF.cap_s * 0.9
    early = [BACKOFF.delay(2, rng.random) for _ in range(50)]
    assert max(early) - min(early) > BACKOFF.base_s


def test_retry_after_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after("120", now) == 120.0
    assert retry_after(" 7 ", now) == 7.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after(date, now) == pytest.approx(30.0)
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for junk in (None, "", "soon", "-5", "1.5e3", "Tue, 99 Foo 2026 00:00:00 GMT",
                 "²", "٣",   # digits to str.isdigit, not to float()
                 "Mon, 01 Jan 2026 00:00:00 +99999999999999999999"):   # OverflowError
        assert retry_after(junk, now) is None
    # A reply's Date that cannot be read is no date: the wait is measured from ``now``.
    assert retry_after(date, now, date="Mon, 01 Jan 2026 00:00:00 +9999999999999999") \
        == pytest.approx(30.0)


# -- scripted faults, end to end ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_500s_are_retried_until_delivered(make_agent: Any, faulty: FaultyUpstream,
                                                protocol: str) -> None:
    if protocol == "segment-http":
        pytest.importorskip("agent.uplinks.segment_http")
    faulty.script = [Fault("status", 500), Fault("status", 503), Fault("status", 502)]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(20)])
    await drained(agent, faulty, 20)
    assert [r.status for r in faulty.requests[:4]] == [500, 503, 502, 200]
    assert agent.forwarding.states["up"].retries == 3
    assert max(delivered(faulty).values()) == 1   # a 5xx delivers nothing: no duplicates


def manual(backoff: Backoff = FAST_BACKOFF) -> tuple[ManualTiming, Seams]:
    """A manual forwarder clock, and seams with it."""
    timing = ManualTiming()
    return timing, Seams(timing=timing, backoff=backoff)


async def test_429_retry_after_seconds_is_honoured(make_agent: Any,
                                                   faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 429, {"Retry-After": "30"})]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    # The key is parked for the upstream's 30 s (backoff alone would say 0.01 to 0.02 s).
    await wait_for(lambda: timing.pending() == [30.0])
    timing.advance(29.9)
    assert timing.pending() == [pytest.approx(0.1)] and len(faulty.requests) == 1
    timing.advance(0.1)
    await drained(agent, faulty, 5)
    assert [r.status for r in faulty.requests] == [429, 200]
    # Status says why nothing goes meanwhile: it said "HTTP 429" alone.
    assert (agent.forwarding.states["up"].last_error or "").endswith(
        "HTTP 429; next try in 30s, as its Retry-After asks")


@pytest.mark.parametrize("body", [b'{"error": "over quota, come back later"}',
                                  b'{"reportedIds": [0, 1]}'])
async def test_a_nucleus_http_200_that_is_no_whole_answer_honours_its_retry_after(
        make_agent: Any, faulty: FaultyUpstream, body: bytes) -> None:
    """A 200 without reportedIds (a collector's error in JSON), or acknowledging part of the
    batch, with a Retry-After: the rest waits it out, as after any status that carries one.
    It was retried within a second (and again, doubling up to a minute), as if it had said
    nothing, though a reportedIds holding what is no id had its wait honoured."""
    faulty.script = [Fault("status", 200, {"Retry-After": "300"}, body=body)]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: timing.pending() == [300.0])
    assert (agent.forwarding.states["up"].last_error or "").endswith(
        "; next try in 300s, as its Retry-After asks")
    timing.advance(300)
    await wait_for(lambda: agent.spool.depth == 0)
    assert len(faulty.requests) == 2 and faulty.requests[1].fault == "ok"
    assert await agent.spool.dead_letters() == []


async def test_new_events_for_a_key_in_backoff_wait_with_it(make_agent: Any,
                                                            faulty: FaultyUpstream) -> None:
    """A key waiting out a backoff holds no loop: its new events must neither start one
    before the retry time (trying a failing upstream sooner) nor be left behind then."""
    faulty.script = [Fault("status", 429, {"Retry-After": "30"})]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(0), event(1)])
    await wait_for(lambda: timing.pending() == [30.0])
    await send(agent, [event(2)])
    # The agent answers only after telling the supervisor of the new data: had that
    # started a loop for the parked key, it would be there now.
    assert agent.forwarding.loops == {} and timing.pending() == [30.0]
    timing.advance(30)
    await drained(agent, faulty, 3)
    refused, retried = faulty.requests
    assert refused.status == 429 and retried.status == 200
    assert resent_after(faulty, refused) == [0, 1, 2]


async def test_a_stop_does_not_wait_for_keys_in_backoff(make_agent: Any,
                                                        faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 503, {"Retry-After": "3000"}) for _ in range(3)]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    for i, key in enumerate(("app1", "app2", "app3")):
        await send(agent, [event(i)], key=key)
    await wait_for(lambda: len(faulty.requests) == 3
                   and agent.forwarding.states["up"].retries == 3)
    await asyncio.wait_for(agent.stop(), 3)
    assert agent.spool.depth == 3


async def test_429_retry_after_http_date_is_honoured(make_agent: Any,
                                                     faulty: FaultyUpstream) -> None:
    # HTTP-dates have whole seconds: a minute from the reply is 59 to 60 s away.
    def when() -> str:
        return email.utils.formatdate(math.floor(time.time()) + 60, usegmt=True)
    faulty.script = [Fault("status", 429, {"Retry-After": when})]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: len(timing.pending()) == 1)
    (delay,) = timing.pending()
    assert 58.0 < delay <= 60.0
    timing.advance(delay)
    await drained(agent, faulty, 5)
    assert [r.status for r in faulty.requests] == [429, 200]


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo"])
async def test_a_retry_after_in_asctime_form_is_gmt_whatever_the_device_s_zone(
        make_agent: Any, faulty: FaultyUpstream, monkeypatch: pytest.MonkeyPatch,
        zone: str) -> None:
    """An HTTP-date may come in asctime form (`Sun Nov  6 08:49:37 1994`: one of the three
    forms a recipient must accept, RFC 9110 5.6.7), which names no zone: it is GMT, as
    every HTTP-date. Read in the device's local time, it parked the key five hours away in
    New York (capped to an hour, a told wait no probe cuts short), and in Tokyo was taken
    for a date long past: the upstream's wait ignored."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        def when() -> str:
            return time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(math.floor(time.time()) + 60))
        faulty.script = [Fault("status", 503, {"Retry-After": when})]
        timing, seams = manual()
        agent = await make_agent(upstreams=[upstream(faulty, "segment-http")], seams=seams)
        await send(agent, [event(i) for i in range(3)])
        await wait_for(lambda: len(timing.pending()) == 1)
        (delay,) = timing.pending()
        assert 58.0 < delay <= 60.0, delay
        timing.advance(delay)
        await drained(agent, faulty, 3)
    finally:
        monkeypatch.undo()   # TZ as it was, before the C library reads it again
        time.tzset()


async def test_a_retry_after_date_is_read_against_the_upstream_s_own_date(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A device's clock can be wrong (clock.py): here a day behind its upstream's. The
    upstream's `Retry-After: <its now + 60 s>` was read against the device's clock, a day
    and a minute away, and the key parked for the cap, an hour, with a told wait that no
    probe cuts short. The reply's own `Date` is the upstream's now: the wait is the
    difference, whatever either clock says."""
    ahead = 86400

    def upstream_now(plus: int = 0) -> str:
        return email.utils.formatdate(math.floor(time.time()) + ahead + plus, usegmt=True)
    faulty.script = [Fault("status", 429, {"Retry-After": lambda: upstream_now(60),
                                           "Date": upstream_now})]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: len(timing.pending()) == 1)
    (delay,) = timing.pending()
    assert 59.0 <= delay <= 61.0, delay
    timing.advance(delay)
    await drained(agent, faulty, 5)


@pytest.mark.parametrize("header", ["0", "past"])
async def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it(
        make_agent: Any, faulty: FaultyUpstream, header: str) -> None:
    """`Retry-After: 0`, or an HTTP-date already past (the device's clock ahead of the
    upstream's), asks for relief: it must not turn the backoff into a tight loop (audit:
    ~630 requests/s). The agent waits the larger of the two."""
    def value() -> str:
        return email.utils.formatdate(time.time() - 3600, usegmt=True) if header == "past" \
            else header
    faulty.script = [Fault("status", 503, {"Retry-After": value}) for _ in range(4)]
    timing, seams = manual(backoff=BACKOFF)
    agent = await make_agent(upstreams=[upstream(faulty, "segment-http")], seams=seams)
    await send(agent, [event(i) for i in range(3)])
    delays: list[float] = []
    for _ in range(4):
        await wait_for(lambda: len(timing.pending()) == 1)
        (delay,) = timing.pending()
        delays.append(delay)
        timing.advance(delay)
    await drained(agent, faulty, 3)
    assert [r.status for r in faulty.requests] == [503] * 4 + [200]
    for attempt, delay in enumerate(delays):   # the backoff's own waits, growing
        step = min(BACKOFF.cap_s, BACKOFF.base_s * 2 ** attempt)
        assert step * 0.5 <= delay < step, (attempt, delays)


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_huge_retry_after_is_capped(make_agent: Any, faulty: FaultyUpstream,
                                          protocol: str) -> None:
    # A long body: segment-http's error quotes 300 characters of it, the most status keeps.
    faulty.script = [Fault("status", 503, {"Retry-After": "999999999"},
                           body=b'{"error": "' + b"busy " * 100 + b'"}')]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, protocol)], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: timing.pending() == [BACKOFF.retry_after_cap_s])   # an hour
    # Status says the key waits an hour, and why: it said "HTTP 503" alone.
    assert (agent.forwarding.states["up"].last_error or "").endswith(
        "; next try in 3600s, its Retry-After of 999999999s capped"), agent.forwarding.states
    timing.advance(BACKOFF.retry_after_cap_s)
    await drained(agent, faulty, 5)



@pytest.mark.parametrize("digits", [300, 400])
async def test_a_retry_after_too_long_to_read_as_seconds_is_shown_as_what_it_asks(
        make_agent: Any, faulty: FaultyUpstream, digits: int) -> None:
    """A Retry-After of hundreds of digits (a broken upstream's) is capped as any long one,
    and status says so in a few words. Past a float's range it said "its Retry-After of
    infs capped"; below it, its 301 digits were written out, and the note, kept whole,
    left the upstream's own error cut to a stub, last_error past its 300 characters."""
    faulty.script = [Fault("status", 503, {"Retry-After": "9" * digits},
                           body=b'{"error": "' + b"busy " * 100 + b'"}')]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "segment-http")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: timing.pending() == [BACKOFF.retry_after_cap_s])   # an hour
    error = agent.forwarding.states["up"].last_error or ""
    assert error.startswith('HTTP 503: {"error": "busy busy') and len(error) <= 300, error
    assert error.endswith("; next try in 3600s, its Retry-After of over a century capped"), \
        error
    timing.advance(BACKOFF.retry_after_cap_s)
    await drained(agent, faulty, 5)

# A zone offset too large for the date library (it raised OverflowError, not ValueError).
ABSURD_DATE = "Mon, 01 Jan 2026 00:00:00 +99999999999999999999"


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
@pytest.mark.parametrize("header", ["Retry-After", "Date"])
@pytest.mark.parametrize("status", [200, 503])
async def test_a_retry_after_or_date_with_an_absurd_zone_is_ignored(
        make_agent: Any, faulty: FaultyUpstream, protocol: str, header: str,
        status: int) -> None:
    """A Retry-After or Date the date library cannot hold (`+99999999999999999999` as its
    zone) is garbage like any other: ignored. It raised OverflowError out of the send, on
    every reply carrying it, a 200 too: counted a crash with its traceback, the upstream's
    ack thrown away and the batch sent again, for as long as the header came."""
    headers = {header: ABSURD_DATE}
    if header == "Date":
        # A date past (no wait but the backoff's): the Date is read only for a date.
        headers["Retry-After"] = email.utils.formatdate(time.time() - 60, usegmt=True)
    faulty.script = [Fault("status", status, headers, body=b'{"reportedIds": [0, 1, 2]}')
                     for _ in range(2)]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    if status == 200:
        await wait_for(lambda: len(faulty.requests) >= 1 and agent.spool.depth == 0
                       or state.crashes > 0)
        assert state.crashes == 0, state.last_error
        assert len(faulty.requests) == 1 and state.retries == 0
        return
    await drained(agent, faulty, 3)
    assert state.crashes == 0, state.last_error
    assert [r.status for r in faulty.requests] == [503, 503, 200]
    assert "503" in (state.last_error or "")


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_a_reply_whose_content_type_the_mime_parser_chokes_on_is_read(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    """`Content-Type: application/json;a*` (a parameter cut short) made the standard
    library's MIME parser, behind aiohttp's ``content_type``, raise IndexError: out of the
    send, a forwarder crash on every reply so labelled, the upstream's ack thrown away and
    the batch sent again. The type is the header's text before its parameters."""
    faulty.script = [Fault("status", 200, {"Content-Type": "application/json;a*"},
                           body=b'{"reportedIds": [0, 1, 2]}')]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.depth == 0 or state.crashes > 0)
    assert state.crashes == 0, state.last_error
    assert len(faulty.requests) == 1 and state.retries == 0


async def test_flush_interrupts_a_long_retry_after(make_agent: Any,
                                                   faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 429, {"Retry-After": "3000"})]
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: timing.pending() == [3000.0])
    assert agent.spool.depth == 5
    agent.forwarding.flush()
    await drained(agent, faulty, 5, timeout=5)
    assert timing.pending() == []   # the retry timer is gone with the parked key


@pytest.mark.parametrize("protocol", NUCLEUS)
async def test_timeouts_resend_the_same_events(make_agent: Any, faulty: FaultyUpstream,
                                               protocol: str) -> None:
    faulty.script = [Fault("timeout", delay=1.5)]
    agent = await make_agent(upstreams=[upstream(faulty, protocol, timeout_s=0.4)])
    await send(agent, [event(i) for i in range(10)])
    await drained(agent, faulty, 10)
    timed_out = faulty.requests[0]
    assert timed_out.fault == "timeout"
    # The only duplicates are the batch whose ack never came, sent again with the same ids.
    twice = {m for m, n in Counter(faulty.received_ids()).items() if n > 1}
    assert twice <= {ev["id"] for ev in timed_out.events}
    assert all(n == 1 for n in delivered(faulty).values()) or protocol == "nucleus-ws"


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_connection_reset_mid_request(make_agent: Any, faulty: FaultyUpstream,
                                            protocol: str) -> None:
    if protocol == "segment-http":
        pytest.importorskip("agent.uplinks.segment_http")
    faulty.script = [Fault("reset"), Fault("reset")]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(10)])
    await drained(agent, faulty, 10)
    assert [r.fault for r in faulty.requests[:3]] == ["reset", "reset", "ok"]
    assert agent.forwarding.states["up"].retries == 2


async def test_websocket_closed_mid_batch(make_agent: Any, faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("close")]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws")])
    await send(agent, [event(i) for i in range(10)])
    await drained(agent, faulty, 10)
    closed = faulty.requests[0]
    assert closed.fault == "close" and closed.acked == [0, 1, 2, 3, 4]
    # What was acknowledged before the close is not sent again; the rest is.
    assert sorted(resent_after(faulty, closed)) == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("protocol", NUCLEUS)
async def test_partial_reported_ids_resend_only_the_rest(make_agent: Any,
                                                         faulty: FaultyUpstream,
                                                         protocol: str) -> None:
    faulty.script = [Fault("partial")]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(10)])
    await drained(agent, faulty, 10)
    first = faulty.requests[0]
    assert first.acked == [0, 1, 2, 3, 4]
    assert sorted(resent_after(faulty, first)) == [5, 6, 7, 8, 9]
    assert all(n == 1 for n in delivered(faulty).values())


@pytest.mark.parametrize("protocol", NUCLEUS)
async def test_reported_ids_never_sent_are_ignored(make_agent: Any, faulty: FaultyUpstream,
                                                   protocol: str) -> None:
    # First every real id plus strangers (ignored), then only strangers: among them
    # `true`, which equals 1 in Python, and must not acknowledge the event with id 1.
    faulty.script = [Fault("unknown"), Fault("bogus")]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(1, 6)])
    await wait_for(lambda: len(faulty.requests) >= 1 and agent.spool.depth == 0)
    await send(agent, [event(i) for i in range(1, 6)], key="app2")
    await wait_for(lambda: agent.spool.depth == 0)
    assert [r.fault for r in faulty.requests[:2]] == ["unknown", "bogus"]
    bogus = faulty.requests[1]
    assert bogus.acked == NEVER_SENT
    assert sorted(resent_after(faulty, bogus)) == [1, 2, 3, 4, 5]
    assert await agent.spool.dead_letters() == []


MALFORMED = [b'{"reportedIds": [1, 2', b"not json", b'{"reportedIds": "1"}', b"[]", b"",
             b'{"reportedIds": {"1": 1}}', b"null", b'{"reportedIds": [[1], {"id": 1}]}']


@pytest.mark.parametrize("protocol", NUCLEUS)
async def test_malformed_acks_are_retried(make_agent: Any, faulty: FaultyUpstream,
                                          protocol: str) -> None:
    faulty.script = [Fault("malformed", body=b) for b in MALFORMED]
    if protocol == "nucleus-ws":
        faulty.script = faulty.script[:3]  # each costs a timeout_s wait over a websocket
    agent = await make_agent(upstreams=[upstream(faulty, protocol, timeout_s=0.3)])
    await send(agent, [event(i) for i in range(1, 6)])
    await drained(agent, faulty, range(1, 6), timeout=15)
    assert not faulty.script


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_a_200_whose_body_cannot_be_decoded_is_judged_by_what_the_protocol_needs(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    """A 200 whose Content-Encoding does not match its body (a proxy's mangling, or an
    encoding the client cannot decode). Segment's verdict is its status: the batch is
    acknowledged. Before the fix it was sent again at every retry, each taken again, for
    ever, and the key never got past it. Nucleus needs the reply's reportedIds: sent
    again, and the error says why."""
    faulty.script = [Fault("status", 200, {"Content-Encoding": "gzip"},
                           body=b'{"success": true, "reportedIds": [0, 1, 2]}')]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    if protocol == "segment-http":
        # acked counts an ack once its delete is saved, a turn after the queue reads empty.
        await wait_for(lambda: agent.spool.depth == 0 and state.acked >= 3)
        assert len(faulty.requests) == 1 and state.retries == 0 and state.acked == 3
        return
    await drained(agent, faulty, 3)
    assert state.retries == 1 and "could not be read" in (state.last_error or ""), state
    assert "gzip" in (state.last_error or "").lower() or "decode" in (state.last_error or "")


@pytest.mark.parametrize("encoding", ["br", "zstd"])
@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_a_200_in_an_encoding_the_agent_cannot_decode_keeps_its_status(
        make_agent: Any, faulty: FaultyUpstream, protocol: str, encoding: str) -> None:
    """A 200 in a Content-Encoding the agent never asked for and has no decoder for (an
    upstream that ignores Accept-Encoding): its status still stands, as for a gzip body
    that does not decode. The status was lost: the request failed with "400,
    message='Can not decode content-encoding...'", as if the upstream had refused the
    batch, and a Segment batch was sent again at every retry, for ever."""
    faulty.script = [Fault("status", 200, {"Content-Encoding": encoding},
                           body=b'{"success": true, "reportedIds": [0, 1, 2]}')]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    if protocol == "segment-http":
        # acked counts an ack once its delete is saved, a turn after the queue reads empty.
        await wait_for(lambda: (agent.spool.depth == 0 and state.acked >= 3) or state.retries > 0)
        assert (len(faulty.requests), state.retries, state.acked) == (1, 0, 3), state
        return
    await drained(agent, faulty, 3)
    error = state.last_error or ""
    assert state.retries == 1 and error.startswith("HTTP 200 with a reply that could not be "
                                                   "read") and encoding in error, error


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip"])
async def test_a_gzip_reply_in_several_members_is_read_whole(
        make_agent: Any, faulty: FaultyUpstream, encoding: str) -> None:
    """A gzip body may hold several members, one after another (RFC 1952: a server that
    compresses each piece of a streamed reply on its own), and decodes to all of them. Only
    the first was read: a Nucleus upstream's reportedIds, cut at its end, read as no answer,
    and the batch, stored at every try, was sent again for ever ("without reportedIds; the
    upstream said {"reportedIds":[0,")."""
    members = gzip.compress(b'{"reportedIds":[0,') + gzip.compress(b'1,2]}')
    faulty.script = [Fault("status", 200, {"Content-Encoding": encoding}, body=members)]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    # acked counts an ack once its delete is saved, a turn after the queue reads empty.
    await wait_for(lambda: (agent.spool.depth == 0 and state.acked >= 3) or state.retries > 0)
    assert (len(faulty.requests), state.retries, state.acked) == (1, 0, 3), state.last_error


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_2xx_whose_compressed_body_ends_early_is_no_answer(
        make_agent: Any, faulty: FaultyUpstream, encoding: str) -> None:
    """A Segment 200 whose compressed body stops short of its stream's end (a server that
    never closed its compressor, a proxy that cut it and fixed the length): its body, cut,
    may have refused part of the batch, as one cut short of its Content-Length may. It was
    read as whole: a collector's `"success": false`, cut before the end of its JSON, was
    taken for an ack, and the batch, never stored, was deleted with no error."""
    said = b'{"success": false, "message": "monthly event quota exceeded"}'
    whole = gzip.compress(said) if encoding == "gzip" else zlib.compress(said)
    faulty.script = [Fault("status", 200, {"Content-Encoding": encoding},
                           body=whole[:len(whole) - 12])]
    agent = await make_agent(upstreams=[upstream(faulty, "segment-http")])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.depth == 0 and state.acked >= 3)   # saved: counted
    assert (len(faulty.requests), state.retries) == (2, 1), state.last_error
    assert (state.last_error or "").startswith("HTTP 200 with a reply not read whole"), \
        state.last_error
    assert faulty.requests[1].fault == "ok" and await agent.spool.dead_letters() == []


@pytest.mark.parametrize("tail", [b"\n", b"\x00", b"\x1f", b"\x00" * 8, b"\x1f\x8bnot gzip"])
async def test_bytes_after_a_gzip_body_s_last_member_are_ignored(
        make_agent: Any, faulty: FaultyUpstream, tail: bytes) -> None:
    """What follows a gzip body's last member and is no member (a newline, NULs) is ignored,
    as other clients ignore it: not a member cut short, which would make the answer no
    answer."""
    body = gzip.compress(b'{"reportedIds":[0,1,2]}') + tail
    faulty.script = [Fault("status", 200, {"Content-Encoding": "gzip"}, body=body)]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: (agent.spool.depth == 0 and state.acked >= 3) or state.retries > 0)
    assert (len(faulty.requests), state.retries, state.acked) == (1, 0, 3), state.last_error


BOM = b"\xef\xbb\xbf"   # UTF-8's byte order mark: a PHP file saved with one, .NET's encoder


@pytest.mark.parametrize("protocol", NUCLEUS)
async def test_a_nucleus_reply_that_starts_with_a_byte_order_mark_acknowledges_its_ids(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    """JSON after a UTF-8 byte order mark is JSON (RFC 8259 lets a parser ignore the mark, as
    browsers and Python's requests do). A Nucleus upstream's reply so written was read as no
    answer: the batch, stored at every try, was sent again for ever, while last_error
    showed the very reportedIds it did not read ("without reportedIds; the upstream said
    {"reportedIds":[0,1,2]}")."""
    faulty.script = [Fault("malformed", body=BOM + b'{"reportedIds":[0,1,2]}')]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: (agent.spool.depth == 0 and state.acked >= 3) or state.retries > 0)
    assert (len(faulty.requests), state.retries, state.acked) == (1, 0, 3), state.last_error


async def test_a_segment_2xx_saying_it_failed_after_a_byte_order_mark_keeps_the_events(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A collector's `"success": false` after a UTF-8 byte order mark, under a 200: the events
    are kept and sent again, as without the mark. Not parsed, it was taken for an ack: the
    batch, never stored, was deleted with no error."""
    faulty.script = [Fault("status", 200, body=BOM + b'{"success": false, "message": '
                                                     b'"monthly event quota exceeded"}')]
    agent = await make_agent(upstreams=[upstream(faulty, "segment-http")])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.depth == 0 and state.acked >= 3)   # saved: counted
    assert (len(faulty.requests), state.retries) == (2, 1), state.last_error
    assert "monthly event quota exceeded" in (state.last_error or ""), state.last_error

async def _raw_upstream(head: bytes) -> asyncio.Server:
    """Answers every request with ``head`` (a status line and headers, as bytes: aiohttp's
    server writes only UTF-8) and a 2-byte body."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                size = re.search(rb"(?i)content-length: *(\d+)", request)
                await reader.readexactly(int(size[1]) if size else 0)
                writer.write(head + b"\r\nContent-Length: 2\r\n\r\nno")
        writer.close()
    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.parametrize("status", [400, 503])
async def test_a_content_encoding_not_utf8_is_shown_as_its_bytes(make_agent: Any,
                                                                 status: int) -> None:
    """A refusal whose Content-Encoding holds a byte that is not UTF-8 (a proxy's garbage):
    aiohttp reads it as a lone surrogate, which its error's text ("could not be read: Can
    not decode content-encoding: ...") carried. A 400's dead letter could not be stored
    (SQLite takes only UTF-8): the event was sent again for ever; a 503's last error made
    /status answer 500, breaking `outpost status` and the status page."""
    server = await _raw_upstream(b"HTTP/1.1 %d No\r\nContent-Encoding: gzip, x\xff" % status)
    try:
        port = server.sockets[0].getsockname()[1]
        agent = await make_agent(upstreams=[{"name": "up", "protocol": "segment-http",
                                             "url": f"http://127.0.0.1:{port}",
                                             "flush_interval_s": 0.02, "timeout_s": 2}])
        await send(agent, [event(1)])
        state = agent.forwarding.states["up"]
        if status == 400:
            await wait_for(lambda: agent.spool.depth == 0 or state.retries >= 2)
            [letter] = await agent.spool.dead_letters()
            shown = letter["reason"]
        else:
            await wait_for(lambda: state.last_error is not None)
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{agent.port}/status") as r:
                assert r.status == 200, await r.text()
                [up] = (await r.json())["upstreams"]
            shown = up["last_error"]
        assert "content-encoding: gzip, x\\xff" in shown, shown
    finally:
        server.close()


async def test_a_segment_200_whose_body_stalls_is_sent_again(make_agent: Any,
                                                             faulty: FaultyUpstream) -> None:
    """The collector's 200 came, then its body stopped half way (a wrong Content-Length, a
    proxy holding the rest, a byte a minute) until timeout_s ran out. An answer not read
    whole is no answer: its body may have refused some of the batch (another Outpost's 200
    for analytics-python names them), so the batch goes again (the collector dedupes what
    it stored), and the error says why. It was taken as an ack of the whole batch."""
    faulty.script = [Fault("stall", delay=1)]
    agent = await make_agent(upstreams=[upstream(faulty, "segment-http", timeout_s=0.4)])
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: agent.spool.depth == 0 and state.acked >= 3)   # saved: counted
    assert (len(faulty.requests), state.retries, state.acked) == (2, 1, 3), state
    assert (state.last_error or "").startswith("HTTP 200 with a reply not read whole "
                                               "(not received whole within 0.4s"), state


@pytest.mark.parametrize("protocol", [*NUCLEUS, "segment-http"])
async def test_a_reply_too_long_to_be_an_answer_is_not_read_whole(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    """An upstream's reply is read up to what its batch's answer may need (reply_cap): a
    64 MiB one (valid JSON padded with spaces, from a broken upstream or a proxy) was read
    into memory whole. Segment's
    verdict is its status: the batch is acknowledged. A Nucleus reply cut short
    acknowledges nothing: the batch is sent again."""
    faulty.script = [Fault("huge", size=64 * 1024 * 1024)]
    agent = await make_agent(upstreams=[upstream(faulty, protocol, timeout_s=10)])
    await send(agent, [event(i) for i in range(5)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=20)
    huge, *rest = faulty.requests
    assert huge.fault == "huge"
    state = agent.forwarding.states["up"]
    if protocol != "nucleus-ws":
        # What the agent read, and the socket buffers between: far from the whole reply.
        assert huge.written < 20 * 1024 * 1024, huge.written
    if protocol == "segment-http":
        assert not rest and state.retries == 0
        return
    assert [r.fault for r in rest] == ["ok"] and sorted(marks(rest[0].events)) == list(range(5))
    # "a reply over N bytes" (HTTP: its batch's cap), "... exceeds limit N" (websocket:
    # the largest batch's).
    cap = re.search(r"(?:over|limit) (\d+)", state.last_error or "")
    assert state.retries == 1 and cap and int(cap[1]) <= reply_cap(500_000, 500), state


class EscapingNucleus(LoopbackServer):
    """A Nucleus upstream written in Python: its replies are json.dumps'd, each non-ASCII
    character escaped (`\\ud83d\\ude00`: 12 bytes for one that UTF-8 sends in 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.acked: list[Any] = []

    async def start(self) -> EscapingNucleus:
        app = web.Application(client_max_size=2**24)
        app.add_routes([web.post("/app/{k}/track", self._http), web.get("/app/{k}/track", self._ws)])
        await self._serve(app)
        return self

    def _answer(self, frame: str | bytes) -> str:
        ids = [ev["id"] for ev in json.loads(frame)["data"] if "id" in ev]
        self.acked += ids
        return json.dumps({"reportedIds": ids})

    async def _http(self, request: web.Request) -> web.Response:
        return web.Response(text=self._answer(await request.read()),
                            content_type="application/json")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(self._answer(msg.data))
        return ws


@pytest.mark.parametrize("protocol", NUCLEUS)
async def test_an_answer_longer_than_its_frame_for_escaped_ids_is_read(
        make_agent: Any, protocol: str) -> None:
    """Events whose ids are long and not ASCII (the 1,024 characters an id may have, here
    emoji), to an upstream that escapes them in its answer: its reportedIds take three
    times the bytes the ids took in the frame, past the reply read for a batch (reply_cap).
    Each answer was cut, no event acknowledged, the same batch sent again: the key stuck."""
    fake = await EscapingNucleus().start()
    try:
        url = fake.ws_url if protocol == "nucleus-ws" else fake.http_url
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": protocol, "url": url, "flush_interval_s": 0.02,
            "timeout_s": 2, "batch_max_bytes": 100_000, "batch_max_events": 20}])
        ids = [f"{i:04d}" + "\U0001F600" * 1020 for i in range(40)]
        await send(agent, [{**event(i), "id": ids[i]} for i in range(40)])
        state = agent.forwarding.states["up"]
        await wait_for(lambda: agent.spool.depth == 0 or state.retries >= 2)
        assert agent.spool.depth == 0 and state.retries == 0, state
        assert set(fake.acked) == set(ids)
    finally:
        await fake.stop()


class HoldingUpstream(LoopbackServer):
    """Answers every batch (HTTP, or a websocket frame) with a reply declared ``size`` bytes
    long, sends all of it but its last byte, and holds that until ``released``: a broken
    upstream or a proxy in the way, doing it to every batch in flight at once. It writes
    64 KiB at a time, each once the last is taken, so that it holds next to nothing."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.released = asyncio.Event()
        self._held: list[asyncio.BaseTransport] = []

    async def stop(self) -> None:
        """Cut every connection: a graceful close would wait for the agent to read the
        reply it hung up on."""
        self.released.set()
        for transport in self._held:
            transport.abort()
        await super().stop()

    async def start(self) -> HoldingUpstream:
        app = web.Application()
        app.add_routes([web.post("/v1/batch", self._http), web.post("/app/{k}/track", self._http),
                        web.get("/app/{k}/track", self._ws)])
        await self._serve(app)
        return self

    async def _http(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        self._held.append(request.transport)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = self.size
        await resp.prepare(request)
        await self._hold(resp.write)
        return resp

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        writer = await ws.prepare(request)
        assert writer is not None and request.transport is not None
        self._held.append(request.transport)
        holding: asyncio.Task[None] | None = None
        async for msg in ws:   # read on: a client that hangs up is answered at once
            if msg.type is aiohttp.WSMsgType.TEXT and holding is None:
                # A text frame's header with a 64-bit length, unmasked (server to client).
                await writer.write(b"\x81\x7f" + self.size.to_bytes(8, "big"))
                holding = asyncio.create_task(self._hold(writer.write))
        if holding is not None:
            holding.cancel()
        return ws

    async def _hold(self, write: Any) -> None:
        chunk = b" " * (64 * 1024)
        left = self.size - 1
        try:
            while left:
                await write(chunk[:left])
                left -= min(left, len(chunk))
            await self.released.wait()
        except ConnectionError:
            pass   # the agent hung up


@pytest.mark.parametrize("protocol", ["segment-http", *NUCLEUS])
async def test_replies_to_many_batches_in_flight_hold_no_more_than_the_batches(
        make_agent: Any, fast_backoff: Seams, protocol: str) -> None:
    """Eight keys' batches of three events in flight, each answered with a reply of almost
    4 MiB that never ends. Each reply was read up to 4 MiB, whatever it answered, and held
    until timeout_s: 32 MiB here; with the upstream's 64 batches in flight (and any
    number of websockets), 256 MiB an upstream. A reply is now read only up to what an
    answer to its batch can need (its ids, or a 207's line for each message): the agent
    hangs up past it, and holds a few hundred KiB."""
    keys = 8
    fake = await HoldingUpstream(4 * 1024 * 1024 - 64 * 1024).start()
    agent = None
    try:
        url = fake.ws_url if protocol == "nucleus-ws" else fake.http_url
        agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol, "url": url,
                                             "flush_interval_s": 0.02, "timeout_s": 10}])
        state = agent.forwarding.states["up"]
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for k in range(keys):
                await send(agent, [event(k * 3 + i) for i in range(3)], key=f"app{k}")
            # Segment's 2xx is its verdict, read or not; a Nucleus reply cut short acks
            # nothing. Before: neither until timeout_s, memory growing meanwhile.
            await wait_for(lambda: (agent.spool.depth == 0 or state.retries >= keys
                                    or tracemalloc.get_traced_memory()[0] - base > 16 * 1024**2),
                           timeout=8)
            grown = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert grown < 8 * 1024**2, f"{grown / 1024**2:.1f} MiB held for {keys} replies"
    finally:
        # The agent first: retrying fast, it can reach the fake as it closes, whose server
        # then accepts a connection it never serves, and the stop waits out its 5 s grace.
        if agent is not None:
            await agent.stop()
        await fake.stop()


async def test_slow_upstream_delivers_once_and_does_not_slow_ingest(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    held = asyncio.Event()
    faulty.script = [Fault("slow", until=held) for _ in range(3)]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", timeout_s=5,
                                                 batch_max_events=10)])
    await send(agent, [event(j) for j in range(10)])
    await wait_for(lambda: len(faulty.requests) == 1)
    # Apps are answered at commit speed while the upstream holds its reply: an ingest
    # that waited on the uplink would not answer these until `held` is set.
    for i in (1, 2):
        await asyncio.wait_for(send(agent, [event(i * 10 + j) for j in range(10)]), 10)
    assert faulty.requests[0].answered is None
    held.set()
    await drained(agent, faulty, 30)
    assert all(n == 1 for n in delivered(faulty).values())
    assert agent.forwarding.states["up"].retries == 0


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_poison_event_is_dead_lettered_and_the_rest_delivered(
        make_agent: Any, faulty: FaultyUpstream, protocol: str) -> None:
    if protocol == "segment-http":
        pytest.importorskip("agent.uplinks.segment_http")
    faulty.poison = lambda ev: b"POISON" in orjson.dumps(ev)
    agent = await make_agent(upstreams=[upstream(faulty, protocol, batch_max_events=40)])
    events = [event(i) for i in range(40)]
    events[23] = event(23, bad="POISON")
    await send(agent, events)
    await wait_for(lambda: agent.spool.depth == 0)
    dead = await agent.spool.dead_letters()
    assert len(dead) == 1 and "mk-23-" in dead[0]["body"] and "400" in dead[0]["reason"]
    got = delivered(faulty)
    assert set(got) == set(range(40)) - {23} and max(got.values()) == 1
    # Bisection: about 2 log2(n) requests, not one per event.
    assert len(faulty.requests) <= 2 * math.ceil(math.log2(40)) + 2
    assert agent.spool.counters["dead_lettered"] == 1


async def test_backoff_grows_to_its_cap_between_failures(make_agent: Any,
                                                         faulty: FaultyUpstream) -> None:
    """The agent's own policy (0.5 s doubling to 60 s), on a manual clock."""
    faulty.script = [Fault("status", 500) for _ in range(9)]
    timing, seams = manual(backoff=BACKOFF)
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")], seams=seams)
    await send(agent, [event(i) for i in range(3)])
    delays: list[float] = []
    for _ in range(9):   # each failure parks the key; let its wait pass
        await wait_for(lambda: len(timing.pending()) == 1)
        (delay,) = timing.pending()
        delays.append(delay)
        timing.advance(delay)
    await drained(agent, faulty, 3)
    assert len(faulty.requests) == 10
    jitter = (0.5, 1.0)   # [0.5, 1) times base * 2**attempt, capped
    for attempt, delay in enumerate(delays):
        step = min(BACKOFF.cap_s, BACKOFF.base_s * 2 ** attempt)
        assert step * jitter[0] <= delay < step * jitter[1], (attempt, delays)
    assert delays[-1] >= BACKOFF.cap_s * 0.5   # reached the cap, never beyond it


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
@pytest.mark.parametrize(("status", "hint"), [
    (401, "check the upstream's key"), (403, "check the upstream's key"),
    (404, "check the upstream's url"), (409, "kept and retried")])
async def test_a_wrong_key_or_url_backs_off_and_dead_letters_nothing(
        make_agent: Any, faulty: FaultyUpstream, protocol: str, status: int, hint: str) -> None:
    """401/403/404 say the upstream's key or URL is wrong, not that the events are: they
    stay queued and are retried, instead of the whole queue going to dead letters. So is
    any other 4xx that is no verdict on a batch (409), whose last_error does not send the
    operator to a key and URL that are right."""
    if protocol == "segment-http":
        pytest.importorskip("agent.uplinks.segment_http")
    faulty.script = [Fault("status", status) for _ in range(3)]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(i) for i in range(6)])
    await drained(agent, faulty, 6)     # includes: no dead letters
    assert [r.status for r in faulty.requests[:4]] == [status] * 3 + [200]
    error = agent.forwarding.states["up"].last_error or ""
    assert str(status) in error and hint in error, error


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
@pytest.mark.parametrize("status", [401, 503])
async def test_a_refusal_kept_and_retried_shows_what_the_upstream_said(
        make_agent: Any, faulty: FaultyUpstream, protocol: str, status: int) -> None:
    """A 5xx or a 401 keeps the events; last_error is all the operator has to go on, and
    the upstream's own words ("app not found", "maintenance until 3am") say more than its
    status: an excerpt of its reply, as for a refusal that splits the batch, the key in it
    redacted."""
    faulty.script = [Fault("status", status, echo=True)]
    agent = await make_agent(upstreams=[upstream(faulty, protocol)])
    await send(agent, [event(0)])
    await drained(agent, faulty, 1)
    error = agent.forwarding.states["up"].last_error or ""
    assert f"HTTP {status}" in error and '"error": "refused"' in error, error
    assert "app1" not in error, error


# -- shutdown is prompt, whenever the stop comes ------------------------------------------------


class _GatedSpool:
    """A spool whose reads wait for a gate, so that a stop can land in the middle of one."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()
        self.leases = Leases()
        self.dropping = None   # nothing drops its rows

    async def fetch(self, stream: int, after: int | Sequence[int], limit: int,
                    lanes: Sequence[int] = LANES, max_bytes: int | None = None,
                    until: Sequence[int | None] | None = None) -> Queued:
        self.reading.set()
        await self.gate.wait()
        cursors = (after,) * len(LANES) if isinstance(after, int) else after
        ends = until or (None,) * len(LANES)
        rows = [r for r in self.rows if r.lane in lanes and r.seq > cursors[r.lane]
                and (ends[r.lane] is None or r.seq <= ends[r.lane])][:limit]
        return Queued([Run(r.seq, r.stream, r.family, r.received, [r.body], None, r.lane)
                       for r in rows])

    async def ack(self, seqs: Any) -> None:
        return None

    async def dead_letter(self, rows: Any) -> None:
        return None

    def dropped_since(self, rows: Queued) -> bool:
        return False   # nothing drops its rows


class _GatedUplink:
    """Row 1 fails at once (with a long Retry-After); row 2 hangs until released."""

    name = "up"
    prepares_ahead = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sending = asyncio.Event()

    def connecting(self) -> None:
        return None

    def acknowledged(self, batch: Any) -> tuple[int, ...]:
        return ()

    def prepare(self, rows: list[Any]) -> Any:
        from tests.fakes.uplinks import as_prepared
        return as_prepared(rows[:1])

    async def send(self, batch: Any) -> Any:
        from agent.uplinks.base import Retry
        if batch.seqs[0] == 2:
            self.sending.set()
            await self.release.wait()
        return Retry("down", retry_after=3000)

    async def close(self) -> None:
        return None


def _forwarder(spool: Any, uplink: Any, window: int, release: Release | None = None) -> Any:
    from agent.forwarder.state import UpstreamState
    from agent.forwarder.stream import StreamForwarder
    from agent.metrics import Metrics
    from agent.settings import UpstreamConfig
    from agent.spool.types import Stream
    cfg = UpstreamConfig(name="up", protocol="nucleus-http", url="http://127.0.0.1:9",
                         flush_interval_s=0.01)
    # The depth counters say events are queued: the gated spool decides what a read returns.
    return StreamForwarder(cfg, Stream(1, "k", depth=1), spool, uplink, UpstreamState("up", "x"),
                           Metrics(), window, release=release)


async def test_a_stop_during_a_read_is_not_lost() -> None:
    """stop() while the forwarder reads the spool: it must not then wait for new data."""
    spool = _GatedSpool([])
    fwd = _forwarder(spool, _GatedUplink(), 1)
    task = asyncio.create_task(fwd.run())
    await asyncio.wait_for(spool.reading.wait(), 5)
    fwd.stop()
    spool.gate.set()
    await asyncio.wait_for(task, 2)


async def test_a_stop_while_batches_settle_does_not_wait_out_the_backoff() -> None:
    """stop() while in-flight batches settle before a backoff: it must cut that backoff
    (here a 3000 s Retry-After) short, as a stop during the backoff does."""
    from agent.spool.types import Row
    spool = _GatedSpool([Row(1, 1, 0, 0, b"{}"), Row(2, 1, 0, 0, b"{}")])
    spool.gate.set()
    uplink = _GatedUplink()
    fwd = _forwarder(spool, uplink, 2)
    task = asyncio.create_task(fwd.run())
    await asyncio.wait_for(uplink.sending.wait(), 5)   # row 1 failed, row 2 in flight
    await asyncio.sleep(0.05)                          # the loop now settles row 2
    fwd.stop()
    uplink.release.set()
    await asyncio.wait_for(task, 2)


class _CrashingUplink(_GatedUplink):
    """As _GatedUplink, but sending row 2 raises once released: a bug in a delivery."""

    async def send(self, batch: Any) -> Any:
        result = await super().send(batch)
        if batch.seqs[0] == 2:
            raise ValueError("injected delivery fault")
        return result


async def test_a_crash_while_batches_settle_before_a_backoff_reaches_the_supervisor() -> None:
    """Row 1 fails, so the loop settles row 2 before backing off, and row 2's delivery
    raises: that must be raised to the supervisor (logged, counted, restarted), not lost
    with the loop as it ends to wait out its backoff."""
    from agent.spool.types import Row
    spool = _GatedSpool([Row(1, 1, 0, 0, b"{}"), Row(2, 1, 0, 0, b"{}")])
    spool.gate.set()
    uplink = _CrashingUplink()
    parked: list[float] = []
    fwd = _forwarder(spool, uplink, 2, Release(3600.0, lambda delay, attempt, told: parked.append(delay)))
    task = asyncio.create_task(fwd.run())
    await asyncio.wait_for(uplink.sending.wait(), 5)   # row 1 failed, row 2 in flight
    uplink.release.set()
    with pytest.raises(ValueError, match="injected delivery fault"):
        await asyncio.wait_for(task, 2)
    assert parked == []


@pytest.mark.parametrize("body", [b'{"error": "app not found"}', b"OK app not found"])
async def test_a_nucleus_http_200_without_reported_ids_names_what_the_upstream_said(
        make_agent: Any, faulty: FaultyUpstream, body: bytes) -> None:
    """A 200 whose body is other JSON than reportedIds, or no JSON at all: nothing is
    acknowledged, the batch is sent again, and last_error says what the upstream said, as
    over the websocket. It said only 'reply did not acknowledge every event'."""
    faulty.script = [Fault("malformed", body=body)]
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    await send(agent, [event(i) for i in range(3)])
    await drained(agent, faulty, 3)
    state = agent.forwarding.states["up"]
    assert state.retries == 1 and "app not found" in (state.last_error or ""), state.last_error


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_a_batch_too_slow_to_send_within_timeout_s_says_so(make_agent: Any,
                                                                 protocol: str) -> None:
    """A link too slow to carry a full batch within timeout_s (here an upstream that reads
    the request at 100 KB/s): the try times out. Status must say why: last_error said
    'request failed: TimeoutError', with no word of the wait or the batch's size. (That
    smaller batches follow: tests/test_slow_link.py.)"""
    reads: list[int] = []

    async def slow(request: web.Request) -> web.StreamResponse:
        size = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await request.content.read(1000):
                size += len(chunk)
                await asyncio.sleep(0.01)
        reads.append(size)
        return web.json_response({"reportedIds": []})

    path = "/v1/batch" if protocol == "segment-http" else "/app/{key}/track"
    async with serving(path, slow) as url:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": protocol, "url": url, "flush_interval_s": 0.02,
            "timeout_s": 0.3}])
        await send(agent, [event(i, pad="x" * 2000) for i in range(40)])
        state = agent.forwarding.states["up"]
        await wait_for(lambda: state.retries >= 1)
    error = state.last_error or ""
    assert "0.3s" in error and "timeout_s" in error, error
    assert "smaller batches" in error and re.search(r"\b\d{5} bytes", error), error


@pytest.mark.parametrize("status", [201, 202])
async def test_a_nucleus_http_2xx_other_than_200_with_reported_ids_acknowledges_them(
        make_agent: Any, status: int) -> None:
    """A Nucleus-compatible collector that answers its track POST with 201 (NestJS's default
    for a POST handler) or 202, and reportedIds: those are the acknowledgement,
    whatever the 2xx. Only 200 was read: the batch was sent again at every backoff, stored
    again by the upstream each time, and the key never drained."""
    seen: list[list[Any]] = []

    async def collector(request: web.Request) -> web.Response:
        ids = [ev["id"] for ev in (await request.json())["data"]]
        seen.append(ids)
        return web.json_response({"reportedIds": ids}, status=status)

    async with serving("/app/{key}/track", collector) as url:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": "nucleus-http", "url": url, "flush_interval_s": 0.02,
            "timeout_s": 2}])
        await send(agent, [event(i) for i in range(3)])
        state = agent.forwarding.states["up"]
        await wait_for(lambda: agent.spool.depth == 0 or state.retries > 0)
    assert (state.retries, state.acked, seen) == (0, 3, [[0, 1, 2]]), state.last_error


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http", "nucleus-ws"])
@pytest.mark.parametrize("status", [403, 401])
async def test_a_refusal_with_a_retry_after_is_retried_no_sooner(
        make_agent: Any, faulty: FaultyUpstream, protocol: str, status: int) -> None:
    """A 401 or 403 that says when to come back (a quota or rate limit worded as a refusal,
    as some APIs answer): its Retry-After is waited out, as a 429's is, and as an HTML
    page's is whatever its status. It was ignored: retried at the backoff's pace, 0.25 s
    first, against an upstream that had asked for ten minutes. The websocket's handshake
    (nucleus-ws) takes it as the HTTP uplinks do: it honoured it only with a 429, a 5xx or
    an HTML page."""
    refusal = [Fault("status", status, {"Retry-After": "600"})]
    if protocol == "nucleus-ws":
        faulty.connect_script = refusal
    else:
        faulty.script = refusal
    timing, seams = manual()
    agent = await make_agent(upstreams=[upstream(faulty, protocol)], seams=seams)
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["up"]
    await wait_for(lambda: state.retries == 1 and not agent.forwarding.loops)
    assert timing.pending() == [600.0], timing.pending()
    assert "check the upstream's key" in (state.last_error or ""), state.last_error
    timing.advance(600)
    await drained(agent, faulty, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux drops a SYN to a "
                    "full accept queue; other systems may refuse it at once")
async def test_a_connection_that_never_opens_within_timeout_s_is_not_blamed_on_the_batch() -> None:
    """An upstream whose connections never open (a firewall dropping them, a host gone)
    times out alike, but no batch was sent: 'lower batch_max_bytes' sends the operator
    after the wrong setting while the key stays stuck."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]   # the accept queue full: SYNs dropped
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
    try:
        await wait_for(lambda: _queue_full(port))
        async with client_session() as session:
            said = await post(session, f"http://127.0.0.1:{port}/v1/batch", b"x" * 50_000,
                              {}, 0.3, 64 * 1024)
    finally:
        for s in (*fillers, listener):
            s.close()
    assert isinstance(said, Retry) and not said.too_slow, said
    assert "0.3s" in said.error and "connect" in said.error, said
    assert "batch_max_bytes" not in said.error and "smaller" not in said.error, said


def _queue_full(port: int) -> bool:
    """Whether a connection to ``port`` is left unanswered (its SYN dropped)."""
    probe = socket.socket()
    probe.settimeout(0.05)
    try:
        probe.connect(("127.0.0.1", port))
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


@pytest.mark.parametrize("protocol", ["nucleus-http", "segment-http"])
async def test_a_kept_alive_connection_the_upstream_closed_is_no_failure(
        make_agent: Any, protocol: str) -> None:
    """An upstream closes an idle kept-alive connection (Node.js does after 5 s, aiohttp's
    client keeps one 15 s) just as the agent sends its next batch on it: the batch goes
    again at once on a new connection. It was a failed send, "Server disconnected" in
    last_error, a backoff and a retry counted, for a connection the agent chose to reuse."""
    served: Counter[object] = Counter()   # requests per connection (its transport)
    connections: list[object] = []

    async def collector(request: web.Request) -> web.Response:
        assert request.transport is not None
        conn = request.transport
        served[conn] += 1
        connections.append(conn)
        if served[conn] > 1:   # closed as it came: the request is not read, nor answered
            request.transport.abort()
            return web.Response(status=500)
        ids = [ev.get("id") for ev in orjson.loads(await request.read()).get("data", [])]
        return web.json_response({"success": True, "reportedIds": ids})

    path = "/app/{key}/track" if protocol == "nucleus-http" else "/v1/batch"
    async with serving(path, collector) as url:
        agent = await make_agent(upstreams=[{"name": "up", "protocol": protocol, "url": url,
                                             "flush_interval_s": 0.02, "timeout_s": 2}])
        state = agent.forwarding.states["up"]
        for n in (1, 2):
            await send(agent, [event(n)])
            await wait_for(lambda: state.acked == n or state.retries > 0)
        assert (state.acked, state.retries, state.last_error) == (2, 0, None), state
        assert len(connections) == 3 and connections[0] == connections[1] != connections[2]


async def _answer_error(make_agent: Any, protocol: str, answer: bytes) -> str:
    """last_error once the agent's first send to ``protocol``'s upstream failed, the
    upstream a raw server that reads a request whole, writes ``answer`` and closes; the
    event is kept."""
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        await reader.readexactly(int(length[1]) if length else 0)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    scheme = "ws" if protocol == "nucleus-ws" else "http"
    try:
        agent = await make_agent(upstreams=[{
            "name": "up", "protocol": protocol, "url": f"{scheme}://127.0.0.1:{port}",
            "flush_interval_s": 0.02, "timeout_s": 2}])
        state = agent.forwarding.states["up"]
        await send(agent, [event(0)])
        await wait_for(lambda: state.retries >= 1)
        assert agent.spool.depth == 1 and state.acked == 0
        return state.last_error or ""
    finally:
        server.close()


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws", "segment-http"])
async def test_an_answer_cut_mid_head_is_named_plainly(make_agent: Any, fast_backoff: Seams,
                                                      protocol: str) -> None:
    """The upstream (or a proxy) closes the connection partway through its answer's head:
    the batch is kept and retried, and last_error says what happened. It said `request
    failed: <RawResponseMessage(version=HttpVersion(major=1, minor=1), code=200, ...,
    raw_headers=((b'Content-Type', b'application/js'),) ...)>`, aiohttp's parser state."""
    error = await _answer_error(make_agent, protocol,
                                b"HTTP/1.1 200 OK\r\nContent-Type: application/js")
    assert "closed the connection" in error and "Raw" not in error, error


@pytest.mark.parametrize("protocol", ["nucleus-http", "nucleus-ws", "segment-http"])
@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.6\r\n",   # the url's port is wrong
                                    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"])
async def test_an_answer_that_is_not_http_is_not_called_a_400(
        make_agent: Any, fast_backoff: Seams, protocol: str, answer: bytes) -> None:
    """An answer aiohttp cannot parse as HTTP (another service on the url's port, a broken
    server): kept and retried, and last_error says what it was. It said `request failed:
    400, message="Bad status line: ..."`: aiohttp's own 400, taken by the operator for the
    upstream's refusal of the batch."""
    error = await _answer_error(make_agent, protocol, answer)
    assert "not HTTP" in error and "400" not in error and "Bad status line" in error, error
