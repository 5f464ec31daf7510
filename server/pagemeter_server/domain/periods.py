"""Billing periods in an organization's own IANA timezone.

A period is a calendar month by default. A plan with a billing anchor has
periods of one month or one year from the anchor's day and time of day
(clamped to short months: Jan 31, Feb 28, Mar 31), and a plan whose anchor
changed keeps its earlier periods as they were (`Calendar`).

Lua inside Redis has no timezone database, so the server works out which period
an instant belongs to and passes the answer (and the period's bounds) to the
scripts. The scripts check that the plan's calendar (its timezone, and its
anchors when it has any) is still the one the server assumed.
"""

from __future__ import annotations

import calendar as gregorian
import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cached_property, lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from google.protobuf.timestamp_pb2 import Timestamp

LIFETIME_PERIOD_ID = "lifetime"
# The longest IANA name is about 32 characters; anything much longer is no zone.
MAX_TIMEZONE_NAME = 64


@dataclass(frozen=True)
class Month:
    """One billing period in one timezone, with its bounds as epoch milliseconds:
    a calendar month (day 0, id "YYYY-MM"), or a period from a billing anchor
    (id "YYYY-MM-DD", its first local day). year and month are those of its start."""

    year: int
    month: int
    start_ms: int
    end_ms: int
    day: int = 0

    @cached_property  # asked several times per call; a frozen dataclass's own dict
    def period_id(self) -> str:
        if self.day:
            return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"
        return f"{self.year:04d}-{self.month:02d}"

    def previous(self, calendar: Calendar) -> Month:
        return calendar.period_at(self.start_ms - 1)


@lru_cache(maxsize=4096)
def zone(name: str) -> ZoneInfo:
    """Return the ZoneInfo for an IANA name; raise ValueError if there is none."""
    if not name or name != name.strip() or len(name) > MAX_TIMEZONE_NAME:
        raise ValueError(f"{name[:64]!r} is not an IANA timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a folder of the zone database ("America") or an unusable path.
        raise ValueError(f"{name!r} is not an IANA timezone") from exc


def _first_instant_ms(year: int, month: int, tz: ZoneInfo) -> int:
    """Epoch ms of the first instant whose local date falls in year-month.

    Local midnight of the 1st with fold=0: when midnight does not exist (a DST
    gap at midnight) zoneinfo uses the offset before the gap, which is exactly the
    instant the clock jumps, i.e. the first instant of the new day. When midnight
    happens twice, fold=0 is the earlier one.
    """
    local_midnight = datetime(year, month, 1, tzinfo=tz)
    return int(local_midnight.timestamp() * 1000)


def month_of(year: int, month: int, tz: ZoneInfo) -> Month:
    next_year, next_month = (year, month + 1) if month < 12 else (year + 1, 1)
    return Month(
        year=year,
        month=month,
        start_ms=_first_instant_ms(year, month, tz),
        end_ms=_first_instant_ms(next_year, next_month, tz),
    )


def month_at(instant_ms: int, tz: ZoneInfo) -> Month:
    """The calendar month, in tz, that the instant falls in."""
    local = to_datetime(instant_ms).astimezone(tz)
    return month_of(local.year, local.month, tz)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_datetime(instant_ms: int) -> datetime:
    """Exact conversion of epoch milliseconds (no float rounding at boundaries)."""
    return _EPOCH + timedelta(milliseconds=instant_ms)


def timestamp(instant_ms: int) -> Timestamp:
    """Epoch milliseconds as a protobuf Timestamp."""
    return Timestamp(seconds=instant_ms // 1000, nanos=(instant_ms % 1000) * 1_000_000)


def timestamp_ms(value: Timestamp) -> int:
    """A protobuf Timestamp as epoch milliseconds (sub-millisecond part dropped)."""
    return value.seconds * 1000 + value.nanos // 1_000_000


def local_date(instant_ms: int, tz: ZoneInfo) -> date:
    """The calendar date, in tz, that the instant falls in."""
    return to_datetime(instant_ms).astimezone(tz).date()


def day_start_ms(day: date, tz: ZoneInfo) -> int:
    """Epoch ms of the first instant of the local day (DST gaps as for months)."""
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def day_end_ms(day: date, tz: ZoneInfo) -> int:
    """Epoch ms of the first instant of the next local day."""
    return day_start_ms(day + timedelta(days=1), tz)


@dataclass(frozen=True)
class WindowSpan:
    """One fixed window of a plan's windows (minute, hour, day or week)."""

    kind: str
    window_id: str  # names the window's counters: an epoch minute or hour, or a date
    start_ms: int
    end_ms: int


MINUTE_MS, HOUR_MS = 60_000, 3_600_000


def window_at(kind: str, instant_ms: int, tz: ZoneInfo) -> WindowSpan:
    """The window of `kind` that contains the instant.

    Minutes and hours are UTC's, the same everywhere; days and weeks (Monday to
    Monday, as ISO 8601) are the plan's local calendar, so 23 or 25 hours long
    on the days clocks change.
    """
    if kind in ("minute", "hour"):
        length = MINUTE_MS if kind == "minute" else HOUR_MS
        start = instant_ms - instant_ms % length
        return WindowSpan(kind, str(start // length), start, start + length)
    day = local_date(instant_ms, tz)
    if kind == "day":
        return WindowSpan(kind, day.isoformat(), day_start_ms(day, tz), day_end_ms(day, tz))
    monday = day - timedelta(days=day.weekday())
    return WindowSpan(
        kind,
        monday.isoformat(),
        day_start_ms(monday, tz),
        day_start_ms(monday + timedelta(days=7), tz),
    )


# -- billing calendars ------------------------------------------------------------
#
# A calendar is named by a token the scripts compare with the plan's: the
# timezone alone for calendar months (every plan before billing anchors), else
# "<timezone>|<segments>", each segment "since_ms,kind,anchor_ms" (";" between):
# from since_ms on, periods are calendar months (kind C) or run one month (M) or
# one year (Y) from the anchor's local day and time. The first segment's
# since_ms is 0 and it reaches back without bound. A later segment begins where
# a period of the one before ends (a new anchor applies from the next period),
# and its first period runs to its first boundary on another local date.

CALENDAR_MONTHS, ANCHORED_MONTHS, ANCHORED_YEARS = "C", "M", "Y"
_STEP_MONTHS = {CALENDAR_MONTHS: 1, ANCHORED_MONTHS: 1, ANCHORED_YEARS: 12}
# Anchor changes a plan remembers; periods before the oldest kept follow it.
MAX_SEGMENTS = 16


@dataclass(frozen=True)
class Segment:
    since_ms: int
    kind: str
    anchor_ms: int = 0

    def spec(self) -> str:
        return f"{self.since_ms},{self.kind},{self.anchor_ms}"


def parse_segments(spec: str) -> tuple[Segment, ...]:
    """The segments of a calendar spec ("" is calendar months); ValueError if malformed."""
    if not spec:
        return (Segment(0, CALENDAR_MONTHS),)
    try:
        segments = []
        for part in spec.split(";"):
            since, kind, anchor = part.split(",")
            segments.append(Segment(int(since), kind, int(anchor)))
    except ValueError:
        raise ValueError(f"{spec[:200]!r} is not a billing calendar") from None
    if (
        any(segment.kind not in _STEP_MONTHS for segment in segments)
        or segments[0].since_ms != 0
        or any(a.since_ms >= b.since_ms for a, b in itertools.pairwise(segments))
    ):
        raise ValueError(f"{spec[:200]!r} is not a billing calendar")
    return tuple(segments)


def segments_spec(segments: tuple[Segment, ...]) -> str:
    """The spec of segments; "" for calendar months alone (the tokens of old plans)."""
    if segments == (Segment(0, CALENDAR_MONTHS),):
        return ""
    return ";".join(segment.spec() for segment in segments)


class Calendar:
    """The billing periods of one plan: timezone and anchor segments."""

    def __init__(self, tz_name: str, segments: tuple[Segment, ...]) -> None:
        self.tz_name = tz_name
        self.zone = zone(tz_name)
        self.segments = segments
        spec = segments_spec(segments)
        self.token = f"{tz_name}|{spec}" if spec else tz_name
        # Each anchor's local date and time, read once (boundaries need it often).
        self._anchors = {
            segment.anchor_ms: to_datetime(segment.anchor_ms).astimezone(self.zone)
            for segment in segments
            if segment.kind != CALENDAR_MONTHS
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calendar) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)

    # -- the boundaries of one segment's kind: boundary(k) for integer k --------

    def _boundary(self, segment: Segment, k: int) -> int:
        if segment.kind == CALENDAR_MONTHS:
            year, month0 = divmod(k, 12)
            return _first_instant_ms(year, month0 + 1, self.zone)
        anchor = self._anchors[segment.anchor_ms]
        year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + k * _step(segment), 12)
        day = min(anchor.day, gregorian.monthrange(year, month0 + 1)[1])
        local = datetime(
            year,
            month0 + 1,
            day,
            anchor.hour,
            anchor.minute,
            anchor.second,
            anchor.microsecond,
            tzinfo=self.zone,
        )
        return int(local.timestamp() * 1000)

    def _index_at(self, segment: Segment, instant_ms: int) -> int:
        """k with boundary(k) <= instant < boundary(k + 1)."""
        local = to_datetime(instant_ms).astimezone(self.zone)
        months = local.year * 12 + local.month - 1
        if segment.kind == CALENDAR_MONTHS:
            k = months
        else:
            anchor = self._anchors[segment.anchor_ms]
            k = (months - (anchor.year * 12 + anchor.month - 1)) // _step(segment)
        while self._boundary(segment, k) > instant_ms:
            k -= 1
        while self._boundary(segment, k + 1) <= instant_ms:
            k += 1
        return k

    def _period(self, segment: Segment, start_ms: int, end_ms: int) -> Month:
        local = to_datetime(start_ms).astimezone(self.zone)
        day = 0 if segment.kind == CALENDAR_MONTHS else local.day
        return Month(local.year, local.month, start_ms, end_ms, day)

    # -- periods --------------------------------------------------------------

    def period_at(self, instant_ms: int) -> Month:
        """The billing period the instant falls in."""
        index = 0
        while index + 1 < len(self.segments) and self.segments[index + 1].since_ms <= instant_ms:
            index += 1
        segment = self.segments[index]
        until = self.segments[index + 1].since_ms if index + 1 < len(self.segments) else None
        k = self._index_at(segment, instant_ms)
        start, end = self._boundary(segment, k), self._boundary(segment, k + 1)
        if index > 0:
            first_end = self._first_end(segment)
            if instant_ms < first_end:
                start, end = segment.since_ms, first_end
        if until is not None and end > until:
            end = until
        return self._period(segment, start, end)

    def _first_end(self, segment: Segment) -> int:
        """The end of a later segment's first period: its first boundary after
        since_ms on another local date than since_ms (so that no period is
        shorter than the rest of a day, and ids, local dates, stay unique)."""
        since = segment.since_ms
        k = self._index_at(segment, since)
        end = self._boundary(segment, k + 1)
        if local_date(end, self.zone) == local_date(since, self.zone):
            end = self._boundary(segment, k + 2)
        return end

    def period_starting_in(self, year: int, month: int) -> Month:
        """The period that starts in the local calendar month (the first, if two
        do: the month a new anchor takes effect), else the one in progress at
        the month's first instant (a yearly plan's other months)."""
        first = self.period_at(_first_instant_ms(year, month, self.zone))
        if (first.year, first.month) == (year, month):
            return first
        following = self.period_at(first.end_ms)
        if (following.year, following.month) == (year, month):
            return following
        return first

    def anchored(self) -> bool:
        return self.segments[-1].kind != CALENDAR_MONTHS

    def with_anchor(self, kind: str, anchor_ms: int, now_ms: int) -> Calendar:
        """This calendar after a plan sets (kind, anchor) at now: a change applies
        from the end of the period in progress; a change not yet in effect is
        replaced; an unchanged anchor changes nothing."""
        wanted = Segment(0, kind, anchor_ms if kind != CALENDAR_MONTHS else 0)
        in_effect = tuple(s for s in self.segments if s.since_ms <= now_ms) or self.segments[:1]
        last = in_effect[-1]
        if (last.kind, last.anchor_ms) == (wanted.kind, wanted.anchor_ms):
            return Calendar(self.tz_name, in_effect)
        settled = Calendar(self.tz_name, in_effect)
        since = settled.period_at(now_ms).end_ms
        segments = (*in_effect, Segment(since, wanted.kind, wanted.anchor_ms))
        if len(segments) > MAX_SEGMENTS:
            kept = segments[-MAX_SEGMENTS:]
            segments = (Segment(0, kept[0].kind, kept[0].anchor_ms), *kept[1:])
        return Calendar(self.tz_name, segments)


def _step(segment: Segment) -> int:
    return _STEP_MONTHS[segment.kind]


@lru_cache(maxsize=4096)
def calendar(token: str) -> Calendar:
    """The calendar a token names ("Europe/Berlin", or with segments after "|");
    ValueError if it names none."""
    tz_name, _, spec = token.partition("|")
    return Calendar(tz_name, parse_segments(spec))


def timezone_name(token: str) -> str:
    """The IANA name of a calendar token's timezone."""
    return token.partition("|")[0]


def tz_of(token: str) -> ZoneInfo:
    """The timezone of a calendar token (days and weeks are the timezone's)."""
    return zone(token.partition("|")[0])
