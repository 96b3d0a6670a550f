"""storage.path values an operator can plausibly write that name no spool file: a `~user`
for no such user, a fifo or a device. Each is one line and the documented exit code from
the real `python -m agent` command, and what is at the path is left as it was."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.test_cli_mistakes import no_agent_port, outpost, refused
from tests.test_operator_mistakes import one_line

NO_SUCH_USER = "~no-such-user-outpost-test"


@pytest.mark.parametrize("args", [("check-config",), ("run", "--config"), ("status", "--config"),
                                  ("doctor", "--config"), ("dead", "list", "--config")])
def test_a_storage_path_under_a_user_that_does_not_exist_is_one_line(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """`path = "~outpost/spool.db"` on a machine without that user: pathlib's expanduser
    raised RuntimeError("Could not determine home directory."), a traceback from every
    command that reads the config."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[storage]\npath = "{NO_SUCH_USER}/spool.db"\n')
    refused(outpost(*args, str(cfg)), "storage.path", NO_SUCH_USER)


def _special_files(tmp_path: Path) -> list[Path]:
    """A fifo, and where this may make one (root), a copy of /dev/null's device node."""
    fifo = tmp_path / "fifo" / "spool.db"
    fifo.parent.mkdir()
    os.mkfifo(fifo, 0o644)
    made = [fifo]
    if os.geteuid() == 0:
        null = tmp_path / "null" / "spool.db"
        null.parent.mkdir()
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chmod(null, 0o666)   # whatever the umask
        made.append(null)
    return made


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX fifos")
def test_a_storage_path_that_is_a_fifo_or_a_device_is_refused_and_left_alone(
        tmp_path: Path) -> None:
    """`path = "/dev/null"` passed check-config; `outpost run` (as root) then chmod'ed the
    device to 0600, locking every other user out of /dev/null, and served with a spool that
    could never open. A fifo there was chmod'ed too, and run hung opening it, deaf to
    SIGTERM."""
    for spool in _special_files(tmp_path):
        mode = stat.S_IMODE(os.stat(spool).st_mode)
        cfg = write_config(spool.parent / "agent.toml", spool)
        for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
            refused(outpost(*args), "storage.path", str(spool), "not a regular file")
            assert stat.S_IMODE(os.stat(spool).st_mode) == mode, (spool, args)


def test_a_storage_path_naming_another_program_s_database_is_refused_and_left_alone(
        tmp_path: Path) -> None:
    """`path` naming an SQLite file of another program (a typo, a copied line) passed
    check-config; `outpost run` then chmod'ed it 0600, switched it to WAL and served
    with a spool that could never open, every app's request refused with 503."""
    spool = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(spool)) as conn:
        conn.execute("CREATE TABLE notes(t TEXT)")
        conn.commit()
    os.chmod(spool, 0o644)
    before = spool.read_bytes()
    cfg = write_config(tmp_path / "agent.toml", spool)
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        refused(outpost(*args), "storage.path", str(spool), "not a spool")
        assert (spool.read_bytes(), stat.S_IMODE(os.stat(spool).st_mode)) == (before, 0o644)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX fifos")
@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("dead", "list"),
                                  ("dead", "show", "1")])
def test_offline_a_spool_that_is_a_fifo_is_named_so_not_waited_on(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """With no agent answering they read the spool, and opening a fifo no one writes
    waited forever."""
    spool = tmp_path / "spool.db"
    os.mkfifo(spool, 0o600)
    with no_agent_port() as port:
        cfg = write_config(tmp_path / "agent.toml", spool, port=port)
        run = outpost(*args, "--config", str(cfg))
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, (run.returncode, line)
    assert str(spool) in line and "not a regular file (a fifo)" in line, line


@pytest.mark.parametrize("path", ["data/", "~/outpost/", "data/.", "data/./"])
def test_a_storage_path_ending_in_a_slash_is_refused_naming_a_file_in_it(
        tmp_path: Path, path: str) -> None:
    """A directory meant ("data/", "data/."): Path drops the slash and a last ".", and a
    spool FILE named data was created where the operator looked for a directory holding
    one."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[storage]\npath = "{path}"\n')
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        refused(outpost(*args), "storage.path", f"{path.rstrip('/.')}/spool.db")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_storage_path_through_a_symlink_to_nothing_is_refused_alike(
        tmp_path: Path, under: str) -> None:
    """storage.path's directory (or one above it) a symlink to a directory not there: a
    disk not mounted yet, or moved. check-config took it, and run refused it with "cannot
    create DIR: File exists" (mkdir of a dangling link), naming neither the link nor what
    it leads to."""
    link = tmp_path / "data"
    gone = tmp_path / "disk" / "outpost"
    link.symlink_to(gone)
    spool = link / under / "spool.db" if under else link / "spool.db"
    cfg = write_config(tmp_path / "agent.toml", spool)
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        refused(outpost(*args), "storage.path", f"{link} is a symlink to {gone}",
                "does not exist")
    assert not (tmp_path / "disk").exists() and link.is_symlink()
