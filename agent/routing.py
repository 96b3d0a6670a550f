"""Runs one StreamForwarder per (upstream, key), starting loops as new keys appear."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from .config import Config
from .device import DeviceFacts
from .forwarder import StreamForwarder, UpstreamState
from .metrics import Metrics
from .spool import Spool
from .uplinks.factory import make_uplink, window
from .uplinks.http_common import client_session

log = logging.getLogger("outpost.routing")


class Forwarding:
    """Owns the forwarders and the HTTP client session they share."""

    def __init__(self, cfg: Config, spool: Spool, facts: DeviceFacts, metrics: Metrics) -> None:
        self.cfg = cfg
        self.spool = spool
        self.facts = facts
        self.metrics = metrics
        self.states = {u.name: UpstreamState(u.name, u.protocol) for u in cfg.upstreams}
        self.loops: dict[str, StreamForwarder] = {}   # by local key
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = client_session()
        for key in list(self.spool.streams):
            self._ensure(key)

    def on_new_data(self, keys: set[str]) -> None:
        for key in keys:
            loop = self.loops.get(key) or self._ensure(key)
            if loop is not None:
                loop.poke()

    def _ensure(self, key: str) -> StreamForwarder | None:
        up = self.cfg.route(key)
        stream = self.spool.streams.get(key)
        if up is None or stream is None or self._session is None:
            return None
        uplink = make_uplink(up, key, self._session, self.facts.machineId)
        loop = StreamForwarder(up, stream, self.spool, uplink, self.states[up.name],
                               self.metrics, window(up))
        self.loops[key] = loop
        self._tasks[key] = asyncio.create_task(self._run(key, loop), name=f"forward-{up.name}")
        return loop

    async def _run(self, key: str, loop: StreamForwarder) -> None:
        try:
            await loop.run()
        except Exception:  # a bug in one loop must not stop the others
            log.exception("forwarder for upstream %s stopped unexpectedly", loop.cfg.name)
            loop.state.state = "stopped"

    def flush(self) -> None:
        for loop in self.loops.values():
            loop.flush()

    async def stop(self) -> None:
        for loop in self.loops.values():
            loop.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        self.loops.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
