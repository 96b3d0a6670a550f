"""Endpoints for the agent's own page and local tools only (dead letters, the live view,
/flush).

Stricter than the guard every route sits behind: a page on one of
``listen.allowed_origins`` (an app sending events) may not use them either, nor, when
the agent listens beyond loopback, another machine.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from agent.origins import netloc


def remote(request: web.Request) -> str | None:
    """The peer's address when it is another machine's: neither loopback nor the address
    the connection reached (a tool on this machine that reaches the agent at its LAN
    address comes from that address). None for this machine's."""
    transport = request.transport
    if transport is None:   # gone: nothing will be answered
        return None
    peer, own = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not isinstance(peer, tuple) or not peer:   # a Unix socket
        return None
    if isinstance(own, tuple) and own and own[0] == peer[0]:
        return None
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return str(peer[0])
    mapped = getattr(address, "ipv4_mapped", None)   # ::ffff:127.0.0.1 on a `::` listener
    return None if (mapped or address).is_loopback else str(peer[0])


def foreign(request: web.Request, what: str) -> str | None:
    """Why ``request`` may not use ``what``; None for a local tool (no Origin, no
    Sec-Fetch-Site) or the agent's own page (its Origin is the Host it asked), on this
    machine: listening beyond loopback, a LAN device is neither."""
    other = remote(request)
    if other is not None:
        return f"a request from {other} may not use {what}: only local tools and the " \
               "agent's own page on this machine may"
    origin = request.headers.get("Origin")
    host = request.headers.get("Host")
    if origin is not None and (host is None or netloc(origin) != host.lower()):
        return f"Origin {origin!r} may not use {what}: only the agent's own page may"
    site = request.headers.get("Sec-Fetch-Site")
    if site not in (None, "same-origin", "none"):
        return f"a {site} browser request may not use {what}"
    return None

