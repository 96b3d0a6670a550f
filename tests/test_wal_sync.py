"""With sync = "full", an app is answered only once its events' commit is on disk.

The agent runs as a real ``outpost run`` subprocess under strace, which records its
writes to the spool's -wal file, its syncs of that file, and its writes to the app's
socket. Each answer must follow an fdatasync (or fsync) of the -wal that started after
the last write to the -wal before it: the events' COMMIT. With sync = "normal" it does
not, which shows the check can fail.

strace is required (.ci/run installs it): where it is missing, or ptrace is not
permitted, these tests fail rather than skip, since they are what shows durability.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentProcess, free_port, write_config
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

REQUESTS = 8
SYNCS = ("fdatasync", "fsync")
SENDS = ("write", "writev", "sendto", "sendmsg")
# "1234 name(fd<path>" : a call's start, as strace -f -y prints it (complete or unfinished)
# strace pads the pid to the width of the largest pid (`1549  +++ exited`): one space or more.
CALL = re.compile(r"^(\d+) +(\w+)\(\d+<(.*?)>(?=[,) ])")
RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>")
# A connection the agent accepted (an app's: it has no upstream), by its socket's inode.
# Not strace -yy's addresses: strace asks the kernel (sock_diag) for them at every
# call, which made it lag far behind the agent on a machine busy with many connections.
# Its result on the call's line, or on its "resumed" line when another thread's call came
# in between (strace -f splits it: `accept4(18<...>, ... <unfinished ...>`, then
# `<... accept4 resumed>) = 20<socket:[...]>`).
ACCEPTED = re.compile(r"accept4?(?:\(| resumed>).* = \d+<(socket:\[\d+\])>$")


def strace() -> str:
    """The strace binary, checked able to trace here: a failure, not a skip, otherwise."""
    path = shutil.which("strace")
    if path is None:
        pytest.fail("strace is not installed (apt-get install strace): the durability "
                    "order of answers cannot be checked")
    probe = subprocess.run([path, "-qq", "-e", "trace=none", "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        pytest.fail(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}")
    return path


@dataclass
class Call:
    name: str
    target: str      # the fd's path or socket, as strace -y shows it
    start: int       # line of its entry
    end: int         # line of its return


def calls(trace: str) -> list[Call]:
    """Every traced call on an fd, with the lines of its entry and return."""
    out: list[Call] = []
    open_: dict[tuple[str, str], Call] = {}
    for i, line in enumerate(trace.splitlines()):
        if m := RESUMED.match(line):
            if (c := open_.pop((m[1], m[2]), None)) is not None:
                c.end = i
            continue
        if m := CALL.match(line):
            c = Call(m[2], m[3], i, i)
            out.append(c)
            if line.endswith("<unfinished ...>"):
                open_[m[1], m[2]] = c
    return out


def unsynced_answers(trace: str) -> tuple[int, list[str]]:
    """How many writes to app sockets the trace holds, and the ones that did not follow an
    fdatasync/fsync of the -wal started after the last -wal write before them."""
    found = calls(trace)
    apps = {m[1] for line in trace.splitlines() if (m := ACCEPTED.search(line))}
    answers = [c for c in found if c.name in SENDS and c.target in apps]
    wal = [c for c in found if c.target.endswith("-wal")]
    bad = []
    # The requests go one at a time: each one's commit follows the last answer (the
    # first one's, the app's connection).
    since = next((i for i, line in enumerate(trace.splitlines()) if ACCEPTED.search(line)), -1)
    for a in answers:
        writes = [c.end for c in wal
                  if c.name.startswith("pwrite") and since < c.start and c.end < a.start]
        if not writes:
            bad.append(f"line {a.start + 1}: an answer with no commit before it")
        # A sync after one of them, done before the answer. Not after the last of them:
        # another transaction (the prune the agent runs as it starts, waiting for the
        # writer's lock) may begin writing between the commit's sync and the answer.
        elif not any(c.name in SYNCS and writes[0] < c.start and c.end < a.start for c in wal):
            bad.append(f"line {a.start + 1}: answered before the -wal written at line "
                       f"{writes[-1] + 1} was synced")
        since = a.end
    return len(answers), bad


def events(first: int, n: int) -> list[dict[str, Any]]:
    return [{"type": "event", "name": "e", "id": f"ev{first + i}", "sessionId": 1,
             "machineId": "m", "date": "2026-01-01T00:00:00.000Z"} for i in range(n)]


async def post(session: aiohttp.ClientSession, agent: AgentProcess,
               batch: list[dict[str, Any]]) -> int:
    async with session.post(f"{agent.url}/app/app1/track", json={"data": batch}) as r:
        await r.read()
        return r.status


def traced(agent_process: Callable[..., AgentProcess], tmp_path: Path, sync: str,
           args: list[str] | None) -> AgentProcess:
    """An agent on ``tmp_path``'s spool; under strace with ``args`` unless None."""
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "spool.db", port=port,
                          storage={"sync": sync})
    if args is None:
        return agent_process(config, port)
    # -D: strace runs as a detached grandchild, so the process the test starts, signals
    # and kills is the agent itself; -q still notes each exit, the trace's last line.
    return agent_process(config, port, prefix=[strace(), "-D", "-f", "-q", "-o",
                                               str(tmp_path / "trace.txt"), *args, "--"])


async def finished(agent: AgentProcess, trace: Path) -> str:
    """Stop the agent, then read its trace once strace has written the agent's exit."""
    assert agent.terminate() == 0
    assert agent.proc is not None
    end = re.compile(rf"^{agent.proc.pid} +\+\+\+ exited with", re.MULTILINE)
    await wait_for(lambda: end.search(trace.read_text()) is not None, timeout=60)
    return trace.read_text()


@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_each_answer_follows_a_sync_of_its_commit(
        agent_process: Callable[..., AgentProcess], tmp_path: Path, sync: str) -> None:
    agent = traced(agent_process, tmp_path, sync, [
        "-y", "-e", "signal=none", "-e",
        "trace=accept,accept4,pwrite64,pwritev,fdatasync,fsync,write,writev,sendto,sendmsg"])
    agent.start(timeout=60)
    async with aiohttp.ClientSession() as s:
        for i in range(REQUESTS):   # one at a time: each answer follows its own commit
            assert await post(s, agent, events(i * 10, 10)) == 200
    trace = await finished(agent, tmp_path / "trace.txt")
    answers, bad = unsynced_answers(trace)
    assert answers >= REQUESTS
    if sync == "full":
        assert bad == []
    else:   # no sync per commit: the check sees it (it is not one that always passes)
        assert len(bad) >= REQUESTS - 1
