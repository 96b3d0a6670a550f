"""A forwarder never dies or stalls silently.

Liveness: a queue whose upstream is reachable makes progress within
``flush_interval_s + timeout_s`` (plus the backoff after a failure); when it
cannot, status says why. Agents run in process against real fake upstreams on
127.0.0.1, with real spool files.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from agent import config as config_mod
from agent.forwarder.backoff import Backoff
from agent.forwarder.stream import OMITTED_LIMIT, PASSED_OVER
from agent.forwarder.supervisor import Seams
from agent.service import Agent
from agent.spool import store
from agent.uplinks.base import Retry, SendResult
from agent.uplinks.nucleus_http import NucleusHttpUplink
from agent.uplinks.nucleus_ws import NucleusWsUplink
from agent.uplinks.prepare import Prepared
from agent.uplinks.registry import make_uplink
from tests.conftest import FAST_BACKOFF, SCRATCH, write_config
from tests.fakes.faulty_upstream import Fault, FaultyUpstream, Request
from tests.fakes.threaded_agent import post_nucleus
from tests.test_upstream_faults import delivered, drained, event, send, upstream
from tests.waiting import wait_for

T = TypeVar("T")


KEYS, ROUNDS = 10, 10


async def test_a_failure_during_a_spool_read_is_not_lost(make_agent: Any,
                                                          faulty: FaultyUpstream) -> None:
    """Many keys, and the websocket closes after a partial ack on each one's first frame.

    Right after sending, each key's forwarder reads the spool again; the close often lands
    during that read. Before the fix the forwarder then waited for new data without
    looking at the failure, and the key's unacknowledged half stayed queued until the app
    sent more (most rounds stalled a key here; 10 rounds make that near certain).
    Liveness bound: flush_interval_s + timeout_s + backoff is about 1 s; 5 s allowed.
    """
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", timeout_s=0.6)])
    for r in range(ROUNDS):
        faulty.script = [Fault("close") for _ in range(KEYS)]
        keys = range(r * KEYS, (r + 1) * KEYS)
        for k in keys:
            await send(agent, [event(1000 * k + i) for i in range(10)], key=f"app{k}")
        await wait_for(lambda want=frozenset(1000 * k + i for k in keys for i in range(10)):
                       agent.spool.depth == 0 and set(delivered(faulty)) >= want, timeout=5)
    assert await agent.spool.dead_letters() == []


# -- supervision: one point catches, logs, counts, shows and restarts ---------------------------


async def get(agent: Any, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{agent.port}{path}") as r:
        assert r.status == 200
        return await (r.json() if path == "/status" else r.text())


def crash_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


class _BrokenSend(NucleusHttpUplink):
    """INJECTED FAULT (factory level): the first send raises, standing in for any bug on
    an uplink's delivery path (until issue 12 a `Retry-After: ²` did this for real)."""

    async def send(self, prepared: Prepared) -> SendResult:
        if not _BrokenSend.broke:
            _BrokenSend.broke = True
            raise ValueError("injected delivery fault")
        return await super().send(prepared)

    broke = False


def breaks_first_send(cfg: Any, key: str, session: aiohttp.ClientSession,
                      machine_id: str) -> Any:
    return _BrokenSend(cfg, key, session, machine_id)


async def test_a_crash_in_a_delivery_is_logged_counted_shown_and_restarted(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """A delivery that raises unexpectedly. Before the fix the delivery task died unseen
    and the key's events stayed queued."""
    caplog.set_level(logging.INFO)
    _BrokenSend.broke = False
    # A name of its own: crash logs are rate-limited per upstream, process-wide.
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy")],
                             seams=Seams(make_uplink=breaks_first_send))
    await send(agent, [event(i) for i in range(5)])
    await drained(agent, faulty, 5)
    state = agent.forwarding.states["crashy"]
    assert state.crashes == 1 and state.retries == 0
    assert "ValueError" in (state.last_error or "")
    (status,) = (await get(agent, "/status"))["upstreams"]
    assert status["crashes"] == 1 and "ValueError" in status["last_error"]
    assert 'outpost_upstream_crashes_total{upstream="crashy"} 1' in await get(agent, "/metrics")
    # Logged once, with its traceback, at the supervision point; nothing else complains
    # (no "Task exception was never retrieved").
    (record,) = crash_records(caplog)
    assert record.name == "outpost.supervisor" and "crashy" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


class _BrokenReader(NucleusWsUplink):
    """INJECTED FAULT (factory level): no reply an upstream can send breaks the websocket
    reader, so this uplink's reader raises on its first reply, standing in for any bug
    in an uplink's own background task."""

    broke = False

    def _on_message(self, link: Any, data: str | bytes) -> None:
        if not self.broke:
            self.broke = True
            raise KeyError("injected reader fault")
        super()._on_message(link, data)


async def test_a_crash_in_an_uplink_task_is_supervised(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    made: list[Any] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Any:
        uplink = (_BrokenReader(cfg, key, session, machine_id) if not made
                  else make_uplink(cfg, key, session, machine_id))
        made.append(uplink)
        return uplink

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-ws", name="crashy-ws")],
                             seams=Seams(make_uplink=factory, backoff=FAST_BACKOFF))
    await send(agent, [event(i) for i in range(5)])
    await drained(agent, faulty, 5)
    assert made[0].broke and len(made) == 2   # restarted with a fresh uplink
    state = agent.forwarding.states["crashy-ws"]
    assert state.crashes == 1 and "injected reader fault" in (state.last_error or "")
    (record,) = crash_records(caplog)
    assert record.exc_info is not None and record.exc_info[0] is KeyError


async def test_stop_cuts_the_restart_backoff_short(make_agent: Any,
                                                   faulty: FaultyUpstream) -> None:
    _BrokenSend.broke = False
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy-stop")],
                             seams=Seams(make_uplink=breaks_first_send,
                                         backoff=Backoff(base_s=300.0, cap_s=600.0)))  # 150-300 s
    await send(agent, [event(i) for i in range(3)])
    state = agent.forwarding.states["crashy-stop"]
    await wait_for(lambda: state.state == "restarting")
    assert state.crashes == 1
    await asyncio.wait_for(agent.stop(), 3)


class _FailsOnCue:
    """INJECTED FAULT (factory level): every send waits for ``cue``, then raises."""

    def __init__(self) -> None:
        self.sending, self.cue = asyncio.Event(), asyncio.Event()

    def uplink(self, cfg: Any, key: str, session: aiohttp.ClientSession,
               machine_id: str) -> Any:
        fault = self

        class Uplink(NucleusHttpUplink):
            async def send(self, prepared: Prepared) -> SendResult:
                fault.sending.set()
                await fault.cue.wait()
                raise ValueError("injected fault on cue")

        return Uplink(cfg, key, session, machine_id)

    async def sending_in(self, make_agent: Any, faulty: FaultyUpstream, name: str) -> Any:
        """An agent whose upstream ``name`` has a batch of three events in flight."""
        agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name=name)],
                                 seams=Seams(make_uplink=self.uplink))
        await send(agent, [event(i) for i in range(3)])
        await asyncio.wait_for(self.sending.wait(), 5)
        return agent


async def test_a_crash_while_stopping_is_counted_and_logged(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """A delivery in flight when the agent stops, which then raises. Before the fix the
    loop recorded the crash and returned: not logged, not counted, not shown (audit)."""
    caplog.set_level(logging.INFO)
    fault = _FailsOnCue()
    agent = await fault.sending_in(make_agent, faulty, "crashy-late")
    (loop,) = agent.forwarding.loops.values()
    stopping = asyncio.create_task(agent.stop())
    await wait_for(lambda: loop.stopping)
    fault.cue.set()
    await asyncio.wait_for(stopping, 10)
    assert agent.forwarding.states["crashy-late"].crashes == 1
    (record,) = crash_records(caplog)
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert agent.spool.depth == 3   # nothing acked: all still queued for the next start


async def test_an_ack_hook_that_raises_costs_no_resend(make_agent: Any,
                                                       faulty: FaultyUpstream) -> None:
    """The live event view is told of each ack. A bug there crashes the loop (supervised),
    but must not undo the ack: before the fix the acked rows were not yet held for
    deletion, so the restarted loop sent them all again (audit)."""
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="hooked")])
    told: list[int] = []

    def hook(upstream: str, key: str, rows: Any, seqs: Any) -> None:
        told.extend(seqs)
        if len(told) == len(seqs):
            raise RuntimeError("injected fault in the ack hook")

    agent.forwarding.on_acked = hook
    await send(agent, [event(i) for i in range(5)])
    await drained(agent, faulty, 5)
    state = agent.forwarding.states["hooked"]
    await wait_for(lambda: state.crashes == 1)   # counted once the loop has settled
    assert "injected fault in the ack hook" in (state.last_error or "")
    assert delivered(faulty) == Counter(range(5))   # each once


async def test_a_key_whose_loop_cannot_be_built_is_retried(
        make_agent: Any, faulty: FaultyUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """Building a key's loop raises (its uplink, here). Before the fix the error escaped
    to whoever asked for the loop, unseen, and the key waited for new data (audit)."""
    caplog.set_level(logging.INFO)
    built: list[str] = []

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Any:
        built.append(key)
        if len(built) == 1:
            raise OSError("injected fault building the uplink")
        return make_uplink(cfg, key, session, machine_id)

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="crashy-build")],
                             seams=Seams(make_uplink=factory, backoff=FAST_BACKOFF))
    await send(agent, [event(i) for i in range(4)])
    await drained(agent, faulty, 4)
    state = agent.forwarding.states["crashy-build"]
    assert state.crashes == 1 and "injected fault building the uplink" in (state.last_error or "")
    (record,) = crash_records(caplog)
    assert record.exc_info is not None and record.exc_info[0] is OSError


async def test_a_key_whose_restarted_loop_cannot_be_built_is_retried(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A loop crashes, and the uplink for its restart cannot be built. Before the fix
    that error ended the loop's supervision unseen, and the key waited for new data
    (review)."""
    built: list[str] = []

    class CrashingSend(NucleusHttpUplink):
        """INJECTED FAULT (factory level): the send raises."""

        async def send(self, prepared: Prepared) -> SendResult:
            raise ValueError("injected crash in send")

    def factory(cfg: Any, key: str, session: aiohttp.ClientSession, machine_id: str) -> Any:
        built.append(key)
        if len(built) == 1:
            return CrashingSend(cfg, key, session, machine_id)
        if len(built) == 2:
            raise OSError("injected fault building the restart's uplink")
        return make_uplink(cfg, key, session, machine_id)

    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", name="strand")],
                             seams=Seams(make_uplink=factory, backoff=FAST_BACKOFF))
    await send(agent, [event(i) for i in range(3)])
    await drained(agent, faulty, 3)
    state = agent.forwarding.states["strand"]
    assert state.crashes == 2 and len(built) == 3


async def test_a_crash_as_a_held_loop_ends_is_not_shown_as_restarting(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    """A transmit profile holds a key while a send is in flight, and the send then
    raises: the crash is counted, but nothing restarts, so the upstream must not show
    "restarting" (review: it did, until the key's next loop)."""
    fault = _FailsOnCue()
    agent = await fault.sending_in(make_agent, faulty, "held")
    supervisor = agent.forwarding
    (loop,) = supervisor.loops.values()
    supervisor.may_send = lambda key: ()   # what a transmit profile's hold does
    supervisor.regate()
    await wait_for(lambda: loop.stopping)
    fault.cue.set()
    await wait_for(lambda: not supervisor.loops)
    state = supervisor.states["held"]
    assert state.crashes == 1 and state.state == "idle"


# -- the stateful property: ingest interleaved with every upstream behaviour ------------------

TIMEOUT_S = 0.3       # the agent's timeout_s: a hang costs this, plus the close grace
HANG_S = 0.8          # how long a hung upstream holds a request or frame
# One fault's worst cost: the timeout, the close grace, then the backoff (capped at 0.2 s).
FAULT_COST_S = 2 * TIMEOUT_S + 0.2 + 0.1
SETTLED_S = 3.0       # flush_interval_s + timeout_s + backoff, with room for a loaded machine


def _fault(kind: str, retry_after: str) -> tuple[str, Fault]:
    """(where it applies: "frame" or "connect", the fault) for a behaviour name."""
    return {
        "partial": ("frame", Fault("partial")),
        "unknown": ("frame", Fault("unknown")),
        "close": ("frame", Fault("close")),
        "reset": ("frame", Fault("reset")),
        "hang": ("frame", Fault("timeout", delay=HANG_S)),
        # Acknowledged, but the reply stalls past the agent's wait: the ack is lost.
        "late": ("frame", Fault("stall", delay=HANG_S)),
        # Started on only after the agent's wait (a busy upstream's queue, or a busy
        # machine's loop), then acknowledged: the ack is lost too.
        "queued": ("frame", Fault("backlog", delay=HANG_S)),
        "5xx": ("connect", Fault("status", 503)),
        "429": ("connect", Fault("status", 429, {"Retry-After": retry_after})),
        "redirect": ("connect", Fault("status", 302, {"Location": "/elsewhere"})),
    }[kind]


class _Scene:
    """A FaultyUpstream and an in-process agent on one event loop thread, so that the
    synchronous state machine can drive them over real sockets."""

    def __init__(self, tmp: Path, protocol: str) -> None:
        self.protocol = protocol
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = self.call(FaultyUpstream().start())
        cfg = write_config(tmp / "agent.toml", tmp / "spool.db", upstreams=[upstream(
            self.fake, protocol, timeout_s=TIMEOUT_S, batch_max_events=4, max_in_flight=3)])
        # Per send of the agent's, in order: whether it got a reply (False: timed out or cut
        # off). Over HTTP each request names its send in the URL's query.
        self.answered: list[bool] = []
        self.agent = Agent(config_mod.load_file(cfg), str(cfg), seams=Seams(
            backoff=FAST_BACKOFF, make_uplink=self._watched_uplink))
        self.call(self.agent.start())

    def _watched_uplink(self, cfg: Any, key: str, session: aiohttp.ClientSession,
                        machine_id: str) -> Any:
        """The real uplink, its sends watched for replies the agent never got: the
        upstream may have acknowledged those, and the agent rightly sends them again."""
        uplink = make_uplink(cfg, key, session, machine_id)
        send = uplink.send
        url = getattr(uplink, "url", "")

        async def watched(prepared: Prepared) -> SendResult:
            number = len(self.answered)
            self.answered.append(True)
            if isinstance(uplink, NucleusHttpUplink):
                uplink.url = f"{url}?send={number}"   # read as the send starts, before any await
            result = await send(prepared)
            # No reply, or one whose body (its reportedIds) did not come whole in time.
            self.answered[number] = not (isinstance(result, Retry) and (
                result.error.startswith("request failed")
                or "reply that could not be read" in result.error
                or "reply not read whole" in result.error))
            return result

        uplink.send = watched
        return uplink

    def lost_acks(self) -> Counter[tuple[str, Any]]:
        """(key, id) -> acks the upstream sent in replies the agent never got: what it
        acknowledged in requests whose send ended with no reply. Known by the send each
        request names, not by when it arrived: the upstream may start on a request only
        after the agent stopped waiting (a busy upstream, or a busy machine's loop)."""
        lost: Counter[tuple[str, Any]] = Counter()
        for rec in list(self.fake.requests):
            send = parse_qs(rec.query).get("send")
            if send and not self.answered[int(send[0])]:
                lost.update((rec.path.split("/")[2], ev["id"]) for ev in rec.events
                            if _acks(rec, ev))
        return lost

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def script(self, where: str, fault: Fault) -> None:
        # HTTP upstreams have no handshake: there, every fault answers a request.
        queue = self.fake.connect_script if where == "connect" and \
            self.protocol == "nucleus-ws" else self.fake.script
        self.loop.call_soon_threadsafe(queue.append, fault)

    def post(self, key: str, events: list[dict[str, Any]]) -> None:
        post_nucleus(self.agent.port, key, events)

    def close(self) -> None:
        try:
            self.call(self.agent.stop())
            self.call(self.fake.stop())
            # As asyncio.run ends: a handler the stopped fake cancelled (a hang still held)
            # ends before the loop does, not destroyed pending.
            self.call(_end_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class ForwardingMachine(RuleBasedStateMachine):
    """Apps post events for a few keys while the upstream acks, acks in part, acks
    unknown ids, closes mid-batch, resets, hangs, acks after the agent stopped waiting,
    starts on a request only after the agent stopped waiting (then acks it), answers
    5xx, 429 + Retry-After or a redirect. At every drain point: every event was
    delivered, the agent processed each ack once, first arrivals are in order per key,
    and the queue emptied within the liveness bound (the faults' own costs, then
    flush_interval_s + timeout_s + backoff)."""

    protocol = "nucleus-ws"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="outpost-sm-", dir=SCRATCH))
        self.scene = _Scene(self.tmp, self.protocol)
        self.sent: dict[str, int] = {}
        self.cost = 0.0   # worst-case seconds the faults scripted since the last drain add

    @rule(key=st.sampled_from(["a", "b", "c"]), n=st.integers(1, 12))
    def ingest(self, key: str, n: int) -> None:
        first = self.sent.get(key, 0)
        self.scene.post(key, [event(i) for i in range(first, first + n)])
        self.sent[key] = first + n

    @rule(kind=st.sampled_from(["partial", "unknown", "close", "reset", "hang", "late",
                                "queued", "5xx", "429", "redirect"]),
          retry_after=st.sampled_from(["0", "1"]))
    def misbehave(self, kind: str, retry_after: str) -> None:
        where, fault = _fault(kind, retry_after)
        self.scene.script(where, fault)
        self.cost += FAULT_COST_S + (float(retry_after) if kind == "429" else 0.0)

    @rule()
    def drain(self) -> None:
        self._check_drained()

    def teardown(self) -> None:
        try:
            self._check_drained()
        finally:
            self.scene.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _check_drained(self) -> None:
        agent, fake = self.scene.agent, self.scene.fake
        want = {(k, i) for k, n in self.sent.items() for i in range(n)}
        bound = self.cost + SETTLED_S
        try:
            self.scene.call(wait_for(lambda: agent.spool.depth == 0 and len(
                _acked_upstream(fake) & want) + agent.spool.dead_count >= len(want), bound))
        except AssertionError:
            raise AssertionError(f"stalled: {agent.spool.depth} events still queued after "
                                 f"{bound:.1f}s; status: {agent.forwarding.states}") from None
        # Faults no request has met yet (a handshake fault on a connection that stayed up)
        # still lie ahead.
        self.cost = (len(fake.script) + len(fake.connect_script)) * (FAULT_COST_S + 1.0)
        # Only an event whose answers left it out, passed over or alone, may be given up
        # (docs/operations.md); every other one is delivered.
        dead = {(d["key"], orjson.loads(d["body"])["id"])
                for d in self.scene.call(agent.spool.dead_letters(10_000))}
        left_out = self.scene.call(_left_out(fake))
        assert all(left_out[e] >= OMITTED_LIMIT for e in dead), (dead, left_out)
        want -= dead
        assert _acked_upstream(fake) >= want
        assert agent.forwarding.states["up"].acked == len(want)   # each ack processed once
        assert agent.forwarding.states["up"].crashes == 0
        assert _first_arrival_inversions(fake) == []
        if self.protocol != "nucleus-ws":
            # Request/reply: an ack is lost only with its whole reply (a timeout on a
            # loaded machine, a dropped connection). Any other second ack is a resend of
            # something the agent knew was delivered.
            lost = self.scene.call(_on_loop(self.scene.lost_acks))
            assert [(e, n) for e, n in _ack_counts(fake).items() if n > 1 + lost[e]] == []


async def _end_the_rest() -> None:
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


async def _on_loop(read: Callable[[], T]) -> T:
    """``read()`` on the scene's loop: one consistent view of the records it keeps."""
    return read()


def _acks(rec: Request, ev: dict[str, Any]) -> bool:
    """Whether the reply to ``rec`` acknowledged ``ev`` (True is not the id 1)."""
    return any(a == ev["id"] and type(a) is type(ev["id"]) for a in rec.acked)


def _keyed(fake: FaultyUpstream) -> list[tuple[str, Any, bool]]:
    """(key, event id, acked in that reply) for every event the upstream received."""
    return [(rec.path.split("/")[2], ev["id"], _acks(rec, ev))
            for rec in list(fake.requests) for ev in rec.events]


async def _left_out(fake: FaultyUpstream) -> Counter[tuple[str, Any]]:
    """At most what the well-formed answers that left each event out weigh, by the
    forwarder's rule (agent/forwarder/stream.py OMITTED_LIMIT): PASSED_OVER for one that
    acknowledged a later event of its request, 1 for the head of a request it acked
    none of (alone, or left out whole). Read on the upstream's loop: one consistent view
    of its records. (A websocket "close" is a lost link, which the agent does not weigh:
    counted here, it only makes the check more lenient.)"""
    weights: Counter[tuple[str, Any]] = Counter()
    for rec in list(fake.requests):
        events = [ev for ev in rec.events if ev.get("type") != "heartbeat"]
        if rec.fault not in ("partial", "close"):   # answered, acking the first half
            continue
        acked = [_acks(rec, ev) for ev in events]
        last = max((i for i, a in enumerate(acked) if a), default=-1)
        for i, (ev, a) in enumerate(zip(events, acked)):
            weight = 0 if a else 1 if i == 0 and last < 0 else PASSED_OVER if i < last else 0
            weights[(rec.path.split("/")[2], ev["id"])] += weight
    return weights


def _acked_upstream(fake: FaultyUpstream) -> set[tuple[str, Any]]:
    return {(k, i) for k, i, acked in _keyed(fake) if acked}


def _ack_counts(fake: FaultyUpstream) -> Counter[tuple[str, Any]]:
    return Counter((k, i) for k, i, acked in _keyed(fake) if acked)


def _first_arrival_inversions(fake: FaultyUpstream) -> list[tuple[str, Any, Any]]:
    latest: dict[str, int] = {}
    seen: set[tuple[str, Any]] = set()
    found = []
    for key, i, _ in _keyed(fake):
        if (key, i) in seen:
            continue
        seen.add((key, i))
        if i < latest.get(key, -1):
            found.append((key, i, latest[key]))
        latest[key] = max(latest.get(key, -1), i)
    return found


@pytest.mark.parametrize("protocol", ["nucleus-ws", "nucleus-http"])
def test_every_event_is_delivered_once_in_order_and_nothing_stalls(
        protocol: str) -> None:
    machine = type(f"Machine_{protocol.replace('-', '_')}", (ForwardingMachine,),
                   {"protocol": protocol})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=15, stateful_step_count=15, deadline=None,
        suppress_health_check=list(HealthCheck)))


def test_a_request_the_upstream_starts_on_after_the_agent_gave_up_is_not_sent_a_third_time(
        ) -> None:
    """The upstream starts on a request only after the agent's timeout (a busy upstream's
    queue; on a busy machine, the loop the fake shares with the agent), then acks it.
    The agent rightly resends, and the upstream acks that too: twice, and no more. (The
    property above took such a late ack for a needless resend, as CI's busy machine showed
    once: it knew a lost ack only by its request arriving before the agent gave up.) The
    resend may go in smaller batches (the timeout halved them: a slow link's cut)."""
    machine = type("Machine_http", (ForwardingMachine,), {"protocol": "nucleus-http"})()
    machine.misbehave("queued", "0")
    machine.ingest("a", 4)
    fake = machine.scene.fake

    def twice() -> bool:   # the resend's acks, then the late one: each event acked twice
        acked = [r for r in fake.requests if r.acked]
        faults = [r.fault for r in acked]
        times = Counter(i for r in acked for i in r.acked)
        return (bool(faults) and faults[-1] == "backlog" and set(faults[:-1]) == {"ok"}
                and len(times) == 4 and set(times.values()) == {2})
    machine.scene.call(wait_for(twice, timeout=5))
    machine.teardown()


def test_a_loop_that_hands_over_to_its_successor_sends_nothing_twice() -> None:
    """A loop that ends with events still queued (its turn passed on, or its upstream's
    batches grown after a slow-link cut) is released at once, and the key's next loop may
    start before the old one has ended. Acks it held for a grouped delete were only handed
    to the spool as it ended, so the next loop read their rows and sent them again: four
    acks processed twice (hypothesis found this example; it failed about one run in two)."""
    machine = type("Machine_http", (ForwardingMachine,), {"protocol": "nucleus-http"})()
    machine.misbehave("unknown", "1")
    machine.misbehave("429", "1")
    machine.ingest("c", 11)
    machine.ingest("a", 7)
    machine.misbehave("hang", "1")
    machine.drain()
    machine.drain()
    machine.ingest("b", 12)
    machine.ingest("b", 11)
    machine.drain()
    machine.teardown()


# -- an ack whose spool delete failed -----------------------------------------------------------

async def test_rows_whose_ack_delete_failed_are_sent_again_not_left_queued(
        make_agent: Any, faulty: FaultyUpstream, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the spool's write lock while the upstream acks a batch.

    The ack's delete then fails (SQLite busy past its busy timeout), so the rows stay
    queued behind the forwarder's cursor. Before the fix the key's loop read past them
    forever: its queue never drained (and it spun on the spool, once idle). Now a loop
    with nothing in flight and rows still queued that it cannot see resends from the
    start of its queue.
    """
    caplog.set_level(logging.ERROR, logger="outpost.spool")
    # The lock waited out in 0.1 s, not the agent's 5 s: the same failed delete, sooner.
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 100)
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http", flush_interval_s=0.3)])
    lock = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    try:
        await send(agent, [event(i) for i in range(3)])
        # Taken at once: the batch goes out only after flush_interval_s.
        lock.execute("BEGIN IMMEDIATE")
        await wait_for(lambda: sum(delivered(faulty).values()) == 3)
        await wait_for(lambda: any("spool commit failed" in r.getMessage()
                                   for r in caplog.records), timeout=15)
        assert agent.spool.depth == 3  # the delete did not happen
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    # Liveness bound: flush_interval_s (the resent rows' batch) plus an ack.
    await wait_for(lambda: agent.spool.depth == 0, timeout=5)
    assert set(delivered(faulty)) == {0, 1, 2}
