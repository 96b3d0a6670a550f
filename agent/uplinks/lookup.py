"""Looking up an upstream's host name on a daemon thread of its own.

The event loop's own lookup (``loop.getaddrinfo``: asyncio's default executor, uvloop's
libuv thread pool) runs on a thread that the loop's close, or the interpreter's exit,
waits for: a resolver that does not answer (a router whose uplink is down) held the
agent's exit up to `timeout:30 attempts:5` of resolv.conf, 150 s, after its stop had
cut short the send waiting for it, and past systemd's TimeoutStopSec. A lookup left
unfinished at exit is abandoned here, as a daemon thread is. One thread per distinct
question at a time: a probe asking every 2 s waits for the lookup already asking;
except across a network change (``forget``): a lookup asked on the old network, of a
resolver that did not answer, is not waited for on the new one.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import sys
import threading
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

AddrInfo = list[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]
_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", socket.AI_ADDRCONFIG)
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
# Each question's lookup under way, and the thread that asks it.
_asking: dict[tuple[Any, ...], tuple[asyncio.Future[AddrInfo], threading.Thread]] = {}
# The threads of lookups ``forget`` let go, while they run: each until its resolver's
# timeouts run out. At most this many, however often the network changes meanwhile.
FORGOTTEN_MAX = 8
_forgotten: list[threading.Thread] = []


class _AskAgain(Exception):
    """What a lookup ``forget`` let go answers those waiting for it: ask afresh."""


async def getaddrinfo(host: str, port: int, family: int = 0,
                      type: int = socket.SOCK_STREAM, flags: int = 0) -> AddrInfo:  # noqa: A002
    """``socket.getaddrinfo``, awaited; cancelling it leaves the lookup to end unwatched."""
    loop = asyncio.get_running_loop()
    question = (loop, host, port, family, type, flags)
    while True:
        under_way = _asking.get(question)
        if under_way is not None:
            asking = under_way[0]
        else:
            asking = loop.create_future()
            thread = threading.Thread(target=_ask, name="lookup", daemon=True,
                                      args=(loop, asking, host, port, family, type, flags))
            try:
                thread.start()
            except RuntimeError as exc:
                # No thread now (the task limit reached): this lookup fails, as a connect
                # does, and the next asks again. Left in _asking, no thread would ever
                # answer it, and every later lookup of the name waited on it.
                raise OSError(errno.EAGAIN, f"no thread to look up {host} on ({exc})") from exc
            _asking[question] = (asking, thread)
            asking.add_done_callback(functools.partial(_answered, question))
        try:
            return await asyncio.shield(asking)
        except _AskAgain:
            continue


def forget() -> None:
    """The network changed: the lookups under way were asked of the old network's
    resolver, which may not answer for resolv.conf's timeouts (up to 150 s), while the new
    one's would at once. Those waiting for them (a probe, a send's connect, aiohttp's own
    lookup that its connects share) ask afresh; the old threads end on their own, their
    answers unheard. Call from the event loop."""
    loop = asyncio.get_running_loop()
    _forgotten[:] = [thread for thread in _forgotten if thread.is_alive()]
    for question, (asking, thread) in list(_asking.items()):
        if question[0] is not loop or asking.done():
            # Another loop's (a test's): this one cannot answer its waiters. Or answered,
            # handed on in this turn of the loop (_answered): nothing left to let go.
            continue
        if len(_forgotten) >= FORGOTTEN_MAX:
            return   # a network that keeps changing: the lookups under way will do
        del _asking[question]
        _forgotten.append(thread)
        asking.set_exception(_AskAgain())


def _answered(question: tuple[Any, ...], answer: asyncio.Future[AddrInfo]) -> None:
    under_way = _asking.get(question)
    if under_way is not None and under_way[0] is answer:   # not one asked afresh (forget)
        del _asking[question]
    if not answer.cancelled():
        answer.exception()   # taken: every one awaiting it may have been cancelled


def _ask(loop: asyncio.AbstractEventLoop, answer: asyncio.Future[AddrInfo], host: str,
         port: int, family: int, type: int, flags: int) -> None:  # noqa: A002
    try:
        infos: AddrInfo | BaseException = list(
            socket.getaddrinfo(host, port, family, type, 0, flags))
    except Exception as exc:  # noqa: BLE001 - handed to the one awaiting it
        infos = exc
    try:
        loop.call_soon_threadsafe(_settle, answer, infos)
    except RuntimeError:   # the loop is closed: nobody waits for it any more
        pass


def _settle(answer: asyncio.Future[AddrInfo], infos: AddrInfo | BaseException) -> None:
    if answer.done():
        return
    if isinstance(infos, BaseException):
        answer.set_exception(infos)
    else:
        answer.set_result(infos)


class DaemonResolver(AbstractResolver):
    """aiohttp's ThreadedResolver, its lookups made by ``getaddrinfo`` above."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            infos = await getaddrinfo(host, port, family, socket.SOCK_STREAM, _ADDRCONFIG)
        except socket.gaierror:
            # As aiohttp's: Windows' "localhost" may have no address AI_ADDRCONFIG admits.
            if sys.platform != "win32" or host.rstrip(".").casefold() != "localhost":
                raise
            infos = await getaddrinfo(host, port, family, socket.SOCK_STREAM, 0)
        hosts: list[ResolveResult] = []
        for found, _, proto, _, address in infos:
            if found == socket.AF_INET6:
                if len(address) < 3:   # IPv6 not supported by this Python or host
                    continue
                if address[3]:   # a link-local address: its scope written in (numeric, local)
                    name, service = socket.getnameinfo(
                        address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    address = (name, int(service))
            elif found != socket.AF_INET:
                continue
            hosts.append(ResolveResult(hostname=host, host=address[0], port=address[1],
                                       family=found, proto=proto, flags=_NUMERIC))
        return hosts

    async def close(self) -> None:
        pass
