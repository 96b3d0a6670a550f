"""The port tests give a subprocess agent before it starts (``conftest.free_port``).

The agent binds it a second or so later, once its modules are loaded. A port the kernel
handed out for a port-0 bind was in its ephemeral range, which it also draws from for
every outgoing connection on the machine: one of those took it in that second and the
agent exited "Address already in use" (a full suite run beside a test loop).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not RANGE.exists(),
                    reason="the ephemeral range is read from Linux's /proc")
def test_ports_are_outside_the_ephemeral_range_and_not_repeated() -> None:
    low, high = map(int, RANGE.read_text().split())
    ports = [free_port() for _ in range(200)]
    assert all(not low <= p <= high for p in ports), sorted(ports)
    assert len(set(ports)) == len(ports)


def test_a_port_it_gives_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
