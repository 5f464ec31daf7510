"""Redis connections for every mode, built in one place.

The server's async client (single, cluster or sentinel) and the exporter's
synchronous twin of it are made here, with the same timeouts and TLS.
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel

from pagemeter_server.settings import Settings, sentinel_addresses
from pagemeter_server.store.cluster import FailFastCluster, FailFastSyncCluster
from pagemeter_server.store.sentinel import (
    SteadySentinel,
    WaitingSentinelPool,
    primary_options,
    sentinel_kwargs,
)


def connect_redis(url: str, settings: Settings) -> aioredis.Redis:
    """A pooled async Redis client with short timeouts, so a stalled Redis fails fast.

    In cluster mode it is a RedisCluster client: it learns the slots from the node
    in the URL, sends each script to the primary of its organization's slot and
    follows MOVED/ASK redirections and failovers itself.
    """
    timeouts: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
    }
    if settings.redis_mode == "cluster":
        cluster: Any = FailFastCluster.from_url(
            url, max_connections=settings.redis_max_connections, **timeouts
        )
        cluster.migration_wait_seconds = settings.redis_timeout_seconds
        return cast(aioredis.Redis, cluster)
    if settings.redis_mode == "sentinel":
        # The sentinels name the primary; after a failover the pool's next
        # connection goes to the promoted replica. SteadySentinel: see sentinel.py.
        # A dead sentinel is passed over at once (no retries with backoff: the
        # next sentinel in the list is the retry).
        sentinel = SteadySentinel(  # type: ignore[no-untyped-call]  # redis-py lacks annotations here
            sentinel_addresses(settings),
            sentinel_kwargs=sentinel_kwargs(settings, Retry(NoBackoff(), 0)),
        )
        primary: aioredis.Redis = sentinel.master_for(
            settings.sentinel_master,
            connection_pool_class=WaitingSentinelPool,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_seconds,
            retry=one_quick_retry(),
            **timeouts,
            **primary_options(url),
        )
        return primary
    # A call that finds every connection busy waits for one (up to the Redis
    # timeout) instead of failing: a batch across many organizations, or a
    # burst of calls, makes more script calls at once than the pool holds.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
        retry=one_quick_retry(),
        **timeouts,
    )
    return aioredis.Redis.from_pool(pool)


def one_quick_retry() -> Retry:
    """One immediate retry on a broken connection, none on a timeout.

    The retry is for a pooled connection that died with a Redis restart or a
    failover (the retry reconnects, to the new primary behind Sentinel). A
    timeout is never retried: a stalled Redis must fail fast, and callers retry
    with their idempotency keys.
    """
    return Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))


async def close_redis(client: aioredis.Redis) -> None:
    """Close a client from connect_redis, with the sentinel connections it made."""
    await client.aclose()
    # A cluster client has no single connection pool (and no sentinels).
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def sync_client_like(client: aioredis.Redis, settings: Settings) -> redis.Redis:
    """A synchronous client to the same Redis, with the same timeouts and credentials."""
    if settings.redis_mode == "sentinel":
        # As the service's own client (app.connect_redis): a dead sentinel is
        # passed over at once, a broken connection to the primary retried once;
        # the same credentials and TLS for the sentinels and for the primary.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py lacks annotations here
            sentinel_addresses(settings),
            sentinel_kwargs=sentinel_kwargs(settings, SyncRetry(NoBackoff(), 0)),
        )
        primary: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            settings.sentinel_master,
            retry=SyncRetry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            decode_responses=True,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
            **primary_options(settings.redis_url),
        )
        return primary
    any_client: Any = client  # connect_redis hands a RedisCluster over as a Redis
    if isinstance(any_client, AsyncRedisCluster):
        # Before its first command the async client knows only its startup nodes.
        node = any_client.get_default_node() or next(
            iter(any_client.nodes_manager.startup_nodes.values())
        )
        cluster = FailFastSyncCluster(
            host=node.host,
            port=int(node.port),
            decode_responses=True,
            socket_timeout=node.connection_kwargs.get("socket_timeout"),
            socket_connect_timeout=node.connection_kwargs.get("socket_connect_timeout"),
            password=node.connection_kwargs.get("password"),
            username=node.connection_kwargs.get("username"),
        )
        return cast(redis.Redis, cluster)
    kwargs = dict(client.connection_pool.connection_kwargs)
    allowed = {
        "host",
        "port",
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
    }
    params = {k: v for k, v in kwargs.items() if k in allowed}
    if "ssl" in client.connection_pool.connection_class.__name__.lower():
        params["ssl"] = True
    return redis.Redis(decode_responses=True, **params)
