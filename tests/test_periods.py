"""Calendar months in the plan's timezone: month ends, local midnight and DST."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagemeter.v1 import plan_pb2
from pagemeter_server.domain.decisions import CheckCall, RecordCall
from pagemeter_server.domain.periods import month_at, month_of, to_datetime, zone
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.quota import Store
from tests.conftest import metric_limits, ms

ZONES = sorted(available_timezones() - {"Factory", "localtime"})
# Zones whose DST change happens at local midnight: the 1st of a month can begin
# at 01:00 local time there.
MIDNIGHT_DST_ZONES = ["America/Santiago", "America/Asuncion", "America/Havana", "Asia/Beirut"]


def test_utc_month_bounds() -> None:
    """A UTC month runs from 00:00 on the 1st to 00:00 on the 1st of the next month."""
    march = month_of(2026, 3, zone("UTC"))
    assert march.period_id == "2026-03"
    assert march.start_ms == ms("2026-03-01T00:00:00+00:00")
    assert march.end_ms == ms("2026-04-01T00:00:00+00:00")


def test_december_rolls_into_the_next_year() -> None:
    """December ends at the start of January of the next year."""
    december = month_of(2026, 12, zone("Asia/Tokyo"))
    assert december.end_ms == ms("2027-01-01T00:00:00+09:00")
    assert month_at(december.end_ms, zone("Asia/Tokyo")).period_id == "2027-01"


def test_month_of_a_dst_start_in_new_york() -> None:
    """March in New York starts at UTC-5 and ends at UTC-4 (DST began on 8 March 2026)."""
    march = month_of(2026, 3, zone("America/New_York"))
    assert march.start_ms == ms("2026-03-01T05:00:00+00:00")
    assert march.end_ms == ms("2026-04-01T04:00:00+00:00")


def test_month_of_a_dst_end_in_berlin() -> None:
    """October in Berlin starts at UTC+2 and ends at UTC+1 (DST ended on 25 October 2026)."""
    october = month_of(2026, 10, zone("Europe/Berlin"))
    assert october.start_ms == ms("2026-09-30T22:00:00+00:00")
    assert october.end_ms == ms("2026-10-31T23:00:00+00:00")
    # 23:30 UTC on 31 October is already November in Berlin but still October in UTC.
    instant = ms("2026-10-31T23:30:00+00:00")
    assert month_at(instant, zone("Europe/Berlin")).period_id == "2026-11"
    assert month_at(instant, zone("UTC")).period_id == "2026-10"


def test_unknown_timezone_is_refused() -> None:
    """A name that is not an IANA timezone raises ValueError with the name in it."""
    with pytest.raises(ValueError, match="Mars/Olympus"):
        zone("Mars/Olympus")


@settings(max_examples=400, deadline=None)
@given(
    tz_name=st.sampled_from(ZONES),
    instant_ms=st.integers(ms("2020-01-01T00:00:00+00:00"), ms("2100-12-01T00:00:00+00:00")),
)
def test_every_instant_falls_inside_its_month(tz_name: str, instant_ms: int) -> None:
    """For any zone and instant, start <= instant < end, and the bounds are local month edges."""
    tz = ZoneInfo(tz_name)
    month = month_at(instant_ms, tz)
    assert month.start_ms <= instant_ms < month.end_ms
    local = to_datetime(instant_ms).astimezone(tz)
    assert (local.year, local.month) == (month.year, month.month)
    # The last millisecond of the month is still in it; its end is in the next one.
    assert month_at(month.end_ms - 1, tz) == month
    following = month_at(month.end_ms, tz)
    assert following.start_ms == month.end_ms
    assert (following.year * 12 + following.month) == (month.year * 12 + month.month) + 1


@pytest.mark.parametrize("tz_name", MIDNIGHT_DST_ZONES)
def test_months_are_contiguous_where_dst_changes_at_midnight(tz_name: str) -> None:
    """Where local midnight can be skipped or repeated, months still tile time without gaps."""
    tz = zone(tz_name)
    for year in range(2020, 2031):
        for m in range(1, 13):
            month = month_of(year, m, tz)
            nxt = month_of(year + (m == 12), m % 12 + 1, tz)
            assert month.end_ms == nxt.start_ms
            assert month_at(month.start_ms, tz) == month
            assert month_at(month.end_ms - 1, tz) == month


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


def test_to_datetime_is_exact_at_millisecond_boundaries() -> None:
    """to_datetime is exact at millisecond boundaries (no float rounding)."""
    assert to_datetime(1_775_001_599_999) == datetime(2026, 3, 31, 23, 59, 59, 999000, tzinfo=UTC)
