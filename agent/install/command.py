"""`outpost service install|uninstall [--user] [--dry-run]`: this machine's target,
the preflight checks, then the plan carried out or printed."""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import platformdirs

from agent import paths, preflight
from agent.config import ConfigError, load_file
from agent.install import templates as tpl
from agent.install.execute import describe, execute
from agent.install.plan import Target, build_plan
from agent.terminal import printable, shell_arg


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
    try:
        user = getpass.getuser()
    except (KeyError, OSError):   # no USER and no passwd entry: only the Windows task names it
        user = str(os.getuid()) if hasattr(os, "getuid") else ""
    return Target(
        os=os_name,
        system=system,
        python=python,
        home=str(paths.home()),
        uid=os.getuid() if hasattr(os, "getuid") else 0,
        user=f"{domain}\\{user}" if domain else user,
        config_home=_user_config_home() if os_name in ("linux", "win32") else "",
        package_dir=str(Path(agent.__file__).parent),
        program_data=os.environ.get("PROGRAMDATA", r"C:\ProgramData"),
    )


def _user_config_home() -> str:
    try:
        return platformdirs.user_config_dir()
    except RuntimeError:   # platformdirs: "could not determine the home directory"
        raise paths.NoHome() from None


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
    except ValueError as exc:   # the interpreter's path shown escaped: one line
        print(f"outpost service: {printable(str(exc))}", file=sys.stderr)
        return 2
    for warning in plan.warnings:   # the interpreter's path: escaped, as every line here
        print(f"warning: {printable(warning)}", file=sys.stderr)
    if args.service_action == "install" and (invalid := _invalid_config(target)):
        print(f"outpost service: {printable(invalid)}", file=sys.stderr)
        return 2
    problem = None if args.dry_run else _preflight(args.service_action, target)
    if problem:
        print(f"outpost service: {printable(problem)}", file=sys.stderr)
        return 2
    if args.service_action == "install":
        print(printable(_config_line(target)))   # a path from HOME or XDG_CONFIG_HOME
    if args.dry_run:
        print(describe(plan, target.os), end="")
        print("dry run: nothing was changed")
        return 0
    return execute(plan, target.os)


def _config_line(t: Target) -> str:
    """Which config the service will read, and whether it is there yet."""
    path = paths.config_dir(system=t.system) / "agent.toml"
    if path.is_file():
        arg = shell_arg(path)
        if t.system and t.os != "win32" and (shut := _closed_to_service(path.parent, 0o1)):
            return (f"config: {path} (exists, in a directory of {shut}: the service's user "
                    f"{tpl.SERVICE_USER} cannot read it, and the service would stop at each "
                    f"start: `sudo chmod 0755 {shell_arg(path.parent)}`)")
        if t.system and t.os != "win32" and (locked := _closed_to_service(path, 0o4)):
            return (f"config: {path} (exists, {locked}: the service's user {tpl.SERVICE_USER} "
                    f"cannot read it, and the service would stop at each start; once installed: "
                    f"`sudo chgrp {tpl.SERVICE_USER} {arg} && sudo chmod 0640 {arg}`)")
        return f"config: {path} (exists; check it with `outpost check-config {arg}`)"
    init = "sudo outpost config init" if t.system and t.os != "win32" else "outpost config init"
    return (f"config: {path} (not found: the service starts with the built-in defaults and no "
            f"upstream, keeping events until one is configured; `{init}` writes one)")


def _invalid_config(t: Target) -> str | None:
    """Why the service's config does not validate, if it does not (check-config's line:
    loaded, then the checks `run` makes before it starts): install restarts the service
    (an upgrade's install too), which would stop the running agent for one that exits at
    every start."""
    path = paths.config_dir(system=t.system) / "agent.toml"
    if not path.is_file():
        return None
    try:
        cfg = load_file(path)
    except ConfigError as exc:
        if isinstance(exc.__cause__, OSError):   # unreadable by this user: _config_line says
            return None
        problem = str(exc)
    else:
        if t.system and t.os == "linux" and (outside := preflight.outside_unit(cfg)):
            return f"{outside}; then run install again"
        # Checked as this user: not for a system service's dry run without root, whose
        # access to storage.path is not the service's (a real install needs root).
        as_installer = not t.system or t.os == "win32" or os.geteuid() == 0
        if not as_installer or not (found := preflight.problems(cfg)):
            return None
        problem = found[0]
    return (f"{problem}; the service would not start with it: fix it (`outpost check-config "
            f"{shell_arg(path)}`), then run install again")


def _closed_to_service(path: Path, bit: int) -> str | None:
    """Its mode and owners, if the service's user has the permission ``bit`` (0o4 read, 0o1
    search) by none of them: as `sudo outpost config init` leaves the file before that user
    exists (0600 root:root), or a hardened umask a directory (0750 root:root)."""
    import grp
    import pwd

    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    try:
        gid: int | None = grp.getgrnam(tpl.SERVICE_USER).gr_gid
    except KeyError:   # made by the install, after this
        gid = None
    try:
        uid: int | None = pwd.getpwnam(tpl.SERVICE_USER).pw_uid
    except KeyError:
        uid = None
    if mode & bit or (mode & bit << 3 and st.st_gid == gid) or (mode & bit << 6 and st.st_uid == uid):
        return None
    owner = _name(pwd.getpwuid, st.st_uid)
    group = _name(grp.getgrgid, st.st_gid)
    return f"mode {mode:04o} {owner}:{group}"


def _name(lookup: Callable[[int], Any], number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def _session_bus_missing() -> bool:
    """`systemctl --user` talks to the user manager over the session bus; `su` and
    `sudo -u` give a shell without one."""
    if os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return False
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return not (runtime and (Path(runtime) / "bus").exists())


def _preflight(action: str, t: Target) -> str | None:
    if not t.system and t.os == "linux" and _session_bus_missing():
        return ("--user needs a user session bus and there is none (su and sudo -u do not start "
                "one): log in as that user directly (ssh, a desktop) or use `sudo machinectl "
                "shell USER@`, then run this again")
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
