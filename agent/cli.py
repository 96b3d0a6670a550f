"""Outpost, the local analytics buffering agent: apps post events to it on 127.0.0.1, it keeps
them on disk and forwards them upstream.

Exit status: 0 ok; 1 a runtime failure (no agent answering, a service step failed, the
output could not be written); 2 the config or the environment is wrong (the one-line message
names the fix); 130 interrupted by Ctrl-C (`run`: by a second one during its start or drain;
`tail` stops on it with 0); 141 the program reading the output left (`outpost status | head -1`)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agent import __version__, logs, paths, preflight, startup_signals
from agent import config as config_mod
from agent.config import ConfigError
from agent.ops.local_agent import (
    CutShort,
    NotOutpost,
    Refused,
    agent_url,
    answer,
    busy,
    not_answering,
    opened,
    read_whole,
    running_elsewhere,
    timed_out,
    why_not,
)
from agent.settings import CONFIG_HELP, Config, SyncConfig
from agent.terminal import OutputError, guard_stdout, os_text, printable, printable_json
from agent.uplinks.registry import uplink_class

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

EXIT_FAILED = 1   # a runtime failure: no agent answering, a service step failed
EXIT_CONFIG = 2   # the config or the environment is wrong; the message names the fix
SIGPIPE_EXIT = 128 + signal.SIGPIPE   # what a shell shows for a command killed by it
# `outpost run` waits this long for the spool's lock: a command asking whether an agent
# holds it takes it for an instant; another agent holds it for good.
LOCK_WAIT_S = 1.0


def _say(message: str) -> None:
    """One line on stderr; what the operator named in it (a path) shown escaped. Under
    systemd (`run`, and check-config as ExecReload) an error to the journal, as the log's
    own lines carry their priority: unprefixed, journald files it at info."""
    err = "<3>" if logs.stderr_is_journal(sys.stderr) else ""
    print(f"{err}outpost: {printable(message)}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return config_mod.load(getattr(args, "config", None))
    except ConfigError as exc:
        _say(f"config error: {exc}")
        return None


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where the platform has it, else the default loop."""
    import asyncio
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cmd_run(args: argparse.Namespace) -> int:
    # What `run` alone needs is imported here: every other command starts without it.
    from filelock import FileLock, Timeout

    from agent.server import memory
    from agent.spool.schema import SpoolUnusable
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    if found := preflight.problems(cfg):
        _say(found[0])
        return EXIT_CONFIG
    spool = cfg.storage.resolved_path()
    try:
        # Made for the lock file; a directory others can see is warned of once, through
        # the log (set up below, after the lock), once the agent has started.
        paths.make_spool_dir(spool)
    except OSError as exc:   # the preflight's probe passed, and then the system refused
        # Named by the error: the directory a symlinked spool resolves to, perhaps.
        _say(preflight.cannot_create(spool, str(exc.filename or spool.parent), exc))
        return EXIT_CONFIG
    # One agent per spool: two would both forward its queue, each with its own dedupe
    # index and depths. Held for the process's life; the OS drops it however that ends.
    # Waited for a moment: `outpost status` tries a shared lock on it (paths.agent_holds).
    lock = FileLock(paths.spool_lock(spool), timeout=LOCK_WAIT_S, mode=0o600)
    try:
        lock.acquire()
    except Timeout:
        _say(f"the spool {spool} is in use by another agent; stop that one, or give this "
             "one another storage.path")
        return EXIT_CONFIG
    except OSError as exc:   # a directory there, or a file another user left
        _say(f"cannot open the spool's lock file {paths.spool_lock(spool)}: "
             f"{exc.strerror or exc}; remove it, or give this user access")
        return EXIT_CONFIG
    try:
        # filelock keeps the mode of one found: any user who can open it can hold it, and
        # keep the next start out.
        paths.make_private_file(paths.spool_lock(spool))
    except OSError:   # another user's file: theirs to change
        pass
    logs.setup_logging(cfg.log.level)
    from agent.dialects import offload
    from agent.service import AddressNotHere, Agent, StartError
    if startup_signals.taken():   # Ctrl-C while those loaded: nothing started yet
        raise KeyboardInterrupt
    offload.favour_the_loop()

    async def main() -> int:
        try:
            return await Agent(cfg, getattr(args, "config", None),
                               on_spool_open=memory.settle_start, holds_lock=True,
                               exits=True).serve()
        except AddressNotHere as exc:   # may be there at the next try: a service restarts it
            _say(str(exc))
            return EXIT_FAILED
        except (StartError, SpoolUnusable) as exc:
            _say(str(exc))
            return EXIT_CONFIG
        except OSError as exc:
            # The preflight passed but the system refused anyway (a mount or a mode changed
            # since): still one line, not a traceback and a restart loop. Other errors are bugs.
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            problem = preflight.storage_problem(cfg) or f"cannot start: {exc}"
            _say(problem)
            return EXIT_CONFIG
    return run_async(main())


# doctor waits this long for NetworkManager to say whether the network is metered.
DOCTOR_DBUS_S = 2.0
# `status` and `flush` wait this long for the agent's answer; one that took the connection
# but answers later is busy, not absent (a /status costs milliseconds when it is not).
STATUS_TIMEOUT_S = 10.0
# check-config --reload (systemd's ExecReload) asks the agent which file it re-reads: one
# too busy to say in this time is signalled unasked, as before.
RELOAD_ASK_S = 2.0


def _http(cfg: Config, path: str, expect: str, kind: type, method: str = "GET",
          timeout: float | None = None) -> Any:
    """The agent's JSON reply to ``path``, which holds ``expect`` of ``kind``; NotOutpost
    if it does not (another server holds the port), Refused for the agent's own refusal."""
    req = urllib.request.Request(agent_url(cfg, path), method=method,
                                 data=b"" if method == "POST" else None)
    with opened(cfg, req, path, STATUS_TIMEOUT_S if timeout is None else timeout) as resp:
        return answer(cfg, path, read_whole(cfg, resp, path), expect, kind)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    try:
        data = _http(cfg, "/status", "spool", dict)
        data["source"] = f"agent at {agent_url(cfg, '')}"
        text = _table(cfg, data)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if timed_out(exc):   # an agent holds the spool: its figures would be stale
            print(f"outpost: {busy(cfg, '/status', STATUS_TIMEOUT_S)}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, CutShort):   # it answered here: neither elsewhere nor gone for sure
            _say(str(exc))
            return EXIT_FAILED
        # An agent runs on the spool, elsewhere: its figures are live there, and the
        # spool's alone would say it is stopped. (One that refused answered: it is there.)
        if not isinstance(exc, Refused) and (elsewhere := running_elsewhere(cfg, why_not(exc))):
            _say(elsewhere)
            return EXIT_FAILED
        if isinstance(exc, (NotOutpost, Refused)):
            _say(f"{exc}; reading the spool")
        # The spool's modules, only offline.
        import sqlite3

        from agent.ops.status import offline_snapshot
        from agent.spool.as_found import as_found
        from agent.spool.schema import SpoolUnusable
        try:
            with as_found(cfg.storage.resolved_path()):
                data = offline_snapshot(cfg)
        except SpoolUnusable as exc:   # too new, or a directory
            _say(f"no agent answering, and the {exc}")
            return EXIT_FAILED
        except sqlite3.Error as exc:
            _say(f"no agent answering, and cannot read the spool "
                 f"{cfg.storage.resolved_path()}: {exc}")
            return EXIT_FAILED
        except OSError as exc:   # e.g. a spool in a directory only the agent's user may search
            _say(f"no agent answering, and cannot read the spool "
                 f"{cfg.storage.resolved_path()}: {exc.strerror or exc}")
            return EXIT_FAILED
        from agent.ops.status_table import render
        text = render(data)
    if args.json:
        print(printable_json(json.dumps(data, indent=2)))
    else:
        print(text)
    return 0


def _table(cfg: Config, data: Any) -> str:
    """``data``, a /status answer, as the table; NotOutpost if it is not a snapshot's
    shape: holding `spool`, the one field asked of it, another server's JSON is not one."""
    from agent.ops.status_table import render
    try:
        return render(data)
    except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError) as exc:
        raise NotOutpost(cfg, "/status") from exc


def cmd_flush(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    try:
        data = _http(cfg, "/flush", "queue_depth", int, method="POST")
    except (NotOutpost, Refused, CutShort) as exc:
        _say(str(exc))
        return EXIT_FAILED
    except (urllib.error.URLError, OSError, ValueError) as exc:
        _say(busy(cfg, "/flush", STATUS_TIMEOUT_S) if timed_out(exc)
             else not_answering(cfg, exc))
        return EXIT_FAILED
    print(f"flush requested; {data['queue_depth']} events queued")
    for line in _not_flushed(data):
        print(line)
    return 0


def _not_flushed(data: dict[str, Any]) -> list[str]:
    """Why some of the queued events do not go (an older agent's reply says nothing)."""
    lines = []
    unrouted = data.get("unrouted")
    if isinstance(unrouted, int) and unrouted > 0:
        lines.append(f"{unrouted} of them match no upstream: they stay queued until a "
                     "reload routes them")
    sync = data.get("sync")
    profile = sync.get("profile") if isinstance(sync, dict) else None
    if isinstance(sync, dict) and profile in _HELD:
        what, then = _HELD[profile]
        lines.append(printable(f"the transmit profile {what}: {profile} "
                               f"({sync.get('reason', '')}); {then}"))
    return lines


_HELD = {"hold": ("holds them", "a flush does not override a hold"),
         "priority_only": ("sends the high lane alone", "the normal lane waits")}


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.ops import dead_cli
    pid = None if args.reload is None else dead_cli.plain_number(args.reload)
    if args.reload is not None and not pid:
        # Checked here, not by argparse: one line (ExecReload's, in the journal). Above 0:
        # os.kill would signal a process group (-1: every process), or our own (0).
        what = "the agent's PID, a whole number above 0"
        _say(f"--reload: {dead_cli.not_a_number(what, args.reload)}")
        return EXIT_CONFIG
    refused = "reload refused, the running config is kept: " if pid else ""
    try:
        target = config_mod.find_config_file(
            args.config if args.file is None else args.file)   # "" too: refused
        cfg = config_mod.load_file(target) if target is not None else Config()
    except ConfigError as exc:
        _say(f"{refused}{exc}")
        return EXIT_CONFIG
    if found := preflight.problems(cfg):
        _say(f"{refused}{found[0]}")
        return EXIT_CONFIG
    try:
        theirs = None if pid is None else _reread_by(cfg, pid)
    except _NotTheAgent as exc:
        _say(str(exc))
        return exc.code
    if theirs is not None and (target is None or not _is_theirs(target, theirs)):
        # Signalled, the agent would apply its own file, and nothing of this one.
        _say(f"{refused}PID {pid} re-reads {theirs} at a reload, not "
             f"{target or 'the built-in defaults'}: make the changes there, and check that file")
        return EXIT_CONFIG
    if target is None:
        print("no config file found; the built-in defaults are valid")
    else:
        _show(f"{target}: ok ({len(cfg.upstreams)} upstream(s))")
        for note in preflight.notes(cfg) + preflight.system_unit_notes(cfg, target):
            _show(f"note: {note}")
    if pid is not None:
        # systemd's ExecReload: a config that fails here makes `systemctl reload` fail,
        # instead of the agent refusing it after systemd has reported success.
        try:
            os.kill(pid, signal.SIGHUP)
        except (OSError, OverflowError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no such PID"
            _say(f"cannot ask PID {pid} to reload: {why}")
            return 1
    return 0


class _NotTheAgent(Exception):
    """``pid`` is not known to be the agent at the config's address: never signalled
    (SIGHUP's default action ends a process). ``code``: the exit status."""

    def __init__(self, code: int, pid: int, why: str) -> None:
        super().__init__(f"not signalling PID {pid}: {why}")
        self.code = code


def _reread_by(cfg: Config, pid: int) -> str | None:
    """The file agent ``pid`` re-reads at a reload, as the agent at ``cfg``'s address says;
    None for one on the built-in defaults (it looks the file up again), or one too busy to
    say (signalled unasked). _NotTheAgent if that agent is another PID, or none answers."""
    try:
        data = _http(cfg, "/status", "reload", dict, timeout=RELOAD_ASK_S)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if timed_out(exc):
            return None
        why = str(exc) if isinstance(exc, (NotOutpost, Refused, CutShort)) \
            else not_answering(cfg, exc)
        raise _NotTheAgent(EXIT_FAILED, pid, why) from exc
    reload = data["reload"]
    if (theirs := reload.get("pid")) is None:   # it predates reload.pid
        raise _NotTheAgent(EXIT_CONFIG, pid, f"the agent at {agent_url(cfg, '')} does not say "
                           "its PID (a version older than this command): restart it, or "
                           "send it SIGHUP yourself")
    if theirs != pid:
        raise _NotTheAgent(EXIT_CONFIG, pid, f"the agent at {agent_url(cfg, '')} is PID "
                           f"{theirs} (`outpost status --json` shows it: reload.pid)")
    config = reload.get("config")
    return config if isinstance(config, str) else None


def _is_theirs(target: Path, theirs: str) -> bool:
    """Whether ``target`` is the file an agent names ``theirs``, spelled as /status spells a
    path (os_text): a byte of it that is not UTF-8 is the text ``\\xe9``, which names
    another file, or none."""
    return os_text(os.path.abspath(target)) == theirs or paths.same_file(target, Path(theirs))


def _show(line: str) -> None:
    """One line of doctor's or check-config's: what it names (the environment's, the
    config's, the bus's, a path) shown escaped."""
    print(printable(line))


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.device import detect
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    _show(f"outpost {__version__}, python {sys.version.split()[0]}")
    _show("device facts:")
    id_file = paths.device_id_file(cfg.storage.resolved_path())
    for name, value in detect(cfg.device, id_file, make=False).as_dict().items():
        # The id the agent makes where the OS has none, at its first start: not made here,
        # where a root's doctor would leave a file the service's user cannot read.
        if name == "machineId" and not value:
            value = f"(none kept: the agent makes one in {id_file} at its start)"
        _show(f"  {name:10} {value}")
    _show("paths:")
    _show(f"  config     {cfg.source}")
    _show(f"  config dir {paths.config_dir()}")
    _show(f"  spool      {cfg.storage.resolved_path()}")
    _show(f"  service    {'system' if paths.is_system_service() else 'user'}")
    _show(f"listen: {cfg.listen.host}:{cfg.listen.port}")
    _show("upstreams:")
    for up in cfg.upstreams:
        _show(f"  {up.name:10} {up.protocol:13} {up.url}  {uplink_class(up.protocol).probe(up)}")
    if not cfg.upstreams:
        _show("  (none: events are kept until an upstream is configured)")
    _doctor_sync(cfg.sync)
    return 0


def _doctor_sync(cfg: SyncConfig) -> None:
    """The [sync] rules, what this machine reports now, and the profile that gives."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from agent.sync.metered import read_once, source_for
    from agent.sync.policy import Metered, decide, percent_shown
    from agent.sync.power import read_battery
    # On a thread with its own loop: doctor may be called where a loop runs already.
    with ThreadPoolExecutor(1) as pool:
        metered = pool.submit(lambda: asyncio.run(read_once(source_for(cfg), DOCTOR_DBUS_S))).result()
    try:
        battery, unread = read_battery(), ""
    except Exception as exc:  # noqa: BLE001 - shown, as the agent counts it: no battery
        battery, unread = None, f"unreadable ({type(exc).__name__}: {exc}): counted as none"
    _show("sync:")
    _show(f"  on_metered     {cfg.on_metered}")
    _show(f"  on_low_battery {cfg.on_low_battery} (below {cfg.low_battery_pct}%)")
    _show(f"  max_hold_h     {cfg.max_hold_h:g}")
    unknown = ", treated as not metered" if metered.state is Metered.UNKNOWN else ""
    _show(f"  metered        {metered.state.value} ({metered.detail}){unknown}")
    _show("  battery        " + (f"{percent_shown(battery)}, {'on mains' if battery.plugged else 'on battery'}"
                                 if battery else unread or "none"))
    profile = decide(cfg, metered, battery)
    _show(f"  profile now    {profile.mode} ({profile.reason})")


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), but for a failed write of its own output
    to stdout (--help, --version): argparse drops the error and exits 0; here it fails as
    every command's output does (``main``: 1, or 141 for a reader that left)."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message and file is not None and file is sys.stdout:
            file.write(message)
        else:   # a usage error, on stderr: argparse's way
            super()._print_message(message, file)


# The commands kept in modules of their own, each added by its module's add_parser: imported
# only when the command line names one, or names none of the CLI's commands (--help, a
# mistyped name). `run`, every agent's start, parses its own without them: 15 ms of CPU less.
def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.install import config_file
    config_file.add_parser(sub)


def _add_service(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.install import command
    command.add_parser(sub)


def _add_dead(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.ops import dead_cli
    dead_cli.add_parser(sub, _load)


def _add_tail(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent import cli_tail
    cli_tail.add_parser(sub, _load)


_ELSEWHERE = {"config": _add_config, "service": _add_service, "dead": _add_dead, "tail": _add_tail}


def build_parser(first: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI's parser; given ``first``, the command line's first word, without the
    commands of _ELSEWHERE that it is not: it parses that command line all the same."""
    parser = _Parser(prog="outpost", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"outpost {__version__}")
    # Of _Parser too (argparse makes a subparser of its parent's class); typed as argparse's,
    # which the commands' add_parser take.
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for name, func, help_text in (
            ("run", cmd_run, "run the agent in the foreground (what the service runs)"),
            ("status", cmd_status, "show queue and upstream state (offline: from the spool)"),
            ("doctor", cmd_doctor, "show device facts, config and spool paths, upstream reachability"),
            ("flush", cmd_flush, "ask the running agent to send everything now")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        p.set_defaults(func=func)
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("check-config", help="validate a config file",
                       description="Validate a config file: every key, and that listen.host "
                       "resolves and storage.path is writable. Exit status 0 valid, 2 not (one "
                       "line names the key and the fix).")
    # FILE, or --config FILE as every other command names it.
    named = p.add_mutually_exclusive_group()
    named.add_argument("file", nargs="?", help=CONFIG_HELP)
    named.add_argument("--config", metavar="FILE", help="the same as FILE")
    p.add_argument("--reload", metavar="PID",
                   help="if valid, send SIGHUP to PID (the systemd unit's ExecReload); exit "
                   "status 2 if that agent re-reads another file, 1 if it cannot be "
                   "signalled")
    p.set_defaults(func=cmd_check_config)
    known = {*sub.choices, *_ELSEWHERE}
    for name, add in _ELSEWHERE.items():
        if first == name or first not in known:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    guard_stdout()
    try:
        try:
            line = sys.argv[1:] if argv is None else argv
            args = build_parser(line[0] if line else None).parse_args(line)
        except SystemExit as done:   # --help, --version (0), a wrong command line (2)
            code = int(done.code or 0)   # their output is flushed below, as a command's
        else:
            code = int(args.func(args))
        if sys.stdout is not None:   # None: started with it closed (`>&-`)
            sys.stdout.flush()
    except BrokenPipeError:
        # `outpost status | head -1`: the reader left; stop as a command killed by SIGPIPE
        # would, without a traceback (and without flushing again at exit).
        _drop_output()
        return SIGPIPE_EXIT
    except paths.NoHome as exc:   # no HOME and no passwd entry: nowhere per-user to look
        _say(str(exc))
        return EXIT_CONFIG
    except OutputError as exc:   # `outpost status > file` on a full disk
        _drop_output()
        print(f"outpost: cannot write the output: {exc.strerror or exc}; what was written "
              "may be cut short", file=sys.stderr)
        return EXIT_FAILED
    return code


def _drop_output() -> None:
    """Send what stdout still holds nowhere: the flush at exit must not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
