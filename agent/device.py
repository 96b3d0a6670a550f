"""Device facts that Nucleus requires on init and error events.

Computed once at startup (a few file reads), then served from memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import locale
import logging
import os
import platform
import re
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil

from agent import paths
from agent.families.facts import DeviceFacts, fact_problem
from agent.settings import DeviceConfig

log = logging.getLogger("outpost")

_SALT = b"outpost-machine-id:"
# Where Linux keeps its machine id: systemd's file, then D-Bus' older copy.
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_MACHINE_ID = re.compile(rb"[0-9a-fA-F]{32}").fullmatch


def _platform() -> str:
    # The values the Nucleus doc lists: 'win32', 'darwin', 'linux'.
    if sys.platform.startswith("linux"):
        return "linux"
    return sys.platform


def _from_machine(value: str, fact: str, source: str) -> str:
    """``value``, read from ``source`` on this machine, where it passes the rule of the
    [device] values; else "" (as if the machine gave none), said once. The machine's
    values are no operator's: a wrong one is left out, never a reason not to start."""
    problem = fact_problem(value)
    if problem is None:
        return value
    return _unused(source, fact, problem)


def _unused(source: str, fact: str, problem: str) -> str:
    log.warning("%s is not used as the device's %s: it %s; set [device] %s in agent.toml "
                "to give one", source, fact, problem, fact)
    return ""


def _os_version() -> str:
    if sys.platform == "darwin":
        mac = _from_machine(platform.mac_ver()[0], "osVersion", "the macOS version")
        if mac:
            return mac
    return _from_machine(platform.release(), "osVersion", "the kernel's release")


def _total_ram_gb() -> int:
    # Integer GB as the doc asks; python modules send int(total/1e9).
    try:
        total = psutil.virtual_memory().total
    except (OSError, RuntimeError, AttributeError):
        # /proc/meminfo hidden (systemd's ProcSubset=pid): the kernel's page count still answers.
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError, AttributeError):
            return 0
    return int(round(total / 1024**3))


def _language() -> str:
    for var in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        value = os.environ.get(var, "")
        # A locale's name is ASCII: bytes of another encoding (kept as lone surrogates)
        # name none, and no event could carry them (orjson and SQLite refuse them).
        if value and value.isascii() and value not in ("C", "POSIX") and not value.startswith("C."):
            if tag := _bcp47(value, f"the environment's {var}"):
                return tag
    try:
        loc = locale.getlocale()[0]
    except ValueError:
        loc = None
    return (_bcp47(loc, "the C library's locale") if loc else "") or "en-US"


# A POSIX locale's name: language[_territory][.codeset][@modifier], its language two or
# three letters (ISO 639), its territory two letters or three digits (es_419); the
# territory after a hyphen too: a language tag set where a locale name belongs (pt-BR).
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[_-]([A-Za-z]{2}|[0-9]{3}))?(?:\.[^@]*)?(?:@(.*))?").fullmatch
# The modifiers of glibc's locales that name a script: sr_RS@latin is sr-Latn-RS, where
# sr-RS is Serbian in its default script, Cyrillic. Other modifiers (@euro) name none.
_SCRIPTS = {"latin": "Latn", "cyrillic": "Cyrl", "devanagari": "Deva"}


def _bcp47(name: str, source: str) -> str:
    """'en_US.UTF-8' -> 'en-US', 'sr_RS@latin' -> 'sr-Latn-RS'; "" (said once) where
    ``name``, read from ``source``, names no locale: a word, a codeset alone, a path,
    Windows' 'English_United States' (what locale.getlocale() gives there) would each have
    been sent upstream as a language."""
    first = next((part for part in name.split(":") if part), "")   # LANGUAGE is a list
    if m := _LOCALE(first):
        script = _SCRIPTS.get((m[3] or "").lower())
        return "-".join(part for part in (m[1], script, m[2]) if part)
    return _unused(source, "language", fact_problem(name) or (
        f"names no locale (language[_territory][.codeset][@modifier], such as "
        f"en_US.UTF-8), got {name!r}"))


def _os_machine_id() -> str | None:
    """The OS's own stable machine identifier; hashed before use, never exposed. None where
    the OS has none to give."""
    if sys.platform.startswith("linux"):
        for p in MACHINE_ID_FILES:
            try:
                raw = _head(p).strip()
            except OSError:
                continue
            # An id is 32 hex digits, as systemd reads it. Anything else is none: empty,
            # or `uninitialized`, the first-boot marker left where no systemd booted the
            # image (a container), the same text on every such machine.
            if _MACHINE_ID(raw):
                return raw.decode()
    elif sys.platform == "darwin":
        value = _command(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"])
        for line in value.splitlines():
            if "IOPlatformUUID" in line:
                return line.split("=")[-1].strip().strip('"')
    elif sys.platform == "win32":
        value = _command(["reg", "query", r"HKLM\SOFTWARE\Microsoft\Cryptography",
                          "/v", "MachineGuid"])
        for line in value.splitlines():
            if "MachineGuid" in line:
                return line.split()[-1]
    # Never the MAC address: random at each call with no network interface (a new machine
    # at each restart), the same on many hosts for software MACs (Docker's 02:42:<ip>), and
    # found again from its hash by trying a vendor's 2^24 addresses.
    return None


def _kept_id(id_file: Path, make: bool) -> str | None:
    """The random id this install made where the OS has none, kept in ``id_file``; made and
    written there when none is (a file holding none, or unreadable, replaced and said so).
    None when ``make`` is false and none is kept."""
    kept, why = _read_kept(id_file)
    if kept is not None or not make:
        return kept
    made = uuid.uuid4().hex
    if why:
        log.warning("%s %s: replaced by a new machine id; upstreams see this machine as a "
                    "new one", id_file, why)
    try:
        if _write_private(id_file, made + "\n", replace=bool(why)):
            return made
    except OSError as exc:
        log.warning("cannot keep the machine id in %s (%s): another is made at each start "
                    "until it can be", id_file, exc.strerror or exc)
        return made
    # Another start made one first (two agents started at once): its id is the kept one.
    return _read_kept(id_file)[0] or made


def _read_kept(id_file: Path) -> tuple[str | None, str]:
    """The id kept in ``id_file``, else None and why ("" when there is no file)."""
    try:
        raw = _head(id_file).strip()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    return (raw.decode(), "") if _MACHINE_ID(raw) else (None, "holds no id")


def _head(path: str | Path) -> bytes:
    """The first bytes of the regular file ``path``, enough for an id; OSError if there is
    none to read, or it is no regular file. Opened without waiting: a FIFO's plain open
    waits for a writer, which held `outpost doctor`, and the agent's start, forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read(64)


def _write_private(path: Path, text: str, *, replace: bool) -> bool:
    """``text`` in ``path``, 0600 in a directory made 0700; written whole beside it, synced,
    then moved onto it (``replace``) or linked to it only where there is none, so that two
    writers at once keep the first one's: False when a file was there. A crash leaves the
    old file or the new one, never half of one."""
    paths.make_private_dir(path.parent)
    fd, part = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)   # 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if not replace:
            try:
                os.link(part, path)
            except FileExistsError:
                return False
            except OSError:
                # No hard links here (FAT, FUSE and network mounts, each with its own
                # errno: EPERM, ENOSYS, ENOTSUP, ...): moved onto it, the only way left; a
                # fault that is no such refusal fails the move too.
                replace = True
        if replace:
            os.replace(part, path)
    finally:
        with contextlib.suppress(OSError):   # gone once moved onto ``path``
            os.unlink(part)
    paths.sync_dir(path.parent)
    return True


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_id(id_file: Path | None = None, *, make: bool = True) -> str:
    """The OS's id hashed; where it has none, the id kept in ``id_file`` (made there once:
    paths.device_id_file), hashed apart from any OS's. With no ``id_file`` (a tool that
    sends nothing upstream) such an id is made anew at each call; with ``make`` false and
    none kept, "" (`outpost doctor` writes nothing)."""
    raw = _os_machine_id()
    if raw is None:
        kept = _kept_id(id_file, make) if id_file is not None else uuid.uuid4().hex
        if kept is None:
            return ""
        raw = f"made:{kept}"
    return hashlib.sha256(_SALT + raw.encode()).hexdigest()[:32]


def detect(overrides: DeviceConfig | None = None, id_file: Path | None = None, *,
           make: bool = True) -> DeviceFacts:
    """Detect the facts, letting non-empty config values win (a configured machineId: no
    id is made or kept)."""
    o = overrides or DeviceConfig()
    return DeviceFacts(
        platform=o.platform or _platform(),
        osVersion=o.osVersion or _os_version(),
        totalRam=o.totalRam or _total_ram_gb(),
        language=o.language or _language(),
        arch=o.arch or _from_machine(platform.machine().lower(), "arch",
                                     "the machine's hardware name") or "unknown",
        machineId=o.machineId or machine_id(id_file, make=make),
    )
