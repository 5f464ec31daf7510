"""pagemeter behind Redis Sentinel: the primary is killed mid-load, a replica is
promoted, and pagemeter carries on by itself.

The topology runs on loopback from the binary the project installs: a primary, a
replica, and three sentinels (quorum 2). Redis replicates asynchronously, so a
failover can lose the writes the old primary acknowledged but had not yet sent
to the replica; the test measures how many and prints the figure.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from redis.sentinel import Sentinel

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.app import close_redis, connect_redis, create_server
from pagemeter_server.embedded import RedisProcess, find_redis_server, free_port
from pagemeter_server.settings import Settings

MASTER = "pagemeter"


@dataclass
class Topology:
    primary: RedisProcess
    replica: RedisProcess
    sentinels: list[tuple[subprocess.Popen[bytes], int]]

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for _, port in self.sentinels)

    def current_primary_port(self) -> int:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [("127.0.0.1", port) for _, port in self.sentinels], socket_timeout=0.5
        )
        try:
            host_port: tuple[str, int] = sentinel.discover_master(MASTER)  # type: ignore[no-untyped-call]
            return int(host_port[1])
        finally:
            for connection in sentinel.sentinels:
                connection.close()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    primary = RedisProcess(tmp_path / "primary")
    primary.start()
    replica = RedisProcess(
        tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]
    )
    replica.start()
    sentinels: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for i in range(3):
            port = free_port()
            folder = tmp_path / f"sentinel{i}"
            folder.mkdir()
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 3000\n"
            )
            process = subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            sentinels.append((process, port))
        topology = Topology(primary, replica, sentinels)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert topology.current_primary_port() == primary.port
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield topology
    finally:
        for process, _ in sentinels:
            process.kill()
            process.wait()
        replica.stop()
        primary.stop()


async def test_failover_mid_load_pagemeter_carries_on(topology: Topology) -> None:
    """Records flow through a SIGKILL of the primary: after the replica's promotion they are accepted again without any restart, and the acknowledged records the failover lost are counted (asynchronous replication)."""
    settings = Settings(
        redis_mode="sentinel",
        sentinels=topology.addresses,
        sentinel_master=MASTER,
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
        redis_timeout_seconds=0.5,
        org_exporter_max_orgs=0,
    )
    client = connect_redis("", settings)
    server, port, _ = await create_server(settings, client, registry=CollectorRegistry())
    await server.start()
    acked: dict[str, int] = {}
    refused = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                admin_pb2.SetPlanRequest(
                    plan=plan_pb2.Plan(
                        org_id="acme",
                        name="HA",
                        timezone="UTC",
                        metrics=[plan_pb2.MetricLimits(metric="pages", overage_allowed=True)],
                    )
                )
            )
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            killed_at = None
            promoted_at = None
            n = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                n += 1
                request_id = f"job-{n}"
                try:
                    await quota.RecordUsage(
                        quota_pb2.RecordUsageRequest(
                            org_id="acme", request_id=request_id, units={"pages": 1}
                        ),
                        timeout=2,
                    )
                    acked[request_id] = 1
                    if promoted_at is None and killed_at is not None:
                        promoted_at = time.monotonic()
                except grpc.aio.AioRpcError as error:
                    retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    if error.code() not in retryable:
                        raise AssertionError(f"{request_id}: {error}") from error
                    refused += 1
                    await asyncio.sleep(0.05)
                if n == 200 and killed_at is None:
                    topology.primary.kill()  # SIGKILL, mid-load
                    killed_at = time.monotonic()
                if promoted_at is not None and len(acked) >= 400:
                    break
            assert killed_at is not None
            assert promoted_at is not None, "no record was accepted after the failover"
            assert topology.current_primary_port() == topology.replica.port
            usage = await quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
            committed = {m.metric: m.committed for m in usage.metrics}["pages"]
    finally:
        await server.stop(None)
        await close_redis(client)
    lost = len(acked) - committed
    print(
        f"\nsentinel failover: {len(acked)} records acknowledged, {refused} calls refused "
        f"during {promoted_at - killed_at:.1f} s without a primary, {lost} acknowledged "
        "records lost by the asynchronous replica"
    )
    assert 0 <= lost <= 200, "more lost than were written before the kill"
    assert committed <= len(acked), "a record was counted twice"
