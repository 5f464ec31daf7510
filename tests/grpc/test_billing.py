"""Billing close and export over gRPC: a closed month's figures are frozen, later
changes are exported as adjustment rows, and frozen plus adjustments equal
GetUsageHistory exactly, for 100 organizations of many timezones and anchors.

The cluster runs of the tests marked ON_EACH_BACKEND are in the system tier.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import (
    admin_pb2,
    billing_pb2,
    billing_pb2_grpc,
    plan_pb2,
    quota_pb2,
    reporting_pb2,
)
from pagemeter_server.api.auth import Credentials, Role
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from tests.conftest import (
    BACKENDS,
    RunningServer,
    field_violations,
    metric_limits,
    ms,
    serving,
)
from tests.grpc.test_access import ADMIN_TOKEN, SERVICE_TOKEN

B, P, Q, R = billing_pb2, plan_pb2, quota_pb2, reporting_pb2
ZONES = ("UTC", "Europe/Berlin", "America/Los_Angeles", "Pacific/Kiritimati", "Asia/Kolkata")
OVERAGE_PRICES = ("0.028", "0.0015", "1.25", "0.3333333")
ORGS = 100
JAN_5 = ms("2026-01-05T12:00:00+00:00")
# When jobs complete: one in January, two in February (the last one past the
# anchored periods' boundary on the 20th).
RECORDED_AT = (
    ms("2026-01-25T12:00:00+00:00"),
    ms("2026-02-14T12:00:00+00:00"),
    ms("2026-02-25T12:00:00+00:00"),
)
MAR_5 = ms("2026-03-05T12:00:00+00:00")

Figures = tuple[int, int, int, Decimal]  # committed, prepaid, overage units, overage cost


def stamp(instant_ms: int) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(instant_ms)
    return value


def org_name(i: int) -> str:
    return f"org-{i:03d}"


def org_plan(i: int) -> P.Plan:
    """Varied terms: five timezones; calendar months, monthly anchors on the 20th,
    a yearly anchor; quotas, overage allowed or not, four overage prices, currencies."""
    tz = ZONES[i % len(ZONES)]
    plan = P.Plan(
        org_id=org_name(i),
        name=f"Plan {i % 4}",
        timezone=tz,
        currency=("EUR", "USD", "")[i % 3],
        metrics=[
            metric_limits(
                "pages",
                contract_quota=100 + i,
                overage_allowed=i % 3 != 0,
                price_per_unit="0.03",
                overage_price_per_unit=OVERAGE_PRICES[i % len(OVERAGE_PRICES)],
            ),
            metric_limits("documents", contract_quota=20, overage_allowed=True),
        ],
    )
    if i % 4 == 1:
        anchor = datetime(2025, 12, 20, 9, 0, tzinfo=ZoneInfo(tz))
        plan.billing_anchor.CopyFrom(stamp(int(anchor.timestamp() * 1000)))
        plan.billing_interval = P.BILLING_INTERVAL_MONTH
    elif i % 10 == 3:
        anchor = datetime(2025, 6, 10, 0, 0, tzinfo=ZoneInfo(tz))
        plan.billing_anchor.CopyFrom(stamp(int(anchor.timestamp() * 1000)))
        plan.billing_interval = P.BILLING_INTERVAL_YEAR
    return plan


def job_units(i: int, k: int) -> dict[str, int]:
    units = {"pages": (i * 37 + k * 53) % 90 + 1, "documents": i % 5 + k + 1}
    if i % 6 == 0:
        units["credits"] = i + k  # outside the plan: recorded, unpriced
    return units


def billing_stub(server: RunningServer) -> billing_pb2_grpc.BillingServiceAsyncStub:
    return billing_pb2_grpc.BillingServiceStub(server.channel)


async def populate(server: RunningServer, orgs: int = ORGS) -> None:
    """Plans set on Jan 5, prepaid credits for some, three jobs per organization."""
    server.clock.set(JAN_5)
    for i in range(orgs):
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=org_plan(i)))
        if i % 7 == 0:
            await server.admin.GrantCredits(
                admin_pb2.GrantCreditsRequest(
                    org_id=org_name(i), metric="pages", units=40, grant_id=f"g-{i}"
                )
            )
    for k, instant in enumerate(RECORDED_AT):
        server.clock.set(instant)
        await asyncio.gather(
            *(
                server.quota.RecordUsage(
                    Q.RecordUsageRequest(
                        org_id=org_name(i), request_id=f"job-{i}-{k}", units=job_units(i, k)
                    )
                )
                for i in range(orgs)
            )
        )


async def export(
    server: RunningServer, billing_month: str, page_size: int = 0
) -> list[B.BillingRow]:
    rows: list[B.BillingRow] = []
    token = ""
    while True:
        page = await billing_stub(server).ExportBillingPeriod(
            B.ExportBillingPeriodRequest(
                billing_month=billing_month, page_size=page_size, page_token=token
            )
        )
        rows += page.rows
        token = page.next_page_token
        if not token:
            return rows


def exported_figures(rows: list[B.BillingRow]) -> dict[tuple[str, str, str], Figures]:
    """(org, period, metric) -> the sum of every row's figures (frozen + adjustments)."""
    sums: dict[tuple[str, str, str], Figures] = defaultdict(lambda: (0, 0, 0, Decimal(0)))
    for row in rows:
        key = (row.org_id, row.period_id, row.metric)
        c, p, o, cost = sums[key]
        sums[key] = (
            c + row.committed,
            p + row.prepaid_units,
            o + row.overage_units,
            cost + Decimal(row.overage_cost),
        )
    return dict(sums)


def in_month(instant_ms: int, tz: str, year: int, month: int) -> bool:
    """Whether the period ending at instant_ms ends in the calendar month (its last
    instant, one millisecond before its end, falls in it)."""
    last = datetime.fromtimestamp((instant_ms - 1) / 1000, ZoneInfo(tz))
    return (last.year, last.month) == (year, month)


async def history_figures(
    server: RunningServer, orgs: int, year: int, month: int
) -> dict[tuple[str, str, str], Figures]:
    """GetUsageHistory's figures of every period that ended in the month."""
    figures: dict[tuple[str, str, str], Figures] = {}
    for i in range(orgs):
        history = await server.reporting.GetUsageHistory(
            R.GetUsageHistoryRequest(org_id=org_name(i), months=24)
        )
        for period in history.months:
            if not in_month(period.period_end.ToMilliseconds(), history.timezone, year, month):
                continue
            for m in period.metrics:
                figures[(org_name(i), period.period_id, m.metric)] = (
                    m.committed,
                    m.prepaid_used,
                    m.overage_units,
                    Decimal(m.overage_cost),
                )
    return figures


def totals(figures: dict[tuple[str, str, str], Figures]) -> Figures:
    return (
        sum(f[0] for f in figures.values()),
        sum(f[1] for f in figures.values()),
        sum(f[2] for f in figures.values()),
        sum((f[3] for f in figures.values()), Decimal(0)),
    )


@dataclass
class Billing:
    server: RunningServer
    stub: billing_pb2_grpc.BillingServiceAsyncStub

    async def close(self, billing_month: str) -> B.CloseBillingPeriodResponse:
        reply: B.CloseBillingPeriodResponse = await self.stub.CloseBillingPeriod(
            B.CloseBillingPeriodRequest(billing_month=billing_month)
        )
        return reply


@pytest.fixture
def billing(pagemeter_server: RunningServer, plans_migrated: None) -> Billing:
    return Billing(pagemeter_server, billing_stub(pagemeter_server))


# -- 100 organizations: export == GetUsageHistory ------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_export_of_100_organizations_equals_the_history_before_and_after_close(
    billing: Billing, backend: str
) -> None:
    """100 organizations of five timezones, calendar, monthly-anchored and yearly
    periods, prepaid credits and unplanned metrics: February's export (open, then
    closed) equals GetUsageHistory per organization, period and metric and in
    total; the periods exported are exactly those that ended in February."""
    server = billing.server
    await populate(server)
    server.clock.set(MAR_5)
    expected = await history_figures(server, ORGS, 2026, 2)
    assert totals(expected)[0] > 0 and totals(expected)[2] > 0 and totals(expected)[1] > 0

    open_rows = await export(server, "2026-02", page_size=7)
    assert {row.kind for row in open_rows} == {B.BILLING_ROW_KIND_OPEN}
    assert exported_figures(open_rows) == expected

    closed = await billing.close("2026-02")
    yearly = sum(1 for i in range(ORGS) if i % 10 == 3 and i % 4 != 1)
    assert closed.organizations_closed == ORGS - yearly
    assert closed.organizations_without_period == yearly  # their year ends on June 10
    closed_rows = await export(server, "2026-02")
    assert {row.kind for row in closed_rows} == {B.BILLING_ROW_KIND_CLOSED}
    assert exported_figures(closed_rows) == expected
    assert totals(exported_figures(closed_rows)) == totals(expected)
    for row in closed_rows:
        assert row.included_units + row.prepaid_units + row.overage_units == row.committed
        assert row.closed_at.ToMilliseconds() == MAR_5
    # One row per organization, period and metric.
    keys = [(row.org_id, row.period_id, row.metric) for row in closed_rows]
    assert len(keys) == len(set(keys))


async def test_every_period_is_billed_in_exactly_one_month(billing: Billing) -> None:
    """January's and February's exports name disjoint periods, and together every
    period of GetUsageHistory that ended in either month."""
    server = billing.server
    await populate(server, orgs=20)
    server.clock.set(MAR_5)
    january = {(r.org_id, r.period_id) for r in await export(server, "2026-01")}
    february = {(r.org_id, r.period_id) for r in await export(server, "2026-02")}
    assert not january & february
    expected_jan = await history_figures(server, 20, 2026, 1)
    expected_feb = await history_figures(server, 20, 2026, 2)
    assert january == {(org, period) for org, period, _ in expected_jan}
    assert february == {(org, period) for org, period, _ in expected_feb}


# -- close: idempotent, refused before the month has ended ----------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_closing_again_changes_nothing(
    billing: Billing, redis_sync: redis.Redis, backend: str
) -> None:
    """A second close (even after more usage) reports every organization already
    closed and leaves the frozen figures, their keys and the audit trail as they were."""
    server = billing.server
    await populate(server, orgs=10)
    server.clock.set(MAR_5)
    first = await billing.close("2026-02")
    assert first.organizations_closed == 10 - first.organizations_without_period
    frozen = {key: redis_sync.hgetall(key) for key in redis_sync.keys("pm:*:close:2026-02")}
    assert len(frozen) == first.organizations_closed
    audits = {key: redis_sync.xlen(key) for key in redis_sync.keys("pm:*:audit")}
    server.clock.set(MAR_5 + 3_600_000)
    again = await billing.close("2026-02")
    assert again.organizations_closed == 0
    assert again.organizations_already_closed == first.organizations_closed
    assert again.organizations_without_period == first.organizations_without_period
    assert {key: redis_sync.hgetall(key) for key in redis_sync.keys("pm:*:close:2026-02")} == frozen
    assert {key: redis_sync.xlen(key) for key in redis_sync.keys("pm:*:audit")} == audits


async def test_the_close_is_in_the_audit_trail(billing: Billing) -> None:
    """Each organization closed gets one billing.close event with the frozen figures."""
    server = billing.server
    await populate(server, orgs=1)
    server.clock.set(MAR_5)
    await billing.close("2026-02")
    events = await server.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(org_id="org-000"))
    [close] = [e for e in events.events if e.action == "billing.close"]
    assert close.target == "2026-02"
    assert '"month": "2026-02"' in close.after
    assert close.actor == "open-access"


@pytest.mark.parametrize(
    ("now", "billing_month"),
    [
        ("2026-03-05T12:00:00+00:00", "2026-03"),  # in progress
        ("2026-03-05T12:00:00+00:00", "2026-04"),  # not begun
        # February has ended in UTC but not yet at UTC-12 (Baker Island, ...).
        ("2026-03-01T11:59:59.999+00:00", "2026-02"),
    ],
)
async def test_a_month_that_has_not_ended_everywhere_is_refused(
    billing: Billing, redis_sync: redis.Redis, now: str, billing_month: str
) -> None:
    """Close and export of a month not yet ended in every timezone answer
    FAILED_PRECONDITION (BILLING_MONTH_NOT_ENDED) and change nothing."""
    server = billing.server
    await populate(server, orgs=3)
    server.clock.set(ms(now))
    before = {key: redis_sync.dump(key) for key in redis_sync.keys("*")}
    for call in (
        billing.stub.CloseBillingPeriod(B.CloseBillingPeriodRequest(billing_month=billing_month)),
        billing.stub.ExportBillingPeriod(B.ExportBillingPeriodRequest(billing_month=billing_month)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has not ended in every timezone" in (refused.value.details() or "")
    assert {key: redis_sync.dump(key) for key in redis_sync.keys("*")} == before


async def test_the_month_can_be_closed_from_noon_utc_on_the_first(billing: Billing) -> None:
    """February is closable from 2026-03-01T12:00Z, when it has ended at UTC-12."""
    server = billing.server
    await populate(server, orgs=2)
    server.clock.set(ms("2026-03-01T12:00:00+00:00"))
    assert (await billing.close("2026-02")).organizations_closed == 2


async def test_a_month_past_the_usage_retention_is_refused(billing: Billing) -> None:
    """Counters expire --usage-retention-days (400) after their month: a month that
    old can no longer be closed or exported (FAILED_PRECONDITION)."""
    billing.server.clock.set(MAR_5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.close("2025-01")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "usage retention" in (refused.value.details() or "")


@pytest.mark.parametrize(
    "billing_month",
    [
        "",
        "2026-2",
        "2026-13",
        "2026-00",
        "1999-12",
        "2101-01",
        "2026-02-01",
        "2026/02",
        " 2026-02",
        "\uff12\uff10\uff12\uff16-02",
        "x" * 10_000,
    ],
)
async def test_a_malformed_month_is_invalid_argument(
    billing: Billing, redis_sync: redis.Redis, billing_month: str
) -> None:
    """A billing month other than YYYY-MM of 2000-2100 is INVALID_ARGUMENT naming
    billing_month, for close and export alike, and nothing is written."""
    server = billing.server
    await populate(server, orgs=2)
    server.clock.set(MAR_5)
    before = {key: redis_sync.dump(key) for key in redis_sync.keys("*")}
    for call in (
        billing.stub.CloseBillingPeriod(B.CloseBillingPeriodRequest(billing_month=billing_month)),
        billing.stub.ExportBillingPeriod(B.ExportBillingPeriodRequest(billing_month=billing_month)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(refused.value) == ["billing_month"]
    assert {key: redis_sync.dump(key) for key in redis_sync.keys("*")} == before


@pytest.mark.parametrize(
    ("page_size", "page_token"),
    [(-1, ""), (1001, ""), (2**31 - 1, ""), (0, "garbage"), (0, "x" * 5000)],
)
async def test_bad_paging_is_invalid_argument(
    billing: Billing, page_size: int, page_token: str
) -> None:
    """Export page sizes outside 0-1000 and tokens it did not issue are INVALID_ARGUMENT."""
    billing.server.clock.set(MAR_5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.stub.ExportBillingPeriod(
            B.ExportBillingPeriodRequest(
                billing_month="2026-02", page_size=page_size, page_token=page_token
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_page_token_of_another_month_is_refused(billing: Billing) -> None:
    """A token of January's export does not continue February's."""
    server = billing.server
    await populate(server, orgs=3)
    server.clock.set(MAR_5)
    page = await billing.stub.ExportBillingPeriod(
        B.ExportBillingPeriodRequest(billing_month="2026-01", page_size=1)
    )
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.stub.ExportBillingPeriod(
            B.ExportBillingPeriodRequest(
                billing_month="2026-02", page_size=1, page_token=page.next_page_token
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- after the close: corrections and late records are adjustments --------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_corrections_after_close_are_adjustment_rows_and_audited(
    billing: Billing, backend: str
) -> None:
    """After February is closed, a correction (AdjustUsage) and a late record of a
    job completed in February leave the frozen rows as they were, add adjustment
    rows of exactly the change, keep frozen + adjustments == GetUsageHistory, and
    the correction is in the audit trail."""
    server = billing.server
    await populate(server, orgs=12)
    server.clock.set(MAR_5)
    await billing.close("2026-02")
    frozen = [r for r in await export(server, "2026-02")]

    # org-000: calendar months in UTC, pages quota 100, overage not allowed, price 0.028.
    await server.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="org-000",
            metric="pages",
            units=250,
            reason="ticket 42: pages not counted",
            adjustment_id="fix-1",
            year=2026,
            month=2,
        )
    )
    # org-002 (Los Angeles, calendar months): a job completed on Feb 27, recorded now.
    await server.quota.RecordUsage(
        Q.RecordUsageRequest(
            org_id="org-002",
            request_id="late-1",
            units={"pages": 500, "documents": 3},
            completed_at=stamp(ms("2026-02-27T10:00:00-08:00")),
        )
    )
    after = await export(server, "2026-02")
    assert [r for r in after if r.kind == B.BILLING_ROW_KIND_CLOSED] == frozen
    adjustments = [r for r in after if r.kind == B.BILLING_ROW_KIND_ADJUSTMENT]
    assert {(r.org_id, r.metric) for r in adjustments} == {
        ("org-000", "pages"),
        ("org-002", "pages"),
        ("org-002", "documents"),
    }
    fix = next(r for r in adjustments if r.org_id == "org-000")
    assert fix.committed == 250
    # The rest of the quota, then overage (no prepaid is drawn by a correction).
    assert fix.included_units + fix.overage_units == 250 and fix.overage_units > 0
    assert fix.prepaid_units == 0
    assert Decimal(fix.overage_cost) == fix.overage_units * Decimal("0.028")
    assert fix.closed_at.ToMilliseconds() == MAR_5
    assert exported_figures(after) == await history_figures(server, 12, 2026, 2)

    events = await server.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(org_id="org-000"))
    actions = [e.action for e in events.events]
    assert actions[:2] == ["usage.adjust", "billing.close"]
    assert events.events[0].reason == "ticket 42: pages not counted"


async def test_a_correction_that_is_undone_leaves_no_adjustment(billing: Billing) -> None:
    """+10 then -10 pages after the close: the figures are the frozen ones again,
    and the export has no adjustment row."""
    server = billing.server
    await populate(server, orgs=1)
    server.clock.set(MAR_5)
    await billing.close("2026-02")
    for units, adjustment_id in ((10, "a"), (-10, "b")):
        await server.admin.AdjustUsage(
            admin_pb2.AdjustUsageRequest(
                org_id="org-000",
                metric="pages",
                units=units,
                reason="oops",
                adjustment_id=adjustment_id,
                year=2026,
                month=2,
            )
        )
    rows = await export(server, "2026-02")
    assert {r.kind for r in rows} == {B.BILLING_ROW_KIND_CLOSED}


async def test_an_organization_given_a_plan_after_the_close_is_closed_by_the_next_close(
    billing: Billing,
) -> None:
    """Closing again closes only the organizations that were not closed yet."""
    server = billing.server
    await populate(server, orgs=2)
    server.clock.set(MAR_5)
    assert (await billing.close("2026-02")).organizations_closed == 2
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=org_plan(40)))
    again = await billing.close("2026-02")
    assert (again.organizations_closed, again.organizations_already_closed) == (1, 2)
    rows = await export(server, "2026-02")
    # The new organization had no plan in February: no terms, no usage, no rows.
    assert {r.org_id for r in rows} == {"org-000", "org-001"}


# -- access ---------------------------------------------------------------------------------


async def test_only_admin_credentials_close_or_export(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, redis_sync: redis.Redis
) -> None:
    """A service token is PERMISSION_DENIED and no credentials UNAUTHENTICATED, for
    both RPCs, and nothing is written; the admin token is served."""
    creds = Credentials()
    creds.add(Role.ADMIN, "ops", ADMIN_TOKEN)
    creds.add(Role.SERVICE, "workers", SERVICE_TOKEN)
    closed_settings = Settings(
        redis_url=settings.redis_url, listen="127.0.0.1:0", metrics_listen=""
    )
    clock.set(MAR_5)
    async with serving(closed_settings, redis_client, clock, credentials=creds) as server:
        stub = billing_stub(server)
        calls = (
            ("CloseBillingPeriod", B.CloseBillingPeriodRequest(billing_month="2026-02")),
            ("ExportBillingPeriod", B.ExportBillingPeriodRequest(billing_month="2026-02")),
        )
        for rpc, request in calls:
            for token, code in (
                (SERVICE_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
                (None, grpc.StatusCode.UNAUTHENTICATED),
            ):
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await getattr(stub, rpc)(request, metadata=metadata)
                assert refused.value.code() == code
            await getattr(stub, rpc)(
                request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)
            )
    assert redis_sync.keys("*") == []
