"""Disk trouble: a full spool, a full disk, a corrupt spool file, a corrupt row.

- max_size_mb with when_full = "reject": apps get 503 + Retry-After, nothing partial is stored,
  and the agent takes events again once the upstream drains the spool;
- when_full = "drop_oldest": the oldest go, counted, the newest are delivered in order;
- a real full filesystem (a 2 MB tmpfs; skipped where mount is not permitted): 503, a live
  agent, recovery once space is freed, and an intact SQLite file;
- a garbage, truncated or scribbled-over spool at startup: moved aside, /healthz answers,
  and the fresh spool forwards;
- one corrupt row: dead-lettered, and the rest of the queue flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.ops.status_table import render
from agent.settings import StorageConfig
from agent.spool import Reason, Spool, SpoolFull
from agent.spool import writer as spool_writer
from agent.spool.records import pack, unpack
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.segment_upstream import FakeSegment
from tests.waiting import wait_for

PAD = 1500  # characters of random hex: records are compressed, about 2x for hex


def event(i: int, pad: str | None = None) -> dict[str, Any]:
    if pad is None:
        pad = os.urandom(PAD // 2).hex()
    return {"type": "event", "name": "e", "id": i, "sessionId": 1, "machineId": "m",
            "date": "2026-01-01T00:00:00.000Z", "payload": {"pad": pad}}


def upstream(fake: FakeNucleus | FaultyUpstream, protocol: str = "nucleus-ws") -> dict[str, Any]:
    if isinstance(fake, FakeNucleus):
        url = fake.url if protocol == "nucleus-ws" else fake.http_url
    else:
        url = fake.ws_url if protocol == "nucleus-ws" else fake.http_url
    return {"name": "up", "protocol": protocol, "url": url, "flush_interval_s": 0.02,
            "timeout_s": 2}


async def post(session: aiohttp.ClientSession, port: int, events: list[dict[str, Any]],
               key: str = "app1") -> aiohttp.ClientResponse:
    async with session.post(f"http://127.0.0.1:{port}/app/{key}/track",
                            json={"data": events}) as r:
        await r.read()
        return r


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def rows(path: Path) -> int:
    """Queued events in a spool file."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT coalesce(sum(live), 0) FROM records").fetchone()[0])
    finally:
        conn.close()


# -- max_size_mb ---------------------------------------------------------------------------------


async def test_full_spool_rejects_with_503_and_recovers_when_drained(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             storage={"max_size_mb": 1, "when_full": "reject"})
    accepted: list[int] = []
    async with aiohttp.ClientSession() as s:
        refused = None
        # Batches of 50 events until one is refused, then of 5 (~1.6 MB compressed offered
        # to a 1 MB spool at each size): about 40 requests, where batches of 5 took 250.
        for size in (50, 5):
            for _ in range(2000 // size):
                batch = [event(len(accepted) + j) for j in range(size)]
                depth = agent.spool.depth
                r = await post(s, agent.port, batch)
                if r.status == 503:
                    refused = r
                    assert agent.spool.depth == depth   # nothing of a refused request is kept
                    break
                assert r.status == 200
                accepted += [ev["id"] for ev in batch]
            assert refused is not None, "the spool never filled"
        for n in range(50):                     # top it up until even one event is refused
            if (await post(s, agent.port, [event(2000 + n)])).status == 503:
                break
            accepted.append(2000 + n)
        assert int(refused.headers["Retry-After"]) > 0
        assert (await refused.json())["error"]
        assert agent.spool.counters["rejected_full"] >= 5
        # The operator reads it in the log too, not only in the counters (once a minute).
        said = [r.getMessage() for r in caplog.records if "rejected_full" in r.getMessage()]
        assert len(said) == 1 and "max_size_mb" in said[0], said
        assert agent.spool.used_bytes <= agent.spool.max_bytes
        # A websocket app gets no ack (it keeps its events): the connection closes with
        # "try again later", as when the agent is busy. Left open without a reply, the
        # frame's silence put the replies that followed out of step with their frames.
        depth = agent.spool.depth
        async with s.ws_connect(f"http://127.0.0.1:{agent.port}/app/app1/track") as ws:
            await ws.send_json({"data": [event(10**6)]})
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013, msg
            assert "spool is full" in msg.extra and agent.spool.depth == depth
        # The upstream comes back and drains the spool: apps are served again.
        await fake_nucleus.come_back()
        agent.forwarding.flush()
        await wait_for(lambda: agent.spool.depth == 0, timeout=20)
        r = await post(s, agent.port, [event(10**6 + 1)])
        assert r.status == 200
    assert set(accepted) <= set(fake_nucleus.ids())
    spool_path = agent.spool.path
    await agent.stop()
    assert integrity(spool_path) == "ok"
    assert spool_path.stat().st_size <= 1024 * 1024 + 64 * 1024


async def test_a_request_bigger_than_the_whole_spool_is_413_not_retry_later(
        make_agent: Any, fake_nucleus: FakeNucleus, fake_segment: FakeSegment) -> None:
    """A request whose events, packed, take more than max_size_mb can never be stored,
    however much the queue drains: answered 413 in its API's shape, naming max_size_mb,
    with no Retry-After (audit: 503, or 429 for a Segment batch, with Retry-After: SDKs
    retried it for minutes, then lost it)."""
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus), "keys": ["app1"]},
                                        {"name": "seg", "protocol": "segment-http",
                                         "url": fake_segment.url, "keys": ["*"]}],
                             storage={"max_size_mb": 1})
    pad = 3000   # characters of random hex an event: ~1.5 KB packed
    async with aiohttp.ClientSession() as s:
        nucleus = [event(i, os.urandom(pad // 2).hex()) for i in range(1000)]
        r = await post(s, agent.port, nucleus)
        body = await r.json()
        assert r.status == 413 and "Retry-After" not in r.headers, (r.status, body)
        assert "max_size_mb" in body["error"], body
        batch = {"batch": [{"type": "track", "event": "e", "userId": "u", "messageId": f"m{i}",
                            "properties": {"pad": os.urandom(pad // 2).hex()}}
                           for i in range(1000)]}
        async with s.post(f"http://127.0.0.1:{agent.port}/v1/batch?writeKey=segkey",
                          json=batch) as r:
            body = await r.json()
            assert r.status == 413 and "Retry-After" not in r.headers, (r.status, body)
        assert body["Success"] is False and "max_size_mb" in body["Errors"][0]["Message"], body
        # A Nucleus module's websocket is closed with the reason, not "try again later".
        async with s.ws_connect(f"http://127.0.0.1:{agent.port}/app/app1/track") as ws:
            await ws.send_json({"data": nucleus})
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1007, msg
            assert "max_size_mb" in msg.extra, msg
        assert agent.spool.depth == 0
        # What fits is still stored.
        assert (await post(s, agent.port, nucleus[:10])).status == 200


class SlowHandshake(FakeNucleus):
    """The Nucleus upstream, its websocket handshakes held until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.knocked = asyncio.Event()

    async def _ws(self, request: aiohttp.web.Request) -> aiohttp.web.WebSocketResponse:
        self.knocked.set()
        await self.gate.wait()
        return await super()._ws(request)


async def test_rows_the_size_cap_drops_while_the_forwarder_connects_are_not_sent(
        make_agent: Any) -> None:
    """The forwarder reads its rows, then opens the connection. Rows that drop_oldest
    deleted meanwhile went out on it as read: delivered, and counted dropped too (one CI
    run of the test below: ids 320-329 both). They must be read again."""
    fake = await SlowHandshake().start()
    try:
        agent = await make_agent(upstreams=[{**upstream(fake), "timeout_s": 60}],
                                 storage={"max_size_mb": 1, "when_full": "drop_oldest"})
        sent = []
        async with aiohttp.ClientSession() as s:
            first = [event(j) for j in range(5)]
            assert (await post(s, agent.port, first)).status == 200
            sent += [ev["id"] for ev in first]
            await asyncio.wait_for(fake.knocked.wait(), 10)   # read, and connecting
            for n in range(1, 300):                 # ~2.4 MB into a 1 MB spool
                batch = [event(n * 5 + j) for j in range(5)]
                assert (await post(s, agent.port, batch)).status == 200
                sent += [ev["id"] for ev in batch]
        dropped = agent.spool.counters["dropped_full"]
        assert dropped > 5   # the rows read before the handshake among them
        fake.gate.set()
        agent.forwarding.flush()
        await wait_for(lambda: agent.spool.depth == 0, timeout=20)
        got = list(dict.fromkeys(fake.ids()))
        assert got == sent[dropped:]
    finally:
        fake.gate.set()
        await fake.stop()


async def test_drop_oldest_keeps_the_newest_and_counts_drops(
        make_agent: Any, fake_nucleus: FakeNucleus, caplog: pytest.LogCaptureFixture) -> None:
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)],
                             storage={"max_size_mb": 1, "when_full": "drop_oldest"})
    sent = []
    async with aiohttp.ClientSession() as s:
        for n in range(300):                    # ~2.4 MB into a 1 MB spool
            batch = [event(n * 5 + j) for j in range(5)]
            assert (await post(s, agent.port, batch)).status == 200
            sent += [ev["id"] for ev in batch]
    dropped = agent.spool.counters["dropped_full"]
    assert dropped > 0 and agent.spool.depth == len(sent) - dropped
    assert agent.spool.used_bytes <= agent.spool.max_bytes
    # Every drop has a reason in the log too (once a minute), as expiry's have.
    said = [r.getMessage() for r in caplog.records if "dropped_full" in r.getMessage()]
    assert len(said) == 1 and "oldest" in said[0] and "max_size_mb" in said[0], said
    await fake_nucleus.come_back()
    agent.forwarding.flush()
    await wait_for(lambda: agent.spool.depth == 0, timeout=20)
    got = list(dict.fromkeys(fake_nucleus.ids()))
    assert got == sent[dropped:]                # the newest, in order; the oldest dropped


@pytest.mark.parametrize("window_h", [0, 24])
async def test_space_freed_by_acks_in_the_same_commit_makes_room_for_its_events(
        make_agent: Any, fake_nucleus: FakeNucleus, window_h: int) -> None:
    """A full spool (when_full = "reject") whose upstream is back: an app's event that
    shares its commit with the acks that free the space is stored, not refused with 503,
    and the delivered events' dedupe keys are kept (not forgotten to make room)."""
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[upstream(fake_nucleus, "nucleus-http")],
                             storage={"max_size_mb": 1, "when_full": "reject",
                                      "dedupe_window_h": window_h})
    writer = agent.spool.writer
    async with aiohttp.ClientSession() as s:
        # Full: even one event is refused. Filled five at a time (one commit each), then
        # topped up one at a time until a single event is refused.
        for first, size in ((0, 5), (2000, 1)):
            for n in range(first, first + 2000, size):
                if (await post(s, agent.port, [event(n + j) for j in range(size)])
                        ).status == 503:
                    break
            else:
                raise AssertionError("the spool never filled")
        # Holding the commit lock lines commits up: the writer takes X's request and waits
        # for the lock; the upstream's acks and Y's request then wait for the next commit.
        async with agent.spool.lock:
            x = asyncio.create_task(post(s, agent.port, [event(10**6)]))
            await wait_for(lambda: bool(agent.spool.lock._waiters))  # X taken, waiting
            await fake_nucleus.come_back()
            agent.forwarding.flush()
            y = asyncio.create_task(post(s, agent.port, [event(10**6 + 1)]))
            # The writer's queue: what the next commit takes.
            await wait_for(lambda: bool(writer._batch.acks and writer._batch.appends))
        assert (await x).status == 503          # nothing acked yet: still full
        assert (await y).status == 200          # the acks before it freed the space
    assert agent.spool.counters.get("dedupe_forgotten", 0) == 0
    await wait_for(lambda: 10**6 + 1 in fake_nucleus.ids())


# -- a real full disk --------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, or a skip where this process may not mount."""
    yield from _tmpfs(tmp_path / "small", "2m")


@pytest.fixture
def six_mb_fs(tmp_path: Path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path / "six", "6m")


def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount(8) for a size-limited tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


async def test_full_disk_answers_503_and_recovers_when_space_is_freed(
        make_agent: Any, small_fs: Path) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 700_000)
    spool_path = small_fs / "spool" / "spool.db"
    agent = await make_agent(spool=spool_path, storage={"max_size_mb": 64})
    acked: list[int] = []
    async with aiohttp.ClientSession() as s:
        full = None
        for n in range(400):
            batch = [event(n * 10 + j) for j in range(10)]
            r = await post(s, agent.port, batch)
            if r.status == 503:
                full = r
                break
            assert r.status == 200
            acked += [ev["id"] for ev in batch]
        assert full is not None, "the disk never filled"
        assert int(full.headers["Retry-After"]) > 0
        assert agent.spool.counters.get("rejected_storage_error", 0) > 0
        async with s.get(f"http://127.0.0.1:{agent.port}/healthz") as h:
            assert h.status == 200                # a full disk is not a dead agent
        for n in range(50):                       # fill the last gaps: never a 5xx but 503
            r = await post(s, agent.port, [event(10**5 + n)])
            assert r.status in (200, 503)
            if r.status == 503:
                break
            acked.append(10**5 + n)
        assert r.status == 503
        filler.unlink()
        recovered = await post(s, agent.port, [event(10**6 + 1)])
        assert recovered.status == 200
        acked.append(10**6 + 1)
    await agent.stop()
    assert integrity(spool_path) == "ok"
    assert rows(spool_path) == len(set(acked))    # every acknowledged event, nothing else


async def test_a_spool_found_damaged_once_it_can_be_opened_again_is_salvaged(
        make_agent: Any, small_fs: Path) -> None:
    """The spool could not be opened at start for a reason other than damage (a full disk
    here; an I/O error on a failing card alike), so each commit tries again. When the file
    is then found damaged, that retry gave up as it did for the full disk, at every commit:
    every app got 503 for good, where an open at start moves a damaged file aside and
    salvages it. The retry must do the same."""
    spool_path = small_fs / "spool" / "spool.db"
    spool_path.parent.mkdir(mode=0o700)
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"\0" * free)
    agent = await make_agent(spool=spool_path)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(1)])).status == 503
        filler.unlink()
        spool_path.write_bytes(b"SQLite format 3\0" + b"\xff" * 8192)   # damaged meanwhile
        stored = await post(s, agent.port, [event(2)])
        assert stored.status == 200, await stored.text()
        assert (await post(s, agent.port, [event(3)])).status == 200
    assert agent.spool.depth == 2
    assert list(spool_path.parent.glob("spool.db.corrupt-*"))   # kept for a look
    counters = agent.spool.counters   # the one refusal while closed, counted once
    assert counters.get("rejected_storage_error") == 1 and counters.get("spool_corrupt") == 1, \
        counters


async def _damaged_on_a_full_disk(make_agent: Any, fs: Path) -> tuple[Any, Path, Path]:
    """An agent started on a damaged spool with no room left on ``fs``: the spool moved
    aside, no fresh one can be made. Returns the agent, the spool's path and the file
    filling the disk (unlink it to make room)."""
    spool_path = fs / "spool" / "spool.db"
    spool_path.parent.mkdir(mode=0o700)
    spool_path.write_bytes(b"SQLite format 3\0" + b"\xff" * 8192)   # damaged
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler.write_bytes(b"\0" * free)
    return await make_agent(spool=spool_path), spool_path, filler


async def test_what_was_refused_while_a_salvage_waited_for_disk_space_stays_counted(
        make_agent: Any, small_fs: Path) -> None:
    """A spool found damaged at start on a full disk is moved aside, but its fresh spool
    cannot be created: each commit tries again (Spool.reopen), and apps get 503, counted
    as rejected_storage_error. Once space is freed, the retry opens the fresh spool and
    finishes the salvage; what was refused meanwhile must stay counted, as when the spool
    could not be opened at all (test above). It is lost: reopen counts it again before
    _finish_recovery, whose reload of the salvaged file's state (_load_state, Books.reset)
    drops every count not yet saved; the salvage carries only what was counted before
    the move."""
    agent, spool_path, filler = await _damaged_on_a_full_disk(make_agent, small_fs)
    assert list(spool_path.parent.glob("spool.db.corrupt-*"))   # moved aside at start
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(1)])).status == 503
        assert agent.spool.counters.get("rejected_storage_error") == 1
        filler.unlink()
        stored = await post(s, agent.port, [event(2)])
        assert stored.status == 200, await stored.text()
        assert (await post(s, agent.port, [event(3)])).status == 200
    assert agent.spool.depth == 2
    counters = agent.spool.counters   # the one refusal while the salvage waited
    assert counters.get("rejected_storage_error") == 1, counters


async def test_a_damaged_spool_at_start_on_a_full_disk_is_one_error_line(
        make_agent: Any, small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As the docs say: the recovery's line says the file was moved aside and no fresh
    spool can be created; the start said it again as a spool that "cannot be opened"."""
    await _damaged_on_a_full_disk(make_agent, small_fs)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and "no fresh spool can be created" in said[0], said


async def test_a_directory_put_at_the_path_while_the_spool_is_closed_is_a_503_saying_so(
        make_agent: Any, small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The spool closed (moved aside as damaged, no room for the fresh one), and a
    directory put at its path meanwhile: the try to open it again raised past the writer
    (SpoolUnusable is no OSError), the request waited unanswered, a traceback was logged,
    and every later commit the same. Apps get 503 and the reason, logged once and kept in
    open_error, as for any spool that cannot be opened."""
    agent, spool_path, filler = await _damaged_on_a_full_disk(make_agent, small_fs)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(1)])).status == 503
        filler.unlink()
        spool_path.unlink()   # the empty file the try to create the fresh one left
        spool_path.mkdir()
        for n in (2, 3):
            async with asyncio.timeout(5):
                async with s.post(f"http://127.0.0.1:{agent.port}/app/app1/track",
                                  json={"data": [event(n)]}) as r:
                    assert r.status == 503, await r.text()
    assert "is a directory" in (agent.spool.open_error or "")
    assert not [r for r in caplog.records if r.exc_info], "a traceback"
    assert caplog.text.count("is a directory") == 1, caplog.text


async def test_keys_of_requests_refused_for_a_full_disk_take_no_place(
        make_agent: Any, small_fs: Path) -> None:
    """A request refused because its commit failed (503: the disk full) stores nothing,
    as one the full spool refuses: its new key must leave nothing behind. It was kept in
    memory and written as a row by the next commit that succeeded, so under
    listen.max_keys every new app that posted while the disk was full kept a place for
    good, and new apps were refused once the disk had room again."""
    spool_path = small_fs / "spool" / "spool.db"
    agent = await make_agent(spool=spool_path, listen={"max_keys": 3})
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"\0" * free)
    async with aiohttp.ClientSession() as s:
        for i in range(3):   # more than the -wal holds: each commit needs new pages
            r = await post(s, agent.port, [event(i, os.urandom(100_000).hex())],
                           key=f"refused-{i}")
            assert r.status == 503, await r.text()
        assert agent.spool.counters.get("rejected_storage_error") == 3
        filler.unlink()
        stored = await post(s, agent.port, [event(9)], key="new-app")
        assert stored.status == 200, await stored.text()
    await agent.stop()
    with contextlib.closing(sqlite3.connect(spool_path)) as db:
        assert [key for (key,) in db.execute("SELECT key FROM streams")] == ["new-app"]


# -- corrupt spool at startup ---------------------------------------------------------------


def make_spool(path: Path, n: int = 1500) -> None:
    """A real spool with ``n`` queued events, closed cleanly."""
    from agent.families.event import NUCLEUS, Event
    from agent.settings import StorageConfig
    from agent.spool import Spool

    async def fill() -> None:
        spool = await Spool.open(StorageConfig(path=str(path)))
        for b in range(n // 100):
            await spool.append([Event("app1", NUCLEUS, b * 100 + i,
                                      b'{"id":%d,"pad":"%s"}' % (b * 100 + i, b"y" * 500))
                                for i in range(100)])
        await spool.close()
    asyncio.run(fill())


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(200_000))


def truncated(path: Path) -> None:
    make_spool(path)
    os.truncate(path, path.stat().st_size // 2)


def scribbled(path: Path) -> None:
    """Bit rot in three pages of the queue's records: the header, the schema and the last
    page are fine, so the file opens, and the damage shows when the records are read.
    Found by name, not by place in the file: a table more moves every page."""
    make_spool(path)
    with sqlite3.connect(path) as db:
        pages = [n for (n,) in db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf' "
            "AND pageno < (SELECT page_count FROM pragma_page_count()) ORDER BY pageno")]
    assert len(pages) >= 3
    with open(path, "r+b") as fh:
        for n in pages[:3]:
            fh.seek((n - 1) * 4096)
            fh.write(os.urandom(4096))


@pytest.mark.parametrize("damage", [garbage, truncated, scribbled],
                         ids=["garbage", "truncated", "scribbled"])
async def test_corrupt_spool_is_moved_aside_and_healthy(
        tmp_path: Path, agent_process: Callable[..., AgentProcess],
        damage: Callable[[Path], None]) -> None:
    spool_path = tmp_path / "spool.db"
    await asyncio.to_thread(damage, spool_path)
    fake = await FakeNucleus().start()
    port = free_port()
    cfg = write_config(tmp_path / "agent.toml", spool_path, port=port,
                       upstreams=[upstream(fake)])
    agent = agent_process(cfg, port)
    try:
        # Listening (not exited, not stuck) and healthy: the start's own bound is a hang
        # guard, not a speed the test asserts.
        await asyncio.to_thread(agent.start)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{agent.url}/healthz") as r:
                assert r.status == 200
            # Damage in the middle shows when the queue is read, right after start: wait
            # for it (events taken before that are in the file moved aside, not sent).
            for _ in range(100):
                async with s.get(f"{agent.url}/status") as r:
                    if (await r.json())["counters"].get("spool_corrupt"):
                        break
                await asyncio.sleep(0.05)
            # The fresh spool takes events and forwards them, for a key the damaged
            # spool had (its forwarder may already be running) and for a new one.
            for key, first in (("app1", 10**6), ("fresh", 2 * 10**6)):
                r = await post(s, port, [event(first + i, pad="") for i in range(3)], key=key)
                assert r.status == 200
            want = {10**6, 10**6 + 1, 10**6 + 2, 2 * 10**6, 2 * 10**6 + 1, 2 * 10**6 + 2}
            await wait_for(lambda: want <= set(fake.ids()), timeout=10)
            async with s.get(f"{agent.url}/status") as r:
                status = await r.json()
        assert status["counters"].get("spool_corrupt") == 1
        assert list(tmp_path.glob("spool.db.corrupt-*")), "the corrupt file was not kept"
        assert "corrupt" in agent.log.read_text()
    finally:
        await asyncio.to_thread(agent.terminate)   # the fake upstream shares this loop
        await fake.stop()
    assert integrity(spool_path) == "ok"


# -- one corrupt row ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["nucleus-ws", "nucleus-http", "segment-http"])
@pytest.mark.parametrize("bad", [b"\xff\x00", b"[1, 2]", b'"text"', b"{"])
async def test_a_corrupt_row_is_dead_lettered_and_the_queue_flows(
        make_agent: Any, tmp_path: Path, protocol: str, bad: bytes) -> None:
    if protocol == "segment-http":
        pytest.importorskip("agent.uplinks.segment_http")
    first = await make_agent()                   # no upstream: events stay queued
    async with aiohttp.ClientSession() as s:
        assert (await post(s, first.port, [event(i, pad="") for i in range(10)])).status == 200
    await first.stop()
    conn = sqlite3.connect(tmp_path / "spool.db")
    with conn:                                   # the 5th event's body, in its packed record
        rid, data = conn.execute("SELECT id, data FROM records ORDER BY id LIMIT 1").fetchone()
        bodies = unpack(data)
        bodies[4] = bad
        conn.execute("UPDATE records SET data = ? WHERE id = ?", (pack(bodies), rid))
    conn.close()
    fake = await FaultyUpstream().start()
    try:
        agent = await make_agent(upstreams=[upstream(fake, protocol)])
        await wait_for(lambda: agent.spool.depth == 0, timeout=10)
        dead = await agent.spool.dead_letters()
        assert len(dead) == 1 and "corrupt" in dead[0]["reason"]
        received = [ev.get("id", ev.get("messageId")) for r in fake.requests for ev in r.events]
        if protocol != "segment-http":
            assert sorted(set(received)) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        else:
            assert len(set(str(i) for i in received)) == 9
    finally:
        await fake.stop()


async def test_recovery_while_running_keeps_stream_ids_and_rising_seqs(tmp_path: Path) -> None:
    """Forwarders keep their Stream and a seq cursor across a runtime move-aside: the fresh
    spool must give the same key the same stream id, and seqs above every cursor. The
    readable queue is salvaged with its seqs and dedupe keys (here: all of it)."""
    from agent.families.event import NUCLEUS, Event
    from agent.settings import StorageConfig
    from agent.spool import Spool

    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    try:
        await spool.append([Event(k, NUCLEUS, i * 10 + n, b'{"id":%d}' % n)
                            for n, k in enumerate(("a", "b")) for i in range(5)])
        b = spool.streams["b"]
        cursor = max(r.seq for r in await spool.fetch(b.id, 0, 100))
        observed = spool.observed_ms()             # the time the agent saw pass carries over
        await spool.recover(sqlite3.DatabaseError("database disk image is malformed"))
        assert spool.observed_ms() >= observed
        assert spool.streams["b"] is b and spool.depth == 10 and b.depth == 5
        assert spool.counters["spool_corrupt"] == 1
        assert spool.counters.get("dropped_corrupt", 0) == 0
        assert spool.counters["ingested"] == 10           # counters carry over
        assert await spool.append([Event("b", NUCLEUS, 10 + 1, b'{"id":1}')]) == 0  # a resend
        assert [r.seq for r in await spool.fetch(b.id, 0, 100)] == list(range(6, 11))
        await spool.append([Event("b", NUCLEUS, 999, b'{"id":999}'),
                            Event("c", NUCLEUS, 998, b'{"id":998}')])
        fresh = await spool.fetch(b.id, cursor, 100)
        assert [r.body for r in fresh] == [b'{"id":999}']
        assert spool.streams["c"].id not in (spool.streams["a"].id, b.id)
    finally:
        await spool.close()


async def test_corruption_found_by_a_commit_still_answers_the_app(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit that finds the damage is run again on the fresh spool: its apps get their
    answer (no 5xx for an error that was recovered from), and their events are kept."""
    from agent.families.event import NUCLEUS, Event
    from agent.settings import StorageConfig
    from agent.spool import Spool
    from agent.spool import commit as spool_commit

    spool = await Spool.open(StorageConfig(path=str(tmp_path / "spool.db")))
    real_commit = spool_commit.commit
    calls = 0

    def commit_once_corrupt(conn: Any, job: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real_commit(conn, job)

    # The whole group commit is one function on the writer thread (agent/spool/db.py).
    monkeypatch.setattr(spool_commit, "commit", commit_once_corrupt)
    try:
        assert await spool.append([Event("k", NUCLEUS, 1, b'{"id":1}')]) == 1
        assert spool.counters["spool_corrupt"] == 1 and spool.depth == 1
        assert [r.body for r in await spool.fetch(spool.streams["k"].id, 0, 10)] == [b'{"id":1}']
    finally:
        await spool.close()


async def test_remembered_dedupe_keys_never_keep_new_events_out(
        make_agent: Any, fake_nucleus: FakeNucleus) -> None:
    """Delivered events' dedupe keys are kept for dedupe_window_h (24 h) and take spool space.
    At max_size_mb they must give way: else a busy agent with an empty queue refuses every
    event (when_full = "reject") or drops its whole queue ("drop_oldest") for up to a day."""
    agent = await make_agent(upstreams=[{**upstream(fake_nucleus, "nucleus-http"),
                                         "batch_max_events": 1000}],
                             storage={"max_size_mb": 1, "when_full": "reject"})
    async with aiohttp.ClientSession() as s:
        # 130k events: ~1.04 MB of dedupe keys (8 B each); the cap is first met at ~118k,
        # where the oldest keys are forgotten, and a dozen batches follow it. Each batch
        # goes in about 10 ms: looked for every 20 ms, the waits took 2.8 s of the 4.1.
        for n in range(130):
            r = await post(s, agent.port, [event(n * 1000 + i, pad="") for i in range(1000)])
            assert r.status == 200, (n, await r.text())
            await wait_for(lambda: agent.spool.depth == 0, every=0.002)
    assert agent.spool.counters.get("dedupe_forgotten", 0) > 0
    assert agent.spool.counters.get("rejected_full", 0) == 0
    assert agent.spool.used_bytes <= agent.spool.max_bytes


async def test_a_full_disk_at_startup_is_a_503_not_a_crash_nor_a_lost_spool(
        small_fs: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """Restarted on a disk with no space left: SQLite cannot even create the -shm file. The
    spool is not corrupt, so it must not be moved aside (its queue would be orphaned), and
    the agent must not exit (a crash loop): it answers 503 until space is freed."""
    spool_path = small_fs / "spool" / "spool.db"
    await asyncio.to_thread(make_spool, spool_path, 300)
    filler = small_fs / "filler"
    fill_up(filler)
    fake = await FakeNucleus().start()
    port = free_port()
    cfg = write_config(small_fs.parent / "agent.toml", spool_path, port=port,
                       upstreams=[upstream(fake)])
    agent = agent_process(cfg, port)
    try:
        await asyncio.to_thread(agent.start, 5.0)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{agent.url}/healthz") as r:
                assert r.status == 200
            # Another key: app1's old queue must flow without app1 sending anything.
            r = await post(s, port, [event(10**6, pad="")], key="other")
            assert r.status == 503 and int(r.headers["Retry-After"]) > 0
            assert not list(spool_path.parent.glob("*.corrupt-*")), "a sound spool moved aside"
            filler.unlink()
            for _ in range(100):                  # recovers by itself once space is back
                r = await post(s, port, [event(10**6, pad="")], key="other")
                if r.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status == 200
        # The queue from before the restart is still there, and flows.
        await wait_for(lambda: set(range(300)) | {10**6} <= set(fake.ids()), timeout=15)
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        await asyncio.to_thread(agent.terminate)
        await fake.stop()


def _files_of_32_kib() -> None:
    """A disk that fills while the first start creates the spool's tables: files of at most
    32 KiB (the -wal then holds the first table or so, not all of them)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (32_768, 32_768))


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
async def test_a_first_start_on_a_disk_that_fills_leaves_a_spool_the_next_opens(
        tmp_path: Path, make_agent: Any, agent_process: Callable[..., AgentProcess]) -> None:
    """The tables of a new spool were made one by one: a first start whose disk filled
    partway kept some of them, and every later start, with the space back, failed to open
    it ("no such table"), refusing every event with 503 for good."""
    port = free_port()
    spool = tmp_path / "spool" / "spool.db"
    first = agent_process(write_config(tmp_path / "agent.toml", spool, port=port), port,
                          preexec_fn=_files_of_32_kib)
    await asyncio.to_thread(first.start)
    assert "cannot be opened" in first.log.read_text()
    await asyncio.to_thread(first.terminate)
    again = await make_agent(spool=spool)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, again.port, [event(1, pad="")])).status == 200


def fill_up(path: Path) -> None:
    """Fill the file system ``path`` is on, with ``path``, until a write fails."""
    with open(path, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)


def backed_up(path: Path, to: Path) -> None:
    """A copy of a live spool taken as a backup tool would (SQLite's backup API)."""
    with contextlib.closing(sqlite3.connect(path)) as src, \
            contextlib.closing(sqlite3.connect(to)) as dst:
        src.backup(dst)


@pytest.mark.parametrize("then", ["commit", "stop"])
@pytest.mark.parametrize("how", ["deleted", "restored"])
async def test_events_taken_after_the_spool_is_deleted_or_replaced_are_kept(
        make_agent: Any, tmp_path: Path, how: str, then: str) -> None:
    """An operator removes spool.db while the agent runs, or puts a backup in its place.
    The agent went on committing into the file it had open, which no path names any
    more: every event it answered 200 for from then on was gone at the next start,
    uncounted. Every event answered 200 must be in the file at the path (the file open
    is still readable), and a backup put there kept aside, as it was: found at the next
    commit, or (``stop``: its apps idle, the agent restarted) at the stop."""
    path = tmp_path / "spool.db"
    agent = await make_agent()
    more = [100, 101] if then == "commit" else []
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3)])).status == 200
        await asyncio.to_thread(backed_up, path, tmp_path / "backup.db")
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3, 5)])).status == 200
        if how == "deleted":
            path.unlink()
        else:
            (tmp_path / "backup.db").rename(path)
        for n in more:
            assert (await post(s, agent.port, [event(n, pad="")])).status == 200
    await agent.stop()
    assert path.exists() and rows(path) == 5 + len(more), \
        "events answered 200 are not in the spool file"
    assert integrity(path) == "ok"
    assert "dropped_corrupt" not in agent.spool.counters
    # Each event posted once is counted once, as new: the commit that found the file gone
    # is not a resend of itself.
    counted = {str(k): v for k, v in agent.spool.counters.items()}
    assert (counted.get("ingested"), counted.get("duplicates", 0)) == (5 + len(more), 0), \
        counted
    if how == "restored":
        aside = [p for p in tmp_path.glob("spool.db.corrupt-*")
                 if not p.name.endswith(("-wal", "-shm", "-journal"))]
        # The backup (3 rows), and the copy of the agent's file the salvage read.
        assert sorted(rows(p) for p in aside) == [3, 5 + (len(more) > 0)], \
            "the backup put there is not kept"


@pytest.mark.parametrize("then", ["commit", "stop"])
async def test_a_spool_directory_removed_under_the_agent_is_made_again_with_the_queue(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, then: str) -> None:
    """An operator removes the spool's directory while the agent runs (rm -rf of its state
    directory). The file the agent has open still holds the queue, but the copy it takes
    of it had nowhere to go: the events answered 200 were gone at the stop, and every
    commit after was a 503 and a traceback until the operator made the directory again.
    The agent makes its own directory again (0700), and keeps the queue there."""
    state = tmp_path / "state"
    agent = await make_agent(spool=state / "spool.db")
    more = [100, 101] if then == "commit" else []
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(5)])).status == 200
        await asyncio.to_thread(shutil.rmtree, state)
        for n in more:
            assert (await post(s, agent.port, [event(n, pad="")])).status == 200
    await agent.stop()
    assert rows(state / "spool.db") == 5 + len(more), "events answered 200 are gone"
    assert (state.stat().st_mode & 0o777) == 0o700
    assert not [r for r in caplog.records if r.exc_info], "a traceback"


async def test_the_directory_a_linked_spool_lives_in_removed_under_the_agent_is_made_again(
        make_agent: Any, tmp_path: Path) -> None:
    """storage.path a symlink to the spool on a bigger disk, whose directory there is
    removed while the agent runs. The agent made the link's directory again (there all
    along), not the one its file goes in: every commit after was a 503 "tried again every
    5 s", for good, and the queue stayed in a copy aside until a restart. It makes that
    directory again (0700), and keeps the queue there, as for a spool named directly."""
    disk = tmp_path / "disk" / "outpost"
    disk.mkdir(parents=True, mode=0o700)
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(disk / "spool.db")
    agent = await make_agent(spool=link)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(5)])).status == 200
        await asyncio.to_thread(shutil.rmtree, disk)
        answered = (await post(s, agent.port, [event(100, pad="")])).status
        assert answered == 200, f"{answered}: {agent.spool.open_error}"
    await agent.stop()
    assert rows(disk / "spool.db") == 6, "events answered 200 are not in the spool file"
    assert (disk.stat().st_mode & 0o777) == 0o700


async def test_events_taken_after_a_linked_spool_s_link_is_pointed_elsewhere_are_kept(
        make_agent: Any, tmp_path: Path) -> None:
    """storage.path a symlink, pointed while the agent runs at a copy of the spool made on
    another disk (a spool moved by hand). The agent goes on with the file it opened, the
    one the link named then: every event answered 200 from then on was left there, out of
    the queue at the next start, unless it looked at the link again, as at a file put at a
    path named directly. The link is kept."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(mode=0o700)
    new.mkdir(mode=0o700)
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(old / "spool.db")
    agent = await make_agent(spool=link)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3)])).status == 200
        await asyncio.to_thread(backed_up, old / "spool.db", new / "spool.db")
        moving = link.with_name("moving")
        moving.symlink_to(new / "spool.db")
        moving.replace(link)
        assert (await post(s, agent.port, [event(i, pad="") for i in range(3, 5)])).status == 200
    await agent.stop()
    assert link.is_symlink() and os.readlink(link) == str(new / "spool.db")
    assert rows(link) == 5, "events answered 200 are not in the spool the link names"


async def test_a_linked_spool_that_cannot_be_opened_opens_where_its_link_is_pointed(
        make_agent: Any, tmp_path: Path, small_fs: Path) -> None:
    """storage.path a symlink to a spool to be made on a disk found full at start: no
    spool can be made there, events are refused (503). The operator points the link at a
    disk with room. The agent tried again, every 5 s, the file the link named at the
    start, still on the full disk: every event a 503 until a restart, where it once
    opened the link, and so whatever it names now."""
    full = small_fs / "spool" / "spool.db"
    full.parent.mkdir(mode=0o700)
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize))
    roomy = tmp_path / "roomy"
    roomy.mkdir(mode=0o700)
    link = tmp_path / "state" / "spool.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(full)
    agent = await make_agent(spool=link)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(1, pad="")])).status == 503
        moving = link.with_name("moving")
        moving.symlink_to(roomy / "spool.db")
        moving.replace(link)
        stored = await post(s, agent.port, [event(2, pad="")])
        assert stored.status == 200, f"{stored.status}: {agent.spool.open_error}"
    await agent.stop()
    assert link.is_symlink() and rows(roomy / "spool.db") == 1


async def test_events_acked_after_the_spool_is_deleted_are_counted_acked_alone(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """The first commit to find spool.db deleted under the agent is the acks of the
    queue's delivery: it went into the file the agent had open, and the copy salvaged
    holds it. Each event must be counted once, acked, not acked and lost too."""
    await fake_nucleus.go_down()
    agent = await make_agent(upstreams=[upstream(fake_nucleus)])
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(5)])).status == 200
    (tmp_path / "spool.db").unlink()
    await fake_nucleus.come_back()
    await wait_for(lambda: agent.spool.counters.get("spool_corrupt"), timeout=5)
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    counted = {str(k): v for k, v in agent.spool.counters.items()}
    assert (counted.get("acked"), counted.get("dropped_corrupt", 0)) == (5, 0), counted
    assert sorted(fake_nucleus.ids()) == list(range(5))


async def test_a_queue_whose_spool_file_is_deleted_flows_with_no_app_sending(
        make_agent: Any, fake_nucleus: FakeNucleus, tmp_path: Path) -> None:
    """spool.db deleted under the agent before anything read it (no upstream yet, say),
    the apps idle: the forwarder's reads failed with "disk I/O error", each a task crash
    and a traceback, and the queue stayed unsent until an app's next commit found the
    file gone. The read must find it gone as a commit does, and the queue flow."""
    agent = await make_agent()
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(5)])).status == 200
    (tmp_path / "spool.db").unlink()
    write_config(Path(agent.config_path), agent.spool.path, upstreams=[upstream(fake_nucleus)])
    await agent.reload()
    await wait_for(lambda: agent.spool.depth == 0 and agent.spool.counters.get("acked"),
                   timeout=5)
    assert sorted(fake_nucleus.ids()) == list(range(5))
    assert rows(tmp_path / "spool.db") == 0 and "dropped_corrupt" not in agent.spool.counters


async def test_a_queue_left_by_a_full_disk_at_startup_flows_once_space_is_freed(
        make_agent: Any, fake_nucleus: FakeNucleus, small_fs: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Started on a disk too full to open the spool, the agent said it would open it "and
    forward its queue as soon as space is freed"; it tried again only at an app's next
    request, so a queue whose apps had stopped sending stayed unsent. It must flow once
    space is freed, with no app sending anything."""
    monkeypatch.setattr(spool_writer, "REOPEN_EVERY_S", 0.05, raising=False)
    spool_path = small_fs / "spool" / "spool.db"
    await asyncio.to_thread(make_spool, spool_path, 300)
    filler = small_fs / "filler"
    fill_up(filler)
    agent = await make_agent(spool=spool_path, upstreams=[upstream(fake_nucleus)])
    assert agent.spool.db is None, "the spool opened on a full disk"
    filler.unlink()
    await wait_for(lambda: set(range(300)) <= set(fake_nucleus.ids()), timeout=5)


async def test_status_says_the_spool_cannot_be_opened(
        make_agent: Any, small_fs: Path) -> None:
    """An agent whose spool cannot be opened (a full disk at start) refuses every event
    with 503; its /status and `outpost status` showed an empty spool and nothing amiss.
    They must say the spool is not open, and why, until it is; and /metrics, which said
    nothing an alert could fire on while no app sent (its queue unsent meanwhile)."""
    spool_path = small_fs / "spool" / "spool.db"
    await asyncio.to_thread(make_spool, spool_path, 300)
    filler = small_fs / "filler"
    fill_up(filler)
    agent = await make_agent(spool=spool_path)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            said = (await r.json())["spool"].get("open_error")
        assert said and "disk" in said, said
        assert "not open" in render(await (await s.get(
            f"http://127.0.0.1:{agent.port}/status")).json()), "outpost status says nothing"
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            assert "\noutpost_spool_open 0\n" in await r.text(), "/metrics says nothing"
        filler.unlink()
        assert (await post(s, agent.port, [event(1, pad="")])).status == 200
        async with s.get(f"http://127.0.0.1:{agent.port}/status") as r:
            assert (await r.json())["spool"].get("open_error") is None
        async with s.get(f"http://127.0.0.1:{agent.port}/metrics") as r:
            assert "\noutpost_spool_open 1\n" in await r.text()


@pytest.mark.parametrize("command", [("status", "--json"), ("dead", "list", "--json")],
                         ids=" ".join)
async def test_an_offline_read_of_a_spool_on_a_full_disk_reads_it(
        small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: tuple[str, ...]) -> None:
    """No agent running (stopped to free space, say) and the disk full: `outpost status`
    and `dead list` said "cannot read the spool ...: disk I/O error", as if the disk were
    failing: SQLite's read-only open of a WAL file sizes a -shm beside it, and a full disk
    has no room for it. A stopped agent's spool (no -wal) needs none: it is read as
    when the disk has room, and no file is left beside it."""
    from agent import cli
    spool_path = small_fs / "spool" / "spool.db"
    await asyncio.to_thread(make_spool, spool_path, 300)
    cfg = write_config(tmp_path / "agent.toml", spool_path, port=1)   # nothing answers there
    with_room = cli.main([*command, "--config", str(cfg)]), capsys.readouterr()
    assert with_room[0] == 0, with_room
    fill_up(small_fs / "filler")
    code = cli.main([*command, "--config", str(cfg)])
    got = capsys.readouterr()
    assert code == 0 and "disk I/O error" not in got.err, (code, got.err)
    if command[0] == "status":
        assert orjson.loads(got.out)["queue_depth"] == 300, got.out
    assert sorted(p.name for p in spool_path.parent.iterdir()) == ["spool.db"]


async def test_a_new_reason_the_spool_cannot_be_opened_is_logged_once(
        make_agent: Any, small_fs: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk is full at start, then space is freed but the file system goes read-only
    (as ext4 remounts itself on errors): the log said only the first reason, and nothing
    while the agent kept trying again, so the operator freeing space saw no sign why it
    still refused every event. A new reason is logged once, not at every try."""
    monkeypatch.setattr(spool_writer, "REOPEN_EVERY_S", 0.05, raising=False)
    spool_path = small_fs / "spool" / "spool.db"
    await asyncio.to_thread(make_spool, spool_path, 300)
    filler = small_fs / "filler"
    fill_up(filler)
    agent = await make_agent(spool=spool_path)
    first = agent.spool.open_error
    assert first is not None
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        await wait_for(lambda: agent.spool.open_error not in (None, first), timeout=5)
        now = agent.spool.open_error
        assert now is not None
        for _ in range(2):   # the writer's next tries, with the same reason
            async with agent.spool.lock:
                assert not await agent.spool.reopen()
        said = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.ERROR and now in r.getMessage()]
        assert len(said) == 1, (now, [r.getMessage() for r in caplog.records])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    await wait_for(lambda: agent.spool.db is not None, timeout=5)


async def test_a_commit_that_succeeded_is_not_reported_failed_when_the_disk_is_nearly_full(
        six_mb_fs: Path) -> None:
    """After acks free the front of the file, handing those pages back to the file system
    writes to the WAL; on a nearly full disk that fails. The commit before it (the acks
    and an app's new event) is durable: the app must hear so, and the agent's view of its
    queue must stay the disk's (it reported 503 and kept 1,200 events in mind, not 401)."""
    def event(n: int) -> Event:
        body = orjson.dumps({"id": n, "pad": os.urandom(1500).hex()})
        return Event("a", NUCLEUS, dedupe_key("a", n), body)

    spool = await Spool.open(StorageConfig(path=str(six_mb_fs / "spool.db")))
    try:
        for batch in range(12):
            await spool.append([event(batch * 100 + i) for i in range(100)])
        await spool.db.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        rows = await spool.fetch(spool.streams["a"].id, 0, 100_000)
        free = os.statvfs(six_mb_fs).f_bavail * os.statvfs(six_mb_fs).f_frsize
        (six_mb_fs / "filler").write_bytes(b"\0" * (free - 1_500_000))
        acking = asyncio.create_task(spool.ack([r.seq for r in rows[:800]]))
        stored = await spool.append([event(99_999)])   # one commit with the acks
        await acking
        assert stored == 1
        with contextlib.closing(sqlite3.connect(six_mb_fs / "spool.db")) as db:
            live = db.execute("SELECT sum(live) FROM records").fetchone()[0]
        assert spool.depth == live == 401
    finally:
        await spool.close()


def _event(key: str, n: int) -> Event:
    return Event(key, NUCLEUS, dedupe_key(key, n), orjson.dumps({"id": n, "key": key}))


async def _recovered_with_no_room(spool: Spool, fs: Path) -> tuple[Any, list[int]]:
    """``spool`` is given key a's queue (its stream and seqs returned), found corrupt and
    moved aside, and no fresh one can be created (a full disk); then there is room again."""
    await spool.append([_event("a", n) for n in range(5)])
    held = spool.streams["a"]
    a_seqs = [r.seq for r in await spool.fetch(held.id, 0, 100)]
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler.write_bytes(b"\0" * free)
    with pytest.raises(sqlite3.Error):
        await spool.recover(sqlite3.DatabaseError("database disk image is malformed"))
    filler.unlink()
    return held, a_seqs


async def test_a_recovery_that_cannot_create_the_fresh_spool_finishes_once_it_can(
        six_mb_fs: Path) -> None:
    """A corrupt spool is moved aside, but the fresh one cannot be created (the disk is
    full). Once there is room, the next commit must finish that recovery (salvage the
    moved file, keep stream ids and seqs rising), not open an empty spool: that one
    handed key b the stream id and seqs key a's forwarder still held, so a's late acks
    deleted b's unsent events, and a's queue was lost uncounted."""
    spool = await Spool.open(StorageConfig(path=str(six_mb_fs / "spool.db")))
    try:
        held, a_seqs = await _recovered_with_no_room(spool, six_mb_fs)
        await spool.append([_event("b", n) for n in range(5)])
        b = spool.streams["b"]
        assert b.id != held.id and spool.streams["a"] is held
        b_rows = await spool.fetch(b.id, 0, 100)
        assert min(r.seq for r in b_rows) > max(a_seqs)
        await spool.ack(a_seqs)   # the late acks of a's forwarder
        assert [orjson.loads(r.body)["key"] for r in await spool.fetch(b.id, 0, 100)] == ["b"] * 5
        assert spool.depth == 5
    finally:
        await spool.close()


async def test_a_recovery_stopped_before_there_is_room_is_finished_at_the_next_start(
        six_mb_fs: Path) -> None:
    """A corrupt spool is moved aside on a full disk: no room for the fresh spool, nor for
    the marker that names the moved file. The agent is stopped before there is room (a
    restart to clear the 503s, say), then started with room: it found no marker (an empty
    one, removed as stale), created an empty spool, and the moved file's queue was lost
    for good, uncounted and unsaid. The marker is kept where a full disk still has room
    for it (a short symbolic link's inode), and the start finishes the salvage."""
    path = six_mb_fs / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        await spool.append([_event("a", n) for n in range(5)])
        fill_up(six_mb_fs / "filler")
        with pytest.raises(sqlite3.Error):
            await spool.recover(sqlite3.DatabaseError("database disk image is malformed"))
    finally:
        await spool.close()
    (six_mb_fs / "filler").unlink()
    again = await Spool.open(StorageConfig(path=str(path)))
    try:
        assert again.depth == 5 and list(again.streams) == ["a"], again.counters
    finally:
        await again.close()


async def _spool_put_while_no_fresh_one_could_be_made(spool: Spool, fs: Path) -> tuple[Any, list[int]]:
    """``_recovered_with_no_room``; then another spool holding key b's queue is put at the
    path (a backup restored)."""
    other = fs / "other" / "spool.db"
    put = await Spool.open(StorageConfig(path=str(other)))
    await put.append([_event("b", n) for n in range(5)])
    await put.close()
    held, a_seqs = await _recovered_with_no_room(spool, fs)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{other}{suffix}").exists():
            Path(f"{other}{suffix}").rename(f"{spool.path}{suffix}")
    return held, a_seqs


def _queues_kept_aside(fs: Path) -> list[tuple[str, int]]:
    """The queues of the files kept aside (not their -wal or -shm)."""
    queues = []
    for kept in fs.glob("spool.db.corrupt-*"):
        if not kept.name.endswith(("-wal", "-shm")):
            with contextlib.closing(sqlite3.connect(kept)) as db:
                queues += db.execute("SELECT key, depth FROM streams").fetchall()
    return sorted(queues)


async def test_a_spool_put_at_the_path_before_a_recovery_finishes_is_not_taken_for_its_own(
        six_mb_fs: Path) -> None:
    """A corrupt spool is moved aside and the fresh one cannot be created (a full disk);
    meanwhile another spool holding a queue is put at the path (a backup restored). The
    recovery, once there is room, took that file for the spool: it ignored its marker, so
    the moved file's queue was neither salvaged nor counted lost, and key a's forwarder
    kept its stream id, which in that file names key b's queue: a's forwarder read b's
    events (sent under a's key) and a's late acks deleted them. The file put there is kept
    aside, and the recovery finishes into a fresh spool."""
    spool = await Spool.open(StorageConfig(path=str(six_mb_fs / "spool.db")))
    try:
        held, a_seqs = await _spool_put_while_no_fresh_one_could_be_made(spool, six_mb_fs)
        assert await spool.reopen()
        assert [orjson.loads(r.body)["key"] for r in await spool.fetch(held.id, 0, 100)] \
            == ["a"] * 5
        await spool.ack(a_seqs)   # a's forwarder's late acks
        assert spool.depth == 0 and "b" not in spool.streams
    finally:
        await spool.close()
    # The corrupt one, and the one put there.
    assert _queues_kept_aside(six_mb_fs) == [("a", 5), ("b", 5)]


async def test_a_spool_put_there_that_cannot_be_kept_aside_refuses_events_as_a_closed_one(
        six_mb_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As above, with room to open the file put there but not to create the fresh spool
    once it is kept aside: that error escaped reopen(), so the commit that asked logged
    "spool commit failed" with a traceback, its app was told the spool is corrupt, and
    nothing said why the spool was closed (open_error). Refused as a spool that cannot
    be opened is, and the recovery finished once there is room."""
    spool = await Spool.open(StorageConfig(path=str(six_mb_fs / "spool.db")))
    try:
        held, _ = await _spool_put_while_no_fresh_one_could_be_made(spool, six_mb_fs)
        filler = six_mb_fs / "filler"
        free = os.statvfs(six_mb_fs).f_bavail * os.statvfs(six_mb_fs).f_frsize
        filler.write_bytes(b"\0" * (free - 64 * 1024))   # room to open a spool, not make one
        caplog.clear()
        with pytest.raises(SpoolFull) as refused:
            await spool.append([_event("c", 0)])
        assert refused.value.reason is Reason.NOT_OPEN
        assert "commit failed" not in caplog.text and "Traceback" not in caplog.text, caplog.text
        assert "cannot keep aside" in caplog.text and spool.open_error, caplog.text
        filler.unlink()
        await spool.append([_event("c", 0)])
        assert [orjson.loads(r.body)["key"] for r in await spool.fetch(held.id, 0, 100)] \
            == ["a"] * 5
        assert spool.depth == 6 and "b" not in spool.streams
    finally:
        await spool.close()
    assert _queues_kept_aside(six_mb_fs) == [("a", 5), ("b", 5)]


async def test_a_salvage_that_fails_once_the_fresh_spool_is_open_is_said_and_tried_again(
        six_mb_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A recovery waits for room to create its fresh spool; once there is, reopen() opens
    it, then the disk fails under the salvage (read-only here, as a file system is made
    after an I/O error). That error escaped _finish_recovery after it had dropped the
    pending salvage: reopen() said nothing, left the fresh spool open with books read
    before the salvage and the forwarders untold, and status showed no error. One clear
    line, open_error, and the salvage finished at the next reopen, key a's forwarder's
    stream and seqs still its own."""
    failed: list[contextlib.ExitStack] = []

    def disk_fails() -> None:   # the salvage has begun: the disk goes read-only under it
        if not failed:
            failed.append(stack := contextlib.ExitStack())
            stack.enter_context(read_only(six_mb_fs))
    spool = await Spool.open(StorageConfig(path=str(six_mb_fs / "spool.db")),
                             on_migrating=disk_fails)
    try:
        held, a_seqs = await _recovered_with_no_room(spool, six_mb_fs)
        caplog.clear()
        try:
            # The salvage committed, then its marker could not be removed: the salvaged
            # queue is safe in the fresh spool, which opens (its commits say the disk's
            # own failures) rather than refuse every event for the marker's sake.
            assert await spool.reopen()
        finally:
            failed[0].close()
        assert not [r for r in caplog.records if r.exc_info], "a traceback"
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(said) == 2 and "salvaged 5 queued events" in said[0] and \
            "Read-only" in said[1] and "marker" in said[1], said
        await spool.append([_event("b", n) for n in range(5)])
        assert spool.open_error is None and spool.streams["a"] is held
        assert [orjson.loads(r.body)["key"] for r in await spool.fetch(held.id, 0, 100)] \
            == ["a"] * 5
        await spool.ack(a_seqs)   # a's forwarder's acks
        assert spool.depth == 5 and held.depth == 0
    finally:
        await spool.close()


async def test_acks_and_dead_letters_are_not_reported_saved_while_the_spool_cannot_be_opened(
        six_mb_fs: Path) -> None:
    """While the spool cannot be opened (a recovery could not create the fresh file on a
    full disk), an upstream's acks and dead letters are not recorded: the forwarder must
    hear so (it backs off and sends them again), not that they were saved."""
    def event(n: int) -> Event:
        return Event("a", NUCLEUS, dedupe_key("a", n), orjson.dumps({"id": n}))

    spool = await Spool.open(StorageConfig(path=str(six_mb_fs / "spool.db")))
    try:
        await spool.append([event(n) for n in range(5)])
        seqs = [r.seq for r in await spool.fetch(spool.streams["a"].id, 0, 100)]
        filler = six_mb_fs / "filler"
        free = os.statvfs(six_mb_fs).f_bavail * os.statvfs(six_mb_fs).f_frsize
        filler.write_bytes(b"\0" * free)
        with pytest.raises(sqlite3.Error):
            await spool.recover(sqlite3.DatabaseError("database disk image is malformed"))
        with pytest.raises(SpoolFull) as acked:
            await spool.ack(seqs[:2])
        assert acked.value.reason is Reason.NOT_OPEN
        with pytest.raises(SpoolFull) as dead:
            await spool.dead_letter([(seqs[2], "up", "refused by the upstream")])
        assert dead.value.reason is Reason.NOT_OPEN
        filler.unlink()
        await spool.ack(seqs[:2])   # sent again once the spool opens: recorded now
        assert spool.depth == 3
    finally:
        await spool.close()


async def test_a_start_with_little_room_opens_the_spool_as_before_it_forgot_idle_keys(
        small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A start forgets the keys with nothing queued, a write. With too
    little room for it (yet enough to read), the spool stayed closed, refusing every event
    and serving none of its queue, where it used to open. Freed a page at a time, the
    spool must open as soon as it can be read, forgetting nothing then (said at WARNING);
    a later start forgets the key."""
    path = small_fs / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    await spool.append([Event("idle", NUCLEUS, 1, b'{"id":1}')])
    await spool.ack([r.seq for r in await spool.fetch(spool.streams["idle"].id, 0, 10)])
    await spool.append([Event("app1", NUCLEUS, 100 + i, b'{"id":%d,"pad":"%s"}' %
                              (i, os.urandom(200).hex().encode())) for i in range(300)])
    await spool.close()
    filler = small_fs / "filler"
    fill_up(filler)
    for _ in range(64):
        os.truncate(filler, filler.stat().st_size - 4096)
        caplog.clear()
        spool = await Spool.open(StorageConfig(path=str(path)))
        opened, streams, depth = spool.reader is not None, sorted(spool.streams), spool.depth
        await spool.close()
        if opened:
            break
    assert opened and depth == 300
    assert streams == ["app1", "idle"], streams
    assert "could not forget the keys with nothing queued" in caplog.text, caplog.text
    filler.unlink()
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        assert sorted(spool.streams) == ["app1"] and spool.depth == 300
    finally:
        await spool.close()


@contextlib.contextmanager
def read_only(where: Path) -> Iterator[None]:
    """``where`` read-only to this process, as a directory of another user's is to the
    agent's (root is refused nothing for its permissions): a read-only bind mount over
    it, or a skip where this process may not mount."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount(8) for a read-only bind mount")
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(where), str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


async def test_dead_reasons_that_cannot_be_read_are_shown_as_stale(
        make_agent: Any, tmp_path: Path) -> None:
    """A letter is dead-lettered, then the spool's directory is removed under the agent
    and cannot be made again: /status gave the reasons read before it, without the new
    letter's, and nothing said they were not current (dead_letters counted it). It says
    why they could not be read, until they are read again."""
    base = tmp_path / "base"
    state = base / "state"
    agent = await make_agent(spool=state / "spool.db")
    url = f"http://127.0.0.1:{agent.port}/status"
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(2)])).status == 200
        first, second = await agent.spool.fetch(agent.spool.streams["app1"].id, 0, 10)
        await agent.spool.dead_letter([(first.seq, "up", "HTTP 400: first")])
        async with s.get(url) as r:
            shown = await r.json()
        assert [g["reason"] for g in shown["dead_reasons"]] == ["HTTP 400: first"], shown
        assert shown["dead_reasons_error"] is None
        await agent.spool.dead_letter([(second.seq, "up", "HTTP 400: second")])
        await asyncio.to_thread(shutil.rmtree, state)
        with read_only(base):
            assert (await post(s, agent.port, [event(100, pad="")])).status == 503
            async with s.get(url) as r:
                shown = await r.json()
            # The last reasons read, without the second letter's: said to be so.
            assert shown["dead_letters"] == 2 and len(shown["dead_reasons"]) == 1, shown
            assert shown.get("dead_reasons_error"), shown
            assert "as last read (cannot read them now: " in render(shown), render(shown)
        assert (await post(s, agent.port, [event(101, pad="")])).status == 200
        async with s.get(url) as r:
            shown = await r.json()
        assert shown["dead_reasons"] == [] and shown["dead_reasons_error"] is None, shown


async def test_a_spool_directory_that_cannot_be_made_again_is_one_clear_line(
        make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The spool's directory removed under the agent (rm -rf), and its parent no longer
    writable to it (another user's, read-only): the recovery failed with the writer's
    traceback, the app's commit a 503 "corrupt"; and once the directory could be made,
    an empty spool opened, the queue of the removed file gone uncounted with every count
    before it. One error line says what, why and what to do, status says it, and the
    loss is counted (dropped_corrupt) once a spool can be created."""
    base = tmp_path / "base"
    state = base / "state"
    agent = await make_agent(spool=state / "spool.db")
    url = f"http://127.0.0.1:{agent.port}/status"
    async with aiohttp.ClientSession() as s:
        assert (await post(s, agent.port, [event(i, pad="") for i in range(5)])).status == 200
        await asyncio.to_thread(shutil.rmtree, state)
        with read_only(base):
            caplog.clear()
            # Committed into the removed file, whose queue cannot be kept: sent again.
            assert (await post(s, agent.port, [event(100, pad="")])).status == 503
            assert (await post(s, agent.port, [event(101, pad="")])).status == 503
            async with s.get(url) as r:
                assert str(state) in (await r.json())["spool"]["open_error"]
        assert not [r for r in caplog.records if r.exc_info], "a traceback"
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(said) == 1 and str(state) in said[0] and "make it" in said[0], said
        assert (await post(s, agent.port, [event(100, pad="")])).status == 200
    assert agent.spool.depth == 1
    assert agent.spool.counters.get("dropped_corrupt") == 6, agent.spool.counters
    assert agent.spool.counters.get("ingested") == 7, agent.spool.counters


def _chattr(flag: str, path: Path) -> None:
    """``chattr flag path``: +i makes a file not to be removed or renamed, a directory not
    to have names added, removed or renamed in it, even by root: as a directory of another
    user's is to the agent's."""
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture
def immutable_fs(six_mb_fs: Path) -> Iterator[Path]:
    """``six_mb_fs``, where chattr +i takes (Linux 6.0 on for tmpfs), or a skip; every
    file and directory in it made mutable again at the end (or umount fails)."""
    probe = six_mb_fs / "probe"
    probe.touch()
    try:
        _chattr("+i", probe)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr +i does not take here")
    _chattr("-i", probe)
    probe.unlink()
    try:
        yield six_mb_fs
    finally:
        for found in [six_mb_fs, *six_mb_fs.rglob("*")]:
            if not found.is_symlink():
                subprocess.run(["chattr", "-i", str(found)], capture_output=True)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_salvage_whose_marker_cannot_be_removed_opens_and_is_not_done_twice(
        immutable_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A recovery's salvage commits, but its marker cannot be removed (here immutable;
    a directory the agent's user may no longer write to alike), while the fresh spool
    itself opens: the spool stayed closed, every app answered 503 although the salvaged
    queue was safe, and the salvage was tried again at every reopen. It opens, says the
    marker once, and the next start, finding the marker, does not salvage again, and says
    so in one line (not also that the salvage was "finished now": the marker stays)."""
    path = immutable_fs / "spool.db"

    def marker_stuck() -> None:   # the salvage has begun: its marker is written
        _chattr("+i", path.with_name("spool.db.salvaging"))
    spool = await Spool.open(StorageConfig(path=str(path)), on_migrating=marker_stuck)
    try:
        await spool.append([_event("a", n) for n in range(5)])
        caplog.clear()
        await spool.recover(sqlite3.DatabaseError("database disk image is malformed"))
        assert spool.open_error is None and spool.depth == 5
        await spool.append([_event("b", 0)])
        failed = [s for s in _errors(caplog) if "Operation not permitted" in s]
        assert len(failed) == 1 and "marker" in failed[0], _errors(caplog)
    finally:
        await spool.close()
    caplog.clear()
    again = await Spool.open(StorageConfig(path=str(path)))
    try:
        assert again.open_error is None and again.depth == 6, again.counters
        assert again.counters.get("spool_corrupt") == 1, again.counters
    finally:
        await again.close()
    # One line, and only what is true: the marker is still there, nothing "finished now".
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "cannot be removed" in said[0], said


def _left_by_a_stop_in_a_salvage(path: Path) -> None:
    """The files a stop inside a salvage leaves, its fresh spool since damaged: the file
    moved aside (key app1's 100 events) and the marker naming it."""
    moved = path.with_name("spool.db.corrupt-20260101T000000")
    make_spool(moved, 100)
    path.with_name("spool.db.salvaging").write_text(f"{moved.name}\n")
    garbage(path)


@pytest.mark.parametrize("left", [garbage, _left_by_a_stop_in_a_salvage],
                         ids=["damaged", "fresh-spool-damaged"])
async def test_a_damaged_spool_that_cannot_be_moved_aside_is_said_once(
        immutable_fs: Path, caplog: pytest.LogCaptureFixture,
        left: Callable[[Path], None]) -> None:
    """A damaged spool found at start, in a directory where nothing can be renamed
    (immutable here; one the agent's user may no longer write to alike): the rename that
    moves it aside fails. Said as "cannot be opened" for the spool, and not at all for
    the fresh spool of an unfinished salvage (recoveries say their own failures), and
    at each try again (every 5 s, and at each request) the failed marker's line, or
    nothing. One line says the move failed and why, once; open_error says it."""
    path = immutable_fs / "spool.db"
    await asyncio.to_thread(left, path)
    _chattr("+i", immutable_fs)
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        for _ in range(2):
            assert not await spool.reopen()
            assert spool.open_error and "Operation not permitted" in spool.open_error, \
                spool.open_error
        said = _errors(caplog)
        assert len(said) == 1 and "cannot be moved aside" in said[0] and \
            "Operation not permitted" in said[0], said
        _chattr("-i", immutable_fs)
        assert await spool.reopen()
        assert spool.open_error is None
        assert spool.depth == (0 if left is garbage else 100)
    finally:
        await spool.close()


@pytest.mark.parametrize("room", [True, False], ids=["copied", "no-room-for-the-copy"])
async def test_what_a_salvage_lost_is_said_once_when_its_marker_cannot_be_removed(
        immutable_fs: Path, caplog: pytest.LogCaptureFixture, room: bool) -> None:
    """A recovery's salvage commits (the queue copied, or, with no room for the copy, its
    loss counted), then its marker cannot be removed: the line saying what was salvaged
    and what lost (dropped_corrupt) came after that removal, and the try again found
    the salvage committed and said only that it was finished now. Said once."""
    path = immutable_fs / "spool.db"

    def marker_stuck() -> None:   # the salvage has begun: its marker is written
        _chattr("+i", path.with_name("spool.db.salvaging"))
    spool = await Spool.open(StorageConfig(path=str(path)), on_migrating=marker_stuck)
    try:
        for b in range(8):   # ~1.2 MB: hex of random bytes packs to about half
            await spool.append([Event("a", NUCLEUS, dedupe_key("a", n), orjson.dumps(
                {"id": n, "pad": os.urandom(750).hex()})) for n in range(b * 100, b * 100 + 100)])
        if not room:   # for the fresh spool, not the copy
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            fill_up(immutable_fs / "filler")
            os.truncate(immutable_fs / "filler",
                        (immutable_fs / "filler").stat().st_size - 512 * 1024)
        caplog.clear()
        await spool.recover(sqlite3.DatabaseError("database disk image is malformed"))
        assert spool.open_error is None
        told = [s for s in _errors(caplog) if "dropped_corrupt" in s]
        assert len(told) == 1, _errors(caplog)
        assert spool.depth == (800 if room else 0)
        assert spool.counters.get("dropped_corrupt", 0) == (0 if room else 800)
    finally:
        await spool.close()


async def _replace_unclearably(spool: Spool, fs: Path, stuck: str) -> None:
    """Key a's 5 events queued in ``spool`` (at ``fs``/spool.db), then the file replaced
    by a backup holding key b's 3, and ``stuck`` (its -wal, or the file itself) made
    immutable: the path cannot be cleared for a fresh spool."""
    path = fs / "spool.db"
    await spool.append([_event("a", n) for n in range(5)])
    other = fs / "other" / "spool.db"
    put = await Spool.open(StorageConfig(path=str(other)))
    await put.append([_event("b", n) for n in range(3)])
    await put.close()
    other.rename(path)   # a backup restored over the agent's file
    _chattr("+i", Path(f"{path}{stuck}"))


@pytest.mark.parametrize("stuck", ["-wal", ""], ids=["old-wal", "file-put-there"])
async def test_a_replaced_spool_whose_path_cannot_be_cleared_is_said_and_its_queue_kept(
        immutable_fs: Path, caplog: pytest.LogCaptureFixture, stuck: str) -> None:
    """spool.db is replaced under the agent (a backup put there), and the path cannot be
    cleared for the fresh spool: the old file's -wal cannot be removed, or the file put
    there cannot be moved aside (immutable here; a directory the agent's user may no
    longer write to alike). That failure escaped the recovery unsaid: no log line, no
    open_error, and no salvage kept for the copy of the agent's queue, so the next reopen
    took the file at the path for the spool and the queue was lost uncounted. One line,
    open_error, and once the path can be cleared the queue is salvaged."""
    path = immutable_fs / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        await _replace_unclearably(spool, immutable_fs, stuck)
        caplog.clear()
        with pytest.raises(SpoolFull):
            await spool.append([_event("a", 5)])
        assert not await spool.reopen()
        said = _errors(caplog)
        assert len(said) == 1 and "Operation not permitted" in said[0], said
        assert spool.open_error and "Operation not permitted" in spool.open_error
        _chattr("-i", Path(f"{path}{stuck}"))
        assert await spool.reopen()
        assert spool.open_error is None
        assert sorted(spool.streams) == ["a"] and spool.depth == 6, spool.counters
    finally:
        await spool.close()
    assert ("b", 3) in _queues_kept_aside(immutable_fs)



def test_a_recovery_that_cannot_move_the_damaged_file_aside_lets_the_loop_go(
        immutable_fs: Path) -> None:
    """A damaged spool that cannot be moved aside (its directory immutable here; one the
    agent's user may no longer write to alike). The failed recovery woke the writer to try
    again (reopen_soon) from inside the writer's own try, so it tried again at once, not
    every 5 s; and a try that fails before any file is opened never lets the event loop
    go: the agent answered nothing, not even 503. Run on a loop of its own, bounded."""
    path = immutable_fs / "spool.db"
    garbage(path)
    _chattr("+i", immutable_fs)
    went: list[bool] = []

    async def scenario() -> None:
        spool = await Spool.open(StorageConfig(path=str(path)))
        await asyncio.sleep(0.05)   # the writer's try again, with the loop let go
        went.append(spool.open_error is not None)
        await spool.close()
    runner = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    runner.start()
    runner.join(10)
    assert went == [True], "the event loop never got to run again"


@pytest.mark.parametrize("stuck", ["-wal", ""], ids=["old-wal", "file-put-there"])
async def test_a_replaced_spool_whose_path_cannot_be_cleared_is_salvaged_after_a_stop(
        immutable_fs: Path, stuck: str) -> None:
    """As above, but the agent is stopped (or killed) while the path still cannot be
    cleared: the copy of its queue had no salvage marker yet, so the next start took the
    file put there for the spool, and the agent's queue was lost, not even counted. The
    marker is written with the copy; the next start clears the path (tried again every
    5 s while it cannot) and salvages it."""
    path = immutable_fs / "spool.db"
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        await _replace_unclearably(spool, immutable_fs, stuck)
        with pytest.raises(SpoolFull):
            await spool.append([_event("a", 5)])
    finally:
        await spool.close()
    again = await Spool.open(StorageConfig(path=str(path)))   # still not to be cleared
    try:
        assert again.open_error and "Operation not permitted" in again.open_error
        _chattr("-i", Path(f"{path}{stuck}"))
        assert await again.reopen()
        assert sorted(again.streams) == ["a"] and again.depth == 6, again.counters
    finally:
        await again.close()
    assert ("b", 3) in _queues_kept_aside(immutable_fs)
