"""A real forward HTTP proxy on 127.0.0.1, port 0, as a kiosk's network puts in the way.

It takes absolute-form requests (`POST http://upstream.invalid:1234/v1/batch`, a
websocket handshake among them) and CONNECT tunnels, and reaches only the host names
in ``hosts``: a name that resolves nowhere else (`upstream.invalid`) mapped to a fake
upstream's 127.0.0.1 port, so that an agent connecting directly fails. It counts what
went through, and with ``credentials`` ("user:password") refuses any request without
them with a 407, as Squid does. ``stop`` and ``start`` again keep its port (a proxy
restarted).

An absolute-form request is passed on rewritten to origin form with `Connection:
close` (a websocket's upgrade kept), then bytes are relayed both ways until either side
closes: one request per client connection, which is all a test needs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

_HEAD_MAX = 64 * 1024


@dataclass
class ForwardProxy:
    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)   # name -> real address
    credentials: str | None = None        # "user:password" required, else 407
    refuse: int | None = None             # every request answered with this status (403)
    retry_after: str | None = None        # the Retry-After sent with ``refuse`` (a 503's)
    port: int = 0
    tunnels: list[str] = field(default_factory=list)     # CONNECT targets relayed
    requests: list[str] = field(default_factory=list)    # absolute-form "METHOD url" relayed
    refused: list[tuple[int, str]] = field(default_factory=list)   # (status, request line)
    auth_seen: list[str] = field(default_factory=list)   # Proxy-Authorization values
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    @property
    def through(self) -> int:
        """Requests and tunnels it relayed."""
        return len(self.tunnels) + len(self.requests)

    async def start(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and cut every connection it relays: the proxy is down."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *fields = head.decode("latin-1").split("\r\n")[:-2]
        method, target, version = line.split(" ", 2)
        headers = [tuple(f.split(":", 1)) for f in fields]
        auth = next((v.strip() for k, v in headers if k.strip().lower() == "proxy-authorization"),
                    None)
        if auth is not None:
            self.auth_seen.append(auth)
        if self.credentials is not None:
            want = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if auth != want:
                await self._answer(writer, 407, "Proxy Authentication Required", line,
                                   b'Proxy-Authenticate: Basic realm="proxy"\r\n')
                return
        if self.refuse is not None:
            wait = b"" if self.retry_after is None else \
                f"Retry-After: {self.retry_after}\r\n".encode()
            await self._answer(writer, self.refuse, HTTPStatus(self.refuse).phrase, line, wait)
            return
        if method == "CONNECT":
            name, _, port = target.rpartition(":")
            address = self.hosts.get(name.lower())
            if address is None:
                await self._answer(writer, 502, "Bad Gateway", line)
                return
            up_reader, up_writer = await asyncio.open_connection(*address)
            self.tunnels.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await self._relay(reader, writer, up_reader, up_writer)
            return
        parts = urlsplit(target)
        address = self.hosts.get((parts.hostname or "").lower())
        # aiohttp sends a ws:// handshake so (`GET ws://host/path`), not by CONNECT.
        if parts.scheme not in ("http", "ws") or address is None:
            await self._answer(writer, 502, "Bad Gateway", line)
            return
        upgrade = any(k.strip().lower() == "upgrade" for k, _ in headers)
        kept = [(k, v) for k, v in headers
                if k.strip().lower() not in ("proxy-authorization", "proxy-connection")
                and (upgrade or k.strip().lower() != "connection")]
        if not upgrade:
            kept.append(("Connection", " close"))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        up_reader, up_writer = await asyncio.open_connection(*address)
        self.requests.append(f"{method} {target}")
        up_writer.write(f"{method} {path} {version}\r\n".encode("latin-1")
                        + "".join(f"{k}:{v}\r\n" for k, v in kept).encode("latin-1") + b"\r\n")
        await self._relay(reader, writer, up_reader, up_writer)

    async def _answer(self, writer: asyncio.StreamWriter, status: int, reason: str, line: str,
                      extra: bytes = b"") -> None:
        self.refused.append((status, line))
        body = f"<html><title>{status} {reason}</title></html>".encode()
        writer.write(f"HTTP/1.1 {status} {reason}\r\n".encode() + extra
                     + b"Content-Type: text/html\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.close()
