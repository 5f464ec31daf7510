"""Calendar months in the plan's timezone, in the store: a month's usage lands in its
month key at local midnight and across DST (the pure arithmetic is in
tests/unit/test_periods.py)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis

from pagemeter.v1 import plan_pb2
from pagemeter_server.domain.decisions import CheckCall, RecordCall
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.quota import Store
from tests.conftest import metric_limits, ms


def _local_ms(text: str, tz_name: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz_name)).timestamp() * 1000)


async def _plan(store: Store, tz_name: str) -> None:
    plan = plan_pb2.Plan(
        org_id="acme",
        name="T",
        timezone=tz_name,
        metrics=[metric_limits("pages", contract_quota=100)],
    )
    await store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=0)


async def _record(store: Store, request_id: str, completed_ms: int, now_ms: int) -> str:
    result = await store.record(
        "acme",
        RecordCall(
            request_id=request_id,
            units={"pages": 10},
            completed_ms=completed_ms,
            completed_given=True,
            success=True,
        ),
        now_ms=now_ms,
    )
    return result.month_id


async def test_month_rollover_at_local_midnight_in_tokyo(store: Store) -> None:
    """In Asia/Tokyo usage resets at local midnight on the 1st (15:00 UTC the day before)."""
    await _plan(store, "Asia/Tokyo")
    last_ms = _local_ms("2026-03-31T23:59:59.999", "Asia/Tokyo")
    first_ms = _local_ms("2026-04-01T00:00:00", "Asia/Tokyo")
    assert first_ms == ms("2026-03-31T15:00:00+00:00")
    assert await _record(store, "a", last_ms, last_ms) == "2026-03"
    assert await _record(store, "b", first_ms, first_ms) == "2026-04"
    before = (await store.check("acme", CheckCall({"pages": 1}), now_ms=last_ms)).metrics[0]
    after = (await store.check("acme", CheckCall({"pages": 1}), now_ms=first_ms)).metrics[0]
    assert (before.committed, after.committed) == (10, 10)
    assert after.lifetime is False
    march = await store.usage("acme", now_ms=first_ms, year_month=(2026, 3))
    assert march.month_fields["c:pages"] == 10


async def test_usage_counts_in_the_month_of_completion(store: Store) -> None:
    """A job completed on the last evening of October in New York counts in October there."""
    await _plan(store, "America/New_York")
    completed = ms("2026-11-01T03:30:00+00:00")  # 23:30 on 31 October in New York
    now = completed + 3_600_000
    assert await _record(store, "late", completed, now) == "2026-10"


async def test_dst_month_in_new_york_counts_every_day(store: Store) -> None:
    """Usage across the DST change of March lands in March, both before and after the change."""
    await _plan(store, "America/New_York")
    before_change = _local_ms("2026-03-08T01:30:00", "America/New_York")
    after_change = _local_ms("2026-03-08T03:30:00", "America/New_York")
    last_minute = _local_ms("2026-03-31T23:59:00", "America/New_York")
    for i, instant in enumerate((before_change, after_change, last_minute)):
        assert await _record(store, f"j{i}", instant, last_minute) == "2026-03"
    april = _local_ms("2026-04-01T00:00:00", "America/New_York")
    assert await _record(store, "april", april, april) == "2026-04"


async def test_changing_the_plan_timezone_moves_the_month_key(store: Store, redis_client) -> None:  # type: ignore[no-untyped-def]
    """A server that still believes the old timezone is corrected by the script (STALE_TZ) at once."""
    other = Store(
        redis_client, default_timezone="UTC", record_retention_days=40, usage_retention_days=400
    )
    await _plan(store, "UTC")
    instant = ms("2026-03-31T20:00:00+00:00")  # March in UTC, April in Tokyo
    assert await _record(other, "a", instant, instant) == "2026-03"
    await _plan(store, "Asia/Tokyo")
    assert await _record(other, "b", instant, instant) == "2026-04"
    assert (await other.usage("acme", now_ms=instant)).timezone == "Asia/Tokyo"


async def _anchored_plan(store: Store, anchor: str | None, now_ms: int) -> None:
    plan = plan_pb2.Plan(
        org_id="acme",
        name="T",
        timezone="UTC",
        metrics=[metric_limits("pages", contract_quota=100)],
    )
    if anchor is not None:
        plan.billing_anchor.FromMilliseconds(ms(anchor))
    await store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=now_ms)


async def test_a_server_that_missed_an_anchor_change_is_corrected_by_the_script(
    store: Store,
    redis_client: aioredis.Redis,
    plans_migrated: None,
) -> None:
    """A server that still believes calendar months records into the anchored
    period once the new anchor is in effect (the script answers STALE_TZ with
    the plan's calendar, and nothing was written under the wrong key)."""
    other = Store(
        redis_client, default_timezone="UTC", record_retention_days=40, usage_retention_days=400
    )
    march = ms("2026-03-10T00:00:00+00:00")
    await _anchored_plan(store, None, march)
    assert await _record(other, "a", march, march) == "2026-03"
    await _anchored_plan(store, "2026-01-20T00:00:00+00:00", march)
    # In effect from April 1: April 1 to April 20, then from the 20th.
    later = ms("2026-04-25T00:00:00+00:00")
    assert await _record(other, "b", later, later) == "2026-04-20"
    assert await redis_client.exists("pm:{acme}:u:2026-04") == 0


async def test_set_plan_refuses_a_calendar_changed_since_it_was_read(
    store: Store,
    redis_client: aioredis.Redis,
    plans_migrated: None,
) -> None:
    """set_plan.lua stores a plan only if the stored calendar is the one the
    server joined the new anchor to; otherwise it answers STALE_CALENDAR and
    writes nothing."""
    now = ms("2026-03-10T00:00:00+00:00")
    await _anchored_plan(store, "2026-01-20T00:00:00+00:00", now)
    before = await redis_client.hgetall("pm:{acme}:plan")
    keys = [
        "pm:{acme}:plan",
        "pm:{acme}:planlog",
        "pm:{acme}:planver",
        "pm:{acme}:audit",
        "pm:{acme}:unplanned",
        "pm:{acme}:u:lifetime",
        "pm:{acme}:events",
        "pm:{acme}:evstate",
    ]
    reply = await store.scripts["set_plan"](
        keys=keys, args=['{"schema":2}', now, 0, "test", 100, "", store.event_spec()]
    )
    assert reply == ["STALE_CALENDAR"]
    assert await redis_client.hgetall("pm:{acme}:plan") == before
