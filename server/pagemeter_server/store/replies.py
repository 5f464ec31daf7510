"""Script replies read into the typed answers of domain/decisions.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from pagemeter_server.domain.decisions import (
    MetricCheck,
    MetricRecord,
    RecordResult,
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


def metric_check(row: Sequence[str]) -> MetricCheck:
    return MetricCheck(
        metric=row[0],
        allowed=row[1] == "1",
        reason=int(row[2]),
        requested=int(row[3]),
        committed=int(row[4]),
        held=int(row[5]),
        contract_quota=_opt_int(row[6]),
        hard_limit=_opt_int(row[7]),
        overage_allowed=row[8] == "1",
        max_admissible=_opt_int(row[9]),
        remaining=_opt_int(row[10]),
        included=int(row[11]),
        prepaid=int(row[12]),
        overage=int(row[13]),
        overage_price=row[14],
        prepaid_available=int(row[15]),
        lifetime=row[16] == "N",
    )


def metric_record(row: Sequence[str]) -> MetricRecord:
    return MetricRecord(
        metric=row[0],
        units=int(row[1]),
        included=int(row[2]),
        prepaid=int(row[3]),
        overage=int(row[4]),
        committed=int(row[5]),
        contract_quota=_opt_int(row[6]),
        hard_limit=_opt_int(row[7]),
        over_contract_quota=row[8] == "1",
        over_hard_limit=row[9] == "1",
        overage_not_allowed=row[10] == "1",
        lifetime=row[11] == "N",
        overage_price=row[12],
        planned=len(row) < 14 or row[13] == "1",
    )
