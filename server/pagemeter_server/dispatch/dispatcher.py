"""The webhook dispatcher: delivers organizations' events to their endpoints.

Work is shared by partitions: an organization belongs to partition
crc32(org) % 64, and a dispatcher delivers the organizations of the partitions
it holds a lease on (`pm:wh:lease:<p>`, SET NX PX, renewed every third of the
lease). Each dispatcher aims at an even share (64 / live dispatchers, rounded
up): it takes free partitions up to it and gives back what is above it, only
between two rounds of delivery, so that no event of a partition it gives away
is still in flight. A dispatcher that dies stops renewing; its leases expire
and the others take its partitions, resuming from the cursors.

Per organization and endpoint a cursor (the last stream entry delivered) moves
only after a 2xx answer, by compare-and-set: an event is delivered at least
once, and an organization's events reach an endpoint in order (a failing event
holds back those after it, retried with exponential backoff and jitter until
--webhook-retry-hours, then dead-lettered). docs/webhooks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import socket
import time
import zlib
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry.trace import TracerProvider

from pagemeter_server.dispatch.metrics import DispatchMetrics
from pagemeter_server.dispatch.sender import Sender
from pagemeter_server.domain.events import Event
from pagemeter_server.domain.webhooks import Endpoint, entry_le
from pagemeter_server.ops.tracing import TRACER_NAME
from pagemeter_server.settings import Settings
from pagemeter_server.store.events import EventStore
from pagemeter_server.store.webhooks import OrgDeliveryState, RetryState, WebhookStore

log = logging.getLogger("pagemeter.dispatch")

PARTITIONS = 64
# Events read per stream call, and delivered per track before other work gets a turn.
BATCH = 50
STEP_MAX = 200
# pm:event-orgs scores are the servers' clocks: look back this far past the last seen.
NOTE_SLACK_MS = 10_000
DAY_MS = 86_400_000


def partition_of(org_id: str) -> int:
    return zlib.crc32(org_id.encode()) % PARTITIONS


@dataclass(frozen=True)
class Track:
    """What one endpoint still has to get from one organization: the live stream
    (name = endpoint id) or a replay (name = r:<replay id>, ending at `until`)."""

    name: str
    endpoint: Endpoint
    start: str  # the cursor when none is stored (exclusive)
    until: str = ""
    replay_id: str = ""


def now_ms() -> int:
    return int(time.time() * 1000)


class Dispatcher:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        metrics: DispatchMetrics,
        *,
        owner: str = "",
        sender: Sender | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.store = WebhookStore(client)
        self.events = EventStore(client)
        self.sender = sender or Sender(
            settings.webhook_timeout_seconds,
            settings.webhook_max_in_flight,
            tracer_provider.get_tracer(TRACER_NAME) if tracer_provider is not None else None,
        )
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_ms = int(settings.webhook_lease_seconds * 1000)
        self.retry_window_ms = int(settings.webhook_retry_hours * 3_600_000)
        self.state_ttl_ms = (settings.event_retention_days + 1) * DAY_MS
        self.owned: set[int] = set()
        self.draining: set[int] = set()
        # Every organization seen with events -> its last note (ms); those to look at
        # -> when (monotonic seconds); a counter per mark, to see marks made meanwhile.
        self.known: dict[str, float] = {}
        self.due: dict[str, float] = {}
        self.marks: dict[str, int] = {}
        self.noted_since = 0.0
        self.endpoints: list[Endpoint] = []
        # (org, track) -> time (ms) of the oldest event not delivered yet.
        self.waiting: dict[tuple[str, str], int] = {}
        self.in_flight = asyncio.Semaphore(settings.webhook_max_in_flight)
        self.ready = asyncio.Event()

    # -- running -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; then finish the round and give the leases back."""
        leases = asyncio.create_task(self._lease_loop(stop))
        try:
            last_scan = -math.inf
            while not stop.is_set():
                try:
                    await self._refresh_endpoints()
                    full = (
                        time.monotonic() - last_scan >= self.settings.webhook_scan_interval_seconds
                    )
                    await self._discover(full=full)
                    if full:
                        last_scan = time.monotonic()
                    await self._round()
                    await self._release_drained()
                except (redis.exceptions.RedisError, OSError) as exc:
                    log.warning("webhook dispatcher: store unavailable: %s", exc)
                self._publish_lag()
                self.ready.set()
                await self._sleep(stop)
        finally:
            leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leases
            await self._give_back()
            await self.sender.close()

    async def _sleep(self, stop: asyncio.Event) -> None:
        wait = self.settings.webhook_poll_interval_seconds
        now = time.monotonic()
        active = self._active_partitions()
        upcoming = [t for org, t in self.due.items() if partition_of(org) in active]
        if upcoming:
            wait = max(0.0, min(wait, min(upcoming) - now))
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _give_back(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            for partition in sorted(self.owned):
                await self.store.release(partition, self.owner)
            await self.store.leave(self.owner)
        self.owned.clear()
        self.metrics.partitions.set(0)

    # -- leases ---------------------------------------------------------------------------

    def _active_partitions(self) -> set[int]:
        return self.owned - self.draining

    async def _lease_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._lease_tick()
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("webhook dispatcher: cannot renew leases: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_ms / 3000)

    async def _lease_tick(self) -> None:
        now = await self.store.redis_time_ms()
        await self.store.heartbeat(self.owner, now, forget_before_ms=now - DAY_MS)
        live = max(1, await self.store.live_dispatchers(now - self.lease_ms))
        fair = math.ceil(PARTITIONS / live)
        for partition in sorted(self.owned):
            if not await self.store.renew(partition, self.owner, self.lease_ms):
                log.warning("webhook dispatcher %s lost partition %d", self.owner, partition)
                self.owned.discard(partition)
                self.draining.discard(partition)
        active = sorted(self._active_partitions())
        if len(active) > fair:
            # Given back after the current round (_release_drained).
            self.draining.update(active[fair:])
        elif len(active) < fair:
            free = [p for p in range(PARTITIONS) if p not in self.owned]
            random.shuffle(free)
            for partition in free:
                if len(self._active_partitions()) >= fair:
                    break
                if await self.store.acquire(partition, self.owner, self.lease_ms):
                    self.owned.add(partition)
                    for org in self.known:
                        if partition_of(org) == partition:
                            self._mark(org)
        self.metrics.partitions.set(len(self.owned))

    async def _release_drained(self) -> None:
        for partition in sorted(self.draining):
            await self.store.release(partition, self.owner)
            self.owned.discard(partition)
            self.draining.discard(partition)
            for key in [k for k in self.waiting if partition_of(k[0]) == partition]:
                del self.waiting[key]
        self.metrics.partitions.set(len(self.owned))

    # -- finding work ----------------------------------------------------------------------

    def _mark(self, org_id: str) -> None:
        self.due[org_id] = 0.0
        self.marks[org_id] = self.marks.get(org_id, 0) + 1

    async def _refresh_endpoints(self) -> None:
        self.endpoints = await self.store.all_endpoints()

    async def _discover(self, *, full: bool) -> None:
        since = self.noted_since - NOTE_SLACK_MS
        if full:
            since = now_ms() - self.settings.event_retention_days * DAY_MS
        for org_id, score in await self.events.noted_orgs(since_ms=since):
            self.noted_since = max(self.noted_since, score)
            if score > self.known.get(org_id, -1.0):
                self.known[org_id] = score
                self._mark(org_id)
        if full:
            async for org_id in self.events.scan_orgs():
                if org_id not in self.known:
                    self.known[org_id] = 0.0
                    self._mark(org_id)

    # -- delivering -----------------------------------------------------------------------

    async def _round(self) -> None:
        if not self.endpoints:
            return
        now = time.monotonic()
        active = self._active_partitions()
        orgs = [org for org, t in self.due.items() if t <= now and partition_of(org) in active]
        if not orgs:
            return
        marks = {org: self.marks.get(org, 0) for org in orgs}
        results = await asyncio.gather(*(self._org(org) for org in orgs), return_exceptions=True)
        after = time.monotonic()
        for org, result in zip(orgs, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                log.warning("webhook dispatcher: organization %s: %s", org, result)
                self.due[org] = after + 1.0
            elif self.marks.get(org, 0) != marks[org]:
                self.due[org] = 0.0  # new events meanwhile
            elif result is None:
                self.due.pop(org, None)
            else:
                self.due[org] = after + result

    async def _org(self, org_id: str) -> float | None:
        """Deliver what this organization has pending; seconds until it needs another
        look (None: nothing pending)."""
        state = await self.store.org_state(org_id)
        by_id = {e.endpoint_id: e for e in self.endpoints}
        tracks = [
            Track(e.endpoint_id, e, start=f"{e.start_ms}-0")
            for e in self.endpoints
            if e.enabled and e.receives_org(org_id)
        ]
        waits: list[float] = []
        for replay in state.replays:
            endpoint = by_id.get(replay.endpoint_id)
            if endpoint is None and await self.store.get_raw(replay.endpoint_id) is None:
                await self.store.drop_replay(org_id, replay.replay_id)
                continue
            if endpoint is None or not endpoint.enabled:
                waits.append(5.0)  # deliverable once the endpoint is enabled (or known)
                continue
            tracks.append(
                Track(
                    "r:" + replay.replay_id,
                    endpoint,
                    start=replay.after,
                    until=replay.until,
                    replay_id=replay.replay_id,
                )
            )
        results = await asyncio.gather(*(self._track(org_id, t, state) for t in tracks))
        waits += [wait for wait in results if wait is not None]
        return min(waits) if waits else None

    async def _track(self, org_id: str, track: Track, state: OrgDeliveryState) -> float | None:
        stored = state.cursors.get(track.name, "")
        cursor = stored or track.start
        retry = state.retries.get(track.name)
        key = (org_id, track.name)
        if retry is not None and retry.next_attempt_ms > now_ms():
            self.waiting[key] = retry.event_ms
            return (retry.next_attempt_ms - now_ms()) / 1000
        sent = 0
        while partition_of(org_id) in self._active_partitions():
            read = await self.events.read(org_id, after=cursor, count=BATCH)
            events = [e for e in read if not track.until or entry_le(e.entry_id, track.until)]
            if not events:
                self.waiting.pop(key, None)
                if track.replay_id:
                    await self.store.advance(
                        org_id,
                        track.name,
                        stored,
                        cursor,
                        ttl_ms=self.state_ttl_ms,
                        finished_replay=track.replay_id,
                    )
                    log.info("webhook replay %s to %s done", track.replay_id, track.endpoint.url)
                return None
            passed = ""
            for event in events:
                if not track.endpoint.receives(event.type):
                    passed = event.entry_id
                    continue
                wait = await self._deliver(org_id, track, event, retry)
                if wait is not None:
                    if passed and await self._advance(org_id, track, stored, passed):
                        stored = passed
                    self.waiting[key] = event.time_ms
                    return wait
                if not await self._advance(org_id, track, stored, event.entry_id):
                    return None  # another dispatcher moved it: it has the partition now
                stored = cursor = event.entry_id
                retry, passed = None, ""
                sent += 1
            if passed:
                if not await self._advance(org_id, track, stored, passed):
                    return None
                stored = cursor = passed
            if sent >= STEP_MAX:
                self.waiting[key] = events[-1].time_ms
                return 0.0
        return 0.0

    async def _advance(self, org_id: str, track: Track, expected: str, new: str) -> bool:
        return await self.store.advance(org_id, track.name, expected, new, ttl_ms=self.state_ttl_ms)

    async def _deliver(
        self, org_id: str, track: Track, event: Event, retry: RetryState | None
    ) -> float | None:
        """One attempt; None when the event is done with (delivered or dead-lettered),
        else the seconds until the next attempt."""
        same = retry is not None and retry.entry_id == event.entry_id
        attempt_no = retry.attempts + 1 if retry is not None and same else 1
        async with self.in_flight:
            attempt = await self.sender.send(track.endpoint, event, now_ms())
        now = now_ms()
        self.metrics.duration.observe(attempt.duration_s)
        if attempt_no > 1:
            self.metrics.retries.inc()
        line: dict[str, str | int] = {
            "event_id": event.id,
            "org": org_id,
            "type": event.type,
            "at": now,
            "attempt": attempt_no,
            "status": attempt.status,
            "duration_ms": int(attempt.duration_s * 1000),
            "error": attempt.error,
            "replay": 1 if track.replay_id else 0,
        }
        if attempt.ok:
            self.metrics.deliveries.labels("delivered").inc()
            await self.store.log(track.endpoint.endpoint_id, {**line, "outcome": "delivered"})
            return None
        self.metrics.failures.labels(attempt.reason).inc()
        first = retry.first_failure_ms if retry is not None and same else now
        if now - first >= self.retry_window_ms:
            self.metrics.deliveries.labels("dead_letter").inc()
            self.metrics.dead_letters.inc()
            await self.store.dead_letter(
                track.endpoint.endpoint_id,
                {
                    "event_id": event.id,
                    "org": org_id,
                    "type": event.type,
                    "at": now,
                    "attempts": attempt_no,
                    "error": attempt.error,
                },
            )
            await self.store.log(track.endpoint.endpoint_id, {**line, "outcome": "dead_letter"})
            log.warning(
                "webhook event %s dead-lettered for endpoint %s after %d attempts: %s",
                event.id,
                track.endpoint.endpoint_id,
                attempt_no,
                attempt.error,
            )
            return None
        delay = self._backoff(attempt_no)
        await self.store.set_retry(
            org_id,
            track.name,
            RetryState(
                event.entry_id,
                attempt_no,
                first,
                now + int(delay * 1000),
                event.time_ms,
                attempt.error,
            ),
            ttl_ms=self.state_ttl_ms,
        )
        self.metrics.deliveries.labels("failed").inc()
        await self.store.log(track.endpoint.endpoint_id, {**line, "outcome": "failed"})
        return delay

    def _backoff(self, attempt_no: int) -> float:
        """Exponential backoff with jitter: base * 2^(n-1), capped, times 0.5 to 1."""
        base = self.settings.webhook_backoff_seconds * 2 ** min(attempt_no - 1, 30)
        capped: float = min(base, self.settings.webhook_backoff_max_seconds)
        return capped * random.uniform(0.5, 1.0)

    def _publish_lag(self) -> None:
        if not self.waiting:
            self.metrics.lag.set(0)
            return
        oldest = min(self.waiting.values())
        self.metrics.lag.set(max(0.0, (now_ms() - oldest) / 1000))
