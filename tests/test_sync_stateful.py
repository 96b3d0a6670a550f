"""Transmit profiles and priority lanes, stateful (hypothesis): apps post normal and
high-priority events (Nucleus ``event``; ``init`` and ``error``) while the network turns
metered (``priority_only``) and back, the battery drains and charges (``hold``), the
upstream goes down and comes back, and time passes by an injected clock. Invariants:

- while holding, no key has a forwarding loop unless ``max_hold_h`` released them;
- under ``priority_only``, every loop sends the high lane alone (unless released), and
  with the upstream reachable the high lane drains;
- sending normally to a reachable upstream, the queue drains;
- with the upstream reachable, no event outlives ``max_hold_h`` (plus the release's
  one-minute recheck) in the queue;
- high before normal when both are queued: of the events a key had queued when its
  upstream came back (the key parked, so its next loop reads from the start), every
  high one first arrived before every normal one;
- at the end, with the network unmetered and the upstream up: nothing lost, and each
  key's events of each lane first arrived in the order they were posted.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from agent import config as config_mod
from agent.clock import CLOCK, age_s
from agent.families.lanes import HIGH
from agent.forwarder.supervisor import Seams
from agent.service import Agent
from agent.sync.held import oldest_routed
from agent.sync.monitor import RELEASE_RECHECK_S
from agent.sync.policy import Battery
from tests.conftest import FAST_BACKOFF, SCRATCH, write_config
from tests.fakes.manual_timing import ManualTiming
from tests.fakes.nm_bus import FakeNetworkManager, PrivateBus
from tests.fakes.nucleus_upstream import FakeNucleus
from tests.fakes.threaded_agent import post_nucleus

T = TypeVar("T")
MAX_HOLD_H = 0.5
YES, NO = 1, 2


async def poll(cond: Callable[[], bool], step: Callable[[], None] | None = None,
               timeout: float = 15.0) -> None:
    """Until ``cond()``; ``step`` runs between looks (e.g. lets a retry come due)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        if step is not None:
            step()
        await asyncio.sleep(0.01)


class _Scene:
    """An agent, a fake Nucleus and a NetworkManager-shaped service on one loop thread."""

    def __init__(self, tmp: Path, bus: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.timing = ManualTiming()
        self.battery: Battery | None = Battery(80, True)
        self.fake = self.call(FakeNucleus().start())
        self.nm = self.call(FakeNetworkManager(bus, metered=NO).start())
        cfg = write_config(tmp / "agent.toml", tmp / "spool.db", upstreams=[{
            "name": "up", "protocol": "nucleus-ws", "url": self.fake.url, "keys": ["a", "b"],
            "flush_interval_s": 0.05, "timeout_s": 2}],
            sync={"on_metered": "priority_only", "on_low_battery": "hold", "low_battery_pct": 20,
                  "max_hold_h": MAX_HOLD_H, "dbus_address": bus})
        self.agent = Agent(config_mod.load_file(cfg), str(cfg),
                           seams=Seams(timing=self.timing, backoff=FAST_BACKOFF),
                           battery=lambda: self.battery)
        self.call(self.agent.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def advance(self, seconds: float) -> None:
        """Let time pass on both clocks the agent reads (run on the loop thread)."""
        CLOCK.passed_ms += int(seconds * 1000)
        self.timing.advance(seconds)

    def post(self, key: str, ids: range, high: frozenset[int]) -> None:
        post_nucleus(self.agent.port, key, [
            {"type": ("init", "error")[i % 2] if i in high else "event", "name": "e", "id": i,
             "sessionId": 1, "machineId": "m", "date": "2026-01-01T00:00:00.000Z"}
            for i in ids])

    def close(self) -> None:
        try:
            self.call(self.agent.stop())
            self.call(self.nm.stop())
            self.call(self.fake.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class SyncMachine(RuleBasedStateMachine):
    bus = ""   # set per test: the private dbus-daemon's address

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="outpost-sync-", dir=SCRATCH))
        self.scene = _Scene(self.tmp, self.bus)
        self.posted: dict[str, list[int]] = {"a": [], "b": []}
        self.high: set[int] = set()   # ids posted as init or error: the high lane
        # (events first arrived before the upstream came back, {key: ids queued then}).
        self.resumes: list[tuple[int, dict[str, list[int]]]] = []
        self.next_id = 0
        self.up = True
        self.releases = 0   # the agent's count when the current hold was last checked
        self.quiet = False  # holding, with no loop left, at the last check

    @initialize(metered=st.booleans())
    def start(self, metered: bool) -> None:
        self.network(metered)
        self.post("a", 3, 1)
        self.post("b", 2, 0)

    @rule(key=st.sampled_from(["a", "b"]), n=st.integers(1, 5),
          high=st.integers(0, 2))
    def post(self, key: str, n: int, high: int) -> None:
        """``n`` events, ``high`` of them (at most) init or error, spread among the rest."""
        ids = range(self.next_id, self.next_id + n)
        chosen = frozenset(ids[::max(1, n // high)][:high]) if high else frozenset()
        self.high |= chosen
        self.scene.post(key, ids, chosen)
        sync, forwarding = self.scene.agent.sync, self.scene.agent.forwarding
        assert sync is not None and forwarding is not None

        async def held() -> tuple[str, int, list[str]]:
            # Read on the agent's loop, at one instant: a release (an advance of the clock
            # a rule made comes due whenever) counts itself and starts loops in one step,
            # and read from this thread one after the other, a loop it started could be
            # seen beside the count from before it.
            return sync.profile.mode, sync.releases, list(forwarding.loops)

        mode, releases, loops = self.scene.call(held())
        if self.quiet and mode == "hold" and releases == self.releases:
            # The gate is asked before the app is answered: held data starts no loop.
            assert not loops, "a loop started while holding"
        self.posted[key] += ids
        self.next_id += n

    @rule(metered=st.booleans())
    def network(self, metered: bool) -> None:
        sync = self.scene.agent.sync
        assert sync is not None
        self.scene.call(self.scene.nm.set_metered(YES if metered else NO))
        want = "yes" if metered else "no"
        self.scene.call(poll(lambda: sync.metered.state.value == want))

    @rule(percent=st.sampled_from([5, 19, 50, 90]), plugged=st.booleans())
    def power(self, percent: int, plugged: bool) -> None:
        self.scene.battery = Battery(percent, plugged)
        self.scene.loop.call_soon_threadsafe(self.scene.advance, 60.0)   # the battery poll
        self.scene.call(poll(lambda: self._battery_read()))

    @rule()
    def upstream_down(self) -> None:
        self.scene.call(self.scene.fake.go_down())
        self.up = False

    @rule()
    def upstream_up(self) -> None:
        if not self.up:
            fwd = self.scene.agent.forwarding
            assert fwd is not None
            # Only parked keys (their retry waits for the manual clock or a probe) are
            # sure to have nothing in flight: their next loop reads from the start. Not
            # those parked sending a max_hold_h release: their retry sends what it let go,
            # both lanes, and what came after (a high event too) waits for the profile.
            lot = dict(fwd._lot.items())
            parked = [k for k in self.posted if k in lot and lot[k].until is None]
            got = set(self._first_arrivals())
            self.resumes.append((len(self.scene.fake.events), {
                k: [i for i in self.posted[k] if i not in got] for k in parked}))
            self.scene.call(self.scene.fake.come_back())
            self.up = True

    @rule(minutes=st.sampled_from([1, 10, 29, 31, 45]))
    def time_passes(self, minutes: int) -> None:
        self.scene.loop.call_soon_threadsafe(self.scene.advance, minutes * 60.0)
        if self.up:
            self._check_max_hold()

    @invariant()
    def held_or_sending(self) -> None:
        agent = self.scene.agent
        assert agent.sync is not None and agent.forwarding is not None
        self.quiet = False
        if agent.sync.profile.mode == "hold":
            if agent.sync.releases == self.releases:   # nothing released: every loop ends
                forwarding = agent.forwarding
                self.scene.call(poll(lambda: not forwarding.loops))
                self.quiet = True
            self.releases = agent.sync.releases
        elif agent.sync.profile.mode == "priority_only":
            if agent.sync.releases == self.releases:   # nothing released: high lanes only
                # A loop a release widened to every lane sends what was queued then (or
                # parks): then only loops for the high lane are left.
                sync, loops = agent.sync, agent.forwarding.loops
                self.scene.call(poll(lambda: sync.releases != self.releases or all(
                    loop.lanes == (HIGH,) for loop in loops.values()
                    if not loop.released and not loop.stopping)))
                if self.up:
                    streams = agent.spool.streams if agent.spool is not None else {}
                    self.scene.call(poll(lambda: all(s.high == 0 for s in streams.values()),
                                         step=lambda: self.scene.advance(0.2)))
            self.releases = agent.sync.releases
        elif self.up:
            spool = agent.spool
            assert spool is not None
            # A key parked after a failure retries once its backoff has passed.
            self.scene.call(poll(lambda: spool.depth == 0, step=lambda: self.scene.advance(0.2)))
            self.releases = agent.sync.releases

    def teardown(self) -> None:
        try:
            self.upstream_up()
            self.network(False)
            self.power(90, True)
            self.held_or_sending()   # normal and up: drained
            first = self._first_arrivals()
            for key, ids in self.posted.items():
                mine = set(ids)
                assert set(first) >= mine, (key, mine - set(first))   # nothing lost
                for lane in (True, False):   # FIFO per (key, lane)
                    want = [i for i in ids if (i in self.high) == lane]
                    got = [i for i in first if i in mine and (i in self.high) == lane]
                    assert got == want, (key, lane, got, want)
            arrived = [ev["id"] for ev in self.scene.fake.events]
            for mark, queued in self.resumes:
                after = list(dict.fromkeys(arrived[mark:]))
                for key, ids in queued.items():   # high before normal when both are queued
                    order = [i in self.high for i in after if i in set(ids)]
                    assert order == sorted(order, reverse=True), (key, ids, after)
        finally:
            self.scene.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            CLOCK.passed_ms = 0

    def _first_arrivals(self) -> list[int]:
        """Event ids in the order they first reached the upstream."""
        return list(dict.fromkeys(ev["id"] for ev in self.scene.fake.events))

    def _battery_read(self) -> bool:
        sync = self.scene.agent.sync
        assert sync is not None
        b = self.scene.battery
        return sync.battery == b

    def _check_max_hold(self) -> None:
        agent = self.scene.agent
        assert agent.spool is not None
        limit = MAX_HOLD_H * 3600 + RELEASE_RECHECK_S + 5

        async def overdue() -> bool:
            assert agent.spool is not None
            oldest = await oldest_routed(agent.cfg, agent.spool)
            return oldest is not None and age_s(oldest) > limit

        async def settle() -> None:
            # The jump fired the hold's timer (and any parked key's retry): a release
            # is under way; it only has to reach the upstream.
            for _ in range(1500):
                if not await overdue():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"an event outlived max_hold_h: {agent.spool.depth} queued")
        self.scene.call(settle())


def test_holds_release_and_nothing_is_lost(bus: PrivateBus) -> None:
    machine = type("Machine", (SyncMachine,), {"bus": bus.address})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=15, stateful_step_count=15, deadline=None,
        suppress_health_check=list(HealthCheck)))
