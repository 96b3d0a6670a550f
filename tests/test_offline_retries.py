"""What the forwarders send to an upstream, and what its retries cost.

``sent`` (/status, ``outpost_upstream_sent_total``) counts the events in the batches
the forwarders sent or tried, a resend counting again.
"""

from __future__ import annotations

from typing import Any

from tests.fakes.faulty_upstream import Fault, FaultyUpstream
from tests.test_resume import get_json
from tests.test_upstream_faults import delivered, event, send, upstream
from tests.waiting import wait_for


async def test_sent_counts_every_event_sent_and_each_resend_again(
        make_agent: Any, faulty: FaultyUpstream) -> None:
    faulty.script = [Fault("status", 503)]   # the first batch fails; its resend is acked
    agent = await make_agent(upstreams=[upstream(faulty, "nucleus-http")])
    await send(agent, [event(i) for i in range(3)])
    await wait_for(lambda: agent.spool.depth == 0 and set(delivered(faulty)) == {0, 1, 2})
    status = (await get_json(agent, "/status"))["upstreams"][0]
    assert (status["sent"], status["acked"], status["retries"]) == (6, 3, 1)
    assert 'outpost_upstream_sent_total{upstream="up"} 6' in await get_json(agent, "/metrics")
