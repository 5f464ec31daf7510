"""Usage statistics by day, week or month and by document type.

The parameters and their errors follow the DocuRift usage page: dates in ISO
8601, the last 30 days by default, at most one year, and each error carries the
page's code as a google.rpc.ErrorInfo reason. The figures are sums of the daily
counters record.lua keeps, so a range costs one hash read per day.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from pagemeter_server.domain.validation import invalid

DAILY, WEEKLY, MONTHLY = 1, 2, 3
BY_DATE, BY_DOCUMENT_TYPE, BY_BOTH = 1, 2, 3
DEFAULT_SPAN_DAYS = 30
# Inclusive ranges of up to 366 days: a leap year's 1 January to 31 December.
MAX_SPAN_DAYS = 366
EARLIEST, LATEST = date(2000, 1, 1), date(2100, 12, 31)

INVALID_PARAMETER = "INVALID_PARAMETER"
INVALID_DATE_FORMAT = "INVALID_DATE_FORMAT"
INVALID_DATE_RANGE = "INVALID_DATE_RANGE"
DATE_RANGE_TOO_LARGE = "DATE_RANGE_TOO_LARGE"


@dataclass(frozen=True)
class StatisticsQuery:
    period: int
    group_by: int
    start: date
    end: date

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


def parse_query(
    *, period: int, group_by: int, start_date: str, end_date: str, today: date, tz: ZoneInfo
) -> StatisticsQuery:
    """Validate the request's parameters and apply the defaults."""
    if period not in (0, DAILY, WEEKLY, MONTHLY):
        raise invalid("period", "period must be daily, weekly or monthly", INVALID_PARAMETER)
    if group_by not in (0, BY_DATE, BY_DOCUMENT_TYPE, BY_BOTH):
        raise invalid("group_by", "group_by must be date, document_type or both", INVALID_PARAMETER)
    end = _parse_date("end_date", end_date, tz) if end_date else today
    start = (
        _parse_date("start_date", start_date, tz)
        if start_date
        else end - timedelta(days=DEFAULT_SPAN_DAYS)
    )
    if start > end:
        raise invalid(
            "start_date",
            f"start_date must be before end_date (got {start} after {end})",
            INVALID_DATE_RANGE,
        )
    if (end - start).days >= MAX_SPAN_DAYS:
        raise invalid(
            "end_date",
            f"the range from start_date to end_date spans {(end - start).days + 1} days; "
            f"it may span at most 1 year ({MAX_SPAN_DAYS} days)",
            DATE_RANGE_TOO_LARGE,
        )
    return StatisticsQuery(period or MONTHLY, group_by or BY_DATE, start, end)


def _parse_date(name: str, text: str, tz: ZoneInfo) -> date:
    """An ISO 8601 date, or a date-time whose date in the plan's timezone is taken."""
    try:
        parsed = date.fromisoformat(text) if len(text) <= 10 else _date_of(text, tz)
    except ValueError:
        raise invalid(
            name,
            f"{name} must be an ISO 8601 date such as 2024-01-19 (got {text[:40]!r})",
            INVALID_DATE_FORMAT,
        ) from None
    if not EARLIEST <= parsed <= LATEST:
        raise invalid(name, f"{name} must be between {EARLIEST} and {LATEST}", INVALID_DATE_FORMAT)
    return parsed


def _date_of(text: str, tz: ZoneInfo) -> date:
    moment = datetime.fromisoformat(text)
    try:
        return moment.astimezone(tz).date() if moment.tzinfo else moment.date()
    except OverflowError:  # an offset that pushes the date past year 1 or 9999
        raise ValueError(text) from None


@dataclass
class Totals:
    """Units per metric and successful / failed jobs over some days."""

    units: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    documents: int = 0
    failed_documents: int = 0

    def measure(self, basis: str) -> int:
        return self.documents if basis == "documents" else self.units.get(basis, 0)


@dataclass
class DayUsage:
    total: Totals
    by_type: dict[str, Totals]


def parse_day(fields: Mapping[str, str | int]) -> DayUsage:
    """Split one day hash (see record.lua), as Redis returns it, or the field-wise sum
    of several (sum_fields), into its total and its document types."""
    total = Totals()
    by_type: dict[str, Totals] = defaultdict(Totals)
    for name, text in fields.items():
        kind, _, rest = name.partition(":")
        if kind == "tc":  # the most frequent field: a type's units of a metric
            document_type, _, metric = rest.rpartition(":")
            by_type[document_type].units[metric] += int(text)
        elif kind == "c":
            total.units[rest] += int(text)
        elif kind == "ok":
            total.documents += int(text)
        elif kind == "failed":
            total.failed_documents += int(text)
        elif kind == "tok":
            by_type[rest].documents += int(text)
        elif kind == "tfail":
            by_type[rest].failed_documents += int(text)
    return DayUsage(total, dict(by_type))


def sum_fields(days: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """The field-wise sum of day hashes.

    Every figure is a sum of day fields, so parsing the sum once gives what parsing
    each day and adding would, at a fraction of the cost: a year split by document
    type is some 200,000 fields, and every page of its answer needs the summary.
    """
    summed: dict[str, int] = {}
    get = summed.get
    for fields in days:
        for name, text in fields.items():
            summed[name] = get(name, 0) + int(text)
    return summed


def usage_of(days: Sequence[Mapping[str, str]]) -> DayUsage:
    """Total and document types over some day hashes."""
    return parse_day(days[0] if len(days) == 1 else sum_fields(days))


def bucket_label(day: date, period: int) -> str:
    """The row a day belongs to: the day itself, its week's Monday, or its month."""
    if period == DAILY:
        return day.isoformat()
    if period == WEEKLY:
        return (day - timedelta(days=day.weekday())).isoformat()
    return f"{day.year:04d}-{day.month:02d}"


@dataclass
class PeriodRow:
    """One row of the answer: its days' hashes, parsed only when the row is shown."""

    label: str
    first_day: date
    last_day: date
    days: list[Mapping[str, str]]

    def usage(self) -> DayUsage:
        return usage_of(self.days)


def period_rows(
    query: StatisticsQuery, days: Iterable[tuple[date, Mapping[str, str]]]
) -> list[PeriodRow]:
    """Rows of the requested period, newest first, including periods with no usage."""
    rows: dict[str, PeriodRow] = {}
    for day, fields in days:
        label = bucket_label(day, query.period)
        row = rows.get(label)
        if row is None:
            row = rows[label] = PeriodRow(label, day, day, [])
        row.last_day = day
        row.days.append(fields)
    return sorted(rows.values(), key=lambda row: row.first_day, reverse=True)


def percentage_basis(total: Totals) -> str:
    """What document-type shares are shares of: credits, else pages, else documents."""
    for metric in ("credits", "pages"):
        if total.units.get(metric, 0) > 0:
            return metric
    return "documents"


def share(part: Totals, whole: Totals, basis: str) -> float:
    denominator = whole.measure(basis)
    return round(part.measure(basis) / denominator * 100, 1) if denominator else 0.0


def average_pages_per_document(total: Totals) -> float:
    return round(total.units.get("pages", 0) / total.documents, 1) if total.documents else 0.0
