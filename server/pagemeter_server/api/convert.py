"""Conversions from the domain's answers to the protos of the contract."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message as ProtoMessage

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.domain import usage as rules
from pagemeter_server.domain.decisions import MetricCheck, MetricRecord, WindowState
from pagemeter_server.domain.periods import LIFETIME_PERIOD_ID, Month, WindowSpan, timestamp
from pagemeter_server.domain.plans import WINDOW_ENUMS


def period_fields(lifetime: bool, month: Month) -> dict[str, Any]:
    if lifetime:
        return {"period": plan_pb2.PERIOD_NONE, "period_id": LIFETIME_PERIOD_ID}
    return {
        "period": plan_pb2.PERIOD_MONTHLY,
        "period_id": month.period_id,
        "period_end": timestamp(month.end_ms),
    }


def job_counts(month_fields: dict[str, int]) -> quota_pb2.JobCounts:
    succeeded, failed = month_fields.get("jobs_ok", 0), month_fields.get("jobs_failed", 0)
    return quota_pb2.JobCounts(succeeded=succeeded, failed=failed, total=succeeded + failed)


def month_summary(month: Month, month_fields: dict[str, int]) -> quota_pb2.MonthSummary:
    return quota_pb2.MonthSummary(
        period_id=month.period_id,
        year=month.year,
        month=month.month,
        jobs=job_counts(month_fields),
        metrics=[
            quota_pb2.MetricTotal(
                metric=t.metric,
                committed=t.committed,
                prepaid_used=t.prepaid_used,
                average_per_job=t.average_per_job,
            )
            for t in rules.metric_totals(month_fields)
        ],
    )


def metric_usage(f: rules.MetricUsageFigures) -> quota_pb2.MetricUsage:
    usage = quota_pb2.MetricUsage(
        metric=f.metric,
        period=plan_pb2.PERIOD_NONE if f.lifetime else plan_pb2.PERIOD_MONTHLY,
        committed=f.committed,
        held=f.held,
        overage_allowed=f.overage_allowed,
        overage_units=f.overage_units,
        overage_cost=f.overage_cost,
        price_per_unit=f.price_per_unit,
        overage_price_per_unit=f.overage_price_per_unit,
        prepaid_balance=f.prepaid_balance,
        prepaid_used=f.prepaid_used,
        lifetime_committed=f.lifetime_committed,
        average_per_job=f.average_per_job,
    )
    return with_present(usage, f, "contract_quota", "hard_limit", "remaining", "usage_percent")


def window_decisions(
    windows: tuple[WindowState, ...], spans: tuple[WindowSpan, ...], taken: int
) -> list[quota_pb2.WindowDecision]:
    """A metric's windows with their bounds (`spans`: the windows of the answer's
    instant); `taken`: the units this answer adds to what each window had used (a
    check's admitted units, 0 for a record)."""
    bounds = {span.kind: span for span in spans}
    return [
        quota_pb2.WindowDecision(
            window=WINDOW_ENUMS[w.window],  # type: ignore[index]
            limit=w.limit,
            soft=w.soft,
            used=w.used,
            remaining=max(0, w.limit - w.used - taken),
            exceeded=w.exceeded,
            window_start=timestamp(bounds[w.window].start_ms),
            resets_at=timestamp(bounds[w.window].end_ms),
            shadow=w.shadow,
        )
        for w in windows
    ]


def metric_decision(
    d: MetricCheck, month: Month, spans: tuple[WindowSpan, ...] = ()
) -> quota_pb2.MetricDecision:
    # Built as one keyword set: the message constructor is the cheapest way to
    # fill a message, and this runs for every metric of every decision.
    fields: dict[str, Any] = {
        "metric": d.metric,
        "allowed": d.allowed,
        "reason": d.reason,
        "requested": d.requested,
        "committed": d.committed,
        "held": d.held,
        "overage_allowed": d.overage_allowed,
        "included_units": d.included,
        "prepaid_units": d.prepaid,
        "overage_units": d.overage,
        "overage_cost": rules.cost(d.overage, d.overage_price),
        "overage_price_per_unit": d.overage_price,
        "prepaid_available": d.prepaid_available,
    }
    if d.lifetime:
        fields["period"] = plan_pb2.PERIOD_NONE
        fields["period_id"] = LIFETIME_PERIOD_ID
    else:
        fields["period"] = plan_pb2.PERIOD_MONTHLY
        fields["period_id"] = month.period_id
        fields["period_end"] = timestamp(month.end_ms)
    if d.windows:
        fields["windows"] = window_decisions(d.windows, spans, d.requested if d.allowed else 0)
    if d.reason == quota_pb2.DECISION_REASON_WINDOW_LIMIT_EXCEEDED:
        fields["denied_by"] = WINDOW_ENUMS[d.denied_by]  # type: ignore[index]
    if d.would_deny is not None:
        fields["would_deny"] = True
        fields["would_deny_reason"] = d.would_deny
        if d.would_deny_window:
            fields["would_deny_window"] = WINDOW_ENUMS[d.would_deny_window]  # type: ignore[index]
    # Optional fields: None leaves them absent (not zero).
    if d.contract_quota is not None:
        fields["contract_quota"] = d.contract_quota
    if d.hard_limit is not None:
        fields["hard_limit"] = d.hard_limit
    if d.max_admissible is not None:
        fields["max_admissible"] = d.max_admissible
    if d.remaining is not None:
        fields["remaining"] = d.remaining
    return quota_pb2.MetricDecision(**fields)


def metric_record_result(
    m: MetricRecord, month_id: str, spans: tuple[WindowSpan, ...] = ()
) -> quota_pb2.MetricRecordResult:
    result = quota_pb2.MetricRecordResult(
        metric=m.metric,
        units=m.units,
        included_units=m.included,
        prepaid_units=m.prepaid,
        overage_units=m.overage,
        overage_cost=rules.cost(m.overage, m.overage_price),
        committed=m.committed,
        over_contract_quota=m.over_contract_quota,
        over_hard_limit=m.over_hard_limit,
        overage_not_allowed=m.overage_not_allowed,
        period_id=LIFETIME_PERIOD_ID if m.lifetime else month_id,
        windows=window_decisions(m.windows, spans, 0),
        over_spend_cap=m.over_spend_cap,
    )
    return with_present(result, m, "contract_quota", "hard_limit")


Message = TypeVar("Message", bound=ProtoMessage)


def with_present(message: Message, source: object, *names: str) -> Message:
    """Set the optional fields `names` of `message` that `source` has (None means
    absent: an optional proto field left unset, not a zero)."""
    for name in names:
        value = getattr(source, name)
        if value is not None:
            setattr(message, name, value)
    return message
