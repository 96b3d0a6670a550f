"""A spool written by an older agent is migrated on first start with nothing lost; a spool
written by a newer agent is refused and left byte-identical.

The v0 file, tests/data/spool-v0.db, was written by the pre-issue-11 code
(tests/data/make_v0.py): 60 events over a Nucleus key and a Segment key, 5 resends,
20 acked (tombstones), 2 dead letters (tombstones too), counters and clock marks.
"""

from __future__ import annotations

import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import CLOCK
from agent.families.event import NUCLEUS, SEGMENT, Event, dedupe_key
from agent.families.lanes import NORMAL
from agent.settings import StorageConfig
from agent.spool import Spool
from agent.spool.db import PAST
from agent.spool.migrate import SpoolTooNew, upgrade
from agent.spool.records import RECORD_EVENTS
from agent.spool.schema import SCHEMA, VERSION
from tests.conftest import AgentProcess, free_port, write_config
from tests.spool_files import DATA, Stored, build_v0, connect, copy_of, covering, keys_of, read_v1

FIXTURE = DATA / "spool-v0.db"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def v0(tmp_path: Path) -> Path:
    return copy_of(FIXTURE, tmp_path)


def read_v0(path: Path) -> tuple[list[tuple[Stored, int | None]], list[tuple[int, int]]]:
    with connect(path) as db:
        rows = db.execute("SELECT seq, stream, family, received, dkey, body, acked "
                          "FROM events ORDER BY seq").fetchall()
        marks = db.execute("SELECT observed, next_seq FROM clock_marks").fetchall()
    return [(Stored(*r[:6]), r[6]) for r in rows], marks


def table(path: Path, sql: str) -> list[tuple[object, ...]]:
    with connect(path) as db:
        return db.execute(sql).fetchall()


def upgrade_file(path: Path) -> None:
    with connect(path) as db:
        upgrade(db)


@pytest.mark.parametrize("journal", ["delete", "wal"])  # a running agent's spool is in WAL
def test_the_v0_fixture_is_migrated_with_nothing_lost(v0: Path, journal: str) -> None:
    with connect(v0) as db:
        db.execute(f"PRAGMA journal_mode = {journal}")
    events, marks = read_v0(v0)
    dead = table(v0, "SELECT * FROM dead ORDER BY seq")
    counters = table(v0, "SELECT * FROM counters ORDER BY name")
    streams = table(v0, "SELECT id, key FROM streams ORDER BY id")
    queued = [e for e, acked in events if acked is None]
    assert (len(events), len(queued), len(dead)) == (60, 38, 2)  # as make_v0.py made it

    upgrade_file(v0)

    assert table(v0, "PRAGMA user_version") == [(VERSION,)]
    assert table(v0, "PRAGMA auto_vacuum") == [(2,)]  # INCREMENTAL: took effect (VACUUM)
    assert table(v0, "PRAGMA integrity_check") == [("ok",)]
    assert not table(v0, "SELECT name FROM sqlite_master WHERE name LIKE '%events%' "
                         "OR name LIKE 'v0_%'")
    got = read_v1(v0)
    for sid, family in ((1, NUCLEUS), (2, SEGMENT)):   # each key's queue, in order
        mine = [e for e in queued if e.stream == sid]
        assert [(e.body, e.dkey, e.family, e.received) for e in got[sid]] == \
            [(e.body, e.dkey, e.family, e.received) for e in mine]
        assert {e.family for e in got[sid]} == {family}
    new_seqs = [e.seq for es in got.values() for e in es]
    assert min(new_seqs) > max(e.seq for e, _ in events) and len(set(new_seqs)) == 38
    # When they were dead-lettered by the agent's clock is not known (None): their
    # events' age alone says when they expire, as before.
    assert table(v0, "SELECT * FROM dead ORDER BY seq") == [(*d, NORMAL, None) for d in dead]
    assert table(v0, "SELECT * FROM counters ORDER BY name") == counters
    assert table(v0, "SELECT id, key, depth, bytes FROM streams ORDER BY id") == [
        (sid, key, len(got[sid]), sum(len(e.body) for e in got[sid])) for sid, key in streams]
    assert table(v0, "SELECT id, key, depth, bytes FROM streams") == [
        (1, "app-nucleus", 19, 2261), (2, "seg-key", 19, 3211)]   # as v0 counted them
    # Each event is received by the same agent-observed time as before.
    new_marks = table(v0, "SELECT observed, next_seq FROM clock_marks")
    by_key = {e.dkey: e.seq for es in got.values() for e in es}
    for e in queued:
        assert covering(new_marks, by_key[e.dkey]) == covering(marks, e.seq) == 10


def test_resends_and_delivered_keys_still_dedupe(v0: Path) -> None:
    """The 5 resent events and the 20 delivered ones (with the 2 dead letters: 22
    tombstones) keep their keys, in ``spent``, dated by their ack and their clock mark."""
    events, _ = read_v0(v0)
    upgrade_file(v0)
    spent = table(v0, "SELECT id, received, observed, dkeys FROM spent")
    spent_keys = [k for *_, blob in spent for k in keys_of(blob)]
    assert sorted(spent_keys) == sorted(e.dkey for e, acked in events if acked is not None)
    assert len(spent_keys) == 22
    resent = {dedupe_key("nucleus", "app-nucleus", i) for i in range(5)}
    delivered = resent | {dedupe_key("nucleus", "app-nucleus", i) for i in range(10)} | \
        {dedupe_key("segment", "seg-key", f"m-{i}") for i in range(10)}
    assert len(delivered) == 20 and delivered < set(spent_keys)
    acked_at = {e.dkey: acked for e, acked in events}
    for sid, received, observed, blob in spent:
        assert observed == 10               # the mark that covers seqs 1..60
        assert {acked_at[k] for k in keys_of(blob)} == {received}
    queued_keys = {k for (blob,) in table(v0, "SELECT dkeys FROM records")
                   for k in keys_of(blob)}
    assert queued_keys | set(spent_keys) == {e.dkey for e, _ in events}   # all 60


@pytest.mark.parametrize("fault", ["disk full", "refused at the last step"])
def test_a_failure_mid_migration_leaves_the_v0_file_as_it_was(v0: Path, fault: str) -> None:
    before = v0.read_bytes()
    with connect(v0) as db:
        if fault == "disk full":   # no page past the file's own: the first new table fails
            db.execute(f"PRAGMA max_page_count = {len(before) // 4096}")
        else:                      # everything copied, then dropping the v0 tables fails
            db.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY
                              if action == sqlite3.SQLITE_DROP_TABLE else sqlite3.SQLITE_OK)
        with pytest.raises(sqlite3.DatabaseError):
            upgrade(db)
    assert v0.read_bytes() == before
    assert not list(v0.parent.glob("spool.db-*")), "a journal was left behind"
    upgrade_file(v0)                           # and the next start migrates it
    assert table(v0, "PRAGMA user_version") == [(VERSION,)]


# Run in a child: migrate, but stop inside the transaction at its last step (dropping
# the v0 tables: everything copied, the journal at its largest), say so, and wait to die.
_KILLED_CHILD = """
import sqlite3, sys, time
from agent.spool.migrate import upgrade
def hold(action, *_):
    if action == sqlite3.SQLITE_DROP_TABLE:
        print("copied", flush=True)
        time.sleep(60)
    return sqlite3.SQLITE_OK
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.set_authorizer(hold)
upgrade(db)
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_kill_mid_migration_leaves_the_v0_file_as_it_was(v0: Path, journal: str) -> None:
    with connect(v0) as db:
        db.execute(f"PRAGMA journal_mode = {journal}")
        before = list(db.iterdump())
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(v0)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "copied\n"
    finally:
        child.kill()
        child.wait(timeout=10)
    assert list(v0.parent.glob("spool.db-*")), "no journal: the kill came too late"
    with connect(v0) as db:                    # the next open rolls the journal back
        assert list(db.iterdump()) == before
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
    upgrade_file(v0)
    assert len([e for es in read_v1(v0).values() for e in es]) == 38


def newer(path: Path) -> bytes:
    with connect(path) as db:
        db.execute("CREATE TABLE future(x)")
        db.execute("INSERT INTO future VALUES ('kept')")
        db.execute(f"PRAGMA user_version = {VERSION + 1}")
    return path.read_bytes()


def test_a_newer_spool_is_refused_and_left_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    before = newer(path)
    with connect(path) as db, pytest.raises(SpoolTooNew) as refused:
        upgrade(db)
    assert (refused.value.found, refused.value.supported) == (VERSION + 1, VERSION)
    assert str(path) in str(refused.value) and f"v{VERSION + 1}" in str(refused.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["spool.db"]


def test_an_empty_file_and_a_current_one_are_left_alone(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    upgrade_file(empty)
    assert table(empty, "SELECT * FROM sqlite_master") == []
    assert table(empty, "PRAGMA user_version") == [(0,)]
    current = tmp_path / "current.db"
    with connect(current) as db:
        db.executescript(SCHEMA)
    before = current.read_bytes()
    upgrade_file(current)
    assert current.read_bytes() == before


def test_a_long_queue_is_packed_in_records_of_at_most_the_cap(tmp_path: Path) -> None:
    """One group commit's run is split at RECORD_EVENTS; runs with another receipt time or
    family start a new record; each key's order is kept across all of them."""
    path = tmp_path / "spool.db"
    events = [(Stored(seq, 1 + seq % 2, NUCLEUS if seq < 2200 else SEGMENT,
                      1000 if seq < 2600 else 2000, seq * 7919, b"e%d" % seq), None)
              for seq in range(1, 3001)]
    build_v0(path, events, marks=[(5, 3001)], streams=[(1, "a"), (2, "b")])
    upgrade_file(path)
    got = read_v1(path)
    for sid in (1, 2):
        assert [e.body for e in got[sid]] == [e.body for e, _ in events if e.stream == sid]
        assert [(e.family, e.received) for e in got[sid]] == \
            [(e.family, e.received) for e, _ in events if e.stream == sid]
    sizes = table(path, "SELECT stream, n FROM records ORDER BY id")
    assert max(n for _, n in sizes) == RECORD_EVENTS
    assert sorted(n for _, n in sizes) == sorted([1000, 99, 200, 201,      # key a: even seqs
                                                  1000, 100, 200, 200])   # key b


# -- any v0 spool --------------------------------------------------------------------------

@st.composite
def v0_spools(draw: st.DrawFn) -> tuple[list[tuple[Stored, int | None]], list[tuple[int, int]],
                                        list[tuple[Stored, str, str, int]]]:
    """Events over 3 keys and both families, some acked, some dead-lettered, with clock
    marks at random seqs (some past the last event: the agent stopped after a mark)."""
    n = draw(st.integers(0, 80))
    events: list[tuple[Stored, int | None]] = []
    dead = []
    received = 1_000
    for seq in range(1, n + 1):
        received += draw(st.sampled_from([0, 0, 0, 5]))
        e = Stored(seq, draw(st.integers(1, 3)), draw(st.sampled_from([NUCLEUS, SEGMENT])),
                   received, dedupe_key(seq), b'{"i":%d}' % seq)
        fate = draw(st.sampled_from(["queued", "queued", "acked", "dead"]))
        events.append((e, None if fate == "queued" else received + draw(st.integers(1, 3))))
        if fate == "dead":
            dead.append((e, "up", "HTTP 400", received + 9))
    cuts = sorted(draw(st.sets(st.integers(1, n + 3), max_size=5)))
    marks = [(PAST, cuts[0])] if cuts and draw(st.booleans()) else []
    marks += [(100 * (i + 1), cut) for i, cut in enumerate(cuts[len(marks):])]
    return events, marks, dead


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spool=v0_spools())
def test_any_v0_spool_keeps_every_event_its_order_and_its_receipt_time(
        spool: tuple[list[tuple[Stored, int | None]], list[tuple[int, int]],
                     list[tuple[Stored, str, str, int]]],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    events, marks, dead = spool
    path = tmp_path_factory.mktemp("v0") / "spool.db"
    build_v0(path, events, marks, streams=[(1, "a"), (2, "b"), (3, "c")], dead=dead,
             counters=[("ingested", len(events))])
    upgrade_file(path)
    got = read_v1(path)
    new_marks = table(path, "SELECT observed, next_seq FROM clock_marks")
    latest = max((o for o, _ in marks), default=None)
    by_key = {e.dkey: e for es in got.values() for e in es}
    for sid in (1, 2, 3):
        assert [(e.dkey, e.family, e.received, e.body) for e in got.get(sid, [])] == \
            [(e.dkey, e.family, e.received, e.body) for e, a in events
             if e.stream == sid and a is None]
    for e, acked in events:
        if acked is None:  # received by the same agent-observed time: past the last mark,
            old = covering(marks, e.seq)  # by the last; with no marks, by the wall clock alone
            assert covering(new_marks, by_key[e.dkey].seq) == (old or latest or PAST)
    acked_at = {e.dkey: (a, covering(marks, e.seq) or latest or PAST) for e, a in events}
    spent = table(path, "SELECT received, observed, dkeys FROM spent")
    assert sorted(k for *_, b in spent for k in keys_of(b)) == \
        sorted(e.dkey for e, a in events if a is not None)
    for received, observed, blob in spent:
        assert {acked_at[k] for k in keys_of(blob)} == {(received, observed)}
    records = table(path, "SELECT id, n FROM records")
    for rid, n in records:    # no record straddles a mark
        assert len({covering(new_marks, s) for s in range(rid, rid + n)}) == 1
    dead_seqs = {e.seq for e, *_ in dead}
    assert table(path, "SELECT seq FROM dead ORDER BY seq") == [(s,) for s in sorted(dead_seqs)]
    assert not dead_seqs & set(s.seq for s in by_key.values())


# -- through the agent ---------------------------------------------------------------------

def test_outpost_run_on_a_newer_spool_exits_2_with_one_line(tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    before = newer(spool)
    cfg = write_config(tmp_path / "agent.toml", spool)
    run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=15)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert str(spool) in lines[0] and f"v{VERSION + 1}" in lines[0] and f"v{VERSION}" in lines[0]
    assert spool.read_bytes() == before


@pytest.mark.parametrize("command", [["status"], ["dead", "list"], ["dead", "show", "1"],
                                     ["dead", "export", "{tmp}/out.jsonl"],
                                     ["dead", "purge", "--all"]])
def test_offline_commands_on_a_newer_spool_say_so_in_one_line(tmp_path: Path,
                                                               command: list[str]) -> None:
    """No agent runs; the commands that read or change the spool file itself. Before the
    fix the reads said "no such table" (of the newer layout), and the writes told the
    operator to start the agent, which refuses such a spool."""
    spool = tmp_path / "spool.db"
    before = newer(spool)
    cfg = write_config(tmp_path / "agent.toml", spool, port=free_port())
    command = [c.format(tmp=tmp_path) for c in command]
    run = subprocess.run([sys.executable, "-m", "agent", *command, "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=15)
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "Traceback" not in out, out
    (line,) = out.strip().splitlines()
    assert f"v{VERSION + 1}, newer than this agent reads (v{VERSION})" in line, line
    assert "start the agent" not in line
    assert spool.read_bytes() == before


def newer_with_hot_wal(spool: Path) -> dict[str, bytes]:
    """A spool a newer agent wrote in WAL mode and left, killed, with its last commits
    (the newer user_version among them) still in the -wal file; its files' bytes."""
    made = spool.parent / "made"
    made.mkdir()
    db = sqlite3.connect(made / spool.name, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("CREATE TABLE future(x)")
        db.execute("INSERT INTO future VALUES ('kept')")
        db.execute(f"PRAGMA user_version = {VERSION + 1}")
        for suffix in ("", "-wal", "-shm"):   # copied while open: no checkpoint at close
            shutil.copy(made / (spool.name + suffix), str(spool) + suffix)
    finally:
        db.close()
    return {suffix: Path(str(spool) + suffix).read_bytes() for suffix in ("", "-wal")}


@pytest.mark.parametrize(("command", "code"), [(["run"], 2), (["status"], 1),
                                               (["dead", "list"], 1),
                                               (["dead", "purge", "--all"], 1)])
def test_a_newer_spool_with_a_hot_wal_is_left_untouched(tmp_path: Path, command: list[str],
                                                       code: int) -> None:
    """Review: the agent and the offline purge/retry opened such a spool read-write and
    read its version only then; closing that connection checkpointed the newer agent's
    WAL into the file (its content kept, but not "left untouched", as they said)."""
    spool = tmp_path / "spool.db"
    before = newer_with_hot_wal(spool)
    cfg = write_config(tmp_path / "agent.toml", spool, port=free_port())
    run = subprocess.run([sys.executable, "-m", "agent", *command, "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=15)
    out = run.stdout + run.stderr
    assert run.returncode == code and f"v{VERSION + 1}" in out, out
    assert {suffix: Path(str(spool) + suffix).read_bytes() for suffix in before} == before


async def test_a_migrated_spool_delivers_everything_once_and_still_dedupes(v0: Path) -> None:
    """The real spool opens the v0 file: every queued event is fetched in order, with its
    receipt time; once all are acked, a resend of any of the 60 is a counted duplicate."""
    events, _ = read_v0(v0)
    queued = {sid: [e for e, acked in events if acked is None and e.stream == sid]
              for sid in (1, 2)}
    assert events[29][1] is None       # delivered only after the migration
    spool = await Spool.open(StorageConfig(path=str(v0)))
    try:
        assert spool.depth == 38 and spool.dead_count == 2
        assert spool.counters["duplicates"] == 5
        for key, sid in (("app-nucleus", 1), ("seg-key", 2)):
            assert spool.streams[key].id == sid
            rows = await spool.fetch(sid, 0, 100)
            assert [(r.body, r.family, r.received) for r in rows] == \
                [(e.body, e.family, e.received) for e in queued[sid]]
            await spool.ack([r.seq for r in rows])
        assert spool.depth == 0
        await spool.close()            # the dedupe index is rebuilt from the file
        spool = await Spool.open(StorageConfig(path=str(v0)))
        # Resends: delivered before the migration, dead-lettered, delivered after it.
        for i in (0, 10, 29):
            assert await spool.append([Event("app-nucleus", NUCLEUS, events[i][0].dkey,
                                             events[i][0].body)]) == 0
        assert spool.counters["duplicates"] == 8
        assert await spool.append([Event("app-nucleus", NUCLEUS, dedupe_key("new"), b"{}")]) == 1
    finally:
        await spool.close()


async def test_migrated_events_and_keys_expire_when_they_did_before(tmp_path: Path) -> None:
    """Expiry after the migration goes by each event's own clock mark, as before it.
    Both groups were received 40 days ago by the wall clock; by the agent's own count,
    group A 21 days ago, group B one day ago. With max_age_days = 30, A expires once 9
    more days pass, B 20 days later: mapping every record to the latest mark would keep
    A 20 days too long. A key delivered 2 days ago by the wall clock, but just before
    the agent stopped by its own count, stays known until 24 h have passed by both."""
    path, day, hour = tmp_path / "spool.db", 86_400_000, 3_600_000
    wall = CLOCK.wall_ms() - 40 * day
    observed = 100 * day
    events = [(Stored(seq, 1 + seq % 2, NUCLEUS, wall, seq, b'{"id":%d}' % seq), None)
              for seq in range(1, 41)]
    events += [(Stored(41, 1, NUCLEUS, wall, 41, b'{"id":41}'), CLOCK.wall_ms() - 2 * day)]
    build_v0(path, events, marks=[(observed - 21 * day, 21), (observed - day, 41),
                                  (observed, 42)], streams=[(1, "a"), (2, "b")])
    resend = [Event("a", NUCLEUS, 41, b'{"id":41}')]

    async def after(passed: int) -> int:
        CLOCK.passed_ms = passed
        return await spool.prune()
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        assert spool.depth == 40
        assert await after(23 * hour) == 0
        assert await spool.append(resend) == 0      # the wall clock alone says forget
        assert await after(25 * hour) == 0
        assert await spool.append(resend) == 1      # now both do
        assert await after(9 * day - 60_000) == 0
        assert await after(9 * day + 60_000) == 20  # group A: seqs 1..20
        left = [r.body for sid in (1, 2) for r in await spool.fetch(sid, 0, 100)]
        assert sorted(left) == sorted([b'{"id":%d}' % s for s in range(21, 42)])
        assert await after(29 * day - 60_000) == 0
        assert await after(29 * day + 60_000) == 20  # group B
    finally:
        await spool.close()
        CLOCK.passed_ms = 0


@pytest.mark.skipif(sys.platform == "win32", reason="no AF_UNIX datagrams")
def test_a_migration_at_start_extends_the_systemd_start_timeout(
        v0: Path, notify_socket: tuple[socket.socket, str],
        agent_process: Callable[..., AgentProcess]) -> None:
    """Under Type=notify a long migration (8.6 s per million v0 events) must not outrun
    systemd's start timeout (90 s): the agent asks for more time while it migrates."""
    sock, path = notify_socket
    port = free_port()
    cfg = write_config(v0.parent / "agent.toml", v0, port=port)
    agent_process(cfg, port, env={"NOTIFY_SOCKET": path}).start()
    seen: list[str] = []
    while not seen or not seen[-1].startswith("READY=1"):
        seen.append(sock.recv(4096).decode())
    extends = [m for m in seen[:-1] if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends, f"no EXTEND_TIMEOUT_USEC before READY=1: {seen}"
    assert all(int(m.split("=", 1)[1]) >= 10_000_000 for m in extends), extends
    assert table(v0, "PRAGMA user_version") == [(VERSION,)]


LARGE_EVENTS, LARGE_EVENT_BYTES = 600, 50_000   # one v0 group commit of one key: 30 MB
READ_PEAK = 8 * 1024 * 1024


async def test_a_queue_of_large_events_is_migrated_into_records_a_read_can_hold(
        tmp_path: Path) -> None:
    """The writer packs at most RECORD_BYTES (256 KiB) of events in a record, which bounds
    what one read unpacks. The migration split a v0 run only at RECORD_EVENTS events: 600
    events of 50 KB received together became one 30 MB record, unpacked whole (and kept
    in the reader's cache, eight records of it) to send its first event; past 256 MiB
    the packing raised, and the agent exited at every start. Traced: the first read's
    Python allocations."""
    path = tmp_path / "spool.db"
    events = [(Stored(seq, 1, NUCLEUS, 1000, dedupe_key(seq),
                      b'{"i":%d,"pad":"%s"}' % (seq, random.Random(seq).randbytes(
                          LARGE_EVENT_BYTES // 2).hex().encode())), None)
              for seq in range(1, LARGE_EVENTS + 1)]
    build_v0(path, events, marks=[(5, LARGE_EVENTS + 1)], streams=[(1, "a")])
    del events
    spool = await Spool.open(StorageConfig(path=str(path)))
    try:
        assert spool.depth == LARGE_EVENTS
        tracemalloc.start()
        try:
            rows = await spool.fetch(spool.streams["a"].id, 0, 1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [orjson.loads(r.body)["i"] for r in rows] == [1]
        assert peak < READ_PEAK, f"reading one migrated event took {peak / 1e6:.1f} MB"
    finally:
        await spool.close()


async def test_a_newer_agents_unfinished_salvage_is_refused_and_left_as_it_was(
        make_agent: Callable[..., Any], tmp_path: Path) -> None:
    """A newer agent moved its corrupt spool aside and stopped before its salvage was done
    (the marker names the moved file; no fresh spool yet); then this older agent is
    started. It must refuse, as it refuses a newer spool at the path, and leave the
    newer agent's files as they were for it to finish. It created a fresh spool of its
    own format, read the newer file as its own, counted what it could not read as lost
    and removed the marker: the newer agent, started again, never finished its salvage."""
    moved = tmp_path / "spool.db.corrupt-20260101T000000"
    spool = await Spool.open(StorageConfig(path=str(moved)))
    await spool.append([Event("a", NUCLEUS, i, b'{"id":%d}' % i, i) for i in range(5)])
    await spool.close()
    before = newer(moved)
    (tmp_path / "spool.db.salvaging").write_text(f"{moved.name}\n")
    with pytest.raises(SpoolTooNew) as refused:
        await make_agent()
    assert str(moved) in str(refused.value) and f"v{VERSION + 1}" in str(refused.value)
    assert moved.read_bytes() == before
    assert (tmp_path / "spool.db.salvaging").read_text() == f"{moved.name}\n"
    assert not (tmp_path / "spool.db").exists(), "a fresh spool was made for the salvage"


@pytest.mark.parametrize(("damage", "lost"), [("body = CAST(body AS TEXT)", 1),
                                               ("dkey = 'key'", 0)],
                         ids=["body-text", "dedupe-key-text"])
async def test_a_v0_spool_with_an_event_of_another_type_starts_salvaged(
        v0: Path, damage: str, lost: int, make_agent: Any) -> None:
    """Damage garbled one queued event of a v0 spool into another type (its body into
    text, its dedupe key into text). The migration packed it as it came and raised
    TypeError, rolled back: the agent failed at every start, its whole queue out of
    reach. Now the file is taken for damaged, as a start takes such a value in a
    current spool: moved aside and salvaged, the rest kept; the event whose body is
    garbled lost, counted, the one whose dedupe key is kept without it (salvage.py)."""
    events, _ = read_v0(v0)
    queued = [e for e, acked in events if acked is None and e.stream == 1]
    with connect(v0) as db:
        db.execute(f"UPDATE events SET {damage} WHERE seq = ?", (queued[0].seq,))
        db.commit()
    agent = await make_agent(spool=v0)
    spool = agent.spool
    assert table(v0, "PRAGMA user_version") == [(VERSION,)]
    rows = await spool.fetch(spool.streams["app-nucleus"].id, 0, 100)
    assert [r.body for r in rows] == [e.body for e in queued[lost:]]
    assert spool.counters.get("dropped_corrupt", 0) == lost
    assert spool.depth == 38 - lost and spool.dead_count == 2
