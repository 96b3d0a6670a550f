"""systemd's sd_notify(3) protocol, spoken with the stdlib socket module.

Under ``Type=notify`` systemd considers the service started only once it
sends READY=1, and with ``WatchdogSec=`` it restarts a service that stops
sending WATCHDOG=1.  Each message is one datagram of newline-separated
assignments on the AF_UNIX socket named by ``$NOTIFY_SOCKET``; that is too
little to justify a dependency on python-systemd, a C extension that venvs
often lack.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping

from agent.logs import log_limited

log = logging.getLogger("outpost.notify")

# A blocked send means systemd's queue is full; waiting briefly is better than
# dropping READY=1, but the event loop must not stall for long.
_SEND_TIMEOUT_S = 1.0
# What systemd does when a message of this kind is lost: said with the failure, since
# systemd's own line ("start operation timed out") names no cause.
_LOST = {"READY": ("that the agent is ready", "under Type=notify, systemd stops the agent "
                   "at its start timeout, taking it for a start that hung"),
         "WATCHDOG": ("the watchdog ping", "systemd stops the agent once WatchdogSec passes "
                      "without one")}


class Notifier:
    """Tells systemd about the service's state; a no-op when not run by systemd.

    Build it with :meth:`from_env`.  Sending never raises: a lost notification
    must not take the agent down. It is logged as a warning, once a minute per kind
    (READY, WATCHDOG, ...): systemd's own timeouts then stop the agent, and its line
    for that names no cause (a socket not mounted into a container, say).
    """

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        *,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._address = _socket_address(address) if address else None
        self._shown = address or ""   # as the environment gave it, for the log
        self._watchdog_usec = watchdog_usec
        self._monotonic_ns = monotonic_ns
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if sys.platform == "win32":
            address = None
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (sent once the port is bound and the spool open)."""
        return self.notify("READY=1", *([_status(status)] if status else []))

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; send :meth:`ready` when it is done.

        MONOTONIC_USEC lets ``Type=notify-reload`` (systemd 253+) tell this
        reload apart from an earlier one.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """Graceful shutdown has begun."""
        return self.notify("STOPPING=1")

    def watchdog(self, status: str | None = None) -> bool:
        """Keep-alive ping; send one every :meth:`watchdog_interval` seconds.

        ``status`` rides along, so `systemctl status` stays current (e.g. the queue depth).
        """
        return self.notify("WATCHDOG=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        """Free-form one-line status, shown by ``systemctl status``."""
        return self.notify(_status(text))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when no watchdog is armed.

        This is half of ``WatchdogSec=``, as sd_watchdog_enabled(3) advises,
        so that one late ping does not get the agent killed.
        """
        if not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send one datagram; True if it was sent.  Never raises."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(_SEND_TIMEOUT_S)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            kind = assignments[0].split("=", 1)[0]
            what, then = _LOST.get(kind, (assignments[0], ""))
            log_limited(log, logging.WARNING, f"failed:{kind}",
                        "could not tell the service manager %s (NOTIFY_SOCKET %s: %s)%s",
                        what, self._shown, exc.strerror or exc, then and f"; {then}")
            return False
        return True

    def close(self) -> None:
        """Release the socket (it is reopened if the notifier is used again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> bytes | None:
    if value.startswith("@"):
        # Linux abstract namespace: the leading NUL stands in for the "@".
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return os.fsencode(value)
    # e.g. systemd 254's vsock: addresses, for VMs; nothing here needs them.
    log.debug("unsupported NOTIFY_SOCKET address %r; notifications disabled", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        # WATCHDOG_PID names the process the watchdog is for; a child that
        # inherited the variables must not think it is being watched.
        pid = env.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status(text: str) -> str:
    # A newline would start a new assignment and could forge one.
    return "STATUS=" + " ".join(text.splitlines())
