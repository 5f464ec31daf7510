"""Shared fixtures: a real Redis server and a real pagemeter gRPC server; the test tiers.

The suite starts its own redis-server (the binary `make install` provides) on a
free loopback port, never a shared one, and flushes it before each test. gRPC
servers bind 127.0.0.1 port 0 and are reached over a real channel.

Each test file sits in the folder of its tier, and each test gets that tier's
marker (registered in pyproject.toml), by what it starts:

- tests/unit: pure Python, nothing started;
- tests/rules: the Lua rules, through the store or an in-process server, on the
  suite's Redis;
- tests/grpc: the services over a real channel to an in-process server;
- tests/client: the Python SDK and the `pagemeter` CLI;
- tests/system: server processes, several Redis processes, topologies, faults.

A test elsewhere may be marked `system` too (the rule tests' cluster backend):
`make test-fast` runs `-m "not system"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc

# Imported here, while only one thread runs: Hypothesis's pytest plugin would
# otherwise import (and pytest rewrite) it at the end of a run that never used
# it, after gRPC's threads have run, and CPython 3.11.7's ast.parse can then fail
# with "AST constructor recursion depth mismatch" (fixed in 3.11.8).
import hypothesis
import pytest
import redis
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2_grpc, plan_pb2, quota_pb2_grpc, reporting_pb2_grpc
from pagemeter_server.api.auth import Credentials
from pagemeter_server.app import ServerParts, build_store, create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from pagemeter_server.store.keys import PLAN_SCHEMA_KEY
from pagemeter_server.store.quota import Store
from tests.client.client_flavours import FLAVOURS, Connect, connector
from tests.system.cluster_topology import Cluster

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "rules", "grpc", "http", "client", "system")
# Fixtures that start or reach a Redis: no unit test may use one.
REDIS_FIXTURES = {"redis_server", "redis_sync", "redis_client", "store", "pagemeter_server"}


def tier_of(path: Path) -> str:
    """The tier of a test file under tests/: its folder's name."""
    parts = path.relative_to(TESTS).parts
    if len(parts) > 1 and parts[0] in TIERS:
        return parts[0]
    raise pytest.UsageError(
        f"{path} is in no test tier: move it into tests/<tier>/, one of {', '.join(TIERS)}"
    )


@pytest.hookimpl(tryfirst=True)  # before -m selects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        tier = tier_of(item.path)
        item.add_marker(tier)
        if tier == "unit" and REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} uses Redis: it belongs in tests/rules or above")


# Hypothesis: each property test names its examples for `make test` with
# examples(n); `make test-fast` loads this profile (--hypothesis-profile=fast)
# and runs a tenth of them, at least 10 (tests that name none run 10, not 100).
FAST_EXAMPLES_DIVISOR = 10
hypothesis.settings.register_profile("fast", max_examples=100 // FAST_EXAMPLES_DIVISOR)


def examples(full: int) -> int:
    """The examples a property test runs: `full`, or a tenth (at least 10) under the fast profile."""
    if hypothesis.settings.get_current_profile_name() == "fast":
        return min(full, max(10, full // FAST_EXAMPLES_DIVISOR))
    return full


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


# The stores the rule fixtures below (settings, redis_sync, redis_client, store,
# pagemeter_server) can stand on: the suite's Redis, or a Redis Cluster. A module
# whose tests must hold on both says `pytestmark = ON_EACH_BACKEND`; its tests
# then run once per backend, the cluster runs in the system tier.
BACKENDS = ["single", pytest.param("cluster", marks=pytest.mark.system)]
ON_EACH_BACKEND = [
    pytest.mark.usefixtures("backend"),
    pytest.mark.parametrize("backend", BACKENDS, indirect=True),
]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """ "single" (the suite's Redis), unless a module's ON_EACH_BACKEND asks for "cluster"."""
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisProcess]]:
    """The cluster backend: three primaries with one replica each, started for the
    first test that runs on it and kept for the session; yields the primaries."""
    topology = Cluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1)
    try:
        topology.start()
        yield topology.primary_nodes()
    finally:
        topology.stop()


class WholeCluster(redis.RedisCluster):
    """A cluster client whose KEYS looks at every primary, as the rule tests expect."""

    def keys(self, pattern: str = "*", **kwargs: object) -> list[str]:  # type: ignore[override]
        found: list[str] = []
        # redis-py lacks annotations here
        for node in self.get_primaries():  # type: ignore[no-untyped-call]
            found += self.execute_command(  # type: ignore[no-untyped-call]
                "KEYS", pattern, target_nodes=node
            )
        return found


@pytest.fixture
def redis_sync(
    backend: str, redis_server: RedisProcess, request: pytest.FixtureRequest
) -> Iterator[redis.Redis]:
    """A synchronous client on a freshly flushed database (every primary of the
    cluster backend flushed, its scripts kept)."""
    if backend == "cluster":
        primaries: list[RedisProcess] = request.getfixturevalue("redis_cluster")
        whole = WholeCluster(host="127.0.0.1", port=primaries[0].port, decode_responses=True)
        # The rule tests call only commands both clients have.
        client = cast(redis.Redis, whole)
    else:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(backend: str, redis_server: RedisProcess, request: pytest.FixtureRequest) -> Settings:
    """Open access on loopback: the rule tests call as an admin without credentials.

    Access control has its own tests (tests/grpc/test_access.py) with real credentials.
    """
    if backend == "cluster":
        primaries: list[RedisProcess] = request.getfixturevalue("redis_cluster")
        return Settings(
            redis_url=primaries[0].url,
            redis_mode="cluster",
            listen="127.0.0.1:0",
            metrics_listen="",
            dev_open_access=True,
        )
    return Settings(
        redis_url=redis_server.url, listen="127.0.0.1:0", metrics_listen="", dev_open_access=True
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
async def redis_client(
    redis_sync: redis.Redis, settings: Settings
) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(settings.redis_url, settings)
    yield client
    await client.aclose()


@pytest.fixture
async def plans_migrated(redis_client: aioredis.Redis) -> None:
    """The deployment's plans are in the current plan document (windows need it)."""
    await redis_client.set(PLAN_SCHEMA_KEY, "2")


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
    tracer_provider: TracerProvider | None = None,
) -> AsyncIterator[RunningServer]:
    """A real pagemeter gRPC server on 127.0.0.1:<free port>, reached over a channel
    with gRPC's default options (4 MiB messages), for the duration of the block."""
    server, port, parts = await create_server(
        settings,
        client,
        clock=clock,
        registry=registry if registry is not None else CollectorRegistry(),
        credentials=credentials,
        tracer_provider=tracer_provider,
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
        await channel.close(None)
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


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """Where the tracer_provider fixture's spans go, each as it ends."""
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(spans: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A tracer provider of the test's own (never the process's global one, which can
    be set once per process), exporting every span to `spans` as it ends."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield provider
    provider.shutdown()


@pytest.fixture
async def traced_server(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider,
) -> AsyncIterator[RunningServer]:
    """A real pagemeter gRPC server, on a flushed Redis, tracing with tracer_provider."""
    async with serving(
        settings, redis_client, clock, registry, tracer_provider=tracer_provider
    ) as running:
        yield running


@pytest.fixture(params=FLAVOURS)
def connect(request: pytest.FixtureRequest) -> Connect:
    """`connect(target, **options)`: an AsyncPagemeterClient, then a PagemeterClient
    behind the same async methods (tests/client/client_flavours.py)."""
    flavour = request.param
    return connector(flavour)


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields a google.rpc.BadRequest in an error's status names."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


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
    return TESTS.parent


async def exported_committed(
    registry: CollectorRegistry, org: str, metric: str = "pages"
) -> float | None:
    """The per-org exporter's committed units, read as a scrape would (its client is blocking)."""
    return await asyncio.to_thread(
        registry.get_sample_value,
        "pagemeter_org_committed_units",
        {"org": org, "metric": metric},
    )
