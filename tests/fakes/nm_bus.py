"""A private D-Bus bus (a real dbus-daemon) and a NetworkManager-shaped service on it.

``PrivateBus`` runs ``dbus-daemon`` with its own config and socket in a temporary
directory; ``FakeNetworkManager`` owns ``org.freedesktop.NetworkManager`` on it and
exports the manager object's ``Metered`` property (Get, GetAll, PropertiesChanged),
which a test sets with ``set_metered``. It stands in for NetworkManager only:
the agent's side (agent/sync/metered/networkmanager.py) talks to it over the real bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.asyncio import DBusConnection, open_dbus_connection

NM_NAME = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
PROPS = "org.freedesktop.DBus.Properties"

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{services}</servicedir>
{limits}  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon of the test's own; ``address`` is what the agent's config names.
    ``activates``: a program the bus runs to start NetworkManager when a message names it
    (D-Bus activation), as the file a distribution's package installs makes it do.
    ``limits``: dbus-daemon's ``<limit>`` settings (max_match_rules_per_connection, ...)."""

    def __init__(self, directory: Path, activates: Path | None = None,
                 limits: dict[str, int] | None = None) -> None:
        self.socket = directory / "bus"
        self.config = directory / "bus.conf"
        self.log = directory / "bus.log"
        self.services = directory / "bus-services"
        self.activates = activates
        self.limits = limits or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> PrivateBus:
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise RuntimeError("dbus-daemon is missing: install Debian's dbus package (.ci/run does)")
        self.services.mkdir(exist_ok=True)
        if self.activates is not None:
            (self.services / f"{NM_NAME}.service").write_text(
                f"[D-BUS Service]\nName={NM_NAME}\nExec={self.activates}\n")
        self._write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([daemon, f"--config-file={self.config}", "--nofork",
                                          "--print-address=1"], stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        # The address is printed once the socket listens: no polling for it.
        if not self.proc.stdout.readline():
            raise RuntimeError("dbus-daemon exited before listening")
        return self

    def _write_config(self) -> None:
        limits = "".join(f'  <limit name="{name}">{value}</limit>\n'
                         for name, value in self.limits.items())
        self.config.write_text(CONFIG.format(socket=self.socket, services=self.services,
                                             limits=limits))

    async def reload(self, limits: dict[str, int]) -> None:
        """Rewrite the config with these limits and have the running bus read it again
        (an admin's fix); returns once the bus says it has."""
        self.limits = limits
        self._write_config()
        conn = await open_dbus_connection(self.address)
        try:
            await conn.send(message_bus.ReloadConfig())
            while (await conn.receive()).header.message_type is not MessageType.method_return:
                pass
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


class FakeNetworkManager:
    """Owns NetworkManager's name on ``address`` and answers for its ``Metered``."""

    def __init__(self, address: str, metered: int = 0) -> None:
        self.address = address
        self.metered = metered
        self.gets = 0   # Get/GetAll calls answered: the agent reads once, then watches
        # Get's reply as (signature, body) instead of the variant of ``metered``: an odd one.
        self.reply: tuple[str, tuple[Any, ...]] | None = None
        self.silent = False   # Get is never answered, as by a NetworkManager that hangs
        self.error: str | None = None   # Get is answered with this D-Bus error instead
        self._conn: DBusConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> FakeNetworkManager:
        self._conn = conn = await open_dbus_connection(self.address)
        await conn.send(message_bus.RequestName(NM_NAME))
        # The name is ours once its reply arrives (the only message we have asked for).
        while (await conn.receive()).header.message_type is not MessageType.method_return:
            pass
        self._task = asyncio.create_task(self._serve(conn))
        return self

    async def stop(self) -> None:
        """Leave the bus, as NetworkManager exiting would (its name loses its owner);
        after the bus went away, only forget the connection it closed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, EOFError, OSError):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(OSError):
                await self._conn.close()
        self._conn = self._task = None

    async def set_metered(self, value: int) -> None:
        """Change ``Metered`` and announce it, as NetworkManager does."""
        self.metered = value
        await self.announce("sa{sv}as", (NM_NAME, {"Metered": ("u", value)}, []))

    async def announce(self, signature: str, body: tuple[Any, ...]) -> None:
        """Send a PropertiesChanged signal with this body, well-formed or not."""
        assert self._conn is not None
        where = DBusAddress(NM_PATH, interface=PROPS)
        await self._conn.send(new_signal(where, "PropertiesChanged", signature, body))

    async def _serve(self, conn: DBusConnection) -> None:
        while True:
            msg = await conn.receive()
            if msg.header.message_type is not MessageType.method_call:
                continue
            fields = msg.header.fields
            member, path = fields.get(HeaderFields.member), fields.get(HeaderFields.path)
            if path == NM_PATH and member == "Get" and tuple(msg.body) == (NM_NAME, "Metered"):
                self.gets += 1
                if self.error is not None:
                    await conn.send(new_error(msg, self.error))
                elif not self.silent:
                    signature, body = self.reply or ("v", (("u", self.metered),))
                    await conn.send(new_method_return(msg, signature, body))
            elif path == NM_PATH and member == "GetAll" and tuple(msg.body) == (NM_NAME,):
                self.gets += 1
                await conn.send(new_method_return(msg, "a{sv}", ({"Metered": ("u", self.metered)},)))
            else:
                await conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))
