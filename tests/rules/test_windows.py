"""Windows per metric: minute, hour, day and week caps decided with the period's quota.

Each test drives check.lua and record.lua through the store with a controlled
clock against a real Redis, as tests/rules/test_rules_lua.py does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.domain.decisions import CheckCall, CheckResult, RecordCall, RecordResult
from pagemeter_server.domain.errors import PlansNotMigrated
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.quota import Store
from tests.conftest import ON_EACH_BACKEND, metric_limits

pytestmark = ON_EACH_BACKEND

Q = quota_pb2
P = plan_pb2
# Wednesday 2026-03-18 10:30:00 UTC: mid-hour, mid-day, mid-week.
NOW = int(datetime(2026, 3, 18, 10, 30, tzinfo=UTC).timestamp() * 1000)
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def window(kind: P.Window.ValueType, limit: int, soft: bool = False) -> P.WindowLimit:
    return P.WindowLimit(window=kind, limit=limit, soft=soft)


@pytest.fixture
def migrated(store: Store, plans_migrated: None) -> Store:
    """The store of a deployment whose plans are in the current document."""
    return store


async def set_plan(
    store: Store, *limits: P.MetricLimits, timezone: str = "UTC", now_ms: int = NOW
) -> None:
    plan = P.Plan(org_id="acme", name="Windows", timezone=timezone, metrics=list(limits))
    await store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=now_ms)


async def check(
    store: Store, units: dict[str, int], now_ms: int = NOW, *, hold: str = ""
) -> CheckResult:
    call = CheckCall(units, request_id=hold, hold=bool(hold), hold_ttl_ms=10 * MINUTE)
    return await store.check("acme", call, now_ms=now_ms)


async def record(
    store: Store, request_id: str, units: dict[str, int], now_ms: int = NOW, completed_ms: int = 0
) -> RecordResult:
    call = RecordCall(
        request_id=request_id,
        units=units,
        completed_ms=completed_ms or now_ms,
        completed_given=bool(completed_ms),
        success=True,
        requested_ms=None,
        document_type="",
    )
    return await store.record("acme", call, now_ms=now_ms)


async def test_a_daily_cap_denies_past_it_and_names_the_window(migrated: Store) -> None:
    """With 10 pages a day and no monthly quota, 10 are admitted, the 11th is WINDOW_LIMIT_EXCEEDED naming the day window, and max_admissible/remaining are the window's."""
    await set_plan(migrated, metric_limits("pages", windows=[window(P.WINDOW_DAY, 10)]))
    first = await check(migrated, {"pages": 6})
    assert first.allowed and first.metrics[0].remaining == 4
    await record(migrated, "j1", {"pages": 6})
    exact = await check(migrated, {"pages": 4})
    assert exact.allowed and exact.metrics[0].remaining == 0
    await record(migrated, "j2", {"pages": 4})
    denied = await check(migrated, {"pages": 1})
    (decision,) = denied.metrics
    assert not denied.allowed
    assert decision.reason == Q.DECISION_REASON_WINDOW_LIMIT_EXCEEDED
    assert decision.denied_by == "day"
    assert decision.max_admissible == 0
    (state,) = decision.windows
    assert (state.window, state.limit, state.used, state.exceeded) == ("day", 10, 10, True)


async def test_the_next_day_starts_at_zero(migrated: Store) -> None:
    """A full daily window admits again from local midnight of the next day."""
    await set_plan(migrated, metric_limits("pages", windows=[window(P.WINDOW_DAY, 5)]))
    await record(migrated, "j1", {"pages": 5})
    assert not (await check(migrated, {"pages": 1})).allowed
    midnight = int(datetime(2026, 3, 19, tzinfo=UTC).timestamp() * 1000)
    assert not (await check(migrated, {"pages": 1}, now_ms=midnight - 1)).allowed
    assert (await check(migrated, {"pages": 5}, now_ms=midnight)).allowed


async def test_days_and_weeks_follow_the_plans_timezone(migrated: Store) -> None:
    """In America/New_York the day window ends at local midnight (04:00 UTC in March after the DST change), not at 00:00 UTC, and the week on Monday 00:00 local."""
    tz = "America/New_York"
    await set_plan(
        migrated,
        metric_limits("pages", windows=[window(P.WINDOW_DAY, 5), window(P.WINDOW_WEEK, 8)]),
        timezone=tz,
    )
    await record(migrated, "j1", {"pages": 5})
    utc_midnight = int(datetime(2026, 3, 19, tzinfo=UTC).timestamp() * 1000)
    local_midnight = int(datetime(2026, 3, 19, tzinfo=ZoneInfo(tz)).timestamp() * 1000)
    assert local_midnight - utc_midnight == 4 * HOUR
    assert not (await check(migrated, {"pages": 1}, now_ms=utc_midnight)).allowed
    # A new local day, but the week still counts Wednesday's 5: 3 more fit, 4 do not.
    assert (await check(migrated, {"pages": 4}, now_ms=local_midnight)).metrics[0].denied_by == (
        "week"
    )
    next_day = await check(migrated, {"pages": 3}, now_ms=local_midnight)
    assert next_day.allowed and next_day.metrics[0].remaining == 0
    assert next_day.metrics[0].windows[0].used == 0
    assert next_day.metrics[0].windows[1].used == 5
    await record(migrated, "j2", {"pages": 3}, now_ms=local_midnight)
    sunday_night = int(datetime(2026, 3, 22, 23, 59, tzinfo=ZoneInfo(tz)).timestamp() * 1000)
    late = await check(migrated, {"pages": 1}, now_ms=sunday_night)
    assert late.metrics[0].denied_by == "week"
    monday = int(datetime(2026, 3, 23, tzinfo=ZoneInfo(tz)).timestamp() * 1000)
    assert (await check(migrated, {"pages": 5}, now_ms=monday)).allowed


async def test_live_holds_count_against_every_window(migrated: Store) -> None:
    """A hold of 8 on a 10-a-minute, 12-an-hour metric leaves 2 in the minute; after it is released the minute admits 10 again, and an expired hold stops counting."""
    await set_plan(
        migrated,
        metric_limits("pages", windows=[window(P.WINDOW_MINUTE, 10), window(P.WINDOW_HOUR, 12)]),
    )
    held = await check(migrated, {"pages": 8}, hold="h1")
    assert held.held
    over = await check(migrated, {"pages": 3})
    assert over.metrics[0].denied_by == "minute" and over.metrics[0].max_admissible == 2
    assert [w.used for w in over.metrics[0].windows] == [8, 8]
    await migrated.release("acme", "h1", now_ms=NOW)
    assert (await check(migrated, {"pages": 10})).allowed
    await check(migrated, {"pages": 10}, hold="h2")
    after_expiry = NOW + 10 * MINUTE
    assert (await check(migrated, {"pages": 10}, now_ms=after_expiry)).allowed


async def test_a_denied_window_holds_nothing_of_any_metric(migrated: Store) -> None:
    """All or nothing: a call whose second metric passes its hourly cap places no hold for either metric, and the first metric's windows are untouched."""
    await set_plan(
        migrated,
        metric_limits("documents", windows=[window(P.WINDOW_HOUR, 100)]),
        metric_limits("pages", windows=[window(P.WINDOW_HOUR, 10)]),
    )
    denied = await check(migrated, {"documents": 1, "pages": 11}, hold="h1")
    assert not denied.allowed and not denied.held
    after = await check(migrated, {"documents": 100, "pages": 10})
    assert after.allowed
    assert [m.windows[0].used for m in after.metrics] == [0, 0]


async def test_the_period_quota_speaks_before_a_window(migrated: Store) -> None:
    """When both the monthly quota and a daily window would deny, the reason is QUOTA_EXCEEDED: waiting for the day would not help."""
    await set_plan(
        migrated,
        metric_limits(
            "pages", contract_quota=5, overage_allowed=False, windows=[window(P.WINDOW_DAY, 5)]
        ),
    )
    await record(migrated, "j1", {"pages": 5})
    denied = await check(migrated, {"pages": 1})
    assert denied.metrics[0].reason == Q.DECISION_REASON_QUOTA_EXCEEDED


async def test_a_soft_window_reports_but_never_denies(migrated: Store) -> None:
    """Passing a soft daily window is admitted; the window says it was exceeded."""
    await set_plan(migrated, metric_limits("pages", windows=[window(P.WINDOW_DAY, 5, soft=True)]))
    await record(migrated, "j1", {"pages": 5})
    result = await check(migrated, {"pages": 3})
    assert result.allowed and result.metrics[0].reason == Q.DECISION_REASON_WITHIN_QUOTA
    (state,) = result.metrics[0].windows
    assert state.soft and state.exceeded and state.used == 5
    assert result.metrics[0].max_admissible is None, "a soft window caps nothing"


async def test_records_count_in_the_windows_of_completed_at(migrated: Store) -> None:
    """A record adds to the minute, hour, day and week of its completed_at; a record past a hard window is over_limit; a late report adds nothing to a minute that has ended."""
    await set_plan(
        migrated,
        metric_limits(
            "pages",
            windows=[
                window(P.WINDOW_MINUTE, 4),
                window(P.WINDOW_HOUR, 100),
                window(P.WINDOW_DAY, 100),
                window(P.WINDOW_WEEK, 100),
            ],
        ),
    )
    first = await record(migrated, "j1", {"pages": 3})
    assert [(w.window, w.used) for w in first.metrics[0].windows] == [
        ("minute", 3),
        ("hour", 3),
        ("day", 3),
        ("week", 3),
    ]
    assert not first.over_limit
    second = await record(migrated, "j2", {"pages": 2})
    assert second.over_limit and second.metrics[0].windows[0].exceeded
    # Reported two minutes late: the hour, day and week count it, the ended minute does not.
    late = await record(migrated, "j3", {"pages": 1}, now_ms=NOW + 2 * MINUTE, completed_ms=NOW)
    assert [w.used for w in late.metrics[0].windows] == [5, 6, 6, 6]
    duplicate = await record(
        migrated, "j3", {"pages": 1}, now_ms=NOW + 3 * MINUTE, completed_ms=NOW
    )
    assert duplicate.duplicate and [w.used for w in duplicate.metrics[0].windows] == [5, 6, 6, 6]


async def test_window_counters_expire_after_their_window(migrated: Store) -> None:
    """A minute's counters live about a minute past its end, not for the usage retention."""
    await set_plan(migrated, metric_limits("pages", windows=[window(P.WINDOW_MINUTE, 10)]))
    await record(migrated, "j1", {"pages": 1})
    keys = [key async for key in migrated.client.scan_iter(match="*w:minute:*")]
    assert len(keys) == 1
    ttl = await migrated.client.pttl(keys[0])
    assert 0 < ttl <= 2 * MINUTE


async def test_a_plan_with_windows_waits_for_the_migrated_plan_document(store: Store) -> None:
    """Before the deployment's plans are migrated, SetPlan with windows is refused (an earlier release would ignore them) and nothing is stored; without windows it is stored."""
    with pytest.raises(PlansNotMigrated, match="migrate-plans"):
        await set_plan(store, metric_limits("pages", windows=[window(P.WINDOW_DAY, 5)]))
    assert await store.get_plan("acme") is None
    await set_plan(store, metric_limits("pages", contract_quota=5))
    assert await store.get_plan("acme") is not None


async def test_a_shadow_window_never_denies_but_says_it_would(migrated: Store) -> None:
    """A shadow daily window of 5 admits a sixth page; the decision says WINDOW_LIMIT_EXCEEDED would have denied it, by the day, and caps nothing."""
    await set_plan(
        migrated,
        metric_limits("pages", windows=[P.WindowLimit(window=P.WINDOW_DAY, limit=5, shadow=True)]),
    )
    await record(migrated, "j1", {"pages": 5})
    inside = await check(migrated, {"pages": 0})
    assert inside.metrics[0].would_deny is None, "the window is full, not passed"
    result = await check(migrated, {"pages": 1}, hold="h1")
    (decision,) = result.metrics
    assert result.allowed and result.held
    assert decision.reason == Q.DECISION_REASON_WITHIN_QUOTA
    assert (decision.would_deny, decision.would_deny_window) == (
        Q.DECISION_REASON_WINDOW_LIMIT_EXCEEDED,
        "day",
    )
    assert decision.max_admissible is None
    (state,) = decision.windows
    assert state.shadow and state.exceeded and not state.soft


async def test_a_shadow_hard_limit_reports_while_the_real_one_decides(migrated: Store) -> None:
    """With hard_limit 10 and shadow_hard_limit 6: 8 units are admitted with would_deny HARD_LIMIT_EXCEEDED; 11 are denied by the real limit and would be by the shadow one too."""
    await set_plan(migrated, metric_limits("pages", hard_limit=10, shadow_hard_limit=6))
    admitted = await check(migrated, {"pages": 8})
    assert admitted.allowed
    assert admitted.metrics[0].would_deny == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert admitted.metrics[0].would_deny_window == ""
    assert admitted.metrics[0].max_admissible == 10, "the shadow limit caps nothing"
    denied = await check(migrated, {"pages": 11})
    assert denied.metrics[0].reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert denied.metrics[0].would_deny == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert (await check(migrated, {"pages": 6})).metrics[0].would_deny is None


async def test_records_past_a_shadow_window_are_not_over_limit(migrated: Store) -> None:
    """A record past a shadow window reports the window exceeded but is not over_limit."""
    await set_plan(
        migrated,
        metric_limits("pages", windows=[P.WindowLimit(window=P.WINDOW_HOUR, limit=2, shadow=True)]),
    )
    result = await record(migrated, "j1", {"pages": 3})
    assert not result.over_limit
    assert result.metrics[0].windows[0].exceeded and result.metrics[0].windows[0].shadow
