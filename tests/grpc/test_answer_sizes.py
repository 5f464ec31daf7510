"""Every request the limits accept gets an answer that fits gRPC's 4 MiB message limit.

Each test drives one RPC to its documented maxima (longest names, largest
numbers, most items, most metrics and document types an organization may have)
through a client with gRPC's default limits, and checks the answer arrives
whole and under the limit. A request past the limits is refused up front with
INVALID_ARGUMENT, before anything is applied.

Where the rules are not the subject (months of history, a year of daily
counters), the counters are written straight into Redis in the layout
record.lua writes (docs/storage.md), so that a year of maxima takes seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from google.protobuf.message import Message
from redis.typing import EncodableT, FieldT

from pagemeter.v1 import (
    admin_pb2,
    plan_pb2,
    quota_pb2,
    reporting_pb2,
)
from pagemeter_client import AsyncPagemeterClient, PagemeterClient
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.domain.validation import MAX_BATCH_ENTRIES, MAX_LIMIT, MAX_UNITS
from pagemeter_server.settings import MAX_DOCUMENT_TYPES, MAX_UNPLANNED_METRICS, Settings
from pagemeter_server.store.keys import OrgKeys
from tests.conftest import START_MS, RunningServer, serving
from tests.grpc.test_quota_service import snapshot

Q = quota_pb2
R = reporting_pb2
T = TypeVar("T")
LIMIT = 4 * 1024 * 1024
ORG = "o" * 64
PRICE = "999999999999.999999999"
BIG = 2**53 - 1  # the largest count a Lua double holds exactly


def planned_metric(index: int) -> str:
    return f"p{index:02d}".ljust(32, "x")


def unplanned_metric(index: int) -> str:
    return f"u{index:02d}".ljust(32, "y")


PLANNED = [planned_metric(i) for i in range(32)]
UNPLANNED = [unplanned_metric(i) for i in range(MAX_UNPLANNED_METRICS)]


# Every window kind on every metric, at the largest limit and on trial (shadow
# windows answer one more field), so each decision carries four windows.
LARGEST_WINDOWS = [
    plan_pb2.WindowLimit(window=kind, limit=MAX_LIMIT, shadow=True)
    for kind in (
        plan_pb2.WINDOW_MINUTE,
        plan_pb2.WINDOW_HOUR,
        plan_pb2.WINDOW_DAY,
        plan_pb2.WINDOW_WEEK,
    )
]


def largest_plan(name: str = "n" * 128) -> plan_pb2.Plan:
    """32 metrics with the longest names, the largest limits and prices, four windows
    each and a shadow hard limit every call passes (so every decision says would_deny)."""
    return plan_pb2.Plan(
        org_id=ORG,
        name=name,
        timezone="America/Argentina/ComodRivadavia",
        processing_priority="q" * 64,
        support_level="s" * 64,
        api_rate_limit=2**32 - 1,
        metrics=[
            plan_pb2.MetricLimits(
                metric=metric,
                contract_quota=1,
                hard_limit=MAX_LIMIT,
                overage_allowed=True,
                price_per_unit=PRICE,
                overage_price_per_unit=PRICE,
                windows=LARGEST_WINDOWS,
                shadow_hard_limit=0,
            )
            for metric in PLANNED
        ],
    )


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """items in runs of `size` (itertools.batched is Python 3.12)."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def request_id(index: int) -> str:
    return f"{index:08d}".ljust(128, "r")


def fits(reply: Message) -> None:
    size = reply.ByteSize()
    assert size < LIMIT, f"{type(reply).__name__} is {size} bytes"


@pytest.fixture
async def largest(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, plans_migrated: None
) -> AsyncIterator[RunningServer]:
    """A server whose per-organization name caps are at their largest settings."""
    wide = dataclasses.replace(
        settings,
        max_unplanned_metrics=MAX_UNPLANNED_METRICS,
        max_document_types=MAX_DOCUMENT_TYPES,
    )
    async with serving(wide, redis_client, clock) as running:
        yield running


async def with_largest_plan(server: RunningServer) -> None:
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=largest_plan()))


# -- QuotaService -------------------------------------------------------------------------------


async def test_check_quota_batch_at_its_maxima(largest: RunningServer) -> None:
    """A CheckQuotaBatch of 8,192 metric amounts (256 holds of 32 metrics, longest ids) is answered whole, and so is one of 1,000 items."""
    await with_largest_plan(largest)
    items = [
        Q.CheckQuotaRequest(
            org_id=ORG,
            units=dict.fromkeys(PLANNED, MAX_UNITS),
            request_id=request_id(i),
            hold=True,
        )
        for i in range(MAX_BATCH_ENTRIES // 32)
    ]
    reply = await largest.quota.CheckQuotaBatch(Q.CheckQuotaBatchRequest(items=items))
    fits(reply)
    assert all(item.response.held for item in reply.items)
    first = reply.items[0].response
    assert first.would_deny and all(len(d.windows) == 4 for d in first.metrics)
    again = await largest.quota.CheckQuotaBatch(Q.CheckQuotaBatchRequest(items=items))
    assert all(item.response.duplicate for item in again.items)
    many = [
        Q.CheckQuotaRequest(org_id=ORG, units=dict.fromkeys(PLANNED[:8], MAX_UNITS))
        for _ in range(1000)
    ]
    fits(await largest.quota.CheckQuotaBatch(Q.CheckQuotaBatchRequest(items=many)))


async def test_a_batch_whose_answer_could_not_fit_is_refused_before_anything_is_held(
    largest: RunningServer, redis_sync: redis.Redis
) -> None:
    """1,000 holds of 32 metrics (32,000 amounts) are INVALID_ARGUMENT up front: no hold is placed, so no retry can be stuck."""
    await with_largest_plan(largest)
    before = snapshot(redis_sync)
    items = [
        Q.CheckQuotaRequest(
            org_id=ORG, units=dict.fromkeys(PLANNED, 1), request_id=request_id(i), hold=True
        )
        for i in range(1000)
    ]
    for call in (
        largest.quota.CheckQuotaBatch(Q.CheckQuotaBatchRequest(items=items)),
        largest.quota.RecordUsageBatch(
            Q.RecordUsageBatchRequest(
                items=[
                    Q.RecordUsageRequest(
                        org_id=ORG, request_id=item.request_id, units=dict(item.units)
                    )
                    for item in items
                ]
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(MAX_BATCH_ENTRIES) in (caught.value.details() or "")
    assert snapshot(redis_sync) == before


async def test_record_usage_batch_at_its_maxima(largest: RunningServer) -> None:
    """A RecordUsageBatch of 8,192 amounts with the longest ids, the largest units and costs is answered whole."""
    await with_largest_plan(largest)
    items = [
        Q.RecordUsageRequest(
            org_id=ORG,
            request_id=request_id(i),
            units=dict.fromkeys(PLANNED, MAX_UNITS),
            document_type="d" * 64,
        )
        for i in range(MAX_BATCH_ENTRIES // 32)
    ]
    reply = await largest.quota.RecordUsageBatch(Q.RecordUsageBatchRequest(items=items))
    fits(reply)
    assert all(item.response.status == Q.RECORD_STATUS_COMPLETED for item in reply.items)


async def test_a_batch_of_items_breaking_every_rule_is_answered_item_by_item(
    largest: RunningServer,
) -> None:
    """1,000 items each breaking every rule (8 bad metric names, bad ids, times, types) get 1,000 short errors in one answer."""
    bad = "B" * 400
    items = [
        Q.RecordUsageRequest(
            org_id="!" * 200,
            request_id="?" * 300,
            units={f"{bad}{k}": -(2**62) for k in range(8)},
            document_type="/" * 300,
        )
        for _ in range(1000)
    ]
    for item in items:
        item.completed_at.seconds = -(2**40)
        item.requested_at.seconds = 2**60
    request = Q.RecordUsageBatchRequest(items=items)
    assert request.ByteSize() < LIMIT
    reply = await largest.quota.RecordUsageBatch(request)
    fits(reply)
    assert all(item.error.code == "INVALID_ARGUMENT" for item in reply.items)
    assert all(0 < len(item.error.field_violations) <= 5 for item in reply.items)
    checks = Q.CheckQuotaBatchRequest(
        items=[
            Q.CheckQuotaRequest(org_id=item.org_id, units=item.units, request_id=item.request_id)
            for item in items
        ]
    )
    fits(await largest.quota.CheckQuotaBatch(checks))


async def test_get_usage_at_its_maxima(largest: RunningServer) -> None:
    """GetUsage of an org with 32 planned and the most unplanned metrics, all with the largest figures, this month and the last, fits."""
    await with_largest_plan(largest)
    for month_ms in (START_MS - 31 * 86_400_000, START_MS):
        largest.clock.set(month_ms)
        for index, names in enumerate(chunks([*PLANNED, *UNPLANNED], 32)):
            await largest.quota.RecordUsage(
                Q.RecordUsageRequest(
                    org_id=ORG,
                    request_id=f"{month_ms}-{index}",
                    units=dict.fromkeys(names, MAX_UNITS),
                )
            )
    reply = await largest.quota.GetUsage(Q.GetUsageRequest(org_id=ORG))
    fits(reply)
    assert len(reply.metrics) == 32 + MAX_UNPLANNED_METRICS
    assert len(reply.previous_month.metrics) == 32 + MAX_UNPLANNED_METRICS


# -- ReportingService ---------------------------------------------------------------------------


def seed_month(client: redis.Redis, period_id: str) -> None:
    """A month hash as record.lua leaves it, with every metric at the largest figures."""
    fields: dict[FieldT, EncodableT] = {"jobs_ok": BIG, "jobs_failed": BIG}
    for metric in [*PLANNED, *UNPLANNED]:
        fields[f"c:{metric}"] = BIG
        fields[f"pp:{metric}"] = BIG
    client.hset(OrgKeys(ORG).month(period_id), mapping=fields)


async def test_usage_history_at_its_maxima(largest: RunningServer, redis_sync: redis.Redis) -> None:
    """24 months of history, each with 64 metrics at the largest figures and the largest terms, fit one answer."""
    await with_largest_plan(largest)
    year, month = 2026, 3
    for _ in range(24):
        seed_month(redis_sync, f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    reply = await largest.reporting.GetUsageHistory(R.GetUsageHistoryRequest(org_id=ORG, months=24))
    fits(reply)
    assert len(reply.months) == 24
    assert all(len(m.metrics) == 64 for m in reply.months)


def seed_day(pipe: redis.client.Pipeline, day: str, types: int, metrics: list[str]) -> None:
    """A day hash as record.lua leaves it: every type with every metric."""
    fields: dict[FieldT, EncodableT] = {"ok": BIG, "failed": BIG}
    for metric in metrics:
        fields[f"c:{metric}"] = BIG
    for index in range(types):
        document_type = f"{index:03d}".ljust(64, "t")
        fields[f"tok:{document_type}"] = 1000
        fields[f"tfail:{document_type}"] = 1000
        for metric in metrics:
            fields[f"tc:{document_type}:{metric}"] = BIG
    pipe.hset(f"pm:{{{ORG}}}:d:{day}", mapping=fields)


async def test_daily_statistics_by_both_are_paged_to_fit(
    largest: RunningServer, redis_sync: redis.Redis
) -> None:
    """A year of daily rows split by 12 document types of 40 metrics (about 9 MB) comes in answers under 4 MiB that, followed by their tokens, hold every row once, with the whole range's summary on each."""
    await with_largest_plan(largest)
    largest.clock.set(START_MS)
    days = [f"2025-{m:02d}-{d:02d}" for m in range(3, 13) for d in range(1, 29)]
    days += [f"2026-{m:02d}-{d:02d}" for m in range(1, 4) for d in range(1, 29)]
    with redis_sync.pipeline(transaction=False) as pipe:
        for day in days:
            seed_day(pipe, day, 12, [*PLANNED, *UNPLANNED[:8]])
        pipe.execute()
    request = R.GetUsageStatisticsRequest(
        org_id=ORG,
        period=R.STATISTICS_PERIOD_DAILY,
        group_by=R.STATISTICS_GROUPING_BOTH,
        start_date="2025-03-16",
        end_date="2026-03-15",
    )
    seen: list[str] = []
    summaries = set()
    pages = 0
    while True:
        reply = await largest.reporting.GetUsageStatistics(request)
        fits(reply)
        pages += 1
        seen += [row.date for row in reply.by_period]
        summaries.add(reply.summary.SerializeToString(deterministic=True))
        assert len(reply.by_document_type) == 12
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert pages >= 3
    assert len(seen) == len(set(seen)) == 365
    assert len(summaries) == 1
    # The SDKs follow the pages themselves and hand back one answer.
    async with AsyncPagemeterClient(largest.target) as client:
        joined = await client.get_usage_statistics(
            ORG, period="daily", group_by="both", start_date="2025-03-16", end_date="2026-03-15"
        )
    assert [row.date for row in joined.by_period] == seen
    assert not joined.next_page_token
    with PagemeterClient(largest.target) as sync_client:
        joined = await asyncio.to_thread(
            sync_client.get_usage_statistics,
            ORG,
            period="daily",
            group_by="both",
            start_date="2025-03-16",
            end_date="2026-03-15",
        )
    assert [row.date for row in joined.by_period] == seen


async def test_a_statistics_page_token_is_only_for_its_own_query(largest: RunningServer) -> None:
    """page_size pages the rows; a page token sent with another range is INVALID_ARGUMENT."""
    await with_largest_plan(largest)
    request = R.GetUsageStatisticsRequest(
        org_id=ORG, period=R.STATISTICS_PERIOD_DAILY, page_size=10, start_date="2026-01-01"
    )
    first = await largest.reporting.GetUsageStatistics(request)
    assert len(first.by_period) == 10 and first.next_page_token
    request.page_token = first.next_page_token
    second = await largest.reporting.GetUsageStatistics(request)
    assert second.by_period[0].date < first.by_period[-1].date
    request.start_date = "2026-01-02"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await largest.reporting.GetUsageStatistics(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_statistics_row_at_its_maxima_fits(
    largest: RunningServer, redis_sync: redis.Redis
) -> None:
    """One day with the most document types an org can have (plus '' and _other), each with 64 metrics at the largest figures, fits one answer."""
    await with_largest_plan(largest)
    with redis_sync.pipeline(transaction=False) as pipe:
        seed_day(pipe, "2026-03-15", MAX_DOCUMENT_TYPES + 2, [*PLANNED, *UNPLANNED])
        pipe.execute()
    reply = await largest.reporting.GetUsageStatistics(
        R.GetUsageStatisticsRequest(
            org_id=ORG,
            period=R.STATISTICS_PERIOD_MONTHLY,
            group_by=R.STATISTICS_GROUPING_BOTH,
            start_date="2025-03-16",
            end_date="2026-03-15",
        )
    )
    fits(reply)
    assert not reply.next_page_token


async def test_list_usage_records_at_its_maxima(largest: RunningServer) -> None:
    """A page of 1,000 records with the longest ids and types and 32 metrics each fits one answer."""
    await with_largest_plan(largest)
    for chunk in chunks(range(1000), MAX_BATCH_ENTRIES // 32):
        await largest.quota.RecordUsageBatch(
            Q.RecordUsageBatchRequest(
                items=[
                    Q.RecordUsageRequest(
                        org_id=ORG,
                        request_id=request_id(i),
                        units=dict.fromkeys(PLANNED, MAX_UNITS),
                        document_type="d" * 64,
                        success=i % 2 == 0,
                    )
                    for i in chunk
                ]
            )
        )
    reply = await largest.reporting.ListUsageRecords(
        R.ListUsageRecordsRequest(org_id=ORG, page_size=1000)
    )
    fits(reply)
    assert len(reply.records) == 1000


# -- AdminService -------------------------------------------------------------------------------


async def test_audit_pages_of_the_largest_plan_changes_fit(largest: RunningServer) -> None:
    """A page size of 1,000 over 1,000 changes of the largest plan comes in answers under 4 MiB that together list every event once."""
    for index in range(1000):
        await largest.admin.SetPlan(
            admin_pb2.SetPlanRequest(plan=largest_plan(name=f"{index:04d}".ljust(128, "n")))
        )
    request = admin_pb2.ListAuditEventsRequest(org_id=ORG, page_size=1000)
    seen: list[str] = []
    while True:
        reply = await largest.admin.ListAuditEvents(request)
        fits(reply)
        seen += [event.event_id for event in reply.events]
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert len(seen) == len(set(seen)) == 1000


async def test_api_keys_are_capped_so_their_list_fits(largest: RunningServer) -> None:
    """An organization may have 1,000 API keys (revoked ones included); their list fits one answer and a 1,001st is FAILED_PRECONDITION."""
    for _ in range(1000):
        await largest.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(org_id=ORG, name="k" * 128))
    reply = await largest.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(org_id=ORG))
    fits(reply)
    assert len(reply.keys) == 1000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await largest.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(org_id=ORG, name="k"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_get_plan_and_single_calls_at_their_maxima(largest: RunningServer) -> None:
    """SetPlan, GetPlan, CheckQuota, RecordUsage, ReleaseQuota, GrantCredits and AdjustUsage with the largest plan, 32 metrics and the longest ids fit."""
    set_reply = await largest.admin.SetPlan(admin_pb2.SetPlanRequest(plan=largest_plan()))
    fits(set_reply)
    fits(await largest.admin.GetPlan(admin_pb2.GetPlanRequest(org_id=ORG)))
    check = await largest.quota.CheckQuota(
        Q.CheckQuotaRequest(
            org_id=ORG, units=dict.fromkeys(PLANNED, MAX_UNITS), request_id=request_id(1), hold=True
        )
    )
    fits(check)
    fits(
        await largest.quota.RecordUsage(
            Q.RecordUsageRequest(
                org_id=ORG, request_id=request_id(1), units=dict.fromkeys(PLANNED, MAX_UNITS)
            )
        )
    )
    held_again = await largest.quota.CheckQuota(
        Q.CheckQuotaRequest(
            org_id=ORG, units=dict.fromkeys(PLANNED, MAX_UNITS), request_id=request_id(2), hold=True
        )
    )
    assert held_again.held
    released = await largest.quota.ReleaseQuota(
        Q.ReleaseQuotaRequest(org_id=ORG, request_id=request_id(2))
    )
    fits(released)
    assert len(released.released_units) == 32
    fits(
        await largest.admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(
                org_id=ORG, metric=PLANNED[0], units=MAX_UNITS, grant_id="g" * 128, reason="r" * 256
            )
        )
    )
    fits(
        await largest.admin.AdjustUsage(
            admin_pb2.AdjustUsageRequest(
                org_id=ORG,
                metric=PLANNED[0],
                units=-MAX_UNITS,
                reason="r" * 256,
                adjustment_id="a" * 128,
            )
        )
    )
