"""A client whose first request stalls mid-send: a TCP relay on 127.0.0.1 in front of an agent."""

from __future__ import annotations

import asyncio
import contextlib


class StallingRelay:
    """A client whose first request stalls mid-send (its process stopped or swapped out, a
    link gone quiet): a TCP relay on 127.0.0.1 in front of the agent passes that request's
    head on and holds its body back until the agent has answered, then hands the client
    that answer and closes the connection. Every later connection is relayed as it comes.
    No clock: the agent's own listen.body_timeout_s decides when it answers."""

    def __init__(self, agent_port: int) -> None:
        self.agent_port = agent_port
        self.port = 0
        self.stalled: bytes | None = None   # the agent's answer to the stalled request
        self._server: asyncio.Server | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> StallingRelay:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, client: asyncio.StreamReader,
                          client_w: asyncio.StreamWriter) -> None:
        agent, agent_w = await asyncio.open_connection("127.0.0.1", self.agent_port)
        try:
            if self.stalled is None:
                self.stalled = b""
                agent_w.write(await client.readuntil(b"\r\n\r\n"))   # the head alone
                await agent_w.drain()
                self.stalled = await agent.read()   # the answer, until the agent closes
                client_w.write(self.stalled)
                await client_w.drain()
            else:
                await asyncio.gather(_pump(client, agent_w), _pump(agent, client_w))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (agent_w, client_w):
                w.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    with contextlib.suppress(OSError):
        sink.write_eof()
