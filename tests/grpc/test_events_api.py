"""EventService over a real channel: the events of what callers did, paged in
order, filtered by type, as CloudEvents; thresholds crossed by racing callers
and resolved by a correction."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from pagemeter.v1 import admin_pb2, events_pb2, events_pb2_grpc, quota_pb2
from tests.conftest import START_MS, RunningServer, eagle_plan, metric_limits


def events_stub(server: RunningServer) -> events_pb2_grpc.EventServiceAsyncStub:
    return events_pb2_grpc.EventServiceStub(server.channel)


async def all_events(
    server: RunningServer, org: str = "acme", page_size: int = 0, types: tuple[str, ...] = ()
) -> list[events_pb2.Event]:
    stub = events_stub(server)
    out: list[events_pb2.Event] = []
    token = ""
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(
                org_id=org, page_size=page_size, page_token=token, types=types
            )
        )
        out.extend(page.events)
        token = page.next_page_token
        if not page.more:
            return out


async def record(server: RunningServer, request_id: str, pages: int, org: str = "acme") -> None:
    await server.quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id=org, request_id=request_id, units={"pages": pages})
    )


async def test_events_page_in_order_and_a_follower_reads_on_from_its_token(
    pagemeter_server: RunningServer,
) -> None:
    server = pagemeter_server
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    for i in range(7):
        await record(server, f"job-{i}", 1)
    paged = await all_events(server, page_size=3)
    assert [e.type for e in paged] == ["plan.changed"] + ["usage.recorded"] * 7
    assert [e.sequence for e in paged] == list(range(1, 9))
    assert len({e.id for e in paged}) == 8

    # A follower at the end gets an empty page and a token to poll with.
    stub = events_stub(server)
    last = await stub.ListEvents(events_pb2.ListEventsRequest(org_id="acme", page_size=1000))
    assert not last.more
    empty = await stub.ListEvents(
        events_pb2.ListEventsRequest(org_id="acme", page_token=last.next_page_token)
    )
    assert list(empty.events) == [] and empty.next_page_token == last.next_page_token
    await record(server, "job-new", 2)
    new = await stub.ListEvents(
        events_pb2.ListEventsRequest(org_id="acme", page_token=empty.next_page_token)
    )
    assert [e.data["request_id"] for e in new.events] == ["job-new"]


async def test_types_filter_and_the_cloudevent_form(pagemeter_server: RunningServer) -> None:
    server = pagemeter_server
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    await server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", request_id="held", units={"pages": 4}, hold=True)
    )
    await record(server, "held", 4)
    only = await all_events(server, types=("usage.recorded",), page_size=1)
    assert [e.type for e in only] == ["usage.recorded"]
    event = only[0]
    assert event.data["hold"] == "released"
    assert event.time.ToMilliseconds() == START_MS
    parsed = JSONFormat().read(CloudEvent, event.cloudevent.encode())
    assert parsed.get_id() == event.id
    assert parsed.get_type() == "pagemeter.usage.recorded"
    assert parsed.get_extension("sequence") == str(event.sequence)
    assert json.loads(event.cloudevent)["data"]["metrics"][0]["included"] == 4


async def test_fifty_racers_crossing_80_percent_make_one_event_and_a_correction_resolves_it(
    pagemeter_server: RunningServer,
) -> None:
    server = pagemeter_server
    plan = eagle_plan(metrics=[metric_limits("pages", contract_quota=1000, overage_allowed=True)])
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    await record(server, "base", 790)
    await asyncio.gather(*(record(server, f"racer-{i}", 1) for i in range(50)))
    crossed = await all_events(server, types=("threshold.crossed",))
    assert [(e.data["threshold"], e.data["period"]) for e in crossed] == [
        ("contract_quota:80", "2026-03")
    ]
    await server.admin.AdjustUsage(
        admin_pb2.AdjustUsageRequest(
            org_id="acme",
            metric="pages",
            units=-100,
            reason="a batch counted twice",
            adjustment_id="fix-1",
        )
    )
    resolved = await all_events(server, types=("threshold.resolved",))
    assert [(e.data["threshold"], e.data["reason"]) for e in resolved] == [
        ("contract_quota:80", "no_longer_holds")
    ]
    assert resolved[0].data["value"] == 740


async def test_event_organizations_list_who_had_events(pagemeter_server: RunningServer) -> None:
    server = pagemeter_server
    for org in ("acme", "globex", "initech"):
        await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan(org_id=org)))
    # The servers note them every half second, with the call that finds it due.
    await asyncio.sleep(0.6)
    await record(server, "one", 1, org="globex")
    stub = events_stub(server)
    first = await stub.ListEventOrganizations(events_pb2.ListEventOrganizationsRequest(page_size=2))
    assert list(first.org_ids) == ["acme", "globex"]
    rest = await stub.ListEventOrganizations(
        events_pb2.ListEventOrganizationsRequest(page_token=first.next_page_token)
    )
    assert list(rest.org_ids) == ["initech"]


async def test_a_token_of_another_organization_is_refused(pagemeter_server: RunningServer) -> None:
    server = pagemeter_server
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    page = await events_stub(server).ListEvents(events_pb2.ListEventsRequest(org_id="acme"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await events_stub(server).ListEvents(
            events_pb2.ListEventsRequest(org_id="globex", page_token=page.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_filtered_page_that_fills_before_the_stream_ends_says_more(
    pagemeter_server: RunningServer,
) -> None:
    """Pages of 3 records when the stream is a plan change and 4 records: the
    first page fills at the third record of its second read, and must say that
    the fourth is still there."""
    server = pagemeter_server
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    for i in range(4):
        await record(server, f"job-{i}", 1)
    read = await all_events(server, page_size=3, types=("usage.recorded",))
    assert [e.data["request_id"] for e in read] == [f"job-{i}" for i in range(4)]
