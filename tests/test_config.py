"""agent.toml parsing: defaults, lookup order, and errors that name the key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.config import ConfigError, parse

ROOT = Path(__file__).resolve().parent.parent


def test_default_agent_toml_is_valid_and_matches_the_contract() -> None:
    cfg = config_mod.load_file(ROOT / "agent.toml")
    assert cfg.listen.host == "127.0.0.1" and cfg.listen.port == 8765
    assert cfg.storage.when_full == "reject" and cfg.storage.sync == "full"
    assert cfg.storage.max_size_mb == 512 and cfg.storage.max_age_days == 30
    assert cfg.storage.dedupe_max_keys == 1_000_000 and cfg.storage.full_retry_after_s == 30
    (up,) = cfg.upstreams
    assert (up.name, up.protocol, up.url, up.keys) == ("nucleus", "nucleus-ws",
                                                        "wss://app.nucleus.sh", ("*",))
    assert up.batch_max_events == 500 and up.batch_max_bytes == 500_000


@pytest.mark.parametrize("raw, key", [
    ({"listen": {"hots": "x"}}, "listen.hots"),
    ({"listen": {"port": "8765"}}, "listen.port"),
    ({"listen": {"port": 70000}}, "listen.port"),
    ({"listen": {"accept_keys": "abc"}}, "listen.accept_keys"),
    ({"storage": {"when_full": "panic"}}, "storage.when_full"),
    ({"storage": {"sync": "off"}}, "storage.sync"),
    ({"storage": {"max_size_mb": 0}}, "storage.max_size_mb"),
    ({"storage": {"max_size_mb": True}}, "storage.max_size_mb"),
    ({"storage": {"dedupe_max_keys": 0}}, "storage.dedupe_max_keys"),
    ({"storage": {"full_retry_after_s": 0}}, "storage.full_retry_after_s"),
    ({"storage": {"full_retry_after_s": 301}}, "storage.full_retry_after_s"),
    ({"device": {"ram": 4}}, "device.ram"),
    ({"upstream": [{"name": "a", "protocol": "carrier-pigeon", "url": "http://x"}]},
     "upstream[0].protocol"),
    ({"upstream": [{"name": "a", "protocol": "nucleus-ws", "url": "http://x"}]},
     "upstream[0].url"),
    ({"upstream": [{"name": "a", "protocol": "segment-http", "url": "https://x",
                    "batch_size": 5}]}, "upstream[0].batch_size"),
    ({"upstream": [{"protocol": "segment-http", "url": "https://x"}]}, "upstream[0].name"),
    ({"upstream": [{"name": "a", "protocol": "segment-http", "url": "https://x"},
                   {"name": "a", "protocol": "segment-http", "url": "https://y"}]},
     "upstream[1].name"),
    ({"bogus": {}}, "bogus"),
])
def test_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_routing_takes_the_first_matching_upstream() -> None:
    cfg = parse({"upstream": [
        {"name": "a", "protocol": "segment-http", "url": "https://a", "keys": ["k1"]},
        {"name": "b", "protocol": "nucleus-http", "url": "https://b", "keys": ["*"]}]})
    assert cfg.route("k1").name == "a"  # type: ignore[union-attr]
    assert cfg.route("other").name == "b"  # type: ignore[union-attr]
    assert parse({}).route("k1") is None


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("OUTPOST_CONFIG", raising=False)
    monkeypatch.setenv("OUTPOST_SYSTEM", "0")   # tests run as root: ask for the user dirs
    assert config_mod.find_config_file(None) is None           # built-in defaults
    user = tmp_path / "xdg" / "outpost" / "agent.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[listen]\nport = 1\n")
    assert config_mod.find_config_file(None) == user
    (tmp_path / "agent.toml").write_text("[listen]\nport = 2\n")
    assert config_mod.find_config_file(None) == Path("agent.toml")
    monkeypatch.setenv("OUTPOST_CONFIG", str(tmp_path / "env.toml"))
    assert config_mod.find_config_file(None) == tmp_path / "env.toml"
    assert config_mod.find_config_file("explicit.toml") == Path("explicit.toml")


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "a.toml"
    bad.write_text("[listen\nport = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config_mod.load_file(bad)


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[listen]\nport = 9000\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nwhen_full = 'explode'\n")
    ok = subprocess.run([sys.executable, "-m", "agent", "check-config", str(good)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([sys.executable, "-m", "agent", "check-config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert fail.returncode != 0
    assert "storage.when_full" in fail.stderr


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "check-config", *args],
                          capture_output=True, text=True, cwd=ROOT)


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """The operator's mistake as one line: never a traceback."""
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    return run.stderr


@pytest.mark.parametrize("group", [False, True])
def test_check_config_reload_refuses_a_pid_that_names_no_one_process(
        tmp_path: Path, group: bool) -> None:
    """`--reload -N` sent SIGHUP to process group N (-1: every process on the machine), and
    0 was taken as "no --reload" (audit). Both run in a session of their own, with a
    process group of ours as -N, so that a regression signals nothing else."""
    good = tmp_path / "good.toml"
    good.write_text("[listen]\nport = 9000\n")
    target = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pid = f"-{target.pid}" if group else "0"
        run = subprocess.run([sys.executable, "-m", "agent", "check-config", str(good),
                              f"--reload={pid}"], capture_output=True, text=True, cwd=ROOT,
                             start_new_session=True)
        assert run.returncode == 2 and "PID" in one_line(run)
        assert target.poll() is None   # not signalled
    finally:
        target.kill()
        target.wait()


def test_check_config_reload_of_a_pid_beyond_any_is_one_line(tmp_path: Path) -> None:
    """os.kill raised OverflowError, not an OSError: a traceback (review)."""
    good = tmp_path / "good.toml"
    good.write_text("[listen]\nport = 9000\n")
    run = check_config(str(good), "--reload", str(2**40))
    assert run.returncode in (1, 2) and str(2**40) in one_line(run)


def test_check_config_reload_of_a_process_that_is_gone_is_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[listen]\nport = 9000\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = check_config(str(good), "--reload", str(gone.pid))
    assert run.returncode == 1 and str(gone.pid) in one_line(run)


@pytest.mark.parametrize("text,fragment", [
    # A listed key with a line break would split every log line naming it (review).
    (b'[listen]\naccept_keys = ["a\\nb"]\n', "listen.accept_keys"),
    (b'[listen]\naccept_keys = ["a\\u0000b"]\n', "listen.accept_keys"),
    (b"\xff\xfe[listen]\nport = 1\n", "not UTF-8"),
    (b'[storage]\npath = "/tmp/a\\u0000b.db"\n', "storage.path"),
    (b'[listen]\nhost = "127.0.0.1\\u0000x"\n', "listen.host"),
    # /status answered 500 with a traceback in the log (orjson: beyond 64 bits).
    (b"[storage]\nmax_size_mb = 99999999999999999999\n", "storage.max_size_mb"),
    (b"[listen]\nbody_timeout_s = inf\n", "listen.body_timeout_s"),
    # Under 2**53 but not in bytes: /status answered 500 (orjson: beyond 64 bits), and
    # with it `outpost status` and the status page.
    (b"[storage]\nmax_size_mb = 100000000000000\n", "storage.max_size_mb"),
    (b"[listen]\nmax_inflight_mb = 100000000000000\n", "listen.max_inflight_mb"),
    # Past SQLite's 64 bits in ms: every expiry run failed (OverflowError, a traceback in
    # the log each time), so nothing ever expired and no dedupe key was ever forgotten.
    (b"[storage]\nmax_age_days = 1000000000000\n", "storage.max_age_days"),
    (b"[storage]\ndedupe_window_h = 100000000000000\n", "storage.dedupe_window_h"),
    # An upstream's name is in every log line, status row and doctor line about it: a
    # line break split them, an escape sequence reached the terminal raw (doctor, status).
    (b'[[upstream]]\nname = "a\\nb"\nprotocol = "segment-http"\nurl = "http://h/"\n',
     "upstream[0].name"),
    (b'[[upstream]]\nname = "a\\u001b[31m"\nprotocol = "segment-http"\nurl = "http://h/"\n',
     "upstream[0].name"),
    # An upstream's own key that its protocol cannot carry: every event would go to
    # another path (`/app/../track` is `/track`), or to the account named before the ':'.
    (b'[[upstream]]\nname = "n"\nprotocol = "nucleus-http"\nurl = "http://h/"\nkey = ".."\n',
     "upstream[0].key"),
    (b'[[upstream]]\nname = "n"\nprotocol = "nucleus-ws"\nurl = "ws://h/"\nkey = "."\n',
     "upstream[0].key"),
    (b'[[upstream]]\nname = "s"\nprotocol = "segment-http"\nurl = "http://h/"\nkey = "ab:cd"\n',
     "upstream[0].key"),
])
def test_a_config_the_agent_cannot_use_is_one_line_and_exit_2(
        tmp_path: Path, text: bytes, fragment: str) -> None:
    """Each passed check-config and then failed `run` with a traceback, or failed
    check-config with one (audit)."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(text)
    run = check_config(str(bad))
    assert run.returncode == 2 and fragment in one_line(run)


def test_a_spool_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """check-config said ok, and `run` started an agent refusing every event (audit)."""
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[storage]\npath = "{tmp_path}"\n')
    run = check_config(str(bad))
    assert run.returncode == 2 and "storage.path" in one_line(run)


def test_output_cut_short_by_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """`outpost ... | head -1`: a BrokenPipeError traceback once head had gone (audit)."""
    good = tmp_path / "good.toml"
    good.write_text("[listen]\nport = 9000\n")
    reader, writer = os.pipe()
    os.close(reader)   # the reader is gone before the first line is written
    run = subprocess.run([sys.executable, "-m", "agent", "check-config", str(good)],
                         stdout=writer, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    os.close(writer)
    assert "Traceback" not in run.stderr and run.returncode == 141, run.stderr   # 128 + SIGPIPE


def test_an_interrupt_while_run_starts_is_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C in the first second of `outpost run`, while its modules load (before its
    signal handlers exist), printed a KeyboardInterrupt traceback (audit)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[listen]\nport = 0\n[storage]\npath = "{tmp_path / "spool.db"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    # Interrupted once the CLI's imports have begun (a C extension they load is mapped):
    # before its handlers exist, unless the start was quicker than this poll.
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while "orjson" not in maps.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, "the CLI's imports never began"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err.decode())


@pytest.mark.parametrize("argv,fragment", [
    (["check-config", ""], "config"),                  # no file named: not the defaults
    (["check-config", "--config", ""], "config"),
    (["status", "--config", ""], "config"),
    (["dead", "list", "--limit", "-1"], "--limit"),
    (["dead", "purge", "--reason", ""], "--reason"),
    (["dead", "retry", "--reason", ""], "--reason"),
    # Bytes that are not UTF-8 (a Latin-1 terminal's paste): a traceback (UnicodeEncodeError)
    (["dead", "list", "--reason", "caf\udce9"], "--reason"),
    (["dead", "purge", "--reason", "caf\udce9"], "--reason"),
])
def test_an_empty_or_negative_argument_is_refused(tmp_path: Path, argv: list[str],
                                                  fragment: str) -> None:
    """An empty --config fell back to $OUTPOST_CONFIG, ./agent.toml or the defaults without a
    word; `dead list --limit -1` listed all but one; an empty --reason was accepted (audit)."""
    # What "" fell back to: its spool in tmp_path, should a refusal fail to come first.
    (tmp_path / "agent.toml").write_text(
        f'[listen]\nport = 9000\n[storage]\npath = "{tmp_path / "spool.db"}"\n')
    env = {k: v for k, v in os.environ.items() if k != "OUTPOST_CONFIG"}   # "" is refused too
    run = subprocess.run([sys.executable, "-m", "agent", *argv], capture_output=True,
                         text=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and fragment in run.stderr, run.stderr


def test_the_shipped_agent_toml_names_every_key() -> None:
    # docs/operations.md: "The shipped agent.toml documents every key".
    import dataclasses

    from agent import settings

    text = (ROOT / "agent.toml").read_text()
    tables = {"listen": settings.ListenConfig, "storage": settings.StorageConfig,
              "device": settings.DeviceConfig, "log": settings.LogConfig,
              "sync": settings.SyncConfig, "upstream": settings.UpstreamConfig}
    missing = [f"{table}.{f.name}" for table, kind in tables.items()
               for f in dataclasses.fields(kind)
               if "set_by" not in f.metadata   # not from agent.toml (settings.py says who)
               and not re.search(rf"(^|[#\s]){f.name}\s*=", text, re.M)]
    assert not missing, missing


@pytest.mark.parametrize(("rules", "hold_h", "noted"), [
    ('on_metered = "hold"', 48, True),
    ('on_low_battery = "priority_only"', 24, True),   # 24 h is not below one day
    ('on_metered = "hold"', 23.5, False),
    ('on_metered = "normal"', 48, False),            # nothing is ever held
])
def test_check_config_notes_held_events_that_expire_before_max_hold_h_sends_them(
        tmp_path: Path, rules: str, hold_h: float, noted: bool) -> None:
    """A transmit profile that holds events, with storage.max_age_days no longer than
    sync.max_hold_h: expiry deletes held events before the hold is ended for them (both
    clocks must pass max_age_days, either clock ends a hold). The config loaded and lost
    them silently; now check-config (and the agent's start) says so, and it stays valid."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[storage]\nmax_age_days = 1\n\n[sync]\n{rules}\nmax_hold_h = {hold_h}\n")
    run = check_config(str(cfg))
    assert run.returncode == 0, run.stderr
    notes = [ln for ln in run.stdout.splitlines() if ln.startswith("note:")]
    if not noted:
        assert notes == [], run.stdout
        return
    (note,) = notes
    assert f"sync.max_hold_h = {hold_h:g}" in note and "storage.max_age_days = 1" in note
    assert "expire" in note


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows Notepad (before 1903) and PowerShell 5's `Out-File -Encoding utf8` start a
    UTF-8 file with a byte-order mark, which nobody sees in an editor. It was refused as
    "invalid TOML: Invalid statement (at line 1, column 1)", naming nothing to fix."""
    spool = tmp_path / "spool.db"
    config = tmp_path / "agent.toml"
    config.write_bytes(b"\xef\xbb\xbf" + f'[listen]\nport = 9000\n[storage]\npath = "{spool}"\n'
                       .encode())
    run = check_config(str(config))
    assert run.returncode == 0 and run.stdout.startswith(f"{config}: ok"), run.stderr
