"""The [sync] section's validation, and the transmit policy as a pure function."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, parse
from agent.settings import SyncConfig
from agent.sync.metered import source_for
from agent.sync.metered.networkmanager import NetworkManagerSource, reading
from agent.sync.policy import Battery, Metered, MeteredReading, decide
from tests.waiting import run_outpost


@pytest.mark.parametrize(("table", "message"), [
    ({"on_metered": "pause"},
     "sync.on_metered: must be one of 'normal', 'priority_only', 'hold', got 'pause'"),
    ({"on_low_battery": "priority"},
     "sync.on_low_battery: must be one of 'normal', 'priority_only', 'hold', got 'priority'"),
    ({"low_battery_pct": 0}, "sync.low_battery_pct: must be 1..100, got 0"),
    ({"low_battery_pct": 20.5}, "sync.low_battery_pct: expected an integer, got float"),
    ({"max_hold_h": 0}, "sync.max_hold_h: must be greater than 0, got 0"),
    ({"max_hold_h": True}, "sync.max_hold_h: expected an integer or a number, got a boolean"),
    ({"dbus_address": 5}, "sync.dbus_address: expected a string, got int"),
    ({"on_power_saver": "hold"}, "sync.on_power_saver: unknown key"),
])
def test_sync_errors_are_one_line_naming_the_field(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"sync": table})
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_sync_defaults_are_normal_everywhere() -> None:
    cfg = parse({}).sync
    assert cfg == SyncConfig(on_metered="normal", on_low_battery="normal", low_battery_pct=20,
                             max_hold_h=24.0, dbus_address="")
    assert parse({"sync": {"on_metered": "hold", "max_hold_h": 6}}).sync.max_hold_h == 6.0


@pytest.mark.parametrize(("upstream", "message"), [
    ({"priority_types": ["trak"]}, "upstream[0].priority_types: unknown event type 'trak'; "
     "one of alias, error, event, group, identify, init, nucleus:view, page, props, screen, "
     "track, userid"),
    ({"priority_types": ["heartbeat"]}, "upstream[0].priority_types: unknown event type"),
    ({"priority_types": "track"}, "upstream[0].priority_types: expected an array, got str"),
    ({"priority_events": ["ok", ""]}, "upstream[0].priority_events: every entry must be a "
     "non-empty string, got ''"),
    ({"priority_events": [3]}, "upstream[0].priority_events: every entry must be a non-empty"),
])
def test_lane_rules_errors_are_one_line_naming_the_field(upstream: dict[str, object],
                                                        message: str) -> None:
    raw = {"upstream": [{"name": "u", "protocol": "segment-http", "url": "http://h",
                         **upstream}]}
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_priority_only_and_lane_rules_are_taken() -> None:
    cfg = parse({"sync": {"on_metered": "priority_only", "on_low_battery": "priority_only"},
                 "upstream": [{"name": "u", "protocol": "segment-http", "url": "http://h",
                               "priority_types": ["identify"],
                               "priority_events": ["Order Completed"]}]})
    assert (cfg.sync.on_metered, cfg.sync.on_low_battery) == ("priority_only",) * 2
    up = cfg.upstreams[0]
    assert (up.priority_types, up.priority_events) == (("identify",), ("Order Completed",))


RULES = st.sampled_from(["normal", "priority_only", "hold"])
STRICTNESS = ["normal", "priority_only", "hold"]
METERED = st.builds(MeteredReading, st.sampled_from(list(Metered)), st.just("test"))
BATTERY = st.none() | st.builds(Battery, st.floats(0, 100), st.booleans())


@given(RULES, RULES, st.integers(1, 100), METERED, BATTERY)
def test_the_strictest_rule_that_applies_is_the_profile(on_metered: str, on_low: str,
                                                        pct: int, metered: MeteredReading,
                                                        battery: Battery | None) -> None:
    cfg = SyncConfig(on_metered=on_metered, on_low_battery=on_low, low_battery_pct=pct)
    profile = decide(cfg, metered, battery)
    metered_applies = on_metered != "normal" and metered.state is Metered.YES
    low_applies = (on_low != "normal" and battery is not None and not battery.plugged
                   and battery.percent < pct)
    applying = [on_metered] * metered_applies + [on_low] * low_applies
    assert profile.mode == max(applying, key=STRICTNESS.index, default="normal")
    # The reason names every condition that holds, and nothing else.
    assert ("metered network" in profile.reason) == metered_applies
    assert ("battery " in profile.reason and "%" in profile.reason) == low_applies


def test_reasons_read_as_status_shows_them() -> None:
    both = SyncConfig(on_metered="hold", on_low_battery="hold", low_battery_pct=20)
    assert decide(both, MeteredReading(Metered.YES, "x"), Battery(14.2, False)).reason == \
        "metered network, battery 14%"
    unknown = MeteredReading(Metered.UNKNOWN, "no metered-network source on macOS yet")
    assert decide(both, unknown, None).reason == "metered unknown: treated as not metered"


@pytest.mark.parametrize(("value", "state"), [(0, Metered.UNKNOWN), (1, Metered.YES),
                                              (2, Metered.NO), (3, Metered.YES), (4, Metered.NO),
                                              (9, Metered.UNKNOWN)])
def test_networkmanager_values(value: int, state: Metered) -> None:
    assert reading(value).state is state


@pytest.mark.parametrize(("platform", "says"), [
    ("darwin", "no metered-network source on macOS (path isExpensive) yet"),
    ("win32", "no metered-network source on Windows (connection cost API) yet"),
    ("freebsd14", "no metered-network source on freebsd14 yet"),
])
async def test_platforms_without_a_source_report_unknown(platform: str, says: str) -> None:
    got: list[MeteredReading] = []
    await source_for(SyncConfig(on_metered="hold"), platform).watch(got.append)
    assert got == [MeteredReading(Metered.UNKNOWN, says)]


def test_linux_asks_networkmanager_on_the_configured_bus() -> None:
    source = source_for(SyncConfig(dbus_address="unix:path=/tmp/x"), "linux")
    assert isinstance(source, NetworkManagerSource) and source.bus == "unix:path=/tmp/x"
    default = source_for(SyncConfig(), "linux")
    assert isinstance(default, NetworkManagerSource) and default.bus == "SYSTEM"


def test_the_operations_examples_are_valid_config() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = doc[doc.index("## Sync policy"):doc.index("## Many apps and keys")]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 4   # the rules, an upstream's lane rules, a laptop, a kiosk
    for block in blocks:
        parse(tomllib.loads(block))
    rules = parse(tomllib.loads(blocks[1])).upstreams[0]
    assert rules.priority_types == ("identify",) and rules.priority_events
    laptop, kiosk = (parse(tomllib.loads(b)) for b in blocks[2:])
    assert (laptop.sync.on_metered, laptop.sync.on_low_battery) == ("priority_only", "hold")
    assert kiosk.sync.on_metered == "priority_only" and kiosk.sync.max_hold_h == 1


async def test_a_bad_lane_rule_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[[upstream]]\nname = "u"\nprotocol = "segment-http"\nurl = "http://h"\n'
                   'priority_types = ["Order Completed"]\n')
    code, out = await run_outpost("check-config", str(cfg))
    assert code == 2, out
    assert out.strip().count("\n") == 0 and "upstream[0].priority_types: unknown event type " \
        "'Order Completed'" in out, out
