"""The billing run: `billing close MONTH` and `billing export MONTH --format ...`.

Export formats (docs/billing.md): `csv`, `jsonl` and `parquet` write one row per
organization, billing period, metric and kind (open, closed, adjustment) with
the columns of COLUMNS; `stripe-meter-events` writes one Stripe meter event per
usage record and metric, as JSON lines. Rows are written page by page as they
arrive, never held all at once (Parquet: one row group per EXPORT_PAGE_ORGS
organizations).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import billing_pb2, reporting_pb2
from pagemeter_client.cli.common import EXIT_OK, InputProblem
from pagemeter_client.cli.output import emit
from pagemeter_client.sdk import PagemeterClient

FORMATS = ("csv", "jsonl", "parquet", "stripe-meter-events")
# Organizations per export page (the server's page size; it may cut a page shorter).
EXPORT_PAGE_ORGS = 100
COLUMNS = (
    "org_id",
    "billing_month",
    "period_id",
    "period_start",
    "period_end",
    "metric",
    "kind",
    "committed",
    "included_units",
    "prepaid_units",
    "overage_units",
    "overage_cost",
    "currency",
    "plan_name",
    "plan_version",
    "closed_at",
)
KINDS = {
    billing_pb2.BILLING_ROW_KIND_OPEN: "open",
    billing_pb2.BILLING_ROW_KIND_CLOSED: "closed",
    billing_pb2.BILLING_ROW_KIND_ADJUSTMENT: "adjustment",
}
# Stripe accepts meter event identifiers of up to 100 characters.
STRIPE_IDENTIFIER_MAX = 100

Row = dict[str, Any]


def add_billing_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    billing = commands.add_parser("billing", help="close a billing month and export it")
    billing_commands = billing.add_subparsers(
        dest="billing_command", required=True, metavar="COMMAND"
    )
    close = billing_commands.add_parser(
        "close",
        parents=[common],
        help="freeze every organization's figures of a finished month (idempotent)",
    )
    close.add_argument(
        "month", metavar="MONTH", help="YYYY-MM: the periods that ended in that calendar month"
    )
    close.set_defaults(run=cmd_billing_close)
    export = billing_commands.add_parser(
        "export", parents=[common], help="a month's figures per organization and metric"
    )
    export.add_argument("month", metavar="MONTH", help="YYYY-MM")
    export.add_argument("--format", choices=FORMATS, default="csv", help="default csv")
    export.add_argument("--output", metavar="FILE", help="write there instead of stdout")
    export.add_argument(
        "--customer-map",
        metavar="FILE",
        help="stripe-meter-events: a JSON object of organization id -> Stripe customer id "
        "(default: the organization id); every exported organization must be in it",
    )
    export.add_argument(
        "--event-name",
        metavar="METRIC=NAME",
        action="append",
        default=[],
        help="stripe-meter-events: the meter's event name for a metric (default: the "
        "metric's name); repeat for each metric",
    )
    export.set_defaults(run=cmd_billing_export)


def cmd_billing_close(client: PagemeterClient, args: argparse.Namespace) -> int:
    response = client.close_billing_period(args.month)
    emit(args, response, lambda: render_close(response))
    return EXIT_OK


def render_close(response: billing_pb2.CloseBillingPeriodResponse) -> str:
    return "\n".join(
        (
            f"billing month {response.billing_month}",
            f"  closed now:              {response.organizations_closed}",
            f"  closed before:           {response.organizations_already_closed}",
            f"  no period ending in it:  {response.organizations_without_period}",
        )
    )


def cmd_billing_export(client: PagemeterClient, args: argparse.Namespace) -> int:
    rows = client.iter_billing_rows(args.month, page_size=EXPORT_PAGE_ORGS)
    if args.format == "stripe-meter-events":
        events = stripe_meter_events(
            client,
            list(rows),
            customers=_customer_map(args.customer_map),
            event_names=_event_names(args.event_name),
        )
        with _text_output(args.output) as out:
            for event in events:
                out.write(json.dumps(event, separators=(",", ":")) + "\n")
        return EXIT_OK
    if args.format == "parquet":
        write_parquet((row_dict(row) for row in rows), args.output)
        return EXIT_OK
    with _text_output(args.output) as out:
        if args.format == "csv":
            writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in row_dict(row).items()})
        else:
            for row in rows:
                out.write(json.dumps(row_dict(row), separators=(",", ":")) + "\n")
    return EXIT_OK


def _iso(value: Timestamp) -> str:
    moment = datetime.fromtimestamp(value.seconds, UTC).replace(
        microsecond=value.nanos // 1000 // 1000 * 1000
    )
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row_dict(row: billing_pb2.BillingRow) -> Row:
    """A billing row with the export's columns: figures as integers, the cost as an
    exact decimal string, times as ISO 8601 UTC (closed_at None when open)."""
    return {
        "org_id": row.org_id,
        "billing_month": row.billing_month,
        "period_id": row.period_id,
        "period_start": _iso(row.period_start),
        "period_end": _iso(row.period_end),
        "metric": row.metric,
        "kind": KINDS.get(row.kind, "unspecified"),
        "committed": row.committed,
        "included_units": row.included_units,
        "prepaid_units": row.prepaid_units,
        "overage_units": row.overage_units,
        "overage_cost": row.overage_cost,
        "currency": row.currency,
        "plan_name": row.plan_name,
        "plan_version": row.plan_version,
        "closed_at": _iso(row.closed_at) if row.HasField("closed_at") else None,
    }


@contextmanager
def _text_output(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    try:
        with Path(path).open("w", encoding="utf-8", newline="") as out:
            yield out
    except OSError as problem:
        raise InputProblem(f"cannot write {path}: {problem.strerror}") from None


# -- Parquet ------------------------------------------------------------------------------

PARQUET_BATCH_ROWS = 10_000


def parquet_schema() -> Any:
    import pyarrow as pa

    utc = pa.timestamp("ms", tz="UTC")
    types = {
        "period_start": utc,
        "period_end": utc,
        "closed_at": utc,
        "committed": pa.int64(),
        "included_units": pa.int64(),
        "prepaid_units": pa.int64(),
        "overage_units": pa.int64(),
        "plan_version": pa.int64(),
    }
    return pa.schema(
        [
            pa.field(name, types.get(name, pa.string()), nullable=name == "closed_at")
            for name in COLUMNS
        ]
    )


def write_parquet(rows: Iterable[Row], path: str | None) -> None:
    """Rows into a Parquet file with pyarrow, a row group per PARQUET_BATCH_ROWS rows.
    The cost stays a decimal string: its scale differs from price to price, and
    a float would not be exact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    sink: Any = pa.BufferOutputStream() if path is None else path
    times = ("period_start", "period_end", "closed_at")

    def batch(chunk: list[Row]) -> Any:
        columns = {
            name: [
                _parse_iso(row[name]) if name in times and row[name] is not None else row[name]
                for row in chunk
            ]
            for name in COLUMNS
        }
        return pa.RecordBatch.from_pydict(columns, schema=schema)

    try:
        with pq.ParquetWriter(sink, schema) as writer:
            chunk: list[Row] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) == PARQUET_BATCH_ROWS:
                    writer.write_batch(batch(chunk))
                    chunk = []
            if chunk:
                writer.write_batch(batch(chunk))
    except OSError as problem:
        raise InputProblem(f"cannot write {path}: {problem}") from None
    if path is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(sink.getvalue().to_pybytes())


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- Stripe meter events ----------------------------------------------------------------------


def _customer_map(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as problem:
        raise InputProblem(f"cannot read the customer map {path}: {problem.strerror}") from None
    except ValueError as problem:
        raise InputProblem(f"the customer map {path} is not JSON: {problem}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()
    ):
        raise InputProblem(
            f"the customer map {path} must be a JSON object of organization id -> customer id"
        )
    return mapping


def _event_names(specs: list[str]) -> dict[str, str]:
    names = {}
    for spec in specs:
        metric, sep, name = spec.partition("=")
        if not sep or not metric or not name:
            raise InputProblem(f"--event-name takes METRIC=NAME (got {spec!r})")
        names[metric] = name
    return names


def stripe_identifier(org_id: str, request_id: str, metric: str) -> str:
    """The meter event's idempotency key: "<org>/<request id>/<metric>", unique per
    account as Stripe wants it (a request id is unique within one organization,
    and one job has a unit count per metric); past 100 characters, a digest of it."""
    identifier = f"{org_id}/{request_id}/{metric}"
    if len(identifier) <= STRIPE_IDENTIFIER_MAX:
        return identifier
    return "pm-" + hashlib.sha256(identifier.encode()).hexdigest()


def stripe_meter_events(
    client: PagemeterClient,
    rows: list[billing_pb2.BillingRow],
    *,
    customers: dict[str, str] | None,
    event_names: dict[str, str],
    warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> Iterator[dict[str, Any]]:
    """One meter event per completed usage record of the month's periods and metric.

    Corrections (AdjustUsage) are no records, and records leave after
    --record-retention-days: where an organization's events do not add up to its
    committed units, a warning names the difference.
    """
    periods: dict[str, set[str]] = defaultdict(set)
    committed: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        periods[row.org_id].add(row.period_id)
        committed[(row.org_id, row.metric)] += row.committed
    if customers is not None:
        missing = sorted(org for org in periods if org not in customers)
        if missing:
            raise InputProblem(
                f"the customer map has no customer for {len(missing)} exported organizations: "
                + ", ".join(missing[:10])
            )
    for org_id in sorted(periods):
        sent: dict[str, int] = defaultdict(int)
        customer = customers[org_id] if customers is not None else org_id
        for record in client.iter_usage_records(org_id, page_size=1000):
            if (
                record.status != reporting_pb2.USAGE_RECORD_STATUS_COMPLETED
                or record.period_id not in periods[org_id]
            ):
                continue
            for usage in record.metrics:
                if usage.units <= 0:
                    continue
                sent[usage.metric] += usage.units
                yield {
                    "event_name": event_names.get(usage.metric, usage.metric),
                    "identifier": stripe_identifier(org_id, record.request_id, usage.metric),
                    "timestamp": record.completed_at.seconds,
                    "payload": {"stripe_customer_id": customer, "value": str(usage.units)},
                }
        for (org, metric), units in sorted(committed.items()):
            if org == org_id and sent.get(metric, 0) != units:
                warn(
                    f"pagemeter: warning: {org_id} {metric}: {sent.get(metric, 0)} units in "
                    f"meter events, {units} committed (corrections and records past the "
                    "record retention are not events)"
                )
