"""Which forward proxy, if any, carries an upstream's traffic (docs/operations.md).

As curl, Fluent Bit and Vector read them: ``https_proxy``/``HTTPS_PROXY`` for https://
and wss:// upstreams, ``http_proxy``/``HTTP_PROXY`` for http:// and ws:// (the lower
case name first), ``no_proxy``/``NO_PROXY`` for the hosts reached directly. An
upstream's own ``proxy`` in agent.toml comes before them all (``""``: direct). A
loopback upstream is always reached directly: a proxy on another machine would reach
its own loopback, not this device's.

The session never reads the environment itself (aiohttp's ``trust_env``): each request
is given its upstream's proxy here, so that agent.toml, loopback and NO_PROXY decide
alike for the sends, the forwarder's reachability probe and `outpost doctor`.

A proxy's credentials (``http://user:password@host:port``) are sent as
Proxy-Authorization and never shown: ``Proxy.shown`` has none, and ``secrets`` are
registered for redaction.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from agent.settings import UpstreamConfig

_TLS_SCHEMES = ("https", "wss")


class BadProxy(ValueError):
    """A proxy url that cannot be used; its message never quotes the url (a password)."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    source: str                  # "agent.toml", or the environment variable's name
    user: str | None = None      # percent-decoded, as sent
    password: str | None = None

    @property
    def url(self) -> str:
        """Where requests go, without credentials: also what is shown."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def shown(self) -> str:
        return f"proxy {self.url} ({self.source})"

    @property
    def authorization(self) -> str | None:
        """The Proxy-Authorization header's value, when the url has credentials."""
        if self.user is None:
            return None
        pair = f"{self.user}:{self.password or ''}"
        return "Basic " + base64.b64encode(pair.encode()).decode()   # UTF-8, as curl sends it

    def secrets(self) -> Iterator[str]:
        """What the logs, /status and doctor must never show."""
        if self.password:
            yield self.password
        if self.user is not None:
            yield f"{self.user}:{self.password or ''}"
            yield (self.authorization or "").removeprefix("Basic ")


# A host the IDNA codec refuses before any lookup, with a UnicodeError where every caller of
# the resolver expects an OSError: the upstream's url and its proxy's are refused for it.
UNRESOLVABLE = ("has a host no resolver takes (an empty label, as in a doubled dot, or a "
                "label over 63 characters)")


def resolvable(host: str) -> bool:
    """Whether ``host`` is a name the resolver can be asked (not whether it resolves)."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def parse(value: str, source: str) -> Proxy:
    """A proxy url, ``http://[user:password@]host[:port]``; from the environment a bare
    ``host:port`` too (http:// assumed, as curl does). Raises BadProxy, saying why."""
    where = "proxy" if source == "agent.toml" else source
    if any(c.isspace() or not c.isprintable() for c in value):
        raise BadProxy(f"{where} must not contain whitespace or control characters")
    if "://" not in value and source != "agent.toml":
        value = "http://" + value
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise BadProxy(f"{where} is not a valid url (http://host:port)") from None
    if parts.scheme.lower() != "http":
        raise BadProxy(f"{where} must be an http:// url (http://host:port): the agent speaks "
                       "plain HTTP to its proxy, and tunnels https:// through it with CONNECT")
    if not host:
        raise BadProxy(f"{where} has no host (http://host:port)")
    if not resolvable(host):
        raise BadProxy(f"{where} {UNRESOLVABLE}")
    if port == 0:
        raise BadProxy(f"{where} names port 0 (http://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadProxy(f"{where} must be http://host:port, with no path, query or fragment")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(host, port or 80, source, user, password)


def configured(cfg: UpstreamConfig, environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy ``cfg``'s traffic goes through, None for a direct connection. Raises
    BadProxy for a proxy url that cannot be used (the environment's: agent.toml's is
    checked as the config is read)."""
    parts = urlsplit(cfg.url)
    host = (parts.hostname or "").rstrip(".").lower()
    if _loopback(host):
        return None
    if cfg.proxy is not None:
        return parse(cfg.proxy, "agent.toml") if cfg.proxy else None
    env = os.environ if environ is None else environ
    tls = parts.scheme in _TLS_SCHEMES
    names = ("https_proxy", "HTTPS_PROXY") if tls else ("http_proxy", "HTTP_PROXY")
    found = next(((name, env[name]) for name in names if env.get(name, "").strip()), None)
    if found is None:
        return None
    name, value = found
    port = parts.port or (443 if tls else 80)
    if _bypassed(host, port, env.get("no_proxy") or env.get("NO_PROXY") or ""):
        return None
    return parse(value.strip(), name)


def secrets(upstreams: tuple[UpstreamConfig, ...],
            environ: Mapping[str, str] | None = None) -> Iterator[str]:
    """The credentials of every proxy ``upstreams`` use, agent.toml's or the environment's."""
    for up in upstreams:
        try:
            proxy = configured(up, environ)
        except BadProxy:
            continue
        if proxy is not None:
            yield from proxy.secrets()


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY names ``host`` (curl's rules): ``*`` every host; a name that host
    or any under it (a leading dot or not); an address or a CIDR range the address; an
    entry with a ``:port`` only that port."""
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        want_port: int | None = None
        if entry.startswith("["):   # [v6]:port
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isdigit():
                want_port = int(rest[1:])
        elif entry.count(":") == 1:
            name, _, maybe = entry.partition(":")
            if maybe.isdigit():
                entry, want_port = name, int(maybe)
        if want_port is not None and want_port != port:
            continue
        if _names(entry, host):
            return True
    return False


def _names(entry: str, host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        try:
            return address in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    entry = entry.lstrip(".").rstrip(".")
    return bool(entry) and (host == entry or host.endswith("." + entry))
