"""Each kind of request the HTTP server cannot parse is logged: one line saying what was
wrong, at most once a minute per kind, never quoting the request (docs/operations.md,
docs/security.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProcess
from tests.test_log_path_keys import log_after_400s

SECRET = "GarbageLineKey57"


async def test_a_request_line_with_an_invalid_method_is_logged(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """aiohttp logs a bad method in a connection's first request at debug (it is what
    scanners and TLS clients send to a public HTTP port): at the agent's usual level a
    local app sending `GARBAGE /v1/track` (or speaking https to the agent) got its 400
    and the log said nothing, while the other malformed requests sent with it were each
    logged."""
    log = await log_after_400s(tmp_path, agent_process, [
        f"GARBAGE /v1/track?writeKey={SECRET} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
        b"GET /status HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: x\r\n\r\n"])
    said = "aiohttp.server: Error handling request from 127.0.0.1: "
    assert log.count(said) == 3, log
    assert f"{said}BadHttpMethod: Invalid method encountered (400)" in log, log
    assert f"{said}BadStatusLine: Bad status line: Invalid HTTP version (400)" in log, log
    assert f"{said}BadHttpMessage: Invalid header token (400)" in log, log
    assert SECRET not in log and "GARBAGE" not in log, log


async def test_each_fault_in_a_header_field_is_a_kind_of_its_own(
        tmp_path: Path, agent_process: Callable[..., AgentProcess]) -> None:
    """The parser raises one exception type (BadHttpMessage) for most faults in a field:
    a bad name, a NUL in a value, an obs-folded line, a repeated Content-Length. Limited
    by that type, the first of them in a minute was the only line: the others got their
    400 and the log named a fault they did not have."""
    head = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    sent = [head + b"Bad Name: x\r\n\r\n",
            head + b"X-A: a\x00b\r\n\r\n",
            head + b"X-A: a\r\n  b\r\n\r\n"]
    # The repeats within the minute: not logged again.
    log = await log_after_400s(tmp_path, agent_process, sent * 2)
    said = "aiohttp.server: Error handling request from 127.0.0.1: BadHttpMessage: "
    assert log.count(said) == 3, log
    for fault in ("Invalid header token", "Invalid header value char",
                  "Unexpected whitespace after header value"):
        assert f"{said}{fault} (400)" in log, log
