"""The lines a stop logs when the spool file deleted under the agent cannot be kept: they
say why, and name no file that is not there."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_disk import (  # noqa: F401  (immutable_fs, six_mb_fs: fixtures)
    _chattr,
    event,
    immutable_fs,
    post,
    six_mb_fs,
)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_deleted_spool_in_a_directory_no_longer_writable_is_said_for_that(
        make_agent: Any, immutable_fs: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """spool.db removed while the agent runs, and its directory made read-only (immutable
    here; one the agent's user may no longer write to alike): the stop cannot copy the
    file it has open. Its line said "its queue lost with it, no room for a copy", sending
    the operator after disk space; the cause is the directory's permission."""
    state = immutable_fs / "state"
    path = state / "spool.db"
    agent = await make_agent(spool=path)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3)])).status == 200
    path.unlink()
    _chattr("+i", state)
    caplog.clear()
    await agent.stop()
    said = [line for line in _errors(caplog) if "copy" in line]
    assert said, _errors(caplog)
    assert not any("no room" in line for line in said), said
    assert all("Operation not permitted" in line for line in said), said


async def test_a_spool_whose_directory_is_replaced_names_no_file_moved_aside_it_is_not(
        make_agent: Any, immutable_fs: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """The spool's directory moved away while the agent runs, and a read-only one put in
    its place: the stop has nothing at the path to move and no copy can be made there. Its
    line said the spool was "moved aside to .../spool.db.corrupt-...", a file that does not
    exist."""
    state = immutable_fs / "state"
    path = state / "spool.db"
    agent = await make_agent(spool=path)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3)])).status == 200
    state.rename(immutable_fs / "moved")
    state.mkdir(mode=0o700)
    _chattr("+i", state)
    caplog.clear()
    await agent.stop()
    said = _errors(caplog)
    assert said
    named = [Path(m) for line in said for m in re.findall(r"(/\S+\.corrupt-[0-9T.]+)", line)]
    assert not [m for m in named if not os.path.lexists(m)], said
