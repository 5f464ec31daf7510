"""One month has one set of figures everywhere: the terms that applied to it.

GetUsage of a past month, GetUsageHistory and the RecordUsage answers of that
month must agree on its contract quota, prices, overage and cost, whatever the
plan says today.
"""

from __future__ import annotations

import grpc
import pytest

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from tests.conftest import RunningServer, metric_limits

Q = quota_pb2
DAY_MS = 86_400_000


def plan(quota: int, overage_price: str, name: str) -> plan_pb2.Plan:
    return plan_pb2.Plan(
        org_id="acme",
        name=name,
        timezone="UTC",
        metrics=[
            metric_limits(
                "pages",
                contract_quota=quota,
                overage_allowed=True,
                price_per_unit="0.01",
                overage_price_per_unit=overage_price,
            )
        ],
    )


async def set_plan(server: RunningServer, quota: int, overage_price: str, name: str) -> None:
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan(quota, overage_price, name)))


async def pages_of(server: RunningServer, **month: int) -> tuple[Q.GetUsageResponse, Q.MetricUsage]:
    """The month's answer and its pages figures (all zeros when it has none)."""
    usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme", **month))
    return usage, {m.metric: m for m in usage.metrics}.get("pages", Q.MetricUsage())


async def test_a_past_month_keeps_its_terms_after_a_plan_change(
    pagemeter_server: RunningServer,
) -> None:
    """After a plan change, GetUsage of March shows March's quota, overage and cost, as the history and March's RecordUsage did."""
    await set_plan(pagemeter_server, 6700, "0.0175", "Starter")
    record = await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="march", units={"pages": 7350})
    )
    assert (record.metrics[0].overage_units, record.metrics[0].overage_cost) == (650, "11.375")
    pagemeter_server.clock.set(pagemeter_server.clock.now_ms() + 20 * DAY_MS)  # April 4
    await set_plan(pagemeter_server, 9000, "0.02", "Business")

    march, pages = await pages_of(pagemeter_server, year=2026, month=3)
    assert (pages.contract_quota, pages.overage_units, pages.overage_cost) == (6700, 650, "11.375")
    assert pages.overage_price_per_unit == "0.0175"
    assert march.subscription.plan_name == "Starter"
    assert march.has_plan

    april, current = await pages_of(pagemeter_server)
    assert april.period_id == "2026-04"
    assert (current.contract_quota, april.subscription.plan_name) == (9000, "Business")


async def test_get_usage_and_history_agree_on_every_month(pagemeter_server: RunningServer) -> None:
    """For each month of the history, GetUsage of that month reports the same committed, terms, overage and cost."""
    terms = [(100, "0.5"), (250, "0.125"), (50, "1.75"), (400, "0.001")]
    for month_index, (quota, price) in enumerate(terms):
        await set_plan(pagemeter_server, quota, price, f"v{month_index}")
        await pagemeter_server.quota.RecordUsage(
            Q.RecordUsageRequest(
                org_id="acme", request_id=f"job-{month_index}", units={"pages": 300}
            )
        )
        # A second change inside the month: the month's terms are those at its end.
        await set_plan(pagemeter_server, quota + 10, price, f"v{month_index}b")
        pagemeter_server.clock.set(pagemeter_server.clock.now_ms() + 31 * DAY_MS)
    history = await pagemeter_server.reporting.GetUsageHistory(
        reporting_pb2.GetUsageHistoryRequest(org_id="acme", months=6)
    )
    for row in history.months:
        usage, pages = await pages_of(pagemeter_server, year=row.year, month=row.month)
        month_pages = {m.metric: m for m in row.metrics}.get("pages")
        assert usage.subscription.plan_name == row.plan_name, row.period_id
        if month_pages is None:
            assert pages.committed == 0
            continue
        assert pages.committed == month_pages.committed, row.period_id
        assert pages.overage_units == month_pages.overage_units, row.period_id
        assert pages.overage_cost == month_pages.overage_cost, row.period_id
        assert pages.contract_quota == month_pages.terms.contract_quota, row.period_id
        assert pages.overage_price_per_unit == month_pages.terms.overage_price_per_unit


async def test_a_month_before_the_first_plan_has_no_terms(pagemeter_server: RunningServer) -> None:
    """Usage recorded before the organization had a plan is read without any plan's terms, as the history shows it."""
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="early", units={"pages": 40})
    )
    pagemeter_server.clock.set(pagemeter_server.clock.now_ms() + 31 * DAY_MS)
    await set_plan(pagemeter_server, 10, "9", "Later")
    march, pages = await pages_of(pagemeter_server, year=2026, month=3)
    assert not march.has_plan
    assert pages.committed == 40
    assert not pages.HasField("contract_quota")
    assert (pages.overage_units, pages.overage_cost) == (0, "0")


async def test_a_past_month_can_be_corrected_for_a_metric_its_plan_had(
    pagemeter_server: RunningServer,
) -> None:
    """AdjustUsage of March corrects a metric March's plan had, after today's plan dropped it; a metric no plan ever had and never recorded is still refused."""
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=plan_pb2.Plan(
                org_id="acme",
                name="Old",
                timezone="UTC",
                metrics=[metric_limits("pages"), metric_limits("faxes")],
            )
        )
    )
    pagemeter_server.clock.set(pagemeter_server.clock.now_ms() + 20 * DAY_MS)
    await set_plan(pagemeter_server, 100, "1", "New")  # pages only: faxes dropped
    reply = await pagemeter_server.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="acme",
            metric="faxes",
            units=7,
            year=2026,
            month=3,
            reason="missed faxes",
            adjustment_id="adj-1",
        )
    )
    assert (reply.period_id, reply.committed_after) == ("2026-03", 7)
    march = await pagemeter_server.quota.GetUsage(
        Q.GetUsageRequest(org_id="acme", year=2026, month=3)
    )
    assert {m.metric: m.committed for m in march.metrics}["faxes"] == 7
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.admin.AdjustUsage(
            admin_pb2.AdjustUsageRequest(
                org_id="acme",
                metric="telex",
                units=1,
                year=2026,
                month=3,
                reason="never sold",
                adjustment_id="adj-2",
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
