"""Device facts that Nucleus requires on init and error events.

Computed once at startup (a few file reads), then served from memory.
"""

from __future__ import annotations

import hashlib
import locale
import os
import platform
import re
import subprocess
import sys
import uuid

import psutil

from agent.families.facts import DeviceFacts
from agent.settings import DeviceConfig

_SALT = b"outpost-machine-id:"
# Where Linux keeps its machine id: systemd's file, then D-Bus' older copy.
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_MACHINE_ID = re.compile(rb"[0-9a-fA-F]{32}").fullmatch


def _platform() -> str:
    # The values the Nucleus doc lists: 'win32', 'darwin', 'linux'.
    if sys.platform.startswith("linux"):
        return "linux"
    return sys.platform


def _os_version() -> str:
    if sys.platform == "darwin":
        mac = platform.mac_ver()[0]
        if mac:
            return mac
    return platform.release()


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
            return _bcp47(value)
    try:
        loc = locale.getlocale()[0]
    except ValueError:
        loc = None
    return _bcp47(loc) if loc else "en-US"


def _bcp47(posix: str) -> str:
    """'en_US.UTF-8' -> 'en-US'."""
    tag = posix.split(":")[0].split(".")[0].split("@")[0]
    return tag.replace("_", "-") or "en-US"


def _raw_machine_id() -> str:
    """The OS's own stable machine identifier; hashed before use, never exposed."""
    if sys.platform.startswith("linux"):
        for p in MACHINE_ID_FILES:
            try:
                with open(p, "rb") as f:
                    raw = f.read(64).strip()
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
    # Fallback everywhere: the MAC address, as the python module does.
    return f"mac:{uuid.getnode():012x}"


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_id() -> str:
    return hashlib.sha256(_SALT + _raw_machine_id().encode()).hexdigest()[:32]


def detect(overrides: DeviceConfig | None = None) -> DeviceFacts:
    """Detect the facts, letting non-empty config values win."""
    o = overrides or DeviceConfig()
    return DeviceFacts(
        platform=o.platform or _platform(),
        osVersion=o.osVersion or _os_version(),
        totalRam=o.totalRam or _total_ram_gb(),
        language=o.language or _language(),
        arch=o.arch or platform.machine().lower() or "unknown",
        machineId=o.machineId or machine_id(),
    )
