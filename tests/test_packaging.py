"""packaging/: rendered from agent/service_templates.py, and valid for its service manager."""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.install import templates as tpl

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
PY = "/usr/bin/python3"

RENDERED = {
    "systemd/outpost.service": tpl.systemd_unit(PY, system=True),
    "systemd/outpost-user.service": tpl.systemd_unit(PY, system=False),
    "launchd/sh.outpost.agent.plist": tpl.launchd_plist(
        PY, system=False, log_dir="/Users/USERNAME/Library/Logs/outpost"),
    "launchd/sh.outpost.daemon.plist": tpl.launchd_plist(PY, system=True, log_dir="/Library/Logs/outpost"),
}

COMMON = {
    "Type": "notify", "NotifyAccess": "main", "ExecStart": f"{PY} -m agent run",
    "ExecReload": f"{PY} -m agent check-config --reload $MAINPID", "SyslogIdentifier": "outpost",
    "Restart": "on-failure", "RestartPreventExitStatus": "2", "RestartSec": "2",
    "WatchdogSec": "30", "TimeoutStopSec": "30", "LimitNOFILE": "8192", "UMask": "0077", "NoNewPrivileges": "true",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "LockPersonality": "true",
    "SystemCallArchitectures": "native",
}
SYSTEM_ONLY = {
    "User": "outpost", "Group": "outpost", "Environment": "OUTPOST_SYSTEM=1",
    "StateDirectory": "outpost", "StateDirectoryMode": "0700", "ConfigurationDirectory": "outpost",
    "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true", "PrivateDevices": "true",
    "ProtectKernelTunables": "true", "ProtectKernelModules": "true", "ProtectControlGroups": "true",
    "MemoryDenyWriteExecute": "false",
}


def unit_sections(text: str) -> dict[str, dict[str, str]]:
    """A strict little unit-file parser: every line is blank, a comment, a section or Key=Value."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m[1], {})
        else:
            m = re.fullmatch(r"([A-Za-z]+)=(.*)", line)
            assert m and current is not None, f"line {number}: {line!r}"
            assert m[1] not in current, f"line {number}: {m[1]} set twice"
            current[m[1]] = m[2]
    return sections


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_packaging_files_are_the_rendered_templates(name: str) -> None:
    assert (PACKAGING / name).read_text() == RENDERED[name], "re-render packaging/ from service_templates.py"


def test_system_unit_directives() -> None:
    unit = unit_sections((PACKAGING / "systemd/outpost.service").read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit["Service"].items() >= (COMMON | SYSTEM_ONLY).items()
    assert unit["Install"] == {"WantedBy": "multi-user.target"}


def test_user_unit_directives() -> None:
    unit = unit_sections((PACKAGING / "systemd/outpost-user.service").read_text())
    assert unit["Service"].items() >= COMMON.items()
    # These need root or user namespaces, and break or mean nothing in a user manager.
    assert not set(unit["Service"]) & {"User", "Group", "ProtectHome", "ProtectSystem", "PrivateTmp",
                                       "PrivateDevices", "StateDirectory", "CapabilityBoundingSet"}
    assert unit["Install"] == {"WantedBy": "default.target"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(("name", "scope"), [("outpost.service", []), ("outpost-user.service", ["--user"])])
def test_systemd_analyze_verify(name: str, scope: list[str], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    unit = tmp_path / name
    unit.write_text((PACKAGING / "systemd" / name).read_text())
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # --user needs one, even to verify
    done = subprocess.run(["systemd-analyze", *scope, "verify", str(unit)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    # verify exits 0 even for unknown keys and bad values; it only prints them.
    problems = [line for line in done.stderr.splitlines() if name in line]
    assert done.returncode == 0 and not problems, done.stderr


@pytest.mark.parametrize(("name", "label"), [("sh.outpost.agent.plist", tpl.AGENT_LABEL),
                                             ("sh.outpost.daemon.plist", tpl.DAEMON_LABEL)])
def test_plists(name: str, label: str) -> None:
    plist = plistlib.loads((PACKAGING / "launchd" / name).read_bytes())
    assert plist["Label"] == label
    assert plist["ProgramArguments"] == [PY, "-m", "agent", "run"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["Umask"] == 0o077
    assert plist["StandardErrorPath"].endswith("/Library/Logs/outpost/outpost.log")
    if label == tpl.DAEMON_LABEL:
        assert plist["UserName"] == plist["GroupName"] == "outpost"
        assert plist["EnvironmentVariables"] == {"OUTPOST_SYSTEM": "1"}
        assert plist["StandardErrorPath"] == "/Library/Logs/outpost/outpost.log"
    else:
        assert "UserName" not in plist


def test_powershell_scripts_match_the_task_template() -> None:
    install = (PACKAGING / "windows/install.ps1").read_text()
    uninstall = (PACKAGING / "windows/uninstall.ps1").read_text()
    assert f'$TaskName = "{tpl.TASK_NAME}"' in install and f'$TaskName = "{tpl.TASK_NAME}"' in uninstall
    # The by-hand script and `outpost service install` must register the same task.
    assert f'$arguments = "{tpl.USER_TASK_ARGUMENTS}"' in install
    assert f"\n{tpl.SYSTEM_TASK_ARGUMENTS}\n" in install
    xml = tpl.task_xml(PY, system=True, user="")
    for script_setting, xml_setting in [
        ("-MultipleInstances IgnoreNew", "<MultipleInstancesPolicy>IgnoreNew<"),
        ("-RestartCount 999", "<Count>999</Count>"),
        ("-RestartInterval (New-TimeSpan -Minutes 1)", "<Interval>PT1M</Interval>"),
        ("-RepetitionInterval (New-TimeSpan -Minutes 1)", "<Repetition>\n        <Interval>PT1M<"),
        ("-ExecutionTimeLimit ([TimeSpan]::Zero)", "<ExecutionTimeLimit>PT0S<"),
        ('-UserId "S-1-5-18"', "<UserId>S-1-5-18</UserId>"),
    ]:
        assert script_setting in install and xml_setting in xml, script_setting
    assert "Unregister-ScheduledTask -TaskName $TaskName" in uninstall


@pytest.mark.parametrize("name", ["outpost.service", "outpost-user.service"])
def test_a_config_error_is_not_restarted_by_systemd(name: str, tmp_path: Path) -> None:
    """`outpost run` on a config it cannot use exits 2 with one line; a restart cannot fix
    it. With Restart=on-failure alone systemd restarted it every RestartSec (2 s) for good:
    each start took under StartLimitIntervalSec's 10 s share, so the start limit was never
    hit, and the journal filled with the same line instead of the unit showing failed."""
    bad = tmp_path / "agent.toml"
    bad.write_text(f'[storage]\npath = "{tmp_path / "spool.db"}"\nmax_size_mb = "big"\n')
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(bad)],
                         capture_output=True, text=True, cwd=PACKAGING.parent, timeout=30)
    assert run.returncode == 2 and "storage.max_size_mb" in run.stderr, run.stderr
    unit = unit_sections((PACKAGING / "systemd" / name).read_text())["Service"]
    assert unit["Restart"] == "on-failure"
    prevented = unit.get("RestartPreventExitStatus", "").split()
    assert str(run.returncode) in prevented, "systemd restarts a config error forever"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_an_address_not_yet_on_the_machine_is_restarted_by_systemd(tmp_path: Path) -> None:
    """listen.host set to the device's LAN address: at boot (After=network.target, not
    network-online, which would hold an offline device's agent back) DHCP may not have
    assigned it yet, and the bind fails with EADDRNOTAVAIL. That clears by itself, so
    systemd must restart the agent (as it did before RestartPreventExitStatus=2), not
    leave it failed until someone restarts it by hand. 192.0.2.1 (TEST-NET-1) is on no
    machine."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[listen]\nhost = "192.0.2.1"\nport = 0\n'
                   f'[storage]\npath = "{tmp_path / "spool.db"}"\n')
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=PACKAGING.parent, timeout=30)
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert "cannot listen on 192.0.2.1" in run.stderr, run.stderr
    unit = unit_sections((PACKAGING / "systemd/outpost.service").read_text())["Service"]
    prevented = unit.get("RestartPreventExitStatus", "").split()
    assert run.returncode != 0 and str(run.returncode) not in prevented, run.returncode


def test_the_operations_guide_names_every_socket_family_the_system_unit_allows() -> None:
    """docs/operations.md describes the system unit's sandbox to the operator deciding
    whether to run it: the socket families it names are the unit's, AF_NETLINK (the
    network-change watcher's) included, not a narrower list than the unit grants."""
    guide = " ".join((PACKAGING.parent / "docs" / "operations.md").read_text().split())
    said = re.search(r"only ((?:`AF_[A-Z0-9]+`[/, and]*)+) sockets", guide)
    assert said, "the sandbox sentence names the unit's socket families"
    unit = unit_sections((PACKAGING / "systemd/outpost.service").read_text())
    assert set(re.findall(r"AF_[A-Z0-9]+", said[1])) == \
        set(unit["Service"]["RestrictAddressFamilies"].split()), said[0]
