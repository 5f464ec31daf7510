"""`pagemeter billing close` and `billing export` end to end: a real server and
Redis, the CLI in a thread; CSV, JSON lines and Parquet (read back with pyarrow)
equal GetUsageHistory, and the Stripe meter events map each record's units."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from pagemeter.v1 import admin_pb2, billing_pb2, quota_pb2
from pagemeter_client.cli.commands.billing import COLUMNS, parquet_schema, stripe_identifier
from tests.client.test_cli import Cli
from tests.conftest import RunningServer, ms
from tests.grpc.test_billing import (
    MAR_5,
    exported_figures,
    history_figures,
    job_units,
    org_name,
    populate,
)

ORGS = 30
Key = tuple[str, str, str]
Figures = tuple[int, int, int, Decimal]


@pytest.fixture
def pagemeter(pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(pagemeter_server.target, capsys)


@pytest.fixture
async def populated(pagemeter_server: RunningServer, plans_migrated: None) -> RunningServer:
    await populate(pagemeter_server, orgs=ORGS)
    pagemeter_server.clock.set(MAR_5)
    return pagemeter_server


def figures_of(rows: list[dict[str, object]]) -> dict[Key, Figures]:
    """(org, period, metric) -> sums over the rows, as exported_figures does for protos."""
    as_protos = [
        billing_pb2.BillingRow(
            org_id=str(r["org_id"]),
            period_id=str(r["period_id"]),
            metric=str(r["metric"]),
            committed=int(str(r["committed"])),
            prepaid_units=int(str(r["prepaid_units"])),
            overage_units=int(str(r["overage_units"])),
            overage_cost=str(r["overage_cost"]),
        )
        for r in rows
    ]
    return exported_figures(as_protos)


async def test_close_then_csv_jsonl_and_parquet_equal_the_history(
    populated: RunningServer, pagemeter: Cli, tmp_path: Path
) -> None:
    """`billing close 2026-02` closes the organizations once (a second run closes
    none); after a correction, CSV, JSON lines and Parquet (read back with pyarrow)
    hold the frozen rows plus an adjustment row and sum to GetUsageHistory exactly."""
    closed = await pagemeter("billing", "close", "2026-02")
    assert closed.code == 0, closed.err
    assert "closed now:" in closed.out
    again = await pagemeter("--json", "billing", "close", "2026-02")
    assert again.code == 0, again.err
    answer = json.loads(again.out)
    assert answer["organizations_closed"] == 0
    assert answer["organizations_already_closed"] == ORGS - answer["organizations_without_period"]

    await populated.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="org-004",
            metric="documents",
            units=-2,
            reason="refund: two conversions failed downstream",
            adjustment_id="refund-1",
            year=2026,
            month=2,
        )
    )
    expected = await history_figures(populated, ORGS, 2026, 2)

    csv_path, jsonl_path, parquet_path = (tmp_path / f"feb.{ext}" for ext in ("csv", "jsonl", "pq"))
    for fmt, path in (("csv", csv_path), ("jsonl", jsonl_path), ("parquet", parquet_path)):
        run = await pagemeter(
            "billing", "export", "2026-02", "--format", fmt, "--output", str(path)
        )
        assert run.code == 0, run.err

    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        csv_rows: list[dict[str, object]] = list(reader)
    jsonl_rows = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    table = pq.read_table(parquet_path)
    assert table.schema.equals(parquet_schema())
    parquet_rows: list[dict[str, object]] = table.to_pylist()

    for rows in (csv_rows, jsonl_rows, parquet_rows):
        assert figures_of(rows) == expected
        adjustments = [r for r in rows if r["kind"] == "adjustment"]
        assert [(r["org_id"], r["metric"], int(str(r["committed"]))) for r in adjustments] == [
            ("org-004", "documents", -2)
        ]
    assert len(csv_rows) == len(jsonl_rows) == table.num_rows
    # The same rows in every format (CSV as text, Parquet with typed times).
    assert [r["overage_cost"] for r in csv_rows] == [r["overage_cost"] for r in jsonl_rows]
    assert [r["overage_cost"] for r in parquet_rows] == [r["overage_cost"] for r in jsonl_rows]
    assert table.schema.field("period_start").type == pa.timestamp("ms", tz="UTC")
    first = jsonl_rows[0]
    start = parquet_rows[0]["period_start"]
    assert isinstance(start, datetime)
    assert start.isoformat().replace("+00:00", "Z") == str(first["period_start"]).replace(
        ".000Z", "Z"
    )
    assert first["closed_at"] == "2026-03-05T12:00:00.000Z"


async def test_open_month_exports_to_stdout(populated: RunningServer, pagemeter: Cli) -> None:
    """Before a close the export is the open figures; JSON lines on stdout."""
    run = await pagemeter("billing", "export", "2026-02", "--format", "jsonl")
    assert run.code == 0, run.err
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert {r["kind"] for r in rows} == {"open"}
    assert all(r["closed_at"] is None for r in rows)
    assert figures_of(rows) == await history_figures(populated, ORGS, 2026, 2)


async def test_stripe_meter_events_map_each_record(
    populated: RunningServer, pagemeter: Cli, tmp_path: Path
) -> None:
    """stripe-meter-events: one event per completed record of the month's periods and
    metric, identifier org/request/metric, timestamp the completion second, value the
    units as a string, the customer from --customer-map, the event name from
    --event-name; the events add up to the committed units."""
    customers = {org_name(i): f"cus_{i:04d}" for i in range(ORGS)}
    mapping = tmp_path / "customers.json"
    mapping.write_text(json.dumps(customers))
    out = tmp_path / "events.jsonl"
    run = await pagemeter(
        "billing",
        "export",
        "2026-02",
        "--format",
        "stripe-meter-events",
        "--customer-map",
        str(mapping),
        "--event-name",
        "pages=ocr_pages",
        "--output",
        str(out),
    )
    assert run.code == 0, run.err
    assert run.err == ""  # every metric's events add up to its committed units
    events = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {e["identifier"]: e for e in events}
    assert len(by_id) == len(events)
    # org-000: calendar months in UTC; its February jobs are job-0-1 (Feb 14) and job-0-2 (Feb 25).
    pages = by_id["org-000/job-0-1/pages"]
    assert pages == {
        "event_name": "ocr_pages",
        "identifier": "org-000/job-0-1/pages",
        "timestamp": ms("2026-02-14T12:00:00+00:00") // 1000,
        "payload": {"stripe_customer_id": "cus_0000", "value": str(job_units(0, 1)["pages"])},
    }
    assert by_id["org-000/job-0-2/documents"]["event_name"] == "documents"
    assert "org-000/job-0-0/pages" not in by_id  # January's job
    # An org anchored on the 20th (org-001): its period ending in February holds
    # the jobs of Jan 25 and Feb 14, not Feb 25.
    assert {"org-001/job-1-0/pages", "org-001/job-1-1/pages"} <= by_id.keys()
    assert "org-001/job-1-2/pages" not in by_id
    expected = await history_figures(populated, ORGS, 2026, 2)
    assert sum(int(e["payload"]["value"]) for e in events) == sum(f[0] for f in expected.values())


async def test_stripe_export_names_what_records_do_not_cover(
    populated: RunningServer, pagemeter: Cli
) -> None:
    """A correction is no record: the export warns on stderr that the events and
    the committed units differ for that organization and metric."""
    await populated.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="org-000",
            metric="pages",
            units=7,
            reason="manual count",
            adjustment_id="m-1",
            year=2026,
            month=2,
        )
    )
    run = await pagemeter("billing", "export", "2026-02", "--format", "stripe-meter-events")
    assert run.code == 0, run.err
    assert "org-000 pages:" in run.err and "committed" in run.err
    assert run.out.count("\n") > 0


async def test_a_customer_map_missing_an_organization_is_refused(
    populated: RunningServer, pagemeter: Cli, tmp_path: Path
) -> None:
    """Exit 2, and no events, when the map lacks an exported organization (all but
    org-000 and the two yearly plans, which have no period ending in February)."""
    mapping = tmp_path / "customers.json"
    mapping.write_text(json.dumps({"org-000": "cus_0"}))
    run = await pagemeter(
        "billing",
        "export",
        "2026-02",
        "--format",
        "stripe-meter-events",
        "--customer-map",
        str(mapping),
    )
    assert run.code == 2
    assert "no customer for 27 exported organizations" in run.err
    assert run.out == ""


def test_long_identifiers_become_a_digest() -> None:
    """Stripe takes identifiers of up to 100 characters: longer ones are hashed."""
    short = stripe_identifier("acme", "job-1", "pages")
    assert short == "acme/job-1/pages"
    long = stripe_identifier("o" * 64, "r" * 128, "pages")
    assert long.startswith("pm-") and len(long) <= 100
    assert long == stripe_identifier("o" * 64, "r" * 128, "pages")
    assert long != stripe_identifier("o" * 64, "r" * 128, "documents")


async def test_an_unfinished_month_is_an_error(
    pagemeter_server: RunningServer, pagemeter: Cli
) -> None:
    """Closing the month in progress exits 1 with FAILED_PRECONDITION on stderr."""
    pagemeter_server.clock.set(MAR_5)
    run = await pagemeter("billing", "close", "2026-03")
    assert run.code == 1
    assert "FAILED_PRECONDITION" in run.err and "has not ended" in run.err
    bad = await pagemeter("billing", "export", "2026-3")
    assert bad.code == 1
    assert "INVALID_ARGUMENT" in bad.err


async def test_a_record_of_another_org_does_not_leak(
    populated: RunningServer, pagemeter: Cli
) -> None:
    """Request ids repeat across organizations: each event carries its own org's customer."""
    await populated.quota.RecordUsage(
        quota_pb2.RecordUsageRequest(
            org_id="org-002",
            request_id="job-0-1",
            units={"pages": 1},
            completed_at=populated_stamp("2026-02-27T10:00:00+00:00"),
        )
    )
    run = await pagemeter("billing", "export", "2026-02", "--format", "stripe-meter-events")
    events = [json.loads(line) for line in run.out.splitlines()]
    ours = [e for e in events if e["identifier"] == "org-002/job-0-1/pages"]
    assert [e["payload"] for e in ours] == [{"stripe_customer_id": "org-002", "value": "1"}]


def populated_stamp(text: str) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(ms(text))
    return value
