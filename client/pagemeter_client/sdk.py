"""Python SDK for pagemeter: an async client on `grpc.aio` and a sync client on `grpc`.

Both clients send every call with a deadline and let gRPC itself retry calls that
fail with UNAVAILABLE (the channel's `retryPolicy`). A retry re-sends the very same
request message, so a job keeps its `request_id` across attempts and the server's
idempotency makes the retry safe: a repeated RecordUsage is answered as a
duplicate, never counted twice.

The reporting reads (history, statistics, usage records) are plain calls too;
`iter_usage_records` follows the pages of ListUsageRecords.

Credentials: `token=` is sent as `authorization: Bearer <token>` on every call
(an admin or service token, or a tenant API key). With a tenant key the reads
take `org_id=""` (their default): pagemeter takes the organization from the key.
TLS: `tls=True`, with `root_certificates` (PEM CA; None: the system's roots),
`client_certificate` and `client_key` for mutual TLS, and `tls_server_name`.
The token never appears in repr() or in the SDK's own exception messages.

Workers usually need only `reserve()`:

    async with client.reserve("acme", {"pages": 12}) as job:
        pages = await process(document)
        await job.commit({"pages": pages})   # or leave the block: commits the held units

With `outbox=Outbox(path)` a client writes every RecordUsage to a SQLite file
before sending it; a record pagemeter could not take now (unreachable, a
deadline, ...) stays there and `record_usage` raises `UsageQueued`, and
`flush_outbox()` or the background flusher delivers it later with its original
request_id (see pagemeter_client.outbox).

With `replay_after_failover=ReplayWindow(...)` a client keeps the holds, records
and releases pagemeter acknowledged in a recent window and sends them again after
it saw the store fail over (or on `replay_acknowledged()`): a request a lagging
replica lost is applied again, one it kept is answered as a duplicate (see
pagemeter_client.replay).
"""

# ASYNC109 would have `timeout` replaced by asyncio.timeout, but here it is the gRPC
# deadline: it travels to the server (grpc-timeout) and bounds gRPC's retries too.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    plan_pb2,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
)
from pagemeter_client.outbox import (
    DeliveryPass,
    FlushResult,
    Outbox,
    OutboxEntry,
    OutboxError,
    is_transient,
)
from pagemeter_client.replay import (
    AcknowledgedLog,
    AsyncObserver,
    ReplayResult,
    ReplayStats,
    ReplayWindow,
    SyncObserver,
    replay_async,
    replay_sync,
)

log = logging.getLogger("pagemeter_client")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0
QUOTA_SERVICE = "pagemeter.v1.QuotaService"
ADMIN_SERVICE = "pagemeter.v1.AdminService"
REPORTING_SERVICE = "pagemeter.v1.ReportingService"
# gRPC caps retryPolicy.maxAttempts at 5 whatever the config says.
MAX_ATTEMPTS_LIMIT = 5
# Calls gRPC must not retry: they are not idempotent. A CreateApiKey whose answer
# was lost has made a key; a retry would make a second one (see docs/client.md).
NOT_RETRIED = ((ADMIN_SERVICE, "CreateApiKey"),)
# Tenant API keys start with this; pagemeter takes their organization from the key.
TENANT_KEY_PREFIX = "pmk_"
# The metadata that carries a credential; the server accepts one of them per call.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
# Seconds between the background flusher's delivery passes, by default.
DEFAULT_FLUSH_INTERVAL = 15.0

Metadata = Sequence[tuple[str, str]]
ChannelOptions = Sequence[tuple[str, Any]]
# The rows of a GetUsageStatistics answer, and the breakdowns it carries.
StatisticsPeriodName = Literal["daily", "weekly", "monthly"]
StatisticsGroupingName = Literal["date", "document_type", "both"]

STATISTICS_PERIODS: dict[str, reporting_pb2.StatisticsPeriod.ValueType] = {
    "daily": reporting_pb2.STATISTICS_PERIOD_DAILY,
    "weekly": reporting_pb2.STATISTICS_PERIOD_WEEKLY,
    "monthly": reporting_pb2.STATISTICS_PERIOD_MONTHLY,
}
STATISTICS_GROUPINGS: dict[str, reporting_pb2.StatisticsGrouping.ValueType] = {
    "date": reporting_pb2.STATISTICS_GROUPING_DATE,
    "document_type": reporting_pb2.STATISTICS_GROUPING_DOCUMENT_TYPE,
    "both": reporting_pb2.STATISTICS_GROUPING_BOTH,
}


# -- retries and channel options --------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How gRPC retries UNAVAILABLE: attempts in all and the exponential backoff between them.

    gRPC waits a random time between 0 and min(initial_backoff x multiplier^(n-1),
    max_backoff) before attempt n+1, and never past the call's deadline.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoff times and multiplier must be positive")

    def service_config(self) -> str:
        """The channel's `grpc.service_config` JSON: this policy for every pagemeter service."""
        method_config: dict[str, Any] = {
            "name": [
                {"service": QUOTA_SERVICE},
                {"service": ADMIN_SERVICE},
                {"service": REPORTING_SERVICE},
            ],
        }
        # gRPC rejects a retryPolicy with fewer than 2 attempts: one attempt means no policy.
        if self.max_attempts > 1:
            method_config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": _seconds(self.initial_backoff),
                "maxBackoff": _seconds(self.max_backoff),
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return json.dumps({"methodConfig": [method_config]})


def _seconds(value: float) -> str:
    """A protobuf JSON duration ("0.2s"), the form service configs take."""
    return f"{value:.9f}".rstrip("0").rstrip(".") + "s"


def channel_options(retry: RetryPolicy, extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """Channel options that turn on gRPC's own retries with `retry`; `extra` come last.

    The service config is `retry.service_config()` plus a method config without a
    retry policy for each NOT_RETRIED method (a method's own entry wins over its
    service's), so a lost CreateApiKey answer is reported, not retried.
    """
    config = json.loads(retry.service_config())
    config["methodConfig"].append(
        {"name": [{"service": service, "method": method} for service, method in NOT_RETRIED]}
    )
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
        *extra,
    ]


# -- credentials and TLS ----------------------------------------------------------------


def is_tenant_key(token: str | None) -> bool:
    """Whether `token` is a tenant API key (pmk_...), whose reads leave org_id empty."""
    return token is not None and token.startswith(TENANT_KEY_PREFIX)


def _call_metadata(metadata: Metadata, token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of every call: `metadata`, then the token as a Bearer credential.

    The messages of the errors raised here never contain the token.
    """
    pairs = tuple(metadata)
    if token is None:
        return pairs
    # Printable ASCII without spaces: what a metadata value and a Bearer token may be.
    if not token or not all("!" <= char <= "~" for char in token):
        raise ValueError(
            "token must be a non-empty string of printable ASCII characters without spaces"
        )
    if any(name.lower() in CREDENTIAL_HEADERS for name, _ in pairs):
        raise ValueError(
            "give the credential either as token= or as authorization/x-api-key metadata, not both"
        )
    return (*pairs, ("authorization", f"Bearer {token}"))


def _channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    *,
    tls: bool,
    root_certificates: bytes | None,
    client_certificate: bytes | None,
    client_key: bytes | None,
    tls_server_name: str | None,
) -> grpc.ChannelCredentials | None:
    """The channel's credentials: `credentials` as given, TLS built from the options, or None."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together (mutual TLS needs both)")
    if tls and credentials is not None:
        raise ValueError("give either credentials= or tls=True with its options, not both")
    if not tls:
        given = [
            name
            for name, value in (
                ("root_certificates", root_certificates),
                ("client_certificate", client_certificate),
                ("client_key", client_key),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} need tls=True")
        if tls_server_name is not None and credentials is None:
            raise ValueError("tls_server_name needs TLS (tls=True or credentials=)")
        return credentials
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=client_key,
        certificate_chain=client_certificate,
    )


# -- building requests (shared by both clients) -----------------------------------------


def new_request_id() -> str:
    """A fresh job id (uuid4 hex): 32 characters, valid wherever a request_id is."""
    return uuid.uuid4().hex


def _timestamp(value: datetime, name: str) -> Timestamp:
    # A naive datetime would be read as UTC by protobuf; a worker's local time
    # would then land in the wrong hour or even the wrong month, so refuse it.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(UTC))")
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(value: float | timedelta) -> Duration:
    span = Duration()
    if isinstance(value, timedelta):
        span.FromTimedelta(value)
    else:
        span.FromNanoseconds(round(value * 1e9))
    return span


def check_quota_request(
    org_id: str,
    units: Mapping[str, int],
    *,
    request_id: str | None = None,
    hold: bool = False,
    hold_ttl: float | timedelta | None = None,
) -> quota_pb2.CheckQuotaRequest:
    """A CheckQuotaRequest; with hold=True and no request_id, a new id is made here.

    The id is made once, before the first attempt, so every retry of the message
    carries it and the server holds the units only once.
    """
    if hold and not request_id:
        request_id = new_request_id()
    request = quota_pb2.CheckQuotaRequest(
        org_id=org_id, units=dict(units), request_id=request_id or "", hold=hold
    )
    if hold_ttl is not None:
        request.hold_ttl.CopyFrom(_duration(hold_ttl))
    return request


def record_usage_request(
    org_id: str,
    request_id: str,
    units: Mapping[str, int],
    *,
    success: bool = True,
    document_type: str = "",
    requested_at: datetime | None = None,
    completed_at: datetime | None = None,
) -> quota_pb2.RecordUsageRequest:
    """A RecordUsageRequest; times must be timezone-aware datetimes."""
    request = quota_pb2.RecordUsageRequest(
        org_id=org_id,
        request_id=request_id,
        units=dict(units),
        success=success,
        document_type=document_type,
    )
    if requested_at is not None:
        request.requested_at.CopyFrom(_timestamp(requested_at, "requested_at"))
    if completed_at is not None:
        request.completed_at.CopyFrom(_timestamp(completed_at, "completed_at"))
    return request


def get_usage_request(
    org_id: str = "", *, year: int | None = None, month: int | None = None
) -> quota_pb2.GetUsageRequest:
    """A GetUsageRequest. year and month go to the server as given: it says what is wrong."""
    request = quota_pb2.GetUsageRequest(org_id=org_id)
    if year is not None:
        request.year = year
    if month is not None:
        request.month = month
    return request


def get_usage_history_request(
    org_id: str = "", *, months: int = 0
) -> reporting_pb2.GetUsageHistoryRequest:
    """A GetUsageHistoryRequest; months=0 means the server's default (12)."""
    return reporting_pb2.GetUsageHistoryRequest(org_id=org_id, months=months)


def _date_text(value: str | date | None, name: str) -> str:
    # A string goes as given (the server says what is wrong with it); a date as
    # YYYY-MM-DD; a datetime as ISO 8601 with its offset, whose date the server
    # takes in the plan's timezone, so a naive one is refused as for timestamps.
    if value is None:
        return ""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name} must be a date or a timezone-aware datetime")
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def get_usage_statistics_request(
    org_id: str = "",
    *,
    period: StatisticsPeriodName | None = None,
    start_date: str | date | None = None,
    end_date: str | date | None = None,
    group_by: StatisticsGroupingName | None = None,
) -> reporting_pb2.GetUsageStatisticsRequest:
    """A GetUsageStatisticsRequest; None leaves a field to the server's default.

    period is "daily", "weekly" or "monthly" (default monthly); group_by is "date",
    "document_type" or "both" (default date); the dates are strings, dates or
    timezone-aware datetimes (defaults: the 30 days up to today in the plan's
    timezone). An unknown period or group_by raises ValueError before sending.
    """
    request = reporting_pb2.GetUsageStatisticsRequest(
        org_id=org_id,
        start_date=_date_text(start_date, "start_date"),
        end_date=_date_text(end_date, "end_date"),
    )
    if period is not None:
        if period not in STATISTICS_PERIODS:
            raise ValueError(f"period must be one of {', '.join(STATISTICS_PERIODS)}")
        request.period = STATISTICS_PERIODS[period]
    if group_by is not None:
        if group_by not in STATISTICS_GROUPINGS:
            raise ValueError(f"group_by must be one of {', '.join(STATISTICS_GROUPINGS)}")
        request.group_by = STATISTICS_GROUPINGS[group_by]
    return request


def joined_statistics(
    first: reporting_pb2.GetUsageStatisticsResponse,
    page: reporting_pb2.GetUsageStatisticsResponse,
) -> reporting_pb2.GetUsageStatisticsResponse:
    """A statistics answer with the rows of its next page added (the rest is the same)."""
    first.by_period.extend(page.by_period)
    first.next_page_token = page.next_page_token
    return first


def list_usage_records_request(
    org_id: str = "", *, page_size: int = 0, page_token: str = ""
) -> reporting_pb2.ListUsageRecordsRequest:
    """A ListUsageRecordsRequest; page_size=0 means the server's default (50)."""
    return reporting_pb2.ListUsageRecordsRequest(
        org_id=org_id, page_size=page_size, page_token=page_token
    )


def adjust_usage_request(
    org_id: str,
    metric: str,
    units: int,
    *,
    reason: str,
    adjustment_id: str,
    year: int | None = None,
    month: int | None = None,
) -> admin_pb2.AdjustUsageRequest:
    """An AdjustUsageRequest; year and month go as given (unset: the current month)."""
    request = admin_pb2.AdjustUsageRequest(
        org_id=org_id, metric=metric, units=units, reason=reason, adjustment_id=adjustment_id
    )
    if year is not None:
        request.year = year
    if month is not None:
        request.month = month
    return request


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


def _next_token(response: _Page, seen: set[str], rpc: str = "ListUsageRecords") -> str:
    """The page token to ask for next ("" when done); a token seen before is refused.

    A server that handed out the same token twice would otherwise keep the
    iterator going round for ever.
    """
    token = response.next_page_token
    if not token:
        return ""
    if token in seen:
        raise RuntimeError(f"{rpc} returned page token {token!r} a second time")
    seen.add(token)
    return token


# -- denials and errors -----------------------------------------------------------------


def reason_name(reason: quota_pb2.DecisionReason.ValueType) -> str:
    """HARD_LIMIT_EXCEEDED for DECISION_REASON_HARD_LIMIT_EXCEEDED (the enum's short name)."""
    return quota_pb2.DecisionReason.Name(reason).removeprefix("DECISION_REASON_")


def _metric_denial(decision: quota_pb2.MetricDecision) -> str:
    most = str(decision.max_admissible) if decision.HasField("max_admissible") else "unlimited"
    verdict = "ok" if decision.allowed else reason_name(decision.reason)
    return f"{decision.metric}: {verdict}, requested {decision.requested}, max admissible {most}"


def describe_denial(response: quota_pb2.CheckQuotaResponse) -> str:
    """One line saying why a CheckQuota was denied, with max_admissible per metric."""
    text = f"quota denied: {reason_name(response.reason)}"
    if response.reason == quota_pb2.DECISION_REASON_RATE_LIMITED:
        return f"{text}, retry after {response.retry_after.ToTimedelta().total_seconds():g}s"
    if response.metrics:
        text += " (" + "; ".join(_metric_denial(d) for d in response.metrics) + ")"
    return text


class QuotaDenied(Exception):
    """CheckQuota answered "not allowed" where the caller needed the units (see `reserve`).

    `response` is the whole CheckQuotaResponse: reason, and per metric
    max_admissible, the partial-admission hint.
    """

    def __init__(self, response: quota_pb2.CheckQuotaResponse) -> None:
        super().__init__(describe_denial(response))
        self.response = response

    @property
    def reason(self) -> quota_pb2.DecisionReason.ValueType:
        return self.response.reason

    @property
    def retry_after(self) -> timedelta | None:
        """How long to wait before retrying, for a RATE_LIMITED denial."""
        if self.response.HasField("retry_after"):
            return self.response.retry_after.ToTimedelta()
        return None


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call said, including the google.rpc details in its trailers."""

    code: grpc.StatusCode
    message: str
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    error_infos: list[error_details_pb2.ErrorInfo] = field(default_factory=list)
    # From a google.rpc.RetryInfo: how long to wait before trying again
    # (RESOURCE_EXHAUSTED for a tenant key over its read limit).
    retry_after: timedelta | None = None

    def lines(self) -> list[str]:
        """Readable lines: `CODE: message`, then one indented line per detail."""
        out = [f"{self.code.name}: {self.message}"]
        out.extend(f"  {name}: {description}" for name, description in self.field_violations)
        for info in self.error_infos:
            extra = "".join(f" {key}={value}" for key, value in sorted(info.metadata.items()))
            out.append(f"  reason: {info.reason} (domain {info.domain}){extra}")
        if self.retry_after is not None:
            out.append(f"  retry after: {self.retry_after.total_seconds():g}s")
        return out


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Decode a failed call (sync or async) into code, message and google.rpc details."""
    call: Any = error  # both grpc.RpcError kinds raised by calls are also grpc.Call
    status = rpc_status.from_call(call)
    items = list(status.details) if status is not None else []
    retry_after = None
    for item in items:
        if item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            item.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
    details = ErrorDetails(code=call.code(), message=call.details() or "", retry_after=retry_after)
    for item in items:
        if item.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            item.Unpack(bad_request)
            details.field_violations.extend(
                (v.field, v.description) for v in bad_request.field_violations
            )
        elif item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            item.Unpack(info)
            details.error_infos.append(info)
    return details


# -- the outbox -------------------------------------------------------------------------


class UsageQueued(Exception):
    """RecordUsage failed for now, and the record is safe in the client's outbox.

    Raised by `record_usage` (and `reserve()`'s commit and fail) of a client with
    an outbox when pagemeter could not take the record (UNAVAILABLE,
    DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, ...) after the client's own
    retries. Nothing is lost: a delivery pass sends the stored request later,
    with the same request_id and completed_at. Treat the job as recorded; do not
    record it again under another request_id.

    `entry` is the stored record (`entry.id`, `entry.completed_at`, ...),
    `details` the error of the last attempt.
    """

    def __init__(self, entry: OutboxEntry, outbox_path: str, details: ErrorDetails) -> None:
        super().__init__(
            f"pagemeter: usage of {entry.request_id!r} ({entry.org_id}) is queued in the outbox "
            f"{outbox_path} as record {entry.id} after {details.code.name}: {details.message}; "
            "a delivery pass sends it later"
        )
        self.entry = entry
        self.details = details

    @property
    def request_id(self) -> str:
        return self.entry.request_id

    @property
    def code(self) -> grpc.StatusCode:
        return self.details.code


def _retry_seconds(details: ErrorDetails) -> float | None:
    return None if details.retry_after is None else details.retry_after.total_seconds()


def _settle_first_attempt(
    outbox: Outbox, entry: OutboxEntry, error: grpc.RpcError
) -> UsageQueued | None:
    """Note a failed first attempt: UsageQueued if the record stays pending.

    None when pagemeter refused it: it is then a dead letter, and a note on
    `error` says so (the caller re-raises `error`).
    """
    details = error_details(error)
    try:
        stored = outbox._failed(entry.id, details.code, details.message, _retry_seconds(details))
    except (sqlite3.Error, OutboxError) as problem:
        # The row is still there, pending and held: once its lease runs out a
        # delivery pass sends it.
        log.warning(
            "outbox %s: cannot note the failure of record %s: %s", outbox, entry.id, problem
        )
        stored = entry if is_transient(details.code) else None
    if stored is None:
        return None
    if stored.state == "pending":
        return UsageQueued(stored, str(outbox.path), details)
    error.add_note(
        f"pagemeter: kept in the outbox {outbox.path} as dead letter {stored.id}; "
        "it is not re-sent unless requeued (pagemeter outbox requeue)"
    )
    return None


def _forget_delivered(outbox: Outbox, entry_id: int) -> None:
    try:
        outbox._delivered(entry_id)
    except (sqlite3.Error, OutboxError) as problem:
        # pagemeter has the record: a row left behind is redelivered as a duplicate.
        log.warning("outbox %s: cannot delete delivered record %s: %s", outbox, entry_id, problem)


def _release_quietly(outbox: Outbox, entry_id: int) -> None:
    # An interrupted first attempt: make the record deliverable at once rather
    # than after its lease. If even that fails, the lease runs out anyway.
    with contextlib.suppress(sqlite3.Error, OutboxError):
        outbox._release([entry_id])


def _note_outbox_unusable(error: grpc.RpcError, outbox: Outbox, problem: Exception) -> None:
    error.add_note(f"pagemeter: the outbox {outbox.path} could not store this record: {problem}")


# -- reservations -----------------------------------------------------------------------


class _ReservationState:
    """What both kinds of reservation know about their job."""

    def __init__(
        self,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        decision: quota_pb2.CheckQuotaResponse,
    ) -> None:
        self.org_id = org_id
        self.request_id = request_id
        self.units = dict(units)
        self.decision = decision
        # Set by the first commit/fail/release attempt, even one that raised: the
        # context manager must not then settle the job a second, different way
        # (that would be refused as a reused request_id, or record finished work
        # as failed). Retrying the same call by hand is safe: it is idempotent.
        self.settled = False


class AsyncReservation(_ReservationState):
    """Units held for one job by `AsyncPagemeterClient.reserve`."""

    def __init__(
        self,
        client: AsyncPagemeterClient,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        decision: quota_pb2.CheckQuotaResponse,
    ) -> None:
        super().__init__(org_id, request_id, units, decision)
        self._client = client

    async def commit(
        self,
        units: Mapping[str, int] | None = None,
        *,
        document_type: str = "",
        completed_at: datetime | None = None,
    ) -> quota_pb2.RecordUsageResponse:
        """Record the job as done with `units` (default: the reserved units); frees the hold.

        With the client's outbox, raises UsageQueued when the record is stored for later.
        """
        self.settled = True
        return await self._client.record_usage(
            self.org_id,
            self.request_id,
            self.units if units is None else units,
            document_type=document_type,
            completed_at=completed_at,
        )

    async def fail(
        self, *, document_type: str = "", completed_at: datetime | None = None
    ) -> quota_pb2.RecordUsageResponse:
        """Record the job as failed: counted as a failed job, consumes nothing, frees the hold.

        With the client's outbox, raises UsageQueued when the record is stored for later.
        """
        self.settled = True
        return await self._client.record_usage(
            self.org_id,
            self.request_id,
            self.units,
            success=False,
            document_type=document_type,
            completed_at=completed_at,
        )

    async def release(self) -> quota_pb2.ReleaseQuotaResponse:
        """Drop the hold of a job that will not run; nothing is recorded."""
        self.settled = True
        return await self._client.release_quota(self.org_id, self.request_id)


class Reservation(_ReservationState):
    """Units held for one job by `PagemeterClient.reserve`."""

    def __init__(
        self,
        client: PagemeterClient,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        decision: quota_pb2.CheckQuotaResponse,
    ) -> None:
        super().__init__(org_id, request_id, units, decision)
        self._client = client

    def commit(
        self,
        units: Mapping[str, int] | None = None,
        *,
        document_type: str = "",
        completed_at: datetime | None = None,
    ) -> quota_pb2.RecordUsageResponse:
        """Record the job as done with `units` (default: the reserved units); frees the hold.

        With the client's outbox, raises UsageQueued when the record is stored for later.
        """
        self.settled = True
        return self._client.record_usage(
            self.org_id,
            self.request_id,
            self.units if units is None else units,
            document_type=document_type,
            completed_at=completed_at,
        )

    def fail(
        self, *, document_type: str = "", completed_at: datetime | None = None
    ) -> quota_pb2.RecordUsageResponse:
        """Record the job as failed: counted as a failed job, consumes nothing, frees the hold.

        With the client's outbox, raises UsageQueued when the record is stored for later.
        """
        self.settled = True
        return self._client.record_usage(
            self.org_id,
            self.request_id,
            self.units,
            success=False,
            document_type=document_type,
            completed_at=completed_at,
        )

    def release(self) -> quota_pb2.ReleaseQuotaResponse:
        """Drop the hold of a job that will not run; nothing is recorded."""
        self.settled = True
        return self._client.release_quota(self.org_id, self.request_id)


# A call answered with one of these may or may not have been applied: pagemeter
# gave up waiting for Redis (UNAVAILABLE after its Redis timeout), or the caller
# did (DEADLINE_EXCEEDED, CANCELLED). Resending it with the same request_id is
# exact either way (docs/reliability.md).
UNKNOWN_OUTCOME = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# How long reserve() keeps trying to release a hold of unknown outcome, and the
# pause between its tries (each also bounded by gRPC's own retries).
RELEASE_WINDOW = 2.0
RELEASE_RETRY_PAUSE = 0.1


def _outcome_unknown(error: grpc.RpcError) -> bool:
    code = getattr(error, "code", None)  # grpc.Call and grpc.aio.AioRpcError both have it
    return callable(code) and code() in UNKNOWN_OUTCOME


def _note_settle_failure(body_error: BaseException, settle_error: grpc.RpcError) -> None:
    # The body's exception is what the caller must see; a failure to record the
    # failed job is secondary (the hold still expires after its TTL).
    details = error_details(settle_error)
    body_error.add_note(
        f"pagemeter: recording the failed job also failed ({details.code.name}: "
        f"{details.message}); its hold expires after its TTL"
    )


def _note_settle_queued(body_error: BaseException, queued: UsageQueued) -> None:
    body_error.add_note(
        f"pagemeter: the failed job could not be recorded now ({queued.code.name}); it is "
        f"queued in the outbox as record {queued.entry.id} and will be delivered later"
    )


# -- the clients ------------------------------------------------------------------------


class _ClientConfig:
    """Settings both clients share: deadline, metadata, credentials and the channel's options.

    The token lives only in `metadata` (as `authorization: Bearer ...`); repr()
    says whether there is one, never what it is.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        max_attempts: int,
        initial_backoff: float,
        max_backoff: float,
        credentials: grpc.ChannelCredentials | None,
        metadata: Metadata,
        options: ChannelOptions,
        token: str | None,
        tls: bool,
        root_certificates: bytes | None,
        client_certificate: bytes | None,
        client_key: bytes | None,
        tls_server_name: str | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive: every call needs a deadline")
        retry = RetryPolicy(max_attempts, initial_backoff, max_backoff)
        self.target = target
        self.timeout = timeout
        self.metadata = _call_metadata(metadata, token)
        self.has_token = token is not None
        self.credentials = _channel_credentials(
            credentials,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
        )
        extra = list(options)
        if tls_server_name is not None:
            # The name the server's certificate must carry, instead of the target's host.
            extra.append(("grpc.ssl_target_name_override", tls_server_name))
        self.channel_options = channel_options(retry, extra)

    def deadline(self, timeout: float | None) -> float:
        """Seconds the call may take: the per-call value, else the client's."""
        return self.timeout if timeout is None else timeout

    def describe(self, kind: str) -> str:
        """`Kind(target=..., tls=..., token=...)` with the token hidden."""
        token = "<hidden>" if self.has_token else "None"
        tls = self.credentials is not None
        return f"{kind}(target={self.target!r}, tls={tls}, token={token})"

    def __repr__(self) -> str:
        return self.describe(type(self).__name__)


@dataclass(frozen=True)
class _AsyncChannel:
    """An open grpc.aio channel with the stubs of the pagemeter services on it."""

    channel: grpc.aio.Channel
    quota: quota_pb2_grpc.QuotaServiceAsyncStub
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    reporting: reporting_pb2_grpc.ReportingServiceAsyncStub

    @classmethod
    def create(cls, config: _ClientConfig, interceptors: Sequence[Any] = ()) -> _AsyncChannel:
        options, credentials = config.channel_options, config.credentials
        watchers = list(interceptors) or None
        channel = (
            grpc.aio.insecure_channel(config.target, options=options, interceptors=watchers)
            if credentials is None
            else grpc.aio.secure_channel(
                config.target, credentials, options=options, interceptors=watchers
            )
        )
        return cls(
            channel,
            quota_pb2_grpc.QuotaServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
            reporting_pb2_grpc.ReportingServiceStub(channel),
        )


class AsyncPagemeterClient:
    """pagemeter on `grpc.aio`. Use as `async with AsyncPagemeterClient(...) as client:`.

    Every call has a deadline (`timeout` seconds, or the call's own `timeout`), and
    UNAVAILABLE is retried by gRPC with the same request message, up to
    `max_attempts` attempts in all. Failed calls raise `grpc.aio.AioRpcError`.
    The channel opens on the first call, in that call's event loop: use one
    client per event loop.

    `token` is sent as `authorization: Bearer <token>` with every call (admin or
    service token, or tenant API key; with a tenant key, call the reads with
    org_id "", their default). `tls=True` turns on TLS: `root_certificates` is the
    PEM CA (None: the system's roots), `client_certificate` and `client_key` (both
    or neither) a client certificate for mutual TLS, `tls_server_name` the name the
    server's certificate is checked against instead of the target's host.

    `outbox` (an Outbox) makes RecordUsage durable: see `record_usage`,
    `flush_outbox` and `start_outbox_flusher`; close() delivers its due records
    unless flush_outbox_on_close=False. The client does not close the outbox.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 5,
        initial_backoff: float = 0.2,
        max_backoff: float = 2.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        options: ChannelOptions = (),
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        tls_server_name: str | None = None,
        outbox: Outbox | None = None,
        flush_outbox_on_close: bool = True,
        replay_after_failover: ReplayWindow | None = None,
    ) -> None:
        self._outbox = outbox
        self._flush_outbox_on_close = flush_outbox_on_close
        self._acknowledged = (
            None if replay_after_failover is None else AcknowledgedLog(replay_after_failover)
        )
        self._config = _ClientConfig(
            target,
            timeout=timeout,
            max_attempts=max_attempts,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            credentials=credentials,
            metadata=metadata,
            options=options,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
        )
        self._open: _AsyncChannel | None = None
        self._flusher: tuple[asyncio.Task[None], asyncio.Event] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._replay_again = False
        self._replay_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return self._config.describe(type(self).__name__)

    @property
    def target(self) -> str:
        return self._config.target

    def _channel(self) -> _AsyncChannel:
        # grpc.aio ties a channel to the event loop it is made in, and __init__ may
        # run before any loop exists (or in another one): make it on first use.
        if self._open is None:
            watchers = (
                ()
                if self._acknowledged is None
                else (AsyncObserver(self._acknowledged, self._replay_soon),)
            )
            self._open = _AsyncChannel.create(self._config, watchers)
        return self._open

    @property
    def _quota(self) -> quota_pb2_grpc.QuotaServiceAsyncStub:
        return self._channel().quota

    @property
    def _admin(self) -> admin_pb2_grpc.AdminServiceAsyncStub:
        return self._channel().admin

    @property
    def _reporting(self) -> reporting_pb2_grpc.ReportingServiceAsyncStub:
        return self._channel().reporting

    async def close(self) -> None:
        """Stop the outbox flusher, deliver the outbox's due records, close the channel.

        The delivery pass runs only with an outbox and flush_outbox_on_close
        (the default); it stops at the first sign that pagemeter is unreachable.
        """
        try:
            await self._stop_replayer()
            await self.stop_outbox_flusher()
            if self._outbox is not None and self._flush_outbox_on_close:
                try:
                    await self._flush(self._outbox, force=False, limit=None, timeout=None)
                except (sqlite3.Error, OutboxError) as problem:
                    log.warning("outbox %s: delivery on close failed: %s", self._outbox, problem)
        finally:
            if self._open is not None:
                channel, self._open = self._open.channel, None
                await channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # QuotaService

    async def check_quota(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        request_id: str | None = None,
        hold: bool = False,
        hold_ttl: float | timedelta | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.CheckQuotaResponse:
        """May `units` be used now? With hold=True, reserve them for request_id (made if None)."""
        request = check_quota_request(
            org_id, units, request_id=request_id, hold=hold, hold_ttl=hold_ttl
        )
        return await self._quota.CheckQuota(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def record_usage(
        self,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        *,
        success: bool = True,
        document_type: str = "",
        requested_at: datetime | None = None,
        completed_at: datetime | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.RecordUsageResponse:
        """Record a finished job (idempotent by request_id); frees its hold.

        With an outbox the request is stored before it is sent, with completed_at
        fixed (the caller's, else that of the job's first attempt); a transient
        failure leaves it stored and raises UsageQueued, a refusal leaves it as a
        dead letter and raises the error.
        """
        request = record_usage_request(
            org_id,
            request_id,
            units,
            success=success,
            document_type=document_type,
            requested_at=requested_at,
            completed_at=completed_at,
        )
        if self._outbox is not None:
            return await self._record_durably(self._outbox, request, self._config.deadline(timeout))
        return await self._quota.RecordUsage(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def _record_durably(
        self, outbox: Outbox, request: quota_pb2.RecordUsageRequest, deadline: float
    ) -> quota_pb2.RecordUsageResponse:
        # Stored (on disk) before it is sent, held for the call: a crash at any
        # point leaves it delivered, or in the outbox, or both (then the
        # redelivery is a duplicate, counted once).
        try:
            entry = await asyncio.to_thread(
                outbox._store, request, claim_for=deadline + outbox.lease_margin
            )
        except (sqlite3.Error, OutboxError) as problem:
            log.warning("outbox %s: cannot store a record, sending it without: %s", outbox, problem)
            try:
                return await self._quota.RecordUsage(
                    request, timeout=deadline, metadata=self._config.metadata
                )
            except grpc.RpcError as error:
                _note_outbox_unusable(error, outbox, problem)
                raise
        try:
            response = await self._quota.RecordUsage(
                entry.request, timeout=deadline, metadata=self._config.metadata
            )
        except grpc.RpcError as error:
            queued = await asyncio.to_thread(_settle_first_attempt, outbox, entry, error)
            if queued is None:
                raise
            raise queued from error
        except BaseException:
            _release_quietly(outbox, entry.id)
            raise
        await asyncio.to_thread(_forget_delivered, outbox, entry.id)
        return response

    async def release_quota(
        self, org_id: str, request_id: str, *, timeout: float | None = None
    ) -> quota_pb2.ReleaseQuotaResponse:
        """Free the hold of a job that will not run (idempotent)."""
        request = quota_pb2.ReleaseQuotaRequest(org_id=org_id, request_id=request_id)
        return await self._quota.ReleaseQuota(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def check_quota_batch(
        self, items: Sequence[quota_pb2.CheckQuotaRequest], *, timeout: float | None = None
    ) -> quota_pb2.CheckQuotaBatchResponse:
        """Up to 1,000 checks in one call, answered item by item (build items with
        check_quota_request). Retrying the call is safe for holds with request ids."""
        request = quota_pb2.CheckQuotaBatchRequest(items=list(items))
        return await self._quota.CheckQuotaBatch(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def record_usage_batch(
        self, items: Sequence[quota_pb2.RecordUsageRequest], *, timeout: float | None = None
    ) -> quota_pb2.RecordUsageBatchResponse:
        """Up to 1,000 records in one call, answered item by item (build items with
        record_usage_request); retrying the call counts nothing twice."""
        request = quota_pb2.RecordUsageBatchRequest(items=list(items))
        return await self._quota.RecordUsageBatch(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def get_usage(
        self,
        org_id: str = "",
        *,
        year: int | None = None,
        month: int | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.GetUsageResponse:
        """One month's usage (default: the current month in the plan's timezone)."""
        request = get_usage_request(org_id, year=year, month=month)
        return await self._quota.GetUsage(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    # AdminService

    async def set_plan(
        self, plan: plan_pb2.Plan, *, timeout: float | None = None
    ) -> admin_pb2.SetPlanResponse:
        """Create or replace plan.org_id's whole plan."""
        return await self._admin.SetPlan(
            admin_pb2.SetPlanRequest(plan=plan),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    async def get_plan(
        self, org_id: str, *, timeout: float | None = None
    ) -> admin_pb2.GetPlanResponse:
        """Read an organization's plan (NOT_FOUND when it has none)."""
        return await self._admin.GetPlan(
            admin_pb2.GetPlanRequest(org_id=org_id),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    async def grant_credits(
        self,
        org_id: str,
        metric: str,
        units: int,
        grant_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
    ) -> admin_pb2.GrantCreditsResponse:
        """Add prepaid credits to one metric, once per grant_id."""
        request = admin_pb2.GrantCreditsRequest(
            org_id=org_id, metric=metric, units=units, grant_id=grant_id, reason=reason
        )
        return await self._admin.GrantCredits(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def create_api_key(
        self, org_id: str, name: str = "", *, timeout: float | None = None
    ) -> admin_pb2.CreateApiKeyResponse:
        """Make a tenant API key; its `secret` is in this answer only. Never retried."""
        return await self._admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(org_id=org_id, name=name),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    async def list_api_keys(
        self, org_id: str, *, timeout: float | None = None
    ) -> admin_pb2.ListApiKeysResponse:
        """An organization's API keys, newest first (ids, names and times; never secrets)."""
        return await self._admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(org_id=org_id),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    async def revoke_api_key(
        self, org_id: str, key_id: str, *, timeout: float | None = None
    ) -> admin_pb2.RevokeApiKeyResponse:
        """Revoke an API key: its next call is refused (idempotent)."""
        return await self._admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(org_id=org_id, key_id=key_id),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    async def adjust_usage(
        self,
        org_id: str,
        metric: str,
        units: int,
        *,
        reason: str,
        adjustment_id: str,
        year: int | None = None,
        month: int | None = None,
        timeout: float | None = None,
    ) -> admin_pb2.AdjustUsageResponse:
        """Correct a month's committed units (negative: remove), once per adjustment_id."""
        request = adjust_usage_request(
            org_id,
            metric,
            units,
            reason=reason,
            adjustment_id=adjustment_id,
            year=year,
            month=month,
        )
        return await self._admin.AdjustUsage(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def list_audit_events(
        self,
        org_id: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        timeout: float | None = None,
    ) -> admin_pb2.ListAuditEventsResponse:
        """One page of the audit trail, newest first; pass next_page_token on for the next."""
        request = admin_pb2.ListAuditEventsRequest(
            org_id=org_id, page_size=page_size, page_token=page_token
        )
        return await self._admin.ListAuditEvents(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def iter_audit_events(
        self, org_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[admin_pb2.AuditEvent]:
        """Every audit event, newest first, fetching page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = await self.list_audit_events(org_id, page_size, token, timeout=timeout)
            for event in page.events:
                yield event
            token = _next_token(page, seen, "ListAuditEvents")
            if not token:
                return

    # ReportingService

    async def get_usage_history(
        self, org_id: str = "", *, months: int = 0, timeout: float | None = None
    ) -> reporting_pb2.GetUsageHistoryResponse:
        """The last `months` months (0: the server's 12), newest first, with each month's terms."""
        request = get_usage_history_request(org_id, months=months)
        return await self._reporting.GetUsageHistory(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def get_usage_statistics(
        self,
        org_id: str = "",
        *,
        period: StatisticsPeriodName | None = None,
        start_date: str | date | None = None,
        end_date: str | date | None = None,
        group_by: StatisticsGroupingName | None = None,
        timeout: float | None = None,
    ) -> reporting_pb2.GetUsageStatisticsResponse:
        """Usage between two dates of the plan's timezone, by period and/or by document type.

        A large answer (daily rows split by many document types) comes from the
        server in pages; they are fetched here and returned as one answer.
        """
        request = get_usage_statistics_request(
            org_id, period=period, start_date=start_date, end_date=end_date, group_by=group_by
        )
        answer: reporting_pb2.GetUsageStatisticsResponse = await self._reporting.GetUsageStatistics(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )
        while answer.next_page_token:
            request.page_token = answer.next_page_token
            page = await self._reporting.GetUsageStatistics(
                request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
            )
            answer = joined_statistics(answer, page)
        return answer

    async def list_usage_records(
        self,
        org_id: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> reporting_pb2.ListUsageRecordsResponse:
        """One page of usage records, newest first; pass next_page_token on for the next."""
        request = list_usage_records_request(org_id, page_size=page_size, page_token=page_token)
        return await self._reporting.ListUsageRecords(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    async def iter_usage_records(
        self, org_id: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[reporting_pb2.UsageRecord]:
        """Every usage record, newest first, fetching page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = await self.list_usage_records(
                org_id, page_size=page_size, page_token=token, timeout=timeout
            )
            for record in page.records:
                yield record
            token = _next_token(page, seen)
            if not token:
                return

    # The outbox

    @property
    def outbox(self) -> Outbox | None:
        """The client's outbox (None: RecordUsage failures are only raised)."""
        return self._outbox

    def _require_outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("this client has no outbox (construct it with outbox=Outbox(path))")
        return self._outbox

    async def flush_outbox(
        self, *, force: bool = False, limit: int | None = None, timeout: float | None = None
    ) -> FlushResult:
        """One delivery pass: re-send the outbox's pending records, oldest first.

        Each record goes with its original request (request_id, completed_at, ...);
        a first answer or a duplicate deletes it. A transient failure keeps it
        pending with backoff, a refusal makes it a dead letter. The pass stops at
        the first failure saying pagemeter is unreachable. Only records whose
        backoff has passed are sent, all pending ones with force=True (never
        those another pass or a first attempt holds). `limit` caps the records
        tried; `timeout` is each call's deadline.
        """
        return await self._flush(self._require_outbox(), force=force, limit=limit, timeout=timeout)

    async def _flush(
        self,
        outbox: Outbox,
        *,
        force: bool,
        limit: int | None,
        timeout: float | None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> FlushResult:
        deadline = self._config.deadline(timeout)
        run = DeliveryPass(outbox, lease=deadline + outbox.lease_margin, force=force, limit=limit)
        while not run.finished and not should_stop():
            batch = await asyncio.to_thread(run.claim)
            if not batch:
                break
            for index, entry in enumerate(batch):
                if run.finished or should_stop():
                    await asyncio.to_thread(run.abandon, batch[index:])
                    break
                try:
                    response = await self._quota.RecordUsage(
                        entry.request, timeout=deadline, metadata=self._config.metadata
                    )
                except grpc.RpcError as error:
                    details = error_details(error)
                    await asyncio.to_thread(
                        run.failed, entry, details.code, details.message, _retry_seconds(details)
                    )
                except BaseException:
                    run.abandon(batch[index:])
                    raise
                else:
                    await asyncio.to_thread(run.delivered, entry, response)
        return await asyncio.to_thread(run.result)

    def start_outbox_flusher(self, interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        """Run a delivery pass now and every `interval` seconds, in a task of the running loop.

        Stop it with `await stop_outbox_flusher()` (close() does). A pass that
        fails on the outbox file is logged (logger "pagemeter_client") and the
        next one runs as planned.
        """
        self._require_outbox()
        if interval <= 0:
            raise ValueError("interval must be positive")
        if self._flusher is not None and not self._flusher[0].done():
            raise RuntimeError("the outbox flusher is already running")
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._flush_every(interval, stop), name="pagemeter-outbox-flusher"
        )
        self._flusher = (task, stop)

    async def _flush_every(self, interval: float, stop: asyncio.Event) -> None:
        outbox = self._require_outbox()
        while not stop.is_set():
            try:
                await self._flush(
                    outbox, force=False, limit=None, timeout=None, should_stop=stop.is_set
                )
            except Exception:
                log.exception("outbox %s: delivery pass failed", outbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def stop_outbox_flusher(self) -> None:
        """Stop the background flusher after the record it is sending (if it runs)."""
        if self._flusher is None:
            return
        (task, stop), self._flusher = self._flusher, None
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    # Replay after a failover

    @property
    def replay_stats(self) -> ReplayStats | None:
        """What the replay after a failover kept and did (None without replay_after_failover)."""
        return None if self._acknowledged is None else self._acknowledged.stats()

    def _require_replay(self) -> AcknowledgedLog:
        if self._acknowledged is None:
            raise RuntimeError(
                "this client keeps no acknowledged requests "
                "(construct it with replay_after_failover=ReplayWindow(...))"
            )
        return self._acknowledged

    async def replay_acknowledged(self, *, timeout: float | None = None) -> ReplayResult:
        """Send every acknowledged request of the window again, now (see ReplayResult).

        For a failover hook, or a client that was idle through the failover and so
        saw no outage. Waits for a background pass that is running; `timeout` is
        each call's deadline.
        """
        acknowledged = self._require_replay()
        async with self._pass_lock():
            return await replay_async(
                acknowledged,
                self._quota,
                deadline=self._config.deadline(timeout),
                metadata=self._config.metadata,
            )

    def _pass_lock(self) -> asyncio.Lock:
        if self._replay_lock is None:
            self._replay_lock = asyncio.Lock()
        return self._replay_lock

    def _replay_soon(self) -> None:
        """The first answer after a store outage: replay in a task (or again after this pass)."""
        self._replay_again = True
        if self._replayer is not None and not self._replayer.done():
            return
        self._replayer = asyncio.get_running_loop().create_task(
            self._replay_in_background(), name="pagemeter-replay"
        )

    async def _replay_in_background(self) -> None:
        acknowledged = self._require_replay()
        while self._replay_again:
            self._replay_again = False
            try:
                async with self._pass_lock():
                    await replay_async(
                        acknowledged,
                        self._quota,
                        deadline=self._config.timeout,
                        metadata=self._config.metadata,
                    )
            except Exception:
                log.exception("replay after a store outage failed")

    async def _stop_replayer(self) -> None:
        if self._replayer is None:
            return
        task, self._replayer = self._replayer, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Worker convenience

    async def _release_unknown_hold(self, org_id: str, request_id: str) -> None:
        """Free, or bar, a hold whose CheckQuota had an unknown outcome.

        The hold may still land (Redis ran the script after pagemeter gave up on
        it): a release with its id frees it, or, sent first, makes pagemeter
        refuse it when it lands. Tried for RELEASE_WINDOW seconds while pagemeter
        answers UNAVAILABLE; past that the hold's TTL is the backstop.
        """
        deadline = time.monotonic() + RELEASE_WINDOW
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                await self.release_quota(org_id, request_id, timeout=remaining)
                return
            except grpc.RpcError as error:
                if not _outcome_unknown(error):
                    return
            await asyncio.sleep(min(RELEASE_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    @contextlib.asynccontextmanager
    async def reserve(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        request_id: str | None = None,
        hold_ttl: float | timedelta | None = None,
    ) -> AsyncIterator[AsyncReservation]:
        """Hold `units` for one job around the `async with` body.

        Raises QuotaDenied (and skips the body) when the units are not admitted.
        Leaving the body normally commits the reserved units unless the body called
        commit(), fail() or release(); leaving it with an exception records the job
        as failed (consuming nothing) and re-raises.
        """
        request_id = request_id or new_request_id()
        try:
            decision = await self.check_quota(
                org_id, units, request_id=request_id, hold=True, hold_ttl=hold_ttl
            )
        except grpc.RpcError as error:
            if _outcome_unknown(error):
                await self._release_unknown_hold(org_id, request_id)
            raise
        if not decision.allowed:
            raise QuotaDenied(decision)
        job = AsyncReservation(self, org_id, request_id, units, decision)
        try:
            yield job
        except BaseException as body_error:
            if not job.settled:
                try:
                    await job.fail()
                except grpc.RpcError as settle_error:
                    _note_settle_failure(body_error, settle_error)
                except UsageQueued as queued:
                    _note_settle_queued(body_error, queued)
            raise
        if not job.settled:
            await job.commit()


class PagemeterClient:
    """pagemeter on synchronous `grpc`. Use as `with PagemeterClient(...) as client:`.

    The same methods and options (token, TLS, outbox) as AsyncPagemeterClient,
    blocking; the outbox flusher is a thread. Failed calls raise `grpc.RpcError`
    (also a `grpc.Call`: `.code()`, `.details()`).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 5,
        initial_backoff: float = 0.2,
        max_backoff: float = 2.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        options: ChannelOptions = (),
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        tls_server_name: str | None = None,
        outbox: Outbox | None = None,
        flush_outbox_on_close: bool = True,
        replay_after_failover: ReplayWindow | None = None,
    ) -> None:
        self._outbox = outbox
        self._flush_outbox_on_close = flush_outbox_on_close
        self._acknowledged = (
            None if replay_after_failover is None else AcknowledgedLog(replay_after_failover)
        )
        self._config = _ClientConfig(
            target,
            timeout=timeout,
            max_attempts=max_attempts,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            credentials=credentials,
            metadata=metadata,
            options=options,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
        )
        opts, credentials = self._config.channel_options, self._config.credentials
        self._raw_channel = (
            grpc.insecure_channel(target, options=opts)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=opts)
        )
        self._channel = (
            self._raw_channel
            if self._acknowledged is None
            else grpc.intercept_channel(
                self._raw_channel, SyncObserver(self._acknowledged, self._replay_soon)
            )
        )
        self._quota = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._reporting = reporting_pb2_grpc.ReportingServiceStub(self._channel)
        self._flusher: tuple[threading.Thread, threading.Event] | None = None
        self._flusher_lock = threading.Lock()
        self._replayer: threading.Thread | None = None
        self._replay_again = False
        self._replay_stop = threading.Event()
        self._replay_state = threading.Lock()  # guards _replayer and _replay_again
        self._replay_pass = threading.Lock()  # one pass at a time

    def __repr__(self) -> str:
        return self._config.describe(type(self).__name__)

    @property
    def target(self) -> str:
        return self._config.target

    def close(self) -> None:
        """Stop the outbox flusher, deliver the outbox's due records, close the channel.

        The delivery pass runs only with an outbox and flush_outbox_on_close
        (the default); it stops at the first sign that pagemeter is unreachable.
        """
        try:
            self._stop_replayer()
            self.stop_outbox_flusher()
            if self._outbox is not None and self._flush_outbox_on_close:
                try:
                    self._flush(self._outbox, force=False, limit=None, timeout=None)
                except (sqlite3.Error, OutboxError) as problem:
                    log.warning("outbox %s: delivery on close failed: %s", self._outbox, problem)
        finally:
            self._raw_channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # QuotaService

    def check_quota(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        request_id: str | None = None,
        hold: bool = False,
        hold_ttl: float | timedelta | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.CheckQuotaResponse:
        """May `units` be used now? With hold=True, reserve them for request_id (made if None)."""
        request = check_quota_request(
            org_id, units, request_id=request_id, hold=hold, hold_ttl=hold_ttl
        )
        return self._quota.CheckQuota(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def record_usage(
        self,
        org_id: str,
        request_id: str,
        units: Mapping[str, int],
        *,
        success: bool = True,
        document_type: str = "",
        requested_at: datetime | None = None,
        completed_at: datetime | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.RecordUsageResponse:
        """Record a finished job (idempotent by request_id); frees its hold.

        With an outbox the request is stored before it is sent, with completed_at
        fixed (the caller's, else that of the job's first attempt); a transient
        failure leaves it stored and raises UsageQueued, a refusal leaves it as a
        dead letter and raises the error.
        """
        request = record_usage_request(
            org_id,
            request_id,
            units,
            success=success,
            document_type=document_type,
            requested_at=requested_at,
            completed_at=completed_at,
        )
        if self._outbox is not None:
            return self._record_durably(self._outbox, request, self._config.deadline(timeout))
        return self._quota.RecordUsage(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def _record_durably(
        self, outbox: Outbox, request: quota_pb2.RecordUsageRequest, deadline: float
    ) -> quota_pb2.RecordUsageResponse:
        # Stored (on disk) before it is sent, held for the call: a crash at any
        # point leaves it delivered, or in the outbox, or both (then the
        # redelivery is a duplicate, counted once).
        try:
            entry = outbox._store(request, claim_for=deadline + outbox.lease_margin)
        except (sqlite3.Error, OutboxError) as problem:
            log.warning("outbox %s: cannot store a record, sending it without: %s", outbox, problem)
            try:
                return self._quota.RecordUsage(
                    request, timeout=deadline, metadata=self._config.metadata
                )
            except grpc.RpcError as error:
                _note_outbox_unusable(error, outbox, problem)
                raise
        try:
            response = self._quota.RecordUsage(
                entry.request, timeout=deadline, metadata=self._config.metadata
            )
        except grpc.RpcError as error:
            queued = _settle_first_attempt(outbox, entry, error)
            if queued is None:
                raise
            raise queued from error
        except BaseException:
            _release_quietly(outbox, entry.id)
            raise
        _forget_delivered(outbox, entry.id)
        return response

    def release_quota(
        self, org_id: str, request_id: str, *, timeout: float | None = None
    ) -> quota_pb2.ReleaseQuotaResponse:
        """Free the hold of a job that will not run (idempotent)."""
        request = quota_pb2.ReleaseQuotaRequest(org_id=org_id, request_id=request_id)
        return self._quota.ReleaseQuota(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def check_quota_batch(
        self, items: Sequence[quota_pb2.CheckQuotaRequest], *, timeout: float | None = None
    ) -> quota_pb2.CheckQuotaBatchResponse:
        """Up to 1,000 checks in one call, answered item by item (build items with
        check_quota_request). Retrying the call is safe for holds with request ids."""
        request = quota_pb2.CheckQuotaBatchRequest(items=list(items))
        return self._quota.CheckQuotaBatch(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def record_usage_batch(
        self, items: Sequence[quota_pb2.RecordUsageRequest], *, timeout: float | None = None
    ) -> quota_pb2.RecordUsageBatchResponse:
        """Up to 1,000 records in one call, answered item by item (build items with
        record_usage_request); retrying the call counts nothing twice."""
        request = quota_pb2.RecordUsageBatchRequest(items=list(items))
        return self._quota.RecordUsageBatch(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def get_usage(
        self,
        org_id: str = "",
        *,
        year: int | None = None,
        month: int | None = None,
        timeout: float | None = None,
    ) -> quota_pb2.GetUsageResponse:
        """One month's usage (default: the current month in the plan's timezone)."""
        request = get_usage_request(org_id, year=year, month=month)
        return self._quota.GetUsage(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    # AdminService

    def set_plan(
        self, plan: plan_pb2.Plan, *, timeout: float | None = None
    ) -> admin_pb2.SetPlanResponse:
        """Create or replace plan.org_id's whole plan."""
        return self._admin.SetPlan(
            admin_pb2.SetPlanRequest(plan=plan),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    def get_plan(self, org_id: str, *, timeout: float | None = None) -> admin_pb2.GetPlanResponse:
        """Read an organization's plan (NOT_FOUND when it has none)."""
        return self._admin.GetPlan(
            admin_pb2.GetPlanRequest(org_id=org_id),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    def grant_credits(
        self,
        org_id: str,
        metric: str,
        units: int,
        grant_id: str,
        reason: str = "",
        *,
        timeout: float | None = None,
    ) -> admin_pb2.GrantCreditsResponse:
        """Add prepaid credits to one metric, once per grant_id."""
        request = admin_pb2.GrantCreditsRequest(
            org_id=org_id, metric=metric, units=units, grant_id=grant_id, reason=reason
        )
        return self._admin.GrantCredits(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def create_api_key(
        self, org_id: str, name: str = "", *, timeout: float | None = None
    ) -> admin_pb2.CreateApiKeyResponse:
        """Make a tenant API key; its `secret` is in this answer only. Never retried."""
        return self._admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(org_id=org_id, name=name),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    def list_api_keys(
        self, org_id: str, *, timeout: float | None = None
    ) -> admin_pb2.ListApiKeysResponse:
        """An organization's API keys, newest first (ids, names and times; never secrets)."""
        return self._admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(org_id=org_id),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    def revoke_api_key(
        self, org_id: str, key_id: str, *, timeout: float | None = None
    ) -> admin_pb2.RevokeApiKeyResponse:
        """Revoke an API key: its next call is refused (idempotent)."""
        return self._admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(org_id=org_id, key_id=key_id),
            timeout=self._config.deadline(timeout),
            metadata=self._config.metadata,
        )

    def adjust_usage(
        self,
        org_id: str,
        metric: str,
        units: int,
        *,
        reason: str,
        adjustment_id: str,
        year: int | None = None,
        month: int | None = None,
        timeout: float | None = None,
    ) -> admin_pb2.AdjustUsageResponse:
        """Correct a month's committed units (negative: remove), once per adjustment_id."""
        request = adjust_usage_request(
            org_id,
            metric,
            units,
            reason=reason,
            adjustment_id=adjustment_id,
            year=year,
            month=month,
        )
        return self._admin.AdjustUsage(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def list_audit_events(
        self,
        org_id: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        timeout: float | None = None,
    ) -> admin_pb2.ListAuditEventsResponse:
        """One page of the audit trail, newest first; pass next_page_token on for the next."""
        request = admin_pb2.ListAuditEventsRequest(
            org_id=org_id, page_size=page_size, page_token=page_token
        )
        return self._admin.ListAuditEvents(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def iter_audit_events(
        self, org_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[admin_pb2.AuditEvent]:
        """Every audit event, newest first, fetching page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_audit_events(org_id, page_size, token, timeout=timeout)
            yield from page.events
            token = _next_token(page, seen, "ListAuditEvents")
            if not token:
                return

    # ReportingService

    def get_usage_history(
        self, org_id: str = "", *, months: int = 0, timeout: float | None = None
    ) -> reporting_pb2.GetUsageHistoryResponse:
        """The last `months` months (0: the server's 12), newest first, with each month's terms."""
        request = get_usage_history_request(org_id, months=months)
        return self._reporting.GetUsageHistory(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def get_usage_statistics(
        self,
        org_id: str = "",
        *,
        period: StatisticsPeriodName | None = None,
        start_date: str | date | None = None,
        end_date: str | date | None = None,
        group_by: StatisticsGroupingName | None = None,
        timeout: float | None = None,
    ) -> reporting_pb2.GetUsageStatisticsResponse:
        """Usage between two dates of the plan's timezone, by period and/or by document type.

        A large answer (daily rows split by many document types) comes from the
        server in pages; they are fetched here and returned as one answer.
        """
        request = get_usage_statistics_request(
            org_id, period=period, start_date=start_date, end_date=end_date, group_by=group_by
        )
        answer: reporting_pb2.GetUsageStatisticsResponse = self._reporting.GetUsageStatistics(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )
        while answer.next_page_token:
            request.page_token = answer.next_page_token
            page = self._reporting.GetUsageStatistics(
                request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
            )
            answer = joined_statistics(answer, page)
        return answer

    def list_usage_records(
        self,
        org_id: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> reporting_pb2.ListUsageRecordsResponse:
        """One page of usage records, newest first; pass next_page_token on for the next."""
        request = list_usage_records_request(org_id, page_size=page_size, page_token=page_token)
        return self._reporting.ListUsageRecords(
            request, timeout=self._config.deadline(timeout), metadata=self._config.metadata
        )

    def iter_usage_records(
        self, org_id: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[reporting_pb2.UsageRecord]:
        """Every usage record, newest first, fetching page after page (timeout: per page)."""
        token = ""
        seen: set[str] = set()
        while True:
            page = self.list_usage_records(
                org_id, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.records
            token = _next_token(page, seen)
            if not token:
                return

    # The outbox

    @property
    def outbox(self) -> Outbox | None:
        """The client's outbox (None: RecordUsage failures are only raised)."""
        return self._outbox

    def _require_outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("this client has no outbox (construct it with outbox=Outbox(path))")
        return self._outbox

    def flush_outbox(
        self, *, force: bool = False, limit: int | None = None, timeout: float | None = None
    ) -> FlushResult:
        """One delivery pass: re-send the outbox's pending records, oldest first.

        Each record goes with its original request (request_id, completed_at, ...);
        a first answer or a duplicate deletes it. A transient failure keeps it
        pending with backoff, a refusal makes it a dead letter. The pass stops at
        the first failure saying pagemeter is unreachable. Only records whose
        backoff has passed are sent, all pending ones with force=True (never
        those another pass or a first attempt holds). `limit` caps the records
        tried; `timeout` is each call's deadline.
        """
        return self._flush(self._require_outbox(), force=force, limit=limit, timeout=timeout)

    def _flush(
        self,
        outbox: Outbox,
        *,
        force: bool,
        limit: int | None,
        timeout: float | None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> FlushResult:
        deadline = self._config.deadline(timeout)
        run = DeliveryPass(outbox, lease=deadline + outbox.lease_margin, force=force, limit=limit)
        while not run.finished and not should_stop():
            batch = run.claim()
            if not batch:
                break
            for index, entry in enumerate(batch):
                if run.finished or should_stop():
                    run.abandon(batch[index:])
                    break
                try:
                    response = self._quota.RecordUsage(
                        entry.request, timeout=deadline, metadata=self._config.metadata
                    )
                except grpc.RpcError as error:
                    details = error_details(error)
                    run.failed(entry, details.code, details.message, _retry_seconds(details))
                except BaseException:
                    run.abandon(batch[index:])
                    raise
                else:
                    run.delivered(entry, response)
        return run.result()

    def start_outbox_flusher(self, interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        """Run a delivery pass now and every `interval` seconds, in a daemon thread.

        Stop it with stop_outbox_flusher() (close() does). A pass that fails on
        the outbox file is logged (logger "pagemeter_client") and the next one
        runs as planned.
        """
        outbox = self._require_outbox()
        if interval <= 0:
            raise ValueError("interval must be positive")
        with self._flusher_lock:
            if self._flusher is not None and self._flusher[0].is_alive():
                raise RuntimeError("the outbox flusher is already running")
            stop = threading.Event()
            thread = threading.Thread(
                target=self._flush_every,
                args=(outbox, interval, stop),
                name="pagemeter-outbox-flusher",
                daemon=True,
            )
            self._flusher = (thread, stop)
            thread.start()

    def _flush_every(self, outbox: Outbox, interval: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._flush(outbox, force=False, limit=None, timeout=None, should_stop=stop.is_set)
            except Exception:
                log.exception("outbox %s: delivery pass failed", outbox)
            if stop.wait(interval):
                return

    def stop_outbox_flusher(self) -> None:
        """Stop the background flusher after the record it is sending (if it runs)."""
        with self._flusher_lock:
            if self._flusher is None:
                return
            (thread, stop), self._flusher = self._flusher, None
        stop.set()
        if thread is not threading.current_thread():
            thread.join()

    # Replay after a failover

    @property
    def replay_stats(self) -> ReplayStats | None:
        """What the replay after a failover kept and did (None without replay_after_failover)."""
        return None if self._acknowledged is None else self._acknowledged.stats()

    def _require_replay(self) -> AcknowledgedLog:
        if self._acknowledged is None:
            raise RuntimeError(
                "this client keeps no acknowledged requests "
                "(construct it with replay_after_failover=ReplayWindow(...))"
            )
        return self._acknowledged

    def replay_acknowledged(self, *, timeout: float | None = None) -> ReplayResult:
        """Send every acknowledged request of the window again, now (see ReplayResult).

        For a failover hook, or a client that was idle through the failover and so
        saw no outage. Waits for a background pass that is running; `timeout` is
        each call's deadline.
        """
        acknowledged = self._require_replay()
        with self._replay_pass:
            return replay_sync(
                acknowledged,
                self._quota,
                deadline=self._config.deadline(timeout),
                metadata=self._config.metadata,
            )

    def _replay_soon(self) -> None:
        """The first answer after a store outage: replay in a thread (or again after this pass)."""
        with self._replay_state:
            self._replay_again = True
            if self._replay_stop.is_set() or (
                self._replayer is not None and self._replayer.is_alive()
            ):
                return
            self._replayer = threading.Thread(
                target=self._replay_in_background, name="pagemeter-replay", daemon=True
            )
            self._replayer.start()

    def _replay_in_background(self) -> None:
        acknowledged = self._require_replay()
        while True:
            with self._replay_state:
                if not self._replay_again or self._replay_stop.is_set():
                    self._replayer = None
                    return
                self._replay_again = False
            try:
                with self._replay_pass:
                    replay_sync(
                        acknowledged,
                        self._quota,
                        deadline=self._config.timeout,
                        metadata=self._config.metadata,
                        should_stop=self._replay_stop.is_set,
                    )
            except Exception:
                log.exception("replay after a store outage failed")

    def _stop_replayer(self) -> None:
        """Stop a background pass after the call it is making (at most one deadline)."""
        with self._replay_state:
            self._replay_stop.set()
            thread = self._replayer
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._config.timeout + 1.0)

    # Worker convenience

    def _release_unknown_hold(self, org_id: str, request_id: str) -> None:
        """As AsyncPagemeterClient._release_unknown_hold, blocking."""
        deadline = time.monotonic() + RELEASE_WINDOW
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.release_quota(org_id, request_id, timeout=remaining)
                return
            except grpc.RpcError as error:
                if not _outcome_unknown(error):
                    return
            time.sleep(min(RELEASE_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    @contextlib.contextmanager
    def reserve(
        self,
        org_id: str,
        units: Mapping[str, int],
        *,
        request_id: str | None = None,
        hold_ttl: float | timedelta | None = None,
    ) -> Iterator[Reservation]:
        """Hold `units` for one job around the `with` body.

        Raises QuotaDenied (and skips the body) when the units are not admitted.
        Leaving the body normally commits the reserved units unless the body called
        commit(), fail() or release(); leaving it with an exception records the job
        as failed (consuming nothing) and re-raises.
        """
        request_id = request_id or new_request_id()
        try:
            decision = self.check_quota(
                org_id, units, request_id=request_id, hold=True, hold_ttl=hold_ttl
            )
        except grpc.RpcError as error:
            if _outcome_unknown(error):
                self._release_unknown_hold(org_id, request_id)
            raise
        if not decision.allowed:
            raise QuotaDenied(decision)
        job = Reservation(self, org_id, request_id, units, decision)
        try:
            yield job
        except BaseException as body_error:
            if not job.settled:
                try:
                    job.fail()
                except grpc.RpcError as settle_error:
                    _note_settle_failure(body_error, settle_error)
                except UsageQueued as queued:
                    _note_settle_queued(body_error, queued)
            raise
        if not job.settled:
            job.commit()
