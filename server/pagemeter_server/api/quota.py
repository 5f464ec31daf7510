"""gRPC handlers: validate, call the store, shape the answer.

No rule is decided here; the Lua scripts decide. Handlers only check input,
read the clock, and translate between protobuf messages and store results.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import redis.exceptions

from pagemeter.v1 import quota_pb2, quota_pb2_grpc
from pagemeter_server.api.auth import Access, Authenticator, authorized
from pagemeter_server.api.convert import (
    job_counts,
    metric_decision,
    metric_record_result,
    metric_usage,
    month_summary,
)
from pagemeter_server.api.status import batch_item_error
from pagemeter_server.domain import usage as rules
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.decisions import (
    CheckCall,
    CheckResult,
    RecordCall,
    RecordResult,
)
from pagemeter_server.domain.errors import InvalidArgument, StoreError, TooManyMetrics
from pagemeter_server.domain.periods import calendar, timestamp, timestamp_ms, timezone_name
from pagemeter_server.domain.plans import WINDOW_CODES
from pagemeter_server.domain.validation import (
    DOCUMENT_TYPE,
    MAX_LABEL,
    Violations,
    check_batch_size,
    check_year_month,
    require_org_id,
)
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.settings import Settings
from pagemeter_server.store.quota import Store

Context = grpc.aio.ServicerContext[Any, Any]

# Future tolerance for completed_at: clocks of callers and servers drift a little.
MAX_FUTURE_MS = 5 * 60 * 1000
DAY_MS = 86_400_000

_RECORD_STATUS = {
    "completed": quota_pb2.RECORD_STATUS_COMPLETED,
    "failed": quota_pb2.RECORD_STATUS_FAILED,
}
_RELEASE_OUTCOME = {
    "released": quota_pb2.RELEASE_OUTCOME_RELEASED,
    "already_released": quota_pb2.RELEASE_OUTCOME_ALREADY_RELEASED,
    "expired": quota_pb2.RELEASE_OUTCOME_EXPIRED,
    "already_recorded": quota_pb2.RELEASE_OUTCOME_ALREADY_RECORDED,
    "not_found": quota_pb2.RELEASE_OUTCOME_NOT_FOUND,
}
_REASON_LABEL = {
    value.number: value.name.removeprefix("DECISION_REASON_").lower()
    for value in quota_pb2.DESCRIPTOR.enum_types_by_name["DecisionReason"].values
}


class QuotaService(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(
        self,
        store: Store,
        settings: Settings,
        clock: Clock,
        metrics: ServiceMetrics,
        auth: Authenticator,
    ) -> None:
        self.store = store
        self.auth = auth
        self.settings = settings
        self.clock = clock
        self.metrics = metrics

    # -- CheckQuota -------------------------------------------------------------

    @authorized(Access.WRITE)
    async def CheckQuota(
        self, request: quota_pb2.CheckQuotaRequest, context: Context
    ) -> quota_pb2.CheckQuotaResponse:
        try:
            response, _ = await self.decide(request)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if self._failure_policy(request.org_id) != "open":
                raise  # answered UNAVAILABLE: fail closed
            return self._fail_open(request)
        return response

    async def decide(
        self, request: quota_pb2.CheckQuotaRequest, *, record_ttl_ms: int | None = None
    ) -> tuple[quota_pb2.CheckQuotaResponse, CheckResult]:
        """CheckQuota's decision, with the store's result it was made from (the
        period's bounds), never failing open: Envoy's rate-limit protocol
        (api/ratelimit.py) leaves an outage to Envoy's own failure mode, and keeps
        its jobs' records for `record_ttl_ms` (None: --record-retention-days)."""
        call = self._check_call(request)
        if record_ttl_ms is not None:
            call = dataclasses.replace(call, record_ttl_ms=record_ttl_ms)
        result = await self.store.check(request.org_id, call, now_ms=self.clock.now_ms())
        return self._check_response(request, result), result

    def _check_response(
        self,
        request: quota_pb2.CheckQuotaRequest,
        result: CheckResult,
        response: quota_pb2.CheckQuotaResponse | None = None,
    ) -> quota_pb2.CheckQuotaResponse:
        """The answer to `request`, built in `response` when given (a batch's item)."""
        if response is None:
            response = quota_pb2.CheckQuotaResponse()
        response.request_id = request.request_id
        if result.outcome == "no_plan":
            response.reason = quota_pb2.DECISION_REASON_NO_PLAN
        elif result.outcome == "rate_limited":
            response.reason = quota_pb2.DECISION_REASON_RATE_LIMITED
            response.retry_after.FromMilliseconds(result.retry_after_ms)
        else:
            response.allowed = result.allowed
            response.reason = rules.call_reason(result.metrics)  # type: ignore[assignment]
            response.held = result.held
            response.duplicate = result.duplicate
            if result.held:
                response.hold_expires_at.CopyFrom(timestamp(result.hold_expires_ms))
            response.metrics.extend(
                metric_decision(d, result.month, result.spans) for d in result.metrics
            )
            response.would_deny = any(d.would_deny for d in response.metrics)
            if response.reason == quota_pb2.DECISION_REASON_WINDOW_LIMIT_EXCEEDED:
                wait_ms = rules.window_retry_after_ms(response.metrics, result.now_ms)
                if wait_ms is not None:
                    response.retry_after.FromMilliseconds(wait_ms)
        self._count_decisions(response, result.duplicate)
        self.metrics.count_units("expired", result.expired)
        return response

    def _failure_policy(self, org_id: str) -> str:
        return self.store.failure_policy(org_id) or self.settings.store_failure_policy

    def _fail_open(self, request: quota_pb2.CheckQuotaRequest) -> quota_pb2.CheckQuotaResponse:
        """Admit unchecked: the store is unreachable and the policy is open."""
        response = quota_pb2.CheckQuotaResponse(
            request_id=request.request_id,
            allowed=True,
            reason=quota_pb2.DECISION_REASON_FAIL_OPEN,
        )
        for metric, units in sorted(request.units.items()):
            response.metrics.append(
                quota_pb2.MetricDecision(
                    metric=metric,
                    allowed=True,
                    reason=quota_pb2.DECISION_REASON_FAIL_OPEN,
                    requested=units,
                )
            )
            planned = metric in self.store.known_plan_metrics(request.org_id)
            self.metrics.fail_open.labels(self.metrics.metric_label(metric, planned)).inc()
        return response

    def _validate_check(self, request: quota_pb2.CheckQuotaRequest) -> int:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_units(request.units)
        if request.hold or request.request_id:
            problems.check_request_id(request.request_id)
        hold_ttl_ms = round(self.settings.hold_ttl_seconds * 1000)
        if request.HasField("hold_ttl") and problems.check_duration(request.hold_ttl, "hold_ttl"):
            hold_ttl_ms = request.hold_ttl.ToMilliseconds()
            longest = round(self.settings.max_hold_ttl_seconds * 1000)
            if not 1000 <= hold_ttl_ms <= longest:
                problems.add(
                    "hold_ttl",
                    f"hold_ttl must be between 1 second and {longest // 1000} seconds",
                )
        problems.raise_if_any()
        return hold_ttl_ms

    def _count_decisions(self, response: quota_pb2.CheckQuotaResponse, duplicate: bool) -> None:
        if duplicate:
            return
        metrics = self.metrics
        if not response.metrics:
            metrics.series(metrics.decisions, "", "denied", _REASON_LABEL[response.reason]).inc()
        for d in response.metrics:
            known = d.reason != quota_pb2.DECISION_REASON_UNKNOWN_METRIC
            label = metrics.metric_label(d.metric) if known else ""
            verdict = "allowed" if d.allowed else "denied"
            metrics.series(metrics.decisions, label, verdict, _REASON_LABEL[d.reason]).inc()
            if d.would_deny:
                self.metrics.shadow_denials.labels(
                    label,
                    _REASON_LABEL[d.would_deny_reason],
                    WINDOW_CODES.get(d.would_deny_window, ""),
                ).inc()
            if d.allowed and response.allowed:
                metrics.series(metrics.units, label, "admitted").inc(d.requested)
                if response.held:
                    metrics.series(metrics.units, label, "held").inc(d.requested)

    # -- RecordUsage ------------------------------------------------------------

    @authorized(Access.WRITE)
    async def RecordUsage(
        self, request: quota_pb2.RecordUsageRequest, context: Context
    ) -> quota_pb2.RecordUsageResponse:
        return await self.record(request)

    async def record(
        self, request: quota_pb2.RecordUsageRequest, *, record_ttl_ms: int | None = None
    ) -> quota_pb2.RecordUsageResponse:
        """RecordUsage for a caller already authorized (also api/ratelimit.py); the
        record is kept for `record_ttl_ms` (None: --record-retention-days)."""
        now_ms = self.clock.now_ms()
        call = dataclasses.replace(self._record_call(request, now_ms), record_ttl_ms=record_ttl_ms)
        try:
            result = await self.store.record(request.org_id, call, now_ms=now_ms)
        except TooManyMetrics:
            self.metrics.unplanned_refusals.inc()
            raise
        return self._record_response(request, result)

    def _record_call(self, request: quota_pb2.RecordUsageRequest, now_ms: int) -> RecordCall:
        """Validate a RecordUsage request and turn it into the store's call."""
        completed_ms = self._validate_record(request, now_ms)
        return RecordCall(
            request_id=request.request_id,
            units=dict(request.units),
            completed_ms=completed_ms,
            completed_given=request.HasField("completed_at"),
            success=request.success if request.HasField("success") else True,
            requested_ms=(
                timestamp_ms(request.requested_at) if request.HasField("requested_at") else None
            ),
            document_type=request.document_type,
        )

    def _record_response(
        self, request: quota_pb2.RecordUsageRequest, result: RecordResult
    ) -> quota_pb2.RecordUsageResponse:
        response = quota_pb2.RecordUsageResponse(
            duplicate=result.duplicate,
            status=_RECORD_STATUS[result.status],
            hold_released=result.hold_released,
            hold_expired=result.hold_expired,
            over_limit=result.over_limit,
            request_id=request.request_id,
            completed_at=timestamp(result.completed_ms),
            metrics=[
                metric_record_result(m, result.month_id, result.spans) for m in result.metrics
            ],
        )
        self.metrics.records.labels(result.status, str(result.duplicate).lower()).inc()
        if not result.duplicate:
            for m in result.metrics:
                label = self.metrics.metric_label(m.metric, m.planned)
                self.metrics.units.labels(label, "committed").inc(max(0, m.units))
                if m.overage > 0:
                    self.metrics.overage_units.labels(label).inc(m.overage)
            if result.document_type_folded:
                self.metrics.folded_document_types.inc()
        self.metrics.count_units("expired", result.expired)
        return response

    def _validate_record(self, request: quota_pb2.RecordUsageRequest, now_ms: int) -> int:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_request_id(request.request_id)
        problems.check_units(request.units, allow_negative=True)
        if not DOCUMENT_TYPE.fullmatch(request.document_type):
            problems.add(
                "document_type",
                f"document_type must be at most {MAX_LABEL} characters from letters, digits, "
                "'.', '_' and '-'",
            )
        completed_ms = now_ms
        if request.HasField("completed_at") and problems.check_timestamp(
            request.completed_at, "completed_at"
        ):
            completed_ms = timestamp_ms(request.completed_at)
            oldest = now_ms - self.settings.max_record_age_days * DAY_MS
            if completed_ms > now_ms + MAX_FUTURE_MS:
                problems.add("completed_at", "completed_at is more than 5 minutes in the future")
            elif completed_ms < oldest:
                problems.add(
                    "completed_at",
                    f"completed_at is older than {self.settings.max_record_age_days} days, the "
                    "late-record window; correct old usage with an adjustment instead",
                )
        requested_ok = request.HasField("requested_at") and problems.check_timestamp(
            request.requested_at, "requested_at"
        )
        if requested_ok and timestamp_ms(request.requested_at) > completed_ms + MAX_FUTURE_MS:
            problems.add("requested_at", "requested_at must not be after completed_at")
        problems.raise_if_any()
        return completed_ms

    # -- batches --------------------------------------------------------------------

    @authorized(Access.WRITE)
    async def CheckQuotaBatch(
        self, request: quota_pb2.CheckQuotaBatchRequest, context: Context
    ) -> quota_pb2.CheckQuotaBatchResponse:
        check_batch_size(request.items)
        now_ms = self.clock.now_ms()
        # The answers are filled where they will be sent: building each one
        # apart and copying it in cost as much as building it.
        batch = quota_pb2.CheckQuotaBatchResponse()
        answers = [batch.items.add() for _ in request.items]
        groups = group_by_org(request.items, self._check_call, answers)
        await asyncio.gather(
            *(
                self._check_group(org_id, members, request.items, answers, now_ms)
                for org_id, members in groups.items()
            )
        )
        return batch

    def _check_call(self, request: quota_pb2.CheckQuotaRequest) -> CheckCall:
        """Validate a CheckQuota request and turn it into the store's call."""
        hold_ttl_ms = self._validate_check(request)
        return CheckCall(dict(request.units), request.request_id, request.hold, hold_ttl_ms)

    async def _check_group(
        self,
        org_id: str,
        members: list[tuple[int, CheckCall]],
        items: Sequence[quota_pb2.CheckQuotaRequest],
        answers: list[quota_pb2.CheckQuotaBatchItem],
        now_ms: int,
    ) -> None:
        try:
            outcomes = await self.store.check_batch(
                org_id, [call for _, call in members], now_ms=now_ms
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            fail_open = self._failure_policy(org_id) == "open"
            for index, _ in members:
                if fail_open:
                    answers[index].response.CopyFrom(self._fail_open(items[index]))
                else:
                    answers[index].error.CopyFrom(batch_item_error(exc))
            return
        for (index, _), outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, StoreError):
                answers[index].error.CopyFrom(batch_item_error(outcome))
            else:
                self._check_response(items[index], outcome, answers[index].response)

    @authorized(Access.WRITE)
    async def RecordUsageBatch(
        self, request: quota_pb2.RecordUsageBatchRequest, context: Context
    ) -> quota_pb2.RecordUsageBatchResponse:
        check_batch_size(request.items)
        now_ms = self.clock.now_ms()
        batch = quota_pb2.RecordUsageBatchResponse()
        answers = [batch.items.add() for _ in request.items]
        groups = group_by_org(request.items, lambda item: self._record_call(item, now_ms), answers)

        await asyncio.gather(
            *(
                self._record_group(org_id, members, request.items, answers, now_ms)
                for org_id, members in groups.items()
            )
        )
        return batch

    async def _record_group(
        self,
        org_id: str,
        members: list[tuple[int, RecordCall]],
        items: Sequence[quota_pb2.RecordUsageRequest],
        answers: list[quota_pb2.RecordUsageBatchItem],
        now_ms: int,
    ) -> None:
        try:
            outcomes = await self.store.record_batch(
                org_id, [call for _, call in members], now_ms=now_ms
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            for index, _ in members:  # never pretend: each item is UNAVAILABLE
                answers[index].error.CopyFrom(batch_item_error(exc))
            return
        for (index, _), outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, StoreError):
                if isinstance(outcome, TooManyMetrics):
                    self.metrics.unplanned_refusals.inc()
                answers[index].error.CopyFrom(batch_item_error(outcome))
            else:
                answers[index].response.CopyFrom(self._record_response(items[index], outcome))

    # -- ReleaseQuota -----------------------------------------------------------

    @authorized(Access.WRITE)
    async def ReleaseQuota(
        self, request: quota_pb2.ReleaseQuotaRequest, context: Context
    ) -> quota_pb2.ReleaseQuotaResponse:
        problems = Violations()
        problems.check_org_id(request.org_id)
        problems.check_request_id(request.request_id)
        problems.raise_if_any()
        result = await self.store.release(
            request.org_id, request.request_id, now_ms=self.clock.now_ms()
        )
        self.metrics.count_units("released", result.released)
        self.metrics.count_units("expired", result.expired)
        return quota_pb2.ReleaseQuotaResponse(
            outcome=_RELEASE_OUTCOME[result.outcome], released_units=result.released
        )

    # -- GetUsage ---------------------------------------------------------------

    @authorized(Access.READ)
    async def GetUsage(
        self, request: quota_pb2.GetUsageRequest, context: Context
    ) -> quota_pb2.GetUsageResponse:
        require_org_id(request.org_id)
        has_year, has_month = request.HasField("year"), request.HasField("month")
        check_year_month(has_year, request.year, has_month, request.month)
        now_ms = self.clock.now_ms()
        snapshot = await self.store.usage(
            request.org_id,
            now_ms=now_ms,
            year_month=(request.year, request.month) if has_year else None,
        )
        self.metrics.count_units("expired", snapshot.expired)
        month = snapshot.month
        response = quota_pb2.GetUsageResponse(
            org_id=request.org_id,
            year=month.year,
            month=month.month,
            period_id=month.period_id,
            period_start=timestamp(month.start_ms),
            period_end=timestamp(month.end_ms),
            timezone=timezone_name(snapshot.timezone),
            has_plan=snapshot.plan is not None,
            jobs=job_counts(snapshot.month_fields),
            previous_month=month_summary(
                month.previous(calendar(snapshot.timezone)), snapshot.previous_month_fields
            ),
        )
        if snapshot.plan is not None:
            doc = snapshot.plan.doc
            response.subscription.CopyFrom(
                quota_pb2.Subscription(
                    plan_name=doc["name"],
                    api_rate_limit=doc["rate_per_second"],
                    processing_priority=doc["processing_priority"],
                    support_level=doc["support_level"],
                    currency=doc["currency"],
                )
            )
        for figures in rules.usage_figures(snapshot, now_ms=now_ms):
            response.metrics.append(metric_usage(figures))
        return response


Call = TypeVar("Call")


def group_by_org(
    items: Sequence[Any], prepare: Callable[[Any], Call], answers: Sequence[Any]
) -> dict[str, list[tuple[int, Call]]]:
    """A batch's valid items by organization, in order; invalid ones answered at once."""
    groups: dict[str, list[tuple[int, Call]]] = {}
    for index, item in enumerate(items):
        try:
            call = prepare(item)
        except InvalidArgument as exc:
            answers[index].error.CopyFrom(batch_item_error(exc))
            continue
        groups.setdefault(item.org_id, []).append((index, call))
    return groups
