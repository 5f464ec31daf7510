"""Reads of the organizations' event streams (the scripts write them).

An organization's events are the stream `pm:{org}:events`, in its hash slot, so
a script appends to it atomically with its change in every Redis mode. Reads
need no atomicity: they are plain XRANGE calls. Streams are found through
`pm:event-orgs` (organizations the servers saw change) and, for what a server
could not note before it stopped, by SCAN.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import redis.asyncio as aioredis

from pagemeter_server.domain.events import Event, event_from_entry
from pagemeter_server.store.keys import EVENT_ORGS_KEY, OrgKeys
from pagemeter_server.store.replies import metric_record, split_rows

_STREAM_KEY = re.compile(r"pm:\{([A-Za-z0-9._-]{1,64})\}:events")
# A stream entry id: "<ms>-<n>", or "<ms>" for the first entry at or after it.
ENTRY_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


class EventStore:
    """The event streams of all organizations."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def read(
        self, org_id: str, *, after: str = "", since_ms: int = 0, count: int = 100
    ) -> list[Event]:
        """Up to `count` events of the organization in order: those after the
        entry id `after` ('' for the oldest kept), from the time since_ms on."""
        start = f"({after}" if after else "-"
        if since_ms and not after:
            start = str(since_ms)
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await self.client.xrange(OrgKeys(org_id).events, start, "+", count=count),
        )
        return [
            event_from_entry(org_id, entry_id, fields, stored_data(fields))
            for entry_id, fields in entries
        ]

    async def last_entry_id(self, org_id: str) -> str:
        """The newest entry id of the organization's stream ('' when it has none)."""
        entries = cast(
            list[tuple[str, Any]], await self.client.xrevrange(OrgKeys(org_id).events, count=1)
        )
        return entries[0][0] if entries else ""

    async def note_orgs(self, org_ids: Iterable[str]) -> None:
        """Remember that these organizations have new events (pm:event-orgs)."""
        await note_event_orgs(self.client, org_ids)

    async def noted_orgs(self, *, since_ms: float = 0) -> list[tuple[str, float]]:
        """Organizations noted with events at or after since_ms, with when (ms on
        the noting server's clock)."""
        return cast(
            list[tuple[str, float]],
            await self.client.zrangebyscore(EVENT_ORGS_KEY, since_ms, "+inf", withscores=True),
        )

    async def scan_orgs(self) -> AsyncIterator[str]:
        """Every organization that has an event stream, found by SCAN (slow on a
        large keyspace: the fallback for orgs no server noted)."""
        seen: set[str] = set()
        async for key in self.client.scan_iter(match="pm:{*}:events", count=1000, _type="stream"):
            found = _STREAM_KEY.fullmatch(key if isinstance(key, str) else key.decode())
            if found and found.group(1) not in seen:
                seen.add(found.group(1))
                yield found.group(1)


async def note_event_orgs(client: aioredis.Redis, org_ids: Iterable[str]) -> None:
    """Write to pm:event-orgs that these organizations have new events, now on
    this server's clock (the stream entry ids follow the same kind of clock)."""
    stamp = int(time.time() * 1000)
    mapping = dict.fromkeys(org_ids, stamp)
    if mapping:
        await client.zadd(EVENT_ORGS_KEY, mapping)


def stored_data(fields: dict[str, str]) -> dict[str, Any] | None:
    """The data of an entry the script wrote as fields rather than JSON (None for
    JSON): usage.recorded carries the job and its metric rows as the record keeps
    them (record.lua, recorded_event), so the script builds no JSON."""
    if "rows" not in fields:
        return None
    return {
        "request_id": fields["rid"],
        "status": fields["st"],
        "period": fields["per"],
        "completed_at": fields["cms"],
        "requested_at": fields["rms"],
        "document_type": fields["dt"],
        "hold": fields["hold"],
        "over_limit": fields["ol"] == "1",
        "metrics": [_recorded_metric(row) for row in split_rows(fields["rows"])],
    }


def _recorded_metric(row: list[str]) -> dict[str, Any]:
    record = metric_record(row)
    return {
        "metric": record.metric,
        "units": record.units,
        "included": record.included,
        "prepaid": record.prepaid,
        "overage": record.overage,
        "committed": record.committed,
        "overage_price": record.overage_price,
        "lifetime": record.lifetime,
    }
