"""More concurrent Redis calls than the server's Redis connections: they wait for a
connection (up to --redis-timeout) instead of failing UNAVAILABLE."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable

import redis.asyncio as aioredis

from pagemeter.v1 import admin_pb2, quota_pb2
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import close_redis, connect_redis
from tests.conftest import ON_EACH_BACKEND, RunningServer, eagle_plan, serving

# On the suite's Redis and, in the system tier, on a Redis Cluster.
pytestmark = ON_EACH_BACKEND

Q = quota_pb2
ORGS = [f"org-{i}" for i in range(10)]


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


async def test_a_pool_of_three_connections_serves_three_hundred_calls_exactly(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
) -> None:
    """With --redis-max-connections 3, 100 each of CheckQuota, RecordUsage and GetUsage
    at once (scripts, pipelines and reads): every call is answered, and every page
    recorded is counted once."""
    tiny = dataclasses.replace(settings, redis_max_connections=3)
    client = connect_redis(tiny.redis_url, tiny)
    try:
        async with serving(tiny, client, clock) as server:
            for org in ORGS:
                await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org)))
            calls: list[Awaitable[object]] = []
            for i in range(100):
                org = ORGS[i % len(ORGS)]
                calls.append(
                    server.quota.CheckQuota(Q.CheckQuotaRequest(org_id=org, units={"pages": 1}))
                )
                calls.append(
                    server.quota.RecordUsage(
                        Q.RecordUsageRequest(org_id=org, request_id=f"job-{i}", units={"pages": 1})
                    )
                )
                calls.append(server.quota.GetUsage(Q.GetUsageRequest(org_id=org)))
            await asyncio.gather(*calls)
            for org in ORGS:
                usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id=org))
                pages = {m.metric: m for m in usage.metrics}["pages"]
                assert pages.committed == 100 // len(ORGS)
    finally:
        await close_redis(client)
