"""The periodic sweep of the notification thresholds (docs/events.md).

The scripts watch a threshold when they move its figures; what changes with
time alone needs a look now and then: a billing period that ended (its crossed
thresholds resolve), a credit grant that comes within its expiry warning or
expires. Every --alert-sweep-interval one server of the deployment (the one
that takes the lease) runs alerts.lua for every organization with a plan, one
at a time, so the sweep's load stays one script call at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions

from pagemeter_server.domain.clock import Clock
from pagemeter_server.store.quota import Store

log = logging.getLogger("pagemeter.alerts")

# Held by the server sweeping now; expires with the interval.
SWEEP_LEASE_KEY = "pm:alert-sweep"
ORGS_PER_READ = 500


async def sweep_all(store: Store, clock: Clock) -> tuple[int, int]:
    """Sweep every organization with a plan once; (organizations, events written)."""
    after, orgs, written = "", 0, 0
    while True:
        page, more = await store.plan_orgs(after, ORGS_PER_READ)
        for org_id in page:
            written += await store.sweep_alerts(org_id, now_ms=clock.now_ms())
        orgs += len(page)
        if not more or not page:
            return orgs, written
        after = page[-1]


async def sweep_forever(
    store: Store, client: aioredis.Redis, clock: Clock, interval: float
) -> None:
    """Every `interval` seconds, sweep if this server takes the lease."""
    holder = secrets.token_hex(8)
    while True:
        try:
            if await client.set(SWEEP_LEASE_KEY, holder, nx=True, px=int(interval * 1000)):
                orgs, written = await sweep_all(store, clock)
                log.info("threshold sweep: %d organizations, %d events", orgs, written)
        except (redis.exceptions.RedisError, OSError) as error:
            # Redis is away: the next turn tries again (health reports the outage).
            log.warning("threshold sweep skipped: %s", error)
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def sweeping(
    store: Store, client: aioredis.Redis, clock: Clock, interval: float
) -> AsyncIterator[None]:
    """Sweep in the background for the duration of the block (interval 0: never)."""
    if interval <= 0 or not store.event_max_per_org:
        yield
        return
    task = asyncio.create_task(sweep_forever(store, client, clock, interval), name="pm-sweep")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
