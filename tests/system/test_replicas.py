"""Several stateless pagemeter servers on one store decide as one server would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from tests.conftest import START_MS, eagle_plan, metric_limits


@pytest.fixture
async def replicas(
    settings: Settings, redis_client: aioredis.Redis
) -> AsyncIterator[list[quota_pb2_grpc.QuotaServiceAsyncStub]]:
    """Three servers, each with its own store object and caches, on the same Redis."""
    servers, channels = [], []
    for _ in range(3):
        server, port, _ = await create_server(
            settings, redis_client, clock=ManualClock(START_MS), registry=CollectorRegistry()
        )
        await server.start()
        servers.append(server)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    admin = admin_pb2_grpc.AdminServiceStub(channels[0])
    await admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=eagle_plan(
                metrics=[metric_limits("pages", contract_quota=40, overage_allowed=False)]
            )
        )
    )
    yield [quota_pb2_grpc.QuotaServiceStub(channel) for channel in channels]
    for channel in channels:
        await channel.close(None)
    for server in servers:
        await server.stop(None)


async def test_replicas_never_over_admit_nor_double_count(
    replicas: list[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    """90 callers spread over three servers race for 40 units: exactly 40 are admitted; every record is then sent to every server and counted once."""

    async def hold(i: int) -> bool:
        reply = await replicas[i % 3].CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id="acme", units={"pages": 1}, request_id=f"j{i}", hold=True
            )
        )
        return bool(reply.allowed)

    admitted = await asyncio.gather(*(hold(i) for i in range(90)))
    winners = [i for i, ok in enumerate(admitted) if ok]
    assert len(winners) == 40

    async def record(server: quota_pb2_grpc.QuotaServiceAsyncStub, i: int) -> bool:
        reply = await server.RecordUsage(
            quota_pb2.RecordUsageRequest(org_id="acme", request_id=f"j{i}", units={"pages": 1})
        )
        return bool(reply.duplicate)

    duplicates = await asyncio.gather(*(record(server, i) for i in winners for server in replicas))
    assert sum(duplicates) == 2 * len(winners)  # each record: one first answer, two duplicates
    usage = await replicas[2].GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
    assert {m.metric: m.committed for m in usage.metrics}["pages"] == 40
    assert usage.jobs.succeeded == 40
