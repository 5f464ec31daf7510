"""The migration of prepaid balances of earlier releases into credit grants.

An earlier release kept one never-expiring balance per metric (`HINCRBY
pm:{org}:credits <metric>`); the scripts read such a balance as the grant
"prepaid-<metric>" until `migrate-plans` turns it into one. These tests write
balances exactly as that release did, and require every answer to be the same
before and after the migration, a second run to change nothing, and a balance
written after it (by a server of the earlier release still running) to be
merged into the grant.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from google.protobuf.message import Message

from pagemeter.v1 import admin_pb2, quota_pb2
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from pagemeter_server.store.keys import OrgKeys
from pagemeter_server.store.plan_migration import (
    CREDITS_MIGRATED_KEY,
    migrate_plans,
    plans_migrated,
)
from tests.conftest import START_MS, RunningServer, eagle_plan, serving

Q = quota_pb2


async def earlier_release_grant(client: aioredis.Redis, org: str, metric: str, units: int) -> None:
    """What GrantCredits of the earlier release wrote (grant.lua, HINCRBY)."""
    await client.hincrby(OrgKeys(org).credits, metric, units)


async def answers(server: RunningServer) -> list[Message]:
    usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    check = await server.quota.CheckQuota(Q.CheckQuotaRequest(org_id="acme", units={"pages": 40}))
    grants = await server.admin.ListCreditGrants(admin_pb2.ListCreditGrantsRequest(org_id="acme"))
    return [usage, check, grants]


async def test_balances_become_grants_and_every_answer_stays(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with serving(settings, redis_client, ManualClock(START_MS)) as server:
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan("acme")))
        await earlier_release_grant(redis_client, "acme", "pages", 100)
        await earlier_release_grant(redis_client, "acme", "documents", 7)
        # Quota used up; a hold reserves 30 prepaid units; a record draws 20.
        await server.quota.RecordUsage(
            Q.RecordUsageRequest(org_id="acme", request_id="big", units={"pages": 2000})
        )
        await server.quota.CheckQuota(
            Q.CheckQuotaRequest(org_id="acme", units={"pages": 30}, request_id="h", hold=True)
        )
        await server.quota.RecordUsage(
            Q.RecordUsageRequest(org_id="acme", request_id="r", units={"pages": 20})
        )
        before = await answers(server)
        assert before[0].metrics[1].prepaid_balance == 80  # type: ignore[attr-defined]
        assert [(g.grant_id, g.remaining) for g in before[2].grants] == [  # type: ignore[attr-defined]
            ("prepaid-documents", 7),
            ("prepaid-pages", 80),
        ]

        result = await migrate_plans(redis_client)
        assert result.balances == 2
        assert await plans_migrated(redis_client)
        stored = await redis_client.hgetall(OrgKeys("acme").credits)
        assert stored == {
            "g:prepaid-documents": "documents|7|0|0|50|7|A",
            "g:prepaid-pages": "pages|80|0|0|50|80|A",
        }
        assert await answers(server) == before

        again = await migrate_plans(redis_client)
        assert again.balances == 0
        assert await redis_client.hgetall(OrgKeys("acme").credits) == stored

        # A server of the earlier release grants 5 more after the migration.
        await earlier_release_grant(redis_client, "acme", "pages", 5)
        late = await answers(server)
        # Read as a second never-expiring grant until the next run merges it.
        assert [(g.grant_id, g.remaining) for g in late[2].grants] == [  # type: ignore[attr-defined]
            ("prepaid-documents", 7),
            ("prepaid-pages", 5),
            ("prepaid-pages", 80),
        ]
        assert late[0].metrics[1].prepaid_balance == 85  # type: ignore[attr-defined]
        assert (await migrate_plans(redis_client)).balances == 1
        merged = await redis_client.hgetall(OrgKeys("acme").credits)
        assert merged["g:prepaid-pages"] == "pages|85|0|0|50|85|A"
        assert "pages" not in merged
        assert await redis_client.get(CREDITS_MIGRATED_KEY) == "1"


async def test_a_balance_not_yet_migrated_can_be_voided_as_its_grant(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """ListCreditGrants shows a balance of an earlier release as "prepaid-pages";
    voiding that id voids the balance, and the list then shows it voided."""
    async with serving(settings, redis_client, ManualClock(START_MS)) as server:
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan("acme")))
        await earlier_release_grant(redis_client, "acme", "pages", 40)
        voided = await server.admin.VoidCreditGrant(
            admin_pb2.VoidCreditGrantRequest(org_id="acme", grant_id="prepaid-pages", reason="r")
        )
        assert (voided.voided_units, voided.already_voided) == (40, False)
        grants = await server.admin.ListCreditGrants(
            admin_pb2.ListCreditGrantsRequest(org_id="acme")
        )
        assert [(g.grant_id, g.remaining, g.status) for g in grants.grants] == [
            ("prepaid-pages", 0, admin_pb2.CREDIT_GRANT_STATUS_VOIDED)
        ]
        usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
        assert {m.metric: m.prepaid_balance for m in usage.metrics}["pages"] == 0
