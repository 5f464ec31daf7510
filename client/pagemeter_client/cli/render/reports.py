"""Reports: usage statistics by period and document type, and the usage records."""

from __future__ import annotations

from collections.abc import Sequence

from pagemeter.v1 import reporting_pb2
from pagemeter_client.cli.render import text as fmt


def _statistics_word(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _totals_cells(totals: reporting_pb2.UsageTotals) -> list[str]:
    return [
        str(totals.documents),
        str(totals.failed_documents),
        str(totals.pages),
        str(totals.credits),
        fmt.pairs(sorted(totals.units.items())),
    ]


TOTALS_HEADERS = ["documents", "failed", "pages", "credits", "units"]


def _document_type(name: str) -> str:
    return name or "(none)"


def render_statistics(response: reporting_pb2.GetUsageStatisticsResponse) -> str:
    summary = response.summary
    totals = summary.totals
    period = reporting_pb2.StatisticsPeriod.Name(response.period)
    grouping = reporting_pb2.StatisticsGrouping.Name(response.group_by)
    span = f"{fmt.when(summary.period_start)} .. {fmt.when(summary.period_end)}"
    parts = [
        fmt.fields(
            [
                ("organization", response.org_id),
                ("timezone", response.timezone),
                ("dates", f"{summary.start_date} .. {summary.end_date} ({span})"),
                ("period", _statistics_word(period, "STATISTICS_PERIOD_")),
                ("group by", _statistics_word(grouping, "STATISTICS_GROUPING_")),
                ("documents", str(totals.documents)),
                ("failed documents", str(totals.failed_documents)),
                ("pages", str(totals.pages)),
                ("credits", str(totals.credits)),
                ("units", fmt.pairs(sorted(totals.units.items()))),
                ("average pages per document", fmt.number(summary.average_pages_per_document)),
                ("percentages of", response.percentage_basis or "-"),
            ]
        )
    ]
    if response.by_period:
        parts.append("by period\n" + _by_period_table(response.by_period))
    if response.by_document_type:
        rows = [
            [_document_type(t.document_type), *_totals_cells(t.totals), fmt.percent(t.percentage)]
            for t in response.by_document_type
        ]
        headers = ["document type", *TOTALS_HEADERS, "share"]
        parts.append("by document type\n" + fmt.table(headers, rows))
    return "\n\n".join(parts)


def _by_period_table(periods: Sequence[reporting_pb2.PeriodUsage]) -> str:
    # With group_by both, each period's split by document type follows it,
    # indented, with its share of that period.
    rows: list[list[str]] = []
    for period in periods:
        rows.append([period.date, *_totals_cells(period.totals), ""])
        rows.extend(
            [
                f"  {_document_type(t.document_type)}",
                *_totals_cells(t.totals),
                fmt.percent(t.percentage),
            ]
            for t in period.by_document_type
        )
    return fmt.table(["date", *TOTALS_HEADERS, "share"], rows)


POOL_WORDS = {
    reporting_pb2.PAYMENT_POOL_CONTRACT: "contract",
    reporting_pb2.PAYMENT_POOL_PREPAID: "prepaid",
    reporting_pb2.PAYMENT_POOL_OVERAGE: "overage",
}


def render_records(response: reporting_pb2.ListUsageRecordsResponse) -> str:
    if not response.records:
        text = "no usage records"
    else:
        rows = [_record_row(record) for record in response.records]
        headers = [
            "request id",
            "status",
            "document type",
            "units",
            "pools paid",
            "requested at",
            "completed at",
            "processing ms",
        ]
        text = fmt.table(headers, rows, left=7)
    if response.next_page_token:
        text += f"\n\nnext page token: {response.next_page_token}"
    return text


def _record_row(record: reporting_pb2.UsageRecord) -> list[str]:
    status = reporting_pb2.UsageRecordStatus.Name(record.status)
    pools = "+".join(POOL_WORDS.get(pool, str(pool)) for pool in record.paid_from)
    return [
        record.request_id,
        fmt.enum_word("USAGE_RECORD_STATUS_", status),
        record.document_type or "-",
        fmt.pairs([(m.metric, m.units) for m in record.metrics]),
        pools or "-",
        fmt.when(record.requested_at),
        fmt.when(record.completed_at),
        fmt.optional_int(record, "processing_time_ms", "-"),
    ]
