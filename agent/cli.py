"""Command line: run, status, doctor, check-config, flush."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agent import __version__, cli_tail, logs, paths
from agent import config as config_mod
from agent.config import ConfigError
from agent.device import detect
from agent.install import command as service_install
from agent.ops.status import offline_snapshot
from agent.server import memory
from agent.settings import Config
from agent.uplinks.registry import uplink_class


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return config_mod.load(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"outpost: config error: {exc}", file=sys.stderr)
        return None


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where the platform has it, else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    memory.use_c_allocator()  # re-executes this process once, on glibc (see memory.py)
    logs.setup_logging(cfg.log.level)
    from agent.dialects import offload
    from agent.service import Agent, StartError
    from agent.spool.migrate import SpoolTooNew
    memory.freeze_imports()
    offload.favour_the_loop()

    async def main() -> int:
        try:
            return await Agent(cfg, getattr(args, "config", None)).serve()
        except (StartError, SpoolTooNew) as exc:
            print(f"outpost: {exc}", file=sys.stderr)
            return 2
    return run_async(main())


def _agent_url(cfg: Config, path: str) -> str:
    host = cfg.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{cfg.listen.port}{path}"


# The agent is on loopback: an $http_proxy meant for the internet must not be used.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(cfg: Config, path: str, method: str = "GET") -> Any:
    req = urllib.request.Request(_agent_url(cfg, path), method=method,
                                 data=b"" if method == "POST" else None)
    with _DIRECT.open(req, timeout=3) as resp:
        return json.loads(resp.read())


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    try:
        data = _http(cfg, "/status")
        data["source"] = f"agent at {_agent_url(cfg, '')}"
    except (urllib.error.URLError, OSError, ValueError):
        try:
            data = offline_snapshot(cfg)
        except sqlite3.Error as exc:
            print(f"outpost: no agent answering, and cannot read the spool "
                  f"{cfg.storage.resolved_path()}: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from agent.ops.status_table import render
        print(render(data))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    try:
        data = _http(cfg, "/flush", method="POST")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"outpost: no agent answering at {_agent_url(cfg, '')}: {exc}", file=sys.stderr)
        return 1
    print(f"flush requested; {data.get('queue_depth', 0)} events queued")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    target = args.file or (str(p) if (p := config_mod.find_config_file(None)) else None)
    if target is None:
        print("no config file found; the built-in defaults are valid")
        return 0
    try:
        cfg = config_mod.load_file(Path(target))
    except ConfigError as exc:
        print(f"outpost: {exc}", file=sys.stderr)
        return 1
    print(f"{target}: ok ({len(cfg.upstreams)} upstream(s))")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    print(f"outpost {__version__}, python {sys.version.split()[0]}")
    print("device facts:")
    for name, value in detect(cfg.device).as_dict().items():
        print(f"  {name:10} {value}")
    print("paths:")
    print(f"  config     {cfg.source}")
    print(f"  config dir {paths.config_dir()}")
    print(f"  spool      {cfg.storage.resolved_path()}")
    print(f"  service    {'system' if paths.is_system_service() else 'user'}")
    print(f"listen: {cfg.listen.host}:{cfg.listen.port}")
    print("upstreams:")
    for up in cfg.upstreams:
        print(f"  {up.name:10} {up.protocol:13} {up.url}  {uplink_class(up.protocol).probe(up)}")
    if not cfg.upstreams:
        print("  (none: events are kept until an upstream is configured)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outpost", description=__doc__)
    parser.add_argument("--version", action="version", version=f"outpost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (("run", cmd_run, "run the agent in the foreground"),
                                  ("status", cmd_status, "show queue and upstream state"),
                                  ("doctor", cmd_doctor, "show device facts, config, reachability"),
                                  ("flush", cmd_flush, "ask the running agent to send everything now")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="path to agent.toml")
        p.set_defaults(func=func)
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file", nargs="?")
    p.set_defaults(func=cmd_check_config)
    service_install.add_parser(sub)
    cli_tail.add_parser(sub, _load, _agent_url)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
