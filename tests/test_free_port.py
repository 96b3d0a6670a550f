"""The port tests give a subprocess agent before it starts (``conftest.free_port``).

The agent binds it a second or so later, once its modules are loaded. A port the kernel
handed out for a port-0 bind was in its ephemeral range, which it also draws from for
every outgoing connection on the machine: one of those took it in that second and the
agent exited "Address already in use" (a full suite run beside a test loop).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

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


@pytest.mark.skipif(not sys.platform.startswith("linux") or not RANGE.exists(),
                    reason="the ephemeral range is read from Linux's /proc")
def test_a_port_one_test_process_holds_is_never_given_to_another() -> None:
    """Each test process draws its ports alone: two running at once (two suites on one
    machine) drew the same one, free while the first's agent was down for its kill -9
    restart, and the second's in-process agent bound it. The first's apps then sent their
    events to the second's agent: test_dead_spool_failing found 1194 events queued where
    its retry had queued 193, and its salvage "salvaged 1 queued events" it never sent."""
    port = free_port()
    # Another test process whose random draw comes to the same port first.
    child = ("from tests import conftest\n"
             "draw, first = conftest._PORTS.randrange, [%d]\n"
             "conftest._PORTS.randrange = lambda a, b: first.pop() if first else draw(a, b)\n"
             "print(conftest.free_port())\n" % port)
    got = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert int(got.stdout) != port
