"""agent.toml parsing: defaults, lookup order, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
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
    assert cfg.storage.dedupe_max_keys == 1_000_000
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
