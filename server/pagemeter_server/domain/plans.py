"""Plans: checked on the way in, stored as a compact JSON document for the scripts.

Stored document (read by the Lua scripts with cjson):
    {"name", "tz", "rate", "burst", "prio", "support", "currency",
     "metrics": {metric: {"q"?: quota, "h"?: hard limit, "o": overage allowed,
                          "p": price, "op": overage price, "per": "M" | "N"}}}
Absent limits are left out rather than written as null, because cjson decodes
null to a value Lua treats as true.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pagemeter.v1 import plan_pb2
from pagemeter_server.domain.periods import timestamp, zone
from pagemeter_server.domain.validation import (
    CURRENCY,
    MAX_LABEL,
    MAX_METRICS,
    MAX_NAME,
    Violations,
)

_PERIOD_CODES = {
    plan_pb2.PERIOD_UNSPECIFIED: "M",
    plan_pb2.PERIOD_MONTHLY: "M",
    plan_pb2.PERIOD_NONE: "N",
}


def canonical_price(text: str) -> str:
    """'0.0280' -> '0.028', '' -> '0': one spelling per price, so payloads compare."""
    if not text:
        return "0"
    return format_money(Decimal(text))


def format_money(amount: Decimal) -> str:
    """A decimal as a plain string without exponent or trailing zeros."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


_FAILURE_POLICY_CODES = {
    plan_pb2.STORE_FAILURE_POLICY_CLOSED: "closed",
    plan_pb2.STORE_FAILURE_POLICY_OPEN: "open",
}
_FAILURE_POLICIES = {code: value for value, code in _FAILURE_POLICY_CODES.items()}


def plan_to_doc(plan: plan_pb2.Plan, default_timezone: str) -> dict[str, Any]:
    """Validate a Plan message and turn it into the stored document."""
    problems = Violations()
    problems.check_org_id(plan.org_id, "plan.org_id")
    problems.check_length(plan.name, "plan.name", MAX_NAME)
    problems.check_length(plan.processing_priority, "plan.processing_priority", MAX_LABEL)
    problems.check_length(plan.support_level, "plan.support_level", MAX_LABEL)
    timezone = plan.timezone or default_timezone
    try:
        zone(timezone)
    except ValueError:
        problems.add(
            "plan.timezone", f"{timezone[:64]!r} is not an IANA timezone (e.g. Europe/Berlin)"
        )
    if plan.store_failure_policy not in (0, *_FAILURE_POLICY_CODES):
        problems.add(
            "plan.store_failure_policy", f"unknown store failure policy {plan.store_failure_policy}"
        )
    if plan.currency and not CURRENCY.fullmatch(plan.currency):
        problems.add("plan.currency", "plan.currency must be an ISO 4217 code such as USD or EUR")
    if len(plan.metrics) > MAX_METRICS:
        problems.add("plan.metrics", f"a plan may have at most {MAX_METRICS} metrics")
    metrics: dict[str, dict[str, Any]] = {}
    for index, limits in enumerate(plan.metrics):
        path = f"plan.metrics[{index}]"
        if not problems.check_metric_name(limits.metric, f"{path}.metric"):
            continue
        if limits.metric in metrics:
            problems.add(f"{path}.metric", f"metric {limits.metric!r} appears twice in the plan")
            continue
        metrics[limits.metric] = _limits_to_doc(limits, path, problems)
    problems.raise_if_any()
    return {
        "name": plan.name,
        "tz": timezone,
        "rate": plan.api_rate_limit,
        "burst": plan.api_burst,
        "prio": plan.processing_priority,
        "support": plan.support_level,
        "currency": plan.currency or "USD",
        "metrics": metrics,
        "sfp": _FAILURE_POLICY_CODES.get(plan.store_failure_policy, ""),
    }


def _limits_to_doc(
    limits: plan_pb2.MetricLimits, path: str, problems: Violations
) -> dict[str, Any]:
    problems.check_price(limits.price_per_unit, f"{path}.price_per_unit")
    problems.check_price(limits.overage_price_per_unit, f"{path}.overage_price_per_unit")
    if limits.period not in _PERIOD_CODES:
        problems.add(f"{path}.period", f"unknown period {limits.period}")
    doc: dict[str, Any] = {
        "o": limits.overage_allowed,
        "per": _PERIOD_CODES.get(limits.period, "M"),
    }
    if limits.HasField("contract_quota"):
        problems.check_limit(limits.contract_quota, f"{path}.contract_quota")
        doc["q"] = limits.contract_quota
    if limits.HasField("hard_limit"):
        problems.check_limit(limits.hard_limit, f"{path}.hard_limit")
        doc["h"] = limits.hard_limit
    if not problems.items:
        doc["p"] = canonical_price(limits.price_per_unit)
        doc["op"] = canonical_price(limits.overage_price_per_unit)
    return doc


def doc_to_plan(org_id: str, doc: dict[str, Any], version: int, updated_ms: int) -> plan_pb2.Plan:
    """The stored document as a Plan message."""
    plan = plan_pb2.Plan(
        org_id=org_id,
        name=doc["name"],
        timezone=doc["tz"],
        api_rate_limit=doc["rate"],
        api_burst=doc["burst"],
        processing_priority=doc["prio"],
        support_level=doc["support"],
        currency=doc["currency"],
        version=version,
        store_failure_policy=_FAILURE_POLICIES.get(
            doc.get("sfp", ""), plan_pb2.STORE_FAILURE_POLICY_UNSPECIFIED
        ),
    )
    if updated_ms:
        plan.updated_at.CopyFrom(timestamp(updated_ms))
    for metric in sorted(doc["metrics"]):
        plan.metrics.append(metric_limits(metric, doc["metrics"][metric]))
    return plan


def metric_limits(metric: str, limits: dict[str, Any]) -> plan_pb2.MetricLimits:
    message = plan_pb2.MetricLimits(
        metric=metric,
        overage_allowed=limits["o"],
        price_per_unit=limits["p"],
        overage_price_per_unit=limits["op"],
        period=plan_pb2.PERIOD_NONE if limits["per"] == "N" else plan_pb2.PERIOD_MONTHLY,
    )
    if "q" in limits:
        message.contract_quota = limits["q"]
    if "h" in limits:
        message.hard_limit = limits["h"]
    return message
