"""Read paths of the reports: history, statistics and the usage records.

These reads need no atomicity with the rules (they change nothing and each
figure was written atomically by record.lua), so they are plain pipelined reads
rather than scripts. Their cost grows with the months or days read, or with the
page size, never with the number of jobs an organization has recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import cast

import redis.asyncio as aioredis

from pagemeter_server.domain.decisions import PlanVersion
from pagemeter_server.domain.errors import BadPageToken
from pagemeter_server.domain.page_tokens import decode_page_token, encode_page_token
from pagemeter_server.domain.plans import plan_doc_from_json
from pagemeter_server.store.keys import OrgKeys


@dataclass(frozen=True)
class RecordEntry:
    """One usage record as stored: its id, index score and hash fields."""

    request_id: str
    requested_ms: int
    fields: dict[str, str]


@dataclass(frozen=True)
class RecordsPage:
    records: list[RecordEntry]
    next_page_token: str


def _ints(raw: dict[str, str]) -> dict[str, int]:
    return {name: int(value) for name, value in raw.items()}


RECORDS = "records"


def encode_records_position(org_id: str, requested_ms: int, request_id: str) -> str:
    return encode_page_token(RECORDS, org_id, f"{requested_ms}:{request_id}")


def decode_records_position(org_id: str, token: str) -> tuple[int, str]:
    position = decode_page_token(token, RECORDS, org_id)
    score, _, request_id = position.partition(":")
    if not request_id or not score.isascii() or not score.lstrip("-").isdigit():
        raise BadPageToken(token)
    return int(score), request_id


class ReportStore:
    """Pipelined reads of an organization's counters, plan log and records."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def plan_versions(self, org_id: str) -> list[PlanVersion]:
        """The plan log, oldest first (versions replaced long ago are trimmed)."""
        keys = OrgKeys(org_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.planlog, 0, -1, withscores=True)
            pipe.hgetall(keys.planver)
            logged, docs = await pipe.execute()
        versions = []
        for member, score in cast(list[tuple[str, float]], logged):
            doc = cast(dict[str, str], docs).get(member)
            if doc is not None:
                versions.append(PlanVersion(int(member), int(score), plan_doc_from_json(doc)))
        return versions

    async def months(self, org_id: str, period_ids: Sequence[str]) -> list[dict[str, int]]:
        """The month hashes (c:, pp:, jobs_ok, jobs_failed), in the order asked."""
        keys = OrgKeys(org_id)
        return await self._hashes([keys.month(period_id) for period_id in period_ids])

    async def days(self, org_id: str, days: Sequence[date]) -> list[dict[str, str]]:
        """The day hashes written by record.lua, in the order asked, as Redis returns
        them (statistics.parse_day reads the numbers as it splits the fields)."""
        keys = OrgKeys(org_id)
        return await self._raw_hashes([keys.day(day) for day in days])

    async def _hashes(self, names: Sequence[str]) -> list[dict[str, int]]:
        return [_ints(reply) for reply in await self._raw_hashes(names)]

    async def _raw_hashes(self, names: Sequence[str]) -> list[dict[str, str]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            replies = await pipe.execute()
        return cast(list[dict[str, str]], replies)

    async def records_page(self, org_id: str, page_size: int, page_token: str) -> RecordsPage:
        """One page of the records index, newest first, with each record's fields.

        The cursor is the last entry shown (requested-at, request_id): entries
        added since do not shift the pages, and ties of the same millisecond
        are ordered by request_id.
        """
        keys = OrgKeys(org_id)
        cursor = decode_records_position(org_id, page_token) if page_token else None
        entries = await self._index_after(keys.records_index, cursor, page_size + 1)
        async with self.client.pipeline(transaction=False) as pipe:
            for request_id, _ in entries[:page_size]:
                pipe.hgetall(keys.record(request_id))
            hashes = await pipe.execute()
        records = [
            RecordEntry(request_id, score, cast(dict[str, str], fields))
            for (request_id, score), fields in zip(entries, hashes, strict=False)
            if fields  # its hash expired after the index entry was read
        ]
        next_token = ""
        if len(entries) > page_size:
            last_id, last_score = entries[page_size - 1]
            next_token = encode_records_position(org_id, last_score, last_id)
        return RecordsPage(records, next_token)

    async def _index_after(
        self, index_key: str, cursor: tuple[int, str] | None, wanted: int
    ) -> list[tuple[str, int]]:
        """Up to `wanted` index entries strictly after the cursor, newest first."""
        top: int | str = "+inf" if cursor is None else cursor[0]
        found: list[tuple[str, int]] = []
        offset = 0
        batch = wanted + 16
        while len(found) < wanted:
            chunk = cast(
                list[tuple[str, float]],
                await self.client.zrevrangebyscore(
                    index_key, top, "-inf", start=offset, num=batch, withscores=True
                ),
            )
            for member, score in chunk:
                entry = (member, int(score))
                if cursor is not None and entry[1] == cursor[0] and member >= cursor[1]:
                    continue  # the cursor itself, or a tie already shown
                found.append(entry)
            if len(chunk) < batch:
                break
            offset += batch
        return found[:wanted]
