"""listen.allowed_origins entries no browser can ever send as its Origin (a host without
its scheme, a page's URL with its path, a default port) are refused with the key named,
as every bad value is: accepted, every page from that site got a 403 while the config
looked right to the operator."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_config
from tests.segment_helpers import basic, call
from tests.test_cli_mistakes import outpost, refused

TRACK = {"userId": "u", "event": "Clicked"}
PIXEL = base64.urlsafe_b64encode(json.dumps({"writeKey": "k", "userId": "u", "event": "Seen"}).encode()
                         ).decode()


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


@pytest.mark.parametrize(("entry", "sent"), [
    ("http://bücher.example:3000", "http://xn--bcher-kva.example:3000"),
    ("https://Straße.example", "https://xn--strae-oqa.example")])
async def test_an_origin_written_in_its_own_script_admits_its_pages(make_agent: Any, entry: str,
                                                                    sent: str) -> None:
    """A site's name as the address bar shows it (Unicode): its pages send their Origin in
    the name's ASCII form (punycode, UTS 46 as Chromium writes it, `ß` kept), on a fetch
    and in the Referer of an image alike; the entry, accepted, matched neither, and every
    page of that site got 403 with the config looking right."""
    agent = await make_agent(listen={"allowed_origins": [entry]})
    reply = await call(agent.port, "/v1/track", TRACK,
                       headers={"Origin": sent, "Authorization": basic("k")})
    assert reply.status == 200, reply.body
    assert reply.headers["Access-Control-Allow-Origin"] == sent
    pixel = await call(agent.port, "/v1/pixel/track?data=" + PIXEL, method="GET", headers={
        "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image",
        "Referer": sent + "/shop"})
    assert pixel.status == 200 and pixel.body.startswith(b"GIF"), pixel.body
    assert agent.spool.depth == 2
