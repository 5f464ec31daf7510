"""CheckQuotaBatch and RecordUsageBatch: many calls in one, answered item by item.

The items of one organization run as one atomic script call, in the order
given; an item refused on its own is answered with its error and stops nothing.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.quota import Store
from tests.conftest import START_MS, RunningServer, eagle_plan, metric_limits, ms


async def set_plan(server: RunningServer, org_id: str, **limits: object) -> None:
    plan = eagle_plan(org_id=org_id, metrics=[metric_limits("pages", **limits)])
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))


def hold(org_id: str, request_id: str, pages: int) -> quota_pb2.CheckQuotaRequest:
    return quota_pb2.CheckQuotaRequest(
        org_id=org_id, request_id=request_id, units={"pages": pages}, hold=True
    )


def job(org_id: str, request_id: str, pages: int, **fields: object) -> quota_pb2.RecordUsageRequest:
    return quota_pb2.RecordUsageRequest(
        org_id=org_id,
        request_id=request_id,
        units={"pages": pages},
        **fields,  # type: ignore[arg-type]
    )


async def committed(server: RunningServer, org_id: str, **month: int) -> int:
    usage = await server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org_id, **month))
    return {m.metric: m.committed for m in usage.metrics}.get("pages", 0)


async def test_items_of_one_org_are_decided_in_order(pagemeter_server: RunningServer) -> None:
    """Two holds racing for the last 10 units in one batch: the first is admitted, the second sees its hold and is denied; another org's item is decided on its own."""
    await set_plan(pagemeter_server, "acme", contract_quota=10, overage_allowed=False)
    await set_plan(pagemeter_server, "globex", contract_quota=5, overage_allowed=False)
    reply = await pagemeter_server.quota.CheckQuotaBatch(
        quota_pb2.CheckQuotaBatchRequest(
            items=[hold("acme", "a1", 6), hold("globex", "g1", 5), hold("acme", "a2", 6)]
        )
    )
    first, other, second = (item.response for item in reply.items)
    assert first.allowed and first.held
    assert other.allowed and other.held
    assert not second.allowed
    assert second.reason == quota_pb2.DECISION_REASON_QUOTA_EXCEEDED
    assert second.metrics[0].held == 6 and second.metrics[0].max_admissible == 4


async def test_a_refused_item_stops_nothing_and_changes_nothing(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """A malformed item and an item reusing a request id with another payload get their own errors (INVALID_ARGUMENT with field violations, ALREADY_EXISTS with REQUEST_ID_REUSED); the valid items are recorded."""
    await set_plan(pagemeter_server, "acme")
    quota = pagemeter_server.quota
    await quota.RecordUsage(job("acme", "taken", 5))
    reply = await quota.RecordUsageBatch(
        quota_pb2.RecordUsageBatchRequest(
            items=[
                job("acme", "ok-1", 3),
                job("bad org!", "x", 1),
                job("acme", "taken", 9),
                job("acme", "ok-2", 4),
            ]
        )
    )
    kinds = [item.WhichOneof("result") for item in reply.items]
    assert kinds == ["response", "error", "error", "response"]
    bad, reused = reply.items[1].error, reply.items[2].error
    assert bad.code == "INVALID_ARGUMENT" and bad.field_violations[0].field == "org_id"
    assert (reused.code, reused.reason) == ("ALREADY_EXISTS", "REQUEST_ID_REUSED")
    assert await committed(pagemeter_server, "acme") == 5 + 3 + 4
    assert not any("bad org" in key for key in redis_sync.keys("*"))


async def test_a_thousand_records_count_once_even_when_the_batch_is_retried(
    pagemeter_server: RunningServer,
) -> None:
    """1,000 records over three orgs are answered in order and counted once; sending the same batch again answers every item as a duplicate and changes no total."""
    orgs = ("acme", "globex", "initech")
    for org_id in orgs:
        await set_plan(pagemeter_server, org_id)
    items = [job(orgs[i % 3], f"job-{i}", 1 + i % 7) for i in range(1000)]
    request = quota_pb2.RecordUsageBatchRequest(items=items)
    first = await pagemeter_server.quota.RecordUsageBatch(request)
    assert [item.response.request_id for item in first.items] == [i.request_id for i in items]
    assert not any(item.response.duplicate for item in first.items)
    totals = {
        org_id: sum(1 + i % 7 for i in range(1000) if i % 3 == n) for n, org_id in enumerate(orgs)
    }
    for org_id in orgs:
        assert await committed(pagemeter_server, org_id) == totals[org_id]
    again = await pagemeter_server.quota.RecordUsageBatch(request)
    assert all(item.response.duplicate for item in again.items)
    for org_id in orgs:
        assert await committed(pagemeter_server, org_id) == totals[org_id]


@pytest.mark.parametrize("count", [0, 1001])
async def test_batch_size_is_bounded(pagemeter_server: RunningServer, count: int) -> None:
    """An empty batch or one of more than 1,000 items is INVALID_ARGUMENT as a whole."""
    request = quota_pb2.CheckQuotaBatchRequest(
        items=[quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})] * count
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.quota.CheckQuotaBatch(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1000" in (caught.value.details() or "")


async def test_batch_follows_a_timezone_it_did_not_know(
    pagemeter_server: RunningServer, redis_client: aioredis.Redis
) -> None:
    """A plan set through another replica (Asia/Tokyo) is found by the batch: a job completed at 16:00 UTC on 31 March counts in Tokyo's April."""
    store = Store(
        redis_client, default_timezone="UTC", record_retention_days=40, usage_retention_days=400
    )
    plan = plan_pb2.Plan(
        org_id="acme", name="T", timezone="Asia/Tokyo", metrics=[metric_limits("pages")]
    )
    await store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=START_MS)
    pagemeter_server.clock.set(ms("2026-03-31T16:30:00+00:00"))
    completed = Timestamp(seconds=ms("2026-03-31T16:00:00+00:00") // 1000)
    reply = await pagemeter_server.quota.RecordUsageBatch(
        quota_pb2.RecordUsageBatchRequest(items=[job("acme", "tokyo-1", 7, completed_at=completed)])
    )
    assert reply.items[0].response.metrics[0].period_id == "2026-04"
    assert await committed(pagemeter_server, "acme", year=2026, month=4) == 7


async def test_concurrent_batches_never_over_admit(pagemeter_server: RunningServer) -> None:
    """Ten concurrent batches of ten holds of 1 unit race for 50 units with single calls alongside: exactly 50 are admitted."""
    await set_plan(pagemeter_server, "acme", contract_quota=50, overage_allowed=False)
    quota = pagemeter_server.quota

    async def batch(n: int) -> int:
        reply = await quota.CheckQuotaBatch(
            quota_pb2.CheckQuotaBatchRequest(
                items=[hold("acme", f"b{n}-{i}", 1) for i in range(10)]
            )
        )
        return sum(item.response.allowed for item in reply.items)

    async def single(n: int) -> int:
        return int((await quota.CheckQuota(hold("acme", f"s{n}", 1))).allowed)

    admitted = await asyncio.gather(*(batch(n) for n in range(10)), *(single(n) for n in range(20)))
    assert sum(admitted) == 50


async def test_sdk_sends_batches(pagemeter_server: RunningServer) -> None:
    """The SDK's check_quota_batch and record_usage_batch send request builders' items and return the per-item answers."""
    from pagemeter_client import AsyncPagemeterClient
    from pagemeter_client.sdk import check_quota_request, record_usage_request

    await set_plan(pagemeter_server, "acme")
    async with AsyncPagemeterClient(pagemeter_server.target) as client:
        checks = await client.check_quota_batch(
            [
                check_quota_request("acme", {"pages": 2}, request_id=f"j{i}", hold=True)
                for i in range(3)
            ]
        )
        assert all(item.response.held for item in checks.items)
        records = await client.record_usage_batch(
            [record_usage_request("acme", f"j{i}", {"pages": 2}) for i in range(3)]
        )
        assert all(item.response.hold_released for item in records.items)
    assert await committed(pagemeter_server, "acme") == 6
