"""Usage reads: one month's usage, and the history month by month."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pagemeter.v1 import quota_pb2, reporting_pb2
from pagemeter_client.cli.render import text as fmt


def render_usage(response: quota_pb2.GetUsageResponse) -> str:
    sub = response.subscription
    currency = sub.currency
    header = fmt.fields(
        [
            ("organization", response.org_id),
            # An anchored period's id is its first date ("2026-02-28").
            ("billing period" if _anchored(response.period_id) else "month", response.period_id),
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


def _anchored(period_id: str) -> bool:
    """A billing period of a plan with a billing anchor ("YYYY-MM-DD"), not a month."""
    return period_id.count("-") == 2


def _jobs_text(jobs: quota_pb2.JobCounts) -> str:
    return f"{jobs.succeeded} succeeded, {jobs.failed} failed, {jobs.total} total"


def _previous_month_text(summary: quota_pb2.MonthSummary) -> str:
    """`previous month 2026-02: jobs ...; committed: pages 1150 (1150 per job), ...`."""
    word = "previous period" if _anchored(summary.period_id) else "previous month"
    text = f"{word} {summary.period_id}: jobs {_jobs_text(summary.jobs)}"
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
        ["period", *(fmt.period_word(m.period) for m in columns)],
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
