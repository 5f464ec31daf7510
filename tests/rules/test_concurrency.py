"""Concurrent callers racing for the last units, over real gRPC channels in threads.

The server runs on the test's event loop; callers are OS threads with their own
synchronous channels, released together by a barrier, so the calls really are
in flight at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, quota_pb2_grpc
from tests.conftest import ON_EACH_BACKEND, RunningServer, metric_limits

# Each test runs on the suite's Redis and, in the system tier, on a Redis Cluster.
pytestmark = ON_EACH_BACKEND

Q = quota_pb2
T = TypeVar("T")
CALLERS = 60


def race(
    target: str, callers: int, work: Callable[[quota_pb2_grpc.QuotaServiceStub, int], T]
) -> list[T]:
    """Run work(stub, index) in `callers` threads that start at the same moment."""
    barrier = threading.Barrier(callers)

    def one(index: int) -> T:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = quota_pb2_grpc.QuotaServiceStub(channel)
            barrier.wait(timeout=30)
            return work(stub, index)

    with ThreadPoolExecutor(max_workers=callers) as pool:
        return list(pool.map(one, range(callers)))


async def set_plan(server: RunningServer, *limits: plan_pb2.MetricLimits) -> None:
    await server.admin.SetPlan(
        admin_pb2.SetPlanRequest(
            plan=plan_pb2.Plan(org_id="acme", name="Race", metrics=list(limits))
        )
    )


async def usage(server: RunningServer) -> dict[str, quota_pb2.MetricUsage]:
    response = await server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    return {m.metric: m for m in response.metrics}


async def test_racing_holds_never_exceed_the_quota(pagemeter_server: RunningServer) -> None:
    """60 concurrent holds for the last 20 units: exactly 20 are admitted, none beyond the quota."""
    await set_plan(
        pagemeter_server, metric_limits("pages", contract_quota=100, overage_allowed=False)
    )
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="seed", units={"pages": 80})
    )

    def hold_one(stub: quota_pb2_grpc.QuotaServiceStub, index: int) -> bool:
        response = stub.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"pages": 1}, request_id=f"job-{index}", hold=True
            ),
            timeout=30,
        )
        return response.allowed

    admitted = await asyncio.to_thread(race, pagemeter_server.target, CALLERS, hold_one)
    assert sum(admitted) == 20
    figures = (await usage(pagemeter_server))["pages"]
    assert (figures.committed, figures.held, figures.remaining) == (80, 20, 0)


async def test_racing_checks_never_pass_the_hard_limit(pagemeter_server: RunningServer) -> None:
    """Concurrent holds of different sizes with overage allowed never take committed + held past the hard limit."""
    await set_plan(
        pagemeter_server,
        metric_limits("pages", contract_quota=50, overage_allowed=True, hard_limit=120),
    )

    def hold_some(stub: quota_pb2_grpc.QuotaServiceStub, index: int) -> int:
        size = 1 + index % 7
        response = stub.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"pages": size}, request_id=f"job-{index}", hold=True
            ),
            timeout=30,
        )
        if not response.allowed:
            assert response.reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
            assert response.metrics[0].max_admissible < size
        return size if response.allowed else 0

    held = sum(await asyncio.to_thread(race, pagemeter_server.target, CALLERS, hold_some))
    figures = (await usage(pagemeter_server))["pages"]
    assert figures.held == held
    assert held <= 120
    assert held >= 120 - 6  # denied callers were turned away only when their size did not fit


async def test_retried_records_are_never_double_counted(pagemeter_server: RunningServer) -> None:
    """Each admitted job is recorded three times at once (as retries would); it counts once."""
    await set_plan(
        pagemeter_server, metric_limits("pages", contract_quota=100, overage_allowed=False)
    )
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="seed", units={"pages": 80})
    )
    jobs = 20
    for index in range(jobs):
        check = await pagemeter_server.quota.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"pages": 1}, request_id=f"job-{index}", hold=True
            )
        )
        assert check.allowed

    def record(stub: quota_pb2_grpc.QuotaServiceStub, index: int) -> bool:
        response = stub.RecordUsage(
            Q.RecordUsageRequest(
                org_id="acme", request_id=f"job-{index % jobs}", units={"pages": 1}
            ),
            timeout=30,
        )
        return response.duplicate

    duplicates = await asyncio.to_thread(race, pagemeter_server.target, jobs * 3, record)
    assert sum(duplicates) == jobs * 2
    figures = (await usage(pagemeter_server))["pages"]
    assert (figures.committed, figures.held) == (100, 0)
    response = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    assert response.jobs.succeeded == jobs + 1


async def test_racing_multi_metric_calls_stay_all_or_nothing(
    pagemeter_server: RunningServer,
) -> None:
    """Concurrent two-metric holds admit whole calls only: held pages are always 3x held documents."""
    await set_plan(
        pagemeter_server,
        metric_limits("pages", contract_quota=25),
        metric_limits("documents", contract_quota=10),
    )

    def hold_pair(stub: quota_pb2_grpc.QuotaServiceStub, index: int) -> bool:
        response = stub.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme",
                units={"pages": 3, "documents": 1},
                request_id=f"job-{index}",
                hold=True,
            ),
            timeout=30,
        )
        return response.allowed

    admitted = sum(await asyncio.to_thread(race, pagemeter_server.target, CALLERS, hold_pair))
    figures = await usage(pagemeter_server)
    assert admitted == 8  # 25 // 3: pages run out before documents
    assert (figures["pages"].held, figures["documents"].held) == (24, 8)


async def test_racing_reserve_commit_and_release(pagemeter_server: RunningServer) -> None:
    """Callers that hold, then commit fewer units or release, leave exact totals and no held units."""
    await set_plan(
        pagemeter_server, metric_limits("pages", contract_quota=200, overage_allowed=False)
    )

    def job(stub: quota_pb2_grpc.QuotaServiceStub, index: int) -> int:
        request_id = f"job-{index}"
        check = stub.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"pages": 5}, request_id=request_id, hold=True
            ),
            timeout=30,
        )
        if not check.allowed:
            return 0
        if index % 3 == 0:
            stub.ReleaseQuota(
                Q.ReleaseQuotaRequest(org_id="acme", request_id=request_id), timeout=30
            )
            return 0
        stub.RecordUsage(
            Q.RecordUsageRequest(org_id="acme", request_id=request_id, units={"pages": 4}),
            timeout=30,
        )
        return 4

    committed = sum(await asyncio.to_thread(race, pagemeter_server.target, CALLERS, job))
    figures = (await usage(pagemeter_server))["pages"]
    assert figures.committed == committed
    assert 0 < committed <= 200
    assert figures.held == 0


RACERS = 200


@pytest.mark.usefixtures("plans_migrated")
async def test_racers_meet_a_daily_cap_and_the_monthly_quota_exactly(
    pagemeter_server: RunningServer,
) -> None:
    """200 concurrent jobs (hold 1 page, then record it) against 40 pages a day and 100 a month: on a day that starts with 40 used this month exactly 40 run (the day binds), the next day exactly 20 (the month binds)."""
    await set_plan(
        pagemeter_server,
        metric_limits(
            "pages",
            contract_quota=100,
            overage_allowed=False,
            windows=[plan_pb2.WindowLimit(window=plan_pb2.WINDOW_DAY, limit=40)],
        ),
    )
    yesterday = Timestamp()
    yesterday.FromMilliseconds(pagemeter_server.clock.now_ms() - 86_400_000)
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(
            org_id="acme", request_id="seed", units={"pages": 40}, completed_at=yesterday
        )
    )

    def job(day: str) -> Callable[[quota_pb2_grpc.QuotaServiceStub, int], bool]:
        def run(stub: quota_pb2_grpc.QuotaServiceStub, index: int) -> bool:
            request_id = f"{day}-{index}"
            decision = stub.CheckQuota(
                Q.CheckQuotaRequest(
                    org_id="acme", units={"pages": 1}, request_id=request_id, hold=True
                ),
                timeout=60,
            )
            if decision.allowed:
                stub.RecordUsage(
                    Q.RecordUsageRequest(org_id="acme", request_id=request_id, units={"pages": 1}),
                    timeout=60,
                )
            return decision.allowed

        return run

    first_day = await asyncio.to_thread(race, pagemeter_server.target, RACERS, job("d1"))
    assert sum(first_day) == 40
    assert (await usage(pagemeter_server))["pages"].committed == 80
    pagemeter_server.clock.advance(86_400)
    second_day = await asyncio.to_thread(race, pagemeter_server.target, RACERS, job("d2"))
    assert sum(second_day) == 20
    figures = (await usage(pagemeter_server))["pages"]
    assert (figures.committed, figures.held, figures.remaining) == (100, 0, 0)
