"""The reporting counters, tested directly on the scripts through the store layer.

record.lua writes the day's counters, the per-document-type counters, the
lifetime totals and the records index in the same atomic step as the rules;
set_plan.lua keeps the plan log. These tests read the raw keys back.
"""

from __future__ import annotations

from typing import cast

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagemeter.v1 import plan_pb2
from pagemeter_server.domain.decisions import CheckCall
from pagemeter_server.domain.plans import plan_to_doc
from pagemeter_server.store.keys import OrgKeys
from pagemeter_server.store.quota import Store
from tests.conftest import START_MS, eagle_plan, metric_limits, ms
from tests.rules.test_rules_lua import record, set_plan

DAY_MS = 86_400_000
KEYS = OrgKeys("acme")


async def test_record_writes_day_type_and_lifetime_counters(
    store: Store, redis_sync: redis.Redis
) -> None:
    """A completed job adds its units and one job to its day, to its document type, and to the lifetime totals; a failed job adds one failed job only."""
    await set_plan(store, metric_limits("pages", contract_quota=100, overage_allowed=True))
    await record(store, "j1", {"pages": 7}, document_type="invoice")
    await record(store, "j2", {"pages": 3}, success=False, document_type="invoice")
    day = redis_sync.hgetall("pm:{acme}:d:2026-03-15")
    assert day == {
        "c:pages": "7",
        "tc:invoice:pages": "7",
        "ok": "1",
        "tok:invoice": "1",
        "failed": "1",
        "tfail:invoice": "1",
    }
    assert redis_sync.hget(KEYS.lifetime, "a:pages") == "7"


async def test_duplicate_record_adds_nothing_to_the_reports(
    store: Store, redis_sync: redis.Redis
) -> None:
    """A retried record (same id, same payload) changes no day, type, lifetime or index counter."""
    await set_plan(store, metric_limits("pages"))
    await record(store, "j1", {"pages": 5}, document_type="invoice")
    before = {key: redis_sync.dump(key) for key in redis_sync.keys("*")}
    again = await record(store, "j1", {"pages": 5}, document_type="invoice")
    assert again.duplicate
    assert {key: redis_sync.dump(key) for key in redis_sync.keys("*")} == before


async def test_day_follows_the_plan_timezone(store: Store, redis_sync: redis.Redis) -> None:
    """Completion at 23:30 UTC on 9 March counts on 10 March for an organization in Tokyo."""
    plan = metric_limits("pages")
    doc = plan_to_doc(
        plan_pb2.Plan(org_id="acme", name="T", timezone="Asia/Tokyo", metrics=[plan]), "UTC"
    )
    await store.set_plan("acme", doc, now_ms=START_MS)
    completed = ms("2026-03-09T23:30:00+00:00")
    await record(store, "j1", {"pages": 2}, completed_ms=completed, completed_given=True)
    assert redis_sync.hget("pm:{acme}:d:2026-03-10", "c:pages") == "2"
    assert not redis_sync.exists("pm:{acme}:d:2026-03-09")


async def test_day_counters_expire_after_the_usage_retention(
    store: Store, redis_sync: redis.Redis
) -> None:
    """A day's counters live until the end of that day plus the usage retention, relative to the rules' clock."""
    await set_plan(store, metric_limits("pages"))
    await record(store, "j1", {"pages": 1})
    ttl_ms = redis_sync.pttl("pm:{acme}:d:2026-03-15")
    end_of_day = ms("2026-03-16T00:00:00+00:00")
    expected = end_of_day + store.usage_retention_ms - START_MS
    assert expected - 5_000 <= ttl_ms <= expected


async def test_document_types_per_organization_are_capped(
    store: Store, redis_sync: redis.Redis
) -> None:
    """Past the org's 100 document types, new types count as '_other' in the day counters on every later day, while known types keep their own rows and the record keeps its type."""
    await set_plan(store, metric_limits("pages"))
    for i in range(100):
        await record(store, f"j{i}", {"pages": 1}, document_type=f"type{i}")
    next_day = START_MS + DAY_MS
    for request_id, document_type in (("new1", "type100"), ("new2", "type101"), ("old", "type0")):
        await record(
            store,
            request_id,
            {"pages": 1},
            document_type=document_type,
            completed_ms=next_day,
            completed_given=True,
            now_ms=next_day,
        )
    day = redis_sync.hgetall("pm:{acme}:d:2026-03-16")
    assert day["tok:_other"] == "2"
    assert day["tok:type0"] == "1"
    assert "tok:type100" not in day and "tok:type101" not in day
    assert day["c:pages"] == "3"
    assert redis_sync.hget(KEYS.record("new1"), "dt") == "type100"
    assert redis_sync.zcard(KEYS.doctypes) == 100


async def test_a_document_type_unused_for_the_retention_frees_its_place(
    store: Store, redis_sync: redis.Redis
) -> None:
    """A document type last recorded longer ago than the usage retention (plus a month) leaves the org's registry, and a new type takes its place."""
    await set_plan(store, metric_limits("pages"))
    for i in range(100):
        await record(store, f"j{i}", {"pages": 1}, document_type=f"type{i}")
    later = START_MS + store.usage_retention_ms + 32 * DAY_MS
    await record(
        store,
        "late",
        {"pages": 1},
        document_type="fresh",
        completed_ms=later,
        completed_given=True,
        now_ms=later,
    )
    assert redis_sync.zrange(KEYS.doctypes, 0, -1) == ["fresh"]


async def test_lifetime_gauge_changes_are_not_jobs(store: Store, redis_sync: redis.Redis) -> None:
    """Moving a PERIOD_NONE gauge (applications) is not a document job: no day counters, no job counted, no lifetime total; a job with pages is."""
    await set_plan(
        store,
        metric_limits("applications", hard_limit=3, period=plan_pb2.PERIOD_NONE),
        metric_limits("pages"),
    )
    await record(store, "j1", {"applications": 1})
    await record(store, "j2", {"applications": -1})
    assert not redis_sync.exists("pm:{acme}:d:2026-03-15")
    assert redis_sync.hget(KEYS.month("2026-03"), "jobs_ok") is None
    assert redis_sync.hget(KEYS.lifetime, "a:applications") is None
    assert redis_sync.hget(KEYS.lifetime, "c:applications") == "0"
    await record(store, "j3", {"pages": 2, "applications": 1})
    assert redis_sync.hget("pm:{acme}:d:2026-03-15", "ok") == "1"
    assert redis_sync.hget(KEYS.month("2026-03"), "jobs_ok") == "1"


async def test_records_index_is_capped_but_ids_stay_deduplicated(
    redis_client: object, redis_sync: redis.Redis
) -> None:
    """With a cap of 3, the index keeps the 3 newest records, and a retry of a trimmed one is still a duplicate."""
    store = Store(
        redis_client,  # type: ignore[arg-type]
        default_timezone="UTC",
        record_retention_days=40,
        usage_retention_days=400,
        max_records_per_org=3,
    )
    await set_plan(store, metric_limits("pages"))
    for i in range(5):
        await record(store, f"j{i}", {"pages": 1}, requested_ms=START_MS + i)
    assert redis_sync.zrange(KEYS.records_index, 0, -1) == ["j2", "j3", "j4"]
    again = await record(store, "j0", {"pages": 1}, requested_ms=START_MS)
    assert again.duplicate
    assert redis_sync.hget(KEYS.month("2026-03"), "c:pages") == "5"


async def test_records_index_drops_entries_past_the_record_retention(
    store: Store, redis_sync: redis.Redis
) -> None:
    """Index entries requested longer ago than the record retention leave it at the next write."""
    await set_plan(store, metric_limits("pages"))
    await record(store, "old", {"pages": 1})
    later = START_MS + 41 * DAY_MS
    await record(store, "new", {"pages": 1}, now_ms=later)
    assert redis_sync.zrange(KEYS.records_index, 0, -1) == ["new"]


async def test_hold_enters_the_index_at_check_time(store: Store, redis_sync: redis.Redis) -> None:
    """A held job is listed from its CheckQuota, scored by the hold's time; its record keeps that score."""
    await set_plan(store, metric_limits("pages"))
    await store.check(
        "acme",
        CheckCall({"pages": 2}, request_id="j1", hold=True, hold_ttl_ms=60000),
        now_ms=START_MS,
    )
    assert redis_sync.zscore(KEYS.records_index, "j1") == START_MS
    await record(store, "j1", {"pages": 2}, now_ms=START_MS + 5_000)
    assert redis_sync.zscore(KEYS.records_index, "j1") == START_MS


async def test_plan_log_keeps_versions_still_in_use(store: Store, redis_sync: redis.Redis) -> None:
    """Every plan version is logged; versions replaced before the usage retention are dropped, but the one in effect then is kept."""
    doc = plan_to_doc(eagle_plan(), "UTC")
    for day in range(3):
        await store.set_plan("acme", doc, now_ms=START_MS + day * DAY_MS)
    assert redis_sync.zrange(KEYS.planlog, 0, -1) == ["1", "2", "3"]
    far = START_MS + store.usage_retention_ms + 10 * DAY_MS
    await store.set_plan("acme", doc, now_ms=far)
    # Versions 1 and 2 were replaced before the cutoff; 3 was in effect at it.
    assert redis_sync.zrange(KEYS.planlog, 0, -1) == ["3", "4"]
    assert sorted(redis_sync.hkeys(KEYS.planver)) == ["3", "4"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    jobs=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=40 * 24 - 1),  # hour of completion
            st.integers(min_value=0, max_value=50),  # pages
            st.booleans(),  # success
            st.sampled_from(["", "invoice", "receipt"]),
            st.booleans(),  # retried
        ),
        max_size=25,
    )
)
async def test_day_counters_reconcile_with_month_counters(
    store: Store, redis_sync: redis.Redis, jobs: list[tuple[int, int, bool, str, bool]]
) -> None:
    """Whatever jobs are recorded (and retried), each month's units and jobs equal the sums of its days, and the days' totals equal the sums of their document types."""
    redis_sync.flushall()
    await set_plan(store, metric_limits("pages", contract_quota=100, overage_allowed=True))
    now = ms("2026-04-10T00:00:00+00:00")
    start = ms("2026-03-01T00:00:00+00:00")
    for i, (hour, pages, success, document_type, retried) in enumerate(jobs):
        for _ in range(2 if retried else 1):
            await record(
                store,
                f"j{i}",
                {"pages": pages},
                now_ms=now,
                completed_ms=start + hour * 3_600_000,
                completed_given=True,
                success=success,
                document_type=document_type,
            )
    for month in ("2026-03", "2026-04"):
        month_hash = {k: int(v) for k, v in redis_sync.hgetall(KEYS.month(month)).items()}
        days = [
            {k: int(v) for k, v in cast(dict[str, str], redis_sync.hgetall(key)).items()}
            for key in redis_sync.keys(f"pm:{{acme}}:d:{month}-*")
        ]
        assert sum(d.get("c:pages", 0) for d in days) == month_hash.get("c:pages", 0)
        assert sum(d.get("ok", 0) for d in days) == month_hash.get("jobs_ok", 0)
        assert sum(d.get("failed", 0) for d in days) == month_hash.get("jobs_failed", 0)
        for d in days:
            typed = sum(v for k, v in d.items() if k.startswith("tc:") and k.endswith(":pages"))
            assert typed == d.get("c:pages", 0)
            assert sum(v for k, v in d.items() if k.startswith("tok:")) == d.get("ok", 0)
    expected = sum(p for _, p, ok, _, _ in jobs if ok)
    assert int(redis_sync.hget(KEYS.lifetime, "a:pages") or 0) == expected


async def test_usage_records_stay_compact(store: Store, redis_sync: redis.Redis) -> None:
    """A recorded job with two metrics is stored in Redis's compact hash encoding, not as a hash table (a third of the memory)."""
    await set_plan(store, metric_limits("pages"), metric_limits("documents"))
    await store.check(
        "acme",
        CheckCall({"pages": 12, "documents": 1}, request_id="j1", hold=True, hold_ttl_ms=60000),
        now_ms=START_MS,
    )
    await record(store, "j1", {"pages": 12, "documents": 1}, document_type="invoice")
    assert redis_sync.object("encoding", "pm:{acme}:r:j1") in ("ziplist", "listpack")
