"""The express lane (agent/server/express.py) against aiohttp's routes, differentially: the
same raw request bytes are sent to two agents of the same config, to one on a fresh
connection (the lane answers what it takes, and hands the rest over) and to the other on a
connection a `GET /healthz` has already handed to aiohttp for good. Each must get the same
replies, byte for byte but the Date, count the same refusals, store the same events, and
leave the connection open, or close it, alike (a `GET /healthz` sent after them tells).

Cases cover what either side treats specially: Host and Origin (and Fetch Metadata), the
write key's forms (Basic auth, the body's, the query's), Content-Encoding, chunked bodies,
`Expect`, keep-alive and pipelining, other methods, repeated and huge fields, odd
Content-Types, empty bodies and a BOM, bodies over the limits, non-ASCII and
percent-encoded paths. The hypothesis test mixes them, pipelined, sent to the lane in
pieces cut anywhere, and with the client's side shut down after them or not; a client
that waits for `100 Continue` before its body gets it either way.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import re
import socket
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.families import segment as spec
from tests.fakes.threaded_agent import ThreadedAgent

KEY, OTHER = "diffKey1", "diffKey2"
ALLOWED = "http://app.example"
CONFIG: dict[str, Any] = {"listen": {"accept_keys": [KEY, OTHER], "allowed_origins": [ALLOWED]}}
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


class Pair:
    """Two agents of one config: ``lane``'s requests start in the express lane, ``other``'s
    on a connection aiohttp already has. Each keeps the seq it has read its spool up to."""

    def __init__(self, lane: ThreadedAgent, other: ThreadedAgent) -> None:
        self.lane, self.other = lane, other
        self._read: dict[int, dict[str, int]] = {id(lane): {}, id(other): {}}

    def stored(self, agent: ThreadedAgent) -> list[tuple[str, Any]]:
        """The events ``agent`` stored since the last call: (key, body), the time it
        received each left out."""
        assert agent.agent is not None and agent.agent.spool is not None
        spool, seen = agent.agent.spool, self._read[id(agent)]
        out = []
        for key, stream in sorted(spool.streams.items()):
            rows = agent.call(spool.fetch(stream.id, seen.get(key, 0), 100_000))
            for row in rows:
                seen[key] = max(seen.get(key, 0), row.seq)
                body = orjson.loads(bytes(row.body))
                received = body.pop("receivedAt", None)
                if body.get("timestamp") == received:   # completed at ingest
                    del body["timestamp"]
                if UUID.fullmatch(str(body.get("messageId"))):   # made at ingest too
                    body["messageId"] = "made"
                out.append((key, body))
        return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with ThreadedAgent(tmp_path_factory.mktemp("lane"), **CONFIG) as lane, \
            ThreadedAgent(tmp_path_factory.mktemp("aiohttp"), **CONFIG) as other:
        yield Pair(lane, other)


class Replies:
    """Reads whole replies off a blocking socket: by Content-Length, interim (1xx) ones
    skipped; the connection's close ends the reading."""

    def __init__(self, sock: socket.socket, head: bool = False) -> None:
        self.sock, self.buf, self.closed = sock, b"", False
        self.head = head   # replies to HEAD requests: no body, whatever their fields say

    def _more(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buf += data
        self.closed = not data
        return bool(data)

    def next(self) -> bytes | None:
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                if self.closed or not self._more():
                    return None
            head = self.buf[:end + 4]
            if re.match(rb"HTTP/1\.[01] 1\d\d ", head):
                self.buf = self.buf[end + 4:]
                continue
            found = re.search(rb"\r\nContent-Length: *(\d+)", head, re.IGNORECASE)
            if self.head or re.match(rb"HTTP/1\.[01] 204 ", head):
                reply, self.buf = head, self.buf[end + 4:]
                return reply
            if found is None:   # read to the close
                while self._more():
                    pass
                reply, self.buf = self.buf, b""
                return reply
            total = end + 4 + int(found[1])
            while len(self.buf) < total:
                if self.closed or not self._more():
                    return self.buf or None
            reply, self.buf = self.buf[:total], self.buf[total:]
            return reply


def exchange(port: int, data: bytes, count: int, *, handed: bool,
             cuts: tuple[int, ...] = (), shut: bool = False) -> list[bytes | None]:
    """``data`` (``count`` requests) sent on a fresh connection, once aiohttp has it
    (``handed``: after a `GET /healthz` answered) or not; their replies, the Date left out,
    then the status line of a `GET /healthz` sent after them (None: the connection closed).
    ``cuts``: where ``data`` is cut into writes of their own (packets, unless they meet);
    ``shut``: the client's side shut down after them (SHUT_WR), as it waits for the replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = Replies(sock)
        if handed:
            sock.sendall(HEALTHZ)
            first = replies.next()
            assert first is not None and first.startswith(b"HTTP/1.1 200 "), first
        for start, end in zip((0, *cuts), (*cuts, len(data)), strict=True):
            try:
                sock.sendall(data[start:end])
            except OSError:   # refused at what came before, and closed: its reply is read
                break
        if shut:
            with contextlib.suppress(OSError):   # reset already (a 400, then a close)
                sock.shutdown(socket.SHUT_WR)
        replies.head = data.startswith(b"HEAD ")
        out: list[bytes | None] = []
        while len(out) < count and (reply := replies.next()) is not None:
            out.append(DATE.sub(b"\r\nDate: -\r\n", reply))
        # Then whether the connection is still open for another request: an agent that
        # closes it does so as its last reply goes out.
        replies.head = False
        try:
            sock.sendall(HEALTHZ)
        except OSError:
            out.append(None)
        else:
            reply = replies.next()
            out.append(None if reply is None else reply.split(b"\r\n", 1)[0])
        return out


def metrics_of(agent: ThreadedAgent) -> dict[Any, int]:
    assert agent.agent is not None
    return dict(agent.agent.metrics.refused)


def more(before: dict[Any, int], after: dict[Any, int]) -> dict[Any, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def express_count(agent: ThreadedAgent) -> int:
    assert agent.agent is not None
    return int(agent.agent.metrics.express_requests)


def differ(pair: Pair, data: bytes, count: int = 1, cuts: tuple[int, ...] = (),
           shut: bool = False) -> tuple[list[bytes | None], int]:
    """Send ``data`` both ways (to the lane cut at ``cuts``, ``shut`` as exchange's) and
    assert the same replies, refusal counts and events; the replies, and how many the lane
    answered."""
    before = express_count(pair.lane)
    counted = metrics_of(pair.lane), metrics_of(pair.other)
    fast = exchange(pair.lane.port, data, count, handed=False, cuts=cuts, shut=shut)
    slow = exchange(pair.other.port, data, count, handed=True, shut=shut)
    # Each read before any is compared: a difference fails this request alone.
    refused = more(counted[0], metrics_of(pair.lane)), more(counted[1], metrics_of(pair.other))
    stored = pair.stored(pair.lane), pair.stored(pair.other)
    assert fast == slow, (data[:600], fast, slow)
    assert refused[0] == refused[1], data[:600]
    assert stored[0] == stored[1], data[:600]
    return fast, express_count(pair.lane) - before


# -- requests -------------------------------------------------------------------------------

_ids = iter(range(1, 1 << 30))


def message(**extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "e", "userId": "u", "messageId": f"m{next(_ids)}",
            "timestamp": "2026-01-01T00:00:00.000Z", **extra}


def request(path: str = "/v1/track", body: bytes | None = None, *, method: str = "POST",
            version: str = "HTTP/1.1", fields: list[tuple[str, bytes | str]] | None = None,
            length: bool = True, auth: str | None = None) -> bytes:
    """A raw request: ``fields`` as given (the default: a loopback Host, JSON, Basic auth of
    KEY), then a Content-Length of ``body`` unless ``length`` is False."""
    if body is None:
        body = orjson.dumps(message())
    if fields is None:
        fields = [("Host", "127.0.0.1"), ("Content-Type", "application/json"),
                  ("Authorization", auth or basic(KEY))]
    head = [f"{method} {path} {version}".encode()]
    head += [n.encode() + b": " + (v.encode() if isinstance(v, str) else v) for n, v in fields]
    if length:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunks(body: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def std(*more: tuple[str, bytes | str], host: str = "127.0.0.1",
        auth: str | None = None) -> list[tuple[str, bytes | str]]:
    fields: list[tuple[str, bytes | str]] = [("Host", host), ("Content-Type", "application/json")]
    if auth != "":
        fields.append(("Authorization", auth or basic(KEY)))
    return fields + list(more)


def batch(*messages: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"batch": list(messages), **extra})


def one() -> bytes:
    return orjson.dumps(message())


CASES: dict[str, Any] = {   # name -> a function giving (bytes, request count)
    "plain": lambda: (request(), 1),
    "short form": lambda: (request("/v1/t"), 1),
    "identify": lambda: (request("/v1/identify", orjson.dumps(message(type="identify"))), 1),
    "batch": lambda: (request("/v1/batch", batch(message(), message())), 1),
    "import, a message refused": lambda: (request("/v1/import", batch(message(), {"x": 1})), 1),
    # Host and Origin
    "localhost host with port": lambda: (request(fields=std(host="localhost:8765")), 1),
    "ipv6 host": lambda: (request(fields=std(host="[::1]:1")), 1),
    "foreign host": lambda: (request(fields=std(host="evil.example")), 1),
    "host padded": lambda: (request(fields=std(host=" \tlocalhost\t ")), 1),
    "host empty": lambda: (request(fields=std(host="")), 1),
    "host twice": lambda: (request(fields=[*std(), ("Host", "localhost")]), 1),
    "no host, 1.0": lambda: (request(fields=std()[1:], version="HTTP/1.0"), 1),
    "allowed origin": lambda: (request(fields=std(("Origin", ALLOWED))), 1),
    "foreign origin": lambda: (request(fields=std(("Origin", "http://evil.example"))), 1),
    "null origin": lambda: (request(fields=std(("Origin", "null"))), 1),
    "cross-site": lambda: (request(fields=std(("Sec-Fetch-Site", "cross-site"))), 1),
    "same-origin": lambda: (request(fields=std(("Sec-Fetch-Site", "same-origin"))), 1),
    # write keys
    "basic with colon": lambda: (request(fields=std(auth=basic(OTHER))), 1),
    "basic, other key": lambda: (request(fields=std(auth=basic("nope"))), 1),
    "basic lower case": lambda: (request(fields=std(auth="basic " + basic(KEY)[6:])), 1),
    "basic without colon": lambda: (request(fields=std(
        auth="Basic " + base64.b64encode(KEY.encode()).decode())), 1),
    "bearer": lambda: (request(fields=std(auth="Bearer x")), 1),
    "basic not base64": lambda: (request(fields=std(auth="Basic !!!")), 1),
    "basic of latin-1": lambda: (request(fields=std(auth="Basic " + base64.b64encode(
        b"k\xe9:").decode())), 1),
    "authorization empty": lambda: (request(fields=std(("Authorization", ""), auth="")), 1),
    "authorization twice": lambda: (request(fields=std(("Authorization", basic(OTHER)))), 1),
    "body key": lambda: (request(body=orjson.dumps(message(writeKey=KEY)),
                                 fields=std(auth="")), 1),
    "body key refused": lambda: (request(body=orjson.dumps(message(writeKey="nope")),
                                         fields=std(auth="")), 1),
    "body key not a string": lambda: (request(body=orjson.dumps(message(writeKey=3)),
                                              fields=std(auth="")), 1),
    "no key": lambda: (request(fields=std(auth="")), 1),
    "batch key": lambda: (request("/v1/batch", batch(message(), writeKey=OTHER),
                                  fields=std(auth="")), 1),
    "query key": lambda: (request(f"/v1/batch?writeKey={KEY}", batch(message()),
                                  fields=std(auth="")), 1),
    # Content-Encoding
    "gzip": lambda: (request(body=gzip.compress(one()),
                             fields=std(("Content-Encoding", "gzip"))), 1),
    "deflate": lambda: (request(body=zlib.compress(one()),
                                fields=std(("Content-Encoding", "deflate"))), 1),
    "br": lambda: (request(fields=std(("Content-Encoding", "br"))), 1),
    "zstd": lambda: (request(fields=std(("Content-Encoding", "zstd"))), 1),
    "unknown coding": lambda: (request(fields=std(("Content-Encoding", "x-made-up"))), 1),
    "identity": lambda: (request(fields=std(("Content-Encoding", "identity"))), 1),
    "gzip, not gzip": lambda: (request(fields=std(("Content-Encoding", "gzip"))), 1),
    # framing
    "chunked": lambda: (request(body=chunks(one()), length=False,
                                fields=std(("Transfer-Encoding", "chunked"))), 1),
    "gzip, chunked": lambda: (request(body=chunks(one()), length=False,
                                      fields=std(("Transfer-Encoding", "gzip, chunked"))), 1),
    "expect continue": lambda: (request(fields=std(("Expect", "100-continue"))), 1),
    "expect other": lambda: (request(fields=std(("Expect", "something"))), 1),
    "keep-alive": lambda: (request(fields=std(("Connection", "keep-alive"))), 1),
    "close": lambda: (request(fields=std(("Connection", "close"))), 1),
    "upgrade": lambda: (request(fields=std(("Connection", "Upgrade"), ("Upgrade", "h2c"))), 1),
    "pipelined": lambda: (request() + request("/v1/batch", batch(message())) + request(), 3),
    "pipelined, one refused": lambda: (request() + request(body=b"{") + request(), 3),
    "pipelined, one aiohttp's": lambda: (request() + HEALTHZ + request(), 3),
    "pipelined after a body refused unread": lambda: (request(body=orjson.dumps(
        message(pad="x" * spec.MAX_EVENT_BYTES))) + request(), 2),
    "pipelined after a chunked body": lambda: (request(body=chunks(one()), length=False, fields=std(
        ("Transfer-Encoding", "chunked"))) + request(), 2),
    "a line end after the body": lambda: (request() + b"\r\n" + request(), 2),
    "lower case method": lambda: (request(method="post"), 1),
    "http/1.0": lambda: (request(version="HTTP/1.0"), 1),
    "http/1.0 keep-alive": lambda: (request(version="HTTP/1.0", fields=std(
        ("Connection", "keep-alive"))), 1),
    # methods
    "head": lambda: (request(method="HEAD", body=b"", length=False), 1),
    "options": lambda: (request(method="OPTIONS", body=b"", length=False), 1),
    "preflight": lambda: (request(method="OPTIONS", body=b"", length=False, fields=std(
        ("Origin", ALLOWED), ("Access-Control-Request-Method", "POST"))), 1),
    "get": lambda: (request(method="GET", body=b"", length=False), 1),
    # repeated and huge fields
    "content-type twice": lambda: (request(fields=std(("Content-Type", "text/plain"))), 1),
    "user-agent twice": lambda: (request(fields=std(("User-Agent", "a"), ("user-agent", "b"))),
                                 1),
    "max-forwards twice": lambda: (request(fields=std(("Max-Forwards", "1"),
                                                      ("Max-Forwards", "2"))), 1),
    "other field twice": lambda: (request(fields=std(("X-A", "1"), ("X-A", "2"))), 1),
    "old websocket key": lambda: (request(fields=std(("Sec-WebSocket-Key1", "x"))), 1),
    "content-length twice": lambda: (request(fields=std(("Content-Length", "2"))), 1),
    "large field": lambda: (request(fields=std(("X-Pad", "p" * 8000))), 1),
    "past the lane's head": lambda: (request(fields=std(("X-Pad", "p" * 8190))), 1),
    "huge head": lambda: (request(fields=std(*((f"X-{i}", "p" * 8000) for i in range(11)))),
                          1),
    "many fields": lambda: (request(fields=std(*((f"X-{i}", "v") for i in range(125)))), 1),
    "non-ascii value": lambda: (request(fields=std(("X-A", b"\xe9\xff"))), 1),
    # Content-Type and bodies
    "json with charset": lambda: (request(fields=[
        ("Host", "127.0.0.1"), ("Content-Type", "application/json; charset=utf-8"),
        ("Authorization", basic(KEY))]), 1),
    "text/plain": lambda: (request(fields=[
        ("Host", "127.0.0.1"), ("Content-Type", "text/plain;charset=UTF-8"),
        ("Authorization", basic(KEY))]), 1),
    "latin-1 charset": lambda: (request(body=orjson.dumps(message(event="é")), fields=[
        ("Host", "127.0.0.1"), ("Content-Type", "application/json; charset=latin-1"),
        ("Authorization", basic(KEY))]), 1),
    "form": lambda: (request(fields=[
        ("Host", "127.0.0.1"), ("Content-Type", "application/x-www-form-urlencoded"),
        ("Authorization", basic(KEY))]), 1),
    "no content-type": lambda: (request(fields=[
        ("Host", "127.0.0.1"), ("Authorization", basic(KEY))]), 1),
    "empty body": lambda: (request(body=b""), 1),
    "empty batch body": lambda: (request("/v1/batch", body=b""), 1),
    "no content-length": lambda: (request(length=False, body=b""), 1),
    "bom": lambda: (request(body=b"\xef\xbb\xbf" + one()), 1),
    "batch with bom": lambda: (request("/v1/batch", b"\xef\xbb\xbf" + batch(message())), 1),
    "latin-1 body": lambda: (request(body=orjson.dumps(message(event="e")).replace(
        b'"e"', b'"\xe9"')), 1),
    "over the message limit": lambda: (request(body=orjson.dumps(
        message(pad="x" * spec.MAX_EVENT_BYTES))), 1),
    "at the lane's body limit": lambda: (request("/v1/batch", batch(
        *(message(pad="x" * 1000) for _ in range(60)))), 1),
    "past the lane's body limit": lambda: (request("/v1/batch", batch(
        *(message(pad="x" * 1000) for _ in range(70)))), 1),
    # paths
    "trailing slash": lambda: (request("/v1/track/"), 1),
    "double slash": lambda: (request("//v1/track"), 1),
    "percent-encoded": lambda: (request("/v1/%74rack"), 1),
    "non-ascii path": lambda: (request("/v1/tr\u00e4ck"), 1),
    "non-ascii path, encoded": lambda: (request("/v1/tr%C3%A4ck"), 1),
    "upper case": lambda: (request("/V1/TRACK"), 1),
    "dot segment": lambda: (request("/v1/./track"), 1),
    "empty query": lambda: (request("/v1/track?"), 1),
    "fragment": lambda: (request("/v1/track#x"), 1),
    "beacon": lambda: (request(f"/beacon/v1/batch?writeKey={KEY}", batch(message()),
                               fields=std(auth="")), 1),
    "b": lambda: (request("/v1/b", batch(message(), writeKey=KEY), fields=std(auth="")), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_lane_and_aiohttp_answer_and_store_alike(pair: Pair, case: str) -> None:
    data, count = CASES[case]()
    replies, _ = differ(pair, data, count)
    assert replies[0] is not None, "no reply either way"


def test_the_cases_reach_the_lane_where_they_should(pair: Pair) -> None:
    """The comparison is worth something only where the lane answers: a plain request is
    its, one with a query is not."""
    _, taken = differ(pair, request())
    assert taken == 1
    _, taken = differ(pair, request("/v1/track?via=aiohttp"))
    assert taken == 0


# -- mixed, by hypothesis ---------------------------------------------------------------------

PATHS = ["/v1/track", "/v1/t", "/v1/page", "/v1/batch", "/v1/import"] * 4 + ["/v1/b",
         "/v1/track?writeKey=" + KEY, "/v1/track/", "/v1/tr%61ck", "/v1/träck"]
# Weighted toward what the lane takes, so that most examples compare its answers.
HOSTS: list[bytes | None] = [b"127.0.0.1"] * 8 + [b"localhost:8765", b"[::1]", b"evil.example",
                                                  b"localhost\xc2\xa0", None]
AUTHS: list[str | None] = [basic(KEY)] * 10 + [basic(OTHER), basic("nope"), "Bearer x",
                                              "Basic !", "basic " + basic(KEY)[6:], "", None]
# Fields the lane reads past, then fields that are aiohttp's or that it refuses (handed
# over or not), and fields already in the head again.
PLAIN: list[tuple[str, str]] = [
    ("User-Agent", "x"), ("Accept-Encoding", "gzip"), ("Connection", "keep-alive"),
    ("X-Pad", "p" * 3000), ("X-Odd", "\xe9"), ("Content-Location", "/x"), ("ETag", "x"),
    ("Server", "x"), ("Content-Range", "x"), ("Max-Forwards", "1"), ("Accept", "*/*")]
ODD: list[tuple[str, str]] = [
    ("Origin", ALLOWED), ("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site"),
    ("Sec-Fetch-Site", "same-site"), ("Connection", "close"), ("Expect", "100-continue"),
    ("Content-Encoding", "identity"), ("Content-Encoding", "br"), ("Sec-WebSocket-Key1", "x"),
    ("Content-Type", "text/plain"), ("Authorization", basic(KEY)), ("Host", "localhost")]
EXTRA = st.sampled_from(PLAIN * 5 + ODD)


@st.composite
def bodies(draw: st.DrawFn, path: str) -> bytes:
    key = draw(st.sampled_from([None, KEY, "nope"]))
    extra = {"writeKey": key} if key else {}
    kind = draw(st.sampled_from(["ok", "ok", "invalid", "not json", "empty", "bom"]))
    if "batch" in path or "import" in path or path.startswith("/v1/b"):
        items = [message() if kind != "invalid" else {"type": "track"}
                 for _ in range(draw(st.integers(0, 3)))]
        raw = batch(*items, **extra)
    else:
        raw = orjson.dumps(message(**extra) if kind != "invalid" else {"userId": "u"})
    if kind == "not json":
        raw = raw[:-1]
    elif kind == "empty":
        raw = b""
    elif kind == "bom":
        raw = b"\xef\xbb\xbf" + raw
    return raw


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(PATHS))
    body = draw(bodies(path))
    fields: list[tuple[str, bytes | str]] = []
    host = draw(st.sampled_from(HOSTS))
    if host is not None:
        fields.append(("Host", host))
    auth = draw(st.sampled_from(AUTHS))
    if auth is not None:
        fields.append(("Authorization", auth))
    fields.append(("Content-Type", "application/json"))
    fields += draw(st.lists(EXTRA, max_size=3))
    fields = draw(st.permutations(fields))
    coding = draw(st.sampled_from([None] * 14 + ["gzip", "deflate"]))
    if coding is not None:
        body = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
        fields.append(("Content-Encoding", coding))
    if draw(st.sampled_from([False] * 7 + [True])):   # chunked
        return request(path, chunks(body), fields=[*fields, ("Transfer-Encoding", "chunked")],
                       length=False)
    return request(path, body, fields=fields)


@settings(deadline=None, max_examples=150, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(sent=st.lists(requests(), min_size=1, max_size=3),
       cuts=st.sampled_from([0, 0, 1, 2, 3]).flatmap(lambda n: st.lists(
           st.floats(0, 1, exclude_min=True, exclude_max=True), min_size=n, max_size=n)),
       shut=st.booleans())
def test_mixed_requests_are_answered_and_stored_alike(pair: Pair, sent: list[bytes],
                                                      cuts: list[float], shut: bool) -> None:
    """Sent whole, or to the lane in pieces cut anywhere (a head, a body, between two);
    the client's side shut down after them, or not."""
    data = b"".join(sent)
    at = tuple(sorted({int(len(data) * cut) for cut in cuts} - {0}))
    _, taken = differ(pair, data, len(sent), at, shut)
    event(f"the lane answered {taken} of {len(sent)}")


def continued(port: int, data: bytes, *, handed: bool) -> list[bytes | None]:
    """``data``'s head sent alone, its body only once `100 Continue` has come (a client
    that waits for it, as curl does for a large body); the replies, the 100 first."""
    head, _, body = data.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        if handed:
            sock.sendall(HEALTHZ)
            assert Replies(sock).next() is not None
        sock.sendall(head + b"\r\n\r\n")
        line = b""
        while not line.endswith(b"\r\n\r\n"):
            line += sock.recv(1)   # byte by byte: nothing past the 100 is read here
        sock.sendall(body)
        reply = Replies(sock).next()
        return [line, None if reply is None else DATE.sub(b"\r\nDate: -\r\n", reply)]


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
def test_a_client_waiting_for_100_continue_gets_it_either_way(pair: Pair, path: str) -> None:
    body = orjson.dumps(message()) if path == "/v1/track" else batch(message())
    data = request(path, body, fields=std(("Expect", "100-continue")))
    fast = continued(pair.lane.port, data, handed=False)
    slow = continued(pair.other.port, data, handed=True)
    assert fast == slow
    assert fast[0] == b"HTTP/1.1 100 Continue\r\n\r\n" and fast[1] is not None
    assert fast[1].startswith(b"HTTP/1.1 200 "), fast
    assert pair.stored(pair.lane) == pair.stored(pair.other) != []
