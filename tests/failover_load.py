"""Concurrent record load for the failover tests: workers that retry with their own ids.

Each worker records one job after another. A refused call (UNAVAILABLE or
DEADLINE_EXCEEDED, as during a failover) is retried with the same request id,
as a real worker does, so a job is never recorded under two ids. The ledger
keeps what the callers were told, to compare with what the store kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from pagemeter.v1 import quota_pb2, quota_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Ledger:
    """What the workers of one organization were told."""

    org: str
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    acked_before_kill: int = 0
    first_refusal: float | None = None
    last_refusal: float | None = None


async def record(quota: quota_pb2_grpc.QuotaServiceStub, org: str, request_id: str) -> bool:
    """One RecordUsage; True when acknowledged as new, False when a duplicate."""
    answer = await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id=org, request_id=request_id, units={"pages": 1}),
        timeout=3,
    )
    return not answer.duplicate


async def worker(
    quota: quota_pb2_grpc.QuotaServiceStub, ledger: Ledger, number: int, stop: asyncio.Event
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


async def committed_pages(quota: quota_pb2_grpc.QuotaServiceStub, org: str) -> int:
    usage = await quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org), timeout=5)
    return {m.metric: m.committed for m in usage.metrics}["pages"]


async def until(condition: Callable[[], bool], what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
