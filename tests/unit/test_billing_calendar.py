"""Billing periods from an anchor: clamped at short months, across DST, and a
changed anchor applied from the end of the period in progress."""

from __future__ import annotations

import calendar as gregorian
import itertools
from datetime import datetime, timedelta
from zoneinfo import available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagemeter_server.domain.periods import (
    ANCHORED_MONTHS,
    ANCHORED_YEARS,
    CALENDAR_MONTHS,
    Calendar,
    Month,
    Segment,
    calendar,
    to_datetime,
    zone,
)
from tests.conftest import examples, ms

ZONES = sorted(available_timezones() - {"Factory", "localtime"})


def anchored(tz: str, anchor: str, kind: str = ANCHORED_MONTHS) -> Calendar:
    return Calendar(tz, (Segment(0, kind, ms(anchor)),))


def local(instant_ms: int, tz: str) -> str:
    return to_datetime(instant_ms).astimezone(zone(tz)).isoformat()


def walk(billing: Calendar, start_ms: int, count: int) -> list[Month]:
    periods = [billing.period_at(start_ms)]
    while len(periods) < count:
        periods.append(billing.period_at(periods[-1].end_ms))
    return periods


def test_an_anchor_on_the_31st_clamps_to_short_months_across_dst() -> None:
    """Jan 31 10:00 in New York: Feb 28, Mar 31 (after the DST change, still
    10:00 local), Apr 30; the leap year gives Feb 29."""
    billing = anchored("America/New_York", "2026-01-31T10:00:00-05:00")
    periods = walk(billing, ms("2026-01-31T15:00:00+00:00"), 5)
    assert [p.period_id for p in periods] == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
        "2026-05-31",
    ]
    assert [local(p.start_ms, "America/New_York") for p in periods[:3]] == [
        "2026-01-31T10:00:00-05:00",
        "2026-02-28T10:00:00-05:00",
        "2026-03-31T10:00:00-04:00",
    ]
    leap = walk(billing, ms("2028-01-31T15:00:00+00:00"), 2)
    assert [p.period_id for p in leap] == ["2028-01-31", "2028-02-29"]


def test_a_yearly_anchor_on_the_29th_of_february() -> None:
    """Yearly from 2028-02-29: 2029-02-28, 2030-02-28, 2031-02-28, 2032-02-29."""
    billing = anchored("UTC", "2028-02-29T00:00:00+00:00", ANCHORED_YEARS)
    periods = walk(billing, ms("2028-03-01T00:00:00+00:00"), 5)
    assert [p.period_id for p in periods] == [
        "2028-02-29",
        "2029-02-28",
        "2030-02-28",
        "2031-02-28",
        "2032-02-29",
    ]


def test_an_anchor_time_inside_a_dst_gap_starts_the_period_after_the_jump() -> None:
    """02:30 does not exist in New York on 8 March 2026: that period begins at
    03:30 EDT, the same distance after the jump; the next at 02:30 again."""
    billing = anchored("America/New_York", "2026-02-08T02:30:00-05:00")
    march = billing.period_at(ms("2026-03-20T00:00:00+00:00"))
    assert local(march.start_ms, "America/New_York") == "2026-03-08T03:30:00-04:00"
    assert local(march.end_ms, "America/New_York") == "2026-04-08T02:30:00-04:00"


def test_year_and_month_name_the_period_that_starts_in_that_month() -> None:
    billing = anchored("Europe/Berlin", "2026-01-15T00:00:00+01:00")
    april = billing.period_starting_in(2026, 4)
    assert april.period_id == "2026-04-15"
    yearly = anchored("UTC", "2026-06-01T00:00:00+00:00", ANCHORED_YEARS)
    # No yearly period starts in March 2027: the one in progress then.
    assert yearly.period_starting_in(2027, 3).period_id == "2026-06-01"


def test_a_new_anchor_applies_from_the_end_of_the_period_in_progress() -> None:
    """Calendar months, anchor set to the 15th on March 20: March stays whole;
    April 1 to April 15 is a period of its own; then the 15th to the 15th."""
    months = calendar("Europe/Berlin")
    changed = months.with_anchor(
        ANCHORED_MONTHS, ms("2026-01-15T09:00:00+01:00"), ms("2026-03-20T12:00:00+01:00")
    )
    periods = walk(changed, ms("2026-03-20T12:00:00+01:00"), 4)
    assert [p.period_id for p in periods] == ["2026-03", "2026-04-01", "2026-04-15", "2026-05-15"]
    assert local(periods[1].end_ms, "Europe/Berlin") == "2026-04-15T09:00:00+02:00"
    # The periods before the change are the calendar months they were.
    assert changed.period_at(ms("2026-01-20T00:00:00+01:00")).period_id == "2026-01"
    # The token names the same calendar.
    assert calendar(changed.token).segments == changed.segments


def test_a_first_period_shorter_than_its_day_joins_the_next() -> None:
    """A new anchor at 10:00 on the 1st, taking effect at midnight on the 1st:
    the first period runs to the next month's boundary, not for 10 hours."""
    changed = calendar("UTC").with_anchor(
        ANCHORED_MONTHS, ms("2026-01-01T10:00:00+00:00"), ms("2026-03-20T00:00:00+00:00")
    )
    first = changed.period_at(ms("2026-04-01T05:00:00+00:00"))
    assert first.period_id == "2026-04-01"
    assert first.start_ms == ms("2026-04-01T00:00:00+00:00")
    assert first.end_ms == ms("2026-05-01T10:00:00+00:00")


def test_setting_the_same_anchor_changes_nothing_and_a_pending_one_is_replaced() -> None:
    now = ms("2026-03-20T00:00:00+00:00")
    first = calendar("UTC").with_anchor(ANCHORED_MONTHS, ms("2026-01-15T00:00:00+00:00"), now)
    assert first.with_anchor(ANCHORED_MONTHS, ms("2026-01-15T00:00:00+00:00"), now) == first
    second = first.with_anchor(ANCHORED_MONTHS, ms("2026-01-20T00:00:00+00:00"), now + 1000)
    assert len(second.segments) == 2
    assert second.segments[-1].anchor_ms == ms("2026-01-20T00:00:00+00:00")
    back = second.with_anchor(CALENDAR_MONTHS, 0, now + 2000)
    assert back.token == "UTC"


def test_calendar_tokens_that_name_no_calendar_are_refused() -> None:
    for token in ["UTC|x", "UTC|5,M,0", "UTC|0,Q,0", "UTC|0,M,0;0,C,0", "Nowhere/City"]:
        with pytest.raises(ValueError, match=r"not a billing calendar|not an IANA timezone"):
            calendar(token)


# -- properties --------------------------------------------------------------------

instants = st.integers(
    min_value=ms("2001-01-01T00:00:00+00:00"), max_value=ms("2090-01-01T00:00:00+00:00")
)


def expected_start_day(anchor_day: int, year: int, month: int) -> int:
    return min(anchor_day, gregorian.monthrange(year, month)[1])


@settings(max_examples=examples(300), deadline=None)
@given(
    tz=st.sampled_from(ZONES),
    anchor_ms=instants,
    kind=st.sampled_from([ANCHORED_MONTHS, ANCHORED_YEARS]),
    instant=instants,
)
def test_anchored_periods_tile_time_and_start_on_the_anchor_day(
    tz: str, anchor_ms: int, kind: str, instant: int
) -> None:
    """Each instant is in exactly one period; the next starts where it ends; each
    starts on the anchor's day (clamped to the month's length), in the anchor's
    month of the year for yearly plans, and lasts about a month or a year."""
    billing = Calendar(tz, (Segment(0, kind, anchor_ms),))
    period = billing.period_at(instant)
    assert period.start_ms <= instant < period.end_ms
    assert billing.period_at(period.end_ms).start_ms == period.end_ms
    assert billing.period_at(period.start_ms - 1).end_ms == period.start_ms
    anchor = to_datetime(anchor_ms).astimezone(zone(tz))
    start = to_datetime(period.start_ms).astimezone(zone(tz))
    # A start inside a DST gap is moved past the jump, possibly onto the next day.
    assert start.day in {
        expected_start_day(anchor.day, start.year, start.month),
        expected_start_day(anchor.day, start.year, start.month) + 1,
    }
    if kind == ANCHORED_YEARS:
        assert (start.month - anchor.month) % 12 in {0, 1}
        assert timedelta(days=364) < timedelta(milliseconds=period.end_ms - period.start_ms)
    else:
        length = timedelta(milliseconds=period.end_ms - period.start_ms)
        assert timedelta(days=27) < length < timedelta(days=32)
    assert period.period_id == f"{start.year:04d}-{start.month:02d}-{start.day:02d}"


@settings(max_examples=examples(200), deadline=None)
@given(
    tz=st.sampled_from(ZONES),
    changes=st.lists(
        st.tuples(
            st.sampled_from([CALENDAR_MONTHS, ANCHORED_MONTHS, ANCHORED_YEARS]),
            instants,
            st.integers(min_value=0, max_value=400 * 86_400_000),
        ),
        min_size=1,
        max_size=5,
    ),
    instant=instants,
)
def test_periods_stay_whole_and_unique_through_anchor_changes(
    tz: str, changes: list[tuple[str, int, int]], instant: int
) -> None:
    """Changes made one after another: the period in progress at each change
    keeps its bounds, periods still tile time, and no two share an id."""
    billing = calendar(tz)
    now = ms("2030-01-01T00:00:00+00:00")
    for kind, anchor_ms, wait in changes:
        now += wait
        before = billing.period_at(now)
        billing = billing.with_anchor(kind, anchor_ms, now)
        after = billing.period_at(now)
        assert (after.start_ms, after.end_ms, after.period_id) == (
            before.start_ms,
            before.end_ms,
            before.period_id,
        )
    periods = walk(billing, min(instant, now - 3 * 366 * 86_400_000), 60)
    for earlier, later in itertools.pairwise(periods):
        assert earlier.end_ms == later.start_ms
        assert earlier.start_ms < earlier.end_ms
    assert len({p.period_id for p in periods}) == len(periods)
    assert calendar(billing.token).segments == billing.segments


def test_calendar_months_are_unchanged_by_the_calendar() -> None:
    """The plain token is the timezone: the same months, ids and bounds as before."""
    berlin = calendar("Europe/Berlin")
    assert berlin.token == "Europe/Berlin"
    march = berlin.period_at(ms("2026-03-15T00:00:00+01:00"))
    assert (march.period_id, march.start_ms, march.end_ms) == (
        "2026-03",
        int(datetime(2026, 3, 1, tzinfo=zone("Europe/Berlin")).timestamp() * 1000),
        int(datetime(2026, 4, 1, tzinfo=zone("Europe/Berlin")).timestamp() * 1000),
    )
