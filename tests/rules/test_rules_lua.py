"""The rules, tested directly on the Lua scripts through the store layer.

Each test sets a plan, drives the scripts with a controlled clock (now_ms is an
argument) against a real Redis server, and asserts the decision and the counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import redis

from pagemeter.v1 import plan_pb2, quota_pb2
from pagemeter_server.domain.decisions import CheckCall, RecordCall, RecordResult
from pagemeter_server.domain.errors import NegativeUnits, RequestIdReused
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.keys import ORGS_KEY
from pagemeter_server.store.quota import Store
from pagemeter_server.store.scripts import SCRIPTS
from tests.conftest import ON_EACH_BACKEND, START_MS, metric_limits

# Each test runs on the suite's Redis and, in the system tier, on a Redis Cluster.
pytestmark = ON_EACH_BACKEND

Q = quota_pb2
NOW = START_MS
MINUTE = 60_000
LUA_DIR = Path(__file__).resolve().parents[2] / "server" / "pagemeter_server" / "store" / "lua"


async def set_plan(
    store: Store, *limits: plan_pb2.MetricLimits, org: str = "acme", **fields: object
) -> None:
    plan = plan_pb2.Plan(org_id=org, name="Test", metrics=list(limits), **fields)  # type: ignore[arg-type]
    await store.set_plan(org, plan_to_doc(plan, "UTC"), now_ms=NOW)


async def usage_of(
    store: Store, metric: str, now_ms: int = NOW, org: str = "acme"
) -> dict[str, int]:
    snapshot = await store.usage(org, now_ms=now_ms)
    return {
        "committed": snapshot.month_fields.get(f"c:{metric}", 0),
        "prepaid_used": snapshot.month_fields.get(f"pp:{metric}", 0),
        "held": snapshot.held_fields.get(f"h:{metric}", 0),
        "held_prepaid": snapshot.held_fields.get(f"hp:{metric}", 0),
        "balance": snapshot.credits.get(metric, 0),
        "jobs_ok": snapshot.month_fields.get("jobs_ok", 0),
        "jobs_failed": snapshot.month_fields.get("jobs_failed", 0),
    }


async def record(
    store: Store,
    request_id: str,
    units: dict[str, int],
    now_ms: int = NOW,
    *,
    completed_ms: int | None = None,
    completed_given: bool = False,
    success: bool = True,
    requested_ms: int | None = None,
    document_type: str = "",
) -> RecordResult:
    return await store.record(
        "acme",
        RecordCall(
            request_id=request_id,
            units=units,
            completed_ms=now_ms if completed_ms is None else completed_ms,
            completed_given=completed_given,
            success=success,
            requested_ms=requested_ms,
            document_type=document_type,
        ),
        now_ms=now_ms,
    )


# -- plans and the basic decision --------------------------------------------------


async def test_no_plan_denies_and_changes_nothing(store: Store, redis_sync: redis.Redis) -> None:
    """An organization without a plan is denied with NO_PLAN and no key is written."""
    result = await store.check(
        "acme", CheckCall({"pages": 1}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    assert result.outcome == "no_plan"
    assert not result.allowed
    assert redis_sync.keys("*") == []


async def test_exactly_at_quota_is_admitted_and_one_more_is_denied(store: Store) -> None:
    """Units that exactly fill the contract quota are admitted; one unit more is QUOTA_EXCEEDED."""
    await set_plan(store, metric_limits("pages", contract_quota=10, overage_allowed=False))
    first = await store.check("acme", CheckCall({"pages": 10}), now_ms=NOW)
    assert first.allowed and first.metrics[0].reason == Q.DECISION_REASON_WITHIN_QUOTA
    assert first.metrics[0].remaining == 0
    await record(store, "j1", {"pages": 10})
    second = await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)
    assert not second.allowed
    assert second.metrics[0].reason == Q.DECISION_REASON_QUOTA_EXCEEDED
    assert second.metrics[0].max_admissible == 0
    assert second.metrics[0].committed == 10


async def test_one_over_quota_is_denied_with_the_partial_admission_hint(store: Store) -> None:
    """Asking for one unit more than is left is denied, and max_admissible says what would fit."""
    await set_plan(store, metric_limits("pages", contract_quota=10, overage_allowed=False))
    await record(store, "j1", {"pages": 7})
    result = await store.check("acme", CheckCall({"pages": 4}), now_ms=NOW)
    assert not result.allowed
    decision = result.metrics[0]
    assert (decision.reason, decision.max_admissible, decision.remaining) == (
        Q.DECISION_REASON_QUOTA_EXCEEDED,
        3,
        3,
    )
    assert (decision.included, decision.overage) == (3, 1)


async def test_unlimited_metric_always_admits(store: Store) -> None:
    """A metric without contract quota or hard limit admits any amount, with no limit reported."""
    await set_plan(store, metric_limits("pages"))
    result = await store.check("acme", CheckCall({"pages": 1000000000}), now_ms=NOW)
    assert result.allowed
    decision = result.metrics[0]
    assert decision.max_admissible is None and decision.remaining is None
    assert decision.included == 1_000_000_000


async def test_overage_allowed_without_hard_limit(store: Store) -> None:
    """With overage allowed and no hard limit, units past the quota are admitted as overage."""
    await set_plan(
        store,
        metric_limits(
            "pages", contract_quota=2000, overage_allowed=True, overage_price_per_unit="0.028"
        ),
    )
    await record(store, "j1", {"pages": 1990})
    result = await store.check("acme", CheckCall({"pages": 50}), now_ms=NOW)
    assert result.allowed
    decision = result.metrics[0]
    assert decision.reason == Q.DECISION_REASON_OVERAGE
    assert (decision.included, decision.prepaid, decision.overage) == (10, 0, 40)
    assert decision.overage_price == "0.028"
    assert decision.max_admissible is None


async def test_overage_with_hard_limit_stops_at_the_hard_limit(store: Store) -> None:
    """Overage is admitted up to the hard limit exactly; one unit more is HARD_LIMIT_EXCEEDED."""
    await set_plan(
        store, metric_limits("pages", contract_quota=100, overage_allowed=True, hard_limit=150)
    )
    await record(store, "j1", {"pages": 120})
    at_limit = await store.check("acme", CheckCall({"pages": 30}), now_ms=NOW)
    assert at_limit.allowed and at_limit.metrics[0].overage == 30
    over = await store.check("acme", CheckCall({"pages": 31}), now_ms=NOW)
    assert not over.allowed
    assert over.metrics[0].reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert over.metrics[0].max_admissible == 30


async def test_hard_limit_counts_held_units(store: Store) -> None:
    """Units held by other jobs count against the hard limit: committed + held + n > limit denies."""
    await set_plan(store, metric_limits("pages", overage_allowed=True, hard_limit=10))
    held = await store.check(
        "acme", CheckCall({"pages": 6}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    assert held.held
    result = await store.check("acme", CheckCall({"pages": 5}), now_ms=NOW)
    assert not result.allowed
    assert result.metrics[0].reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert result.metrics[0].held == 6
    assert result.metrics[0].max_admissible == 4


async def test_hard_limit_below_quota_wins(store: Store) -> None:
    """A hard limit lower than the contract quota caps admission even inside the quota."""
    await set_plan(store, metric_limits("pages", contract_quota=100, hard_limit=40))
    result = await store.check("acme", CheckCall({"pages": 41}), now_ms=NOW)
    assert not result.allowed and result.metrics[0].reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    assert result.metrics[0].max_admissible == 40


# -- prepaid credits --------------------------------------------------------------


async def test_prepaid_credits_are_drawn_after_quota_and_before_overage(store: Store) -> None:
    """Beyond the quota, prepaid credits pay first and only the rest is overage."""
    await set_plan(
        store,
        metric_limits(
            "pages", contract_quota=10, overage_allowed=True, overage_price_per_unit="0.5"
        ),
    )
    assert await store.grant_credits("acme", "pages", 5, "g1", "bought", now_ms=NOW) == (5, False)
    decision = (await store.check("acme", CheckCall({"pages": 20}), now_ms=NOW)).metrics[0]
    assert (decision.included, decision.prepaid, decision.overage, decision.reason) == (
        10,
        5,
        5,
        Q.DECISION_REASON_OVERAGE,
    )
    result = await record(store, "j1", {"pages": 20})
    row = result.metrics[0]
    assert (row.included, row.prepaid, row.overage, row.committed) == (10, 5, 5, 20)
    figures = await usage_of(store, "pages")
    assert figures["balance"] == 0
    assert figures["prepaid_used"] == 5


async def test_prepaid_without_overage_admits_up_to_the_balance(store: Store) -> None:
    """With overage not allowed, the quota plus the prepaid balance is the most admitted."""
    await set_plan(store, metric_limits("pages", contract_quota=10, overage_allowed=False))
    await store.grant_credits("acme", "pages", 5, "g1", "", now_ms=NOW)
    fits = await store.check("acme", CheckCall({"pages": 15}), now_ms=NOW)
    assert fits.allowed and fits.metrics[0].reason == Q.DECISION_REASON_PREPAID
    too_many = await store.check("acme", CheckCall({"pages": 16}), now_ms=NOW)
    assert not too_many.allowed and too_many.metrics[0].reason == Q.DECISION_REASON_QUOTA_EXCEEDED
    assert too_many.metrics[0].max_admissible == 15


async def test_a_hold_reserves_prepaid_credits(store: Store) -> None:
    """Prepaid units held by one job are not offered to another until it commits or releases."""
    await set_plan(store, metric_limits("pages", contract_quota=0, overage_allowed=False))
    await store.grant_credits("acme", "pages", 8, "g1", "", now_ms=NOW)
    first = await store.check(
        "acme", CheckCall({"pages": 5}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    assert first.held and first.metrics[0].prepaid == 5
    second = await store.check("acme", CheckCall({"pages": 4}), now_ms=NOW)
    assert not second.allowed
    assert second.metrics[0].prepaid_available == 3
    await store.release("acme", "j1", now_ms=NOW)
    third = await store.check("acme", CheckCall({"pages": 8}), now_ms=NOW)
    assert third.allowed


async def test_commit_respects_other_jobs_prepaid_reservations(store: Store) -> None:
    """A job recorded without a hold cannot spend prepaid credits another job holds."""
    await set_plan(store, metric_limits("pages", contract_quota=0, overage_allowed=True))
    await store.grant_credits("acme", "pages", 3, "g1", "", now_ms=NOW)
    await store.check(
        "acme",
        CheckCall({"pages": 3}, request_id="held", hold=True, hold_ttl_ms=MINUTE),
        now_ms=NOW,
    )
    unheld = await record(store, "unheld", {"pages": 3})
    assert (unheld.metrics[0].prepaid, unheld.metrics[0].overage) == (0, 3)
    held = await record(store, "held", {"pages": 3})
    assert (held.metrics[0].prepaid, held.metrics[0].overage) == (3, 0)
    assert (await usage_of(store, "pages"))["balance"] == 0


async def test_grant_is_idempotent_by_grant_id(store: Store) -> None:
    """The same grant_id twice adds credits once; reused with another amount it is refused."""
    await set_plan(store, metric_limits("pages"))
    assert await store.grant_credits("acme", "pages", 5, "g1", "r", now_ms=NOW) == (5, False)
    assert await store.grant_credits("acme", "pages", 5, "g1", "r", now_ms=NOW) == (5, True)
    with pytest.raises(RequestIdReused):
        await store.grant_credits("acme", "pages", 6, "g1", "r", now_ms=NOW)
    assert (await usage_of(store, "pages"))["balance"] == 5


# -- all-or-nothing ---------------------------------------------------------------


async def test_all_or_nothing_across_metrics(store: Store, redis_sync: redis.Redis) -> None:
    """When one metric denies, no metric of the call is held and no record is created."""
    await set_plan(
        store,
        metric_limits("pages", contract_quota=100),
        metric_limits("documents", contract_quota=1),
        metric_limits("credits", contract_quota=100),
    )
    result = await store.check(
        "acme",
        CheckCall(
            {"pages": 10, "documents": 2, "credits": 5},
            request_id="j1",
            hold=True,
            hold_ttl_ms=MINUTE,
        ),
        now_ms=NOW,
    )
    assert not result.allowed and not result.held
    assert [m.metric for m in result.metrics] == ["credits", "documents", "pages"]
    assert [m.allowed for m in result.metrics] == [True, False, True]
    for metric in ("pages", "documents", "credits"):
        assert (await usage_of(store, metric))["held"] == 0
    assert not redis_sync.exists("pm:{acme}:r:j1")


async def test_unknown_metric_denies_the_whole_call(store: Store) -> None:
    """A metric missing from the plan is UNKNOWN_METRIC and nothing is held."""
    await set_plan(store, metric_limits("pages"))
    result = await store.check(
        "acme",
        CheckCall({"pages": 1, "pagez": 1}, request_id="j1", hold=True, hold_ttl_ms=MINUTE),
        now_ms=NOW,
    )
    assert not result.allowed and not result.held
    reasons = {m.metric: m.reason for m in result.metrics}
    assert reasons == {
        "pages": Q.DECISION_REASON_WITHIN_QUOTA,
        "pagez": Q.DECISION_REASON_UNKNOWN_METRIC,
    }
    assert (await usage_of(store, "pages"))["held"] == 0


# -- holds ------------------------------------------------------------------------


async def test_hold_counts_until_it_expires(store: Store) -> None:
    """A hold counts up to the millisecond before its expiry and not from its expiry on."""
    await set_plan(store, metric_limits("pages", contract_quota=10))
    held = await store.check(
        "acme", CheckCall({"pages": 10}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    assert held.held and held.hold_expires_ms == NOW + MINUTE
    just_before = await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW + MINUTE - 1)
    assert not just_before.allowed and just_before.metrics[0].held == 10
    at_expiry = await store.check("acme", CheckCall({"pages": 10}), now_ms=NOW + MINUTE)
    assert at_expiry.allowed and at_expiry.metrics[0].held == 0


async def test_release_frees_the_hold_and_is_idempotent(store: Store) -> None:
    """ReleaseQuota frees the held units once; later calls report what had happened."""
    await set_plan(store, metric_limits("pages", contract_quota=10))
    await store.check(
        "acme", CheckCall({"pages": 7}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    first = await store.release("acme", "j1", now_ms=NOW)
    assert (first.outcome, first.released) == ("released", {"pages": 7})
    assert (await usage_of(store, "pages"))["held"] == 0
    assert (await store.release("acme", "j1", now_ms=NOW)).outcome == "already_released"
    assert (await store.release("acme", "nope", now_ms=NOW)).outcome == "not_found"


async def test_release_after_expiry_and_after_record(store: Store) -> None:
    """Releasing an expired hold says EXPIRED; releasing a recorded job says ALREADY_RECORDED."""
    await set_plan(store, metric_limits("pages"))
    await store.check(
        "acme", CheckCall({"pages": 1}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    assert (await store.release("acme", "j1", now_ms=NOW + MINUTE)).outcome == "expired"
    await store.check(
        "acme", CheckCall({"pages": 1}, request_id="j2", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    await record(store, "j2", {"pages": 1})
    assert (await store.release("acme", "j2", now_ms=NOW)).outcome == "already_recorded"


async def test_record_commits_actual_units_and_frees_the_hold(store: Store) -> None:
    """RecordUsage commits the units the job really used, not the held estimate, and frees the hold."""
    await set_plan(store, metric_limits("pages", contract_quota=100))
    await store.check(
        "acme", CheckCall({"pages": 30}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    result = await record(store, "j1", {"pages": 22})
    assert result.hold_released and not result.hold_expired
    figures = await usage_of(store, "pages")
    assert (figures["committed"], figures["held"]) == (22, 0)


async def test_record_after_hold_expiry_is_counted_and_flagged(store: Store) -> None:
    """A job recorded after its hold expired is still counted once, with hold_expired set."""
    await set_plan(store, metric_limits("pages", contract_quota=100))
    await store.check(
        "acme", CheckCall({"pages": 30}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    result = await record(store, "j1", {"pages": 30}, now_ms=NOW + 2 * MINUTE)
    assert result.hold_expired and not result.hold_released
    figures = await usage_of(store, "pages", now_ms=NOW + 2 * MINUTE)
    assert (figures["committed"], figures["held"]) == (30, 0)


async def test_repeated_hold_returns_the_first_decision(store: Store) -> None:
    """CheckQuota with hold repeated with the same request_id and units holds once and says duplicate."""
    await set_plan(store, metric_limits("pages", contract_quota=100))
    first = await store.check(
        "acme", CheckCall({"pages": 30}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    again = await store.check(
        "acme",
        CheckCall({"pages": 30}, request_id="j1", hold=True, hold_ttl_ms=MINUTE),
        now_ms=NOW + 5,
    )
    assert again.duplicate and again.held
    assert again.metrics == first.metrics
    assert (await usage_of(store, "pages"))["held"] == 30
    with pytest.raises(RequestIdReused):
        await store.check(
            "acme",
            CheckCall({"pages": 31}, request_id="j1", hold=True, hold_ttl_ms=MINUTE),
            now_ms=NOW,
        )


# -- RecordUsage idempotency and outcomes -------------------------------------------


async def test_duplicate_record_returns_the_first_result(store: Store) -> None:
    """The same request_id and payload again is a duplicate: same result, nothing counted twice."""
    await set_plan(store, metric_limits("pages", contract_quota=100))
    first = await record(store, "j1", {"pages": 12})
    again = await record(store, "j1", {"pages": 12}, now_ms=NOW + 1000)
    assert not first.duplicate and again.duplicate
    assert again.metrics == first.metrics
    figures = await usage_of(store, "pages")
    assert (figures["committed"], figures["jobs_ok"]) == (12, 1)


async def test_reused_request_id_with_other_payload_is_refused(store: Store) -> None:
    """The same request_id with different units is refused and changes nothing."""
    await set_plan(store, metric_limits("pages", contract_quota=100))
    await record(store, "j1", {"pages": 12})
    with pytest.raises(RequestIdReused) as caught:
        await record(store, "j1", {"pages": 13})
    assert caught.value.status == "completed"
    with pytest.raises(RequestIdReused):
        await record(store, "j1", {"pages": 12}, success=False)
    assert (await usage_of(store, "pages"))["committed"] == 12


async def test_failed_job_consumes_nothing_and_frees_its_hold(store: Store) -> None:
    """A failed job is counted as failed, commits no units and frees its hold."""
    await set_plan(store, metric_limits("pages", contract_quota=100))
    await store.check(
        "acme", CheckCall({"pages": 40}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    result = await record(store, "j1", {"pages": 40}, success=False)
    assert result.status == "failed" and result.hold_released
    assert result.metrics[0].units == 0
    figures = await usage_of(store, "pages")
    assert (figures["committed"], figures["held"], figures["jobs_failed"], figures["jobs_ok"]) == (
        0,
        0,
        1,
        0,
    )


async def test_work_done_over_the_limit_is_recorded_and_flagged(store: Store) -> None:
    """RecordUsage records units past quota and hard limit (the work was done) and says so."""
    await set_plan(
        store, metric_limits("pages", contract_quota=10, overage_allowed=False, hard_limit=12)
    )
    result = await record(store, "j1", {"pages": 15})
    row = result.metrics[0]
    assert result.over_limit
    assert (row.committed, row.included, row.overage) == (15, 10, 5)
    assert row.over_contract_quota and row.over_hard_limit and row.overage_not_allowed


async def test_metric_outside_the_plan_is_still_recorded(store: Store) -> None:
    """Usage of a metric the plan lacks is recorded (never dropped), as an unlimited monthly metric."""
    await set_plan(store, metric_limits("pages"))
    result = await record(store, "j1", {"pages": 1, "ocr_seconds": 7})
    assert [(m.metric, m.units, m.included) for m in result.metrics] == [
        ("ocr_seconds", 7, 7),
        ("pages", 1, 1),
    ]
    assert (await usage_of(store, "ocr_seconds"))["committed"] == 7


# -- lifetime gauges --------------------------------------------------------------


async def test_lifetime_gauge_survives_month_end_and_can_be_lowered(store: Store) -> None:
    """A PERIOD_NONE metric keeps counting across months and negative units lower it, not below zero."""
    await set_plan(store, metric_limits("templates", contract_quota=2, period=plan_pb2.PERIOD_NONE))
    await record(store, "t1", {"templates": 2})
    next_month = NOW + 31 * 24 * 3600 * 1000
    full = await store.check("acme", CheckCall({"templates": 1}), now_ms=next_month)
    assert not full.allowed and full.metrics[0].committed == 2 and full.metrics[0].lifetime
    lowered = await record(store, "t2", {"templates": -5}, now_ms=next_month)
    assert lowered.metrics[0].committed == 0
    assert (await store.check("acme", CheckCall({"templates": 2}), now_ms=next_month)).allowed


async def test_negative_units_on_a_monthly_metric_are_refused(store: Store) -> None:
    """Negative units are refused for monthly metrics and nothing is recorded."""
    await set_plan(store, metric_limits("pages"))
    with pytest.raises(NegativeUnits):
        await record(store, "j1", {"pages": -1})
    assert (await usage_of(store, "pages"))["jobs_ok"] == 0
    await record(store, "j1", {"pages": 1})  # the id was not claimed by the refused call


# -- rate limit -------------------------------------------------------------------


async def test_rate_limit_allows_a_burst_then_answers_retry_after(store: Store) -> None:
    """With 2 calls/s, two calls pass at once, the third is RATE_LIMITED until 500 ms later."""
    await set_plan(store, metric_limits("pages"), api_rate_limit=2)
    assert (await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)).allowed
    assert (await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)).allowed
    limited = await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)
    assert limited.outcome == "rate_limited" and limited.retry_after_ms == 500
    assert (
        await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW + 499)
    ).outcome == "rate_limited"
    assert (await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW + 500)).allowed


async def test_rate_limited_call_holds_nothing(store: Store) -> None:
    """A rate-limited CheckQuota places no hold even when hold is asked for."""
    await set_plan(store, metric_limits("pages"), api_rate_limit=1)
    await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)
    limited = await store.check(
        "acme", CheckCall({"pages": 5}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    assert limited.outcome == "rate_limited" and not limited.held
    assert (await usage_of(store, "pages"))["held"] == 0


# -- the store's plumbing -----------------------------------------------------------


async def test_scripts_reload_after_the_script_cache_is_flushed(
    store: Store, redis_sync: redis.Redis
) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) the next call reloads the script and works."""
    await set_plan(store, metric_limits("pages"))
    assert (await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)).allowed
    redis_sync.script_flush()
    assert (await store.check("acme", CheckCall({"pages": 1}), now_ms=NOW)).allowed


async def test_every_key_of_an_org_carries_its_hash_tag(
    store: Store, redis_sync: redis.Redis
) -> None:
    """Every key the scripts write for an organization is under its {org_id} hash tag; the only other key is the registry of organizations with a plan."""
    await set_plan(
        store,
        metric_limits("pages", contract_quota=5),
        metric_limits("apps", period=plan_pb2.PERIOD_NONE),
        api_rate_limit=100,
    )
    await store.grant_credits("acme", "pages", 5, "g1", "", now_ms=NOW)
    await store.check(
        "acme", CheckCall({"pages": 7}, request_id="j1", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    await record(store, "j1", {"pages": 7, "apps": 1})
    await store.check(
        "acme", CheckCall({"pages": 1}, request_id="j2", hold=True, hold_ttl_ms=MINUTE), now_ms=NOW
    )
    keys = set(cast(list[str], redis_sync.keys("*")))  # decode_responses=True
    assert ORGS_KEY in keys and redis_sync.zrange(ORGS_KEY, 0, -1) == ["acme"]
    keys.discard(ORGS_KEY)
    assert len(keys) >= 6
    assert all(key.startswith("pm:{acme}:") for key in keys), keys


async def test_large_figures_stay_exact(store: Store) -> None:
    """Quotas near 10^15 and units of 10^9 are computed exactly (no float rounding in Lua)."""
    quota = 10**15 - 1
    await set_plan(store, metric_limits("pages", contract_quota=quota, overage_allowed=True))
    for i in range(3):
        await record(store, f"j{i}", {"pages": 999_999_999})
    decision = (await store.check("acme", CheckCall({"pages": 999999999}), now_ms=NOW)).metrics[0]
    assert decision.committed == 3 * 999_999_999
    assert decision.included == 999_999_999


async def test_month_keys_expire_after_the_retention(store: Store, redis_sync: redis.Redis) -> None:
    """Monthly counters expire at month end plus the usage retention, so storage is bounded."""
    await set_plan(store, metric_limits("pages"))
    result = await record(store, "j1", {"pages": 1})
    snapshot = await store.usage("acme", now_ms=NOW)
    expected_ttl = snapshot.month.end_ms + store.usage_retention_ms - NOW
    ttl = redis_sync.pttl(f"pm:{{acme}}:u:{result.month_id}")
    assert expected_ttl - 5000 < ttl <= expected_ttl
    assert 0 < redis_sync.pttl("pm:{acme}:r:j1") <= store.record_ttl_ms


def test_every_script_states_keys_argv_and_return() -> None:
    """Each .lua script opens with a comment naming its KEYS, ARGV and return value."""
    scripts = sorted(p for p in LUA_DIR.glob("*.lua") if not p.name.startswith("_"))
    assert {p.stem for p in scripts} == set(SCRIPTS)
    for path in scripts:
        lines = path.read_text().splitlines()
        header = []
        for line in lines:
            if not line.startswith("--"):
                break
            header.append(line)
        text = "\n".join(header)
        assert text.startswith(f"-- {path.name}"), path.name
        assert "KEYS[1]" in text and "ARGV[1]" in text and "Returns" in text, path.name
