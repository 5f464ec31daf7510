"""Usage corrections (AdjustUsage) move every total that counts the corrected units.

A month's committed units and the metric's lifetime total must never disagree
about a correction: Docstron's "documents total" (lifetime) must not fall below
its "this month" figure after a refund.
"""

from __future__ import annotations

import random

from pagemeter.v1 import admin_pb2, quota_pb2
from tests.conftest import RunningServer, eagle_plan

Q = quota_pb2


async def adjust(server: RunningServer, units: int, adjustment_id: str, **month: int) -> None:
    await server.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="acme",
            metric="pages",
            units=units,
            reason="ticket 42",
            adjustment_id=adjustment_id,
            **month,
        )
    )


async def pages_usage(server: RunningServer, **month: int) -> quota_pb2.MetricUsage:
    usage = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme", **month))
    return {m.metric: m for m in usage.metrics}["pages"]


async def test_lifetime_total_follows_the_reviewed_corrections(
    pagemeter_server: RunningServer,
) -> None:
    """After +20, -1000, +130 the month's committed and the lifetime total are both 130."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    for index, units in enumerate((20, -1000, 130)):
        await adjust(pagemeter_server, units, f"adj-{index}")
    pages = await pages_usage(pagemeter_server)
    assert pages.committed == 130
    assert pages.lifetime_committed == 130


async def test_a_refund_takes_only_what_the_month_had_from_the_lifetime_total(
    pagemeter_server: RunningServer,
) -> None:
    """A refund larger than the month removes the month's units from lifetime, not the whole refund."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    # 300 pages last month, 50 this month: lifetime 350.
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="old", units={"pages": 300})
    )
    pagemeter_server.clock.set(pagemeter_server.clock.now_ms() + 31 * 86_400_000)
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="new", units={"pages": 50})
    )
    await adjust(pagemeter_server, -1000, "refund")
    pages = await pages_usage(pagemeter_server)
    assert (pages.committed, pages.lifetime_committed) == (0, 300)
    previous = await pages_usage(pagemeter_server, year=2026, month=3)
    assert previous.committed == 300


async def test_lifetime_equals_the_month_for_generated_corrections(
    pagemeter_server: RunningServer,
) -> None:
    """For generated sequences of records and corrections within one month, lifetime_committed equals committed."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    generator = random.Random(20261202)
    for round_index in range(15):
        steps = [generator.choice((-1, 1)) * generator.randint(1, 500) for _ in range(8)]
        for step_index, units in enumerate(steps):
            request_id = f"r{round_index}-{step_index}"
            if units > 0 and step_index % 2 == 0:
                await pagemeter_server.quota.RecordUsage(
                    Q.RecordUsageRequest(
                        org_id="acme", request_id=request_id, units={"pages": units}
                    )
                )
            else:
                await adjust(pagemeter_server, units, request_id)
        pages = await pages_usage(pagemeter_server)
        assert pages.lifetime_committed == pages.committed, steps
