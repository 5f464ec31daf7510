"""`pagemeter events export` and `events tail` end to end: a real server and
Redis, the CLI in a thread; every line a CloudEvent, every event once, a cursor
file that resumes where the last run stopped."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from pagemeter.v1 import admin_pb2, quota_pb2
from tests.client.test_cli import Cli
from tests.conftest import RunningServer, eagle_plan

ORGS = ("acme", "globex", "initech")
SINCE = "2026-01-01T00:00:00Z"


@pytest.fixture
def pagemeter(pagemeter_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(pagemeter_server.target, capsys)


async def populate(server: RunningServer, jobs: int, first: int = 0) -> None:
    for org in ORGS:
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org_id=org)))
        for i in range(first, first + jobs):
            await server.quota.RecordUsage(
                quota_pb2.RecordUsageRequest(org_id=org, request_id=f"job-{i}", units={"pages": 1})
            )
    # Servers note the organizations with events every half second, with a call.
    await asyncio.sleep(0.6)
    await server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))


def parsed(text: str) -> list[BaseCloudEvent]:
    return [JSONFormat().read(CloudEvent, line.encode()) for line in text.splitlines()]


def recorded_ids(events: list[BaseCloudEvent]) -> Counter[tuple[str, str]]:
    return Counter(
        (str(e.get_extension("orgid")), str(e.get_subject()))
        for e in events
        if e.get_type() == "pagemeter.usage.recorded"
    )


async def test_export_writes_every_event_of_every_organization_once(
    pagemeter: Cli, pagemeter_server: RunningServer
) -> None:
    await populate(pagemeter_server, jobs=5)
    run = await pagemeter("events", "export", "--since", SINCE)
    assert run.code == 0, run.err
    events = parsed(run.out)
    assert recorded_ids(events) == Counter({(org, f"job-{i}"): 1 for org in ORGS for i in range(5)})
    # In order within each organization.
    for org in ORGS:
        sequences = [
            int(e.get_extension("sequence")) for e in events if e.get_extension("orgid") == org
        ]
        assert sequences == list(range(1, len(sequences) + 1))


async def test_a_cursor_file_resumes_without_gaps_or_repeats(
    pagemeter: Cli, pagemeter_server: RunningServer, tmp_path: Path
) -> None:
    cursor = tmp_path / "cursor.json"
    out = tmp_path / "events.jsonl"
    await populate(pagemeter_server, jobs=3)
    first = await pagemeter(
        "events", "export", "--since", SINCE, "--cursor", str(cursor), "--output", str(out)
    )
    assert first.code == 0, first.err
    assert set(json.loads(cursor.read_text())) == set(ORGS)
    await populate(pagemeter_server, jobs=4, first=3)
    second = await pagemeter(
        "events", "export", "--since", SINCE, "--cursor", str(cursor), "--output", str(out)
    )
    assert second.code == 0, second.err
    events = parsed(out.read_text())
    assert recorded_ids(events) == Counter({(org, f"job-{i}"): 1 for org in ORGS for i in range(7)})
    assert len({e.get_id() for e in events}) == len(events)


async def test_tail_follows_new_events(pagemeter: Cli, pagemeter_server: RunningServer) -> None:
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    tail = asyncio.ensure_future(
        pagemeter(
            "events",
            "tail",
            "--org",
            "acme",
            "--type",
            "usage.recorded",
            "--since",
            SINCE,
            "--interval",
            "0.1",
            "--count",
            "6",
        )
    )
    for i in range(6):
        await asyncio.sleep(0.05)
        await pagemeter_server.quota.RecordUsage(
            quota_pb2.RecordUsageRequest(org_id="acme", request_id=f"live-{i}", units={"pages": 2})
        )
    run = await asyncio.wait_for(tail, 30)
    assert run.code == 0, run.err
    assert [e.get_subject() for e in parsed(run.out)] == [f"live-{i}" for i in range(6)]


async def test_a_broken_cursor_file_is_refused(pagemeter: Cli, tmp_path: Path) -> None:
    cursor = tmp_path / "cursor.json"
    cursor.write_text("[1, 2]")
    run = await pagemeter("events", "export", "--cursor", str(cursor))
    assert run.code == 2
    assert "not a cursor file" in run.err
