"""The `pagemeter history`, `stats` and `records` commands against a real server and Redis.

Usage is recorded through the SDK with the scenarios of test_client_reporting;
`cli.main([...])` then runs in a thread, as in test_cli, and its tables and
--json output are checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pagemeter_client import AsyncPagemeterClient
from pagemeter_server.ops.embedded import free_port
from tests.client.test_cli import Cli, row
from tests.client.test_client_reporting import (
    NEWEST_FIRST,
    record_five_jobs,
    record_statistics_usage,
    record_three_months,
)
from tests.conftest import START_MS, RunningServer, eagle_plan, metric_limits, ms


@pytest.fixture
def pagemeter(pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(pagemeter_server.target, capsys)


@pytest.fixture
async def sdk(pagemeter_server: RunningServer) -> AsyncIterator[AsyncPagemeterClient]:
    async with AsyncPagemeterClient(pagemeter_server.target) as client:
        yield client


def block(text: str, first_line_start: str) -> str:
    """The paragraph (lines between blank lines) whose first line starts with the given text."""
    return next(b for b in text.split("\n\n") if b.startswith(first_line_start))


def request_ids(text: str) -> list[str]:
    """The request ids of a `records` table, top to bottom."""
    table = block(text, "request id")
    return [line.split()[0] for line in table.splitlines()[1:]]


# -- history ------------------------------------------------------------------------------


async def test_history_table_shows_each_month_with_eagle_docs_names(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """history prints one block per month, newest first, with quotaUsed, overUsage and that month's ContractQuota and prices."""
    await record_three_months(pagemeter_server, sdk)
    history = await pagemeter("history", "acme", "--months", "4")
    assert history.code == 0, history.err
    assert row(history.out, "months:") == ["4,", "newest", "first"]
    months = [b.split()[0] for b in history.out.split("\n\n")[1:]]
    assert months == ["2026-03", "2026-02", "2026-01", "2025-12"]

    january = block(history.out, "2026-01")
    assert row(january, "2026-01") == ["2026-01-01T00:00:00Z", "..", "2026-02-01T00:00:00Z"]
    assert row(january, "plan:") == ["Business", "(version", "1)"]
    assert row(january, "jobs:") == ["1", "succeeded,", "0", "failed,", "1", "total"]
    assert row(january, " ") == ["documents", "pages"]  # the header of the metric columns
    assert row(january, "committed (quotaUsed)") == ["1", "2100"]
    assert row(january, "overage units (overUsage)") == ["0", "100"]
    assert row(january, "overage cost (overUsageCost)") == ["0", "2.8"]
    assert row(january, "contract quota (ContractQuota)") == ["500", "2000"]
    assert row(january, "hard limit") == ["none", "2500"]
    assert row(january, "price per unit (PricePerPage)") == ["0", "0.03"]
    assert row(january, "overage price (PricePerPageOverUsage)") == ["0", "0.028"]

    february = block(history.out, "2026-02")
    assert row(february, "plan:") == ["Business", "Plus", "(version", "2)"]
    assert row(february, "committed (quotaUsed)") == ["0", "1150"]
    assert row(february, "overage cost (overUsageCost)") == ["0", "7.5"]
    assert row(february, "contract quota (ContractQuota)") == ["500", "1000"]
    assert row(february, "overage price (PricePerPageOverUsage)") == ["0", "0.05"]

    december = block(history.out, "2025-12")
    assert december.splitlines()[1:] == ["plan: (no plan)", "jobs: 0 succeeded, 0 failed, 0 total"]


async def test_history_marks_terms_of_a_metric_the_plan_dropped(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """A metric used in a month whose plan at the month's end no longer has it shows "-" for its terms."""
    pagemeter_server.clock.set(ms("2026-02-02T09:00:00+00:00"))
    await sdk.set_plan(eagle_plan())
    await sdk.record_usage("acme", "feb-1", {"pages": 3, "documents": 1})
    pagemeter_server.clock.set(ms("2026-02-20T09:00:00+00:00"))
    pages_only = eagle_plan(metrics=[metric_limits("pages", contract_quota=100)])
    await sdk.set_plan(pages_only)
    pagemeter_server.clock.set(START_MS)

    history = await pagemeter("history", "acme", "--months", "2")
    assert history.code == 0, history.err
    february = block(history.out, "2026-02")
    assert row(february, " ") == ["documents", "pages"]
    assert row(february, "committed (quotaUsed)") == ["1", "3"]
    assert row(february, "contract quota (ContractQuota)") == ["-", "100"]
    assert row(february, "hard limit") == ["-", "none"]
    assert row(february, "price per unit (PricePerPage)") == ["-", "0"]
    march = block(history.out, "2026-03")
    assert row(march, " ") == ["pages"], "March has neither usage of documents nor the metric"


async def test_history_json_and_errors(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """history --json prints GetUsageHistoryResponse; 25 months is a server error with exit code 1."""
    await record_three_months(pagemeter_server, sdk)
    history = await pagemeter("history", "acme", "--months", "2", "--json")
    assert history.code == 0, history.err
    months = history.json()["months"]
    assert isinstance(months, list)
    assert [m["period_id"] for m in months] == ["2026-03", "2026-02"]
    february_pages = next(m for m in months[1]["metrics"] if m["metric"] == "pages")
    assert february_pages["committed"] == "1150" and february_pages["overage_units"] == "150"
    assert february_pages["overage_cost"] == "7.5"
    assert february_pages["terms"]["contract_quota"] == "1000"
    assert months[1]["jobs"] == {"succeeded": "1", "failed": "0", "total": "1"}

    too_many = await pagemeter("history", "acme", "--months", "25")
    assert too_many.code == 1 and too_many.out == ""
    assert too_many.err.startswith("error: INVALID_ARGUMENT: ")

    negative = await pagemeter("history", "acme", "--months", "-1")
    assert negative.code == 2 and "whole number >= 0" in negative.err


async def test_usage_shows_averages_lifetime_totals_and_the_previous_month(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """usage adds rows for the average per job and the lifetime total, and a line for the previous month."""
    await record_three_months(pagemeter_server, sdk)
    usage = await pagemeter("usage", "acme")
    assert usage.code == 0, usage.err
    assert row(usage.out, "average per job") == ["1", "30.5"]  # documents, pages
    assert row(usage.out, "lifetime committed") == ["3", "3311"]
    assert "jobs: 2 succeeded, 1 failed, 3 total" in usage.out
    assert (
        "previous month 2026-02: jobs 1 succeeded, 0 failed, 1 total; "
        "committed: pages 1150 (1150 per job)"
    ) in usage.out

    as_json = await pagemeter("usage", "acme", "--json")
    assert as_json.json()["previous_month"] == {
        "period_id": "2026-02",
        "year": 2026,
        "month": 2,
        "jobs": {"succeeded": "1", "failed": "0", "total": "1"},
        "metrics": [
            {"metric": "pages", "committed": "1150", "prepaid_used": "0", "average_per_job": 1150.0}
        ],
    }


# -- stats --------------------------------------------------------------------------------


async def test_stats_table_has_summary_periods_and_document_types(
    sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """stats prints the summary, the period rows (split by type with --group-by both) and each type's share."""
    await record_statistics_usage(sdk)
    stats = await pagemeter(
        "stats",
        "acme",
        "--period",
        "weekly",
        "--start",
        "2026-03-02",
        "--end",
        "2026-03-15",
        "--group-by",
        "both",
    )
    assert stats.code == 0, stats.err
    out = stats.out
    assert row(out, "dates:") == [
        "2026-03-02",
        "..",
        "2026-03-15",
        "(2026-03-02T00:00:00Z",
        "..",
        "2026-03-15T23:59:59Z)",
    ]
    assert (row(out, "period:"), row(out, "group by:")) == (["weekly"], ["both"])
    assert row(out, "documents:") == ["3"]
    assert row(out, "failed documents:") == ["1"]
    assert row(out, "pages:") == ["35"]
    assert row(out, "units:") == ["documents=1,pages=35"]
    assert row(out, "average pages per document:") == ["11.7"]
    assert row(out, "percentages of:") == ["pages"]

    periods = block(out, "by period")
    assert periods.splitlines()[1].split() == [
        "date",
        "documents",
        "failed",
        "pages",
        "credits",
        "units",
        "share",
    ]
    assert [line.split() for line in periods.splitlines()[2:]] == [
        ["2026-03-09", "1", "1", "20", "0", "pages=20"],
        ["invoice", "1", "1", "20", "0", "pages=20", "100.0%"],
        ["2026-03-02", "2", "0", "15", "0", "documents=1,pages=15"],
        ["invoice", "1", "0", "10", "0", "documents=1,pages=10", "66.7%"],
        ["receipt", "1", "0", "5", "0", "pages=5", "33.3%"],
    ]
    types = block(out, "by document type")
    assert row(types, "invoice") == ["2", "1", "30", "0", "documents=1,pages=30", "85.7%"]
    assert row(types, "receipt") == ["1", "0", "5", "0", "pages=5", "14.3%"]


async def test_stats_json_by_document_type(sdk: AsyncPagemeterClient, pagemeter: Cli) -> None:
    """stats --json prints GetUsageStatisticsResponse with each type's totals and percentage."""
    await record_statistics_usage(sdk)
    stats = await pagemeter(
        "stats",
        "acme",
        "--start",
        "2026-02-01",
        "--end",
        "2026-03-15",
        "--group-by",
        "document_type",
        "--json",
    )
    assert stats.code == 0, stats.err
    answer = stats.json()
    assert answer["period"] == "STATISTICS_PERIOD_MONTHLY"
    assert answer["group_by"] == "STATISTICS_GROUPING_DOCUMENT_TYPE"
    assert answer["by_period"] == [] and answer["percentage_basis"] == "pages"
    by_type = answer["by_document_type"]
    assert isinstance(by_type, list)
    assert [(t["document_type"], t["percentage"]) for t in by_type] == [
        ("invoice", 60.0),
        ("receipt", 40.0),
    ]
    assert by_type[1]["totals"] == {
        "credits": "0",
        "pages": "20",
        "documents": "2",
        "failed_documents": "0",
        "units": {"pages": "20"},
    }
    summary = answer["summary"]
    assert isinstance(summary, dict)
    assert summary["average_pages_per_document"] == 12.5  # 50 pages / 4 documents
    assert (summary["start_date"], summary["end_date"]) == ("2026-02-01", "2026-03-15")


async def test_stats_bad_input(pagemeter: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed date or period exits 2 before sending; a range the server refuses exits 1 with its reason."""
    nowhere = Cli(f"127.0.0.1:{free_port()}", capsys)  # nothing listens there
    bad_date = await nowhere("stats", "acme", "--start", "2026-3-1")
    assert bad_date.code == 2 and bad_date.out == ""
    assert "'2026-3-1' is not a date in the form YYYY-MM-DD" in bad_date.err
    impossible = await nowhere("stats", "acme", "--end", "2026-02-30")
    assert impossible.code == 2 and "'2026-02-30' is not a date" in impossible.err
    hourly = await nowhere("stats", "acme", "--period", "hourly")
    assert hourly.code == 2 and "invalid choice: 'hourly'" in hourly.err

    backwards = await pagemeter("stats", "acme", "--start", "2026-03-10", "--end", "2026-03-01")
    assert backwards.code == 1 and backwards.out == ""
    assert backwards.err.startswith("error: INVALID_ARGUMENT: ")
    assert "  reason: INVALID_DATE_RANGE (domain " in backwards.err


# -- records ------------------------------------------------------------------------------


async def test_records_table_and_pages(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """records prints one line per job and the next page token; following the tokens visits every job once."""
    await record_five_jobs(pagemeter_server, sdk)
    first = await pagemeter("records", "acme", "--page-size", "2")
    assert first.code == 0, first.err
    assert first.out.splitlines()[0].split("  ")[0] == "request id"
    assert [h.strip() for h in first.out.splitlines()[0].split("  ") if h.strip()] == [
        "request id",
        "status",
        "document type",
        "units",
        "pools paid",
        "requested at",
        "completed at",
        "processing ms",
    ]
    assert request_ids(first.out) == ["job-e", "job-d"]
    assert row(first.out, "job-e")[0] == "PENDING"
    assert row(first.out, "job-d")[0] == "RELEASED"

    seen = request_ids(first.out)
    out = first.out
    while "next page token:" in out:
        (token,) = row(out, "next page token:")
        page = await pagemeter("records", "acme", "--page-size", "2", "--page-token", token)
        assert page.code == 0, page.err
        seen += request_ids(page.out)
        out = page.out
        assert len(seen) <= 5, "the pages never end"
    assert seen == NEWEST_FIRST

    everything = await pagemeter("records", "acme", "--all", "--page-size", "2")
    assert request_ids(everything.out) == NEWEST_FIRST
    assert "next page token" not in everything.out
    assert row(everything.out, "job-a") == [
        "COMPLETED",
        "invoice",
        "documents=1,pages=2150",
        "contract+prepaid+overage",
        "2026-03-10T08:00:00Z",
        "2026-03-10T08:00:01Z",
        "1500",
    ]
    assert row(everything.out, "job-b")[-1] == "3000"
    assert row(everything.out, "job-c") == [
        "FAILED",
        "invoice",
        "pages=7",  # what the failed job reported; it consumed nothing
        "-",
        "2026-03-12T08:00:00Z",
        "2026-03-12T08:01:00Z",
        "60000",
    ]
    assert row(everything.out, "job-d")[-2:] == ["-", "-"], "no completion, no processing time"

    nothing = await pagemeter("records", "globex2")
    assert nothing.code == 0 and nothing.out == "no usage records\n"


async def test_records_json_and_flags(
    pagemeter_server: RunningServer, sdk: AsyncPagemeterClient, pagemeter: Cli
) -> None:
    """records --json prints one page with its token; --all --json prints every record and no token."""
    await record_five_jobs(pagemeter_server, sdk)
    page = await pagemeter("records", "acme", "--page-size", "3", "--json")
    assert page.code == 0, page.err
    records = page.json()["records"]
    assert isinstance(records, list)
    assert [r["request_id"] for r in records] == ["job-e", "job-d", "job-c"]
    assert records[2]["status"] == "USAGE_RECORD_STATUS_FAILED"
    assert records[2]["processing_time_ms"] == "60000"
    token = page.json()["next_page_token"]
    assert isinstance(token, str) and token

    rest = await pagemeter("records", "acme", "--page-token", token, "--json")
    rest_records = rest.json()["records"]
    assert isinstance(rest_records, list)
    assert [r["request_id"] for r in rest_records] == ["job-b", "job-a"]
    assert rest.json()["next_page_token"] == ""

    everything = await pagemeter("records", "acme", "--all", "--page-size", "2", "--json")
    all_records = everything.json()["records"]
    assert isinstance(all_records, list)
    assert [r["request_id"] for r in all_records] == NEWEST_FIRST
    assert everything.json()["next_page_token"] == ""

    both = await pagemeter("records", "acme", "--all", "--page-token", token)
    assert both.code == 2 and "not allowed with argument" in both.err
    too_big = await pagemeter("records", "acme", "--page-size", "1001")
    assert too_big.code == 1 and too_big.err.startswith("error: INVALID_ARGUMENT: ")


async def test_reporting_commands_without_a_plan(pagemeter: Cli) -> None:
    """The report commands answer for an organization with no plan and no usage (exit code 0)."""
    history = await pagemeter("history", "nobody", "--months", "1")
    assert history.code == 0, history.err
    assert "plan: (no plan)" in history.out
    records = await pagemeter("records", "nobody")
    assert (records.code, records.out) == (0, "no usage records\n")
