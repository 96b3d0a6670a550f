"""What NetworkManager and the bus may do wrong, against a real dbus-daemon and a real
agent: odd values, huge strings, floods of signals, silence, a bus that goes away.
Each is one clear line, counted in the sync's ``errors`` and ``last_error``, and never
a traceback; what status shows of a value is cut short.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jeepney.low_level import Endianness, Header, HeaderFields, Message, MessageType, Parser

from agent.forwarder.supervisor import Seams
from agent.sync.metered import networkmanager
from agent.sync.policy import Metered
from tests.conftest import ROOT, write_config
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nm_bus import NM_NAME, FakeNetworkManager, PrivateBus
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.waiting import wait_for

YES, NO, GUESS_NO = 1, 2, 4   # NMMetered
TIMEOUT_S = 0.2   # the D-Bus timeout these tests give the agent


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networkmanager, "TIMEOUT_S", TIMEOUT_S, raising=False)


async def sync_status(port: int) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/status") as r:
        assert r.status == 200
        return (await r.json())["sync"]


async def watching(make_agent: Any, fake: FakeNucleus, address: str, **kw: Any) -> Any:
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake.url, "keys": ["app1"]}
    return await make_agent(upstreams=[up], sync={"on_metered": "hold", "dbus_address": address},
                            **kw)


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "outpost.sync" and text in r.getMessage()]


def no_traceback(caplog: pytest.LogCaptureFixture) -> bool:
    return not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("reply", "shown"), [
    (("v", (("d", math.inf),)), "d inf"),
    (("v", (("d", math.nan),)), "d nan"),
    (("v", (("s", "1"),)), "s '1'"),
    (("s", ("x",)), "signature 's'"),
    (("", ()), "signature ''"),
])
async def test_an_odd_reply_says_what_was_wrong_counted_and_without_a_traceback(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture, reply: tuple[str, tuple[Any, ...]], shown: str) -> None:
    nm.reply = reply
    agent = await watching(make_agent, fake_nucleus, bus.address)
    await wait_for(lambda: agent.sync.errors >= 1)
    sync = await sync_status(agent.port)
    assert (sync["profile"], sync["metered"], sync["errors"]) == ("normal", "unknown", 1), sync
    assert shown in sync["metered_detail"] and "NetworkManager" in sync["metered_detail"], sync
    assert sync["last_error"] == f"metered network: {sync['metered_detail']}", sync
    assert len(lines(caplog, shown)) == 1 and no_traceback(caplog)


async def test_an_error_reply_to_the_read_is_a_counted_failure(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture) -> None:
    """NetworkManager is there but refuses the read (a bus policy that denies it, say).
    Before the fix that was shown as unknown but not counted or logged: only
    NetworkManager being absent is no failure."""
    nm.error = "org.freedesktop.DBus.Error.AccessDenied"
    agent = await watching(make_agent, fake_nucleus, bus.address)
    await wait_for(lambda: agent.sync.errors >= 1)
    sync = await sync_status(agent.port)
    assert (sync["profile"], sync["metered"], sync["errors"]) == ("normal", "unknown", 1), sync
    assert "AccessDenied" in sync["metered_detail"], sync
    assert len(lines(caplog, "AccessDenied")) == 1 and no_traceback(caplog)


async def test_a_refused_read_is_asked_again_so_a_policy_fixed_later_is_seen(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read refused (a bus policy fixed later, a transient error) is asked again, each
    failure counted and the same one logged once: else the network's cost stays unknown,
    for a hold on a metered network no hold at all, until NetworkManager restarts
    (its signals count only once a read has said which connection it is)."""
    monkeypatch.setattr(networkmanager, "RECONNECT_S", 0.2)
    nm.error = "org.freedesktop.DBus.Error.AccessDenied"
    nm.metered = YES
    agent = await watching(make_agent, fake_nucleus, bus.address)
    await wait_for(lambda: agent.sync.errors >= 1)
    nm.error = None   # the policy is fixed
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    sync = await sync_status(agent.port)
    assert (sync["metered"], sync["metered_detail"]) == ("yes", "NetworkManager: yes"), sync
    assert sync["last_error"].endswith("AccessDenied; retried every 0.2s"), sync
    assert sync["errors"] == nm.gets - 1, sync   # each refused read counted
    assert len(lines(caplog, "AccessDenied")) == 1 and no_traceback(caplog)


async def test_a_bus_that_refuses_the_watch_is_a_counted_failure_and_read_again(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bus that refuses a subscription (here its limit of match rules per connection;
    an AccessDenied policy the same) was not noticed: the AddMatch replies were never
    read, so the agent believed it watched while it never saw NetworkManager restart,
    and kept a stale reading for good, with no error. A refusal is a counted failure,
    and the reading, not watched, is read again every RECONNECT_S."""
    monkeypatch.setattr(networkmanager, "RECONNECT_S", 0.2)
    bus = PrivateBus(tmp_path, limits={"max_match_rules_per_connection": 1}).start()
    nm = await FakeNetworkManager(bus.address, metered=NO).start()
    try:
        agent = await watching(make_agent, fake_nucleus, bus.address)
        await wait_for(lambda: agent.sync.errors >= 1)
        sync = await sync_status(agent.port)
        assert (sync["profile"], sync["metered"]) == ("normal", "no"), sync
        assert "LimitsExceeded" in sync["metered_detail"], sync
        assert sync["last_error"] == f"metered network: {sync['metered_detail']}", sync
        await nm.stop()   # NetworkManager restarts, on a metered connection now
        nm.metered = YES
        await nm.start()
        await wait_for(lambda: agent.sync.profile.mode == "hold")
        assert "LimitsExceeded" in agent.sync.metered.detail
    finally:
        await nm.stop()
        bus.stop()
    assert len(lines(caplog, "LimitsExceeded")) == 1 and no_traceback(caplog)


async def test_a_watch_the_bus_refused_is_asked_again_so_a_limit_raised_later_is_followed(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a refused subscription the watch never asked again until its connection was
    made anew: a limit an admin raised (or a policy fixed) never took effect, and the
    property stayed polled, each read a failure, for good. Each minute's read asks for
    the refused subscription again, and once the bus takes it, changes are followed."""
    monkeypatch.setattr(networkmanager, "RECONNECT_S", 0.1)
    bus = PrivateBus(tmp_path, limits={"max_match_rules_per_connection": 1}).start()
    nm = await FakeNetworkManager(bus.address, metered=NO).start()
    try:
        agent = await watching(make_agent, fake_nucleus, bus.address)
        await wait_for(lambda: "LimitsExceeded" in agent.sync.metered.detail)
        await bus.reload(limits={})   # the admin raises the limit
        await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: no", timeout=3)
        errors = agent.sync.errors
        await nm.stop()   # its restart is seen (the rule the bus refused), not polled
        nm.metered = YES
        await nm.start()
        await wait_for(lambda: agent.sync.profile.mode == "hold")
        assert agent.sync.metered.detail == "NetworkManager: yes"
        assert agent.sync.errors == errors >= 1
    finally:
        await nm.stop()
        bus.stop()


async def test_a_restart_unwatched_keeps_the_last_reading_and_is_looked_at_again_soon(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With NetworkManager's name-owner watch refused, its restart is seen only by the
    next read, which finds its name without an owner: that read "unknown" at once,
    where a restart seen by the watch keeps the last reading up to RESTART_S (a hold on
    a metered link sent meanwhile), and it was read again only RECONNECT_S later, past
    the reading's end. Kept, and read again soon (the watch asked for again with it)."""
    monkeypatch.setattr(networkmanager, "RECONNECT_S", 0.6)
    monkeypatch.setattr(networkmanager, "RESTART_S", 0.4)
    monkeypatch.setattr(networkmanager, "RETRY_FIRST_S", 0.02)
    bus = PrivateBus(tmp_path, limits={"max_match_rules_per_connection": 1}).start()
    nm = await FakeNetworkManager(bus.address, metered=YES).start()
    try:
        agent = await watching(make_agent, fake_nucleus, bus.address)
        assert agent.sync.profile.mode == "hold" and "LimitsExceeded" in agent.sync.metered.detail
        await nm.stop()   # restarting: seen by the next read only
        await wait_for(lambda: "NetworkManager: yes; " not in agent.sync.metered.detail
                       or "(kept: " in agent.sync.metered.detail)
        assert agent.sync.metered.state is Metered.YES, agent.sync.metered
        assert agent.sync.profile.mode == "hold"
        await nm.start()   # back, and still metered
        await wait_for(lambda: "(kept: " not in agent.sync.metered.detail)
        assert agent.sync.metered.detail.startswith("NetworkManager: yes; "), agent.sync.metered
        assert agent.sync.profile.mode == "hold"
    finally:
        await nm.stop()
        bus.stop()


@pytest.mark.parametrize("error", ["org.freedesktop.DBus.Error.InvalidArgs",      # GDBus
                                   "org.freedesktop.DBus.Error.UnknownProperty"])  # sd-bus
async def test_a_networkmanager_without_metered_is_unknown_not_a_failure_every_minute(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture, error: str) -> None:
    """A NetworkManager older than 1.2 has no Metered property: its Get answers that no
    such property exists, now and at every try. That is no failure, as NetworkManager
    being absent is none: it was counted and asked again every minute for good (1,440
    sync errors a day, an alert on outpost_sync_errors_total that never clears). An
    upgrade restarts NetworkManager, which is asked again then."""
    nm.error = error
    agent = await watching(make_agent, fake_nucleus, bus.address)
    await wait_for(lambda: "Metered" in agent.sync.metered.detail)
    sync = await sync_status(agent.port)
    assert (sync["profile"], sync["metered"], sync["errors"], sync["last_error"]) == (
        "normal", "unknown", 0, ""), sync
    assert "no Metered property" in sync["metered_detail"], sync
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "outpost.sync"]

    await nm.stop()   # upgraded: the new NetworkManager has the property
    nm.error, nm.metered = None, YES
    await nm.start()
    await wait_for(lambda: agent.sync.profile.mode == "hold")
    assert nm.gets == 2 and agent.sync.errors == 0


async def test_a_networkmanager_installed_but_stopped_is_not_started_nor_a_failure(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """NetworkManager's package installs its D-Bus activation file: on a machine where it
    is stopped (by an admin) or disabled (a kiosk on systemd-networkd), a read sent to its
    name asked the bus to start it. Stopped, NetworkManager was started behind the
    admin's back; disabled, the start failed, a failed reading counted and asked again
    (started again) every minute for good. Not running is no failure."""
    started = tmp_path / "started"
    program = tmp_path / "networkmanager"
    program.write_text(f"#!/bin/sh\ntouch {started}\nexit 1\n")   # as a disabled unit fails
    program.chmod(0o755)
    bus = PrivateBus(tmp_path, activates=program).start()
    try:
        agent = await watching(make_agent, fake_nucleus, bus.address)
        await wait_for(lambda: agent.sync.metered.detail != "not read yet")
        sync = await sync_status(agent.port)
    finally:
        bus.stop()
    assert not started.exists(), "the agent's read started NetworkManager"
    assert (sync["profile"], sync["metered"], sync["errors"], sync["last_error"]) == (
        "normal", "unknown", 0, ""), sync
    assert "not reachable" in sync["metered_detail"], sync
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "outpost.sync"]


async def test_a_machine_without_a_system_bus_is_unknown_not_a_failure_every_minute(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container or a kiosk image without D-Bus has no socket where the system bus would
    be: as a machine without NetworkManager, nothing failed (docs/operations.md). It was
    counted and logged as a warning at every try, each minute for good. A system bus
    started later is still found."""
    monkeypatch.setattr(networkmanager, "RECONNECT_S", 0.1)
    later = PrivateBus(tmp_path)   # where the system bus will be, not started yet
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", later.address)
    up = {"name": "up", "protocol": "nucleus-ws", "url": fake_nucleus.url, "keys": ["app1"]}
    agent = await make_agent(upstreams=[up], sync={"on_metered": "hold"})
    sync = await sync_status(agent.port)
    assert (sync["profile"], sync["metered"], sync["errors"], sync["last_error"]) == (
        "normal", "unknown", 0, ""), sync
    assert sync["metered_detail"].startswith("no system bus on this machine"), sync

    later.start()
    try:
        service = await FakeNetworkManager(later.address, metered=YES).start()
        try:
            await wait_for(lambda: agent.sync.profile.mode == "hold")
        finally:
            await service.stop()
    finally:
        later.stop()
    assert agent.sync.errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "outpost.sync"]


async def test_a_huge_value_is_cut_and_a_flood_of_malformed_signals_is_one_line(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture) -> None:
    agent = await watching(make_agent, fake_nucleus, bus.address)
    await nm.announce("sa{sv}as", (NM_NAME, {"Metered": ("s", "x" * 1_000_000)}, []))
    await wait_for(lambda: agent.sync.errors == 1)
    sync = await sync_status(agent.port)
    assert len(sync["metered_detail"]) < 200 and "(cut)" in sync["metered_detail"], sync
    assert len(sync["last_error"]) < 250, sync

    for _ in range(300):
        await nm.announce("s", (NM_NAME,))
    await nm.set_metered(GUESS_NO)   # after the flood on the same connection: all were read
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: guess no")
    assert agent.sync.errors == 301
    # The sync monitor's (the start's own, such as the config's mode, are not its to count).
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("outpost.sync")]
    assert len(warnings) == 1 and no_traceback(caplog), [r.getMessage()[:200] for r in warnings]
    assert all(len(r.getMessage()) < 300 for r in caplog.records)


async def test_a_flapping_network_logs_the_first_change_and_then_a_summary_of_the_latest(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "outpost.sync")
    timing = ManualTiming()
    agent = await watching(make_agent, fake_nucleus, bus.address, seams=Seams(timing=timing))
    for i in range(200):   # yes, no, ..., no: 200 profile changes
        await nm.set_metered(YES if i % 2 == 0 else NO)
    await nm.set_metered(GUESS_NO)
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: guess no")
    assert [r.getMessage() for r in lines(caplog, "transmit profile:")] == \
        ["transmit profile: hold (metered network)"]
    assert [r.getMessage() for r in lines(caplog, "metered network: ")] == \
        ["metered network: no (NetworkManager: no)"]   # the first reading, at start
    assert (await sync_status(agent.port))["profile"] == "normal"

    timing.advance(60)   # the summary: the state in force now, and how often it changed
    profile = [r.getMessage() for r in lines(caplog, "transmit profile:")]
    assert len(profile) == 2 and profile[1].startswith("transmit profile: normal ("), profile
    assert profile[1].endswith("(199 more changes in the last 60s)"), profile
    metered = [r.getMessage() for r in lines(caplog, "metered network: ")]
    assert metered[1:] == ["metered network: no (NetworkManager: guess no) "
                           "(201 more changes in the last 60s)"], metered


async def test_a_failure_that_keeps_coming_back_is_logged_once_a_minute_with_a_count(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture) -> None:
    """A failed reading is logged at most once a minute, with how often it came back
    meanwhile, as every repeating problem is. One that came back within a minute of the
    last logged (a good reading between them) was not logged, nor were its identical
    repeats, ever: the log's last word on the network's cost was a good reading while
    status counted errors. The monitor's clock is the test's: a minute passes at once."""
    caplog.set_level(logging.INFO, "outpost.sync")
    timing = ManualTiming()
    agent = await watching(make_agent, fake_nucleus, bus.address, seams=Seams(timing=timing))
    assert agent.sync.metered.detail == "NetworkManager: no"
    odd = ("sa{sv}as", (NM_NAME, {"Metered": ("d", math.inf)}, []))
    await nm.announce(*odd)
    await wait_for(lambda: agent.sync.errors == 1)
    await nm.set_metered(GUESS_NO)   # a good reading between two failures
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: guess no")
    for _ in range(3):
        await nm.announce(*odd)
    await wait_for(lambda: agent.sync.errors == 4)
    failed = [r.getMessage() for r in lines(caplog, "unexpected Metered value")
              if r.levelno == logging.WARNING]   # not the summary's (info) naming it
    assert len(failed) == 1, failed   # within the minute: counted, not logged
    timing.advance(60)
    await nm.announce(*odd)
    await wait_for(lambda: agent.sync.errors == 5)
    failed = [r.getMessage() for r in lines(caplog, "unexpected Metered value")
              if r.levelno == logging.WARNING]   # not the summary's (info) naming it
    assert len(failed) == 2 and failed[1].endswith(
        "(repeated 3 times in the last 60 s)"), failed
    # The sync's last word: the failure, after the summary of the readings before it.
    assert [r for r in caplog.records if r.name == "outpost.sync"][-1].getMessage() == failed[1]
    sync = await sync_status(agent.port)
    assert (sync["metered"], sync["errors"]) == ("unknown", 5), sync
    assert failed[1].startswith(sync["last_error"]), (failed, sync)


async def test_a_summary_of_changes_ends_on_a_failed_reading_that_came_last(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture) -> None:
    """A change within a minute of the last line waits for the summary; a failed reading
    after it (unknown: not metered) is logged at once. The summary then said the network
    was metered, the log's last word on it, while the agent sent as on an unmetered one."""
    caplog.set_level(logging.INFO, "outpost.sync")
    timing = ManualTiming()
    agent = await watching(make_agent, fake_nucleus, bus.address, seams=Seams(timing=timing))
    await nm.set_metered(YES)   # within the minute of the start's line: counted
    await wait_for(lambda: agent.sync.metered.detail == "NetworkManager: yes")
    await nm.announce("sa{sv}as", (NM_NAME, {"Metered": ("d", math.inf)}, []))
    await wait_for(lambda: agent.sync.errors == 1)
    timing.advance(60)
    metered = [r.getMessage() for r in lines(caplog, "metered network: ")]
    assert metered[-1].startswith(f"metered network: unknown ({agent.sync.metered.detail})"), \
        metered
    assert (await sync_status(agent.port))["profile"] == "normal"


async def test_a_networkmanager_that_never_answers_times_out_as_an_error(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        short_timeout: None, caplog: pytest.LogCaptureFixture) -> None:
    nm.silent = True
    agent = await watching(make_agent, fake_nucleus, bus.address)
    await wait_for(lambda: agent.sync.errors == 1, timeout=3)
    sync = await sync_status(agent.port)
    assert sync["metered"] == "unknown" and sync["profile"] == "normal", sync
    assert f"no answer from NetworkManager in {TIMEOUT_S:g}s" in sync["metered_detail"], sync
    assert sync["last_error"].startswith("metered network: no answer"), sync
    assert len(lines(caplog, "no answer")) == 1 and no_traceback(caplog)


async def test_a_bus_that_accepts_and_never_speaks_times_out_as_an_error(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path, short_timeout: None,
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(tmp_path / "mute"))
        mute.listen()
        agent = await watching(make_agent, fake_nucleus, f"unix:path={tmp_path / 'mute'}")
        await wait_for(lambda: agent.sync.errors == 1, timeout=3)
        sync = await sync_status(agent.port)
    assert sync["metered_detail"].startswith("no D-Bus at ") and \
        f"no answer in {TIMEOUT_S:g}s" in sync["metered_detail"], sync
    assert sync["last_error"] == f"metered network: {sync['metered_detail']}", sync
    assert len(lines(caplog, "no D-Bus at")) == 1 and no_traceback(caplog)


async def test_losing_the_bus_is_a_counted_failure(
        make_agent: Any, fake_nucleus: FakeNucleus, bus: PrivateBus, nm: FakeNetworkManager,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, and the last reading is kept meanwhile, as through a restart of the bus
    (tests/test_sync_dbus.py): "no" here, until the bus is back or RESTART_S is over."""
    monkeypatch.setattr(networkmanager, "RETRY_FIRST_S", 60.0)   # no retry during the test
    agent = await watching(make_agent, fake_nucleus, bus.address)
    assert agent.sync.metered.detail == "NetworkManager: no" and agent.sync.errors == 0
    await nm.stop()   # NetworkManager goes first, as when the system shuts down
    bus.stop()
    await wait_for(lambda: agent.sync.errors == 1)
    sync = await sync_status(agent.port)
    assert sync["metered"] == "no" and sync["last_error"].startswith(
        "metered network: NetworkManager: no (kept: D-Bus connection "), sync
    failed = [r for r in lines(caplog, "D-Bus connection ") if r.levelno == logging.WARNING]
    assert len(failed) == 1, caplog.records


def reply(to: int, signature: str, body: tuple[Any, ...]) -> bytes:
    """A method return from the bus to the call of serial ``to``."""
    fields = {HeaderFields.reply_serial: to, HeaderFields.signature: signature} if signature \
        else {HeaderFields.reply_serial: to}
    return Message(Header(Endianness.little, MessageType.method_return, 0, 1, -1, to, fields),
                   body).serialise()


class GarbledBus:
    """A real unix socket that takes the D-Bus handshake and answers Hello, then answers
    anything more with bytes no D-Bus message starts with: a bus (or what
    sync.dbus_address names) whose stream cannot be read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> GarbledBus:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        begun = False
        try:
            await reader.readexactly(1)   # the credentials' NUL byte
            while not begun:
                line = (await reader.readuntil(b"\r\n")).strip()
                if line.startswith(b"AUTH"):
                    writer.write(b"OK 0123456789abcdef0123456789abcdef\r\n")
                elif line.startswith(b"NEGOTIATE_UNIX_FD"):
                    writer.write(b"AGREE_UNIX_FD\r\n")
                elif line.startswith(b"BEGIN"):
                    begun = True
            await self._talk(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)   # Hello
        writer.write(reply(1, "s", (":1.5",)))
        await reader.read(4096)   # AddMatch, Get
        writer.write(b"X" + bytes(15))
        await writer.drain()
        await reader.read(4096)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_bus_that_sends_what_no_d_bus_message_is_a_lost_connection_retried(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    garbled = await GarbledBus(tmp_path / "garbled").start()
    try:
        agent = await watching(make_agent, fake_nucleus, f"unix:path={garbled.path}")
        await wait_for(lambda: agent.sync.errors >= 1, timeout=5)
        sync = await sync_status(agent.port)
    finally:
        await garbled.stop()
    assert sync["metered"] == "unknown" and sync["profile"] == "normal", sync
    # The watch's own failure, retried on its schedule: not a crash of the watcher.
    assert sync["last_error"].startswith("metered network: D-Bus connection lost: "), sync
    assert "retried every" in sync["last_error"], sync
    assert no_traceback(caplog), [r.getMessage() for r in caplog.records if r.exc_info]


class DroppingBus(GarbledBus):
    """Answers Hello, each subscription and NetworkManager's ``Metered`` (yes), then drops
    the connection: a bus that takes every connection and drops each once it has spoken."""

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = Parser()
        while data := await reader.read(4096):
            parser.add_data(data)
            while (msg := parser.get_next_message()) is not None:
                member = msg.header.fields.get(HeaderFields.member)
                answer = {"Hello": ("s", (":1.5",)), "Get": ("v", (("u", YES),))}
                writer.write(reply(msg.header.serial, *answer.get(member, ("", ()))))
                if member == "Get":
                    await writer.drain()
                    return


async def test_a_bus_that_drops_every_connection_is_tried_again_less_and_less_often(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection read a fresh reading before it was dropped, which made each loss
    a new one, tried again RETRY_FIRST_S later: about once a second for good, each a
    failure. The tries back off, up to RECONNECT_S; each is counted, the warning logged
    once (the same one again within the minute is counted in the next)."""
    monkeypatch.setattr(networkmanager, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(networkmanager, "RECONNECT_S", 0.08)
    dropping = await DroppingBus(tmp_path / "dropping").start()
    try:
        agent = await watching(make_agent, fake_nucleus, f"unix:path={dropping.path}")
        await wait_for(lambda: agent.sync.errors >= 6, timeout=5)
        sync = await sync_status(agent.port)
    finally:
        await dropping.stop()
    assert sync["metered"] == "yes" and sync["profile"] == "hold", sync
    assert sync["last_error"].startswith("metered network: NetworkManager: yes (kept: D-Bus "), sync
    assert sync["last_error"].endswith("; retried in 0.08s"), sync   # backed off to the most
    assert len([r for r in lines(caplog, "D-Bus connection") if r.levelno == logging.WARNING]) == 1
    assert no_traceback(caplog)


async def test_doctor_says_a_garbled_bus_in_one_line(tmp_path: Path) -> None:
    garbled = await GarbledBus(tmp_path / "garbled").start()
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={garbled.path}",
           "PYTHONPATH": str(ROOT), "OUTPOST_CONFIG": str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db"))}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "doctor", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    finally:
        await garbled.stop()
    assert proc.returncode == 0 and "Traceback" not in out, out
    metered = [line for line in out.splitlines() if line.strip().startswith("metered ")]
    assert len(metered) == 1 and "D-Bus connection lost: " in metered[0], out
