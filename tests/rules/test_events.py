"""Events: every change of state appends its events in the same atomic script
call, so an event exists exactly when its change does (docs/events.md); the
notification thresholds cross once per period and resolve when they no longer
hold. On a single Redis and on a cluster.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from google.protobuf import duration_pb2

from pagemeter.v1 import plan_pb2
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.domain.decisions import CheckCall, RecordCall, RecordResult
from pagemeter_server.domain.errors import NegativeUnits, RequestIdReused
from pagemeter_server.domain.events import Event, cloudevent_json
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.ops.alert_sweep import SWEEP_LEASE_KEY, sweep_all, sweeping
from pagemeter_server.store.admin import AdminStore
from pagemeter_server.store.events import EventStore
from pagemeter_server.store.keys import EVENT_ORGS_KEY, OrgKeys
from pagemeter_server.store.quota import EVENT_ORGS_INTERVAL, Store
from tests.conftest import ON_EACH_BACKEND, START_MS, metric_limits, ms

pytestmark = ON_EACH_BACKEND

NOW = START_MS  # 2026-03-15T12:00Z
APR_2 = ms("2026-04-02T00:00:00+00:00")


async def set_plan(store: Store, org: str = "acme", at_ms: int = NOW, **fields: Any) -> None:
    terms: dict[str, Any] = {"contract_quota": 100, "overage_allowed": True}
    terms.update(fields)
    terms = {k: v for k, v in terms.items() if v is not None}
    plan = plan_pb2.Plan(
        org_id=org, name="Events", timezone="UTC", metrics=[metric_limits("pages", **terms)]
    )
    await store.set_plan(org, plan_to_doc(plan, "UTC"), now_ms=at_ms)


async def record(
    store: Store, request_id: str, pages: int, *, org: str = "acme", at_ms: int = NOW
) -> RecordResult:
    call = RecordCall(
        request_id=request_id,
        units={"pages": pages},
        completed_ms=at_ms,
        completed_given=False,
        success=True,
        requested_ms=None,
        document_type="invoice",
    )
    return await store.record(org, call, now_ms=at_ms)


async def events(client: aioredis.Redis, org: str = "acme", kind: str = "") -> list[Event]:
    read = await EventStore(client).read(org, count=100_000)
    return [e for e in read if not kind or e.type == kind]


def kinds(read: list[Event]) -> list[str]:
    return [e.type for e in read]


def thresholds(read: list[Event]) -> list[tuple[str, str, str]]:
    """(type, threshold, reason) of the threshold events, in order."""
    return [
        (e.type, e.data["threshold"], e.data.get("reason", ""))
        for e in read
        if e.type.startswith("threshold.")
    ]


@pytest.fixture
def migrated(store: Store, plans_migrated: None) -> Store:
    return store


# -- one event per change ----------------------------------------------------------


async def test_a_record_appends_one_event_with_its_split_and_a_retry_appends_none(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=10)
    await store.grant_credits("acme", "pages", 5, "g1", "bought", now_ms=NOW)
    before = await events(redis_client)
    await record(store, "job-1", 18)
    await record(store, "job-1", 18)  # the same job again: a duplicate
    with pytest.raises(RequestIdReused):
        await record(store, "job-1", 3)  # the id with another payload: refused
    after = (await events(redis_client))[len(before) :]
    assert kinds(after) == ["usage.recorded", "threshold.crossed", "threshold.crossed"]
    recorded = after[0]
    assert recorded.data["request_id"] == "job-1"
    assert recorded.data["status"] == "completed"
    assert recorded.data["period"] == "2026-03"
    assert recorded.data["hold"] == "none"
    assert recorded.data["document_type"] == "invoice"
    assert recorded.data["completed_at"] == "2026-03-15T12:00:00.000Z"
    [row] = recorded.data["metrics"]
    assert row == {
        "metric": "pages",
        "units": 18,
        "included": 10,
        "prepaid": 5,
        "overage": 3,
        "committed": 18,
        "overage_price": "0",
        "lifetime": False,
    }
    assert recorded.time_ms == NOW
    assert recorded.id == f"acme:{recorded.entry_id}"
    sequences = [e.seq for e in await events(redis_client)]
    assert sequences == list(range(1, len(sequences) + 1))


async def test_holds_are_placed_released_and_expired_once_each(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store)
    hold = CheckCall({"pages": 5}, request_id="h1", hold=True, hold_ttl_ms=60_000)
    await store.check("acme", hold, now_ms=NOW)
    await store.check("acme", hold, now_ms=NOW + 1)  # a retry: the same hold
    await store.release("acme", "h1", now_ms=NOW + 2)
    await store.release("acme", "h1", now_ms=NOW + 3)  # released again: nothing new
    other = CheckCall({"pages": 7}, request_id="h2", hold=True, hold_ttl_ms=1_000)
    await store.check("acme", other, now_ms=NOW + 4)
    third = CheckCall({"pages": 1}, request_id="h3", hold=True, hold_ttl_ms=60_000)
    await store.check("acme", third, now_ms=NOW + 10_000)  # finds h2 expired
    await record(store, "h3", 1, at_ms=NOW + 11_000)  # uses its hold
    read = await events(redis_client)
    assert kinds(read) == [
        "plan.changed",
        "hold.placed",
        "hold.released",
        "hold.placed",
        "hold.expired",
        "hold.placed",
        "usage.recorded",
    ]
    placed, released = read[1], read[2]
    assert placed.data["request_id"] == "h1"
    assert placed.data["metrics"] == [{"metric": "pages", "units": 5, "prepaid": 0}]
    assert placed.data["expires_at"] == "2026-03-15T12:01:00.000Z"
    assert released.data == {
        "request_id": "h1",
        "metrics": [{"metric": "pages", "units": 5, "prepaid": 0}],
    }
    expired = read[4]
    assert expired.data["request_id"] == "h2"
    assert expired.data["expired_at"] == "2026-03-15T12:00:01.004Z"
    assert expired.time_ms == NOW + 10_000
    assert read[6].data["hold"] == "released"


async def test_a_check_that_only_decides_appends_nothing(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store)
    before = len(await events(redis_client))
    for i in range(5):
        await store.check("acme", CheckCall({"pages": 500}), now_ms=NOW + i)
        await store.check("acme", CheckCall({"pages": 5}), now_ms=NOW + i)
    assert len(await events(redis_client)) == before


async def test_plan_grant_void_and_correction_each_append_their_event(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store)
    for at in (NOW, NOW + 1):  # the second is a retry
        await store.grant_credits(
            "acme",
            "pages",
            40,
            "g1",
            "bought",
            now_ms=at,
            expires_ms=APR_2,
            priority=10,
            effective_ms=NOW,
        )
    await store.void_grant("acme", "g1", "refund", now_ms=NOW + 2)
    await store.void_grant("acme", "g1", "refund", now_ms=NOW + 3)  # voided already
    admin = AdminStore(store)
    for _ in range(2):  # the second is the same correction again
        await admin.adjust_usage(
            "acme",
            "pages",
            7,
            year_month=None,
            reason="missed batch",
            adjustment_id="adj-1",
            now_ms=NOW + 4,
            actor="ops",
        )
    read = await events(redis_client)
    assert kinds(read) == ["plan.changed", "credits.granted", "credits.voided", "usage.corrected"]
    plan, granted, voided, corrected = read
    assert plan.data["version"] == 1
    assert plan.data["plan"]["metrics"][0]["metric"] == "pages"
    assert plan.data["plan"]["metrics"][0]["contract_quota"] == "100"  # int64: a JSON string
    assert plan.data["plan"]["version"] == "1"
    assert granted.data == {
        "grant_id": "g1",
        "metric": "pages",
        "units": 40,
        "effective_at": "2026-03-15T12:00:00.000Z",
        "expires_at": "2026-04-02T00:00:00.000Z",
        "priority": 10,
        "reason": "bought",
        "balance": 40,
    }
    assert voided.data == {
        "grant_id": "g1",
        "metric": "pages",
        "voided_units": 40,
        "reason": "refund",
    }
    assert corrected.data == {
        "adjustment_id": "adj-1",
        "metric": "pages",
        "period": "2026-03",
        "before": 0,
        "after": 7,
        "units": 7,
        "reason": "missed batch",
    }


async def test_a_refused_record_appends_nothing(store: Store, redis_client: aioredis.Redis) -> None:
    """Negative units of a monthly metric are refused by the script: no change, no event."""
    await set_plan(store)
    before = await events(redis_client)
    call = RecordCall(
        request_id="neg",
        units={"pages": -3},
        completed_ms=NOW,
        completed_given=False,
        success=True,
        requested_ms=None,
        document_type="",
    )
    with pytest.raises(NegativeUnits):
        await store.record("acme", call, now_ms=NOW)
    assert await events(redis_client) == before


async def test_events_read_back_as_cloudevents(store: Store, redis_client: aioredis.Redis) -> None:
    await set_plan(store)
    await record(store, "job-1", 3)
    recorded = (await events(redis_client, kind="usage.recorded"))[0]
    read = JSONFormat().read(CloudEvent, cloudevent_json(recorded))
    assert read.get_specversion() == "1.0"
    assert read.get_id() == recorded.id
    assert read.get_source() == "/pagemeter/orgs/acme"
    assert read.get_type() == "pagemeter.usage.recorded"
    assert read.get_subject() == "job-1"
    assert read.get_extension("sequence") == str(recorded.seq)
    assert read.get_extension("orgid") == "acme"
    moment = read.get_time()
    assert moment is not None
    assert int(moment.timestamp() * 1000) == NOW
    data = read.get_data()
    assert isinstance(data, dict)
    assert data["metrics"][0]["units"] == 3


async def test_organizations_on_every_primary_have_their_own_streams(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """In a cluster the orgs' slots are spread over the primaries; each stream
    is in its org's slot, written by the same script call as the change."""
    orgs = [f"org-{i}" for i in range(12)]
    for org in orgs:
        await set_plan(store, org)
    await asyncio.gather(
        *(record(store, f"{org}-job-{n}", n + 1, org=org) for org in orgs for n in range(5))
    )
    for org in orgs:
        recorded = await events(redis_client, org, "usage.recorded")
        assert sorted(e.data["request_id"] for e in recorded) == [
            f"{org}-job-{n}" for n in range(5)
        ]
        assert {e.org_id for e in recorded} == {org}
        seqs = [e.seq for e in await events(redis_client, org)]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_concurrent_records_each_append_exactly_one_event(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=None)
    await asyncio.gather(
        *(record(store, f"job-{i}", 1) for i in range(100)),
        *(record(store, f"job-{i}", 1) for i in range(100)),  # each retried at once
    )
    recorded = await events(redis_client, kind="usage.recorded")
    assert sorted(e.data["request_id"] for e in recorded) == sorted(f"job-{i}" for i in range(100))
    assert len({e.id for e in recorded}) == 100


async def test_an_organization_without_events_on_leaves_no_stream(
    redis_client: aioredis.Redis, store: Store
) -> None:
    quiet = Store(
        redis_client,
        default_timezone="UTC",
        record_retention_days=40,
        usage_retention_days=400,
        event_max_per_org=0,
    )
    await set_plan(quiet, "quiet")
    await record(quiet, "job-1", 200, org="quiet")
    assert await redis_client.exists(OrgKeys("quiet").events, OrgKeys("quiet").evstate) == 0


async def test_the_stream_is_bounded(redis_client: aioredis.Redis, store: Store) -> None:
    small = Store(
        redis_client,
        default_timezone="UTC",
        record_retention_days=40,
        usage_retention_days=400,
        event_max_per_org=100,
    )
    await set_plan(small, "busy", contract_quota=None)
    for i in range(400):
        await record(small, f"job-{i}", 1, org="busy")
    kept = await redis_client.xlen(OrgKeys("busy").events)
    # MAXLEN ~ trims whole nodes of 100 entries: at most one node over.
    assert 100 <= kept <= 200
    assert await redis_client.pttl(OrgKeys("busy").events) > 0
    last = (await events(redis_client, "busy"))[-1]
    assert last.seq == 401  # the sequence goes on past what was trimmed


# -- thresholds ----------------------------------------------------------------------


async def test_80_and_100_percent_of_the_quota_cross_once_each_by_default(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=100)
    await record(store, "a", 79)
    assert thresholds(await events(redis_client)) == []
    await record(store, "b", 1)  # 80
    await record(store, "c", 5)  # 85: crossed already this period
    await record(store, "d", 15)  # 100
    await record(store, "e", 30)  # past it
    read = await events(redis_client)
    assert thresholds(read) == [
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.crossed", "contract_quota:100", ""),
    ]
    crossed = next(e for e in read if e.type == "threshold.crossed")
    assert crossed.data == {
        "metric": "pages",
        "threshold": "contract_quota:80",
        "kind": "contract_quota",
        "percent": 80,
        "level": 80,
        "limit": 100,
        "value": 80,
        "period": "2026-03",
    }


async def test_fifty_racers_crossing_80_percent_together_produce_one_event(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=1000)
    await record(store, "base", 790)
    # 50 records of 1 to 5 pages at once: whichever takes usage to 800 crosses.
    await asyncio.gather(*(record(store, f"racer-{i}", 1 + i % 5) for i in range(50)))
    read = await events(redis_client)
    assert thresholds(read) == [("threshold.crossed", "contract_quota:80", "")]
    crossing = next(e for e in read if e.type == "threshold.crossed")
    assert 800 <= crossing.data["value"] < 805


async def test_a_correction_under_the_threshold_resolves_it(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=100)
    await record(store, "a", 85)
    admin = AdminStore(store)
    await admin.adjust_usage(
        "acme",
        "pages",
        -20,
        year_month=None,
        reason="double counted",
        adjustment_id="fix-1",
        now_ms=NOW + 1,
        actor="ops",
    )
    await record(store, "b", 20)  # 85 again: crosses again, in the same period
    assert thresholds(await events(redis_client)) == [
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.resolved", "contract_quota:80", "no_longer_holds"),
        ("threshold.crossed", "contract_quota:80", ""),
    ]


async def test_a_new_period_resolves_what_the_last_one_crossed(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=100)
    await record(store, "march", 90)
    # The sweep at the next period's start resolves it without any traffic.
    written = await store.sweep_alerts("acme", now_ms=APR_2)
    assert written == 1
    assert await store.sweep_alerts("acme", now_ms=APR_2 + 1) == 0
    await record(store, "april", 85, at_ms=APR_2 + 2)
    read = await events(redis_client)
    assert thresholds(read) == [
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.resolved", "contract_quota:80", "period_ended"),
        ("threshold.crossed", "contract_quota:80", ""),
    ]
    periods = [e.data.get("period") for e in read if e.type.startswith("threshold.")]
    assert periods == ["2026-03", "2026-03", "2026-04"]


async def test_a_crossing_in_a_new_period_first_resolves_the_old_one(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """Before the sweep has seen the new period, the first record that crosses
    the threshold again resolves the old period's crossing first; a record that
    crosses nothing reads no threshold at all."""
    await set_plan(store, contract_quota=100)
    await record(store, "march", 90)
    await record(store, "april-1", 1, at_ms=APR_2)
    await record(store, "april-2", 84, at_ms=APR_2 + 1)
    read = await events(redis_client)
    assert thresholds(read) == [
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.resolved", "contract_quota:80", "period_ended"),
        ("threshold.crossed", "contract_quota:80", ""),
    ]
    assert [e.data.get("period") for e in read if e.type.startswith("threshold.")] == [
        "2026-03",
        "2026-03",
        "2026-04",
    ]


async def test_a_late_record_of_a_period_that_is_over_watches_nothing(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=100, at_ms=NOW - 40 * 86_400_000)
    feb = ms("2026-02-20T00:00:00+00:00")
    call = RecordCall(
        request_id="late",
        units={"pages": 95},
        completed_ms=feb,
        completed_given=True,
        success=True,
        requested_ms=None,
        document_type="",
    )
    await store.record("acme", call, now_ms=NOW)
    assert thresholds(await events(redis_client)) == []


async def test_a_plan_change_resolves_what_no_longer_holds(
    migrated: Store, redis_client: aioredis.Redis
) -> None:
    store = migrated
    await set_plan(store, contract_quota=100)
    await record(store, "a", 85)
    await set_plan(store, contract_quota=1000, at_ms=NOW + 1)  # 8.5 %: resolved
    await set_plan(store, contract_quota=100, at_ms=NOW + 2)  # 85 % again: crossed
    # Thresholds of its own replace the defaults: 80 % is no longer watched.
    alerts = plan_pb2.MetricAlerts(quota_percents=[50, 90])
    await set_plan(store, contract_quota=100, alerts=alerts, at_ms=NOW + 3)
    assert thresholds(await events(redis_client)) == [
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.resolved", "contract_quota:80", "no_longer_holds"),
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.crossed", "contract_quota:50", ""),
        ("threshold.resolved", "contract_quota:80", "plan_changed"),
    ]


async def test_hard_limit_and_spend_cap_thresholds(
    migrated: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(
        migrated,
        contract_quota=100,
        hard_limit=200,
        overage_price_per_unit="1",
        overage_spend_cap="20",
        alerts=plan_pb2.MetricAlerts(quota_percents=[], hard_limit_percents=[90]),
    )
    await record(migrated, "a", 119)  # 19 overage units of 20
    assert thresholds(await events(redis_client)) == []
    await record(migrated, "b", 1)  # the cap's 20 units
    await record(migrated, "c", 60)  # 180 of 200: 90 % of the hard limit
    assert thresholds(await events(redis_client)) == [
        ("threshold.crossed", "spend_cap", ""),
        ("threshold.crossed", "hard_limit:90", ""),
    ]


async def test_credits_below_an_amount_and_a_grant_expiring_soon(
    migrated: Store, redis_client: aioredis.Redis
) -> None:
    within = duration_pb2.Duration(seconds=7 * 86_400)
    alerts = plan_pb2.MetricAlerts(credits_below=50, grant_expiring_within=within)
    await set_plan(migrated, contract_quota=10, alerts=alerts)
    # No credits at all: below 50.
    assert thresholds(await events(redis_client)) == [("threshold.crossed", "credits_below:50", "")]
    await migrated.grant_credits("acme", "pages", 100, "big", "bought", now_ms=NOW + 1)
    mar_20 = ms("2026-03-20T00:00:00+00:00")  # within the 7 days' warning
    await migrated.grant_credits(
        "acme", "pages", 30, "short", "promo", now_ms=NOW + 2, expires_ms=mar_20
    )
    # 20 drawn from "short" (the earlier expiry), then "short" used up and 40 of "big" left.
    await record(migrated, "a", 10 + 20, at_ms=NOW + 3)
    await record(migrated, "b", 70, at_ms=NOW + 4)
    await migrated.sweep_alerts("acme", now_ms=NOW + 5)  # nothing new
    assert thresholds(await events(redis_client)) == [
        ("threshold.crossed", "credits_below:50", ""),
        ("threshold.resolved", "credits_below:50", "no_longer_holds"),
        ("threshold.crossed", "grant_expiring:short", ""),
        ("threshold.crossed", "credits_below:50", ""),
        ("threshold.resolved", "grant_expiring:short", "no_longer_holds"),
    ]
    crossed = [e for e in await events(redis_client) if e.type == "threshold.crossed"]
    assert crossed[1].data["grant_id"] == "short"
    assert crossed[1].data["expires_at"] == "2026-03-20T00:00:00.000Z"
    assert crossed[2].data["value"] == 40


async def test_thresholds_of_a_lifetime_gauge(store: Store, redis_client: aioredis.Redis) -> None:
    plan = plan_pb2.Plan(
        org_id="acme",
        name="Gauges",
        timezone="UTC",
        metrics=[metric_limits("apps", contract_quota=10, period=plan_pb2.PERIOD_NONE)],
    )
    await store.set_plan("acme", plan_to_doc(plan, "UTC"), now_ms=NOW)

    async def gauge(request_id: str, units: int) -> None:
        call = RecordCall(
            request_id=request_id,
            units={"apps": units},
            completed_ms=NOW,
            completed_given=False,
            success=True,
            requested_ms=None,
            document_type="",
        )
        await store.record("acme", call, now_ms=NOW)

    await gauge("add", 8)
    await gauge("remove", -2)
    read = await events(redis_client)
    assert thresholds(read) == [
        ("threshold.crossed", "contract_quota:80", ""),
        ("threshold.resolved", "contract_quota:80", "no_longer_holds"),
    ]
    assert [e.data.get("period") for e in read if e.type.startswith("threshold")] == [
        "lifetime",
        "lifetime",
    ]


def test_event_data_is_plain_json() -> None:
    """What a consumer parses: numbers as integers, times as RFC 3339, no Lua quirks."""
    from pagemeter_server.domain.events import event_from_entry

    event = event_from_entry(
        "acme",
        "1-0",
        {
            "seq": "3",
            "type": "hold.placed",
            "at": "1000",
            "data": json.dumps(
                {
                    "request_id": "123",
                    "expires_at": "0",
                    "metrics": {},
                    "units": "12345678901234567",
                }
            ),
        },
    )
    assert event.data == {
        "request_id": "123",
        "expires_at": None,
        "metrics": [],
        "units": 12345678901234567,
    }


async def test_the_periodic_sweep_resolves_every_organization_once(
    store: Store, redis_client: aioredis.Redis
) -> None:
    orgs = ["org-a", "org-b", "org-c"]
    for org in orgs:
        await set_plan(store, org, contract_quota=10)
        await record(store, f"{org}-march", 9, org=org)
    april = ManualClock(APR_2)
    assert await sweep_all(store, april) == (3, 3)
    assert await sweep_all(store, april) == (3, 0)
    for org in orgs:
        assert thresholds(await events(redis_client, org)) == [
            ("threshold.crossed", "contract_quota:80", ""),
            ("threshold.resolved", "contract_quota:80", "period_ended"),
        ]


async def test_a_server_without_the_sweep_lease_does_not_sweep(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await set_plan(store, contract_quota=10)
    await record(store, "march", 9)
    await redis_client.set(SWEEP_LEASE_KEY, "another server", px=60_000)
    try:
        async with sweeping(store, redis_client, ManualClock(APR_2), 0.05):
            await asyncio.sleep(0.3)
        assert [e for e in await events(redis_client) if e.type == "threshold.resolved"] == []
        await redis_client.delete(SWEEP_LEASE_KEY)
        async with sweeping(store, redis_client, ManualClock(APR_2), 0.05):
            for _ in range(100):
                if await events(redis_client, kind="threshold.resolved"):
                    break
                await asyncio.sleep(0.05)
        assert len(await events(redis_client, kind="threshold.resolved")) == 1
    finally:
        await redis_client.delete(SWEEP_LEASE_KEY)


async def test_a_refused_call_does_not_note_its_organization(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """pm:event-orgs lists organizations that wrote events; a call the script
    refuses changed nothing, and must not write it either (not even the others'
    notes it would flush)."""
    await set_plan(store)
    await record(store, "job-1", 1)
    await asyncio.sleep(EVENT_ORGS_INTERVAL + 0.1)
    with pytest.raises(RequestIdReused):
        await record(store, "job-1", 2)
    assert await redis_client.exists(EVENT_ORGS_KEY) == 0
    await record(store, "job-2", 1)
    assert await redis_client.zrange(EVENT_ORGS_KEY, 0, -1) == ["acme"]
