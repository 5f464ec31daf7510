"""Spend caps over gRPC: set with the plan, checked on the way in, answered with their reason."""

from __future__ import annotations

import grpc
import pytest
import redis

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2
from tests.conftest import RunningServer, field_violations, metric_limits

Q = quota_pb2


async def set_plan(server: RunningServer, limits: plan_pb2.MetricLimits) -> None:
    await server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=plan_pb2.Plan(org_id="acme", name="Cap", metrics=[limits]))
    )


@pytest.fixture
def server(pagemeter_server: RunningServer, plans_migrated: None) -> RunningServer:
    return pagemeter_server


async def test_the_cap_is_stored_as_a_canonical_decimal_and_decides(server: RunningServer) -> None:
    """overage_spend_cap "12.500" comes back as "12.5"; past it CheckQuota answers SPEND_CAP_REACHED with the units that still fit."""
    await set_plan(
        server,
        metric_limits(
            "pages",
            contract_quota=0,
            overage_allowed=True,
            overage_price_per_unit="0.25",
            overage_spend_cap="12.500",
        ),
    )
    plan = (await server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))).plan
    assert plan.metrics[0].overage_spend_cap == "12.5"
    response = await server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 51})
    )
    assert response.reason == Q.DECISION_REASON_SPEND_CAP_REACHED
    assert response.metrics[0].max_admissible == 50
    assert response.metrics[0].overage_cost == "12.75", "what the refused units would cost"


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (
            metric_limits("pages", overage_allowed=True, overage_spend_cap="ten"),
            "plan.metrics[0].overage_spend_cap",
        ),
        (
            metric_limits("pages", overage_allowed=True, overage_spend_cap="-1"),
            "plan.metrics[0].overage_spend_cap",
        ),
        (
            metric_limits("pages", overage_allowed=True, overage_spend_cap="1e3"),
            "plan.metrics[0].overage_spend_cap",
        ),
        (
            metric_limits("pages", overage_allowed=False, overage_spend_cap="10"),
            "plan.metrics[0].overage_spend_cap",
        ),
    ],
    ids=["words", "negative", "exponent", "without-overage"],
)
async def test_bad_spend_caps_are_invalid_argument_and_change_nothing(
    server: RunningServer, redis_sync: redis.Redis, limits: plan_pb2.MetricLimits, field: str
) -> None:
    """A malformed spend cap, or one on a metric without overage, is INVALID_ARGUMENT naming the field; nothing is stored."""
    before = sorted(redis_sync.keys("*"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_plan(server, limits)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert sorted(redis_sync.keys("*")) == before
