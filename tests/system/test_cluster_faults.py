"""Redis Cluster faults seen from outside: dead primaries, failovers and resharding
under concurrent holds and records, through two pagemeter-server processes.

The callers behave as the contract asks: a job is a hold (CheckQuota with
hold) and then its record (RecordUsage), each retried with the same request id
when answered UNAVAILABLE or DEADLINE_EXCEEDED. Any other answer is a broken
promise, and is collected rather than raised so that a test reports all of
them. The servers are real processes (uvloop, the health probe, flags), on a
real cluster started by the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pagemeter.v1 import quota_pb2, quota_pb2_grpc, reporting_pb2, reporting_pb2_grpc
from pagemeter_server.ops.embedded import RedisProcess, free_port
from server_process import running_servers
from tests.system.cluster_topology import FAILOVER, Cluster, running_cluster
from tests.system.failover_load import (
    Tally,
    answered,
    committed,
    no_broken_answers,
    preload,
    set_plans,
    start_jobs,
    stubs,
    until,
)

# Also the longest a call waits out a CLUSTERDOWN (the election after a primary
# dies, with cluster-require-full-coverage yes) before it is refused.
REDIS_TIMEOUT = 1.0


def orgs_by_primary(cluster: Cluster, per_primary: int = 2) -> dict[int, list[str]]:
    """Organization ids, `per_primary` of them on each primary (by port)."""
    found: dict[int, list[str]] = {node.port: [] for node in cluster.primary_nodes()}
    candidate = 0
    while any(len(orgs) < per_primary for orgs in found.values()):
        org = f"org-{candidate}"
        candidate += 1
        owner = cluster.owner_of(f"pm:{{{org}}}:plan").port
        if len(found[owner]) < per_primary:
            found[owner].append(org)
    return found


@contextlib.contextmanager
def pagemeter_servers(
    cluster: Cluster, tmp_path: Path, count: int = 2, metrics_port: int = 0
) -> Iterator[list[str]]:
    """`count` pagemeter-server processes on the cluster; yields their targets.
    The first serves Prometheus metrics on `metrics_port` when one is given.

    At the end each is stopped with SIGTERM and must exit 0 with no traceback.
    """
    common = [
        "--redis-mode",
        "cluster",
        "--redis-url",
        cluster.primary_nodes()[0].url,
        "--dev-open-access",
        "--redis-timeout",
        str(REDIS_TIMEOUT),
        "--health-interval",
        "0.2",
        "--org-exporter-max-orgs",
        "0",
        "--log-level",
        "WARNING",
    ]
    metrics = ["--metrics-listen", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    args = [common + (metrics if number == 0 else []) for number in range(count)]
    with running_servers(args, tmp_path) as targets:
        yield targets


async def health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of a pagemeter-server's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.samples and not family.samples[0].labels
    }


@pytest.fixture
def partial_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three primaries with a replica each; a cluster that keeps serving the slots
    it still covers when one primary is lost (cluster-require-full-coverage no)."""
    options = FAILOVER | {"extra_args": ["--cluster-require-full-coverage", "no"]}
    with running_cluster(tmp_path, **options) as topology:
        yield topology


async def test_a_dead_primary_refuses_only_the_organizations_of_its_slots(
    partial_cluster: Cluster, tmp_path: Path
) -> None:
    """A primary is killed and its replica frozen (no failover yet): through two pagemeter servers, every organization on the other primaries keeps being served with no refusal, the dead primary's organizations are refused UNAVAILABLE at once (never INTERNAL), health stays SERVING; when the replica takes over, they are served again."""
    cluster = partial_cluster
    by_primary = orgs_by_primary(cluster)
    victim_node = cluster.primary_nodes()[0]
    replica = cluster.replica_of(victim_node)
    victims = [Tally(org) for org in by_primary[victim_node.port]]
    bystanders = [
        Tally(org) for port, orgs in by_primary.items() if port != victim_node.port for org in orgs
    ]
    metrics_port = free_port()
    with pagemeter_servers(cluster, tmp_path, metrics_port=metrics_port) as targets:
        await set_plans(targets[0], [t.org for t in victims + bystanders])
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        victim_node.kill()
        stop = asyncio.Event()
        async with stubs(targets) as quotas:
            workers = start_jobs(quotas, victims + bystanders, stop)
            await asyncio.sleep(4.0)  # the probe's findings, and the node timeout, pass
            statuses = [await health(target) for target in targets]
            gauges = await asyncio.to_thread(scrape, metrics_port)
            stop.set()
            await asyncio.gather(*workers)
        no_broken_answers(victims + bystanders)
        assert all(tally.refused == 0 for tally in bystanders), [
            (tally.org, tally.refused, tally.refusal_reasons[:3]) for tally in bystanders
        ]
        assert all(len(tally.acked) > 20 for tally in bystanders)
        assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
        assert gauges["pagemeter_redis_primaries_down"] == 1
        assert gauges["pagemeter_redis_up"] == 1
        refusals = [seconds for tally in victims for seconds in tally.refusal_latencies]
        assert refusals and all(not tally.acked for tally in victims)
        assert statistics.median(refusals) < REDIS_TIMEOUT, "refused at once, not after a timeout"
        for tally in bystanders:
            assert await committed(targets[1], tally.org) == len(tally.acked), tally.org

        os.kill(replica.pid, signal.SIGCONT)  # it is elected in place of the dead primary
        comeback = [Tally(tally.org) for tally in victims]
        stop = asyncio.Event()
        async with stubs(targets) as quotas:
            workers = start_jobs(quotas, comeback, stop)
            try:
                await until(lambda: all(len(t.acked) >= 10 for t in comeback), "the takeover")
            finally:
                stop.set()
                await asyncio.gather(*workers)
        no_broken_answers(comeback)
        for tally in comeback:
            assert await committed(targets[0], tally.org) == len(tally.acked), tally.org


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three primaries with a replica each, cluster-node-timeout 1 s."""
    with running_cluster(tmp_path, **FAILOVER) as topology:
        yield topology


# Each run kills another primary (the first is the one --redis-url names).
FAILOVER_RUNS = 3


@pytest.mark.parametrize("run", range(FAILOVER_RUNS))
async def test_a_failover_under_concurrent_jobs_refuses_no_other_organization(
    cluster: Cluster, tmp_path: Path, run: int
) -> None:
    """A primary is killed with SIGKILL while two callers per organization hold and record through two pagemeter servers: its replica takes over, organizations on the other primaries see no refusal, nobody sees an answer other than UNAVAILABLE, and nothing is counted twice."""
    by_primary = orgs_by_primary(cluster)
    victim_node = cluster.primary_nodes()[run % 3]
    successor = cluster.replica_of(victim_node)
    victims = [Tally(org) for org in by_primary[victim_node.port]]
    bystanders = [
        Tally(org) for port, orgs in by_primary.items() if port != victim_node.port for org in orgs
    ]
    everyone = victims + bystanders
    with pagemeter_servers(cluster, tmp_path) as targets:
        await set_plans(targets[0], [t.org for t in everyone])
        stop = asyncio.Event()
        async with stubs(targets) as quotas:
            workers = start_jobs(quotas, everyone, stop)
            try:
                await until(lambda: all(len(t.acked) >= 20 for t in everyone), "load")
                victim_node.kill()
                killed_at = time.monotonic()
                before = {t.org: len(t.acked) for t in victims}
                await until(
                    lambda: all(len(t.acked) >= before[t.org] + 20 for t in victims),
                    "the replica's takeover",
                )
            finally:
                stop.set()
                await asyncio.gather(*workers)
        no_broken_answers(everyone)
        assert cluster.role(successor)["role"] == "master"
        assert [(t.org, t.refused) for t in bystanders] == [(t.org, 0) for t in bystanders], [
            t.refusal_reasons[:3] for t in bystanders
        ]
        for tally in bystanders:
            assert await committed(targets[1], tally.org) == len(tally.acked), tally.org
        lost = 0
        for tally in victims:
            kept = await committed(targets[1], tally.org)
            assert 0 <= len(tally.acked) - kept <= before[tally.org], "doubled, or lost too much"
            lost += len(tally.acked) - kept
    window = max(t.last_refusal for t in victims) - killed_at
    print(
        f"\ncluster failover run {run}: {sum(t.refused for t in victims)} refusals for the dead "
        f"primary's organizations over {window:.1f} s, {lost} acknowledged records lost; "
        "other organizations: "
        f"{sum(len(t.acked) for t in bystanders)} jobs, 0 refused"
    )


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


PRELOADED_JOBS = 2000  # keys of the busy organization's slot, moved with it
MOVES = 4


async def test_resharding_a_busy_slot_under_holds_and_records(tmp_path: Path) -> None:
    """The slot of a busy organization (over 2,000 keys) is moved between primaries four times, as `redis-cli --cluster reshard` moves it, while its holds and records are in flight through two pagemeter servers: no call is refused or answered other than OK (TRYAGAIN and ASK are waited out within the deadline), every job counts once, and the latency rise is measured."""
    with running_cluster(tmp_path, primaries=3, replicas=0, node_timeout_ms=5000) as topology:
        busy = Tally("busy")
        slot = topology.keyslot("pm:{busy}:plan")
        home = topology.owner_of("pm:{busy}:plan")
        away = next(node for node in topology.primary_nodes() if node is not home)
        neighbour_org = next(
            org
            for org in (f"org-{n}" for n in range(100))
            if topology.owner_of(f"pm:{{{org}}}:plan") is away
        )
        neighbour = Tally(neighbour_org)  # on the primary the slot moves to and from
        with pagemeter_servers(topology, tmp_path) as targets:
            await set_plans(targets[0], [busy.org, neighbour.org])
            await preload(targets[0], busy.org, PRELOADED_JOBS)
            stop = asyncio.Event()
            moves: list[tuple[float, float, int]] = []
            reads = Tally(busy.org)  # the reports of the busy organization, read meanwhile
            async with stubs(targets) as quotas:
                workers = start_jobs(quotas, [busy, neighbour], stop)
                workers.append(asyncio.create_task(read_reports(targets[1], reads, stop)))
                try:
                    await asyncio.sleep(2.0)  # the baseline
                    for number in range(MOVES):
                        source, target = (home, away) if number % 2 == 0 else (away, home)
                        started = time.monotonic()
                        keys = await asyncio.to_thread(topology.move_slot, slot, source, target)
                        moves.append((started, time.monotonic(), keys))
                        await asyncio.sleep(1.0)
                finally:
                    stop.set()
                    await asyncio.gather(*workers)
            no_broken_answers([busy, neighbour, reads])
            assert (busy.refused, neighbour.refused, reads.refused) == (0, 0, 0), (
                busy.refusal_reasons[:3],
                neighbour.refusal_reasons[:3],
                reads.refusal_reasons[:3],
            )
            assert len(reads.latencies) > 30, "the reports were read throughout"
            assert await committed(targets[1], busy.org) == PRELOADED_JOBS + len(busy.acked)
            assert await committed(targets[1], neighbour.org) == len(neighbour.acked)
        baseline = [s for started, s in busy.latencies if started < moves[0][0]]
        during = [
            s
            for started, s in busy.latencies
            if any(begin <= started <= end for begin, end, _ in moves)
        ]
        assert baseline and during
        print(
            f"\nreshard of a {moves[0][2]}-key slot, {MOVES} moves of "
            f"{min(end - begin for begin, end, _ in moves):.2f}-"
            f"{max(end - begin for begin, end, _ in moves):.2f} s: busy organization's calls "
            f"p50/p99/max {1000 * percentile(baseline, 0.5):.1f}/"
            f"{1000 * percentile(baseline, 0.99):.1f}/{1000 * max(baseline):.1f} ms before, "
            f"{1000 * percentile(during, 0.5):.1f}/{1000 * percentile(during, 0.99):.1f}/"
            f"{1000 * max(during):.1f} ms during the moves; {len(busy.acked)} jobs, "
            f"{len(neighbour.acked)} for the neighbour, 0 refused, 0 other errors"
        )


async def test_a_slot_migration_stalled_halfway_is_waited_out_until_the_deadline(
    tmp_path: Path,
) -> None:
    """A slot left half moved (some of an organization's keys on each node, as when a reshard stops midway): a hold is waited out until the caller's deadline and then answered UNAVAILABLE (never INTERNAL, never later than the deadline), a call without a deadline gives up after --redis-timeout, nothing is held; once the move is finished the same hold is placed."""
    with running_cluster(tmp_path, primaries=3, replicas=0, node_timeout_ms=5000) as topology:
        slot = topology.keyslot("pm:{acme}:plan")
        home = topology.owner_of("pm:{acme}:plan")
        away = next(node for node in topology.primary_nodes() if node is not home)
        with pagemeter_servers(topology, tmp_path, count=1) as (target,):
            await set_plans(target, ["acme"])
            await preload(target, "acme", 20)
            await asyncio.to_thread(half_move, topology, slot, home, away)
            async with grpc.aio.insecure_channel(target) as channel:
                quota = quota_pb2_grpc.QuotaServiceStub(channel)
                hold = quota_pb2.CheckQuotaRequest(
                    org_id="acme", request_id="job", units={"pages": 1}, hold=True
                )
                timings = []
                for deadline in (1.5, None):
                    started = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await quota.CheckQuota(hold, timeout=deadline)
                    timings.append(time.monotonic() - started)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                assert 1.0 < timings[0] < 1.6, "waited until the caller's deadline, not beyond"
                assert REDIS_TIMEOUT / 2 < timings[1] < REDIS_TIMEOUT + 0.2, "--redis-timeout"
                await asyncio.to_thread(topology.move_slot, slot, home, away)
                placed = await quota.CheckQuota(hold, timeout=5)
                assert placed.held and not placed.duplicate, "the refused holds held nothing"
            assert await committed(target, "acme") == 20


async def read_reports(target: str, tally: Tally, stop: asyncio.Event) -> None:
    """GetUsage, GetUsageHistory and ListUsageRecords of one organization, in turn,
    until stopped (the reports' reads are pipelines, not scripts)."""
    async with grpc.aio.insecure_channel(target) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        reporting = reporting_pb2_grpc.ReportingServiceStub(channel)
        while not stop.is_set():
            for call in (
                quota.GetUsage(quota_pb2.GetUsageRequest(org_id=tally.org), timeout=3),
                reporting.GetUsageHistory(
                    reporting_pb2.GetUsageHistoryRequest(org_id=tally.org, months=3), timeout=3
                ),
                reporting.ListUsageRecords(
                    reporting_pb2.ListUsageRecordsRequest(org_id=tally.org, page_size=50),
                    timeout=3,
                ),
            ):
                await answered(tally, call)
            await asyncio.sleep(0.02)


def half_move(topology: Cluster, slot: int, source: RedisProcess, target: RedisProcess) -> None:
    """Start moving a slot and stop halfway: its plan moved, its other keys not."""
    with (
        redis.Redis(port=source.port, decode_responses=True) as src,
        redis.Redis(port=target.port, decode_responses=True) as dst,
    ):
        dst.execute_command(
            "CLUSTER SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER MYID")
        )
        src.execute_command(
            "CLUSTER SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER MYID")
        )
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "pm:{acme}:plan", 0, 5000)
