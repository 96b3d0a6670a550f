"""Operator mistakes caught before the agent starts, each as one line naming the problem
and the fix (issue 14): a spool location this user cannot write, a read-only filesystem
(systemd's ProtectSystem=strict outside the state directory), a listen.host that does not
resolve; and, once started, what a newcomer on the defaults should know. The checks leave
nothing on disk (one makes and removes a name of its own), so `check-config` runs them too."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import os
import shlex
import socket
import stat
import sys
import tempfile
from pathlib import Path

from agent import paths
from agent.logs import fingerprint
from agent.settings import Config
from agent.terminal import systemd_word
from agent.uplinks.registry import uplink_class

STORAGE_FIX = "set storage.path to a file in a directory this user can write"
# Where `systemctl edit outpost` writes the system unit's drop-ins.
DROP_INS = Path("/etc/systemd/system/outpost.service.d")
# As agent/spool/schema.py says it (not imported: every command would load the spool).
SPECIAL_FIX = "set storage.path to a file of the spool's own (the agent creates it)"


def problems(cfg: Config) -> list[str]:
    """Every problem found, one line each; empty when the agent can start."""
    return [p for p in (host_problem(cfg.listen.host), storage_problem(cfg)) if p]


def reload_problems(running: Config, new: Config) -> list[str]:
    """``problems`` in what a reload reads that differs from what runs: a listen.host or a
    storage.path only a restart applies, and the restart would exit 2 on (check-config,
    systemd's ExecReload, refuses the file for them too). What runs is not probed again:
    a full disk failing the probe must not block an upstream's change."""
    host = None if new.listen.host == running.listen.host else host_problem(new.listen.host)
    spool = None if new.storage.resolved_path() == running.storage.resolved_path() \
        else storage_problem(new)
    return [p for p in (host, spool) if p]


def notices(cfg: Config, queued: bool = False) -> list[str]:
    """What a newcomer running on the defaults should be told at startup, and a spool
    directory others can see into (found as the spool opened, said once it started).
    ``queued``: events no upstream takes are queued, whose own line says that none is
    configured (``no_upstream``): not said twice."""
    spool = cfg.storage.resolved_path()
    # The link's directory and, a symlink's, the one the spool's files go in.
    dirs = dict.fromkeys((spool.parent, paths.spool_file(spool).parent))
    out = [seen for where in dirs if (seen := paths.exposure(where))]
    if cfg.source == "<defaults>":
        out.append(f"no config file found (looked for $OUTPOST_CONFIG, ./agent.toml and "
                   f"{paths.config_dir() / 'agent.toml'}); running with the built-in defaults; "
                   "`outpost config init` writes one")
    if not cfg.upstreams and not queued:
        out.append(no_upstream("events are kept in the spool"))
    return out + notes(cfg)


def no_upstream(kept: str) -> str:
    """The line of a config with no upstream, ``kept`` saying what waits for one."""
    return (f"no upstream is configured: {kept} until one is (add an [[upstream]] to the "
            "config, then reload)")


def notes(cfg: Config) -> list[str]:
    """What in a valid config loses or strands events, one line each: check-config's
    notes, the warnings of the agent's start and of each reload."""
    return shadowed(cfg) + expired_when_held(cfg) + refused_keys(cfg) + readable_keys(cfg)


def refused_keys(cfg: Config) -> list[str]:
    """Keys the config names (accept_keys, upstreams' keys) that ingest refuses at every
    request: their upstream could never be sent them (a Basic auth username without ':')."""
    named = [*cfg.listen.accept_keys, *(k for u in cfg.upstreams for k in u.keys if k != "*")]
    out = []
    for key in dict.fromkeys(named):
        up = cfg.route(key)
        rule = None if up is None else uplink_class(up.protocol).key_rule(up)
        if up is not None and rule is not None and (why := rule(key)) is not None:
            # Keys are credentials: named by fingerprint, as config errors name them.
            out.append(f"key {fingerprint(key)} is refused at every request: {why}; give "
                       f"upstream {up.name!r} a key of its own, or route this key elsewhere")
    return out


def readable_keys(cfg: Config) -> list[str]:
    """A config holding keys that every user may read (a copy keeps the umask's 0644):
    config init writes 0600, the machine-wide service's is 0640 root:outpost."""
    ups = cfg.upstreams
    holds = any(u.key for u in ups) or any(k != "*" for u in ups for k in u.keys) \
        or bool(cfg.listen.accept_keys)
    if not holds or cfg.source.startswith("<") or sys.platform == "win32":
        return []
    try:
        mode = stat.S_IMODE(os.stat(cfg.source).st_mode)
    except OSError:
        return []
    if not mode & 0o004:
        return []
    return [f"{cfg.source} holds keys and every user on this machine can read it (mode "
            f"{mode:04o}): chmod 600 it (the machine-wide service's: 0640, root:outpost)"]


def expired_when_held(cfg: Config) -> list[str]:
    """A transmit profile that holds events past ``storage.max_age_days``: expiry deletes
    them before ``sync.max_hold_h`` sends them (expiry needs both clocks past the age,
    either clock ends a hold, so a shorter hold always wins)."""
    sync, days = cfg.sync, cfg.storage.max_age_days
    holds = any(rule != "normal" for rule in (sync.on_metered, sync.on_low_battery))
    if not holds or sync.max_hold_h < days * 24:
        return []
    return [f"sync.max_hold_h = {sync.max_hold_h:g} is not below storage.max_age_days = "
            f"{days} ({days * 24} h): events a transmit profile holds expire before the hold "
            "is ended for them; lower max_hold_h or raise max_age_days"]


def shadowed(cfg: Config) -> list[str]:
    """The upstreams that can never get an event: a key goes to the first upstream in the
    file that lists it (or lists "*"), and to no other."""
    out: list[str] = []
    taken: dict[str, str] = {}   # key: the upstream that takes it
    every: str | None = None     # the first upstream that lists "*"
    for up in cfg.upstreams:
        if not up.keys:
            out.append(f"upstream {up.name!r} gets no events: it lists no key")
        elif every is not None:
            out.append(f"upstream {up.name!r} gets no events: {every!r} before it in the "
                       'file lists "*" and takes every key')
        elif all(key in taken for key in up.keys):
            owners = ", ".join(repr(o) for o in dict.fromkeys(taken[k] for k in up.keys))
            out.append(f"upstream {up.name!r} gets no events: every key it lists is taken by "
                       f"{owners} before it in the file")
        for key in up.keys:
            taken.setdefault(key, up.name)
        if "*" in up.keys and every is None:
            every = up.name
    return out


def host_problem(host: str) -> str | None:
    """listen.host must resolve, or the agent cannot bind it."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return (f"listen.host {host!r} does not resolve ({why}); set it to an address "
                "such as 127.0.0.1, or to a name the resolver knows")
    return None


def storage_problem(cfg: Config) -> str | None:
    """The spool's directory must exist or be creatable, writable, on a writable filesystem."""
    spool = cfg.storage.resolved_path()
    where = f"storage.path {spool}"
    try:
        os.stat(spool)
    except OSError as exc:
        # What os.path's tests below take for "not there yet", and run could not make.
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            return f"{where}: {exc.strerror}; {STORAGE_FIX}"
    # os.path's tests, not pathlib's: those raise EACCES (a directory this user may not
    # search, such as the system service's 0700 /var/lib/outpost), which is the problem
    # to name here, found by the access check below.
    if os.path.isdir(spool):
        return f"{where} is a directory; set it to a file, such as {spool / 'spool.db'}"
    if os.path.exists(spool) and (kind := paths.not_a_file(os.stat(spool).st_mode)):
        # /dev/null, say: SQLite cannot open it, and a fifo's open waits for a writer.
        return f"{where} is not a regular file ({kind}); {SPECIAL_FIX}"
    if tables := _foreign_tables(spool):
        # The spool's open would chmod it, switch it to WAL, and then never open it.
        return (f"{where} is not a spool: an SQLite database of another program (tables "
                f"{', '.join(tables[:3])}{', ...' if len(tables) > 3 else ''}); {SPECIAL_FIX}")
    # A symlink's spool is written beside the file it names: that directory is the one
    # to check, not the link's.
    files = paths.spool_file(spool)
    existing = files.parent
    while not os.path.exists(existing) and existing.parent != existing:
        if os.path.islink(existing):   # mkdir cannot make what it names ("File exists")
            return (f"{where}: {existing} is a symlink to {os.readlink(existing)}, which does "
                    f"not exist (a disk not mounted yet?); restore it, or {STORAGE_FIX}")
        existing = existing.parent   # where the first mkdir would write
    if not os.path.isdir(existing):
        return f"{where}: cannot create {files.parent}: {existing} is not a directory; {STORAGE_FIX}"
    if _read_only(existing):
        return f"{where}: {existing} is on a read-only filesystem; {_read_only_fix(files.parent)}"
    writable = os.access(existing, os.W_OK | os.X_OK)
    if writable and os.path.exists(files):
        writable = os.access(files, os.R_OK | os.W_OK)
    if not writable:
        return (f"{where}: cannot write to {files if os.path.exists(files) else existing} as user "
                f"{_user()}; {STORAGE_FIX}, or give that user write access")
    return _cannot_make(files, existing)


def _foreign_tables(spool: Path) -> list[str]:
    """The tables of an SQLite file at ``spool`` that another program made: tables, but
    neither a spool's (every spool, of any version, has had ``streams`` from its first
    table on) nor a version (a spool has one from v1, and a newer agent's is refused as
    such). Read as the file is (immutable: no lock taken, no -shm made beside it); what
    SQLite cannot read is left to the spool's open, which salvages a damaged spool."""
    import sqlite3  # here: only run and check-config get this far
    uri = paths.sqlite_uri(spool, "mode=ro&immutable=1")
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0]:
                return []
            tables = [name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except sqlite3.Error:   # no file, not a database, damaged: not judged here
        return []
    return [] if "streams" in tables else tables


def cannot_create(spool: Path, what: str, exc: OSError) -> str:
    """The line for ``storage.path`` ``spool`` where ``what`` cannot be created."""
    return f"storage.path {spool}: cannot create {what}: {exc.strerror or exc}; {STORAGE_FIX}"


def _cannot_make(spool: Path, existing: Path) -> str | None:
    """What access(2) cannot tell, saying yes to root everywhere (/proc, /sys): whether
    what `run` would make there (the spool's directory; else its file or lock file) can
    be, tried on a name of its own, removed at once. None if it can, or none is needed."""
    try:
        if existing != spool.parent:
            os.rmdir(tempfile.mkdtemp(prefix=".outpost-check-", dir=existing))
        elif not (os.path.exists(spool) and os.path.exists(paths.spool_lock(spool))):
            fd, name = tempfile.mkstemp(prefix=".outpost-check-", dir=existing)
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        made = spool.parent if existing != spool.parent else f"files in {spool.parent}"
        return cannot_create(spool, str(made), exc)
    return None


def _read_only(path: Path) -> bool:
    if not hasattr(os, "statvfs"):
        return False
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _read_only_fix(directory: Path) -> str:
    if not sys.platform.startswith("linux"):
        return STORAGE_FIX
    # The system unit has ProtectSystem=strict: only its StateDirectory is writable.
    return (f"under the systemd unit, allow it with a drop-in: `sudo systemctl edit outpost`, add "
            f"the lines `[Service]` and `ReadWritePaths={systemd_word(directory)}` (create the "
            f"directory first, owned by outpost), then `sudo systemctl restart outpost`; or leave "
            f"storage.path empty to use /var/lib/outpost")


def outside_unit(cfg: Config, drop_ins: Path = DROP_INS) -> str | None:
    """Why the system unit's service could not write ``cfg``'s storage.path, or None: its
    unit (ProtectSystem=strict) lets it write its state directory and the ReadWritePaths=
    of its drop-ins alone, unless a drop-in sets a StateDirectory= of its own or eases
    ProtectSystem=. Checks made as root, outside that sandbox, cannot see it. A path from
    `~` is the service user's home, the state directory, where it runs."""
    if not cfg.storage.path or cfg.storage.path.startswith("~"):
        return None
    spool = cfg.storage.resolved_path()
    sandbox = _sandbox(drop_ins)
    allowed = [*sandbox.state_dirs, *sandbox.read_write]
    # A symlink's spool is written beside the file it names (its -wal, its lock file, a
    # fresh spool after a salvage): that directory is the one the service must write.
    files = paths.spool_file(spool)
    where = Path(os.path.realpath(files.parent))
    if any(where.is_relative_to(os.path.realpath(a)) for a in allowed):
        return None
    if sandbox.protect_system != "strict" and not any(
            where.is_relative_to(r) for r in (*_STILL_SHUT, *_READ_ONLY[sandbox.protect_system])):
        return None
    writable = ", ".join(map(str, allowed)) or "nothing"
    named = f" (a link to {files})" if files != spool else ""
    return (f"storage.path {spool}{named} is outside what the system unit lets the service write "
            f"({writable}: ProtectSystem={sandbox.protect_system}), so it would exit at every "
            f"start; leave storage.path empty to use {paths.LINUX_SYSTEM_DATA}, or allow the "
            f"directory in a drop-in: {drop_ins / 'storage.conf'} holding the lines `[Service]` "
            f"and `ReadWritePaths={systemd_word(files.parent)}` (create the directory first, "
            "owned by outpost)")


def system_unit_notes(cfg: Config, source: Path) -> list[str]:
    """``outside_unit``, for ``source`` the machine-wide service's config on Linux: a
    check made as root (`sudo outpost check-config`) passes what the service cannot write."""
    system_config = paths.config_dir(system=True) / "agent.toml"
    if not sys.platform.startswith("linux") or not paths.same_file(source, system_config):
        return []
    outside = outside_unit(cfg)
    return [f"the system service reads this file, and {outside}"] if outside else []


# What the unit's other settings keep from the service whatever its ProtectSystem=:
# ProtectHome=, PrivateTmp= (emptied at each stop), PrivateDevices=, the kernel's files.
_STILL_SHUT = tuple(Path(p) for p in ("/home", "/root", "/run/user", "/tmp", "/var/tmp", "/dev",
                                      "/proc", "/sys"))
# Read-only under each ProtectSystem= below strict (systemd.exec(5)), by its canonical name.
_READ_ONLY = {"no": (), "yes": tuple(Path(p) for p in ("/usr", "/boot", "/efi")),
              "full": tuple(Path(p) for p in ("/usr", "/boot", "/efi", "/etc"))}
_YES, _NO = ("1", "yes", "y", "true", "t", "on"), ("0", "no", "n", "false", "f", "off")


@dataclasses.dataclass
class _Sandbox:
    """What the unit and its drop-ins let the service write (the unit's own values first)."""

    state_dirs: list[Path] = dataclasses.field(
        default_factory=lambda: [paths.LINUX_SYSTEM_DATA])
    read_write: list[Path] = dataclasses.field(default_factory=list)
    protect_system: str = "strict"   # "strict" | "full" | "yes" | "no"


def _sandbox(drop_ins: Path) -> _Sandbox:
    """The [Service] settings of ``drop_ins``' *.conf files that widen what the service may
    write, in systemd's order: ReadWritePaths= and StateDirectory= add (an empty one clears
    those before it; `-` and `+` prefixes dropped), the last ProtectSystem= wins."""
    found = _Sandbox()
    try:
        confs = sorted(drop_ins.glob("*.conf"))
    except OSError:
        return found
    for conf in confs:
        try:
            lines = conf.read_text(errors="replace").splitlines()
        except OSError:
            continue
        section = ""
        for line in map(str.strip, lines):
            if line.startswith("["):
                section = line
                continue
            key, _, value = line.partition("=")
            key, value = key.strip(), value.replace("%%", "%")
            if section != "[Service]" or key not in ("ReadWritePaths", "StateDirectory",
                                                     "ProtectSystem"):
                continue
            if key == "ProtectSystem":
                word = value.strip().lower()
                word = "yes" if word in _YES else "no" if word in _NO else word
                if word in ("strict", *_READ_ONLY):   # systemd ignores what it cannot parse
                    found.protect_system = word
                continue
            into = found.read_write if key == "ReadWritePaths" else found.state_dirs
            if not value.strip():
                into.clear()
            try:
                words = shlex.split(value)
            except ValueError:
                words = value.split()
            if key == "ReadWritePaths":
                into += [Path(w.lstrip("-+")) for w in words if w.lstrip("-+").startswith("/")]
            else:   # names under /var/lib; `name:link` (systemd 250) makes name
                into += [Path("/var/lib") / w.partition(":")[0] for w in words
                         if w.partition(":")[0] and not w.startswith("/")]
    return found


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "?"
