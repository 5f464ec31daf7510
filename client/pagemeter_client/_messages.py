"""Requests both clients send and what they make of answers: built and read here, once."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Literal, Protocol

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import (
    admin_pb2,
    plan_pb2,
    quota_pb2,
    reporting_pb2,
    webhooks_pb2,
)

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


def grant_credits_request(
    org_id: str,
    metric: str,
    units: int,
    grant_id: str,
    reason: str = "",
    *,
    effective_at: datetime | None = None,
    expires_at: datetime | None = None,
    priority: int | None = None,
) -> admin_pb2.GrantCreditsRequest:
    """A GrantCreditsRequest: a credit grant of `units` for one metric.

    effective_at and expires_at are timezone-aware datetimes (None: from now,
    and never expiring); priority is 0 to 100, lower drawn first (None: the
    server's 50). The values go as given: the server says what is wrong with them.
    """
    request = admin_pb2.GrantCreditsRequest(
        org_id=org_id, metric=metric, units=units, grant_id=grant_id, reason=reason
    )
    if effective_at is not None:
        request.effective_at.CopyFrom(_timestamp(effective_at, "effective_at"))
    if expires_at is not None:
        request.expires_at.CopyFrom(_timestamp(expires_at, "expires_at"))
    if priority is not None:
        request.priority = priority
    return request


# UpdateWebhookEndpointRequest.update_mask: the fields an update may change.
WEBHOOK_UPDATABLE = ("url", "event_types", "description", "enabled")


def update_webhook_endpoint_request(
    endpoint_id: str,
    *,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
    description: str | None = None,
    enabled: bool | None = None,
) -> webhooks_pb2.UpdateWebhookEndpointRequest:
    """An UpdateWebhookEndpointRequest changing the fields given (not None), and only
    those: update_mask names each of them. `event_types=()` means every type."""
    request = webhooks_pb2.UpdateWebhookEndpointRequest(endpoint_id=endpoint_id)
    if url is not None:
        request.url = url
        request.update_mask.append("url")
    if event_types is not None:
        if isinstance(event_types, str):
            raise TypeError("event_types is a sequence of event types, not one string")
        request.event_types.extend(event_types)
        request.update_mask.append("event_types")
    if description is not None:
        request.description = description
        request.update_mask.append("description")
    if enabled is not None:
        request.enabled = enabled
        request.update_mask.append("enabled")
    if not request.update_mask:
        raise ValueError(
            "name at least one field to change: url, event_types, description or enabled"
        )
    return request


def rotate_webhook_secret_request(
    endpoint_id: str, *, overlap: float | timedelta | None = None
) -> webhooks_pb2.RotateWebhookSecretRequest:
    """A RotateWebhookSecretRequest; overlap (seconds or a timedelta, whole seconds)
    is how long the old secret keeps signing (None: the server's default)."""
    request = webhooks_pb2.RotateWebhookSecretRequest(endpoint_id=endpoint_id)
    if overlap is not None:
        seconds = overlap.total_seconds() if isinstance(overlap, timedelta) else overlap
        if seconds < 1:
            raise ValueError("overlap must be at least 1 second (None: the server's default)")
        request.overlap_seconds = int(seconds)
    return request


def replay_webhook_events_request(
    endpoint_id: str,
    *,
    event_id: str = "",
    org_id: str = "",
    start_time: datetime | None = None,
    end_time: datetime | None = None,
) -> webhooks_pb2.ReplayWebhookEventsRequest:
    """A ReplayWebhookEventsRequest: one event (event_id), or the events between
    start_time and end_time (timezone-aware; both); the server judges the rest."""
    if bool(event_id) == (start_time is not None or end_time is not None):
        raise ValueError("name either event_id or start_time and end_time")
    if not event_id and (start_time is None or end_time is None):
        raise ValueError("a time range needs both start_time and end_time")
    request = webhooks_pb2.ReplayWebhookEventsRequest(
        endpoint_id=endpoint_id, event_id=event_id, org_id=org_id
    )
    if start_time is not None:
        request.start_time.CopyFrom(_timestamp(start_time, "start_time"))
    if end_time is not None:
        request.end_time.CopyFrom(_timestamp(end_time, "end_time"))
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


def credit_grant_status_name(status: admin_pb2.CreditGrantStatus.ValueType) -> str:
    """ACTIVE for CREDIT_GRANT_STATUS_ACTIVE (the enum's short name)."""
    return admin_pb2.CreditGrantStatus.Name(status).removeprefix("CREDIT_GRANT_STATUS_")


def window_name(window: plan_pb2.Window.ValueType) -> str:
    """day for WINDOW_DAY (the enum's short name, lowercase)."""
    return plan_pb2.Window.Name(window).removeprefix("WINDOW_").lower()


def _metric_denial(decision: quota_pb2.MetricDecision) -> str:
    most = str(decision.max_admissible) if decision.HasField("max_admissible") else "unlimited"
    verdict = "ok" if decision.allowed else reason_name(decision.reason)
    if decision.denied_by:
        verdict += f" (per {window_name(decision.denied_by)})"
    return f"{decision.metric}: {verdict}, requested {decision.requested}, max admissible {most}"


def describe_denial(response: quota_pb2.CheckQuotaResponse) -> str:
    """One line saying why a CheckQuota was denied, with max_admissible per metric and,
    when waiting helps (rate limit, a window that resets), how long to wait."""
    text = f"quota denied: {reason_name(response.reason)}"
    wait = ""
    if response.HasField("retry_after"):
        wait = f", retry after {response.retry_after.ToTimedelta().total_seconds():g}s"
    if response.reason == quota_pb2.DECISION_REASON_RATE_LIMITED:
        return text + wait
    if response.metrics:
        text += " (" + "; ".join(_metric_denial(d) for d in response.metrics) + ")"
    return text + wait
