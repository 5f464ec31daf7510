"""The Python half of the rules: money and the figures derived for reading.

Decisions themselves are made in the Lua scripts (atomically, on integers). What
is left here is arithmetic that needs no atomicity: prices times units with
Decimal, and the read-side figures of GetUsage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow

from pagemeter.v1 import quota_pb2
from pagemeter_server.domain.decisions import MetricCheck, UsageSnapshot
from pagemeter_server.domain.plans import UNPLANNED, MetricTerms, format_money

# Decimal's default context keeps 28 significant digits, fewer than a unit
# count (up to 2^53, 16 digits) times a price (up to 21 digits) can have. This
# context holds 60, and traps Inexact so that a product that would ever need
# rounding fails loudly instead of billing a rounded figure.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, Overflow])


def cost(units: int, price: str) -> str:
    """units x price as a decimal string, exact to the last digit (never a float)."""
    if not units:  # most decisions have no overage: no decimal arithmetic for them
        return "0"
    return format_money(_EXACT.multiply(Decimal(units), Decimal(price or "0")))


def call_reason(metrics: list[MetricCheck]) -> int:
    """One reason for a whole CheckQuota call.

    Denied: the first denying metric's reason. Allowed: the costliest pool any
    metric used (within quota < prepaid < overage: DecisionReason's numbers, which
    check.lua's REASON_* constants are generated from, rise with the cost).
    """
    for decision in metrics:
        if not decision.allowed:
            return decision.reason
    return max(
        (decision.reason for decision in metrics),
        default=quota_pb2.DECISION_REASON_WITHIN_QUOTA,
    )


def window_retry_after_ms(metrics: Iterable[quota_pb2.MetricDecision], now_ms: int) -> int | None:
    """How long a call denied by windows should wait: until every denying window
    has reset, when each metric's units (with its live holds) fit an empty window
    then; None when waiting cannot help (a metric is denied for another reason, or
    asks for more than its window's limit)."""
    wait_ms = 0
    for decision in metrics:
        if decision.allowed:
            continue
        if decision.reason != quota_pb2.DECISION_REASON_WINDOW_LIMIT_EXCEEDED:
            return None
        for window in decision.windows:
            if window.window != decision.denied_by:
                continue
            if decision.requested + decision.held > window.limit:
                return None
            resets_ms = window.resets_at.seconds * 1000 + window.resets_at.nanos // 1_000_000
            wait_ms = max(wait_ms, resets_ms - now_ms)
    return max(wait_ms, 1)


def headroom(
    *,
    used: int,
    contract_quota: int | None,
    hard_limit: int | None,
    overage_allowed: bool,
    prepaid_available: int,
) -> int | None:
    """Units admissible before the first limit that would deny; None = unlimited.

    The same formula as check.lua's partial-admission hint.
    """
    cap = None if hard_limit is None else max(0, hard_limit - used)
    if contract_quota is not None and not overage_allowed:
        within = max(0, contract_quota - used) + prepaid_available
        cap = within if cap is None else min(cap, within)
    return cap


@dataclass(frozen=True)
class MetricUsageFigures:
    metric: str
    lifetime: bool
    committed: int
    held: int
    contract_quota: int | None
    hard_limit: int | None
    overage_allowed: bool
    overage_units: int
    overage_cost: str
    price_per_unit: str
    overage_price_per_unit: str
    prepaid_balance: int
    prepaid_used: int
    remaining: int | None
    usage_percent: float | None
    lifetime_committed: int
    average_per_job: float


def usage_figures(snapshot: UsageSnapshot, *, now_ms: int) -> list[MetricUsageFigures]:
    """Per-metric figures of one month: the plan's metrics plus any with usage."""
    plan_metrics = snapshot.plan.doc["metrics"] if snapshot.plan else {}
    recorded = {
        name[2:]
        for name in (*snapshot.month_fields, *snapshot.lifetime_fields)
        if name.startswith("c:")
    }
    is_current = snapshot.month.start_ms <= now_ms < snapshot.month.end_ms
    return [
        _metric_figures(snapshot, metric, plan_metrics.get(metric), is_current)
        for metric in sorted(set(plan_metrics) | recorded)
    ]


def _metric_figures(
    snapshot: UsageSnapshot, metric: str, terms: MetricTerms | None, is_current: bool
) -> MetricUsageFigures:
    terms = terms if terms is not None else UNPLANNED
    lifetime = terms["period"] == "none"
    fields = snapshot.lifetime_fields if lifetime else snapshot.month_fields
    committed = fields.get(f"c:{metric}", 0)
    prepaid_used = fields.get(f"pp:{metric}", 0)
    # Holds are not tied to a month: they count against whatever month is current.
    held = snapshot.held_fields.get(f"h:{metric}", 0) if (is_current or lifetime) else 0
    held_prepaid = snapshot.held_fields.get(f"hp:{metric}", 0)
    balance = snapshot.credits.get(metric, 0)
    quota = terms.get("contract_quota")
    hard = terms.get("hard_limit")
    overage = 0 if quota is None else max(0, committed - quota - prepaid_used)
    overage_price = terms["overage_price"]
    return MetricUsageFigures(
        metric=metric,
        lifetime=lifetime,
        committed=committed,
        held=held,
        contract_quota=quota,
        hard_limit=hard,
        overage_allowed=terms["overage_allowed"],
        overage_units=overage,
        overage_cost=cost(overage, overage_price),
        price_per_unit=terms["price"],
        overage_price_per_unit=overage_price,
        prepaid_balance=balance,
        prepaid_used=prepaid_used,
        remaining=headroom(
            used=committed + held,
            contract_quota=quota,
            hard_limit=hard,
            overage_allowed=terms["overage_allowed"],
            prepaid_available=max(0, balance - held_prepaid),
        ),
        usage_percent=percent_of_limit(committed, quota, hard),
        lifetime_committed=committed
        if lifetime
        else snapshot.lifetime_fields.get(f"a:{metric}", 0),
        average_per_job=0.0 if lifetime else average_per_job(committed, snapshot.month_fields),
    )


def percent_of_limit(committed: int, quota: int | None, hard: int | None) -> float | None:
    """committed as a percentage of the contract quota, else of the hard limit.

    A lifetime gauge (applications, templates) usually has only a cap.
    """
    limit = quota if quota is not None else hard
    if not limit:
        return None
    # Exact, then cut to two decimals: committed / limit * 100 in floats shows
    # noise (13.750000000000002), and rounding up could show 100 before it is.
    hundredths = committed * 10_000 // limit
    return float(Decimal(hundredths).scaleb(-2))


def average_per_job(committed: int, month_fields: dict[str, int]) -> float:
    """Units per successful job of the month (failed jobs consume nothing)."""
    jobs = month_fields.get("jobs_ok", 0)
    return round(committed / jobs, 2) if jobs else 0.0


@dataclass(frozen=True)
class MetricTotal:
    metric: str
    committed: int
    prepaid_used: int
    average_per_job: float


def metric_totals(month_fields: dict[str, int]) -> list[MetricTotal]:
    """Every metric with usage in one month hash, by name."""
    metrics = sorted(name[2:] for name in month_fields if name.startswith("c:"))
    return [
        MetricTotal(
            metric=metric,
            committed=month_fields[f"c:{metric}"],
            prepaid_used=month_fields.get(f"pp:{metric}", 0),
            average_per_job=average_per_job(month_fields[f"c:{metric}"], month_fields),
        )
        for metric in metrics
    ]
