"""Plans, credits and the quota calls: a plan, a grant, a voided grant, the list of grants,
a check's decision, a record, a release."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2
from pagemeter_client.cli.render import text as fmt
from pagemeter_client.sdk import credit_grant_status_name, reason_name, window_name


def render_plan(plan: plan_pb2.Plan) -> str:
    pairs = [
        ("organization", plan.org_id),
        ("plan", plan.name),
        ("version", str(plan.version)),
        ("updated at", fmt.when(plan.updated_at)),
        ("timezone", plan.timezone),
    ]
    if plan.HasField("billing_anchor"):
        pairs.append(("billing anchor", plan.billing_anchor.ToJsonString()))
        pairs.append(("billing interval", fmt.interval_word(plan.billing_interval)))
    pairs += [
        ("currency", plan.currency or "USD"),
        ("api rate limit", f"{plan.api_rate_limit} req/s" if plan.api_rate_limit else "none"),
        ("api burst", str(plan.api_burst or plan.api_rate_limit)),
        ("processing priority", plan.processing_priority or "-"),
        ("support level", plan.support_level or "-"),
    ]
    header = fmt.fields(pairs)
    rows = [
        [
            m.metric,
            fmt.period_word(m.period, plan.billing_interval),
            fmt.optional_int(m, "contract_quota"),
            fmt.optional_int(m, "hard_limit", fmt.NONE),
            fmt.yes_no(m.overage_allowed),
            fmt.money(m.price_per_unit),
            fmt.money(m.overage_price_per_unit),
        ]
        for m in plan.metrics
    ]
    headers = ["metric", "period", "contract quota", "hard limit", "overage", "price"]
    headers.append("overage price")
    if any(m.overage_spend_cap for m in plan.metrics):
        headers.append("overage spend cap")
        for row, m in zip(rows, plan.metrics, strict=True):
            row.append(fmt.money(m.overage_spend_cap) if m.overage_spend_cap else fmt.NONE)
    if any(m.HasField("shadow_hard_limit") for m in plan.metrics):
        headers.append("shadow hard limit")
        for row, m in zip(rows, plan.metrics, strict=True):
            row.append(fmt.optional_int(m, "shadow_hard_limit", fmt.NONE))
    if any(m.HasField("rollover_percent") for m in plan.metrics):
        headers.append("rollover")
        for row, m in zip(rows, plan.metrics, strict=True):
            row.append(_rollover_text(m))
    if any(m.windows for m in plan.metrics):
        headers.append("windows")
        for row, m in zip(rows, plan.metrics, strict=True):
            row.append(", ".join(_window_limit_text(w) for w in m.windows) or "-")
    if any(m.HasField("alerts") for m in plan.metrics):
        headers.append("alerts")
        for row, m in zip(rows, plan.metrics, strict=True):
            row.append(alerts_text(m))
    metrics = fmt.table(headers, rows)
    return f"{header}\n\n{metrics}"


def alerts_text(limits: plan_pb2.MetricLimits) -> str:
    """A metric's notification thresholds: 'quota 50/80/100%, hard limit 90/100%,
    credits below 100, grant expiring within 7d'; 'default' when it sets none."""
    if not limits.HasField("alerts"):
        return "default"
    alerts = limits.alerts
    parts = [
        f"quota {_percents(alerts.quota_percents)}",
        f"hard limit {_percents(alerts.hard_limit_percents)}",
    ]
    if alerts.HasField("credits_below"):
        parts.append(f"credits below {alerts.credits_below}")
    if alerts.HasField("grant_expiring_within"):
        parts.append(f"grant expiring within {_span(alerts.grant_expiring_within.seconds)}")
    return ", ".join(parts)


def _percents(percents: Sequence[int]) -> str:
    return "/".join(str(p) for p in percents) + "%" if percents else fmt.NONE


def _span(seconds: int) -> str:
    """Seconds in the largest unit that divides them: 7d, 12h, 90m, 45s."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _rollover_text(limits: plan_pb2.MetricLimits) -> str:
    """'50%', or '50% up to 300' with a cap; '-' for none."""
    if not limits.HasField("rollover_percent"):
        return fmt.NONE
    text = f"{limits.rollover_percent}%"
    if limits.HasField("rollover_cap"):
        text += f" up to {limits.rollover_cap}"
    return text


def _window_limit_text(window: plan_pb2.WindowLimit) -> str:
    mode = " (soft)" if window.soft else " (shadow)" if window.shadow else ""
    return f"{window.limit}/{window_name(window.window)}{mode}"


def _windows_text(windows: list[quota_pb2.WindowDecision]) -> str:
    """Each window as 'used/limit per kind', marked when passed, with its reset."""
    parts = []
    for w in windows:
        mode = " soft" if w.soft else " shadow" if w.shadow else ""
        mark = f"{mode}, passed" if w.exceeded and mode else " passed" if w.exceeded else mode
        parts.append(
            f"{w.used}/{w.limit} per {window_name(w.window)}{mark}, resets {fmt.when(w.resets_at)}"
        )
    return "; ".join(parts) or "-"


def render_grant(response: admin_pb2.GrantCreditsResponse) -> str:
    # balance: the metric's credits usable now (a grant not yet effective adds nothing yet).
    rows = [("balance", str(response.balance)), ("duplicate", fmt.yes_no(response.duplicate))]
    return fmt.fields(rows)


def render_voided_grant(
    args: argparse.Namespace, response: admin_pb2.VoidCreditGrantResponse
) -> str:
    return fmt.fields(
        [
            ("organization", args.org),
            ("grant id", args.grant_id),
            ("voided units", str(response.voided_units)),
            ("already voided", fmt.yes_no(response.already_voided)),
        ]
    )


def render_credit_grants(response: admin_pb2.ListCreditGrantsResponse) -> str:
    if not response.grants:
        return "no credit grants"
    rows = [
        [
            grant.grant_id,
            grant.metric,
            f"{grant.remaining}/{grant.units}",
            credit_grant_status_name(grant.status),
            str(grant.priority),
            fmt.when(grant.effective_at),
            fmt.when(grant.expires_at) if grant.HasField("expires_at") else "never",
        ]
        for grant in response.grants
    ]
    headers = ["grant id", "metric", "remaining/units", "status", "priority", "effective"]
    headers.append("expires")
    return fmt.table(headers, rows, left=2)


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
    if response.would_deny:
        pairs.append(("shadow limits", "would deny"))
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
    if any(d.windows for d in columns):
        rows.append(["windows (used before)", *(_windows_text(list(d.windows)) for d in columns)])
        rows.append(
            [
                "denied by window",
                *(window_name(d.denied_by) if d.denied_by else "-" for d in columns),
            ]
        )
    if response.would_deny:
        rows.append(["shadow would deny", *(_would_deny_text(d) for d in columns)])
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
            ("status", fmt.enum_word("RECORD_STATUS_", status)),
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
    if any(m.over_spend_cap for m in columns):
        rows.append(["over spend cap", *(fmt.yes_no(m.over_spend_cap) for m in columns)])
    if any(m.windows for m in columns):
        rows.append(["windows (used after)", *(_windows_text(list(m.windows)) for m in columns)])
    return f"{header}\n\n{fmt.table(['', *(m.metric for m in columns)], rows)}"


def render_release(response: quota_pb2.ReleaseQuotaResponse) -> str:
    outcome = quota_pb2.ReleaseOutcome.Name(response.outcome)
    pairs = [("outcome", fmt.enum_word("RELEASE_OUTCOME_", outcome))]
    pairs += [(f"released {m}", str(n)) for m, n in sorted(response.released_units.items())]
    return fmt.fields(pairs)


def _would_deny_text(decision: quota_pb2.MetricDecision) -> str:
    if not decision.would_deny:
        return "-"
    reason = reason_name(decision.would_deny_reason)
    if decision.would_deny_window:
        return f"{reason} (per {window_name(decision.would_deny_window)})"
    return reason
