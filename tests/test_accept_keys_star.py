"""listen.accept_keys = ["*"]: in an upstream's `keys`, "*" is every key; here it was
taken as the one key "*", so every app was refused (401) while check-config said ok.
Refused with the key named and the fix ([] accepts any key), as a bad value is."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.test_cli_mistakes import outpost, refused


@pytest.mark.parametrize("keys", [["*"], ["wk_live_app1", "*"]])
def test_a_star_in_accept_keys_is_refused_naming_the_empty_list(
        tmp_path: Path, keys: list[str]) -> None:
    cfg = write_config(tmp_path / "agent.toml", tmp_path / "spool.db",
                       listen={"accept_keys": keys})
    for args in (("check-config", str(cfg)), ("run", "--config", str(cfg))):
        line = refused(outpost(*args), "listen.accept_keys", '"*"', "[]")
        assert "wk_live_app1" not in line, line
