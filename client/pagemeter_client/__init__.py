"""pagemeter client: Python SDK (async and sync) and the `pagemeter` CLI.

    from pagemeter_client import PagemeterClient

    with PagemeterClient("127.0.0.1:50051") as client:
        with client.reserve("acme", {"pages": 12}) as job:
            ...  # the work; leaving the block commits the held units

See docs/client.md.
"""

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
    "PagemeterClient",
    "QuotaDenied",
    "Reservation",
    "RetryPolicy",
    "StatisticsGroupingName",
    "StatisticsPeriodName",
    "error_details",
    "is_tenant_key",
    "new_request_id",
]
