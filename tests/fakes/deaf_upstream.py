"""A websocket upstream that stops reading: a raw TCP server on 127.0.0.1, port 0.

While ``deaf`` is set, each connection gets the websocket handshake's answer, and then
not another byte is read from it: its TCP window closes, and a client's sends wait for
buffer space that never comes (a wedged upstream, or a proxy in front of one). Once
``deaf`` is cleared, each new connection is relayed to ``target`` (a good upstream, e.g.
FakeNucleus), byte for byte both ways. The receive buffer is small, so that a few
hundred KB fill the path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
from collections.abc import Awaitable, Callable
from typing import Self

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def small_window_server(handle: Handler) -> tuple[asyncio.Server, int]:
    """A TCP server on 127.0.0.1, port 0, whose connections have a small receive buffer:
    a few KB fill the path, and a sender's writes wait on how fast ``handle`` reads."""
    sock = socket.socket()
    # Before listen(): accepted sockets inherit it, and the window it allows.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    server = await asyncio.start_server(handle, sock=sock)
    return server, sock.getsockname()[1]


class RawUpstream:
    """A raw TCP server on 127.0.0.1, port 0, with a small receive buffer
    (``small_window_server``), whose connections ``serve`` handles: counted, and aborted
    at ``stop``."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._server, self.port = await small_window_server(self._connection)
        return self

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    port: int) -> None:
        await relay(reader, writer, port, self._writers)


class DeafUpstream(RawUpstream):
    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.deaf = True
        self.deaf_connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.deaf:
            await self.relay(reader, writer, self.target_port)
            return
        self.deaf_connections += 1
        await accept_websocket(reader, writer)
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()          # never read again
        await writer.wait_closed()         # until the client aborts it (or stop())


async def accept_websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read a websocket upgrade request and answer it 101."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    await writer.drain()


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int,
                writers: set[asyncio.StreamWriter]) -> None:
    """Relay a connection to 127.0.0.1 ``port``, byte for byte both ways (the upstream's
    writer kept in ``writers`` meanwhile, for a stop to abort)."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    writers.add(up_writer)
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        writers.discard(up_writer)
        up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
