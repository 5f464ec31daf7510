"""Rollover: part of the contract quota a billing period left unused becomes a
grant of the next period (decision 42), decided in the same scripts as the rules.

The plan is set on January 10th, so February is a period wholly under it and
March (START_MS is March 15th) takes February's unused quota in.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
import redis.asyncio as aioredis

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.domain.credits import ACTIVE, EXPIRED, VOIDED, Grant
from pagemeter_server.domain.decisions import CheckCall, CheckResult, RecordCall, RecordResult
from pagemeter_server.domain.errors import InvalidArgument, NotFound
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.quota import Store
from tests.conftest import ON_EACH_BACKEND, START_MS, metric_limits, ms

pytestmark = ON_EACH_BACKEND

Q = quota_pb2
JAN_10 = ms("2026-01-10T00:00:00+00:00")
FEB_10 = ms("2026-02-10T00:00:00+00:00")
MAR_1 = ms("2026-03-01T00:00:00+00:00")
APR_1 = ms("2026-04-01T00:00:00+00:00")
NOW = START_MS
GRANT = "rollover-2026-03-pages"


@pytest.fixture
def migrated(store: Store, plans_migrated: None) -> Store:
    return store


async def set_plan(store: Store, at_ms: int = JAN_10, tz: str = "UTC", **fields: object) -> None:
    terms: dict[str, object] = {"contract_quota": 100, "rollover_percent": 50}
    terms.update(fields)
    terms = {k: v for k, v in terms.items() if v is not None}
    plan = plan_pb2.Plan(
        org_id="acme", name="Rolling", timezone=tz, metrics=[metric_limits("pages", **terms)]
    )
    await store.set_plan("acme", plan_to_doc(plan, tz), now_ms=at_ms)


async def check(
    store: Store, pages: int, *, at_ms: int = NOW, hold: str = "", ttl_ms: int = 600_000
) -> CheckResult:
    call = CheckCall({"pages": pages}, request_id=hold, hold=bool(hold), hold_ttl_ms=ttl_ms)
    return await store.check("acme", call, now_ms=at_ms)


async def record(
    store: Store, request_id: str, pages: int, *, at_ms: int = NOW, completed_ms: int | None = None
) -> RecordResult:
    call = RecordCall(
        request_id=request_id,
        units={"pages": pages},
        completed_ms=at_ms if completed_ms is None else completed_ms,
        completed_given=completed_ms is not None,
        success=True,
        requested_ms=None,
        document_type="",
    )
    return await store.record("acme", call, now_ms=at_ms)


async def rollover(store: Store, at_ms: int = NOW) -> Grant | None:
    grants = [
        g for g in await store.credit_grants("acme", now_ms=at_ms) if g.grant_id.startswith("roll")
    ]
    assert len(grants) <= 1
    return grants[0] if grants else None


async def test_half_of_the_unused_quota_rolls_into_the_next_period(migrated: Store) -> None:
    """February used 60 of 100: March takes 20 in, usable after the quota, before overage, only until March ends."""
    await set_plan(migrated)
    await record(migrated, "feb", 60, at_ms=FEB_10)
    grant = await rollover(migrated)
    assert grant is not None
    assert (grant.grant_id, grant.units, grant.remaining) == (GRANT, 20, 20)
    assert (grant.effective_ms, grant.expires_ms, grant.priority) == (MAR_1, APR_1, 50)
    assert grant.status(NOW) == ACTIVE

    fits = await check(migrated, 120)
    assert fits.allowed and fits.metrics[0].reason == Q.DECISION_REASON_PREPAID
    assert (fits.metrics[0].included, fits.metrics[0].prepaid) == (100, 20)
    over = await check(migrated, 121)
    assert not over.allowed and over.metrics[0].reason == Q.DECISION_REASON_QUOTA_EXCEEDED
    assert over.metrics[0].max_admissible == 120

    done = await record(migrated, "mar", 110)
    assert (done.metrics[0].included, done.metrics[0].prepaid, done.metrics[0].overage) == (
        100,
        10,
        0,
    )
    drawn = await rollover(migrated)
    assert drawn is not None and (drawn.units, drawn.remaining) == (20, 10)
    assert (await migrated.usage("acme", now_ms=NOW)).credits == {"pages": 10}

    # April: March used all its quota, so nothing rolls over, and March's
    # rollover no longer counts.
    assert await rollover(migrated, APR_1) is None
    april = await check(migrated, 101, at_ms=APR_1 + 1)
    assert april.metrics[0].reason == Q.DECISION_REASON_QUOTA_EXCEEDED
    assert april.metrics[0].prepaid_available == 0


async def test_the_cap_bounds_what_rolls_over(migrated: Store) -> None:
    """An unused February (100) at 50% would give 50; a cap of 30 gives 30."""
    await set_plan(migrated, rollover_cap=30)
    grant = await rollover(migrated)
    assert grant is not None and grant.units == 30
    assert (await check(migrated, 130)).allowed
    assert not (await check(migrated, 131)).allowed


async def test_rounding_is_down(migrated: Store) -> None:
    """7 unused at 50% is 3.5: 3 units roll over, never a fraction."""
    await set_plan(migrated, contract_quota=10)
    await record(migrated, "feb", 3, at_ms=FEB_10)
    grant = await rollover(migrated)
    assert grant is not None and grant.units == 3


async def test_a_period_not_wholly_under_a_plan_rolls_nothing_over(migrated: Store) -> None:
    """An organization that joined on February 10th has no rollover in March, and one in April."""
    await set_plan(migrated, at_ms=FEB_10)
    assert await rollover(migrated) is None
    assert (await check(migrated, 101)).metrics[0].prepaid_available == 0
    april = await rollover(migrated, APR_1)
    assert april is not None and april.grant_id == "rollover-2026-04-pages"
    assert april.units == 50


async def test_the_unused_quota_is_measured_against_the_quota_the_period_ended_with(
    migrated: Store,
) -> None:
    """An upgrade in March from 100 to 1,000 does not make February's unused quota 940."""
    await set_plan(migrated)
    await record(migrated, "feb", 60, at_ms=FEB_10)
    await set_plan(migrated, at_ms=MAR_1 + 1, contract_quota=1000)
    grant = await rollover(migrated)
    assert grant is not None and grant.units == 20
    assert (await check(migrated, 1020)).allowed
    assert not (await check(migrated, 1021)).allowed


async def test_percent_and_cap_are_the_current_plans(migrated: Store) -> None:
    """Whether March takes a rollover in is up to the plan in effect: dropping the rollover drops the grant."""
    await set_plan(migrated)
    await set_plan(migrated, at_ms=MAR_1 + 1, rollover_percent=100)
    grant = await rollover(migrated)
    assert grant is not None and grant.units == 100
    await set_plan(migrated, at_ms=MAR_1 + 2, rollover_percent=None)
    assert await rollover(migrated) is None
    assert (await check(migrated, 101)).metrics[0].prepaid_available == 0


async def test_a_late_record_of_the_previous_period_lowers_the_rollover(migrated: Store) -> None:
    """A job completed in February and recorded in March counts in February: it uses
    quota February left, so the rollover shrinks, and it pays nothing from March's rollover."""
    await set_plan(migrated)
    await record(migrated, "feb", 60, at_ms=FEB_10)
    assert (await rollover(migrated)).units == 20  # type: ignore[union-attr]
    late = await record(migrated, "late", 50, completed_ms=MAR_1 - 1)
    assert late.month_id == "2026-02"
    # 40 of February's quota were left: 40 included, 10 over (no overage
    # allowed, so flagged), none paid from March's rollover.
    assert (late.metrics[0].included, late.metrics[0].prepaid) == (40, 0)
    assert await rollover(migrated) is None


async def test_a_late_record_in_a_batch_shrinks_the_rollover_for_the_items_after_it(
    migrated: Store,
) -> None:
    """In one RecordUsageBatch: a March job draws 5 of the 20 rolled over, a late
    February job then uses the 40 February left (so the rollover is worth 0), and
    a March job after it draws nothing more."""
    await set_plan(migrated)
    await record(migrated, "feb", 60, at_ms=FEB_10)

    def job(request_id: str, pages: int, completed_ms: int = NOW) -> RecordCall:
        return RecordCall(
            request_id=request_id,
            units={"pages": pages},
            completed_ms=completed_ms,
            completed_given=True,
            success=True,
            requested_ms=None,
            document_type="",
        )

    results = await migrated.record_batch(
        "acme",
        [job("march-1", 105), job("february", 40, MAR_1 - 1), job("march-2", 10)],
        now_ms=NOW,
    )
    splits = [(r.metrics[0].included, r.metrics[0].prepaid) for r in results]  # type: ignore[union-attr]
    assert splits == [(100, 5), (40, 0), (0, 0)]
    grant = await rollover(migrated)
    assert grant is None, "worth 0 now: February used its whole quota"


async def test_a_hold_on_rollover_credits_open_at_the_period_end(migrated: Store) -> None:
    """A hold placed on March 31st reserves rollover credits; committed in April,
    the rollover has expired, and the units are priced as April's."""
    await set_plan(migrated, overage_allowed=True)
    late_march = APR_1 - 60_000
    await record(migrated, "mar", 100, at_ms=late_march - 1)
    held = await check(migrated, 10, at_ms=late_march, hold="job", ttl_ms=3_600_000)
    assert held.held and held.metrics[0].prepaid == 10
    assert (await check(migrated, 41, at_ms=late_march)).metrics[0].prepaid == 40
    done = await record(migrated, "job", 10, at_ms=APR_1 + 60_000)
    assert done.month_id == "2026-04"
    assert (done.metrics[0].included, done.metrics[0].prepaid) == (10, 0)
    march = await migrated.credit_grants("acme", now_ms=APR_1 + 60_000)
    assert [g.grant_id for g in march] == [], "March's rollover is no longer listed"


async def test_a_rollover_is_drawn_in_order_with_other_grants(migrated: Store) -> None:
    """Priority first, then the earliest expiry: a priority 10 grant goes before the
    rollover (priority 50, expiring at the period's end), which goes before a
    priority 50 grant that never expires."""
    await set_plan(migrated, rollover_cap=20)
    await migrated.grant_credits("acme", "pages", 5, "first", "", now_ms=NOW, priority=10)
    await migrated.grant_credits("acme", "pages", 50, "last", "", now_ms=NOW)
    await record(migrated, "used", 100 + 5 + 15)
    grants = {g.grant_id: g.remaining for g in await migrated.credit_grants("acme", now_ms=NOW)}
    assert grants == {"first": 0, GRANT: 5, "last": 50}
    await record(migrated, "more", 10)
    grants = {g.grant_id: g.remaining for g in await migrated.credit_grants("acme", now_ms=NOW)}
    assert grants == {"first": 0, GRANT: 0, "last": 45}


async def test_voiding_a_rollover(migrated: Store) -> None:
    """A voided rollover stops counting at once, says so when listed, is voided once, and leaves an audit entry."""
    await set_plan(migrated)
    await record(migrated, "mar", 110)
    assert await migrated.void_grant("acme", GRANT, "goodwill undone", now_ms=NOW) == (40, False)
    assert await migrated.void_grant("acme", GRANT, "again", now_ms=NOW) == (0, True)
    grant = await rollover(migrated)
    assert grant is not None and grant.status(NOW) == VOIDED and grant.remaining == 0
    assert (await check(migrated, 1)).metrics[0].reason == Q.DECISION_REASON_QUOTA_EXCEEDED
    entries = cast(
        list[tuple[str, dict[str, str]]], await migrated.client.xrange("pm:{acme}:audit")
    )
    voids = [fields for _, fields in entries if fields["action"] == "credits.void"]
    assert len(voids) == 1 and GRANT in voids[0]["before"]
    # A rollover of a period that is over, or of a metric that has none, is not found.
    with pytest.raises(NotFound):
        await migrated.void_grant("acme", "rollover-2026-02-pages", "r", now_ms=NOW)
    with pytest.raises(NotFound):
        await migrated.void_grant("acme", "rollover-2026-03-docs", "r", now_ms=NOW)


async def test_an_expired_rollover_is_listed_as_expired_at_its_end(migrated: Store) -> None:
    """The grant's expiry is the period's end: one millisecond before, it counts."""
    await set_plan(migrated)
    grant = await rollover(migrated, APR_1 - 1)
    assert grant is not None and grant.status(APR_1 - 1) == ACTIVE
    assert grant.status(APR_1) == EXPIRED
    assert (await check(migrated, 150, at_ms=APR_1 - 1)).allowed


async def test_anchored_periods_roll_over_from_the_anchored_period_before(
    migrated: Store,
) -> None:
    """With periods from the 20th, March 15th is in the period from February 20th,
    whose previous period ran from January 20th."""
    doc_plan = plan_pb2.Plan(
        org_id="acme",
        name="Anchored",
        timezone="UTC",
        metrics=[metric_limits("pages", contract_quota=100, rollover_percent=100)],
    )
    doc_plan.billing_anchor.FromMilliseconds(ms("2025-12-20T00:00:00+00:00"))
    await migrated.set_plan("acme", plan_to_doc(doc_plan, "UTC"), now_ms=JAN_10)
    await record(migrated, "jan", 30, at_ms=ms("2026-02-01T00:00:00+00:00"))
    grant = await rollover(migrated)
    assert grant is not None
    assert (grant.grant_id, grant.units) == ("rollover-2026-02-20-pages", 70)
    assert grant.expires_ms == ms("2026-03-20T00:00:00+00:00")


async def test_lifetime_and_unlimited_metrics_have_no_rollover_terms() -> None:
    """The plan is refused: a rollover needs a quota and a period."""
    for fields in (
        {"rollover_percent": 50},
        {"contract_quota": 10, "rollover_percent": 50, "period": plan_pb2.PERIOD_NONE},
        {"contract_quota": 10, "rollover_percent": 0},
        {"contract_quota": 10, "rollover_percent": 101},
        {"contract_quota": 10, "rollover_cap": 5},
        {"contract_quota": 10, "rollover_percent": 5, "rollover_cap": -1},
    ):
        plan = plan_pb2.Plan(
            org_id="acme", name="x", timezone="UTC", metrics=[metric_limits("pages", **fields)]
        )
        with pytest.raises(InvalidArgument):
            plan_to_doc(plan, "UTC")


async def test_concurrent_holds_admit_exactly_the_rollover(migrated: Store) -> None:
    """Quota used up, 20 rolled over, no overage: of 100 concurrent one-page holds
    exactly 20 are admitted, and of 100 concurrent records exactly those 20 draw on it."""
    await set_plan(migrated)
    await record(migrated, "feb", 60, at_ms=FEB_10)
    await record(migrated, "mar", 100)
    checks = await asyncio.gather(*(check(migrated, 1, hold=f"h{i}") for i in range(100)))
    assert sum(result.held for result in checks) == 20
    # The 20 held jobs and 80 jobs without a hold, recorded at once: the held
    # ones get the units their holds reserved, the others nothing.
    held = {f"h{i}" for i, result in enumerate(checks) if result.held}
    jobs = [*held, *(f"r{i}" for i in range(80))]
    records = await asyncio.gather(*(record(migrated, job, 1) for job in jobs))
    paid = {job for job, r in zip(jobs, records, strict=True) if r.metrics[0].prepaid}
    assert paid == held
    grant = await rollover(migrated)
    assert grant is not None and grant.remaining == 0


async def test_the_first_plan_counts_after_the_plan_log_is_trimmed(
    redis_client: aioredis.Redis, plans_migrated: None
) -> None:
    """With 31 days of usage retention, a SetPlan on March 14th drops versions replaced
    before February 12th from the plan log: the one set on January 10th goes, the
    one of February 5th stays. The organization still had a plan when February
    began, so March keeps its rollover."""
    store = Store(
        redis_client, default_timezone="UTC", record_retention_days=31, usage_retention_days=31
    )
    await set_plan(store, at_ms=JAN_10)
    await set_plan(store, at_ms=ms("2026-02-05T00:00:00+00:00"))
    await set_plan(store, at_ms=ms("2026-03-14T00:00:00+00:00"))
    assert len(await redis_client.zrange("pm:{acme}:planlog", 0, -1)) == 2
    grant = await rollover(store)
    assert grant is not None and grant.units == 50
