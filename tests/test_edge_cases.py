"""Small edges found by an outside review: each one a number, a token or a
boundary nobody here chose."""

from __future__ import annotations

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration

from pagemeter.v1 import admin_pb2, quota_pb2
from tests.conftest import RunningServer, eagle_plan
from tests.test_quota_service import snapshot

Q = quota_pb2

NOT_DURATIONS = [
    Duration(seconds=0, nanos=2**31 - 1),
    Duration(seconds=2, nanos=2**31 - 1),
    Duration(seconds=60, nanos=-1),
    Duration(seconds=3, nanos=-500_000_000),
    Duration(seconds=100, nanos=1_000_000_000),
    Duration(seconds=-5, nanos=500_000_000),
]


@pytest.mark.parametrize("ttl", NOT_DURATIONS, ids=lambda d: f"{d.seconds}s{d.nanos}ns")
async def test_a_hold_ttl_that_is_not_a_duration_is_refused(
    pagemeter_server: RunningServer, redis_sync: redis.Redis, ttl: Duration
) -> None:
    """A hold_ttl with nanos out of range or of the other sign is INVALID_ARGUMENT naming hold_ttl, and nothing is held."""
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    before = snapshot(redis_sync)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.quota.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"pages": 1}, request_id="ttl", hold=True, hold_ttl=ttl
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hold_ttl" in (caught.value.details() or "")
    assert snapshot(redis_sync) == before
