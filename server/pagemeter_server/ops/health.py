"""grpc.health.v1 that follows Redis: SERVING while the store answers, keeps an
append-only file (or the operator accepted one that does not) and the server is
not draining; NOT_SERVING otherwise.

In a Redis Cluster "the store answers" means at least one primary does: one
dead primary stops only the organizations of its slots, on every pagemeter
replica alike, so taking replicas out of a load balancer would refuse every
other organization too. The probe asks each primary on its own and keeps the
set of those that did not answer; the store's fast-fail gate (`allows`) then
refuses at once only calls whose organization's slot one of them owns, and the
client re-reads the slot map so that a promoted replica is used as soon as the
cluster has elected it.

A background probe asks Redis for its TIME and its persistence settings twice
per --health-interval, each probe bounded by half the interval, so that a
stalled or stopped Redis turns health NOT_SERVING within one interval; load
balancers then stop sending work to the replica, and send it again when the
store comes back. Once draining starts (SIGTERM), the status stays NOT_SERVING
whatever the probe says.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from redis.asyncio.cluster import ClusterNode, RedisCluster

from pagemeter_server.domain.clock import RedisClock
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.store.faults import closed_under_call

log = logging.getLogger("pagemeter.health")


async def volatile_nodes(client: aioredis.Redis) -> list[str]:
    """The store's servers that keep no append-only file ("" names a single server).

    Read with INFO, which managed Redis services allow where CONFIG is refused.
    A cluster is asked on every primary: one without persistence loses the
    organizations of its slots at its next restart.
    """
    store: Any = client  # connect_redis may hand over a RedisCluster as a Redis
    if isinstance(store, RedisCluster):
        replies: Any = await store.info("persistence", target_nodes=RedisCluster.PRIMARIES)
        return sorted(
            str(node) for node, info in replies.items() if str(info.get("aof_enabled")) != "1"
        )
    info = await client.info("persistence")
    return [] if str(info.get("aof_enabled")) == "1" else [""]


@dataclasses.dataclass(frozen=True)
class NodeAnswer:
    """One cluster primary's answer to the probe."""

    time: tuple[int, int, int, int]  # Redis seconds, microseconds; sent and received (ns)
    append_only: bool


async def _probe_node(node: ClusterNode, within: float | None) -> NodeAnswer:
    """TIME and INFO persistence of one primary, tried twice within `within`: during
    a failover the cluster client closes every node's connections from other
    tasks (after a CLUSTERDOWN, on a slot-map refresh), which breaks a probe of
    a live node; the second try opens a fresh connection."""
    async with asyncio.timeout(within):
        try:
            return await _ask_node(node)
        except (redis.exceptions.ConnectionError, RuntimeError, AttributeError) as error:
            broken = isinstance(error, redis.exceptions.ConnectionError)
            if not (broken or closed_under_call(error)):
                raise
            return await _ask_node(node)  # on a fresh connection


async def _ask_node(node: ClusterNode) -> NodeAnswer:
    sent = time.time_ns()
    seconds, micros = await node.execute_command("TIME")
    received = time.time_ns()
    info: Any = await node.execute_command("INFO", "persistence")
    return NodeAnswer(
        (int(seconds), int(micros), sent, received), str(info.get("aof_enabled")) == "1"
    )


async def _reread_slot_map(cluster: RedisCluster, within: float | None) -> None:
    """Ask the live nodes who owns each slot now, so that a replica the cluster
    promoted in place of a dead primary is used at once. (The client would
    otherwise re-read the map only after a failed call, and the gate lets no
    call through to a node it found down.)"""
    try:
        async with asyncio.timeout(within):
            await cluster.nodes_manager.initialize()
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as error:
        log.debug("could not re-read the cluster's slot map: %r", error)


class HealthReporter:
    def __init__(
        self,
        servicer: AsyncHealthServicer,
        metrics: ServiceMetrics,
        services: Sequence[str],
        clock: RedisClock | None = None,
        *,
        allow_volatile_store: bool = False,
    ) -> None:
        self.clock = clock
        self._redis_ok = True
        self.servicer = servicer
        self.metrics = metrics
        self.services = ("", *services)
        self.draining = False
        self.serving: bool | None = None
        # Whether the store keeps an append-only file: None until a probe read it.
        self.persistent: bool | None = None
        self.allow_volatile_store = allow_volatile_store
        # Cleared to end watch(): see watching() for why a cancel is not enough.
        self.watching = False
        # Cluster mode: the client, and the names ("host:port") of the primaries
        # the last probe could not reach.
        self._cluster: Any = None
        self.down_nodes: frozenset[str] = frozenset()
        self._failed_last: frozenset[str] = frozenset()

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.services:
            await self.servicer.set(name, status)
        self.metrics.serving.set(1 if serving else 0)
        if serving != self.serving and self.serving is not None:
            log.warning("health is now %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving

    @property
    def redis_ok(self) -> bool:
        """Whether the last probe found Redis answering (True before any probe)."""
        return self._redis_ok

    def allows(self, keys: Sequence[str]) -> bool:
        """Whether a call on these keys may go to the store now (the fast-fail gate)."""
        if not self._redis_ok:
            return False
        if not self.down_nodes or not keys or self._cluster is None:
            return True
        try:
            node = self._cluster.get_node_from_key(keys[0])
        except redis.exceptions.RedisClusterException:
            return True  # no slot map this moment: the client re-reads it on the call
        return node is None or node.name not in self.down_nodes

    async def probe(self, client: aioredis.Redis, within: float | None = None) -> bool:
        """One TIME call (it also sets the Redis clock) and one INFO persistence.

        `within` (seconds) bounds the whole probe (the client's own timeouts bound each
        call too), so that a stalled Redis is found within the probe's period.
        """
        store: Any = client  # connect_redis may hand over a RedisCluster as a Redis
        if isinstance(store, RedisCluster):
            return await self._probe_cluster(store, within)
        try:
            async with asyncio.timeout(within):
                sent = time.time_ns()
                seconds, micros = await client.time()
                if self.clock is not None:
                    self.clock.sync(int(seconds), int(micros), sent, time.time_ns())
                volatile = await volatile_nodes(client)
            ok = True
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            ok = False
        self._redis_ok = ok
        self.metrics.redis_up.set(1 if ok else 0)
        if ok:
            self._note_persistence(volatile)
        return ok

    async def _probe_cluster(self, cluster: RedisCluster, within: float | None) -> bool:
        """Each primary on its own: TIME and INFO persistence, bounded by `within`."""
        self._cluster = cluster
        try:
            async with asyncio.timeout(within):
                await cluster.initialize()  # learns the slot map once (a no-op after)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError):
            pass  # no node answered: every primary below counts as down
        primaries = cluster.get_primaries()
        answers = await asyncio.gather(
            *(_probe_node(node, within) for node in primaries), return_exceptions=True
        )
        failed = frozenset(
            node.name
            for node, answer in zip(primaries, answers, strict=True)
            if isinstance(answer, BaseException)
        )
        # Down means two probes in a row (half a health interval apart): a live
        # primary slowed by a failover elsewhere must not have its organizations
        # refused; a dead one refuses connections at once anyway, and a stalled
        # one is found within the interval and a half.
        down = failed & self._failed_last
        self._failed_last = failed
        up = [
            (node, answer)
            for node, answer in zip(primaries, answers, strict=True)
            if not isinstance(answer, BaseException)
        ]
        if up and self.clock is not None:
            self.clock.sync(*up[0][1].time)
        ok = bool(primaries) and len(down) < len(primaries)
        if down != self.down_nodes:
            log.warning(
                "Redis cluster primaries unreachable: %s", ", ".join(sorted(down)) or "none"
            )
        self.down_nodes = down
        self._redis_ok = ok
        self.metrics.redis_up.set(1 if ok else 0)
        self.metrics.redis_primaries_down.set(len(down))
        if ok:
            self._note_persistence(
                sorted(node.name for node, answer in up if not answer.append_only)
            )
        if down and ok:
            await _reread_slot_map(cluster, within)
        return ok

    def _note_persistence(self, volatile: list[str]) -> None:
        persistent = not volatile
        if persistent != self.persistent and not persistent:
            where = ", ".join(node or "the store" for node in volatile)
            log.error(
                "%s keeps no append-only file (appendonly no): acknowledged usage would be "
                "lost at its next restart%s",
                where,
                "" if self.allow_volatile_store else "; health is NOT_SERVING until it does",
            )
        self.persistent = persistent
        self.metrics.store_persistent.set(1 if persistent else 0)

    @property
    def store_fit(self) -> bool:
        """The store answers and keeps its data (or the operator accepted that it does not)."""
        return self._redis_ok and (self.persistent is not False or self.allow_volatile_store)

    async def check(self, client: aioredis.Redis, within: float | None = None) -> None:
        await self.probe(client, within)
        if not self.draining:
            await self.set(self.store_fit)

    async def watch(self, client: aioredis.Redis, interval: float) -> None:
        """Probe until cancelled: every half interval, each probe bounded by half the interval.

        A stall that starts right after a successful probe is found by the next
        one, which starts half an interval later and gives up half an interval
        after that: NOT_SERVING within one interval.
        """
        half = interval / 2
        self.watching = True
        while self.watching:
            await self.check(client, within=half)
            await asyncio.sleep(half)

    async def drain(self) -> None:
        self.draining = True
        await self.set(False)


@contextlib.asynccontextmanager
async def watching(reporter: HealthReporter, client: aioredis.Redis, interval: float):  # type: ignore[no-untyped-def]
    """Probe in the background for the duration of the block.

    Ending it must not hang a shutdown: redis-py 8.1 sometimes swallows the
    CancelledError of a task cancelled just as a reply arrives (about one cancel
    in ten in a loop of calls), and a shutdown that waited for the probe task
    then hung for good. So the loop also stops at its next turn when told to,
    and the wait for it is bounded.
    """
    task = asyncio.create_task(reporter.watch(client, interval), name="pagemeter-health")
    try:
        yield task
    finally:
        reporter.watching = False
        task.cancel()
        await asyncio.wait({task}, timeout=interval + 1)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("the health probe failed: %r", task.exception())
