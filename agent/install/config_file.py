"""`outpost config init`: write a commented agent.toml that `check-config` accepts.

The file holds upstream keys, so it is written private (0600); for the machine-wide
service's own config it is 0640 root:outpost, so that the service user can read it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from agent import paths
from agent.config import ConfigError, parse
from agent.paths import not_a_file
from agent.terminal import printable, shell_arg
from agent.uplinks import registry

HEADER = """\
# Outpost configuration, written by `outpost config init`.
# Every key is optional: a commented-out line shows the built-in default.
# Validate changes with `outpost check-config`, then apply them with a reload:
# `sudo systemctl reload outpost` (the system service),
# `systemctl --user reload outpost` (a user service), or `kill -HUP <pid>`.

[listen]
# host = "127.0.0.1"        # loopback only; a non-loopback address logs a warning
# port = 8765
# accept_keys = []          # appIds / write keys accepted; empty = any
# allowed_origins = []      # browser Origins allowed to post, e.g. "https://app.example"

[storage]
# path = ""                 # empty: spool.db in the data directory `outpost doctor` shows
# max_size_mb = 512
# when_full = "reject"      # "reject" (apps get 503/429 + Retry-After) | "drop_oldest"
# max_age_days = 30

[log]
# level = "info"            # debug | info | warning | error
"""

NO_UPSTREAM = """
# No upstream yet: events are kept in the spool until one is configured. For example:
# [[upstream]]
# name = "segment"
# protocol = "segment-http"   # {protocols}
# url = "https://api.segment.io"
# key = "YOUR_WRITE_KEY"      # the key to use upstream; default: each app's own key
# keys = ["*"]                # local keys routed here; "*" = all
"""

UPSTREAM = """
[[upstream]]
name = {name}
protocol = {protocol}
url = {url}
{key}keys = ["*"]                # local keys routed here; "*" = all
"""

# The example --url each protocol's "needs --url" gives: one its schemes take, as pasted
# (every protocol --upstream offers: tests/test_cli_mistakes.py).
EXAMPLE_URLS = {"nucleus-ws": "wss://app.nucleus.sh", "nucleus-http": "https://app.nucleus.sh",
                "segment-http": "https://api.segment.io"}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``config init [--path P] [--force] [--upstream PROTO --url U [--write-key K]]``."""
    config = subparsers.add_parser("config", help="write a starting config file",
                                   description="Write a commented agent.toml.")
    actions = config.add_subparsers(dest="config_action", required=True, metavar="{init}")
    init = actions.add_parser("init", help="write a commented agent.toml (mode 0600)",
                              description="Write a commented agent.toml that check-config accepts.")
    init.add_argument("--path", metavar="FILE",
                      help="where to write it (default: agent.toml in the config directory)")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.add_argument("--upstream", choices=registry.protocols(), metavar="PROTOCOL",
                      help=f"add an upstream: {', '.join(registry.protocols())}")
    init.add_argument("--url", help="the upstream's URL (with --upstream)")
    init.add_argument("--write-key", metavar="KEY",
                      help="the key to send upstream (default: each app's own key)")
    init.add_argument("--name", help="the upstream's name (default: from the protocol)")
    init.set_defaults(func=run)


def render(protocol: str | None, url: str | None, key: str | None, name: str | None) -> str:
    """The file's text; without ``protocol`` it has a commented-out example upstream."""
    if protocol is None:
        return HEADER + NO_UPSTREAM.format(protocols=" | ".join(registry.protocols()))
    q = _toml_string
    key_line = f"key = {q(key)}\n" if key else "# key = \"...\"              # default: each app's own key\n"
    name = protocol.split("-")[0] if name is None else name   # "" is refused, not replaced
    return HEADER + UPSTREAM.format(name=q(name), protocol=q(protocol),
                                    url=q(url or ""), key=key_line)


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string. Not JSON's: it spells a character past the BMP as
    a surrogate pair (\\ud83d\\uded2), which TOML refuses; TOML takes it as it is (UTF-8)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")   # DEL: JSON keeps it


def run(args: argparse.Namespace) -> int:
    """Run ``outpost config init``; returns the exit status."""
    protocols = ", ".join(registry.protocols())
    if args.upstream and not args.url:
        return _fail(f"--upstream {args.upstream} needs --url, "
                     f"e.g. --url {EXAMPLE_URLS[args.upstream]}")
    for flag, value in (("--url", args.url), ("--write-key", args.write_key),
                        ("--name", args.name)):
        if value is not None and not args.upstream:   # never dropped unsaid
            return _fail(f"{flag} needs --upstream ({protocols})")
        if value is not None and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:   # argv bytes not UTF-8: a TOML file cannot hold them
                return _fail(f"{flag} is not UTF-8 text, as TOML files are; give it in UTF-8")
    if args.write_key == "":   # a variable that expanded to nothing: not "each app's own key"
        return _fail('--write-key is empty (""): give the key to send upstream, or leave '
                     "--write-key out to send each app's own key")
    if args.path == "":   # a variable that expanded to nothing: not the default location
        return _fail('--path is empty (""): name a file, or leave --path out for '
                     "agent.toml in the config directory")
    if args.path is not None and (directory := paths.directory_meant(args.path)) is not None:
        return _fail(f"--path {args.path} names a directory; name the file in it, such as "
                     f"{os.path.join(directory, 'agent.toml')}")
    text = render(args.upstream, args.url, args.write_key, args.name)
    try:
        parse(tomllib.loads(text))
    except ConfigError as exc:
        return _fail(str(exc))
    default = paths.config_dir() / "agent.toml"
    target = Path(args.path) if args.path is not None else default
    if (planted := paths.planted_link(target)) is not None:
        return _fail(f"cannot write {target}: {planted}")
    real = Path(os.path.realpath(target))   # through a symlink: the link stays a link
    try:
        kind = not_a_file(real.stat().st_mode)
    except FileNotFoundError:
        kind = None
    except OSError as exc:   # EACCES: a directory this user may not search
        return _fail(f"cannot write {target}: {exc.strerror or exc}")
    # Before "pass --force", which cannot replace a directory or a device.
    if kind:
        return _fail(f"{target} is not a regular file ({kind}); name a file to write")
    if os.path.exists(target) and not args.force:
        return _fail(f"{target} exists; pass --force to replace it")
    share = target == default and paths.is_system_service()
    try:
        if share:   # /etc/outpost: the service user must reach its config (0755, as the unit has it)
            made = not os.path.exists(real.parent)
            real.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if made and sys.platform != "win32":
                # A hardened umask (027) leaves 0750 root:root, and systemd does not change
                # the mode of a configuration directory that exists.
                os.chmod(real.parent, 0o755)
        else:   # 0700 whatever the umask, as the spool's (XDG); existing ones keep theirs
            paths.make_private_dir(real.parent)
        shared = _write(real, text, share)
    except OSError as exc:
        return _fail(f"cannot write {target}: {exc.strerror or exc}")
    print(printable(f"wrote {target}{shared}; check it with "
                    f"`outpost check-config {shell_arg(target)}`"))
    return 0


def _write(path: Path, text: str, share: bool) -> str:
    """Written beside ``path`` (mkstemp's 0600) and moved onto it once whole: a failed write
    leaves what was there. What it says of the mode, if ``share`` changed it."""
    fd, part = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        shared = _share_with_service(Path(part)) if share else ""
        os.replace(part, path)
    except BaseException:
        os.unlink(part)
        raise
    return shared


def _share_with_service(path: Path) -> str:
    """The system service runs as `outpost`: let that group read its config (0640 root:outpost)."""
    if sys.platform == "win32":
        return ""
    try:
        shutil.chown(path, "root", paths.APP)
    except (LookupError, OSError):   # install does not change it: it says so, as here
        return (f" (mode 0600: no {paths.APP} user to share it with yet; after `outpost service "
                f"install`, `chgrp {paths.APP} FILE && chmod 0640 FILE` lets the service read it)")
    os.chmod(path, 0o640)
    return " (mode 0640, root:outpost)"


def _fail(message: str) -> int:
    print(f"outpost config: {printable(message)}", file=sys.stderr)
    return 2
