"""Plans: checked on the way in, stored as a typed JSON document for the scripts.

The stored document (`PlanDoc`, schema 2) is read by the Lua scripts with cjson
and by the server through the types below:

    {"schema": 2, "name", "timezone", "rate_per_second", "burst",
     "processing_priority", "support_level", "currency", "store_failure_policy",
     "metrics": {metric: {"period": "monthly" | "none", "contract_quota"?,
                          "hard_limit"?, "overage_allowed", "price", "overage_price",
                          "windows"?: [{"window": "minute" | "hour" | "day" | "week",
                                        "limit", "soft", "shadow"?}, ...],
                          "shadow_hard_limit"?, "overage_spend_cap"?,
                          "overage_unit_cap"?, "rollover_percent"?,
                          "rollover_cap"?,
                          "alerts"?: {"quota": [percent, ...], "hard": [percent, ...],
                                      "credits_below"?, "expiring_ms"?}}},
     "calendar"?: "since_ms,kind,anchor_ms;..."}

"calendar" is present when the plan has (or had) a billing anchor: the segments
of its billing calendar (domain/periods.py, Calendar), the last one the anchor
now set. Absent: calendar months.

Absent limits are left out rather than written as null, because cjson decodes
null to a value Lua treats as true. Prices are canonical decimal strings.

Schema 1 is the document of earlier releases, with terse keys and no "schema"
key: {"name", "tz", "rate", "burst", "prio", "support", "currency", "sfp"?,
"metrics": {metric: {"q"?, "h"?, "o", "p", "op", "per"?: "M" | "N"}}}. Every
reader accepts both (`plan_doc`; `plan_doc` in _lib.lua), and a server writes
schema 1 until the deployment's plans were migrated (store/plan_migration.py),
so that a server of an earlier release running beside it during a rolling
upgrade still reads every plan (docs/operations.md, upgrading). Schema 1 has no
windows nor shadow limits: a plan with them needs the migrated deployment
(decisions 35 and 36).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal, NotRequired, Required, TypedDict, cast

from pagemeter.v1 import plan_pb2
from pagemeter_server.domain.periods import (
    ANCHORED_MONTHS,
    ANCHORED_YEARS,
    CALENDAR_MONTHS,
    Segment,
    parse_segments,
    segments_spec,
    timestamp,
    timestamp_ms,
    zone,
)
from pagemeter_server.domain.validation import (
    CURRENCY,
    MAX_LABEL,
    MAX_LIMIT,
    MAX_METRICS,
    MAX_NAME,
    Violations,
)

SCHEMA = 2

Period = Literal["monthly", "none"]
FailurePolicy = Literal["", "open", "closed"]


WindowKind = Literal["minute", "hour", "day", "week"]
# Shortest first: the order windows are stored, decided and answered in.
WINDOW_KINDS: tuple[WindowKind, ...] = ("minute", "hour", "day", "week")
WINDOW_CODES: dict[plan_pb2.Window.ValueType, WindowKind] = {
    plan_pb2.WINDOW_MINUTE: "minute",
    plan_pb2.WINDOW_HOUR: "hour",
    plan_pb2.WINDOW_DAY: "day",
    plan_pb2.WINDOW_WEEK: "week",
}
WINDOW_ENUMS = {kind: code for code, kind in WINDOW_CODES.items()}


class WindowTerms(TypedDict, total=False):
    """A cap on a metric's usage per fixed window."""

    window: Required[WindowKind]
    limit: Required[int]
    soft: Required[bool]
    shadow: bool  # absent: false


class AlertTerms(TypedDict, total=False):
    """A metric's notification thresholds as set (MetricAlerts); absent from
    the terms, the scripts watch the defaults (DEFAULT_ALERT_PERCENTS)."""

    quota: Required[list[int]]  # percentages of the contract quota, ascending
    hard: Required[list[int]]  # percentages of the hard limit, ascending
    credits_below: int  # absent: not watched
    expiring_ms: int  # absent: not watched


# The thresholds of a metric whose plan sets none (store/lua/_lib.lua repeats them).
DEFAULT_ALERT_PERCENTS = (80, 100)
MAX_ALERT_PERCENTS = 10
MAX_EXPIRING_SECONDS = 366 * 86_400


class MetricTerms(TypedDict, total=False):
    """One metric of a plan: its period, limits, prices and windows."""

    period: Required[Period]
    contract_quota: int  # absent: unlimited
    hard_limit: int  # absent: none
    overage_allowed: Required[bool]
    price: Required[str]
    overage_price: Required[str]
    windows: list[WindowTerms]  # absent: none; shortest first
    shadow_hard_limit: int  # absent: none
    # The overage spend cap as set (a canonical decimal) and, for the scripts,
    # what it allows in overage units: floor(cap / overage_price). Absent: none.
    overage_spend_cap: str
    overage_unit_cap: int
    # Rollover of the previous period's unused quota (decision 42). Absent: none.
    rollover_percent: int
    rollover_cap: int
    alerts: AlertTerms  # absent: the default thresholds


class PlanDoc(TypedDict):
    """A plan as stored (schema 2)."""

    schema: int
    name: str
    timezone: str
    rate_per_second: int
    burst: int
    processing_priority: str
    support_level: str
    currency: str
    # "" when the plan leaves it to the service's --store-failure-policy.
    store_failure_policy: FailurePolicy
    metrics: dict[str, MetricTerms]
    calendar: NotRequired[str]


# What the readers assume of a metric outside the plan (usage recorded anyway):
# monthly, unlimited, no overage allowed, priced 0 (check.lua and record.lua alike).
UNPLANNED = MetricTerms(period="monthly", overage_allowed=False, price="0", overage_price="0")

_PERIODS: dict[plan_pb2.Period.ValueType, Period] = {
    plan_pb2.PERIOD_UNSPECIFIED: "monthly",
    plan_pb2.PERIOD_MONTHLY: "monthly",
    plan_pb2.PERIOD_NONE: "none",
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


_FAILURE_POLICY_CODES: dict[plan_pb2.StoreFailurePolicy.ValueType, FailurePolicy] = {
    plan_pb2.STORE_FAILURE_POLICY_CLOSED: "closed",
    plan_pb2.STORE_FAILURE_POLICY_OPEN: "open",
}
_FAILURE_POLICIES = {code: value for value, code in _FAILURE_POLICY_CODES.items()}

_INTERVAL_KINDS: dict[plan_pb2.BillingInterval.ValueType, str] = {
    plan_pb2.BILLING_INTERVAL_UNSPECIFIED: ANCHORED_MONTHS,
    plan_pb2.BILLING_INTERVAL_MONTH: ANCHORED_MONTHS,
    plan_pb2.BILLING_INTERVAL_YEAR: ANCHORED_YEARS,
}
_KIND_INTERVALS = {
    ANCHORED_MONTHS: plan_pb2.BILLING_INTERVAL_MONTH,
    ANCHORED_YEARS: plan_pb2.BILLING_INTERVAL_YEAR,
}
# Anchors from 2000-01-01 to 2100-01-01 (UTC): a subscription's start, not a typo.
MIN_ANCHOR_MS, MAX_ANCHOR_MS = 946_684_800_000, 4_102_444_800_000


def billing_segment(plan: plan_pb2.Plan, problems: Violations) -> Segment:
    """The billing calendar the plan asks for, as a segment in force from its start."""
    if not plan.HasField("billing_anchor"):
        if plan.billing_interval != plan_pb2.BILLING_INTERVAL_UNSPECIFIED:
            problems.add(
                "plan.billing_interval",
                "billing_interval needs billing_anchor (without one, periods are calendar months)",
            )
        return Segment(0, CALENDAR_MONTHS)
    if plan.billing_interval not in _INTERVAL_KINDS:
        problems.add("plan.billing_interval", f"unknown billing interval {plan.billing_interval}")
    anchor = plan.billing_anchor
    if not 0 <= anchor.nanos < 1_000_000_000 or not (
        MIN_ANCHOR_MS <= timestamp_ms(anchor) < MAX_ANCHOR_MS
    ):
        problems.add(
            "plan.billing_anchor",
            "billing_anchor must be a valid time from 2000-01-01 to 2100-01-01 (UTC)",
        )
        return Segment(0, CALENDAR_MONTHS)
    return Segment(
        0, _INTERVAL_KINDS.get(plan.billing_interval, ANCHORED_MONTHS), timestamp_ms(anchor)
    )


def plan_to_doc(plan: plan_pb2.Plan, default_timezone: str) -> PlanDoc:
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
    billing = billing_segment(plan, problems)
    metrics: dict[str, MetricTerms] = {}
    for index, limits in enumerate(plan.metrics):
        path = f"plan.metrics[{index}]"
        if not problems.check_metric_name(limits.metric, f"{path}.metric"):
            continue
        if limits.metric in metrics:
            problems.add(f"{path}.metric", f"metric {limits.metric!r} appears twice in the plan")
            continue
        metrics[limits.metric] = _metric_terms(limits, path, problems)
    problems.raise_if_any()
    doc = PlanDoc(
        schema=SCHEMA,
        name=plan.name,
        timezone=timezone,
        rate_per_second=plan.api_rate_limit,
        burst=plan.api_burst,
        processing_priority=plan.processing_priority,
        support_level=plan.support_level,
        currency=plan.currency or "USD",
        store_failure_policy=_FAILURE_POLICY_CODES.get(plan.store_failure_policy, ""),
        metrics=metrics,
    )
    # The anchor asked for, as if it had always been the plan's; the store joins
    # it to the calendar the organization had (Calendar.with_anchor).
    spec = segments_spec((billing,))
    if spec:
        doc["calendar"] = spec
    return doc


def plan_token(doc: PlanDoc) -> str:
    """The plan's calendar token (domain/periods.py): its timezone, and its
    billing calendar when it has one. The scripts compare it with the server's."""
    spec = doc.get("calendar", "")
    return f"{doc['timezone']}|{spec}" if spec else doc["timezone"]


def _metric_terms(limits: plan_pb2.MetricLimits, path: str, problems: Violations) -> MetricTerms:
    problems.check_price(limits.price_per_unit, f"{path}.price_per_unit")
    problems.check_price(limits.overage_price_per_unit, f"{path}.overage_price_per_unit")
    if limits.period not in _PERIODS:
        problems.add(f"{path}.period", f"unknown period {limits.period}")
    terms = MetricTerms(
        period=_PERIODS.get(limits.period, "monthly"),
        overage_allowed=limits.overage_allowed,
        price="0",
        overage_price="0",
    )
    if limits.HasField("contract_quota"):
        problems.check_limit(limits.contract_quota, f"{path}.contract_quota")
        terms["contract_quota"] = limits.contract_quota
    if limits.HasField("hard_limit"):
        problems.check_limit(limits.hard_limit, f"{path}.hard_limit")
        terms["hard_limit"] = limits.hard_limit
    if limits.HasField("shadow_hard_limit"):
        problems.check_limit(limits.shadow_hard_limit, f"{path}.shadow_hard_limit")
        terms["shadow_hard_limit"] = limits.shadow_hard_limit
    if limits.windows:
        windows = _window_terms(limits, path, problems)
        if windows:
            terms["windows"] = windows
    if limits.overage_spend_cap:
        problems.check_price(limits.overage_spend_cap, f"{path}.overage_spend_cap")
        if not limits.overage_allowed:
            problems.add(
                f"{path}.overage_spend_cap",
                "a spend cap limits overage: set overage_allowed too (without it no "
                "overage is admitted at all)",
            )
    _rollover_terms(limits, terms, path, problems)
    if limits.HasField("alerts"):
        terms["alerts"] = _alert_terms(limits.alerts, f"{path}.alerts", problems)
    if not problems.items:
        # Only valid prices are read (the plan is refused otherwise).
        terms["price"] = canonical_price(limits.price_per_unit)
        terms["overage_price"] = canonical_price(limits.overage_price_per_unit)
        if limits.overage_spend_cap:
            _spend_cap_terms(terms, limits.overage_spend_cap)
    return terms


def _rollover_terms(
    limits: plan_pb2.MetricLimits, terms: MetricTerms, path: str, problems: Violations
) -> None:
    if limits.HasField("rollover_cap") and not limits.HasField("rollover_percent"):
        problems.add(
            f"{path}.rollover_cap",
            "a rollover cap limits a rollover: set rollover_percent too",
        )
    if not limits.HasField("rollover_percent"):
        return
    where = f"{path}.rollover_percent"
    if not 1 <= limits.rollover_percent <= 100:
        problems.add(
            where,
            f"rollover_percent must be between 1 and 100 (got {limits.rollover_percent}); "
            "leave it unset for no rollover",
        )
    if limits.period == plan_pb2.PERIOD_NONE:
        problems.add(
            where,
            "a rollover carries unused quota from one period to the next: PERIOD_NONE "
            "gauges have no periods",
        )
    elif not limits.HasField("contract_quota"):
        problems.add(where, "a rollover carries unused contract quota: set contract_quota too")
    terms["rollover_percent"] = limits.rollover_percent
    if limits.HasField("rollover_cap"):
        problems.check_limit(limits.rollover_cap, f"{path}.rollover_cap")
        terms["rollover_cap"] = limits.rollover_cap


def _alert_terms(alerts: plan_pb2.MetricAlerts, path: str, problems: Violations) -> AlertTerms:
    terms = AlertTerms(
        quota=_alert_percents(alerts.quota_percents, 1000, f"{path}.quota_percents", problems),
        hard=_alert_percents(
            alerts.hard_limit_percents, 100, f"{path}.hard_limit_percents", problems
        ),
    )
    if alerts.HasField("credits_below"):
        problems.check_limit(alerts.credits_below, f"{path}.credits_below")
        terms["credits_below"] = alerts.credits_below
    if alerts.HasField("grant_expiring_within"):
        within = alerts.grant_expiring_within
        where = f"{path}.grant_expiring_within"
        if not (1 <= within.seconds <= MAX_EXPIRING_SECONDS and 0 <= within.nanos < 10**9):
            problems.add(
                where,
                f"grant_expiring_within must be between 1 second and 366 days "
                f"(got {within.seconds}s)",
            )
        else:
            terms["expiring_ms"] = within.seconds * 1000 + within.nanos // 1_000_000
    return terms


def _alert_percents(
    percents: Sequence[int], highest: int, where: str, problems: Violations
) -> list[int]:
    if len(percents) > MAX_ALERT_PERCENTS:
        problems.add(where, f"at most {MAX_ALERT_PERCENTS} thresholds (got {len(percents)})")
    for percent in percents:
        if not 1 <= percent <= highest:
            problems.add(where, f"a threshold must be between 1 and {highest} % (got {percent})")
    return sorted(set(percents))


def _spend_cap_terms(terms: MetricTerms, cap_text: str) -> None:
    """The cap in money, and in overage units for the scripts (money never enters
    Lua: decision 36). At a price of 0 overage costs nothing and the cap never binds."""
    cap = Decimal(cap_text)
    terms["overage_spend_cap"] = format_money(cap)
    price = Decimal(terms["overage_price"])
    if price > 0:
        # Past MAX_LIMIT the cap is beyond any usage the limits allow; clamping keeps
        # the number exact in the scripts' doubles (a cap of 10^12 at 10^-9 is 10^21).
        terms["overage_unit_cap"] = min(int(cap // price), MAX_LIMIT)


def _window_terms(
    limits: plan_pb2.MetricLimits, path: str, problems: Violations
) -> list[WindowTerms]:
    if limits.period == plan_pb2.PERIOD_NONE:
        problems.add(
            f"{path}.windows",
            "windows cap usage over time: they apply to monthly metrics, not to a "
            "PERIOD_NONE gauge",
        )
        return []
    windows: dict[WindowKind, WindowTerms] = {}
    for index, window in enumerate(limits.windows):
        where = f"{path}.windows[{index}]"
        kind = WINDOW_CODES.get(window.window)
        if kind is None:
            problems.add(
                f"{where}.window",
                f"window must be WINDOW_MINUTE, WINDOW_HOUR, WINDOW_DAY or WINDOW_WEEK "
                f"(got {window.window})",
            )
            continue
        if kind in windows:
            problems.add(f"{where}.window", f"the metric has two {kind} windows; keep one")
            continue
        problems.check_limit(window.limit, f"{where}.limit")
        if window.soft and window.shadow:
            problems.add(
                f"{where}.shadow",
                "a window is soft (reports, never denies) or shadow (on trial as a hard "
                "window), not both",
            )
        terms = WindowTerms(window=kind, limit=window.limit, soft=window.soft)
        if window.shadow:
            terms["shadow"] = True
        windows[kind] = terms
    return [windows[kind] for kind in WINDOW_KINDS if kind in windows]


def needs_schema_2(doc: PlanDoc) -> bool:
    """Whether the plan uses terms schema 1 cannot hold (windows, shadow limits,
    spend caps, rollovers)."""
    return "calendar" in doc or any(
        terms.get("windows")
        or "shadow_hard_limit" in terms
        or "overage_spend_cap" in terms
        or "rollover_percent" in terms
        or "alerts" in terms
        for terms in doc["metrics"].values()
    )


# -- reading and writing the stored text ----------------------------------------


def plan_doc(raw: Mapping[str, Any]) -> PlanDoc:
    """A decoded stored document, of either schema, as a schema 2 PlanDoc."""
    if raw.get("schema") == SCHEMA:
        return cast(PlanDoc, dict(raw))
    return _from_schema_1(raw)


def plan_doc_from_json(text: str) -> PlanDoc:
    return plan_doc(json.loads(text))


def plan_doc_json(doc: PlanDoc) -> str:
    """The stored text of a document (schema 2), compact, keys in declared order."""
    return json.dumps(doc, separators=(",", ":"))


def is_current_schema(raw: Mapping[str, Any]) -> bool:
    return raw.get("schema") == SCHEMA


def _from_schema_1(raw: Mapping[str, Any]) -> PlanDoc:
    # Defaults are what the readers of schema 1 assumed for a missing key:
    # documents from before the plan log have no "per", and those from before
    # per-plan failure policies no "sfp".
    return PlanDoc(
        schema=SCHEMA,
        name=raw["name"],
        timezone=raw["tz"],
        rate_per_second=raw["rate"],
        burst=raw["burst"],
        processing_priority=raw["prio"],
        support_level=raw["support"],
        currency=raw["currency"],
        store_failure_policy=raw.get("sfp", ""),
        metrics={metric: _terms_from_schema_1(t) for metric, t in raw["metrics"].items()},
    )


def _terms_from_schema_1(raw: Mapping[str, Any]) -> MetricTerms:
    terms = MetricTerms(
        period="none" if raw.get("per") == "N" else "monthly",
        overage_allowed=bool(raw.get("o", False)),
        price=raw.get("p", "0"),
        overage_price=raw.get("op", "0"),
    )
    if raw.get("q") is not None:
        terms["contract_quota"] = raw["q"]
    if raw.get("h") is not None:
        terms["hard_limit"] = raw["h"]
    return terms


def schema_1_json(doc: PlanDoc) -> str:
    """The document as a server of an earlier release writes it (schema 1).

    Written until the deployment's plans are migrated, so that such a server,
    still running during a rolling upgrade, reads every plan. Key for key and in
    the same order as that release, so the stored text is the same too.
    """
    metrics: dict[str, dict[str, Any]] = {}
    for metric, terms in doc["metrics"].items():
        old: dict[str, Any] = {
            "o": terms["overage_allowed"],
            "per": "N" if terms["period"] == "none" else "M",
        }
        if "contract_quota" in terms:
            old["q"] = terms["contract_quota"]
        if "hard_limit" in terms:
            old["h"] = terms["hard_limit"]
        old["p"] = terms["price"]
        old["op"] = terms["overage_price"]
        metrics[metric] = old
    return json.dumps(
        {
            "name": doc["name"],
            "tz": doc["timezone"],
            "rate": doc["rate_per_second"],
            "burst": doc["burst"],
            "prio": doc["processing_priority"],
            "support": doc["support_level"],
            "currency": doc["currency"],
            "metrics": metrics,
            "sfp": doc["store_failure_policy"],
        },
        separators=(",", ":"),
    )


# -- to the protos ----------------------------------------------------------------


def doc_to_plan(org_id: str, doc: PlanDoc, version: int, updated_ms: int) -> plan_pb2.Plan:
    """The stored document as a Plan message."""
    plan = plan_pb2.Plan(
        org_id=org_id,
        name=doc["name"],
        timezone=doc["timezone"],
        api_rate_limit=doc["rate_per_second"],
        api_burst=doc["burst"],
        processing_priority=doc["processing_priority"],
        support_level=doc["support_level"],
        currency=doc["currency"],
        version=version,
        store_failure_policy=_FAILURE_POLICIES.get(
            doc["store_failure_policy"], plan_pb2.STORE_FAILURE_POLICY_UNSPECIFIED
        ),
    )
    if updated_ms:
        plan.updated_at.CopyFrom(timestamp(updated_ms))
    latest = parse_segments(doc.get("calendar", ""))[-1]
    if latest.kind != CALENDAR_MONTHS:
        plan.billing_anchor.CopyFrom(timestamp(latest.anchor_ms))
        plan.billing_interval = _KIND_INTERVALS[latest.kind]
    for metric in sorted(doc["metrics"]):
        plan.metrics.append(metric_limits(metric, doc["metrics"][metric]))
    return plan


def metric_limits(metric: str, terms: MetricTerms) -> plan_pb2.MetricLimits:
    message = plan_pb2.MetricLimits(
        metric=metric,
        overage_allowed=terms["overage_allowed"],
        price_per_unit=terms["price"],
        overage_price_per_unit=terms["overage_price"],
        period=plan_pb2.PERIOD_NONE if terms["period"] == "none" else plan_pb2.PERIOD_MONTHLY,
    )
    if "contract_quota" in terms:
        message.contract_quota = terms["contract_quota"]
    if "hard_limit" in terms:
        message.hard_limit = terms["hard_limit"]
    if "shadow_hard_limit" in terms:
        message.shadow_hard_limit = terms["shadow_hard_limit"]
    if "overage_spend_cap" in terms:
        message.overage_spend_cap = terms["overage_spend_cap"]
    if "rollover_percent" in terms:
        message.rollover_percent = terms["rollover_percent"]
    if "rollover_cap" in terms:
        message.rollover_cap = terms["rollover_cap"]
    if "alerts" in terms:
        message.alerts.CopyFrom(metric_alerts(terms["alerts"]))
    for window in terms.get("windows", []):
        message.windows.add(
            window=WINDOW_ENUMS[window["window"]],
            limit=window["limit"],
            soft=window["soft"],
            shadow=window.get("shadow", False),
        )
    return message


def metric_alerts(terms: AlertTerms) -> plan_pb2.MetricAlerts:
    message = plan_pb2.MetricAlerts(
        quota_percents=terms["quota"], hard_limit_percents=terms["hard"]
    )
    if "credits_below" in terms:
        message.credits_below = terms["credits_below"]
    if "expiring_ms" in terms:
        message.grant_expiring_within.FromMilliseconds(terms["expiring_ms"])
    return message
