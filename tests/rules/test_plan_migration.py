"""The migration of stored plans from the schema 1 document to schema 2.

Stored plans are written in schema 1 (terse keys) until the deployment is
migrated, then in schema 2. These tests write schema 1 exactly as the earlier
release did (its writer is copied below), run the migration, and require every
answer of the quota, admin and reporting services to be the same as without
it, on one Redis and on a Redis Cluster; and a second run to change nothing.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.protobuf.message import Message

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.domain.plans import plan_doc_from_json, plan_to_doc, schema_1_json
from pagemeter_server.settings import Settings
from pagemeter_server.store.keys import ORGS_KEY, PLAN_SCHEMA_KEY, OrgKeys
from pagemeter_server.store.plan_migration import migrate_plans
from pagemeter_server.store.scripts import script_text
from tests.conftest import BACKENDS, START_MS, RunningServer, eagle_plan, metric_limits, serving

DAY_MS = 86_400_000
ORGS = ("acme", "globex", "initech", "umbrella")


# -- the schema 1 writer of the earlier release, kept as it was ----------------------

_V1_PERIODS = {
    plan_pb2.PERIOD_UNSPECIFIED: "M",
    plan_pb2.PERIOD_MONTHLY: "M",
    plan_pb2.PERIOD_NONE: "N",
}
_V1_POLICIES = {
    plan_pb2.STORE_FAILURE_POLICY_CLOSED: "closed",
    plan_pb2.STORE_FAILURE_POLICY_OPEN: "open",
}


def _v1_price(text: str) -> str:
    if not text:
        return "0"
    out = format(Decimal(text), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out or "0"


def v1_json(plan: plan_pb2.Plan, default_timezone: str = "UTC") -> str:
    """The stored text of a (valid) plan as the earlier release wrote it."""
    metrics: dict[str, dict[str, Any]] = {}
    for limits in plan.metrics:
        doc: dict[str, Any] = {"o": limits.overage_allowed, "per": _V1_PERIODS[limits.period]}
        if limits.HasField("contract_quota"):
            doc["q"] = limits.contract_quota
        if limits.HasField("hard_limit"):
            doc["h"] = limits.hard_limit
        doc["p"] = _v1_price(limits.price_per_unit)
        doc["op"] = _v1_price(limits.overage_price_per_unit)
        metrics[limits.metric] = doc
    return json.dumps(
        {
            "name": plan.name,
            "tz": plan.timezone or default_timezone,
            "rate": plan.api_rate_limit,
            "burst": plan.api_burst,
            "prio": plan.processing_priority,
            "support": plan.support_level,
            "currency": plan.currency or "USD",
            "metrics": metrics,
            "sfp": _V1_POLICIES.get(plan.store_failure_policy, ""),
        },
        separators=(",", ":"),
    )


# -- a deployment's history ----------------------------------------------------------


def march_plan(org_id: str) -> plan_pb2.Plan:
    return plan_pb2.Plan(
        org_id=org_id,
        name="Starter",
        timezone="Europe/Berlin",
        processing_priority="high",
        support_level="gold",
        currency="EUR",
        store_failure_policy=plan_pb2.STORE_FAILURE_POLICY_OPEN,
        metrics=[
            metric_limits(
                "pages",
                contract_quota=100,
                hard_limit=150,
                overage_allowed=True,
                price_per_unit="0.0300",
                overage_price_per_unit="0.028",
            ),
            metric_limits("documents", contract_quota=10, overage_allowed=False),
            metric_limits("apps", hard_limit=3, period=plan_pb2.PERIOD_NONE),
            metric_limits("credits"),
        ],
    )


def april_plan(org_id: str) -> plan_pb2.Plan:
    plan = march_plan(org_id)
    plan.name = "Growth"
    plan.store_failure_policy = plan_pb2.STORE_FAILURE_POLICY_UNSPECIFIED
    plan.api_rate_limit = 1000
    plan.api_burst = 2000
    del plan.metrics[:]
    plan.metrics.extend(
        [
            metric_limits(
                "pages", contract_quota=200, overage_allowed=True, overage_price_per_unit="0.02"
            ),
            metric_limits("apps", hard_limit=5, period=plan_pb2.PERIOD_NONE),
        ]
    )
    return plan


async def history(server: RunningServer) -> None:
    """Plans set and changed, jobs recorded, credits granted, a hold left open."""
    server.clock.set(START_MS)
    for org in ORGS:
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=march_plan(org)))
        await server.quota.RecordUsage(
            quota_pb2.RecordUsageRequest(
                org_id=org,
                request_id="march-1",
                units={"pages": 120, "documents": 2, "apps": 1},
                document_type="invoice",
            )
        )
        await server.admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(
                org_id=org, metric="pages", units=10, grant_id="g1", reason="r"
            )
        )
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org_id="hooli")))
    server.clock.set(START_MS + 20 * DAY_MS)  # 4 April
    for org in ORGS:
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=april_plan(org)))
        await server.quota.RecordUsage(
            quota_pb2.RecordUsageRequest(org_id=org, request_id="april-1", units={"pages": 50})
        )
        await server.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                org_id=org, units={"pages": 30}, request_id="held", hold=True
            )
        )


async def answers(server: RunningServer) -> list[Message]:
    """Every kind of answer, reads and writes, for every organization."""
    out: list[Message] = []
    server.clock.set(START_MS + 21 * DAY_MS)
    for org in (*ORGS, "hooli"):
        q, a, r = server.quota, server.admin, server.reporting
        out += [
            await a.GetPlan(admin_pb2.GetPlanRequest(org_id=org)),
            await q.GetUsage(quota_pb2.GetUsageRequest(org_id=org)),
            await q.GetUsage(quota_pb2.GetUsageRequest(org_id=org, year=2026, month=3)),
            await r.GetUsageHistory(reporting_pb2.GetUsageHistoryRequest(org_id=org, months=3)),
            await q.CheckQuota(
                quota_pb2.CheckQuotaRequest(
                    org_id=org, units={"pages": 170, "documents": 1, "apps": 5}
                )
            ),
            await q.CheckQuota(
                quota_pb2.CheckQuotaRequest(
                    org_id=org, units={"pages": 5}, request_id="h2", hold=True
                )
            ),
            await q.RecordUsage(
                quota_pb2.RecordUsageRequest(org_id=org, request_id="held", units={"pages": 30})
            ),
            await q.RecordUsage(
                quota_pb2.RecordUsageRequest(
                    org_id=org, request_id="april-2", units={"pages": 400, "documents": 3}
                )
            ),
            await a.AdjustUsage(
                admin_pb2.AdjustUsageRequest(
                    org_id=org,
                    metric="pages",
                    units=-5,
                    year=2026,
                    month=3,
                    reason="blank pages",
                    adjustment_id="fix-1",
                )
            ),
        ]
        if org != "hooli":  # a lifetime metric, lowered and corrected
            out += [
                await q.RecordUsage(
                    quota_pb2.RecordUsageRequest(
                        org_id=org, request_id="apps-down", units={"apps": -1}
                    )
                ),
                await a.AdjustUsage(
                    admin_pb2.AdjustUsageRequest(
                        org_id=org, metric="apps", units=1, reason="restored", adjustment_id="fix-2"
                    )
                ),
            ]
        out += [
            await q.GetUsage(quota_pb2.GetUsageRequest(org_id=org)),
            await q.GetUsage(quota_pb2.GetUsageRequest(org_id=org, year=2026, month=3)),
            await r.GetUsageHistory(reporting_pb2.GetUsageHistoryRequest(org_id=org, months=3)),
        ]
        for grouping in (
            reporting_pb2.STATISTICS_GROUPING_DATE,
            reporting_pb2.STATISTICS_GROUPING_DOCUMENT_TYPE,
        ):
            out.append(
                await r.GetUsageStatistics(
                    reporting_pb2.GetUsageStatisticsRequest(
                        org_id=org,
                        period=reporting_pb2.STATISTICS_PERIOD_DAILY,
                        start_date="2026-03-01",
                        end_date="2026-04-05",
                        group_by=grouping,
                    )
                )
            )
    return out


async def stored_plans(client: aioredis.Redis) -> dict[str, Any]:
    """Every stored plan text: the current plans and the plan logs."""
    found: dict[str, Any] = {}
    for org in (*ORGS, "hooli"):
        keys = OrgKeys(org)
        found[keys.plan] = await client.hgetall(keys.plan)
        found[keys.planver] = await client.hgetall(keys.planver)
    return found


def documents(stored: dict[str, Any]) -> list[dict[str, Any]]:
    texts = [fields["json"] if key.endswith(":plan") else None for key, fields in stored.items()]
    texts = [t for t in texts if t] + [
        text
        for key, fields in stored.items()
        if key.endswith(":planver")
        for text in fields.values()
    ]
    return [json.loads(text) for text in texts]


async def migration_keeps_every_answer(settings: Settings, client: aioredis.Redis) -> None:
    # Without the migration: schema 1 throughout, as the earlier release wrote it.
    await client.flushall()
    async with serving(settings, client, ManualClock(START_MS)) as server:
        await history(server)
        plans = await stored_plans(client)
        assert plans[OrgKeys("acme").plan]["json"] == v1_json(april_plan("acme"))
        assert plans[OrgKeys("acme").planver]["1"] == v1_json(march_plan("acme"))
        assert all("schema" not in doc for doc in documents(plans))
        expected = await answers(server)

    # The same history, migrated before the same calls.
    await client.flushall()
    async with serving(settings, client, ManualClock(START_MS)) as server:
        await history(server)
        before = await stored_plans(client)
        result = await migrate_plans(client)
        assert (result.organizations, result.documents, result.left) == (5, 14, 0)
        assert await client.get(PLAN_SCHEMA_KEY) == "2"
        migrated = await stored_plans(client)
        assert all(doc["schema"] == 2 for doc in documents(migrated))
        assert migrated[OrgKeys("acme").plan]["json"] == json.dumps(
            plan_to_doc(april_plan("acme"), "UTC"), separators=(",", ":")
        )
        # Versions and update times are kept; only the documents' spelling changed.
        for key, fields in before.items():
            assert {k: v for k, v in fields.items() if k != "json"} == {
                k: v for k, v in migrated[key].items() if k != "json"
            } or key.endswith(":planver")
            assert set(fields) == set(migrated[key])
            for field, text in fields.items():
                if field not in ("version", "updated_ms", "created_ms"):
                    assert plan_doc_from_json(text) == plan_doc_from_json(migrated[key][field])

        # A second run changes nothing.
        again = await migrate_plans(client)
        assert (again.organizations, again.documents, again.left) == (5, 0, 0)
        assert await stored_plans(client) == migrated

        assert await answers(server) == expected


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_migration_keeps_every_answer(
    backend: str, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Quota, admin, history and statistics answers are the same with the plans migrated, on one Redis and on a cluster, where the organizations live on different primaries and each is migrated on its own node."""
    if backend == "cluster":
        slots = {org: await redis_client.cluster_keyslot(OrgKeys(org).plan) for org in ORGS}  # type: ignore[attr-defined]
        assert len(set(slots.values())) == len(ORGS)
    await migration_keeps_every_answer(settings, redis_client)


# -- single cases ---------------------------------------------------------------------


def test_schema_1_writer_is_the_earlier_releases() -> None:
    """Until the migration, plans are stored byte for byte as the earlier release stored them."""
    plans = [
        march_plan("acme"),
        april_plan("acme"),
        eagle_plan(),
        plan_pb2.Plan(org_id="a", name="", metrics=[]),
        plan_pb2.Plan(
            org_id="a",
            name="x",
            store_failure_policy=plan_pb2.STORE_FAILURE_POLICY_CLOSED,
            metrics=[metric_limits("m", contract_quota=0, hard_limit=10**15, price_per_unit="")],
        ),
    ]
    for plan in plans:
        assert schema_1_json(plan_to_doc(plan, "UTC")) == v1_json(plan)


def test_documents_of_releases_before_the_plan_log_are_read() -> None:
    """Documents without "per" (monthly) and without "sfp" (the service default) still read."""
    oldest = '{"name":"Old","tz":"UTC","rate":0,"burst":0,"prio":"","support":"","currency":"USD","metrics":{"pages":{"o":true,"q":5,"p":"0","op":"0.1"}}}'
    doc = plan_doc_from_json(oldest)
    assert doc["store_failure_policy"] == ""
    assert doc["metrics"]["pages"] == {
        "period": "monthly",
        "contract_quota": 5,
        "overage_allowed": True,
        "price": "0",
        "overage_price": "0.1",
    }


async def test_oldest_documents_migrate(
    pagemeter_server: RunningServer, redis_client: aioredis.Redis
) -> None:
    """A plan stored before the plan log existed (no "per", no "sfp", no log) migrates as it reads."""
    oldest = '{"name":"Old","tz":"Asia/Tokyo","rate":0,"burst":0,"prio":"","support":"","currency":"USD","metrics":{"pages":{"o":false,"q":5,"p":"0","op":"0"}}}'
    await redis_client.hset(
        OrgKeys("acme").plan, mapping={"json": oldest, "version": 1, "updated_ms": 1}
    )
    await redis_client.zadd(ORGS_KEY, {"acme": 0})
    q = pagemeter_server.quota
    check = quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 6})
    before = (
        await q.CheckQuota(check),
        await q.GetUsage(quota_pb2.GetUsageRequest(org_id="acme")),
        await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme")),
        await pagemeter_server.reporting.GetUsageHistory(
            reporting_pb2.GetUsageHistoryRequest(org_id="acme", months=2)
        ),
    )
    assert not before[0].allowed
    result = await migrate_plans(redis_client)
    assert (result.organizations, result.documents) == (1, 1)
    assert json.loads(str(await redis_client.hget(OrgKeys("acme").plan, "json")))["schema"] == 2
    after = (
        await q.CheckQuota(check),
        await q.GetUsage(quota_pb2.GetUsageRequest(org_id="acme")),
        await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme")),
        await pagemeter_server.reporting.GetUsageHistory(
            reporting_pb2.GetUsageHistoryRequest(org_id="acme", months=2)
        ),
    )
    assert after == before


async def test_plans_set_after_the_migration_are_schema_2(
    pagemeter_server: RunningServer, redis_client: aioredis.Redis
) -> None:
    """A server writes schema 1 until the deployment is marked migrated, then schema 2."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    stored = await redis_client.hget(OrgKeys("acme").plan, "json")
    assert stored == v1_json(eagle_plan())
    await migrate_plans(redis_client)
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org_id="new")))
    stored = await redis_client.hget(OrgKeys("new").plan, "json")
    assert json.loads(str(stored)) == plan_to_doc(eagle_plan(org_id="new"), "UTC")


async def test_a_plan_changed_meanwhile_is_not_overwritten(redis_client: aioredis.Redis) -> None:
    """The script replaces a document only if it is still the text the migration read."""
    keys = OrgKeys("acme")
    await redis_client.hset(keys.plan, "json", "set meanwhile")
    await redis_client.hset(keys.planver, "1", "old")
    script = redis_client.register_script(script_text("migrate_plan"))
    reply = await script(
        keys=[keys.plan, keys.planver], args=[2, "", "read before", "new", "1", "old", "new 1"]
    )
    assert reply == [1, 1]
    assert await redis_client.hget(keys.plan, "json") == "set meanwhile"
    assert await redis_client.hget(keys.planver, "1") == "new 1"
