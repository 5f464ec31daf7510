"""Script replies read into the typed answers of domain/decisions.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pagemeter_server.domain.decisions import (
    MetricCheck,
    MetricRecord,
    RecordResult,
    WindowState,
)
from pagemeter_server.domain.errors import (
    ItemFailed,
    NegativeUnits,
    RequestIdReused,
    StoreError,
    TooManyMetrics,
)
from pagemeter_server.store.scripts import (
    ScriptReply,
)


def _opt_int(text: str) -> int | None:
    return int(text) if text != "" else None


def split_rows(encoded: str) -> list[list[str]]:
    return [row.split(",") for row in encoded.split(";")] if encoded else []


def record_result(reply: ScriptReply) -> RecordResult:
    tag = reply[0]
    if tag == "ERR":
        raise ItemFailed(str(reply[1]))
    if tag == "REUSED":
        raise RequestIdReused(str(reply[1]))
    if tag == "NEGATIVE":
        raise NegativeUnits(str(reply[1]))
    if tag == "TOO_MANY_METRICS":
        raise TooManyMetrics(str(reply[1]), int(reply[2]))
    _, duplicate, status, released, hold_expired, over_limit, month_id, cms, rows, gone, folded = (
        reply
    )
    return RecordResult(
        duplicate=duplicate == "1",
        status=status,
        hold_released=released == "1",
        hold_expired=hold_expired == "1",
        over_limit=over_limit == "1",
        month_id=month_id,
        completed_ms=int(cms),
        metrics=[metric_record(row) for row in split_rows(rows)],
        expired=held_units(gone),
        document_type_folded=folded == "1",
    )


Outcome = TypeVar("Outcome")


def item_outcome(parse: Callable[[], Outcome]) -> Outcome | StoreError:
    """A batch item's result, or the store error it ended in (the others go on)."""
    try:
        return parse()
    except StoreError as exc:
        return exc


def held_units(encoded: str) -> dict[str, int]:
    """Units per metric of a hold encoding "metric:units:prepaid;..." (see _lib.lua)."""
    units: dict[str, int] = {}
    for part in filter(None, str(encoded).split(";")):
        metric, amount, _prepaid = part.split(":")
        units[metric] = units.get(metric, 0) + int(amount)
    return units


def int_pairs(flat: Sequence[str]) -> dict[str, int]:
    return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}


# -- metric rows ------------------------------------------------------------------
# check.lua and record.lua answer one row per metric: fields joined by ',', rows
# by ';'. The columns of each row are declared here, once: `make scripts`
# generates the Lua function that writes a row (check_row, record_row) from
# them, and metric_check / metric_record read a row with them. A column's name
# is both the field of the Lua table the script fills and the field of the
# answer it is read into.

ColumnKind = Literal["str", "int", "opt_int", "bool", "period", "windows"]


@dataclass(frozen=True)
class Column:
    """One column of a metric row, and how it is written.

    str: the Lua string as is; int: an integer; opt_int: an integer or '' for
    nil (none); bool: '1' or '0'; period: a Lua boolean "lifetime", written 'N'
    (PERIOD_NONE) or 'M' (monthly); windows: window_part (_lib.lua) per window,
    "kind:limit:soft:used:exceeded:shadow", joined by '/'.
    """

    name: str
    kind: ColumnKind
    # What a row stored before this column existed reads as (None: every row has it).
    missing: str | None = None


# CheckQuota: one metric's decision (MetricCheck).
CHECK_COLUMNS: tuple[Column, ...] = (
    Column("metric", "str"),
    Column("allowed", "bool"),
    Column("reason", "int"),
    Column("requested", "int"),
    Column("committed", "int"),
    Column("held", "int"),
    Column("contract_quota", "opt_int"),
    Column("hard_limit", "opt_int"),
    Column("overage_allowed", "bool"),
    Column("max_admissible", "opt_int"),
    Column("remaining", "opt_int"),
    Column("included", "int"),
    Column("prepaid", "int"),
    Column("overage", "int"),
    Column("overage_price", "str"),
    Column("prepaid_available", "int"),
    Column("lifetime", "period"),
    Column("windows", "windows", missing=""),
    Column("denied_by", "str", missing=""),
    Column("would_deny", "opt_int", missing=""),
    Column("would_deny_window", "str", missing=""),
)

# RecordUsage: one metric's result (MetricRecord). Records keep their rows for
# the record retention, so a column is only ever added at the end, with the
# value older rows read as.
RECORD_COLUMNS: tuple[Column, ...] = (
    Column("metric", "str"),
    Column("units", "int"),
    Column("included", "int"),
    Column("prepaid", "int"),
    Column("overage", "int"),
    Column("committed", "int"),
    Column("contract_quota", "opt_int"),
    Column("hard_limit", "opt_int"),
    Column("over_contract_quota", "bool"),
    Column("over_hard_limit", "bool"),
    Column("overage_not_allowed", "bool"),
    Column("lifetime", "period"),
    Column("overage_price", "str"),
    Column("planned", "bool", missing="1"),
    Column("windows", "windows", missing=""),
    Column("over_spend_cap", "bool", missing="0"),
)


def _bool(text: str) -> bool:
    return text == "1"


def _lifetime(text: str) -> bool:
    return text == "N"


def _windows(text: str) -> tuple[WindowState, ...]:
    windows = []
    for part in filter(None, text.split("/")):
        window, limit, soft, used, exceeded, shadow = part.split(":")
        windows.append(
            WindowState(window, int(limit), soft == "1", int(used), exceeded == "1", shadow == "1")
        )
    return tuple(windows)


_READERS: dict[ColumnKind, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "opt_int": _opt_int,
    "bool": _bool,
    "period": _lifetime,
    "windows": _windows,
}


Answer = TypeVar("Answer")


def _row_reader(
    columns: tuple[Column, ...], answer: Callable[..., Answer]
) -> Callable[[Sequence[str]], Answer]:
    """Reads a row into `answer`, whose fields are the columns in their order (checked
    at import); columns past the row's end read as their `missing` value."""
    names = tuple(field.name for field in dataclasses.fields(answer))  # type: ignore[arg-type]
    if names != tuple(column.name for column in columns):
        raise TypeError(f"{answer.__name__}'s fields are not the columns of its row, in order")
    readers = [_READERS[column.kind] for column in columns]
    width = len(columns)

    def read(row: Sequence[str]) -> Answer:
        values = [reader(text) for reader, text in zip(readers, row, strict=False)]
        for column in columns[len(row) : width]:
            if column.missing is None:
                raise ValueError(f"a metric row of {len(row)} columns lacks {column.name!r}")
            values.append(_READERS[column.kind](column.missing))
        return answer(*values)

    return read


metric_check = _row_reader(CHECK_COLUMNS, MetricCheck)
metric_record = _row_reader(RECORD_COLUMNS, MetricRecord)
