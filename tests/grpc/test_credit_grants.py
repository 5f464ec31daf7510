"""Credit grants over gRPC: effective and expiry times, priority and expiry
order, holds on a grant that expires, voiding with the audit trail."""

from __future__ import annotations

import json

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2
from pagemeter_server.domain.credits import MAX_LIVE_GRANTS
from tests.conftest import START_MS, RunningServer, field_violations, metric_limits

Q, A = quota_pb2, admin_pb2
HOUR_MS, DAY_MS = 3_600_000, 86_400_000


def at(instant_ms: int) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(instant_ms)
    return value


async def set_plan(server: RunningServer, *, overage: bool = True) -> None:
    """pages: 100 included, then grants, then overage (or none)."""
    await server.admin.SetPlan(
        A.SetPlanRequest(
            plan=plan_pb2.Plan(
                org_id="acme",
                metrics=[
                    metric_limits(
                        "pages",
                        contract_quota=100,
                        overage_allowed=overage,
                        overage_price_per_unit="0.01",
                    )
                ],
            )
        )
    )


async def grant(server: RunningServer, grant_id: str, units: int, **fields: object) -> int:
    reply = await server.admin.GrantCredits(
        A.GrantCreditsRequest(
            org_id="acme",
            metric="pages",
            units=units,
            grant_id=grant_id,
            **fields,  # type: ignore[arg-type]
        )
    )
    return int(reply.balance)


async def record(server: RunningServer, request_id: str, pages: int) -> Q.MetricRecordResult:
    reply = await server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id=request_id, units={"pages": pages})
    )
    return reply.metrics[0]


async def listed(server: RunningServer) -> list[tuple[str, int, int]]:
    reply = await server.admin.ListCreditGrants(A.ListCreditGrantsRequest(org_id="acme"))
    return [(g.grant_id, g.remaining, g.status) for g in reply.grants]


async def balance(server: RunningServer) -> int:
    usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    return int(usage.metrics[0].prepaid_balance)


async def test_three_grants_are_drawn_by_priority_then_earliest_expiry(
    pagemeter_server: RunningServer,
) -> None:
    """B (priority 10) first, then of the two of priority 50 the one expiring
    first (C), then A; the split of each record says so."""
    server = pagemeter_server
    await set_plan(server)
    await grant(server, "A", 10, expires_at=at(START_MS + 10 * DAY_MS))
    await grant(server, "B", 10, priority=10)
    assert await grant(server, "C", 10, expires_at=at(START_MS + 5 * DAY_MS)) == 30
    assert await listed(server) == [
        ("B", 10, A.CREDIT_GRANT_STATUS_ACTIVE),
        ("C", 10, A.CREDIT_GRANT_STATUS_ACTIVE),
        ("A", 10, A.CREDIT_GRANT_STATUS_ACTIVE),
    ]
    first = await record(server, "j1", 100 + 15)
    assert (first.included_units, first.prepaid_units, first.overage_units) == (100, 15, 0)
    assert await listed(server) == [
        ("B", 0, A.CREDIT_GRANT_STATUS_EXHAUSTED),
        ("C", 5, A.CREDIT_GRANT_STATUS_ACTIVE),
        ("A", 10, A.CREDIT_GRANT_STATUS_ACTIVE),
    ]
    second = await record(server, "j2", 20)
    assert (second.included_units, second.prepaid_units, second.overage_units) == (0, 15, 5)
    assert [r for _, r, _ in await listed(server)] == [0, 0, 0]
    assert await balance(server) == 0


async def test_a_grant_not_yet_effective_does_not_count(pagemeter_server: RunningServer) -> None:
    server = pagemeter_server
    await set_plan(server, overage=False)
    await record(server, "quota", 100)
    assert await grant(server, "later", 20, effective_at=at(START_MS + HOUR_MS)) == 0
    denied = await server.quota.CheckQuota(Q.CheckQuotaRequest(org_id="acme", units={"pages": 1}))
    assert not denied.allowed
    assert (await listed(server))[0][2] == A.CREDIT_GRANT_STATUS_PENDING
    server.clock.set(START_MS + HOUR_MS)
    allowed = await server.quota.CheckQuota(Q.CheckQuotaRequest(org_id="acme", units={"pages": 20}))
    assert allowed.allowed and allowed.metrics[0].prepaid_units == 20


async def test_a_grant_expiring_under_an_open_hold_stops_counting_at_its_expiry(
    pagemeter_server: RunningServer,
) -> None:
    """A hold reserves 10 units of a grant that expires an hour later: from the
    expiry instant the balance is 0, and the job recorded after it pays its 10
    units as overage (the expired credits are not drawn)."""
    server = pagemeter_server
    await set_plan(server)
    await record(server, "quota", 100)
    expiry = START_MS + HOUR_MS
    await grant(server, "promo", 10, expires_at=at(expiry))
    hold = await server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 10}, request_id="job", hold=True)
    )
    assert hold.allowed and hold.metrics[0].prepaid_units == 10
    server.clock.set(expiry - 1)
    assert await balance(server) == 10
    server.clock.set(expiry)
    assert await balance(server) == 0
    assert (await listed(server))[0][1:] == (10, A.CREDIT_GRANT_STATUS_EXPIRED)
    recorded = await record(server, "job", 10)
    assert (recorded.included_units, recorded.prepaid_units, recorded.overage_units) == (0, 0, 10)
    assert (await listed(server))[0][1] == 10  # nothing drawn from the expired grant


async def test_a_voided_grant_stops_counting_and_the_audit_trail_says_who_and_why(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    server = pagemeter_server
    await set_plan(server)
    await record(server, "quota", 100)
    await grant(server, "purchase-1", 50)
    await record(server, "j", 20)
    voided = await server.admin.VoidCreditGrant(
        A.VoidCreditGrantRequest(org_id="acme", grant_id="purchase-1", reason="chargeback 9")
    )
    assert (voided.voided_units, voided.already_voided) == (30, False)
    assert await balance(server) == 0
    assert await listed(server) == [("purchase-1", 0, A.CREDIT_GRANT_STATUS_VOIDED)]
    again = await server.admin.VoidCreditGrant(
        A.VoidCreditGrantRequest(org_id="acme", grant_id="purchase-1", reason="chargeback 9")
    )
    assert (again.voided_units, again.already_voided) == (0, True)
    events = await server.admin.ListAuditEvents(A.ListAuditEventsRequest(org_id="acme"))
    void = [e for e in events.events if e.action == "credits.void"]
    assert len(void) == 1
    assert void[0].reason == "chargeback 9" and void[0].target == "pages"
    assert json.loads(void[0].before) == {"grant_id": "purchase-1", "remaining": "30"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.admin.VoidCreditGrant(
            A.VoidCreditGrantRequest(org_id="acme", grant_id="nope", reason="typo")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expires_at": at(START_MS)}, "expires_at"),
        ({"expires_at": at(START_MS - DAY_MS)}, "expires_at"),
        (
            {"effective_at": at(START_MS + 2 * DAY_MS), "expires_at": at(START_MS + DAY_MS)},
            "expires_at",
        ),
        ({"priority": 101}, "priority"),
        ({"priority": -1}, "priority"),
        ({"effective_at": Timestamp(seconds=-5)}, "effective_at"),
    ],
)
async def test_bad_grant_terms_are_invalid_and_change_nothing(
    pagemeter_server: RunningServer,
    redis_sync: redis.Redis,
    fields: dict[str, object],
    field: str,
) -> None:
    await set_plan(pagemeter_server)
    before = redis_sync.hgetall("pm:{acme}:credits")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grant(pagemeter_server, "g", 5, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert redis_sync.hgetall("pm:{acme}:credits") == before
    assert redis_sync.exists("pm:{acme}:g:g") == 0


async def test_an_organization_has_at_most_a_hundred_live_grants(
    pagemeter_server: RunningServer,
) -> None:
    """The 101st grant that could still count is refused; once one is voided,
    a new one is accepted (and the dead one is dropped from the list)."""
    server = pagemeter_server
    await set_plan(server)
    for i in range(MAX_LIVE_GRANTS):
        await grant(server, f"g{i}", 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grant(server, "one-too-many", 1)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "void one" in (caught.value.details() or "")
    await server.admin.VoidCreditGrant(
        A.VoidCreditGrantRequest(org_id="acme", grant_id="g0", reason="make room")
    )
    assert await grant(server, "one-too-many", 1) == MAX_LIVE_GRANTS
    assert "g0" not in {grant_id for grant_id, _, _ in await listed(server)}


async def test_a_batch_draws_grants_item_after_item(pagemeter_server: RunningServer) -> None:
    """Two records in one RecordUsageBatch: the second draws what the first left."""
    server = pagemeter_server
    await set_plan(server)
    await record(server, "quota", 100)
    await grant(server, "small", 5, priority=1)
    await grant(server, "big", 20)
    batch = await server.quota.RecordUsageBatch(
        Q.RecordUsageBatchRequest(
            items=[
                Q.RecordUsageRequest(org_id="acme", request_id=f"b{i}", units={"pages": 8})
                for i in range(2)
            ]
        )
    )
    splits = [
        (item.response.metrics[0].prepaid_units, item.response.metrics[0].overage_units)
        for item in batch.items
    ]
    assert splits == [(8, 0), (8, 0)]
    assert await listed(server) == [
        ("small", 0, A.CREDIT_GRANT_STATUS_EXHAUSTED),
        ("big", 9, A.CREDIT_GRANT_STATUS_ACTIVE),
    ]


# -- rollover of unused quota ------------------------------------------------------


@pytest.mark.usefixtures("plans_migrated")
async def test_a_rollover_end_to_end(pagemeter_server: RunningServer) -> None:
    """SetPlan keeps rollover_percent and rollover_cap; after a whole period under
    the plan, the next one lists the rollover grant, GetUsage counts it in the
    prepaid balance, CheckQuota draws on it after the quota, and RecordUsage pays
    from it; one period later it has expired."""
    server = pagemeter_server
    limits = metric_limits("pages", contract_quota=100, rollover_percent=100, rollover_cap=40)
    await server.admin.SetPlan(
        A.SetPlanRequest(plan=plan_pb2.Plan(org_id="acme", timezone="UTC", metrics=[limits]))
    )
    stored = await server.admin.GetPlan(A.GetPlanRequest(org_id="acme"))
    assert (stored.plan.metrics[0].rollover_percent, stored.plan.metrics[0].rollover_cap) == (
        100,
        40,
    )
    # The plan was set on March 15th: April has none, May takes April's unused 100, capped at 40.
    server.clock.set(START_MS + 20 * DAY_MS)
    listed = await server.admin.ListCreditGrants(A.ListCreditGrantsRequest(org_id="acme"))
    assert list(listed.grants) == []
    may_2 = START_MS + 48 * DAY_MS
    server.clock.set(may_2)
    listed = await server.admin.ListCreditGrants(A.ListCreditGrantsRequest(org_id="acme"))
    (rolled,) = listed.grants
    assert (rolled.grant_id, rolled.units, rolled.remaining) == ("rollover-2026-05-pages", 40, 40)
    assert rolled.status == A.CREDIT_GRANT_STATUS_ACTIVE
    assert rolled.effective_at.ToJsonString() == "2026-05-01T00:00:00Z"
    assert rolled.expires_at.ToJsonString() == "2026-06-01T00:00:00Z"
    usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    assert usage.metrics[0].prepaid_balance == 40
    check = await server.quota.CheckQuota(Q.CheckQuotaRequest(org_id="acme", units={"pages": 141}))
    assert not check.allowed and check.metrics[0].max_admissible == 140
    recorded = await record(server, "may", 130)
    assert (recorded.included_units, recorded.prepaid_units) == (100, 30)
    server.clock.set(START_MS + 80 * DAY_MS)  # June: May used all its quota
    listed = await server.admin.ListCreditGrants(A.ListCreditGrantsRequest(org_id="acme"))
    assert list(listed.grants) == []
