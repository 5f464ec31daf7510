"""pagemeter client: Python SDK (async and sync) and the `pagemeter` CLI.

    from pagemeter_client import PagemeterClient

    with PagemeterClient("127.0.0.1:50051") as client:
        with client.reserve("acme", {"pages": 12}) as job:
            ...  # the work; leaving the block commits the held units

With `outbox=Outbox("/var/lib/worker/pagemeter-outbox.db")` RecordUsage calls are
stored before they are sent and delivered later if pagemeter cannot take them
now (`UsageQueued`). With `replay_after_failover=ReplayWindow()` a client sends
the requests pagemeter acknowledged shortly before a store failover again, so
that what a lagging replica lost is applied again (`replay_acknowledged()`).

See docs/client.md.
"""

from pagemeter_client.outbox import (
    FlushOutcome,
    FlushResult,
    Outbox,
    OutboxEntry,
    OutboxError,
    OutboxSummary,
)
from pagemeter_client.replay import ReplayOutcome, ReplayResult, ReplayStats, ReplayWindow
from pagemeter_client.sdk import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    AsyncPagemeterClient,
    AsyncReservation,
    ErrorDetails,
    PagemeterClient,
    QuotaDenied,
    Reservation,
    RetryPolicy,
    StatisticsGroupingName,
    StatisticsPeriodName,
    UsageQueued,
    error_details,
    is_tenant_key,
    new_request_id,
)

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AsyncPagemeterClient",
    "AsyncReservation",
    "ErrorDetails",
    "FlushOutcome",
    "FlushResult",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxSummary",
    "PagemeterClient",
    "QuotaDenied",
    "ReplayOutcome",
    "ReplayResult",
    "ReplayStats",
    "ReplayWindow",
    "Reservation",
    "RetryPolicy",
    "StatisticsGroupingName",
    "StatisticsPeriodName",
    "UsageQueued",
    "error_details",
    "is_tenant_key",
    "new_request_id",
]
