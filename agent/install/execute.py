"""Carry out a service plan (:func:`execute`) or list it for ``--dry-run`` (:func:`describe`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from agent import paths
from agent.install import templates as tpl
from agent.install.plan import EnsureUser, MakeDir, Plan, RemoveFile, Step, WriteFile
from agent.terminal import printable, shell_arg


def _display(argv: tuple[str, ...], os_name: str) -> str:
    """A command as one pasteable line (shell_arg: `$'...'` for what printable escapes)."""
    if os_name == "win32":
        return printable(subprocess.list2cmdline(argv))
    return " ".join(map(shell_arg, argv))


def _file_text(content: str) -> str:
    """A file's text as printable shows it, line by line, its tabs (a plist's indent) kept."""
    return "\n".join("\t".join(map(printable, line.split("\t")))
                     for line in content.rstrip("\n").split("\n"))


def first_free_id(listings: list[str], low: int = 200, high: int = 400) -> int:
    """The lowest id in [low, high) used by no line of `dscl . -list ... <IdAttr>` output."""
    used = {int(f[-1]) for f in (line.split() for text in listings for line in text.splitlines())
            if f and f[-1].isdigit()}
    free = [i for i in range(low, high) if i not in used]
    if not free:
        raise RuntimeError(f"no free system user id in {low}..{high - 1}")
    return free[0]


def describe(plan: Plan, os_name: str) -> str:
    """The dry-run listing: every file in full and every command. What they name from the
    environment (HOME, XDG_CONFIG_HOME: an escape sequence, a line break) is shown escaped;
    the plan carries it out as it is."""
    out: list[str] = []
    for step in plan.steps:
        if isinstance(step, WriteFile):
            out += [f"[write] {printable(step.path)} (mode {step.mode:04o})",
                    _file_text(step.content)]
        elif isinstance(step, RemoveFile):
            out.append(f"[remove] {printable(step.path)}")
        elif isinstance(step, MakeDir):
            owner = f", owner {step.owner}" if step.owner else ""
            out.append(f"[mkdir] {printable(step.path)} (mode {step.mode:04o}{owner})")
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
        # Made 0700, as XDG has ~/.config/systemd/user made, and the project's own
        # directories are: a user manager (systemd --user, launchd's agent) reads it as its
        # owner, and the system's directories (/etc/systemd/system) exist.
        paths.make_private_dir(path.parent)
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
