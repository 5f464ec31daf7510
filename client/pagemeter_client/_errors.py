"""What failed calls raise and say, and how the outbox keeps a record whose first attempt failed."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pagemeter.v1 import (
    quota_pb2,
)
from pagemeter_client._messages import describe_denial
from pagemeter_client.outbox import (
    Outbox,
    OutboxEntry,
    OutboxError,
    is_transient,
)

log = logging.getLogger("pagemeter_client")


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
        """How long to wait before retrying: for a RATE_LIMITED denial, and for a
        WINDOW_LIMIT_EXCEEDED one when the units fit the window once it resets."""
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
