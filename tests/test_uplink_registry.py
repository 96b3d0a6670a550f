"""The uplink contract and registry: one take loop for every protocol, and a new protocol
is one class plus one registry line (tests/fakes/uplinks.py's NullUplink)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent import cli
from agent.config import ConfigError, parse
from agent.families.event import NUCLEUS, SEGMENT
from agent.settings import UpstreamConfig
from agent.spool.types import Row
from agent.uplinks import registry
from agent.uplinks.prepare import Prepared
from tests.conftest import write_config
from tests.fakes.uplinks import NullUplink
from tests.segment_helpers import basic, call
from tests.test_upstream_faults import event, send
from tests.waiting import wait_for

VALID = {NUCLEUS: {"type": "event", "name": "e", "id": "n1"},
         SEGMENT: {"type": "track", "event": "e", "userId": "u", "messageId": "s1"}}


def row(seq: int, body: dict[str, Any] | bytes, family: int) -> Row:
    return Row(seq, 1, family, 1_767_323_045_000, body if isinstance(body, bytes)
               else orjson.dumps(body))


NULL = registry.Protocol("null", ("null",), "tests.fakes.uplinks:NullUplink")


def config_for(spoken: registry.Protocol, **kw: Any) -> UpstreamConfig:
    return UpstreamConfig(name="u", protocol=spoken.name, url=f"{spoken.schemes[0]}://127.0.0.1:9",
                          **kw)


@pytest.mark.parametrize("family", [NUCLEUS, SEGMENT])
@pytest.mark.parametrize("spoken", registry.UPLINKS, ids=registry.protocols())
async def test_every_uplink_refuses_the_same_damaged_rows(spoken: registry.Protocol,
                                                          family: int) -> None:
    """Stored in the uplink's family or mapped from the other, the same rows are corrupt
    for every protocol: taken, refused with a reason, and the rest still sent."""
    rows = [row(1, b"\xff\x00garbage", family), row(2, b"[1, 2]", family),
            row(3, VALID[family], family), row(4, b'"text"', family)]
    async with aiohttp.ClientSession() as session:
        prepared = spoken.uplink_class()(config_for(spoken), "app", session, "m").prepare(rows)
    assert prepared.rows == tuple(rows)
    assert prepared.seqs == (3,) and len(prepared.bodies) == len(prepared.ids) == 1
    assert [seq for seq, _ in prepared.refused] == [1, 2, 4]
    assert all(why.startswith("corrupt row: ") for _, why in prepared.refused)


@pytest.mark.parametrize("spoken", [p for p in registry.UPLINKS
                                    if p.uplink_class().window(config_for(p)) == 1],
                         ids=lambda p: p.name)
async def test_preparing_a_batch_leaves_a_one_at_a_time_uplink_unchanged(
        spoken: registry.Protocol) -> None:
    """No per-row side tables: preparing the same rows again gives the same value."""
    rows = [row(i, {**VALID[NUCLEUS], "id": f"n{i}"}, NUCLEUS) for i in range(1, 4)]
    async with aiohttp.ClientSession() as session:
        up = spoken.uplink_class()(config_for(spoken), "app", session, "m")
        first = up.prepare(rows)
        assert first.seqs == (1, 2, 3) and up.prepare(rows) == first


def test_halves_split_only_the_rows_to_send() -> None:
    rows = tuple(row(i, b"{}", NUCLEUS) for i in range(1, 7))
    prepared = Prepared(rows, (1, 2, 4, 5, 6), (b"a", b"b", b"d", b"e", b"f"),
                        ("i1", "i2", "i4", "i5", "i6"), ((3, "corrupt row: x"),))
    left, right = prepared.halves()
    assert (left.seqs, left.bodies, left.ids, left.refused) == ((1, 2), (b"a", b"b"),
                                                                ("i1", "i2"), ())
    assert [r.seq for r in left.rows] == [1, 2] and [r.seq for r in right.rows] == [4, 5, 6]
    assert right.bodies == (b"d", b"e", b"f") and right.ids == ("i4", "i5", "i6")


def null_upstream(**kw: Any) -> dict[str, Any]:
    return {"name": "nil", "protocol": "null", "url": "null://sink", "flush_interval_s": 0.02,
            **kw}


async def test_registering_an_uplink_is_all_it_takes(make_agent: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """NullUplink (tests/fakes/uplinks.py) is unknown until its one registry line (NULL) is added;
    then config accepts it (and its URL scheme only), the forwarder sends through it,
    converting the other family's events first, and doctor shows its probe."""
    with pytest.raises(ConfigError, match=r"^upstream\[0\]\.protocol: must be one of "):
        parse({"upstream": [null_upstream()]})

    monkeypatch.setattr(registry, "UPLINKS", (*registry.UPLINKS, NULL))
    monkeypatch.setattr(NullUplink, "sent", [])
    assert parse({"upstream": [null_upstream()]}).upstreams[0].protocol == "null"
    with pytest.raises(ConfigError, match=r"^upstream\[0\]\.url: must start with null:// for null"):
        parse({"upstream": [null_upstream(url="http://sink")]})

    agent = await make_agent(upstreams=[null_upstream()])
    await send(agent, [event(i) for i in range(3)])
    segment = {"type": "track", "event": "Bought", "userId": "u", "messageId": "s1"}
    reply = await call(agent.port, "/v1/batch", {"batch": [segment]},
                       headers={"Authorization": basic("app1")})
    assert reply.status == 200
    # acked counts an ack once its delete is saved, a turn after the queue reads empty.
    await wait_for(lambda: agent.spool.depth == 0 and len(NullUplink.sent) == 4
                   and agent.forwarding.states["nil"].acked >= 4)
    sent = [orjson.loads(body) for body in NullUplink.sent]
    assert [ev["payload"]["mark"] for ev in sent[:3]] == [f"mk-{i}-" for i in range(3)]
    assert sent[3]["type"] == "event" and sent[3]["name"] == "Bought"   # mapped to Nucleus
    assert agent.forwarding.states["nil"].acked == 4

    with socket.socket() as listening:   # a reachable upstream for the default probe
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        # It closes the connection it takes, as a plain HTTP port closes on the probe's TLS
        # handshake (left unanswered, the probe waits out its second for one).
        closer = threading.Thread(target=lambda: listening.accept()[0].close(), daemon=True)
        closer.start()
        config = write_config(tmp_path / "doctor.toml", tmp_path / "doctor.db", upstreams=[
            null_upstream(),
            {"name": "real", "protocol": "nucleus-http", "url": f"http://127.0.0.1:{port}"}])
        capsys.readouterr()
        assert cli.main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"null://sink  {NullUplink.probe(config_for(NULL))}" in out
    assert f"http://127.0.0.1:{port}  reachable\n" in out   # no more to say
