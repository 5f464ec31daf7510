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

The async client is written in pagemeter_client._async; the blocking one in
pagemeter_client._sync is generated from it (`make unasync`). This module gathers
the names of both with the helpers they share.
"""

from pagemeter_client._async.client import (
    DEFAULT_FLUSH_INTERVAL,
    AsyncPagemeterClient,
    AsyncReservation,
)
from pagemeter_client._channel import (
    ADMIN_SERVICE,
    CREDENTIAL_HEADERS,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    MAX_ATTEMPTS_LIMIT,
    NOT_RETRIED,
    QUOTA_SERVICE,
    REPORTING_SERVICE,
    TENANT_KEY_PREFIX,
    ChannelOptions,
    Metadata,
    RetryPolicy,
    channel_options,
    is_tenant_key,
)
from pagemeter_client._errors import ErrorDetails, QuotaDenied, UsageQueued, error_details
from pagemeter_client._jobs import (
    RELEASE_RETRY_PAUSE,
    RELEASE_WINDOW,
    UNKNOWN_OUTCOME,
)
from pagemeter_client._messages import (
    STATISTICS_GROUPINGS,
    STATISTICS_PERIODS,
    WEBHOOK_UPDATABLE,
    StatisticsGroupingName,
    StatisticsPeriodName,
    adjust_usage_request,
    check_quota_request,
    credit_grant_status_name,
    describe_denial,
    get_usage_history_request,
    get_usage_request,
    get_usage_statistics_request,
    grant_credits_request,
    joined_statistics,
    list_usage_records_request,
    new_request_id,
    reason_name,
    record_usage_request,
    replay_webhook_events_request,
    rotate_webhook_secret_request,
    update_webhook_endpoint_request,
    window_name,
)
from pagemeter_client._sync.client import PagemeterClient, Reservation

__all__ = [
    "ADMIN_SERVICE",
    "CREDENTIAL_HEADERS",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "MAX_ATTEMPTS_LIMIT",
    "NOT_RETRIED",
    "QUOTA_SERVICE",
    "RELEASE_RETRY_PAUSE",
    "RELEASE_WINDOW",
    "REPORTING_SERVICE",
    "STATISTICS_GROUPINGS",
    "STATISTICS_PERIODS",
    "TENANT_KEY_PREFIX",
    "UNKNOWN_OUTCOME",
    "WEBHOOK_UPDATABLE",
    "AsyncPagemeterClient",
    "AsyncReservation",
    "ChannelOptions",
    "ErrorDetails",
    "Metadata",
    "PagemeterClient",
    "QuotaDenied",
    "Reservation",
    "RetryPolicy",
    "StatisticsGroupingName",
    "StatisticsPeriodName",
    "UsageQueued",
    "adjust_usage_request",
    "channel_options",
    "check_quota_request",
    "credit_grant_status_name",
    "describe_denial",
    "error_details",
    "get_usage_history_request",
    "get_usage_request",
    "get_usage_statistics_request",
    "grant_credits_request",
    "is_tenant_key",
    "joined_statistics",
    "list_usage_records_request",
    "new_request_id",
    "reason_name",
    "record_usage_request",
    "replay_webhook_events_request",
    "rotate_webhook_secret_request",
    "update_webhook_endpoint_request",
    "window_name",
]
