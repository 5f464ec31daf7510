"""Windows per metric over gRPC: plans carry them, decisions and records answer with them."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2
from pagemeter_server.domain.validation import MAX_LIMIT
from tests.conftest import RunningServer, field_violations, metric_limits

Q = quota_pb2
P = plan_pb2
# Wednesday 2026-03-18 10:30:15 UTC.
NOW = int(datetime(2026, 3, 18, 10, 30, 15, tzinfo=UTC).timestamp() * 1000)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def window(kind: P.Window.ValueType, limit: int, soft: bool = False) -> P.WindowLimit:
    return P.WindowLimit(window=kind, limit=limit, soft=soft)


async def set_plan(server: RunningServer, *limits: P.MetricLimits, timezone: str = "UTC") -> None:
    await server.admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=P.Plan(org_id="acme", name="Windows", timezone=timezone, metrics=list(limits))
        )
    )


async def check(server: RunningServer, pages: int, **fields: object) -> Q.CheckQuotaResponse:
    request = Q.CheckQuotaRequest(org_id="acme", units={"pages": pages}, **fields)  # type: ignore[arg-type]
    response: Q.CheckQuotaResponse = await server.quota.CheckQuota(request)
    return response


async def record(server: RunningServer, request_id: str, pages: int) -> Q.RecordUsageResponse:
    response: Q.RecordUsageResponse = await server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id=request_id, units={"pages": pages})
    )
    return response


@pytest.fixture
def server(pagemeter_server: RunningServer, plans_migrated: None) -> RunningServer:
    pagemeter_server.clock.set(NOW)
    return pagemeter_server


async def test_get_plan_returns_the_windows_shortest_first(server: RunningServer) -> None:
    """Windows sent in any order come back from GetPlan shortest first, with their limits and softness."""
    await set_plan(
        server,
        metric_limits(
            "pages",
            windows=[
                window(P.WINDOW_WEEK, 500),
                window(P.WINDOW_MINUTE, 5, soft=True),
                window(P.WINDOW_DAY, 100),
            ],
        ),
    )
    plan = (await server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))).plan
    assert [(w.window, w.limit, w.soft) for w in plan.metrics[0].windows] == [
        (P.WINDOW_MINUTE, 5, True),
        (P.WINDOW_DAY, 100, False),
        (P.WINDOW_WEEK, 500, False),
    ]


async def test_a_denied_check_names_the_window_its_reset_and_when_to_retry(
    server: RunningServer,
) -> None:
    """Past 10 pages a minute: WINDOW_LIMIT_EXCEEDED, denied_by WINDOW_MINUTE, the window's start and reset, what is left, and retry_after until the reset."""
    await set_plan(server, metric_limits("pages", windows=[window(P.WINDOW_MINUTE, 10)]))
    await record(server, "j1", 7)
    response = await check(server, 4)
    assert not response.allowed
    assert response.reason == Q.DECISION_REASON_WINDOW_LIMIT_EXCEEDED
    (decision,) = response.metrics
    assert decision.denied_by == P.WINDOW_MINUTE
    (minute,) = decision.windows
    assert (minute.limit, minute.used, minute.remaining, minute.exceeded) == (10, 7, 3, True)
    assert minute.window_start.ToMilliseconds() == ms("2026-03-18T10:30:00+00:00")
    assert minute.resets_at.ToMilliseconds() == ms("2026-03-18T10:31:00+00:00")
    assert response.retry_after.ToMilliseconds() == 45_000
    assert decision.max_admissible == 3


async def test_no_retry_after_when_waiting_cannot_help(server: RunningServer) -> None:
    """Asking for more than the window's whole limit is denied without retry_after."""
    await set_plan(server, metric_limits("pages", windows=[window(P.WINDOW_HOUR, 10)]))
    response = await check(server, 11)
    assert response.reason == Q.DECISION_REASON_WINDOW_LIMIT_EXCEEDED
    assert not response.HasField("retry_after")


async def test_an_admitted_hold_leaves_the_window_its_remainder(server: RunningServer) -> None:
    """An admitted hold of 4 in a 10-a-day window answers remaining 6, and the next check sees it as used."""
    await set_plan(server, metric_limits("pages", windows=[window(P.WINDOW_DAY, 10)]))
    held = await check(server, 4, request_id="h1", hold=True)
    assert held.held and held.metrics[0].windows[0].remaining == 6
    after = await check(server, 0)
    assert after.metrics[0].windows[0].used == 4


async def test_records_answer_with_their_windows(server: RunningServer) -> None:
    """A record answers each window's committed units after it, and over_limit once past a hard window."""
    await set_plan(
        server,
        metric_limits("pages", windows=[window(P.WINDOW_HOUR, 5), window(P.WINDOW_WEEK, 50)]),
    )
    first = await record(server, "j1", 3)
    assert [(w.window, w.used, w.exceeded) for w in first.metrics[0].windows] == [
        (P.WINDOW_HOUR, 3, False),
        (P.WINDOW_WEEK, 3, False),
    ]
    assert first.metrics[0].windows[1].window_start.ToMilliseconds() == ms(
        "2026-03-16T00:00:00+00:00"
    )
    second = await record(server, "j2", 3)
    assert second.over_limit and second.metrics[0].windows[0].exceeded


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (
            metric_limits("pages", windows=[window(P.WINDOW_UNSPECIFIED, 5)]),
            "plan.metrics[0].windows[0].window",
        ),
        (
            metric_limits("pages", windows=[P.WindowLimit(window=9, limit=5)]),  # type: ignore[arg-type]
            "plan.metrics[0].windows[0].window",
        ),
        (
            metric_limits("pages", windows=[window(P.WINDOW_DAY, 5), window(P.WINDOW_DAY, 6)]),
            "plan.metrics[0].windows[1].window",
        ),
        (
            metric_limits("pages", windows=[window(P.WINDOW_DAY, -1)]),
            "plan.metrics[0].windows[0].limit",
        ),
        (
            metric_limits("pages", windows=[window(P.WINDOW_DAY, MAX_LIMIT + 1)]),
            "plan.metrics[0].windows[0].limit",
        ),
        (
            metric_limits("apps", period=P.PERIOD_NONE, windows=[window(P.WINDOW_DAY, 5)]),
            "plan.metrics[0].windows",
        ),
        (
            metric_limits(
                "pages",
                windows=[P.WindowLimit(window=P.WINDOW_DAY, limit=5, soft=True, shadow=True)],
            ),
            "plan.metrics[0].windows[0].shadow",
        ),
        (
            metric_limits("pages", shadow_hard_limit=-1),
            "plan.metrics[0].shadow_hard_limit",
        ),
    ],
    ids=[
        "unspecified",
        "unknown",
        "twice",
        "negative",
        "too-large",
        "lifetime-metric",
        "soft-and-shadow",
        "shadow-hard-limit-negative",
    ],
)
async def test_bad_windows_are_invalid_argument_and_change_nothing(
    server: RunningServer, redis_sync: redis.Redis, limits: P.MetricLimits, field: str
) -> None:
    """A malformed window is INVALID_ARGUMENT naming its field, and the plan is not stored."""
    before = sorted(redis_sync.keys("*"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_plan(server, limits)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert sorted(redis_sync.keys("*")) == before


async def test_windows_before_the_plan_migration_are_a_failed_precondition(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """On a deployment still writing schema 1 plans, SetPlan with windows is FAILED_PRECONDITION naming migrate-plans, and nothing is stored."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_plan(pagemeter_server, metric_limits("pages", windows=[window(P.WINDOW_DAY, 5)]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "migrate-plans" in (caught.value.details() or "")
    assert redis_sync.keys("pm:{acme}:*") == []


async def test_a_batch_decides_windows_item_after_item(server: RunningServer) -> None:
    """In one CheckQuotaBatch, holds of earlier items count against the window of later ones."""
    await set_plan(server, metric_limits("pages", windows=[window(P.WINDOW_DAY, 10)]))
    items = [
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 4}, request_id=f"b{i}", hold=True)
        for i in range(3)
    ]
    batch = await server.quota.CheckQuotaBatch(Q.CheckQuotaBatchRequest(items=items))
    answers = [item.response for item in batch.items]
    assert [a.allowed for a in answers] == [True, True, False]
    assert answers[2].metrics[0].denied_by == P.WINDOW_DAY


async def test_late_reports_are_not_added_to_ended_windows(server: RunningServer) -> None:
    """A job completed two minutes ago counts in its hour but not in its ended minute."""
    await set_plan(
        server,
        metric_limits("pages", windows=[window(P.WINDOW_MINUTE, 100), window(P.WINDOW_HOUR, 100)]),
    )
    completed = Timestamp()
    completed.FromMilliseconds(NOW - 120_000)
    late = await server.quota.RecordUsage(
        Q.RecordUsageRequest(
            org_id="acme", request_id="late", units={"pages": 5}, completed_at=completed
        )
    )
    assert [w.used for w in late.metrics[0].windows] == [0, 5]
    now = await check(server, 0)
    assert [w.used for w in now.metrics[0].windows] == [0, 5]


async def test_shadow_limits_answer_would_deny_and_are_counted(
    server: RunningServer, registry: CollectorRegistry
) -> None:
    """A call a shadow minute window would deny is admitted with would_deny on the call and the metric, the window named, and pagemeter_shadow_denials_total counts it; GetPlan returns the shadow terms."""
    await set_plan(
        server,
        metric_limits(
            "pages",
            shadow_hard_limit=1000,
            windows=[P.WindowLimit(window=P.WINDOW_MINUTE, limit=3, shadow=True)],
        ),
    )
    terms = (await server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))).plan.metrics[0]
    assert terms.shadow_hard_limit == 1000 and terms.windows[0].shadow
    response = await check(server, 4)
    assert response.allowed and response.would_deny
    (decision,) = response.metrics
    assert decision.would_deny
    assert decision.would_deny_reason == Q.DECISION_REASON_WINDOW_LIMIT_EXCEEDED
    assert decision.would_deny_window == P.WINDOW_MINUTE
    assert decision.windows[0].shadow and decision.windows[0].exceeded
    assert not response.HasField("retry_after")
    counted = registry.get_sample_value(
        "pagemeter_shadow_denials_total",
        {"metric": "pages", "reason": "window_limit_exceeded", "window": "minute"},
    )
    assert counted == 1
    quiet = await check(server, 3)
    assert not quiet.would_deny and not quiet.metrics[0].would_deny
