"""Spend caps: a cap in money on a metric's overage per period, decided with the rules."""

from __future__ import annotations

import pytest

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.domain.decisions import CheckCall, CheckResult, RecordCall, RecordResult
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.domain.validation import MAX_LIMIT
from pagemeter_server.store.quota import Store
from tests.conftest import ON_EACH_BACKEND, START_MS, metric_limits

pytestmark = ON_EACH_BACKEND

Q = quota_pb2
NOW = START_MS


@pytest.fixture
def migrated(store: Store, plans_migrated: None) -> Store:
    return store


async def set_plan(store: Store, **fields: object) -> None:
    limits = metric_limits("pages", overage_allowed=True, **fields)
    plan = plan_pb2.Plan(org_id="acme", name="Capped", timezone="UTC", metrics=[limits])
    await store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=NOW)


async def check(store: Store, pages: int, hold: str = "") -> CheckResult:
    call = CheckCall({"pages": pages}, request_id=hold, hold=bool(hold), hold_ttl_ms=600_000)
    return await store.check("acme", call, now_ms=NOW)


async def record(store: Store, request_id: str, pages: int) -> RecordResult:
    call = RecordCall(
        request_id=request_id,
        units={"pages": pages},
        completed_ms=NOW,
        completed_given=False,
        success=True,
        requested_ms=None,
        document_type="",
    )
    return await store.record("acme", call, now_ms=NOW)


async def test_a_spend_cap_is_reached_exactly(migrated: Store) -> None:
    """Quota 100, overage at 0.50, cap 10.00: 20 overage units fit, the 21st is SPEND_CAP_REACHED, and max_admissible says how many still fit."""
    await set_plan(
        migrated, contract_quota=100, overage_price_per_unit="0.50", overage_spend_cap="10.00"
    )
    await record(migrated, "j1", 115)
    exact = await check(migrated, 5)
    assert exact.allowed and exact.metrics[0].reason == Q.DECISION_REASON_OVERAGE
    assert exact.metrics[0].remaining == 0
    over = await check(migrated, 6)
    (decision,) = over.metrics
    assert not over.allowed and decision.reason == Q.DECISION_REASON_SPEND_CAP_REACHED
    assert decision.max_admissible == 5
    await record(migrated, "j2", 5)
    spent = await check(migrated, 1)
    assert spent.metrics[0].reason == Q.DECISION_REASON_SPEND_CAP_REACHED
    assert spent.metrics[0].max_admissible == 0
    assert (await check(migrated, 0)).allowed, "nothing more costs nothing"


async def test_a_cap_that_does_not_divide_the_price_rounds_down(migrated: Store) -> None:
    """Cap 10.00 at 0.30 a unit allows 33 overage units (9.90), not 34 (10.20)."""
    await set_plan(
        migrated, contract_quota=0, overage_price_per_unit="0.30", overage_spend_cap="10"
    )
    assert (await check(migrated, 33)).allowed
    assert (await check(migrated, 34)).metrics[0].reason == Q.DECISION_REASON_SPEND_CAP_REACHED


async def test_holds_and_prepaid_credits(migrated: Store) -> None:
    """Held overage counts against the cap; units paid from prepaid credits are not overage and do not."""
    await set_plan(migrated, contract_quota=10, overage_price_per_unit="1", overage_spend_cap="4")
    await migrated.grant_credits("acme", "pages", 5, "g1", "", now_ms=NOW)
    # 10 included + 5 prepaid + 4 overage: everything the cap allows.
    held = await check(migrated, 19, hold="h1")
    assert held.held and held.metrics[0].overage == 4
    assert (await check(migrated, 1)).metrics[0].reason == Q.DECISION_REASON_SPEND_CAP_REACHED
    await migrated.release("acme", "h1", now_ms=NOW)
    assert (await check(migrated, 19)).allowed


async def test_a_record_past_the_cap_is_kept_and_flagged(migrated: Store) -> None:
    """Work done is recorded even past the cap; the record says over_spend_cap and over_limit."""
    await set_plan(migrated, contract_quota=0, overage_price_per_unit="2", overage_spend_cap="10")
    inside = await record(migrated, "j1", 5)
    assert not inside.over_limit and not inside.metrics[0].over_spend_cap
    past = await record(migrated, "j2", 1)
    assert past.over_limit and past.metrics[0].over_spend_cap
    assert past.metrics[0].committed == 6


async def test_overage_that_costs_nothing_is_never_capped(migrated: Store) -> None:
    """At an overage price of 0 the cap never binds."""
    await set_plan(migrated, contract_quota=0, overage_spend_cap="1")
    assert (await check(migrated, 10**6)).allowed


async def test_the_largest_cap_at_the_smallest_price_admits_the_largest_amounts(
    migrated: Store,
) -> None:
    """A cap of 999,999,999,999.999999999 at 0.000000001 a unit (10^21 units, clamped to the largest limit) admits the largest amounts and still refuses nothing it should not."""
    await set_plan(
        migrated,
        contract_quota=0,
        overage_price_per_unit="0.000000001",
        overage_spend_cap="999999999999.999999999",
    )
    stored = await migrated.get_plan("acme")
    assert stored is not None
    assert stored.doc["metrics"]["pages"]["overage_unit_cap"] == MAX_LIMIT
    result = await check(migrated, 10**9)
    assert result.allowed and result.metrics[0].overage == 10**9
