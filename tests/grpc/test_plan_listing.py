"""SetPlan's validate_only and ListPlans: what `pagemeter plan apply/export` stand on."""

from __future__ import annotations

import grpc
import pytest
import redis

from pagemeter.v1 import admin_pb2
from tests.conftest import RunningServer, eagle_plan, field_violations


async def test_validate_only_answers_the_stored_form_and_stores_nothing(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """validate_only answers the plan as it would be stored (canonical prices, default timezone, version 0) and writes no key; a bad plan is the same INVALID_ARGUMENT as without it."""
    plan = eagle_plan(timezone="")
    plan.metrics[0].overage_price_per_unit = "0.0280"
    answer = await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=plan, validate_only=True)
    )
    assert answer.plan.version == 0 and answer.plan.timezone == "UTC"
    stored = {m.metric: m for m in answer.plan.metrics}
    assert stored[plan.metrics[0].metric].overage_price_per_unit == "0.028"
    assert redis_sync.keys("*") == []
    plan.metrics[0].contract_quota = -1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.admin.SetPlan(
            admin_pb2.SetPlanRequest(plan=plan, validate_only=True)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plan.metrics[0].contract_quota" in field_violations(caught.value)


async def test_list_plans_pages_through_every_organization_by_id(
    pagemeter_server: RunningServer,
) -> None:
    """Seven organizations in pages of three: every plan once, ordered by id; a foreign token is INVALID_ARGUMENT."""
    orgs = [f"org-{i}" for i in (5, 1, 6, 3, 0, 4, 2)]
    for org in orgs:
        await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org)))
    seen: list[str] = []
    request = admin_pb2.ListPlansRequest(page_size=3)
    pages = 0
    while True:
        page = await pagemeter_server.admin.ListPlans(request)
        pages += 1
        seen += [plan.org_id for plan in page.plans]
        assert all(plan.version == 1 and plan.metrics for plan in page.plans)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert (seen, pages) == (sorted(orgs), 3)
    for bad in (
        admin_pb2.ListPlansRequest(page_token="not-a-token"),
        admin_pb2.ListPlansRequest(page_size=1001),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pagemeter_server.admin.ListPlans(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_plans_without_plans_is_empty(pagemeter_server: RunningServer) -> None:
    """No organization has a plan: one empty page, no token."""
    page = await pagemeter_server.admin.ListPlans(admin_pb2.ListPlansRequest())
    assert list(page.plans) == [] and not page.next_page_token
