"""NetworkManager's ``Metered`` property over D-Bus (jeepney), watched, not polled.

One plain connection: subscribe to PropertiesChanged on the manager object and to
NetworkManager's name changing owner, then read the property once, so no change
between the read and the subscription can be missed. Replies and signals are read
in one loop, so a closed bus ends the watch (and it reconnects) instead of hanging;
connecting and each call are bounded by ``TIMEOUT_S``, so a bus or a NetworkManager
that hangs does too. What the bus sends is checked against its signature, never
trusted: an odd value is a failed reading, shown cut to ``SHOWN`` characters. A read
refused with an error (a bus policy, a transient fault) is asked again every
``RECONNECT_S``: NetworkManager's signals count only once a read has said which
connection it is, so unasked, the cost would stay unknown until it restarted.
A subscription the bus refuses (its limit of match rules, a policy) is a failure too:
unwatched, the property is read again every ``RECONNECT_S`` instead, each read counted,
and the subscription asked for again with it, so a limit raised later is followed.
Its name-owner watch refused, a NetworkManager restart is seen by such a read (its name
has no owner): the restart all the same, read again soon while its reading is kept.
NetworkManager or the bus going away (a restart) keeps the last yes or no up to
``RESTART_S`` (``_Last``), through what NetworkManager answers as it comes back, until it
has picked its connection again ("unknown", or GDBus's UnknownMethod before its objects
are on the bus: read again soon); meanwhile a lost bus is tried again from ``RETRY_FIRST_S`` on,
twice as long each time, not every ``RECONNECT_S``: else it outlasted the reading kept.
A loss within ``RESTART_S`` of the last one's end goes on doubling from where that one
was: a bus that drops each connection once it has answered is tried less and less often.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Callable

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageFlag, MessageType, Properties
from jeepney.bus import get_bus
from jeepney.bus_messages import message_bus
from jeepney.io.asyncio import DBusConnection, open_dbus_connection

from agent.sync.policy import Metered, MeteredReading
from agent.terminal import os_text

NM = DBusAddress("/org/freedesktop/NetworkManager", bus_name="org.freedesktop.NetworkManager",
                 interface="org.freedesktop.NetworkManager")
RECONNECT_S = 60.0   # a missing bus, or a refused read, is retried this often (tests shorten it)
TIMEOUT_S = 10.0     # for connecting, and for each call's reply (tests shorten it)
RESTART_S = 30.0     # NetworkManager or the bus gone: its last reading holds this long
RETRY_FIRST_S = 1.0  # while it holds, the bus is tried again this soon, then twice as long
SHOWN = 100          # characters of a value from the bus that status and the log show
_INTEGERS = frozenset("ynqiuxt")   # D-Bus integer types; NMMetered is a "u"
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

    def __init__(self, address: str) -> None:
        self.bus = address or "SYSTEM"
        self.reconnect_s = RECONNECT_S

    async def watch(self, report: Callable[[MeteredReading], None]) -> None:
        last = _Last(asyncio.get_running_loop().time)
        while True:
            failed = True
            try:
                conn = await asyncio.wait_for(open_dbus_connection(self.bus), TIMEOUT_S)
            except TimeoutError:
                why = f"no D-Bus at {self._where()}: no answer in {TIMEOUT_S:g}s"
            except Exception as exc:  # noqa: BLE001 - no bus, refused auth: the cost is unknown
                if isinstance(exc, FileNotFoundError) and self.bus == "SYSTEM":
                    # Nothing where the system bus would be: a container, a kiosk image
                    # without D-Bus. As without NetworkManager, nothing failed (a
                    # dbus_address that names nothing is a mistake to report).
                    failed, why = False, f"no system bus on this machine (nothing at {self._where()})"
                else:
                    why = f"no D-Bus at {self._where()}: {getattr(exc, 'strerror', None) or exc}"
            else:
                try:
                    await self._session(conn, report, last)
                    why = "D-Bus connection closed"
                except TimeoutError:
                    why = f"no answer from NetworkManager in {TIMEOUT_S:g}s"
                except (EOFError, OSError) as exc:
                    why = f"D-Bus connection lost: {str(exc) or type(exc).__name__}"
                finally:
                    # A connection the peer dropped while we wrote raises its EPIPE again
                    # here (the writer's wait_closed): already reported above.
                    with contextlib.suppress(OSError):
                        await conn.close()
            kept = last.away(why)
            if kept is None:
                report(MeteredReading(Metered.UNKNOWN, f"{why}; retried every {self.reconnect_s:g}s",
                                      failed=failed))
                await asyncio.sleep(self.reconnect_s)
            else:   # a bus restarting: tried again soon, to confirm the reading kept
                wait = last.soon(self.reconnect_s)
                report(dataclasses.replace(kept, detail=f"{kept.detail}; retried in {wait:.2g}s",
                                           failed=failed))
                await asyncio.sleep(wait)

    def _where(self) -> str:
        """The bus's path or address, for a reading's reason: as text /status can carry
        (the environment's address may hold bytes of another encoding)."""
        try:
            return os_text(get_bus(self.bus))
        except Exception:  # noqa: BLE001 - only for the message: an address jeepney cannot parse
            return os_text(self.bus)

    async def _session(self, conn: DBusConnection, report: Callable[[MeteredReading], None],
                       last: _Last) -> None:
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
        loop = asyncio.get_running_loop()
        deadline: float | None = loop.time() + TIMEOUT_S   # while a reply is awaited
        async with asyncio.timeout_at(deadline):
            # The bus answers the AddMatch calls before it passes the read on, so their
            # replies come before its answer: by then, whether it is watched is known.
            adding = await _subscribe(conn, (on_bus, owner))
            asked = await self._ask(conn)
        unwatched: list[MatchRule] = []   # the rules the bus refused
        refused: str | None = None   # the error it refused the first of them with
        nm_owner: str | None = None   # NetworkManager's unique name, once known
        retry: float | None = None   # when a refused read is asked again

        def left() -> None:
            """NetworkManager left the bus, or exited with the read unanswered."""
            report(last.away("NetworkManager left the bus") or last.got(_NOT_RUNNING))

        while True:
            wake = min((t for t in (deadline, retry, last.until) if t is not None), default=None)
            try:
                async with asyncio.timeout_at(wake):
                    msg = await _receive(conn)   # (cancelled between reads: nothing lost)
            except TimeoutError:
                if wake == last.until:   # not back in time, or back with no connection
                    report(last.over())
                elif wake == retry:
                    if unwatched:   # asked again: a limit raised, a policy fixed, is followed
                        adding, unwatched, refused = await _subscribe(conn, tuple(unwatched)), [], None
                    asked, deadline, retry = await self._ask(conn), loop.time() + TIMEOUT_S, None
                else:
                    raise   # no reply in time: the session ends
                continue
            kind = msg.header.message_type
            sender = msg.header.fields.get(HeaderFields.sender)
            signature = msg.header.fields.get(HeaderFields.signature, "")
            reply_to = _reply_to(msg)
            if reply_to in adding:   # the bus took a subscription, or refused it: polled
                rule = adding.pop(reply_to)
                if kind is MessageType.error:
                    unwatched.append(rule)
                    refused = refused or str(msg.header.fields.get(HeaderFields.error_name, "an error"))
            elif kind is MessageType.signal and owner.matches(msg):   # from the bus itself
                nm_owner, retry = msg.body[2] or None, None   # a new owner is asked at once
                if nm_owner:   # a new owner: NetworkManager (re)started
                    asked, deadline = await self._ask(conn), loop.time() + TIMEOUT_S
                else:
                    left()
            elif changed.matches(msg) and sender is not None and sender == nm_owner:
                if signature != "sa{sv}as":
                    report(last.got(_failed(f"a PropertiesChanged of signature {signature!r}")))
                elif "Metered" in msg.body[1]:
                    report(last.got(_from_variant(msg.body[1]["Metered"])))
            elif reply_to == asked:
                deadline = None
                error = msg.header.fields.get(HeaderFields.error_name)
                if error == _NO_REPLY or (error in _ABSENT and (last.until is not None
                                                                or nm_owner is not None)):
                    # It exited before answering (the bus says so after it left), is
                    # not back yet on a bus restarted under it, or left unseen (its
                    # owner not watched): part of a restart, as its leaving is, and no
                    # failure.
                    nm_owner = None
                    left()
                    if refused is not None:   # not watched: its return is seen by a read,
                        retry = loop.time() + (   # soon while the last reading is kept
                            self.reconnect_s if last.until is None else last.soon(self.reconnect_s))
                    continue
                if error in _NOT_READY and last.until is not None:
                    # Back, it owns its name before its objects are on the bus, and GDBus
                    # answers for them: still the restart, read again soon.
                    report(last.starting(_answer(msg, signature),
                                         f"NetworkManager not ready as it starts ({error})"))
                    retry = loop.time() + last.soon(self.reconnect_s)
                    continue
                if kind is MessageType.method_return:
                    nm_owner = sender
                answer = _answer(msg, signature)
                if refused is not None:   # not watched: a failure, read again (polled)
                    retry = loop.time() + self.reconnect_s
                    answer = dataclasses.replace(
                        answer, failed=True,
                        detail=f"{answer.detail}; the bus refused to let its changes be "
                               f"watched ({_shown(refused)}): read every {self.reconnect_s:g}s")
                elif answer.failed and kind is MessageType.error:   # refused: asked again
                    retry = loop.time() + self.reconnect_s
                    answer = dataclasses.replace(
                        answer, detail=f"{answer.detail}; retried every {self.reconnect_s:g}s")
                report(last.got(answer))

    async def _ask(self, conn: DBusConnection) -> int:
        """Send a Get of ``Metered``; the serial its reply will carry."""
        serial = int(next(conn.outgoing_serial))
        get = Properties(NM).get("Metered")
        # Never D-Bus activation: a NetworkManager installed but stopped by an admin would
        # be started by it, a disabled one fail to start at each read. Not running, the bus
        # answers NameHasNoOwner, and its start is seen (NameOwnerChanged).
        get.header.flags |= MessageFlag.no_auto_start
        await conn.send(get, serial=serial)
        return serial


class _Last:
    """NetworkManager's last reading, and how long it still holds while NetworkManager or
    the bus is away. A restart of either (an upgrade) leaves the link as it was:
    "unknown" (not metered) would send what a hold keeps over a metered link meanwhile.
    So its last yes or no holds until it is read again, up to RESTART_S from the first
    loss (a new owner, or a new connection, gone before it answered, is the same one).
    NetworkManager back says "unknown" until it has picked its primary connection again
    (its Metered is that connection's device's): still the restart, until it says yes or
    no, or the time is over (then its "unknown" is the reading)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.reading: MeteredReading | None = None
        self.until: float | None = None   # away: when the last reading ends
        self._soon = RETRY_FIRST_S   # away: the next wait before looking again
        self._back = -math.inf   # when the last loss ended in a reading (got)
        self._said: MeteredReading | None = None   # away: NetworkManager back, "unknown"

    def got(self, reading: MeteredReading) -> MeteredReading:
        """``reading``, now the last: it holds until the next loss; but NetworkManager's
        "unknown" while away keeps the last yes or no."""
        if self.until is not None and reading == _STARTING:
            return self.starting(reading, "NetworkManager says unknown as it starts")
        return self._take(reading)

    def starting(self, reading: MeteredReading, why: str) -> MeteredReading:
        """While away: NetworkManager back, not yet saying yes or no (``why``); the last
        reading is kept, ``reading`` is its word once the time is over."""
        self._said = reading
        return self._kept(why)

    def over(self) -> MeteredReading:
        """The time kept is over: what NetworkManager back said, else not running."""
        return self._take(self._said or _NOT_RUNNING)

    def _take(self, reading: MeteredReading) -> MeteredReading:
        if self.until is not None:
            self._back = self._clock()
        self.reading, self.until, self._said = reading, None, None
        return reading

    def away(self, why: str) -> MeteredReading | None:
        """The last reading, kept while away for ``why``; None with no yes or no to keep,
        or once its time is over."""
        if self.reading is None or self.reading.state is Metered.UNKNOWN:
            return None
        now = self._clock()
        self._said = None   # what a NetworkManager gone again said is not its word now
        if self.until is None:   # a new loss
            self.until = now + RESTART_S
            # Looked for soon again, unless the last loss ended just before: a bus that
            # drops each connection once it has answered would be tried every second.
            if now - self._back >= RESTART_S:
                self._soon = RETRY_FIRST_S
        if now >= self.until:   # not back in time: forgotten
            self.reading = self.until = None
            return None
        return self._kept(why)

    def _kept(self, why: str) -> MeteredReading:
        assert self.reading is not None
        return MeteredReading(self.reading.state, f"{self.reading.detail} (kept: {why}; "
                                                  f"up to {RESTART_S:g}s for a restart)")

    def soon(self, longest: float) -> float:
        """While away: how long to wait before looking again, to confirm the reading kept
        (from RETRY_FIRST_S on, twice as long each time up to ``longest``), never past its
        end."""
        assert self.until is not None
        wait = min(self._soon, self.until - self._clock())
        self._soon = min(self._soon * 2, longest)
        return wait


_NOT_RUNNING = MeteredReading(Metered.UNKNOWN, "NetworkManager is not running")
_STARTING = reading(0)   # its Metered without a primary connection: unknown


async def _subscribe(conn: DBusConnection, rules: tuple[MatchRule, ...]) -> dict[int, MatchRule]:
    """Send an AddMatch of each of ``rules``: the rules by the serial their replies will
    carry (the bus may refuse one: its limit of match rules, a policy)."""
    adding: dict[int, MatchRule] = {}
    for rule in rules:
        serial = int(next(conn.outgoing_serial))
        await conn.send(message_bus.AddMatch(rule), serial=serial)
        adding[serial] = rule
    return adding


async def _receive(conn: DBusConnection) -> Message:
    """The next message. Bytes jeepney cannot parse (a peer at the address that is no bus)
    leave the stream unreadable from there on: EOFError, as a closed bus, so the session
    ends and the bus is tried again, never an error escaping the watch."""
    try:
        return await conn.receive()
    except (EOFError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - the parser's KeyError, ValueError, struct.error...
        raise EOFError(f"a message no D-Bus reader takes "
                       f"({type(exc).__name__}: {_shown(exc)})") from exc


# The bus's answers for a name no process owns.
_ABSENT = frozenset({"org.freedesktop.DBus.Error.ServiceUnknown",
                     "org.freedesktop.DBus.Error.NameHasNoOwner"})
# NetworkManager's answers for a property it does not have (GDBus, sd-bus): one older than
# 1.2 has no Metered. For good, as being absent is: no failure, and no retry can read it
# (an upgrade restarts it, and a new owner is asked at once).
_NO_PROPERTY = frozenset({"org.freedesktop.DBus.Error.InvalidArgs",
                          "org.freedesktop.DBus.Error.UnknownProperty",
                          "org.freedesktop.DBus.Error.UnknownInterface"})
# The bus's answer to a read NetworkManager left unanswered when it exited.
_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
# GDBus's answers for an object not exported (yet): NetworkManager starting takes its name
# before it exports its objects (main.c: the bus acquired, then the manager set up).
_NOT_READY = frozenset({"org.freedesktop.DBus.Error.UnknownMethod",
                        "org.freedesktop.DBus.Error.UnknownObject"})


def _reply_to(msg: Message) -> int | None:
    value = msg.header.fields.get(HeaderFields.reply_serial)
    return value if isinstance(value, int) else None


def _answer(msg: Message, signature: str) -> MeteredReading:
    if msg.header.message_type is MessageType.error:
        name = msg.header.fields.get(HeaderFields.error_name, "an error")
        if name in _ABSENT:   # no NetworkManager on this machine: nothing failed
            return MeteredReading(Metered.UNKNOWN, f"NetworkManager not reachable: {_shown(name)}")
        if name in _NO_PROPERTY:
            return MeteredReading(Metered.UNKNOWN, "NetworkManager has no Metered property "
                                  f"(older than 1.2): {name}")
        # It is there, and the read was refused (a bus policy, say): a failure to count.
        return MeteredReading(Metered.UNKNOWN, f"reading NetworkManager's Metered failed: "
                              f"{_shown(name)}", failed=True)
    if signature != "v":
        return _failed(f"a reply to Get(Metered) of signature {signature!r}")
    return _from_variant(msg.body[0])


def _from_variant(variant: tuple[str, object]) -> MeteredReading:
    """The reading a ``Metered`` variant gives: NMMetered is an integer, anything else
    (a double, infinity, a string) is NetworkManager misbehaving."""
    signature, value = variant
    if signature in _INTEGERS and isinstance(value, int):
        return reading(value)
    return _failed(f"an unexpected Metered value: {_shown(f'{signature} {value!r}')}")


def _failed(what: str) -> MeteredReading:
    return MeteredReading(Metered.UNKNOWN, f"NetworkManager sent {what}", failed=True)


def _shown(value: object) -> str:
    """``value`` as status and the log show it: at most SHOWN characters, marked if cut."""
    text = str(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}… (cut)"
