"""`outpost tail [--key K] [--json]`: what apps send, live, from the running agent.

Reads the agent's GET /tail (Server-Sent Events) and prints one line per message.
Exit codes: 0 when interrupted (Ctrl-C, the usual way to stop), 1 when no agent
answers or the agent ends the stream (it is stopping, a newer view took this one's
place, or this one read nothing for too long), 2 for a config error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import select
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator
from typing import IO, Any

from agent.logs import FINGERPRINT, fingerprint
from agent.ops.local_agent import (
    NotOutpost,
    Refused,
    agent_url,
    busy,
    not_answering,
    opened,
    timed_out,
)
from agent.ops.shared_terms import STALL_S
from agent.settings import CONFIG_HELP, Config
from agent.terminal import OutputError, printable, printable_json, printable_value

# The agent sends a keepalive every 15 s: four missed means it is gone.
READ_TIMEOUT_S = 60.0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
               load: Callable[[argparse.Namespace], Config | None]) -> None:
    """Add ``tail`` to the CLI; ``load`` (reading the config) is the CLI's own."""
    p = subparsers.add_parser(
        "tail", help="show events live as apps send them and upstreams acknowledge them",
        description="Show each event as the running agent commits it (API, key fingerprint, "
                    "type, name, id, warnings) and again as an upstream acknowledges it. "
                    "Keys are shown as fingerprints (k:xxxxxxxx), never in full. Ctrl-C "
                    "stops.")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--key", help="only this app key's events: the key (sent to the agent "
                                 "as its fingerprint, never as the key) or a fingerprint "
                                 "k:xxxxxxxx copied from the output")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=lambda args: run(args, load))


# What --key takes, said when it is given something else.
KEY_FORMS = ("give the key as the app sends it, or its fingerprint k:xxxxxxxx (k: and 8 hex "
             "digits, 0-9 a-f) as the tail shows it")


def _key_problem(key: str) -> str | None:
    """Why ``--key key`` could watch no app's events (hashed, it would, silently); None
    if it may. A key is a credential: only a mistyped fingerprint is shown back."""
    if key.startswith("k:") and not FINGERPRINT.fullmatch(key):
        return f"--key {printable(key)} is not a fingerprint: {KEY_FORMS}"
    if not key:
        return f'--key is empty (""): {KEY_FORMS}'
    if odd := next((c for c in key if not c.isprintable()), None):
        # A pasted line break, say: the agent refuses a key holding one from any app.
        return (f"--key holds a character that is not printable ({printable(odd)}), which "
                f"no app's key has: {KEY_FORMS}")
    return None


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config | None]) -> int:
    if args.key is not None and (problem := _key_problem(args.key)):
        print(f"outpost: {problem}", file=sys.stderr)
        return 2
    cfg = load(args)
    if cfg is None:
        return 2
    if sys.stdout is None:   # started with it closed (`>&-`): it would watch for no one
        print("outpost: standard output is closed: the live view has nowhere to go; give "
              "it an output (a terminal, a file or a pipe)", file=sys.stderr)
        return 1
    want = args.key if args.key is None or FINGERPRINT.fullmatch(args.key) \
        else fingerprint(args.key)
    path = "/tail" + (f"?key={want}" if want else "")
    url = agent_url(cfg, path)
    try:
        resp = opened(cfg, url, "/tail", READ_TIMEOUT_S)
    except KeyboardInterrupt:
        return 0
    except (NotOutpost, Refused) as exc:
        print(f"outpost: {printable(str(exc))}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        # Taken but not answered: an agent whose loop is busy (the kernel accepts for it).
        said = busy(cfg, "/tail", READ_TIMEOUT_S) if timed_out(exc) else not_answering(cfg, exc)
        print(f"outpost: {printable(said)}", file=sys.stderr)
        return 1
    if resp.headers.get_content_type() != "text/event-stream":   # not "the agent stopping"
        resp.close()
        print(f"outpost: {NotOutpost(cfg, '/tail')}", file=sys.stderr)
        return 1
    try:
        with resp:
            for message in _messages(resp, sys.stdout):
                if args.json:
                    print(printable_json(json.dumps(message)), flush=True)
                if message["kind"] == "closed":   # the agent says why it ends the stream
                    print(f"outpost: the agent ended the live view "
                          f"({printable(message['detail'])})", file=sys.stderr)
                    return 1
                if not args.json:
                    print(line(message), flush=True)
    except KeyboardInterrupt:
        return 0
    except (BrokenPipeError, OutputError):
        raise   # the reader left (`outpost tail | head`) or stdout failed: the CLI's to say
    except (OSError, http.client.HTTPException) as exc:
        print(f"outpost: the live view was cut off ({type(exc).__name__}: "
              f"{printable(str(exc))}): the agent stopped, or closed this view for reading "
              f"nothing for {STALL_S:g} s (was this command suspended, or its output "
              "paused?)", file=sys.stderr)
        return 1
    # A message not of the agent's shape (a number where it has text: AttributeError), or
    # JSON nested deeper than the parser recurses (RecursionError).
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        print(f"outpost: {agent_url(cfg, '')} answered /tail, but not an Outpost agent "
              f"({type(exc).__name__}: {printable(str(exc))})", file=sys.stderr)
        return 1
    print("outpost: the agent ended the live view (it is stopping)", file=sys.stderr)
    return 1


def _messages(stream: IO[bytes], out: IO[str]) -> Iterator[dict[str, Any]]:
    """The JSON of each `data:` line; comments (keepalives) and blank lines skipped. At a
    keepalive, BrokenPipeError if the program reading ``out`` has left (`outpost tail |
    head -1`): with no event coming, nothing written would tell."""
    for raw in stream:
        if raw.startswith(b"data: "):
            yield json.loads(raw[6:])
        elif raw.startswith(b":") and _reader_left(out):
            raise BrokenPipeError("the program reading the output has left")


def _reader_left(out: IO[str]) -> bool:
    """Whether ``out`` is a pipe (or terminal) whose other end is gone: poll reports an
    error or hang-up then, whatever it is asked. Nothing is written to find out."""
    if not hasattr(select, "poll"):   # Windows: the next event's write tells instead
        return False
    try:
        fd = out.fileno()
    except (OSError, ValueError):     # not a file (redirected in-process)
        return False
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def line(m: dict[str, Any]) -> str:
    """One message as a line of text; what an app sent is shown with its control
    characters escaped (an id may hold a terminal's escape sequences)."""
    now = time.strftime("%H:%M:%S")
    kind = m["kind"]
    if kind in ("ingested", "acked"):
        what = printable_value(m["type"] or "?")
        if m["name"]:
            what += f" {m['name']!r}"   # repr escapes control characters too
        text = (f"{now} {'in' if kind == 'ingested' else kind:<5} {printable_value(m['api']):<8} "
                f"{printable_value(m['key'])}  {what}  id={printable_value(str(m['id']))}")
        if kind == "acked":
            return text + f"  by {printable_value(m['upstream'])}"
        return text + "".join(f"\n         ! {printable(w)}" for w in m["warnings"])
    # A count as a whole number (:d), else ValueError: another program's text is not shown.
    if kind == "resent":
        return f"{now} in    {m['count']:d} resent event(s) above were already stored: not stored again"
    if kind == "dropped":
        return (f"{now} !     {m['count']:d} message(s) not shown: this view fell behind "
                "(ingest is never slowed for it)")
    if kind == "watching":
        who = f"key {printable(m['key'])}" if m["key"] else "every key"
        return f"{now} watching {who}; Ctrl-C to stop"
    return f"{now} {printable_json(json.dumps(m))}"
