"""Small edges found by an outside review: each one a number, a token or a
boundary nobody here chose."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from fractions import Fraction

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pagemeter.v1 import admin_pb2, quota_pb2, reporting_pb2
from pagemeter_server.domain.usage import percent_of_limit
from tests.conftest import RunningServer, eagle_plan, examples
from tests.grpc.test_quota_service import snapshot

Q = quota_pb2

NOT_DURATIONS = [
    Duration(seconds=0, nanos=2**31 - 1),
    Duration(seconds=2, nanos=2**31 - 1),
    Duration(seconds=60, nanos=-1),
    Duration(seconds=3, nanos=-500_000_000),
    Duration(seconds=100, nanos=1_000_000_000),
    Duration(seconds=-5, nanos=500_000_000),
]


@pytest.mark.parametrize("ttl", NOT_DURATIONS, ids=lambda d: f"{d.seconds}s{d.nanos}ns")
async def test_a_hold_ttl_that_is_not_a_duration_is_refused(
    pagemeter_server: RunningServer, redis_sync: redis.Redis, ttl: Duration
) -> None:
    """A hold_ttl with nanos out of range or of the other sign is INVALID_ARGUMENT naming hold_ttl, and nothing is held."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    before = snapshot(redis_sync)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.quota.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"pages": 1}, request_id="ttl", hold=True, hold_ttl=ttl
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hold_ttl" in (caught.value.details() or "")
    assert snapshot(redis_sync) == before


@settings(max_examples=examples(300), deadline=None)
@given(
    committed=st.integers(min_value=0, max_value=10**15),
    limit=st.integers(min_value=1, max_value=10**15),
)
def test_usage_percent_is_clean_and_never_rounded_up(committed: int, limit: int) -> None:
    """usage_percent has at most two decimals, no float noise, and never exceeds the exact share (up to 100,000 percent)."""
    assume(committed <= limit * 1000)
    percent = percent_of_limit(committed, limit, None)
    assert percent is not None
    text = repr(percent)
    assert "e" not in text and len(text.partition(".")[2]) <= 2, text
    exact = Fraction(committed * 100, limit)
    assert Fraction(text) <= exact < Fraction(text) + Fraction(1, 100)


async def test_the_reviewed_usage_percent_reads_13_75(pagemeter_server: RunningServer) -> None:
    """1,100 of 8,000 pages is 13.75 percent, not 13.750000000000002."""
    plan = eagle_plan()
    plan.metrics[0].contract_quota = 8000
    plan.metrics[0].hard_limit = 9000
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="j", units={"pages": 1100})
    )
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    pages = {m.metric: m for m in usage.metrics}["pages"]
    assert repr(pages.usage_percent) == "13.75"


async def test_a_page_token_pages_only_the_list_and_org_it_was_issued_for(
    pagemeter_server: RunningServer,
) -> None:
    """A records or audit page token of one organization is INVALID_ARGUMENT for another organization or the other list."""
    for org in ("alpha", "beta"):
        await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org)))
        await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org)))
        for index in range(3):
            await pagemeter_server.quota.RecordUsage(
                Q.RecordUsageRequest(org_id=org, request_id=f"j{index}", units={"pages": 1})
            )
    records = await pagemeter_server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id="alpha", page_size=1)
    )
    audit = await pagemeter_server.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(org_id="alpha", page_size=1)
    )
    assert records.next_page_token and audit.next_page_token
    # The tokens work for their own list and organization...
    await pagemeter_server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id="alpha", page_token=records.next_page_token)
    )
    await pagemeter_server.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(org_id="alpha", page_token=audit.next_page_token)
    )
    # ...and nowhere else.
    misuses: list[Awaitable[object]] = [
        pagemeter_server.reporting.ListUsageRecords(
            reporting_pb2.ListUsageRecordsRequest(org_id="beta", page_token=records.next_page_token)
        ),
        pagemeter_server.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(org_id="beta", page_token=audit.next_page_token)
        ),
        pagemeter_server.reporting.ListUsageRecords(
            reporting_pb2.ListUsageRecordsRequest(org_id="alpha", page_token=audit.next_page_token)
        ),
        pagemeter_server.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(org_id="alpha", page_token=records.next_page_token)
        ),
    ]
    for misuse in misuses:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await misuse
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "period",
    [
        reporting_pb2.STATISTICS_PERIOD_DAILY,
        reporting_pb2.STATISTICS_PERIOD_WEEKLY,
        reporting_pb2.STATISTICS_PERIOD_MONTHLY,
    ],
)
async def test_statistics_spans_end_one_way(
    pagemeter_server: RunningServer, period: reporting_pb2.StatisticsPeriod.ValueType
) -> None:
    """Every period row ends on the last second of its last day, as the summary does, and the rows tile the summary's span without gaps."""
    plan = eagle_plan(timezone="America/New_York")  # a DST change inside the range
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    reply = await pagemeter_server.reporting.GetUsageStatistics(
        reporting_pb2.GetUsageStatisticsRequest(
            org_id="acme", period=period, start_date="2026-02-20", end_date="2026-03-15"
        )
    )
    rows = sorted(reply.by_period, key=lambda row: row.start.seconds)
    assert rows[0].start == reply.summary.period_start
    assert rows[-1].end == reply.summary.period_end
    for earlier, later in itertools.pairwise(rows):
        assert later.start.seconds == earlier.end.seconds + 1
    assert reply.summary.period_end.ToJsonString() == "2026-03-16T03:59:59Z"  # 23:59:59 EDT


async def test_a_released_job_that_ran_anyway_is_recorded(
    pagemeter_server: RunningServer,
) -> None:
    """RecordUsage after ReleaseQuota of the same id records the work (once), a hold with that id is refused, and a release after the record says it was recorded."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    quota = pagemeter_server.quota
    held = await quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 10}, request_id="job", hold=True)
    )
    assert held.held
    released = await quota.ReleaseQuota(Q.ReleaseQuotaRequest(org_id="acme", request_id="job"))
    assert released.outcome == Q.RELEASE_OUTCOME_RELEASED
    # The id's hold is spent: a new hold under it is ALREADY_EXISTS, not a second hold.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await quota.CheckQuota(
            Q.CheckQuotaRequest(org_id="acme", units={"pages": 10}, request_id="job", hold=True)
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The work ran anyway: work done is never dropped, and it is counted once.
    for attempt in range(2):
        record = await quota.RecordUsage(
            Q.RecordUsageRequest(org_id="acme", request_id="job", units={"pages": 7})
        )
        assert record.status == Q.RECORD_STATUS_COMPLETED
        assert record.duplicate == (attempt == 1)
        assert not record.hold_released and not record.hold_expired
    usage = await quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    pages = {m.metric: m for m in usage.metrics}["pages"]
    assert (pages.committed, pages.held) == (7, 0)
    again = await quota.ReleaseQuota(Q.ReleaseQuotaRequest(org_id="acme", request_id="job"))
    assert again.outcome == Q.RELEASE_OUTCOME_ALREADY_RECORDED
