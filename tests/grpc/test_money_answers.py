"""Money is exact in every answer: the overage cost of the largest figures over gRPC
(the arithmetic itself is in tests/unit/test_money.py)."""

from __future__ import annotations

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from tests.conftest import RunningServer, metric_limits
from tests.unit.test_money import exact_product

Q = quota_pb2


async def test_every_answer_carries_the_exact_cost(pagemeter_server: RunningServer) -> None:
    """CheckQuota, RecordUsage, GetUsage and GetUsageHistory all show the exact overage cost."""
    price = "123456789012.123456789"
    units = 987_654_321
    expected = exact_product(units, price)
    plan = plan_pb2.Plan(
        org_id="money",
        name="Exact",
        timezone="UTC",
        metrics=[
            metric_limits(
                "pages", contract_quota=0, overage_allowed=True, overage_price_per_unit=price
            )
        ],
    )
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    check = await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="money", units={"pages": units})
    )
    assert check.metrics[0].overage_cost == expected
    record = await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="money", request_id="job-1", units={"pages": units})
    )
    assert record.metrics[0].overage_cost == expected
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="money"))
    assert usage.metrics[0].overage_cost == expected
    history = await pagemeter_server.reporting.GetUsageHistory(
        reporting_pb2.GetUsageHistoryRequest(org_id="money", months=1)
    )
    assert history.months[0].metrics[0].overage_cost == expected
