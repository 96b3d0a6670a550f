"""A write-ahead log damaged on disk after its commits were answered is reported, never
silent (docs/operations.md, "A damaged write-ahead log").

SQLite reads a -wal only up to its first frame whose checksum fails, and ignores every
frame after it: the transactions committed later, which apps were told were stored, are
gone without a word. A torn write at a crash can only cut the commit in progress, never
one that a later commit followed (with sync = "full" each COMMIT is on disk before the
next begins), so two whole commits past where SQLite stopped mean damage. The images
here are what a power cut leaves: the spool's files copied while it was open, with the
WAL holding commits not yet checkpointed.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.families.event import NUCLEUS, Event
from agent.settings import StorageConfig
from agent.spool import Spool, store
from tests.conftest import ROOT, write_config
from tests.test_disk import six_mb_fs  # noqa: F401  (a fixture)
from tests.test_salvage import leave_free

COMMITS = 6
HEADER, FRAME_HEADER = 32, 24


async def crash_image(tmp_path: Path, suffixes: tuple[str, ...] = ("", "-wal")) -> Path:
    """A spool whose WAL holds COMMITS commits of one event each, as a crash left it."""
    src = tmp_path / "live" / "spool.db"
    src.parent.mkdir(mode=0o700)
    cfg = StorageConfig(path=str(src))
    await (await Spool.open(cfg)).close()   # the tables checkpointed into the file
    spool = await Spool.open(cfg)
    try:
        for i in range(COMMITS):
            await spool.append([Event("k", NUCLEUS, i, b'{"id":%d}' % i)])
        image = tmp_path / "image" / "spool.db"
        image.parent.mkdir(mode=0o700)
        for suffix in suffixes:
            shutil.copyfile(f"{src}{suffix}", f"{image}{suffix}")
    finally:
        await spool.close()
    return image


def page_size(wal: Path) -> int:
    return int.from_bytes(wal.read_bytes()[8:12], "big")


def commit_frames(wal: Path) -> list[int]:
    """The indexes of the log's commit frames (a non-zero database size in its header)."""
    data, frame = wal.read_bytes(), FRAME_HEADER + page_size(wal)
    return [i for i in range((len(data) - HEADER) // frame)
            if int.from_bytes(data[HEADER + i * frame + 4:HEADER + i * frame + 8], "big")]


def flip(wal: Path, at: int) -> None:
    data = bytearray(wal.read_bytes())
    data[at] ^= 0x01
    wal.write_bytes(bytes(data))


async def counters(agent: Any) -> dict[str, int]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            status: dict[str, Any] = await r.json()
    return status["counters"]


@pytest.mark.parametrize("where", ["first frame's page", "log header's salt", "third commit"])
async def test_a_bit_flipped_in_the_log_is_reported_and_the_log_kept(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    image = await crash_image(tmp_path)
    wal = Path(f"{image}-wal")
    frame = FRAME_HEADER + page_size(wal)
    at = {"first frame's page": HEADER + FRAME_HEADER + 100,
          "log header's salt": 20,   # SQLite then ignores the whole log
          "third commit": HEADER + commit_frames(wal)[2] * frame + FRAME_HEADER + 7}[where]
    flip(wal, at)
    damaged = wal.read_bytes()
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    # SQLite's loss, not undone: what the agent adds is that it is said.
    assert agent.spool.depth < COMMITS
    assert "write-ahead log" in caplog.text and "damaged" in caplog.text, caplog.text
    assert (await counters(agent))["wal_damaged"] == 1
    kept = list(image.parent.glob("spool.db.wal-damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged, kept
    assert kept[0].stat().st_mode & 0o777 == 0o600
    assert kept[0].name in caplog.text


async def test_a_commit_torn_by_the_crash_is_no_damage(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The last commit cut short, as a crash in the middle of its write leaves it: it was
    never answered, and nothing followed it."""
    image = await crash_image(tmp_path)
    wal = Path(f"{image}-wal")
    os.truncate(wal, wal.stat().st_size - page_size(wal) // 2)
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    assert agent.spool.depth == COMMITS - 1
    assert (await counters(agent))["wal_damaged"] == 0
    assert "write-ahead log" not in caplog.text


async def test_a_log_copy_cut_short_by_a_full_disk_is_not_left_as_the_copy(
        make_agent: Any, tmp_path: Path, six_mb_fs: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """A damaged log found on a disk with room for part of its copy only: the log said no
    copy could be kept, but the part written stayed, named as the copy, taking what room
    the disk had left. It must go."""
    image = await crash_image(tmp_path)
    spool = six_mb_fs / "spool.db"
    shutil.copyfile(image, spool)
    shutil.copyfile(f"{image}-wal", f"{spool}-wal")
    wal = Path(f"{spool}-wal")
    flip(wal, HEADER + FRAME_HEADER + 100)
    leave_free(six_mb_fs, wal.stat().st_size // 2)
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=spool)
    try:
        assert "no copy of the log could be kept" in caplog.text, caplog.text
        assert not list(six_mb_fs.glob("spool.db.wal-damaged-*")), "a part of a copy left"
    finally:
        await agent.stop()   # before the file system goes


async def test_a_damaged_log_found_by_opens_that_fail_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool cannot be opened (another process holds its write lock, here), so it is
    tried again every 5 s: each try, having written nothing, found the damaged log again,
    said it again and kept one more copy of it (up to 64 MB each, every 5 s); and it was
    counted only if the damage was still there at the try that opened it (the other
    process, closing last, checkpoints the log). Said and kept once; counted once."""
    # The lock waited out sooner: SQLite's wait before the spool sets its busy_timeout
    # (Python's 5 s), and that busy_timeout.
    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, timeout=0.02))
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 20)
    image = await crash_image(tmp_path)
    wal = Path(f"{image}-wal")
    flip(wal, HEADER + commit_frames(wal)[2] * (FRAME_HEADER + page_size(wal)) + FRAME_HEADER + 7)
    caplog.set_level(logging.ERROR)
    other = sqlite3.connect(image, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")   # the write lock held, nothing written
        spool = await Spool.open(StorageConfig(path=str(image)))
        assert spool.db is None, "opened under another's write lock"
        assert not await spool.reopen() and not await spool.reopen()
    finally:
        other.close()
    assert caplog.text.count("write-ahead log is damaged") == 1, caplog.text
    assert len(list(image.parent.glob("spool.db.wal-damaged-*"))) == 1
    try:
        assert await spool.reopen()
        assert spool.counters.get("wal_damaged") == 1, spool.counters
    finally:
        await spool.close()


async def killed_image(tmp_path: Path) -> Path:
    """crash_image with the -shm too, as a kill -9 leaves it: SQLite's index of the log,
    whose header says how many of its frames were committed."""
    return await crash_image(tmp_path, ("", "-wal", "-shm"))


@pytest.mark.parametrize("cut", ["last two commits", "mid-frame", "whole log"])
async def test_a_log_cut_short_after_a_kill_is_reported_from_the_shm(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: str) -> None:
    """The -wal cut short (damage, a copy cut short) under the -shm a killed agent left:
    SQLite reads what is left without a word, and the commits cut off, answered to apps
    as stored, were lost unsaid. The -shm says how many frames were committed: the loss
    is said and counted (how many events, unknown)."""
    image = await killed_image(tmp_path)
    wal = Path(f"{image}-wal")
    frame = FRAME_HEADER + page_size(wal)
    ends = [HEADER + (i + 1) * frame for i in commit_frames(wal)]
    os.truncate(wal, {"last two commits": ends[-3], "mid-frame": ends[-2] - frame // 2,
                      "whole log": 0}[cut])
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    assert agent.spool.depth == {"last two commits": COMMITS - 2, "mid-frame": COMMITS - 2,
                                 "whole log": 0}[cut]
    said = [r.getMessage() for r in caplog.records if "write-ahead log" in r.getMessage()]
    assert len(said) == 1 and "-shm" in said[0] and "unknown" in said[0], said
    assert (await counters(agent))["wal_damaged"] == 1


@pytest.mark.parametrize("image_of", [crash_image, killed_image],
                         ids=["log-after-a-crash", "log-and-shm-after-a-kill"])
async def test_an_intact_log_is_read_whole_and_no_damage(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        image_of: Callable[[Path], Awaitable[Path]]) -> None:
    """An intact log after a crash, and one beside the -shm a killed agent left (which
    says what was committed: all of it is there)."""
    image = await image_of(tmp_path)
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    assert agent.spool.depth == COMMITS
    assert (await counters(agent))["wal_damaged"] == 0
    assert "write-ahead log" not in caplog.text
    assert not list(image.parent.glob("*damaged*"))


@pytest.mark.parametrize("command", ["retry", "purge"])
async def test_dead_letters_changed_after_a_kill_leave_no_loss_to_say(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, command: str) -> None:
    """`outpost dead retry|purge` on a killed agent's spool (none running) holds it
    exclusively, with no -shm: it folds the log into the file and removes it, but leaves
    the -shm as it was. The next start took that -shm's frames for a log cut short: every
    event still queued said lost, and wal_damaged counted."""
    image = await killed_image(tmp_path)
    config = write_config(tmp_path / "offline.toml", image)
    run = subprocess.run([sys.executable, "-m", "agent", "dead", command, "--all",
                          "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and "no agent running" in run.stdout, (run.stdout, run.stderr)
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    assert agent.spool.depth == COMMITS
    assert "write-ahead log" not in caplog.text, caplog.text
    assert (await counters(agent))["wal_damaged"] == 0


async def test_a_spool_and_log_put_back_beside_a_killed_agents_shm_are_no_damage(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool and its -wal put back (a backup, of two commits) where a killed agent left
    its -shm: that -shm indexes another log (other salts), and says nothing of this one.
    Which of the two is the spool's cannot be told: not said to be a log cut short."""
    image = await killed_image(tmp_path)
    backup = tmp_path / "backup" / "spool.db"
    backup.parent.mkdir(mode=0o700)
    spool = await Spool.open(StorageConfig(path=str(backup)))
    try:
        for i in range(2):
            await spool.append([Event("k", NUCLEUS, 100 + i, b'{"id":%d}' % (100 + i))])
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{backup}{suffix}", f"{image}{suffix}")
    finally:
        await spool.close()
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    assert agent.spool.depth == 2
    assert (await counters(agent))["wal_damaged"] == 0
    assert "write-ahead log" not in caplog.text


@pytest.mark.parametrize("shm", [True, False], ids=["with-shm", "without-shm"])
async def test_a_log_beside_an_empty_spool_file_is_kept_and_its_loss_said(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, shm: bool) -> None:
    """The spool file emptied (damage) beside a -wal holding commits: SQLite deletes a log
    beside an empty file unread, and the events in it went without a word (or, with the
    -shm, were said lost to a log cut short). Said as what it is, the log kept first."""
    image = await killed_image(tmp_path)
    wal = Path(f"{image}-wal")
    logged = wal.read_bytes()
    os.truncate(image, 0)
    if not shm:
        Path(f"{image}-shm").unlink()
    caplog.set_level(logging.ERROR)
    agent = await make_agent(spool=image)
    said = [r.getMessage() for r in caplog.records if "write-ahead log" in r.getMessage()]
    assert len(said) == 1 and "spool file is empty" in said[0], said
    assert (await counters(agent))["wal_damaged"] == 1
    kept = list(image.parent.glob("spool.db.wal-damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == logged, kept
    assert kept[0].name in said[0]
