"""A primary of a Redis Cluster dies mid-load: its replica is promoted and pagemeter carries on.

Six nodes on loopback (three primaries, one replica each, cluster-node-timeout
1 s). Concurrent workers record usage for an organization whose primary is
killed with SIGKILL, and for one whose primary stays up. The redis-py cluster
client learns the new owner of the slot by itself; no server restarts.

Redis replicates asynchronously, so records the dead primary acknowledged but
had not yet sent to its replica are lost. The test measures how many, and then
shows what a caller's replay of its acknowledged request ids repairs: every lost
record counts again, every kept one answers as a duplicate, and the totals end
exactly equal to the acknowledged records.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.app import create_server
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.system.cluster_topology import FAILOVER, Cluster, running_cluster
from tests.system.failover_load import RETRYABLE, Ledger, committed_pages, record, until, worker

VICTIM = "acme"  # its primary is killed
BYSTANDER = "hooli"  # slot 4703: on another primary than acme (11304)
WORKERS = 6
STALL_TIMEOUT = 0.3  # seconds; far below the 1 s node timeout


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three primaries with a replica each, cluster-node-timeout 1 s."""
    with running_cluster(tmp_path, **FAILOVER) as topology:
        yield topology


@pytest.fixture
async def quota(cluster: Cluster) -> AsyncIterator[quota_pb2_grpc.QuotaServiceAsyncStub]:
    settings = Settings(
        redis_url=cluster.primary_nodes()[0].url,
        redis_mode="cluster",
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
        redis_timeout_seconds=STALL_TIMEOUT,
        org_exporter_max_orgs=0,
    )
    client = connect_redis(settings.redis_url, settings)
    server, port, _ = await create_server(settings, client, registry=CollectorRegistry())
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for org in (VICTIM, BYSTANDER):
            await admin.SetPlan(
                admin_pb2.SetPlanRequest(
                    plan=plan_pb2.Plan(
                        org_id=org,
                        name="HA",
                        timezone="UTC",
                        metrics=[plan_pb2.MetricLimits(metric="pages", overage_allowed=True)],
                    )
                )
            )
        yield quota_pb2_grpc.QuotaServiceStub(channel)
    await server.stop(None)
    await client.aclose()


async def test_a_primary_dies_mid_load_and_its_replica_takes_over(
    cluster: Cluster, quota: quota_pb2_grpc.QuotaServiceAsyncStub
) -> None:
    """SIGKILL of the primary serving an organization: after the replica's promotion records are accepted again, nothing is counted twice, the other organization keeps every record, and replaying the acknowledged ids makes the totals exact."""
    victim_primary = cluster.owner_of(f"pm:{{{VICTIM}}}:plan")
    bystander_primary = cluster.owner_of(f"pm:{{{BYSTANDER}}}:plan")
    assert victim_primary is not bystander_primary, "pick orgs on different primaries"
    successor = cluster.replica_of(victim_primary)
    victim, bystander = Ledger(VICTIM), Ledger(BYSTANDER)
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(worker(quota, ledger, number, stop))
        for ledger in (victim, bystander)
        for number in range(WORKERS // 2)
    ]
    try:
        await until(lambda: len(victim.acked) >= 150, "load before the kill")
        victim_primary.kill()  # SIGKILL, mid-load
        killed_at = time.monotonic()
        victim.acked_before_kill = len(victim.acked)
        await until(lambda: len(victim.acked) >= victim.acked_before_kill + 150, "after failover")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    recovered_at = time.monotonic()
    assert cluster.role(successor)["role"] == "master", "the replica was promoted"
    assert cluster.owner_of(f"pm:{{{VICTIM}}}:plan") is successor

    kept = await committed_pages(quota, VICTIM)
    lost = len(victim.acked) - kept
    assert 0 <= lost <= victim.acked_before_kill, "lost more than the old primary acknowledged"
    assert await committed_pages(quota, BYSTANDER) == len(bystander.acked), (
        "the organization whose primary stayed up lost or doubled a record"
    )

    replayed_as_new = [
        request_id for request_id in sorted(victim.acked) if await record(quota, VICTIM, request_id)
    ]
    assert len(replayed_as_new) == lost, "each lost record, and only those, counted again"
    assert await committed_pages(quota, VICTIM) == len(victim.acked)

    outage = (victim.last_refusal or killed_at) - killed_at
    print(
        f"\ncluster failover: {len(victim.acked)} records acknowledged for the killed "
        f"primary's org by {WORKERS // 2} workers, {victim.refused} calls refused over "
        f"{outage:.1f} s, {lost} acknowledged records lost by the asynchronous replica "
        f"(restored by replay); other org: {len(bystander.acked)} acknowledged, "
        f"{bystander.refused} refused, 0 lost; test {recovered_at - killed_at:.1f} s after kill"
    )


BALLAST_MB = 48  # more than loopback's TCP buffers hold (tcp_rmem max 32 MB here)


def fill_the_replication_link(primary: RedisProcess) -> None:
    """Write ballast until the frozen replica's socket buffers are full.

    Without it the kernel would buffer the records for the frozen replica and
    hand them over when it wakes; with it they wait in the primary's own output
    buffer, which dies with the primary, as on a slow network link.
    """
    with redis.Redis(host="127.0.0.1", port=primary.port) as client:
        for n in range(BALLAST_MB):
            client.set(f"ballast:{{{VICTIM}}}:{n}", b"x" * 1_000_000)


def replicated(primary: RedisProcess, replica: RedisProcess, cluster: Cluster) -> bool:
    """True when the replica has applied everything the primary wrote."""
    sent = int(str(cluster.role(primary)["master_repl_offset"]))
    return int(str(cluster.role(replica)["slave_repl_offset"])) == sent


async def test_records_a_lagging_replica_never_received_are_lost_until_replayed(
    cluster: Cluster, quota: quota_pb2_grpc.QuotaServiceAsyncStub
) -> None:
    """The worst case made visible: the replica is frozen while its primary acknowledges 30 records, then the primary dies; the promoted replica never saw those 30, and a replay of the callers' acknowledged ids counts each of them once again, and the others not at all."""
    primary = cluster.owner_of(f"pm:{{{VICTIM}}}:plan")
    successor = cluster.replica_of(primary)
    assert successor.pid is not None
    seen = [f"seen-{n}" for n in range(20)]
    unseen = [f"unseen-{n}" for n in range(30)]
    for request_id in seen:
        assert await record(quota, VICTIM, request_id)
    await until(lambda: replicated(primary, successor, cluster), "the replica to catch up")
    os.kill(successor.pid, signal.SIGSTOP)
    try:
        fill_the_replication_link(primary)
        for request_id in unseen:
            assert await record(quota, VICTIM, request_id)
        primary.kill()
    finally:
        os.kill(successor.pid, signal.SIGCONT)
    await until(lambda: cluster.owner_of(f"pm:{{{VICTIM}}}:plan") is successor, "promotion")

    async def kept() -> int:
        while True:
            try:
                return await committed_pages(quota, VICTIM)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(0.05)

    assert await kept() == len(seen), "the promoted replica has exactly what it received"
    replayed_as_new = [
        request_id for request_id in seen + unseen if await record(quota, VICTIM, request_id)
    ]
    assert replayed_as_new == unseen
    assert await kept() == len(seen) + len(unseen)


async def test_a_stalled_primary_fails_a_call_fast(
    cluster: Cluster, quota: quota_pb2_grpc.QuotaServiceAsyncStub
) -> None:
    """A primary that stops answering (SIGSTOP, shorter than the node timeout, so no failover) costs a call one Redis timeout, not one per retry: UNAVAILABLE in well under the four timeouts redis-py's cluster client would wait by default, and the next call after it resumes succeeds."""
    primary = cluster.owner_of(f"pm:{{{VICTIM}}}:plan")
    assert primary.pid is not None
    request = quota_pb2.CheckQuotaRequest(org_id=VICTIM, units={"pages": 1})
    assert (await quota.CheckQuota(request, timeout=5)).allowed
    os.kill(primary.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await quota.CheckQuota(request, timeout=5)
        waited = time.monotonic() - began
    finally:
        os.kill(primary.pid, signal.SIGCONT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert waited < 2 * STALL_TIMEOUT, f"waited {waited:.2f} s for a {STALL_TIMEOUT} s timeout"
    assert (await quota.CheckQuota(request, timeout=5)).allowed
