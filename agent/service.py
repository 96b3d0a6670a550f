"""Lifecycle: open the spool, start ingest and forwarders, wait for a signal, drain.

Signal handlers only set flags (as uvicorn does); the main coroutine acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from agent import config as config_mod
from agent import logs, paths, preflight, startup_signals
from agent.clock import CLOCK
from agent.config import ConfigError
from agent.device import detect
from agent.families.enrich import Enrich
from agent.families.facts import DeviceFacts
from agent.families.lanes import Lanes
from agent.forwarder.state import UpstreamState
from agent.forwarder.supervisor import Seams, Supervisor
from agent.metrics import Metrics
from agent.ops.notify import Notifier
from agent.ops.routes import Ops
from agent.ops.tail import TailHub
from agent.ops.tail_routes import TailRoutes
from agent.server.app import EXPRESS, FRONT_DOOR, SOCKET_CLOSE_S, ServerLog, build_app
from agent.server.connections import LINGER_S, ConnectionLimits, fit_fd_limit
from agent.server.express import FIELDS_MAX, ExpressLane
from agent.server.guard import is_loopback_name
from agent.server.intake import Sink
from agent.server.limits import RouteLimits
from agent.server.unrouted import FrontDoor
from agent.settings import Config
from agent.spool import Spool
from agent.spool.migrate import ALIVE_EVERY_S
from agent.spool.types import Totals
from agent.sync.held import held_age_s
from agent.sync.metered import source_for
from agent.sync.monitor import SyncMonitor, SyncView
from agent.sync.power import BatterySensor, read_battery
from agent.terminal import os_text
from agent.uplinks import proxy
from agent.uplinks.registry import uplink_class

log = logging.getLogger("outpost")
T = TypeVar("T")
PRUNE_EVERY_S = 600.0
UNROUTED_NAMED = 3   # keys a warning of events no upstream takes names (of any number)
MAX_REQUEST_LINE = 64 * 1024
SHUTDOWN_S = 5.0  # for the requests being answered when a stop begins
UPLINK_CLOSE_S = 1.0  # a stop's wait for an upstream websocket's close (the nucleus-ws uplink's)
# Start time asked of systemd per sign of life from a migration: six beats, so one
# late beat does not get a slow but working migration killed.
EXTEND_START_USEC = int(ALIVE_EVERY_S * 6 * 1_000_000)
EXIT_FORCED = 130   # 128 + SIGINT, as shells report a process ended by an interrupt


class StartError(Exception):
    """The agent could not start; the message says why, in one line."""


class AddressNotHere(StartError):
    """listen.host is no address of this machine, perhaps not yet (DHCP at boot): unlike
    the other StartErrors, one that can clear by itself, so worth a restart."""


class Agent:
    """The running agent; ``start`` then ``stop``, or ``serve`` until a signal."""

    def __init__(self, cfg: Config, config_path: str | None = None, *,
                 seams: Seams = Seams(), battery: BatterySensor = read_battery,
                 on_spool_open: Callable[[], None] = lambda: None,
                 holds_lock: bool = False, exits: bool = False) -> None:
        self.cfg = cfg
        # Called once the spool is open, its dedupe index rebuilt, before anything listens
        # (``outpost run``: memory.settle_start).
        self.on_spool_open = on_spool_open
        # Whether the process holds the spool's lock file (``outpost run``): the spool
        # makes it again if an operator removes it under the agent.
        self.holds_lock = holds_lock
        # Whether the process ends once ``serve`` has stopped the agent (``outpost run``).
        self.exits = exits
        self.seams = seams   # what every Supervisor is built with (tests replace parts)
        self.battery = battery   # the one seam the battery is read through
        self.config_path = config_path
        self.metrics = Metrics()
        self.tail = TailHub(self.metrics)   # the live event view's viewers
        self.facts: DeviceFacts = detect(
            cfg.device, paths.device_id_file(cfg.storage.resolved_path()))
        self.spool: Spool | None = None
        self.forwarding: Supervisor | None = None
        self.sync: SyncMonitor | None = None
        self.sink: Sink | None = None
        self.ops: Ops | None = None
        self.app: web.Application | None = None
        self.listener: asyncio.Server | None = None
        self._stack: contextlib.AsyncExitStack | None = None   # what stop() unwinds
        self.notifier = Notifier.from_env()
        self.port = cfg.listen.port
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._force = asyncio.Event()   # a second SIGINT during the start or the graceful stop

    async def start(self) -> None:
        """Build and start every part. Each part's undo goes on one exit stack (aiohttp's
        cleanup_ctx idea): a start that fails part-way stops what it had started, in
        reverse order, and ``stop`` is the same unwinding."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.notifier.close)
            _register_secrets(self.cfg)
            self.spool = spool = await Spool.open(self.cfg.storage, on_reopen=self._reopened,
                                                  on_migrating=self._migrating,
                                                  holds_lock=self.holds_lock)
            stack.push_async_callback(spool.close)
            self.on_spool_open()
            _register_keys(spool.streams)
            self.sync = self._monitor(self.cfg)
            await self.sync.start()
            stack.push_async_callback(self._stop_sync)
            self.forwarding = Supervisor(self.cfg, spool, self.facts, self.metrics, self.seams,
                                         self.sync.may_send, self.tail.acked)
            await self.forwarding.start()
            stack.push_async_callback(self._stop_forwarding)
            # A release the last run had under way (max_hold_h) goes on.
            self.sync.forwarders_started(self.forwarding.release)
            self.sink = Sink(self.cfg.listen.accept_keys, spool,
                             Enrich(self.facts, Lanes(self.cfg.upstreams)), self.metrics,
                             inflight_budget=self.cfg.listen.max_inflight_mb * 1024 * 1024,
                             on_new_data=self._new_data,
                             limits=_limits(self.cfg, self.facts.machineId),
                             on_stored=self.tail.ingested,
                             max_keys=self.cfg.listen.max_keys)
            self.ops = Ops(spool, self.metrics, live=self._live, flush=self._flush,
                           sync=self._sync_view)
            self.app = build_app(self.cfg, self.sink,
                                 self.ops.routes() + TailRoutes(self.tail).routes())
            runner = self._make_runner(self.app)
            await runner.setup()
            # Unwound after the listener closes: cleanup() drains the open connections, whose
            # requests still commit (and wake forwarders) before the forwarders stop.
            stack.push_async_callback(runner.cleanup)
            # Before cleanup closes the connections: express replies still go out.
            stack.push_async_callback(self.app[EXPRESS].close, SHUTDOWN_S)
            stack.callback(self.tail.close)   # before cleanup: live views would hold it
            self.listener = await self._listen(runner, self.app[EXPRESS], self.app[FRONT_DOOR])
            stack.callback(self.listener.close)   # stop accepting
            prune = asyncio.create_task(self._prune_loop(), name="prune")
            stack.callback(prune.cancel)
            self._stack = stack.pop_all()
        log.info("outpost listening on %s:%d, spool %s (%d events queued)",
                 self.cfg.listen.host, self.port, spool.path, spool.depth)
        # After a start, so a failed one is one line.
        for notice in preflight.notices(self.cfg, queued=self._unrouted() is not None):
            log.warning("%s", notice)
        self._say_unrouted()

    def _make_runner(self, app: web.Application) -> web.AppRunner:
        # auto_decompress=False: dialects/body.py inflates bodies itself, bounded by each
        # API's limit (a gzip bomb stops there); aiohttp would inflate them first, unbounded.
        return web.AppRunner(app, handle_signals=False, access_log=None,
                             auto_decompress=False,
                             shutdown_timeout=SHUTDOWN_S,
                             # A pixel carries its event (up to 32 KB) base64'd in
                             # the URL: over aiohttp's 8 KB request-line default.
                             max_line_size=MAX_REQUEST_LINE,
                             # Set, not left to aiohttp's default: the express lane
                             # hands a head of more fields to aiohttp's 400.
                             max_headers=FIELDS_MAX,
                             lingering_time=LINGER_S,
                             logger=ServerLog())

    async def _listen(self, runner: web.AppRunner, lane: ExpressLane,
                      front_door: FrontDoor) -> asyncio.Server:
        assert runner.server is not None
        server = runner.server
        server.request_handler = front_door(server.request_handler)
        host, port = self.cfg.listen.host, self.cfg.listen.port
        # Not a TCPSite: every connection goes through ConnectionLimits' deadlines and cap.
        cap, backlog = fit_fd_limit(self.cfg.listen.max_connections)
        limits = ConnectionLimits(self.cfg.listen, cap, self.metrics, LINGER_S)
        try:
            listener = await asyncio.get_running_loop().create_server(
                limits.protocol_factory(server, lane), host, port,
                backlog=backlog,
                reuse_address=True)
        except OSError as exc:
            # The loop's own text repeats the address; a lookup failure's errno is negative.
            code = exc.errno or 0
            why = os.strerror(code) if code > 0 else exc.strerror or str(exc)
            if code == errno.EADDRNOTAVAIL:
                raise AddressNotHere(f"cannot listen on {host}:{port}: {why} (not an address "
                                     "of this machine, or not yet)") from exc
            if code == errno.EADDRINUSE:
                why += ("; another program listens there (another agent, perhaps): stop it, "
                        "or set listen.port to a free port")
            raise StartError(f"cannot listen on {host}:{port}: {why}") from exc
        self.port = int(listener.sockets[0].getsockname()[1])
        if not is_loopback_name(host):
            log.warning("listening on %s, which is not loopback: other machines can send "
                        "events to this agent", host)
        return listener

    def _monitor(self, cfg: Config) -> SyncMonitor:
        assert self.spool is not None
        return SyncMonitor(cfg.sync, source_for(cfg.sync), self.battery, self._held_age_s,
                           self.seams.timing, self._regate, self._release,
                           self.spool.released, self.spool.keep_released)

    async def _stop_sync(self) -> None:
        # The current monitor: a reload that changes [sync] replaces the one start built.
        if self.sync is not None:
            await self.sync.stop()

    def _sync_view(self) -> SyncView:
        assert self.sync is not None
        return self.sync.view()

    async def _stop_forwarding(self) -> None:
        # The current Supervisor: a reload replaces the one start built.
        if self.forwarding is not None:
            await self.forwarding.stop()

    def _reopened(self) -> None:
        # A spool that could not be opened at start (full disk) brings its queues later;
        # during Spool.open itself there is nothing to tell yet (start starts them all).
        if self.spool is not None:
            self._new_data(set(self.spool.streams))

    def _migrating(self) -> None:
        # From the spool's writer thread, every few seconds of a migration or a salvage: a
        # large one at start (8.6 s per million events) would outrun systemd's 90 s start
        # timeout. Later it extends only a stop's (a salvage during the drain): the unit
        # sets no RuntimeMaxSec.
        self.notifier.notify(f"EXTEND_TIMEOUT_USEC={EXTEND_START_USEC}")

    def _live(self) -> tuple[Config, Mapping[str, UpstreamState]]:
        # The Supervisor's own config: during a reload it stays the pair in force.
        assert self.forwarding is not None
        return self.forwarding.cfg, self.forwarding.states

    async def _held_age_s(self, lanes: tuple[int, ...], after: int) -> float | None:
        assert self.spool is not None
        return await held_age_s(self.cfg, self.spool, lanes, after)

    def _regate(self) -> None:
        if self.forwarding is not None:
            self.forwarding.regate()

    def _release(self) -> int:
        assert self.forwarding is not None   # built right after the monitor's start
        return self.forwarding.release()

    def _flush(self) -> None:
        assert self.forwarding is not None
        self.forwarding.flush()

    def _new_data(self, keys: set[str]) -> None:
        # Runs after every commit; a key already registered costs one set lookup.
        _register_keys(keys)
        if self.sync is not None:
            self.sync.on_new_data()
        if self.forwarding is not None:
            self.forwarding.on_new_data(keys)

    async def _watchdog_loop(self, interval: float) -> None:
        # Pinging from the event loop proves the loop itself is not stuck.
        while True:
            self.notifier.watchdog(self._status_line())
            await asyncio.sleep(interval)

    def _status_line(self) -> str:
        depth = self.spool.depth if self.spool is not None else 0
        return f"listening on {self.cfg.listen.host}:{self.port}, {depth} events queued"

    async def _prune_loop(self) -> None:
        assert self.spool is not None
        while True:
            await self.spool.prune()
            await asyncio.sleep(PRUNE_EVERY_S)

    async def reload(self) -> bool:
        """SIGHUP: re-read the config; upstream and [sync] changes take effect, the rest
        needs a restart. False if a stop asked for meanwhile cut it short: not applied."""
        # The file the running config came from, not the lookup again: that file removed
        # or renamed, the lookup finds none and the defaults would replace it silently.
        source = self.cfg.source if self.cfg.source != Config.source else None
        try:
            new = config_mod.load(self.config_path or source)
            # On a thread: it may ask the resolver, and probes the spool's directory.
            if found := await asyncio.to_thread(preflight.reload_problems, self.cfg, new):
                raise ConfigError(found[0])
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.metrics.reloads_refused += 1
            # It names the config's path, which may hold bytes of another encoding.
            self.metrics.reload_error = os_text(exc)
            self.metrics.reload_error_at = CLOCK.elapsed_s()
            return True
        # Only accept_keys of [listen] is applied on reload: the server, its guard and its
        # connection limits are built once.
        stale = [f"listen.{f.name}" for f in dataclasses.fields(new.listen)
                 if f.name != "accept_keys"
                 and getattr(new.listen, f.name) != getattr(self.cfg.listen, f.name)]
        # Of the other sections, only the upstreams and [sync]: [storage], [device] (its
        # facts are read at start), [log] and any section to come are named.
        stale += [f"[{f.name}]" for f in dataclasses.fields(new)
                  if f.name not in _RELOADED and getattr(new, f.name) != getattr(self.cfg, f.name)]
        if stale:
            log.warning("reload: %s changed, which needs a restart", ", ".join(stale))
        # What is in force from now on: the parts a reload applies, the rest as started, so
        # that the next reload compares with what runs (names an unapplied change again,
        # and not a change back to it).
        new = dataclasses.replace(
            self.cfg, **{name: getattr(new, name) for name in _RELOADED - {"listen"}},
            listen=dataclasses.replace(self.cfg.listen, accept_keys=new.listen.accept_keys))
        assert self.spool is not None and self.sink is not None and self.sync is not None
        _register_secrets(new)
        old = self.forwarding
        sync_changed = new.sync != self.cfg.sync
        self.cfg = new
        # Requests from now on are held to the new routes' limits (docs/mapping.md §5), and
        # to the new keys: not only after the wait below, up to 5 s for a revoked key.
        self.sink.set_limits(_limits(new, self.facts.machineId))
        self.sink.set_accept_keys(new.listen.accept_keys)
        self.sink.enrich.lanes = Lanes(new.upstreams)   # and classified by the new rules
        # In-flight batches settle before the new forwarders start: nothing sent twice.
        if old is not None:
            await old.stop(handover=True)
        # The new rules' sources, read before the new loops ask them (up to 2 s each).
        if sync_changed and not self._stop.is_set():
            await self.sync.stop()
            was, self.sync = self.sync, self._monitor(new)
            self.sync.carry(was)
            await self.sync.start()
            log.info("transmit profile now %s (%s)", self.sync.profile.mode,
                     self.sync.profile.reason)
        if self._stop.is_set():
            # Asked during those waits: new forwarders would send again what the first cut
            # short, and the stop would wait for them too. The spool keeps it all.
            log.info("a stop was asked for during the reload: stopping now, the forwarders "
                     "not started again")
            return False
        self.forwarding = Supervisor(new, self.spool, self.facts, self.metrics, self.seams,
                                     self.sync.may_send, self.tail.acked)
        if old is not None:
            _carry_states(old, self.forwarding)
            self.forwarding.take_over(old)
        await self.forwarding.start()
        # Maybe new routes, maybe new rules: a release under way goes on.
        self.sync.forwarders_started(self.forwarding.release)
        # Counted once in force: one a stop cut short is neither applied nor refused.
        self.metrics.reloads_applied += 1
        self.metrics.reload_error = self.metrics.reload_error_at = None
        self.metrics.needs_restart = stale
        log.info("configuration reloaded from %s", new.source)
        for note in preflight.notes(new):   # as a start's: `kill -HUP` runs no check-config
            log.warning("%s", note)
        self._say_unrouted()
        return True

    def _say_unrouted(self) -> None:
        """Queued events whose key no upstream takes now (an upstream removed, its keys
        narrowed): /status shows them, and the log of the start or reload that left them
        so says it too. From the sums the books keep per route (as status), and keys by
        fingerprint: they are credentials."""
        assert self.spool is not None
        if (unrouted := self._unrouted()) is None:
            return
        named = [logs.fingerprint(key) for key in self.spool.books.keys_of(None, UNROUTED_NAMED)]
        more = unrouted.keys - len(named)
        which = (f"{unrouted.depth} queued events of {unrouted.keys} key(s) "
                 f"({', '.join(named)}{f' and {more} more' if more > 0 else ''})")
        expire = f"they expire after storage.max_age_days ({self.cfg.storage.max_age_days} days)"
        if not self.cfg.upstreams:   # the start's notice of that (preflight.notices) in one
            log.warning("%s; %s", preflight.no_upstream(f"{which} are kept in the spool, not "
                                                        "sent,"), expire)
            return
        log.warning("%s match no upstream: kept in the spool, not sent, until a reload or "
                    "restart routes their key; %s", which, expire)

    def _unrouted(self) -> Totals | None:
        """The books' sums of the queued events no upstream takes; None if there are none."""
        assert self.spool is not None
        unrouted = self.spool.books.groups.get(None)
        return unrouted if unrouted is not None and unrouted.depth else None

    async def stop(self) -> None:
        """Stop accepting, let running requests commit, then stop forwarders and the spool."""
        stack, self._stack = self._stack, None
        if stack is not None:
            # The waits below take up to ~17 s, and nothing else is logged until their end:
            # said now, a drain is not taken for a hang (and cut short by a second Ctrl-C).
            self._say_stopping()
            await stack.aclose()
        log.info("outpost stopped")

    def _say_stopping(self) -> None:
        batches = self.forwarding.batches_in_flight() if self.forwarding is not None else 0
        # As docs/operations.md adds them up: the express lane's requests, then the others',
        # the apps' websockets' close, the batches in flight, an upstream websocket's close.
        bound = 2 * SHUTDOWN_S + SOCKET_CLOSE_S + self.seams.grace_s + UPLINK_CLOSE_S
        log.info("stopping: no new connections; waiting for the requests of %d open "
                 "connection(s) and %d batch(es) in flight, up to about %g s; events not yet "
                 "forwarded stay in the spool (%d events queued)",
                 self.metrics.connections_open, batches, bound,
                 self.spool.depth if self.spool is not None else 0)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        # Before the start: a service manager's stop during a slow start (a large spool, a
        # slow bus) is graceful too, after the start, rather than the default SIGTERM death.
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if sys.platform != "win32" else ()
        for sig, handler in zip(signals, (self._interrupt, self._stop.set, self._reload.set)):
            loop.add_signal_handler(sig, handler)
        if startup_signals.reload_asked():   # a SIGHUP before these handlers: once started
            self._reload.set()
        try:
            await self._unless_forced(self.start(), "during the start")
            if self._stop.is_set():   # not ready, no watchdog: straight to the stop
                log.info("a stop was asked for during the start: stopping now")
                await self._stop_serving()
            else:
                await self._serve_until_stopped()
            if self.exits:
                # Stopped: the process ends here, its handlers still in place. Removed, they
                # gave SIGTERM and SIGHUP their default actions back for the rest of the exit
                # (tens of ms, or as long as a thread of the loop's executor takes): a second
                # `kill`, or a reload, then ended it by the signal, not with exit 0.
                _exit_now(0)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        return 0

    async def _serve_until_stopped(self) -> None:
        assert self.spool is not None
        self.notifier.ready(self._status_line())
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            watchdog = asyncio.create_task(self._watchdog_loop(interval), name="watchdog")
            assert self._stack is not None
            self._stack.callback(watchdog.cancel)
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
                    # Cut short, the reload is not done: systemd hears STOPPING=1 next.
                    if await self._unless_forced(self.reload(), "during a reload; events not "
                                                                "yet forwarded stay in the spool"):
                        self.notifier.ready()
        finally:
            await self._stop_serving()

    async def _stop_serving(self) -> None:
        self.notifier.stopping()
        await self._unless_forced(self.stop(), "without finishing the drain; events not "
                                               "yet forwarded stay in the spool")

    def _interrupt(self) -> None:
        """SIGINT: the first starts the graceful stop, a second one during it forces exit
        (as uvicorn's handler does). Only sets flags; ``_unless_forced`` acts on them."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def _unless_forced(self, work: Coroutine[Any, Any, T], when: str) -> T:
        """Await ``work`` (the start, a reload's wait for the batches in flight, or the
        stop's drain), unless a second SIGINT comes first: then exit at once."""
        working = asyncio.ensure_future(work)
        forced = asyncio.ensure_future(self._force.wait())
        await asyncio.wait({working, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not working.done():
            log.warning("second interrupt: exiting now %s", when)
            _exit_now(EXIT_FORCED)
        return working.result()   # raises what the work raised


def _exit_now(code: int) -> None:
    """Exit without unwinding, as a kill would: the spool commits every event before its
    app is answered, so nothing answered is lost; requests still being read get no answer
    and their apps send them again."""
    logging.shutdown()   # the log line above is written out first
    if sys.stdout is not None:   # None: started with it closed (`outpost run >&-`)
        sys.stdout.flush()
    os._exit(code)


def _register_secrets(cfg: Config) -> None:
    """Accepted keys, routed keys, upstream keys and proxy credentials are all credentials
    (an upstream URL holds none: config refuses user:password@ in it)."""
    for key in cfg.listen.accept_keys:
        logs.register_secret(key)
    for up in cfg.upstreams:
        for key in (up.key, *up.keys):
            if key and key != "*":
                logs.register_secret(key)
    # A proxy's credentials (agent.toml's, or the environment's): sent to the proxy only.
    for secret in proxy.secrets(cfg.upstreams):
        logs.register_secret(secret)


def _limits(cfg: Config, machine: str) -> RouteLimits:
    return RouteLimits(cfg, lambda up: uplink_class(up.protocol).event_limit(up),
                       lambda up: uplink_class(up.protocol).family,
                       lambda up: uplink_class(up.protocol).key_rule(up), machine)


def _register_keys(keys: Iterable[str]) -> None:
    """App keys reach the logs (e.g. in upstream paths); never show them."""
    for key in keys:
        logs.register_secret(key)


# Config fields a reload applies (or, [listen], names field by field).
_RELOADED = frozenset({"listen", "upstreams", "sync", "source"})


def _carry_states(old: Supervisor, new: Supervisor) -> None:
    """Keep an upstream's last ack, last error and totals across a reload."""
    for name, state in new.states.items():
        if name in old.states:
            # Not its parked keys' count: take_over parks those the new config keeps. Nor
            # its keys in line (old.stop ended the line): the new loops start them again.
            new.states[name] = dataclasses.replace(old.states[name], protocol=state.protocol,
                                                   state=state.state, parked=0, waiting=0)
