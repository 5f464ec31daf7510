"""The SDK's reporting calls (history, statistics, usage records) against a real server and Redis.

Usage is recorded through RecordUsage on chosen days (completed_at), or with the
test clock moved into earlier months, and read back through ReportingService and
GetUsage. The helpers that record these scenarios are shared with the CLI tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import plan_pb2, reporting_pb2
from pagemeter_client import (
    AsyncPagemeterClient,
    PagemeterClient,
    RetryPolicy,
    StatisticsPeriodName,
    error_details,
)
from pagemeter_client.sdk import get_usage_statistics_request
from tests.client.client_flavours import Connect
from tests.client.test_client_sdk import CuttingProxy
from tests.conftest import START_MS, RunningServer, eagle_plan, metric_limits, ms

R = reporting_pb2


def at(text: str) -> datetime:
    """An aware datetime from ISO 8601 with offset, e.g. '2026-03-02T10:00:00+00:00'."""
    return datetime.fromisoformat(text)


def iso(stamp: Timestamp) -> str:
    """A timestamp as '2026-03-01T00:00:00Z' ('' when unset)."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return ""
    return stamp.ToDatetime(UTC).isoformat().replace("+00:00", "Z")


def plus_plan() -> plan_pb2.Plan:
    """The plan from February on: 1000 pages included, overage at 0.05."""
    return eagle_plan(
        name="Business Plus",
        metrics=[
            metric_limits(
                "pages",
                contract_quota=1000,
                overage_allowed=True,
                hard_limit=2500,
                price_per_unit="0.04",
                overage_price_per_unit="0.05",
            ),
            metric_limits("documents", contract_quota=500, overage_allowed=False),
        ],
    )


async def record_three_months(server: RunningServer, sdk: AsyncPagemeterClient) -> None:
    """Eagle Doc's plan from 2026-01-05, Business Plus from 2026-02-10; usage in each month.

    January: 2100 pages and 1 document (overage 100 x 0.028 = 2.8).
    February: 1150 pages (overage 150 x 0.05 = 7.5 under February's terms).
    March (now, 2026-03-15T12:00Z): 40 + 21 pages, 2 documents, and one failed job.
    """
    clock = server.clock
    clock.set(ms("2026-01-05T09:00:00+00:00"))
    await sdk.set_plan(eagle_plan())
    clock.set(ms("2026-01-20T10:00:00+00:00"))
    await sdk.record_usage(
        "acme", "jan-1", {"pages": 2100, "documents": 1}, document_type="invoice"
    )
    clock.set(ms("2026-02-10T09:00:00+00:00"))
    assert (await sdk.set_plan(plus_plan())).plan.version == 2
    clock.set(ms("2026-02-12T10:00:00+00:00"))
    await sdk.record_usage("acme", "feb-1", {"pages": 1150}, document_type="receipt")
    clock.set(START_MS)
    await sdk.record_usage(
        "acme",
        "mar-1",
        {"pages": 40, "documents": 1},
        document_type="invoice",
        completed_at=at("2026-03-03T09:00:00+00:00"),
    )
    await sdk.record_usage(
        "acme",
        "mar-2",
        {"pages": 21, "documents": 1},
        document_type="invoice",
        completed_at=at("2026-03-04T09:00:00+00:00"),
    )
    await sdk.record_usage(
        "acme",
        "mar-3",
        {"pages": 5},
        success=False,
        document_type="invoice",
        completed_at=at("2026-03-05T09:00:00+00:00"),
    )


async def record_statistics_usage(sdk: AsyncPagemeterClient) -> None:
    """Eagle Doc's plan (UTC) and five jobs on chosen days of February and March 2026.

    invoice: 10 pages + 1 document on 03-02, 20 pages on 03-10, a failed job on 03-12;
    receipt: 5 pages on 03-02, 15 pages on 02-27.
    """
    await sdk.set_plan(eagle_plan())
    jobs: list[tuple[str, dict[str, int], str, str, bool]] = [
        ("s1", {"pages": 10, "documents": 1}, "invoice", "2026-03-02T10:00:00+00:00", True),
        ("s2", {"pages": 5}, "receipt", "2026-03-02T15:00:00+00:00", True),
        ("s3", {"pages": 20}, "invoice", "2026-03-10T09:00:00+00:00", True),
        ("s4", {"pages": 3}, "invoice", "2026-03-12T09:00:00+00:00", False),
        ("s5", {"pages": 15}, "receipt", "2026-02-27T09:00:00+00:00", True),
    ]
    for request_id, units, document_type, completed, success in jobs:
        await sdk.record_usage(
            "acme",
            request_id,
            units,
            success=success,
            document_type=document_type,
            completed_at=at(completed),
        )


async def record_five_jobs(server: RunningServer, sdk: AsyncPagemeterClient) -> None:
    """Five usage records of acme, requested at five different times (newest: job-e).

    job-a 03-10 completed (2150 pages: contract, prepaid and overage), job-b 03-11
    completed (overage), job-c 03-12 failed, job-d held at 12:00 and released,
    job-e held at 12:01 and still pending. globex has one record of its own.
    """
    await sdk.set_plan(eagle_plan())
    await sdk.set_plan(eagle_plan("globex"))
    await sdk.grant_credits("acme", "pages", 100, "grant-1")
    await sdk.record_usage(
        "acme",
        "job-a",
        {"pages": 2150, "documents": 1},
        document_type="invoice",
        requested_at=at("2026-03-10T08:00:00+00:00"),
        completed_at=at("2026-03-10T08:00:01.500+00:00"),
    )
    await sdk.record_usage(
        "acme",
        "job-b",
        {"pages": 5},
        document_type="receipt",
        requested_at=at("2026-03-11T08:00:00+00:00"),
        completed_at=at("2026-03-11T08:00:03+00:00"),
    )
    await sdk.record_usage(
        "acme",
        "job-c",
        {"pages": 7},
        success=False,
        document_type="invoice",
        requested_at=at("2026-03-12T08:00:00+00:00"),
        completed_at=at("2026-03-12T08:01:00+00:00"),
    )
    await sdk.record_usage(
        "globex", "job-g", {"pages": 1}, completed_at=at("2026-03-13T08:00:00+00:00")
    )
    await sdk.check_quota("acme", {"pages": 4}, request_id="job-d", hold=True)
    await sdk.release_quota("acme", "job-d")
    server.clock.advance(60)
    await sdk.check_quota("acme", {"pages": 6}, request_id="job-e", hold=True)


NEWEST_FIRST = ["job-e", "job-d", "job-c", "job-b", "job-a"]


@pytest.fixture
async def sdk(
    connect: Connect, pagemeter_server: RunningServer
) -> AsyncIterator[AsyncPagemeterClient]:
    """A client of the test server, async then blocking (no plan set yet)."""
    async with connect(pagemeter_server.target) as client:
        yield client


def by_metric(month: R.HistoryMonth) -> dict[str, R.MetricMonth]:
    return {m.metric: m for m in month.metrics}


def totals(row: R.UsageTotals) -> tuple[int, int, int, int]:
    """(pages, documents, failed_documents, credits) of a statistics row."""
    return (row.pages, row.documents, row.failed_documents, row.credits)


def reason(error: grpc.RpcError) -> tuple[grpc.StatusCode, list[str]]:
    details = error_details(error)
    return details.code, [info.reason for info in details.error_infos]


# -- history ------------------------------------------------------------------------------


async def test_history_has_each_months_usage_and_terms(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """History lists months newest first with committed units, overage and the terms in force at each month's end."""
    await record_three_months(pagemeter_server, sdk)
    history = await sdk.get_usage_history("acme", months=4)
    assert history.org_id == "acme" and history.timezone == "UTC"
    assert [m.period_id for m in history.months] == ["2026-03", "2026-02", "2026-01", "2025-12"]
    march, february, january, december = history.months

    assert (march.year, march.month) == (2026, 3)
    assert (iso(march.period_start), iso(march.period_end)) == (
        "2026-03-01T00:00:00Z",
        "2026-04-01T00:00:00Z",
    )
    assert (march.plan_name, march.plan_version) == ("Business Plus", 2)
    assert (march.jobs.succeeded, march.jobs.failed, march.jobs.total) == (2, 1, 3)
    assert by_metric(march)["pages"].committed == 61
    assert by_metric(march)["pages"].terms.contract_quota == 1000

    pages = by_metric(february)["pages"]
    assert (february.plan_name, february.plan_version) == ("Business Plus", 2)
    assert (pages.committed, pages.overage_units, pages.overage_cost) == (1150, 150, "7.5")
    assert (pages.terms.contract_quota, pages.terms.hard_limit) == (1000, 2500)
    assert (pages.terms.price_per_unit, pages.terms.overage_price_per_unit) == ("0.04", "0.05")
    assert pages.terms.overage_allowed
    assert (february.jobs.succeeded, february.jobs.total) == (1, 1)

    pages = by_metric(january)["pages"]
    assert (january.plan_name, january.plan_version) == ("Business", 1)
    assert [m.metric for m in january.metrics] == ["documents", "pages"]
    assert (pages.committed, pages.overage_units, pages.overage_cost) == (2100, 100, "2.8")
    assert (pages.terms.contract_quota, pages.terms.overage_price_per_unit) == (2000, "0.028")
    documents = by_metric(january)["documents"]
    assert (documents.committed, documents.terms.contract_quota) == (1, 500)
    assert not documents.terms.overage_allowed and not documents.terms.HasField("hard_limit")

    assert (december.plan_name, december.plan_version) == ("", 0)
    assert list(december.metrics) == []
    assert (december.jobs.total, iso(december.period_start)) == (0, "2025-12-01T00:00:00Z")


async def test_history_defaults_to_twelve_months_and_refuses_more_than_24(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """months=0 reads the last 12 months (empty ones with zeros); 25 months is INVALID_ARGUMENT."""
    await sdk.set_plan(eagle_plan())
    await sdk.record_usage("acme", "job-1", {"pages": 7})
    history = await sdk.get_usage_history("acme")
    assert len(history.months) == 12
    assert (history.months[0].period_id, history.months[-1].period_id) == ("2026-03", "2025-04")
    assert by_metric(history.months[0])["pages"].committed == 7
    assert all(m.jobs.total == 0 for m in history.months[1:])

    one = await sdk.get_usage_history("acme", months=1)
    assert [m.period_id for m in one.months] == ["2026-03"]
    with pytest.raises(grpc.RpcError) as refused:
        await sdk.get_usage_history("acme", months=25)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_usage_has_lifetime_average_and_previous_month(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """GetUsage reports lifetime totals across months, committed per successful job, and last month's summary."""
    await record_three_months(pagemeter_server, sdk)
    usage = await sdk.get_usage("acme")
    metrics = {m.metric: m for m in usage.metrics}
    assert metrics["pages"].lifetime_committed == 2100 + 1150 + 61
    assert metrics["documents"].lifetime_committed == 3  # 1 in January, 2 in March
    assert metrics["pages"].average_per_job == pytest.approx(30.5)  # 61 pages / 2 jobs
    assert metrics["documents"].average_per_job == pytest.approx(1.0)

    previous = usage.previous_month
    assert (previous.period_id, previous.year, previous.month) == ("2026-02", 2026, 2)
    assert (previous.jobs.succeeded, previous.jobs.failed, previous.jobs.total) == (1, 0, 1)
    assert [(m.metric, m.committed) for m in previous.metrics] == [("pages", 1150)]
    assert previous.metrics[0].average_per_job == pytest.approx(1150.0)


# -- statistics ---------------------------------------------------------------------------


async def test_daily_statistics_rows_and_summary(sdk: AsyncPagemeterClient) -> None:
    """Daily statistics have one row per day, newest first, and a summary of the whole range."""
    await record_statistics_usage(sdk)
    stats = await sdk.get_usage_statistics(
        "acme", period="daily", start_date="2026-03-01", end_date="2026-03-15"
    )
    assert stats.period == R.STATISTICS_PERIOD_DAILY
    assert stats.group_by == R.STATISTICS_GROUPING_DATE
    assert [row.date for row in stats.by_period] == [f"2026-03-{d:02d}" for d in range(15, 0, -1)]
    rows = {row.date: row for row in stats.by_period}
    assert totals(rows["2026-03-02"].totals) == (15, 2, 0, 0)
    assert dict(rows["2026-03-02"].totals.units) == {"pages": 15, "documents": 1}
    assert totals(rows["2026-03-10"].totals) == (20, 1, 0, 0)
    assert totals(rows["2026-03-12"].totals) == (0, 0, 1, 0), "a failed job consumes nothing"
    assert totals(rows["2026-03-01"].totals) == (0, 0, 0, 0)
    assert iso(rows["2026-03-02"].start) == "2026-03-02T00:00:00Z"
    assert list(stats.by_document_type) == []

    summary = stats.summary
    assert totals(summary.totals) == (35, 3, 1, 0)
    assert dict(summary.totals.units) == {"pages": 35, "documents": 1}
    assert summary.average_pages_per_document == pytest.approx(11.7)  # 35 / 3
    assert (summary.start_date, summary.end_date) == ("2026-03-01", "2026-03-15")
    assert (iso(summary.period_start), iso(summary.period_end)) == (
        "2026-03-01T00:00:00Z",
        "2026-03-15T23:59:59Z",
    )
    assert stats.percentage_basis == "pages"


async def test_weekly_and_monthly_statistics(sdk: AsyncPagemeterClient) -> None:
    """Weekly rows are labelled by their Monday and monthly rows by YYYY-MM, newest first."""
    await record_statistics_usage(sdk)
    weekly = await sdk.get_usage_statistics(
        "acme", period="weekly", start_date=date(2026, 3, 2), end_date=date(2026, 3, 15)
    )
    assert [(row.date, totals(row.totals)) for row in weekly.by_period] == [
        ("2026-03-09", (20, 1, 1, 0)),
        ("2026-03-02", (15, 2, 0, 0)),
    ]
    monthly = await sdk.get_usage_statistics(
        "acme", period="monthly", start_date="2026-02-01", end_date="2026-03-15"
    )
    assert [(row.date, totals(row.totals)) for row in monthly.by_period] == [
        ("2026-03", (35, 3, 1, 0)),
        ("2026-02", (15, 1, 0, 0)),
    ]
    assert iso(monthly.by_period[1].start) == "2026-02-01T00:00:00Z"


async def test_statistics_by_document_type_with_percentages(sdk: AsyncPagemeterClient) -> None:
    """By document type, each type's share of the pages is given with one decimal, largest first."""
    await record_statistics_usage(sdk)
    stats = await sdk.get_usage_statistics(
        "acme", start_date="2026-02-01", end_date="2026-03-15", group_by="document_type"
    )
    assert list(stats.by_period) == []
    assert stats.percentage_basis == "pages"
    assert [
        (t.document_type, totals(t.totals), round(t.percentage, 1)) for t in stats.by_document_type
    ] == [
        ("invoice", (30, 2, 1, 0), 60.0),
        ("receipt", (20, 2, 0, 0), 40.0),
    ]

    march = await sdk.get_usage_statistics(
        "acme", start_date="2026-03-01", end_date="2026-03-15", group_by="document_type"
    )
    shares = [(t.document_type, round(t.percentage, 1)) for t in march.by_document_type]
    assert shares == [("invoice", 85.7), ("receipt", 14.3)]


async def test_statistics_grouped_by_both_split_each_period(sdk: AsyncPagemeterClient) -> None:
    """With group_by both, every period row is split by document type as well as the whole range."""
    await record_statistics_usage(sdk)
    stats = await sdk.get_usage_statistics(
        "acme", period="weekly", start_date="2026-03-02", end_date="2026-03-15", group_by="both"
    )
    assert stats.group_by == R.STATISTICS_GROUPING_BOTH
    assert [t.document_type for t in stats.by_document_type] == ["invoice", "receipt"]
    first_week = next(row for row in stats.by_period if row.date == "2026-03-02")
    split = {t.document_type: t for t in first_week.by_document_type}
    assert set(split) == {"invoice", "receipt"}
    assert totals(split["invoice"].totals) == (10, 1, 0, 0)
    assert totals(split["receipt"].totals) == (5, 1, 0, 0)
    assert (round(split["invoice"].percentage, 1), round(split["receipt"].percentage, 1)) == (
        66.7,
        33.3,
    )


async def test_statistics_percentages_are_of_credits_when_credits_were_used(
    sdk: AsyncPagemeterClient,
) -> None:
    """When a credits metric was used, the shares are of credits, not of pages."""
    await sdk.set_plan(
        eagle_plan(metrics=[metric_limits("credits"), metric_limits("pages")], name="Credits")
    )
    day = at("2026-03-10T09:00:00+00:00")
    await sdk.record_usage(
        "acme", "c1", {"credits": 3, "pages": 1}, document_type="invoice", completed_at=day
    )
    await sdk.record_usage(
        "acme", "c2", {"credits": 1, "pages": 9}, document_type="receipt", completed_at=day
    )
    stats = await sdk.get_usage_statistics(
        "acme", start_date="2026-03-01", end_date="2026-03-15", group_by="document_type"
    )
    assert stats.percentage_basis == "credits"
    assert stats.summary.totals.credits == 4 and stats.summary.totals.pages == 10
    shares = [(t.document_type, round(t.percentage, 1)) for t in stats.by_document_type]
    assert shares == [("invoice", 75.0), ("receipt", 25.0)]


async def test_statistics_days_are_the_plans_timezone_days(sdk: AsyncPagemeterClient) -> None:
    """Days are counted in the plan's timezone: 23:30 UTC on 03-09 is 03-10 in Berlin."""
    await sdk.set_plan(eagle_plan(timezone="Europe/Berlin"))
    await sdk.record_usage(
        "acme", "late", {"pages": 7}, completed_at=at("2026-03-09T23:30:00+00:00")
    )
    stats = await sdk.get_usage_statistics(
        "acme", period="daily", start_date="2026-03-09", end_date="2026-03-10"
    )
    assert stats.timezone == "Europe/Berlin"
    assert [(row.date, row.totals.pages) for row in stats.by_period] == [
        ("2026-03-10", 7),
        ("2026-03-09", 0),
    ]
    assert (iso(stats.summary.period_start), iso(stats.summary.period_end)) == (
        "2026-03-08T23:00:00Z",
        "2026-03-10T22:59:59Z",
    )
    # A date-time is sent with its offset; its date in Berlin is taken.
    from_datetime = await sdk.get_usage_statistics(
        "acme", start_date=at("2026-03-09T23:30:00+00:00"), end_date="2026-03-10"
    )
    assert from_datetime.summary.start_date == "2026-03-10"


async def test_statistics_defaults_are_the_last_30_days_by_month(sdk: AsyncPagemeterClient) -> None:
    """Without dates, statistics cover 30 days before today up to today, in monthly rows."""
    await record_statistics_usage(sdk)
    stats = await sdk.get_usage_statistics("acme")
    assert (stats.summary.start_date, stats.summary.end_date) == ("2026-02-13", "2026-03-15")
    assert stats.period == R.STATISTICS_PERIOD_MONTHLY
    assert [(row.date, row.totals.pages) for row in stats.by_period] == [
        ("2026-03", 35),
        ("2026-02", 15),
    ]
    assert iso(stats.by_period[1].start) == "2026-02-13T00:00:00Z", "clipped to the range"


@pytest.mark.parametrize(
    ("start", "end", "period", "expected"),
    [
        ("2026-13-01", "2026-03-15", "monthly", "INVALID_DATE_FORMAT"),
        ("03/01/2026", "2026-03-15", "monthly", "INVALID_DATE_FORMAT"),
        ("2026-03-10", "2026-03-01", "monthly", "INVALID_DATE_RANGE"),
        ("2020-01-01", "2026-03-15", "daily", "DATE_RANGE_TOO_LARGE"),
    ],
)
async def test_bad_statistics_parameters_name_their_reason(
    sdk: AsyncPagemeterClient,
    start: str,
    end: str,
    period: StatisticsPeriodName,
    expected: str,
) -> None:
    """Bad dates are INVALID_ARGUMENT with the ErrorInfo reason the contract names."""
    await sdk.set_plan(eagle_plan())
    with pytest.raises(grpc.RpcError) as refused:
        await sdk.get_usage_statistics("acme", start_date=start, end_date=end, period=period)
    assert reason(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, [expected])


def test_statistics_request_refuses_unknown_words_and_naive_datetimes() -> None:
    """An unknown period or grouping, or a naive datetime, is refused before anything is sent."""
    with pytest.raises(ValueError, match="period must be one of daily, weekly, monthly"):
        get_usage_statistics_request("acme", period="hourly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_by must be one of date, document_type, both"):
        get_usage_statistics_request("acme", group_by="metric")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_date must be a date or a timezone-aware"):
        get_usage_statistics_request("acme", start_date=datetime(2026, 3, 1, 12))
    request = get_usage_statistics_request(
        "acme", period="weekly", start_date=date(2026, 3, 2), group_by="both"
    )
    assert (request.period, request.group_by) == (
        R.STATISTICS_PERIOD_WEEKLY,
        R.STATISTICS_GROUPING_BOTH,
    )
    assert (request.start_date, request.end_date) == ("2026-03-02", "")


# -- usage records ------------------------------------------------------------------------


async def test_usage_records_describe_each_job(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """Each record has its status, document type, units, paying pools, times and processing time."""
    await record_five_jobs(pagemeter_server, sdk)
    page = await sdk.list_usage_records("acme")
    assert [r.request_id for r in page.records] == NEWEST_FIRST
    assert page.next_page_token == ""
    records = {r.request_id: r for r in page.records}

    a = records["job-a"]
    assert (a.status, a.success, a.document_type) == (
        R.USAGE_RECORD_STATUS_COMPLETED,
        True,
        "invoice",
    )
    assert [(m.metric, m.units) for m in a.metrics] == [("documents", 1), ("pages", 2150)]
    pages = a.metrics[1]
    assert (pages.included_units, pages.prepaid_units, pages.overage_units) == (2000, 100, 50)
    assert list(a.paid_from) == [
        R.PAYMENT_POOL_CONTRACT,
        R.PAYMENT_POOL_PREPAID,
        R.PAYMENT_POOL_OVERAGE,
    ]
    assert (iso(a.requested_at), iso(a.completed_at)) == (
        "2026-03-10T08:00:00Z",
        "2026-03-10T08:00:01.500000Z",
    )
    assert a.processing_time_ms == 1500 and a.period_id == "2026-03"

    b = records["job-b"]
    assert list(b.paid_from) == [R.PAYMENT_POOL_OVERAGE] and b.processing_time_ms == 3000

    c = records["job-c"]
    assert (c.status, c.success, list(c.paid_from)) == (R.USAGE_RECORD_STATUS_FAILED, False, [])
    assert iso(c.completed_at) == "2026-03-12T08:01:00Z" and c.processing_time_ms == 60000

    d = records["job-d"]
    assert d.status == R.USAGE_RECORD_STATUS_RELEASED
    assert iso(d.requested_at) == "2026-03-15T12:00:00Z"
    assert not d.HasField("completed_at") and not d.HasField("processing_time_ms")

    e = records["job-e"]
    assert (e.status, e.success) == (R.USAGE_RECORD_STATUS_PENDING, False)
    assert [(m.metric, m.units) for m in e.metrics] == [("pages", 6)]
    assert iso(e.requested_at) == "2026-03-15T12:01:00Z"
    assert iso(e.hold_expires_at) == "2026-03-15T12:16:00Z"  # the default 900 s hold
    assert not e.HasField("completed_at")


async def test_pages_of_two_visit_every_record_once_newest_first(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """page_size=2 over five records gives pages of 2, 2 and 1 that visit each record exactly once."""
    await record_five_jobs(pagemeter_server, sdk)
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await sdk.list_usage_records("acme", page_size=2, page_token=token)
        pages.append([r.request_id for r in page.records])
        token = page.next_page_token
        if not token:
            break
        assert len(pages) < 5, "the pages never end"
    assert pages == [["job-e", "job-d"], ["job-c", "job-b"], ["job-a"]]

    followed = [r.request_id async for r in sdk.iter_usage_records("acme", page_size=2)]
    assert followed == NEWEST_FIRST


async def test_sync_client_reporting_calls(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """The blocking client reads history, statistics and every page of records alike."""
    await record_five_jobs(pagemeter_server, sdk)

    def read() -> tuple[list[str], int, int]:
        with PagemeterClient(pagemeter_server.target) as client:
            records = [r.request_id for r in client.iter_usage_records("acme", page_size=2)]
            history = client.get_usage_history("acme", months=2)
            stats = client.get_usage_statistics(
                "acme", period="daily", start_date="2026-03-10", end_date="2026-03-11"
            )
            first = client.list_usage_records("acme", page_size=4)
            assert len(first.records) == 4 and first.next_page_token
        march_pages = by_metric(history.months[0])["pages"].committed
        return records, march_pages, stats.summary.totals.pages

    records, march_pages, stats_pages = await asyncio.to_thread(read)
    assert records == NEWEST_FIRST
    assert march_pages == 2155  # job-a and job-b; the failed, released and pending jobs add nothing
    assert stats_pages == 2155


async def test_page_size_over_1000_is_refused(sdk: AsyncPagemeterClient) -> None:
    """A page size over 1000 is INVALID_ARGUMENT."""
    await sdk.set_plan(eagle_plan())
    with pytest.raises(grpc.RpcError) as refused:
        await sdk.list_usage_records("acme", page_size=1001)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- retries and deadlines ----------------------------------------------------------------


def test_retry_policy_covers_the_reporting_service() -> None:
    """The channel's retry policy retries UNAVAILABLE on ReportingService too."""
    (method,) = json.loads(RetryPolicy().service_config())["methodConfig"]
    assert {"service": "pagemeter.v1.ReportingService"} in method["name"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


async def test_lost_reporting_answer_is_retried(
    connect: Connect, pagemeter_server: RunningServer
) -> None:
    """When the answer to a reporting call is lost, gRPC retries it and the call succeeds."""
    async with (
        CuttingProxy(pagemeter_server.port) as proxy,
        connect(proxy.target, initial_backoff=0.05) as client,
    ):
        await client.set_plan(eagle_plan())
        proxy.lose_next_answer()
        history = await client.get_usage_history("acme", months=1)
    assert proxy.cuts == 1 and proxy.connections == 2, "the first answer was really lost"
    assert [m.period_id for m in history.months] == ["2026-03"]


async def test_reporting_calls_carry_the_deadline(connect: Connect) -> None:
    """A reporting call to a server that never answers fails with DEADLINE_EXCEEDED at its timeout."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    listener = await asyncio.start_server(swallow, "127.0.0.1", 0)
    target = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        async with connect(target, timeout=60) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as late:
                await client.list_usage_records("acme", timeout=0.3)
    finally:
        listener.close()
        for writer in writers:
            writer.close()
        await listener.wait_closed()
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


async def test_expired_hold_is_listed_as_expired(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """A hold left to expire is listed as EXPIRED, without completion or expiry time."""
    await sdk.set_plan(eagle_plan())
    await sdk.check_quota("acme", {"pages": 4}, request_id="job-x", hold=True, hold_ttl=60)
    pending = (await sdk.list_usage_records("acme")).records[0]
    assert pending.status == R.USAGE_RECORD_STATUS_PENDING
    assert iso(pending.hold_expires_at) == "2026-03-15T12:01:00Z"
    pagemeter_server.clock.advance(120)
    (expired,) = (await sdk.list_usage_records("acme")).records
    assert (expired.request_id, expired.status) == ("job-x", R.USAGE_RECORD_STATUS_EXPIRED)
    assert not expired.HasField("completed_at") and not expired.HasField("hold_expires_at")
    assert iso(expired.requested_at) == "2026-03-15T12:00:00Z"


async def test_a_retried_record_is_listed_once(sdk: AsyncPagemeterClient) -> None:
    """A RecordUsage repeated with the same request_id is one usage record and one job in the statistics."""
    await sdk.set_plan(eagle_plan())
    for _ in range(2):
        await sdk.record_usage("acme", "job-1", {"pages": 3}, document_type="invoice")
    records = [r.request_id async for r in sdk.iter_usage_records("acme")]
    assert records == ["job-1"]
    stats = await sdk.get_usage_statistics("acme", start_date="2026-03-15", end_date="2026-03-15")
    assert totals(stats.summary.totals) == (3, 1, 0, 0)


async def test_statistics_shares_of_documents_and_the_untyped_row(
    sdk: AsyncPagemeterClient,
) -> None:
    """Without credits or pages the shares are of documents, and jobs without a type form the "" row."""
    await sdk.set_plan(eagle_plan(metrics=[metric_limits("documents")], name="Documents"))
    day = at("2026-03-10T09:00:00+00:00")
    for request_id, document_type in [("d1", "invoice"), ("d2", "invoice"), ("d3", "")]:
        await sdk.record_usage(
            "acme", request_id, {"documents": 1}, document_type=document_type, completed_at=day
        )
    await sdk.record_usage("acme", "d4", {"documents": 1}, completed_at=day)
    stats = await sdk.get_usage_statistics(
        "acme", start_date="2026-03-10", end_date="2026-03-10", group_by="document_type"
    )
    assert stats.percentage_basis == "documents"
    shares = [
        (t.document_type, t.totals.documents, round(t.percentage, 1))
        for t in stats.by_document_type
    ]
    assert shares == [("", 2, 50.0), ("invoice", 2, 50.0)] or (
        shares == [("invoice", 2, 50.0), ("", 2, 50.0)]
    )
    assert stats.summary.average_pages_per_document == 0


async def test_released_and_expired_holds_are_paid_from_no_pool(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient
) -> None:
    """A released or expired hold consumed nothing, so its record names no paying pool."""
    await sdk.set_plan(eagle_plan())
    await sdk.check_quota("acme", {"pages": 4}, request_id="job-r", hold=True)
    await sdk.release_quota("acme", "job-r")
    await sdk.check_quota("acme", {"pages": 6}, request_id="job-x", hold=True, hold_ttl=60)
    pagemeter_server.clock.advance(120)
    records = {r.request_id: r for r in (await sdk.list_usage_records("acme")).records}
    assert records["job-r"].status == R.USAGE_RECORD_STATUS_RELEASED
    assert records["job-x"].status == R.USAGE_RECORD_STATUS_EXPIRED
    assert list(records["job-r"].paid_from) == []
    assert list(records["job-x"].paid_from) == []
