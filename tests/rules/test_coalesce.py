"""Auto-pipelining: concurrent script calls coalesced into one pipeline keep every
call atomic, isolated and exact."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions

from pagemeter_server.domain.decisions import CheckCall
from pagemeter_server.store.quota import Store
from tests.conftest import START_MS, metric_limits
from tests.rules.test_rules_lua import set_plan


@pytest.fixture
def piped(redis_client: aioredis.Redis) -> Store:
    return Store(
        redis_client,
        default_timezone="UTC",
        record_retention_days=40,
        usage_retention_days=400,
        coalesce=True,
    )


async def test_coalesced_checks_never_over_admit(piped: Store, redis_sync: redis.Redis) -> None:
    """100 concurrent holds of 1 unit for 60 units, sent as pipelines, admit exactly 60."""
    await set_plan(piped, metric_limits("pages", contract_quota=60, overage_allowed=False))
    results = await asyncio.gather(
        *(
            piped.check(
                "acme",
                CheckCall({"pages": 1}, request_id=f"j{i}", hold=True, hold_ttl_ms=60000),
                now_ms=START_MS,
            )
            for i in range(100)
        )
    )
    assert sum(r.allowed for r in results) == 60
    assert redis_sync.hget("pm:{acme}:held", "h:pages") == "60"


async def test_one_failing_call_does_not_fail_its_pipeline(piped: Store) -> None:
    """A call that Redis refuses fails alone; the calls sent with it in the same pipeline succeed."""
    await set_plan(piped, metric_limits("pages"))
    good = piped.check("acme", CheckCall({"pages": 1}), now_ms=START_MS)
    bad = piped.run("check", ["pm:{acme}:plan"], [1])  # wrong KEYS/ARGV: the script asserts
    outcomes = await asyncio.gather(good, bad, return_exceptions=True)
    assert not isinstance(outcomes[0], BaseException) and outcomes[0].allowed
    assert isinstance(outcomes[1], redis.exceptions.ResponseError)


async def test_scripts_reload_inside_a_pipeline(piped: Store, redis_sync: redis.Redis) -> None:
    """After SCRIPT FLUSH, coalesced calls load their scripts again and all succeed."""
    await set_plan(piped, metric_limits("pages"))
    redis_sync.script_flush()
    results = await asyncio.gather(
        *(piped.check("acme", CheckCall({"pages": 1}), now_ms=START_MS) for _ in range(20))
    )
    assert all(r.allowed for r in results)
