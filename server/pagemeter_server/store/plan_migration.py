"""The migration of stored plans to the plan document of schema 2.

Servers of earlier releases read only schema 1, so a server writes plans in
schema 1 (and reads both) until the deployment is marked migrated. The
migration marks it (`pm:plan-schema` = "2": from then on every server of this
release writes schema 2), then rewrites, organization by organization, the
current plan and every plan log version still in schema 1. Each organization
is one script call under its hash tag (one cluster slot), compare-and-set
against the text read, so a SetPlan in between is never undone. Running it
again changes nothing that is already migrated.

The same run turns each organization's prepaid balances of earlier releases
into never-expiring credit grants (migrate_credits.lua), and marks that done
(`pm:credit-grants` = "1"); the scripts read both forms meanwhile.

It must run only once no server of an earlier release is left: `pagemeter-server
migrate-plans` after a rolling upgrade, or by itself at the start of a server
that owns its embedded store (no other server can share it). See
docs/operations.md, upgrading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from pagemeter_server.domain.plans import (
    SCHEMA,
    is_current_schema,
    plan_doc,
    plan_doc_json,
)
from pagemeter_server.store.keys import ORGS_KEY, PLAN_SCHEMA_KEY, OrgKeys
from pagemeter_server.store.scripts import script_text

# Organizations read from the registry at a time.
CHUNK = 500
# Reads and compare-and-sets of one organization before it is left for a later
# run (only SetPlans of a server that had not seen the marker yet can race it).
ATTEMPTS = 5


# Set once every organization's prepaid balances are credit grants.
CREDITS_MIGRATED_KEY = "pm:credit-grants"


@dataclass(frozen=True)
class PlanMigration:
    organizations: int  # organizations looked at
    documents: int  # documents rewritten in schema 2
    left: int  # organizations left in schema 1 because their plans kept changing
    balances: int = 0  # prepaid balances turned into credit grants


def summary(result: PlanMigration) -> str:
    """One log line for a migration's result."""
    left = (
        f", {result.left} left in schema 1 (their plans kept changing; run it again)"
        if result.left
        else ""
    )
    return (
        "stored plans migrated to the plan document of schema 2: "
        f"{result.organizations} organizations, {result.documents} documents rewritten{left}; "
        f"{result.balances} prepaid balances turned into credit grants"
    )


async def migrate_plans_at(url: str) -> PlanMigration | None:
    """The migration on the single Redis at `url` (a store this process owns);
    None when the store was migrated before."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        if await plans_migrated(client):
            return None
        return await migrate_plans(client)
    finally:
        await client.aclose()


async def plans_migrated(client: aioredis.Redis) -> bool:
    """Whether the plans and the prepaid balances were both migrated."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(PLAN_SCHEMA_KEY)
        pipe.get(CREDITS_MIGRATED_KEY)
        schema, credits = await pipe.execute()
    return bool(schema == str(SCHEMA) and credits == "1")


async def migrate_plans(client: aioredis.Redis) -> PlanMigration:
    """Mark the deployment migrated, then migrate every registered organization."""
    await client.set(PLAN_SCHEMA_KEY, str(SCHEMA))
    script = client.register_script(script_text("migrate_plan"))
    credits_script = client.register_script(script_text("migrate_credits"))
    organizations = documents = left = balances = 0
    after = "-"
    while True:
        # By name: an organization registered meanwhile does not shift the pages.
        chunk = cast(list[str], await client.zrangebylex(ORGS_KEY, after, "+", start=0, num=CHUNK))
        for org_id in chunk:
            replaced = await migrate_organization(client, script, org_id)
            balances += int(await credits_script(keys=[OrgKeys(org_id).credits]))
            organizations += 1
            if replaced is None:
                left += 1
            else:
                documents += replaced
        if len(chunk) < CHUNK:
            await client.set(CREDITS_MIGRATED_KEY, "1")
            return PlanMigration(organizations, documents, left, balances)
        after = "(" + chunk[-1]


async def migrate_organization(
    client: aioredis.Redis, script: AsyncScript, org_id: str
) -> int | None:
    """Documents rewritten, or None when the plans kept changing meanwhile."""
    keys = OrgKeys(org_id)
    replaced = 0
    for _ in range(ATTEMPTS):
        async with client.pipeline(transaction=False) as pipe:
            pipe.hget(keys.plan, "json")
            pipe.hgetall(keys.planver)
            current, versions = await pipe.execute()
        stored = {"": current} if current is not None else {}
        stored.update(cast(dict[str, str], versions))
        args: list[str] = []
        for version, text in sorted(stored.items()):
            raw = json.loads(text)
            if not is_current_schema(raw):
                args += [version, text, plan_doc_json(plan_doc(raw))]
        if not args:
            return replaced
        done, changed = await script(keys=[keys.plan, keys.planver], args=[len(args) // 3, *args])
        replaced += int(done)
        if not int(changed):
            return replaced
    return None
