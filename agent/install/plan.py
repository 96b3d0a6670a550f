"""What `outpost service install|uninstall` does, as a value.

:func:`build_plan` is pure: from the target (OS, user or system scope,
interpreter, home) it computes the files to write and the commands to run, so
every platform's plan can be tested on any platform.  :mod:`agent.install.execute`
carries a plan out or lists it; :mod:`agent.install.command` is the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import TypeAlias

from agent.install import templates as tpl


@dataclass(frozen=True)
class Target:
    """Where and for whom the service is installed."""

    os: str  # "linux" | "darwin" | "win32"
    system: bool
    python: str
    home: str
    uid: int = 0  # the launchd gui/<uid> domain
    user: str = ""  # Windows account (DOMAIN\\name) whose logon starts the task
    config_home: str = ""  # XDG_CONFIG_HOME on Linux, %LOCALAPPDATA% on Windows
    package_dir: str = ""  # where `import agent` resolves for ``python``
    program_data: str = r"C:\ProgramData"  # %ProgramData% on Windows


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: str
    mode: int = 0o644
    encoding: str = "utf-8"


@dataclass(frozen=True)
class RemoveFile:
    path: str


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: int = 0o700
    owner: str | None = None


@dataclass(frozen=True)
class EnsureUser:
    """Create the dedicated system account unless it already exists."""

    name: str


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    check: bool = True  # False: a failure is reported and the plan goes on


Step: TypeAlias = WriteFile | RemoveFile | MakeDir | EnsureUser | Run


@dataclass(frozen=True)
class Plan:
    """What an install or uninstall does, in order."""

    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()


def build_plan(action: str, target: Target) -> Plan:
    """The steps for ``action`` ("install" or "uninstall") on ``target``."""
    if action not in ("install", "uninstall"):
        raise ValueError(f"unknown service action {action!r}")
    builders = {"linux": _linux_plan, "darwin": _macos_plan, "win32": _windows_plan}
    if target.os not in builders:
        raise ValueError(f"no service support for {target.os!r}")
    if action == "install" and (problem := _unreachable(target)):
        raise ValueError(problem)
    return builders[target.os](action == "install", target)


def _linux_plan(install: bool, t: Target) -> Plan:
    scope = () if t.system else ("--user",)
    if t.system:
        unit = PurePosixPath("/etc/systemd/system/outpost.service")
    else:
        unit = PurePosixPath(t.config_home or f"{t.home}/.config") / "systemd/user/outpost.service"
    ctl = ("systemctl", *scope)
    if not install:
        return Plan((
            Run((*ctl, "disable", "--now", "outpost.service"), check=False),
            RemoveFile(str(unit)),
            Run((*ctl, "daemon-reload")),
        ))
    user = (EnsureUser(tpl.SERVICE_USER),) if t.system else ()
    # restart rather than `enable --now`, so that re-running install after an
    # upgrade also replaces the running (old) code.
    return Plan((
        *user,
        WriteFile(str(unit), tpl.systemd_unit(t.python, system=t.system)),
        Run((*ctl, "daemon-reload")),
        Run((*ctl, "enable", "outpost.service")),
        Run((*ctl, "restart", "outpost.service")),
    ))


def _macos_plan(install: bool, t: Target) -> Plan:
    if t.system:
        label, domain = tpl.DAEMON_LABEL, "system"
        plist = PurePosixPath("/Library/LaunchDaemons") / f"{label}.plist"
        log_dir = PurePosixPath("/Library/Logs/outpost")
    else:
        label, domain = tpl.AGENT_LABEL, f"gui/{t.uid}"
        plist = PurePosixPath(t.home) / "Library/LaunchAgents" / f"{label}.plist"
        log_dir = PurePosixPath(t.home) / "Library/Logs/outpost"
    # bootout is allowed to fail: on a first install there is nothing loaded.
    bootout = Run(("launchctl", "bootout", f"{domain}/{label}"), check=False)
    if not install:
        return Plan((bootout, RemoveFile(str(plist))))
    owner = tpl.SERVICE_USER if t.system else None
    dirs: tuple[EnsureUser | MakeDir, ...] = (MakeDir(str(log_dir), 0o700, owner),)
    if t.system:
        # launchd has no StateDirectory=: create the platformdirs site dir for the daemon.
        app_dir = MakeDir("/Library/Application Support/outpost", 0o700, owner)
        dirs = (EnsureUser(tpl.SERVICE_USER), app_dir, *dirs)
    return Plan((
        *dirs,
        WriteFile(str(plist), tpl.launchd_plist(t.python, system=t.system, log_dir=str(log_dir))),
        bootout,
        Run(("launchctl", "bootstrap", domain, str(plist))),
    ))


def _windows_plan(install: bool, t: Target) -> Plan:
    # The task definition goes in the *invoking* account's private directory,
    # never under ProgramData, where any user may create files.
    xml = PureWindowsPath(t.config_home or PureWindowsPath(t.home, "AppData", "Local"))
    xml = xml / "outpost" / "outpost-task.xml"
    end = Run(("schtasks", "/End", "/TN", tpl.TASK_NAME), check=False)
    if not install:
        delete = Run(("schtasks", "/Delete", "/TN", tpl.TASK_NAME, "/F"), check=False)
        return Plan((end, delete, RemoveFile(str(xml))))
    lockdown: tuple[Step, ...] = ()
    warnings: tuple[str, ...] = ()
    if t.system:
        # %ProgramData%\outpost would inherit an ACL every local user can read: the spool
        # and config are for SYSTEM and Administrators only.
        data = str(PureWindowsPath(t.program_data, "outpost"))
        lockdown = (MakeDir(data), Run(tpl.icacls_argv(data)))
        if not _under_program_files(t.python):
            warnings = (f"{t.python} is outside Program Files: SYSTEM will run code from a "
                        "directory other users may be able to change; install Outpost into a "
                        r"venv under C:\Program Files\Outpost instead",)
    return Plan((
        *lockdown,
        # schtasks reads task XML reliably only as UTF-16.
        WriteFile(str(xml), tpl.task_xml(t.python, system=t.system, user=t.user), 0o600, "utf-16"),
        end,
        Run(("schtasks", "/Create", "/TN", tpl.TASK_NAME, "/XML", str(xml), "/F")),
        Run(("schtasks", "/Run", "/TN", tpl.TASK_NAME)),
    ), warnings)


def _unrunnable_by_systemd(python: str) -> str | None:
    """The first character of ``python`` an ExecStart= executable cannot hold, named."""
    for c in python:
        if c in "'\"\\$" or not c.isprintable():
            return repr(c)
    return None


def _unwritable_in_a_plist(path: str) -> str | None:
    """The first character of ``path`` a launchd plist cannot hold as it is, named: what
    XML 1.0 has no character for (a control character but tab and line feed, a lone
    surrogate from a HOME that is not UTF-8), and a CR, which a parser reads as a line feed."""
    for c in path:
        if (c < " " and c not in "\t\n") or "\ud800" <= c <= "\udfff" or c in "\ufffe\uffff":
            return repr(c)
    return None


def _under_program_files(python: str) -> bool:
    parts = PureWindowsPath(python).parts
    return len(parts) > 1 and parts[1].lower() in ("program files", "program files (x86)")


def _unreachable(t: Target) -> str | None:
    """An interpreter the service cannot start from: refused before anything is written.

    /tmp and the RAM filesystems (/dev/shm, /run) are cleared at reboot (and the system
    unit's PrivateTmp= and PrivateDevices= hide /tmp and /dev/shm); a system
    service's ProtectHome= hides /home and /root, which the outpost user cannot read anyway.
    Said in the words of the scope asked for: a user service has its own fix.
    """
    if t.os == "win32":
        return None
    if t.os == "linux" and (odd := _unrunnable_by_systemd(t.python)):
        # systemd refuses an executable named with ' " \ or a control character, even
        # quoted, and takes $$ there literally (no $ expansion in it): the unit written
        # would never start (ExecStart= ignored, or no such file).
        return (f"{t.python} holds {odd}, which systemd cannot run an ExecStart= executable "
                "from: install Outpost into a directory whose path has none, e.g. a venv in "
                + ("/opt/outpost" if t.system else "~/.local/outpost"))
    if t.os == "darwin":
        # The log directory is under the home for a user's agent alone.
        for path in (t.python, "" if t.system else t.home):
            if odd := _unwritable_in_a_plist(path):
                return (f"{path} holds {odd}, which the launchd property list naming it "
                        "cannot hold as it is: "
                        + ("install Outpost into a directory whose path has none"
                           if path == t.python else "a per-user service logs under the home; "
                           "install the system service (without --user), or set HOME to a "
                           "path without it"))
    if t.system:
        fails = "the system service could not start"
        fix = "install Outpost into a lasting system location first, e.g. a venv in /opt/outpost"
        hidden = [("/tmp", "cleared at reboot and hidden from the system service (PrivateTmp=)"),
                  ("/var/tmp", "cleared by tmpfiles and hidden from the system service (PrivateTmp=)"),
                  ("/dev/shm", "cleared at reboot and hidden from the system service "
                               "(PrivateDevices=)"),
                  ("/run", "cleared at reboot")]
        homes = {h for h in ("/home", "/root", "/Users", t.home) if h not in ("", "/")}
        hidden += [(h, "a home directory, hidden from the system service (ProtectHome=) and "
                       "unreadable by the outpost user") for h in sorted(homes)]
    else:   # the user unit has no PrivateTmp= (templates.py): only the clearing matters
        fails = "the user service would not start once it is"
        fix = "install Outpost into a lasting place of your own first, e.g. a venv in ~/.local/outpost"
        hidden = [("/tmp", "cleared at reboot"), ("/var/tmp", "cleared by tmpfiles"),
                  ("/dev/shm", "cleared at reboot"), ("/run", "cleared at reboot")]
    for path in (t.python, t.package_dir):
        for root, why in hidden:
            if path and PurePosixPath(path).is_relative_to(root):
                return f"{path} is under {root}, {why}: {fails}; {fix}"
    return None
