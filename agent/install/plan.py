"""`outpost service install|uninstall [--user] [--dry-run]`.

:func:`build_plan` is pure: from the target (OS, user or system scope,
interpreter, home) it computes the files to write and the commands to run, so
every platform's plan can be tested on any platform.  :func:`execute` carries
a plan out; ``--dry-run`` prints it instead.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TypeAlias

import platformdirs

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
    plan = builders[target.os](action == "install", target)
    return Plan(plan.steps, plan.warnings + _unreachable_warnings(action, target))


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
    return Plan((
        # schtasks reads task XML reliably only as UTF-16.
        WriteFile(str(xml), tpl.task_xml(t.python, system=t.system, user=t.user), 0o600, "utf-16"),
        end,
        Run(("schtasks", "/Create", "/TN", tpl.TASK_NAME, "/XML", str(xml), "/F")),
        Run(("schtasks", "/Run", "/TN", tpl.TASK_NAME)),
    ))


def _unreachable_warnings(action: str, t: Target) -> tuple[str, ...]:
    """A system service runs as `outpost`, which cannot read into people's homes."""
    if action != "install" or not t.system or t.os == "win32":
        return ()
    homes = [PurePosixPath(h) for h in ("/home", "/root", "/Users", t.home) if h not in ("", "/")]
    found = [p for p in (t.python, t.package_dir)
             if p and any(PurePosixPath(p).is_relative_to(h) for h in homes)]
    return tuple(
        f"{p} is inside a home directory, which the outpost user cannot read; "
        "install Outpost into a system location (e.g. a venv in /opt/outpost) first"
        for p in found
    )


def _display(argv: tuple[str, ...], os_name: str) -> str:
    return subprocess.list2cmdline(argv) if os_name == "win32" else shlex.join(argv)


def first_free_id(listings: list[str], low: int = 200, high: int = 400) -> int:
    """The lowest id in [low, high) used by no line of `dscl . -list ... <IdAttr>` output."""
    used = {int(f[-1]) for f in (line.split() for text in listings for line in text.splitlines())
            if f and f[-1].isdigit()}
    free = [i for i in range(low, high) if i not in used]
    if not free:
        raise RuntimeError(f"no free system user id in {low}..{high - 1}")
    return free[0]


def describe(plan: Plan, os_name: str) -> str:
    """The dry-run listing: every file in full and every command."""
    out: list[str] = []
    for step in plan.steps:
        if isinstance(step, WriteFile):
            out += [f"[write] {step.path} (mode {step.mode:04o})", step.content.rstrip("\n")]
        elif isinstance(step, RemoveFile):
            out.append(f"[remove] {step.path}")
        elif isinstance(step, MakeDir):
            owner = f", owner {step.owner}" if step.owner else ""
            out.append(f"[mkdir] {step.path} (mode {step.mode:04o}{owner})")
        elif isinstance(step, EnsureUser):
            linux = os_name == "linux"
            cmds = [tpl.useradd_argv(step.name)] if linux else tpl.dscl_argvs(step.name, "<free id>")
            out.append(f"[create user {step.name} unless it exists]")
            out += [f"[run] {_display(c, os_name)}" for c in cmds]
        else:
            suffix = "" if step.check else "   (failure ignored)"
            out.append(f"[run] {_display(step.argv, os_name)}{suffix}")
    return "\n".join(out) + "\n"


def execute(plan: Plan, os_name: str = sys.platform) -> int:
    """Carry out ``plan``; 0 on success, 1 at the first step that fails."""
    for step in plan.steps:
        try:
            _do(step, os_name)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            print(f"outpost service: {exc}", file=sys.stderr)
            return 1
    return 0


def _do(step: Step, os_name: str) -> None:
    if isinstance(step, WriteFile):
        path = Path(step.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(step.content, encoding=step.encoding)
        os.chmod(tmp, step.mode)
        os.replace(tmp, path)  # a unit or plist is never seen half-written
    elif isinstance(step, RemoveFile):
        Path(step.path).unlink(missing_ok=True)
    elif isinstance(step, MakeDir):
        Path(step.path).mkdir(parents=True, exist_ok=True)
        os.chmod(step.path, step.mode)
        if step.owner:
            shutil.chown(step.path, step.owner, step.owner)
    elif isinstance(step, EnsureUser):
        _ensure_user(step.name, os_name)
    elif step.check:
        subprocess.run(step.argv, check=True)
    else:
        done = subprocess.run(step.argv, capture_output=True, text=True)
        if done.returncode:
            why = (done.stderr or done.stdout).strip().splitlines()
            print(f"note: {_display(step.argv, os_name)} exited {done.returncode} (ignored)"
                  + (f": {why[0]}" if why else ""), file=sys.stderr)


def _ensure_user(name: str, os_name: str) -> None:
    import pwd  # POSIX only: system accounts are made on Linux and macOS alone

    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    if os_name == "linux":
        subprocess.run(tpl.useradd_argv(name), check=True)
        return
    listings = [subprocess.run(("dscl", ".", "-list", kind, attr), capture_output=True, text=True,
                               check=True).stdout
                for kind, attr in (("/Users", "UniqueID"), ("/Groups", "PrimaryGroupID"))]
    for argv in tpl.dscl_argvs(name, first_free_id(listings)):
        subprocess.run(argv, check=True)


def current_target(system: bool) -> Target:
    """The target for this machine, this user and this interpreter."""
    import agent

    os_name = "linux" if sys.platform.startswith("linux") else sys.platform
    # Not resolved: a venv's bin/python is a symlink, and resolving it would
    # escape the venv and lose its site-packages.
    python = os.path.abspath(sys.executable)
    if os_name == "win32":
        # pythonw has no console window; agent.logs then writes to a file.
        gui = Path(python).with_name("pythonw.exe")
        python = str(gui) if gui.exists() else python
    domain = os.environ.get("USERDOMAIN")
    return Target(
        os=os_name,
        system=system,
        python=python,
        home=str(Path.home()),
        uid=os.getuid() if hasattr(os, "getuid") else 0,
        user=f"{domain}\\{getpass.getuser()}" if domain else getpass.getuser(),
        config_home=platformdirs.user_config_dir() if os_name in ("linux", "win32") else "",
        package_dir=str(Path(agent.__file__).parent),
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``service install|uninstall [--user] [--dry-run]`` to the CLI."""
    service = subparsers.add_parser("service", help="install or remove Outpost as a system service")
    service.set_defaults(func=run)  # cli.main dispatches on args.func
    actions = service.add_subparsers(dest="service_action", required=True, metavar="{install,uninstall}")
    for name, text in (("install", "install, enable and start the service"),
                       ("uninstall", "stop, disable and remove the service (data is kept)")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("--user", action="store_true",
                         help="a per-user service instead of a machine-wide one")
        sub.add_argument("--dry-run", action="store_true",
                         help="print the files and commands, change nothing")


def run(args: argparse.Namespace) -> int:
    """Run ``outpost service ...``; returns the exit status."""
    try:
        target = current_target(system=not args.user)
        plan = build_plan(args.service_action, target)
    except ValueError as exc:
        print(f"outpost service: {exc}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(describe(plan, target.os), end="")
        print("dry run: nothing was changed")
        return 0
    problem = _preflight(args.service_action, target)
    if problem:
        print(f"outpost service: {problem}", file=sys.stderr)
        return 1
    return execute(plan, target.os)


def _preflight(action: str, t: Target) -> str | None:
    root = t.os == "win32" or os.geteuid() == 0
    if t.system and not root:
        return "a system service needs root: use sudo, or --user for a per-user service"
    if not t.system and t.os != "win32" and os.geteuid() == 0:
        return "--user installs for the invoking user; run it without sudo"
    if action == "install":
        try:
            importlib.metadata.version("outpost-agent")
        except importlib.metadata.PackageNotFoundError:
            return f"outpost-agent is not installed for {t.python}; run `pip install .` first"
    return None
