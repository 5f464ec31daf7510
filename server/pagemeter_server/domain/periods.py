"""Calendar months in an organization's own IANA timezone.

Lua inside Redis has no timezone database, so the server works out which month an
instant belongs to and passes the answer (and the month's bounds) to the scripts.
The scripts check that the plan's timezone is still the one the server assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from google.protobuf.timestamp_pb2 import Timestamp

LIFETIME_PERIOD_ID = "lifetime"
# The longest IANA name is about 32 characters; anything much longer is no zone.
MAX_TIMEZONE_NAME = 64


@dataclass(frozen=True)
class Month:
    """One calendar month in one timezone, with its bounds as epoch milliseconds."""

    year: int
    month: int
    start_ms: int
    end_ms: int

    @property
    def period_id(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def previous(self, tz: ZoneInfo) -> Month:
        year, month = (self.year, self.month - 1) if self.month > 1 else (self.year - 1, 12)
        return month_of(year, month, tz)


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
