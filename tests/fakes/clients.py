"""Load-generating Nucleus apps for crash and soak runs, with a ledger of what was acked.

Each client behaves like an official Nucleus module: it keeps a queue of
unacknowledged events and resends the whole queue until the agent confirms
them. Every event carries a unique ``payload.mark``, so the upstream side can
tell which events arrived, and how often, whatever id the agent sent them with.
HTTP clients leave half their events without an ``id``: the agent then gives
them its own (the spool seq), and a redelivery must reuse it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

NETWORK = (aiohttp.ClientError, OSError, asyncio.TimeoutError, ConnectionError, RuntimeError)


@dataclass
class Ledger:
    """What the clients sent, and which of those events the agent acknowledged."""

    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    requests_ok: int = 0
    requests_failed: int = 0


def mark_of(ev: dict[str, Any]) -> str | None:
    payload = ev.get("payload")
    return payload.get("mark") if isinstance(payload, dict) else None


def upstream_marks(events: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    """mark -> the upstream ids it arrived with, one entry per delivery."""
    out: dict[str, list[Any]] = {}
    for ev in events:
        mark = mark_of(ev)
        if mark is not None:
            out.setdefault(mark, []).append(ev.get("id"))
    return out


class NucleusClient:
    """One app: ``transport`` is "ws" or "http"; ``run`` until ``stop`` is set."""

    _numbers = itertools.count(1)

    def __init__(self, base_url: str, key: str, transport: str, ledger: Ledger, *,
                 interval: float = 0.05, max_queue: int = 300, with_ids: bool = True,
                 rng: random.Random | None = None) -> None:
        self.n = next(self._numbers)
        self.base_url = base_url
        self.key = key
        self.transport = transport
        self.ledger = ledger
        self.interval = interval
        self.max_queue = max_queue
        self.with_ids = with_ids
        self.rng = rng or random.Random(self.n)
        self.queue: list[dict[str, Any]] = []
        self._seq = 0

    def _new_events(self) -> None:
        for _ in range(self.rng.randint(1, 5)):
            if len(self.queue) >= self.max_queue:
                return
            self._seq += 1
            mark = f"{self.transport}{self.n}-{self._seq}"
            ev: dict[str, Any] = {"type": "event", "name": "load", "sessionId": self.n,
                                  "machineId": f"m{self.n}", "date": "2026-01-01T00:00:00.000Z",
                                  "payload": {"mark": mark}}
            # Without an id only HTTP can be acknowledged (by its 200).
            if self.transport == "ws" or (self.with_ids and self._seq % 2):
                ev["id"] = self.n * 10_000_000 + self._seq if self._seq % 3 else mark
            self.queue.append(ev)
            self.ledger.sent.add(mark)

    def _acked(self, ids: Any) -> None:
        wanted = set(ids) if isinstance(ids, list) else set()
        keep = []
        for ev in self.queue:
            if "id" in ev and ev["id"] in wanted:
                self.ledger.acked.add(ev["payload"]["mark"])
            else:
                keep.append(ev)
        self.queue = keep

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                try:
                    if self.transport == "ws":
                        await self._ws(session, stop)
                    else:
                        await self._http(session, stop)
                except NETWORK:
                    self.ledger.requests_failed += 1
                await asyncio.sleep(self.interval * 2)

    async def _ws(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        async with session.ws_connect(f"{self.base_url}/app/{self.key}/track",
                                      timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
            while not stop.is_set():
                self._new_events()
                await ws.send_str(orjson.dumps({"data": self.queue}).decode())
                msg = await ws.receive(timeout=10)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    self.ledger.requests_failed += 1
                    return
                self._acked(orjson.loads(msg.data).get("reportedIds"))
                self.ledger.requests_ok += 1
                await asyncio.sleep(self.interval)

    async def _http(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._new_events()
            async with session.post(f"{self.base_url}/app/{self.key}/track",
                                    data=orjson.dumps({"data": self.queue}),
                                    headers={"Content-Type": "application/json"}) as resp:
                body = await resp.read()
            if resp.status != 200:
                self.ledger.requests_failed += 1
                return
            # 200 means committed: every event of the request, with an id or not.
            for ev in self.queue:
                self.ledger.acked.add(ev["payload"]["mark"])
            assert orjson.loads(body)["reportedIds"] == [ev["id"] for ev in self.queue if "id" in ev]
            self.queue = []
            self.ledger.requests_ok += 1
            await asyncio.sleep(self.interval)
