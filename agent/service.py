"""Lifecycle: open the spool, start ingest and forwarders, wait for a signal, drain.

Signal handlers only set flags (as uvicorn does); the main coroutine acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Iterable

from aiohttp import web

from agent import config as config_mod
from agent import logs
from agent.config import ConfigError
from agent.device import detect
from agent.families.enrich import Enrich
from agent.families.facts import DeviceFacts
from agent.forwarder.supervisor import Supervisor
from agent.metrics import Metrics
from agent.ops.notify import Notifier
from agent.ops.routes import Ops
from agent.server.app import build_app
from agent.server.connections import ConnectionLimits, fit_fd_limit
from agent.server.guard import is_loopback_name
from agent.server.intake import Sink
from agent.settings import Config
from agent.spool import Spool

log = logging.getLogger("outpost")
PRUNE_EVERY_S = 600.0
MAX_REQUEST_LINE = 64 * 1024
# After an early reply (413, 408) aiohttp reads and drops the rest of the body, so the
# client sees the reply rather than a reset. Over loopback the rest takes milliseconds;
# aiohttp's 10 s default would let a stalled client hold its connection that much longer.
LINGER_S = 2.0


class Agent:
    """The running agent; ``start`` then ``stop``, or ``serve`` until a signal."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = Metrics()
        self.facts: DeviceFacts = detect(cfg.device)
        self.spool: Spool | None = None
        self.forwarding: Supervisor | None = None
        self.sink: Sink | None = None
        self.ops: Ops | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._prune: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.notifier = Notifier.from_env()
        self.port = cfg.listen.port
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    async def start(self) -> None:
        _register_secrets(self.cfg)
        self.spool = spool = await Spool.open(self.cfg.storage)
        _register_keys(spool.streams)
        self.forwarding = Supervisor(self.cfg, spool, self.facts, self.metrics)
        self.sink = Sink(self.cfg.listen.accept_keys, spool, Enrich(self.facts), self.metrics,
                         inflight_budget=self.cfg.listen.max_inflight_mb * 1024 * 1024)
        self.sink.on_new_data = self._new_data
        # A spool that could not be opened at start (full disk) brings its queues later.
        spool.on_reopen = lambda: self._new_data(set(spool.streams))
        self.ops = Ops(self.cfg, spool, self.forwarding, self.metrics)
        app = build_app(self.cfg, self.sink, self.ops)
        # auto_decompress=False: dialects/body.py inflates bodies itself, bounded by each
        # API's limit (a gzip bomb stops there); aiohttp would inflate them first, unbounded.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     auto_decompress=False,
                                     shutdown_timeout=5.0,
                                     # A pixel carries its event (up to 32 KB) base64'd in
                                     # the URL: over aiohttp's 8 KB request-line default.
                                     max_line_size=MAX_REQUEST_LINE,
                                     lingering_time=LINGER_S)
        await self._runner.setup()
        assert self._runner.server is not None
        # Not a TCPSite: every connection goes through ConnectionLimits' deadlines and cap.
        cap, backlog = fit_fd_limit(self.cfg.listen.max_connections)
        limits = ConnectionLimits(self.cfg.listen, cap, self.metrics)
        self._listener = await asyncio.get_running_loop().create_server(
            limits.protocol_factory(self._runner.server), self.cfg.listen.host,
            self.cfg.listen.port, backlog=backlog, reuse_address=True)
        self.port = int(self._listener.sockets[0].getsockname()[1])
        if not is_loopback_name(self.cfg.listen.host):
            log.warning("listening on %s, which is not loopback: other machines can send "
                        "events to this agent", self.cfg.listen.host)
        await self.forwarding.start()
        self._prune = asyncio.create_task(self._prune_loop(), name="prune")
        log.info("outpost listening on %s:%d, spool %s (%d events queued)",
                 self.cfg.listen.host, self.port, spool.path, spool.depth)

    def _new_data(self, keys: set[str]) -> None:
        # Runs after every commit; a key already registered costs one set lookup.
        _register_keys(keys)
        if self.forwarding is not None:
            self.forwarding.on_new_data(keys)

    async def _watchdog_loop(self, interval: float) -> None:
        # Pinging from the event loop proves the loop itself is not stuck.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _prune_loop(self) -> None:
        assert self.spool is not None
        while True:
            await self.spool.prune()
            await asyncio.sleep(PRUNE_EVERY_S)

    async def reload(self) -> None:
        """SIGHUP: re-read the config; upstream changes take effect, the rest needs a restart."""
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        # Only accept_keys of [listen] is applied on reload: the server, its guard and its
        # connection limits are built once.
        stale = [f"listen.{f.name}" for f in dataclasses.fields(new.listen)
                 if f.name != "accept_keys"
                 and getattr(new.listen, f.name) != getattr(self.cfg.listen, f.name)]
        if new.storage != self.cfg.storage:
            stale.append("[storage]")
        if stale:
            log.warning("reload: %s changed, which needs a restart", ", ".join(stale))
        assert self.spool is not None and self.sink is not None and self.ops is not None
        _register_secrets(new)
        old = self.forwarding
        self.cfg = new
        # In-flight batches settle before the new forwarders start: nothing sent twice.
        if old is not None:
            await old.stop()
        self.forwarding = Supervisor(new, self.spool, self.facts, self.metrics)
        if old is not None:
            _carry_states(old, self.forwarding)
        self.sink.set_accept_keys(new.listen.accept_keys)
        self.ops.cfg, self.ops.forwarding = new, self.forwarding
        await self.forwarding.start()
        log.info("configuration reloaded from %s", new.source)

    async def stop(self) -> None:
        """Stop accepting, let running requests commit, then stop forwarders and the spool."""
        for task in (self._prune, self._watchdog):
            if task is not None:
                task.cancel()
        if self._listener is not None:
            self._listener.close()  # stop accepting; cleanup() then drains the connections
        if self._runner is not None:
            await self._runner.cleanup()
        if self.forwarding is not None:
            await self.forwarding.stop()
        if self.spool is not None:
            await self.spool.close()
        self.notifier.close()
        log.info("outpost stopped")

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        await self.start()
        assert self.spool is not None
        self.notifier.ready(f"listening on {self.cfg.listen.host}:{self.port}, "
                            f"{self.spool.depth} events queued")
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._watchdog = asyncio.create_task(self._watchdog_loop(interval), name="watchdog")
        if sys.platform != "win32":
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            while not self._stop.is_set():
                waiter = asyncio.ensure_future(self._reload.wait())
                stopper = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.notifier.reloading()
                    await self.reload()
                    self.notifier.ready()
        finally:
            self.notifier.stopping()
            with contextlib.suppress(NotImplementedError):
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self.stop()
        return 0


def _register_secrets(cfg: Config) -> None:
    """Accepted keys, routed keys and upstream keys are all credentials (an upstream URL
    holds none: config refuses user:password@ in it)."""
    for key in cfg.listen.accept_keys:
        logs.register_secret(key)
    for up in cfg.upstreams:
        for key in (up.key, *up.keys):
            if key and key != "*":
                logs.register_secret(key)


def _register_keys(keys: Iterable[str]) -> None:
    """App keys reach the logs (e.g. in upstream paths); never show them."""
    for key in keys:
        logs.register_secret(key)


def _carry_states(old: Supervisor, new: Supervisor) -> None:
    """Keep an upstream's last ack, last error and totals across a reload."""
    for name, state in new.states.items():
        if name in old.states:
            new.states[name] = dataclasses.replace(old.states[name], protocol=state.protocol,
                                                   state=state.state)
