"""NetworkManager's ``Metered`` property over D-Bus (jeepney), watched, not polled.

One plain connection: subscribe to PropertiesChanged on the manager object and to
NetworkManager's name changing owner, then read the property once, so no change
between the read and the subscription can be missed. Replies and signals are read
in one loop, so a closed bus ends the watch (and it reconnects) instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageType, Properties
from jeepney.bus import get_bus
from jeepney.bus_messages import message_bus
from jeepney.io.asyncio import DBusConnection, open_dbus_connection

from agent.sync.policy import Metered, MeteredReading

log = logging.getLogger("outpost.sync")
NM = DBusAddress("/org/freedesktop/NetworkManager", bus_name="org.freedesktop.NetworkManager",
                 interface="org.freedesktop.NetworkManager")
RECONNECT_S = 60.0   # a missing bus is retried this often: it costs nothing meanwhile
# NMMetered: 0 unknown, 1 yes, 2 no, 3 guess-yes, 4 guess-no.
_VALUES = {1: Metered.YES, 3: Metered.YES, 2: Metered.NO, 4: Metered.NO}
_WORDS = {0: "unknown", 1: "yes", 2: "no", 3: "guess yes", 4: "guess no"}


def reading(value: int) -> MeteredReading:
    """A reading from NetworkManager's NMMetered value."""
    word = _WORDS.get(value, f"unexpected value {value}")
    return MeteredReading(_VALUES.get(value, Metered.UNKNOWN), f"NetworkManager: {word}")


class NetworkManagerSource:
    """Watches ``Metered`` on the bus at ``address`` ("": $DBUS_SYSTEM_BUS_ADDRESS, else
    the system bus)."""

    def __init__(self, address: str, reconnect_s: float = RECONNECT_S) -> None:
        self.bus = address or "SYSTEM"
        self.reconnect_s = reconnect_s

    async def watch(self, report: Callable[[MeteredReading], None]) -> None:
        while True:
            try:
                conn = await open_dbus_connection(self.bus)
            except Exception as exc:  # noqa: BLE001 - no bus, refused auth: the cost is unknown
                why = f"no D-Bus at {self._where()}: {getattr(exc, 'strerror', None) or exc}"
            else:
                try:
                    await self._session(conn, report)
                    why = "D-Bus connection closed"
                except (EOFError, OSError) as exc:
                    why = f"D-Bus connection lost: {str(exc) or type(exc).__name__}"
                finally:
                    await conn.close()
            report(MeteredReading(Metered.UNKNOWN, f"{why}; retried every {self.reconnect_s:g}s"))
            await asyncio.sleep(self.reconnect_s)

    def _where(self) -> str:
        try:
            return str(get_bus(self.bus))
        except Exception:  # noqa: BLE001 - only for the message: an address jeepney cannot parse
            return self.bus

    async def _session(self, conn: DBusConnection, report: Callable[[MeteredReading], None]) -> None:
        # The bus filters by NetworkManager's well-known name; locally, a signal counts
        # only from the connection that owns it now (any local process may emit one).
        changed, on_bus = (MatchRule(type="signal", sender=sender,
                                     interface="org.freedesktop.DBus.Properties",
                                     member="PropertiesChanged", path=NM.object_path)
                           for sender in (None, NM.bus_name))
        owner = MatchRule(type="signal", sender="org.freedesktop.DBus",
                          interface="org.freedesktop.DBus", member="NameOwnerChanged")
        for rule, name in ((changed, NM.interface), (on_bus, NM.interface), (owner, NM.bus_name)):
            rule.add_arg_condition(0, name)
        for rule in (on_bus, owner):
            await conn.send(message_bus.AddMatch(rule))
        asked = await self._ask(conn)
        nm_owner: str | None = None   # NetworkManager's unique name, once known
        while True:
            msg = await conn.receive()
            kind = msg.header.message_type
            sender = msg.header.fields.get(HeaderFields.sender)
            try:
                if kind is MessageType.signal and owner.matches(msg):
                    nm_owner = msg.body[2] or None
                    if nm_owner:   # a new owner: NetworkManager (re)started
                        asked = await self._ask(conn)
                    else:
                        report(MeteredReading(Metered.UNKNOWN, "NetworkManager is not running"))
                elif changed.matches(msg) and sender is not None and sender == nm_owner:
                    props = msg.body[1]
                    if "Metered" in props:
                        report(reading(props["Metered"][1]))
                elif _reply_to(msg) == asked:
                    if kind is MessageType.method_return:
                        nm_owner = sender
                    report(_answer(msg))
            except (IndexError, KeyError, TypeError, ValueError) as exc:
                # A malformed message is ignored, not allowed to end the watch.
                log.warning("ignoring a malformed D-Bus message from %s: %s", sender, exc)

    async def _ask(self, conn: DBusConnection) -> int:
        """Send a Get of ``Metered``; the serial its reply will carry."""
        serial = int(next(conn.outgoing_serial))
        await conn.send(Properties(NM).get("Metered"), serial=serial)
        return serial


def _reply_to(msg: Message) -> int | None:
    value = msg.header.fields.get(HeaderFields.reply_serial)
    return value if isinstance(value, int) else None


def _answer(msg: Message) -> MeteredReading:
    if msg.header.message_type is MessageType.error:
        name = msg.header.fields.get(HeaderFields.error_name, "an error")
        return MeteredReading(Metered.UNKNOWN, f"NetworkManager not reachable: {name}")
    _signature, value = msg.body[0]
    return reading(int(value))
