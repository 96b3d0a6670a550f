"""The configuration's types: frozen dataclasses, one per agent.toml table.

Read and validated by agent/config.py; every part of the agent takes these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from agent import paths

# --config's help, the same for every command.
CONFIG_HELP = ("the config file (default: $OUTPOST_CONFIG, else ./agent.toml, else agent.toml in "
               "the config directory `outpost doctor` shows, else the built-in defaults)")


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    accept_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # Extensions: deadlines and a cap, so idle or slow connections cannot use up the
    # agent's file descriptors (agent/server/connections.py).
    idle_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    # Extension: MiB of request bodies being read, parsed or committed at once; past
    # it apps get 503/429 + Retry-After. The default keeps the agent's peak RSS under
    # 150 MB with eight maximum-size posts at once on any route (docs/operations.md).
    max_inflight_mb: int = 6
    # Extension: keys known at most while accept_keys is empty (any key taken). Each key
    # stored stays in memory while the agent runs (~1 KB), and its queue row outlives its
    # events, so neither the spool's size nor its expiry bounds how many an app invents.
    max_keys: int = 10_000


@dataclass(frozen=True)
class StorageConfig:
    path: str = ""
    max_size_mb: int = 512
    when_full: str = "reject"
    max_age_days: int = 30
    sync: str = "full"
    # Extension: how long acked dedupe keys are remembered, so a client
    # resending after its reply was lost is still stored only once.
    dedupe_window_h: int = 24
    # Extension: at most this many keys in the in-memory dedupe index (~90 B each, ~130 B at
    # the peak of its table's rebuild, bench/index_memory.py); past it the oldest are
    # forgotten early (dedupe_forgotten) and delivery is at-least-once.
    dedupe_max_keys: int = 1_000_000
    # Extension: the Retry-After of a refusal for want of room. The Segment SDKs that honour
    # it keep a refused batch for a number of tries, so the longer, the longer they hold it.
    full_retry_after_s: int = 30

    def resolved_path(self) -> Path:
        return Path(self.path).expanduser() if self.path else paths.default_spool_path()

    @property
    def max_bytes(self) -> int:
        return self.max_size_mb * 1024 * 1024


@dataclass(frozen=True)
class DeviceConfig:
    platform: str = ""
    osVersion: str = ""
    totalRam: float = 0
    language: str = ""
    arch: str = ""
    machineId: str = ""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    protocol: str
    url: str
    keys: tuple[str, ...] = ("*",)
    key: str = ""
    batch_max_events: int = 500
    batch_max_bytes: int = 500_000
    flush_interval_s: float = 2.0
    # Extensions.
    gzip: bool = False
    timeout_s: float = 30.0
    max_in_flight: int = 4
    # Priority lanes: what this upstream's keys send first, besides init and error
    # (agent/families/lanes.py): event types, and event names.
    priority_types: tuple[str, ...] = ()
    priority_events: tuple[str, ...] = ()
    # The forward proxy its traffic goes through (agent/uplinks/proxy.py): None, not set,
    # reads HTTPS_PROXY/HTTP_PROXY/NO_PROXY; "" is a direct connection whatever they say.
    proxy: str | None = None
    # Not from agent.toml: the bytes the forwarder cuts batches to, under batch_max_bytes,
    # while the upstream takes no larger ones (forwarder/supervisor.py ``_sized``). An event
    # over the cut still goes, alone: only batch_max_bytes refuses one.
    batch_cut_bytes: int | None = field(default=None, metadata={"set_by": "forwarder"})

    @functools.cached_property
    def _routed(self) -> frozenset[str]:
        # A set, not the tuple: every start and reload routes each queued key, and a scan
        # of thousands of listed keys for each made them grow with the list's square.
        return frozenset(self.keys)

    def matches(self, app_key: str) -> bool:
        routed = self._routed
        return "*" in routed or app_key in routed

    @property
    def batch_bytes(self) -> int:
        """The most bytes a batch to this upstream holds now."""
        return self.batch_max_bytes if self.batch_cut_bytes is None else self.batch_cut_bytes


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class SyncConfig:
    """Transmit profiles: what forwarding does on a metered network and on a low battery.

    Each rule is "normal", "priority_only" (only the high lane is sent) or "hold".
    ``max_hold_h`` sends everything held once the oldest held event is that old, so a
    hold never outlives it.
    """

    on_metered: str = "normal"
    on_low_battery: str = "normal"
    low_battery_pct: int = 20
    max_hold_h: float = 24.0
    # NetworkManager's bus: "" means $DBUS_SYSTEM_BUS_ADDRESS, else the system bus.
    dbus_address: str = ""


@dataclass(frozen=True)
class Config:
    """The whole agent configuration; passed into every component's constructor."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    source: str = "<defaults>"

    def route(self, app_key: str) -> UpstreamConfig | None:
        """The first upstream whose keys match ``app_key``."""
        for up in self.upstreams:
            if up.matches(app_key):
                return up
        return None

    def route_name(self, app_key: str) -> str | None:
        """The name of the upstream that takes ``app_key``; None if none does."""
        up = self.route(app_key)
        return up.name if up is not None else None
