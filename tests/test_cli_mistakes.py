"""Operator mistakes at the command line (audit): each is one line on stderr naming what is
wrong and where, the documented exit code, no traceback, no secret, and nothing changed on
disk. Each runs the real `python -m agent` command on real files."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shlex
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from agent.logs import fingerprint
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.uplinks import registry
from tests.conftest import ROOT, AgentProcess, free_port, write_config
from tests.fakes.loopback_server import LoopbackServer
from tests.test_operator_mistakes import EXIT_CONFIG, _without_root, one_line
from tests.waiting import run_outpost

SECRET = "wk_live_SECRET42"
# Enough for the CLI; a config read whole from /dev/zero or a sparse file passes it at once
# (unbounded, it took the machine's memory until the OOM killer ended it).
MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def outpost(*args: str, env: dict[str, str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})},
                          preexec_fn=_limit_memory)  # noqa: PLW1509 (setrlimit only)


def refused(run: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The one line of a run that exited 2, holding each fragment and no secret."""
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == EXIT_CONFIG, (run.returncode, line)
    assert run.stderr.strip() == line, run.stdout
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert SECRET not in line, line
    return line


# -- the config file itself --------------------------------------------------------------------

def test_a_config_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.toml"
    os.mkfifo(fifo)   # nothing ever writes it: opened for reading, it would wait forever
    for args in (("check-config", str(fifo)), ("status", "--config", str(fifo))):
        refused(outpost(*args), str(fifo), "not a regular file")


def test_a_config_that_is_a_device_is_refused_not_read_forever() -> None:
    refused(outpost("check-config", "/dev/zero"), "/dev/zero", "not a regular file")


def test_a_huge_config_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    huge = tmp_path / "agent.toml"
    with open(huge, "wb") as fh:
        fh.truncate(4 * MEMORY_LIMIT)   # sparse: no disk used
    refused(outpost("check-config", str(huge)), str(huge), "MiB")


# Far past any stack: tomllib reads nesting by recursion, and ran out of it.
DEEP_TOML = "x = " + "[" * 5000 + "]" * 5000 + "\n"


@pytest.mark.parametrize("args", [("check-config",), ("run", "--config"), ("status", "--config")])
def test_a_config_nested_too_deeply_is_one_line_not_a_traceback(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(DEEP_TOML)
    refused(outpost(*args, str(cfg)), str(cfg), "nested too deeply")
    assert not (tmp_path / "spool.db").exists()


@pytest.mark.parametrize("args", [("check-config",), ("run",), ("status",), ("doctor",),
                                  ("tail",), ("dead", "list")])
def test_an_empty_outpost_config_is_refused_as_an_empty_config_is(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """OUTPOST_CONFIG="" went on to ./agent.toml or the defaults unsaid; --config "" is refused."""
    (tmp_path / "agent.toml").write_text('[listen]\nport = "what the lookup found"\n')
    run = outpost(*args, env={"OUTPOST_CONFIG": "", "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    refused(run, "OUTPOST_CONFIG", "empty")


def _key_list_config(tmp_path: Path, table: str, bad: str) -> Path:
    """A config whose listen.accept_keys or upstream keys is ``bad`` (TOML)."""
    text = (f"[listen]\naccept_keys = {bad}\n" if table == "listen" else
            '[[upstream]]\nname = "a"\nprotocol = "segment-http"\n'
            f'url = "https://api.segment.io"\nkeys = {bad}\n')
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    return cfg


# -- secrets and values in the config ----------------------------------------------------------

@pytest.mark.parametrize("table,key", [("listen", "accept_keys"), ("upstream", "keys")])
def test_a_bad_key_in_a_key_list_is_named_by_fingerprint_not_shown(
        tmp_path: Path, table: str, key: str) -> None:
    bad = f'["{SECRET}\\nmore"]'
    cfg = _key_list_config(tmp_path, table, bad)
    line = refused(outpost("check-config", str(cfg)), key, "line break")
    assert fingerprint(f"{SECRET}\nmore") in line, line


@pytest.mark.parametrize("entry", [f'["{SECRET}"]', f'{{ key = "{SECRET}" }}', "4242424242"])
@pytest.mark.parametrize("table,key", [("listen", "accept_keys"), ("upstream", "keys")])
def test_a_key_list_entry_that_is_not_a_string_is_refused_without_showing_it(
        tmp_path: Path, table: str, key: str, entry: str) -> None:
    """A key nested in an array or a table, or a numeric app id left unquoted, was shown as it
    was (`got ['wk_live_...']`): keys are named by fingerprint or not at all, never shown."""
    bad = f"[{entry}]"
    cfg = _key_list_config(tmp_path, table, bad)
    line = refused(outpost("check-config", str(cfg)), f"{key}: every entry must be a non-empty string")
    assert "4242424242" not in line, line


@pytest.mark.parametrize("url", [r"https://api.segment.io\nextra", r"https://api.\u001b[2Jsegment.io",
                                 r"https://api.segment.io/v1\tx", "https://api.segment.io/v1 x"])
def test_an_upstream_url_with_whitespace_or_control_characters_is_refused(
        tmp_path: Path, url: str) -> None:
    """urlsplit drops tabs and line breaks before it looks, so these passed as valid, and
    `doctor` printed them raw to the terminal. ``url`` is TOML text: its escapes are TOML's."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[[upstream]]\nname = "a"\nprotocol = "segment-http"\nurl = "{url}"\n')
    refused(outpost("check-config", str(cfg)), "upstream[0].url", "whitespace")


@pytest.mark.parametrize("protocol,url", [("segment-http", "https://api.segment.io:0"),
                                          ("nucleus-ws", "wss://[::1]:00/")])
def test_an_upstream_url_naming_port_0_is_refused(tmp_path: Path, protocol: str, url: str) -> None:
    """Port 0 is no server's: it was taken, and every batch failed to connect, kept queued
    for good (while the reachability probe, reading 0 as no port, tried port 80)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[[upstream]]\nname = "a"\nprotocol = "{protocol}"\nurl = "{url}"\n')
    refused(outpost("check-config", str(cfg)), "upstream[0].url", "port 0")


@pytest.mark.parametrize("odd", ["\r\n", "\n", "\t", "\x1b", "\x7f"])
def test_an_upstream_key_with_control_characters_is_refused_by_fingerprint(
        tmp_path: Path, odd: str) -> None:
    """A pasted key with a line break or tab was taken, and sent so on every request: no
    upstream's key holds one. Refused naming the upstream and the key's fingerprint, never
    the key; config init, which checks what it writes, the same."""
    key = f"{SECRET}{odd}"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[storage]\npath = {json.dumps(str(tmp_path / "spool.db"))}\n'
                   '[[upstream]]\nname = "seg"\nprotocol = "segment-http"\n'
                   f'url = "https://api.segment.io"\nkey = {json.dumps(key)}\n')
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        refused(outpost(*args), "upstream[0].key", "'seg'", fingerprint(key), "printable")
    run = outpost("config", "init", "--path", str(tmp_path / "new.toml"), "--upstream",
                  "segment-http", "--url", "https://api.segment.io", "--write-key", key)
    refused(run, "key", fingerprint(key))
    assert not (tmp_path / "new.toml").exists()


# -- outpost run -------------------------------------------------------------------------------

@pytest.mark.parametrize("spool", ["/proc/outpost-test/spool.db", "/proc/outpost-test.db"])
def test_run_and_check_config_refuse_a_spool_that_cannot_be_made_alike(
        tmp_path: Path, spool: str) -> None:
    """The preflight asks access(2), which says yes to root everywhere; mkdir (or creating
    the spool's files) still fails. check-config accepted what run refused, and run said
    of a file it could not create in an existing directory that "the spool is in use by
    another agent" (its lock file could not be opened, which the lock retries for a
    second). Both refuse it, with the same line, exit 2."""
    cfg = write_config(tmp_path / "agent.toml", Path(spool))
    line = refused(outpost("run", "--config", str(cfg)), f"storage.path {spool}: cannot ")
    assert refused(outpost("check-config", str(cfg))) == line


@pytest.mark.parametrize("kind", ["a symlink loop", "under a symlink loop", "a name too long"])
def test_run_and_check_config_refuse_a_spool_path_no_file_can_have_alike(
        tmp_path: Path, kind: str) -> None:
    """The preflight's os.path tests take ELOOP and ENAMETOOLONG for "not there yet", and its
    probe made a file of its own in the nearest directory: check-config said ok. Then run
    refused the path, saying "File exists" of a loop above the spool, or, for a spool that is
    itself a loop, started and answered every app's event 503."""
    (tmp_path / "loop").symlink_to("loop")
    spool = {"a symlink loop": tmp_path / "loop",
             "under a symlink loop": tmp_path / "loop" / "spool.db",
             "a name too long": tmp_path / ("d" * 300) / "spool.db"}[kind]
    cfg = write_config(tmp_path / "agent.toml", spool)
    why = "File name too long" if kind == "a name too long" else "symbolic links"
    line = refused(outpost("run", "--config", str(cfg)), f"storage.path {spool}: ", why)
    assert refused(outpost("check-config", str(cfg))) == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml", "loop"]


@pytest.mark.parametrize("mode,says", [(0o755, "readable"), (0o777, "writable")])
def test_run_warns_once_of_a_spool_directory_others_can_see(
        tmp_path: Path, mode: int, says: str) -> None:
    """It was printed twice on stderr: bare, by the CLI before the log was set up (Python's
    last-resort handler), then through the log when the spool opened."""
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(mode)
    cfg = write_config(tmp_path / "agent.toml", directory / "spool.db")   # port 0
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        # The warning comes once the agent listens, beside the other start notices.
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(15)
    seen = log.read_text()
    assert seen.count(f"{directory} is {says} by other users (mode {mode:o})") == 1, seen


def test_run_that_cannot_listen_is_one_line_even_with_a_spool_directory_others_see(
        tmp_path: Path) -> None:
    """The warning of a spool directory others can list came as the spool opened, before
    the listen failed: two lines for one mistake. It waits for a start (the next run, once
    the port is fixed, gives it), as the other start notices do."""
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(0o755)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = write_config(tmp_path / "agent.toml", directory / "spool.db",
                           port=taken.getsockname()[1])
        refused(outpost("run", "--config", str(cfg)), "cannot listen on 127.0.0.1:")


# -- offline: no agent answering --------------------------------------------------------------

@contextmanager
def no_agent_port() -> Iterator[int]:
    """A port of 127.0.0.1 bound but not listening: a connection there is refused, and
    nothing else can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("dead", "list")])
def test_offline_a_storage_path_that_is_a_directory_is_named_so(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """They said "disk I/O error", SQLite's words for opening a directory."""
    spool = tmp_path / "spool.db"
    spool.mkdir()
    with no_agent_port() as port:
        cfg = write_config(tmp_path / "agent.toml", spool, port=port)
        run = outpost(*args, "--config", str(cfg))
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, (run.returncode, line)
    assert f"{spool} is a directory" in line and "storage.path" in line, line
    assert "disk I/O" not in line, line


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("args", [("status",), ("status", "--json")])
def test_offline_a_spool_in_a_directory_the_user_cannot_search_is_one_line(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """`outpost status --config /etc/outpost/agent.toml` by an admin without sudo, the
    service stopped: /var/lib/outpost is 0700 outpost, and stat(2) of the spool fails with
    EACCES (pathlib's exists raises it). It was a traceback."""
    prefix = _without_root()
    if prefix is None:
        pytest.skip("needs unprivileged user namespaces to run without root")
    kept_out = tmp_path / "kept-out"
    kept_out.mkdir()
    with no_agent_port() as port:
        cfg = write_config(tmp_path / "agent.toml", kept_out / "spool.db", port=port)
        kept_out.chmod(0)
        try:
            run = subprocess.run([*prefix, sys.executable, "-m", "agent", *args, "--config",
                                  str(cfg)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=30, stdin=subprocess.DEVNULL)
        finally:
            kept_out.chmod(0o700)
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, (run.returncode, line)
    assert "Traceback" not in run.stderr, run.stderr
    assert str(kept_out / "spool.db") in line and "Permission denied" in line, line


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("args", [("status",), ("check-config",), ("run",)])
def test_a_lookup_from_a_directory_the_user_cannot_search_is_one_line(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """`sudo -u outpost outpost status` from /root (0700): whether ./agent.toml is there
    cannot be told, stat(2) failing with EACCES (pathlib's is_file raises it). It was a
    traceback from every command that looks the config up."""
    prefix = _without_root()
    if prefix is None:
        pytest.skip("needs unprivileged user namespaces to run without root")
    kept_out = tmp_path / "kept-out"
    kept_out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OUTPOST_CONFIG"}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "c"), XDG_DATA_HOME=str(tmp_path / "d"),
               OUTPOST_SYSTEM="0")
    try:
        # Taken away once the command is in it (a user cannot enter it after).
        run = subprocess.run([*prefix, sys.executable, "-m", "agent", *args], cwd=kept_out,
                             env=env, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: kept_out.chmod(0))  # noqa: PLW1509 (chmod only)
    finally:
        kept_out.chmod(0o700)
    line = refused(run, str(kept_out / "agent.toml"), "Permission denied", "--config")
    assert line.startswith("outpost: "), line


@pytest.mark.parametrize("flag", ["no", "off", "False", "NO", " 0"])
def test_outpost_system_written_as_no_is_the_user_locations(tmp_path: Path, flag: str) -> None:
    """OUTPOST_SYSTEM=0 picks the user locations; "no", "off", "False" picked the system
    ones (/etc/outpost, /var/lib/outpost): every value but "", "0" and "false" did, so a
    command looked for another config and spool than the operator's, unsaid."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "OUTPOST_SYSTEM": flag}
    run = outpost("doctor", env=env, cwd=tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    shown = dict(line.split(None, 1) for line in run.stdout.splitlines()
                 if line.startswith(("  config dir ", "  spool ", "  service ")))
    assert shown == {"config": f"dir {tmp_path / 'config' / 'outpost'}",
                     "spool": str(tmp_path / "data" / "outpost" / "spool.db"),
                     "service": "user"}, run.stdout


@pytest.mark.parametrize("command", ["flush", "tail"])
def test_a_command_that_needs_the_agent_says_none_answers(tmp_path: Path, command: str) -> None:
    """They printed urllib's "<urlopen error [Errno 111] Connection refused>"."""
    with no_agent_port() as port:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
        run = outpost(command, "--config", str(cfg))
    line = one_line(run.stdout + run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, (run.returncode, line)
    assert f"no agent answering at http://127.0.0.1:{port} (Connection refused)" in line, line
    assert "urlopen" not in line and "Errno" not in line, line


# -- outpost tail --key ------------------------------------------------------------------------

@pytest.mark.parametrize("bad,shown", [
    ("k:\x1b[2J1234", "k:\\x1b[2J1234"),        # a mistyped fingerprint: shown, escaped
    (f"{SECRET}\x1b[2J", "\\x1b"),              # a key: never shown, its odd character is
    (f"{SECRET}\n", "\\n"), (f"\t{SECRET}", "\\t"), (f"{SECRET}\r", "\\r"),
    ("", '""'),
])
def test_tail_refuses_a_key_no_app_can_have(tmp_path: Path, bad: str, shown: str) -> None:
    """A key with a control character (the agent refuses such keys from apps) or an empty
    one was hashed and watched silently: no event would ever show."""
    with no_agent_port() as port:   # refused before any agent is asked
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
        line = refused(outpost("tail", "--key", bad, "--config", str(cfg)), "--key", shown,
                       "k:xxxxxxxx")
    assert line.isprintable(), line


# -- outpost config init -----------------------------------------------------------------------

def init(*args: str) -> subprocess.CompletedProcess[str]:
    return outpost("config", "init", *args)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_config_init_onto_a_directory_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    target.mkdir()
    for force in ((), ("--force",)):
        # Without --force too: named a directory, not told "pass --force to replace it",
        # which then refused it as a directory.
        line = refused(init("--path", str(target), *force), str(target), "directory")
        assert "--force" not in line, line
    assert _leftovers(tmp_path) == ["agent.toml"] and target.is_dir()


@pytest.mark.parametrize("written", ["conf/", "conf/.", "conf/./"])
def test_config_init_to_a_directory_not_there_yet_is_refused_naming_a_file_in_it(
        tmp_path: Path, written: str) -> None:
    """`config init --path /etc/outpost/` before the directory exists: Path drops the slash
    (and a last "."), and a FILE named conf was written where the operator meant the
    directory to hold one."""
    line = refused(init("--path", f"{tmp_path}/{written}"), "directory",
                   str(tmp_path / "conf" / "agent.toml"))
    assert "wrote" not in line and _leftovers(tmp_path) == [], line


def test_config_init_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    target = tmp_path / "afile" / "agent.toml"
    refused(init("--path", str(target)), str(target))
    assert _leftovers(tmp_path) == ["afile"]


def test_config_init_where_nothing_can_be_written_is_one_line() -> None:
    refused(init("--path", "/proc/outpost-test.toml"), "/proc/outpost-test.toml")


@pytest.mark.parametrize("name", [b"caf\xe9", b"x\x1b[2J\ny", b"it's \\ \xe2\x80\xae"])
def test_config_init_s_check_config_hint_names_the_file_when_pasted(
        tmp_path: Path, name: bytes) -> None:
    """The command `config init` says to run named another file for a path holding a byte
    that is not UTF-8 or a control character: the output shows them escaped (`\\xe9`), and
    pasted, those are the path's characters. (And the `wrote` line printed them raw.)"""
    target = os.path.join(os.fsencode(tmp_path), name, b"agent.toml")
    os.mkdir(os.path.dirname(target))
    run = init("--path", os.fsdecode(target))
    assert run.returncode == 0 and not {"\x1b", "\u202e"} & set(run.stdout), run
    [hint] = re.findall(r"`(outpost check-config .*)`$", run.stdout.strip())
    pasted = subprocess.run(["bash", "-c", hint.replace("outpost", shlex.join(
        [sys.executable, "-m", "agent"]), 1)], cwd=ROOT, capture_output=True, timeout=30)
    assert pasted.returncode == 0, (hint, pasted)
    assert pasted.stdout.endswith(b"agent.toml: ok (0 upstream(s))\n"), pasted


def test_config_init_names_the_reload_of_a_user_service_too(tmp_path: Path) -> None:
    """The header said `systemctl reload outpost` alone, which a user service (`service
    install --user`) does not answer to: "Unit outpost.service not found"."""
    target = tmp_path / "agent.toml"
    assert init("--path", str(target)).returncode == 0
    header = target.read_text().split("\n\n")[0]
    assert "`sudo systemctl reload outpost`" in header, header
    assert "`systemctl --user reload outpost`" in header, header


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
def test_config_init_into_a_directory_the_user_cannot_search_is_one_line(tmp_path: Path) -> None:
    """`outpost config init --path /var/lib/outpost/agent.toml` by an admin without sudo:
    that directory is 0700 outpost, and stat(2) of the file fails with EACCES (pathlib's
    exists raises it). It was a traceback."""
    prefix = _without_root()
    if prefix is None:
        pytest.skip("needs unprivileged user namespaces to run without root")
    kept_out = tmp_path / "kept-out"
    kept_out.mkdir()
    target = kept_out / "agent.toml"
    kept_out.chmod(0)
    try:
        run = subprocess.run([*prefix, sys.executable, "-m", "agent", "config", "init",
                              "--path", str(target)], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
    finally:
        kept_out.chmod(0o700)
    refused(run, f"cannot write {target}", "Permission denied")
    assert _leftovers(kept_out) == []


def test_config_init_through_a_symlink_writes_the_file_it_points_at(tmp_path: Path) -> None:
    """It replaced the link with a file of its own: --path /dev/stdout --force, as root,
    replaced /dev/stdout itself."""
    real = tmp_path / "real.toml"
    real.write_text("# mine\n")
    link = tmp_path / "agent.toml"
    link.symlink_to(real)
    run = init("--path", str(link), "--force")
    assert run.returncode == 0, run.stderr
    assert link.is_symlink() and "outpost config init" in real.read_text()
    assert _leftovers(tmp_path) == ["agent.toml", "real.toml"]


def planted_links(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Two links another user (uid 4242) made in a sticky directory every user may write
    to, as /tmp: one to a file of this user's, one to where no file is yet. The kernel's
    protected_symlinks would not follow either for a command that opened them."""
    if not hasattr(os, "lchown") or os.geteuid() != 0:
        pytest.skip("a link of another user's is made as root")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    precious, absent = tmp_path / "precious", tmp_path / "absent"
    precious.write_text("mine\n")
    to_file, to_nothing = shared / "to-file", shared / "to-nothing"
    to_file.symlink_to(precious)
    to_nothing.symlink_to(absent)
    for link in (to_file, to_nothing):
        os.lchown(link, 4242, 4242)
    return to_file, precious, to_nothing, absent


def test_config_init_does_not_follow_another_users_link_in_a_shared_directory(
        tmp_path: Path) -> None:
    """`config init --path /tmp/agent.toml` resolved a link planted there with realpath,
    which the kernel never refuses (protected_symlinks guards opens, not readlink), and
    replaced the file the link named: as root, any file of the machine's."""
    to_file, precious, to_nothing, absent = planted_links(tmp_path)
    for link, force in ((to_file, ("--force",)), (to_nothing, ())):
        refused(init("--path", str(link), *force), str(link), "another user's link")
    assert precious.read_text() == "mine\n" and not absent.exists()
    assert _leftovers(tmp_path) == ["precious", "shared"]


def test_config_init_onto_a_device_is_refused_and_the_device_kept(tmp_path: Path) -> None:
    link = tmp_path / "agent.toml"
    link.symlink_to("/dev/null")
    refused(init("--path", str(link), "--force"), "not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_config_init_with_an_empty_path_is_not_the_default_location(tmp_path: Path) -> None:
    config_home = tmp_path / "config"
    run = outpost("config", "init", "--path", "",
                  env={"XDG_CONFIG_HOME": str(config_home), "OUTPOST_SYSTEM": "0"})
    refused(run, "--path")
    assert not config_home.exists()


@pytest.mark.parametrize("protocol", registry.protocols())
def test_config_init_without_url_suggests_one_its_protocol_takes(
        tmp_path: Path, protocol: str) -> None:
    """`config init --upstream nucleus-ws` without --url was told "e.g. --url
    https://api.segment.io", whatever the protocol: pasted, that URL was then refused
    (`must start with ws:// or wss://`). The example it gives is one the protocol takes."""
    target = tmp_path / "agent.toml"
    line = refused(init("--path", str(target), "--upstream", protocol), "--url")
    suggested = re.search(r"--url (\S+?)[),;]?$", line)
    assert suggested, line
    assert init("--path", str(target), "--upstream", protocol,
                "--url", suggested[1]).returncode == 0, line
    assert outpost("check-config", str(target)).returncode == 0


@pytest.mark.parametrize("args,fragment", [
    (("--write-key", SECRET), "--write-key needs --upstream"),
    (("--name", "seg"), "--name needs --upstream"),
    (("--upstream", "segment-http", "--url", "https://api.segment.io", "--name", ""), "name"),
    # A variable that expanded to nothing: no key written, each app's own sent instead.
    (("--upstream", "segment-http", "--url", "https://api.segment.io", "--write-key", ""),
     '--write-key is empty ("")'),
])
def test_config_init_options_it_would_ignore_are_refused(
        tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    target = tmp_path / "agent.toml"
    refused(init("--path", str(target), *args), fragment)
    assert not target.exists()


def test_config_init_keeps_characters_beyond_the_bmp_and_refuses_bytes_not_utf8(
        tmp_path: Path) -> None:
    """An emoji in --name (or --write-key, --url) was written as a JSON surrogate pair
    (\\ud83d\\uded2), which no TOML reader takes: a tomllib traceback, exit 1."""
    target = tmp_path / "agent.toml"
    run = init("--path", str(target), "--upstream", "segment-http", "--url",
               "https://api.segment.io", "--name", "kiosk \U0001f6d2", "--write-key", f"{SECRET}\U0001f511")
    assert run.returncode == 0, run.stderr
    check = outpost("check-config", str(target))
    assert check.returncode == 0 and "ok (1 upstream(s))" in check.stdout, check.stderr
    assert "kiosk \U0001f6d2" in target.read_text(encoding="utf-8")
    # A byte that is not UTF-8 (a name pasted from a Latin-1 terminal) cannot be written in
    # a TOML file: refused in one line, naming the option, and nothing written.
    target.unlink()
    refused(init("--path", str(target), "--upstream", "segment-http", "--url",
                 "https://api.segment.io", "--name", os.fsdecode(b"caf\xe9")), "--name", "UTF-8")
    assert not target.exists()


# -- another server at the agent's address -----------------------------------------------------

class NotOutpost(LoopbackServer):
    """A real server on the agent's port answering 200 to everything, not as Outpost would."""

    async def start(self, text: str) -> NotOutpost:
        async def anything(_: web.Request) -> web.Response:
            return web.Response(text=text)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        await self._serve(app)
        return self


@pytest.fixture(params=["<html>a router's page</html>", "[1, 2]"], ids=["html", "json-list"])
async def not_outpost(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    server = await NotOutpost().start(request.param)
    yield server.port
    await server.stop()


@pytest.mark.parametrize("args", [("dead", "list"), ("dead", "list", "--json"),
                                  ("dead", "show", "1"), ("dead", "retry", "--all"),
                                  ("dead", "purge", "--all"), ("flush",), ("tail",)])
async def test_a_server_that_is_not_the_agent_is_named_not_used(
        tmp_path: Path, not_outpost: int, args: tuple[str, ...]) -> None:
    """The dead commands printed its answer as if an agent's, or a traceback; `flush`
    called it no agent at all, `tail` an agent stopping."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=not_outpost)
    code, out = await run_outpost(*args, "--config", str(cfg))
    line = one_line(out)
    assert code == 1, (code, line)
    assert f"http://127.0.0.1:{not_outpost}" in line and "not an Outpost agent" in line, line


async def test_an_export_from_a_server_that_is_not_the_agent_writes_nothing(
        tmp_path: Path, not_outpost: int) -> None:
    """It wrote the server's page into the file as one dead letter."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=not_outpost)
    target = tmp_path / "dead.jsonl"
    code, out = await run_outpost("dead", "export", str(target), "--config", str(cfg))
    line = one_line(out)
    assert code == 1 and "not an Outpost agent" in line, (code, line)
    assert _leftovers(tmp_path) == ["agent.toml"]



@pytest.fixture(params=["banner", "404"])
async def not_the_agent(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """A port held by a server that does not speak HTTP (an SSH server's banner), or one
    that answers every request 404 with its own page."""
    if request.param == "404":
        async def missing(_: web.Request) -> web.Response:
            return web.Response(status=404, text="<html>Not Found</html>")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", missing)
        server = LoopbackServer()
        await server._serve(app)
        yield server.port
        await server.stop()
        return

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        writer.close()
    ssh = await asyncio.start_server(banner, "127.0.0.1", 0)
    yield int(ssh.sockets[0].getsockname()[1])
    ssh.close()
    await ssh.wait_closed()


@pytest.mark.parametrize("args,path", [(("flush",), "/flush"), (("tail",), "/tail"),
                                       (("status",), "/status"), (("dead", "list"), "/dead")])
async def test_a_server_that_is_not_http_or_refuses_is_named_not_the_agent(
        tmp_path: Path, not_the_agent: int, args: tuple[str, ...], path: str) -> None:
    """flush, tail and status ended in a traceback (http.client's BadStatusLine) at a port
    whose server does not speak HTTP, `dead list` printed its banner; at a 404 `flush` said
    no agent answers and to start one (which could not listen there), `tail` printed the
    server's page as the agent's refusal."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=not_the_agent)
    code, out = await run_outpost(*args, "--config", str(cfg))
    assert "Traceback" not in out, out
    said = f"http://127.0.0.1:{not_the_agent} answered {path}, but not an Outpost agent"
    if args == ("status",):   # the spool is read instead, and that said
        assert code == 0 and said in out and "reading the spool" in out, (code, out)
        return
    line = one_line(out)
    assert code == 1 and said in line, (code, line)


@pytest.mark.parametrize("reply", [
    b'{"count": 3}',
    b'{"count": "many", "entries": 5}',
    b'{"count": 1, "groups": [{"count": 1}], "entries": []}',
    b'{"count": 1, "groups": [], "entries": [{"id": 1}]}',
    b'{"count": 1, "groups": "none", "entries": []}',
    # Counts and ids that are text, an escape sequence: they were printed raw.
    b'{"count": 1, "groups": [{"count": "\\u001b[2J", "upstream": "u", "oldest": 1, '
    b'"newest": 1, "reason": "r"}], "entries": []}',
    b'{"count": 1, "groups": [], "entries": [{"id": "\\u001b]0;x\\u0007", "key": "k", '
    b'"upstream": "u", "at": 1, "bytes": 1, "reason": "r"}]}',
])
async def test_a_dead_listing_of_another_shape_is_named_not_the_agent(
        tmp_path: Path, reply: bytes) -> None:
    """Something at the agent's address answers /dead with a JSON object holding `count`,
    the one field `outpost dead list` looked for, but no dead-letter summary: the table
    crashed on it with a traceback (KeyError, TypeError), and --json printed it as the
    agent's answer. Another server's answer is never shown: it is named, in one line."""
    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=reply, content_type="application/json")
    app = web.Application()
    app.router.add_get("/dead", answer)
    server = LoopbackServer()
    await server._serve(app)
    try:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=server.port)
        for args in ((), ("--json",)):
            code, out = await run_outpost("dead", "list", *args, "--config", str(cfg))
            assert "Traceback" not in out, out
            line = one_line(out)
            assert code == 1 and (f"http://127.0.0.1:{server.port} answered /dead, but not "
                                  "an Outpost agent") in line, (code, line)
    finally:
        await server.stop()


@pytest.mark.parametrize("args,path,reply", [
    (("flush",), "/flush", b'{"queue_depth": "\\u001b]0;owned\\u0007many"}'),
    (("dead", "retry", "--all"), "/dead/retry", b'{"retried": "\\u001b[2Jall"}'),
    (("dead", "purge", "--all"), "/dead/purge", b'{"purged": {"n": 1}}'),
])
async def test_a_count_that_is_no_number_is_named_not_the_agent(
        tmp_path: Path, args: tuple[str, ...], path: str, reply: bytes) -> None:
    """A server at the agent's address answers with a JSON object holding the one field the
    command looked for, but not a number there: `outpost flush` said "flush requested; ...
    events queued" and `dead retry`/`purge` what they had done, with its text (a terminal's
    escape sequences included) printed raw, exit 0. Another server's answer is never shown
    or taken as done: it is named, in one line, exit 1."""
    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=reply, content_type="application/json")
    app = web.Application()
    app.router.add_post(path, answer)
    server = LoopbackServer()
    await server._serve(app)
    try:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=server.port)
        code, out = await run_outpost(*args, "--config", str(cfg))
        line = one_line(out)
        assert code == 1 and (f"http://127.0.0.1:{server.port} answered {path}, but not an "
                              "Outpost agent") in line, (code, line)
        assert "\x1b" not in out, out
    finally:
        await server.stop()


# -- dead-letter arguments ---------------------------------------------------------------------

def test_dead_show_of_a_negative_id_is_a_usage_error(tmp_path: Path) -> None:
    """The agent answered "no route for GET /dead/-1"."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=1)
    run = outpost("dead", "show", "-1", "--config", str(cfg))
    assert run.returncode == EXIT_CONFIG and "-1" in run.stderr.splitlines()[-1], run.stderr
    assert "Traceback" not in run.stderr


async def test_dead_list_with_a_huge_limit_reads_the_spool_as_the_agent_would(tmp_path: Path) -> None:
    """Offline, SQLite refused the number: an OverflowError traceback."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # empty, no agent
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)   # nothing answers there
    code, out = await run_outpost("dead", "list", "--limit", str(10**30), "--config", str(cfg))
    assert code == 0 and "0 dead letters" in out and "no agent running" in out, out


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI run in this process: (exit code, stdout, stderr)."""
    from agent import cli
    code = cli.main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


@contextmanager
def unwritable(where: Path) -> Iterator[None]:
    """``where`` not writable by this process: its write bits cleared, or, for root (whom
    modes do not stop), a read-only bind mount over it (a skip where it may not mount)."""
    if os.geteuid() == 0:
        from tests.test_disk import read_only
        with read_only(where):
            yield
        return
    mode = where.stat().st_mode
    where.chmod(mode & ~0o222)
    try:
        yield
    finally:
        where.chmod(mode)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("command", ["retry", "purge"])
@pytest.mark.parametrize("what", ["file", "directory"])
async def test_an_offline_dead_change_on_a_spool_it_cannot_write_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, what: str) -> None:
    """No agent running, a spool this user may read but not write: `dead retry` and `dead
    purge` said "the spool is in use (disk I/O error): an agent has it open", and one
    looked for an agent that was not there."""
    (tmp_path / "d").mkdir()
    spool = tmp_path / "d" / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)   # nothing answers there
    blocked = spool if what == "file" else spool.parent
    with unwritable(blocked):
        code, out, err = in_process(capsys, "dead", command, "--all", "--config", str(cfg))
    line = one_line(err)
    assert code == 1 and out == "", (code, out)
    assert "not writable" in line and str(blocked) in line, line
    assert "in use" not in line and "has it open" not in line, line


async def _spool_with_a_dead_letter(spool: Path) -> None:
    """A stopped agent's spool holding one dead letter (reason "refused")."""
    await (await Spool.open(StorageConfig(path=str(spool)))).close()
    with closing(sqlite3.connect(spool)) as db, db:
        db.execute("INSERT INTO streams(id, key) VALUES (1, 'k')")
        db.execute("INSERT INTO dead(seq, stream, family, received, dkey, body, upstream, "
                   "reason, at) VALUES (1, 1, 0, 0, 1, x'7b7d', 'up', 'refused', 0)")


async def test_an_offline_retry_on_a_damaged_spool_says_the_agent_salvages_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No agent running, a spool damage garbled (a record in a lane no forwarder reads):
    the retry reads the spool as a start does and refuses it, the file unchanged, in one
    line that says what mends it (the agent's start moves it aside and salvages it), not
    only SQLite's "database disk image is malformed"."""
    spool = tmp_path / "spool.db"
    await _spool_with_a_dead_letter(spool)
    with closing(sqlite3.connect(spool)) as db, db:
        db.execute("INSERT INTO records(id, stream, family, n, received, live, bytes, dkeys, "
                   "data, lane) VALUES (2, 1, 0, 1, 0, 1, 2, zeroblob(8), x'00', 7)")
    before = spool.read_bytes()
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)   # nothing answers there
    code, out, err = in_process(capsys, "dead", "retry", "--all", "--config", str(cfg))
    line = one_line(err)
    assert code == 1 and out == "", (code, out)
    assert "damaged" in line and str(spool) in line and "start the agent" in line, line
    assert spool.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("command", [("status", "--json"), ("dead", "list", "--json"),
                                     ("dead", "show", "1")], ids=" ".join)
async def test_an_offline_read_of_a_spool_in_a_directory_it_cannot_write_reads_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    """No agent running, a spool this user may read in a directory it may not write (the
    agent's user's): `outpost status` and `dead list` said "cannot read the spool ...:
    unable to open database file" (SQLite's read-only open of a WAL file makes a -shm
    beside it). They read it as in a directory it may write."""
    (tmp_path / "d").mkdir()
    spool = tmp_path / "d" / "spool.db"
    await _spool_with_a_dead_letter(spool)
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)   # nothing answers there

    def run() -> tuple[int, str, str]:
        code, out, err = in_process(capsys, *command, "--config", str(cfg))
        # --json's time of reading, and the ages counted to it (the dead letters')
        return code, re.sub(r'"(?:time|\w*age_s)": [0-9.]+', "", out), err
    with unwritable(spool.parent):   # first: with a -wal and -shm there, it needs no -shm made
        blocked = run()
    assert blocked == run(), blocked
    assert blocked[0] == 0 and "refused" in blocked[1], blocked


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
@pytest.mark.parametrize("command", [("status",), ("dead", "list")], ids=" ".join)
async def test_an_offline_read_of_a_spool_whose_wal_it_cannot_read_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    """The same, with a -wal left beside the spool (an agent killed): SQLite reads it
    only through a -shm this user cannot create there. One line says so, not "unable to
    open database file"; never the file without its -wal (stale figures, said as current)."""
    (tmp_path / "d").mkdir()
    spool = tmp_path / "d" / "spool.db"
    await _spool_with_a_dead_letter(spool)
    with closing(sqlite3.connect(spool, isolation_level=None)) as db:   # a crash's files
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("DELETE FROM dead")
        (tmp_path / "e").mkdir()
        for suffix in ("", "-wal"):
            Path(f"{tmp_path / 'e' / 'spool.db'}{suffix}").write_bytes(
                Path(f"{spool}{suffix}").read_bytes())
    spool = tmp_path / "e" / "spool.db"
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)   # nothing answers there
    with unwritable(spool.parent):
        code, out, err = in_process(capsys, *command, "--config", str(cfg))
    line = one_line(err)
    assert code == 1 and out == "", (code, out)
    assert f"{spool}-wal" in line and "not writable" in line and "agent's user" in line, line


# Not plain whole numbers, each of which int() or str.isdigit took: a superscript (isdigit
# yes, int no), other scripts' digits, a sign, spaces, underscores; and one of more digits
# than int() reads (4300).
NOT_PLAIN = ["\u00b2", "\u0661\u0662", "-1", "1e3", "0x10", " 5", "+5", "1_0", "9" * 5000]


@pytest.mark.parametrize("bad", NOT_PLAIN, ids=range(len(NOT_PLAIN)))
@pytest.mark.parametrize("command", [("dead", "list", "--limit"), ("dead", "show"),
                                     ("check-config", "--reload")], ids=" ".join)
def test_a_number_that_is_not_a_plain_whole_number_is_a_usage_error_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...],
        bad: str) -> None:
    """`dead list --limit \u00b2` (and `dead show \u00b2`) said "invalid _count value", a
    function's name; `check-config --reload ' 5'` (or +5, 1_0, \u0661\u0662) signalled
    PID 5 (10, 12), and --reload 1e3 said "invalid int value"."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=1)
    code, out, err = in_process(capsys, *command, bad, "--config", str(cfg))
    assert "Traceback" not in err and out == "", out
    last = err.strip().splitlines()[-1]
    assert code == EXIT_CONFIG, (code, last)
    assert "whole number" in last and re.search(r"invalid \w+ value", last) is None, last
    assert len(last) < 300, last   # the number shown cut short, not 5000 digits


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("dead", "list"),
                                     ("dead", "show", "1"), ("dead", "export", "FILE"),
                                     ("dead", "purge", "--all")], ids=" ".join)
def test_an_empty_spool_file_is_no_spool_yet(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    """SQLite makes the file at the open: a first start killed before the spool's tables
    were written leaves it empty (as `touch` does), and the next start makes it a spool.
    Offline, the commands said "cannot read the spool ...: no such table: streams" (or
    dead), an internal name, and retry or purge to start the agent to convert a "v0"."""
    spool = tmp_path / "spool.db"
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)   # nothing answers there
    command = tuple(str(tmp_path / "dead.jsonl") if a == "FILE" else a for a in command)
    def run() -> tuple[int, str, str]:
        code, out, err = in_process(capsys, *command, "--config", str(cfg))
        return code, re.sub(r'"time": [0-9.]+', "", out), err   # --json's time of reading
    missing = run()
    spool.touch()
    empty = run()
    assert "no such table" not in empty[1] + empty[2], empty
    assert empty == missing


@pytest.mark.parametrize("picked", [(), ("--reason", "HTTP 400"), ("--upstream", "seg")],
                         ids=["all", "reason", "upstream"])
async def test_dead_list_json_with_no_spool_yet_is_json(tmp_path: Path,
                                                        picked: tuple[str, ...]) -> None:
    """`outpost dead list --json | jq` before the agent's first start: it printed the text
    line "no dead letters (no agent answering, and no spool yet at ...)", which no JSON
    reader takes. It is the summary of a spool with no dead letter, as an empty spool's."""
    with no_agent_port() as port:
        cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port)
        run = outpost("dead", "list", "--json", *picked, "--config", str(cfg))
        assert run.returncode == 0 and run.stderr == "", (run.returncode, run.stderr)
        missing = json.loads(run.stdout)
        assert not (tmp_path / "spool.db").exists()   # nothing made to say it
        # What the same command reads from a spool with no dead letter.
        await (await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))).close()
        empty = json.loads(outpost("dead", "list", "--json", *picked, "--config",
                                   str(cfg)).stdout)
    assert missing == empty and missing["count"] == 0, (missing, empty)


# -- where the output goes ---------------------------------------------------------------------

@pytest.mark.parametrize("command", ["check-config", "status", "config-init", "--help",
                                     "--version", "dead-list-help"])
def test_output_to_a_full_disk_is_one_line_and_exit_1(tmp_path: Path, command: str) -> None:
    """`outpost status > file` on a full disk (/dev/full here) ended in a traceback, and
    `config init` reported nothing of the file it had written. `--help` and `--version`
    (argparse's own output) exited 0, nothing written and nothing said."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=1)
    args = {"check-config": ["check-config", str(cfg)], "status": ["status", "--config", str(cfg)],
            "config-init": ["config", "init", "--path", str(tmp_path / "new.toml")],
            "--help": ["--help"], "--version": ["--version"],
            "dead-list-help": ["dead", "list", "--help"]}[command]
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=30)
    line = one_line(run.stderr)
    assert run.returncode == 1 and "Exception ignored" not in run.stderr, (run.returncode, line)
    assert "cannot write the output" in line and "No space left on device" in line, line


def test_output_to_a_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    """`outpost check-config FILE >&-`: Python gives no sys.stdout at all."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=1)
    run = subprocess.run([sys.executable, "-m", "agent", "check-config", str(cfg)], cwd=ROOT,
                         stderr=subprocess.PIPE, text=True, timeout=30,
                         preexec_fn=lambda: os.close(1))  # noqa: PLW1509 (a close only)
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_a_dead_export_to_a_closed_stdout_is_one_line(tmp_path: Path) -> None:
    """`outpost dead export - >&-` asked for the letters on an output there is none of: it
    failed with a traceback (no sys.stdout to flush)."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=1)
    run = subprocess.run([sys.executable, "-m", "agent", "dead", "export", "-", "--config",
                          str(cfg)], cwd=ROOT, stderr=subprocess.PIPE, text=True, timeout=30,
                         preexec_fn=lambda: os.close(1))  # noqa: PLW1509 (a close only)
    line = one_line(run.stderr)
    assert run.returncode == 1 and run.stderr.strip() == line, run.stderr
    assert "standard output" in line and "closed" in line, line


# -- what the operator named, shown back -------------------------------------------------------

ODD = "x\x1b[2J\ny"   # a terminal's clear-screen, and a line break


@pytest.mark.parametrize("command", ["check-config", "status", "config-init"])
def test_a_path_with_control_characters_is_shown_escaped_on_one_line(
        tmp_path: Path, command: str) -> None:
    """A missing config or a config init path holding a line break was two lines; an escape
    sequence in it reached the terminal as it was."""
    missing = tmp_path / f"{ODD}.toml"
    args = {"check-config": ["check-config", str(missing)],
            "status": ["status", "--config", str(missing)],
            "config-init": ["config", "init", "--path", str(tmp_path / "no" / ODD)]}[command]
    (tmp_path / "no").write_text("a file, not a directory")
    line = refused(outpost(*args))
    assert "x\\x1b[2J\\ny" in line, line


def test_a_storage_path_with_control_characters_is_shown_escaped(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    cfg = tmp_path / "agent.toml"   # a JSON string is a TOML one, control characters escaped
    cfg.write_text(f"[storage]\npath = {json.dumps(str(tmp_path / 'afile' / ODD / 'spool.db'))}\n")
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        assert "x\\x1b[2J\\ny" in refused(outpost(*args), "storage.path")


@pytest.mark.parametrize("value", ['"""\n{dir}/spool.db\n"""', '"{dir}/spool.db\\t"',
                                   '"{dir}/spool\\u001b[2J.db"'],
                         ids=["trailing-line-break", "trailing-tab", "escape-sequence"])
def test_a_storage_path_holding_a_control_character_is_refused(tmp_path: Path,
                                                               value: str) -> None:
    """A TOML multi-line string keeps the line break before its closing quotes: check-config
    said ok, and the agent made its spool as `spool.db` and a line break, beside where the
    operator (and a backup) looks for it, its lock file and -wal alike. A control character
    in storage.path is refused in one line, as in every other key a path or name is given."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[listen]\nport = 0\n[storage]\npath = {value.format(dir=tmp_path)}\n")
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        refused(outpost(*args), "storage.path", "control characters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]



@pytest.mark.parametrize("space", ["\u3000", "\u202f", "\u00a0"],
                         ids=["ideographic-space", "narrow-no-break-space", "no-break-space"])
def test_a_storage_path_holding_a_space_of_another_script_is_accepted(
        tmp_path: Path, agent_process: Callable[..., AgentProcess], space: str) -> None:
    """A directory named with a space other than ASCII's (the ideographic space of a
    Japanese name, the narrow no-break space macOS puts in a screenshot's time, Option-
    space): printable text, shown as a space, that a spool made before was kept under.
    Refused as a control character, the agent no longer started on the config."""
    where = tmp_path / f"données{space}outpost"
    where.mkdir()
    spool = where / "spool.db"
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    checked = outpost("check-config", str(cfg))
    assert checked.returncode == 0 and checked.stdout.endswith("ok (0 upstream(s))\n"), checked
    assert agent_process(cfg, port).start().terminate() == 0
    assert spool.exists()

def test_a_valid_config_s_paths_are_shown_escaped(tmp_path: Path) -> None:
    """check-config's `FILE: ok` and the status table's spool line printed a path as it
    was: a line break split the line, an escape sequence reached the terminal."""
    (tmp_path / ODD).mkdir()
    cfg = write_config(tmp_path / ODD / "agent.toml", Path("spool.db"), port=free_port())
    checked = outpost("check-config", str(cfg))
    status = outpost("status", "--config", str(cfg))
    assert (checked.returncode, status.returncode) == (0, 0), (checked, status)
    for out in (checked.stdout, status.stdout):
        assert "\x1b" not in out, out
    assert checked.stdout.splitlines() == [f"{tmp_path}/x\\x1b[2J\\ny/agent.toml: ok "
                                           "(0 upstream(s))"], checked.stdout
    assert f"{tmp_path}/x\\x1b[2J\\ny/spool.db\n" in status.stdout, status.stdout


async def test_dead_s_spool_path_is_shown_escaped(tmp_path: Path) -> None:
    """`outpost dead list`, `retry`, `purge` and `export` named the spool file, or the file
    exported to, as it was. (A retry's line is a purge's: one of the two, for time.)"""
    (tmp_path / ODD).mkdir()
    cfg = write_config(tmp_path / ODD / "agent.toml", Path("spool.db"), port=free_port())
    runs = [outpost("dead", "list", "--config", str(cfg))]   # no spool yet
    await (await Spool.open(StorageConfig(path=str(tmp_path / ODD / "spool.db")))).close()
    runs += [outpost("dead", *args, "--config", str(cfg))
             for args in (("list",), ("purge", "--all"),
                          ("export", str(tmp_path / ODD / "dead.jsonl")))]
    for run in runs:
        assert run.returncode == 0, run
        assert "\x1b" not in run.stdout and "x\\x1b[2J\\ny/" in run.stdout, run.stdout


def test_dead_on_a_spool_it_cannot_read_names_it_escaped(tmp_path: Path) -> None:
    """`outpost dead` on a spool SQLite refuses printed its path as it was: a line break
    split the line, an escape sequence reached the terminal, and a byte that is not UTF-8
    was spelled `\\udce9`, where every other line spells it `\\xe9`."""
    where = tmp_path / os.fsdecode(b"d\xe9" + ODD.encode())
    where.mkdir()
    (where / "spool.db").write_bytes(b"not a database " * 100)
    cfg = write_config(where / "agent.toml", Path("spool.db"), port=free_port())
    run = outpost("dead", "list", "--config", str(cfg))
    line = one_line(run.stderr)
    # Said as damage (what mends it follows), the path escaped.
    assert run.returncode == 1 and "/d\\xe9x\\x1b[2J\\ny/spool.db is damaged (file is not a " \
        "database): start the agent" in line, run


def test_check_config_takes_the_file_as_every_command_does(tmp_path: Path) -> None:
    """`outpost check-config --config FILE`, as `run`, `status` and the others name it, was
    a usage error ("unrecognized arguments: --config"): the file only came positionally."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db")
    run = outpost("check-config", "--config", str(cfg))
    assert (run.returncode, run.stdout) == (0, f"{cfg}: ok (0 upstream(s))\n"), run
    both = outpost("check-config", str(cfg), "--config", str(tmp_path / "other.toml"))
    assert both.returncode == EXIT_CONFIG and "--config" in both.stderr, both   # a usage error


def test_dead_without_a_subcommand_names_the_choices() -> None:
    """It said "the following arguments are required: dead_command", a name in the code."""
    run = outpost("dead")
    assert run.returncode == EXIT_CONFIG and "Traceback" not in run.stderr
    assert "dead_command" not in run.stderr and "{list,show,export,retry,purge}" in \
        run.stderr.splitlines()[-1], run.stderr


async def test_dead_export_onto_a_directory_is_one_line(tmp_path: Path) -> None:
    """It printed Python's "[Errno 21] Is a directory: '...'"."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # empty, no agent
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)
    target = tmp_path / "out"
    target.mkdir()
    code, out = await run_outpost("dead", "export", str(target), "--config", str(cfg))
    line = one_line(out)
    assert code == 1 and line == f"outpost: cannot write {target}: it is a directory; name a file", line


@pytest.mark.parametrize("written", ["out/", "out/.", "out/./"])
async def test_dead_export_to_a_directory_not_there_yet_is_a_usage_error(
        tmp_path: Path, written: str) -> None:
    """`dead export letters/` before the directory exists: the slash dropped, the letters
    were written to a FILE named out ("exported N dead letters to out")."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()   # empty, no agent
    cfg = write_config(tmp_path / "agent.toml", spool, port=1)
    code, out = await run_outpost("dead", "export", f"{tmp_path}/{written}", "--config",
                                  str(cfg))
    assert "Traceback" not in out and "exported" not in out, out
    last = out.strip().splitlines()[-1]
    assert code == EXIT_CONFIG and "directory" in last, (code, last)
    assert str(tmp_path / "out" / "dead.jsonl") in last, last
    assert not (tmp_path / "out").exists()


def test_dead_export_to_an_empty_name_says_the_name_is_empty(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`outpost dead export ''` (an unset variable, say) said "cannot write .: it is a
    directory", a directory no one named. A usage error, as `--reason ''` is."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=1)
    code, out, err = in_process(capsys, "dead", "export", "", "--config", str(cfg))
    last = err.strip().splitlines()[-1]
    assert code == EXIT_CONFIG and out == "", (code, out)
    assert "empty" in last and "directory" not in last, last


@pytest.mark.parametrize("host", ["api..segment.io", "a" * 64 + ".example"])
def test_an_upstream_host_no_resolver_takes_is_refused_by_check_config_and_doctor(
        tmp_path: Path, host: str) -> None:
    # A doubled dot, or a label over 63 characters: no name the resolver can be asked
    # (the IDNA codec refuses it before any lookup, with a UnicodeError, not an OSError).
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", upstreams=[
        {"name": "seg", "protocol": "segment-http", "url": f"https://{host}/"}])
    for command in (["check-config", str(cfg)], ["doctor", "--config", str(cfg)]):
        run = subprocess.run([sys.executable, "-m", "agent", *command], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        line = one_line(run.stderr)
        assert run.returncode == EXIT_CONFIG, run.stdout + run.stderr
        assert line.startswith("outpost: ") and "upstream[0].url" in line, line


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_config_init_for_the_system_service_makes_its_directory_0755_whatever_the_umask(
        tmp_path: Path) -> None:
    """`sudo outpost config init` under a hardened root umask (027) made /etc/outpost 0750
    root:root: the outpost user could not reach the config in it, whatever the file's mode,
    and the service stopped at each start (systemd leaves an existing configuration
    directory's mode as it is)."""
    config_dir = tmp_path / "etc" / "outpost"
    run = subprocess.run(["sh", "-c", 'umask 027 && exec "$0" -m agent config init',
                          sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "OUTPOST_SYSTEM": "1",
                              "CONFIGURATION_DIRECTORY": str(config_dir)})
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o755
    assert (config_dir / "agent.toml").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_config_init_makes_the_directories_it_creates_private(tmp_path: Path) -> None:
    # The file holds upstream keys (0600); the directories made for it are 0700, as the
    # spool's are (XDG), whatever the umask: 0755 let every user list them.
    config_home = tmp_path / "xdg"
    run = outpost("config", "init", env={"XDG_CONFIG_HOME": str(config_home), "OUTPOST_SYSTEM": "0"})
    assert run.returncode == 0, run.stderr
    run = outpost("config", "init", "--path", str(tmp_path / "new" / "sub" / "agent.toml"))
    assert run.returncode == 0, run.stderr
    for made in (config_home, config_home / "outpost", tmp_path / "new", tmp_path / "new" / "sub"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert stat.S_IMODE((config_home / "outpost" / "agent.toml").stat().st_mode) == 0o600


@pytest.mark.parametrize("args", [("status",), ("check-config",), ("run",)])
@pytest.mark.parametrize("where", ["cwd", "config_dir"])
@pytest.mark.parametrize("kind", ["dangling", "directory"])
def test_a_config_at_a_lookup_place_that_is_no_file_is_one_line(
        tmp_path: Path, args: tuple[str, ...], where: str, kind: str) -> None:
    """An agent.toml that is a symlink to a file not there (a config kept on a mount not up
    yet, a moved file) or a directory was passed over as if absent: the built-in defaults
    stood in for it, unsaid, with another spool and no upstream."""
    work = tmp_path / "work"
    work.mkdir()
    place = (work if where == "cwd" else tmp_path / "c" / "outpost") / "agent.toml"
    place.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dangling":
        place.symlink_to(tmp_path / "gone" / "agent.toml")
    else:
        place.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OUTPOST_CONFIG"}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "c"), XDG_DATA_HOME=str(tmp_path / "d"),
               OUTPOST_SYSTEM="0")
    run = subprocess.run([sys.executable, "-m", "agent", *args], cwd=work, env=env,
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    line = refused(run, str(place.absolute()), "--config")
    assert ("does not exist" if kind == "dangling" else "directory") in line, line
    assert not (tmp_path / "d").exists(), "the defaults' spool was made"
