"""`outpost service install|uninstall`: the plans per OS, dry-run output, the executor."""

from __future__ import annotations

import argparse
import os
import plistlib
import stat
import sys
from pathlib import Path

import pytest

from agent.install import command
from agent.install import templates as tpl
from agent.install.execute import describe, execute, first_free_id
from agent.install.plan import EnsureUser, MakeDir, Plan, RemoveFile, Run, Target, WriteFile, build_plan
from agent.terminal import printable
from tests.conftest import skip_unless_installable

PY = "/opt/outpost/venv/bin/python"


def linux(system: bool) -> Target:
    return Target("linux", system, PY, "/home/ada", config_home="/home/ada/.config",
                  package_dir="/opt/outpost/venv/lib/python3.11/site-packages/agent")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="outpost")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def commands(plan: Plan) -> list[tuple[str, ...]]:
    return [step.argv for step in plan.steps if isinstance(step, Run)]


def test_linux_user_install() -> None:
    plan = build_plan("install", linux(system=False))
    write = plan.steps[0]
    assert isinstance(write, WriteFile)
    assert write.path == "/home/ada/.config/systemd/user/outpost.service"
    assert write.mode == 0o644
    assert f"ExecStart={PY} -m agent run\n" in write.content
    # Room for listen.max_connections connections (agent/server/connections.py).
    assert "\nLimitNOFILE=8192\n" in write.content
    assert write.content == tpl.systemd_unit(PY, system=False)
    assert commands(plan) == [
        ("systemctl", "--user", "daemon-reload"),
        ("systemctl", "--user", "enable", "outpost.service"),
        ("systemctl", "--user", "restart", "outpost.service"),
    ]
    assert plan.warnings == ()


def test_linux_system_install_creates_the_user_first() -> None:
    plan = build_plan("install", linux(system=True))
    assert plan.steps[0] == EnsureUser("outpost")
    write = plan.steps[1]
    assert isinstance(write, WriteFile)
    assert write.path == "/etc/systemd/system/outpost.service"
    assert "User=outpost\n" in write.content
    assert "\nLimitNOFILE=8192\n" in write.content
    assert commands(plan)[0] == ("systemctl", "daemon-reload")


def test_linux_uninstall_keeps_going_when_the_unit_is_not_loaded() -> None:
    plan = build_plan("uninstall", linux(system=False))
    assert plan.steps == (
        Run(("systemctl", "--user", "disable", "--now", "outpost.service"), check=False),
        RemoveFile("/home/ada/.config/systemd/user/outpost.service"),
        Run(("systemctl", "--user", "daemon-reload")),
    )


def test_system_install_from_a_home_directory_is_refused() -> None:
    target = Target("linux", True, "/home/ada/.venv/bin/python", "/home/ada",
                    package_dir="/home/ada/src/outpost/agent")
    with pytest.raises(ValueError, match="/home/ada/.venv/bin/python is under /home"):
        build_plan("install", target)
    # A user service may run from home; uninstalling is never refused.
    assert build_plan("install", Target("linux", False, "/home/ada/.venv/bin/python", "/home/ada")).warnings == ()
    assert build_plan("uninstall", target).steps


def test_exec_start_quotes_awkward_paths() -> None:
    unit = tpl.systemd_unit("/opt/my apps/100%/bin/python", system=False)
    assert 'ExecStart="/opt/my apps/100%%/bin/python" -m agent run\n' in unit


def test_macos_user_install() -> None:
    plan = build_plan("install", Target("darwin", False, PY, "/Users/ada", uid=501))
    assert plan.steps[0] == MakeDir("/Users/ada/Library/Logs/outpost", 0o700, None)
    write = plan.steps[1]
    assert isinstance(write, WriteFile)
    assert write.path == "/Users/ada/Library/LaunchAgents/sh.outpost.agent.plist"
    plist = plistlib.loads(write.content.encode())
    assert plist["ProgramArguments"] == [PY, "-m", "agent", "run"]
    assert plist["StandardErrorPath"] == "/Users/ada/Library/Logs/outpost/outpost.log"
    assert commands(plan) == [
        ("launchctl", "bootout", "gui/501/sh.outpost.agent"),
        ("launchctl", "bootstrap", "gui/501", "/Users/ada/Library/LaunchAgents/sh.outpost.agent.plist"),
    ]


def test_macos_system_install_and_uninstall() -> None:
    target = Target("darwin", True, PY, "/Users/ada", uid=501)
    plan = build_plan("install", target)
    assert plan.steps[:3] == (
        EnsureUser("outpost"),
        MakeDir("/Library/Application Support/outpost", 0o700, "outpost"),
        MakeDir("/Library/Logs/outpost", 0o700, "outpost"),
    )
    plist_path = "/Library/LaunchDaemons/sh.outpost.daemon.plist"
    assert commands(plan)[-1] == ("launchctl", "bootstrap", "system", plist_path)
    assert build_plan("uninstall", target).steps == (
        Run(("launchctl", "bootout", "system/sh.outpost.daemon"), check=False),
        RemoveFile(plist_path),
    )


def test_windows_user_task() -> None:
    target = Target("win32", False, r"C:\Outpost\venv\Scripts\pythonw.exe", r"C:\Users\ada",
                    user=r"PC\ada", config_home=r"C:\Users\ada\AppData\Local")
    plan = build_plan("install", target)
    write = plan.steps[0]
    assert isinstance(write, WriteFile)
    assert write.path == r"C:\Users\ada\AppData\Local\outpost\outpost-task.xml"
    assert write.encoding == "utf-16"
    assert "<LogonTrigger>" in write.content and r"<UserId>PC\ada</UserId>" in write.content
    assert r"<Command>C:\Outpost\venv\Scripts\pythonw.exe</Command>" in write.content
    assert "<Arguments>-m agent run</Arguments>" in write.content
    assert commands(plan)[1:] == [
        ("schtasks", "/Create", "/TN", "Outpost", "/XML", write.path, "/F"),
        ("schtasks", "/Run", "/TN", "Outpost"),
    ]
    assert describe(plan, "win32").count("[run] schtasks") == 3


def test_windows_system_task_runs_as_system_at_boot() -> None:
    xml = tpl.task_xml(r"C:\Program Files\Python311\pythonw.exe", system=True, user="")
    assert "<BootTrigger>" in xml and "<UserId>S-1-5-18</UserId>" in xml
    assert "os.environ['OUTPOST_SYSTEM'] = '1'" in xml


def test_windows_task_xml_is_well_formed() -> None:
    import xml.etree.ElementTree as ET

    for system in (True, False):
        text = tpl.task_xml(r"C:\a&b\pythonw.exe", system=system, user=r"PC\ada")
        root = ET.fromstring(text.encode("utf-16"))
        ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
        assert root.findtext("t:Actions/t:Exec/t:Command", namespaces=ns) == r"C:\a&b\pythonw.exe"
        assert root.findtext("t:Settings/t:MultipleInstancesPolicy", namespaces=ns) == "IgnoreNew"


def test_unknown_action_or_os() -> None:
    with pytest.raises(ValueError):
        build_plan("reinstall", linux(system=False))
    with pytest.raises(ValueError):
        build_plan("install", Target("aix", False, PY, "/home/ada"))


def test_first_free_id() -> None:
    users = "root 0\n_www 70\noutsider 200\nx 201\nnobody -2\n"
    groups = "wheel 0\ng 202\n"
    assert first_free_id([users, groups]) == 203


def test_parser() -> None:
    args = parse(["service", "install", "--user", "--dry-run"])
    assert (args.command, args.service_action, args.user, args.dry_run) == ("service", "install", True, True)
    assert args.func is command.run
    args = parse(["service", "uninstall"])
    assert (args.service_action, args.user, args.dry_run) == ("uninstall", False, False)
    with pytest.raises(SystemExit):
        parse(["service"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the Linux plan")
def test_dry_run_prints_everything_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    skip_unless_installable(system=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert command.run(parse(["service", "install", "--user", "--dry-run"])) == 0
    out = capsys.readouterr().out
    unit_path = tmp_path / "config/systemd/user/outpost.service"
    unit = tpl.systemd_unit(os.path.abspath(sys.executable), system=False)
    config = tmp_path / "config/outpost/agent.toml"
    assert out.startswith(f"config: {config} (not found: ")
    out = out.split("\n", 1)[1]
    assert out == (
        f"[write] {unit_path} (mode 0644)\n{unit}"
        "[run] systemctl --user daemon-reload\n"
        "[run] systemctl --user enable outpost.service\n"
        "[run] systemctl --user restart outpost.service\n"
        "dry run: nothing was changed\n"
    )
    assert not any(tmp_path.iterdir())

    assert command.run(parse(["service", "uninstall", "--user", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "[run] systemctl --user disable --now outpost.service   (failure ignored)\n" in out
    assert f"[remove] {unit_path}\n" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the Linux plan")
def test_dry_run_shows_a_home_s_control_characters_escaped_and_writes_them_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A home or XDG directory whose name holds an escape sequence or a line break: the
    dry run printed its `config:` line and the unit's `[write]` path raw (the terminal
    cleared, one line shown as two). Shown escaped; the plan keeps the path as it is."""
    skip_unless_installable(system=False)
    home = tmp_path / "h\x1b[2J\nome"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    assert command.run(parse(["service", "install", "--user", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out, out
    config, write = out.splitlines()[:2]
    assert config.startswith(f"config: {printable(str(home / 'config/outpost/agent.toml'))} ")
    unit_path = home / "config/systemd/user/outpost.service"
    assert write == f"[write] {printable(str(unit_path))} (mode 0644)", write
    assert build_plan("install", command.current_target(system=False)).steps[0] == WriteFile(
        str(unit_path), tpl.systemd_unit(os.path.abspath(sys.executable), system=False))
    # A launchd plist names the home's log directory in it: shown escaped, its tabs kept;
    # `launchctl bootstrap` shown as a command that pastes.
    mac = build_plan("install", Target("darwin", False, PY, "/Users/a\u200bb", uid=501))
    text = describe(mac, "darwin")
    assert "\u200b" not in text and "\t<string>/Users/a\\u200bb/Library/Logs/outpost" in text, text
    assert "[run] launchctl bootstrap gui/501 $'/Users/a\\xe2\\x80\\x8bb/Library/" in text, text


REFUSED_IN_A_PLIST = ("\x1b", "\r", "\x00", "\udcff")


@pytest.mark.parametrize("odd", [*REFUSED_IN_A_PLIST, "&<>", "\t", "\x7f", "\u200b", " \u00e5"])
@pytest.mark.parametrize("system", [False, True])
def test_a_launchd_plist_holds_its_paths_as_they_are_or_the_install_is_refused(
        odd: str, system: bool) -> None:
    """A home or an interpreter whose path holds a control character (an escape, a CR), or
    a byte HOME held that is not UTF-8: the plist was written with it raw, and XML holds
    none of those (an ESC made the file unreadable to launchd, `launchctl bootstrap`
    failing with an I/O error; a CR is read back as a line feed, another path; a lone
    surrogate failed the write with a traceback). Refused, in one line, before anything is
    written; what XML can hold is written escaped and read back exactly."""
    home, python = f"/Users/a{odd}b", f"/opt/a{odd}b/bin/python"
    for target in (Target("darwin", system, PY, home, uid=501),
                   Target("darwin", system, python, "/Users/ada", uid=501)):
        try:
            plan = build_plan("install", target)
        except ValueError as exc:
            assert odd in REFUSED_IN_A_PLIST, exc
            assert "launchd" in str(exc) and "\n" not in str(exc), exc
            continue
        write = next(s for s in plan.steps if isinstance(s, WriteFile))
        plist = plistlib.loads(write.content.encode(write.encoding))
        assert plist["ProgramArguments"][0] == target.python
        log_dir = "/Library/Logs/outpost" if system else f"{target.home}/Library/Logs/outpost"
        assert plist["StandardErrorPath"] == f"{log_dir}/outpost.log"


def test_dry_run_describes_user_creation() -> None:
    text = describe(build_plan("install", linux(system=True)), "linux")
    assert "[create user outpost unless it exists]\n[run] useradd --system --user-group" in text
    assert "[write] /etc/systemd/system/outpost.service (mode 0644)\n# Outpost as a system service." in text


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and commands")
def test_executor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a" / "b" / "unit.service"
    gone = tmp_path / "old"
    gone.write_text("x")
    plan = Plan((
        WriteFile(str(target), "[Unit]\n"),
        MakeDir(str(tmp_path / "logs"), 0o700),
        RemoveFile(str(gone)),
        RemoveFile(str(tmp_path / "never-existed")),
        Run(("false",), check=False),
        Run(("true",)),
    ))
    umask = os.umask(0o022)   # the usual one: it made the unit's directories 0755
    try:
        assert execute(plan, "linux") == 0
    finally:
        os.umask(umask)
    assert target.read_text() == "[Unit]\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    # Made private, as XDG has ~/.config/systemd/user made (0700): systemd --user reads
    # it as its owner.
    for made in (tmp_path / "a", target.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
    assert not gone.exists()
    assert "note: false exited 1 (ignored)" in capsys.readouterr().err
    assert [p.name for p in target.parent.iterdir()] == ["unit.service"]  # no temp file left


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX commands")
def test_executor_stops_at_the_first_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    after = tmp_path / "after"
    plan = Plan((Run(("false",)), WriteFile(str(after), "x")))
    assert execute(plan, "linux") == 1
    assert not after.exists()
    assert execute(Plan((Run(("outpost-no-such-command",)),)), "linux") == 1
    assert "outpost service:" in capsys.readouterr().err


@pytest.mark.parametrize("system", [True, False])
def test_an_interpreter_on_a_ram_filesystem_is_refused(system: bool) -> None:
    # /run is a RAM filesystem on every systemd machine: gone at the next boot.
    target = Target("linux", system, "/run/outpost/venv/bin/python", "/home/ada")
    with pytest.raises(ValueError, match="/run/outpost/venv/bin/python is under /run, "
                                         "cleared at reboot"):
        build_plan("install", target)


@pytest.mark.parametrize("system", [False, True])
def test_a_systemd_unit_leaves_the_allocator_to_outpost_run(system: bool) -> None:
    """The unit sets no PYTHONMALLOC: it would keep `outpost run` from re-executing itself
    with the C allocator (agent/server/allocator.py), and a service keeps its memory after
    bursts."""
    unit = tpl.systemd_unit(PY, system=system)
    assert f"ExecStart={PY} -m agent run\n" in unit
    assert "PYTHONMALLOC" not in unit, unit
