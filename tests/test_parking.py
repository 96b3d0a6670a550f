"""The parked keys (agent/forwarder/parking.py) against a plain dict, under any sequence of
parks, retries that fall due, an upstream coming back and flushes: a key parked again, or
taken early, must never be retried by its stale heap entry."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.forwarder.parking import Parked, ParkingLot

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
UPSTREAMS = st.sampled_from(["u1", "u2"])


class ParkingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lot = ParkingLot()
        self.model: dict[str, Parked] = {}
        self.now = 0.0

    @rule(key=KEYS, upstream=UPSTREAMS, delay=st.integers(0, 5), attempt=st.integers(0, 9),
          told=st.booleans())
    def park(self, key: str, upstream: str, delay: int, attempt: int, told: bool) -> None:
        parked = Parked(self.now + delay, attempt, upstream, told)
        self.lot.park(key, parked)
        self.model[key] = parked

    @rule(step=st.integers(0, 3))
    def time_passes(self, step: int) -> None:
        self.now += step
        want = sorted((p.when, k) for k, p in self.model.items() if p.when <= self.now)
        got = list(self.lot.due(self.now))
        assert [k for k, _ in got] == [k for _, k in want]
        for key, parked in got:
            assert parked == self.model.pop(key)

    @rule(upstream=UPSTREAMS)
    def upstream_back(self, upstream: str) -> None:
        got = dict(self.lot.take(upstream))
        want = {k: p for k, p in self.model.items()
                if p.upstream == upstream and not p.told}
        assert got == want
        for key in want:
            del self.model[key]

    @rule()
    def flush(self) -> None:
        assert sorted(self.lot.clear()) == sorted(self.model)
        self.model.clear()

    @invariant()
    def agrees(self) -> None:
        assert self.lot.next_due() == min((p.when for p in self.model.values()), default=None)
        for up in ("u1", "u2"):
            assert self.lot.count(up) == sum(p.upstream == up for p in self.model.values())
        for key in ("a", "b", "c", "d", "e"):
            assert (key in self.lot) == (key in self.model)


TestParking = ParkingModel.TestCase
TestParking.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
