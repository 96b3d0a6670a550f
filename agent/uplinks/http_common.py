"""What HTTP uplinks share: the client session, status classification, Retry-After parsing.

Only the configured URL may acknowledge events. A redirect is never followed:
a captive portal (hotel Wi-Fi, a kiosk behind a login page) answers with one,
and aiohttp would otherwise turn the POST into a GET whose 200 looks like an
ack (301/302/303), or send the whole batch to the portal (307/308). Likewise an
HTML page, whatever the status, is a portal's login page or a proxy's or web
server's error page, never an upstream's reply.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import re
import time
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from yarl import URL

from agent.logs import redacted_head
from agent.terminal import os_text
from agent.uplinks.base import (
    REJECTED_STATUSES,
    RETRYABLE_STATUSES,
    Retry,
    not_tls,
    proxy_refused,
)
from agent.uplinks.inflate import INFLATED, Inflater
from agent.uplinks.lookup import DaemonResolver
from agent.uplinks.proxy import Proxy


def retry_after(value: str | None, now: float | None = None,
                date: str | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date. A date is
    measured from the reply's own ``date`` (its Date header: the upstream's clock, which the
    date was written by) when it has one, else from ``now``: the device's clock may be
    wrong by days (clock.py), and a day behind read a minute's wait as a day."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():   # isdigit alone takes '²', float() not
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    sent = _http_date(date) if date else None
    if sent is None:
        sent = time.time() if now is None else now
    return max(0.0, when - sent)


def _http_date(value: str) -> float | None:
    """An HTTP-date's epoch seconds. Its asctime form names no zone, and parsedate gives it
    none: it is GMT, as every HTTP-date (RFC 9110 5.6.7), not the device's local time."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):   # a zone of +99999999999999999999
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def excerpt(raw: bytes, most: int) -> str:
    """The start of a reply, at most ``most`` characters, for a dead letter's reason: redacted
    before it is cut (an upstream may echo the request's key, and half a key is not
    recognised)."""
    return redacted_head(raw.decode("utf-8", "replace"), most)


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


class UpstreamRedirect(aiohttp.ClientError):
    """A 3xx from an upstream: a failure, retried with backoff (or after its Retry-After,
    as for any status), never followed."""

    def __init__(self, status: int, where: str, wait: float | None = None) -> None:
        super().__init__(f"HTTP {status} redirect to {where} (redirects are not followed)")
        self.retry_after = wait


def connect_wait(exc: BaseException) -> float | None:
    """The Retry-After of a connect that failed with ``exc``: a redirect's, or a proxy's
    refusal of the CONNECT of an https:// or wss:// url's tunnel (a 429 or 503 shedding
    load), honoured as its refusal of a plain request through it is."""
    if isinstance(exc, UpstreamRedirect):
        return exc.retry_after
    if isinstance(exc, aiohttp.ClientHttpProxyError) and exc.headers:
        return retry_after(exc.headers.get("Retry-After"), date=exc.headers.get("Date"))
    return None


def location_host(base: URL, location: str | None) -> str:
    """Where a redirect points: host and port only, since the user, path and query
    of a Location may carry credentials or session tokens."""
    if not location:
        return "nowhere (no Location header)"
    try:
        where = base.join(URL(location)).host_port_subcomponent
    except Exception:  # noqa: BLE001 - the upstream's text: yarl raises IndexError for `aws://@`
        where = None
    return where or "an invalid Location"


async def refuse_redirects(req: aiohttp.ClientRequest,
                           handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """Client middleware: turn every 3xx into UpstreamRedirect before aiohttp can follow it.

    It works on the session, so it also covers websocket handshakes, which
    aiohttp's ws_connect would follow with no way to opt out per call.
    """
    resp = await handler(req)
    if 300 <= resp.status < 400:
        status, location = resp.status, resp.headers.get("Location")
        wait = retry_after(resp.headers.get("Retry-After"), date=resp.headers.get("Date"))
        resp.close()
        raise UpstreamRedirect(status, location_host(req.url, location), wait)
    return resp


class HandshakeRefused(aiohttp.WSServerHandshakeError):
    """A websocket handshake answered with a status other than 101 (and no redirect), with
    the start of the reply's ``body``, which aiohttp's own error leaves out: a 403's
    "unknown app" says more than its status."""

    def __init__(self, resp: aiohttp.ClientResponse, body: bytes) -> None:
        super().__init__(resp.request_info, resp.history, status=resp.status,
                         message="Invalid response status", headers=resp.headers)
        self.body = body


# What is read of a refused handshake's reply: what its last_error shows is shorter. Its
# body comes with its head; one that does not is not waited for past _REFUSAL_S.
_REFUSAL_BYTES = 4096
_REFUSAL_S = 1.0


async def read_refused_handshakes(req: aiohttp.ClientRequest,
                                  handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """Client middleware: a websocket handshake the upstream refuses raises HandshakeRefused,
    with the start of the reply's body, before ws_connect closes the reply unread."""
    resp = await handler(req)
    if resp.status == 101 or 300 <= resp.status < 400 \
            or req.headers.get("Upgrade", "").lower() != "websocket":
        return resp
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(_REFUSAL_S):
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                if size >= _REFUSAL_BYTES:
                    break
    except (aiohttp.ClientError, TimeoutError):
        pass   # what came is shown: the status is the answer
    finally:
        resp.close()
    raise HandshakeRefused(resp, b"".join(chunks)[:_REFUSAL_BYTES])


def client_session() -> aiohttp.ClientSession:
    """The session uplinks share; it never follows a redirect.

    Without aiohttp's default cap of 100 connections, which counts websockets too: with a
    hundred keys' websockets open, the next key's handshake and every other upstream's
    requests waited for one until their timeout, and failed. The forwarder bounds its
    connections itself, per upstream: a websocket per loop (supervisor.MAX_LOOPS), a
    request per batch in flight (slots.BATCHES_IN_FLIGHT).

    Without aiohttp's default timeouts either (300 s for a request in all, 30 s for its
    connect): each use is bounded by the upstream's ``timeout_s`` (a POST by its own
    ClientTimeout, a websocket's handshake by nucleus_ws), and a websocket's handshake
    takes no ClientTimeout of its own: with timeout_s past 30 or 300 s, aiohttp's came
    first, as a bare "connect failed: TimeoutError".

    Host names are looked up on threads that the agent's exit does not wait for
    (``lookup.py``)."""
    connector = aiohttp.TCPConnector(limit=0, resolver=DaemonResolver())
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(),
                                 auto_decompress=True,
                                 middlewares=(refuse_redirects, read_refused_handshakes),
                                 trace_configs=[_CONNECTED])


class _Progress:
    """How far a request got, for the message of its timeout: None until traced (a session
    without ``_CONNECTED`` never says), then whether it had its connection; whether that
    connection was kept alive from an earlier request, and whether the status came."""

    connected: bool | None = None
    reused = False
    answered = False


async def _started(session: aiohttp.ClientSession, ctx: SimpleNamespace,
                   params: object) -> None:
    if isinstance(ctx.trace_request_ctx, _Progress):
        ctx.trace_request_ctx.connected = False


async def _connected(session: aiohttp.ClientSession, ctx: SimpleNamespace,
                     params: object) -> None:
    if isinstance(ctx.trace_request_ctx, _Progress):
        ctx.trace_request_ctx.connected = True


async def _reused(session: aiohttp.ClientSession, ctx: SimpleNamespace,
                  params: object) -> None:
    if isinstance(ctx.trace_request_ctx, _Progress):
        ctx.trace_request_ctx.connected = ctx.trace_request_ctx.reused = True


_CONNECTED = aiohttp.TraceConfig()
_CONNECTED.on_request_start.append(_started)
_CONNECTED.on_connection_create_end.append(_connected)
_CONNECTED.on_connection_reuseconn.append(_reused)


_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# A page served as text/plain or with no type at all (a portal's, say) is known by its start.
_HTML_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*<(?:!doctype\s+html|html)", re.IGNORECASE)
_TITLE = re.compile(rb"<title[^>]*>([^<]+)", re.IGNORECASE)
_TO_HTTPS_PORT = re.compile(rb"\s*client sent an http request to an https server",
                            re.IGNORECASE)
# A 413 in a proxy's or web server's own plain words, all its body: the status's text
# (Traefik's, Envoy's), or Go's http.MaxBytesReader error; or in none (Caddy's: no body).
# No analytics API words its refusal so, nor refuses without a word.
_SIZE_LIMIT = re.compile(rb"\s*(?:413\s+)?(?:request entity|payload|content|(?:http: )?"
                         rb"request body) too large\.?\s*", re.IGNORECASE)
_TITLE_SEARCHED = 4096   # bytes of the page searched for its title
_TITLE_SHOWN = 100


def html_instead_of_reply(status: int, content_type: str, body: bytes | None = None,
                          events: int = 1) -> str | None:
    """The error for an HTML page: no upstream protocol answers with HTML, but a captive
    portal's login page does (2xx), and so does a proxy or a web server in the way (4xx:
    nginx's answer to http:// sent to its https port, or to a body over its size limit).
    Retried, never a dead letter; except that a refusal (400, 413, 422) of a batch of
    ``events`` > 1 is None here, to be split as any refusal is: a proxy's 413 lets the
    halves through, and split down to one event, the page is retried. ``body`` None: not
    read (a refused websocket handshake's), judged by its type alone. Go's plain-text
    answer (Caddy's, a Go collector's) to http:// sent to its https port is no reply
    either, and is never split; nor is a 413 in a proxy's plain words (_SIZE_LIMIT), or
    read whole and empty, for one event, which is judged as its page is."""
    labelled = content_type in _HTML_TYPES
    if body is None:
        body = b""
    elif _TO_HTTPS_PORT.match(body):
        return (f"HTTP {status} from a port that speaks HTTPS, not HTTP (check the upstream's "
                "url: https://)")
    elif status == 413 and (_SIZE_LIMIT.fullmatch(body) or not body.strip()):
        said = repr(body.decode("ascii").strip()) if body.strip() else "with an empty body"
        return None if events > 1 else (
            f"HTTP 413 {said} for one event: a proxy's or web server's body size limit, not "
            "the upstream's reply (a proxy or web server in the way? raise its limit)")
    elif labelled and 200 <= status < 300 and b"<" not in body:
        # Words without a single tag ("OK", or none) are a collector's ack, not a login
        # page: Express labels `res.send("OK")` text/html, as it does JSON (_is_json).
        labelled = False
    page = labelled or _HTML_START.match(body) is not None
    if not page or (events > 1 and status in REJECTED_STATUSES) or _is_json(body):
        return None
    found = _TITLE.search(body, 0, _TITLE_SEARCHED)
    title = " ".join(found[1].decode("utf-8", "replace").split())[:_TITLE_SHOWN] if found else ""
    guess = ("a captive portal or proxy login?" if 200 <= status < 300
             else "a proxy or web server in the way? check the upstream's url")
    return (f"HTTP {status} with an HTML page{f' ({title!r})' if title else ''} instead of "
            f"the upstream's reply ({guess})")


def _is_json(body: bytes) -> bool:
    """A JSON reply labelled text/html (Express's `res.send(string)`) is a collector's."""
    try:
        reply_json(body)
    except orjson.JSONDecodeError:
        return False
    return True


_BOM = b"\xef\xbb\xbf"


def reply_json(data: bytes | str) -> Any:
    """An upstream's reply (a body, a websocket message) parsed as JSON, after the UTF-8 byte
    order mark it may start with (a PHP file saved with one, .NET's UTF-8 encoder): RFC 8259
    lets a parser ignore it, as browsers and Python's requests do, and read as no JSON, a
    Nucleus upstream's every answer was none. Raises orjson's JSONDecodeError."""
    if isinstance(data, str):
        return orjson.loads(data.removeprefix("\ufeff"))
    return orjson.loads(data.removeprefix(_BOM))


def media_type(header: str | None) -> str:
    """A Content-Type's type, lower case, without its parameters. Not aiohttp's
    ``content_type``: it parses them with the standard library's MIME parser, which raises
    IndexError for some (`application/json;a*`), and this header is the upstream's."""
    return (header or "").partition(";")[0].strip().lower()


NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
# What an answer to one batch may need besides its events' own bytes (the ids it echoes):
# room for a collector's own words, and a line for each event (an Outpost's 207 names each
# message it refuses, by its place and why, in under 400 bytes besides its messageId).
REPLY_BASE_BYTES = 64 * 1024
REPLY_PER_EVENT = 512


def reply_cap(batch_bytes: int, events: int) -> int:
    """The longest reply read for a batch of ``events`` events, ``batch_bytes`` long as
    encoded (before any gzip). A longer one (a proxy's download, a broken upstream) is cut:
    read up to a fixed 4 MiB, every batch in flight (64 an upstream, a websocket per key)
    could hold that much of an upstream's reply at once, whatever it answered."""
    return REPLY_BASE_BYTES + batch_bytes + REPLY_PER_EVENT * events


@dataclass
class HttpReply:
    status: int
    body: bytes      # its first ``most`` bytes (``post``)
    retry_after: float | None
    content_type: str
    cut: bool = False   # longer than ``most``: the rest was not read
    # Why the body, received whole, could not be decoded (an encoding the agent has no
    # decoder for, or one the body is not in): ``body`` is empty, the status stands.
    unreadable: str | None = None

    def said(self, most: int) -> str:
        """Its status and what it said (at most ``most`` characters of its body, redacted),
        for last_error or a dead letter's reason: a 503's "maintenance until 3am" or a
        401's "unknown app" says more than the status."""
        if self.unreadable is not None:
            return f"HTTP {self.status} (its reply could not be read: {self.unreadable})"
        return f"HTTP {self.status}: {excerpt(self.body, most)}".rstrip(": ")


def through(via: Proxy | None, url: str | URL) -> tuple[dict[str, Any], dict[str, str]]:
    """A request's or a websocket handshake's arguments for its proxy (proxy.py), and the
    headers it adds to the request. Its credentials go in the CONNECT of an https:// or
    wss:// url's tunnel, else in the request itself: aiohttp sends it to the proxy whole."""
    if via is None:
        return {}, {}
    auth = via.authorization
    if auth is None:
        return {"proxy": via.url}, {}
    if URL(url).scheme in ("https", "wss"):
        return {"proxy": via.url, "proxy_headers": {"Proxy-Authorization": auth}}, {}
    return {"proxy": via.url}, {"Proxy-Authorization": auth}


async def post(session: aiohttp.ClientSession, url: str | URL, body: bytes, headers: dict[str, str],
               timeout_s: float, most: int, via: Proxy | None = None) -> HttpReply | Retry:
    """POST ``body``: the reply, read up to ``most`` bytes (``reply_cap``), or a Retry saying
    what went wrong on the network (never raises for it); through the proxy ``via``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        progress = _Progress()
        try:
            reply = await _post(session, url, body, headers, progress, timeout_s,
                                deadline - loop.time(), most, via)
        except _CLOSED_UNDER_IT as exc:
            # A kept-alive connection the upstream closed as the request went on it (its
            # idle timeout crossing the request), before any answer: no word of the
            # upstream's. Sent again at once: the next is a connection the pool has not
            # tried yet, or a new one.
            if progress.reused and not progress.answered and deadline > loop.time():
                continue
            return _failed(exc, progress, body, timeout_s, url, via)
        except NETWORK_ERRORS as exc:
            return _failed(exc, progress, body, timeout_s, url, via)
        if via is not None and isinstance(reply, HttpReply) and reply.status == _PROXY_AUTH:
            # Only a proxy answers 407 (RFC 9110 15.5.8): a plain http:// request goes to it
            # whole, and its refusal comes as the reply. No verdict on the events.
            return Retry(f"request failed: {via.shown}: " + proxy_refused(
                _PROXY_AUTH, "Proxy Authentication Required",
                f"the request to {URL(url).host_port_subcomponent}", via.user is not None),
                reply.retry_after)
        return reply


_PROXY_AUTH = 407


# What a connection closed by the upstream before it answered raises.
_CLOSED_UNDER_IT = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    aiohttp.ClientConnectionResetError)


async def _post(session: aiohttp.ClientSession, url: str | URL, body: bytes, headers: dict[str, str],
                progress: _Progress, timeout_s: float, left: float, most: int,
                via: Proxy | None) -> HttpReply | Retry:
    """One try of ``post``, within ``left`` seconds: raises what the network raised before
    the status came."""
    # Decoded here (_read_at_most), not by aiohttp: a reply in an encoding it has no
    # decoder for (br, zstd: an upstream that ignores Accept-Encoding) failed the whole
    # request as a "400", and its status was lost.
    proxied, added = through(via, url)
    async with session.post(url, data=_Body(body) if len(body) > _APART_FROM else body,
                            headers={**headers, **_ACCEPTED, **added},
                            trace_request_ctx=progress, auto_decompress=False,
                            timeout=aiohttp.ClientTimeout(total=left), **proxied) as resp:
        progress.answered = True
        wait = retry_after(resp.headers.get("Retry-After"), date=resp.headers.get("Date"))
        kind = media_type(resp.headers.get("Content-Type"))
        try:
            raw, cut = await _read_at_most(resp, most)
        except _Undecodable as exc:   # the body came, but not readably: the status stands
            return HttpReply(resp.status, b"", wait, kind, unreadable=str(exc))
        except (aiohttp.ClientPayloadError, TimeoutError, _EndedEarly) as exc:
            # A connection lost mid-body, closed short of its Content-Length, a body that
            # stalled, or whose gzip or deflate stream ends early. A 2xx is then no answer,
            # since the rest may refuse part of the batch (another Outpost's 200 names what
            # it refused): sent again, the upstream dedupes. Any other status is its verdict
            # whole (a 413 from a server that closes at once): taken for no answer, the
            # batch went again for good.
            # (aiohttp words some as "400, message:\n  ...", with the cause's message.)
            why = (f"not received whole within {timeout_s:g}s" if isinstance(exc, TimeoutError)
                   else getattr(exc.__cause__, "message", None) or " ".join(str(exc).split()))
            if 200 <= resp.status < 300:
                return Retry(f"HTTP {resp.status} with a reply not read whole ({why})",
                             retry_after=wait)
            return HttpReply(resp.status, b"", wait, kind, unreadable=f"not read whole ({why})")
        return HttpReply(resp.status, raw, wait, kind, cut)


# A body this large goes in a write of its own (_Body): its copy costs more than a call.
_APART_FROM = 64 * 1024


class _Body(aiohttp.BytesPayload):
    """A request body written apart from the head. aiohttp joins a head and a body into one
    bytes before the write (on Python before 3.12.9, where it does not use writelines): a
    copy of the whole body (a drain's batch: a few hundred KB), for one write call less."""

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        if isinstance(writer, StreamWriter):
            writer.send_headers()
        await super().write_with_length(writer, content_length)


def _failed(exc: BaseException, progress: _Progress, body: bytes, timeout_s: float,
            url: str | URL, via: Proxy | None = None) -> Retry:
    """The Retry for a request to ``url`` that got no status: ``exc``, what the network
    raised; ``via``: the proxy it went through."""
    if type(exc) is TimeoutError and progress.connected is False and via is not None:
        return Retry(f"request failed: no connection within {timeout_s:g}s (timeout_s) "
                     f"through {via.shown}: the proxy, or the upstream through it, did not "
                     "answer")
    if type(exc) is TimeoutError and progress.connected is False:
        # No connection, so no request sent: its size is not why (a firewall dropping
        # the connection, a host gone). Over TLS, "connected" comes only after the
        # handshake, and a host that took the connection but never answers the handshake
        # (a middlebox, a port that speaks something else) times out the same way: named,
        # or the operator looks for a firewall in front of a host that answers.
        handshake = (" or its TLS handshake (a firewall, the host down or unreachable from "
                     "here, or a port that takes connections but does not answer TLS: "
                     "`outpost doctor` tells which)") if URL(url).scheme == "https" else (
            " (a firewall, or the host down or unreachable from here)")
        return Retry(f"request failed: no connection within {timeout_s:g}s (timeout_s): "
                     f"the upstream's host did not answer the connection{handshake}")
    if type(exc) is TimeoutError:   # timeout_s ran out before the status came
        # A batch too large for the link times out at every try: the forwarder sends
        # smaller ones (too_slow), and a stuck key's status says why.
        return Retry(f"request failed: no answer within {timeout_s:g}s (timeout_s) to a "
                     f"request of {len(body)} bytes (a slow link: smaller batches follow; "
                     "an event that goes alone and still times out needs a larger "
                     "timeout_s)", too_slow=True)
    wait = connect_wait(exc)
    # Its connection open and the request going on it, lost before any answer: a slow
    # link's far end that gave up on the body (Go's ReadTimeout, a proxy's) cuts it so,
    # each try alike, where half the batch would go (Retry.dropped).
    dropped = isinstance(exc, _CLOSED_UNDER_IT) and progress.connected is True \
        and not progress.answered
    return Retry(f"request failed: {described(exc, via)}", retry_after=wait, dropped=dropped)


# How a connection taken and then ended under a TLS handshake fails its connect.
_CUT = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def described(exc: BaseException, via: Proxy | None = None) -> str:
    """What a network error says, for last_error and the log; ``via``: the proxy the
    connection went through, named (never its credentials) when it is what failed."""
    if via is not None and isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"{via.shown} unreachable ({exc.os_error.strerror or exc.os_error})"
    if via is not None and isinstance(exc, aiohttp.ClientHttpProxyError):
        # Its own words only: aiohttp's text holds the request's url (a key in its path).
        target = exc.request_info.url.host_port_subcomponent or "the upstream"
        return f"{via.shown}: " + proxy_refused(exc.status, exc.message, f"CONNECT {target}",
                                                via.user is not None)
    if isinstance(exc, aiohttp.ClientConnectorSSLError) and \
            (plain := not_tls(exc.os_error, exc.host, exc.port)) is not None:
        return plain
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, _CUT):
        # A connect alone is refused, never reset: the connection was taken and then cut as
        # TLS began. aiohttp calls it "Cannot connect to host ... [None]" (no errno).
        where = f"{exc.host}:{exc.port}"
        if via is not None:
            return (f"{via.shown}: the connection through it to {where} was cut during the "
                    "TLS handshake, by the proxy or the upstream")
        return (f"{where} took the connection, then cut it during the TLS handshake (a "
                "firewall or middlebox that filters TLS, or a server with no certificate for "
                "this host name? `outpost doctor` tells more)")
    if isinstance(exc, aiohttp.ServerDisconnectedError) and not isinstance(exc.message, str):
        # Closed partway through the answer's head: aiohttp's message is then its parser's
        # partial answer, whose repr (the upstream's raw headers) was the error.
        return "the upstream closed the connection partway through its answer's head"
    if isinstance(exc, aiohttp.ClientResponseError) and isinstance(exc.__cause__,
                                                                   HttpProcessingError):
        # aiohttp's parser refused the answer, worded as a "400" of its own with the URL
        # (the upstream sent no 400): its words alone, on one line, without the caret.
        return f"an answer that is not HTTP ({' '.join(exc.message.split()).rstrip(' ^')})"
    return str(exc) or type(exc).__name__


# The encodings a reply is decoded from, and so the only ones asked for (aiohttp would ask
# for br and zstd too where their decoders are installed).
_ACCEPTED = {"Accept-Encoding": "gzip, deflate"}
# Compressed in a way the agent cannot undo, as is more than one encoding. Any other name
# (`none`, `utf-8`: a server's mistake) is read as it is, as aiohttp did.
_UNDECODED = frozenset({"br", "zstd", "compress", "x-compress"})


class _Undecodable(Exception):
    """A reply's body that does not decode, or is compressed other than by gzip or deflate."""


class _EndedEarly(Exception):
    """A reply's body received whole as HTTP frames it, whose gzip or deflate stream is not:
    not received whole, as one cut short of its Content-Length."""


async def _read_at_most(resp: aiohttp.ClientResponse, most: int) -> tuple[bytes, bool]:
    """The reply's body, decoded, up to ``most`` bytes, and whether there was more: then the
    connection is closed, the rest unread. Raises _Undecodable for a body that does not
    decode, or one compressed other than by gzip or deflate; ClientPayloadError (aiohttp's)
    for one not received whole, _EndedEarly for one whose compressed stream is not whole."""
    encoding = (resp.headers.get("Content-Encoding") or "").strip().lower()
    # Named as sent: aiohttp reads a byte that is not UTF-8 as a lone surrogate, which no
    # dead letter (SQLite) or /status answer (orjson) can hold.
    cannot = f"Can not decode content-encoding: {os_text(encoding)}"
    if encoding in _UNDECODED or "," in encoding:
        raise _Undecodable(cannot)
    inflater = Inflater(encoding) if encoding in INFLATED else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        if inflater is not None:
            try:
                # At most one byte past ``most``: a small body may inflate to gigabytes.
                chunk = inflater.feed(chunk, most + 1 - size)
            except zlib.error:
                raise _Undecodable(cannot) from None
        chunks.append(chunk)
        size += len(chunk)
        if size > most:
            resp.close()
            return b"".join(chunks)[:most], True
    if inflater is not None and not inflater.ended:
        raise _EndedEarly(f"its {os_text(encoding)} stream cut short")
    return b"".join(chunks), False
