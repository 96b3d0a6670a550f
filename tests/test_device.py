"""Device facts: detected on Linux, overridable, machineId hashed and stable."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from agent import device
from agent.families.enrich import Enrich
from agent.settings import DeviceConfig


def test_detects_linux_facts() -> None:
    facts = device.detect()
    assert facts.platform == "linux"
    assert facts.osVersion == platform.release()
    assert isinstance(facts.totalRam, int) and facts.totalRam >= 1
    assert facts.arch == platform.machine().lower()
    assert len(facts.machineId) == 32 and int(facts.machineId, 16) >= 0


def test_machine_id_is_a_stable_hash_never_the_raw_id() -> None:
    raw = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
    first, second = device.machine_id(), device.machine_id()
    assert first == second
    if raw:
        assert raw not in first and first != raw[:32]


def test_overrides_win() -> None:
    facts = device.detect(DeviceConfig(platform="win32", osVersion="10.0", totalRam=8,
                                       language="fr-FR"))
    assert (facts.platform, facts.osVersion, facts.totalRam, facts.language) == (
        "win32", "10.0", 8, "fr-FR")


@pytest.mark.parametrize("env, tag", [("en_US.UTF-8", "en-US"), ("de_DE@euro", "de-DE"),
                                      ("pt_BR", "pt-BR")])
def test_language_from_environment(monkeypatch: pytest.MonkeyPatch, env: str, tag: str) -> None:
    for var in ("LC_ALL", "LC_MESSAGES", "LANGUAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LANG", env)
    assert device._language() == tag


def test_fill_never_overwrites_and_only_touches_init_and_error() -> None:
    facts = device.detect(DeviceConfig(language="en-GB"))
    enrich = Enrich(facts)
    ev = {"type": "init", "platform": "Darwin", "locale": "fr-FR", "totalRam": None}
    enrich.nucleus(ev, "init")
    assert ev["platform"] == "Darwin" and ev["locale"] == "fr-FR"
    assert ev["language"] == "fr-FR"            # the app's own locale, not the device's
    assert ev["totalRam"] == facts.totalRam and ev["machineId"] == facts.machineId
    plain = {"type": "event", "name": "x"}
    enrich.nucleus(plain, "event")
    assert plain == {"type": "event", "name": "x"}
    newer = {"type": "error", "deviceId": "d1"}
    enrich.nucleus(newer, "error")
    assert "machineId" not in newer              # deviceId already identifies the device
