"""More concurrent Redis calls than the server's Redis connections: they wait for a
connection (up to --redis-timeout) instead of failing UNAVAILABLE."""

from __future__ import annotations

import asyncio

from pagemeter.v1 import quota_pb2
from tests.conftest import ON_EACH_BACKEND, RunningServer

# On the suite's Redis and, in the system tier, on a Redis Cluster.
pytestmark = ON_EACH_BACKEND

Q = quota_pb2


async def test_a_batch_across_a_thousand_organizations_is_answered_whole(
    pagemeter_server: RunningServer,
) -> None:
    """A CheckQuotaBatch of 1,000 items for 1,000 organizations makes 1,000 script calls at once, ten times the connections a process keeps: every item is answered (NO_PLAN), none is UNAVAILABLE."""
    items = [Q.CheckQuotaRequest(org_id=f"org-{i}", units={"pages": 1}) for i in range(1000)]
    reply = await pagemeter_server.quota.CheckQuotaBatch(Q.CheckQuotaBatchRequest(items=items))
    errors = [item.error.message for item in reply.items if item.WhichOneof("result") == "error"]
    assert errors == []
    assert all(item.response.reason == Q.DECISION_REASON_NO_PLAN for item in reply.items)


async def test_hundreds_of_concurrent_calls_are_all_answered(
    pagemeter_server: RunningServer,
) -> None:
    """400 CheckQuota calls in flight at once on one server: all answered."""
    calls = [
        pagemeter_server.quota.CheckQuota(
            Q.CheckQuotaRequest(org_id=f"org-{i % 50}", units={"pages": 1})
        )
        for i in range(400)
    ]
    replies = await asyncio.gather(*calls)
    assert all(reply.reason == Q.DECISION_REASON_NO_PLAN for reply in replies)
