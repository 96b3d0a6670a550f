"""Tells the agent when the network changes, so that waiting upstreams are probed at once.

One small interface, ``NetWatch``: ``watch(on_change)`` returns a running watcher,
or None where this platform has none; the agent then relies on probing alone (each
unreachable upstream is probed every few seconds, agent/forwarder/probe.py), which
bounds the delay after a network change by the probe interval instead.

- Linux: a netlink route socket (``NetlinkWatch``) subscribed to link, address and
  route changes, IPv4 and IPv6. The kernel pushes each change; the socket sits in
  the event loop's selector (``add_reader``), so watching costs no wakeup while
  nothing changes.
- Other platforms: none yet. macOS (SystemConfiguration's reachability callbacks)
  and Windows (``NotifyAddrChange``) would be further ``NetWatch`` classes behind
  this interface; they are not written because they could not be tested here.

A change is reported once per batch of kernel messages, without reading them: a
link, address or route appearing or going is each a reason to look again, and
the supervisor coalesces bursts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("outpost.netwatch")

# <linux/rtnetlink.h> multicast groups (the legacy bitmask bind form).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV6_ROUTE)


class NetWatch(Protocol):
    """A running network-change watcher."""

    def close(self) -> None: ...


class NetlinkWatch:
    """Linux: calls ``on_change`` after each batch of rtnetlink notifications."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self._sock.bind((0, GROUPS))
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._readable)
        except BaseException:
            self._sock.close()
            raise

    def _readable(self) -> None:
        changed = False
        while True:
            try:
                changed |= bool(self._sock.recv(65536))
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: more changes than the buffer held; still a change
                changed = True
                break
        if changed:
            self._on_change()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


def watch(on_change: Callable[[], None]) -> NetWatch | None:
    """Start watching the network with this platform's watcher, or None (probing alone).
    Call from the event loop."""
    if sys.platform.startswith("linux"):
        try:
            return NetlinkWatch(on_change)
        except OSError as exc:  # a sandbox without netlink (some containers, seccomp)
            log.info("network changes not watched (%s): unreachable upstreams are probed "
                     "every few seconds instead", exc)
            return None
    log.debug("no network-change watcher on %s: unreachable upstreams are probed instead",
              sys.platform)
    return None
