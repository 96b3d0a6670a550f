"""The contract between the forwarder and every upstream protocol.

An uplink opens its connection (``connecting``) if it keeps one, ``prepare``s a
batch from queued rows (a ``Prepared`` value, see prepare.py), then ``send``s it.
Like OpenTelemetry exporters, uplinks *return* their outcome and do not raise it:
the forwarder alone decides about backoff, dead letters and acks.

A new protocol is a subclass of ``UplinkBase`` in its own module plus one line in
registry.py, which names the protocol and the URL schemes it serves: the class says which
event family it speaks, how many batches may be in flight, and how ``outpost
doctor`` checks that its upstream is reachable.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import aiohappyeyeballs
import aiohttp

from agent.families.event import Limit
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks import lookup, proxy, registry, splice
from agent.uplinks.prepare import Prepared, take_prefix
from agent.uplinks.sent_keys import any_key

# Statuses worth retrying as they are (and any 5xx).
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The upstream's own wait for the request ran out before its body came whole (another
# Outpost's listen.body_timeout_s, a proxy's): a link too slow for a batch this size, as
# timeout_s run out here is, only the upstream's wait is the shorter. Retried, and the
# batches halved (Retry.too_slow): the same batch again never came whole in time either.
REQUEST_TIMEOUT = 408
# The batch itself is refused: split it to find the events at fault. Any other 4xx
# (401, 403, 404: a wrong key or URL) is the configuration's fault: back off, keep the events.
REJECTED_STATUSES = frozenset({400, 413, 422})
# How long a connect to one of a host's addresses goes before the next is tried as well:
# aiohttp's default for its requests (TCPConnector), and so the probes'.
HAPPY_EYEBALLS_S = 0.25
# What OpenSSL calls a TLS handshake answered in plain text (an HTTP reply read as a record).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})
_TLS_SCHEMES = frozenset({"https", "wss"})
_DOCTOR_S = 3.0   # what `outpost doctor` waits for a connection, and then for its handshake
# What it waits for a TLS answer on an http:// or ws:// url's port: a port that speaks TLS
# answers a handshake at once; one that speaks plain HTTP may wait for a line (Go's, Apache's).
_SNIFF_S = 1.0


@dataclass(frozen=True, slots=True)
class Acked:
    """The upstream answered for every event of the batch: it confirmed ``seqs`` and
    refused the rest for good, each (seq, reason) in ``refused``."""

    seqs: Sequence[int]   # a range for a spliced batch (splice.take)
    refused: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Retry:
    """Transport or server trouble: back off, then send the unacknowledged rows again."""

    error: str
    retry_after: float | None = None   # the upstream's own wait, seconds
    acked: tuple[int, ...] = ()        # confirmed before the trouble
    # The rest of the batch, when the upstream answered for it but left these out (not a
    # connection lost on the way): after a few such answers the forwarder gives them up.
    omitted: tuple[int, ...] = ()
    # The upstream refused a frame or request this many bytes long (websocket close 1009,
    # a 413 with a Retry-After): the forwarder sends it smaller ones from now on.
    too_big: int | None = None
    # No answer within timeout_s to a request sent whole or in part (not a connection
    # that never opened), or a 408 (REQUEST_TIMEOUT): the link may be too slow for a batch
    # this size, so the forwarder halves the batches to this upstream until they are
    # answered in time.
    too_slow: bool = False
    # The connection was lost with the request (the frame) on its way, before any answer:
    # the far end of a link too slow for it (a server's read timeout, a proxy's) gave up
    # on a body still coming, or a reset that would have come anyway. Alone, no verdict:
    # at a try that follows a failed one (no answer since), too_slow (stream.py).
    dropped: bool = False


def to_check(status: int) -> str | None:
    """What a refusal with ``status`` says the operator should check, if it says."""
    return ("check the upstream's key" if status in (401, 403)
            else "check the upstream's url" if status in (404, 405) else None)


def misconfigured(status: int, reason: str, retry_after: float | None = None) -> Retry:
    """Any other 4xx: the events are kept and retried, with what the operator should check
    in ``last_error`` (a 409 or 415 says nothing of the key or the URL), no sooner than
    its ``retry_after`` if it gave one (a quota or rate limit worded as a 403)."""
    return Retry(f"{reason} ({to_check(status) or 'kept and retried: no verdict on the events'})",
                 retry_after)


@dataclass(frozen=True, slots=True)
class Refused:
    """The upstream refused the batch as a whole (400, 413, 422): split it to find the
    events at fault."""

    reason: str
    # An event alone refused with a 413 and a Retry-After: the upstream's own wait, kept
    # before its key's next send (a server shedding load refuses the next one too).
    retry_after: float | None = None


def refusal(status: int, reason: str, retry_after: float | None, prepared: Prepared,
            size: int) -> Refused | Retry:
    """What a 400, 413 or 422 for ``prepared``, sent as ``size`` bytes, says: split it to
    find the events at fault. But a 413 with a Retry-After is a size refused for now (RFC
    9110): split and sent again at once, the halves went in a burst to an upstream that
    asked for a pause. Its wait is honoured, and batches of half ``size`` follow (too_big).
    An event alone is refused as by any 413 (one the upstream never takes held its key),
    and its wait is kept before the key's next send."""
    if status == 413 and retry_after is not None:
        if len(prepared.seqs) > 1:
            return Retry(reason, retry_after=retry_after, too_big=size)
        return Refused(reason, retry_after)
    return Refused(reason)


SendResult = Acked | Retry | Refused


def _ignore_crash(exc: BaseException) -> None:
    """``Uplink.on_crash`` until a forwarder supervises the uplink."""


def _uncounted() -> None:
    """``Uplink.on_unreadable`` until a forwarder supervises the uplink."""


class Uplink(Protocol):
    """One connection to one upstream, for one local key."""

    name: str
    # The forwarder sets this: an uplink hands it anything its own background tasks
    # (a websocket reader, say) raise unexpectedly, for the forwarder's supervisor.
    on_crash: Callable[[BaseException], None]
    # And this: an uplink calls it for each message of the upstream's that it could not
    # read and ignored (websocket text that is not JSON), for the upstream's count.
    on_unreadable: Callable[[], None]
    # Whether ``prepare`` reads and changes nothing of the connection's (no ids in flight):
    # then the forwarder may prepare a batch while the one before it is still in flight.
    prepares_ahead: ClassVar[bool]

    def connecting(self) -> Coroutine[Any, Any, Retry | None] | None:
        """None if the uplink keeps no connection (HTTP: a request connects as it goes)
        or its connection is open, else the opening of what the next send needs
        (resolving to None, or a Retry saying why it cannot be opened, with the
        upstream's Retry-After if it gave one).

        The forwarder calls it with no batch in flight, before it prepares one, so that
        an upstream that cannot be reached costs no batch's work on every retry; a
        Retry is a failed send (the forwarder backs off, then closes the uplink).
        """
        ...

    def prepare(self, rows: Sequence[Row]) -> Prepared:
        """The next batch: the longest prefix of ``rows`` that may go in it, encoded.

        Called synchronously before ``send``; it may take fewer rows than given
        (size cap, or an id still unacknowledged on this connection).
        """
        ...

    async def send(self, prepared: Prepared) -> SendResult:
        """Deliver a batch with rows to send; never raises for network trouble."""
        ...

    def acknowledged(self, prepared: Prepared) -> tuple[int, ...]:
        """The seqs of ``prepared``, still being sent, that the upstream has acknowledged
        so far: read when a stop cuts its send short, so they are not sent again."""
        ...

    async def close(self) -> None:
        """End the connection, if any; a later ``send`` may open a new one.

        The forwarder calls it only with no batch in flight: after a failure, before
        sending again, so that no later batch can overtake an earlier one that failed.
        """
        ...


class UplinkBase(ABC):
    """What every uplink class declares, and the defaults they share.

    Subclasses set the class attributes, implement the two encoders that
    prepare.py's take loop calls, and ``send``; a protocol with per-connection
    state (acks by id) extends ``prepare``.
    """

    family: ClassVar[int]                 # the event family it sends
    envelope_bytes: ClassVar[int] = 0     # see prepare.Encoder
    event_overhead: ClassVar[int] = 1
    refuse_oversize: ClassVar[bool] = False
    # The upstream API's own limit on one event as sent (its body and its event_overhead
    # but the separator), when it has one: the agent refuses larger events at ingest.
    max_event_bytes: ClassVar[int | None] = None
    prepares_ahead: ClassVar[bool] = True   # see Uplink

    # staticmethod: a plain function here would be bound to the instance when read.
    on_crash: Callable[[BaseException], None] = staticmethod(_ignore_crash)
    on_unreadable: Callable[[], None] = staticmethod(_uncounted)

    def __init__(self, cfg: UpstreamConfig, app_key: str, session: aiohttp.ClientSession,
                 machine_id: str) -> None:
        """Every uplink class is built with these (registry.make_uplink): its upstream's
        config, the local key it forwards, the shared client session, the device's id."""
        self.name = cfg.name
        self.cfg = cfg
        self.session = session
        self.machine_id = machine_id   # a mapped Segment event's machineId (prepare.py)
        # What the take loop refuses (prepare.Encoder): worked out once, not per batch.
        self.limit = self.event_limit(cfg)
        # Why ``app_key``'s events can never go under it (key_rule), or None. Ingest refuses
        # such a key, but events taken before a reload took the upstream's own key away are
        # queued: sent, they would reach the upstream under another key, or another path.
        # Each send (or connect) fails with this instead: kept, retried with backoff.
        rule = self.key_rule(cfg)
        why = None if rule is None else rule(app_key)
        self.unsendable = None if why is None else (
            f"{why}: kept, not sent (give the upstream a key of its own, or route this key "
            "elsewhere)")
        # The forward proxy its requests go through (proxy.py). The environment's, when it
        # cannot be used, fails each send as a key that cannot go: never sent direct, where
        # the network that set a proxy may see it.
        self.proxy: proxy.Proxy | None = None
        try:
            self.proxy = proxy.configured(cfg)
        except proxy.BadProxy as exc:
            self.unsendable = self.unsendable or f"{exc}: kept, not sent (fix the agent's environment)"

    @classmethod
    def window(cls, cfg: UpstreamConfig) -> int:
        """Batches in flight at once: one, so that batches reach the upstream in order
        (FIFO per key); a protocol that keeps order itself may pipeline."""
        return 1

    @classmethod
    def probe(cls, cfg: UpstreamConfig) -> str:
        """For `outpost doctor`: whether the upstream's host accepts a TCP connection, and
        for an https:// or wss:// url a TLS handshake as its requests make it (a port that
        speaks plain HTTP, or a certificate this device does not trust, fails every send);
        for an http:// or ws:// url, whether its port speaks TLS (every send fails too).
        Through a proxy: whether the proxy accepts a connection and, for https:// or wss://,
        a CONNECT to the upstream, then the TLS handshake through it; the upstream's name is
        the proxy's to look up."""
        host, port = _address(cfg)
        try:
            via = proxy.configured(cfg)
        except proxy.BadProxy as exc:
            return f"not sent: {exc}"
        scheme = urlsplit(cfg.url).scheme
        if via is not None:
            return f"through {via.shown}: {_probe_via(via, host, port, scheme)}"
        try:
            sock = socket.create_connection((host, port), timeout=_DOCTOR_S)
        except OSError as exc:
            return f"unreachable ({exc.strerror or exc})"
        with sock:
            if scheme not in _TLS_SCHEMES:
                if _speaks_tls(sock, host):
                    return ("reachable, but its port speaks TLS, not plain HTTP: every send "
                            f"fails (check the upstream's url: {scheme}s://)")
                return "reachable"
            return _tls_handshake(sock, host, port)

    @classmethod
    def key_rule(cls, cfg: UpstreamConfig) -> Callable[[str], str | None] | None:
        """None when this upstream can be sent any app key; else what says why it could
        never be sent an app key's events under that key (None for one it can): ingest
        refuses such a key (401), as it refuses events too large to carry."""
        problem = registry.protocol(cfg.protocol).key_problem
        if cfg.key or problem is any_key:
            return None   # its own key is sent, never the app's (config validation checks it)

        def rule(app_key: str) -> str | None:
            why = problem(app_key)
            return None if why is None else f"upstream {cfg.name!r} is sent the app's key {why}"
        return rule

    @classmethod
    def event_limit(cls, cfg: UpstreamConfig) -> Limit | None:
        """The largest event body this upstream can ever carry, or None when it sets no
        limit: what ingest refuses past (agent/server/limits.py), so that nothing is
        accepted only to be dead-lettered at its first send."""
        limits = []
        if cls.max_event_bytes is not None:
            limits.append(Limit(cls.family, cls.max_event_bytes - (cls.event_overhead - 1),
                                f"{cfg.protocol} takes at most {cls.max_event_bytes} bytes "
                                "per event"))
        if cls.refuse_oversize:
            # An event that fills a batch on its own: alone, it has no separator, so its
            # batch is batch_max_bytes long at most when its body is no longer than this.
            limits.append(Limit(cls.family,
                                cfg.batch_max_bytes - cls.envelope_bytes
                                - (cls.event_overhead - 1),
                                f"batch_max_bytes = {cfg.batch_max_bytes}"))
        return min(limits, key=lambda limit: limit.max_bytes, default=None)

    @classmethod
    async def reach(cls, cfg: UpstreamConfig, timeout_s: float) -> str | None:
        """For the forwarder, while the upstream is unreachable: None once its host accepts
        a TCP connection, else why not. A connect and a close, no request: cheap enough to
        repeat every few seconds, and it tells a dead network from a live upstream that
        answers 5xx (which must keep its backoff).

        Every address of the host is tried as aiohttp's requests try them (Happy Eyeballs:
        the next one 250 ms on, without waiting for the last to fail): tried one after
        another, an IPv6 address whose route is broken (its connect hangs) took the whole
        timeout, and a host its requests reach over IPv4 was shown unreachable."""
        host, port = _address(cfg)
        try:
            via = proxy.configured(cfg)
        except proxy.BadProxy as exc:
            return str(exc)
        if via is not None:
            # Through a proxy, reachable means the proxy is: the upstream's name may not
            # even resolve here, and is the proxy's to look up.
            host, port = via.host, via.port
        try:
            async with asyncio.timeout(timeout_s):
                # Not the loop's own lookup, which the agent's exit waits for (lookup.py).
                infos = await lookup.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                # Not asyncio's own happy_eyeballs_delay: uvloop, the agent's loop, lacks it.
                sock = await aiohappyeyeballs.start_connection(
                    infos, happy_eyeballs_delay=HAPPY_EYEBALLS_S)
        except (OSError, TimeoutError) as exc:
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                   else str(exc) or type(exc).__name__)
            return why if via is None else f"{via.shown} unreachable: {why}"
        sock.close()
        return None

    def acknowledged(self, prepared: Prepared) -> tuple[int, ...]:
        return ()   # an HTTP reply acknowledges a batch whole, or nothing of it

    def connecting(self) -> Coroutine[Any, Any, Retry | None] | None:
        return None  # nothing kept open: an HTTP request connects (or reuses one) as it goes

    def prepare(self, rows: Sequence[Row]) -> Prepared:
        return splice.take(self, rows) or take_prefix(self, rows)

    @abstractmethod
    def encode_stored(self, row: Row) -> tuple[bytes, Any]:
        """(body, ack id) of a row stored in the uplink's own family."""

    @abstractmethod
    def encode_mapped(self, event: dict[str, Any], row: Row) -> tuple[bytes, Any]:
        """(body, ack id) of a row converted from another family into ``event``."""

    @abstractmethod
    async def send(self, prepared: Prepared) -> SendResult:
        """Deliver a batch with rows to send; never raises for network trouble."""

    async def close(self) -> None:
        return None


def not_tls(error: BaseException | None, host: str, port: int | None) -> str | None:
    """What a TLS handshake's ``error`` says of the url when the port answered it in plain
    text (OpenSSL's words alone, "wrong version number", say nothing of https://), else
    None."""
    if getattr(error, "reason", None) not in _NOT_TLS:
        return None
    return (f"{host}:{port} does not speak TLS: it answered the TLS handshake in plain text "
            "(check the upstream's url: http:// or ws:// for a port that speaks plain HTTP)")


def _tls_handshake(sock: socket.socket, host: str, port: int) -> str:
    """Doctor's verdict on a TLS handshake with ``host`` over ``sock``."""
    try:
        with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
            return "reachable"
    except ssl.SSLError as exc:
        why = (not_tls(exc, host, port) or getattr(exc, "verify_message", None)
               or exc.reason or str(exc))
    except TimeoutError:
        why = f"no answer within {_DOCTOR_S:g}s"
    except OSError as exc:   # closed or reset by the server
        why = exc.strerror or str(exc)
    return f"reachable, but its TLS handshake failed ({why})"


# The most of a proxy's answer to CONNECT that doctor reads.
_PROXY_HEAD_BYTES = 8192


def _probe_via(via: proxy.Proxy, host: str, port: int, scheme: str) -> str:
    """Doctor's verdict on the upstream through ``via``."""
    try:
        sock = socket.create_connection((via.host, via.port), timeout=_DOCTOR_S)
    except OSError as exc:
        return f"the proxy is unreachable ({exc.strerror or exc})"
    with sock:
        if scheme not in _TLS_SCHEMES:
            # A request through it would be one to the upstream: its url is checked as
            # events go (last_error), not here.
            return "the proxy is reachable (plain http:// requests go through it)"
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if via.authorization is not None:
            head += f"Proxy-Authorization: {via.authorization}\r\n"
        answer = b""
        try:
            sock.sendall((head + "\r\n").encode("latin-1", "replace"))
            while b"\r\n\r\n" not in answer and len(answer) < _PROXY_HEAD_BYTES:
                chunk = sock.recv(_PROXY_HEAD_BYTES)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            # Bytes that cannot start an HTTP answer: another protocol's, and then waiting.
            if answer and not b"HTTP/".startswith(answer[:5]):
                return f"the proxy gave no HTTP answer to CONNECT {target}"
            return f"the proxy did not answer CONNECT {target} within {_DOCTOR_S:g}s"
        except OSError as exc:
            return f"the proxy closed the connection ({exc.strerror or exc})"
        status, _, _ = answer.partition(b"\r\n")
        words = status.decode("latin-1").split(" ", 2)
        code = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        if code is None:
            return f"the proxy gave no HTTP answer to CONNECT {target}"
        if code != 200:
            return proxy_refused(code, words[2] if len(words) > 2 else "", f"CONNECT {target}",
                                 via.user is not None)
        return _tls_handshake(sock, host, port)


def proxy_refused(status: int, reason: str, request: str, sent_credentials: bool = False) -> str:
    """What a proxy's refusal of ``request`` (a CONNECT, or a plain request) means."""
    said = f"{status} {' '.join(reason.split())[:80]}".strip()
    hint = ("it refused the credentials sent: check the user and password in the proxy url"
            if status == 407 and sent_credentials else
            "it needs credentials: give them in the proxy url, http://user:password@host:port"
            if status == 407 else
            "its rules refuse the upstream (ask its operator to allow it)" if status == 403 else
            "it could not reach the upstream" if status in (502, 503, 504) else "")
    return f"the proxy answered {said} to {request}" + (f" ({hint})" if hint else "")


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the port ``sock`` is connected to completes a TLS handshake, or refuses one
    with a TLS alert: the question is what it speaks, so no certificate is checked."""
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    sock.settimeout(_SNIFF_S)
    try:
        with tls.wrap_socket(sock, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "")
    except OSError:   # no answer in time, or closed: not a TLS one
        return False


def _address(cfg: UpstreamConfig) -> tuple[str, int]:
    parts = urlsplit(cfg.url)
    return parts.hostname or "", parts.port or (443 if parts.scheme in ("https", "wss") else 80)
