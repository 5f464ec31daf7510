"""Concurrent load for the failover tests: callers that retry with their own ids.

Two kinds: `worker` records one job after another through one stub; `jobs`
(with `Tally`) holds and then records each job, through several servers, and
collects every answer outside the contract. Each worker records one job after another. A refused call (UNAVAILABLE or
DEADLINE_EXCEEDED, as during a failover) is retried with the same request id,
as a real worker does, so a job is never recorded under two ids. The ledger
keeps what the callers were told, to compare with what the store kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The deadline of each call of the job callers below.
CALL_TIMEOUT = 3.0


@dataclass
class Ledger:
    """What the workers of one organization were told."""

    org: str
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    acked_before_kill: int = 0
    first_refusal: float | None = None
    last_refusal: float | None = None


async def record(quota: quota_pb2_grpc.QuotaServiceAsyncStub, org: str, request_id: str) -> bool:
    """One RecordUsage; True when acknowledged as new, False when a duplicate."""
    answer = await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id=org, request_id=request_id, units={"pages": 1}),
        timeout=3,
    )
    return not answer.duplicate


async def worker(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, ledger: Ledger, number: int, stop: asyncio.Event
) -> None:
    """Record jobs one after another, retrying a refused job with its own request id."""
    job = 0
    while not stop.is_set():
        job += 1
        request_id = f"w{number}-job-{job}"
        while not stop.is_set():
            try:
                await record(quota, ledger.org, request_id)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise AssertionError(f"{ledger.org} {request_id}: {error}") from error
                ledger.refused += 1
                now = time.monotonic()
                ledger.first_refusal = ledger.first_refusal or now
                ledger.last_refusal = now
                await asyncio.sleep(0.05)
                continue
            ledger.acked.add(request_id)
            break


async def committed_pages(quota: quota_pb2_grpc.QuotaServiceAsyncStub, org: str) -> int:
    usage = await quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org), timeout=5)
    return {m.metric: m.committed for m in usage.metrics}["pages"]


async def until(condition: Callable[[], bool], what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- jobs: a hold, then its record, through several servers -------------------------
#
# Callers that behave as the contract asks: a job is a hold (CheckQuota with
# hold) and then its record, each retried with the same request id when
# answered UNAVAILABLE or DEADLINE_EXCEEDED. Any other answer is a broken
# promise, collected rather than raised so that a test reports all of them.


@dataclass
class Tally:
    """What the callers of one organization were told."""

    org: str
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    # Answers the contract does not allow here (INTERNAL, UNKNOWN, ...).
    broken: list[str] = field(default_factory=list)
    # (monotonic time the call started, seconds it took) of every answered call.
    latencies: list[tuple[float, float]] = field(default_factory=list)
    refusal_latencies: list[float] = field(default_factory=list)
    refusal_reasons: list[str] = field(default_factory=list)
    last_refusal: float = 0.0


async def answered(tally: Tally, call: object) -> bool:
    """Await one call; True when answered, False when refused (retry it)."""
    started = time.monotonic()
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        if error.code() in RETRYABLE:
            tally.refused += 1
            tally.refusal_latencies.append(time.monotonic() - started)
            tally.refusal_reasons.append(f"{error.code().name}: {error.details()}")
            tally.last_refusal = time.monotonic()
            return False
        tally.broken.append(f"{error.code().name}: {error.details()}")
        return False
    tally.latencies.append((started, time.monotonic() - started))
    return True


async def jobs(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, tally: Tally, name: str, stop: asyncio.Event
) -> None:
    """Hold, then record, job after job; a refused step is retried with its own id."""
    job = 0
    while not stop.is_set():
        job += 1
        request_id = f"{name}-{job}"
        hold = quota_pb2.CheckQuotaRequest(
            org_id=tally.org, request_id=request_id, units={"pages": 1}, hold=True
        )
        while not stop.is_set():
            if await answered(tally, quota.CheckQuota(hold, timeout=CALL_TIMEOUT)):
                break
            await asyncio.sleep(0.02)
        record = quota_pb2.RecordUsageRequest(
            org_id=tally.org, request_id=request_id, units={"pages": 1}
        )
        while not stop.is_set():
            if await answered(tally, quota.RecordUsage(record, timeout=CALL_TIMEOUT)):
                tally.acked.add(request_id)
                break
            await asyncio.sleep(0.02)


def start_jobs(
    quotas: list[quota_pb2_grpc.QuotaServiceAsyncStub], tallies: list[Tally], stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """Two callers per organization, one through each server."""
    return [
        asyncio.create_task(jobs(quota, tally, f"{tally.org}-via{index}", stop))
        for tally in tallies
        for index, quota in enumerate(quotas)
    ]


@contextlib.asynccontextmanager
async def stubs(targets: list[str]) -> AsyncIterator[list[quota_pb2_grpc.QuotaServiceAsyncStub]]:
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    try:
        yield [quota_pb2_grpc.QuotaServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close(None)


async def set_plans(target: str, orgs: list[str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for org in orgs:
            await admin.SetPlan(
                admin_pb2.SetPlanRequest(
                    plan=plan_pb2.Plan(
                        org_id=org,
                        name="HA",
                        timezone="UTC",
                        metrics=[plan_pb2.MetricLimits(metric="pages", overage_allowed=True)],
                    )
                ),
                timeout=10,
            )


async def committed(target: str, org: str, seconds: float = 10.0) -> int:
    """The org's committed pages, read as a caller would: UNAVAILABLE (a node the
    health probe still counts as down just after a takeover) is retried, as the
    contract says, for up to `seconds`."""
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        while True:
            try:
                usage = await quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
                    quota_pb2.GetUsageRequest(org_id=org), timeout=10
                )
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    return {m.metric: m.committed for m in usage.metrics}.get("pages", 0)


def no_broken_answers(tallies: list[Tally]) -> None:
    broken = {tally.org: tally.broken[:5] for tally in tallies if tally.broken}
    assert not broken, f"answers outside the contract (retry only UNAVAILABLE): {broken}"


async def preload(target: str, org: str, jobs_count: int) -> None:
    """`jobs_count` recorded jobs, so that the organization's slot holds that many keys."""
    async with grpc.aio.insecure_channel(target) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        for first in range(0, jobs_count, 500):
            reply = await quota.RecordUsageBatch(
                quota_pb2.RecordUsageBatchRequest(
                    items=[
                        quota_pb2.RecordUsageRequest(
                            org_id=org, request_id=f"preload-{n}", units={"pages": 1}
                        )
                        for n in range(first, min(first + 500, jobs_count))
                    ]
                ),
                timeout=30,
            )
            assert all(item.HasField("response") for item in reply.items)
