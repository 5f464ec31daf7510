"""gRPC handlers of ReportingService: usage history, statistics and records.

Reads only: nothing here is quota-limited or counted as usage, and nothing here
changes a counter.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any, overload
from zoneinfo import ZoneInfo

import grpc

from pagemeter.v1 import reporting_pb2, reporting_pb2_grpc
from pagemeter_server.api.auth import Access, Authenticator, authorized
from pagemeter_server.api.convert import job_counts
from pagemeter_server.domain import history, statistics
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.decisions import PlanVersion
from pagemeter_server.domain.errors import BadPageToken
from pagemeter_server.domain.page_tokens import ANSWER_BUDGET, decode_page_token, encode_page_token
from pagemeter_server.domain.periods import (
    Calendar,
    calendar,
    day_end_ms,
    day_start_ms,
    local_date,
    timestamp,
)
from pagemeter_server.domain.plans import MetricTerms, plan_token
from pagemeter_server.domain.validation import (
    Violations,
    bad_page_token,
    invalid,
    page_request,
    require_org_id,
)
from pagemeter_server.store.quota import Store
from pagemeter_server.store.replies import metric_check, metric_record, split_rows
from pagemeter_server.store.reports import RecordEntry, ReportStore

Context = grpc.aio.ServicerContext[Any, Any]


_POOLS = (
    (reporting_pb2.PAYMENT_POOL_CONTRACT, "included_units"),
    (reporting_pb2.PAYMENT_POOL_PREPAID, "prepaid_units"),
    (reporting_pb2.PAYMENT_POOL_OVERAGE, "overage_units"),
)


class ReportingService(reporting_pb2_grpc.ReportingServiceServicer):
    def __init__(
        self, store: Store, reports: ReportStore, clock: Clock, auth: Authenticator
    ) -> None:
        self.store = store
        self.auth = auth
        self.reports = reports
        self.clock = clock

    async def _calendar_and_plans(self, org_id: str) -> tuple[Calendar, list[PlanVersion]]:
        """The plan's billing calendar (or the service default's calendar months)
        and the plan log."""
        plan = await self.store.get_plan(org_id)
        token = plan_token(plan.doc) if plan else self.store.default_timezone
        versions = await self.reports.plan_versions(org_id) if plan else []
        if plan and not versions:
            # A plan stored before the plan log existed: its terms are all we know.
            versions = [PlanVersion(plan.version, 0, plan.doc)]
        return calendar(token), versions

    # -- history ----------------------------------------------------------------

    @authorized(Access.READ)
    async def GetUsageHistory(
        self, request: reporting_pb2.GetUsageHistoryRequest, context: Context
    ) -> reporting_pb2.GetUsageHistoryResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        if not 0 <= request.months <= history.MAX_MONTHS:
            problems.add("months", f"months must be between 1 and {history.MAX_MONTHS}")
        problems.raise_if_any()
        now_ms = self.clock.now_ms()
        billing, versions = await self._calendar_and_plans(request.org_id)
        months = history.last_months(now_ms, billing, request.months or history.DEFAULT_MONTHS)
        fields = await self.reports.months(request.org_id, [m.period_id for m in months])
        response = reporting_pb2.GetUsageHistoryResponse(
            org_id=request.org_id, timezone=billing.tz_name
        )
        for month, month_fields in zip(months, fields, strict=True):
            plan = history.plan_in_effect(versions, min(month.end_ms, now_ms + 1))
            figures = history.month_figures(month, month_fields, plan)
            response.months.append(_history_month(figures, month_fields))
        return response

    # -- statistics -------------------------------------------------------------

    @authorized(Access.READ)
    async def GetUsageStatistics(
        self, request: reporting_pb2.GetUsageStatisticsRequest, context: Context
    ) -> reporting_pb2.GetUsageStatisticsResponse:
        require_org_id(request.org_id)
        if not 0 <= request.page_size <= statistics.MAX_SPAN_DAYS:
            raise invalid(
                "page_size",
                f"page_size must be between 1 and {statistics.MAX_SPAN_DAYS} (0: as many as fit)",
                statistics.INVALID_PARAMETER,
            )
        now_ms = self.clock.now_ms()
        billing, _ = await self._calendar_and_plans(request.org_id)
        tz = billing.zone
        query = statistics.parse_query(
            period=request.period,
            group_by=request.group_by,
            start_date=request.start_date,
            end_date=request.end_date,
            today=local_date(now_ms, tz),
            tz=tz,
        )
        offset = _statistics_offset(request.org_id, query, request.page_token)
        days = query.days()
        day_hashes = await self.reports.days(request.org_id, days)
        response, rows = _statistics_response(
            request.org_id, tz, query, list(zip(days, day_hashes, strict=True))
        )
        return _statistics_page(request.org_id, query, response, rows, offset, request.page_size)

    # -- records ----------------------------------------------------------------

    @authorized(Access.READ)
    async def ListUsageRecords(
        self, request: reporting_pb2.ListUsageRecordsRequest, context: Context
    ) -> reporting_pb2.ListUsageRecordsResponse:
        page_size = page_request(request.org_id, request.page_size, request.page_token)
        try:
            page = await self.reports.records_page(request.org_id, page_size, request.page_token)
        except BadPageToken:
            raise bad_page_token() from None
        now_ms = self.clock.now_ms()
        return reporting_pb2.ListUsageRecordsResponse(
            records=[usage_record(entry, now_ms) for entry in page.records],
            next_page_token=page.next_page_token,
        )


STATISTICS = "statistics"


def _query_key(query: statistics.StatisticsQuery) -> str:
    """What a statistics page token is valid for: the same range, period and grouping."""
    return f"{query.start}/{query.end}/{query.period}/{query.group_by}"


def _statistics_offset(org_id: str, query: statistics.StatisticsQuery, token: str) -> int:
    """The first by_period row of the page a token asks for (0 without a token)."""
    if not token:
        return 0
    try:
        position = decode_page_token(token, STATISTICS, org_id)
    except BadPageToken:
        raise bad_page_token() from None
    offset, _, key = position.partition("@")
    if key != _query_key(query) or not offset.isdigit():
        raise invalid(
            "page_token",
            "page_token belongs to another range, period or grouping: send the same "
            "parameters as for the first page, or no token to start again",
            statistics.INVALID_PARAMETER,
        )
    return int(offset)


def _statistics_page(
    org_id: str,
    query: statistics.StatisticsQuery,
    response: reporting_pb2.GetUsageStatisticsResponse,
    rows: Sequence[reporting_pb2.PeriodUsage],
    offset: int,
    page_size: int,
) -> reporting_pb2.GetUsageStatisticsResponse:
    """Add the rows of one page: at most page_size, and only as many as fit the answer.

    The summary and the document types cover the whole range on every page; they
    are bounded by the organization's metric and document type caps.
    """
    budget = ANSWER_BUDGET - response.ByteSize()
    if budget <= 0:
        raise invalid(
            "end_date",
            "the answer for this range would pass the 4 MiB message limit even without "
            "rows; ask for a shorter range",
            statistics.DATE_RANGE_TOO_LARGE,
        )
    last = min(len(rows), offset + page_size) if page_size else len(rows)
    position = offset
    for position in range(offset, last):
        row = rows[position]
        budget -= row.ByteSize() + 6  # with its tag and length
        if budget < 0 and position > offset:
            break
        response.by_period.append(row)
    else:
        position = last
    if position < len(rows):
        response.next_page_token = encode_page_token(
            STATISTICS, org_id, f"{position}@{_query_key(query)}"
        )
    return response


def last_second_of(day: date, tz: ZoneInfo) -> int:
    """The last second of a day in the plan's timezone (DocuRift's "…T23:59:59Z").

    The summary and every period row end this way, so that one answer never
    uses two conventions for the end of a span.
    """
    return day_end_ms(day, tz) - 1000


def _history_month(
    figures: history.MonthFigures, month_fields: dict[str, int]
) -> reporting_pb2.HistoryMonth:
    month = figures.month
    row = reporting_pb2.HistoryMonth(
        period_id=month.period_id,
        year=month.year,
        month=month.month,
        period_start=timestamp(month.start_ms),
        period_end=timestamp(month.end_ms),
        jobs=job_counts(month_fields),
        plan_name=figures.plan.doc["name"] if figures.plan else "",
        plan_version=figures.plan.version if figures.plan else 0,
    )
    for m in figures.metrics:
        metric = reporting_pb2.MetricMonth(
            metric=m.metric,
            committed=m.committed,
            prepaid_used=m.prepaid_used,
            overage_units=m.overage_units,
            overage_cost=m.overage_cost,
        )
        if m.terms is not None:
            metric.terms.CopyFrom(_terms(m.terms))
        row.metrics.append(metric)
    return row


def _terms(plan_terms: MetricTerms) -> reporting_pb2.MonthTerms:
    terms = reporting_pb2.MonthTerms(
        overage_allowed=plan_terms["overage_allowed"],
        price_per_unit=plan_terms["price"],
        overage_price_per_unit=plan_terms["overage_price"],
    )
    if "contract_quota" in plan_terms:
        terms.contract_quota = plan_terms["contract_quota"]
    if "hard_limit" in plan_terms:
        terms.hard_limit = plan_terms["hard_limit"]
    return terms


def _totals(totals: statistics.Totals) -> reporting_pb2.UsageTotals:
    return reporting_pb2.UsageTotals(
        credits=totals.units.get("credits", 0),
        pages=totals.units.get("pages", 0),
        documents=totals.documents,
        failed_documents=totals.failed_documents,
        units={metric: units for metric, units in totals.units.items() if units},
    )


def _type_rows(
    by_type: dict[str, statistics.Totals], whole: statistics.Totals, basis: str
) -> list[reporting_pb2.DocumentTypeUsage]:
    ordered = sorted(by_type.items(), key=lambda item: (-item[1].measure(basis), item[0]))
    return [
        reporting_pb2.DocumentTypeUsage(
            document_type=document_type,
            totals=_totals(totals),
            percentage=statistics.share(totals, whole, basis),
        )
        for document_type, totals in ordered
    ]


def _statistics_response(
    org_id: str,
    tz: ZoneInfo,
    query: statistics.StatisticsQuery,
    days: list[tuple[date, dict[str, str]]],
) -> tuple[reporting_pb2.GetUsageStatisticsResponse, Sequence[reporting_pb2.PeriodUsage]]:
    """The answer without its rows, and its rows (built lazily: a page builds only its own)."""
    whole = statistics.usage_of([fields for _, fields in days])
    total, by_type = whole.total, whole.by_type
    basis = statistics.percentage_basis(total)
    response = reporting_pb2.GetUsageStatisticsResponse(
        org_id=org_id,
        timezone=tz.key,
        period=query.period,  # type: ignore[arg-type]
        group_by=query.group_by,  # type: ignore[arg-type]
        percentage_basis=basis,
        summary=reporting_pb2.StatisticsSummary(
            totals=_totals(total),
            average_pages_per_document=statistics.average_pages_per_document(total),
            period_start=timestamp(day_start_ms(query.start, tz)),
            period_end=timestamp(last_second_of(query.end, tz)),
            start_date=query.start.isoformat(),
            end_date=query.end.isoformat(),
        ),
    )
    if query.group_by in (statistics.BY_DOCUMENT_TYPE, statistics.BY_BOTH):
        response.by_document_type.extend(_type_rows(by_type, total, basis))
    rows: list[statistics.PeriodRow] = []
    if query.group_by in (statistics.BY_DATE, statistics.BY_BOTH):
        rows = statistics.period_rows(query, days)
    return response, _PeriodRows(rows, tz, basis, query.group_by == statistics.BY_BOTH)


class _PeriodRows(Sequence[reporting_pb2.PeriodUsage]):
    """The answer's period rows as messages, each built when first asked for."""

    def __init__(
        self, rows: list[statistics.PeriodRow], tz: ZoneInfo, basis: str, split_by_type: bool
    ) -> None:
        self.rows, self._tz, self._basis, self._split = rows, tz, basis, split_by_type

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> reporting_pb2.PeriodUsage: ...

    @overload
    def __getitem__(self, index: slice) -> list[reporting_pb2.PeriodUsage]: ...

    def __getitem__(
        self, index: int | slice
    ) -> reporting_pb2.PeriodUsage | list[reporting_pb2.PeriodUsage]:
        if isinstance(index, slice):
            return [self._message(row) for row in self.rows[index]]
        return self._message(self.rows[index])

    def _message(self, row: statistics.PeriodRow) -> reporting_pb2.PeriodUsage:
        usage = row.usage()
        period_row = reporting_pb2.PeriodUsage(
            date=row.label,
            start=timestamp(day_start_ms(row.first_day, self._tz)),
            end=timestamp(last_second_of(row.last_day, self._tz)),
            totals=_totals(usage.total),
        )
        if self._split:
            period_row.by_document_type.extend(_type_rows(usage.by_type, usage.total, self._basis))
        return period_row


# -- usage records ------------------------------------------------------------------

_FINAL_STATUS = {
    "completed": reporting_pb2.USAGE_RECORD_STATUS_COMPLETED,
    "failed": reporting_pb2.USAGE_RECORD_STATUS_FAILED,
    "released": reporting_pb2.USAGE_RECORD_STATUS_RELEASED,
}


def _record_status(
    fields: dict[str, str], now_ms: int
) -> reporting_pb2.UsageRecordStatus.ValueType:
    status = fields.get("st", "")
    if status == "held":
        live = int(fields.get("exp", "0")) > now_ms
        return (
            reporting_pb2.USAGE_RECORD_STATUS_PENDING
            if live
            else reporting_pb2.USAGE_RECORD_STATUS_EXPIRED
        )
    return _FINAL_STATUS.get(status, reporting_pb2.USAGE_RECORD_STATUS_UNSPECIFIED)


def _record_metrics(fields: dict[str, str], pending: bool) -> list[reporting_pb2.RecordMetricUsage]:
    """Units per metric with the pools that paid (or, while pending, that the hold reserves).

    A released or expired hold, and a failed job, consumed nothing: their units
    are shown with no split.

    The rows are read with the columns declared in store/replies.py.
    """
    if fields.get("st") == "failed" and fields.get("att"):
        # A failed job consumed nothing; its log shows the units it reported.
        return [
            reporting_pb2.RecordMetricUsage(metric=metric, units=int(units))
            for metric, units, _ in (part.split(":") for part in fields["att"].split(";"))
        ]
    if fields.get("res") is not None and fields.get("st") in ("completed", "failed"):
        recorded = [metric_record(row) for row in split_rows(fields["res"])]
        return [
            reporting_pb2.RecordMetricUsage(
                metric=m.metric,
                units=m.units,
                included_units=m.included,
                prepaid_units=m.prepaid,
                overage_units=m.overage,
            )
            for m in recorded
        ]
    checked = [metric_check(row) for row in split_rows(fields.get("cres", ""))]
    return [
        reporting_pb2.RecordMetricUsage(
            metric=m.metric,
            units=m.requested,
            included_units=m.included if pending else 0,
            prepaid_units=m.prepaid if pending else 0,
            overage_units=m.overage if pending else 0,
        )
        for m in checked
    ]


def usage_record(entry: RecordEntry, now_ms: int) -> reporting_pb2.UsageRecord:
    fields = entry.fields
    status = _record_status(fields, now_ms)
    metrics = _record_metrics(fields, status == reporting_pb2.USAGE_RECORD_STATUS_PENDING)
    record = reporting_pb2.UsageRecord(
        request_id=entry.request_id,
        status=status,
        success=status == reporting_pb2.USAGE_RECORD_STATUS_COMPLETED,
        document_type=fields.get("dt", ""),
        metrics=metrics,
        paid_from=[pool for pool, name in _POOLS if any(getattr(m, name) > 0 for m in metrics)],
        period_id=fields.get("mid", ""),
    )
    requested_ms = int(fields.get("rms") or entry.requested_ms)
    record.requested_at.CopyFrom(timestamp(requested_ms))
    if fields.get("cms"):
        completed_ms = int(fields["cms"])
        record.completed_at.CopyFrom(timestamp(completed_ms))
        record.processing_time_ms = max(0, completed_ms - requested_ms)
    if status == reporting_pb2.USAGE_RECORD_STATUS_PENDING:
        record.hold_expires_at.CopyFrom(timestamp(int(fields["exp"])))
    return record
