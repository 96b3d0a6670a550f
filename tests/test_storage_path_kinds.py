"""storage.path values an operator can plausibly write that name no spool file: a `~user`
for no such user. Each is one line and the documented exit code from
the real `python -m agent` command, and what is at the path is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli_mistakes import outpost, refused

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
