"""`outpost dead list|show|retry|export|purge`: dead letters, seen and recovered.

Each command asks the running agent first (its local endpoints, agent/ops/dead.py). With
no agent answering, it works on the spool file: reads through a read-only connection,
retry and purge through one exclusive transaction (agent/spool/dead.py), which SQLite
refuses while an agent has the file open.
"""

from __future__ import annotations

import argparse
import codecs
import http.client
import json
import os
import sqlite3
import stat
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.clock import age_s
from agent.ops.local_agent import (
    CutShort,
    NotOutpost,
    Refused,
    agent_url,
    answer,
    busy,
    opened,
    port_unknown,
    read_whole,
    running_elsewhere,
    timed_out,
    why_not,
)
from agent.ops.shared_terms import EXPORT_PAGE, LIST_LIMIT
from agent.ops.status_table import age, size, table
from agent.outcomes import Tally
from agent.paths import (
    agent_holds,
    device_id_file,
    directory_meant,
    planted_link,
    same_file,
    sync_dir,
)
from agent.settings import CONFIG_HELP, Config
from agent.spool import dead
from agent.spool.as_found import as_found
from agent.spool.dedupe import HOUR_MS
from agent.spool.writer import is_corruption
from agent.terminal import OutputError, os_text, printable, printable_json, printable_value

Load = Callable[[argparse.Namespace], Config | None]
LIST_ROWS = 50  # entries `dead list` prints under the summary; --limit changes it
# How long a command waits for the agent's answer. A retry or purge of every dead letter
# answers once done: 700k letters took about a minute in chunks beside ingest.
ASK_TIMEOUT_S = 30.0
CHANGE_TIMEOUT_S = 600.0
CHUNK_BYTES = 1 << 16   # of an export, read and written at a time


class _NoAgent(Exception):
    """No agent answered at the configured address: work on the spool file."""


class _CutShort(Exception):
    """The agent's export stream ended before its last chunk, after ``count`` letters."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


class _Stalled(_CutShort):
    """The agent's export stream sent nothing for ASK_TIMEOUT_S, after ``count`` letters
    (what a read that timed out had taken of it is lost with it)."""


class _Unwritable(Exception):
    """The export's target refused a write (a full disk): ``error`` says why."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


Write = Callable[[bytes | bytearray], None]


def _writer(fd: int) -> Write:
    """Whole writes to ``fd``, unbuffered: a write that fails fails here, not again at a
    close that flushes what a buffer kept. A reader that left stays BrokenPipeError (141).
    On a terminal, through ``_shown``."""
    def write(data: bytes | bytearray) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _Unwritable(exc) from exc
    return _shown(write) if os.isatty(fd) else write


def _shown(write: Write) -> Write:
    """``write`` for a terminal: what the letters hold that it obeys (C1 controls, bidi
    overrides: JSON escapes C0 alone) as \\u escapes, the same JSON (printable_json). A
    file or a pipe gets the letters' bytes as they are."""
    text = codecs.getincrementaldecoder("utf-8")("replace")   # a chunk may end mid-character
    return lambda data: write(printable_json(text.decode(data)).encode())


def _chunk(resp: Any, write: Write, count: int) -> bytes:
    """The export stream's next chunk (b"" at its end); _CutShort, after writing what came
    of it, if the stream ended early or was reset (``count``: the letters written before)."""
    try:
        data = bytes(resp.read(CHUNK_BYTES))
    except http.client.IncompleteRead as exc:
        write(exc.partial)
        raise _CutShort(count + exc.partial.count(b"\n")) from exc
    except TimeoutError as exc:   # an agent there, but stalled: said as such
        raise _Stalled(count) from exc
    except OSError as exc:   # a reset: what came before it was read, and written
        raise _CutShort(count) from exc
    # A body of a Content-Length, not chunks: read(n) ends it quietly at a close before
    # its end (http.client raises IncompleteRead only for a whole read); ``length`` is
    # what it still promised.
    if not data and resp.length:
        raise _CutShort(count)
    return data


def _listing(got: Any, source: str, args: argparse.Namespace) -> list[str]:
    """`dead list`'s lines for the summary ``got``; a LookupError, TypeError or the like if
    it does not have a summary's shape."""
    lines = [printable(f"{got['count']} dead letters ({source})")]   # a spool's path
    if not got["count"]:
        return lines
    # The reason last: it is the upstream's own text, of any length. What the spool
    # holds is printed with control characters escaped (an upstream's may be escapes);
    # counts and ids as whole numbers (:d), else ValueError: another program's text.
    lines += ["", *table(["COUNT", "UPSTREAM", "OLDEST", "NEWEST", "REASON"], [
        [f"{g['count']:d}", printable_value(g["upstream"]), age(_aged(g, "oldest")),
         age(_aged(g, "newest")), printable_value(g["reason"])] for g in got["groups"]],
        right={0})]
    # The newest LIST_LIMIT groups only (an agent before that limit sends every one).
    older = got.get("reasons", len(got["groups"])) - len(got["groups"])
    if older > 0:
        lines.append(f"... and {older} older reasons (`outpost dead export FILE` has every "
                     "letter)")
    rows = got["entries"][:args.limit]
    if (args.reason or args.upstream is not None) and not got["entries"] and \
            not any(_chosen(g, args) for g in got["groups"]):
        # The entries are the agent's for the reason (and upstream), which may be among
        # the older groups.
        return [*lines, "", _no_such_reason(args.reason) if args.upstream is None
                else _none_from(args.upstream, args.reason)]
    if rows:
        lines += ["", *table(["ID", "KEY", "UPSTREAM", "AGE", "SIZE", "REASON"], [
            [f"{e['id']:d}", printable_value(e["key"]), printable_value(e["upstream"]),
             age(_aged(e, "at")), size(e["bytes"]), printable_value(e["reason"])]
            for e in rows], right={0, 4})]
        # The reason's letters, which the groups listed may leave out (older than them);
        # from an older agent, which does not send them, what the groups show.
        shown = sum(g["count"] for g in got["groups"] if _chosen(g, args))
        more = (got.get("of_upstream", shown) if args.upstream is not None else
                got.get("of_reason", shown) if args.reason else got["count"]) - len(rows)
        if more > 0:
            lines.append(f"... and {more} more (--limit N, or `outpost dead export FILE`)")
    return lines


def _aged(shown: dict[str, Any], when: str) -> float:
    """The age of a group's ``oldest`` or ``newest``, or an entry's (``at``), as the agent
    or the spool's read counted it (dead.aged: by the time the agent saw pass, which a
    wall clock corrected since does not make decades); by this command's own wall clock
    from an agent older than that, which sends the wall times alone. A TypeError if it is
    no number (another server's JSON)."""
    got = shown.get("age_s" if when == "at" else f"{when}_age_s")
    if got is None:
        return age_s(shown[when])
    if isinstance(got, bool) or not isinstance(got, int | float):
        raise TypeError(f"{when}: {got!r}")
    return float(got)


def _chosen(group: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether the summary's ``group`` is of the --reason and --upstream given."""
    return ((not args.reason or group["reason"] == args.reason)
            and (args.upstream is None or group["upstream"] == args.upstream))


def _no_such_reason(reason: str) -> str:
    """Said for a --reason no dead letter has: mistyped, or copied from a table, which
    escapes what --reason must hold as is (and `outpost status` cuts)."""
    return (f"no dead letter has the reason {printable(repr(reason))}: give one exactly as "
            "`outpost dead list --json` shows it")


def _none_from(upstream: str, reason: str | None) -> str:
    """Said for an --upstream (with its --reason) no dead letter has: a name mistyped, or
    an upstream whose letters are gone."""
    name = printable(repr(upstream))
    if reason is None:
        return (f"no dead letter is from the upstream {name}: give one exactly as "
                "`outpost dead list --json` shows it")
    return (f"no dead letter from the upstream {name} has the reason "
            f"{printable(repr(reason))}: give them exactly as `outpost dead list --json` "
            "shows them")


class _Cli:
    def __init__(self, load: Load) -> None:
        self.load = load

    def _ask(self, cfg: Config, path: str, body: dict[str, Any] | None = None) -> bytes:
        # UTF-8, not \u escapes: six bytes a character, twelve an emoji, took a long reason
        # or name of other scripts past the agent's cap (dead.BODY_LIMIT). Both are UTF-8
        # text (``_reason``).
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        req = urllib.request.Request(agent_url(cfg, path), data=data,
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        timeout = ASK_TIMEOUT_S if body is None else CHANGE_TIMEOUT_S
        try:
            with opened(cfg, req, path, timeout) as resp:
                return read_whole(cfg, resp, path)
        except Refused as exc:  # the agent answered: say what it said
            raise dead.DeadError(exc.why) from exc
        except CutShort as exc:  # an agent answered here: never the spool file, nor "no agent"
            raise dead.DeadError(str(exc)) from exc
        except (urllib.error.URLError, OSError) as exc:
            if not timed_out(exc):
                raise _NoAgent(why_not(exc)) from exc
            # An agent is there: never the spool file (it holds it), never "no agent".
            if body is None:
                raise dead.DeadError(busy(cfg, path, timeout)) from exc
            raise dead.DeadError(
                f"the agent at {agent_url(cfg, '')} took the request but has not answered in "
                f"{timeout:.0f} s: it is still working on it. `outpost status` shows the "
                "dead letters left; once it is done, the same command takes any left") from exc

    def run(self, args: argparse.Namespace) -> int:
        cfg = self.load(args)
        if cfg is None:
            return 2
        handler: Callable[[Config, argparse.Namespace], int] = getattr(self, args.dead_command)
        try:
            return handler(cfg, args)
        except (dead.DeadError, NotOutpost) as exc:
            print(f"outpost: {printable(str(exc))}", file=sys.stderr)
            return 1
        except sqlite3.Error as exc:
            why = f"cannot read the spool {cfg.storage.resolved_path()}: {exc}"
            if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
                # What mends it: the agent's start (or its first read of the damage).
                why = (f"the spool {cfg.storage.resolved_path()} is damaged ({exc}): start "
                       "the agent, which moves it aside and salvages its events, then run "
                       "this again")
            print(f"outpost: {printable(why)}", file=sys.stderr)
            return 1
        except (BrokenPipeError, OutputError):
            raise   # the reader left (`outpost dead list | head -1`) or stdout failed: main's
        except (OSError, http.client.HTTPException) as exc:  # e.g. FILE, or an agent gone
            print(f"outpost: {printable(str(exc))}", file=sys.stderr)
            return 1

    def _read(self, cfg: Config, path: str, expect: str, kind: type,
              fn: Callable[..., Any], *a: Any) -> Any:
        """(answer, source): from the agent (an object holding ``expect`` of ``kind``), else
        from the spool file read-only."""
        try:
            return answer(cfg, path, self._ask(cfg, path), expect, kind), agent_url(cfg, "")
        except _NoAgent:
            spool = cfg.storage.resolved_path()
            with as_found(spool):
                dead.no_salvage_pending(spool, agent_holds(spool))
                conn = dead.read_only(spool)
                # An agent may hold it yet not answer here (listening elsewhere, or
                # starting, or on a port the system picked).
                where = f"{spool}, no agent running"
                if agent_holds(spool):
                    where = (f"{spool}; an agent runs on it, but {unknown}"
                             if (unknown := port_unknown(cfg)) else
                             f"{spool}; an agent runs on it but does not answer at "
                             f"{agent_url(cfg, '')}")
                try:
                    return fn(conn, *a), where
                finally:
                    conn.close()

    def list(self, cfg: Config, args: argparse.Namespace) -> int:
        # With a reason or an upstream, one entry at least (--limit 0 too): whether it has
        # letters, as its group may be older than those the summary shows.
        picked = bool(args.reason) or args.upstream is not None
        asked = max(args.limit, 1) if picked else args.limit
        query = urllib.parse.urlencode({"limit": asked, **(
            {"reason": args.reason} if args.reason else {}), **(
            {"upstream": args.upstream} if args.upstream is not None else {})})
        which = dead.Which(args.reason, not args.reason, args.upstream) if picked else None

        def offline(conn: sqlite3.Connection) -> dict[str, Any]:
            if damaged := dead.summary_damaged(conn):
                print(printable("outpost: the spool's summary of its dead letters (their "
                                "count by reason) disagrees with them (damage): counted "
                                "from them; the agent's start counts it again"),
                      file=sys.stderr)
            got = dead.summary(conn, LIST_LIMIT, kept=not damaged)
            got["entries"] = dead.entries(conn, which, min(asked, LIST_LIMIT))   # as the agent
            if args.reason:
                got["of_reason"] = dead.of_reason(conn, args.reason, kept=not damaged)
            if args.upstream is not None and which is not None:
                got["of_upstream"] = dead.chosen(conn, which, kept=not damaged)
            return got
        try:
            got, source = self._read(cfg, f"/dead?{query}", "count", int, offline)
        except dead.NoSpool as exc:
            if not args.json:
                print(printable(f"no dead letters ({exc})"))
                return 0
            # --json is read by a program: what a spool with no dead letter gives (offline).
            got = {"count": 0, "groups": [], "reasons": 0, "entries": [],
                   **({"of_reason": 0} if args.reason else {}),
                   **({"of_upstream": 0} if args.upstream is not None else {})}
            print(json.dumps(got, indent=2))
            return 0
        try:
            if args.upstream is not None:   # an agent before --upstream sends every one's
                got["entries"] = [e for e in got["entries"] if e["upstream"] == args.upstream]
            lines = _listing(got, source, args)
            got["entries"] = got["entries"][:args.limit]   # --json: no more than asked for
        except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError) as exc:
            # Holding `count`, the one field asked of it, another server's JSON is no
            # summary (the spool's own always has the shape): never shown, --json included.
            raise NotOutpost(cfg, "/dead") from exc
        print(printable_json(json.dumps(got, indent=2)) if args.json else "\n".join(lines))
        return 0

    def show(self, cfg: Config, args: argparse.Namespace) -> int:
        got, _ = self._read(cfg, f"/dead/{args.id}", "body", object, dead.show, args.id)
        print(printable_json(json.dumps(got, indent=2, ensure_ascii=False)))
        return 0

    def export(self, cfg: Config, args: argparse.Namespace) -> int:
        target = Path(args.file)
        # `-` is standard output, as for every Unix tool (and Windows has no /dev/stdout).
        mode = stat.S_IFCHR if args.file == "-" else _writable(cfg, target)
        own = args.file == "-" or _is_stdout(target)
        named = "standard output" if own else str(target)
        if own and sys.stdout is None:   # started with it closed (`>&-`): no letter would go
            raise dead.DeadError("cannot write standard output: it is closed; name a file "
                                 "to export to")
        try:
            if own:   # written to as the shell opened it (`>>` appends), never replaced
                sys.stdout.flush()
                count = self._export_to(cfg, _writer(sys.stdout.fileno()))
            elif not stat.S_ISREG(mode):   # a pipe or a device: straight through
                # O_BINARY (Windows): the letters' bytes as they are, no \r added.
                fd = os.open(target, os.O_WRONLY | getattr(os, "O_BINARY", 0))
                try:
                    count = self._export_to(cfg, _writer(fd))
                finally:
                    os.close(fd)
            else:   # through symlinks: the link stays a link
                count = self._export_replacing(cfg, Path(os.path.realpath(target)), target)
        except _CutShort as exc:
            kept = (f"{named} is unchanged" if stat.S_ISREG(mode) and not own else
                    f"{named} got only those")
            if isinstance(exc, _Stalled):
                raise dead.DeadError(
                    f"the agent at {agent_url(cfg, '')} sent nothing more of the export for "
                    f"{ASK_TIMEOUT_S:g} s, after {exc.count} dead letters (it is busy, or "
                    f"stuck: its log may say why): {kept}; try again") from exc
            raise dead.DeadError(f"the agent stopped the export after {exc.count} dead "
                                 f"letters (its log says why): {kept}") from exc
        except _Unwritable as exc:
            why = exc.error.strerror or str(exc.error)
            if own:   # as every command's output that fails (cli.main)
                raise OutputError(exc.error.errno, why) from exc
            kept = f"; {target} is unchanged" if stat.S_ISREG(mode) else ""
            raise dead.DeadError(f"cannot write {target}: {why}{kept}") from exc
        # Beside the letters, not among them: `outpost dead export /dev/stdout | jq`.
        print(printable(f"exported {count} dead letters to {named}"),
              file=sys.stderr if own else None)
        return 0

    def _export_replacing(self, cfg: Config, real: Path, target: Path) -> int:
        """Written beside the file and moved onto it once whole: a failed export leaves the
        file it would have replaced. Private (mkstemp's 0600): bodies are app data."""
        try:
            fd, part = tempfile.mkstemp(prefix=f".{real.name}.", dir=real.parent)
        except OSError as exc:
            raise dead.DeadError(f"cannot write {target}: {exc.strerror or exc}") from exc
        try:
            try:
                count = self._export_to(cfg, _writer(fd))
                # On disk before it takes the file's place, and the move after: export then
                # purge must not leave, after a power cut, the letters purged and no file.
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise _Unwritable(exc) from exc
            finally:
                os.close(fd)
            os.replace(part, real)
        except BaseException:
            os.unlink(part)
            raise
        sync_dir(real.parent)
        return count

    def _export_to(self, cfg: Config, write: Write) -> int:
        req = urllib.request.Request(agent_url(cfg, "/dead/export"))
        count = 0
        try:
            resp = opened(cfg, req, "/dead/export", ASK_TIMEOUT_S)
        except Refused as exc:
            raise dead.DeadError(f"the agent refused the export: {exc.why}") from exc
        except (urllib.error.URLError, OSError) as exc:
            if timed_out(exc):
                raise dead.DeadError(busy(cfg, "/dead/export", ASK_TIMEOUT_S)) from exc
            resp = None  # no agent: read the spool file
        if resp is not None:
            with resp:
                if resp.headers.get_content_type() != "application/x-ndjson":
                    raise NotOutpost(cfg, "/dead/export")   # nothing of it written
                # read(n), not lines: iterating ends quietly on a stream cut before its
                # last chunk, and a partial export would pass for the whole of it.
                while chunk := _chunk(resp, write, count):
                    write(chunk)
                    count += chunk.count(b"\n")
            return count
        spool = cfg.storage.resolved_path()
        with as_found(spool):
            dead.no_salvage_pending(spool, agent_holds(spool))
            conn = dead.read_only(spool)
            try:
                lines, last = dead.export(conn, 0, EXPORT_PAGE)
                while lines:
                    write(lines)
                    count += lines.count(b"\n")
                    lines, last = dead.export(conn, last, EXPORT_PAGE)
            finally:
                conn.close()
        return count

    def _change(self, cfg: Config, args: argparse.Namespace, what: str) -> int:
        which = dead.Which(args.reason, args.all, args.upstream)
        try:
            done = "retried" if what == "retry" else "purged"
            if args.upstream is not None:
                self._narrows(cfg, what)
            # The spool too: another agent answering at this address (two configs sharing a
            # listen.port) refuses it, where it would have changed its own letters.
            meant = os_text(os.path.realpath(cfg.storage.resolved_path()))
            got = answer(cfg, f"/dead/{what}", self._ask(cfg, f"/dead/{what}", {
                "reason": args.reason, "all": args.all,
                **({"upstream": args.upstream} if args.upstream is not None else {}),
                "spool": meant}), done, int)
            n, where = got[done], "the running agent"
        except _NoAgent as exc:
            # One runs, elsewhere: said as status says it (the file is its, and refused).
            if elsewhere := running_elsewhere(cfg, str(exc)):
                raise dead.DeadError(elsewhere) from exc
            spool = cfg.storage.resolved_path()
            with as_found(spool):   # the change uses no -shm; its look at the version did
                dead.no_salvage_pending(spool)
                with (offline := dead.Offline(spool)) as conn:
                    if what == "retry":
                        dedupe = (cfg.storage.dedupe_window_h * HOUR_MS,
                                  cfg.storage.dedupe_max_keys)
                        n = dead.requeue_stopped(conn, which, *dedupe).count
                    else:
                        n = dead.purge(conn, which).out.counters.get(Tally.DEAD_PURGED, 0)
            where = f"{spool} (no agent running)"
            if offline.mended:
                print(printable("outpost: the spool's summary of its dead letters (their "
                                "count by reason) disagreed with them (damage): counted "
                                "again from them"), file=sys.stderr)
        if what == "retry":
            print(printable(f"re-queued {n} dead letters at the tail of their keys' queues "
                            f"({where})"))
        else:
            print(printable(f"purged {n} dead letters ({where})"))
        if not n and args.upstream is not None:
            print(_none_from(args.upstream, args.reason))
        elif not n and args.reason:
            print(_no_such_reason(args.reason))
        return 0

    def _narrows(self, cfg: Config, what: str) -> None:
        """DeadError unless the running agent takes "upstream" in a retry or purge: one
        older than this command (an upgrade installed while it runs) ignores it, and would
        take the letters of every upstream. _NoAgent when none answers (the spool alone)."""
        got = answer(cfg, "/dead", self._ask(cfg, "/dead?limit=0"), "groups", list)
        if got.get("by_upstream") is not True:
            raise dead.DeadError(
                f"the agent at {agent_url(cfg, '')} is a version older than this command: "
                f"it cannot {what} by --upstream, and would take the letters of every "
                "upstream; nothing was asked of it: restart it to run the new version")

    def retry(self, cfg: Config, args: argparse.Namespace) -> int:
        return self._change(cfg, args, "retry")

    def purge(self, cfg: Config, args: argparse.Namespace) -> int:
        return self._change(cfg, args, "purge")


# The files SQLite and `outpost run` keep beside the spool, each holding part of it.
_SPOOL_FILES = (("", "the file"), ("-wal", "the -wal"), ("-shm", "the -shm"),
                ("-journal", "the -journal"), (".lock", "the lock file"))


def _of_the_spool(target: Path, spool: Path) -> str | None:
    """Which of the spool's files ``target`` is, by path (through symlinks) or by inode (a
    hard link), the machine id kept beside it among them; None if none."""
    files = [(Path(f"{spool}{suffix}"), name) for suffix, name in _SPOOL_FILES]
    files.append((device_id_file(spool), "the machine id's file"))
    return next((name for path, name in files if same_file(target, path)), None)


def _writable(cfg: Config, target: Path) -> int:
    """The st_mode of the file an export may write (a regular file's when there is none),
    or DeadError saying why it may not."""
    if (planted := planted_link(target)) is not None:
        raise dead.DeadError(f"cannot write {target}: {planted}")
    try:
        # Stat'd, not resolved: /dev/stdout leads to a pipe through a link that
        # realpath cannot follow (it names no file), and so does /proc/self/fd/1.
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as exc:
        raise dead.DeadError(f"cannot write {target}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise dead.DeadError(f"cannot write {target}: it is a directory; name a file")
    spool = cfg.storage.resolved_path()
    if spool_file := _of_the_spool(target, spool):
        # Replaced by the export, the queue would be gone (a running agent's at its stop).
        raise dead.DeadError(f"cannot write {target}: it is {spool_file} of the agent's "
                             f"spool (storage.path {spool}); name another file, such as "
                             "dead.jsonl")
    if not cfg.source.startswith("<") and same_file(target, Path(cfg.source)):
        # Keys and all: the agent's next start or reload would fail on the letters.
        raise dead.DeadError(f"cannot write {target}: it is the config file; name "
                             "another file, such as dead.jsonl")
    return mode


def _is_stdout(target: Path) -> bool:
    """Whether ``target`` is this command's own standard output (/dev/stdout, say)."""
    try:
        return os.path.samestat(os.stat(target), os.fstat(sys.stdout.fileno()))
    except (OSError, AttributeError, ValueError):   # no such file; stdout closed or None
        return False


def plain_number(text: str) -> int | None:
    """``text`` as a whole number, if it is only ASCII digits; else None. Not int() alone,
    which takes ' 5', '+5', '1_0' and other scripts' digits; nor str.isdigit, which takes
    '²', that int() then refuses."""
    try:
        return int(text) if text.isascii() and text.isdigit() else None
    except ValueError:   # more digits than int() reads (4300)
        return None


def not_a_number(what: str, text: str) -> str:
    """Said of ``text`` given for ``what``: the number it is not, shown cut short."""
    shown = text if len(text) <= 40 else f"{text[:20]}..."
    return f"expected {what}, got {shown!r}"


def _count(text: str) -> int:
    """--limit, or an ID: 0 or more."""
    if (number := plain_number(text)) is None:
        raise argparse.ArgumentTypeError(not_a_number("a whole number, 0 or more", text))
    return number


def _reason(text: str, what: str = "reason", article: str = "a") -> str:
    """--reason: a reason exactly as `outpost dead list --json` shows it (the table escapes
    control characters), never empty."""
    if not text:
        raise argparse.ArgumentTypeError(f"{article} {what} is never empty (see `outpost dead "
                                         "list`)")
    try:
        text.encode()
    except UnicodeEncodeError:   # bytes of another encoding, kept as surrogates: no reason's
        raise argparse.ArgumentTypeError(
            f"{printable(text)} is not UTF-8 text, as every {what} is: give one exactly as "
            "`outpost dead list --json` shows it") from None
    return text


def _upstream(text: str) -> str:
    """--upstream: an upstream's name as `outpost dead list --json` shows it, as a reason."""
    return _reason(text, "upstream's name", "an")


def _file(text: str) -> str:
    """export's FILE: never empty (an unset variable), which the system takes for the
    current directory."""
    if not text:
        raise argparse.ArgumentTypeError("the file name is empty: name a file, such as "
                                         "dead.jsonl, or - for standard output")
    if (directory := directory_meant(text)) is not None:
        raise argparse.ArgumentTypeError(f"{printable(text)} names a directory; name a file "
                                         f"in it, such as "
                                         f"{printable(os.path.join(directory, 'dead.jsonl'))}")
    return text


def add_parser(sub: Any, load: Load) -> None:
    """Register `outpost dead ...`; ``load`` reads the config."""
    cli = _Cli(load)
    top = sub.add_parser("dead", help="see, export, retry or purge dead letters",
                         description="Events an upstream refused for good are kept as dead "
                         "letters. Works on a running agent, or on the spool when none runs.")
    top.set_defaults(func=cli.run)
    helps = {"list": "count, reason, upstream and age, grouped by reason and upstream",
             "show": "one dead letter, with its body", "export": "write them all as JSONL",
             "retry": "send them again: back at the tail of their key's queue",
             "purge": "delete them (needs --reason R or --all; --upstream NAME narrows "
                       "either)"}
    cmds = top.add_subparsers(dest="dead_command", required=True,
                              metavar="{" + ",".join(helps) + "}")   # not "dead_command"
    for name, text in helps.items():
        p = cmds.add_parser(name, help=text, description=text)
        p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        if name == "list":
            p.add_argument("--reason", type=_reason, help="only this reason")
            p.add_argument("--upstream", metavar="NAME", type=_upstream,
                           help="only those this upstream refused")
            p.add_argument("--limit", type=_count, default=LIST_ROWS, help="entries to print")
            p.add_argument("--json", action="store_true", help="print JSON")
        elif name == "show":
            p.add_argument("id", type=_count, help="its ID, from `outpost dead list`")
        elif name == "export":
            p.add_argument("file", type=_file,
                           help="where to write (created mode 0600); - for standard output")
        else:
            pick = p.add_mutually_exclusive_group(required=True)
            pick.add_argument("--reason", type=_reason, help="those refused with this reason")
            pick.add_argument("--all", action="store_true", help="every dead letter")
            # `dead list` groups by reason and upstream: two upstreams may refuse in the
            # same words, and --reason alone takes both upstreams' letters.
            p.add_argument("--upstream", metavar="NAME", type=_upstream,
                           help="only those this upstream refused (with --reason R or --all)")
