"""Device facts: detected on Linux, overridable, machineId hashed and stable."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import platform
import stat
import threading
import uuid
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


def test_machine_id_is_a_stable_hash_never_the_raw_id(tmp_path: Path) -> None:
    raw = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
    kept = tmp_path / "device-id"
    first, second = device.machine_id(kept), device.machine_id(kept)
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


def test_an_os_id_hashes_as_before_and_no_id_is_kept(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Devices already known upstream keep their machineId.
    os_id = tmp_path / "machine-id"
    os_id.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(os_id),))
    kept = tmp_path / "state" / "device-id"
    assert device.machine_id(kept) == hashlib.sha256(
        b"outpost-machine-id:0123456789abcdef0123456789abcdef").hexdigest()[:32]
    assert not kept.parent.exists()


def test_with_no_os_id_one_is_made_once_private(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(tmp_path / "none"),))
    kept = tmp_path / "state" / "device-id"
    assert device.detect(DeviceConfig(), kept, make=False).machineId == ""   # doctor's look
    assert not kept.parent.exists()
    made = device.machine_id(kept)
    assert device.machine_id(kept) == made and len(made) == 32
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert os.listdir(kept.parent) == ["device-id"]   # no temp file left beside it
    assert made not in kept.read_text()   # hashed, as an OS's id is
    assert device.detect(DeviceConfig(machineId="mine"), tmp_path / "x").machineId == "mine"
    assert not (tmp_path / "x").exists()   # a configured id: none made


@pytest.mark.parametrize("bad", [b"\xff\x00garbage", b""], ids=["not-an-id", "empty"])
def test_a_kept_id_file_that_holds_none_is_replaced_and_said_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        bad: bytes) -> None:
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(tmp_path / "none"),))
    kept = tmp_path / "device-id"
    kept.write_bytes(bad)
    with caplog.at_level(logging.WARNING, logger="outpost"):
        made = device.machine_id(kept)
        assert device.machine_id(kept) == made
    said = [r.getMessage() for r in caplog.records if "replaced by a new machine id" in r.message]
    assert len(said) == 1 and str(kept) in said[0]


def test_two_first_starts_at_once_keep_one_id(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Two agents started at once on a machine with no OS id (a second `outpost run`, or
    # the service and a hand start): each finds no kept id and makes one. Only one wins the
    # spool's lock, and the id it sends must be the one kept: the other's write replaced
    # it, and at the next start upstream saw a new machine.
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(tmp_path / "none"),))
    kept = tmp_path / "state" / "device-id"
    both_looked = threading.Barrier(2, timeout=5)
    made = uuid.uuid4

    def make_after_both_looked() -> uuid.UUID:
        both_looked.wait()   # each has found no kept id
        return made()

    monkeypatch.setattr(uuid, "uuid4", make_after_both_looked)
    ids: list[str] = []
    starts = [threading.Thread(target=lambda: ids.append(device.machine_id(kept)))
              for _ in range(2)]
    for t in starts:
        t.start()
    for t in starts:
        t.join(5)
    monkeypatch.setattr(uuid, "uuid4", made)
    assert len(ids) == 2 and ids[0] == ids[1] == device.machine_id(kept)
    assert os.listdir(kept.parent) == ["device-id"]


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOTSUP, errno.EINVAL],
                         ids=["fuse-no-link", "enotsup", "einval"])
def test_an_id_is_kept_on_a_file_system_without_hard_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    # The spool on a file system that has no hard links, saying so in its own words:
    # a FUSE mount that leaves link out answers ENOSYS, macOS's FAT ENOTSUP (not
    # EOPNOTSUPP there), Windows maps its refusals to EINVAL. The id must still be kept,
    # as the move kept it: it was made anew at each start, a new machine upstream each time.
    monkeypatch.setattr(device, "MACHINE_ID_FILES", (str(tmp_path / "none"),))

    def no_links(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_links)
    kept = tmp_path / "state" / "device-id"
    made = device.machine_id(kept)
    assert device.machine_id(kept) == made
    assert os.listdir(kept.parent) == ["device-id"]


def test_os_names_that_break_the_rule_are_left_out_and_said(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A kernel built with a control character or a 200-character suffix in its release,
    # a hardware name with a line break: as if the OS gave none.
    monkeypatch.setattr(platform, "release", lambda: "6.1.0" + "-x" * 100)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64\nFAKE")
    with caplog.at_level(logging.WARNING, logger="outpost"):
        facts = device.detect(DeviceConfig(machineId="m"))
    assert (facts.osVersion, facts.arch) == ("", "unknown")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "kernel's release" in said[0] and "at most 128 characters, got 205" in said[0]
    assert "hardware name" in said[1] and "'x86_64\\nfake'" in said[1]
    # A [device] value wins without the machine's being read or said.
    caplog.clear()
    facts = device.detect(DeviceConfig(osVersion="6.1", arch="arm64", machineId="m"))
    assert (facts.osVersion, facts.arch) == ("6.1", "arm64") and not caplog.records
