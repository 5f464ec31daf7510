"""ReportingService end to end: history, statistics and usage records over real gRPC.

Usage is recorded with RecordUsage (completed_at chosen by the test) so that the
daily, per-document-type and monthly counters are the ones record.lua keeps.
"""

from __future__ import annotations

import itertools

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from tests.conftest import START_MS as START
from tests.conftest import RunningServer, eagle_plan, metric_limits, ms

_ids = itertools.count(1)


def stamp(text: str) -> Timestamp:
    return Timestamp(seconds=ms(text) // 1000, nanos=(ms(text) % 1000) * 1_000_000)


async def record(
    server: RunningServer,
    completed: str,
    org_id: str = "acme",
    document_type: str = "",
    success: bool = True,
    request_id: str = "",
    **units: int,
) -> quota_pb2.RecordUsageResponse:
    reply: quota_pb2.RecordUsageResponse = await server.quota.RecordUsage(
        quota_pb2.RecordUsageRequest(
            org_id=org_id,
            request_id=request_id or f"job-{next(_ids)}",
            units=units,
            success=success,
            document_type=document_type,
            completed_at=stamp(completed),
        )
    )
    return reply


def docurift_plan(org_id: str = "acme", timezone: str = "UTC") -> plan_pb2.Plan:
    return eagle_plan(
        org_id=org_id,
        timezone=timezone,
        metrics=[
            metric_limits("pages", overage_allowed=True),
            metric_limits("credits", overage_allowed=True),
        ],
    )


def info_of(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo detail")


# -- statistics -----------------------------------------------------------------------


async def record_docurift_example(server: RunningServer) -> None:
    """The DocuRift page's breakdown: 45 documents, 127 pages = 127 credits."""
    spread = [
        ("invoice", 25, 65),
        ("bill_of_lading", 10, 32),
        ("packing_list", 6, 18),
        ("general", 4, 12),
    ]
    for document_type, documents, pages in spread:
        for i in range(documents):
            # Spread the pages: the first job of the type takes the remainder.
            units = pages // documents + (pages % documents if i == 0 else 0)
            day = 1 + i % 14
            await record(
                server,
                f"2026-03-{day:02d}T10:00:00+00:00",
                document_type=document_type,
                pages=units,
                credits=units,
            )


async def test_docurift_example_percentages(pagemeter_server: RunningServer) -> None:
    """The DocuRift example comes back exactly: totals 127/127/45, 2.8 pages per document, 51.2/25.2/14.2/9.4 %."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    await record_docurift_example(pagemeter_server)
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            start_date="2026-03-01",
            end_date="2026-03-15",
            group_by=reporting_pb2.STATISTICS_GROUPING_DOCUMENT_TYPE,
        )
    )
    totals = reply.summary.totals
    assert (totals.credits, totals.pages, totals.documents) == (127, 127, 45)
    assert reply.summary.average_pages_per_document == 2.8
    assert reply.percentage_basis == "credits"
    assert [
        (t.document_type, t.totals.credits, t.totals.documents, t.percentage)
        for t in reply.by_document_type
    ] == [
        ("invoice", 65, 25, 51.2),
        ("bill_of_lading", 32, 10, 25.2),
        ("packing_list", 18, 6, 14.2),
        ("general", 12, 4, 9.4),
    ]
    assert not reply.by_period
    assert reply.summary.period_start.ToJsonString() == "2026-03-01T00:00:00Z"
    assert reply.summary.period_end.ToJsonString() == "2026-03-15T23:59:59Z"


async def test_daily_rows_newest_first_with_empty_days(pagemeter_server: RunningServer) -> None:
    """Daily rows run newest first over every day of the range, days without usage as zeros."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    await record(pagemeter_server, "2026-03-10T08:00:00+00:00", pages=3, credits=3)
    await record(pagemeter_server, "2026-03-12T08:00:00+00:00", pages=5, credits=5)
    await record(pagemeter_server, "2026-03-12T09:00:00+00:00", pages=1, success=False)
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_DAILY,
            start_date="2026-03-10",
            end_date="2026-03-13",
        )
    )
    rows = [
        (r.date, r.totals.pages, r.totals.documents, r.totals.failed_documents)
        for r in reply.by_period
    ]
    assert rows == [
        ("2026-03-13", 0, 0, 0),
        ("2026-03-12", 5, 1, 1),
        ("2026-03-11", 0, 0, 0),
        ("2026-03-10", 3, 1, 0),
    ]
    assert not reply.by_document_type


async def test_weekly_rows_cross_month_and_year(pagemeter_server: RunningServer) -> None:
    """Weeks start on Monday, are labelled by that Monday, span a month and a year boundary, and are clipped to the range."""
    pagemeter_server.clock.set(ms("2026-01-20T12:00:00+00:00"))
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    for day, pages in [
        ("2025-12-26", 1),
        ("2025-12-31", 2),
        ("2026-01-01", 4),
        ("2026-01-04", 8),
        ("2026-01-05", 16),
    ]:
        await record(pagemeter_server, f"{day}T12:00:00+00:00", pages=pages, credits=pages)
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_WEEKLY,
            start_date="2025-12-25",
            end_date="2026-01-06",
        )
    )
    assert [(r.date, r.totals.pages) for r in reply.by_period] == [
        ("2026-01-05", 16),
        ("2025-12-29", 2 + 4 + 8),  # Monday 29 December to Sunday 4 January
        ("2025-12-22", 1),
    ]
    oldest = reply.by_period[-1]
    assert oldest.start.ToJsonString() == "2025-12-25T00:00:00Z"  # clipped to start_date
    assert oldest.end.ToJsonString() == "2025-12-28T23:59:59Z"  # the week's last second


async def test_monthly_rows_and_both_groupings(pagemeter_server: RunningServer) -> None:
    """Monthly rows are labelled YYYY-MM; grouping by both splits each row by document type too."""
    pagemeter_server.clock.set(ms("2026-03-05T12:00:00+00:00"))
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    await record(
        pagemeter_server, "2026-02-10T12:00:00+00:00", document_type="invoice", pages=6, credits=6
    )
    await record(
        pagemeter_server, "2026-03-02T12:00:00+00:00", document_type="invoice", pages=2, credits=2
    )
    await record(
        pagemeter_server, "2026-03-03T12:00:00+00:00", document_type="general", pages=2, credits=2
    )
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_MONTHLY,
            start_date="2026-02-01",
            group_by=reporting_pb2.STATISTICS_GROUPING_BOTH,
        )
    )
    assert reply.summary.end_date == "2026-03-05"  # default end: today
    assert [(r.date, r.totals.credits) for r in reply.by_period] == [("2026-03", 4), ("2026-02", 6)]
    march = reply.by_period[0]
    assert [(t.document_type, t.totals.credits, t.percentage) for t in march.by_document_type] == [
        ("general", 2, 50.0),
        ("invoice", 2, 50.0),
    ]
    assert [(t.document_type, t.totals.credits, t.percentage) for t in reply.by_document_type] == [
        ("invoice", 8, 80.0),
        ("general", 2, 20.0),
    ]


async def test_days_follow_the_plan_timezone(pagemeter_server: RunningServer) -> None:
    """A job completed at 23:30 UTC counts on the next day for a Tokyo organization, and the range's bounds are Tokyo midnights."""
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=docurift_plan(timezone="Asia/Tokyo"))
    )
    await record(pagemeter_server, "2026-03-09T23:30:00+00:00", pages=7, credits=7)
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme",
            period=reporting_pb2.STATISTICS_PERIOD_DAILY,
            start_date="2026-03-09",
            end_date="2026-03-10",
        )
    )
    assert [(r.date, r.totals.pages) for r in reply.by_period] == [
        ("2026-03-10", 7),
        ("2026-03-09", 0),
    ]
    assert reply.summary.period_start.ToJsonString() == "2026-03-08T15:00:00Z"
    assert reply.timezone == "Asia/Tokyo"


async def test_default_range_is_the_last_30_days(pagemeter_server: RunningServer) -> None:
    """Without dates the range is the 30 days before today up to today, in the plan's timezone."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(org_id="acme")
    )
    assert (reply.summary.start_date, reply.summary.end_date) == ("2026-02-13", "2026-03-15")
    assert reply.period == reporting_pb2.STATISTICS_PERIOD_MONTHLY
    assert reply.group_by == reporting_pb2.STATISTICS_GROUPING_DATE
    assert [r.date for r in reply.by_period] == ["2026-03", "2026-02"]


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"period": 9}, "INVALID_PARAMETER", "period"),
        ({"group_by": 7}, "INVALID_PARAMETER", "group_by"),
        ({"start_date": "19/01/2024"}, "INVALID_DATE_FORMAT", "start_date"),
        ({"end_date": "2024-02-30"}, "INVALID_DATE_FORMAT", "end_date"),
        ({"start_date": "1999-12-31"}, "INVALID_DATE_FORMAT", "start_date"),
        (
            {"start_date": "2026-03-10", "end_date": "2026-03-09"},
            "INVALID_DATE_RANGE",
            "start_date",
        ),
        (
            {"start_date": "2025-01-01", "end_date": "2026-01-02"},
            "DATE_RANGE_TOO_LARGE",
            "end_date",
        ),
    ],
)
async def test_statistics_errors_carry_the_page_codes(
    pagemeter_server: RunningServer,
    redis_sync: redis.Redis,
    fields: dict[str, object],
    reason: str,
    field: str,
) -> None:
    """Each bad parameter is INVALID_ARGUMENT with ErrorInfo carrying DocuRift's code and the field, and writes nothing."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    before = sorted(redis_sync.keys("*"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.reporting.GetUsageStatistics(
            reporting_pb2.GetUsageStatisticsRequest(org_id="acme", **fields)  # type: ignore[arg-type]
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = info_of(caught.value)
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert field in (caught.value.details() or "")
    assert sorted(redis_sync.keys("*")) == before


async def test_a_full_leap_year_is_allowed(pagemeter_server: RunningServer) -> None:
    """1 January to 31 December of a leap year (366 days) is within the one-year maximum, as monthly rows."""
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme", start_date="2024-01-01", end_date="2024-12-31"
        )
    )
    assert len(reply.by_period) == 12
    assert reply.timezone == "UTC"  # no plan: the service's default timezone


async def test_date_times_are_read_in_the_plan_timezone(pagemeter_server: RunningServer) -> None:
    """A start given as an ISO 8601 date-time takes its date in the plan's timezone."""
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=docurift_plan(timezone="Asia/Tokyo"))
    )
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme", start_date="2026-03-01T16:00:00Z", end_date="2026-03-03"
        )
    )
    assert reply.summary.start_date == "2026-03-02"


# -- history ------------------------------------------------------------------------------


async def test_history_keeps_each_months_terms(pagemeter_server: RunningServer) -> None:
    """A plan change in March does not rewrite January's or February's terms; months are newest first with zeros where nothing was used."""
    clock = pagemeter_server.clock
    clock.set(ms("2026-01-05T00:00:00+00:00"))
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=eagle_plan(
                metrics=[
                    metric_limits(
                        "pages",
                        contract_quota=10,
                        overage_allowed=True,
                        price_per_unit="0.03",
                        overage_price_per_unit="0.028",
                    )
                ]
            )
        )
    )
    clock.set(ms("2026-01-20T11:00:00+00:00"))
    await record(pagemeter_server, "2026-01-20T10:00:00+00:00", pages=25)
    clock.set(ms("2026-03-02T00:00:00+00:00"))
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=eagle_plan(
                name="Growth",
                metrics=[
                    metric_limits(
                        "pages",
                        contract_quota=10000,
                        overage_allowed=True,
                        price_per_unit="0.02",
                        overage_price_per_unit="0.025",
                    )
                ],
            )
        )
    )
    await record(pagemeter_server, "2026-03-01T22:00:00+00:00", pages=7)
    reply = await pagemeter_server.reporting.GetUsageHistory(
        reporting_pb2.GetUsageHistoryRequest(org_id="acme", months=4)
    )
    assert [m.period_id for m in reply.months] == ["2026-03", "2026-02", "2026-01", "2025-12"]
    march, february, january, december = reply.months
    assert (march.plan_name, march.plan_version) == ("Growth", 2)
    (pages,) = march.metrics
    assert (pages.committed, pages.terms.contract_quota, pages.terms.price_per_unit) == (
        7,
        10000,
        "0.02",
    )
    (pages,) = january.metrics
    assert (pages.committed, pages.terms.contract_quota, pages.terms.overage_price_per_unit) == (
        25,
        10,
        "0.028",
    )
    assert (pages.overage_units, pages.overage_cost) == (15, "0.42")
    assert january.jobs.succeeded == 1 and january.plan_name == "Business"
    assert february.metrics[0].committed == 0 and february.plan_version == 1
    assert december.plan_version == 0 and not december.metrics  # before any plan: no terms
    assert reply.timezone == "UTC"


async def test_history_month_count_is_validated(pagemeter_server: RunningServer) -> None:
    """months outside 0-24 is INVALID_ARGUMENT; 0 means the default of 12 months."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.reporting.GetUsageHistory(
            reporting_pb2.GetUsageHistoryRequest(org_id="acme", months=25)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await pagemeter_server.reporting.GetUsageHistory(
        reporting_pb2.GetUsageHistoryRequest(org_id="acme")
    )
    assert len(reply.months) == 12


# -- usage records ------------------------------------------------------------------------


async def test_records_pages_visit_every_record_once_newest_first(
    pagemeter_server: RunningServer,
) -> None:
    """Pages of 2 over 7 records (two sharing a millisecond) list each exactly once, newest first, and a record added meanwhile does not shift them."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    for i, at in enumerate(["10:00", "10:01", "10:02", "10:02", "10:03", "10:04", "10:05"]):
        await record(pagemeter_server, f"2026-03-15T{at}:00+00:00", request_id=f"r{i}", pages=i + 1)
    seen: list[str] = []
    token = ""
    while True:
        page = await pagemeter_server.reporting.ListUsageRecords(
            reporting_pb2.ListUsageRecordsRequest(org_id="acme", page_size=2, page_token=token)
        )
        seen.extend(r.request_id for r in page.records)
        if len(seen) == 2:
            await record(pagemeter_server, "2026-03-15T11:00:00+00:00", request_id="late", pages=1)
        token = page.next_page_token
        if not token:
            break
    assert seen == ["r6", "r5", "r4", "r3", "r2", "r1", "r0"]


async def test_record_fields_status_pools_and_times(pagemeter_server: RunningServer) -> None:
    """Records show pending (held), completed with the pools that paid, failed, released and expired holds, with times and processing time."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    await pagemeter_server.admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(org_id="acme", metric="pages", units=50, grant_id="g1")
    )
    quota = pagemeter_server.quota
    clock = pagemeter_server.clock

    async def hold(request_id: str, pages: int, ttl: int = 600) -> None:
        reply = await quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id="acme",
                request_id=request_id,
                units={"pages": pages},
                hold=True,
                hold_ttl=Duration(seconds=ttl),
            )
        )
        assert reply.held

    await hold("expires", 3, ttl=5)
    clock.advance(1)
    await hold("released", 4)
    await quota.ReleaseQuota(quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="released"))
    clock.advance(1)
    await hold("big", 2040)
    clock.advance(2.5)
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(
            org_id="acme", request_id="big", units={"pages": 2040}, document_type="invoice"
        )
    )
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(
            org_id="acme", request_id="broken", units={"pages": 9}, success=False
        )
    )
    clock.advance(10)
    await hold("pending", 1)
    page = await pagemeter_server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id="acme")
    )
    by_id = {r.request_id: r for r in page.records}
    assert [r.request_id for r in page.records] == [
        "pending",
        "broken",
        "big",
        "released",
        "expires",
    ]
    assert by_id["pending"].status == reporting_pb2.USAGE_RECORD_STATUS_PENDING
    assert by_id["pending"].HasField("hold_expires_at") and not by_id["pending"].HasField(
        "completed_at"
    )
    assert by_id["expires"].status == reporting_pb2.USAGE_RECORD_STATUS_EXPIRED
    assert by_id["released"].status == reporting_pb2.USAGE_RECORD_STATUS_RELEASED
    big = by_id["big"]
    assert big.status == reporting_pb2.USAGE_RECORD_STATUS_COMPLETED and big.success
    assert big.document_type == "invoice" and big.period_id == "2026-03"
    (pages,) = big.metrics
    assert (pages.units, pages.included_units, pages.prepaid_units, pages.overage_units) == (
        2040,
        2000,
        40,
        0,
    )
    assert list(big.paid_from) == [
        reporting_pb2.PAYMENT_POOL_CONTRACT,
        reporting_pb2.PAYMENT_POOL_PREPAID,
    ]
    assert big.processing_time_ms == 2500
    broken = by_id["broken"]
    assert broken.status == reporting_pb2.USAGE_RECORD_STATUS_FAILED and not broken.success
    assert list(broken.paid_from) == [] and broken.processing_time_ms == 0
    (tried,) = broken.metrics  # what the failed job reported, though it consumed nothing
    assert (tried.metric, tried.units, tried.included_units, tried.overage_units) == (
        "pages",
        9,
        0,
        0,
    )


async def test_bad_page_token_and_size(pagemeter_server: RunningServer) -> None:
    """A forged page token or a page size over 1000 is INVALID_ARGUMENT naming the field."""
    for request, field in [
        (
            reporting_pb2.ListUsageRecordsRequest(org_id="acme", page_token="not-a-token"),
            "page_token",
        ),
        (reporting_pb2.ListUsageRecordsRequest(org_id="acme", page_size=1001), "page_size"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pagemeter_server.reporting.ListUsageRecords(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")


# -- GetUsage's reporting fields ----------------------------------------------------------


async def test_get_usage_previous_month_lifetime_totals_and_averages(
    pagemeter_server: RunningServer,
) -> None:
    """GetUsage gives the previous month's jobs and units, all-time totals across months, and units per successful job."""
    clock = pagemeter_server.clock
    clock.set(ms("2026-02-20T12:00:00+00:00"))
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=docurift_plan()))
    await record(pagemeter_server, "2026-02-10T12:00:00+00:00", credits=10)
    await record(pagemeter_server, "2026-02-11T12:00:00+00:00", credits=20)
    await record(pagemeter_server, "2026-02-12T12:00:00+00:00", credits=5, success=False)
    clock.set(START)
    await record(pagemeter_server, "2026-03-02T12:00:00+00:00", credits=4)
    reply = await pagemeter_server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
    credits = {m.metric: m for m in reply.metrics}["credits"]
    assert (credits.committed, credits.lifetime_committed, credits.average_per_job) == (4, 34, 4.0)
    previous = reply.previous_month
    assert previous.period_id == "2026-02"
    assert (previous.jobs.succeeded, previous.jobs.failed, previous.jobs.total) == (2, 1, 3)
    (prev_credits,) = previous.metrics
    assert (prev_credits.metric, prev_credits.committed, prev_credits.average_per_job) == (
        "credits",
        30,
        15.0,
    )


async def test_lifetime_gauge_usage_percent_uses_its_cap(pagemeter_server: RunningServer) -> None:
    """A lifetime gauge with only a hard limit (Docstron's templates: 2 of 2) reports 100 % and goes down when lowered."""
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=eagle_plan(
                metrics=[metric_limits("templates", hard_limit=2, period=plan_pb2.PERIOD_NONE)]
            )
        )
    )
    await record(pagemeter_server, "2026-03-15T10:00:00+00:00", templates=2)
    reply = await pagemeter_server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
    (templates,) = reply.metrics
    assert (templates.committed, templates.usage_percent) == (2, 100.0)
    await record(pagemeter_server, "2026-03-15T11:00:00+00:00", templates=-1)
    reply = await pagemeter_server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
    assert (reply.metrics[0].committed, reply.metrics[0].usage_percent) == (1, 50.0)


async def test_reports_are_never_limited_and_change_nothing(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """With a rate limit of 1 call/s, twenty rounds of every report all answer and leave every key byte for byte as it was."""
    await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=eagle_plan(api_rate_limit=1))
    )
    await record(pagemeter_server, "2026-03-15T10:00:00+00:00", pages=3, document_type="invoice")
    before = {key: redis_sync.dump(key) for key in redis_sync.keys("*")}
    reporting = pagemeter_server.reporting
    for _ in range(20):
        await reporting.GetUsageHistory(reporting_pb2.GetUsageHistoryRequest(org_id="acme"))
        stats = await reporting.GetUsageStatistics(
            reporting_pb2.GetUsageStatisticsRequest(
                org_id="acme", group_by=reporting_pb2.STATISTICS_GROUPING_BOTH
            )
        )
        assert stats.summary.totals.pages == 3
        records = await reporting.ListUsageRecords(
            reporting_pb2.ListUsageRecordsRequest(org_id="acme")
        )
        assert len(records.records) == 1
    assert {key: redis_sync.dump(key) for key in redis_sync.keys("*")} == before
