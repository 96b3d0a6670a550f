"""Many dead letters on a running agent: a retry or purge goes in chunks that let ingest
commit between them, /status does not scan them all on every poll, and a CLI whose agent
accepted the connection but answers slowly says it is busy, not that none runs."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import cli, cli_tail
from agent.ops import dead_cli
from agent.ops.shared_terms import LIST_LIMIT
from agent.outcomes import Tally
from agent.service import Agent
from agent.spool import dead, dead_live
from tests.conftest import free_port, write_config
from tests.fakes.ops_scene import post_events
from tests.test_dead_letters import RefusingNucleus, dead_letters, upstream
from tests.waiting import run_outpost, wait_for

MANY = 3000   # dead letters: 60 chunks of CHUNK
CHUNK = 50


def multiply_dead(path: Path, n: int) -> None:
    """Copies of a stopped agent's dead letters up to ``n`` (fresh seqs and dedupe keys),
    as an upstream refusing for days would leave them."""
    conn = sqlite3.connect(path)
    try:
        top = conn.execute("SELECT max(seq) FROM dead").fetchone()[0]
        rows = conn.execute("SELECT stream, family, received, dkey, body, upstream, reason, "
                            "at, lane FROM dead").fetchall()
        have = len(rows)
        with conn:
            conn.executemany(
                "INSERT INTO dead(seq, stream, family, received, dkey, body, upstream, reason, "
                "at, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((top + 1 + i, r[0], r[1], r[2], r[3] + 1000 + i, *r[4:])
                 for i in range(n - have) for r in [rows[i % have]]))
    finally:
        conn.close()


@pytest.fixture
async def up() -> AsyncIterator[RefusingNucleus]:
    """The dead letters' upstream: it refuses every event (see agent_with_many)."""
    upstream = RefusingNucleus()
    await upstream.start()
    yield upstream
    await upstream.stop()


async def agent_with_many(make_agent: Any, up: RefusingNucleus, n: int = MANY, *,
                          seeds: int = 3,
                          spread: Callable[[Path, int], None] = multiply_dead) -> Agent:
    """An agent on a spool of ``n`` dead letters, ``spread`` from the ``seeds`` a first
    agent made, its upstream refusing with 503 (retried letters stay queued)."""
    first = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["app-a"])])
    await post_events(first.port, "app-a", range(seeds))
    await dead_letters(first, seeds)
    await first.stop()
    spread(first.spool.path, n)
    up.refuse = 503
    agent: Agent = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["app-a"])])
    assert agent.spool.dead_count == n
    return agent


@pytest.mark.parametrize("what", ["retry", "purge"])
async def test_ingest_commits_while_a_retry_or_purge_is_still_running(
        make_agent: Any, up: RefusingNucleus, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """A retry held the writer's lock over every letter at once: 300k letters held an app's
    request 13 s (audit). In chunks, a request posted after the first chunk is answered
    while letters are still dead."""
    monkeypatch.setattr(dead_live, "CHUNK_LETTERS", CHUNK, raising=False)
    agent = await agent_with_many(make_agent, up)
    spool = agent.spool
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        async def change() -> dict[str, Any]:
            async with s.post(f"{base}/dead/{what}", json={"all": True}) as r:
                assert r.status == 200, await r.text()
                got: dict[str, Any] = await r.json()
                return got
        task = asyncio.create_task(change())
        await wait_for(lambda: spool.dead_count < MANY or task.done())
        await post_events(agent.port, "app-b", range(1))   # app-b: no upstream, stays
        # Answered, and committed, with the retry or purge not done yet.
        assert spool.dead_count > 0 and not task.done()
        assert spool.streams["app-b"].depth == 1
        got = await task
    assert got == ({"retried": MANY, "queue_depth": MANY + 1} if what == "retry"
                   else {"purged": MANY, "dead_letters": 0})
    assert spool.dead_count == 0
    assert spool.counters[f"dead_{what}d" if what == "purge" else "dead_retried"] == MANY


async def test_a_retry_interrupted_leaves_the_rest_dead_and_a_second_one_finishes(
        make_agent: Any, up: RefusingNucleus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry stopped between chunks (the agent stopping) kept what it committed; the
    rest are still dead letters, and `dead retry` again sends them."""
    monkeypatch.setattr(dead_live, "CHUNK_LETTERS", CHUNK, raising=False)
    agent = await agent_with_many(make_agent, up)
    spool = agent.spool
    task = asyncio.create_task(dead_live.retry(spool, dead.Which(every=True)))
    await wait_for(lambda: spool.dead_count < MANY or task.done())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left = spool.dead_count
    assert 0 < left < MANY and spool.depth == MANY - left
    await agent.stop()
    again = await make_agent(port=free_port(), upstreams=[upstream("up", up, ["app-a"])])
    assert again.spool.dead_count == left and again.spool.depth == MANY - left
    text = await outpost_in_thread("dead", "retry", "--all", "--config",
                                   str(again.config_path))
    assert f"re-queued {left} dead letters" in text[1], text
    assert again.spool.dead_count == 0 and again.spool.depth == MANY


class SummaryQueries:
    """Counts the dead-letter summaries (the newest groups the spool keeps) the agent's
    reader connection reads."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, sql: str) -> None:
        if "FROM dead_groups" in sql:
            self.count += 1


async def test_status_polls_do_not_summarise_every_dead_letter_each_time(
        make_agent: Any, up: RefusingNucleus) -> None:
    """Every /status grouped the whole dead-letter table on the reader thread the
    forwarders read batches on: 700k letters and three open status pages took a 20,000
    event drain from 2 s to over 100 s (audit). Summarised once until they change."""
    agent = await agent_with_many(make_agent, up, 500)
    spool = agent.spool
    assert spool.reader is not None
    queries = SummaryQueries()
    await spool.reader.run(lambda conn: conn.set_trace_callback(queries))
    base = f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession() as s:
        async def reasons() -> list[dict[str, Any]]:
            async with s.get(f"{base}/status") as r:
                got: list[dict[str, Any]] = (await r.json())["dead_reasons"]
                return got
        # The same groups, their ages counted at each poll (dead.aged).
        first = [[{k: v for k, v in g.items() if not k.endswith("_age_s")} for g in
                  await reasons()] for _ in range(5)]
        assert first[0][0]["count"] == 500 and all(f == first[0] for f in first)
        assert queries.count == 1
        async with s.post(f"{base}/dead/purge", json={"all": True}) as r:
            assert r.status == 200
        assert await reasons() == [] and await reasons() == []
        assert queries.count == 2
        up.refuse = 400   # new dead letters show at once
        await post_events(agent.port, "app-a", range(10, 12))
        await dead_letters(agent, 2)
        [group] = await reasons()
        assert group["count"] == 2


@asynccontextmanager
async def holding(answer: Callable[[asyncio.StreamReader], Awaitable[bytes]]
                  ) -> AsyncIterator[int]:
    """A listener on 127.0.0.1 (its port) that writes what ``answer`` makes of each
    connection, then sends nothing more and holds it open until it ends."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        writer.write(await answer(reader))
    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


def silent_agent() -> AbstractAsyncContextManager[int]:
    """A listener that accepts connections and never answers, as an agent whose loop is
    busy: the kernel accepts for it."""
    async def nothing(_: asyncio.StreamReader) -> bytes:
        return b""
    return holding(nothing)


async def outpost_in_thread(*args: str) -> tuple[int, str]:
    """The CLI in this process (its timeouts set short by the test), in a thread: the
    agent under test runs in this loop. (exit code, stdout + stderr)"""
    import contextlib
    import io
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return cli.main(list(args))
    code = await asyncio.wait_for(asyncio.to_thread(run), 10)
    return code, out.getvalue()


async def test_cli_says_the_agent_is_busy_not_absent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that accepted the connection but answered after the CLI's timeout was taken
    for no agent: `status` printed the spool's figures as "no agent running" (rc 0), and
    `dead retry` tried the spool itself and said it "is in use" (rc 1) while the agent did
    the retry (audit). `tail` said "no agent answering ... start it"."""
    monkeypatch.setattr(cli, "STATUS_TIMEOUT_S", 0.2, raising=False)
    monkeypatch.setattr(dead_cli, "CHANGE_TIMEOUT_S", 0.2, raising=False)
    monkeypatch.setattr(cli_tail, "READ_TIMEOUT_S", 0.2, raising=False)
    spool = tmp_path / "spool.db"
    async with silent_agent() as port:
        cfg = str(write_config(tmp_path / "agent.toml", spool, port=port))
        for cmd in ("status", "tail"):
            code, text = await outpost_in_thread(cmd, "--config", cfg)
            assert code == 1, text
            assert "busy" in text and f"127.0.0.1:{port}" in text, text
            assert "no agent" not in text and "start it" not in text, text
        for cmd in ("retry", "purge"):
            code, text = await outpost_in_thread("dead", cmd, "--all", "--config", cfg)
            assert code == 1, text
            assert "still working" in text and "outpost status" in text, text
            assert "in use" not in text and "no agent" not in text, text
    assert not spool.exists()   # the CLI never turned to the spool file


def export_stalling() -> AbstractAsyncContextManager[int]:
    """A listener that answers an export with its head and one letter, then sends nothing
    more and holds the connection open: an agent whose loop stalls mid-export."""
    async def answer(reader: asyncio.StreamReader) -> bytes:
        await reader.readuntil(b"\r\n\r\n")
        line = b'{"id": 1}\n'
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(line), line))
    return holding(answer)


async def test_an_export_the_agent_stalls_says_what_came_and_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export whose stream the agent stopped sending for 30 s said "outpost: timed
    out": nothing of what timed out, what was written, or what to do."""
    monkeypatch.setattr(dead_cli, "ASK_TIMEOUT_S", 0.2, raising=False)
    spool, target = tmp_path / "spool.db", tmp_path / "out.jsonl"
    target.write_text("kept\n")
    async with export_stalling() as port:
        cfg = str(write_config(tmp_path / "agent.toml", spool, port=port))
        code, text = await outpost_in_thread("dead", "export", str(target), "--config", cfg)
    assert (code, text) == (1, f"outpost: the agent at http://127.0.0.1:{port} sent nothing "
                               "more of the export for 0.2 s, after 0 dead letters (it is "
                               f"busy, or stuck: its log may say why): {target} is unchanged; "
                               "try again\n")
    assert target.read_text() == "kept\n" and not spool.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml", "out.jsonl"]  # no temp


@asynccontextmanager
async def agent_cut_short(reset: bool = False) -> AsyncIterator[int]:
    """A listener that begins every answer (its head, a bit of its body) and closes before
    the body's end, as an agent killed mid-answer; with ``reset``, by a TCP reset (as the
    kernel closes a killed process's socket that has unread data), not a FIN."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)   # a POST's body, read: the close is no reset
        kind = b"application/x-ndjson" if b" /dead/export " in head else b"application/json"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"count\": 1, " % kind)
        await writer.drain()
        if reset:   # the client reads what came before the reset first (it is queued)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("args", "path"), [
    (["list"], "/dead"), (["show", "1"], "/dead/1"), (["retry", "--all"], "/dead/retry"),
    (["purge", "--all"], "/dead/purge")])
async def test_dead_commands_say_in_words_that_the_answer_was_cut_short(
        tmp_path: Path, args: list[str], path: str) -> None:
    """The agent stopped mid-answer: `outpost dead list`, `show`, `retry` and `purge` printed
    http.client's "IncompleteRead(13 bytes read, 987 more expected)", where `status` and
    `flush` say what happened and what to do. One line, exit 1, and the spool file is left
    alone (an agent answered there: a retry or purge is not done again on the file)."""
    spool = tmp_path / "spool.db"
    async with agent_cut_short() as port:
        cfg = str(write_config(tmp_path / "agent.toml", spool, port=port))
        code, text = await run_outpost("dead", *args, "--config", cfg)
    assert (code, text) == (1, f"outpost: the answer of http://127.0.0.1:{port} to {path} was "
                               "cut short (IncompleteRead): the agent stopped mid-answer, or "
                               "another server holds its port; try again\n")
    assert not spool.exists()


async def test_an_answer_reset_midway_is_said_so_by_every_command(tmp_path: Path) -> None:
    """The agent's answer began and the connection was reset before its end (the agent
    killed mid-answer): `status` printed the spool's figures as "no agent running" (exit 0),
    `flush` said "no agent answering ... start it", `dead list` and `show` read the spool
    as if none ran, `retry` and `purge` turned to the spool file, and `dead export` printed
    a bare "outpost: [Errno 104] Connection reset by peer". An agent answered there: each
    says its answer was cut short, in one line, exit 1, and leaves the spool file alone."""
    spool = tmp_path / "spool.db"
    target = tmp_path / "out.jsonl"
    async with agent_cut_short(reset=True) as port:
        cfg = str(write_config(tmp_path / "agent.toml", spool, port=port))
        for args, path in ((["status"], "/status"), (["flush"], "/flush"),
                           (["dead", "list"], "/dead"), (["dead", "show", "1"], "/dead/1"),
                           (["dead", "retry", "--all"], "/dead/retry"),
                           (["dead", "purge", "--all"], "/dead/purge")):
            code, text = await outpost_in_thread(*args, "--config", cfg)
            assert (code, text) == (1, f"outpost: the answer of http://127.0.0.1:{port} to "
                                       f"{path} was cut short (ConnectionResetError): the agent "
                                       "stopped mid-answer, or another server holds its port; "
                                       "try again\n"), args
        code, text = await outpost_in_thread("dead", "export", str(target), "--config", cfg)
    assert (code, text) == (1, "outpost: the agent stopped the export after 0 dead letters "
                               f"(its log says why): {target} is unchanged\n")
    assert not spool.exists() and not target.exists()


async def test_an_export_answered_with_a_length_and_cut_short_is_said_so(
        tmp_path: Path) -> None:
    """An export answered with a Content-Length, not in chunks, and closed before its end:
    read a chunk at a time, http.client ends such a body quietly at the close (it raises
    only for a whole read), and the export took the bytes that came for all of it ("exported
    0 dead letters", the file replaced). The length it was promised says it was cut short."""
    target = tmp_path / "out.jsonl"
    target.write_text("kept\n")
    async with agent_cut_short() as port:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port))
        code, text = await outpost_in_thread("dead", "export", str(target), "--config", cfg)
    assert (code, text) == (1, "outpost: the agent stopped the export after 0 dead letters "
                               f"(its log says why): {target} is unchanged\n")
    assert target.read_text() == "kept\n"


async def test_an_export_to_standard_output_cut_short_names_it_so(tmp_path: Path) -> None:
    """`outpost dead export -` cut short said "- got only those", where its success says
    "standard output"."""
    async with agent_cut_short(reset=True) as port:
        cfg = str(write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port))
        code, text = await run_outpost("dead", "export", "-", "--config", cfg)
    assert (code, text) == (1, "outpost: the agent stopped the export after 0 dead letters "
                               "(its log says why): standard output got only those\n")


@pytest.mark.parametrize("what", ["purge", "retry"])
async def test_a_chunk_by_reason_does_not_read_again_the_letters_before_it(
        make_agent: Any, up: RefusingNucleus, what: str) -> None:
    """Each chunk of `dead purge --reason B` (and of a retry) scanned every dead letter of
    other reasons in front of its own, holding the writer each time (review: 0.3 s a chunk
    behind 600k letters). Counted in SQLite's own steps, chunk by chunk: the work of a chunk
    must not grow with the letters of other reasons before the ones it takes."""
    agent = await agent_with_many(make_agent, up, 4000)
    path = agent.spool.path
    await agent.stop()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        seqs = [s for (s,) in conn.execute("SELECT seq FROM dead ORDER BY seq")]
        conn.execute("UPDATE dead SET reason = 'A' WHERE seq <= ?", (seqs[3499],))
        conn.execute("UPDATE dead SET reason = 'B' WHERE seq > ?", (seqs[3499],))
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0
        conn.set_progress_handler(count, 100)
        work, after, nxt = [], dead.FIRST, 10**9
        while True:
            steps = 0
            conn.execute("BEGIN IMMEDIATE")
            which = dead.Which(reason="B")
            if what == "purge":
                out, last = dead.purge(conn, which, dead.END, 100, after)
            else:
                done = dead.requeue(conn, which, nxt, dead.STEP_BYTES, dead.END, 100, 1, after)
                out, last, nxt = done.out, done.last, done.next_seq
            conn.execute("COMMIT")
            if not out.counters.get(Tally.DEAD_PURGED if what == "purge" else Tally.DEAD_RETRIED):
                break
            after = last
            work.append(steps)
        assert len(work) == 5   # 500 letters of B, 100 a chunk
        # The first chunk reads the 3,500 letters of A to find where B begins; the later
        # ones start where the last ended (before: each read them all again).
        assert max(work[1:]) * 2 < work[0], work
        assert conn.execute("SELECT count(*) FROM dead WHERE reason = 'A'").fetchone()[0] == 3500
    finally:
        conn.close()


def reasons_of_their_own(path: Path, n: int) -> None:
    """Copies of a stopped agent's one dead letter up to ``n``, each with a reason of its
    own (but the first two, which share one), each newer than the last: an upstream that
    names each event it refuses (another Outpost's 207 names its messageId)."""
    conn = sqlite3.connect(path)
    try:
        seq, *row, at, lane, observed = conn.execute(
            "SELECT seq, stream, family, received, dkey, body, upstream, at, lane, observed "
            "FROM dead").fetchone()
        with conn:
            conn.executemany(
                "INSERT INTO dead(seq, stream, family, received, dkey, body, upstream, reason, "
                "at, lane, observed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((seq + i, row[0], row[1], row[2], row[3] + i, row[4], row[5],
                  letter_reason(max(i, 2)),
                  at + i, lane, observed + i) for i in range(1, n)))
    finally:
        conn.close()


def letter_reason(i: int) -> str:
    return f"HTTP 207: 400 Bad Request at batch[{i % 500}] messageId=m{i}: `type` is wrong"


async def test_dead_list_answers_the_newest_reasons_not_every_one(
        make_agent: Any, up: RefusingNucleus) -> None:
    """Every dead letter may have a reason of its own. GET /dead, which `outpost dead list`
    reads, answered every (reason, upstream) group however many there were: 200,000 such
    letters made a 50 MB answer that took 200 MB of the agent's Python allocations to build
    (and a spool holds millions). It answers the newest LIST_LIMIT groups and how many
    there are; `outpost dead list` says how many it leaves out."""
    n = LIST_LIMIT + 51   # reasons: one fewer (see reasons_of_their_own)
    agent = await agent_with_many(make_agent, up, n, seeds=1, spread=reasons_of_their_own)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{agent.port}/dead?limit=3") as r:
            got = await r.json()
    assert (got["count"], len(got["entries"])) == (n, 3)
    assert len(got["groups"]) == LIST_LIMIT and got.get("reasons") == n - 1, (
        len(got["groups"]), got.get("reasons"))
    assert [g["reason"] for g in got["groups"][:2]] == [letter_reason(n - 1),
                                                        letter_reason(n - 2)]
    code, text = await outpost_in_thread("dead", "list", "--config", str(agent.config_path))
    assert code == 0 and f"{n} dead letters" in text, text[:300]
    assert "... and 50 older reasons" in text, text[-500:]
    # A reason among the older groups is still listed by --reason, not said to be absent,
    # and the letters of it left out are counted, as for every reason (it printed none).
    async def older_reason_listed(source: str) -> None:
        code, text = await outpost_in_thread("dead", "list", "--config",
                                             str(agent.config_path), "--reason",
                                             letter_reason(2), "--limit", "1")
        assert code == 0 and "no dead letter has the reason" not in text, text[-500:]
        assert letter_reason(2) in text.split("REASON")[-1], text[-500:]
        assert text.endswith("... and 1 more (--limit N, or `outpost dead export FILE`)\n"), (
            source, text[-500:])
    await older_reason_listed("agent")
    # So with --limit 0 (the summary alone): no entry came to show the reason has letters.
    code, text = await outpost_in_thread("dead", "list", "--config", str(agent.config_path),
                                         "--reason", letter_reason(2), "--limit", "0")
    assert code == 0 and "no dead letter has the reason" not in text, text[-500:]
    assert "REASON" not in text.split("older reasons")[-1], text[-500:]
    code, text = await outpost_in_thread("dead", "list", "--config", str(agent.config_path),
                                         "--reason", letter_reason(2), "--limit", "0", "--json")
    assert code == 0 and json.loads(text)["entries"] == [], text[-500:]
    await agent.stop()
    await older_reason_listed("spool")


async def test_a_retry_of_letters_each_in_a_record_of_its_own_keeps_every_key_known(
        tmp_path: Path) -> None:
    """Letters received apart are retried one record each, their keys moved in the dedupe
    index in one pass a chunk (a scan of its buckets per record cost ~9 ms a letter at 1M
    keys: bench/RESULTS.md run 45; timed there, not here): every key stays known, in a
    bucket full to its 62,500 keys."""
    from agent.families.event import NUCLEUS, Event, dedupe_key
    from agent.settings import StorageConfig
    from agent.spool import Spool

    cfg = StorageConfig(path=str(tmp_path / "spool.db"), sync="normal")
    spool = await Spool.open(cfg)
    await spool.append([Event("d", NUCLEUS, dedupe_key("d", i), b"{}") for i in range(600)])
    for b in range(0, 65_000, 5_000):   # the letters' bucket full: 62,500 keys
        await spool.append([Event("bulk", NUCLEUS, dedupe_key("bulk", b + i), b"{}")
                            for i in range(5_000)])
    rows = await spool.fetch(spool.streams["d"].id, 0, 1000)
    await spool.dead_letter([(r.seq, "up", "HTTP 400") for r in rows])
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:   # received apart: a record each
        db.execute("UPDATE dead SET received = received + seq")
    db.close()
    spool = await Spool.open(cfg)
    try:
        assert all(dedupe_key("d", i) in spool.index for i in range(600))
        assert await dead_live.retry(spool, dead.Which(every=True)) == 600
        assert all(dedupe_key("d", i) in spool.index for i in range(600))
    finally:
        await spool.close()
