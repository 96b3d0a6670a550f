"""listen.allowed_origins entries no browser can ever send as its Origin (a host without
its scheme, a page's URL with its path, a default port) are refused with the key named,
as every bad value is: accepted, every page from that site got a 403 while the config
looked right to the operator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.test_cli_mistakes import outpost, refused


@pytest.mark.parametrize("entry", ["app.example", "https://app.example/shop",
                                   "https://app.example:443", "http://localhost:80",
                                   "https://app.example?x=1", "https://"])
def test_an_origin_no_browser_sends_is_refused_naming_it(tmp_path: Path, entry: str) -> None:
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"allowed_origins": ["https://ok.example", entry]})
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        refused(outpost(*args), "listen.allowed_origins", json.dumps(entry)[1:-1])


def test_the_origins_browsers_send_are_accepted(tmp_path: Path) -> None:
    entries = ["https://app.example", "https://app.example/", "http://localhost:3000",
               "HTTPS://App.Example", "http://[::1]:8080", "null", "*", "app://.",
               "chrome-extension://abcdefghijklmnop"]
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"allowed_origins": entries})
    run = outpost("check-config", str(cfg))
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("entry", ["https://app.example ", " https://app.example",
                                   "https://app .example"])
def test_an_origin_holding_a_space_is_refused_naming_it(tmp_path: Path, entry: str) -> None:
    """A paste's stray space: urlsplit reads past it, but no browser sends one in its
    Origin and the guard compares the strings, so every page of that site got 403."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"allowed_origins": [entry]})
    refused(outpost("check-config", str(cfg)), "listen.allowed_origins",
            json.dumps(entry)[1:-1])


def test_null_in_any_case_is_accepted_as_the_guard_matches_it(tmp_path: Path) -> None:
    """The guard compares entries lower-cased, so "Null" or "NULL" matched a sandboxed
    page's `Origin: null` and worked; the Origin check must not refuse them now."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"allowed_origins": ["NULL", "Null"]})
    run = outpost("check-config", str(cfg))
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("entry", ["https://app.example:", "http://localhost:03000"])
def test_a_port_written_as_no_browser_writes_it_is_refused(tmp_path: Path, entry: str) -> None:
    """A colon with no port, or a port with a leading zero: urlsplit reads the port as none
    or as 3000, but a browser's Origin never holds them so, and the guard compares the
    strings: every page of that site got 403."""
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"allowed_origins": [entry]})
    refused(outpost("check-config", str(cfg)), "listen.allowed_origins", entry)
