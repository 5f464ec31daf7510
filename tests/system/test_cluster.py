"""pagemeter on a real Redis Cluster on loopback, started by the suite.

The cluster is made from the same server binary the project installs (Valkey),
joined with CLUSTER commands as `redis-cli --cluster create` would join it
(tests/system/cluster_topology.py): three primaries, each with a replica. Organizations land on different primaries; every script touches one
organization's slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
)
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.ops.health import volatile_nodes
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.conftest import START_MS, eagle_plan, metric_limits
from tests.system.cluster_topology import Cluster

ORGS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisProcess]]:
    """Three primaries with one replica each; the fixture yields the primaries."""
    topology = Cluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1)
    try:
        topology.start()
        yield topology.primary_nodes()
    finally:
        topology.stop()


@pytest.fixture
async def cluster_server(
    cluster: list[RedisProcess],
) -> AsyncIterator[tuple[quota_pb2_grpc.QuotaServiceStub, object, object, CollectorRegistry]]:
    settings = Settings(
        redis_url=cluster[1].url,
        redis_mode="cluster",
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
    )
    client = connect_redis(settings.redis_url, settings)
    await client.flushall()  # every primary, in cluster mode
    registry = CollectorRegistry()
    clock = ManualClock(START_MS)
    server, port, _ = await create_server(settings, client, clock=clock, registry=registry)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield (
        quota_pb2_grpc.QuotaServiceStub(channel),
        admin_pb2_grpc.AdminServiceStub(channel),
        reporting_pb2_grpc.ReportingServiceStub(channel),
        registry,
    )
    await channel.close(None)
    await server.stop(None)
    await client.aclose()


def slot_owners(cluster: list[RedisProcess]) -> set[int]:
    """The ports of the primaries that hold the ORGS' keys."""
    client = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)
    try:
        return {
            int(client.get_node_from_key(f"pm:{{{org}}}:plan").port)  # type: ignore[no-untyped-call]  # redis-py lacks annotations here
            for org in ORGS
        }
    finally:
        client.close()


async def test_the_organizations_spread_over_the_primaries(cluster: list[RedisProcess]) -> None:
    """The test organizations' hash tags land on all three primaries, so the tests below cross nodes."""
    assert slot_owners(cluster) == {node.port for node in cluster}


async def test_rules_and_reads_work_on_every_primary(cluster_server: tuple) -> None:  # type: ignore[type-arg]
    """Plans, holds, records, batches, usage, history, statistics, records lists, audit and the per-org exporter work for orgs on every primary."""
    quota, admin, reporting, registry = cluster_server
    for n, org in enumerate(ORGS):
        await admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org_id=org)))
        held = await quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id=org, units={"pages": 10 + n}, request_id="j1", hold=True
            )
        )
        assert held.allowed and held.held
        recorded = await quota.RecordUsage(
            quota_pb2.RecordUsageRequest(
                org_id=org, request_id="j1", units={"pages": 10 + n}, document_type="invoice"
            )
        )
        assert recorded.hold_released and not recorded.duplicate
        batch = await quota.RecordUsageBatch(
            quota_pb2.RecordUsageBatchRequest(
                items=[
                    quota_pb2.RecordUsageRequest(org_id=org, request_id=f"b{i}", units={"pages": 1})
                    for i in range(5)
                ]
            )
        )
        assert all(item.WhichOneof("result") == "response" for item in batch.items)
    for n, org in enumerate(ORGS):
        usage = await quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org))
        assert {m.metric: m.committed for m in usage.metrics}["pages"] == 10 + n + 5
        history = await reporting.GetUsageHistory(
            reporting_pb2.GetUsageHistoryRequest(org_id=org, months=2)
        )
        assert history.months[0].metrics[1].committed == 10 + n + 5
        stats = await reporting.GetUsageStatistics(
            reporting_pb2.GetUsageStatisticsRequest(org_id=org, start_date="2026-03-15")
        )
        assert stats.summary.totals.pages == 10 + n + 5
        records = await reporting.ListUsageRecords(
            reporting_pb2.ListUsageRecordsRequest(org_id=org, page_size=100)
        )
        assert len(records.records) == 6
        audit = await admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(org_id=org))
        assert [e.action for e in audit.events] == ["plan.set"]
    for n, org in enumerate(ORGS):
        value = registry.get_sample_value(
            "pagemeter_org_committed_units", {"org": org, "metric": "pages"}
        )
        assert value == 10 + n + 5
    assert registry.get_sample_value("pagemeter_org_exporter_orgs") == len(ORGS)


async def test_concurrent_callers_never_over_admit_on_a_cluster(cluster_server: tuple) -> None:  # type: ignore[type-arg]
    """60 concurrent holds of 1 unit race for 40 units of each of three orgs on different primaries; exactly 40 each are admitted, and retried records count once."""
    quota, admin, _, _ = cluster_server
    orgs = ORGS[:3]
    for org in orgs:
        await admin.SetPlan(
            admin_pb2.SetPlanRequest(
                plan=eagle_plan(
                    org_id=org,
                    metrics=[metric_limits("pages", contract_quota=40, overage_allowed=False)],
                )
            )
        )

    async def hold(org: str, i: int) -> bool:
        reply = await quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id=org, units={"pages": 1}, request_id=f"h{i}", hold=True
            )
        )
        return bool(reply.allowed)

    admitted = await asyncio.gather(*(hold(org, i) for org in orgs for i in range(60)))
    for k in range(len(orgs)):
        assert sum(admitted[k * 60 : (k + 1) * 60]) == 40

    async def record(org: str, i: int) -> None:
        await quota.RecordUsage(
            quota_pb2.RecordUsageRequest(org_id=org, request_id=f"h{i}", units={"pages": 1})
        )

    winners = [(org, i) for k, org in enumerate(orgs) for i in range(60) if admitted[k * 60 + i]]
    await asyncio.gather(*(record(org, i) for org, i in winners))
    await asyncio.gather(*(record(org, i) for org, i in winners))  # every record retried
    for org in orgs:
        usage = await quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org))
        assert {m.metric: m.committed for m in usage.metrics}["pages"] == 40
        assert usage.jobs.succeeded == 40


def moved_answers(cluster: list[RedisProcess]) -> int:
    """How many MOVED redirections the primaries answered since their last CONFIG RESETSTAT."""
    total = 0
    for node in cluster:
        with redis.Redis(host="127.0.0.1", port=node.port) as client:
            errors = client.info("errorstats")
        total += int(errors.get("errorstat_MOVED", {}).get("count", 0))
    return total


async def test_the_first_burst_of_a_fresh_server_goes_to_the_slot_owners(
    cluster: list[RedisProcess],
) -> None:
    """300 calls at once, the first a new server makes: each goes straight to the
    primary that owns its organization (no primary answers MOVED), and all are
    answered. (redis-py sent calls made before it had read the slot map to a
    random node; redirected, they made it close every connection, and dozens of
    calls were refused.)"""
    settings = Settings(
        redis_url=cluster[2].url,
        redis_mode="cluster",
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
    )
    for node in cluster:
        with redis.Redis(host="127.0.0.1", port=node.port) as probe:
            probe.config_resetstat()
    client = connect_redis(settings.redis_url, settings)
    server, port, _ = await create_server(
        settings, client, clock=ManualClock(START_MS), registry=CollectorRegistry()
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            replies = await asyncio.gather(
                *(
                    quota.CheckQuota(
                        quota_pb2.CheckQuotaRequest(org_id=f"burst-{i}", units={"pages": 1})
                    )
                    for i in range(300)
                )
            )
        assert all(r.reason == quota_pb2.DECISION_REASON_NO_PLAN for r in replies)
        assert moved_answers(cluster) == 0
    finally:
        await server.stop(None)
        await client.aclose()


async def test_health_reads_persistence_on_every_primary(cluster: list[RedisProcess]) -> None:
    """The health probe reads INFO persistence on each primary: all persistent at first, and the one primary whose append-only file is turned off is named."""
    settings = Settings(redis_url=cluster[0].url, redis_mode="cluster", dev_open_access=True)
    client = connect_redis(settings.redis_url, settings)
    try:
        assert await volatile_nodes(client) == []
        victim = redis.Redis.from_url(cluster[2].url)
        victim.config_set("appendonly", "no")
        try:
            assert await volatile_nodes(client) == [f"127.0.0.1:{cluster[2].port}"]
        finally:
            victim.config_set("appendonly", "yes")
            victim.close()
        assert await volatile_nodes(client) == []
    finally:
        await client.aclose()
