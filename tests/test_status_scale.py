"""GET /status, /metrics and /healthz with thousands of keys queued: their figures are
exact, and one request looks at no key and has SQLite do the same work for 1,000 keys
as for 3,000. The dead letters' summary is kept as letters come and go, so a change
costs a summary a few rows, not a count of every letter again.

The agents here hold everything (a low battery whose rule is "hold"), so the queues stay
as filled while they are read; the expected figures are read straight from the spool
file with SQL, not from the agent's memory.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.families.event import NUCLEUS, Event, dedupe_key
from agent.families.lanes import HIGH, NORMAL
from agent.forwarder.supervisor import Seams
from agent.service import Agent
from agent.settings import StorageConfig
from agent.spool import Spool, dead
from agent.spool.dead import NEWEST_REASONS
from agent.spool.schema import SCHEMA
from agent.sync.policy import Battery
from tests.conftest import free_port, write_config
from tests.fakes.manual_timing import ManualTiming
from tests.test_prometheus import parse
from tests.test_sync_battery import Sensor
from tests.waiting import wait_for

KEYS = (1_000, 3_000)
NAMED = ("named-a", "named-b")     # upstream "a" takes these; "b" every other key
ROUTES = ("/status", "/metrics", "/healthz")
REASONS = ("HTTP 400: bad event", "HTTP 422: unprocessable", "HTTP 413: too large")
K = TypeVar("K")
V = TypeVar("V")


def key_of(i: int) -> str:
    return f"k{i:06d}"


def event(key: str, n: int, lane: int = NORMAL) -> Event:
    body = b'{"type":"event","name":"e","id":%d,"sessionId":1,"pad":"%s"}' % (n, b"x" * (n % 7))
    return Event(key, NUCLEUS, dedupe_key(key, n), body, n, lane)


async def fill(path: Path, keys: int, letters: int = 6) -> None:
    """``keys`` keys with 1 to 3 events queued (a high one for every fourth key), the two
    named keys with five each, and ``letters`` dead letters of one more key under three
    reasons: through the Spool API, one group commit per 2,000 events."""
    events = [event(key_of(i), j, HIGH if j == 0 and i % 4 == 0 else NORMAL)
              for i in range(keys) for j in range(i % 3 + 1)]
    events += [event(key, j, HIGH if j < 2 else NORMAL) for key in NAMED for j in range(5)]
    spool = await Spool.open(StorageConfig(path=str(path), sync="normal"))
    try:
        for start in range(0, len(events), 2000):
            await spool.append(events[start:start + 2000])
        await add_dead(spool, "refused-src", range(letters))
    finally:
        await spool.close()


async def add_dead(spool: Spool, key: str, ids: range) -> None:
    """Queue ``ids`` for ``key`` and dead-letter them, as a forwarder does, 500 at a time
    (each batch its own commit: its own time)."""
    await spool.append([event(key, n) for n in ids])
    stream = spool.streams[key].id
    while rows := await spool.fetch(stream, -1, 500):
        await spool.dead_letter([(r.seq, "b", REASONS[r.seq % 3]) for r in rows])


def config(tmp_path: Path, spool: Path, b_keys: list[str]) -> dict[str, Any]:
    url = f"http://127.0.0.1:{free_port()}"   # never reached: everything is held
    return {"spool": spool, "sync": {"on_low_battery": "hold", "low_battery_pct": 20},
            "upstreams": [{"name": "a", "protocol": "nucleus-http", "url": url,
                           "keys": list(NAMED)},
                          {"name": "b", "protocol": "nucleus-http", "url": url,
                           "keys": b_keys}]}


async def held_agent(make_agent: Any, tmp_path: Path, spool: Path) -> tuple[Agent, ManualTiming]:
    timing = ManualTiming()
    agent = await make_agent(seams=Seams(timing=timing), battery=Sensor(Battery(10, False)),
                             **config(tmp_path, spool, ["*"]))
    await settled(timing)
    return agent, timing


async def settled(timing: ManualTiming) -> None:
    """Once the hold's waiter (which reads the oldest held event) and the battery poll are
    both timing their waits, nothing else reads the spool while the test measures."""
    await wait_for(lambda: len(timing.pending()) == 2)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def queued(path: Path) -> dict[str, tuple[int, int, int]]:
    """Each key with events queued: (events, bytes, of them in the high lane), from the
    records themselves."""
    with reading(path) as conn:
        return {key: (n, nbytes, high) for key, n, nbytes, high in conn.execute(
            "SELECT s.key, sum(r.live), sum(r.bytes), sum(CASE WHEN r.lane = ? THEN r.live "
            "ELSE 0 END) FROM records r JOIN streams s ON s.id = r.stream GROUP BY s.key "
            "HAVING sum(r.live) > 0", (HIGH,))}


def groups(path: Path) -> list[dict[str, Any]]:
    """The dead letters grouped by (reason, upstream), newest first (by the agent's clock,
    then the wall clock), counted afresh."""
    with reading(path) as conn:
        return [{"reason": r, "upstream": u, "count": n, "oldest": lo, "newest": hi}
                for r, u, n, lo, hi in conn.execute(
                    "SELECT reason, upstream, count(*), min(at), max(at) FROM dead "
                    "GROUP BY reason, upstream ORDER BY max(observed) DESC, max(at) DESC, "
                    "reason, upstream")]


async def get(port: int, route: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{route}") as r:
        assert r.status == 200, await r.text()
        return await r.json() if route != "/metrics" else await r.text()


async def assert_exact(agent: Agent, path: Path, b_keys: set[str] | None) -> None:
    """/status, /metrics and /healthz against the file: ``b_keys`` are the keys upstream b
    takes (None: every key a does not); the rest match no upstream."""
    def route(key: str) -> str | None:
        if key in NAMED:
            return "a"
        return "b" if b_keys is None or key in b_keys else None

    want: dict[str | None, list[int]] = {"a": [0, 0, 0, 0], "b": [0, 0, 0, 0], None: [0] * 4}
    for key, (n, nbytes, high) in queued(path).items():
        w = want[route(key)]
        w[0], w[1], w[2], w[3] = w[0] + n, w[1] + nbytes, w[2] + 1, w[3] + high
    total = sum(w[0] for w in want.values())
    held_high = want["a"][3] + want["b"][3]
    held = {"high": held_high, "normal": want["a"][0] + want["b"][0] - held_high}

    snap = await get(agent.port, "/status")
    assert snap["queue_depth"] == total
    assert {u["name"]: [u["queue_depth"], u["queue_bytes"], u["keys"]]
            for u in snap["upstreams"]} == {name: want[name][:3] for name in ("a", "b")}
    assert snap["unrouted"] == {"keys": want[None][2], "queue_depth": want[None][0]}
    assert snap["sync"]["held_lanes"] == held
    assert snap["sync"]["held_events"] == sum(held.values())
    news = groups(path)
    assert snap["dead_letters"] == sum(g["count"] for g in news)
    # With their ages, counted at the poll (dead.aged).
    assert [{k: v for k, v in g.items() if not k.endswith("_age_s")}
            for g in snap["dead_reasons"]] == news[:NEWEST_REASONS]
    assert all(g["oldest_age_s"] >= g["newest_age_s"] >= 0 for g in snap["dead_reasons"])

    metrics = parse(await get(agent.port, "/metrics"))
    assert metrics["outpost_queue_events"].value("outpost_queue_events") == total
    assert metrics["outpost_unrouted_queue_events"].value(
        "outpost_unrouted_queue_events") == want[None][0]
    for name in ("a", "b"):
        for family, i in (("outpost_upstream_queue_events", 0),
                          ("outpost_upstream_queue_bytes", 1)):
            assert metrics[family].value(family, upstream=name) == want[name][i], family
    for lane, n in held.items():
        assert metrics["outpost_sync_held_events"].value("outpost_sync_held_events",
                                                         lane=lane) == n
    assert (await get(agent.port, "/healthz"))["queue_depth"] == total


class Counted(dict[K, V]):
    """The agent's own dict of keys, counting every key looked at (the views, a lookup)."""

    visits = 0

    def __iter__(self) -> Iterator[K]:
        for key in super().__iter__():
            Counted.visits += 1
            yield key

    def keys(self) -> Any:
        return list(iter(self))

    def values(self) -> Any:
        return [super(Counted, self).__getitem__(k) for k in iter(self)]

    def items(self) -> Any:
        return [(k, super(Counted, self).__getitem__(k)) for k in iter(self)]

    def __getitem__(self, key: K) -> V:
        Counted.visits += 1
        return super().__getitem__(key)

    def get(self, key: K, default: Any = None) -> Any:
        Counted.visits += 1
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        Counted.visits += 1
        return super().__contains__(key)


async def cost(agent: Agent, route: str) -> tuple[int, int]:
    """One GET ``route``: (keys of the spool looked at, SQLite VM steps on the reader
    connection, which status reads go through)."""
    spool = agent.spool
    assert spool is not None and spool.reader is not None
    books = spool.books
    books.streams, books.by_id = Counted(books.streams), Counted(books.by_id)
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0   # carry on

    await spool.reader.run(lambda conn: conn.set_progress_handler(count, 1))
    Counted.visits = 0
    try:
        await get(agent.port, route)
        visits = Counted.visits
    finally:
        await spool.reader.run(lambda conn: conn.set_progress_handler(None, 0))
        books.streams, books.by_id = dict(books.streams), dict(books.by_id)
    return visits, steps[0]


async def test_status_metrics_and_healthz_are_exact_and_cost_the_same_for_more_keys(
        make_agent: Any, tmp_path: Path) -> None:
    costs = {}
    for keys in KEYS:
        path = tmp_path / f"spool-{keys}.db"
        await fill(path, keys)
        agent, _ = await held_agent(make_agent, tmp_path, path)
        await assert_exact(agent, path, None)
        costs[keys] = {route: await cost(agent, route) for route in ROUTES}
        await agent.stop()
    # No key looked at, and the same SQL work, whatever the number of keys.
    assert {route: visits for route, (visits, _) in costs[KEYS[-1]].items()} == \
        dict.fromkeys(ROUTES, 0)
    assert costs[KEYS[0]] == costs[KEYS[-1]]


async def test_the_figures_stay_exact_through_acks_dead_letters_retries_and_a_reload(
        make_agent: Any, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    await fill(path, 500)
    agent, timing = await held_agent(make_agent, tmp_path, path)
    spool = agent.spool
    assert spool is not None
    # A forwarder's acks (whole keys, and part of one), and refusals for good.
    for i in range(0, 60, 3):
        stream = spool.streams[key_of(i)]
        rows = await spool.fetch(stream.id, -1, 2)
        await spool.ack([r.seq for r in rows])
    rows = await spool.fetch(spool.streams[NAMED[0]].id, -1, 3)
    await spool.ack([rows[0].seq])
    await spool.dead_letter([(r.seq, "a", "HTTP 400: named") for r in rows[1:]])
    await assert_exact(agent, path, None)
    # An operator's retry puts letters back into their queues, a purge drops some.
    async with aiohttp.ClientSession() as s:
        for action, which in (("retry", {"reason": "HTTP 400: named"}),
                              ("purge", {"reason": REASONS[0]})):
            async with s.post(f"http://127.0.0.1:{agent.port}/dead/{action}", json=which) as r:
                assert r.status == 200, await r.text()
    await assert_exact(agent, path, None)
    # A reload that routes only two keys to b: the rest match no upstream now.
    b_keys = [key_of(1), key_of(2)]
    assert agent.config_path is not None
    cfg = config(tmp_path, path, b_keys)
    write_config(Path(agent.config_path), cfg.pop("spool"), **cfg)
    await agent.reload()
    await settled(timing)
    await assert_exact(agent, path, set(b_keys))


async def test_a_dead_letter_summary_after_a_change_costs_as_much_for_more_letters(
        make_agent: Any, tmp_path: Path) -> None:
    steps = {}
    for letters in (300, 3_000):
        path = tmp_path / f"spool-{letters}.db"
        await fill(path, 10, letters)
        agent, _ = await held_agent(make_agent, tmp_path, path)
        assert agent.spool is not None
        await get(agent.port, "/status")   # summarised once at the first read
        await add_dead(agent.spool, "refused-later", range(1))   # a change
        _, steps[letters] = await cost(agent, "/status")   # summarised again
        await assert_exact(agent, path, None)
        await agent.stop()
    assert steps[300] == steps[3_000] > 0


# Dead letters as the spool keeps them: (reason, upstream, at) drawn from few values, so
# that groups hold many letters, and many at one time.
letter = st.tuples(st.sampled_from(REASONS), st.sampled_from(("a", "b")),
                   st.integers(0, 5))
change = st.one_of(
    st.tuples(st.just("insert"), st.lists(letter, min_size=1, max_size=8)),
    st.tuples(st.just("seqs"), st.integers(0, 40), st.integers(0, 40)),   # a seq range
    st.tuples(st.just("reason"), st.sampled_from(REASONS)),               # a purge or retry
    st.tuples(st.just("before"), st.integers(0, 6)))                      # expiry by time


Group = tuple[str, str, int, int, int]   # reason, upstream, count, oldest, newest


def naive(conn: sqlite3.Connection) -> list[Group]:
    return sorted(conn.execute("SELECT reason, upstream, count(*), min(at), max(at) FROM dead "
                               "GROUP BY reason, upstream").fetchall())


def kept(summary: dict[str, Any]) -> list[Group]:
    return sorted((g["reason"], g["upstream"], g["count"], g["oldest"], g["newest"])
                  for g in summary["groups"])


@settings(max_examples=150, deadline=None)
@given(st.lists(change, max_size=25))
def test_the_kept_summary_is_what_counting_every_letter_says(changes: list[Any]) -> None:
    """Whatever letters come and go (inserted, deleted by seq range as the size cap and a
    chunked retry do, by reason, by time as expiry does), the summary the spool keeps is
    what a GROUP BY over every letter says: counts, oldest and newest of each group."""
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.executescript(SCHEMA)
        seq = 0
        for op, *args in changes:
            if op == "insert":
                for reason, upstream, at in args[0]:
                    seq += 1
                    conn.execute("INSERT INTO dead(seq, stream, family, received, dkey, body, "
                                 "upstream, reason, at) VALUES (?, 1, 0, 0, ?, x'00', ?, ?, ?)",
                                 (seq, seq, upstream, reason, at))
            elif op == "seqs":
                conn.execute("DELETE FROM dead WHERE seq BETWEEN ? AND ?",
                             (min(args), max(args)))
            elif op == "reason":
                conn.execute("DELETE FROM dead WHERE reason = ?", (args[0],))
            else:
                conn.execute("DELETE FROM dead WHERE at < ?", (args[0],))
            got, want = dead.summary(conn), naive(conn)
            assert (got["count"], kept(got)) == (sum(g[2] for g in want), want)
            assert [g["newest"] for g in dead.summary(conn, 2)["groups"]] == \
                sorted((g[4] for g in want), reverse=True)[:2]
