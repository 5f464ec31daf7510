"""Seed parity: each seed usage page's response rebuilt from pagemeter's RPC answers.

For every public usage page pagemeter was shaped from (DocuTray, Docstron,
DocuRift, Eagle Doc, DataExtractorAI) these tests set up a plan, record usage
through QuotaService exactly as an upstream processor would, and then rebuild the
page's JSON response (same field names) from the answers of GetUsage and the
ReportingService reads only. docs/seed-parity.md maps every field of every page.

Where a page prints an example, the test reproduces that example with the
page's own dates and figures (the test clock is moved to them).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from tests.conftest import RunningServer, metric_limits, ms

_ids = itertools.count(1)


# -- helpers ------------------------------------------------------------------------------


def stamp(text: str) -> Timestamp:
    """A protobuf Timestamp of an ISO 8601 instant with offset (millisecond precision)."""
    instant = ms(text)
    return Timestamp(seconds=instant // 1000, nanos=(instant % 1000) * 1_000_000)


def iso(value: Timestamp) -> str:
    return value.ToJsonString()


async def set_plan(server: RunningServer, **fields: Any) -> plan_pb2.Plan:
    fields.setdefault("org_id", "acme")
    reply = await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan_pb2.Plan(**fields)))
    return reply.plan


def record_request(
    completed: str | None = None,
    *,
    org_id: str = "acme",
    request_id: str = "",
    requested: str | None = None,
    document_type: str = "",
    success: bool = True,
    **units: int,
) -> quota_pb2.RecordUsageRequest:
    """RecordUsage's request as an upstream processor sends it after a job."""
    request = quota_pb2.RecordUsageRequest(
        org_id=org_id,
        request_id=request_id or f"job-{next(_ids)}",
        units=units,
        success=success,
        document_type=document_type,
    )
    if completed is not None:
        request.completed_at.CopyFrom(stamp(completed))
    if requested is not None:
        request.requested_at.CopyFrom(stamp(requested))
    return request


async def record(
    server: RunningServer, completed: str | None = None, **fields: Any
) -> quota_pb2.RecordUsageResponse:
    """RecordUsage as an upstream processor sends it after a job (see record_request)."""
    reply: quota_pb2.RecordUsageResponse = await server.quota.RecordUsage(
        record_request(completed, **fields)
    )
    return reply


async def check(
    server: RunningServer,
    *,
    org_id: str = "acme",
    request_id: str = "",
    hold: bool = False,
    **units: int,
) -> quota_pb2.CheckQuotaResponse:
    reply: quota_pb2.CheckQuotaResponse = await server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id=org_id, units=units, request_id=request_id, hold=hold)
    )
    return reply


async def get_usage(
    server: RunningServer,
    org_id: str = "acme",
    year: int | None = None,
    month: int | None = None,
) -> quota_pb2.GetUsageResponse:
    """GetUsage; year and month are set on the request only when given."""
    request = quota_pb2.GetUsageRequest(org_id=org_id)
    if year is not None:
        request.year = year
    if month is not None:
        request.month = month
    reply: quota_pb2.GetUsageResponse = await server.quota.GetUsage(request)
    return reply


def metric_of(usage: quota_pb2.GetUsageResponse, name: str) -> quota_pb2.MetricUsage:
    """One metric of a GetUsage answer; an all-zero entry when the org has none."""
    for metric in usage.metrics:
        if metric.metric == name:
            return metric
    return quota_pb2.MetricUsage(metric=name)


def money(text: str) -> Decimal:
    """pagemeter's decimal strings as exact numbers for the JSON a page prints."""
    return Decimal(text or "0")


def snapshot(client: redis.Redis) -> dict[str, object]:
    """Every key and value in Redis, to prove a read changed nothing."""
    dump: dict[str, object] = {}
    for key in map(str, client.keys("*")):
        kind = client.type(key)
        if kind == "hash":
            dump[key] = client.hgetall(key)
        elif kind == "zset":
            dump[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            dump[key] = client.lrange(key, 0, -1)
        elif kind == "set":
            dump[key] = sorted(client.smembers(key))
        elif kind == "stream":
            dump[key] = client.xrange(key)
        else:
            dump[key] = client.get(key)
    return dump


def error_details(error: grpc.aio.AioRpcError) -> tuple[list[str], str]:
    """The BadRequest field names and the ErrorInfo reason ('' without one) of an error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    fields: list[str] = []
    reason = ""
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(bad_request):
            fields.extend(v.field for v in bad_request.field_violations)
        elif detail.Unpack(info):
            reason = info.reason
    return fields, reason


# -- DocuTray GET /api/usage ----------------------------------------------------------------


def docutray_page(usage: quota_pb2.GetUsageResponse) -> dict[str, Any]:
    """DocuTray's 200 body: successful pages and conversions (documents metric) of one month."""
    return {
        "year": usage.year,
        "month": usage.month,
        "successful_pages": metric_of(usage, "pages").committed,
        "successful_conversions": metric_of(usage, "documents").committed,
    }


async def docutray_setup(server: RunningServer) -> None:
    """Page example month (April 2026): 80 conversions and 9 identifications, 1234 pages."""
    server.clock.set(ms("2026-04-20T12:00:00+00:00"))
    # No timezone in the plan: the service's configured default (UTC) is used.
    await set_plan(
        server,
        name="Pro",
        metrics=[
            metric_limits("pages", contract_quota=5000, overage_allowed=True),
            metric_limits("documents", contract_quota=100, overage_allowed=False),
        ],
    )
    jobs = []
    for i in range(89):
        kind = "conversion" if i < 80 else "identification"
        pages = 14 if i < 88 else 2  # 88 x 14 + 2 = 1234
        day = 1 + i % 19
        jobs.append(
            record_request(
                f"2026-04-{day:02d}T09:00:00+00:00", document_type=kind, pages=pages, documents=1
            )
        )
    # Failed work is not successful usage.
    for _ in range(3):
        jobs.append(
            record_request("2026-04-10T10:00:00+00:00", success=False, pages=30, documents=1)
        )
    # March's usage stays in March.
    jobs.append(record_request("2026-03-31T23:59:59+00:00", pages=40, documents=1))
    # One batch: the same rules per item as 93 calls, at a fraction of a test's time.
    batch = await server.quota.RecordUsageBatch(quota_pb2.RecordUsageBatchRequest(items=jobs))
    assert [item.WhichOneof("result") for item in batch.items] == ["response"] * len(jobs)


async def test_docutray_month_counts_reproduce_the_page_example(
    pagemeter_server: RunningServer,
) -> None:
    """GetUsage answers DocuTray's body for the current month (year and month omitted or given), counting only successful pages and conversions of that month in the configured timezone."""
    await docutray_setup(pagemeter_server)
    example = {"year": 2026, "month": 4, "successful_pages": 1234, "successful_conversions": 89}
    current = await get_usage(pagemeter_server)
    assert current.timezone == "UTC"  # the service default, as the plan named none
    assert docutray_page(current) == example
    assert docutray_page(await get_usage(pagemeter_server, year=2026, month=4)) == example
    assert docutray_page(await get_usage(pagemeter_server, year=2026, month=3)) == {
        "year": 2026,
        "month": 3,
        "successful_pages": 40,
        "successful_conversions": 1,
    }
    assert current.jobs.failed == 3  # counted as failed, consumed nothing


async def test_docutray_months_without_usage_read_as_zeros(
    pagemeter_server: RunningServer,
) -> None:
    """A month with no usage, and an organization with no plan and no usage, both answer zeros for both counters."""
    await docutray_setup(pagemeter_server)
    assert docutray_page(await get_usage(pagemeter_server, year=2026, month=1)) == {
        "year": 2026,
        "month": 1,
        "successful_pages": 0,
        "successful_conversions": 0,
    }
    assert docutray_page(await get_usage(pagemeter_server, org_id="newcomer")) == {
        "year": 2026,
        "month": 4,
        "successful_pages": 0,
        "successful_conversions": 0,
    }


@pytest.mark.parametrize(
    ("year_month", "field", "message"),
    [
        (
            {"year": 2026, "month": 13},
            "month",
            "Invalid month. Must be an integer between 1 and 12.",
        ),
        (
            {"year": 2026, "month": 0},
            "month",
            "Invalid month. Must be an integer between 1 and 12.",
        ),
        (
            {"year": 2019, "month": 5},
            "year",
            "Invalid year. Must be an integer between 2020 and 2100.",
        ),
        (
            {"year": 2101, "month": 1},
            "year",
            "Invalid year. Must be an integer between 2020 and 2100.",
        ),
        (
            {"year": 2026},
            "year",
            "year and month must be sent together (or both omitted for the current month)",
        ),
        (
            {"month": 4},
            "month",
            "year and month must be sent together (or both omitted for the current month)",
        ),
    ],
)
async def test_docutray_year_month_validation_uses_the_page_wording(
    pagemeter_server: RunningServer,
    redis_sync: redis.Redis,
    year_month: dict[str, int],
    field: str,
    message: str,
) -> None:
    """A bad or unpaired year/month is INVALID_ARGUMENT whose message is DocuTray's error text, naming the field, and changes nothing."""
    await docutray_setup(pagemeter_server)
    before = snapshot(redis_sync)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_usage(
            pagemeter_server, year=year_month.get("year"), month=year_month.get("month")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # DocuTray's 400 body is {"error": <message>}.
    assert {"error": caught.value.details()} == {"error": message}
    assert error_details(caught.value)[0] == [field]
    assert snapshot(redis_sync) == before


async def test_docutray_bounds_of_the_year_and_month_ranges_are_accepted(
    pagemeter_server: RunningServer,
) -> None:
    """Year 2020 with month 1 and year 2100 with month 12 are valid requests answered with zeros."""
    for year, month in [(2020, 1), (2100, 12)]:
        usage = await get_usage(pagemeter_server, year=year, month=month)
        assert docutray_page(usage) == {
            "year": year,
            "month": month,
            "successful_pages": 0,
            "successful_conversions": 0,
        }


async def test_docutray_read_is_never_blocked_and_never_counted(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """While the organization is rate limited and out of conversions, GetUsage still answers and leaves every key in Redis unchanged."""
    await docutray_setup(pagemeter_server)
    await set_plan(
        pagemeter_server,
        name="Pro",
        api_rate_limit=1,
        metrics=[
            metric_limits("pages", contract_quota=5000, overage_allowed=True),
            metric_limits("documents", contract_quota=89, overage_allowed=False),
        ],
    )
    out_of_quota = await check(pagemeter_server, pages=1, documents=1)
    assert out_of_quota.reason == quota_pb2.DECISION_REASON_QUOTA_EXCEEDED  # the "402" state
    limited = await check(pagemeter_server, pages=1, documents=1)
    assert limited.reason == quota_pb2.DECISION_REASON_RATE_LIMITED  # the "429" state
    before = snapshot(redis_sync)
    for _ in range(25):
        usage = await get_usage(pagemeter_server)
        assert docutray_page(usage)["successful_conversions"] == 89
    await get_usage(pagemeter_server, year=2026, month=3)
    assert snapshot(redis_sync) == before


# -- Docstron GET /v1/usage -----------------------------------------------------------------


def docstron_limit_block(metric: quota_pb2.MetricUsage) -> dict[str, Any]:
    """{total, limit, usage_percentage} of a lifetime gauge; the limit is the gauge's cap."""
    limit = metric.contract_quota if metric.HasField("contract_quota") else metric.hard_limit
    return {
        "total": metric.committed,
        "limit": limit,
        "usage_percentage": round(metric.usage_percent, 1),
    }


def docstron_page(usage: quota_pb2.GetUsageResponse) -> dict[str, Any]:
    """Docstron's body. The success/message envelope is the customer-facing API's own."""
    documents = metric_of(usage, "documents")
    subscription = usage.subscription
    return {
        "success": True,
        "message": "Usage statistics retrieved successfully",
        "data": {
            "applications": docstron_limit_block(metric_of(usage, "applications")),
            "templates": docstron_limit_block(metric_of(usage, "templates")),
            "documents": {
                "total": documents.lifetime_committed,
                "monthly": documents.committed,
                # What counts against the monthly limit right now: committed plus in-flight holds.
                "usage": documents.committed + documents.held,
                "monthly_limit": documents.contract_quota,
                "usage_percentage": round(documents.usage_percent, 1),
            },
            "subscription": {
                "plan_name": subscription.plan_name,
                "api_rate_limit": subscription.api_rate_limit,
                "processing_priority": subscription.processing_priority,
                "support_level": subscription.support_level,
            },
        },
    }


def docstron_plan_fields() -> dict[str, Any]:
    return {
        "name": "Trial",
        "timezone": "UTC",
        "api_rate_limit": 2,
        "processing_priority": "standard",
        "support_level": "email",
        "metrics": [
            metric_limits("applications", period=plan_pb2.PERIOD_NONE, hard_limit=1),
            metric_limits("templates", period=plan_pb2.PERIOD_NONE, hard_limit=2),
            metric_limits("documents", contract_quota=50, overage_allowed=False),
        ],
    }


async def test_docstron_page_example_from_gauges_documents_and_plan(
    pagemeter_server: RunningServer,
) -> None:
    """Docstron's example body comes back exactly: gauges raised and lowered by RecordUsage and capped by CheckQuota, documents total/monthly/usage/limit/percentage, and the subscription block."""
    server = pagemeter_server
    clock = server.clock
    await set_plan(server, **docstron_plan_fields())

    # Applications: create one; a second is refused by the cap.
    assert (await check(server, applications=1)).allowed
    await record(server, applications=1)
    clock.advance(1)  # the plan allows 2 CheckQuota calls per second
    second_app = await check(server, applications=1)
    assert second_app.reason == quota_pb2.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert second_app.metrics[0].period_id == "lifetime"

    # Templates: create two, delete one (negative units), create another.
    for _ in range(2):
        clock.advance(1)
        assert (await check(server, templates=1)).allowed
        await record(server, templates=1)
    clock.advance(1)
    assert (await check(server, templates=1)).reason == (
        quota_pb2.DECISION_REASON_HARD_LIMIT_EXCEEDED
    )
    lowered = await record(server, templates=-1)
    assert lowered.metrics[0].committed == 1
    clock.advance(1)
    assert (await check(server, templates=1)).allowed
    await record(server, templates=1)

    # Documents: 7 generated this month, 2 being generated now (held).
    for day in range(1, 8):
        await record(server, f"2026-03-{day:02d}T10:00:00+00:00", documents=1)
    for job in ("gen-8", "gen-9"):
        clock.advance(1)
        assert (await check(server, request_id=job, hold=True, documents=1)).held

    page = docstron_page(await get_usage(server))
    assert page == {
        "success": True,
        "message": "Usage statistics retrieved successfully",
        "data": {
            "applications": {"total": 1, "limit": 1, "usage_percentage": 100.0},
            "templates": {"total": 2, "limit": 2, "usage_percentage": 100.0},
            "documents": {
                "total": 7,
                "monthly": 7,
                "usage": 9,
                "monthly_limit": 50,
                "usage_percentage": 14.0,
            },
            "subscription": {
                "plan_name": "Trial",
                "api_rate_limit": 2,
                "processing_priority": "standard",
                "support_level": "email",
            },
        },
    }

    # A document from last month adds to the lifetime total, not to this month.
    await record(server, "2026-02-27T10:00:00+00:00", documents=1)
    documents = docstron_page(await get_usage(server))["data"]["documents"]
    assert (documents["total"], documents["monthly"]) == (8, 7)


async def test_docstron_gauges_never_go_below_zero_and_are_not_monthly(
    pagemeter_server: RunningServer,
) -> None:
    """A lifetime gauge keeps its value across a month end, floors at zero when lowered too far, and refuses negative units on a monthly metric."""
    server = pagemeter_server
    await set_plan(server, **docstron_plan_fields())
    await record(server, templates=2)
    server.clock.set(ms("2026-04-02T12:00:00+00:00"))
    april = await get_usage(server)
    assert docstron_limit_block(metric_of(april, "templates")) == {
        "total": 2,
        "limit": 2,
        "usage_percentage": 100.0,
    }
    assert (await record(server, templates=-5)).metrics[0].committed == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(server, documents=-1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_docstron_gauge_changes_are_not_counted_as_documents(
    pagemeter_server: RunningServer,
) -> None:
    """Creating and deleting templates leaves the month's job counts, per-job averages and statistics documents unchanged."""
    server = pagemeter_server
    await set_plan(server, **docstron_plan_fields())
    await record(server, "2026-03-10T10:00:00+00:00", documents=1)
    await record(server, "2026-03-10T11:00:00+00:00", templates=1)
    await record(server, "2026-03-10T12:00:00+00:00", templates=-1)
    usage = await get_usage(server)
    stats = await server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme", start_date="2026-03-10", end_date="2026-03-10"
        )
    )
    assert (
        usage.jobs.succeeded,
        metric_of(usage, "documents").average_per_job,
        stats.summary.totals.documents,
    ) == (1, 1.0, 1)


# -- DocuRift GET /v1/credits/usage ---------------------------------------------------------

# (day of January 2024, document type, credits = pages) per job: the page's example, 45
# documents and 127 credits, with its three newest days exactly as printed.
DOCURIFT_JOBS: list[tuple[int, str, int]] = [
    *[(26, "general", 3)] * 4,
    *[(25, "packing_list", c) for c in (3, 3, 2)],
    *[(24, "bill_of_lading", 3)] * 5,
    *[(day, "packing_list", c) for day, c in ((2, 4), (3, 3), (4, 3))],
    *[(day, "bill_of_lading", c) for day, c in ((5, 4), (6, 4), (7, 3), (8, 3), (9, 3))],
    *[(10 + i % 14, "invoice", 3 if i < 15 else 2) for i in range(25)],
]


def docurift_totals(totals: reporting_pb2.UsageTotals) -> dict[str, int]:
    return {"credits": totals.credits, "pages": totals.pages, "documents": totals.documents}


def docurift_page(reply: reporting_pb2.GetUsageStatisticsResponse) -> dict[str, Any]:
    """DocuRift's body rebuilt from GetUsageStatistics."""
    summary = reply.summary
    return {
        "success": True,
        "data": {
            "summary": {
                "totalCredits": summary.totals.credits,
                "totalPages": summary.totals.pages,
                "totalDocuments": summary.totals.documents,
                "averagePerDocument": summary.average_pages_per_document,
                "period": {"start": iso(summary.period_start), "end": iso(summary.period_end)},
            },
            "byPeriod": [
                {"date": row.date, **docurift_totals(row.totals)} for row in reply.by_period
            ],
            "byDocumentType": {
                t.document_type: {**docurift_totals(t.totals), "percentage": t.percentage}
                for t in reply.by_document_type
            },
        },
    }


async def docurift_setup(server: RunningServer) -> None:
    """Credits are prepaid (they never expire); pages are unlimited; January 2024 as on the page."""
    server.clock.set(ms("2024-01-26T18:00:00+00:00"))
    await set_plan(
        server,
        name="Credits",
        timezone="UTC",
        metrics=[
            metric_limits("credits", contract_quota=0, overage_allowed=False),
            metric_limits("pages", overage_allowed=True),
        ],
    )
    granted = await server.admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(org_id="acme", metric="credits", units=500, grant_id="buy-1")
    )
    assert granted.balance == 500
    for day, document_type, credits in DOCURIFT_JOBS:
        await record(
            server,
            f"2024-01-{day:02d}T10:00:00+00:00",
            document_type=document_type,
            credits=credits,
            pages=credits,
        )


async def test_docurift_page_example_daily_grouped_by_both(
    pagemeter_server: RunningServer,
) -> None:
    """GetUsageStatistics gives DocuRift's example: summary 127/127/45 and 2.8, the period bounds, the newest daily rows, and the document types with 51.2/25.2/14.2/9.4 %."""
    await docurift_setup(pagemeter_server)
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_DAILY,
            start_date="2024-01-01",
            end_date="2024-01-26",
            group_by=reporting_pb2.STATISTICS_GROUPING_BOTH,
        )
    )
    page = docurift_page(reply)["data"]
    assert page["summary"] == {
        "totalCredits": 127,
        "totalPages": 127,
        "totalDocuments": 45,
        "averagePerDocument": 2.8,
        "period": {"start": "2024-01-01T00:00:00Z", "end": "2024-01-26T23:59:59Z"},
    }
    assert page["byPeriod"][:3] == [
        {"date": "2024-01-26", "credits": 12, "pages": 12, "documents": 4},
        {"date": "2024-01-25", "credits": 8, "pages": 8, "documents": 3},
        {"date": "2024-01-24", "credits": 15, "pages": 15, "documents": 5},
    ]
    assert len(page["byPeriod"]) == 26  # every day of the range, days without usage as zeros
    assert page["byPeriod"][-1] == {"date": "2024-01-01", "credits": 0, "pages": 0, "documents": 0}
    assert page["byDocumentType"] == {
        "invoice": {"credits": 65, "pages": 65, "documents": 25, "percentage": 51.2},
        "bill_of_lading": {"credits": 32, "pages": 32, "documents": 10, "percentage": 25.2},
        "packing_list": {"credits": 18, "pages": 18, "documents": 6, "percentage": 14.2},
        "general": {"credits": 12, "pages": 12, "documents": 4, "percentage": 9.4},
    }
    assert list(page["byDocumentType"]) == ["invoice", "bill_of_lading", "packing_list", "general"]
    # Credits never expire: what is left of the 500 bought is the prepaid balance.
    assert metric_of(await get_usage(pagemeter_server), "credits").prepaid_balance == 500 - 127


async def test_docurift_weekly_monthly_grouping_and_defaults(
    pagemeter_server: RunningServer,
) -> None:
    """Weekly rows start on Monday, monthly rows are YYYY-MM, groupBy documentType drops byPeriod, and the default range is the last 30 days to today, grouped by date, monthly."""
    await docurift_setup(pagemeter_server)
    reporting = pagemeter_server.reporting
    weekly = await reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_WEEKLY,
            start_date="2024-01-01",
            end_date="2024-01-26",
        )
    )
    by_monday: Counter[str] = Counter()
    for day, _, credits in DOCURIFT_JOBS:
        monday = date(2024, 1, day) - timedelta(days=date(2024, 1, day).weekday())
        by_monday[monday.isoformat()] += credits
    assert [(row["date"], row["credits"]) for row in docurift_page(weekly)["data"]["byPeriod"]] == [
        ("2024-01-22", by_monday["2024-01-22"]),
        ("2024-01-15", by_monday["2024-01-15"]),
        ("2024-01-08", by_monday["2024-01-08"]),
        ("2024-01-01", by_monday["2024-01-01"]),
    ]
    assert docurift_page(weekly)["data"]["byDocumentType"] == {}  # groupBy=date (the default)

    monthly = await reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_MONTHLY,
            start_date="2023-12-01",
            end_date="2024-01-26",
        )
    )
    assert [(row.date, row.totals.credits) for row in monthly.by_period] == [
        ("2024-01", 127),
        ("2023-12", 0),
    ]

    by_type = await reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme", group_by=reporting_pb2.STATISTICS_GROUPING_DOCUMENT_TYPE
        )
    )
    page = docurift_page(by_type)["data"]
    assert page["byPeriod"] == []
    assert {t: v["percentage"] for t, v in page["byDocumentType"].items()} == {
        "invoice": 51.2,
        "bill_of_lading": 25.2,
        "packing_list": 14.2,
        "general": 9.4,
    }
    # Defaults: 30 days ago to today (2024-01-26), monthly rows.
    assert (by_type.summary.start_date, by_type.summary.end_date) == ("2023-12-27", "2024-01-26")
    assert by_type.period == reporting_pb2.STATISTICS_PERIOD_MONTHLY
    assert page["summary"]["period"] == {
        "start": "2023-12-27T00:00:00Z",
        "end": "2024-01-26T23:59:59Z",
    }


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"period": 4}, "INVALID_PARAMETER"),
        ({"group_by": 4}, "INVALID_PARAMETER"),
        ({"start_date": "26/01/2024"}, "INVALID_DATE_FORMAT"),
        ({"start_date": "2024-01-26", "end_date": "2024-01-19"}, "INVALID_DATE_RANGE"),
        ({"start_date": "2023-01-01", "end_date": "2024-01-26"}, "DATE_RANGE_TOO_LARGE"),
    ],
)
async def test_docurift_error_codes(
    pagemeter_server: RunningServer, fields: dict[str, object], code: str
) -> None:
    """Each of DocuRift's parameter errors is INVALID_ARGUMENT carrying the page's code as the ErrorInfo reason, enough to build its error body."""
    await docurift_setup(pagemeter_server)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.reporting.GetUsageStatistics(
            reporting_pb2.GetUsageStatisticsRequest(org_id="acme", **fields)  # type: ignore[arg-type]
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = {"code": error_details(caught.value)[1], "message": caught.value.details() or ""}
    body = {"success": False, "error": error}
    assert body == {"success": False, "error": {"code": code, "message": error["message"]}}
    assert error["message"]


# -- Eagle Doc usage APIs -------------------------------------------------------------------


def eagle_current_month(usage: quota_pb2.GetUsageResponse) -> dict[str, Any]:
    """Eagle Doc's current-month body from GetUsage's pages metric."""
    pages = metric_of(usage, "pages")
    return {
        "currentMonth": usage.period_id,
        "contractQuota": pages.contract_quota,
        "quotaUsed": pages.committed,
        "overUsageAllowed": pages.overage_allowed,
        "hardLimit": pages.hard_limit if pages.HasField("hard_limit") else None,
        "overUsage": pages.overage_units,
        "pricePerPageOverUsage": money(pages.overage_price_per_unit),
        "overUsageCost": money(pages.overage_cost),
    }


def eagle_history(reply: reporting_pb2.GetUsageHistoryResponse) -> list[dict[str, Any]]:
    """Eagle Doc's monthly history: each month's pages and the terms it had then."""
    rows = []
    for month in reply.months:
        pages = next((m for m in month.metrics if m.metric == "pages"), None)
        info: dict[str, Any] = {}
        if pages is not None and pages.HasField("terms"):
            info = {
                "PricePerPageOverUsage": money(pages.terms.overage_price_per_unit),
                "ContractQuota": pages.terms.contract_quota,
                "PricePerPage": money(pages.terms.price_per_unit),
            }
        rows.append(
            {
                "quotaUsed": pages.committed if pages is not None else 0,
                "quotaDate": month.period_id,
                "additionalInfo": info,
            }
        )
    return rows


def eagle_request_log(reply: reporting_pb2.ListUsageRecordsResponse) -> list[dict[str, Any]]:
    """Eagle Doc's request log: processed requests (those with a completion time), newest first."""
    return [
        {
            "pages": sum(m.units for m in r.metrics if m.metric == "pages"),
            "time": iso(r.completed_at),
            "timeRequested": iso(r.requested_at),
        }
        for r in reply.records
        if r.HasField("completed_at")
    ]


def eagle_management(usage: quota_pb2.GetUsageResponse) -> dict[str, Any]:
    pages = metric_of(usage, "pages")
    return {
        "quota": pages.contract_quota if pages.HasField("contract_quota") else None,
        "quotaUsed": pages.committed,
        "currentMonth": usage.period_id,
    }


def eagle_pages(**limits: Any) -> list[plan_pb2.MetricLimits]:
    return [metric_limits("pages", **limits)]


async def test_eagle_current_month_example_and_formulas(pagemeter_server: RunningServer) -> None:
    """GetUsage gives Eagle Doc's example body, then overUsage = quotaUsed - contractQuota and overUsageCost = overUsage x 0.028 after overage, and concurrent admitted checks never take quotaUsed past the hard limit."""
    server = pagemeter_server
    server.clock.set(ms("2025-03-12T12:00:00+00:00"))
    await set_plan(
        server,
        name="Business",
        timezone="UTC",
        metrics=eagle_pages(contract_quota=2000, overage_allowed=True, price_per_unit="0.03"),
    )
    await record(server, "2025-03-03T10:00:00+00:00", pages=25)
    assert eagle_current_month(await get_usage(server)) == {
        "currentMonth": "2025-03",
        "contractQuota": 2000,
        "quotaUsed": 25,
        "overUsageAllowed": True,
        "hardLimit": None,
        "overUsage": 0,
        "pricePerPageOverUsage": Decimal("0.0"),
        "overUsageCost": Decimal("0.0"),
    }

    await set_plan(
        server,
        name="Business",
        timezone="UTC",
        metrics=eagle_pages(
            contract_quota=2000,
            overage_allowed=True,
            hard_limit=2500,
            price_per_unit="0.03",
            overage_price_per_unit="0.028",
        ),
    )
    await record(server, "2025-03-10T10:00:00+00:00", pages=2075)
    page = eagle_current_month(await get_usage(server))
    assert page == {
        "currentMonth": "2025-03",
        "contractQuota": 2000,
        "quotaUsed": 2100,
        "overUsageAllowed": True,
        "hardLimit": 2500,
        "overUsage": 100,
        "pricePerPageOverUsage": Decimal("0.028"),
        "overUsageCost": Decimal("2.8"),
    }
    assert page["overUsage"] == page["quotaUsed"] - page["contractQuota"]
    assert page["overUsageCost"] == page["overUsage"] * page["pricePerPageOverUsage"]

    # 30 jobs of 100 pages race for the 400 pages left under the hard limit.
    decisions = await asyncio.gather(
        *(check(server, request_id=f"race-{i}", hold=True, pages=100) for i in range(30))
    )
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 4
    assert {d.reason for d in decisions if not d.allowed} == {
        quota_pb2.DECISION_REASON_HARD_LIMIT_EXCEEDED
    }
    for decision in admitted:
        await record(server, request_id=decision.request_id, pages=100)
    page = eagle_current_month(await get_usage(server))
    assert (page["quotaUsed"], page["overUsage"], page["overUsageCost"]) == (
        2500,
        500,
        Decimal("14"),
    )
    assert page["quotaUsed"] <= page["hardLimit"]
    last = await check(server, pages=1)
    assert last.reason == quota_pb2.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert last.metrics[0].max_admissible == 0


async def test_eagle_without_overage_quota_used_stays_within_the_contract(
    pagemeter_server: RunningServer,
) -> None:
    """With overUsageAllowed false, checks past the contract quota are denied, so quotaUsed stops at contractQuota and overUsage stays 0."""
    server = pagemeter_server
    await set_plan(
        server,
        timezone="UTC",
        metrics=eagle_pages(contract_quota=2000, overage_price_per_unit="0.028"),
    )
    for request_id in ("a", "b", "c"):
        decision = await check(server, request_id=request_id, hold=True, pages=900)
        if decision.allowed:
            await record(server, request_id=request_id, pages=900)
        else:
            assert decision.reason == quota_pb2.DECISION_REASON_QUOTA_EXCEEDED
            assert decision.metrics[0].max_admissible == 200
    page = eagle_current_month(await get_usage(server))
    assert (page["quotaUsed"], page["overUsageAllowed"], page["overUsage"]) == (1800, False, 0)
    assert page["overUsageCost"] == 0


async def test_eagle_monthly_history_keeps_each_months_terms(
    pagemeter_server: RunningServer,
) -> None:
    """GetUsageHistory gives Eagle Doc's history rows with each month's ContractQuota and prices as they were, empty additionalInfo before any plan."""
    server = pagemeter_server
    clock = server.clock
    # January 2025: usage before any plan existed.
    clock.set(ms("2025-01-20T12:00:00+00:00"))
    await record(server, "2025-01-15T10:00:00+00:00", pages=282)
    # February: the first contract.
    clock.set(ms("2025-02-01T00:00:00+00:00"))
    await set_plan(
        server,
        name="Starter",
        timezone="UTC",
        metrics=eagle_pages(
            contract_quota=200,
            overage_allowed=True,
            price_per_unit="0.035",
            overage_price_per_unit="0.032",
        ),
    )
    clock.set(ms("2025-02-20T12:00:00+00:00"))
    await record(server, "2025-02-20T10:00:00+00:00", pages=265)
    # March: a new contract; the page's example row.
    clock.set(ms("2025-03-01T00:00:00+00:00"))
    await set_plan(
        server,
        name="Business",
        timezone="UTC",
        metrics=eagle_pages(
            contract_quota=10000,
            overage_allowed=True,
            price_per_unit="0.03",
            overage_price_per_unit="0.028",
        ),
    )
    clock.set(ms("2025-03-10T12:00:00+00:00"))
    await record(server, "2025-03-10T10:00:00+00:00", pages=25)

    reply = await server.reporting.GetUsageHistory(
        reporting_pb2.GetUsageHistoryRequest(org_id="acme", months=4)
    )
    assert eagle_history(reply) == [
        {
            "quotaUsed": 25,
            "quotaDate": "2025-03",
            "additionalInfo": {
                "PricePerPageOverUsage": Decimal("0.028"),
                "ContractQuota": 10000,
                "PricePerPage": Decimal("0.03"),
            },
        },
        {
            "quotaUsed": 265,
            "quotaDate": "2025-02",
            "additionalInfo": {
                "PricePerPageOverUsage": Decimal("0.032"),
                "ContractQuota": 200,
                "PricePerPage": Decimal("0.035"),
            },
        },
        {"quotaUsed": 282, "quotaDate": "2025-01", "additionalInfo": {}},
        {"quotaUsed": 0, "quotaDate": "2024-12", "additionalInfo": {}},
    ]
    february = reply.months[1].metrics[0]
    assert (february.overage_units, february.overage_cost) == (65, "2.08")  # 65 x 0.032


async def test_eagle_request_logs_and_management_view(pagemeter_server: RunningServer) -> None:
    """ListUsageRecords gives Eagle Doc's request log (pages, time processed, time requested, to the millisecond, newest first) and GetUsage its management view with a fixed quota."""
    server = pagemeter_server
    clock = server.clock
    clock.set(ms("2025-02-01T00:00:00+00:00"))
    await set_plan(
        server, timezone="UTC", metrics=eagle_pages(contract_quota=100, overage_allowed=False)
    )
    # Jobs recorded after processing, with both times sent by the processor.
    clock.set(ms("2025-02-28T10:00:00+00:00"))
    await record(
        server,
        "2025-02-28T09:54:07.883+00:00",
        requested="2025-02-28T09:53:59.396+00:00",
        pages=1,
    )
    await record(
        server,
        "2025-02-28T09:59:16.621+00:00",
        requested="2025-02-28T09:59:08.292+00:00",
        pages=1,
    )
    # The newest job is held at reception and recorded when processed: no times are sent.
    clock.set(ms("2025-02-28T10:00:52.129+00:00"))
    assert (await check(server, request_id="doc-3", hold=True, pages=6)).held
    clock.set(ms("2025-02-28T10:01:11.333+00:00"))
    await record(server, request_id="doc-3", pages=6)
    # A job still held has not been processed and is not in the log.
    assert (await check(server, request_id="doc-4", hold=True, pages=2)).held

    log = eagle_request_log(
        await server.reporting.ListUsageRecords(
            reporting_pb2.ListUsageRecordsRequest(org_id="acme")
        )
    )
    assert log == [
        {
            "pages": 6,
            "time": "2025-02-28T10:01:11.333Z",
            "timeRequested": "2025-02-28T10:00:52.129Z",
        },
        {
            "pages": 1,
            "time": "2025-02-28T09:59:16.621Z",
            "timeRequested": "2025-02-28T09:59:08.292Z",
        },
        {
            "pages": 1,
            "time": "2025-02-28T09:54:07.883Z",
            "timeRequested": "2025-02-28T09:53:59.396Z",
        },
    ]

    # Management view in March: the page's example, a fixed quota of 100.
    clock.set(ms("2025-03-05T12:00:00+00:00"))
    await record(server, "2025-03-05T10:00:00+00:00", pages=7)
    assert eagle_management(await get_usage(server)) == {
        "quota": 100,
        "quotaUsed": 7,
        "currentMonth": "2025-03",
    }
    refused = await check(server, pages=94)
    assert refused.reason == quota_pb2.DECISION_REASON_QUOTA_EXCEEDED
    assert refused.metrics[0].max_admissible == 93


# -- DataExtractorAI GET /usage -------------------------------------------------------------

_STATUS = {
    reporting_pb2.USAGE_RECORD_STATUS_PENDING: "pending",
    reporting_pb2.USAGE_RECORD_STATUS_COMPLETED: "completed",
    reporting_pb2.USAGE_RECORD_STATUS_FAILED: "failed",
}


def credits_type(record: reporting_pb2.UsageRecord) -> str | None:
    """'credits' (purchased) when any prepaid credits paid, 'subscription' when only the contract did."""
    if reporting_pb2.PAYMENT_POOL_PREPAID in record.paid_from:
        return "credits"
    if reporting_pb2.PAYMENT_POOL_CONTRACT in record.paid_from:
        return "subscription"
    return None  # nothing consumed (a failed job)


def extraction_month(
    jobs: quota_pb2.JobCounts, credits_committed: int, average: float
) -> dict[str, Any]:
    return {
        "total_extractions": jobs.total,
        "successful_extractions": jobs.succeeded,
        "failed_extractions": jobs.failed,
        "credits_consumed": credits_committed,
        "average_credits_per_extraction": average,
    }


def dataextractor_page(
    usage: quota_pb2.GetUsageResponse, records: reporting_pb2.ListUsageRecordsResponse
) -> dict[str, Any]:
    """DataExtractorAI's body, minus the account and request fields pagemeter does not keep."""
    credits = metric_of(usage, "credits")
    previous = usage.previous_month
    previous_credits = next(
        (m for m in previous.metrics if m.metric == "credits"), quota_pb2.MetricTotal()
    )
    transactions = []
    for r in records.records:
        if r.status not in _STATUS:
            continue  # released or expired holds: no extraction happened
        transaction: dict[str, Any] = {
            "request_id": r.request_id,
            "credits_consumed": (
                sum(m.units for m in r.metrics if m.metric == "credits")
                if r.status == reporting_pb2.USAGE_RECORD_STATUS_COMPLETED
                else 0
            ),
            "credits_type": credits_type(r),
            "status": _STATUS[r.status],
            "success": r.success,
            "created_at": iso(r.requested_at),
            "completed_at": iso(r.completed_at) if r.HasField("completed_at") else None,
            "processing_time_ms": (
                r.processing_time_ms if r.HasField("processing_time_ms") else None
            ),
        }
        transactions.append(transaction)
    return {
        "subscription_credits": max(0, credits.contract_quota - credits.committed),
        "credits": credits.prepaid_balance,
        "usage_summary": {
            "current_month": extraction_month(
                usage.jobs, credits.committed, credits.average_per_job
            ),
            "previous_month": extraction_month(
                previous.jobs, previous_credits.committed, previous_credits.average_per_job
            ),
        },
        "recent_transactions": transactions,
    }


async def test_dataextractor_balances_months_and_transactions(
    pagemeter_server: RunningServer,
) -> None:
    """GetUsage and ListUsageRecords answer DataExtractorAI's balances (subscription = contract left this month, credits = purchased balance), both months' extraction counts and credits, and each transaction's type, status, times and processing time."""
    server = pagemeter_server
    clock = server.clock
    clock.set(ms("2026-02-12T12:00:00+00:00"))
    await set_plan(
        server,
        name="Starter",
        timezone="UTC",
        metrics=[metric_limits("credits", contract_quota=100, overage_allowed=False)],
    )
    await server.admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(
            org_id="acme", metric="credits", units=50, grant_id="purchase-1", reason="pack of 50"
        )
    )
    # February: 80 + 40 credits against a subscription of 100; 20 come from purchased credits.
    await record(
        server,
        "2026-02-10T09:00:01.500+00:00",
        requested="2026-02-10T09:00:00+00:00",
        request_id="feb-1",
        credits=80,
    )
    await record(
        server,
        "2026-02-11T09:00:03+00:00",
        requested="2026-02-11T09:00:00+00:00",
        request_id="feb-2",
        credits=40,
    )
    await record(
        server,
        "2026-02-12T09:00:00.250+00:00",
        requested="2026-02-12T09:00:00+00:00",
        request_id="feb-3",
        success=False,
        credits=9,
    )
    # March: a new month of subscription credits.
    clock.set(ms("2026-03-15T12:00:00+00:00"))
    await record(
        server,
        "2026-03-10T09:00:02+00:00",
        requested="2026-03-10T09:00:00+00:00",
        request_id="mar-1",
        credits=40,
    )
    await record(
        server,
        "2026-03-12T09:00:02+00:00",
        requested="2026-03-12T09:00:00+00:00",
        request_id="mar-2",
        credits=25,
    )
    await record(
        server,
        "2026-03-13T09:00:00.100+00:00",
        requested="2026-03-13T09:00:00+00:00",
        request_id="mar-3",
        success=False,
        credits=12,
    )
    assert (await check(server, request_id="mar-4", hold=True, credits=3)).held  # in flight
    # A job dropped before it ran is no transaction.
    clock.advance(1)
    assert (await check(server, request_id="mar-5", hold=True, credits=5)).held
    await server.quota.ReleaseQuota(
        quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="mar-5")
    )

    usage = await get_usage(server)
    records = await server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id="acme", page_size=10)
    )
    page = dataextractor_page(usage, records)
    assert page["subscription_credits"] == 35  # 100 - 65 used this month
    assert page["credits"] == 30  # 50 bought - 20 drawn in February
    assert page["usage_summary"] == {
        "current_month": {
            "total_extractions": 3,
            "successful_extractions": 2,
            "failed_extractions": 1,
            "credits_consumed": 65,
            "average_credits_per_extraction": 32.5,
        },
        "previous_month": {
            "total_extractions": 3,
            "successful_extractions": 2,
            "failed_extractions": 1,
            "credits_consumed": 120,
            "average_credits_per_extraction": 60.0,
        },
    }
    assert page["recent_transactions"] == [
        {
            "request_id": "mar-4",
            "credits_consumed": 0,
            "credits_type": "subscription",
            "status": "pending",
            "success": False,
            "created_at": "2026-03-15T12:00:00Z",
            "completed_at": None,
            "processing_time_ms": None,
        },
        {
            "request_id": "mar-3",
            "credits_consumed": 0,
            "credits_type": None,
            "status": "failed",
            "success": False,
            "created_at": "2026-03-13T09:00:00Z",
            "completed_at": "2026-03-13T09:00:00.100Z",
            "processing_time_ms": 100,
        },
        {
            "request_id": "mar-2",
            "credits_consumed": 25,
            "credits_type": "subscription",
            "status": "completed",
            "success": True,
            "created_at": "2026-03-12T09:00:00Z",
            "completed_at": "2026-03-12T09:00:02Z",
            "processing_time_ms": 2000,
        },
        {
            "request_id": "mar-1",
            "credits_consumed": 40,
            "credits_type": "subscription",
            "status": "completed",
            "success": True,
            "created_at": "2026-03-10T09:00:00Z",
            "completed_at": "2026-03-10T09:00:02Z",
            "processing_time_ms": 2000,
        },
        {
            "request_id": "feb-3",
            "credits_consumed": 0,
            "credits_type": None,
            "status": "failed",
            "success": False,
            "created_at": "2026-02-12T09:00:00Z",
            "completed_at": "2026-02-12T09:00:00.250Z",
            "processing_time_ms": 250,
        },
        {
            "request_id": "feb-2",
            "credits_consumed": 40,
            "credits_type": "credits",  # 20 subscription + 20 purchased
            "status": "completed",
            "success": True,
            "created_at": "2026-02-11T09:00:00Z",
            "completed_at": "2026-02-11T09:00:03Z",
            "processing_time_ms": 3000,
        },
        {
            "request_id": "feb-1",
            "credits_consumed": 80,
            "credits_type": "subscription",
            "status": "completed",
            "success": True,
            "created_at": "2026-02-10T09:00:00Z",
            "completed_at": "2026-02-10T09:00:01.500Z",
            "processing_time_ms": 1500,
        },
    ]
    # The exact split of a mixed transaction is in the record.
    feb_2 = next(r for r in records.records if r.request_id == "feb-2")
    assert (feb_2.metrics[0].included_units, feb_2.metrics[0].prepaid_units) == (20, 20)
    # Cross-check: what may still be spent = subscription left + purchased - the pending hold.
    credits = metric_of(usage, "credits")
    assert credits.remaining == page["subscription_credits"] + page["credits"] - credits.held


async def test_dataextractor_purchased_credits_pay_once_the_subscription_is_spent(
    pagemeter_server: RunningServer,
) -> None:
    """Once the month's subscription credits are used up, extractions are paid from purchased credits (credits_type 'credits') until they run out, then refused."""
    server = pagemeter_server
    await set_plan(
        server,
        timezone="UTC",
        metrics=[metric_limits("credits", contract_quota=10, overage_allowed=False)],
    )
    await server.admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(org_id="acme", metric="credits", units=5, grant_id="p1")
    )
    for request_id, credits in (("x1", 10), ("x2", 4)):
        decision = await check(server, request_id=request_id, hold=True, credits=credits)
        assert decision.allowed
        await record(server, request_id=request_id, credits=credits)
    refused = await check(server, request_id="x3", hold=True, credits=2)
    assert refused.reason == quota_pb2.DECISION_REASON_QUOTA_EXCEEDED
    records = await server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id="acme")
    )
    types = {r.request_id: credits_type(r) for r in records.records}
    assert types == {"x2": "credits", "x1": "subscription"}
    page = dataextractor_page(await get_usage(server), records)
    assert (page["subscription_credits"], page["credits"]) == (0, 1)
