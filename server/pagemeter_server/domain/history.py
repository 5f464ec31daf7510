"""The monthly usage history, each month with the contract terms it had.

A month's terms are those of the plan version in effect at the month's end (for
the current month: now), taken from the plan log that set_plan.lua keeps, so a
plan change never rewrites the months before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagemeter_server.domain.decisions import PlanVersion
from pagemeter_server.domain.periods import Calendar, Month
from pagemeter_server.domain.plans import MetricTerms
from pagemeter_server.domain.usage import cost

DEFAULT_MONTHS = 12
MAX_MONTHS = 24


@dataclass(frozen=True)
class MetricMonthFigures:
    metric: str
    committed: int
    prepaid_used: int
    overage_units: int
    overage_cost: str
    terms: MetricTerms | None


@dataclass(frozen=True)
class MonthFigures:
    month: Month
    jobs_ok: int
    jobs_failed: int
    metrics: list[MetricMonthFigures]
    plan: PlanVersion | None


def last_months(now_ms: int, billing: Calendar, count: int) -> list[Month]:
    """The current billing period and the count-1 before it, newest first."""
    months = [billing.period_at(now_ms)]
    while len(months) < count:
        months.append(months[-1].previous(billing))
    return months


def plan_in_effect(versions: list[PlanVersion], before_ms: int) -> PlanVersion | None:
    """The newest plan version set before the instant (versions oldest first)."""
    chosen = None
    for version in versions:
        if version.updated_ms < before_ms:
            chosen = version
    return chosen


def month_figures(month: Month, fields: dict[str, int], plan: PlanVersion | None) -> MonthFigures:
    """One month's committed units, with overage priced under that month's terms."""
    plan_metrics = plan.doc["metrics"] if plan else {}
    monthly_terms = {m: t for m, t in plan_metrics.items() if t["period"] != "none"}
    recorded = {name[2:] for name in fields if name.startswith("c:")}
    metrics = []
    for metric in sorted(set(monthly_terms) | recorded):
        committed = fields.get(f"c:{metric}", 0)
        prepaid_used = fields.get(f"pp:{metric}", 0)
        terms = monthly_terms.get(metric)
        quota = terms.get("contract_quota") if terms else None
        overage = 0 if quota is None else max(0, committed - quota - prepaid_used)
        overage_price = terms["overage_price"] if terms else "0"
        metrics.append(
            MetricMonthFigures(
                metric=metric,
                committed=committed,
                prepaid_used=prepaid_used,
                overage_units=overage,
                overage_cost=cost(overage, overage_price),
                terms=terms,
            )
        )
    return MonthFigures(
        month=month,
        jobs_ok=fields.get("jobs_ok", 0),
        jobs_failed=fields.get("jobs_failed", 0),
        metrics=metrics,
        plan=plan,
    )
