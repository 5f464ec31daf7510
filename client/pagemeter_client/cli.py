"""The `pagemeter` command: plans, credits, keys, checks, records, usage and reports.

Exit codes: 0 success; 1 the server answered with a gRPC error (printed as
`error: CODE: message` on stderr, with any google.rpc details; one line for
UNAUTHENTICATED, PERMISSION_DENIED and RESOURCE_EXHAUSTED), or `outbox flush`
left records undelivered; 2 bad command line or input file (nothing was sent);
3 `check` was answered "denied" (the decision is still printed, on stdout);
130 interrupted.

`pagemeter outbox status|flush|requeue|discard FILE` work on a client outbox
file (see pagemeter_client.outbox); only `flush` talks to the server.

Credentials come from $PAGEMETER_TOKEN (or --token, which other users of the
machine can see in the process list); TLS from --tls and the --tls-* options or
their environment variables. The token is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from pagemeter_client import _format as fmt
from pagemeter_client.outbox import FlushResult, Outbox, OutboxEntry, OutboxError, OutboxSummary
from pagemeter_client.sdk import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    STATISTICS_GROUPINGS,
    STATISTICS_PERIODS,
    PagemeterClient,
    error_details,
    is_tenant_key,
    reason_name,
)

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_INTERRUPTED = 130

TARGET_ENV = "PAGEMETER_TARGET"
TOKEN_ENV = "PAGEMETER_TOKEN"  # noqa: S105 (the name of a variable, not a token)
TLS_ENV = "PAGEMETER_TLS"
TLS_CA_ENV = "PAGEMETER_TLS_CA"
# Not PAGEMETER_TLS_CERT/KEY: those name the server's own certificate and key
# (pagemeter-server reads them), and a shell may have both set.
TLS_CERT_ENV = "PAGEMETER_TLS_CLIENT_CERT"
TLS_KEY_ENV = "PAGEMETER_TLS_CLIENT_KEY"
TLS_SERVER_NAME_ENV = "PAGEMETER_TLS_SERVER_NAME"
# What a call that never reached the server ends with.
UNREACHED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Errors about the caller's credentials: one line each, without the details.
ACCESS_ERRORS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The server's own rules, repeated so a typo is caught before anything is sent.
METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
PRICE = re.compile(r"\d{1,12}(\.\d{1,9})?")
SPEC_HELP = (
    "SPEC is NAME[:key=value,...] with keys quota, hard_limit, overage (yes/no), price, "
    "overage_price, period (monthly/none); e.g. "
    "pages:quota=2000,hard_limit=5000,overage=yes,price=0.03,overage_price=0.028"
)

Command = Callable[[PagemeterClient, argparse.Namespace], int]
# The outbox commands open the file themselves (and `flush` its client).
OutboxCommand = Callable[[argparse.Namespace], int]
# How long `outbox flush` waits for records another flusher holds: a lease lasts
# the holder's deadline plus its lease margin (5 + 30 s with the defaults).
FLUSH_WAIT_SECONDS = 60.0
# Characters of an outbox record's last error shown in the status table (--json: all).
ERROR_WIDTH = 60


# -- argument types -----------------------------------------------------------------------


def _whole_number(key: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise argparse.ArgumentTypeError(f"{key} must be a whole number >= 0 (got {value!r})")
    return int(value)


def _yes_no(key: str, value: str) -> bool:
    answers = {"yes": True, "true": True, "no": False, "false": False}
    if value.lower() not in answers:
        raise argparse.ArgumentTypeError(f"{key} must be yes, no, true or false (got {value!r})")
    return answers[value.lower()]


def _price(key: str, value: str) -> str:
    # Kept as the exact text: prices are decimal strings, never floats.
    if not PRICE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{key} must be a decimal number such as 0.028, at most 12 digits before "
            f"the point and 9 after (got {value!r})"
        )
    return value


def _period(key: str, value: str) -> plan_pb2.Period.ValueType:
    periods = {"monthly": plan_pb2.PERIOD_MONTHLY, "none": plan_pb2.PERIOD_NONE}
    if value.lower() not in periods:
        raise argparse.ArgumentTypeError(f"{key} must be monthly or none (got {value!r})")
    return periods[value.lower()]


def _set_spec_value(limits: plan_pb2.MetricLimits, key: str, value: str) -> None:
    if key == "quota":
        limits.contract_quota = _whole_number(key, value)
    elif key == "hard_limit":
        limits.hard_limit = _whole_number(key, value)
    elif key == "overage":
        limits.overage_allowed = _yes_no(key, value)
    elif key == "price":
        limits.price_per_unit = _price(key, value)
    elif key == "overage_price":
        limits.overage_price_per_unit = _price(key, value)
    elif key == "period":
        limits.period = _period(key, value)
    else:
        raise argparse.ArgumentTypeError(f"unknown key {key!r}")


def metric_spec(text: str) -> plan_pb2.MetricLimits:
    """Parse `pages:quota=2000,overage=yes,...` into MetricLimits (argparse type)."""
    try:
        return _parse_metric_spec(text)
    except argparse.ArgumentTypeError as problem:
        raise argparse.ArgumentTypeError(f"bad SPEC {text!r}: {problem}. {SPEC_HELP}") from None


def _parse_metric_spec(text: str) -> plan_pb2.MetricLimits:
    name, _, settings = text.partition(":")
    if not METRIC_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"metric name {name!r} must start with a lowercase letter and have at most 32 "
            "lowercase letters, digits and '_'"
        )
    limits = plan_pb2.MetricLimits(metric=name)
    seen: set[str] = set()
    for item in settings.split(",") if settings else []:
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        if key in seen:
            raise argparse.ArgumentTypeError(f"{key} is given twice")
        seen.add(key)
        _set_spec_value(limits, key, value)
    return limits


def unit_amount(text: str) -> tuple[str, int]:
    """Parse `pages=10` into ("pages", 10) (argparse type); negative amounts are allowed."""
    name, equals, amount = text.partition("=")
    try:
        if not equals or not name:
            raise ValueError
        return name, int(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not METRIC=UNITS (e.g. pages=10)") from None


def instant(text: str) -> datetime:
    """Parse an ISO 8601 time with its UTC offset (argparse type)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2026-03-15T11:00:00Z"
        ) from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset; add one, e.g. 2026-03-15T11:00:00Z"
        )
    return value


def calendar_date(text: str) -> date:
    """Parse a YYYY-MM-DD date (argparse type)."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date in the form YYYY-MM-DD (e.g. 2026-03-01)"
        ) from None


def positive_seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def count(text: str) -> int:
    """A whole number >= 0 (argparse type)."""
    return _whole_number("the value", text)


# -- output -------------------------------------------------------------------------------


def emit(args: argparse.Namespace, response: Message, render: Callable[[], str]) -> None:
    """Print the response: protobuf JSON with --json, else the readable rendering."""
    if args.json:
        print(
            json_format.MessageToJson(
                response,
                preserving_proto_field_name=True,
                # Zeros and false are figures too: print them, not just what is non-default.
                always_print_fields_with_no_presence=True,
            )
        )
    else:
        print(render())


def print_rpc_error(error: grpc.RpcError, target: str = "") -> None:
    """`error: CODE: message` on stderr, then the google.rpc details, one per line.

    Refusals of the caller's credentials (UNAUTHENTICATED, PERMISSION_DENIED,
    RESOURCE_EXHAUSTED) are one line, with a hint where it helps. A call that
    never reached the server (UNAVAILABLE or DEADLINE_EXCEEDED without a detail
    from it) gets a hint line: a TLS mismatch looks just like that.
    """
    details = error_details(error)
    if details.code in ACCESS_ERRORS:
        print(f"error: {_access_error_line(details.code, details.message)}", file=sys.stderr)
        return
    first, *more = details.lines()
    print(f"error: {first}", file=sys.stderr)
    for line in more:
        print(line, file=sys.stderr)
    if details.code in UNREACHED and not details.error_infos:
        print(
            f"  hint: is the server at {target or 'the target'} reachable, and do --tls and "
            "--tls-* match how it serves (plaintext, TLS or mutual TLS)?",
            file=sys.stderr,
        )


def _access_error_line(code: grpc.StatusCode, message: str) -> str:
    text = f"{code.name}: {' '.join(message.split())}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        text += f" (set {TOKEN_ENV}, or --token, to a valid token or API key)"
    return text


def _enum_name(enum_prefix: str, name: str) -> str:
    return name.removeprefix(enum_prefix)


def _period_word(period: plan_pb2.Period.ValueType) -> str:
    return "lifetime" if period == plan_pb2.PERIOD_NONE else "monthly"


def render_plan(plan: plan_pb2.Plan) -> str:
    header = fmt.fields(
        [
            ("organization", plan.org_id),
            ("plan", plan.name),
            ("version", str(plan.version)),
            ("updated at", fmt.when(plan.updated_at)),
            ("timezone", plan.timezone),
            ("currency", plan.currency or "USD"),
            ("api rate limit", f"{plan.api_rate_limit} req/s" if plan.api_rate_limit else "none"),
            ("api burst", str(plan.api_burst or plan.api_rate_limit)),
            ("processing priority", plan.processing_priority or "-"),
            ("support level", plan.support_level or "-"),
        ]
    )
    rows = [
        [
            m.metric,
            _period_word(m.period),
            fmt.optional_int(m, "contract_quota"),
            fmt.optional_int(m, "hard_limit", fmt.NONE),
            fmt.yes_no(m.overage_allowed),
            fmt.money(m.price_per_unit),
            fmt.money(m.overage_price_per_unit),
        ]
        for m in plan.metrics
    ]
    headers = ["metric", "period", "contract quota", "hard limit", "overage", "price"]
    metrics = fmt.table([*headers, "overage price"], rows)
    return f"{header}\n\n{metrics}"


def render_check(response: quota_pb2.CheckQuotaResponse) -> str:
    pairs = [
        ("allowed", fmt.yes_no(response.allowed)),
        ("reason", reason_name(response.reason)),
        ("request_id", response.request_id or "-"),
        ("held", _held_text(response)),
        ("duplicate", fmt.yes_no(response.duplicate)),
    ]
    if response.HasField("retry_after"):
        pairs.append(("retry after", f"{response.retry_after.ToTimedelta().total_seconds():g}s"))
    header = fmt.fields(pairs)
    if not response.metrics:
        return header
    columns = list(response.metrics)
    rows = [
        ["allowed", *(fmt.yes_no(d.allowed) for d in columns)],
        ["reason", *(reason_name(d.reason) for d in columns)],
        ["requested", *(str(d.requested) for d in columns)],
        ["committed before", *(str(d.committed) for d in columns)],
        ["held before", *(str(d.held) for d in columns)],
        ["contract quota", *(fmt.optional_int(d, "contract_quota") for d in columns)],
        ["hard limit", *(fmt.optional_int(d, "hard_limit", fmt.NONE) for d in columns)],
        ["overage allowed", *(fmt.yes_no(d.overage_allowed) for d in columns)],
        ["max admissible", *(fmt.optional_int(d, "max_admissible") for d in columns)],
        ["remaining after", *(fmt.optional_int(d, "remaining") for d in columns)],
        ["included units", *(str(d.included_units) for d in columns)],
        ["prepaid units", *(str(d.prepaid_units) for d in columns)],
        ["overage units", *(str(d.overage_units) for d in columns)],
        ["overage cost", *(fmt.money(d.overage_cost) for d in columns)],
        ["period", *(d.period_id for d in columns)],
    ]
    return f"{header}\n\n{fmt.table(['', *(d.metric for d in columns)], rows)}"


def _held_text(response: quota_pb2.CheckQuotaResponse) -> str:
    if not response.held:
        return "no"
    return f"yes, until {fmt.when(response.hold_expires_at)}"


def render_record(response: quota_pb2.RecordUsageResponse) -> str:
    status = quota_pb2.RecordStatus.Name(response.status)
    header = fmt.fields(
        [
            ("request_id", response.request_id),
            ("status", _enum_name("RECORD_STATUS_", status)),
            ("duplicate", fmt.yes_no(response.duplicate)),
            ("completed at", fmt.when(response.completed_at)),
            ("hold released", fmt.yes_no(response.hold_released)),
            ("hold expired", fmt.yes_no(response.hold_expired)),
            ("over limit", fmt.yes_no(response.over_limit)),
        ]
    )
    columns = list(response.metrics)
    rows = [
        ["units", *(str(m.units) for m in columns)],
        ["included units", *(str(m.included_units) for m in columns)],
        ["prepaid units", *(str(m.prepaid_units) for m in columns)],
        ["overage units", *(str(m.overage_units) for m in columns)],
        ["overage cost", *(fmt.money(m.overage_cost) for m in columns)],
        ["committed (quotaUsed)", *(str(m.committed) for m in columns)],
        ["contract quota", *(fmt.optional_int(m, "contract_quota") for m in columns)],
        ["hard limit", *(fmt.optional_int(m, "hard_limit", fmt.NONE) for m in columns)],
        ["over contract quota", *(fmt.yes_no(m.over_contract_quota) for m in columns)],
        ["over hard limit", *(fmt.yes_no(m.over_hard_limit) for m in columns)],
        ["overage not allowed", *(fmt.yes_no(m.overage_not_allowed) for m in columns)],
        ["period", *(m.period_id for m in columns)],
    ]
    return f"{header}\n\n{fmt.table(['', *(m.metric for m in columns)], rows)}"


def render_release(response: quota_pb2.ReleaseQuotaResponse) -> str:
    outcome = quota_pb2.ReleaseOutcome.Name(response.outcome)
    pairs = [("outcome", _enum_name("RELEASE_OUTCOME_", outcome))]
    pairs += [(f"released {m}", str(n)) for m, n in sorted(response.released_units.items())]
    return fmt.fields(pairs)


def render_usage(response: quota_pb2.GetUsageResponse) -> str:
    sub = response.subscription
    currency = sub.currency
    header = fmt.fields(
        [
            ("organization", response.org_id),
            ("month", response.period_id),
            ("period", f"{fmt.when(response.period_start)} .. {fmt.when(response.period_end)}"),
            ("timezone", response.timezone),
            ("plan", sub.plan_name if response.has_plan else "(no plan)"),
            ("api rate limit", f"{sub.api_rate_limit} req/s" if sub.api_rate_limit else "none"),
            ("processing priority", sub.processing_priority or "-"),
            ("support level", sub.support_level or "-"),
        ]
    )
    footer = f"jobs: {_jobs_text(response.jobs)}"
    if response.HasField("previous_month"):
        footer += "\n" + _previous_month_text(response.previous_month)
    if not response.metrics:
        return f"{header}\n\n{footer}"
    table = fmt.table(["", *(m.metric for m in response.metrics)], _usage_rows(response, currency))
    return f"{header}\n\n{table}\n\n{footer}"


def _jobs_text(jobs: quota_pb2.JobCounts) -> str:
    return f"{jobs.succeeded} succeeded, {jobs.failed} failed, {jobs.total} total"


def _previous_month_text(summary: quota_pb2.MonthSummary) -> str:
    """`previous month 2026-02: jobs ...; committed: pages 1150 (1150 per job), ...`."""
    text = f"previous month {summary.period_id}: jobs {_jobs_text(summary.jobs)}"
    if summary.metrics:
        text += "; committed: " + ", ".join(
            f"{m.metric} {m.committed} ({fmt.number(m.average_per_job)} per job)"
            for m in summary.metrics
        )
    return text


def _usage_rows(response: quota_pb2.GetUsageResponse, currency: str) -> list[list[str]]:
    # Eagle Doc's names in brackets: quotaUsed is committed, overUsage the overage units.
    columns = list(response.metrics)
    return [
        ["period", *(_period_word(m.period) for m in columns)],
        ["committed (quotaUsed)", *(str(m.committed) for m in columns)],
        ["held", *(str(m.held) for m in columns)],
        [
            "contract quota (contractQuota)",
            *(fmt.optional_int(m, "contract_quota") for m in columns),
        ],
        ["hard limit (hardLimit)", *(fmt.optional_int(m, "hard_limit", fmt.NONE) for m in columns)],
        ["overage allowed (overUsageAllowed)", *(fmt.yes_no(m.overage_allowed) for m in columns)],
        ["overage units (overUsage)", *(str(m.overage_units) for m in columns)],
        ["overage price (pricePerPageOverUsage)", *(m.overage_price_per_unit for m in columns)],
        ["overage cost (overUsageCost)", *(fmt.money(m.overage_cost, currency) for m in columns)],
        ["price per unit", *(m.price_per_unit for m in columns)],
        ["prepaid balance", *(str(m.prepaid_balance) for m in columns)],
        ["prepaid used", *(str(m.prepaid_used) for m in columns)],
        ["remaining", *(fmt.optional_int(m, "remaining") for m in columns)],
        ["usage %", *(_percent(m) for m in columns)],
        ["average per job", *(fmt.number(m.average_per_job) for m in columns)],
        ["lifetime committed", *(str(m.lifetime_committed) for m in columns)],
    ]


def _percent(usage: quota_pb2.MetricUsage) -> str:
    return f"{usage.usage_percent:.1f}%" if usage.HasField("usage_percent") else "-"


# -- reports ------------------------------------------------------------------------------


def render_history(response: reporting_pb2.GetUsageHistoryResponse) -> str:
    header = fmt.fields(
        [
            ("organization", response.org_id),
            ("timezone", response.timezone),
            ("months", f"{len(response.months)}, newest first"),
        ]
    )
    return "\n\n".join([header, *(_history_month(month) for month in response.months)])


def _history_month(month: reporting_pb2.HistoryMonth) -> str:
    plan = f"{month.plan_name} (version {month.plan_version})" if month.plan_name else "(no plan)"
    lines = [
        f"{month.period_id}  {fmt.when(month.period_start)} .. {fmt.when(month.period_end)}",
        f"plan: {plan}",
        f"jobs: {_jobs_text(month.jobs)}",
    ]
    if month.metrics:
        columns = list(month.metrics)
        lines.append(fmt.table(["", *(m.metric for m in columns)], _history_rows(columns)))
    return "\n".join(lines)


def _history_rows(columns: Sequence[reporting_pb2.MetricMonth]) -> list[list[str]]:
    # Eagle Doc's names in brackets, as on its history page: quotaUsed, and the
    # additionalInfo of the month's terms (ContractQuota, PricePerPage, ...).
    # "-" where the month had no plan with the metric.
    def term(text: Callable[[reporting_pb2.MonthTerms], str]) -> list[str]:
        return [text(m.terms) if m.HasField("terms") else "-" for m in columns]

    return [
        ["committed (quotaUsed)", *(str(m.committed) for m in columns)],
        ["prepaid used", *(str(m.prepaid_used) for m in columns)],
        ["overage units (overUsage)", *(str(m.overage_units) for m in columns)],
        ["overage cost (overUsageCost)", *(fmt.money(m.overage_cost) for m in columns)],
        ["contract quota (ContractQuota)", *term(lambda t: fmt.optional_int(t, "contract_quota"))],
        ["hard limit", *term(lambda t: fmt.optional_int(t, "hard_limit", fmt.NONE))],
        ["overage allowed", *term(lambda t: fmt.yes_no(t.overage_allowed))],
        ["price per unit (PricePerPage)", *term(lambda t: fmt.money(t.price_per_unit))],
        [
            "overage price (PricePerPageOverUsage)",
            *term(lambda t: fmt.money(t.overage_price_per_unit)),
        ],
    ]


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
        _enum_name("USAGE_RECORD_STATUS_", status),
        record.document_type or "-",
        fmt.pairs([(m.metric, m.units) for m in record.metrics]),
        pools or "-",
        fmt.when(record.requested_at),
        fmt.when(record.completed_at),
        fmt.optional_int(record, "processing_time_ms", "-"),
    ]


# -- keys, corrections and the audit trail ------------------------------------------------

SHOWN_ONCE = "This secret is shown once: pagemeter keeps only its digest and cannot show it again."


def _revoked_text(key: admin_pb2.ApiKey) -> str:
    return f"yes, at {fmt.when(key.revoked_at)}" if key.revoked else "no"


def api_key_fields(key: admin_pb2.ApiKey) -> list[tuple[str, str]]:
    return [
        ("key id", key.key_id),
        ("organization", key.org_id),
        ("name", key.name or "-"),
        ("created at", fmt.when(key.created_at)),
        ("last used at", fmt.when(key.last_used_at)),
        ("revoked", _revoked_text(key)),
    ]


def render_api_keys(response: admin_pb2.ListApiKeysResponse) -> str:
    if not response.keys:
        return "no API keys"
    rows = [
        [
            key.key_id,
            key.name or "-",
            fmt.when(key.created_at),
            fmt.when(key.last_used_at),
            fmt.when(key.revoked_at) if key.revoked else "-",
        ]
        for key in response.keys
    ]
    headers = ["key id", "name", "created at", "last used at", "revoked at"]
    return fmt.table(headers, rows, left=len(headers))


def render_adjustment(args: argparse.Namespace, response: admin_pb2.AdjustUsageResponse) -> str:
    return fmt.fields(
        [
            ("organization", args.org),
            ("metric", args.metric),
            ("period", response.period_id),
            ("committed before", str(response.committed_before)),
            ("committed after", str(response.committed_after)),
            ("duplicate", fmt.yes_no(response.duplicate)),
        ]
    )


def render_audit(response: admin_pb2.ListAuditEventsResponse) -> str:
    if not response.events:
        text = "no audit events"
    else:
        rows = [
            [fmt.when(e.at), e.actor, e.action, e.target or "-", e.reason or "-", e.event_id]
            for e in response.events
        ]
        headers = ["at", "actor", "action", "target", "reason", "event id"]
        text = fmt.table(headers, rows, left=len(headers))
    if response.next_page_token:
        text += f"\n\nnext page token: {response.next_page_token}"
    return text


# -- commands -----------------------------------------------------------------------------


class InputProblem(Exception):
    """Bad input found after parsing (e.g. in a --from-json file): exit 2, nothing sent."""


def _units(args: argparse.Namespace) -> dict[str, int]:
    units: dict[str, int] = {}
    for name, amount in args.units:
        if name in units:
            raise InputProblem(f"metric {name!r} is given twice")
        units[name] = amount
    return units


def _load_plan(path: str) -> plan_pb2.Plan:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        return json_format.Parse(text, plan_pb2.Plan())
    except (OSError, json_format.ParseError) as problem:
        raise InputProblem(f"cannot read a Plan from {path}: {problem}") from None


def plan_from_args(args: argparse.Namespace) -> plan_pb2.Plan:
    """The plan to send: the --from-json file (if any) with the flags given on top."""
    plan = _load_plan(args.from_json) if args.from_json else plan_pb2.Plan()
    if plan.org_id and plan.org_id != args.org:
        raise InputProblem(f"{args.from_json} is the plan of {plan.org_id!r}, not {args.org!r}")
    plan.org_id = args.org
    flags = {
        "name": args.name,
        "timezone": args.timezone,
        "api_rate_limit": args.rate_limit,
        "api_burst": args.burst,
        "processing_priority": args.priority,
        "support_level": args.support,
        "currency": args.currency,
    }
    for name, value in flags.items():
        if value is not None:
            setattr(plan, name, value)
    if args.metrics:
        del plan.metrics[:]
        plan.metrics.extend(args.metrics)
    if not args.from_json and (args.name is None or not args.metrics):
        raise InputProblem("plan set needs --name and at least one --metric (or --from-json)")
    return plan


def cmd_plan_set(client: PagemeterClient, args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    response = client.set_plan(plan)
    emit(args, response, lambda: render_plan(response.plan))
    return EXIT_OK


def cmd_plan_get(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.get_plan(args.org)
    emit(args, response, lambda: render_plan(response.plan))
    return EXIT_OK


def cmd_credits_grant(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.grant_credits(args.org, args.metric, args.units, args.grant_id, args.reason)
    rows = [("balance", str(response.balance)), ("duplicate", fmt.yes_no(response.duplicate))]
    emit(args, response, lambda: fmt.fields(rows))
    return EXIT_OK


def cmd_check(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.check_quota(
        args.org,
        _units(args),
        request_id=args.request_id,
        hold=args.hold,
        hold_ttl=args.hold_ttl,
    )
    emit(args, response, lambda: render_check(response))
    return EXIT_OK if response.allowed else EXIT_DENIED


def cmd_record(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.record_usage(
        args.org,
        args.request_id,
        _units(args),
        success=not args.failed,
        document_type=args.document_type,
        requested_at=args.requested_at,
        completed_at=args.completed_at,
    )
    emit(args, response, lambda: render_record(response))
    return EXIT_OK


def cmd_release(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.release_quota(args.org, args.request_id)
    emit(args, response, lambda: render_release(response))
    return EXIT_OK


def read_org(args: argparse.Namespace) -> str:
    """The org_id of a read: ORG, or "" with a tenant API key (pagemeter takes it from the key)."""
    tenant = is_tenant_key(args.token)
    if not args.org:
        if not tenant:
            raise InputProblem(
                "ORG is required; it may be left out only with a tenant API key (pmk_...), "
                "whose organization pagemeter takes from the key"
            )
        return ""
    if tenant:
        raise InputProblem(
            "a tenant API key reads only its own organization, which pagemeter takes from "
            "the key: leave ORG out"
        )
    org: str = args.org
    return org


def cmd_usage(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.get_usage(read_org(args), year=args.year, month=args.month)
    emit(args, response, lambda: render_usage(response))
    return EXIT_OK


def cmd_history(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.get_usage_history(read_org(args), months=args.months)
    emit(args, response, lambda: render_history(response))
    return EXIT_OK


def cmd_stats(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.get_usage_statistics(
        read_org(args),
        period=args.period,
        start_date=args.start,
        end_date=args.end,
        group_by=args.group_by,
    )
    emit(args, response, lambda: render_statistics(response))
    return EXIT_OK


def cmd_records(client: PagemeterClient, args: argparse.Namespace) -> int:
    org_id = read_org(args)
    if args.all:
        # Every page, printed as one answer (with --json: one ListUsageRecordsResponse).
        records = client.iter_usage_records(org_id, page_size=args.page_size)
        response = reporting_pb2.ListUsageRecordsResponse(records=list(records))
    else:
        response = client.list_usage_records(
            org_id, page_size=args.page_size, page_token=args.page_token
        )
    emit(args, response, lambda: render_records(response))
    return EXIT_OK


def cmd_keys_create(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.create_api_key(args.org, args.name)
    pairs = [*api_key_fields(response.key), ("secret", response.secret)]
    emit(args, response, lambda: fmt.fields(pairs) + "\n")
    # With --json on stderr, so that stdout stays one JSON document.
    print(SHOWN_ONCE, file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_keys_list(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.list_api_keys(args.org)
    emit(args, response, lambda: render_api_keys(response))
    return EXIT_OK


def cmd_keys_revoke(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.revoke_api_key(args.org, args.key_id)
    pairs = [
        *api_key_fields(response.key),
        ("already revoked", fmt.yes_no(response.already_revoked)),
    ]
    emit(args, response, lambda: fmt.fields(pairs))
    return EXIT_OK


def cmd_adjust(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.adjust_usage(
        args.org,
        args.metric,
        args.units,
        reason=args.reason,
        adjustment_id=args.adjustment_id,
        year=args.year,
        month=args.month,
    )
    emit(args, response, lambda: render_adjustment(args, response))
    return EXIT_OK


def cmd_audit(client: PagemeterClient, args: argparse.Namespace) -> int:
    if args.all:
        # Every page, printed as one answer (with --json: one ListAuditEventsResponse).
        events = client.iter_audit_events(args.org, page_size=args.page_size)
        response = admin_pb2.ListAuditEventsResponse(events=list(events))
    else:
        response = client.list_audit_events(args.org, args.page_size, args.page_token)
    emit(args, response, lambda: render_audit(response))
    return EXIT_OK


# -- the outbox ---------------------------------------------------------------------------


def _instant_text(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _clip(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _open_outbox(args: argparse.Namespace) -> Outbox:
    try:
        return Outbox(args.file, create=False)
    except OutboxError as problem:
        raise InputProblem(str(problem)) from None


def _entry_state(entry: OutboxEntry, now: datetime) -> str:
    return "sending" if entry.state == "pending" and entry.in_flight(now) else entry.state


def render_outbox_status(
    path: str, summary: OutboxSummary, entries: Sequence[OutboxEntry], now: datetime
) -> str:
    sending = f" ({summary.in_flight} being sent)" if summary.in_flight else ""
    header = fmt.fields(
        [
            ("outbox", path),
            ("pending", f"{summary.pending}{sending}"),
            ("dead letters", str(summary.dead)),
            ("oldest pending", _instant_text(summary.oldest_pending)),
            ("next attempt", _instant_text(summary.next_attempt_at)),
        ]
    )
    if not entries:
        return f"{header}\n\nno records"
    rows = [
        [
            str(entry.id),
            _entry_state(entry, now),
            entry.org_id,
            entry.request_id,
            fmt.pairs(sorted(entry.units.items())),
            fmt.yes_no(entry.success),
            entry.document_type or "-",
            _instant_text(entry.completed_at),
            str(entry.attempts),
            _instant_text(entry.next_attempt_at),
            _clip(f"{entry.last_code}: {entry.last_error}") if entry.last_code else "-",
        ]
        for entry in entries
    ]
    headers = [
        "id",
        "state",
        "organization",
        "request id",
        "units",
        "success",
        "document type",
        "completed at",
        "attempts",
        "next attempt",
        "last error",
    ]
    table = fmt.table(headers, rows, left=len(headers))
    shown = len(entries)
    total = summary.pending + summary.dead
    if shown < total:
        table += f"\n\n{total - shown} more (--limit 0 shows all)"
    return f"{header}\n\n{table}"


def render_flush(result: FlushResult) -> str:
    fields = [
        ("delivered", f"{result.delivered} ({result.count('duplicate')} already recorded)"),
        ("deferred", str(result.count("deferred"))),
        ("rejected", str(result.count("rejected"))),
        ("pending now", str(result.pending)),
        ("dead letters", str(result.dead)),
    ]
    if result.leased:
        fields.append(("leased", f"{result.leased} by another flusher {_lease_end(result)}"))
    header = fmt.fields(fields)
    if not result.outcomes:
        return f"{header}\n\nnothing to send"
    rows = [
        [
            str(o.entry_id),
            o.org_id,
            o.request_id,
            "already recorded" if o.outcome == "duplicate" else o.outcome,
            _clip(f"{o.code}: {o.message}") if o.code else "-",
        ]
        for o in result.outcomes
    ]
    headers = ["id", "organization", "request id", "result", "error"]
    return f"{header}\n\n{fmt.table(headers, rows, left=len(headers))}"


def cmd_outbox_status(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        summary = outbox.summary()
        entries = outbox.entries(limit=args.limit or None)
        now = outbox.now()
    if args.json:
        document = {
            "outbox": args.file,
            "pending": summary.pending,
            "dead": summary.dead,
            "in_flight": summary.in_flight,
            "oldest_pending": _json_time(summary.oldest_pending),
            "next_attempt_at": _json_time(summary.next_attempt_at),
            "records": [entry.as_dict() for entry in entries],
        }
        print(json.dumps(document, indent=2))
    else:
        print(render_outbox_status(args.file, summary, entries, now))
    return EXIT_OK


def _json_time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _lease_end(result: FlushResult) -> str:
    if result.leased_until is None:
        return ""
    return "until " + result.leased_until.astimezone(UTC).isoformat(timespec="seconds")


def _flush_and_wait(
    client: PagemeterClient, outbox: Outbox, args: argparse.Namespace
) -> FlushResult:
    """Delivery passes until no record is held by another flusher, or --wait runs out.

    A record another pass or a first attempt holds is left alone until its
    lease ends (the holder may still be sending it, or may have died: nothing
    tells them apart); then a pass here takes it over. The result joins every
    pass's outcomes; its counts are those after the last pass.
    """
    limit: int | None = args.limit or None
    give_up = time.monotonic() + args.wait
    passes = [client.flush_outbox(force=True, limit=limit)]
    told = False
    while True:
        last = passes[-1]
        tried = sum(len(p.outcomes) for p in passes)
        if last.stopped is not None or not last.leased or (limit and tried >= limit):
            break
        first_end = outbox.summary().first_lease_ends
        if first_end is not None:  # else the leases ended meanwhile: take them over now
            wait_for = (first_end - outbox.now()).total_seconds()
            if time.monotonic() + wait_for > give_up:
                break
            if not told:
                print(
                    f"waiting for {last.leased} record(s) leased by another flusher "
                    f"{_lease_end(last)} (at most {args.wait:g} s; --wait 0 does not wait)",
                    file=sys.stderr,
                )
                told = True
            time.sleep(max(0.0, min(wait_for, 1.0)) + 0.05)
        elif time.monotonic() > give_up:
            break
        passes.append(client.flush_outbox(force=True, limit=limit and limit - tried))
    return FlushResult(
        outcomes=tuple(o for p in passes for o in p.outcomes),
        pending=passes[-1].pending,
        dead=passes[-1].dead,
        stopped=passes[-1].stopped,
        leased=passes[-1].leased,
        leased_until=passes[-1].leased_until,
    )


def cmd_outbox_flush(args: argparse.Namespace) -> int:
    with (
        _open_outbox(args) as outbox,
        make_client(args, outbox=outbox, flush_outbox_on_close=False) as client,
    ):
        result = _flush_and_wait(client, outbox, args)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(render_flush(result))
    if result.stopped is not None:
        print(f"error: {result.stopped}", file=sys.stderr)
        print(
            f"  hint: is the server at {args.target} reachable, and do --tls and --tls-* match "
            "how it serves? The records stay in the outbox.",
            file=sys.stderr,
        )
    rejected = result.count("rejected")
    if rejected:
        print(
            f"error: pagemeter refused {rejected} record(s); kept as dead letters, never re-sent "
            f"unless requeued (pagemeter outbox status {args.file})",
            file=sys.stderr,
        )
    if result.leased and result.stopped is None:
        print(
            f"error: {result.leased} record(s) still leased by another flusher "
            f"{_lease_end(result)}: it may still be sending them, or have died; run flush "
            "again after that time (or with a longer --wait) to send them",
            file=sys.stderr,
        )
    return EXIT_OK if result.ok and not result.leased else EXIT_RPC_ERROR


def cmd_outbox_requeue(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        count = outbox.requeue(args.ids or None)
    print(json.dumps({"requeued": count}) if args.json else f"requeued: {count}")
    return EXIT_OK


def cmd_outbox_discard(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        count = outbox.discard(args.ids)
    print(json.dumps({"discarded": count}) if args.json else f"discarded: {count}")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def _global_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, for the top parser and (again) every subcommand.

    --target, --timeout, --json, the credential (--token) and TLS (--tls, --tls-*).

    Only the top parser's copy has defaults. The subcommands' copies default to
    SUPPRESS, so an option given before the subcommand is not reset by the
    subcommand's parser, and one given after it still counts. (Two separate
    copies: parsers built with `parents=` share the option objects, defaults too.)
    """

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=default(os.environ.get(TARGET_ENV) or DEFAULT_TARGET),
        help=f"server address (env {TARGET_ENV}; default {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=positive_seconds,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the response as protobuf JSON (field names as in the .proto)",
    )
    common.add_argument(
        "--token",
        default=default(os.environ.get(TOKEN_ENV) or None),
        help=(
            "admin or service token, or tenant API key, sent as 'authorization: Bearer'. "
            f"Prefer the environment variable {TOKEN_ENV} (the default): command-line "
            "arguments are visible to other users of the machine"
        ),
    )
    common.add_argument(
        "--tls",
        action="store_true",
        default=default(_env_flag(TLS_ENV)),
        help=f"connect with TLS, checking the server against the system's CAs (env {TLS_ENV}=1); "
        "implied by the other --tls-* options",
    )
    common.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=default(os.environ.get(TLS_CA_ENV) or None),
        help=f"PEM file of the CA that signed the server's certificate (env {TLS_CA_ENV})",
    )
    common.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=default(os.environ.get(TLS_CERT_ENV) or None),
        help=f"client certificate (PEM) for mutual TLS, with --tls-key (env {TLS_CERT_ENV})",
    )
    common.add_argument(
        "--tls-key",
        metavar="FILE",
        default=default(os.environ.get(TLS_KEY_ENV) or None),
        help=f"client private key (PEM) for mutual TLS, with --tls-cert (env {TLS_KEY_ENV})",
    )
    common.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=default(os.environ.get(TLS_SERVER_NAME_ENV) or None),
        help="check the server's certificate for NAME instead of the --target host "
        f"(env {TLS_SERVER_NAME_ENV})",
    )
    return common


def _env_flag(name: str) -> bool:
    """An on/off environment variable: 1, true, yes or on (any case) is on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _add_plan_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    plan = commands.add_parser("plan", help="set or read an organization's plan")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")
    set_ = plan_commands.add_parser(
        "set", parents=[common], help="create or replace a plan", epilog=SPEC_HELP
    )
    set_.add_argument("org", metavar="ORG")
    set_.add_argument("--name", help="plan name, e.g. Business")
    set_.add_argument("--timezone", help="IANA timezone of the billing months")
    set_.add_argument("--rate-limit", type=count, help="CheckQuota calls per second (0: none)")
    set_.add_argument("--burst", type=count, help="calls allowed at once above the rate")
    set_.add_argument("--priority", help="processing priority (display only)")
    set_.add_argument("--support", help="support level (display only)")
    set_.add_argument("--currency", help="ISO 4217 code of the prices (default USD)")
    set_.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        type=metric_spec,
        metavar="SPEC",
        help="one metric's limits; repeat for each metric",
    )
    set_.add_argument("--from-json", metavar="FILE", help="a Plan in protobuf JSON ('-': stdin)")
    set_.set_defaults(run=cmd_plan_set)
    get = plan_commands.add_parser("get", parents=[common], help="show a plan")
    get.add_argument("org", metavar="ORG")
    get.set_defaults(run=cmd_plan_get)


def _add_credit_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    credits = commands.add_parser("credits", help="prepaid credits")
    credit_commands = credits.add_subparsers(
        dest="credits_command", required=True, metavar="COMMAND"
    )
    grant = credit_commands.add_parser(
        "grant", parents=[common], help="add prepaid credits (once per --grant-id)"
    )
    grant.add_argument("org", metavar="ORG")
    grant.add_argument("metric", metavar="METRIC")
    grant.add_argument("units", metavar="UNITS", type=count)
    grant.add_argument("--grant-id", required=True, help="idempotency key of this grant")
    grant.add_argument("--reason", default="", help="why (purchase reference, goodwill, ...)")
    grant.set_defaults(run=cmd_credits_grant)


def _add_job_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    check = commands.add_parser(
        "check", parents=[common], help="may these units be used now? (exit 3: denied)"
    )
    check.add_argument("org", metavar="ORG")
    check.add_argument("units", metavar="METRIC=UNITS", nargs="+", type=unit_amount)
    check.add_argument("--hold", action="store_true", help="reserve the units for the job")
    check.add_argument("--request-id", help="the job's id (made up with --hold when omitted)")
    check.add_argument(
        "--hold-ttl",
        type=positive_seconds,
        metavar="SECONDS",
        help="how long the hold lives (default: the server's)",
    )
    check.set_defaults(run=cmd_check)

    record = commands.add_parser("record", parents=[common], help="record a finished job")
    record.add_argument("org", metavar="ORG")
    record.add_argument("request_id", metavar="REQUEST_ID")
    record.add_argument("units", metavar="METRIC=UNITS", nargs="+", type=unit_amount)
    record.add_argument(
        "--failed", action="store_true", help="the job failed: count it, consume nothing"
    )
    record.add_argument("--document-type", default="", help="e.g. invoice")
    record.add_argument(
        "--completed-at",
        type=instant,
        metavar="ISO8601",
        help="when the job finished (default: now)",
    )
    record.add_argument(
        "--requested-at", type=instant, metavar="ISO8601", help="when the job was requested"
    )
    record.set_defaults(run=cmd_record)

    release = commands.add_parser("release", parents=[common], help="drop a job's hold")
    release.add_argument("org", metavar="ORG")
    release.add_argument("request_id", metavar="REQUEST_ID")
    release.set_defaults(run=cmd_release)

    usage = commands.add_parser("usage", parents=[common], help="one month's usage")
    _add_read_org(usage)
    usage.add_argument("--year", type=int, help="2020-2100, with --month")
    usage.add_argument("--month", type=int, help="1-12, with --year")
    usage.set_defaults(run=cmd_usage)


def _add_read_org(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "org",
        metavar="ORG",
        nargs="?",
        default="",
        help="the organization; leave it out with a tenant API key, which names its own",
    )


def _add_admin_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    keys = commands.add_parser("keys", help="tenant API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = key_commands.add_parser(
        "create", parents=[common], help="make an API key (its secret is shown once)"
    )
    create.add_argument("org", metavar="ORG")
    create.add_argument("--name", default="", help="a label, e.g. 'billing page'")
    create.set_defaults(run=cmd_keys_create)
    list_ = key_commands.add_parser("list", parents=[common], help="an organization's keys")
    list_.add_argument("org", metavar="ORG")
    list_.set_defaults(run=cmd_keys_list)
    revoke = key_commands.add_parser(
        "revoke", parents=[common], help="revoke a key (its next call is refused)"
    )
    revoke.add_argument("org", metavar="ORG")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(run=cmd_keys_revoke)

    adjust = commands.add_parser(
        "adjust", parents=[common], help="correct a month's committed units (once per --id)"
    )
    adjust.add_argument("org", metavar="ORG")
    adjust.add_argument("metric", metavar="METRIC")
    adjust.add_argument(
        "units", metavar="UNITS", type=int, help="units to add, or to remove when negative"
    )
    adjust.add_argument("--reason", required=True, help="why (ticket, refund reference, ...)")
    adjust.add_argument(
        "--id", dest="adjustment_id", required=True, help="idempotency key of this correction"
    )
    adjust.add_argument("--year", type=int, help="2020-2100, with --month (default: this month)")
    adjust.add_argument("--month", type=int, help="1-12, with --year")
    adjust.set_defaults(run=cmd_adjust)

    audit = commands.add_parser(
        "audit", parents=[common], help="an organization's audit trail, newest first"
    )
    audit.add_argument("org", metavar="ORG")
    audit.add_argument(
        "--page-size", type=count, default=0, help="events per page, 1-1000 (default 50)"
    )
    pages = audit.add_mutually_exclusive_group()
    pages.add_argument(
        "--page-token", default="", help="the next page token printed by the previous page"
    )
    pages.add_argument("--all", action="store_true", help="follow the pages to the last one")
    audit.set_defaults(run=cmd_audit)


def _add_report_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    history = commands.add_parser(
        "history", parents=[common], help="usage and contract terms month by month"
    )
    _add_read_org(history)
    history.add_argument(
        "--months", type=count, default=0, help="how many months, 1-24 (default 12)"
    )
    history.set_defaults(run=cmd_history)

    stats = commands.add_parser(
        "stats", parents=[common], help="usage by day, week or month and by document type"
    )
    _add_read_org(stats)
    stats.add_argument(
        "--period", choices=list(STATISTICS_PERIODS), help="length of the rows (default monthly)"
    )
    stats.add_argument(
        "--start",
        type=calendar_date,
        metavar="YYYY-MM-DD",
        help="first day (default: 30 days before --end)",
    )
    stats.add_argument(
        "--end",
        type=calendar_date,
        metavar="YYYY-MM-DD",
        help="last day, included (default: today in the plan's timezone)",
    )
    stats.add_argument(
        "--group-by",
        choices=list(STATISTICS_GROUPINGS),
        help="date rows, document type rows, or both (default date)",
    )
    stats.set_defaults(run=cmd_stats)

    records = commands.add_parser(
        "records", parents=[common], help="usage records (jobs), newest first"
    )
    _add_read_org(records)
    records.add_argument(
        "--page-size", type=count, default=0, help="records per page, 1-1000 (default 50)"
    )
    pages = records.add_mutually_exclusive_group()
    pages.add_argument(
        "--page-token", default="", help="the next page token printed by the previous page"
    )
    pages.add_argument("--all", action="store_true", help="follow the pages to the last one")
    records.set_defaults(run=cmd_records)


def _add_outbox_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    outbox = commands.add_parser(
        "outbox", help="a client outbox file: RecordUsage calls waiting for delivery"
    )
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")
    status = outbox_commands.add_parser(
        "status", parents=[common], help="count and list the records (no server needed)"
    )
    status.add_argument("file", metavar="FILE")
    status.add_argument(
        "--limit", type=count, default=50, help="records listed, oldest first (0: all; default 50)"
    )
    status.set_defaults(outbox_run=cmd_outbox_status)
    flush = outbox_commands.add_parser(
        "flush",
        parents=[common],
        help="send the pending records now (exit 1 if some stay undelivered)",
    )
    flush.add_argument("file", metavar="FILE")
    flush.add_argument("--limit", type=count, default=0, help="records tried at most (0: all)")
    flush.add_argument(
        "--wait",
        type=seconds,
        default=FLUSH_WAIT_SECONDS,
        help="seconds to wait for records another flusher holds, then send them (default "
        f"{FLUSH_WAIT_SECONDS:g}; 0: do not wait); exit 1 if some are still held",
    )
    flush.set_defaults(outbox_run=cmd_outbox_flush)
    requeue = outbox_commands.add_parser(
        "requeue", parents=[common], help="make dead letters pending again (all, or these ids)"
    )
    requeue.add_argument("file", metavar="FILE")
    requeue.add_argument("ids", metavar="ID", nargs="*", type=count)
    requeue.set_defaults(outbox_run=cmd_outbox_requeue)
    discard = outbox_commands.add_parser(
        "discard", parents=[common], help="delete these records for good"
    )
    discard.add_argument("file", metavar="FILE")
    discard.add_argument("ids", metavar="ID", nargs="+", type=count)
    discard.set_defaults(outbox_run=cmd_outbox_discard)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; defaults come from PAGEMETER_TARGET, PAGEMETER_TOKEN, ..."""
    parser = argparse.ArgumentParser(
        prog="pagemeter",
        parents=[_global_options(with_defaults=True)],
        description="Operate and query a pagemeter quota service.",
        epilog="exit codes: 0 ok, 1 gRPC error (or records left in the outbox), 2 bad usage, "
        "3 check denied",
    )
    common = _global_options(with_defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_plan_commands(commands, common)
    _add_credit_commands(commands, common)
    _add_admin_commands(commands, common)
    _add_job_commands(commands, common)
    _add_report_commands(commands, common)
    _add_outbox_commands(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on bad usage (2) and after --help (0); report, don't exit,
        # so main() can be called from tests and other programs.
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return run(args)


def _read_pem(option: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as problem:
        raise InputProblem(f"cannot read the {option} file {path}: {problem.strerror}") from None


def make_client(args: argparse.Namespace, **extra: Any) -> PagemeterClient:
    """The client for the parsed options: target, deadline, token and TLS (and `extra`)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputProblem("--tls-cert and --tls-key go together (mutual TLS needs both)")
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    options: dict[str, Any] = {
        "timeout": args.timeout,
        "token": args.token or None,
        "tls": bool(args.tls or any(tls_files)),
        "root_certificates": _read_pem("--tls-ca", args.tls_ca),
        "client_certificate": _read_pem("--tls-cert", args.tls_cert),
        "client_key": _read_pem("--tls-key", args.tls_key),
        "tls_server_name": args.tls_server_name or None,
        **extra,
    }
    try:
        return PagemeterClient(args.target, **options)
    except ValueError as problem:  # the SDK's messages never contain the token
        raise InputProblem(str(problem)) from None


def run(args: argparse.Namespace) -> int:
    """Call the server for the parsed command and print the answer."""
    outbox_command: OutboxCommand | None = getattr(args, "outbox_run", None)
    try:
        if outbox_command is not None:
            return outbox_command(args)
        command: Command = args.run
        with make_client(args) as client:
            return command(client, args)
    except InputProblem as problem:
        print(f"pagemeter: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as error:
        print_rpc_error(error, args.target)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
