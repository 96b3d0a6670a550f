"""Text from apps and upstreams in the agent's own log: one line per record, and nothing a
terminal obeys. A line break in a field name or an upstream's error body would forge a
whole log line; an escape sequence (clear the screen) or a bidi override (U+202E) would
rewrite or hide what `journalctl` or `tail -f` shows. Such characters are shown escaped
(`\\n`, `\\x1b`, `\\u202e`); a traceback keeps Python's own lines, with the exception's
text escaped."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.dialects.replies import refused_items
from agent.families.event import SEGMENT, Event
from agent.logs import register_secret, setup_logging
from agent.ops.tail import NAME_CHARS, describe
from tests.conftest import AgentProcess, free_port, write_config
from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.waiting import wait_for

# A whole forged record, then a screen clear, a carriage return and a bidi override.
FORGED = "2030-01-01T00:00:00Z WARNING outpost.forwarder: FAKE LINE"
HOSTILE = f"\n{FORGED} \x1b[2J\r\u202egnp.exe"
SHOWN = f"\\n{FORGED} \\x1b[2J\\r\\u202egnp.exe"
RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
KEY = "app-logesc"


def assert_nothing_hidden(text: str) -> None:
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]",
                         text), [line for line in text.splitlines() if not line.isprintable()]


async def test_app_and_upstream_text_cannot_forge_or_hide_log_lines(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    upstream = await FaultyUpstream().start()
    # Its error body holds the hostile text: the event is dead-lettered with it as reason.
    upstream.script = [Fault("status", 400, body=HOSTILE.encode())]
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port, upstreams=[
        {"name": "up", "protocol": "nucleus-http", "url": upstream.http_url, "keys": [KEY],
         "flush_interval_s": 0.05, "timeout_s": 2}])
    agent = agent_process(config, port)
    await asyncio.to_thread(agent.start)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{agent.url}/app/{KEY}/track", json={"data": [
                    {"id": "e1", "type": "track", "name": "signup"}]}) as r:
                assert r.status == 200, await r.text()
            # A field whose name holds it, and whose value (NaN) is refused: the event is
            # left unacknowledged and logged, naming the field.
            name = json.dumps(HOSTILE)
            body = f'{{"data": [{{"id": "e2", "type": "track", "properties": {{{name}: NaN}}}}]}}'
            async with s.post(f"{agent.url}/app/{KEY}/track", data=body,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
            await wait_for(lambda: all(w in agent.log.read_text() for w in (
                "moved to dead letters", "left unacknowledged")), timeout=20)
            async with s.get(f"{agent.url}/status") as r:
                status = await r.json()
        assert agent.terminate() == 0
    finally:
        await upstream.stop()
    log = agent.log.read_text()
    lines = log.splitlines()
    assert [line for line in lines if not RECORD.match(line) or line.startswith(FORGED)] == [], log
    assert_nothing_hidden(log)
    dead = [line for line in lines if "moved to dead letters" in line]
    refused = [line for line in lines if "left unacknowledged" in line]
    assert len(dead) == 1 and dead[0].endswith(f"HTTP 400: {SHOWN}"), log
    assert len(refused) == 1 and f"data[0].properties.{SHOWN}: NaN" in refused[0], log
    # /status is JSON: the reason is there exactly, as JSON escapes it.
    assert status["dead_reasons"][0]["reason"] == f"HTTP 400: {HOSTILE}", status


@pytest.fixture
def stream() -> Iterator[Callable[[bool], io.StringIO]]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def install(journald: bool) -> io.StringIO:
        buf = io.StringIO()
        setup_logging("info", stream=buf, journald=journald)
        return buf

    yield install
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize("journald", [False, True])
def test_a_traceback_keeps_its_lines_and_escapes_the_exceptions_text(
        stream: Callable[[bool], io.StringIO], journald: bool) -> None:
    """A traceback's line breaks are Python's, and stay; an exception's message and notes
    (an upstream's or a D-Bus peer's words) are escaped like a message."""
    buf = stream(journald)
    try:
        try:
            raise ValueError(HOSTILE)
        except ValueError as inner:
            outer = RuntimeError(f"reading failed:{HOSTILE}")
            outer.add_note(HOSTILE)
            raise outer from inner
    except RuntimeError:
        logging.getLogger("agent.x").exception("watching failed: %s", HOSTILE)
    text = buf.getvalue()
    assert_nothing_hidden(text)
    lines = [line.removeprefix("<3>") for line in text.splitlines()]
    if journald:
        assert all(line.startswith("<3>") for line in text.splitlines()), text
    else:
        assert RECORD.match(lines[0]), text
    assert lines[0].endswith(f"agent.x: watching failed: {SHOWN}"), text
    assert f"ValueError: {SHOWN}" in lines, text
    assert lines[-2:] == [f"RuntimeError: reading failed:{SHOWN}", SHOWN], text
    assert "The above exception was the direct cause of the following exception:" in lines
    assert sum(line == "Traceback (most recent call last):" for line in lines) == 2, text
    assert any(line.startswith('  File "') for line in lines), text
    assert not any(line.startswith(FORGED) for line in lines), text


def test_a_secret_is_redacted_in_the_escaped_forms_the_log_shows_it_in(
        stream: Callable[[bool], io.StringIO]) -> None:
    """An upstream key pasted from a web console with a zero-width space in it: the log
    shows that character escaped (an exception's note is escaped before its redaction, a
    repr escapes it before the log sees the text), and the key is still redacted."""
    secret = "upkey-\u200b7f3a9c2d"
    register_secret(secret)
    buf = stream(False)
    log = logging.getLogger("agent.x")
    log.warning("upstream refused key %r", secret)
    try:
        try:
            raise KeyError(secret)   # its str is a repr: escaped by Python
        except KeyError as inner:
            outer = RuntimeError("upstream refused")
            outer.add_note(f"its reply: unknown key {secret}")
            raise outer from inner
    except RuntimeError:
        log.exception("sending failed")
    text = buf.getvalue()
    assert "7f3a9c2d" not in text, text
    assert "upstream refused key '***'" in text, text
    assert "KeyError: '***'" in text, text
    assert "its reply: unknown key ***" in text, text


async def test_a_batch_stored_in_part_logs_its_refusal_on_one_escaped_line(
        make_agent: Callable[..., Any], stream: Callable[[bool], io.StringIO]) -> None:
    """The warning for a batch stored in part names the refused messages' keys (the first
    three characters of each) and quotes the first refusal, a message's `messageId`
    included: both come from the client, and the log's own escaping shows them as it shows
    every message."""
    buf = stream(False)
    agent = await make_agent()
    hostile = HOSTILE.replace(FORGED, "FAKE LINE")   # a messageId is at most 99 characters
    batch = {"batch": [
        {"type": "track", "event": "ok", "userId": "u", "writeKey": KEY},
        {"type": "track", "userId": "u", "messageId": hostile, "writeKey": KEY},
        {"type": "track", "event": "ok", "userId": "u", "writeKey": "\nk"}]}   # refused key
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{agent.port}/v1/batch", json=batch) as r:
        assert r.status == 207, await r.text()
    lines = [line for line in buf.getvalue().splitlines() if "the rest stored" in line]
    shown = SHOWN.replace(FORGED, "FAKE LINE")
    assert len(lines) == 1 and "for keys app***, \\nk*** refused" in lines[0], buf.getvalue()
    assert f"messageId={shown}: track needs" in lines[0], buf.getvalue()
    assert_nothing_hidden(buf.getvalue())


def test_a_secret_cut_by_a_shortened_text_is_still_redacted(
        stream: Callable[[bool], io.StringIO]) -> None:
    """A batch refusal quoted in the log, and an event name in the live view, are cut short;
    a key the cut falls in must be redacted whole first, not shown in part (a part of a
    key is most of a key)."""
    secret = "wk-5e1f0c4b9a7d2e63"
    register_secret(secret)
    buf = stream(False)
    text = "x" * 290 + secret + " and more"   # the cut at 300 falls inside the key
    refused_items(logging.getLogger("agent.x"), "app-key", [(400, text)], 10)
    name = "n" * (NAME_CHARS - 5) + secret   # the live view shows NAME_CHARS of a name
    shown = describe(Event("app-key", SEGMENT, 1, orjson.dumps(
        {"type": "track", "event": name, "messageId": "m1", "userId": "u"})))
    assert "5e1f0c" not in buf.getvalue() and "wk-5e1" not in buf.getvalue(), buf.getvalue()
    assert "***" in buf.getvalue(), buf.getvalue()
    assert "wk-5e" not in shown["name"] and shown["name"].endswith("***"), shown


def test_exc_info_outside_an_exception_reads_as_pythons(
        stream: Callable[[bool], io.StringIO]) -> None:
    """`exc_info=True` where no exception is being handled: the line Python's logging
    writes (`NoneType: None`), as before the log escaped tracebacks."""
    buf = stream(False)
    logging.getLogger("agent.x").error("nothing raised", exc_info=True)
    assert buf.getvalue().splitlines()[1:] == ["NoneType: None"], buf.getvalue()
