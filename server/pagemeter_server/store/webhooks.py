"""Webhook endpoints and delivery state in Redis (docs/webhooks.md, storage).

- `pm:webhooks`: every endpoint, id -> JSON (signing secrets included).
- Per organization, under its hash tag (one cluster slot with its stream):
  `pm:{org}:whcursor` (endpoint id -> last entry id delivered; `r:<replay id>`
  for a replay), `pm:{org}:whretry` (the same fields -> the retry state of the
  event at the head), `pm:{org}:whreplays` (replay id -> its definition).
- Per endpoint, under its own hash tag: `pm:wh:{<id>}:log` (the delivery log)
  and `pm:wh:{<id>}:dead` (dead letters), both streams of bounded length.
- `pm:wh:lease:<partition>` (which dispatcher delivers the organizations of a
  partition) and `pm:wh:dispatchers` (dispatcher id -> last heartbeat, ms).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from pagemeter_server.domain.webhooks import MAX_ENDPOINTS, Endpoint, endpoint_from_json
from pagemeter_server.store.keys import OrgKeys
from pagemeter_server.store.scripts import script_text

ENDPOINTS_KEY = "pm:webhooks"
DISPATCHERS_KEY = "pm:wh:dispatchers"
# Entries kept (about) in each endpoint's delivery log and dead letters.
DELIVERY_LOG_MAX = 10_000
DEAD_LETTERS_MAX = 10_000
# Replays an organization may have pending at once.
MAX_REPLAYS_PER_ORG = 100


def lease_key(partition: int) -> str:
    return f"pm:wh:lease:{partition}"


def log_key(endpoint_id: str) -> str:
    return f"pm:wh:{{{endpoint_id}}}:log"


def dead_key(endpoint_id: str) -> str:
    return f"pm:wh:{{{endpoint_id}}}:dead"


class DeliveryKeys:
    """An organization's delivery state keys (under its hash tag)."""

    def __init__(self, org_id: str) -> None:
        prefix = OrgKeys(org_id).prefix
        self.cursors = prefix + "whcursor"
        self.retries = prefix + "whretry"
        self.replays = prefix + "whreplays"


@dataclass(frozen=True)
class RetryState:
    """The event at the head of a track that its endpoint has not taken yet."""

    entry_id: str
    attempts: int
    first_failure_ms: int
    next_attempt_ms: int
    event_ms: int  # the event's time, for the lag
    last_error: str

    def encode(self) -> str:
        return json.dumps(
            [
                self.entry_id,
                self.attempts,
                self.first_failure_ms,
                self.next_attempt_ms,
                self.event_ms,
                self.last_error,
            ]
        )


def decode_retry(text: str) -> RetryState:
    raw = json.loads(text)
    return RetryState(raw[0], int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]), str(raw[5]))


@dataclass(frozen=True)
class Replay:
    replay_id: str
    endpoint_id: str
    after: str  # exclusive start cursor
    until: str  # the last entry id it covers
    created_ms: int

    def encode(self) -> str:
        return json.dumps([self.endpoint_id, self.after, self.until, self.created_ms])


def decode_replay(replay_id: str, text: str) -> Replay:
    raw = json.loads(text)
    return Replay(replay_id, raw[0], raw[1], raw[2], int(raw[3]))


@dataclass(frozen=True)
class OrgDeliveryState:
    cursors: dict[str, str]
    retries: dict[str, RetryState]
    replays: list[Replay]


@dataclass(frozen=True)
class LogEntry:
    """One line of a delivery log or one dead letter (entry_id: its stream id)."""

    entry_id: str
    fields: dict[str, str]


class EndpointConflict(Exception):
    """The endpoint changed between the read and the write: read again."""


class WebhookStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._scripts: dict[str, AsyncScript] = {}

    def _script(self, name: str) -> AsyncScript:
        if name not in self._scripts:
            self._scripts[name] = self.client.register_script(script_text(name))
        return self._scripts[name]

    async def redis_time_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- endpoints -------------------------------------------------------------------

    async def _endpoint_call(self, op: str, endpoint_id: str, expected: str, doc: str) -> str:
        reply = cast(
            list[Any],
            await self._script("webhook_endpoint")(
                keys=[ENDPOINTS_KEY], args=[op, endpoint_id, expected, MAX_ENDPOINTS, doc]
            ),
        )
        return str(reply[0])

    async def create(self, endpoint: Endpoint) -> str:
        """'OK', 'EXISTS' or 'TOO_MANY'."""
        return await self._endpoint_call("create", endpoint.endpoint_id, "", endpoint.to_json())

    async def get_raw(self, endpoint_id: str) -> str | None:
        return cast(str | None, await self.client.hget(ENDPOINTS_KEY, endpoint_id))

    async def get(self, endpoint_id: str) -> Endpoint | None:
        raw = await self.get_raw(endpoint_id)
        return endpoint_from_json(raw) if raw else None

    async def replace(self, before: str, endpoint: Endpoint) -> bool:
        """Store `endpoint` if its document is still `before`; False when it is gone.

        Raises EndpointConflict when it changed in between."""
        outcome = await self._endpoint_call(
            "replace", endpoint.endpoint_id, before, endpoint.to_json()
        )
        if outcome == "CHANGED":
            raise EndpointConflict(endpoint.endpoint_id)
        return outcome == "OK"

    async def delete(self, endpoint_id: str) -> bool:
        """Remove an endpoint, its delivery log and dead letters; False when unknown."""
        while True:
            before = await self.get_raw(endpoint_id)
            if before is None:
                return False
            outcome = await self._endpoint_call("delete", endpoint_id, before, "")
            if outcome == "OK":
                await self.client.delete(log_key(endpoint_id))
                await self.client.delete(dead_key(endpoint_id))
                return True
            if outcome == "NOT_FOUND":
                return False

    async def all_endpoints(self) -> list[Endpoint]:
        raw = cast(dict[str, str], await self.client.hgetall(ENDPOINTS_KEY))
        return sorted(
            (endpoint_from_json(text) for text in raw.values()), key=lambda e: e.endpoint_id
        )

    # -- an organization's delivery state -------------------------------------------

    async def org_state(self, org_id: str) -> OrgDeliveryState:
        keys = DeliveryKeys(org_id)
        # One slot: a pipeline is one round trip in every mode.
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.cursors)
            pipe.hgetall(keys.retries)
            pipe.hgetall(keys.replays)
            cursors, retries, replays = cast(list[dict[str, str]], await pipe.execute())
        return OrgDeliveryState(
            cursors=cursors,
            retries={name: decode_retry(text) for name, text in retries.items()},
            replays=sorted(
                (decode_replay(rid, text) for rid, text in replays.items()),
                key=lambda r: (r.created_ms, r.replay_id),
            ),
        )

    async def advance(
        self,
        org_id: str,
        track: str,
        expected: str,
        new: str,
        *,
        ttl_ms: int,
        finished_replay: str = "",
    ) -> bool:
        """Move a track's cursor from `expected` to `new`; False if it had moved."""
        keys = DeliveryKeys(org_id)
        reply = cast(
            list[Any],
            await self._script("webhook_advance")(
                keys=[keys.cursors, keys.retries, keys.replays],
                args=[track, expected, new, ttl_ms, finished_replay],
            ),
        )
        return str(reply[0]) == "OK"

    async def set_retry(self, org_id: str, track: str, state: RetryState, *, ttl_ms: int) -> None:
        keys = DeliveryKeys(org_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(keys.retries, track, state.encode())
            pipe.pexpire(keys.retries, ttl_ms)
            await pipe.execute()

    async def add_replay(self, org_id: str, replay: Replay, *, ttl_ms: int) -> bool:
        """Queue a replay; False when the organization has MAX_REPLAYS_PER_ORG pending."""
        keys = DeliveryKeys(org_id)
        if await self.client.hlen(keys.replays) >= MAX_REPLAYS_PER_ORG:
            return False
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(keys.replays, replay.replay_id, replay.encode())
            pipe.pexpire(keys.replays, ttl_ms)
            await pipe.execute()
        return True

    async def drop_replay(self, org_id: str, replay_id: str) -> None:
        keys = DeliveryKeys(org_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hdel(keys.replays, replay_id)
            pipe.hdel(keys.cursors, "r:" + replay_id)
            pipe.hdel(keys.retries, "r:" + replay_id)
            await pipe.execute()

    # -- delivery log and dead letters ----------------------------------------------

    async def log(self, endpoint_id: str, fields: dict[str, str | int]) -> None:
        entry: dict[Any, Any] = dict(fields)
        await self.client.xadd(
            log_key(endpoint_id), entry, maxlen=DELIVERY_LOG_MAX, approximate=True
        )

    async def dead_letter(self, endpoint_id: str, fields: dict[str, str | int]) -> None:
        entry: dict[Any, Any] = dict(fields)
        await self.client.xadd(
            dead_key(endpoint_id), entry, maxlen=DEAD_LETTERS_MAX, approximate=True
        )

    async def _newest_first(self, key: str, before: str, count: int) -> list[LogEntry]:
        top = f"({before}" if before else "+"
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await self.client.xrevrange(key, top, "-", count=count),
        )
        return [LogEntry(entry_id, fields) for entry_id, fields in entries]

    async def deliveries(self, endpoint_id: str, *, before: str, count: int) -> list[LogEntry]:
        return await self._newest_first(log_key(endpoint_id), before, count)

    async def dead_letters(self, endpoint_id: str, *, before: str, count: int) -> list[LogEntry]:
        return await self._newest_first(dead_key(endpoint_id), before, count)

    # -- dispatchers' leases ----------------------------------------------------------

    async def acquire(self, partition: int, owner: str, ttl_ms: int) -> bool:
        return bool(await self.client.set(lease_key(partition), owner, nx=True, px=ttl_ms))

    async def renew(self, partition: int, owner: str, ttl_ms: int) -> bool:
        return bool(
            await self._script("webhook_lease")(
                keys=[lease_key(partition)], args=["renew", owner, ttl_ms]
            )
        )

    async def release(self, partition: int, owner: str) -> bool:
        return bool(
            await self._script("webhook_lease")(
                keys=[lease_key(partition)], args=["release", owner, 0]
            )
        )

    async def heartbeat(self, owner: str, now_ms: int, *, forget_before_ms: int) -> None:
        await self.client.zadd(DISPATCHERS_KEY, {owner: now_ms})
        await self.client.zremrangebyscore(DISPATCHERS_KEY, "-inf", forget_before_ms)

    async def live_dispatchers(self, since_ms: int) -> int:
        return int(await self.client.zcount(DISPATCHERS_KEY, since_ms, "+inf"))

    async def leave(self, owner: str) -> None:
        await self.client.zrem(DISPATCHERS_KEY, owner)
