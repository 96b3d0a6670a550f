"""A spool file replaced under the running agent by a symbolic link, or a symlinked
storage.path pointed at something that is no file: the recovery must keep the agent's
queue without following the link. Every target here is made in tmp_path alone."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.test_disk import (  # noqa: F401  (immutable_fs, six_mb_fs: fixtures)
    _chattr,
    event,
    immutable_fs,
    post,
    rows,
    six_mb_fs,
)


def _target(where: Path, kind: str) -> Path:
    """What the link names: a file of another program, a fifo, or a directory."""
    where.mkdir(mode=0o700)
    found = where / "victim"
    if kind == "file":
        found.write_text("precious\n")
    elif kind == "fifo":
        os.mkfifo(found, 0o600)
    else:
        found.mkdir()
    return found


async def _posted_around(agent: Any, then: str, swap: Callable[[], None]) -> list[int]:
    """Three events posted, ``swap`` done under the agent, then (``then`` a commit) two more
    posted, each answered 200, and the agent stopped: the events posted after the swap."""
    more = [100, 101] if then == "commit" else []
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3)])).status == 200
        swap()
        for n in more:
            answered = await post(s, agent.port, [event(n, pad="")])
            assert answered.status == 200, f"{answered.status}: {agent.spool.open_error}"
    await agent.stop()
    return more


def _left_alone(found: Path, kind: str, before: os.stat_result) -> None:
    """``found`` is as it was, and nothing was made beside it."""
    now = os.lstat(found)
    assert (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) == \
        (before.st_dev, before.st_ino, stat.S_IFMT(before.st_mode)), f"{found} was moved"
    if kind == "file":
        assert found.read_text() == "precious\n"
    assert sorted(p.name for p in found.parent.iterdir()) == ["victim"], \
        "files were made beside the link's target"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX fifos")
@pytest.mark.parametrize("then", ["commit", "stop"])
@pytest.mark.parametrize("kind", ["file", "fifo", "directory"])
async def test_a_spool_replaced_by_a_link_is_not_followed(
        make_agent: Any, tmp_path: Path, kind: str, then: str) -> None:
    """storage.path names spool.db directly; while the agent runs, spool.db is replaced by
    a symbolic link (to a file elsewhere, a fifo, a directory). The recovery followed it:
    it renamed the link's target to <target>.corrupt-... and made a fresh spool (with its
    .lock, -wal and -shm) in its place, outside the spool's directory (a link to /dev/null
    renamed the device, run as root). The link is kept aside as any file put there is, not
    followed; the queue goes on in a fresh spool at the path, nothing answered 200 lost."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "spool.db"
    found = _target(tmp_path / "elsewhere", kind)
    before = os.lstat(found)
    agent = await make_agent(spool=path)

    def swap() -> None:
        path.unlink()
        path.symlink_to(found)
    more = await _posted_around(agent, then, swap)
    _left_alone(found, kind, before)
    assert path.is_file() and not path.is_symlink()
    assert rows(path) == 3 + len(more), "events answered 200 are not in the spool file"
    kept = [p for p in state.iterdir() if p.is_symlink()]
    assert [os.readlink(p) for p in kept] == [str(found)], "the link put there is not kept"
    assert kept[0].name.startswith("spool.db.corrupt-"), kept


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX fifos")
@pytest.mark.parametrize("then", ["commit", "stop"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
async def test_a_linked_spool_pointed_at_no_file_is_not_followed(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str,
        then: str) -> None:
    """storage.path a symlink to the spool on a bigger disk (followed when it is pointed
    at another spool), pointed while the agent runs at a fifo or a directory, which the
    start refuses as storage.path. The recovery renamed that to <target>.corrupt-... and
    made a fresh spool in its place. It is left alone and said in one line; the agent
    keeps its queue in the file it opened, which the link named."""
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(disk / "spool.db")
    found = _target(tmp_path / "elsewhere", kind)
    before = os.lstat(found)
    agent = await make_agent(spool=link)

    def swap() -> None:
        moving = link.with_name("moving")
        moving.symlink_to(found)
        moving.replace(link)
    more = await _posted_around(agent, then, swap)
    _left_alone(found, kind, before)
    assert os.readlink(link) == str(found), "the link was changed"
    assert rows(disk / "spool.db") == 3 + len(more), "events answered 200 are not kept"
    said = [r.getMessage() for r in caplog.records if str(found) in r.getMessage()]
    assert len(said) == 1 and "not followed" in said[0], said



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX fifos")
@pytest.mark.parametrize("kind", ["file", "fifo"])
async def test_outpost_run_stopped_after_its_spool_is_replaced_by_a_link_leaves_it_alone(
        agent_process: Callable[..., AgentProcess], tmp_path: Path, kind: str) -> None:
    """As above, with `outpost run` (which holds the spool's lock file) stopped by SIGTERM:
    its stop took the lock again beside the link's target, a .lock file made there."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "spool.db"
    found = _target(tmp_path / "elsewhere", kind)
    before = os.lstat(found)
    port = free_port()
    agent = agent_process(write_config(tmp_path / "agent.toml", path, port=port), port)
    await asyncio.to_thread(agent.start)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, port, [event(i, pad="") for i in range(3)])).status == 200
    path.unlink()
    path.symlink_to(found)
    assert await asyncio.to_thread(agent.terminate) == 0, agent.log.read_text()
    _left_alone(found, kind, before)
    assert rows(path) == 3, "events answered 200 are not in the spool file"


async def test_a_link_put_at_a_spool_path_while_the_spool_cannot_be_opened_is_not_followed(
        make_agent: Any, immutable_fs: Path) -> None:  # noqa: F811
    """storage.path names spool.db directly, in a directory the agent cannot write to at
    the start (immutable here): no spool is open, events are refused (503) and the open is
    tried again. Meanwhile a symbolic link to a file of another program is put at the path.
    The try again opened the link's target as the spool (chmod'ed it 0600), found no
    database there, and moved it aside as corrupt, a fresh spool made in its place. The
    link is refused as a directory put there is (503, said in open_error), the file left
    alone."""
    state = immutable_fs / "state"
    state.mkdir(mode=0o700)
    path = state / "spool.db"
    found = _target(immutable_fs / "elsewhere", "file")
    before = os.lstat(found)
    _chattr("+i", state)
    agent = await make_agent(spool=path)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(1, pad="")])).status == 503
        _chattr("-i", state)
        path.symlink_to(found)
        async with agent.spool.lock:
            assert not await agent.spool.reopen()
        assert (await post(s, agent.port, [event(2, pad="")])).status == 503
    error = agent.spool.open_error
    assert error and "symbolic link" in error and "not followed" in error, error
    await agent.stop()
    _left_alone(found, "file", before)
    assert stat.S_IMODE(os.stat(found).st_mode) == stat.S_IMODE(before.st_mode)
    assert path.is_symlink()


def _read_from(fifo: Path) -> Callable[[], bool]:
    """Whether anything opened ``fifo`` to read from it since this call: a writer waits
    for a reader in another thread (a reader alone would wait forever, as the agent did).
    The call that answers lets the writer go, if no reader came."""
    opened = threading.Event()

    def write() -> None:
        os.close(os.open(fifo, os.O_WRONLY))   # returns once a reader has it open
        opened.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    def answer() -> bool:
        came = opened.is_set()
        if not came:
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))   # the writer's reader
        writer.join()
        return came
    return answer


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX fifos")
async def test_a_spool_replaced_by_a_link_with_no_room_for_a_copy_is_not_read_through_it(
        make_agent: Any, tmp_path: Path, six_mb_fs: Path) -> None:  # noqa: F811
    """As above, on a disk with no room left for a copy of the file the agent has open:
    the link put at the path was moved aside in the spool's place and salvaged as it,
    opened through the link. A fifo there (nothing writes to it) hung the salvage, and
    the stop, or the next start, with it; a file of another program was read as the
    agent's queue. It is kept aside, not read; the queue it could not copy is said lost."""
    state = six_mb_fs / "state"
    path = state / "spool.db"
    found = _target(tmp_path / "elsewhere", "fifo")
    before = os.lstat(found)
    agent = await make_agent(spool=path)
    async with aiohttp.ClientSession() as s:
        for n in range(20):   # ~850 KB queued
            assert (await post(s, agent.port, [event(n * 10 + i) for i in range(10)])).status \
                == 200
    free = os.statvfs(six_mb_fs)
    filler = six_mb_fs / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 40_000))
    read = _read_from(found)
    path.unlink()
    path.symlink_to(found)
    await agent.stop()
    filler.unlink()
    await (await make_agent(spool=path)).stop()   # a salvage left to the next start
    assert not read(), "the salvage opened the link's target, a fifo"
    _left_alone(found, "fifo", before)
    kept = [p for p in state.iterdir() if p.is_symlink()]
    assert [os.readlink(p) for p in kept] == [str(found)], "the link put there is not kept"
