"""Envoy's rate-limit protocol: envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit.

API gateways (Envoy, Istio, Gloo) ask it whether a request may pass; pagemeter
answers with the same scripts as CheckQuota and RecordUsage, so an edge call
counts exactly like a job an upstream worker records (docs/envoy.md, decision 46).

A request's descriptors name one organization (`org_id`), a metric each
(`metric`) and optionally the idempotency key (`request_id`, Envoy's
x-request-id); the hits are the descriptor's `hits_addend`, else the request's,
else 1. All descriptors are decided together: one CheckQuota with a hold for
every metric, and only when all are admitted a RecordUsage that commits the held
units. Holds count against every limit, so concurrent callers are never
over-admitted; if the process dies between the two steps the hold expires after
HOLD_TTL_SECONDS and the request (which got no OK) is not counted.

The messages come from the `xds-protos` package, which has no type information:
they are `Any` here, and every value read from them is checked or converted.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.duration_pb2 import Duration

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.api.auth import Access, Authenticator, authorized
from pagemeter_server.api.quota import QuotaService
from pagemeter_server.domain.decisions import CheckResult
from pagemeter_server.domain.errors import RequestIdReused
from pagemeter_server.domain.validation import MAX_METRICS, MAX_UNITS, Violations

Context = grpc.aio.ServicerContext[Any, Any]
Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit

ORG_KEY = "org_id"
METRIC_KEY = "metric"
REQUEST_ID_KEY = "request_id"
KNOWN_KEYS = (ORG_KEY, METRIC_KEY, REQUEST_ID_KEY)
# One descriptor names one metric, and a call decides at most MAX_METRICS.
MAX_DESCRIPTORS = MAX_METRICS
# The hold only has to outlive the step between check and record (a script call
# each); longer would keep a crashed step's units reserved for longer.
HOLD_TTL_SECONDS = 10
# How long an edge call's job record (and so its request_id) is kept: long enough
# for a client's retry to count once, short enough that one record per HTTP
# request does not pile up for --record-retention-days (40 days by default).
RECORD_TTL_MS = 3_600_000
# A request without a request_id is still one job (its hold needs an id): an
# id of its own, recognisable in ListUsageRecords.
GENERATED_ID_PREFIX = "edge-"
UINT32_MAX = 2**32 - 1
YEAR_LIKE_MS = 62 * 86_400_000  # a period longer than two months is a yearly one

_WINDOW_UNITS = {
    plan_pb2.WINDOW_MINUTE: Unit.MINUTE,
    plan_pb2.WINDOW_HOUR: Unit.HOUR,
    plan_pb2.WINDOW_DAY: Unit.DAY,
    plan_pb2.WINDOW_WEEK: Unit.WEEK,
}
_REASON_NAMES = {
    value.number: value.name.removeprefix("DECISION_REASON_").lower()
    for value in quota_pb2.DESCRIPTOR.enum_types_by_name["DecisionReason"].values
}
# Denials a new period ends: Retry-After says when it starts.
_PERIOD_DENIALS = {
    quota_pb2.DECISION_REASON_QUOTA_EXCEEDED,
    quota_pb2.DECISION_REASON_HARD_LIMIT_EXCEEDED,
    quota_pb2.DECISION_REASON_SPEND_CAP_REACHED,
}


@dataclass(frozen=True)
class EdgeCall:
    """A ShouldRateLimit request as pagemeter reads it."""

    org_id: str
    request_id: str  # given by a descriptor, or generated
    metrics: tuple[str, ...]  # each descriptor's metric, in order
    units: dict[str, int]  # the hits per metric, summed over the descriptors


@dataclass(frozen=True)
class Limit:
    """The limit a descriptor's status reports: the one that leaves the fewest units."""

    name: str
    requests_per_unit: int
    unit: int
    remaining: int
    resets_ms: int | None  # None: it never resets (a lifetime metric)


def read_call(request: Any) -> EdgeCall:
    """The organization, metrics, hits and id of a request; INVALID_ARGUMENT naming
    every problem (with its descriptor and entry) when it cannot be decided."""
    problems = Violations()
    descriptors = list(request.descriptors)
    if not 1 <= len(descriptors) <= MAX_DESCRIPTORS:
        problems.add(
            "descriptors",
            f"a request needs 1 to {MAX_DESCRIPTORS} descriptors, each with the entries "
            f"'{ORG_KEY}' and '{METRIC_KEY}' (got {len(descriptors)})",
        )
    default_hits = int(request.hits_addend) or 1  # v3: 0 means 1
    read = [
        _read_descriptor(f"descriptors[{index}]", descriptor, default_hits, problems)
        for index, descriptor in enumerate(descriptors[:MAX_DESCRIPTORS])
    ]
    orgs = _one_of([(r.org_id, r.where, ORG_KEY) for r in read], "organization", problems)
    ids = _one_of([(r.request_id, r.where, REQUEST_ID_KEY) for r in read], "request_id", problems)
    units: dict[str, int] = {}
    for r in read:
        if r.metric:
            units[r.metric] = units.get(r.metric, 0) + r.hits
    for metric, hits in units.items():
        if hits > MAX_UNITS:
            problems.add(
                "hits_addend",
                f"the hits of metric {metric!r} add up to {hits}, more than {MAX_UNITS}",
            )
    problems.raise_if_any()
    request_id = ids or f"{GENERATED_ID_PREFIX}{uuid.uuid4().hex}"
    return EdgeCall(orgs, request_id, tuple(r.metric for r in read), units)


@dataclass(frozen=True)
class _Descriptor:
    where: str  # its field path, "descriptors[<index>]"
    org_id: str  # "" when missing
    metric: str  # "" when missing or malformed
    request_id: str  # "" when none
    hits: int


def _read_descriptor(
    where: str, descriptor: Any, default_hits: int, problems: Violations
) -> _Descriptor:
    """One descriptor's entries and hits, its problems added to `problems`."""
    entries = _entries(descriptor, where, problems)
    org_id, metric = entries.get(ORG_KEY), entries.get(METRIC_KEY)
    if org_id is None or metric is None:
        problems.add(
            where,
            f"{where} needs the entries '{ORG_KEY}' and '{METRIC_KEY}' (it has "
            f"{sorted(entries) or 'none'}); see docs/envoy.md for the route's rate_limits",
        )
    if org_id is not None:
        problems.check_org_id(org_id, f"{where}.entries[{ORG_KEY}]")
    if metric is not None and not problems.check_metric_name(
        metric, f"{where}.entries[{METRIC_KEY}]"
    ):
        metric = None
    request_id = entries.get(REQUEST_ID_KEY)
    if request_id is not None:
        problems.check_request_id(request_id, f"{where}.entries[{REQUEST_ID_KEY}]")
    if descriptor.HasField("limit"):
        problems.add(
            f"{where}.limit",
            "pagemeter's limits come from the organization's plan; remove the "
            "descriptor's limit override",
        )
    # A descriptor's own hits_addend wins, 0 included (UInt64Value: set or not).
    hits = int(descriptor.hits_addend.value) if descriptor.HasField("hits_addend") else default_hits
    return _Descriptor(where, org_id or "", metric or "", request_id or "", hits)


def _entries(descriptor: Any, where: str, problems: Violations) -> dict[str, str]:
    """A descriptor's entries by key; unknown and repeated keys are problems (a
    mistyped key would otherwise leave the call undecided or decided wrongly)."""
    found: dict[str, str] = {}
    for position, entry in enumerate(descriptor.entries):
        key, value = str(entry.key), str(entry.value)
        field_path = f"{where}.entries[{position}]"
        if key not in KNOWN_KEYS:
            problems.add(
                field_path,
                f"unknown descriptor key {key[:40]!r}: pagemeter reads "
                f"{', '.join(repr(k) for k in KNOWN_KEYS)}",
            )
        elif key in found:
            problems.add(field_path, f"{where} names '{key}' twice")
        else:
            found[key] = value
    return found


def _one_of(named: list[tuple[str, str, str]], what: str, problems: Violations) -> str:
    """The one value the descriptors give (`named`: value, descriptor, key; "" for
    none): one request decides for one organization and one job, so a second
    value is a problem."""
    values = [(value, f"{where}.entries[{key}]") for value, where, key in named if value]
    distinct = list(dict.fromkeys(value for value, _ in values))
    if len(distinct) > 1:
        second = next(field for value, field in values if value == distinct[1])
        shown = ", ".join(repr(v[:64]) for v in distinct)
        problems.add(
            second,
            f"the descriptors name more than one {what} ({shown}); one request is decided "
            f"for one {what}, all of its descriptors together",
        )
    return distinct[0] if distinct else ""


def hits_of(call: EdgeCall, max_hold_ttl_seconds: float) -> quota_pb2.CheckQuotaRequest:
    """The CheckQuota that decides and holds a call's hits (for HOLD_TTL_SECONDS,
    or the longest hold the service allows when that is shorter)."""
    hold_ttl = Duration()
    hold_ttl.FromMilliseconds(round(min(HOLD_TTL_SECONDS, max_hold_ttl_seconds) * 1000))
    return quota_pb2.CheckQuotaRequest(
        org_id=call.org_id,
        units=call.units,
        request_id=call.request_id,
        hold=True,
        hold_ttl=hold_ttl,
    )


# -- the answer ---------------------------------------------------------------------------


def binding_limit(d: quota_pb2.MetricDecision, period_end_ms: int, yearly: bool) -> Limit | None:
    """The limit that leaves the fewest units after the decision: the tightest hard
    window, or the period (its hard limit, or what quota, credits and spend cap
    allow); None when no limit applies (or the metric is not in the plan)."""
    if d.reason == quota_pb2.DECISION_REASON_UNKNOWN_METRIC:
        return None
    windows = [w for w in d.windows if not w.soft and not w.shadow]
    tightest = min(windows, key=lambda w: w.remaining, default=None)
    period_left = d.remaining if d.HasField("remaining") else None
    if tightest is not None and (period_left is None or tightest.remaining <= period_left):
        return Limit(
            f"{d.metric}/{plan_pb2.Window.Name(tightest.window).removeprefix('WINDOW_').lower()}",
            tightest.limit,
            _WINDOW_UNITS[tightest.window],
            tightest.remaining,
            tightest.resets_at.ToMilliseconds(),
        )
    if period_left is None or not d.HasField("max_admissible"):
        return None
    used = d.committed + d.held
    limit = used + d.max_admissible
    if d.HasField("hard_limit") and d.hard_limit - used == d.max_admissible:
        limit = d.hard_limit  # reported as the plan says it, also when passed
    if d.period == plan_pb2.PERIOD_NONE:
        return Limit(f"{d.metric}/lifetime", limit, Unit.UNKNOWN, period_left, None)
    unit = Unit.YEAR if yearly else Unit.MONTH
    return Limit(f"{d.metric}/period", limit, unit, period_left, period_end_ms)


def descriptor_status(
    d: quota_pb2.MetricDecision, period_end_ms: int, yearly: bool, now_ms: int
) -> Any:
    status = rls_pb2.RateLimitResponse.DescriptorStatus(
        code=Code.OK if d.allowed else Code.OVER_LIMIT
    )
    limit = binding_limit(d, period_end_ms, yearly)
    if limit is not None:
        status.current_limit.name = limit.name
        status.current_limit.requests_per_unit = min(limit.requests_per_unit, UINT32_MAX)
        status.current_limit.unit = limit.unit
        status.limit_remaining = min(max(limit.remaining, 0), UINT32_MAX)
        if limit.resets_ms is not None:
            status.duration_until_reset.FromMilliseconds(max(limit.resets_ms - now_ms, 0))
    return status


def decided(
    call: EdgeCall, response: quota_pb2.CheckQuotaResponse, result: CheckResult, now_ms: int
) -> Any:
    """Envoy's answer to a CheckQuota decision: a status per descriptor, the
    overall code and the headers Envoy adds."""
    overall = Code.OK if response.allowed else Code.OVER_LIMIT
    answer = rls_pb2.RateLimitResponse(overall_code=overall)
    by_metric = {d.metric: d for d in response.metrics}
    yearly = result.month.end_ms - result.month.start_ms > YEAR_LIKE_MS
    for metric in call.metrics:
        if metric in by_metric:
            answer.statuses.append(
                descriptor_status(by_metric[metric], result.month.end_ms, yearly, now_ms)
            )
        else:  # rate limited or no plan: nothing was decided per metric
            answer.statuses.append(_over_limit(response))
    _add_limit_headers(answer)
    reason = _REASON_NAMES[response.reason]
    _describe(answer, call, reason, response.would_deny)
    if response.allowed:
        _add(answer.request_headers_to_add, "x-pagemeter-request-id", call.request_id)
    else:
        _add(answer.response_headers_to_add, "x-pagemeter-reason", reason)
        wait_ms = retry_after_ms(response, result.month.end_ms, now_ms)
        if wait_ms is not None:
            _add(answer.response_headers_to_add, "retry-after", str(_seconds(wait_ms)))
    return answer


def _over_limit(response: quota_pb2.CheckQuotaResponse) -> Any:
    status = rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OVER_LIMIT)
    if response.HasField("retry_after"):
        status.duration_until_reset.CopyFrom(response.retry_after)
    return status


def retry_after_ms(
    response: quota_pb2.CheckQuotaResponse, period_end_ms: int, now_ms: int
) -> int | None:
    """How long a denied caller should wait: the API rate limit's or the windows'
    wait, or until the period ends for a period's limit; None when waiting does
    not help (no plan, an unknown metric, a lifetime limit, a window too small)."""
    if response.HasField("retry_after"):
        return int(response.retry_after.ToMilliseconds())
    denied = [d for d in response.metrics if not d.allowed]
    if denied and all(
        d.reason in _PERIOD_DENIALS and d.period != plan_pb2.PERIOD_NONE for d in denied
    ):
        return max(period_end_ms - now_ms, 0)
    return None


def _add_limit_headers(answer: Any) -> None:
    """RateLimit-Limit, -Remaining and -Reset of the status with the fewest units
    left, as envoyproxy/ratelimit adds them (the IETF draft's header names)."""
    limited = [s for s in answer.statuses if s.HasField("current_limit")]
    if not limited:
        return
    tightest = min(limited, key=lambda s: s.limit_remaining)
    headers = answer.response_headers_to_add
    _add(headers, "ratelimit-limit", str(tightest.current_limit.requests_per_unit))
    _add(headers, "ratelimit-remaining", str(tightest.limit_remaining))
    if tightest.HasField("duration_until_reset"):
        reset_ms = tightest.duration_until_reset.ToMilliseconds()
        _add(headers, "ratelimit-reset", str(_seconds(reset_ms)))


def _describe(answer: Any, call: EdgeCall, reason: str, would_deny: bool) -> None:
    """The decision in the answer's dynamic_metadata, which Envoy puts under the
    filter's namespace (envoy.filters.http.ratelimit) for its access log."""
    answer.dynamic_metadata.update(
        {
            "org_id": call.org_id,
            "request_id": call.request_id,
            "reason": reason,
            # A shadow limit of the plan would have refused (decision 36).
            "would_deny": would_deny,
        }
    )


def _add(headers: Any, key: str, value: str) -> None:
    headers.append(base_pb2.HeaderValue(key=key, value=value))


def _seconds(ms: int) -> int:
    """Whole seconds, rounded up: a client that waits them is not early."""
    return math.ceil(ms / 1000)


def replayed(call: EdgeCall) -> Any:
    """The answer to a request whose id was already admitted and counted: OK, and
    counted once (a retry of a call whose answer was lost)."""
    answer = rls_pb2.RateLimitResponse(overall_code=Code.OK)
    answer.statuses.extend(
        rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK) for _ in call.metrics
    )
    _add(answer.request_headers_to_add, "x-pagemeter-request-id", call.request_id)
    _describe(answer, call, "duplicate", False)
    return answer


# -- the service --------------------------------------------------------------------------


class RateLimitService:
    """envoy.service.ratelimit.v3.RateLimitService on pagemeter's quota rules.

    Not a subclass of the generated servicer: xds-protos has no type information,
    and grpc needs only the method.
    """

    def __init__(self, quota: QuotaService, auth: Authenticator) -> None:
        self.quota = quota
        self.auth = auth

    @authorized(Access.WRITE)
    async def ShouldRateLimit(self, request: Any, context: Context) -> Any:
        call = read_call(request)
        try:
            response, result = await self.quota.decide(
                hits_of(call, self.quota.settings.max_hold_ttl_seconds),
                record_ttl_ms=RECORD_TTL_MS,
            )
        except RequestIdReused as exc:
            if exc.status != "completed":
                raise  # the id belongs to another job: ALREADY_EXISTS
            return await self._replay(call)
        if response.allowed:
            await self.quota.record(self._commit(call), record_ttl_ms=RECORD_TTL_MS)
        return decided(call, response, result, self.quota.clock.now_ms())

    async def _replay(self, call: EdgeCall) -> Any:
        """A request id already recorded: the same hits are a duplicate (counted
        once, answered OK); other hits are ALREADY_EXISTS, raised by the record."""
        await self.quota.record(self._commit(call), record_ttl_ms=RECORD_TTL_MS)
        return replayed(call)

    @staticmethod
    def _commit(call: EdgeCall) -> quota_pb2.RecordUsageRequest:
        """The RecordUsage that commits an admitted call's held units."""
        return quota_pb2.RecordUsageRequest(
            org_id=call.org_id, request_id=call.request_id, units=call.units
        )
