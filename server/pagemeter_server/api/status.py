"""Turning failures into gRPC statuses with google.rpc details.

Every RPC handler is wrapped so that no exception ever reaches grpc as UNKNOWN:
bad input -> INVALID_ARGUMENT (with BadRequest field violations), a reused id ->
ALREADY_EXISTS, a missing plan -> FAILED_PRECONDITION (NOT_FOUND when the plan
itself is read), Redis unreachable or slow
-> UNAVAILABLE, anything else -> INTERNAL with no internals in the message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pagemeter.v1 import quota_pb2
from pagemeter_server.domain.errors import (
    InvalidArgument,
    LimitReached,
    NegativeUnits,
    NotFound,
    NotReady,
    PermissionDenied,
    PlanMissing,
    PlanNotFound,
    PlansNotMigrated,
    ReadRateLimited,
    RequestIdReused,
    TooManyMetrics,
    Unauthenticated,
)
from pagemeter_server.store.faults import is_transient, set_call_deadline
from pagemeter_server.store.replica_acks import ReplicasBehind

DOMAIN = "pagemeter"
log = logging.getLogger("pagemeter.errors")


Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


Detail: TypeAlias = (
    error_details_pb2.BadRequest | error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo
)


@dataclass(frozen=True)
class Failure:
    """How a failure is answered: a google.rpc code, a message, and details."""

    code: int
    message: str
    details: tuple[Detail, ...] = ()

    def status(self) -> grpc.Status:
        packed = []
        for detail in self.details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return rpc_status.to_status(
            status_pb2.Status(code=self.code, message=self.message, details=packed)
        )


def _status(code: int, message: str, *details: Detail) -> Failure:
    return Failure(code, message, details)


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def status_for(exc: BaseException) -> grpc.Status:
    """The gRPC status a failure is answered with."""
    return failure_for(exc).status()


def failure_for(exc: BaseException) -> Failure:
    """What a failure is answered with, before it is packed into a gRPC status."""
    if isinstance(exc, InvalidArgument):
        return _invalid_argument(exc)
    if isinstance(exc, Unauthenticated):
        return _status(code_pb2.UNAUTHENTICATED, str(exc), _error_info(exc.reason))
    if isinstance(exc, NotFound):
        return _status(code_pb2.NOT_FOUND, str(exc), _error_info(exc.reason))
    if isinstance(exc, PermissionDenied):
        return _status(code_pb2.PERMISSION_DENIED, str(exc), _error_info(exc.reason))
    if isinstance(exc, ReadRateLimited):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(exc.retry_after_ms)
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            f"too many reads with this API key; retry in {exc.retry_after_ms} ms",
            _error_info("RATE_LIMIT_EXCEEDED"),
            retry,
        )
    if isinstance(exc, NegativeUnits):
        return _status(
            code_pb2.INVALID_ARGUMENT,
            f"units of {exc.metric!r} are negative, but only lifetime (PERIOD_NONE) metrics "
            "can be lowered",
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=f"units[{exc.metric}]",
                        description="negative units are allowed only for PERIOD_NONE metrics",
                    )
                ]
            ),
        )
    if isinstance(exc, RequestIdReused):
        return _status(
            code_pb2.ALREADY_EXISTS,
            f"this id is already used by another request (its status: {exc.status}); "
            "send the original payload to get the original result, or use a new id",
            _error_info("REQUEST_ID_REUSED", status=exc.status),
        )
    if isinstance(exc, TooManyMetrics):
        return _status(
            code_pb2.FAILED_PRECONDITION,
            f"metric {exc.metric!r} is not in the organization's plan, and the organization "
            f"already records the most metrics outside its plan ({exc.cap}); add the metric "
            "to the plan (its usage is then accepted) or record it under a planned metric",
            _error_info("TOO_MANY_UNPLANNED_METRICS", metric=exc.metric, limit=str(exc.cap)),
        )
    if isinstance(exc, LimitReached | NotReady):
        return _status(code_pb2.FAILED_PRECONDITION, str(exc), _error_info(exc.reason))
    if isinstance(exc, PlansNotMigrated):
        return _status(code_pb2.FAILED_PRECONDITION, str(exc), _error_info("PLANS_NOT_MIGRATED"))
    if isinstance(exc, PlanMissing):
        return _status(
            code_pb2.FAILED_PRECONDITION, exc.what, _error_info("PLAN_MISSING", detail=exc.what)
        )
    if isinstance(exc, PlanNotFound):
        return _status(
            code_pb2.NOT_FOUND,
            f"organization {exc.org_id!r} has no plan",
            _error_info("PLAN_NOT_FOUND", org_id=exc.org_id),
        )
    if isinstance(exc, ReplicasBehind):
        return _status(
            code_pb2.UNAVAILABLE,
            f"{exc}: the change may exist on the primary alone, so it is not acknowledged; "
            "retry with the same request_id",
            _error_info(
                "STORE_UNAVAILABLE",
                replicas_confirmed=str(exc.confirmed),
                replicas_required=str(exc.required),
            ),
        )
    if is_transient(exc):
        return _status(
            code_pb2.UNAVAILABLE,
            "the quota store is unavailable; retry with the same request_id",
            _error_info("STORE_UNAVAILABLE"),
        )
    return _status(code_pb2.INTERNAL, "internal error", _error_info("INTERNAL"))


# A request can break many rules at once (a hundred bad metric names). The
# answer names the first few in its message and a bounded number in its
# BadRequest, so that its trailers stay well under gRPC's 8 KiB metadata limit;
# otherwise the caller would get RESOURCE_EXHAUSTED instead of the reasons.
MESSAGE_VIOLATIONS = 5
DETAIL_VIOLATIONS = 20


def _invalid_argument(exc: InvalidArgument) -> Failure:
    violations = exc.violations
    shown = "; ".join(v.description for v in violations[:MESSAGE_VIOLATIONS])
    if len(violations) > MESSAGE_VIOLATIONS:
        shown += f"; and {len(violations) - MESSAGE_VIOLATIONS} more problems"
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations[:DETAIL_VIOLATIONS]
        ]
    )
    if exc.reason:
        info = _error_info(exc.reason, field=violations[0].field)
        return _status(code_pb2.INVALID_ARGUMENT, shown, bad_request, info)
    return _status(code_pb2.INVALID_ARGUMENT, shown, bad_request)


# A batch answers up to 1,000 items, each possibly refused: an item's error names
# at most this many problems and its message is cut to this length, so that a
# batch of refused items fits the answer size limit (tests/grpc/test_answer_sizes.py).
BATCH_ITEM_VIOLATIONS = 5
BATCH_ITEM_MESSAGE = 400


def batch_item_error(exc: BaseException) -> quota_pb2.BatchItemError:
    """What one batch item's failure would have been answered on its own, in brief."""
    failure = failure_for(exc)
    message = failure.message
    if len(message) > BATCH_ITEM_MESSAGE:
        message = message[: BATCH_ITEM_MESSAGE - 3] + "..."
    error = quota_pb2.BatchItemError(code=code_pb2.Code.Name(failure.code), message=message)
    for detail in failure.details:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            error.reason = detail.reason
        elif isinstance(detail, error_details_pb2.BadRequest):
            error.field_violations.extend(
                quota_pb2.FieldProblem(field=v.field, description=v.description)
                for v in detail.field_violations[:BATCH_ITEM_VIOLATIONS]
            )
    return error


def grpc_errors(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Wrap an RPC handler so every failure leaves as a deliberate status."""

    @functools.wraps(handler)
    async def wrapped(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        # How long the store may wait out a slot migration (faults.py).
        set_call_deadline(context.time_remaining())
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            status = status_for(exc)
            if status.code == grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", handler.__name__)
            await context.abort_with_status(status)  # type: ignore[attr-defined]
            raise  # abort_with_status always raises; this line is never reached

    return wrapped
