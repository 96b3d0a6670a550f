"""A corrupt spool is moved aside, its readable records salvaged, the rest counted.

Real spool files with queued events are damaged (cut in half, a header overwritten,
pages zeroed in the middle, among small records or in large records' overflow pages,
records garbled); a real agent is started on them and forwards to a fake upstream.
What could be read must be delivered, in order, once; the rest must be counted as
``dropped_corrupt`` in /status and /metrics. A v0 file (one row per event, written by
the agent before issue 11) damaged before its migration is salvaged row by row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.clock import Clock
from agent.families.event import NOT_READ, NUCLEUS, Event
from agent.outcomes import from_names
from agent.settings import StorageConfig
from agent.spool import Spool, dead_live, migrate_dead
from agent.spool import writer as spool_writer
from agent.spool.dead import Which
from agent.spool.records import unpack
from agent.spool.salvage import Carry, salvage
from agent.spool.schema import SCHEMA, has_observed
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.segment_helpers import segment_up
from tests.spool_files import DATA, Stored, build_v0, copy_of
from tests.test_codebook import backlog, by_key, opened, queued
from tests.test_disk import fill_up, six_mb_fs, upstream  # noqa: F401  (six_mb_fs: a fixture)
from tests.waiting import ROOT, run_outpost, wait_for

N = 1500
DAY_MS = 86_400_000


def body(i: int, pad: int) -> bytes:
    """Event ``i`` padded with ``pad`` hex digits of noise: records that zstd cannot
    shrink much, so that they fill pages (and overflow pages) as a real queue does."""
    return b'{"id":%d,"pad":"%s"}' % (i, random.Random(i).randbytes(pad // 2).hex().encode())


def build(path: Path, n: int, pad: int, keys: tuple[str, ...]) -> None:
    """A real spool with ``n`` queued events: ids 0..n-1 in that order, key by id in turn,
    committed 100 at a time (a record per key each). Records span overflow pages, so
    damage there leaves the record findable but unreadable. Every other commit holds the
    ids ingest read (records.ZSTD_IDS), the others not (as an older agent wrote them)."""
    async def fill() -> None:
        spool = await Spool.open(StorageConfig(path=str(path)))
        for b in range(0, n, 100):
            await spool.append([Event(keys[i % len(keys)], NUCLEUS, i, body(i, pad),
                                      i if b // 100 % 2 else NOT_READ)
                                for i in range(b, min(b + 100, n))])
        await spool.close()
    asyncio.run(fill())


def build_old(path: Path, n: int, pad: int, keys: tuple[str, ...]) -> None:
    """The same queue in a v0 spool, as the agent before issue 11 wrote it (row per event)."""
    build_v0(path, [(Stored(i + 1, 1 + i % len(keys), NUCLEUS, 1_000, i, body(i, pad)), None)
                    for i in range(n)],
             marks=[(1_000, n + 1)], streams=list(enumerate(keys, start=1)))


def truncated(path: Path) -> None:
    """The file cut short just after the middle one of the queue's leaf pages (records, or
    a v0 file's events): about half the queue readable, the rest gone. Found by name, not
    at half the file's size: a table more moves every page. Read as immutable: a
    connection that closes would take in the -wal a test left beside the file."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        leaves = [n for (n,) in db.execute(
            "SELECT pageno FROM dbstat WHERE name IN ('records', 'events') "
            "AND pagetype = 'leaf' ORDER BY pageno")]
    os.truncate(path, leaves[len(leaves) // 2] * 4096)


def garbled_then_truncated(path: Path) -> None:
    """Three records garbled (damage can do that): a value of the wrong type, an unknown
    family, a flipped bit in the packed events; then the file cut in half: found at
    startup, so salvage is the first to read them."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE records SET received = 'garbage' WHERE id = 1")   # ids 0-99
        db.execute("UPDATE records SET family = 9 WHERE id = 101")           # ids 100-199
        data = bytearray(db.execute("SELECT data FROM records WHERE id = 201").fetchone()[0])
        data[len(data) // 2] ^= 0x10
        db.execute("UPDATE records SET data = ? WHERE id = 201", (bytes(data),))  # 200-299
    truncated(path)


def scribbled(path: Path) -> None:
    """Three pages of the queue in the middle zeroed; header and the rest intact."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2 // 4096 * 4096)
        fh.write(bytes(3 * 4096))


def destroy_header(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.write(os.urandom(100))


async def snapshot(port: int) -> tuple[dict[str, Any], str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as r:
            status = await r.json()
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            metrics = await r.text()
    return status, metrics


def dropped_metric(metrics: str) -> int:
    found = re.search(r'^outpost_events_dropped_total\{reason="dropped_corrupt"\} (\d+)',
                      metrics, re.MULTILINE)
    assert found, "no dropped_corrupt series in /metrics"
    return int(found.group(1))


@pytest.mark.parametrize(("make", "n", "pad", "keys", "damage"), [
    (build, N, 500, ("app1",), truncated),
    (build, N, 500, ("app1",), scribbled),
    (build, 300, 10_000, ("app1",), scribbled),
    (build, N, 500, ("app1", "app2"), scribbled),
    (build, N, 500, ("app1",), garbled_then_truncated),
    (build_old, N, 500, ("app1", "app2"), truncated),
    (build_old, N, 500, ("app1", "app2"), scribbled),
], ids=["truncated", "scribbled", "scribbled-large-records", "scribbled-two-keys", "garbled",
        "v0-truncated", "v0-scribbled"])
async def test_readable_records_are_delivered_and_the_rest_counted(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        make: Callable[[Path, int, int, tuple[str, ...]], None], n: int, pad: int,
        keys: tuple[str, ...], damage: Callable[[Path], None]) -> None:
    spool_path = tmp_path / "spool.db"
    await asyncio.to_thread(make, spool_path, n, pad, keys)
    await asyncio.to_thread(damage, spool_path)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    # Truncation is found at startup; scribbled pages when the forwarder reads them.
    await wait_for(lambda: agent.spool.counters.get("spool_corrupt") == 1, timeout=10)
    await wait_for(lambda: agent.spool.depth == 0, timeout=15)
    got = fake_nucleus.ids()
    status, metrics = await snapshot(agent.port)
    lost = status["counters"].get("dropped_corrupt", 0)
    assert len(got) == len(set(got)), "salvaged events sent twice"
    for k in range(len(keys)):                   # each key's queue in order
        mine = [i for i in got if i % len(keys) == k]
        assert mine == sorted(mine), f"{keys[k]}'s salvaged events out of order"
    assert 0 < len(got) < n and lost > 0
    # Every event delivered or counted. A row on a page cut in half can still be read,
    # with a damaged body: the upstream cannot take it, so it goes to dead letters.
    assert len(got) + lost + status["drops"]["dead_lettered"] == n
    assert status["drops"]["dropped_corrupt"] == lost == dropped_metric(metrics)
    if damage is scribbled:                      # rows past the damage were read too
        assert n - 1 in got
    if damage is garbled_then_truncated:         # garbled records are not sent, but counted
        assert not set(range(300)) & set(got) and set(range(300, 400)) <= set(got)
    assert list(tmp_path.glob("spool.db.corrupt-*")), "the corrupt file was not kept"


def leaves_in_key_order(path: Path) -> list[int]:
    """The records table's leaf pages, in the order of the ids they hold."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        return [n for (n,) in db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf' "
            "ORDER BY path")]


def readable_events(path: Path) -> set[int]:
    """The events of every record of ``path`` that can be read whole, looked up by id."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        ids = range(1, 100_000, 100)   # build() commits 100 a time: records 1, 101, ...
        found: set[int] = set()
        for rid in ids:
            try:
                row = db.execute("SELECT data FROM records WHERE id = ?", (rid,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None:
                found |= {orjson.loads(b)["id"] for b in unpack(row[0])}
    return found


async def test_a_linked_spool_found_damaged_stays_on_the_disk_its_link_names(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """storage.path a symlink to the spool on a bigger disk, found damaged at a start. The
    link itself was moved aside (a link to the damaged file, which kept its name there),
    and the fresh spool made in its place, a file in the link's directory: the queue went,
    unsaid, to the disk the operator had moved it off, and the link was gone. The damaged
    file is moved aside beside itself, and the fresh spool made where the link points."""
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    real = disk / "spool.db"
    await asyncio.to_thread(build, real, N, 500, ("app1",))
    await asyncio.to_thread(truncated, real)
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(real)
    agent = await make_agent(spool=link, upstreams=[upstream(fake_nucleus)])
    await wait_for(lambda: agent.spool.counters.get("spool_corrupt") == 1, timeout=10)
    await wait_for(lambda: agent.spool.depth == 0, timeout=15)
    assert fake_nucleus.ids(), "nothing salvaged"
    assert link.is_symlink() and os.readlink(link) == str(real), "the link is gone"
    assert [p.name for p in link.parent.iterdir()] == ["spool.db"]
    assert real.is_file() and not real.is_symlink()
    aside = [p for p in disk.glob("spool.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and not aside[0].is_symlink(), aside


@pytest.mark.parametrize("home", [b"", b"caf\xe9"], ids=["", "latin1-directory"])
async def test_a_readable_stretch_between_two_damaged_ones_is_salvaged(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path, home: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Six pages of the queue zeroed, then one intact, then one more zeroed (a flash
    device's bad blocks rarely come one at a time): the intact page's record can be
    read, by id, in the damaged file, so it must be salvaged and delivered. Salvage
    probed for the end of the first damage at ever longer strides and could land past
    the intact page, in the second damage, and then past it: the record was counted as
    dropped_corrupt, never sent. In a directory whose name is not UTF-8 (storage.path
    "~/spool.db", HOME in Latin-1) SQLite could not name the file salvage reads pages
    from: the intact page between the damage was not found, its record counted lost."""
    spool_path = tmp_path / "spool.db"
    if home:
        spool_path = Path(os.fsdecode(bytes(tmp_path) + b"/" + home)) / "spool.db"
        spool_path.parent.mkdir()
        monkeypatch.setenv("HOME", str(spool_path.parent))
    await asyncio.to_thread(build, spool_path, 2500, 500, ("app1",))
    leaves = leaves_in_key_order(spool_path)
    assert len(leaves) >= 20, "one record per leaf page expected"
    first = len(leaves) // 4
    with open(spool_path, "r+b") as fh:
        for page in (*leaves[first:first + 6], leaves[first + 7]):
            fh.seek((page - 1) * 4096)
            fh.write(bytes(4096))
    want = readable_events(spool_path)
    assert 0 < len(want) < 2500
    agent = await make_agent(spool=Path("~/spool.db") if home else spool_path,
                             upstreams=[upstream(fake_nucleus)])
    await wait_for(lambda: agent.spool.counters.get("spool_corrupt") == 1, timeout=10)
    await wait_for(lambda: agent.spool.depth == 0, timeout=15)
    got = fake_nucleus.ids()
    assert len(got) == len(set(got)), "salvaged events sent twice"
    assert not want - set(got), f"readable events not salvaged: {sorted(want - set(got))}"
    assert agent.spool.counters["dropped_corrupt"] == 2500 - len(got)


async def test_dead_letters_whose_key_was_lost_never_go_to_another_key(tmp_path: Path) -> None:
    """The table of keys destroyed: the queued events cannot be sent (no key to send them
    under) and are counted. The dead letters were copied all the same, under the lost
    ids: counted but never listed, and the fresh spool gives those ids to whichever keys
    come first, so a retry put app2's dead letters in app1's queue, to go to app1's
    upstream under app1's key."""
    spool_path = tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(spool_path)))
    await spool.append([Event(k, NUCLEUS, i, body(i, 20), i)
                        for k, ids in (("app1", range(3)), ("app2", range(10, 13))) for i in ids])
    rows = await spool.fetch(spool.streams["app2"].id, 0, 3)
    await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
    await spool.close()
    with contextlib.closing(sqlite3.connect(f"file:{spool_path}?immutable=1", uri=True)) as db:
        [(page,)] = db.execute("SELECT pageno FROM dbstat WHERE name = 'streams'").fetchall()
    with open(spool_path, "r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(bytes(4096))
    spool = await Spool.open(StorageConfig(path=str(spool_path)))
    try:
        assert spool.counters["spool_corrupt"] == 1
        assert len(await spool.dead_letters()) == spool.dead_count
        # The keys come back in another order: app2 first.
        await spool.append([Event(k, NUCLEUS, 100 + n, body(100 + n, 20), 100 + n)
                            for n, k in enumerate(("app2", "app1"))])
        await dead_live.retry(spool, Which(every=True))
        app1 = await spool.fetch(spool.streams["app1"].id, 0, 100)
        assert [orjson.loads(r.body)["id"] for r in app1] == [101], "another key's events"
    finally:
        await spool.close()


async def test_a_file_moved_aside_before_is_never_replaced_by_the_next(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """Files moved aside are named by the second: a device without a battery-backed clock
    boots at the same saved time again and again, and a spool damaged at two such boots
    (or twice in one second) was moved onto the name of the one before, replacing it:
    the file the docs say is kept for inspection, with what could not be salvaged, was
    gone. Here files moved aside earlier hold every name of the next half minute."""
    spool_path = tmp_path / "spool.db"
    await asyncio.to_thread(build, spool_path, 300, 50, ("app1",))
    await asyncio.to_thread(destroy_header, spool_path)
    now = int(time.time())
    earlier = {tmp_path / f"spool.db.corrupt-{time.strftime('%Y%m%dT%H%M%S', time.localtime(t))}"
               for t in range(now - 2, now + 30)}
    for path in earlier:
        path.write_bytes(b"moved aside before")
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    assert agent.spool.counters["spool_corrupt"] == 1
    assert all(p.read_bytes() == b"moved aside before" for p in earlier), "one was replaced"
    [moved] = [p for p in tmp_path.glob("spool.db.corrupt-*")
               if p not in earlier and not p.name.endswith(("-wal", "-shm"))]
    assert moved.stat().st_size > 4096 and moved.stat().st_mode & 0o777 == 0o600


# Run in a child: open the damaged spool, but stop at a point of the salvage (argv[2]),
# say so, and wait to die. "copied": inside its transaction, at its last step (every
# readable record copied into the fresh spool, the streams recounted: nothing committed).
# "committed": right after its commit, as the connection's sync setting is put back.
_KILLED_CHILD = """
import asyncio, sqlite3, sys, time
from agent.settings import StorageConfig
from agent.spool import Spool
connect = sqlite3.connect
def hold(action, name, value, *_):
    if (sys.argv[2] == "copied" and action == sqlite3.SQLITE_UPDATE and name == "streams"
            or sys.argv[2] == "committed" and action == sqlite3.SQLITE_PRAGMA
            and name == "synchronous" and value is not None and value.isdigit()):
        print(sys.argv[2], flush=True)
        time.sleep(60)
    return sqlite3.SQLITE_OK
def held(*args, **kwargs):
    conn = connect(*args, **kwargs)
    conn.set_authorizer(hold)
    return conn
sqlite3.connect = held
asyncio.run(Spool.open(StorageConfig(path=sys.argv[1])))
"""


async def salvaged_ids(path: Path) -> tuple[list[int], int]:
    """What an uninterrupted salvage of ``path`` keeps: the ids queued, and the loss."""
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        rows = await spool.fetch(spool.streams["app1"].id, 0, N)
        return [orjson.loads(r.body)["id"] for r in rows], spool.counters["dropped_corrupt"]
    finally:
        await spool.close()


@pytest.mark.parametrize("point", ["copied", "committed"])
async def test_a_kill_inside_the_salvage_is_finished_at_the_next_start(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path, point: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A power cut while the readable records are copied into the fresh spool: the next
    start found a healthy, empty spool and never looked at the moved file again; the
    whole queue was lost, uncounted. It must finish the salvage: every readable event
    delivered once, the rest counted once, as if nothing had interrupted it; and a cut
    once the copy has committed must not salvage (and report) it twice."""
    spool_path = tmp_path / "spool.db"
    await asyncio.to_thread(build, spool_path, 600, 500, ("app1",))
    await asyncio.to_thread(truncated, spool_path)
    (tmp_path / "ref").mkdir()
    shutil.copy(spool_path, tmp_path / "ref" / "spool.db")
    want, lost = await salvaged_ids(tmp_path / "ref" / "spool.db")
    assert 0 < len(want) < N and lost > 0
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(spool_path), point],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == f"{point}\n"
    finally:
        child.kill()
        child.wait(timeout=10)
    caplog.clear()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    assert agent.spool.counters.get("spool_corrupt") == 1, "the salvage was not finished"
    assert ("is corrupt" in caplog.text) == (point == "copied"), caplog.text
    assert not (tmp_path / "spool.db.salvaging").exists()
    await wait_for(lambda: agent.spool.depth == 0 and
                   len(fake_nucleus.ids()) + agent.spool.counters.get("dead_lettered", 0)
                   >= len(want), timeout=15)
    got = fake_nucleus.ids()
    status, metrics = await snapshot(agent.port)
    assert len(got) == len(set(got)) and set(got) <= set(want)
    assert len(got) + status["drops"]["dead_lettered"] == len(want)
    assert status["counters"]["spool_corrupt"] == 1
    assert status["drops"]["dropped_corrupt"] == lost == dropped_metric(metrics)


async def test_a_cut_between_the_renames_moves_the_wal_with_its_file(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """A power cut after the corrupt file was renamed but before its -wal was: the -wal
    left at the spool's path holds the file's last commits. The next start must move it
    after its file (then salvage them), never apply it to the fresh spool."""
    hot, spool_path = tmp_path / "hot", tmp_path / "spool.db"
    hot.mkdir()
    await asyncio.to_thread(build, spool_path, 600, 500, ("app1",))
    spool = await Spool.open(StorageConfig(path=str(spool_path)))
    try:   # 100 more events, in the WAL only: the files as a crash leaves them
        await spool.append([Event("app1", NUCLEUS, i, body(i, 500), i) for i in range(600, 700)])
        for suffix in ("", "-wal", "-shm"):
            shutil.copy(f"{spool_path}{suffix}", hot / f"spool.db{suffix}")
    finally:
        await spool.close()
    await asyncio.to_thread(truncated, hot / "spool.db")
    (tmp_path / "ref").mkdir()
    for suffix in ("", "-wal", "-shm"):
        shutil.copy(hot / f"spool.db{suffix}", tmp_path / "ref" / f"spool.db{suffix}")
        shutil.copy(hot / f"spool.db{suffix}", f"{spool_path}{suffix}")
    want, lost = await salvaged_ids(tmp_path / "ref" / "spool.db")
    assert set(range(600, 700)) <= set(want)
    moved = tmp_path / "spool.db.corrupt-20260101T000000"
    (tmp_path / "spool.db.salvaging").write_text(f"{moved.name}\n")
    spool_path.rename(moved)       # and the power cut: spool.db-wal and -shm left behind
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    assert Path(f"{moved}-wal").exists(), "the -wal was not moved after its file"
    assert agent.spool.counters.get("spool_corrupt") == 1, "the salvage was not finished"
    await wait_for(lambda: agent.spool.depth == 0 and
                   len(fake_nucleus.ids()) + agent.spool.counters.get("dead_lettered", 0)
                   >= len(want), timeout=15)
    got = fake_nucleus.ids()
    assert len(got) == len(set(got)) and set(got) <= set(want)
    assert len(got) + agent.spool.counters.get("dead_lettered", 0) == len(want)
    assert agent.spool.counters["dropped_corrupt"] == lost


@pytest.mark.parametrize("marker", ["spool.db.corrupt-20260101T000000\n", "spool.db"],
                         ids=["before-the-move", "torn"])
async def test_a_stale_salvage_marker_leaves_a_sound_spool_alone(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path, marker: str) -> None:
    """A power cut after the marker was written but before the move (the file it names
    does not exist), or while it was written: the spool at the path is the one to open."""
    await asyncio.to_thread(build, tmp_path / "spool.db", 300, 50, ("app1",))
    (tmp_path / "spool.db.salvaging").write_text(marker)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    assert not (tmp_path / "spool.db.salvaging").exists()
    await wait_for(lambda: sorted(fake_nucleus.ids()) == list(range(300)))
    assert "spool_corrupt" not in agent.spool.counters
    assert not list(tmp_path.glob("spool.db.corrupt-*"))


async def test_a_marker_beside_a_spool_that_is_not_fresh_salvages_nothing_into_it(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """A marker names a moved file, but the spool at the path holds a queue of its own:
    it is not the fresh spool of that salvage (a marker left by hand, or planted beside
    the spool), so nothing is copied into it, its counters stay, and the marker goes (the
    named file's records were added to the queue, its counters replaced theirs)."""
    await asyncio.to_thread(build, tmp_path / "spool.db", 300, 50, ("app1",))
    other = tmp_path / "other.db"
    await asyncio.to_thread(build, other, 600, 50, ("app1",))
    with contextlib.closing(sqlite3.connect(other)) as db, db:   # ids past the queue's
        db.execute("UPDATE records SET id = id + 1000000")
    other.rename(tmp_path / "spool.db.corrupt-20260101T000000")
    before = saved_counters(tmp_path / "spool.db")
    (tmp_path / "spool.db.salvaging").write_text("spool.db.corrupt-20260101T000000\n")
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    assert not (tmp_path / "spool.db.salvaging").exists()
    assert agent.spool.depth <= 300 and "spool_corrupt" not in agent.spool.counters
    await wait_for(lambda: sorted(fake_nucleus.ids()) == list(range(300)))
    assert {k: v for k, v in agent.spool.counters.items() if k in before} == before


def queued_in(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT sum(depth) FROM streams").fetchone()[0] or 0)


def leave_free(fs: Path, left: int) -> None:
    """Fill the file system ``fs`` but for ``left`` bytes."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    (fs / "filler").write_bytes(b"\0" * (free - left))


def moved_aside(directory: Path) -> Path:
    """The one corrupt spool moved aside in ``directory`` (not its -wal or -shm)."""
    [moved] = [p for p in directory.glob("spool.db.corrupt-*")
               if not p.name.endswith(("-wal", "-shm"))]
    return moved


def saved_counters(path: Path) -> dict[str, int]:
    """The counts saved in the file, as an agent reads them (not the cap saved beside)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {str(k): v for k, v in from_names(
            db.execute("SELECT name, value FROM counters").fetchall()).items()}


async def test_a_salvage_without_room_counts_the_queue_the_file_says_it_held(
        make_agent: Any, six_mb_fs: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """A corrupt spool found at startup on a nearly full disk: the fresh spool is created,
    the copy fails for room. The moved file's table of queues can be read: its events were
    counted as 0 and the log said the loss was unknown. They must be counted, the log must
    say where they are kept, and the counts must be saved before any commit (a stop then
    lost them)."""
    spool_path = six_mb_fs / "spool.db"
    await asyncio.to_thread(build, spool_path, N, 500, ("app1",))
    queued = queued_in(spool_path)
    await asyncio.to_thread(truncated, spool_path)
    leave_free(six_mb_fs, 256 * 1024)
    caplog.set_level(logging.INFO)
    agent = await make_agent(spool=spool_path)
    assert "could not salvage" in caplog.text, "the copy did not fail for room"
    assert agent.spool.counters.get("spool_corrupt") == 1
    assert agent.spool.counters.get("dropped_corrupt") == queued == N
    moved = moved_aside(six_mb_fs)
    assert f"kept in {moved} with its {N} queued events" in caplog.text
    assert "unknown" not in caplog.text
    await agent.stop()
    counters = saved_counters(spool_path)
    assert (counters.get("spool_corrupt"), counters.get("dropped_corrupt")) == (1, N)


async def test_a_destroyed_header_is_survived_and_the_unknown_loss_is_said(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Nothing can be read without the header, not even how many events were queued: the
    agent starts on a fresh spool and its log says the loss is unknown."""
    spool_path = tmp_path / "spool.db"
    await asyncio.to_thread(build, spool_path, N, 500, ("app1",))
    await asyncio.to_thread(destroy_header, spool_path)
    caplog.set_level(logging.INFO)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    status, metrics = await snapshot(agent.port)
    assert status["counters"]["spool_corrupt"] == 1
    assert status["drops"]["dropped_corrupt"] == 0 == dropped_metric(metrics)
    assert "unknown" in caplog.text
    async with aiohttp.ClientSession() as s, s.post(   # the fresh spool takes and sends
            f"http://127.0.0.1:{agent.port}/app/app1/track",
            json={"data": [{"type": "event", "name": "e", "id": 7, "sessionId": 1,
                            "machineId": "m"}]}) as r:
        assert r.status == 200
    await wait_for(lambda: fake_nucleus.ids() == [7])


async def test_salvage_keeps_acked_bits_and_delivered_keys(tmp_path: Path) -> None:
    """Straight from a damaged v1 file into a fresh one: a half-acked record keeps its
    acked bits (only its live events are sent), a fully delivered record's keys still
    dedupe, and a record whose packed events are damaged is counted, not copied."""
    moved, fresh = tmp_path / "moved.db", tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(moved)))
    for b in range(0, 300, 100):
        await spool.append([Event("app1", NUCLEUS, i, body(i, 50), i) for i in range(b, b + 100)])
    rows = await spool.fetch(spool.streams["app1"].id, 0, 150)
    await spool.ack([r.seq for r in rows])
    await spool.close()
    with contextlib.closing(sqlite3.connect(moved)) as db, db:
        assert [r[0] for r in db.execute("SELECT id FROM records ORDER BY id")] == [101, 201]
        gone = db.execute("SELECT gone FROM records WHERE id = 101").fetchone()[0]
        data = bytearray(db.execute("SELECT data FROM records WHERE id = 201").fetchone()[0])
        data[-3] ^= 1
        db.execute("UPDATE records SET data = ? WHERE id = 201", (bytes(data),))
    spool = await Spool.open(StorageConfig(path=str(fresh)))   # an empty v1 spool
    await spool.close()
    with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as db:
        got = salvage(db, moved, Carry(streams={}, counters={}, observed=0, next_seq=1,
                                       depth=None, dead=None))
        assert (got.queued, got.lost, got.known) == (50, 100, True)
        assert db.execute("SELECT id, live, gone FROM records").fetchall() == [(101, 50, gone)]
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        assert counters["dropped_corrupt"] == 100 and counters["spool_corrupt"] == 1
        assert db.execute("SELECT depth FROM streams").fetchall() == [(50,)]
    spool = await Spool.open(StorageConfig(path=str(fresh)))
    try:
        assert spool.depth == 50
        queued = await spool.fetch(spool.streams["app1"].id, 0, 100)
        assert [r.body for r in queued] == [body(i, 50) for i in range(150, 200)]
        assert [r.ids for r in queued.runs] == [list(range(150, 200))]   # kept with them
        # Delivered before the damage: still a duplicate.
        assert await spool.append([Event("app1", NUCLEUS, 7, body(7, 50))]) == 0
    finally:
        await spool.close()


def test_salvage_of_a_sound_v0_file_keeps_everything(tmp_path: Path) -> None:
    """The v0 path, without damage: the 38 queued events, the 22 delivered keys and the
    2 dead letters of tests/data/spool-v0.db, as the migration would keep them."""
    fresh = tmp_path / "spool.db"
    with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as db:
        db.executescript(SCHEMA)
        got = salvage(db, Path(__file__).parent / "data" / "spool-v0.db",
                      Carry(streams={}, counters={}, observed=0, next_seq=1, depth=None, dead=None))
        assert (got.queued, got.lost, got.skipped) == (38, 0, 0)
        assert sum(len(k) // 8 for (k,) in db.execute("SELECT dkeys FROM spent")) == 22
        assert db.execute("SELECT count(*) FROM dead").fetchone()[0] == 2
        assert db.execute("SELECT key, depth FROM streams ORDER BY id").fetchall() == \
            [("app-nucleus", 19), ("seg-key", 19)]


# A file of each older format (tests/data), and damage to its letters' agent-observed
# times: garbled into another type, a letter costs that time alone, not itself.
OLD_FILES = {f"v{v}": (v, None) for v in range(6)} | {
    "v5-garbled": (5, "UPDATE dead SET observed = 'garbage' WHERE seq = 6")}


@pytest.mark.parametrize(("version", "damage"), OLD_FILES.values(), ids=OLD_FILES.keys())
def test_salvage_keeps_the_dead_letters_agent_observed_times_where_the_file_has_them(
        tmp_path: Path, version: int, damage: str | None) -> None:
    """Every dead letter of each format is kept, with the agent-observed time of its
    dead-lettering where the file keeps it (v5's; the salvage dropped it, and the letters
    were aged and ordered by the wall clock again), else none (NULL: aged by the wall
    clock, as before), and the summary counts them as they are."""
    moved, fresh = copy_of(DATA / f"spool-v{version}.db", tmp_path), tmp_path / "fresh.db"
    with contextlib.closing(sqlite3.connect(moved)) as db, db:
        if damage:
            db.execute(damage)
        seen = "observed" if has_observed(db) else "NULL"
        want = db.execute(f"SELECT seq, upstream, reason, at, CASE typeof({seen}) WHEN "
                          f"'integer' THEN {seen} END FROM dead ORDER BY seq").fetchall()
    assert want and any(w[4] is not None for w in want) == (version == 5)
    with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as db:
        db.executescript(SCHEMA)
        got = salvage(db, moved, Carry(streams={}, counters={}, observed=0, next_seq=1,
                                       depth=None, dead=None))
        assert (got.dead, got.dead_lost, got.dead_unkept) == (len(want), 0, 0)
        assert db.execute("SELECT seq, upstream, reason, at, observed FROM dead ORDER BY seq"
                          ).fetchall() == want
        assert migrate_dead.agrees(db)


LARGE, LARGE_PAD = 60, 400_000   # events of ~400 KB: records of one each, ~200 KB packed
SALVAGE_PEAK = 16 * 1024 * 1024


async def test_salvage_reads_large_rows_a_few_megabytes_at_a_time(tmp_path: Path) -> None:
    """Salvage read 500 rows at a time whatever their size: 60 records of ~200 KB and 60
    dead letters of 400 KB were each read whole, 12 and 24 MB at once (up to 250 MB for
    500 dead letters of the largest size). Traced: salvage's Python allocations."""
    moved, fresh = tmp_path / "moved.db", tmp_path / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(moved)))
    for i in range(2 * LARGE):
        await spool.append([Event("app1", NUCLEUS, i, body(i, LARGE_PAD), i)])
    queued = await spool.fetch(spool.streams["app1"].id, 0, LARGE)
    await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in queued])
    await spool.close()
    spool = await Spool.open(StorageConfig(path=str(fresh)))   # an empty spool
    await spool.close()
    with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as db:
        tracemalloc.start()
        try:
            got = salvage(db, moved, Carry(streams={}, counters={}, observed=0, next_seq=1,
                                           depth=None, dead=None))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (got.queued, got.lost) == (LARGE, 0)
        assert db.execute("SELECT count(*) FROM dead").fetchone()[0] == LARGE
    assert peak < SALVAGE_PEAK, f"{peak / 2**20:.1f} MB"


@pytest.mark.skipif(sys.platform == "win32", reason="no AF_UNIX datagrams")
def test_a_salvage_at_start_extends_the_systemd_start_timeout(
        tmp_path: Path, notify_socket: tuple[socket.socket, str],
        agent_process: Callable[..., AgentProcess]) -> None:
    """A salvage at start copies every readable record in one transaction before the agent
    listens: about 1 s per 50 MB here, far more on an SD card, so a full spool (512 MB)
    can outrun systemd's 90 s start timeout. Killed there, the next start begins the
    salvage again (the marker): a restart loop that never listens. The agent asks for
    more start time while it salvages, as while it migrates; it sent nothing before
    READY=1."""
    spool_path = tmp_path / "spool.db"
    build(spool_path, 300, 500, ("app1",))
    truncated(spool_path)
    sock, notify = notify_socket
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", spool_path, port=port)
    agent = agent_process(cfg, port, env={"NOTIFY_SOCKET": notify}).start()
    seen: list[str] = []
    while not seen or not seen[-1].startswith("READY=1"):
        seen.append(sock.recv(4096).decode())
    assert "is corrupt" in agent.log.read_text(), "no salvage at start"
    extends = [m for m in seen[:-1] if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends, f"no EXTEND_TIMEOUT_USEC before READY=1: {seen}"
    assert all(int(m.split("=", 1)[1]) >= 10_000_000 for m in extends), extends


DEAD = 200


def dead_letters_spool(path: Path, pad: int) -> None:
    """A spool holding DEAD dead letters of app1 (the upstream refused them for good), on
    many leaf pages, and three events of app2 still queued."""
    async def fill() -> None:
        spool = await Spool.open(StorageConfig(path=str(path)))
        await spool.append([Event("app1", NUCLEUS, i, body(i, pad), i) for i in range(DEAD)])
        await spool.append([Event("app2", NUCLEUS, i, body(i, 20), i)
                            for i in range(DEAD, DEAD + 3)])
        rows = await spool.fetch(spool.streams["app1"].id, 0, DEAD)
        await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
        await spool.close()
    asyncio.run(fill())


def zero_a_dead_letters_page(path: Path) -> None:
    """The middle one of the dead letters' leaf pages zeroed: the letters on it are lost."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        leaves = [n for (n,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'dead' "
                                           "AND pagetype = 'leaf' ORDER BY path")]
    assert len(leaves) > 4
    with open(path, "r+b") as fh:
        fh.seek((leaves[len(leaves) // 2] - 1) * 4096)
        fh.write(bytes(4096))


async def damage_dead_letters(spool: Spool) -> None:
    """DEAD dead letters of key app1, one of their pages then destroyed on disk, and the
    spool's connections made to read the file again (another writer's commit, as once
    their cache has moved on)."""
    await spool.append([Event("app1", NUCLEUS, i, body(i, 500), i) for i in range(DEAD)])
    rows = await spool.fetch(spool.streams["app1"].id, 0, DEAD)
    await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
    assert spool.db is not None
    await spool.db.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    await asyncio.to_thread(zero_a_dead_letters_page, spool.path)
    with contextlib.closing(sqlite3.connect(spool.path, isolation_level=None)) as other:
        other.execute("PRAGMA user_version = 5")


def dead_lost_metric(metrics: str) -> int | None:
    found = re.search(r"^outpost_dead_letters_dropped_corrupt_total (\d+)", metrics, re.MULTILINE)
    return int(found.group(1)) if found else None


async def test_dead_letters_a_salvage_cannot_read_are_counted_and_logged(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A page of dead letters destroyed: the salvage keeps the others, and those lost must
    be counted (/status, /metrics) and logged, as lost events are (dropped_corrupt). They
    vanished: the count of dead letters fell, with no counter, reason or log line."""
    spool_path = tmp_path / "spool.db"
    await asyncio.to_thread(dead_letters_spool, spool_path, 500)
    await asyncio.to_thread(zero_a_dead_letters_page, spool_path)
    caplog.set_level(logging.INFO)
    agent = await make_agent()
    assert agent.spool.counters.get("spool_corrupt") == 1
    assert agent.spool.depth == 3
    status, metrics = await snapshot(agent.port)
    kept, lost = status["dead_letters"], status["counters"].get("dead_dropped_corrupt", 0)
    assert 0 < kept < DEAD
    assert kept + lost == DEAD, f"{DEAD - kept} dead letters lost, {lost} counted"
    assert dead_lost_metric(metrics) == lost
    assert f"{lost} dead letters" in caplog.text and "dead_dropped_corrupt" in caplog.text
    await agent.stop()
    code, text = await run_outpost("status", "--config", agent.config_path)   # the file's
    assert code == 0, text
    assert f"corrupt spools moved aside: 1 (dead letters lost with them: {lost})" in text


async def test_a_salvage_without_room_counts_the_dead_letters_left_behind(
        make_agent: Any, six_mb_fs: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """The copy fails for room: the queue is counted lost (dropped_corrupt), and the dead
    letters, left in the file moved aside as well, must be counted and named too."""
    spool_path = six_mb_fs / "spool.db"
    await asyncio.to_thread(dead_letters_spool, spool_path, 4000)
    await asyncio.to_thread(zero_a_dead_letters_page, spool_path)
    leave_free(six_mb_fs, 512 * 1024)   # for its -shm, not for its 800 KB of letters
    caplog.set_level(logging.INFO)
    agent = await make_agent(spool=spool_path)
    assert "could not salvage" in caplog.text, "the copy did not fail for room"
    assert agent.spool.counters.get("dropped_corrupt") == 3
    assert agent.spool.dead_count == 0
    assert agent.spool.counters.get("dead_dropped_corrupt", 0) == DEAD
    moved = moved_aside(six_mb_fs)
    assert f"kept in {moved} with its 3 queued events and {DEAD} dead letters" in caplog.text
    await agent.stop()
    assert saved_counters(spool_path).get("dead_dropped_corrupt") == DEAD


async def test_dead_letters_lost_to_damage_found_while_running_are_counted(
        make_agent: Any, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """Damage found by a running agent, here by expiry (which alone reads the dead
    letters): those lost are counted from the agent's own count of its dead letters, and
    every letter is then accounted for, expired or lost."""
    agent = await make_agent(storage={"max_age_days": 1})
    spool = agent.spool
    await spool.append([Event("app1", NUCLEUS, i, body(i, 500), i) for i in range(DEAD)])
    rows = await spool.fetch(spool.streams["app1"].id, 0, DEAD)
    await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
    await spool.prune()   # as the agent's every 10 minutes: marks when they came
    assert spool.db is not None
    await spool.db.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    await asyncio.to_thread(zero_a_dead_letters_page, spool.path)
    # Another writer's commit: the agent's connection reads the file again, as it does
    # once its cache has moved on.
    with contextlib.closing(sqlite3.connect(spool.path, isolation_level=None)) as other:
        other.execute("PRAGMA user_version = 5")
    clock.passed_ms = 2 * DAY_MS
    await spool.prune()
    assert spool.counters.get("spool_corrupt") == 1 and spool.expiry_errors == 0
    status, metrics = await snapshot(agent.port)
    expired, lost = (status["counters"][name] for name in ("dead_expired", "dead_dropped_corrupt"))
    assert status["dead_letters"] == 0 and 0 < lost < DEAD
    assert expired + lost == DEAD, f"{DEAD - expired} dead letters lost, {lost} counted"
    assert dead_lost_metric(metrics) == lost
    assert f"{lost} dead letters could not be read" in caplog.text


async def test_a_fresh_spool_found_damaged_before_its_salvage_still_gets_that_salvage(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """A stop inside a salvage leaves a marker naming the file moved aside, and the fresh
    spool at the path; if that fresh spool is itself damaged at the next start (the card
    that damaged the first file, a power cut while it was new), it is moved aside and
    salvaged in turn, but the file the marker named must still be salvaged: its queue
    is acknowledged events, and nothing else would ever deliver them."""
    await asyncio.to_thread(build, tmp_path / "spool.db", 300, 50, ("app1",))
    first = tmp_path / "spool.db.corrupt-20260101T000000"
    (tmp_path / "spool.db").rename(first)
    (tmp_path / "spool.db.salvaging").write_text(f"{first.name}\n")
    (tmp_path / "spool.db").write_bytes(b"not a spool, torn" * 512)
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    # The upstream has the events before the agent has read its acks: both waited for.
    await wait_for(lambda: sorted(fake_nucleus.ids()) == list(range(300))
                   and agent.spool.depth == 0, timeout=15)
    assert not (tmp_path / "spool.db.salvaging").exists()


@pytest.mark.parametrize("path", ["/dead", "/dead/export"])
async def test_dead_letters_read_from_a_damaged_page_are_salvaged_not_refused(
        make_agent: Any, path: str) -> None:
    """Damage in the dead letters' pages found by `outpost dead list` or `export` (which,
    with expiry and a retry or purge, alone read them): it answered 503 "the spool failed:
    database disk image is malformed", at every try, and nothing moved the file aside. The
    spool must be salvaged then, as for a retry, and the letters that can be read listed."""
    agent = await make_agent()
    spool = agent.spool
    await damage_dead_letters(spool)
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{agent.port}{path}") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    lost = spool.counters.get("dead_dropped_corrupt", 0)
    assert spool.counters.get("spool_corrupt") == 1 and 0 < lost < DEAD
    assert spool.dead_count == DEAD - lost
    if path == "/dead/export":
        assert text.count("\n") == DEAD - lost
    else:
        assert orjson.loads(text)["entries"]


async def test_damage_a_read_meets_on_a_full_disk_is_one_clear_line_not_a_crash(
        make_agent: Any, fake_nucleus: FakeNucleus, six_mb_fs: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forwarder's read meets damage on a disk too full for the fresh spool: the file is
    moved aside, and the recovery fails. That failure was the forwarder's crash, logged
    with a traceback. It must be one line that says what happened and what follows, the
    spool shown not open, and the salvage finished once space is freed."""
    monkeypatch.setattr(spool_writer, "REOPEN_EVERY_S", 0.05)
    spool_path = six_mb_fs / "spool.db"
    await asyncio.to_thread(build, spool_path, N, 500, ("app1",))
    agent = await make_agent(spool=spool_path)   # no upstream yet: nothing reads the queue
    try:
        await asyncio.to_thread(scribbled, spool_path)
        fill_up(six_mb_fs / "filler")
        write_config(Path(agent.config_path), spool_path, upstreams=[upstream(fake_nucleus)])
        caplog.set_level(logging.INFO)
        await agent.reload()
        await wait_for(lambda: agent.spool.open_error is not None, timeout=5)
        assert not [r for r in caplog.records if r.exc_info], "a traceback"
        said = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
        assert len(said) == 1 and "refused" in said[0], said
        (six_mb_fs / "filler").unlink()
        await wait_for(lambda: agent.spool.counters.get("spool_corrupt") == 1
                       and agent.spool.depth == 0, timeout=10)
        assert len(fake_nucleus.ids()) + agent.spool.counters["dropped_corrupt"] == N
    finally:
        await agent.stop()   # before the file system goes


# A value garbled into another type (SQLite reads it without complaint: the tables are
# not STRICT) in a file that opens, and which events of the lone backlog it costs.
GARBLED = {
    "queue-depth": ("UPDATE streams SET depth = 'garbage' WHERE id = 1", 0),
    # Numbers past what a count can be: the loss they gave was too large to save.
    "queue-depth-huge": ("UPDATE streams SET depth = 1e300 WHERE id = 1", 0),
    "queue-depth-infinite": ("UPDATE streams SET depth = 1e999 WHERE id = 1", 0),
    "receipt": ("UPDATE records SET received = 'garbage' WHERE id = 1", 0),   # kept
    "dedupe-keys": ("UPDATE records SET dkeys = 'garbage' WHERE id = 1", 0),   # kept
    "clock-mark": ("UPDATE clock_marks SET next_seq = 'garbage'", 0),
    # A lane no forwarder reads: its events were counted queued but never sent. Salvaged
    # into the normal lane; of another type, the record is lost as any garbled so is.
    "lane-high": ("UPDATE records SET lane = 7 WHERE id = 1", 0),
    "lane-negative": ("UPDATE records SET lane = -1 WHERE id = 1", 0),
    "lane-text": ("UPDATE records SET lane = 'garbage' WHERE id = 1", 1),
    "lane-between": ("UPDATE records SET lane = 0.5 WHERE id = 1", 1),
}


@pytest.mark.parametrize(("damage", "lost"), GARBLED.values(), ids=GARBLED.keys())
async def test_a_value_garbled_into_another_type_is_salvaged_not_a_failed_start(
        tmp_path: Path, damage: str, lost: int) -> None:
    path = tmp_path / "spool.db"
    events = await backlog(path, 100)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(damage)
    async with opened(path) as spool:
        assert spool.counters.get("spool_corrupt") == 1
        assert spool.counters.get("dropped_corrupt", 0) == lost
        assert await queued(spool) == by_key(events[lost:])
        assert spool.depth == len(events) - lost
    assert list(tmp_path.glob("spool.db.corrupt-*"))


@pytest.mark.parametrize("damage", ["gone = 'garbage'", "gone = x''", "family = 9"],
                         ids=["text", "cut-short", "family"])
async def test_a_record_whose_acked_bits_are_garbled_is_counted_and_its_queue_flows(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, damage: str) -> None:
    """Garbled where only a forwarder's read looks (the bits of its events acked, or its
    family: none a forwarder can send), found while the agent runs: that record is lost,
    counted as the salvage counts it, not dead-lettered, and the rest of its key's queue
    sent after it."""
    events = await backlog(tmp_path / "spool.db", 100)
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
        db.execute(f"UPDATE records SET {damage} WHERE id = 1")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert sorted(fake_segment.message_ids()) == sorted(
        orjson.loads(ev.body)["messageId"] for ev in events[1:])
    assert agent.spool.counters.get("dropped_corrupt") == 1
    assert agent.spool.dead_count == 0


# One record's value garbled into another type (SQLite reads it back as one: the tables
# are not STRICT), and (lost, salvaged): the events counted dropped_corrupt, and whether
# the start salvaged the file (None: not asserted).
# - its packed events, as a number: only a forwarder's read looks at them. That record is
#   lost, counted, as one that does not unpack, and the rest of its key's queue is sent.
# - its count of live events, or of their bytes: neither the start nor a forwarder's read
#   looked at them, so the record was sent, and every commit of its ack then failed
#   (TypeError: 'str' - 'int'), the apps posting meanwhile answered 503 with it, the batch
#   sent again and again, the queue never empty. Damage at the start, as any other of
#   another type: the salvage counts both again from the events that unpack, none lost.
# - its queue (its stream's id): no forwarder's read (by stream and lane) found it, nor
#   the size cap's drop, while its queue's depth counted it: /status showed it queued,
#   never sent. Damage at the start: the salvage, which keeps only the records of a known
#   queue, loses it, counted, and the rest flows.
GARBLED_RECORD = {
    "packed-events-integer": ("data = 7", 1, None),
    "packed-events-real": ("data = 2.5", 1, None),
    "live-count-text": ("live = 'one'", 0, 1),
    "bytes-count-text": ("bytes = 'many'", 0, 1),
    "queue-text": ("stream = 'app-1'", 1, None),
    "queue-real": ("stream = 1.5", 1, None),
}


@pytest.mark.parametrize(("damage", "lost", "salvaged"), GARBLED_RECORD.values(),
                         ids=GARBLED_RECORD.keys())
async def test_a_record_garbled_into_another_type_loses_at_most_itself_and_its_queue_flows(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path, damage: str, lost: int,
        salvaged: int | None) -> None:
    events = await backlog(tmp_path / "spool.db", 100)
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
        db.execute(f"UPDATE records SET {damage} WHERE id = 1")
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert sorted(fake_segment.message_ids()) == sorted(
        orjson.loads(ev.body)["messageId"] for ev in events[lost:])
    assert agent.spool.counters.get("dropped_corrupt", 0) == lost
    if salvaged is not None:
        assert agent.spool.counters.get("spool_corrupt") == salvaged


@pytest.mark.parametrize("damage", ["live = 'one'", "bytes = 'many'"], ids=["live", "bytes"])
async def test_a_record_whose_counts_are_garbled_while_the_agent_runs_is_salvaged_at_its_ack(
        make_agent: Any, fast_backoff: Any, fake_segment: FakeSegment, tmp_path: Path,
        damage: str) -> None:
    """The same damage found while the agent runs, after its start's check: the commit of
    the record's ack failed (TypeError) at every try, the apps posting beside it answered
    503, the batch sent again and again until a restart. It is damage the commit meets,
    as a malformed page: the file is salvaged (the counts counted again from the events),
    the ack committed on the fresh spool, and nothing is lost."""
    events = await backlog(tmp_path / "spool.db", 100)
    fake_segment.outage = (503, None)   # sending, and refused: nothing acked yet
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: len(fake_segment.requests) > 0, timeout=5)
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db, db:
        db.execute(f"UPDATE records SET {damage} WHERE id = 1")
    fake_segment.outage = None
    # The salvaged queue is 100 events again until the ack's commit runs on it.
    await wait_for(lambda: agent.spool.counters.get("spool_corrupt") == 1
                   and agent.spool.depth == 0, timeout=5)
    assert sorted(set(fake_segment.message_ids())) == sorted(
        orjson.loads(ev.body)["messageId"] for ev in events)
    assert agent.spool.counters.get("dropped_corrupt", 0) == 0


# A record's receipt time garbled (SQLite reads it back without complaint), and what
# else has the file salvaged: its events are whole (their checksum holds), so they are
# kept, received at the salvage (an out-of-range time failed their mapping, and they went
# to dead letters as corrupt rows).
RECEIPTS = {
    "text": ["UPDATE records SET received = 'garbage' WHERE id = 1"],
    "real": ["UPDATE records SET received = 1700000000000.5 WHERE id = 1"],
    "out-of-range": ["UPDATE records SET received = 100000000000000000 WHERE id = 1",
                     "UPDATE streams SET depth = 'garbage'"],
    # Alone, in a file that opens: found at the start as a value of another type is.
    "out-of-range-alone": ["UPDATE records SET received = -100000000000000000 WHERE id = 1"],
}


async def salvaged_whole(make_agent: Any, fake_segment: FakeSegment, tmp_path: Path,
                         caplog: pytest.LogCaptureFixture, damage: list[str]) -> None:
    """300 events of one key (records 1, 101, 201) ``damage`` garbled: the start salvages
    the file, and every event is sent, none lost nor dead-lettered."""
    path = tmp_path / "spool.db"
    await asyncio.to_thread(build, path, 300, 20, ("app1",))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for statement in damage:
            db.execute(statement)
    caplog.set_level(logging.WARNING)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=10)   # acked: all sent
    status, _ = await snapshot(agent.port)
    assert status["counters"]["spool_corrupt"] == 1
    assert status["counters"].get("dropped_corrupt", 0) == 0
    assert status["drops"]["dead_lettered"] == 0 and agent.spool.dead_count == 0
    assert [ev["context"]["nucleus"]["id"] for ev in fake_segment.events] == list(range(300))


@pytest.mark.parametrize("damage", RECEIPTS.values(), ids=RECEIPTS.keys())
async def test_events_whose_receipt_time_is_garbled_are_kept_as_received_at_the_salvage(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, damage: list[str]) -> None:
    before = time.time()
    await salvaged_whole(make_agent, fake_segment, tmp_path, caplog, damage)
    after = time.time()
    # The record's own time is lost: the salvage's stands for it, and the log says so.
    received = {ev["receivedAt"] for ev in fake_segment.events[:100]}
    assert len(received) == 1
    at = datetime.fromisoformat(received.pop()).timestamp()
    assert before - 1 <= at <= after + 1, (before, at, after)
    said = [r.getMessage() for r in caplog.records if "the receipt time of" in r.getMessage()]
    assert len(said) == 1 and "100 " in said[0], said


# A queue's depth garbled into text or a blob: SQLite's sum() of it is a real, 0.0 for a
# lone key, which is no count (unknown, as for any depth past one).
@pytest.mark.parametrize("depth", ["'garbage'", "x'00'"], ids=["text", "blob"])
async def test_a_garbled_depth_leaves_the_loss_unknown_not_nothing(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, depth: str) -> None:
    path = tmp_path / "spool.db"
    await asyncio.to_thread(build, path, 300, 20, ("app1",))   # records 1, 101, 201
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(f"UPDATE streams SET depth = {depth}")
        db.execute("UPDATE records SET family = 9 WHERE id = 1")   # its 100 events lost
    caplog.set_level(logging.ERROR)
    agent = await make_agent(upstreams=[segment_up(fake_segment)])
    await wait_for(lambda: agent.spool.depth == 0, timeout=10)   # acked: all sent
    status, metrics = await snapshot(agent.port)
    assert [ev["context"]["nucleus"]["id"] for ev in fake_segment.events] == list(range(100, 300))
    # Read but not kept: the loss known to be at least that, and said to be unknown.
    assert status["counters"]["dropped_corrupt"] == 100 == dropped_metric(metrics)
    said = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert len(said) == 1 and "unknown" in said[0], said


# A record's dedupe keys garbled (and what else has the file salvaged: a running agent
# sends the events of keys cut short, without their dedupe): its events are whole (their
# checksum holds), and only their dedupe is lost with the keys.
DEDUPE_KEYS = {
    "text": ["UPDATE records SET dkeys = 'garbage' WHERE id = 1"],
    "cut-short": ["UPDATE records SET dkeys = x'0011' WHERE id = 1",
                  "UPDATE streams SET depth = 'garbage'"],
}


@pytest.mark.parametrize("damage", DEDUPE_KEYS.values(), ids=DEDUPE_KEYS.keys())
async def test_events_whose_dedupe_keys_are_garbled_are_kept_without_them(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, damage: list[str]) -> None:
    await salvaged_whole(make_agent, fake_segment, tmp_path, caplog, damage)
    said = [r.getMessage() for r in caplog.records if "dedupe keys" in r.getMessage()]
    assert len(said) == 1 and "100 " in said[0], said


async def test_a_garbled_receipt_time_past_the_dedupe_keys_loaded_is_found_at_the_start(
        make_agent: Any, fake_segment: FakeSegment, tmp_path: Path) -> None:
    """In a record older than the newest dedupe_max_keys keys, whose receipt time the start
    did not read: its events went to dead letters as corrupt rows at their mapping."""
    path = tmp_path / "spool.db"
    await asyncio.to_thread(build, path, 300, 20, ("app1",))   # records 1, 101, 201
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE records SET received = 'garbage' WHERE id = 1")
    agent = await make_agent(upstreams=[segment_up(fake_segment)],
                             storage={"dedupe_max_keys": 150})   # records 201 and 101 only
    await wait_for(lambda: agent.spool.depth == 0, timeout=10)   # acked: all sent
    status, _ = await snapshot(agent.port)
    assert status["counters"]["spool_corrupt"] == 1
    assert status["drops"]["dead_lettered"] == 0 and agent.spool.dead_count == 0
    assert [ev["context"]["nucleus"]["id"] for ev in fake_segment.events] == list(range(300))


async def test_a_fifo_where_the_salvage_marker_goes_holds_no_command_nor_the_start(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """A FIFO at spool.db.salvaging (the marker naming a file a salvage moved aside): read
    as the marker, its open waited for a writer, forever. `outpost status` and `outpost
    dead list` of the stopped agent hung, and `outpost run` hung before it listened, deaf
    to SIGTERM. A marker that is no regular file names no file: a stale one, which the
    start removes."""
    spool = tmp_path / "spool.db"
    await (await Spool.open(StorageConfig(path=str(spool)))).close()
    fifo = spool.with_name(f"{spool.name}.salvaging")
    os.mkfifo(fifo)
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", spool, port=port)
    for args in (["status"], ["dead", "list"]):
        run = subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(cfg)],
                             capture_output=True, text=True, cwd=ROOT, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 0 and "no agent running" in run.stdout, (args, run)
        assert "salvage is pending" not in run.stdout + run.stderr, (args, run)
    agent = agent_process(cfg, port)
    await asyncio.to_thread(agent.start)
    assert agent.terminate() == 0
    assert not os.path.lexists(fifo)
