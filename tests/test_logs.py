"""Log format (journald and plain), secret redaction and repeat rate limiting."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import logs
from agent.logs import RateLimiter, RedactingFilter, SecretRegistry, log_limited, setup_logging
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def out() -> io.StringIO:
    buf = io.StringIO()
    setup_logging("debug", stream=buf, journald=False)
    return buf


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_format(out: io.StringIO) -> None:
    logging.getLogger("agent.spool").warning("spool at %d%%", 91)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ WARNING agent.spool: spool at 91%\n", out.getvalue())


def test_journald_priorities_and_no_timestamp() -> None:
    buf = io.StringIO()
    setup_logging("debug", stream=buf, journald=True)
    log = logging.getLogger("agent.x")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert buf.getvalue().splitlines() == [
        "<7>agent.x: d", "<6>agent.x: i", "<4>agent.x: w", "<3>agent.x: e", "<2>agent.x: c",
    ]


def test_journald_prefixes_every_traceback_line() -> None:
    buf = io.StringIO()
    setup_logging("info", stream=buf, journald=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("agent.x").exception("failed")
    lines = buf.getvalue().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


def test_level_filters_and_bad_level_is_rejected(out: io.StringIO) -> None:
    setup_logging("warning", stream=out, journald=False)
    logging.getLogger("agent.x").info("hidden")
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose")


def test_setup_twice_installs_one_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    setup_logging("info", stream=io.StringIO())
    setup_logging("info", stream=io.StringIO())
    assert len(root.handlers) == before + 1


def test_journal_stream_detection_compares_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.stderr_is_journal(stream, env)
        assert not logs.stderr_is_journal(other, env)
        assert not logs.stderr_is_journal(stream, {})
        assert logs.stderr_is_journal(io.StringIO(), env)


def test_registered_secret_redacted_from_message_args_and_traceback(out: io.StringIO) -> None:
    key = "wk_8f3a9c2d7e"
    logs.register_secret(key)
    log = logging.getLogger("agent.x")
    log.warning("rejected key %s for %r", key, {"writeKey": key})
    try:
        raise ValueError(f"bad key {key}")
    except ValueError:
        log.exception("ingest failed")
    text = out.getvalue()
    assert key not in text
    assert "rejected key *** for" in text
    assert "ValueError: bad key ***" in text


def test_filter_handles_basic_auth_form_of_a_key() -> None:
    registry = SecretRegistry()
    registry.add("segmentKey123")
    # base64("segmentKey123:"), as Segment SDKs send it
    assert registry.redact("creds c2VnbWVudEtleTEyMzo= rejected") == "creds *** rejected"


def test_percent_encoded_forms_of_a_key_are_redacted() -> None:
    registry = SecretRegistry()
    registry.add("team/key é")
    # As a URL's path holds it, and as any other component does.
    assert registry.redact("/app/team/key%20%C3%A9/track ?k=team%2Fkey%20%C3%A9") == \
        "/app/***/track ?k=***"


def test_a_key_that_is_another_keys_encoded_form_gets_its_own_forms() -> None:
    registry = SecretRegistry()
    registry.add("team key")      # registers its URL form "team%20key" too
    registry.add("team%20key")    # another app's key, spelled as that form
    basic = base64.b64encode(b"team%20key:").decode()
    assert registry.redact(f"creds {basic} rejected") == "creds *** rejected"


def test_longest_secret_wins_and_short_ones_are_ignored() -> None:
    registry = SecretRegistry()
    registry.add("abcd")
    registry.add("abcdefgh")
    registry.add("ab")
    assert registry.redact("abcdefgh abcd ab") == "*** *** ab"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("headers {'Authorization': 'Bearer eyJhbGciOi.J9x'}", "headers {'Authorization': 'Bearer ***'}"),
        ('"authorization": "k3y-raw"', '"authorization": "***"'),
        ("sent Bearer abc123def456 upstream", "sent Bearer *** upstream"),
        ("POST /v1/webhook?writeKey=K123&x=1", "POST /v1/webhook?writeKey=***&x=1"),
        ('{"writeKey": "abc"}', '{"writeKey": "***"}'),
        ("Basic authentication failed", "Basic authentication failed"),
        # A url's user:password@ (a proxy's), its password holding ':'; not an '@' after
        # the authority, an IPv6 address's ':' or a mailto:.
        ("via http://bob:pa:ss@proxy:3128 down", "via http://bob:***@proxy:3128 down"),
        ("see https://host:8443/users/@alice", "see https://host:8443/users/@alice"),
        ("at http://[::1]:8080/a@b", "at http://[::1]:8080/a@b"),
        ("mail mailto:bob@example.com", "mail mailto:bob@example.com"),
    ],
)
def test_generic_credentials(text: str, expected: str) -> None:
    assert SecretRegistry().redact(text) == expected


def test_a_megabyte_line_of_dotted_names_is_redacted_in_one_pass(out: io.StringIO) -> None:
    """The pattern for a url's user:password@ tried a scheme at each word start of a run of
    dotted or dashed names and read to the run's end each time: quadratic (a 32 KB line took
    5 s), so a 1 MB line, an app's value or an upstream's page quoted whole, held the log,
    and the event loop writing it, for over an hour. This returns at once when linear."""
    line = "a." * 500_000
    logging.getLogger("agent.x").warning("seen %s http://bob:pw@proxy:3128 ok", line)
    assert out.getvalue().rstrip().endswith("a.a. http://bob:***@proxy:3128 ok")


def test_filter_survives_bad_format_args() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("nan",), None)
    assert RedactingFilter(SecretRegistry()).filter(record)
    assert record.args == ("nan",)


def test_rate_limited_repeats_are_counted(out: io.StringIO) -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock)
    log = logging.getLogger("agent.forwarder")
    for _ in range(4):  # one emitted, three suppressed
        log_limited(log, logging.WARNING, "upstream-down:nucleus", "upstream %s unreachable: %s",
                    "nucleus", "timeout", limiter=limiter)
        clock.now += 10
    clock.now = 1060.0
    log_limited(log, logging.WARNING, "upstream-down:nucleus", "upstream %s unreachable: %s",
                "nucleus", "refused", limiter=limiter)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("agent.forwarder: upstream nucleus unreachable: timeout")
    assert lines[1].endswith("upstream nucleus unreachable: refused (repeated 3 times in the last 60 s)")


def test_rate_limit_keys_are_per_logger_and_key(out: io.StringIO) -> None:
    limiter = RateLimiter(60, FakeClock())
    a, b = logging.getLogger("agent.a"), logging.getLogger("agent.b")
    for logger, key in ((a, "k1"), (a, "k2"), (b, "k1"), (a, "k1")):
        log_limited(logger, logging.ERROR, key, "down", limiter=limiter)
    assert len(out.getvalue().splitlines()) == 3


def test_no_suffix_after_a_quiet_interval_and_singular(out: io.StringIO) -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock)
    log = logging.getLogger("agent.x")
    log_limited(log, logging.INFO, "k", "100% down", limiter=limiter)
    clock.now += 100
    log_limited(log, logging.INFO, "k", "100% down", limiter=limiter)
    clock.now += 5
    log_limited(log, logging.INFO, "k", "100% down", limiter=limiter)
    clock.now += 200
    log_limited(log, logging.INFO, "k", "100% down", limiter=limiter)
    lines = out.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "100% down", "100% down", "100% down (repeated 1 time in the last 205 s)",
    ]


def test_disabled_level_is_not_counted(out: io.StringIO) -> None:
    setup_logging("warning", stream=out, journald=False)
    limiter = RateLimiter(60, FakeClock())
    log = logging.getLogger("agent.x")
    log_limited(log, logging.DEBUG, "k", "noise", limiter=limiter)
    log_limited(log, logging.WARNING, "k", "real", limiter=limiter)
    assert out.getvalue().splitlines()[0].endswith("agent.x: real")


def test_record_points_at_the_caller(out: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        log_limited(logging.getLogger("agent.x"), logging.INFO, "k", "m", limiter=RateLimiter(60, FakeClock()))
    assert caplog.records[0].funcName == "test_record_points_at_the_caller"


def test_old_keys_are_pruned() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock, max_keys=2)
    limiter.admit(("l", "a"))
    limiter.admit(("l", "b"))
    clock.now += 61
    assert limiter.admit(("l", "c")) == ""
    assert len(limiter._seen) == 1


def test_without_stderr_logs_go_to_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pythonw.exe (the Windows task) runs with sys.stderr set to None.
    monkeypatch.setattr("sys.stderr", None)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setenv("OUTPOST_SYSTEM", "0")
    setup_logging("info")
    logging.getLogger("agent.x").info("to the file")
    logging.getLogger().handlers[-1].flush()
    (log_file,) = tmp_path.glob("**/outpost.log")
    assert log_file.read_text().rstrip().endswith("agent.x: to the file")


def test_redaction_among_many_keys_sharing_prefixes() -> None:
    registry = SecretRegistry()
    for i in range(20_000):  # prefix-indexed: adding a key costs the same at any count
        registry.add(f"app-{i}")
    registry.add("app-7-long")
    text = "app-7app-7 /app/app-7-long/track app-19999. app-20000 ap c2VnbWVudEtleTEyMzo="
    assert registry.redact(text) == "****** /app/***/track ***. ***0 ap c2VnbWVudEtleTEyMzo="
    assert registry.redact(base64.b64encode(b"app-123:").decode()) == "***"


def test_a_head_is_redacted_before_it_is_cut() -> None:
    registry = SecretRegistry()
    key = "sk_live_0123456789abcdef"
    registry.add(key)
    assert registry.redacted_head("x" * 195 + key + "y" * 10**6, 200) == "x" * 195 + "***yy"
    # Keys redacted shorten the text: a key the first look cut in half moves into the head.
    assert registry.redacted_head(key * 11, 20) == "*" * 20
    assert registry.redacted_head("Authorization: Bearer abc123def456", 25) == \
        "Authorization: Bearer ***"


async def test_malformed_requests_log_aiohttp_s_traceback_once_a_minute(
        make_agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp logs each request it cannot parse as an error with its traceback: any local
    process could flood the log with them (audit). One a minute is logged, the rest counted."""
    caplog.set_level(logging.INFO)
    agent = await make_agent()
    bad = (b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
           b"Content-Length: 3\r\n\r\n{}")
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        writer.write(bad)
        assert (await asyncio.wait_for(reader.readline(), 10)).split(b" ")[1] == b"400"
        writer.close()
        await writer.wait_closed()
    errors = [r for r in caplog.records if r.name == "aiohttp.server"]
    # At most the first: an earlier test in this process may have had it logged already.
    assert len(errors) <= 1, [r.getMessage() for r in errors]
    # aiohttp logs a handler's crash (a 500: a bug of ours) with the same words: each one
    # is logged, whatever came before (review: the limit hid them too).
    for _ in range(2):
        try:
            raise ValueError("a handler's bug")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s",
                                                          "127.0.0.1")
    crashes = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ValueError]
    assert len(crashes) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="journald")
@pytest.mark.parametrize("mistake", ["config", "busy port"])
def test_under_systemd_why_run_did_not_start_is_an_error_in_the_journal(
        tmp_path: Path, mistake: str) -> None:
    """`outpost run` under systemd (stderr the journal's stream) that cannot start: its one
    line went out with no priority prefix, so journald filed it at info, and
    `journalctl -u outpost -p warning`, which docs/operations.md gives for warnings and
    errors, showed nothing of why the service failed."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] if mistake == "busy port" else 0
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[listen]\nport = {port}\n[storage]\npath = "{tmp_path / "spool.db"}"\n'
                       + ('max_size_mb = "big"\n' if mistake == "config" else ""))
        with open(tmp_path / "journal", "w") as journal:
            st = os.fstat(journal.fileno())
            run = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                 stdout=journal, stderr=journal, cwd=ROOT, timeout=30,
                                 env={**os.environ,
                                      "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    lines = (tmp_path / "journal").read_text().splitlines()
    assert run.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("<3>outpost: "), lines   # 3: err
