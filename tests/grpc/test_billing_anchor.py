"""Billing periods anchored at the subscription, over gRPC: quota resets at the
anniversary (clamped at short months, across DST), every read speaks in the
plan's periods, and a changed anchor applies from the next period."""

from __future__ import annotations

from datetime import datetime

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from tests.conftest import RunningServer, field_violations, metric_limits

Q, P, R = quota_pb2, plan_pb2, reporting_pb2
NEW_YORK = "America/New_York"
# The subscription began on Jan 31 at 10:00 in New York.
ANCHOR = "2026-01-31T10:00:00-05:00"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def stamp(text: str) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(ms(text))
    return value


def anchored_plan(
    anchor: str | None = ANCHOR,
    interval: P.BillingInterval.ValueType = P.BILLING_INTERVAL_MONTH,
    timezone: str = NEW_YORK,
    quota: int = 100,
) -> P.Plan:
    plan = P.Plan(
        org_id="acme",
        name="Anniversary",
        timezone=timezone,
        metrics=[metric_limits("pages", contract_quota=quota, overage_allowed=False)],
    )
    if anchor is not None:
        plan.billing_anchor.CopyFrom(stamp(anchor))
        plan.billing_interval = interval
    return plan


async def set_plan(server: RunningServer, plan: P.Plan) -> P.Plan:
    reply = await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    return reply.plan


async def record(server: RunningServer, request_id: str, pages: int) -> None:
    await server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id=request_id, units={"pages": pages})
    )


async def check(server: RunningServer, pages: int) -> Q.CheckQuotaResponse:
    reply: Q.CheckQuotaResponse = await server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": pages})
    )
    return reply


async def usage(server: RunningServer, **fields: int) -> Q.GetUsageResponse:
    reply: Q.GetUsageResponse = await server.quota.GetUsage(
        Q.GetUsageRequest(org_id="acme", **fields)
    )
    return reply


@pytest.fixture
def server(pagemeter_server: RunningServer, plans_migrated: None) -> RunningServer:
    pagemeter_server.clock.set(ms("2026-02-20T12:00:00-05:00"))
    return pagemeter_server


async def test_the_quota_resets_at_the_anniversary_on_the_31st_across_february_and_dst(
    server: RunningServer,
) -> None:
    """Anchor Jan 31 10:00 New York: the period runs to Feb 28 10:00 (EST), then
    to Mar 31 10:00 (EDT, after the clocks changed on Mar 8); the quota is full
    one millisecond before each anniversary and empty at it."""
    await set_plan(server, anchored_plan())
    await record(server, "jan", 100)
    server.clock.set(ms("2026-02-28T09:59:59.999-05:00"))
    denied = await check(server, 1)
    assert not denied.allowed
    assert denied.metrics[0].period_id == "2026-01-31"
    assert denied.metrics[0].period_end.ToMilliseconds() == ms("2026-02-28T10:00:00-05:00")
    server.clock.set(ms("2026-02-28T10:00:00-05:00"))
    assert (await check(server, 100)).allowed
    figures = await usage(server)
    assert figures.period_id == "2026-02-28"
    assert figures.period_start.ToMilliseconds() == ms("2026-02-28T10:00:00-05:00")
    assert figures.period_end.ToMilliseconds() == ms("2026-03-31T10:00:00-04:00")
    assert (figures.year, figures.month) == (2026, 2)
    assert figures.previous_month.period_id == "2026-01-31"
    assert {m.metric: m.committed for m in figures.previous_month.metrics} == {"pages": 100}
    await record(server, "feb", 100)
    server.clock.set(ms("2026-03-31T09:59:59.999-04:00"))
    assert not (await check(server, 1)).allowed
    server.clock.set(ms("2026-03-31T10:00:00-04:00"))
    assert (await check(server, 100)).allowed
    assert (await usage(server)).period_id == "2026-03-31"


async def test_history_records_and_a_given_month_speak_in_the_plans_periods(
    server: RunningServer,
) -> None:
    """GetUsageHistory lists anchored periods with their bounds; a record names
    its period; GetUsage for a year and month reads the period that starts in it."""
    await set_plan(server, anchored_plan())
    await record(server, "feb-job", 7)
    server.clock.set(ms("2026-03-05T12:00:00-05:00"))
    await record(server, "mar-job", 3)
    history = await server.reporting.GetUsageHistory(
        R.GetUsageHistoryRequest(org_id="acme", months=3)
    )
    assert history.timezone == NEW_YORK
    assert [m.period_id for m in history.months] == ["2026-02-28", "2026-01-31", "2025-12-31"]
    assert history.months[1].period_end.ToMilliseconds() == ms("2026-02-28T10:00:00-05:00")
    assert [{t.metric: t.committed for t in m.metrics}.get("pages", 0) for m in history.months] == [
        3,
        7,
        0,
    ]
    records = await server.reporting.ListUsageRecords(R.ListUsageRecordsRequest(org_id="acme"))
    assert {r.request_id: r.period_id for r in records.records} == {
        "feb-job": "2026-01-31",
        "mar-job": "2026-02-28",
    }
    january = await usage(server, year=2026, month=1)
    assert january.period_id == "2026-01-31"
    assert {m.metric: m.committed for m in january.metrics}["pages"] == 7


async def test_a_new_anchor_applies_from_the_end_of_the_period_in_progress(
    server: RunningServer,
) -> None:
    """An org on calendar months sets an anchor on the 15th on Mar 20: March
    keeps its quota and counters to Apr 1; Apr 1 to Apr 15 is a period of its
    own; from Apr 15 the periods follow the anchor."""
    server.clock.set(ms("2026-03-02T12:00:00-05:00"))
    await set_plan(server, anchored_plan(anchor=None))
    await record(server, "early-march", 90)
    server.clock.set(ms("2026-03-20T12:00:00-04:00"))
    stored = await set_plan(server, anchored_plan(anchor="2026-01-15T09:00:00-05:00"))
    assert stored.billing_anchor.ToMilliseconds() == ms("2026-01-15T09:00:00-05:00")
    assert stored.billing_interval == P.BILLING_INTERVAL_MONTH
    now = await usage(server)
    assert now.period_id == "2026-03"
    assert now.period_end.ToMilliseconds() == ms("2026-04-01T00:00:00-04:00")
    assert not (await check(server, 11)).allowed  # March's 90 still count
    server.clock.set(ms("2026-04-01T00:00:00-04:00"))
    first = await usage(server)
    assert first.period_id == "2026-04-01"
    assert first.period_end.ToMilliseconds() == ms("2026-04-15T09:00:00-04:00")
    assert first.previous_month.period_id == "2026-03"
    await record(server, "april", 100)
    server.clock.set(ms("2026-04-15T09:00:00-04:00"))
    assert (await usage(server)).period_id == "2026-04-15"
    assert (await check(server, 100)).allowed


async def test_a_yearly_plan_resets_once_a_year(server: RunningServer) -> None:
    await set_plan(
        server,
        anchored_plan(anchor="2025-06-01T00:00:00-04:00", interval=P.BILLING_INTERVAL_YEAR),
    )
    await record(server, "big", 100)
    server.clock.set(ms("2026-05-31T23:59:59-04:00"))
    assert not (await check(server, 1)).allowed
    server.clock.set(ms("2026-06-01T00:00:00-04:00"))
    figures = await usage(server)
    assert figures.period_id == "2026-06-01"
    assert figures.period_end.ToMilliseconds() == ms("2027-06-01T00:00:00-04:00")
    assert (await check(server, 100)).allowed


async def test_plans_without_an_anchor_keep_calendar_months(server: RunningServer) -> None:
    """No anchor: ids, bounds and GetPlan exactly as before (no anchor fields)."""
    stored = await set_plan(server, anchored_plan(anchor=None))
    assert not stored.HasField("billing_anchor")
    assert stored.billing_interval == P.BILLING_INTERVAL_UNSPECIFIED
    figures = await usage(server)
    assert figures.period_id == "2026-02"
    assert figures.period_start.ToMilliseconds() == ms("2026-02-01T00:00:00-05:00")


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        (
            P.Plan(org_id="acme", timezone=NEW_YORK, billing_interval=P.BILLING_INTERVAL_YEAR),
            "plan.billing_interval",
        ),
        (
            P.Plan(org_id="acme", timezone=NEW_YORK, billing_anchor=Timestamp(seconds=0)),
            "plan.billing_anchor",
        ),
        (
            P.Plan(org_id="acme", timezone=NEW_YORK, billing_anchor=Timestamp(seconds=10**10)),
            "plan.billing_anchor",
        ),
        (
            P.Plan(
                org_id="acme",
                timezone=NEW_YORK,
                billing_anchor=Timestamp(seconds=1_770_000_000),
                billing_interval=7,  # type: ignore[arg-type]
            ),
            "plan.billing_interval",
        ),
    ],
)
async def test_a_bad_anchor_or_interval_is_invalid_and_changes_nothing(
    server: RunningServer, redis_sync: redis.Redis, plan: P.Plan, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_plan(server, plan)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert redis_sync.keys("pm:{acme}:*") == []


async def test_an_anchor_before_the_plan_migration_is_a_failed_precondition(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """Servers of earlier releases read only calendar months: an anchor waits for
    migrate-plans, and nothing is stored."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_plan(pagemeter_server, anchored_plan())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "migrate-plans" in (caught.value.details() or "")
    assert redis_sync.keys("pm:{acme}:*") == []


async def test_the_org_exporter_publishes_the_anchored_period(
    server: RunningServer, registry: CollectorRegistry
) -> None:
    """pagemeter_org_committed_units is the billing period's: the units of the
    period before the anniversary, none just after it."""
    await set_plan(server, anchored_plan())
    await record(server, "feb", 60)
    labels = {"org": "acme", "metric": "pages"}
    assert registry.get_sample_value("pagemeter_org_committed_units", labels) == 60
    server.clock.set(ms("2026-02-28T10:00:00-05:00"))
    assert registry.get_sample_value("pagemeter_org_committed_units", labels) == 0


async def test_a_correction_of_a_given_month_lands_in_the_period_that_starts_in_it(
    server: RunningServer,
) -> None:
    """AdjustUsage with year 2026 and month 1 corrects the period from Jan 31;
    without them, the period in progress."""
    await set_plan(server, anchored_plan())
    await record(server, "feb", 10)
    server.clock.set(ms("2026-03-05T12:00:00-05:00"))
    past = await server.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="acme",
            metric="pages",
            units=-4,
            year=2026,
            month=1,
            reason="refund",
            adjustment_id="fix-1",
        )
    )
    assert (past.period_id, past.committed_before, past.committed_after) == ("2026-01-31", 10, 6)
    current = await server.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="acme", metric="pages", units=2, reason="manual", adjustment_id="fix-2"
        )
    )
    assert current.period_id == "2026-02-28"
    january = await usage(server, year=2026, month=1)
    assert {m.metric: m.committed for m in january.metrics}["pages"] == 6
