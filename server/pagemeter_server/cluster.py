"""redis-py's cluster clients, with two behaviours changed for pagemeter.

1. A command that timed out is not retried. By default the client retries it
   three more times, so a stalled primary held each RPC for four Redis
   timeouts. A timeout now fails the call at once (UNAVAILABLE; callers retry
   with their idempotency keys), while the client still re-reads the slot map
   before its next command, so a failover is followed as before. Broken
   connections and CLUSTERDOWN are still retried: those answers come fast.
2. During a failover the client disconnects a node's connections from one task
   while another task may be about to write on one of them; the writer is then
   gone and redis-py raises AttributeError ("'NoneType' object has no
   attribute ...") from deep inside the connection. That is a broken
   connection, and is reported as one (ConnectionError), so it is retried on a
   fresh connection like any other instead of reaching the caller as INTERNAL.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster


class FailFastCluster(RedisCluster):
    """The async cluster client pagemeter uses (see the module docstring)."""

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]  # a narrower tuple on purpose
        redis.exceptions.ConnectionError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    )

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        except AttributeError as error:
            if "'NoneType' object has no attribute" not in str(error):
                raise
            raise redis.exceptions.ConnectionError(
                f"connection to {target_node.name} closed during a cluster change"
            ) from error


class FailFastSyncCluster(redis.RedisCluster):
    """The synchronous cluster client of the exporter: a timed-out command is not retried."""

    ERRORS_ALLOW_RETRY = FailFastCluster.ERRORS_ALLOW_RETRY  # type: ignore[assignment]
