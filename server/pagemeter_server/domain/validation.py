"""Input checks. A request that fails one is refused whole, before any store call.

The limits keep every figure a Lua script sees an exact integer (Lua numbers are
doubles: exact up to 2^53) and keep keys and memory per call bounded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter_server.domain.errors import InvalidArgument, Violation

ORG_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
METRIC = re.compile(r"[a-z][a-z0-9_]{0,31}")
DOCUMENT_TYPE = re.compile(r"[A-Za-z0-9._-]{0,64}")
# API key ids are 16 hex digits when pagemeter makes them; any ASCII letters and
# digits are accepted so that a mistyped id reads as unknown, not as malformed.
KEY_ID = re.compile(r"[A-Za-z0-9]{1,64}")
PRICE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
CURRENCY = re.compile(r"[A-Z]{3}")

MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, protobuf's upper bound
MAX_DURATION_SECONDS = 315_576_000_000  # about 10,000 years, protobuf's bound
MAX_UNITS = 1_000_000_000
"""Largest amount of one metric in one call."""
MAX_LIMIT = 1_000_000_000_000_000
"""Largest contract quota or hard limit (10^15, well inside 2^53)."""
MAX_METRICS = 32
MAX_NAME = 128
MAX_LABEL = 64
MAX_REASON = 256


@dataclass
class Violations:
    """Collects every problem of a request, so one answer can name them all."""

    items: list[Violation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(Violation(field_path, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def check_org_id(self, value: str, field_path: str = "org_id") -> None:
        if not ORG_ID.fullmatch(value):
            self.add(
                field_path,
                f"{field_path} must be 1 to 64 characters from letters, digits, '.', '_' "
                f"and '-' (got {_show(value)})",
            )

    def check_request_id(self, value: str, field_path: str = "request_id") -> None:
        if not REQUEST_ID.fullmatch(value):
            self.add(
                field_path,
                f"{field_path} must be 1 to 128 characters from letters, digits and "
                f"'.', ':', '_', '-' (got {_show(value)})",
            )

    def check_metric_name(self, value: str, field_path: str) -> bool:
        if METRIC.fullmatch(value):
            return True
        self.add(
            field_path,
            f"metric name {_show(value)} must start with a lowercase letter and have at "
            "most 32 lowercase letters, digits and '_'",
        )
        return False

    def check_units(
        self, units: Mapping[str, int], field_path: str = "units", *, allow_negative: bool = False
    ) -> None:
        if not units:
            self.add(field_path, f"{field_path} must name at least one metric")
        if len(units) > MAX_METRICS:
            self.add(field_path, f"{field_path} may name at most {MAX_METRICS} metrics")
        low = -MAX_UNITS if allow_negative else 0
        for metric, amount in units.items():
            if not self.check_metric_name(metric, f"{field_path}[{metric[:40]}]"):
                continue
            if not low <= amount <= MAX_UNITS:
                self.add(
                    f"{field_path}[{metric}]",
                    f"units of {metric!r} must be between {low} and {MAX_UNITS} (got {amount})",
                )

    def check_timestamp(self, value: Timestamp, field_path: str) -> bool:
        """A Timestamp between 1970 and 9999 with valid nanos; True when it is one."""
        if 0 <= value.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= value.nanos < 1_000_000_000:
            return True
        self.add(field_path, f"{field_path} must be a valid time between 1970 and 9999")
        return False

    def check_duration(self, value: Duration, field_path: str) -> bool:
        """A Duration as protobuf defines it; True when it is one.

        seconds within +-10,000 years, |nanos| below one second, and both of one
        sign: otherwise ToMilliseconds() quietly adds up to 2.1 s of nanos, or
        mixes a positive and a negative part into some other length.
        """
        seconds, nanos = value.seconds, value.nanos
        if (
            abs(seconds) <= MAX_DURATION_SECONDS
            and abs(nanos) < 1_000_000_000
            and not (seconds > 0 > nanos or seconds < 0 < nanos)
        ):
            return True
        self.add(
            field_path,
            f"{field_path} is not a valid Duration: seconds and nanos must have the same sign "
            "and nanos must be between -999,999,999 and 999,999,999",
        )
        return False

    def check_length(self, value: str, field_path: str, limit: int) -> None:
        if len(value) > limit:
            self.add(field_path, f"{field_path} must be at most {limit} characters")

    def check_price(self, value: str, field_path: str) -> None:
        if value and not PRICE.fullmatch(value):
            self.add(
                field_path,
                f'{field_path} must be a decimal number like "0.028" with at most 12 '
                f"integer and 9 fractional digits (got {_show(value)})",
            )

    def check_limit(self, value: int, field_path: str) -> None:
        if not 0 <= value <= MAX_LIMIT:
            self.add(field_path, f"{field_path} must be between 0 and {MAX_LIMIT} (got {value})")


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN = 512


MAX_BATCH_ITEMS = 1000
# Metric entries (units map entries) over all items of a batch. The answer
# carries a decision per entry (about 220 bytes at most, some 250 more with four
# windows and a shadow verdict), and it must fit gRPC's
# 4 MiB message limit with every item at its largest: 1,000 items with 8 metrics
# each, or 256 with 32 (tests/grpc/test_answer_sizes.py builds the largest answers).
MAX_BATCH_ENTRIES = 8192


def check_batch_size(items: Sequence[Any]) -> None:
    """Refuse a batch whose answer could not fit, before any item is applied."""
    count = len(items)
    if not 1 <= count <= MAX_BATCH_ITEMS:
        raise invalid("items", f"a batch holds 1 to {MAX_BATCH_ITEMS} items (got {count})")
    entries = sum(len(item.units) for item in items)
    if entries > MAX_BATCH_ENTRIES:
        raise invalid(
            "items",
            f"a batch names at most {MAX_BATCH_ENTRIES} metric amounts over all its items "
            f"(got {entries}); split it into smaller batches",
        )


def require_org_id(org_id: str) -> None:
    """Refuse a request whose only field to check is its organization."""
    problems = Violations()
    problems.check_org_id(org_id)
    problems.raise_if_any()


def page_request(
    org_id: str | None, page_size: int, page_token: str, default: int = DEFAULT_PAGE_SIZE
) -> int:
    """Check a paginated request (of one organization's list, unless org_id is None);
    return the page size to use."""
    problems = Violations()
    if org_id is not None:
        problems.check_org_id(org_id)
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        problems.add("page_size", f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    if len(page_token) > MAX_PAGE_TOKEN:
        problems.add("page_token", "page_token is not one this service issued")
    problems.raise_if_any()
    return page_size or default


def bad_page_token() -> InvalidArgument:
    return invalid(
        "page_token", "page_token is not one this service issued; pass next_page_token unchanged"
    )


def invalid(field_path: str, description: str, reason: str = "") -> InvalidArgument:
    return InvalidArgument([Violation(field_path, description)], reason)


def _show(value: str) -> str:
    """Quote a caller's value for an error message, cut short and printable."""
    shown = value if len(value) <= 40 else value[:40] + "..."
    return repr(shown)


# DocuTray's wording, also for a year or month that is not a number (HTTP queries).
YEAR_INVALID = "Invalid year. Must be an integer between 2020 and 2100."
MONTH_INVALID = "Invalid month. Must be an integer between 1 and 12."


def check_year_month(has_year: bool, year: int, has_month: bool, month: int) -> None:
    """Validate an optional (year, month) pair with DocuTray's wording."""
    if has_year != has_month:
        raise invalid(
            "year" if has_year else "month",
            "year and month must be sent together (or both omitted for the current month)",
        )
    if has_year and not 2020 <= year <= 2100:
        raise invalid("year", YEAR_INVALID)
    if has_month and not 1 <= month <= 12:
        raise invalid("month", MONTH_INVALID)
