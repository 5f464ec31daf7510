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
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from pagemeter_server.metrics import ServiceMetrics

log = logging.getLogger("pagemeter.health")


class HealthReporter:
    def __init__(
        self, servicer: AsyncHealthServicer, metrics: ServiceMetrics, services: Sequence[str]
    ) -> None:
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

    async def probe(self, client: aioredis.Redis) -> bool:
        """One PING; the client's own timeouts bound it."""
        try:
            ok = bool(await client.ping())
        except (redis.exceptions.RedisError, OSError):
            ok = False
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
