"""Names chosen by callers (metric names outside the plan, document types) stay bounded.

Work done is never dropped, but each new name costs a field in every counter
hash, a row in every usage answer and, if it reached a label, a Prometheus
series: an outside review named 160,000 metrics in 6 s, grew /metrics by 1.1
million series and broke the organization's usage answers. Now an organization
may record at most --max-unplanned-metrics metrics outside its plan, document
types past --max-document-types count as "_other", and no caller's name ever
becomes a label.
"""

from __future__ import annotations

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry, generate_latest

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from tests.conftest import RunningServer, eagle_plan, metric_limits
from tests.grpc.test_quota_service import snapshot

Q = quota_pb2
CAP = 16  # the default --max-unplanned-metrics


def record(org: str, request_id: str, **units: int) -> Q.RecordUsageRequest:
    return Q.RecordUsageRequest(org_id=org, request_id=request_id, units=units)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def series_count(registry: CollectorRegistry) -> int:
    return sum(
        1 for line in generate_latest(registry).decode().splitlines() if line[:1] not in ("#", "")
    )


async def test_unplanned_metrics_are_recorded_up_to_the_cap_then_refused(
    pagemeter_server: RunningServer, redis_sync: redis.Redis, registry: CollectorRegistry
) -> None:
    """16 metrics outside the plan are recorded; a 17th new one is FAILED_PRECONDITION naming it, changes nothing and is counted; known ones and planned ones still record."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    quota = pagemeter_server.quota
    for index in range(CAP):
        reply = await quota.RecordUsage(record("acme", f"u{index}", **{f"extra_{index}": 1}))
        assert reply.status == Q.RECORD_STATUS_COMPLETED
    before = snapshot(redis_sync)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await quota.RecordUsage(record("acme", "too-many", pages=3, extra_new=1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "extra_new" in (caught.value.details() or "")
    assert error_reason(caught.value) == "TOO_MANY_UNPLANNED_METRICS"
    assert snapshot(redis_sync) == before
    assert registry.get_sample_value("pagemeter_unplanned_metric_refusals_total") == 1
    # A metric already recorded, and every planned metric, still record.
    await quota.RecordUsage(record("acme", "known", extra_3=2, pages=1, documents=1))
    usage = await quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    names = {m.metric for m in usage.metrics}
    assert names == {"pages", "documents", *(f"extra_{i}" for i in range(CAP))}


async def test_a_batch_refuses_only_the_items_past_the_cap(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """In a RecordUsageBatch, items naming new metrics past the cap are answered FAILED_PRECONDITION one by one; the others are recorded."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    items = [record("acme", f"b{index}", **{f"m{index}": 1}) for index in range(CAP + 4)]
    items.append(record("acme", "planned", pages=5))
    reply = await pagemeter_server.quota.RecordUsageBatch(Q.RecordUsageBatchRequest(items=items))
    kinds = [item.WhichOneof("result") for item in reply.items]
    assert kinds == ["response"] * CAP + ["error"] * 4 + ["response"]
    refused = reply.items[CAP].error
    assert (refused.code, refused.reason) == ("FAILED_PRECONDITION", "TOO_MANY_UNPLANNED_METRICS")
    assert registry.get_sample_value("pagemeter_unplanned_metric_refusals_total") == 4


async def test_a_flood_of_names_leaves_metrics_and_answers_bounded(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """2,000 invented metric names over 100 organizations add no series per name to /metrics, and every organization's usage and statistics still answer."""
    baseline = None
    for batch in range(5):
        items = [
            record(f"org-{org}", f"r{batch}-{index}", **{f"n{batch}_{index}_{org}": 1})
            for org in range(100)
            for index in range(4)
        ]
        reply = await pagemeter_server.quota.RecordUsageBatch(
            Q.RecordUsageBatchRequest(items=items)
        )
        assert all(item.WhichOneof("result") for item in reply.items)
        if baseline is None:
            baseline = series_count(registry)
    assert series_count(registry) == baseline  # 1,600 more names, not one more series
    assert (
        registry.get_sample_value(
            "pagemeter_units_total", {"metric": "_unplanned", "kind": "committed"}
        )
        == 100 * 16
    )
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="org-7"))
    assert len(usage.metrics) == CAP
    stats = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="org-7", group_by=reporting_pb2.STATISTICS_GROUPING_BOTH
        )
    )
    assert len(stats.summary.totals.units) == CAP


async def test_adding_a_metric_to_the_plan_frees_its_place(pagemeter_server: RunningServer) -> None:
    """A metric recorded outside the plan stops counting against the cap once the plan names it."""
    plan = eagle_plan()
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    quota = pagemeter_server.quota
    for index in range(CAP):
        await quota.RecordUsage(record("acme", f"u{index}", **{f"extra_{index}": 1}))
    plan.metrics.append(metric_limits("extra_0", period=plan_pb2.PERIOD_MONTHLY))
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    await quota.RecordUsage(record("acme", "fresh", extra_fresh=1))
    with pytest.raises(grpc.aio.AioRpcError):
        await quota.RecordUsage(record("acme", "one-too-many", extra_more=1))


async def test_unplanned_names_are_forgotten_with_their_counters(
    pagemeter_server: RunningServer,
) -> None:
    """Once a metric outside the plan has not been recorded for the usage retention plus a month, its place is free for a new one."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    quota = pagemeter_server.quota
    for index in range(CAP):
        await quota.RecordUsage(record("acme", f"u{index}", **{f"extra_{index}": 1}))
    later = pagemeter_server.clock.now_ms() + (400 + 32) * 86_400_000
    pagemeter_server.clock.set(later)
    reply = await quota.RecordUsage(record("acme", "much-later", extra_new=1))
    assert reply.status == Q.RECORD_STATUS_COMPLETED


async def test_an_organization_nobody_configured_leaves_nothing_for_good(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """Records for an organization id with no plan create only keys that expire (records, index, counters, registries), so invented ids cannot grow Redis for good."""
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(
            org_id="made-up", request_id="r1", units={"pages": 3}, document_type="invoice"
        )
    )
    keys = redis_sync.keys("pm:{made-up}:*")
    assert keys
    assert {key: redis_sync.pttl(key) > 0 for key in keys} == dict.fromkeys(keys, True)


async def test_a_plan_keeps_the_lifetime_totals_for_good(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """Once an organization has a plan, its lifetime totals no longer expire."""
    await pagemeter_server.quota.RecordUsage(record("later", "r1", pages=3))
    assert redis_sync.pttl("pm:{later}:u:lifetime") > 0
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan("later")))
    assert redis_sync.pttl("pm:{later}:u:lifetime") == -1
