"""Plain text for the answers: aligned tables, `label: value` lines, the words for unset figures."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import plan_pb2

UNLIMITED = "unlimited"
NONE = "none"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right.

    Figures are right-aligned so digits line up; the first column names the row
    (more columns may be text, such as ids and names: `left`).
    """
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [_line(headers, widths, left)] + [_line(row, widths, left) for row in rows]
    return "\n".join(lines)


def _line(cells: Sequence[str], widths: Sequence[int], left: int) -> str:
    padded = [
        cell.ljust(width) if column < left else cell.rjust(width)
        for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(padded).rstrip()


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """`label: value` lines with the values aligned."""
    width = max((len(label) for label, _ in pairs), default=0) + 1
    return "\n".join(f"{(label + ':').ljust(width)} {value}" for label, value in pairs)


def optional_int(message: Message, name: str, unset: str = UNLIMITED) -> str:
    """A proto3 `optional int64` as text: its value, or `unset` when absent."""
    return str(getattr(message, name)) if message.HasField(name) else unset


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def money(amount: str, currency: str = "") -> str:
    """A decimal string from the server (kept exact), with its currency when known."""
    text = amount or "0"
    return f"{text} {currency}" if currency else text


def when(stamp: Timestamp) -> str:
    """An ISO 8601 UTC time, or "-" for an unset timestamp."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return "-"
    return stamp.ToDatetime(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def percent(value: float) -> str:
    """A share in percent with one decimal, e.g. 85.7%."""
    return f"{value:.1f}%"


def number(value: float) -> str:
    """A ratio for display: at most two decimals, no trailing zeros (11.67, 1150, 0)."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def pairs(items: Sequence[tuple[str, int]]) -> str:
    """`name=value` items joined with commas (one table cell), or "-" when there are none."""
    return ",".join(f"{name}={value}" for name, value in items) or "-"


def enum_word(prefix: str, name: str) -> str:
    """An enum value's name without its type's prefix: RECORD_STATUS_RECORDED -> RECORDED."""
    return name.removeprefix(prefix)


def period_word(
    period: plan_pb2.Period.ValueType,
    interval: plan_pb2.BillingInterval.ValueType = plan_pb2.BILLING_INTERVAL_UNSPECIFIED,
) -> str:
    """How a metric's figures are counted: by billing period (a month, or a year when
    the plan's anchored interval is one), or over its lifetime."""
    if period == plan_pb2.PERIOD_NONE:
        return "lifetime"
    return "yearly" if interval == plan_pb2.BILLING_INTERVAL_YEAR else "monthly"


def interval_word(interval: plan_pb2.BillingInterval.ValueType) -> str:
    """How long an anchored billing period runs: a month (the default) or a year."""
    return "year" if interval == plan_pb2.BILLING_INTERVAL_YEAR else "month"
