"""An in-process agent on its own event loop thread, for synchronous (hypothesis) tests.

Hypothesis drives plain functions; the agent keeps serving on a background
loop, so each example is a real request over a real socket, and the test can
still read the agent's state (spool depth, router) between requests.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from agent import config as config_mod
from agent.service import Agent
from tests.conftest import write_config

T = TypeVar("T")


def post_nucleus(port: int, key: str, events: list[dict[str, Any]]) -> None:
    """POST a Nucleus message from a thread that is not the agent's loop (a hypothesis
    rule); the agent must answer 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", f"/app/{key}/track", body=orjson.dumps({"data": events}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
    finally:
        conn.close()


class ErrorLog(logging.Handler):
    """Collects ERROR records (aiohttp logs every handler exception as one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        """Exceptions in the agent's code; aiohttp's own HTTP parse errors (a client's bad
        request line or headers, answered 400 by aiohttp) are left out."""
        return [self.format(r) for r in self.records if r.exc_info and r.exc_info[0]
                and not issubclass(r.exc_info[0], HttpProcessingError)]


class ThreadedAgent:
    def __init__(self, tmp_path: Path, spool: Path | None = None, **config: Any) -> None:
        self.cfg_path = write_config(tmp_path / "agent.toml", spool or tmp_path / "spool.db",
                                     **config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.agent: Agent | None = None
        self.errors = ErrorLog()
        self.connect_to = "127.0.0.1"

    def __enter__(self) -> ThreadedAgent:
        logging.getLogger().addHandler(self.errors)
        self.thread.start()
        self.agent = Agent(config_mod.load_file(self.cfg_path), str(self.cfg_path))
        self.call(self.agent.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.agent is not None:
                self.call(self.agent.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            logging.getLogger().removeHandler(self.errors)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.agent is not None
        return self.agent.port

    @property
    def depth(self) -> int:
        assert self.agent is not None and self.agent.spool is not None
        return self.agent.spool.depth

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection. An agent that refuses a large body early
        (413) may close before the body is sent: then the reply is read if it can be."""
        conn = http.client.HTTPConnection(self.connect_to, self.port, timeout=timeout)
        try:
            try:
                conn.request(method, path, body=body, headers=headers or {})
            except (BrokenPipeError, ConnectionResetError):
                pass
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()
