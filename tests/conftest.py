"""Shared fixtures: a real Redis server and a real pagemeter gRPC server.

The suite starts its own redis-server (the binary `make install` provides) on a
free loopback port, never a shared one, and flushes it before each test. gRPC
servers bind 127.0.0.1 port 0 and are reached over a real channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc

# Imported here, while only one thread runs: Hypothesis's pytest plugin would
# otherwise import (and pytest rewrite) it at the end of a run that never used
# it, after gRPC's threads have run, and CPython 3.11.7's ast.parse can then fail
# with "AST constructor recursion depth mismatch" (fixed in 3.11.8).
import hypothesis  # noqa: F401
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2_grpc, plan_pb2, quota_pb2_grpc, reporting_pb2_grpc
from pagemeter_server.api.auth import Credentials
from pagemeter_server.app import ServerParts, build_store, create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from pagemeter_server.store.quota import Store
from tests.client_flavours import FLAVOURS, Connect, connector

# 2026-03-15 12:00:00 UTC: mid-month, so tests move across month ends on purpose only.
START_MS = int(datetime(2026, 3, 15, 12, 0, tzinfo=UTC).timestamp() * 1000)


def ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 instant with offset, e.g. '2026-03-31T22:00:00+00:00'."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One real redis-server for the session, on a free loopback port."""
    # With its append-only file, as pagemeter requires of a store (--allow-volatile-store).
    process = RedisProcess(tmp_path_factory.mktemp("redis"), appendonly=True)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def redis_sync(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A synchronous client on a freshly flushed database."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisProcess) -> Settings:
    """Open access on loopback: the rule tests call as an admin without credentials.

    Access control has its own tests (tests/test_access.py) with real credentials.
    """
    return Settings(
        redis_url=redis_server.url, listen="127.0.0.1:0", metrics_listen="", dev_open_access=True
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
async def redis_client(
    redis_server: RedisProcess, redis_sync: redis.Redis, settings: Settings
) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_server.url, settings)
    yield client
    await client.aclose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def store(redis_client: aioredis.Redis, settings: Settings, registry: CollectorRegistry) -> Store:
    """The store layer alone, for testing the Lua scripts directly."""
    return build_store(redis_client, settings, ServiceMetrics(registry))


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    clock: ManualClock
    parts: ServerParts
    channel: grpc.aio.Channel
    quota: quota_pb2_grpc.QuotaServiceAsyncStub
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    reporting: reporting_pb2_grpc.ReportingServiceAsyncStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    client: aioredis.Redis,
    clock: ManualClock,
    registry: CollectorRegistry | None = None,
    credentials: Credentials | None = None,
) -> AsyncIterator[RunningServer]:
    """A real pagemeter gRPC server on 127.0.0.1:<free port>, reached over a channel
    with gRPC's default options (4 MiB messages), for the duration of the block."""
    server, port, parts = await create_server(
        settings,
        client,
        clock=clock,
        registry=registry if registry is not None else CollectorRegistry(),
        credentials=credentials,
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(
            server=server,
            port=port,
            clock=clock,
            parts=parts,
            channel=channel,
            quota=quota_pb2_grpc.QuotaServiceStub(channel),
            admin=admin_pb2_grpc.AdminServiceStub(channel),
            reporting=reporting_pb2_grpc.ReportingServiceStub(channel),
        )
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def pagemeter_server(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    registry: CollectorRegistry,
) -> AsyncIterator[RunningServer]:
    """A real pagemeter gRPC server on 127.0.0.1:<free port>, on a flushed Redis."""
    async with serving(settings, redis_client, clock, registry) as running:
        yield running


@pytest.fixture(params=FLAVOURS)
def connect(request: pytest.FixtureRequest) -> Connect:
    """`connect(target, **options)`: an AsyncPagemeterClient, then a PagemeterClient
    behind the same async methods (tests/client_flavours.py)."""
    flavour = request.param
    return connector(flavour)


def metric_limits(metric: str, **fields: object) -> plan_pb2.MetricLimits:
    return plan_pb2.MetricLimits(metric=metric, **fields)  # type: ignore[arg-type]


def eagle_plan(org_id: str = "acme", **overrides: object) -> plan_pb2.Plan:
    """Eagle Doc's example: 2000 pages included, overage at 0.028, hard limit 2500."""
    fields: dict[str, object] = {
        "org_id": org_id,
        "name": "Business",
        "timezone": "UTC",
        "metrics": [
            metric_limits(
                "pages",
                contract_quota=2000,
                overage_allowed=True,
                hard_limit=2500,
                price_per_unit="0.03",
                overage_price_per_unit="0.028",
            ),
            metric_limits("documents", contract_quota=500, overage_allowed=False),
        ],
    }
    fields.update(overrides)
    return plan_pb2.Plan(**fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_caller_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's exported PAGEMETER_TOKEN, PAGEMETER_TLS_CA, ... must not reach the tests.

    Only the choice of redis-server binary is kept.
    """
    import os

    for name in list(os.environ):
        if name.startswith("PAGEMETER_") and name != "PAGEMETER_REDIS_SERVER":
            monkeypatch.delenv(name)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


async def exported_committed(
    registry: CollectorRegistry, org: str, metric: str = "pages"
) -> float | None:
    """The per-org exporter's committed units, read as a scrape would (its client is blocking)."""
    return await asyncio.to_thread(
        registry.get_sample_value,
        "pagemeter_org_committed_units",
        {"org": org, "metric": metric},
    )
