"""A slow link whose far end gives up on a request still arriving: a TCP relay on 127.0.0.1.

The relay stands between the agent and an upstream (a real aiohttp server) for a link
that carries ``carried`` bytes of one request (its head and body: HTTP), or of one
websocket frame, within what the far end waits for it: a Go server's ReadTimeout, a
proxy's body timeout. A longer request or frame never arrives whole in time: once the
relay has read ``carried`` bytes of it, it cuts the connection, both sides, the rest
unread (closed, or reset with ``reset``), as that server closes the socket under a body
still coming. The upstream never sees it. Anything shorter is relayed byte for byte, both
ways, and answered by the upstream. By size, not by a clock: no timing in a test.
Closed, the agent's side gets the relay's FIN as it still writes (what it writes after
is read and dropped); reset, an RST.

The relay reads a connection a little at a time from a small receive buffer, as a slow
link takes it: the sender's request is still being written when the cut comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from tests.fakes.deaf_upstream import small_window_server

_CHUNK = 2048


class CuttingRelay:
    """``await CuttingRelay(upstream_port, carried).start()``; ``await stop()`` ends it."""

    def __init__(self, upstream_port: int, carried: int, reset: bool = False,
                 times: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.carried = carried
        self.reset = reset
        self.times = times   # the most it cuts (then it relays all): None, no end
        self.port = 0
        # Each request or frame cut: how many bytes of it the relay had read, and its size.
        self.cuts: list[tuple[int, int]] = []
        self.relayed = 0   # requests (HTTP) or frames (websocket) relayed whole
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> CuttingRelay:
        self._server, self.port = await small_window_server(self._connection)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, client: asyncio.StreamReader,
                          client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        upgraded = asyncio.Event()
        back = asyncio.create_task(self._answers(up, client_w, upgraded))
        try:
            await self._requests(client, up_w, upgraded)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await back
            up_w.close()
            with contextlib.suppress(ConnectionError):
                await self._cut(client, client_w)
            self._tasks.discard(task)

    async def _cut(self, client: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Reset the agent's side, or close it: its FIN first, then what the agent still
        sends is read and dropped until it closes too (else the close of a socket with
        unread bytes is a reset all the same)."""
        sock = client_w.get_extra_info("socket")
        if self.reset and sock is not None:
            with contextlib.suppress(OSError):   # the agent may have closed it first
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif client_w.can_write_eof() and not client_w.is_closing():
            client_w.write_eof()
            while await client.read(65536):
                pass
        client_w.close()

    async def _answers(self, up: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                       upgraded: asyncio.Event) -> None:
        """The upstream's answers, relayed as they are; a 101 turns the agent's side to
        websocket frames."""
        while data := await up.read(65536):
            if data.startswith(b"HTTP/1.1 101"):
                upgraded.set()
            client_w.write(data)
            await client_w.drain()
        client_w.close()

    async def _requests(self, client: asyncio.StreamReader, up_w: asyncio.StreamWriter,
                        upgraded: asyncio.Event) -> None:
        while True:
            if upgraded.is_set():
                if not await self._frame(client, up_w):
                    return
                continue
            head = await client.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if not await self._relay(client, up_w, head, length):
                return
            if head.lower().find(b"upgrade: websocket") >= 0:
                await upgraded.wait()

    async def _frame(self, client: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> bool:
        """One websocket frame from the agent (masked, as a client's are)."""
        first = await client.readexactly(2)
        n, extra = first[1] & 0x7F, b""
        if n == 126:
            extra = await client.readexactly(2)
            n = struct.unpack("!H", extra)[0]
        elif n == 127:
            extra = await client.readexactly(8)
            n = struct.unpack("!Q", extra)[0]
        mask = await client.readexactly(4) if first[1] & 0x80 else b""
        return await self._relay(client, up_w, first + extra + mask, n)

    async def _relay(self, client: asyncio.StreamReader, up_w: asyncio.StreamWriter,
                     head: bytes, length: int) -> bool:
        """Relay a request or frame of ``head`` and ``length`` more bytes, if the link
        carries it all in time: else cut (False)."""
        size, got, parts = len(head) + length, len(head), [head]
        if self.times is not None and len(self.cuts) >= self.times:
            parts.append(await client.readexactly(length))
            got = size
        while got < size:
            if got >= self.carried:
                self.cuts.append((got, size))
                return False
            part = await client.read(min(_CHUNK, size - got, self.carried - got))
            if not part:
                return False
            parts.append(part)
            got += len(part)
        up_w.write(b"".join(parts))
        await up_w.drain()
        self.relayed += 1
        return True
