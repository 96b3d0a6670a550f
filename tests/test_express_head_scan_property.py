"""The express lane's head read goes on from where the last packet's read stopped
(express.HeadScan, one per connection): at every packet its verdict is the one a read
from the request's start gives (MORE, aiohttp's, or the same request and end), whatever
the bytes and wherever the packets are cut, as the connection feeds it (connections.py
``_Conn._next``: requests answered in turn, answered bytes dropped from the buffer)."""

from __future__ import annotations

from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dialects.replies import json_reply
from agent.metrics import Metrics
from agent.server.admission import Admission
from agent.server.connections import BUF_MAX
from agent.server.express import HEAD_MAX, MORE, ExpressLane, HeadScan, Routes
from agent.server.guard import Guard


async def _ok(raw: bytes, given: list[str]) -> web.Response:
    return json_reply({"Success": True}, 200)


def _lane() -> ExpressLane:
    metrics = Metrics()
    return ExpressLane([Routes({"/v1/track": _ok}, lambda status: None)],
                       Guard("127.0.0.1", ()), Admission(1 << 30, metrics), metrics)


# Pieces of heads: the request line whole and cut, the fields the lane reads (good and
# refused values) and others, line ends whole, bare and doubled, bytes outside the token
# and value sets.
_PIECES = [
    b"POST /v1/track HTTP/1.1\r\n", b"POST /v1/track", b" HTTP/1.1", b"\r\n", b"\r\n\r\n",
    b"POST /", b"POST /v1/track?x=1 HTTP/1.1\r\n", b"GET /v1/track HTTP/1.1\r\n",
    b"POST /v1/other HTTP/1.1\r\n", b"POST /v1/track HTTP/1.0\r\n",
    b"Host: 127.0.0.1\r\n", b"host:localhost\r\n", b"Host: example.com\r\n",
    b"Content-Length: 2\r\n", b"content-length: 0\r\n", b"Content-Length: 1234567\r\n",
    b"Content-Length: x\r\n", b"Connection: keep-alive\r\n", b"Connection: close\r\n",
    b"Authorization: Basic a2V5Og==\r\n", b"Authorization: Bearer x\r\n",
    b"Content-Type: application/json\r\n", b"X-A: \x80\xff\t v\r\n", b"Origin: x\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Expect: 100-continue\r\n",
    b"Host", b":", b" ", b"\r", b"\n", b"\r\r\n", b"\n\r\n", b"\x00", b"\x7f", b"(", b"\t",
    b"{}", b"%", b"#", b"/" * 300, b"X" * 1000,
]
_PIECE = st.one_of(st.sampled_from(_PIECES), st.binary(max_size=12))


@st.composite
def _head(draw: st.DrawFn) -> bytes:
    """A request as an app sends it (often), or with pieces changed, added, cut."""
    fields = draw(st.permutations([b"Host: 127.0.0.1", b"Content-Length: 2",
                                   b"Connection: keep-alive", b"Content-Type: x"]))
    lines = [b"POST /v1/track HTTP/1.1", *fields[:draw(st.integers(2, 4))]]
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(_PIECE))
    return b"\r\n".join(lines) + b"\r\n\r\n" + draw(st.sampled_from([b"{}", b"", b"{"]))


_WHOLE = b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"
_STREAM = st.lists(st.one_of(_head(), _PIECE), max_size=12).map(b"".join)
# Packet ends, mostly within the first few hundred bytes (beyond: taken modulo the length).
_CUTS = st.lists(st.one_of(st.integers(0, 400), st.integers(0, 1 << 16)), max_size=30)


def _run(lane: ExpressLane, stream: bytes, cuts: list[int], trim_over: int) -> None:
    """Feed ``stream`` in packets cut at ``cuts``, as ``_Conn`` does: match at ``pos``
    until MORE (the next packet) or aiohttp's (the end); past a request, ``pos`` moves
    to its end, and the answered bytes are dropped once all are answered or more than
    ``trim_over`` (BUF_MAX) are. Each verdict is checked against a fresh HeadScan's."""
    buf, pos, scan = bytearray(), 0, HeadScan()
    edges = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    last = 0
    for edge in edges:
        buf += stream[last:edge]
        last = edge
        while True:
            fresh = lane.match(buf, pos, HeadScan())
            kept = lane.match(buf, pos, scan)
            assert kept == fresh, (bytes(buf), pos)
            if kept is None:
                return
            if kept == MORE:
                break
            assert not isinstance(kept, str)
            pos = kept[1]
            if pos == len(buf) or pos > trim_over:
                del buf[:pos]
                pos = 0


_SETTINGS = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(_STREAM, _CUTS,
       st.sampled_from([BUF_MAX, 0, 1, 40]))
def test_a_resumed_head_read_gives_a_fresh_reads_verdict(
        stream: bytes, cuts: list[int], trim_over: int) -> None:
    _run(_lane(), stream, cuts, trim_over)


@_SETTINGS
@given(st.lists(st.one_of(st.just(_WHOLE), _head()), min_size=1, max_size=3).map(b"".join),
       st.lists(st.integers(0, 400), max_size=4), _STREAM, _CUTS,
       st.sampled_from([BUF_MAX, 40]))
def test_a_resumed_head_read_after_earlier_requests_gives_a_fresh_reads_verdict(
        before: bytes, cuts_before: list[int], stream: bytes, cuts: list[int],
        trim_over: int) -> None:
    """Requests before it (a non-zero ``pos``, or the buffer trimmed to it), themselves
    cut (a scan left at a request's start, read again by the next one there)."""
    edges = [c % len(before) for c in cuts_before] + [len(before) + c for c in cuts]
    _run(_lane(), before + stream, edges, trim_over)


@_SETTINGS
@given(st.lists(st.sampled_from([b"X-A: v\r\n", b"Content-Type: x\r\n", b"/" * 500,
                                 b"\r\n", b"\r"]), max_size=40).map(b"".join),
       st.lists(st.integers(0, HEAD_MAX + 200), max_size=30))
def test_a_resumed_head_read_near_the_head_limit_gives_a_fresh_reads_verdict(
        middle: bytes, cuts: list[int]) -> None:
    """Heads around HEAD_MAX bytes, the blank line before, at or past it."""
    stream = (b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n" + middle
              + b"\r\n{}")
    _run(_lane(), stream, cuts, BUF_MAX)


def test_a_byte_a_packet_head_each_verdict_is_a_fresh_reads() -> None:
    """Every cut of a few heads, a byte a packet, each followed by a shorter request at
    the same place (the buffer emptied): the scan's every stop is checked, and a scan
    left by the first is not read on by the second."""
    lane, short = _lane(), b"POST /v1/track HTTP/1.1\r\nHost:localhost\r\nContent-Length:0\r\n\r\n"
    # The first is answered (no body: one coming in a later packet is aiohttp's).
    for head in [b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nX-P: p\r\n\r\n",
                 b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\r\nContent-Length: 2\r\n\r\n{}",
                 b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\n\rX\r\n\r\n{}",
                 b"POST /v1/track HTTP/1.1\r\nX\r\n\r\n"]:
        _run(lane, head + short, list(range(len(head) + len(short))), BUF_MAX)
