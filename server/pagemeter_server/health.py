"""grpc.health.v1 that follows Redis: SERVING while the store answers and the
server is not draining, NOT_SERVING otherwise.

A background probe PINGs Redis every --health-interval seconds with the Redis
timeout; load balancers then stop sending work to a replica whose store is
gone, and send it again when the store comes back. Once draining starts
(SIGTERM), the status stays NOT_SERVING whatever the probe says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from pagemeter_server.clock import RedisClock
from pagemeter_server.metrics import ServiceMetrics

log = logging.getLogger("pagemeter.health")


class HealthReporter:
    def __init__(
        self,
        servicer: AsyncHealthServicer,
        metrics: ServiceMetrics,
        services: Sequence[str],
        clock: RedisClock | None = None,
    ) -> None:
        self.clock = clock
        self._redis_ok = True
        self.servicer = servicer
        self.metrics = metrics
        self.services = ("", *services)
        self.draining = False
        self.serving: bool | None = None

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

    async def probe(self, client: aioredis.Redis) -> bool:
        """One TIME call (it also sets the Redis clock); the client's timeouts bound it."""
        try:
            sent = time.time_ns()
            seconds, micros = await client.time()
            if self.clock is not None:
                self.clock.sync(int(seconds), int(micros), sent, time.time_ns())
            ok = True
        except (redis.exceptions.RedisError, OSError):
            ok = False
        self._redis_ok = ok
        self.metrics.redis_up.set(1 if ok else 0)
        return ok

    async def check(self, client: aioredis.Redis) -> None:
        ok = await self.probe(client)
        if not self.draining:
            await self.set(ok)

    async def watch(self, client: aioredis.Redis, interval: float) -> None:
        """Probe until cancelled."""
        while True:
            await self.check(client)
            await asyncio.sleep(interval)

    async def drain(self) -> None:
        self.draining = True
        await self.set(False)


@contextlib.asynccontextmanager
async def watching(reporter: HealthReporter, client: aioredis.Redis, interval: float):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(reporter.watch(client, interval), name="pagemeter-health")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
