"""agent.toml, read once into frozen dataclasses and validated eagerly.

Every unknown key or bad value raises ConfigError naming the key, so a typo
stops startup instead of surfacing at the first request.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from agent import paths
from agent.families import nucleus, segment
from agent.families.facts import fact_problem
from agent.logs import fingerprint
from agent.paths import not_a_file
from agent.settings import (
    Config,
    DeviceConfig,
    ListenConfig,
    LogConfig,
    StorageConfig,
    SyncConfig,
    UpstreamConfig,
)
from agent.uplinks import proxy, registry


class ConfigError(ValueError):
    """A config file problem; the message names the offending key."""


T = TypeVar("T")


MAX_INT = 2**53   # the largest integer every JSON reader keeps exactly
# Far above any real config (thousands of keys); a bigger file is not one, and is not read
# whole: a sparse or endless one would take the machine's memory.
MAX_FILE_MIB = 1


def _take(table: dict[str, Any], where: str, name: str, kind: type[T] | tuple[type, ...],
          default: T, check: Callable[[Any], str | None] | None = None) -> T:
    key = f"{where}.{name}" if where else name
    if name not in table:
        return default
    value = table.pop(name)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; never accept true for a number.
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{key}: expected {_kind_name(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise ConfigError(f"{key}: expected {_kind_name(kinds)}, got {type(value).__name__}")
    if problem := _unusable(value):
        raise ConfigError(f"{key}: {problem}")
    if check is not None and (problem := check(value)):
        raise ConfigError(f"{key}: {problem}")
    return value  # type: ignore[return-value]


def _unusable(value: Any) -> str | None:
    """What no key takes: a NUL in a string (no path or host holds one), a number no JSON
    reader keeps exactly (`/status` shows them), infinity."""
    if isinstance(value, str) and "\0" in value:
        return "must not contain a NUL character"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"{value} is out of range (at most {MAX_INT})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value}"
    return None


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _str_list(secret: bool = False) -> Callable[[Any], str | None]:
    """Non-empty printable strings; a ``secret`` list's (keys) named by fingerprint only."""
    def check(value: Any) -> str | None:
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            # A key nested in an array or a table, or an unquoted numeric app id, is a key.
            got = _kind_name((type(bad[0]),)) if secret and bad[0] != "" else repr(bad[0])
            return f"every entry must be a non-empty string, got {got}"
        # A key with a line break would split every log line naming it.
        odd = [v for v in value if not v.isprintable()]
        if not odd:
            return None
        return ("every entry must be printable (no line breaks or control characters), got "
                + (f"the key {fingerprint(odd[0])}" if secret else repr(odd[0])))
    return check


def _secret(owner: str) -> Callable[[Any], str | None]:
    """A credential of ``owner``'s: printable (with a pasted line break, every request's
    header would be refused by the HTTP client, every send failing), named by fingerprint."""
    def check(value: Any) -> str | None:
        if value.isprintable():
            return None
        return ("must be printable (no line breaks, tabs or control characters), got the key "
                f"{fingerprint(value)} of {owner}")
    return check


def _sendable(name: str, protocol: str, key: str) -> str | None:
    """An upstream's own key its protocol cannot carry as it is: every event would reach
    another path, or the account named by the key's start (ingest refuses such an app key
    where no upstream key replaces it)."""
    why = registry.protocol(protocol).key_problem(key)
    return None if why is None else (
        f"upstream {name!r} would be sent this key {why}: every event would go elsewhere; "
        "set it to the key the upstream issued")


def _positive(value: Any) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _at_most(unit: int, what: str) -> Callable[[Any], str | None]:
    """Positive, and within MAX_INT once in the agent's own unit (``unit`` of it): bytes and
    milliseconds past it broke /status (orjson's 64 bits) and every expiry run (SQLite's)."""
    top = MAX_INT // unit

    def check(value: Any) -> str | None:
        if value > top:
            return f"must be at most {top} ({what}), got {value}"
        return None
    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
    return check


def _no_leftovers(table: dict[str, Any], where: str) -> None:
    if table:
        name = sorted(table)[0]
        raise ConfigError(f"{where + '.' if where else ''}{name}: unknown key")


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.pop(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table")
    return dict(value)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origins(value: Any) -> str | None:
    """Entries a browser can send as its Origin: the guard compares the strings (case and
    a trailing slash aside), so any other entry matches no page, and its site gets 403."""
    for entry in value:
        if why := _not_an_origin(entry):
            return (f"{entry!r} {why}: an entry is an Origin as browsers send it, "
                    'scheme://host[:port] (such as "https://app.example"), "*" or "null"')
    return None


def _not_an_origin(entry: str) -> str | None:
    if entry == "*" or entry.lower() == "null":   # the guard lower-cases the entries
        return None
    if any(c.isspace() for c in entry):   # urlsplit reads past it; no browser sends one
        return "holds a space"
    try:
        parts = urlsplit(entry)
        port = parts.port
    except ValueError:
        return "is not a URL"
    if not parts.scheme or not parts.netloc or not parts.hostname:
        return "has no scheme://host"
    if parts.path.rstrip("/") or "?" in entry or "#" in entry or "@" in parts.netloc:
        return "holds more than scheme://host[:port] (a path, a query, a user)"
    # After an IPv6 address's brackets: "host:" or "host:08080" is no port as a browser
    # writes it (urlsplit reads none, or 8080), and the guard compares the strings.
    _, colon, written = parts.netloc.rpartition("]")[2].partition(":")
    if colon and written != str(port):
        return "writes its port as no browser does (digits, no leading zero)"
    if port is not None and port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        return f"names the default port {port}, which browsers leave out of an Origin"
    return None


def _no_star(value: Any) -> str | None:
    """"*" is every key in an upstream's keys; here it would be the one key "*", and every
    app would be refused."""
    if "*" in value:
        return ('"*" is not a wildcard here (it would accept only an app whose key is "*"): '
                "to accept any key, set accept_keys = []")
    return None


def _host(value: str) -> str | None:
    """A name or an address alone: the commands write it into the agent's URL, where a port
    or a URL's other parts (`127.0.0.1:8765`, `[::1]`) failed every one that reaches the
    agent (`outpost tail`, `dead`: a traceback) while `run` refused it as unresolvable."""
    if not value:
        return "must not be empty"
    try:
        ipaddress.ip_address(value)   # an IPv6 address's colons (and its %scope) are its own
        return None
    except ValueError:
        pass
    if any(c in ":/@?#%[]\\" or c.isspace() or not c.isprintable() for c in value):
        return (f"must be a host name or an IP address alone, without a port (that is "
                f"listen.port), brackets or other parts of a URL, got {value!r}")
    return None


def _listen(t: dict[str, Any]) -> ListenConfig:
    w = "listen"
    out = ListenConfig(
        host=_take(t, w, "host", str, "127.0.0.1", _host),
        port=_take(t, w, "port", int, 8765,
                   lambda v: None if 0 <= v <= 65535 else f"must be 0..65535, got {v}"),
        accept_keys=tuple(_take(t, w, "accept_keys", list, [],
                                lambda v: _str_list(secret=True)(v) or _no_star(v))),
        allowed_origins=tuple(_take(t, w, "allowed_origins", list, [],
                                    lambda v: _str_list()(v) or _origins(v))),
        idle_timeout_s=float(_take(t, w, "idle_timeout_s", (int, float), 60.0, _positive)),
        header_timeout_s=float(_take(t, w, "header_timeout_s", (int, float), 10.0, _positive)),
        body_timeout_s=float(_take(t, w, "body_timeout_s", (int, float), 30.0, _positive)),
        max_connections=_take(t, w, "max_connections", int, 1024, _positive),
        max_inflight_mb=_take(t, w, "max_inflight_mb", int, 6,
                              lambda v: _positive(v) or _at_most(2**20, "MiB")(v)),
        max_keys=_take(t, w, "max_keys", int, 10_000, _positive),
    )
    _no_leftovers(t, w)
    return out


def _spool_file(value: Any) -> str | None:
    """A directory meant ("data/", "data/."): Path drops the slash and a last ".", and a
    file of that name would be made the spool where the operator looks for a directory
    holding it. Nor a control character: the line break a TOML multi-line string keeps
    before its closing quotes made the spool (and its lock file, its -wal) under a name
    no one looks for. Not isprintable(): it refuses every space but ASCII's too, and a
    directory's name may hold one (Japanese's ideographic space, macOS's no-break ones)."""
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        return f"must be printable (no line breaks or control characters), got {value!r}"
    if (directory := paths.directory_meant(value)) is not None:
        return (f"names a directory; name the spool file in it, such as "
                f"{os.path.join(directory, 'spool.db')}")
    return None


def _storage(t: dict[str, Any]) -> StorageConfig:
    w = "storage"
    out = StorageConfig(
        path=_take(t, w, "path", str, "", _spool_file),
        max_size_mb=_take(t, w, "max_size_mb", int, 512,
                          lambda v: _positive(v) or _at_most(2**20, "MiB")(v)),
        when_full=_take(t, w, "when_full", str, "reject", _one_of("reject", "drop_oldest")),
        max_age_days=_take(t, w, "max_age_days", int, 30,
                           lambda v: _positive(v) or _at_most(86_400_000, "days")(v)),
        sync=_take(t, w, "sync", str, "full", _one_of("full", "normal")),
        dedupe_window_h=_take(t, w, "dedupe_window_h", int, 24,
                              lambda v: ("must be 0 or more" if v < 0
                                         else _at_most(3_600_000, "hours")(v))),
        dedupe_max_keys=_take(t, w, "dedupe_max_keys", int, 1_000_000, _positive),
        # The SDKs cap a Retry-After at 300 s: a longer one would only be shortened.
        full_retry_after_s=_take(t, w, "full_retry_after_s", int, 30,
                                 lambda v: None if 1 <= v <= 300 else f"must be 1..300, got {v}"),
    )
    _no_leftovers(t, w)
    return out


def _device(t: dict[str, Any]) -> DeviceConfig:
    w = "device"
    out = DeviceConfig(
        platform=_take(t, w, "platform", str, "", fact_problem),
        osVersion=_take(t, w, "osVersion", str, "", fact_problem),
        totalRam=_take(t, w, "totalRam", (int, float), 0,
                       lambda v: None if v >= 0 else "must be 0 or more"),
        language=_take(t, w, "language", str, "", fact_problem),
        arch=_take(t, w, "arch", str, "", fact_problem),
        machineId=_take(t, w, "machineId", str, "", fact_problem),
    )
    _no_leftovers(t, w)
    return out


_rule = _one_of("normal", "priority_only", "hold")
# What an upstream's priority_types may name: a type of either family (an event of the
# other family is mapped, but classified as it was stored).
EVENT_TYPES = frozenset(nucleus.KNOWN_TYPES - {"heartbeat"}) | segment.TYPES


def _event_types(value: Any) -> str | None:
    bad = [v for v in value if v not in EVENT_TYPES]
    if bad:
        return (f"unknown event type {bad[0]!r}; one of "
                f"{', '.join(sorted(EVENT_TYPES))}")
    return None


def _dbus_address(value: str) -> str | None:
    """An address the D-Bus client can connect to, read as it reads one: any other (a
    socket's path, a tcp: address) failed every metered reading, taken for not metered,
    and a hold for a metered link sent on it. A socket not there yet is tried at run time."""
    if value in ("", "SYSTEM", "SESSION"):   # the last two: the client's names of the buses
        return None
    if not value.isprintable():
        return f"must be printable (no line breaks or control characters), got {value!r}"
    # Imported here: only a config that sets one pays for it.
    from jeepney.bus import get_connectable_addresses
    try:
        next(get_connectable_addresses(value))
    except (ValueError, RuntimeError):
        return (f"{value!r} is no D-Bus address this agent can connect to: write a unix one, "
                'such as "unix:path=/run/dbus/system_bus_socket" (or "" for the system bus)')
    return None


def _sync(t: dict[str, Any]) -> SyncConfig:
    w = "sync"
    out = SyncConfig(
        on_metered=_take(t, w, "on_metered", str, "normal", _rule),
        on_low_battery=_take(t, w, "on_low_battery", str, "normal", _rule),
        low_battery_pct=_take(t, w, "low_battery_pct", int, 20,
                              lambda v: None if 1 <= v <= 100 else f"must be 1..100, got {v}"),
        max_hold_h=float(_take(t, w, "max_hold_h", (int, float), 24.0, _positive)),
        dbus_address=_take(t, w, "dbus_address", str, "", _dbus_address),
    )
    _no_leftovers(t, w)
    return out


def _url_check(protocol: str) -> Callable[[Any], str | None]:
    schemes = tuple(f"{s}://" for s in registry.protocol(protocol).schemes)

    def check(value: Any) -> str | None:
        # Messages never quote the URL: it may hold a password.
        if any(c.isspace() or not c.isprintable() for c in value):
            # urlsplit drops tabs and line breaks before it looks: checked as another URL.
            return "must not contain whitespace or control characters"
        if not value.startswith(schemes):
            return f"must start with {' or '.join(schemes)} for {protocol}"
        try:
            parts = urlsplit(value)
            host, port = parts.hostname, parts.port   # .port raises ValueError past 65535
        except ValueError:
            return "is not a valid URL"
        if port == 0:   # no server listens there; the probe read it as none, port 80
            return "names port 0; write the upstream's port, or none for the scheme's default"
        if "@" in parts.netloc:
            # /status, the status page and doctor show the URL; credentials go in `key`
            # (segment-http sends it as Basic auth, and aiohttp refuses both at once).
            return ('must not contain a user name or password (user:password@); '
                    'put the upstream\'s credential in "key"')
        if "?" in value or "#" in value:
            # No protocol takes anything there (each adds its own path to the url), and
            # /status and the page show the url: a credential there would be shown.
            return ('must not contain a query or fragment (?... or #...); '
                    'put the upstream\'s credential in "key"')
        if not host:
            return "has no host"
        return None if proxy.resolvable(host) else proxy.UNRESOLVABLE
    return check


def _proxy_url(value: str) -> str | None:
    """An upstream's ``proxy``: "" (direct) or http://[user:password@]host:port, never
    quoted back (it may hold a password)."""
    if not value:
        return None
    try:
        proxy.parse(value, "agent.toml")
    except proxy.BadProxy as exc:
        return str(exc).removeprefix("proxy ")
    return None


def _upstream(t: dict[str, Any], i: int) -> UpstreamConfig:
    w = f"upstream[{i}]"
    if "name" not in t:
        raise ConfigError(f"{w}.name: missing")
    if "protocol" not in t:
        raise ConfigError(f"{w}.protocol: missing")
    if "url" not in t:
        raise ConfigError(f"{w}.url: missing")
    protocol = _take(t, w, "protocol", str, "", _one_of(*registry.protocols()))
    name = _take(t, w, "name", str, "", lambda v: "must not be empty" if not v else None
                 if v.isprintable() else f"must be printable (no line breaks or control "
                 f"characters), got {v!r}")
    out = UpstreamConfig(
        name=name,
        protocol=protocol,
        url=_take(t, w, "url", str, "", _url_check(protocol)),
        keys=tuple(_take(t, w, "keys", list, ["*"], lambda v: _str_list(secret=True)(v)
                         or (None if v else "must not be empty"))),
        key=_take(t, w, "key", str, "", lambda v: _secret(f"upstream {name!r}")(v)
                  or _sendable(name, protocol, v)),
        batch_max_events=_take(t, w, "batch_max_events", int, 500,
                               lambda v: None if 1 <= v <= 2500 else "must be 1..2500"),
        batch_max_bytes=_take(t, w, "batch_max_bytes", int, 500_000,
                              lambda v: None if 1024 <= v <= 500_000 else "must be 1024..500000"),
        flush_interval_s=float(_take(t, w, "flush_interval_s", (int, float), 2.0, _positive)),
        gzip=_take(t, w, "gzip", bool, False),
        timeout_s=float(_take(t, w, "timeout_s", (int, float), 30.0, _positive)),
        max_in_flight=_take(t, w, "max_in_flight", int, 4,
                            lambda v: None if 1 <= v <= 64 else "must be 1..64"),
        priority_types=tuple(_take(t, w, "priority_types", list, [],
                                   lambda v: _str_list()(v)
                                   or _event_types(v))),
        priority_events=tuple(_take(t, w, "priority_events", list, [],
                                    _str_list())),
        proxy=_take(t, w, "proxy", str, None, _proxy_url),
    )
    _no_leftovers(t, w)
    return out


def parse(raw: dict[str, Any], source: str = "<string>") -> Config:
    """Validate a decoded TOML document into a Config."""
    raw = dict(raw)
    listen = _listen(_table(raw, "listen"))
    storage = _storage(_table(raw, "storage"))
    device = _device(_table(raw, "device"))
    log_t = _table(raw, "log")
    log = LogConfig(level=_take(log_t, "log", "level", str, "info",
                                _one_of("debug", "info", "warning", "error")))
    _no_leftovers(log_t, "log")
    sync = _sync(_table(raw, "sync"))
    ups_raw = raw.pop("upstream", [])
    if not isinstance(ups_raw, list) or not all(isinstance(u, dict) for u in ups_raw):
        raise ConfigError("upstream: expected an array of tables ([[upstream]])")
    upstreams = tuple(_upstream(dict(u), i) for i, u in enumerate(ups_raw))
    names = [u.name for u in upstreams]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"upstream[{i}].name: duplicate name {name!r}")
    _no_leftovers(raw, "")
    return Config(listen=listen, storage=storage, device=device, upstreams=upstreams,
                  log=log, sync=sync, source=source)


def _read(path: Path) -> bytes:
    """The file's bytes; ConfigError for what is not a config file: a fifo (nothing may
    ever write it, and a reload would wait on it too), a device (/dev/zero never ends), or
    a file too big to be one."""
    # O_NONBLOCK: opening a fifo no one writes would wait there; it is refused below.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if kind := not_a_file(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file ({kind}); name the config file itself")
        data = fh.read(MAX_FILE_MIB * 2**20 + 1)
    if len(data) > MAX_FILE_MIB * 2**20:
        raise ConfigError(f"{path}: larger than {MAX_FILE_MIB} MiB, too big for a config file; "
                          "name the agent.toml file")
    return data


def load_file(path: Path) -> Config:
    try:
        # Notepad and PowerShell 5 start UTF-8 with a byte-order mark, unseen in
        # an editor; tomllib takes it for a statement ("invalid TOML at line 1, column 1").
        raw = tomllib.loads(_read(path).decode("utf-8").removeprefix("\ufeff"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except RecursionError as exc:   # tomllib recurses per level: no config nests hundreds
        raise ConfigError(f"{path}: invalid TOML: arrays or inline tables nested too deeply "
                          "for a config file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are "
                          "UTF-8") from exc
    try:
        cfg = parse(raw, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    cfg = _spool_beside(cfg, path)
    spool = cfg.storage.resolved_path() if cfg.storage.path else None
    # The agent would take it for a corrupt spool: moved aside, a database in its place.
    if spool and os.path.exists(spool) and os.path.samefile(spool, path):
        raise ConfigError(f"{path}: storage.path: names the config file itself; set it to "
                          f"the spool's own file, such as {spool.parent / 'spool.db'}")
    return cfg


def _spool_beside(cfg: Config, path: Path) -> Config:
    """A relative storage.path, taken from the config file's directory: from the working
    directory it named another spool for each command run elsewhere (the service's is /)."""
    try:
        spool = Path(cfg.storage.path).expanduser()
    except RuntimeError as exc:   # "~outpost/spool.db" before that user exists
        home = cfg.storage.path.split("/")[0]
        raise ConfigError(f"{path}: storage.path: no home directory for {home} (no such "
                          "user, or no HOME); write the spool's path in full") from exc
    if not cfg.storage.path or spool.is_absolute():
        return cfg
    storage = replace(cfg.storage, path=str(path.absolute().parent / spool))
    return replace(cfg, storage=storage)


def find_config_file(explicit: str | None = None) -> Path | None:
    """Lookup order: --config, $OUTPOST_CONFIG, ./agent.toml, platformdirs."""
    if explicit == "":
        # A variable that expanded to nothing, say: never the defaults' lookup unsaid.
        raise ConfigError("the config file named is empty (\"\"): name a file, or leave "
                          "the option out to use the default lookup")
    if explicit:
        return Path(explicit)
    env = os.environ.get("OUTPOST_CONFIG")
    if env == "":
        # Set but empty (`OUTPOST_CONFIG=$UNSET_VAR`): refused as an empty --config is.
        raise ConfigError("OUTPOST_CONFIG is set but empty: name a file in it, or unset it "
                          "to use the default lookup")
    if env is not None:
        return Path(env)
    for candidate in (Path("agent.toml"), paths.config_dir() / "agent.toml"):
        try:
            if candidate.is_file():
                return candidate
            _no_file_there(candidate)
        except OSError as exc:
            # A directory this user may not search (`sudo -u outpost outpost status` from
            # /root): whether the file is there cannot be told, and the defaults would
            # stand in for it unsaid.
            raise ConfigError(f"cannot look for {candidate.absolute()}: "
                              f"{exc.strerror or exc}; name the config file with --config "
                              "or $OUTPOST_CONFIG, or give this user search access to "
                              f"{candidate.absolute().parent}") from exc
    return None


def _no_file_there(candidate: Path) -> None:
    """Passing over what is at a lookup place but is no file would let the defaults (another
    spool, no upstream) stand in for the config unsaid: a symlink to a file not there (kept
    on a mount not up yet, or moved), a directory."""
    if not os.path.exists(candidate):
        if candidate.is_symlink():
            raise ConfigError(f"{candidate.absolute()} is a symlink to "
                              f"{os.readlink(candidate)}, which does not exist; restore it, "
                              "or name the config file with --config or $OUTPOST_CONFIG")
        return
    kind = not_a_file(candidate.stat().st_mode)
    raise ConfigError(f"{candidate.absolute()} is not a config file ({kind}); remove it, or "
                      "name the config file with --config or $OUTPOST_CONFIG")


def load(explicit: str | None = None) -> Config:
    """Find and load the config; built-in defaults when no file exists."""
    found = find_config_file(explicit)
    return load_file(found) if found is not None else Config()
