"""--replica-acks: an acknowledgement that means "on the replicas too".

Redis replicates asynchronously, so a failover can lose a change the old
primary acknowledged (docs/scaling.md). With --replica-acks N pagemeter sends
WAIT N after every changing script, on the same connection, and answers
UNAVAILABLE when fewer replicas confirm in time; the caller retries with the
same request id. These tests run real topologies: a primary with a replica,
three sentinels, and a cluster; the replica is frozen (SIGSTOP) with its link
filled, so that a write can reach the primary and not the replica — the case a
failover turns into a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.app import create_server
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import close_redis, connect_redis
from tests.system.cluster_topology import FAILOVER, Cluster, running_cluster
from tests.system.failover_load import Ledger, committed_pages, record, until, worker
from tests.system.test_sentinel import MASTER, Topology, running_topology, synchronised

ACK_TIMEOUT = 0.3
REDIS_TIMEOUT = 1.0
BALLAST_MB = 48  # more than loopback's TCP buffers hold: the link is really full


def settings_for(mode: str, acks: int, **fields: object) -> Settings:
    return Settings(
        redis_mode=mode,
        listen="127.0.0.1:0",
        metrics_listen="",
        dev_open_access=True,
        redis_timeout_seconds=REDIS_TIMEOUT,
        replica_acks=acks,
        replica_ack_timeout_seconds=ACK_TIMEOUT,
        org_exporter_max_orgs=0,
        **fields,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def pagemeter(
    settings: Settings, url: str = "", *, plan: bool = True
) -> AsyncIterator[quota_pb2_grpc.QuotaServiceAsyncStub]:
    client = connect_redis(url, settings)
    server, port, _ = await create_server(settings, client, registry=CollectorRegistry())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            if plan:
                await admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                    admin_pb2.SetPlanRequest(
                        plan=plan_pb2.Plan(
                            org_id="acme",
                            name="HA",
                            timezone="UTC",
                            metrics=[plan_pb2.MetricLimits(metric="pages", overage_allowed=True)],
                        )
                    ),
                    timeout=10,
                )
            yield quota_pb2_grpc.QuotaServiceStub(channel)
    finally:
        await server.stop(None)
        await close_redis(client)


async def outcome(quota: quota_pb2_grpc.QuotaServiceAsyncStub, request_id: str) -> str:
    """'new', 'duplicate', or the status code's name of a refusal."""
    try:
        return "new" if await record(quota, "acme", request_id) else "duplicate"
    except grpc.aio.AioRpcError as error:
        return error.code().name


def fill_the_link(port: int, password: str | None = None) -> None:
    """Ballast until a frozen replica's socket buffers are full, so that what the
    primary writes next waits in the primary's own memory and dies with it."""
    with redis.Redis(host="127.0.0.1", port=port, password=password) as client:
        for n in range(BALLAST_MB):
            client.set(f"ballast:{{acme}}:{n}", b"x" * 1_000_000)


@contextlib.contextmanager
def frozen(process: RedisProcess) -> Iterator[None]:
    assert process.pid is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


@dataclass
class Pair:
    """A sentinel topology with a second replica: the deployment --replica-acks 1
    asks for, since after a failover the promoted primary still has a replica."""

    topology: Topology
    spare: RedisProcess

    @property
    def replicas(self) -> list[RedisProcess]:
        return [self.topology.replica, self.spare]


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    with running_topology(tmp_path) as running:
        yield running


@pytest.fixture
def two_replicas(topology: Topology, tmp_path: Path) -> Iterator[Pair]:
    spare = RedisProcess(
        tmp_path / "spare", extra_args=["--replicaof", "127.0.0.1", str(topology.primary.port)]
    )
    spare.start()
    try:
        deadline = time.monotonic() + 20
        while not is_synchronised_replica(spare):
            assert time.monotonic() < deadline, "the second replica never synchronised"
            time.sleep(0.1)
        yield Pair(topology, spare)
    finally:
        spare.stop()


async def eventually(quota: quota_pb2_grpc.QuotaServiceAsyncStub, request_id: str) -> str:
    """Retry a record as a worker does until it is answered; its answer."""
    deadline = time.monotonic() + 30
    while (answer := await outcome(quota, request_id)) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert time.monotonic() < deadline, f"{request_id} never answered"
        await asyncio.sleep(0.1)
    return answer


@pytest.mark.parametrize("acks", [0, 1], ids=["acks-off", "acks-on"])
async def test_a_lagging_replica_promoted_by_sentinel(two_replicas: Pair, acks: int) -> None:
    """The replicas are frozen with their links full while records arrive, then the primary dies and a replica is promoted. Without --replica-acks the primary acknowledged all 10 and the failover lost all 10 (the documented window); with --replica-acks 1 none was acknowledged (UNAVAILABLE after the ack timeout), so none acknowledged is lost, and each caller's retry with its id records it once."""
    topology = two_replicas.topology
    settings = settings_for("sentinel", acks, sentinels=topology.addresses, sentinel_master=MASTER)
    async with pagemeter(settings) as quota:
        for n in range(5):
            assert await outcome(quota, f"before-{n}") == "new"
        for replica in two_replicas.replicas:
            await until(lambda r=replica: synchronised(r), "the replicas to catch up")  # type: ignore[misc]
        unseen = [f"unseen-{n}" for n in range(10)]
        with frozen(topology.replica), frozen(two_replicas.spare):
            fill_the_link(topology.primary.port)
            answers = [await outcome(quota, request_id) for request_id in unseen]
            topology.primary.kill()
        await until(lambda: promoted(topology), "promotion")
        kept = await eventually_committed(quota)
        acknowledged = 5 + answers.count("new")
        retried = [await eventually(quota, request_id) for request_id in unseen]
        final = await committed_pages(quota, "acme")
    if acks:
        assert answers == ["UNAVAILABLE"] * 10, "nothing the replica lacks is acknowledged"
        assert kept == acknowledged == 5, "no acknowledged record was lost"
    else:
        assert answers == ["new"] * 10, "the primary alone acknowledged them"
        assert (acknowledged, kept) == (15, 5), "the failover lost the 10 acknowledged records"
    assert retried == ["new"] * 10, "the promoted replica never had them: the retry counts each"
    assert final == 15


def promoted(topology: Topology) -> bool:
    """The sentinels name a replica as the primary (False while they name none)."""
    try:
        return topology.current_primary_port() != topology.primary.port
    except redis.RedisError:
        return False


async def rejoin_as_replica(node: RedisProcess) -> None:
    """Restart a killed primary; the sentinels (or the cluster) make it a replica
    of the promoted one, which then has a replica to confirm changes again."""
    await asyncio.to_thread(node.start)
    await until(lambda: is_synchronised_replica(node), "the old primary to rejoin as a replica")


def is_synchronised_replica(node: RedisProcess) -> bool:
    try:
        return synchronised(node)
    except (redis.RedisError, KeyError):
        return False  # still a primary, or loading


async def eventually_committed(quota: quota_pb2_grpc.QuotaServiceAsyncStub) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            return await committed_pages(quota, "acme")
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


SENTINEL_RUNS = 3
WORKERS = 4


@pytest.mark.parametrize("run", range(SENTINEL_RUNS))
async def test_with_replica_acks_a_failover_under_load_loses_no_acknowledged_record(
    two_replicas: Pair, run: int
) -> None:
    """Four workers record through a SIGKILL of the primary with --replica-acks 1 and two replicas: after the promotion (the other replica follows the new primary) every record a worker was told about is there, without any replay, and none counts twice."""
    topology = two_replicas.topology
    ledger = Ledger("acme")
    settings = settings_for("sentinel", 1, sentinels=topology.addresses, sentinel_master=MASTER)
    async with pagemeter(settings) as quota:
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(quota, ledger, n, stop)) for n in range(WORKERS)]
        try:
            await until(lambda: len(ledger.acked) >= 100, "load before the kill")
            topology.primary.kill()
            killed_at = time.monotonic()
            before = len(ledger.acked)
            await until(lambda: len(ledger.acked) >= before + 100, "after the failover")
        finally:
            stop.set()
            await asyncio.gather(*workers)
        kept = await committed_pages(quota, "acme")
    outage = (ledger.last_refusal or killed_at) - killed_at
    print(
        f"\nsentinel failover with --replica-acks 1, run {run}: {len(ledger.acked)} records "
        f"acknowledged, {ledger.refused} refusals over {outage:.1f} s, "
        f"{len(ledger.acked) - kept} acknowledged records lost"
    )
    assert kept == len(ledger.acked), "every acknowledged record survived the failover"


async def test_a_retry_is_confirmed_only_once_the_replica_has_the_change(
    topology: Topology,
) -> None:
    """A record answered UNAVAILABLE because the replica did not confirm it is on the primary; its retry with the same id is a duplicate, and is acknowledged only once the replica has it (a duplicate answer confirms the original too)."""
    settings = settings_for("sentinel", 1, sentinels=topology.addresses, sentinel_master=MASTER)
    async with pagemeter(settings) as quota:
        assert await outcome(quota, "first") == "new"
        with frozen(topology.replica):
            fill_the_link(topology.primary.port)
            assert await outcome(quota, "job") == "UNAVAILABLE"
            assert await outcome(quota, "job") == "UNAVAILABLE", "still not on the replica"
        assert await eventually(quota, "job") == "duplicate"
        await until(lambda: synchronised(topology.replica), "the replica to catch up")
        with redis.Redis(host="127.0.0.1", port=topology.replica.port) as replica:
            assert replica.exists("pm:{acme}:r:job")


async def test_a_hold_is_confirmed_too_and_a_plain_check_does_not_wait(
    topology: Topology,
) -> None:
    """With the replica frozen, a hold (a change) is answered UNAVAILABLE, while a check without a hold (which changes nothing a caller is told was kept) is answered at once."""
    settings = settings_for("sentinel", 1, sentinels=topology.addresses, sentinel_master=MASTER)
    async with pagemeter(settings) as quota:
        with frozen(topology.replica):
            fill_the_link(topology.primary.port)
            started = time.monotonic()
            plain = await quota.CheckQuota(
                quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}), timeout=5
            )
            plain_seconds = time.monotonic() - started
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await quota.CheckQuota(
                    quota_pb2.CheckQuotaRequest(
                        org_id="acme", request_id="job", units={"pages": 1}, hold=True
                    ),
                    timeout=5,
                )
    assert plain.allowed and plain_seconds < ACK_TIMEOUT
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "replicas" in (refused.value.details() or "")


async def test_without_any_replica_every_change_is_refused(tmp_path: Path) -> None:
    """--replica-acks 1 on a Redis that has no replica: a record is answered UNAVAILABLE with a message naming the replicas, and reads still work."""
    alone = RedisProcess(tmp_path / "alone")
    alone.start()
    try:
        async with pagemeter(settings_for("single", 0), alone.url) as quota:
            assert await outcome(quota, "set-up") == "new"  # a plan and a record, unconfirmed
        async with pagemeter(settings_for("single", 1), alone.url, plan=False) as quota:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await record(quota, "acme", "job")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "confirmed by 0 of the 1 required replicas" in (refused.value.details() or "")
            assert await committed_pages(quota, "acme") == 2  # set-up, and the unconfirmed job
    finally:
        alone.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three primaries with a replica each, cluster-node-timeout 1 s."""
    with running_cluster(tmp_path, **FAILOVER) as topology:
        yield topology


async def test_in_a_cluster_a_lagging_replica_loses_no_acknowledged_record(
    cluster: Cluster,
) -> None:
    """Cluster mode, --replica-acks 1: the organization's replica is frozen with its link full while records arrive; none is acknowledged; the primary dies, the replica is promoted, and the callers' retries record each exactly once; records before and after are confirmed normally."""
    url = cluster.primary_nodes()[0].url
    async with pagemeter(settings_for("cluster", 1, redis_url=url), url) as quota:
        primary = cluster.owner_of("pm:{acme}:plan")
        successor = cluster.replica_of(primary)
        for n in range(5):
            assert await outcome(quota, f"before-{n}") == "new"
        unseen = [f"unseen-{n}" for n in range(5)]
        with frozen(successor):
            fill_the_link(primary.port)
            answers = [await outcome(quota, request_id) for request_id in unseen]
            primary.kill()
        await until(lambda: cluster.owner_of("pm:{acme}:plan") is successor, "promotion")
        assert answers == ["UNAVAILABLE"] * 5
        assert await eventually_committed(quota) == 5
        await rejoin_as_replica(primary)
        assert [await eventually(quota, request_id) for request_id in unseen] == ["new"] * 5
        assert await committed_pages(quota, "acme") == 10
