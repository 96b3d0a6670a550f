"""One agent per spool: a second `outpost run` on a spool in use refuses to start.

Two agents forwarding one queue each send every event (duplicates upstream), and each
keeps its own dedupe index and depths, so neither the window's exact dedupe nor the
queue's counts hold (audit: a second agent on another port started without a word).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.paths import agent_holds, spool_lock
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.types import SpoolFull
from tests.conftest import ROOT, AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.test_dead_export_target import post_event
from tests.test_disk import event, upstream
from tests.waiting import wait_for


def _refused(config: Path, spool: Path) -> None:
    try:
        run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                             capture_output=True, text=True, cwd=ROOT, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("a second agent started on the spool in use") from None
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "in use by another agent" in run.stderr and str(spool) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_a_second_agent_on_a_spool_in_use_refuses_to_start(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Also once the spool's directory was removed under the first (rm -rf of its state
    directory) and made again by its recovery: the lock file went with it, and a second
    agent started on the same spool, two writers forwarding one queue."""
    state = tmp_path / "state"
    spool = state / "spool.db"
    port, other = free_port(), free_port()
    first = agent_process(write_config(tmp_path / "a.toml", spool, port=port), port).start()
    second = write_config(tmp_path / "b.toml", spool, port=other)
    _refused(second, spool)
    shutil.rmtree(state)
    post_event(port, "wk_lock")   # its commit finds the file gone: the recovery makes the directory
    assert spool.exists()
    _refused(second, spool)
    first.kill9()   # the lock ends with its process, however it ends
    again = agent_process(second, other).start()
    assert again.terminate() == 0


def test_a_second_agent_is_refused_once_the_first_commits_after_its_lock_file_was_removed(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """The lock file alone removed under the agent (taken for one a crash left): the first
    kept its lock on the removed file, and its spool, still at the path, was never found
    replaced, so nothing took the lock again: a second agent started on the same spool,
    two writers forwarding one queue. The first's next commit takes it again."""
    spool = tmp_path / "spool.db"
    port, other = free_port(), free_port()
    first = agent_process(write_config(tmp_path / "a.toml", spool, port=port), port).start()
    spool_lock(spool).unlink()
    post_event(port, "wk_lock")
    _refused(write_config(tmp_path / "b.toml", spool, port=other), spool)
    assert first.terminate() == 0


def test_a_second_agent_on_a_symlink_to_the_spool_in_use_refuses_to_start(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """storage.path naming a symlink to a spool another agent runs on (a spool moved to a
    bigger disk and linked back, one config naming each path): the lock file went beside
    the name given, not the file, and a second agent started on the same spool, two
    writers forwarding one queue."""
    spool = tmp_path / "disk" / "spool.db"
    port, other = free_port(), free_port()
    first = agent_process(write_config(tmp_path / "a.toml", spool, port=port), port).start()
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(spool)
    _refused(write_config(tmp_path / "b.toml", link, port=other), link)
    assert first.terminate() == 0


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    """A directory where the lock file goes (or one left unreadable by another user) gave
    a traceback (review)."""
    spool = tmp_path / "spool.db"
    (tmp_path / "spool.db.lock").mkdir()
    cfg = write_config(tmp_path / "a.toml", spool, port=free_port())
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and "spool.db.lock" in run.stderr, run.stderr


async def test_a_lock_file_that_is_a_fifo_holds_no_offline_command(tmp_path: Path) -> None:
    """A stopped agent's spool with a FIFO where its lock file goes: `outpost status` and
    `outpost dead` open that file to ask whether an agent holds it, and a FIFO's open
    waits for a writer: they waited forever. They answer from the spool."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()
    spool_lock(spool).unlink(missing_ok=True)
    os.mkfifo(spool_lock(spool))
    cfg = write_config(tmp_path / "a.toml", spool, port=free_port())
    for args in (["status"], ["dead", "list"]):
        run = subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(cfg)],
                             capture_output=True, text=True, cwd=ROOT, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 0 and "no agent running" in run.stdout, (args, run)


async def test_a_lock_file_left_where_the_removed_one_was_is_taken_at_the_recovery(
        tmp_path: Path) -> None:
    """The spool's directory removed under the agent (rm -rf), and a lock file there again
    before its next commit (a second agent started meanwhile and stopped leaves one): the
    recovery takes that one, so a third is still refused. Only a missing lock file was
    made again: one found there was taken for the agent's own, held by nobody, and a
    third agent started on the spool in use."""
    state = tmp_path / "state"
    path = state / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)), holds_lock=True)
    try:
        assert agent_holds(path)
        shutil.rmtree(state)
        state.mkdir(mode=0o700)
        spool_lock(path).touch(mode=0o600)   # left by an agent that ran and stopped
        assert not agent_holds(path)
        assert await spool.append([Event("k", SEGMENT, 1, b'{"type":"track"}')]) == 1
        assert path.exists() and spool.depth == 1
        assert agent_holds(path)
    finally:
        await spool.close()
    assert not agent_holds(path)


async def test_an_agent_started_on_the_removed_spool_before_the_first_noticed_is_left_alone(
        tmp_path: Path) -> None:
    """The spool's directory removed under the agent (rm -rf), and a second agent started
    on the same storage.path before the first's next commit: nothing kept it out (the lock
    held went with the removed file). The first, finding the file replaced, removed the
    second's -wal and moved its spool aside, and the second then did the same to the
    first's: two writers taking turns on one path, each commit a salvage. The first, which
    finds the lock held by the other, must leave its files alone and refuse events (503,
    its reason in open_error), its own queue kept aside."""
    state = tmp_path / "state"
    path = state / "spool.db"
    first = await Spool.open(StorageConfig(path=str(path)), holds_lock=True)
    second = None
    try:
        assert await first.append([Event("k", SEGMENT, 1, b'{"type":"track","n":1}')]) == 1
        shutil.rmtree(state)
        second = await Spool.open(StorageConfig(path=str(path)), holds_lock=True)
        assert await second.append([Event("k", SEGMENT, 2, b'{"type":"track","n":2}')]) == 1
        theirs = path.stat().st_ino
        with pytest.raises(SpoolFull):
            await first.append([Event("k", SEGMENT, 3, b'{"type":"track","n":3}')])
        assert path.stat().st_ino == theirs, "the other agent's spool was moved aside"
        assert first.open_error is not None and "another agent" in first.open_error
        assert await second.append([Event("k", SEGMENT, 4, b'{"type":"track","n":4}')]) == 1
        assert second.depth == 2 and second.counters.get("spool_corrupt", 0) == 0
        kept = [p for p in state.glob("spool.db.corrupt-*") if p.suffix != ".lock"]
        assert len(kept) == 1, kept   # the first's queue, answered 200, kept for a look
        await second.close()
        second = None
        with pytest.raises(SpoolFull):   # its streams' ids are not that spool's
            await first.append([Event("k", SEGMENT, 5, b'{"type":"track","n":5}')])
    finally:
        await first.close()
        if second is not None:
            await second.close()


async def test_an_agent_that_finds_the_other_at_its_stop_says_its_queue_was_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As above, but the first agent commits nothing more before it stops: its stop finds
    its file gone, and the lock held by the other. It keeps its queue aside and says so;
    it also said it "could not keep the queue of the file deleted or replaced", which an
    operator would take for that queue lost, and then "this one refuses events; stop the
    other and restart this one": advice for an agent that runs on, not one stopping."""
    events = [Event("k", SEGMENT, 1, b'{"type":"track","n":1}')]
    async with _ousted_at_stop(tmp_path, events, caplog) as (kept, errors):
        assert len(errors) == 1 and f"its queue is kept in {kept}" in errors[0], errors
        assert "refuses events" not in errors[0] and "restart" not in errors[0], errors
        assert "stopping" in errors[0], errors


async def test_a_queue_kept_aside_by_an_agent_another_ousted_is_sent_by_an_agent_run_on_it(
        tmp_path: Path, make_agent: Any, fake_nucleus: FakeNucleus,
        caplog: pytest.LogCaptureFixture) -> None:
    """The queue an agent keeps aside when it finds the other agent on its spool's path
    (here at its stop) is salvaged by no start: no marker names it, and the spool at the
    path is the other's, holding data of its own. Its log line named the file, and said
    nothing of how to send it, nor did the docs. It says to run an agent on that file,
    and such an agent sends it and leaves it empty."""
    events = [Event("app1", NUCLEUS, dedupe_key("app1", n), orjson.dumps(event(n, pad="")))
              for n in range(3)]
    async with _ousted_at_stop(tmp_path, events, caplog) as (kept, errors):
        [said] = errors
        assert f"kept in {kept}; to send it, run an agent with storage.path = {kept}" \
            in said, said
        drain = await make_agent(spool=kept, upstreams=[upstream(fake_nucleus)])
        await wait_for(lambda: sorted(fake_nucleus.ids()) == [0, 1, 2])
        await wait_for(lambda: drain.spool.depth == 0)


@contextlib.asynccontextmanager
async def _ousted_at_stop(tmp_path: Path, events: list[Event], caplog: pytest.LogCaptureFixture
                          ) -> AsyncIterator[tuple[Path, list[str]]]:
    """An agent's spool holding ``events`` at a path removed (`rm -rf`) while it ran, a
    second agent started on the path since, and the first stopped: the copy it kept of its
    queue, and the error lines of its stop. The second agent runs on meanwhile."""
    state = tmp_path / "state"
    path = state / "spool.db"
    first = await Spool.open(StorageConfig(path=str(path)), holds_lock=True)
    assert await first.append(events) == len(events)
    shutil.rmtree(state)
    second = await Spool.open(StorageConfig(path=str(path)), holds_lock=True)
    try:
        caplog.clear()
        await first.close()
        [kept] = [p for p in state.glob("spool.db.corrupt-*") if p.suffix != ".lock"]
        yield kept, [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    finally:
        await second.close()
