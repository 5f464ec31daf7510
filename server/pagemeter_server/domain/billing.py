"""Billing months: which billing periods a month closes, and the figures billed.

A billing month is a calendar month named "YYYY-MM". An organization's billing
periods of the month are those that END in it, in the organization's own
timezone: the calendar month itself for a plan without a billing anchor, the
anchored month (or year) whose last instant falls in it otherwise. Every period
ends in exactly one calendar month, so each period is billed exactly once,
whatever the anchors, including the short transition periods of an anchor change.

The figures are GetUsageHistory's (domain/history.py, the same function), so an
export reconciles with the history to the unit and to the last decimal digit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pagemeter_server.domain.decisions import PlanVersion
from pagemeter_server.domain.history import month_figures
from pagemeter_server.domain.periods import Calendar, Month, month_of, zone
from pagemeter_server.domain.plans import format_money

FIRST_YEAR, LAST_YEAR = 2000, 2100
_BILLING_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
# The westernmost and easternmost offsets any timezone has: a month has ended
# everywhere once it has ended at UTC-12, and begun somewhere once it has begun
# at UTC+14. (POSIX "Etc/" names have the sign reversed.)
_LATEST_ZONE, _EARLIEST_ZONE = "Etc/GMT+12", "Etc/GMT-14"
# Version of the frozen snapshot's JSON.
SNAPSHOT_VERSION = 1

KIND_OPEN, KIND_CLOSED, KIND_ADJUSTMENT = "open", "closed", "adjustment"


@dataclass(frozen=True)
class BillingMonth:
    year: int
    month: int

    @property
    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def next(self) -> BillingMonth:
        return BillingMonth(self.year + self.month // 12, self.month % 12 + 1)

    def ended_everywhere_ms(self) -> int:
        """The instant the month has ended in every timezone (12:00 UTC on the 1st
        of the next month): from then on every period ending in it has ended."""
        following = self.next()
        return month_of(following.year, following.month, zone(_LATEST_ZONE)).start_ms

    def begun_somewhere_ms(self) -> int:
        """The month's first instant anywhere (its 1st, 00:00 at UTC+14)."""
        return month_of(self.year, self.month, zone(_EARLIEST_ZONE)).start_ms


def parse_billing_month(text: str) -> BillingMonth:
    """ "YYYY-MM" between 2000-01 and 2100-12; ValueError (with the reason) otherwise."""
    match = _BILLING_MONTH.fullmatch(text)
    if match is None:
        raise ValueError(f"billing_month must be a month as YYYY-MM (got {text[:40]!r})")
    year, month = int(match[1]), int(match[2])
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise ValueError(f"billing_month's year must be between {FIRST_YEAR} and {LAST_YEAR}")
    if not 1 <= month <= 12:
        raise ValueError("billing_month's month must be between 01 and 12")
    return BillingMonth(year, month)


def periods_ending_in(billing: Calendar, month: BillingMonth) -> list[Month]:
    """The organization's billing periods whose last instant falls in the calendar
    month (in the calendar's timezone), oldest first: usually one; none for the
    other months of a yearly plan; two when an anchor change ends a short
    transition period in the month."""
    first = month_of(month.year, month.month, billing.zone)
    following = month.next()
    last = month_of(following.year, following.month, billing.zone)
    periods = []
    period = billing.period_at(first.start_ms)
    while period.end_ms <= last.start_ms:
        periods.append(period)
        period = billing.period_at(period.end_ms)
    return periods


def period_named(period_id: str, start_ms: int, end_ms: int) -> Month:
    """The period a frozen snapshot names: "YYYY-MM" or "YYYY-MM-DD" with its bounds."""
    parts = [int(part) for part in period_id.split("-")]
    return Month(parts[0], parts[1], start_ms, end_ms, parts[2] if len(parts) == 3 else 0)


@dataclass(frozen=True)
class MetricBill:
    metric: str
    committed: int
    included: int
    prepaid: int
    overage_units: int
    overage_cost: str


@dataclass(frozen=True)
class PeriodBill:
    period_id: str
    start_ms: int
    end_ms: int
    plan_name: str
    plan_version: int
    currency: str
    metrics: tuple[MetricBill, ...]


def period_bill(period: Month, fields: dict[str, int], plan: PlanVersion | None) -> PeriodBill:
    """One period's figures under the plan in effect at its end: GetUsageHistory's."""
    figures = month_figures(period, fields, plan)
    return PeriodBill(
        period_id=period.period_id,
        start_ms=period.start_ms,
        end_ms=period.end_ms,
        plan_name=plan.doc["name"] if plan else "",
        plan_version=plan.version if plan else 0,
        currency=plan.doc["currency"] if plan else "",
        metrics=tuple(
            MetricBill(
                metric=m.metric,
                committed=m.committed,
                included=max(0, m.committed - m.prepaid_used - m.overage_units),
                prepaid=m.prepaid_used,
                overage_units=m.overage_units,
                overage_cost=m.overage_cost,
            )
            for m in figures.metrics
        ),
    )


def adjustment(frozen: PeriodBill, current: PeriodBill) -> PeriodBill:
    """What changed since the close, per metric (current minus frozen; only the
    metrics that changed), with the current terms' header."""
    before = {m.metric: m for m in frozen.metrics}
    after = {m.metric: m for m in current.metrics}
    zero = MetricBill("", 0, 0, 0, 0, "0")
    changes = []
    for metric in sorted(before.keys() | after.keys()):
        old, new = before.get(metric, zero), after.get(metric, zero)
        delta = MetricBill(
            metric=metric,
            committed=new.committed - old.committed,
            included=new.included - old.included,
            prepaid=new.prepaid - old.prepaid,
            overage_units=new.overage_units - old.overage_units,
            overage_cost=format_money(Decimal(new.overage_cost) - Decimal(old.overage_cost)),
        )
        if delta != MetricBill(metric, 0, 0, 0, 0, "0"):
            changes.append(delta)
    return PeriodBill(
        period_id=current.period_id,
        start_ms=current.start_ms,
        end_ms=current.end_ms,
        plan_name=current.plan_name,
        plan_version=current.plan_version,
        currency=current.currency,
        metrics=tuple(changes),
    )


@dataclass(frozen=True)
class Snapshot:
    """An organization's frozen figures for one billing month."""

    billing_month: str
    closed_ms: int
    periods: tuple[PeriodBill, ...]


def snapshot_json(snapshot: Snapshot) -> str:
    """The snapshot as the close key stores it (compact, keys sorted)."""
    doc = {
        "v": SNAPSHOT_VERSION,
        "month": snapshot.billing_month,
        "closed_ms": snapshot.closed_ms,
        "periods": [
            {
                "id": p.period_id,
                "start_ms": p.start_ms,
                "end_ms": p.end_ms,
                "plan_name": p.plan_name,
                "plan_version": p.plan_version,
                "currency": p.currency,
                "metrics": [
                    [m.metric, m.committed, m.included, m.prepaid, m.overage_units, m.overage_cost]
                    for m in p.metrics
                ],
            }
            for p in snapshot.periods
        ],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def parse_snapshot(text: str) -> Snapshot:
    doc: dict[str, Any] = json.loads(text)
    return Snapshot(
        billing_month=str(doc["month"]),
        closed_ms=int(doc["closed_ms"]),
        periods=tuple(
            PeriodBill(
                period_id=str(p["id"]),
                start_ms=int(p["start_ms"]),
                end_ms=int(p["end_ms"]),
                plan_name=str(p["plan_name"]),
                plan_version=int(p["plan_version"]),
                currency=str(p["currency"]),
                metrics=tuple(
                    MetricBill(str(m[0]), int(m[1]), int(m[2]), int(m[3]), int(m[4]), str(m[5]))
                    for m in p["metrics"]
                ),
            )
            for p in doc["periods"]
        ),
    )


def hash_fingerprint(fields: dict[str, str]) -> str:
    """The text billing_close.lua builds from the same hash to check it is unchanged:
    its "field=value" pairs sorted, one per line."""
    return "\n".join(sorted(f"{name}={value}" for name, value in fields.items()))
