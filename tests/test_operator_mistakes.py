"""Issue 14 §1, §5, §6: every operator mistake is one line naming the problem and the fix, with
the exit code docs/operations.md documents (2: the config or the environment is wrong; 1: a
runtime failure; 0: ok). Each runs the real `python -m agent` command."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import site
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, skip_unless_installable, write_config

EXIT_CONFIG = 2


def outpost(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
            python: str = sys.executable, timeout: float = 30) -> tuple[int, str]:
    run = subprocess.run([python, "-m", "agent", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return run.returncode, run.stdout + run.stderr


def one_line(out: str) -> str:
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


# -- §1 storage --------------------------------------------------------------------------------

def test_an_unwritable_storage_path_is_one_line_from_run_and_check_config(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool directory should be")
    cfg = write_config(tmp_path / "agent.toml", blocker / "spool" / "spool.db")
    for command in (("run", "--config", str(cfg)), ("check-config", str(cfg))):
        code, out = outpost(*command)
        line = one_line(out)
        assert code == EXIT_CONFIG, out
        assert "storage.path" in line and str(blocker) in line, line
        assert "cannot" in line and "set storage.path" in line, line


def test_a_relative_storage_path_is_the_same_spool_from_any_working_directory(
        tmp_path: Path, agent_process: Any) -> None:
    """`path = "data/spool.db"` was taken from each command's working directory: the agent
    started beside its config made conf/data/spool.db, and `outpost status --config` run
    from anywhere else (the service's is /) read another spool, not there: "no spool yet"."""
    conf = tmp_path / "conf"
    conf.mkdir()
    port = free_port()
    cfg = write_config(conf / "agent.toml", Path("data") / "spool.db", port=port)
    agent = agent_process(cfg, port, by_lookup=True).start()   # from conf/, as ./agent.toml
    assert agent.terminate() == 0
    assert (conf / "data" / "spool.db").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out = outpost("status", "--json", "--config", str(cfg), cwd=elsewhere)
    assert code == 0, out
    status = json.loads(out)
    assert status["source"] == "spool, no agent running", status["source"]
    assert status["spool"]["path"] == str(conf / "data" / "spool.db")
    assert not (elsewhere / "data").exists()


@pytest.mark.parametrize("spool", ["agent.toml", "ABS"])
def test_a_storage_path_naming_the_config_file_itself_is_refused_and_the_file_kept(
        tmp_path: Path, spool: str) -> None:
    """check-config said ok, and the agent took the config for a corrupt spool: moved it
    aside to agent.toml.corrupt-*, and wrote a database where it was, which the next start
    or reload refused as not a config (not UTF-8)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[listen]\nport = {free_port()}\n[storage]\npath = '
                   f'"{cfg if spool == "ABS" else spool}"\n')
    text = cfg.read_text()
    for command in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        code, out = outpost(*command)
        line = one_line(out)
        assert code == EXIT_CONFIG, out
        assert "storage.path" in line and "config file itself" in line, line
    assert cfg.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file modes")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cfg = write_config(tmp_path / "agent.toml", locked / "spool.db")
    code, out = outpost("run", "--config", str(cfg))
    assert code == EXIT_CONFIG and "storage.path" in one_line(out), out


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def _run_on_read_only(tmp_path: Path, ro: Path, spool: Path | None = None) -> str:
    """`outpost run` with ``ro`` mounted read-only (as ProtectSystem=strict does), its spool
    under it (or ``spool``, a path leading there): its one line, once it exits with
    EXIT_CONFIG."""
    cfg = write_config(tmp_path / "agent.toml", spool or ro / "outpost" / "spool.db")
    script = (f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(ro))} && "
              f"exec {sys.executable} -m agent run --config {shlex.quote(str(cfg))}")
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == EXIT_CONFIG, line
    return line


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces")
def test_a_read_only_filesystem_says_a_readwritepaths_drop_in_is_needed(tmp_path: Path) -> None:
    # What ProtectSystem=strict does to a storage.path outside /var/lib/outpost: a read-only mount.
    ro = tmp_path / "ro"
    ro.mkdir()
    line = _run_on_read_only(tmp_path, ro)
    assert "read-only" in line and "ReadWritePaths=" in line and "systemctl edit outpost" in line, line


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces")
def test_a_symlinked_storage_path_into_a_read_only_filesystem_is_said_so(tmp_path: Path) -> None:
    """storage.path a symlink, in a writable directory, to a spool on a read-only mount. The
    checks looked at the link's directory: check-config said ok, and `outpost run` failed
    at the lock file with "Read-only file system; remove it, or give this user access",
    of a file that is not there. The line is the one a path named directly gets."""
    ro = tmp_path / "ro"
    ro.mkdir()
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(ro / "spool.db")
    line = _run_on_read_only(tmp_path, ro, link)
    assert "read-only filesystem" in line and f"ReadWritePaths={ro}" in line, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("unshare") is None,
                    reason="needs systemd-analyze and unshare")
@pytest.mark.parametrize("name", ["my spools", "100%"])
def test_the_readwritepaths_line_suggested_is_one_systemd_reads_as_that_directory(
        tmp_path: Path, name: str) -> None:
    """`ReadWritePaths=/srv/my spools/outpost`, as suggested, is two paths to systemd: /srv/my
    made writable, "spools/outpost" ignored as not absolute; and %s a specifier."""
    ro = tmp_path / name
    ro.mkdir()
    line = _run_on_read_only(tmp_path, ro)
    suggested = re.search(r"`(ReadWritePaths=[^`]*)`", line)
    assert suggested, line
    unit = tmp_path / "check.service"
    unit.write_text(f"[Service]\nExecStart=/bin/true\n{suggested[1]}\n")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    said = verify.stdout + verify.stderr
    assert "ReadWritePaths" not in said, said
    # What systemd reads, unquoted and unescaped: the directory itself.
    assert suggested[1] in (f'ReadWritePaths="{ro / "outpost"}"',
                            f"ReadWritePaths={str(ro / 'outpost').replace('%', '%%')}"), line


# -- §1 listen.host ----------------------------------------------------------------------------

def test_check_config_catches_an_unresolvable_listen_host(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"host": "no-such-host.invalid"})
    code, out = outpost("check-config", str(cfg))
    line = one_line(out)
    assert code == EXIT_CONFIG, out
    assert "listen.host" in line and "no-such-host.invalid" in line and "127.0.0.1" in line, line


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "[::1]", "localhost/"])
def test_a_listen_host_with_url_parts_is_one_line_from_every_command(tmp_path: Path,
                                                                    host: str) -> None:
    """A port (or brackets, a slash) written into listen.host: `run` and check-config refused
    it as a host that does not resolve, but the commands that reach the agent wrote it into
    its URL: `outpost tail` and `outpost dead` failed with a traceback, `flush` said no agent
    answered, and `status` showed the spool as if the agent were only stopped."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", listen={"host": host})
    for command in (["tail"], ["dead", "list"], ["dead", "retry", "--all"], ["flush"],
                    ["status"], ["check-config"]):
        code, out = outpost(*command, "--config", str(cfg))
        line = one_line(out)
        assert code == EXIT_CONFIG, (command, out)
        assert "listen.host" in line and "listen.port" in line, (command, line)


# -- §1 exit codes -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "status", "doctor", "flush", "check-config"])
def test_a_bad_config_exits_2_from_every_command(tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[listen]\nport = \"eighty\"\n")
    args = (command, str(cfg)) if command == "check-config" else (command, "--config", str(cfg))
    code, out = outpost(*args)
    assert code == EXIT_CONFIG, out
    assert "listen.port" in one_line(out)


def test_the_exit_codes_are_documented() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    section = ops[ops.index("## Exit codes"):]
    for code in ("`0`", "`1`", "`2`"):
        assert code in section


# -- §1 service install ------------------------------------------------------------------------

# Each place cleared at reboot, with what hides it from the system unit.
CLEARED = [("/tmp", "PrivateTmp="), ("/dev/shm", "PrivateDevices=")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
@pytest.mark.parametrize("scope", [[], ["--user"]])
@pytest.mark.parametrize(("root", "hidden_by"), CLEARED)
def test_service_install_from_an_interpreter_cleared_at_reboot_is_refused_before_writing(
        tmp_path: Path, scope: list[str], root: str, hidden_by: str) -> None:
    if not os.access(root, os.W_OK):
        pytest.skip(f"{root} is not writable here")
    # Under the root itself: tmp_path may be elsewhere (conftest puts it on /dev/shm).
    with tempfile.TemporaryDirectory(dir=root, prefix="outpost-test-") as under_root:
        python = Path(under_root) / "python"
        python.symlink_to(sys.executable)
        config_home = tmp_path / "config"
        # No tools on PATH: were the refusal to fail, the install's first step (useradd,
        # as root) fails too, and nothing is written to the machine running the tests.
        no_tools = tmp_path / "no-tools"
        no_tools.mkdir()
        # The symlink is outside the venv, so the venv's packages come by PYTHONPATH.
        code, out = outpost("service", "install", *scope, python=str(python),
                            env={"PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()]),
                                 "XDG_CONFIG_HOME": str(config_home), "PATH": str(no_tools)})
        line = one_line(out)
        assert code == EXIT_CONFIG, out
        assert str(python) in line and f"under {root}," in line and "cleared at reboot" in line, line
        if scope:   # a user service is not sandboxed, and a venv of the user's own will do
            assert "user service" in line and "~/.local/outpost" in line, line
            assert "system" not in line and hidden_by not in line, line
        else:
            assert f"system service ({hidden_by})" in line and "/opt/outpost" in line, line
        assert not config_home.exists()


def test_a_system_service_from_a_home_directory_is_refused() -> None:
    from agent.install.plan import Target, build_plan

    target = Target("linux", True, "/home/ada/venv/bin/python", "/home/ada",
                    package_dir="/home/ada/venv/lib/python3.11/site-packages/agent")
    with pytest.raises(ValueError, match="ProtectHome"):
        build_plan("install", target)
    target = Target("linux", True, "/root/venv/bin/python", "/root")
    with pytest.raises(ValueError, match="/root"):
        build_plan("install", target)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_a_user_install_without_a_session_bus_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    skip_unless_installable(system=False)
    config_home = tmp_path / "config"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    run = subprocess.run([sys.executable, "-m", "agent", "service", "install", "--user"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, env=env)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == EXIT_CONFIG, line
    assert "session bus" in line and "machinectl shell" in line, line
    assert not config_home.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_service_install_says_which_config_it_will_use(tmp_path: Path) -> None:
    skip_unless_installable(system=True)
    code, out = outpost("service", "install", "--dry-run")
    assert code == 0, out
    assert re.search(r"^config: /etc/outpost/agent\.toml \((exists|not found)", out, re.M), out



@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="a machine-wide install, as root")
def test_a_system_install_says_when_the_service_user_cannot_read_the_config(
        tmp_path: Path) -> None:
    # `sudo outpost config init` before the outpost user exists writes 0600 root:root,
    # and says `outpost service install` would share it; the service, as outpost, could
    # not read it and would exit 2 at every start.
    skip_unless_installable(system=True)
    import grp
    with contextlib.suppress(KeyError):
        grp.getgrnam("outpost")
        pytest.skip("an outpost group exists here: config init shares the file with it")
    # Made by config init, 0755: pytest's tmp_path is 0700, which the outpost user could not search.
    where = {"CONFIGURATION_DIRECTORY": str(tmp_path / "etc"), "OUTPOST_SYSTEM": "1"}
    code, out = outpost("config", "init", env=where)
    config = tmp_path / "etc" / "agent.toml"
    assert code == 0 and stat.S_IMODE(config.stat().st_mode) == 0o600, out
    assert "after `outpost service install`, `chgrp outpost FILE && chmod 0640 FILE`" in out, out
    code, out = outpost("service", "install", "--dry-run", env=where)
    assert code == 0, out
    line = out.splitlines()[0]
    assert line.startswith(f"config: {config} (exists"), line
    assert "outpost cannot read it" in line and f"chmod 0640 {config}" in line, line
    # Readable by every user: nothing to say.
    config.chmod(0o644)
    code, out = outpost("service", "install", "--dry-run", env=where)
    assert "cannot read" not in out.splitlines()[0], out

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_install_refuses_a_config_this_version_would_not_start_with(tmp_path: Path) -> None:
    """An upgrade runs install again, which restarts the service: with a config the new
    version refuses (credentials in an upstream url, accepted by older ones), the old agent
    was stopped and the new one exited 2 at every start. Install said only `(exists; check
    it with ...)`. Shown with --dry-run, which carries nothing out whatever it says."""
    skip_unless_installable(system=False)
    config = tmp_path / "xdg" / "outpost" / "agent.toml"
    config.parent.mkdir(parents=True)
    where = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "OUTPOST_SYSTEM": "0"}
    config.write_text('[[upstream]]\nname = "seg"\nprotocol = "segment-http"\n'
                      'url = "https://user:SECRET_PW@api.segment.io"\n')
    code, out = outpost("service", "install", "--user", "--dry-run", env=where)
    line = one_line(out)
    assert code == EXIT_CONFIG, out
    assert str(config) in line and "upstream[0].url" in line and "check-config" in line, line
    assert "SECRET_PW" not in line
    config.write_text('[[upstream]]\nname = "seg"\nprotocol = "segment-http"\n'
                      'url = "https://api.segment.io"\n')
    code, out = outpost("service", "install", "--user", "--dry-run", env=where)
    assert code == 0 and f"config: {config} (exists" in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_install_refuses_a_config_that_fails_run_s_checks_as_check_config_does(
        tmp_path: Path) -> None:
    """A config that loads but fails the checks `run` makes before it starts (here a
    storage.path under a regular file) was installed, and the service exited 2 at every
    start. Install refuses it with check-config's line and exit status."""
    skip_unless_installable(system=False)
    config = tmp_path / "xdg" / "outpost" / "agent.toml"
    config.parent.mkdir(parents=True)
    (tmp_path / "file").write_text("")
    config.write_text(f'[storage]\npath = "{tmp_path}/file/spool.db"\n')
    where = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "OUTPOST_SYSTEM": "0"}
    checked, said = outpost("check-config", str(config))
    assert checked == EXIT_CONFIG, said
    code, out = outpost("service", "install", "--user", "--dry-run", env=where)
    line = one_line(out)
    assert code == checked, out
    assert one_line(said).removeprefix("outpost: ") in line and "install again" in line, line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_a_system_install_refuses_a_storage_path_the_unit_does_not_let_the_service_write(
        tmp_path: Path) -> None:
    """Install checked storage.path as root, outside the unit's sandbox: /srv/outpost
    passed, and the service (ProtectSystem=strict: /var/lib/outpost alone writable) found
    it read-only and exited 2 at every start, the running agent stopped for it."""
    skip_unless_installable(system=True)
    config = tmp_path / "etc" / "agent.toml"
    config.parent.mkdir()
    spool = tmp_path / "srv" / "spool.db"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    where = {"CONFIGURATION_DIRECTORY": str(config.parent), "OUTPOST_SYSTEM": "1"}
    code, out = outpost("service", "install", "--dry-run", env=where)
    line = one_line(out)
    assert code == EXIT_CONFIG, out
    assert str(spool) in line and "/var/lib/outpost" in line, line
    assert f"ReadWritePaths={spool.parent}" in line and "install again" in line, line
    config.write_text('[storage]\npath = ""\n')   # the state directory's spool.db
    code, out = outpost("service", "install", "--dry-run", env=where)
    assert code == 0, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_check_config_of_the_system_service_s_file_notes_a_storage_path_it_cannot_write(
        tmp_path: Path) -> None:
    """`sudo outpost check-config /etc/outpost/agent.toml`, as install suggests, said ok
    to a storage.path the unit's sandbox keeps the service from writing (checked as root):
    the restart that followed left the service exiting at every start."""
    config = tmp_path / "etc" / "agent.toml"
    config.parent.mkdir()
    spool = tmp_path / "srv" / "spool.db"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    where = {"CONFIGURATION_DIRECTORY": str(config.parent)}
    code, out = outpost("check-config", str(config), env=where)
    assert code == 0, out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "system service" in notes[0], out
    assert str(spool) in notes[0] and f"ReadWritePaths={spool.parent}" in notes[0], out
    code, out = outpost("check-config", str(config))   # not the system service's file
    assert code == 0 and "note:" not in out, out


def test_a_drop_in_s_read_write_paths_let_the_service_write_storage_path(tmp_path: Path) -> None:
    """The fix the refusal names (a drop-in's ReadWritePaths=) passes the next install, an
    upgrade's included; an empty ReadWritePaths= clears those before it, as in systemd."""
    from agent.config import load_file
    from agent.preflight import outside_unit

    drop_ins = tmp_path / "outpost.service.d"
    drop_ins.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text('[storage]\npath = "/srv/outpost/spool.db"\n')
    cfg = load_file(config)
    assert outside_unit(cfg, drop_ins) is not None
    (drop_ins / "override.conf").write_text(
        "[Unit]\nReadWritePaths=/elsewhere\n[Service]\nReadWritePaths=-/srv/outpost /opt/x\n")
    assert outside_unit(cfg, drop_ins) is None
    (drop_ins / "zz.conf").write_text("[Service]\nReadWritePaths=\nReadWritePaths=/opt/x\n")
    assert outside_unit(cfg, drop_ins) is not None
    config.write_text('[storage]\npath = "/var/lib/outpost/sub/spool.db"\n')
    assert outside_unit(load_file(config), drop_ins) is None


def test_a_symlinked_storage_path_is_judged_by_the_directory_of_the_file_it_names(
        tmp_path: Path) -> None:
    """storage.path a symlink (a spool moved to a bigger disk and linked back): the agent
    writes beside the file it names (its -wal, its lock file, a fresh spool after a
    salvage), so that is the directory the unit must let the service write. The link's own
    was checked: a link in a writable directory to a file outside passed install and
    check-config, and the service exited at every start; the opposite was refused."""
    from agent.config import load_file
    from agent.preflight import outside_unit

    drop_ins = tmp_path / "outpost.service.d"
    allowed, outside = tmp_path / "allowed", tmp_path / "srv"
    for made in (drop_ins, allowed, outside):
        made.mkdir()
    (drop_ins / "storage.conf").write_text(f"[Service]\nReadWritePaths={allowed}\n")
    config = tmp_path / "agent.toml"
    link = allowed / "spool.db"
    link.symlink_to(outside / "spool.db")
    config.write_text(f'[storage]\npath = "{link}"\n')
    said = outside_unit(load_file(config), drop_ins)
    assert said is not None and f"ReadWritePaths={outside}`" in said, said
    link.unlink()
    (outside / "spool.db").symlink_to(link)
    config.write_text(f'[storage]\npath = "{outside / "spool.db"}"\n')
    assert outside_unit(load_file(config), drop_ins) is None


def test_a_drop_in_that_eases_protect_system_or_adds_a_state_directory_is_heeded(
        tmp_path: Path) -> None:
    """Drop-ins other than ReadWritePaths= let the service write a storage.path too: a
    ProtectSystem= other than strict (only /usr, /boot, /efi read-only; /etc too for
    "full"), and a StateDirectory= of its own. Install (an upgrade's) refused such a setup
    as one that "would exit at every start", and check-config noted it so; what stays
    unwritable or lost is still refused: /usr under any ProtectSystem= but "no", /etc
    under "full", a home (ProtectHome=), /tmp (PrivateTmp=: emptied at each stop)."""
    from agent.config import load_file
    from agent.preflight import outside_unit

    drop_ins = tmp_path / "outpost.service.d"
    drop_ins.mkdir()
    config = tmp_path / "agent.toml"

    def refused(spool: str) -> bool:
        config.write_text(f'[storage]\npath = "{spool}"\n')
        return outside_unit(load_file(config), drop_ins) is not None

    assert refused("/srv/outpost/spool.db")
    (drop_ins / "override.conf").write_text("[Service]\nProtectSystem=full\n")
    assert not refused("/srv/outpost/spool.db")
    assert refused("/etc/outpost/spool.db") and refused("/usr/local/outpost/spool.db")
    assert refused("/home/pat/spool.db") and refused("/tmp/outpost/spool.db")
    (drop_ins / "override.conf").write_text("[Service]\nProtectSystem=yes\n")
    assert not refused("/etc/outpost/spool.db") and refused("/usr/outpost/spool.db")
    (drop_ins / "override.conf").write_text("[Service]\nProtectSystem=false\n")
    assert not refused("/usr/local/outpost/spool.db") and refused("/root/spool.db")
    (drop_ins / "zz.conf").write_text("[Service]\nProtectSystem=strict\n")   # the last wins
    assert refused("/srv/outpost/spool.db")

    (drop_ins / "zz.conf").unlink()
    (drop_ins / "override.conf").write_text("[Service]\nStateDirectory=outpost outpost-big\n")
    assert not refused("/var/lib/outpost-big/spool.db") and not refused("/var/lib/outpost/s.db")
    assert refused("/var/lib/other/spool.db")
    (drop_ins / "override.conf").write_text("[Service]\nStateDirectory=\nStateDirectory=big\n")
    assert not refused("/var/lib/big/spool.db") and refused("/var/lib/outpost/s.db")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd; POSIX shell quoting")
def test_the_commands_config_init_and_install_suggest_work_pasted_for_a_path_with_spaces(
        tmp_path: Path) -> None:
    """The machine-wide config directory of macOS is /Library/Application Support/outpost:
    `sudo chgrp outpost /Library/Application Support/outpost/agent.toml` and `outpost
    check-config` with it, as printed, named two files that are not there."""
    skip_unless_installable(system=True)
    import grp
    with contextlib.suppress(KeyError):
        grp.getgrnam("outpost")
        pytest.skip("an outpost group exists here: config init shares the file with it")
    config = tmp_path / "Application Support" / "outpost" / "agent.toml"
    where = {"CONFIGURATION_DIRECTORY": str(config.parent), "OUTPOST_SYSTEM": "1"}
    code, out = outpost("config", "init", env=where)
    assert code == 0, out
    code, install = outpost("service", "install", "--dry-run", env=where)
    assert code == 0, install
    suggested = [c for c in re.findall(r"`([^`]*(?:check-config|chgrp)[^`]*)`",
                                       out + install.splitlines()[0]) if "FILE" not in c]
    assert len(suggested) == 2, (out, install)
    for command in suggested:
        for part in command.split(" && "):
            argv = shlex.split(part)
            assert argv[-1] == str(config), (command, argv)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_check_config_notes_a_config_holding_keys_that_every_user_can_read(
        tmp_path: Path) -> None:
    """A config copied into place (cp keeps the umask's 0644) gave every local user of a
    kiosk the upstream's key, unsaid: config init writes 0600, the docs say 0640."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        {"name": "seg", "protocol": "segment-http", "url": "https://api.segment.io",
         "key": "wk_live_SECRET42"}])
    cfg.chmod(0o644)
    code, out = outpost("check-config", str(cfg))
    assert code == 0, out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "every user" in notes[0] and "0644" in notes[0], out
    assert str(cfg) in notes[0] and "chmod 600" in notes[0] and "wk_live_SECRET42" not in out, out
    cfg.chmod(0o640)   # the machine-wide service's: root:outpost
    code, out = outpost("check-config", str(cfg))
    assert code == 0 and "note:" not in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
def test_a_system_install_says_when_the_service_user_cannot_reach_the_config_directory(
        tmp_path: Path) -> None:
    """/etc/outpost made 0750 root:root (a hardened umask, or by hand): the config in it is
    0644, yet the outpost user cannot search the directory, and the service stopped at each
    start; install said `(exists; check it ...)`, looking at the file's mode alone."""
    skip_unless_installable(system=True)
    import grp
    with contextlib.suppress(KeyError):
        grp.getgrnam("outpost")
        pytest.skip("an outpost group exists here: the directory's group may be it")
    config = tmp_path / "etc" / "outpost" / "agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[listen]\nport = 8765\n")
    config.chmod(0o644)
    config.parent.chmod(0o750)
    where = {"CONFIGURATION_DIRECTORY": str(config.parent), "OUTPOST_SYSTEM": "1"}
    code, out = outpost("service", "install", "--dry-run", env=where)
    assert code == 0, out
    line = out.splitlines()[0]
    assert line.startswith(f"config: {config} (exists"), line
    assert "outpost cannot read it" in line and f"chmod 0755 {config.parent}" in line, line


# -- §5 newcomer config ------------------------------------------------------------------------

def test_run_without_a_config_file_says_so(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_DATA_HOME": str(tmp_path / "d"),
           "OUTPOST_SYSTEM": "0", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env = {**{k: v for k, v in os.environ.items() if k != "OUTPOST_CONFIG"}, **env}
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        # Without a config the port is the default one, 8765. The notices follow the
        # "listening on" line: a SIGTERM sent on seeing that line alone could land before
        # they were written (the signal handlers come after the start).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None \
                and "kept in the spool until one is" not in log.read_text() \
                and "cannot listen on" not in log.read_text():
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    seen = log.read_text()
    if "cannot listen on 127.0.0.1:8765" in seen:
        pytest.skip("port 8765 is taken on this machine")
    assert "no config file found" in seen and str(tmp_path / "c" / "outpost") in seen, seen
    assert "no upstream is configured" in seen and "kept in the spool until one is" in seen, seen


def test_config_init_writes_a_private_commented_config_check_config_accepts(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    code, out = outpost("config", "init", "--path", str(target), "--upstream", "segment-http",
                        "--url", "https://api.segment.io", "--write-key", "wk_123")
    assert code == 0, out
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    text = target.read_text()
    assert text.count("\n#") > 10
    raw = tomllib.loads(text)
    assert raw["upstream"] == [{"name": "segment", "protocol": "segment-http",
                                "url": "https://api.segment.io", "key": "wk_123", "keys": ["*"]}]
    code, out = outpost("check-config", str(target))
    assert code == 0 and "ok (1 upstream(s))" in out, out
    # Never overwritten without --force.
    code, out = outpost("config", "init", "--path", str(target))
    assert code == EXIT_CONFIG and "--force" in one_line(out), out
    code, out = outpost("config", "init", "--path", str(target), "--force")
    assert code == 0 and "ok (0 upstream(s))" in outpost("check-config", str(target))[1]


def test_the_shipped_agent_toml_does_not_call_the_example_upstream_a_default() -> None:
    text = (ROOT / "agent.toml").read_text()
    head = text[:text.index("[listen]")]
    assert "these are the defaults" not in head
    above = text[:text.index("\n[[upstream]]")].rsplit("\n\n", 1)[-1]
    assert "example" in above.lower() and "no upstream" in text.lower()


# -- §6 help and docs --------------------------------------------------------------------------

def test_help_lists_every_command_and_explains_the_options() -> None:
    code, out = outpost("--help")
    assert code == 0
    for command in ("run", "status", "doctor", "flush", "check-config", "config", "service"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), (command, out)
    code, out = outpost("run", "--help")
    assert "--config" in out and "OUTPOST_CONFIG" in out and "agent.toml" in out, out
    code, out = outpost("check-config", "--help")
    assert "file" in out and "exit" in out.lower() and "OUTPOST_CONFIG" in out, out


TEAM_ONLY = re.compile(r"\.\./shared|DESIGN(\.md| ?§)|WIRE-NOTES|WIRE NOTES")


def test_no_product_doc_or_help_text_points_outside_the_repository() -> None:
    files = [ROOT / "README.md", ROOT / "agent.toml", *(ROOT / "docs").glob("*.md"),
             *(ROOT / "agent").rglob("*.py"), *(ROOT / "agent" / "static").glob("*")]
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files if f.is_file()
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
            if TEAM_ONLY.search(line)]
    assert hits == []



# A function the docs name in code: `_read_ahead`, `record()`, `outcomes.record()`.
CODE_NAME = re.compile(r"`(?:\w+\.)?(_\w+|\w+(?=\(\)`))(?:\(\))?`")


def test_every_function_the_docs_name_is_in_the_code() -> None:
    """docs/soak.md named `_forget_dedupe`, a function gone since the dedupe keys moved out
    of the tombstones: a reader looking for what the doc says found nothing."""
    code = "\n".join(f.read_text() for f in (ROOT / "agent").rglob("*.py"))
    defined = set(re.findall(r"(?:def|class) (\w+)|^\s*(\w+)\s*[:=]", code, re.M))
    names = {a or b for a, b in defined}
    missing = [f"{f.name}: {name}" for f in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
               for name in CODE_NAME.findall(f.read_text()) if name not in names]
    assert missing == []

# -- §1 storage the user may not even look into --------------------------------------------------

def _without_root() -> list[str] | None:
    """A prefix that runs a command without root's power over file modes (root searches any
    directory): a user namespace whose only user is not root. [] when not root already."""
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", "--map-user=1000"]
    if not shutil.which("unshare") or subprocess.run([*prefix, "true"],
                                                     capture_output=True).returncode != 0:
        return None
    return prefix


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_storage_path_in_a_directory_the_user_cannot_search_is_one_line(
        tmp_path: Path, command: str) -> None:
    # `OUTPOST_SYSTEM=1 outpost check-config` by an admin: /var/lib/outpost is 0700 outpost.
    # stat(2) of the spool there fails with EACCES, not ENOENT (pathlib's is_dir raises it).
    prefix = _without_root()
    if prefix is None:
        pytest.skip("needs unprivileged user namespaces to run without root")
    kept_out = tmp_path / "kept-out"
    kept_out.mkdir()
    cfg = write_config(tmp_path / "agent.toml", kept_out / "spool.db")
    args = (command, str(cfg)) if command == "check-config" else (command, "--config", str(cfg))
    kept_out.chmod(0)
    try:
        run = subprocess.run([*prefix, sys.executable, "-m", "agent", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    finally:
        kept_out.chmod(0o700)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == EXIT_CONFIG, line
    assert "storage.path" in line and str(kept_out) in line, line


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("command", [("status",), ("dead", "list"), ("dead", "show", "1"),
                                     ("dead", "export", "OUT")])
@pytest.mark.parametrize("locked", ["file", "directory"])
def test_a_spool_the_user_cannot_read_is_one_line_naming_it_and_why(
        tmp_path: Path, command: tuple[str, ...], locked: str) -> None:
    """The offline commands, run as a user who may not read the spool (an admin without
    sudo, the spool 0600 the agent's user's): status and dead list/show/export said only
    SQLite's "unable to open database file" of a file of mode 000, and dead's a Python
    "[Errno 13]" of a directory it may not search. One line: the path, and why."""
    prefix = _without_root()
    if prefix is None:
        pytest.skip("needs unprivileged user namespaces to run without root")
    from agent.spool.schema import SCHEMA, VERSION
    spool = tmp_path / "kept" / "spool.db"
    spool.parent.mkdir()
    with contextlib.closing(sqlite3.connect(spool)) as conn:
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version = {VERSION}")
    cfg = write_config(tmp_path / "agent.toml", spool, port=free_port())
    args = [str(tmp_path / "out.jsonl") if a == "OUT" else a for a in command]
    kept = spool if locked == "file" else spool.parent
    kept.chmod(0)
    try:
        run = subprocess.run([*prefix, sys.executable, "-m", "agent", *args, "--config",
                              str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    finally:
        kept.chmod(0o700)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1, line
    assert str(spool) in line and "Permission denied" in line, line
    assert "unable to open database file" not in line and "[Errno" not in line, line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd")
@pytest.mark.parametrize("name", ["Bob's tools", 'say "hi"', "back\\slash", "cost$x", "new\nline"])
@pytest.mark.parametrize("scope", [[], ["--user"]])
def test_an_interpreter_path_systemd_cannot_run_is_refused_before_writing(
        tmp_path: Path, name: str, scope: list[str]) -> None:
    # systemd refuses an executable whose name holds ' " or \ even quoted ("Executable name
    # contains special characters"; unquoted, a ' is "Unbalanced quoting" and the unit has no
    # ExecStart at all), and takes a $$ there literally: the unit written could never start.
    (tmp_path / name).mkdir()
    python = tmp_path / name / "python"
    python.symlink_to(sys.executable)
    config_home = tmp_path / "config"
    code, out = outpost("service", "install", *scope, "--dry-run", python=str(python),
                        env={"PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()]),
                             "XDG_CONFIG_HOME": str(config_home)})
    line = one_line(out)
    assert code == EXIT_CONFIG, out
    assert "systemd" in line and str(python).replace("\n", "\\n") in line, line
    assert not config_home.exists()
    # The same refused from a lasting place (the check above meets /tmp too).
    from agent.install.plan import Target, build_plan
    lasting = f"/opt/{name}/venv/bin/python"
    with pytest.raises(ValueError, match="systemd") as refused:
        build_plan("install", Target("linux", not scope, lasting, "/home/ada"))
    assert lasting in str(refused.value)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["my apps", "100%", "semi;colon", "café"])
@pytest.mark.parametrize("system", [True, False])
def test_a_unit_for_an_awkward_but_runnable_path_is_one_systemd_accepts(
        tmp_path: Path, name: str, system: bool) -> None:
    from agent.install import templates as tpl

    (tmp_path / name).mkdir()
    python = tmp_path / name / "python"
    python.symlink_to(sys.executable)
    unit = tmp_path / "outpost.service"
    unit.write_text(tpl.systemd_unit(str(python), system=system))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    said = run.stdout + run.stderr
    for refusal in ("Unbalanced", "special characters", "not executable", "bad unit file",
                    "Invalid", "fatal error"):
        assert refusal not in said, said


def _as_a_user_without_a_home(tmp_path: Path) -> list[str] | None:
    """The argv prefix that runs as uid 12345, which no passwd entry names (as an arbitrary
    uid in a container), in a user namespace; None where that cannot be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--user", "--map-user=12345", "--map-group=12345"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.getuid())"],
                           capture_output=True, text=True, timeout=30)
    return prefix if probe.stdout.strip() == "12345" else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a user namespace")
@pytest.mark.parametrize("command", [["doctor"], ["config", "init"], ["check-config"], ["run"],
                                     ["status"], ["service", "install", "--user", "--dry-run"]])
def test_no_home_directory_at_all_is_one_line(tmp_path: Path, command: list[str]) -> None:
    # HOME unset and no passwd entry for the uid: platformdirs (and Path.home) cannot tell
    # where the user's config and data go, and raised RuntimeError.
    prefix = _as_a_user_without_a_home(tmp_path)
    if prefix is None:
        pytest.skip("cannot run as a uid without a passwd entry here")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "OUTPOST_CONFIG", "OUTPOST_SYSTEM", "XDG_CONFIG_HOME",
                        "XDG_DATA_HOME", "USER", "LOGNAME", "USERNAME", "LNAME")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([*prefix, sys.executable, "-m", "agent", *command], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=30)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == EXIT_CONFIG, line
    assert "home directory" in line and "HOME" in line, line
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_doctor_shows_hidden_characters_escaped(tmp_path: Path) -> None:
    # What doctor prints comes from the environment and the bus (the config refuses a
    # [device] fact holding one): an escape sequence or a NUL there must not reach the
    # terminal as one.
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    code, out = outpost("doctor", "--config", str(config),
                        env={"LC_ALL": "", "LC_MESSAGES": "", "LANG": "fr\x1b[2J",
                             "DBUS_SYSTEM_BUS_ADDRESS": "unix:abstract=x\x1b]0;owned\x07"})
    assert code == 0, out
    hidden = sorted({c for c in out if not c.isprintable() and c != "\n"})
    assert not hidden, (hidden, out)
    assert "fr\\x1b[2J" in out and "\\x00x\\x1b]0" in out, out


@pytest.mark.parametrize("fact,value", [
    ("machineId", "m" * 100_000),           # would be copied into every init and error event
    ("machineId", "a\\nb"),                 # a line break: no id holds one
    ("osVersion", "6.1\\u0007"),            # a control character
    ("language", "x" * 1000),
])
def test_a_device_fact_no_device_has_is_one_line_from_run_and_check_config(
        tmp_path: Path, fact: str, value: str) -> None:
    # A [device] fact is filled into every init and error event (and a machineId into
    # each Segment event mapped to Nucleus without an id of its own): a mistake there was
    # only seen when apps' events were refused at ingest as too large, or sent upstream.
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    cfg.write_text(cfg.read_text() + f'[device]\n{fact} = "{value}"\n')
    for command in (("run", "--config", str(cfg)), ("check-config", str(cfg))):
        code, out = outpost(*command)
        line = one_line(out)
        assert code == EXIT_CONFIG, out
        assert f"device.{fact}" in line, line
        assert len(line) < 400, line            # the value is not echoed whole
    assert not (tmp_path / "spool.db").exists()


@pytest.mark.parametrize("fact,value", [
    ("language", "zh-Hant-TW"),
    ("platform", "Caisse\\u00a0n°\\u202f3"),   # French typography's no-break spaces
    ("machineId", "kiosk-\\U0001F469\\u200D\\U0001F4BB"),   # an emoji's zero-width joiner
    ("machineId", "\\u05E7\\u05D5\\u05E4\\u05D4\\u200F-2"),   # a right-to-left mark
    ("osVersion", "15.0 \\U0001FAE8"),   # a character newer than Python's Unicode tables
])
def test_a_device_fact_with_no_line_break_or_control_character_is_taken(
        tmp_path: Path, fact: str, value: str) -> None:
    # The rule is no line breaks or control characters: a no-break space, a joiner or a
    # direction mark is neither, and a config holding one was refused as one that did.
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    cfg.write_text(cfg.read_text() + f'[device]\n{fact} = "{value}"\n')
    code, out = outpost("check-config", str(cfg))
    assert code == 0, out
    code, out = outpost("doctor", "--config", str(cfg))
    assert code == 0, out
    shown = tomllib.loads(f'v = "{value}"')["v"]
    assert fact in out and (shown in out or "\\u" in out), out


@pytest.mark.parametrize("address", [
    "/run/dbus/system_bus_socket",          # the socket's path, not a D-Bus address
    "tcp:host=127.0.0.1,port=5555",         # a transport the D-Bus client cannot use
    "unix:guid=0123",                       # a unix address naming no socket
    "unix:path=/run/dbus/system_bus_socket\\n",   # a paste's line break
])
def test_a_dbus_address_no_bus_can_be_reached_at_is_one_line_from_run_and_check_config(
        tmp_path: Path, address: str) -> None:
    # It was taken, and every metered reading failed: "unknown", treated as not metered,
    # so on_metered = "hold" sent everything on the metered link it was set for.
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       sync={"on_metered": "hold"})
    cfg.write_text(cfg.read_text() + f'dbus_address = "{address}"\n')
    for command in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        code, out = outpost(*command)
        line = one_line(out)
        assert code == EXIT_CONFIG, out
        assert "sync.dbus_address" in line and "unix:path=" in line, line
    assert not (tmp_path / "spool.db").exists()


def test_a_dbus_address_with_no_bus_there_yet_is_taken(tmp_path: Path) -> None:
    # A bus that may come up later (a socket not there yet) is a failed reading, counted
    # and retried, not a mistake in the file.
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       sync={"on_metered": "hold",
                             "dbus_address": f"unix:path={tmp_path / 'no-bus'}"})
    code, out = outpost("check-config", str(cfg))
    assert code == 0, out


@pytest.mark.parametrize("keyword", ["SYSTEM", "SESSION"])
def test_the_d_bus_clients_own_bus_names_are_taken_as_a_dbus_address(
        tmp_path: Path, keyword: str) -> None:
    # The D-Bus client reads these two words as the system's and the session's bus: a
    # config naming the bus so worked, and was refused once addresses were checked.
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       sync={"on_metered": "hold", "dbus_address": keyword})
    code, out = outpost("check-config", str(cfg))
    assert code == 0, out
