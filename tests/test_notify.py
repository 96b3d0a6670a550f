"""sd_notify against real AF_UNIX datagram sockets, as systemd would listen."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops.notify import Notifier

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no AF_UNIX datagrams")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_ready_sends_exact_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert received(sock) == b"READY=1"
    assert notifier.ready(status="listening on 127.0.0.1:8765")
    assert received(sock) == b"READY=1\nSTATUS=listening on 127.0.0.1:8765"
    notifier.close()


def test_each_message(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path, monotonic_ns=lambda: 12_345_678_901)
    notifier.stopping()
    notifier.watchdog()
    notifier.status("draining 12 events")
    notifier.reloading()
    assert [received(sock) for _ in range(4)] == [
        b"STOPPING=1",
        b"WATCHDOG=1",
        b"STATUS=draining 12 events",
        b"RELOADING=1\nMONOTONIC_USEC=12345678",
    ]


def test_status_cannot_forge_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(path).status("ok\nREADY=1")
    assert received(sock) == b"STATUS=ok READY=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_socket() -> None:
    name = f"outpost-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog()
        assert received(sock) == b"WATCHDOG=1"
        notifier.close()


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_unsupported_address_disables() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_send_failure_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="outpost.notify"):
        assert notifier.ready() is False
    assert "ready" in caplog.text


def test_reuses_one_socket_and_recovers_after_close(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    notifier.watchdog()
    notifier.close()
    notifier.watchdog()
    assert [received(sock) for _ in range(2)] == [b"WATCHDOG=1", b"WATCHDOG=1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env}).watchdog_interval() == expected
