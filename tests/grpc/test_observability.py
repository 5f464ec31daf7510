"""Observability: gRPC and rule metrics, the per-organization exporter, health, logs.

Every figure is read from the registry the server was built with (or from a
real /metrics scrape in tests/system/test_prometheus_scrape.py), after real calls over
gRPC against a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, quota_pb2
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.ops.health import watching
from pagemeter_server.ops.logs import JsonLines, PlainText
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.conftest import START_MS, RunningServer, eagle_plan, metric_limits

DAY_MS = 86_400_000


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def settled(registry: CollectorRegistry, name: str, expected: float, **labels: str) -> float:
    """A sample once it reaches `expected`, or after two seconds: a refused call's
    status reaches its caller when the handler aborts, a moment before the server's
    interceptor counts and logs it."""
    deadline = time.monotonic() + 2
    while sample(registry, name, **labels) < expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    return sample(registry, name, **labels)


async def setup(server: RunningServer, org_id: str = "acme", **plan: object) -> None:
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org_id=org_id, **plan)))


# -- service metrics ---------------------------------------------------------------------


async def test_grpc_server_metrics_count_calls_by_code(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """grpc_server_started_total, grpc_server_handled_total by code and grpc_server_handling_seconds count real calls, refused ones included."""
    await setup(pagemeter_server)
    quota = pagemeter_server.quota
    for _ in range(3):
        await quota.CheckQuota(quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}))
    with pytest.raises(grpc.aio.AioRpcError):
        await quota.CheckQuota(quota_pb2.CheckQuotaRequest(org_id="", units={"pages": 1}))
    labels = {
        "grpc_type": "UNARY",
        "grpc_service": "pagemeter.v1.QuotaService",
        "grpc_method": "CheckQuota",
    }
    assert sample(registry, "grpc_server_started_total", **labels) == 4
    assert sample(registry, "grpc_server_handled_total", **labels, grpc_code="OK") == 3
    refused = await settled(
        registry, "grpc_server_handled_total", 1, **labels, grpc_code="INVALID_ARGUMENT"
    )
    assert refused == 1
    assert await settled(registry, "grpc_server_handling_seconds_count", 4, **labels) == 4
    assert sample(registry, "grpc_server_msg_received_total", **labels) == 4
    assert sample(registry, "grpc_server_msg_sent_total", **labels) == 3
    admin = {
        "grpc_type": "UNARY",
        "grpc_service": "pagemeter.v1.AdminService",
        "grpc_method": "SetPlan",
    }
    assert sample(registry, "grpc_server_handled_total", **admin, grpc_code="OK") == 1


async def test_units_by_kind_and_overage(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """Units admitted, held, committed, released and expired, overage units and duplicates are counted once each, duplicates excluded."""
    await setup(pagemeter_server)
    quota, clock = pagemeter_server.quota, pagemeter_server.clock

    async def hold(request_id: str, pages: int, ttl: int = 600) -> None:
        await quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id="acme",
                units={"pages": pages},
                request_id=request_id,
                hold=True,
                hold_ttl=Duration(seconds=ttl),
            )
        )

    await hold("a", 1990)
    await hold("a", 1990)  # a retried check: a duplicate, not counted again
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="a", units={"pages": 2010})
    )
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="a", units={"pages": 2010})
    )
    await hold("b", 7)
    await quota.ReleaseQuota(quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="b"))
    await hold("c", 5, ttl=2)
    clock.advance(3)
    await quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))  # finds "c" expired

    def units(kind: str) -> float:
        return sample(registry, "pagemeter_units_total", metric="pages", kind=kind)

    assert units("admitted") == 1990 + 7 + 5
    assert units("held") == 1990 + 7 + 5
    assert units("committed") == 2010
    assert units("released") == 7
    assert units("expired") == 5
    assert sample(registry, "pagemeter_overage_units_total", metric="pages") == 10
    assert sample(registry, "pagemeter_records_total", status="completed", duplicate="true") == 1
    assert sample(registry, "pagemeter_records_total", status="completed", duplicate="false") == 1


async def test_script_latency_by_script(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """Every Redis script call is timed under its script's name."""
    await setup(pagemeter_server)
    await pagemeter_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})
    )
    assert sample(registry, "pagemeter_redis_script_seconds_count", script="check") == 1
    assert sample(registry, "pagemeter_redis_script_seconds_count", script="set_plan") == 1
    assert sample(registry, "pagemeter_build_info", version="0.1.0") == 1


# -- the per-organization exporter ---------------------------------------------------------


async def test_org_exporter_publishes_the_current_month_per_org(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """At scrape time each org with a plan gets its committed, held, quota, hard limit, overage units and cost, and prepaid balance, read from Redis."""
    await setup(pagemeter_server, "acme")
    await setup(pagemeter_server, "globex", metrics=[metric_limits("pages", contract_quota=100)])
    quota, admin = pagemeter_server.quota, pagemeter_server.admin
    await admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(org_id="acme", metric="pages", units=30, grant_id="g")
    )
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="j", units={"pages": 2100})
    )
    await quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 4}, request_id="h", hold=True)
    )
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="globex", request_id="j", units={"pages": 85})
    )
    acme = {"org": "acme", "metric": "pages"}
    assert sample(registry, "pagemeter_org_committed_units", **acme) == 2100
    assert sample(registry, "pagemeter_org_held_units", **acme) == 4
    assert sample(registry, "pagemeter_org_contract_quota_units", **acme) == 2000
    assert sample(registry, "pagemeter_org_hard_limit_units", **acme) == 2500
    assert sample(registry, "pagemeter_org_overage_units", **acme) == 70  # 100 over, 30 prepaid
    assert sample(registry, "pagemeter_org_overage_cost", **acme, currency="USD") == pytest.approx(
        1.96
    )
    assert sample(registry, "pagemeter_org_prepaid_balance_units", **acme) == 0
    globex = {"org": "globex", "metric": "pages"}
    assert sample(registry, "pagemeter_org_committed_units", **globex) == 85
    assert registry.get_sample_value("pagemeter_org_hard_limit_units", globex) is None
    assert sample(registry, "pagemeter_org_exporter_orgs") == 2
    assert sample(registry, "pagemeter_org_exporter_skipped_orgs") == 0
    assert sample(registry, "pagemeter_org_exporter_up") == 1


@pytest.mark.usefixtures("plans_migrated")
async def test_org_exporter_counts_a_rollover_in_the_prepaid_balance(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """The rollover grant is worked out by the scripts, not stored: the exporter asks
    them for it, so the balance it publishes is the one CheckQuota draws on."""
    rolling = metric_limits("pages", contract_quota=100, rollover_percent=30)
    await setup(pagemeter_server, metrics=[rolling])
    pagemeter_server.clock.set(START_MS + 50 * DAY_MS)  # May: April was wholly under the plan
    acme = {"org": "acme", "metric": "pages"}
    assert sample(registry, "pagemeter_org_prepaid_balance_units", **acme) == 30
    await pagemeter_server.quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="j", units={"pages": 110})
    )
    assert sample(registry, "pagemeter_org_prepaid_balance_units", **acme) == 20


async def test_org_exporter_leaves_out_expired_holds(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """A hold that expired but that no call has purged yet is not reported as held."""
    await setup(pagemeter_server)
    await pagemeter_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(
            org_id="acme",
            units={"pages": 9},
            request_id="h",
            hold=True,
            hold_ttl=Duration(seconds=5),
        )
    )
    assert sample(registry, "pagemeter_org_held_units", org="acme", metric="pages") == 9
    pagemeter_server.clock.advance(6)
    assert sample(registry, "pagemeter_org_held_units", org="acme", metric="pages") == 0


async def exporter_registry(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, **overrides: object
) -> CollectorRegistry:
    registry = CollectorRegistry()
    custom = Settings(**{**settings.__dict__, **overrides})
    await create_server(custom, redis_client, clock=clock, registry=registry)
    return registry


async def test_org_exporter_cap_counts_skipped_orgs(
    pagemeter_server: RunningServer,
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
) -> None:
    """With a cap of 2 organizations per scrape and 5 orgs with a plan, 2 are exported and 3 counted as skipped."""
    for i in range(5):
        await setup(pagemeter_server, f"org{i}")
    registry = await exporter_registry(settings, redis_client, clock, org_exporter_max_orgs=2)
    assert sample(registry, "pagemeter_org_exporter_orgs") == 2
    assert sample(registry, "pagemeter_org_exporter_skipped_orgs") == 3
    exported = {
        s.labels["org"]
        for metric in registry.collect()
        if metric.name == "pagemeter_org_committed_units"
        for s in metric.samples
    }
    assert exported == {"org0", "org1"}


async def test_org_exporter_can_be_switched_off(
    pagemeter_server: RunningServer,
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
) -> None:
    """--org-exporter-max-orgs 0 publishes no per-organization series on this replica."""
    await setup(pagemeter_server)
    registry = await exporter_registry(settings, redis_client, clock, org_exporter_max_orgs=0)
    names = {metric.name for metric in registry.collect()}
    assert not any(name.startswith("pagemeter_org_") for name in names)
    assert "pagemeter_check_decisions" in names


# -- health ---------------------------------------------------------------------------------


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    process = RedisProcess(tmp_path / "redis")
    process.start()
    yield process
    process.stop()


async def health_of(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service="pagemeter.v1.QuotaService"), timeout=5
        )
        return int(reply.status)


async def wait_for_health(target: str, status: int, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if await health_of(target) == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health did not become {status}")


async def test_health_follows_redis_and_stays_down_while_draining(
    own_redis: RedisProcess,
) -> None:
    """Health is SERVING with Redis up, NOT_SERVING while Redis is stopped, SERVING again when it is back, and NOT_SERVING for good once draining starts."""
    settings = Settings(
        redis_url=own_redis.url,
        listen="127.0.0.1:0",
        dev_open_access=True,
        redis_timeout_seconds=0.3,
        health_interval_seconds=0.05,
    )
    client = connect_redis(settings.redis_url, settings)
    registry = CollectorRegistry()
    server, port, parts = await create_server(settings, client, registry=registry)
    await server.start()
    target = f"127.0.0.1:{port}"
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    try:
        async with watching(parts.reporter, client, settings.health_interval_seconds):
            await wait_for_health(target, serving)
            own_redis.stop()
            await wait_for_health(target, not_serving)
            assert sample(registry, "pagemeter_redis_up") == 0
            assert sample(registry, "pagemeter_serving") == 0
            own_redis.start()
            await wait_for_health(target, serving)
            assert sample(registry, "pagemeter_redis_up") == 1
            await parts.reporter.drain()
            await asyncio.sleep(0.3)  # several probes, all finding Redis up
            assert await health_of(target) == not_serving
    finally:
        await server.stop(None)
        await client.aclose()


# -- logs ------------------------------------------------------------------------------------------


async def test_each_call_logs_one_structured_line(
    pagemeter_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A CheckQuota writes one access-log record with the RPC, org, request id, decision, code and latency."""
    await setup(pagemeter_server)
    with caplog.at_level(logging.INFO, logger="pagemeter.access"):
        await pagemeter_server.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id="acme", units={"pages": 3000}, request_id="job-9", hold=True
            )
        )
    (entry,) = [r for r in caplog.records if r.name == "pagemeter.access"]
    fields = entry.fields  # type: ignore[attr-defined]
    assert fields["rpc"] == "CheckQuota" and fields["code"] == "OK"
    assert (fields["org_id"], fields["request_id"]) == ("acme", "job-9")
    assert (fields["allowed"], fields["reason"]) == (False, "HARD_LIMIT_EXCEEDED")
    assert fields["latency_ms"] > 0
    line = json.loads(JsonLines().format(entry))
    assert line["logger"] == "pagemeter.access" and line["reason"] == "HARD_LIMIT_EXCEEDED"
    assert line["level"] == "INFO" and line["ts"].endswith("+00:00")
    assert "request_id=job-9" in PlainText().format(entry)


async def test_refused_calls_are_logged_with_their_code(
    pagemeter_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused call's log line carries its status code."""
    # The level stays at INFO while the test waits: the status reaches the caller
    # when the handler aborts, a moment before the line is written.
    with caplog.at_level(logging.INFO, logger="pagemeter.access"):
        with pytest.raises(grpc.aio.AioRpcError):
            await pagemeter_server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="bad org"))
        deadline = time.monotonic() + 2
        while not any(r.name == "pagemeter.access" for r in caplog.records):
            assert time.monotonic() < deadline, "no access log line"
            await asyncio.sleep(0.005)
    (entry,) = [r for r in caplog.records if r.name == "pagemeter.access"]
    assert entry.fields["code"] == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
