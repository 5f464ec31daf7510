"""The command line's value types: argparse `type=` functions, which refuse bad values."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, date, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import plan_pb2

# The server's own rules, repeated so a typo is caught before anything is sent.
METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
PRICE = re.compile(r"\d{1,12}(\.\d{1,9})?")
SPEC_HELP = (
    "SPEC is NAME[:key=value,...] with keys quota, hard_limit, overage (yes/no), price, "
    "overage_price, period (monthly/none), overage_spend_cap (money per period), "
    "shadow_hard_limit (on trial: reports, never "
    "denies), rollover (percent of the unused quota the next period takes in) and "
    "rollover_cap (units), windows minute, hour, day, week (N, N/soft for a window "
    "that reports but never denies, or N/shadow for one on trial), and notification "
    "thresholds: alerts (percents of the quota, e.g. 50/80/100, or none), hard_alerts "
    "(percents of the hard limit, e.g. 90/100, or none), credits_below (units) and "
    "grant_expiring (e.g. 7d; s, m, h or d). Without any of those four the server's "
    "defaults apply (80/100 of quota and hard limit); with one, the percents not given "
    "stay 80/100. E.g. "
    "pages:quota=2000,hard_limit=5000,overage=yes,price=0.03,overage_price=0.028,day=200"
)


def _whole_number(key: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise argparse.ArgumentTypeError(f"{key} must be a whole number >= 0 (got {value!r})")
    return int(value)


def _yes_no(key: str, value: str) -> bool:
    answers = {"yes": True, "true": True, "no": False, "false": False}
    if value.lower() not in answers:
        raise argparse.ArgumentTypeError(f"{key} must be yes, no, true or false (got {value!r})")
    return answers[value.lower()]


def _price(key: str, value: str) -> str:
    # Kept as the exact text: prices are decimal strings, never floats.
    if not PRICE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{key} must be a decimal number such as 0.028, at most 12 digits before "
            f"the point and 9 after (got {value!r})"
        )
    return value


def _period(key: str, value: str) -> plan_pb2.Period.ValueType:
    periods = {"monthly": plan_pb2.PERIOD_MONTHLY, "none": plan_pb2.PERIOD_NONE}
    if value.lower() not in periods:
        raise argparse.ArgumentTypeError(f"{key} must be monthly or none (got {value!r})")
    return periods[value.lower()]


# A SPEC's keys: the MetricLimits field each one sets, and the reader of its value.
SPEC_KEYS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "quota": ("contract_quota", _whole_number),
    "hard_limit": ("hard_limit", _whole_number),
    "shadow_hard_limit": ("shadow_hard_limit", _whole_number),
    "overage_spend_cap": ("overage_spend_cap", _price),
    "overage": ("overage_allowed", _yes_no),
    "price": ("price_per_unit", _price),
    "overage_price": ("overage_price_per_unit", _price),
    "period": ("period", _period),
    "rollover": ("rollover_percent", _whole_number),
    "rollover_cap": ("rollover_cap", _whole_number),
}


WINDOW_KEYS = {
    "minute": plan_pb2.WINDOW_MINUTE,
    "hour": plan_pb2.WINDOW_HOUR,
    "day": plan_pb2.WINDOW_DAY,
    "week": plan_pb2.WINDOW_WEEK,
}


def _add_window(limits: plan_pb2.MetricLimits, key: str, value: str) -> None:
    """`day=200` (a hard window), `day=200/soft` or `day=200/shadow`."""
    amount, slash, kind = value.partition("/")
    if slash and kind not in ("soft", "shadow"):
        raise argparse.ArgumentTypeError(f"{key} must be N, N/soft or N/shadow (got {value!r})")
    limits.windows.add(
        window=WINDOW_KEYS[key],
        limit=_whole_number(key, amount),
        soft=kind == "soft",
        shadow=kind == "shadow",
    )


# Notification thresholds (MetricLimits.alerts). The server's defaults when a metric
# sets none: 80 and 100 % of the contract quota and of the hard limit.
DEFAULT_ALERT_PERCENTS = (80, 100)
MAX_ALERT_PERCENTS = 10
# The highest percent each list takes: a quota may be passed (overage), a hard limit not.
ALERT_PERCENT_KEYS = {
    "alerts": ("quota_percents", 1000),
    "hard_alerts": ("hard_limit_percents", 100),
}
ALERT_KEYS = (*ALERT_PERCENT_KEYS, "credits_below", "grant_expiring")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
MAX_GRANT_EXPIRING_SECONDS = 366 * 86_400


def _alert_percents(key: str, value: str, highest: int) -> list[int]:
    """`50/80/100` (or `none`: no thresholds of this kind)."""
    if value.lower() == "none":
        return []
    parts = value.split("/")
    if len(parts) > MAX_ALERT_PERCENTS or not all(
        re.fullmatch(r"[0-9]{1,4}", part) and 1 <= int(part) <= highest for part in parts
    ):
        raise argparse.ArgumentTypeError(
            f"{key} must be up to {MAX_ALERT_PERCENTS} percents from 1 to {highest} "
            f"separated by '/', e.g. 50/80/100, or none (got {value!r})"
        )
    return sorted({int(part) for part in parts})


def duration_seconds(key: str, value: str) -> int:
    """`90s`, `30m`, `12h` or `7d` as seconds, from 1 second to 366 days."""
    found = re.fullmatch(r"([0-9]{1,9})([smhd])", value.lower())
    seconds = int(found.group(1)) * DURATION_UNITS[found.group(2)] if found else 0
    if not 1 <= seconds <= MAX_GRANT_EXPIRING_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{key} must be a time from 1s to 366d: a whole number and s, m, h or d, "
            f"e.g. 7d or 12h (got {value!r})"
        )
    return seconds


def _set_alert(limits: plan_pb2.MetricLimits, key: str, value: str) -> None:
    """One threshold key. The first one sets MetricLimits.alerts, with the default
    percents, so that each key changes only what it names."""
    alerts = limits.alerts
    if not limits.HasField("alerts"):
        alerts.quota_percents.extend(DEFAULT_ALERT_PERCENTS)
        alerts.hard_limit_percents.extend(DEFAULT_ALERT_PERCENTS)
    if key in ALERT_PERCENT_KEYS:
        field, highest = ALERT_PERCENT_KEYS[key]
        percents = _alert_percents(key, value, highest)
        alerts.ClearField(field)  # type: ignore[arg-type]
        getattr(alerts, field).extend(percents)
    elif key == "credits_below":
        alerts.credits_below = _whole_number(key, value)
    else:
        alerts.grant_expiring_within.FromSeconds(duration_seconds(key, value))


def _set_spec_value(limits: plan_pb2.MetricLimits, key: str, value: str) -> None:
    if key in WINDOW_KEYS:
        _add_window(limits, key, value)
        return
    if key in ALERT_KEYS:
        _set_alert(limits, key, value)
        return
    if key not in SPEC_KEYS:
        raise argparse.ArgumentTypeError(f"unknown key {key!r}")
    field, read = SPEC_KEYS[key]
    setattr(limits, field, read(key, value))


def metric_spec(text: str) -> plan_pb2.MetricLimits:
    """Parse `pages:quota=2000,overage=yes,...` into MetricLimits (argparse type)."""
    try:
        return _parse_metric_spec(text)
    except argparse.ArgumentTypeError as problem:
        raise argparse.ArgumentTypeError(f"bad SPEC {text!r}: {problem}. {SPEC_HELP}") from None


def _parse_metric_spec(text: str) -> plan_pb2.MetricLimits:
    name, _, settings = text.partition(":")
    if not METRIC_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"metric name {name!r} must start with a lowercase letter and have at most 32 "
            "lowercase letters, digits and '_'"
        )
    limits = plan_pb2.MetricLimits(metric=name)
    seen: set[str] = set()
    for item in settings.split(",") if settings else []:
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        if key in seen:
            raise argparse.ArgumentTypeError(f"{key} is given twice")
        seen.add(key)
        _set_spec_value(limits, key, value)
    return limits


# RFC 3339's date-time: a date, a time to the second (fractions up to nanoseconds)
# and a UTC offset; protobuf's own parser is laxer about offsets (+1:00, +24:00).
RFC_3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)",
    re.IGNORECASE | re.ASCII,
)
# GrantCreditsRequest.priority: 0 to 100.
MAX_GRANT_PRIORITY = 100
BILLING_INTERVALS = {
    "month": plan_pb2.BILLING_INTERVAL_MONTH,
    "year": plan_pb2.BILLING_INTERVAL_YEAR,
}


def _rfc_3339(text: str, field: str) -> Timestamp:
    """An RFC 3339 time with its UTC offset as a Timestamp; the message names `field`."""
    stamp = Timestamp()
    try:
        if not RFC_3339.fullmatch(text):
            raise ValueError
        stamp.FromJsonString(text.upper())  # checks the date (no Feb 30) and the range
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{field} must be an RFC 3339 time with a UTC offset, such as "
            f"2026-01-31T10:00:00Z or 2026-01-31T11:00:00+01:00 (got {text!r})"
        ) from None
    return stamp


def billing_anchor(text: str) -> Timestamp:
    """Parse an RFC 3339 time with its UTC offset into Plan.billing_anchor (argparse type)."""
    return _rfc_3339(text, "billing_anchor")


def _grant_time(field: str) -> Callable[[str], datetime]:
    def parse(text: str) -> datetime:
        # The SDK takes timezone-aware datetimes; microseconds are finer than the
        # server keeps (milliseconds).
        return _rfc_3339(text, field).ToDatetime(UTC)

    parse.__name__ = field  # argparse names the type in some messages
    return parse


# GrantCreditsRequest.effective_at and expires_at (argparse types).
effective_at = _grant_time("effective_at")
expires_at = _grant_time("expires_at")


def grant_priority(text: str) -> int:
    """A credit grant's priority: a whole number 0 to 100, lower drawn first (argparse type)."""
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > MAX_GRANT_PRIORITY:
        raise argparse.ArgumentTypeError(
            f"priority must be a whole number from 0 to {MAX_GRANT_PRIORITY} (got {text!r})"
        )
    return int(text)


def billing_interval(text: str) -> plan_pb2.BillingInterval.ValueType:
    """Parse `month` or `year` into Plan.billing_interval (argparse type)."""
    if text.lower() not in BILLING_INTERVALS:
        raise argparse.ArgumentTypeError(f"billing_interval must be month or year (got {text!r})")
    return BILLING_INTERVALS[text.lower()]


def unit_amount(text: str) -> tuple[str, int]:
    """Parse `pages=10` into ("pages", 10) (argparse type); negative amounts are allowed."""
    name, equals, amount = text.partition("=")
    try:
        if not equals or not name:
            raise ValueError
        return name, int(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not METRIC=UNITS (e.g. pages=10)") from None


def instant(text: str) -> datetime:
    """Parse an ISO 8601 time with its UTC offset (argparse type)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2026-03-15T11:00:00Z"
        ) from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset; add one, e.g. 2026-03-15T11:00:00Z"
        )
    return value


def calendar_date(text: str) -> date:
    """Parse a YYYY-MM-DD date (argparse type)."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date in the form YYYY-MM-DD (e.g. 2026-03-01)"
        ) from None


def _seconds_or_negative(text: str) -> float:
    """The number `text` spells, or -1 when it spells none (so that it is refused)."""
    try:
        return float(text)
    except ValueError:
        return -1.0


def positive_seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    value = _seconds_or_negative(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse type)."""
    value = _seconds_or_negative(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def count(text: str) -> int:
    """A whole number >= 0 (argparse type)."""
    return _whole_number("the value", text)
