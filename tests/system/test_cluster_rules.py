"""The core rule tests and the concurrency tests, run again on a real Redis Cluster.

The test functions of tests/rules/test_rules_lua.py and tests/rules/test_concurrency.py are
imported here and collected a second time, with this module's fixtures: a store
and a server on a 3-primary cluster, and a cluster client for inspecting keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2_grpc, quota_pb2_grpc, reporting_pb2_grpc
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from pagemeter_server.store.quota import Store
from tests.conftest import RunningServer
from tests.rules.test_concurrency import *  # noqa: F403 - collected again, on the cluster
from tests.rules.test_rules_lua import *  # noqa: F403 - collected again, on the cluster
from tests.system.test_cluster import cluster  # noqa: F401 - the module's cluster fixture


@pytest.fixture
def settings(cluster: list[RedisProcess]) -> Settings:  # noqa: F811
    return Settings(
        redis_url=cluster[0].url,
        redis_mode="cluster",
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
    )


class WholeCluster(redis.RedisCluster):
    """A cluster client whose KEYS looks at every primary, as the tests expect."""

    def keys(self, pattern: str = "*", **kwargs: object) -> list[str]:  # type: ignore[override]
        found: list[str] = []
        for node in self.get_primaries():
            found += self.execute_command("KEYS", pattern, target_nodes=node)
        return found


@pytest.fixture
def redis_sync(cluster: list[RedisProcess]) -> Iterator[redis.RedisCluster]:  # noqa: F811
    """A cluster client on an empty cluster (every primary flushed, scripts kept)."""
    client = WholeCluster(host="127.0.0.1", port=cluster[0].port, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
async def redis_client(
    settings: Settings, redis_sync: redis.RedisCluster
) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(settings.redis_url, settings)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis_client: aioredis.Redis, settings: Settings) -> Store:
    return Store(
        redis_client,
        default_timezone="UTC",
        record_retention_days=settings.record_retention_days,
        usage_retention_days=settings.usage_retention_days,
    )


@pytest.fixture
async def pagemeter_server(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[RunningServer]:
    server, port, parts = await create_server(
        settings, redis_client, clock=clock, registry=CollectorRegistry()
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield RunningServer(
        server=server,
        port=port,
        clock=clock,
        parts=parts,
        channel=channel,
        quota=quota_pb2_grpc.QuotaServiceStub(channel),  # type: ignore[arg-type]
        admin=admin_pb2_grpc.AdminServiceStub(channel),  # type: ignore[arg-type]
        reporting=reporting_pb2_grpc.ReportingServiceStub(channel),  # type: ignore[arg-type]
    )
    await channel.close()
    await server.stop(None)
