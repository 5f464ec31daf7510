"""Envoy's rate-limit protocol (envoy.service.ratelimit.v3) on pagemeter's gRPC port.

The client is the stub xds-protos generates from Envoy's own protos, so each
request is shaped as Envoy's ratelimit filter sends it; the server and Redis are
real (docs/envoy.md).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hypothesis.strategies as st
import pytest
import redis
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.wrappers_pb2 import UInt64Value
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2, reporting_pb2
from pagemeter_server.api.auth import Credentials, Role
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.conftest import (
    START_MS,
    RunningServer,
    eagle_plan,
    examples,
    field_violations,
    metric_limits,
    ms,
    serving,
)
from tests.grpc.test_quota_service import snapshot

Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit
SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
# START_MS is 2026-03-15 12:00 UTC; acme's plans are in UTC, so March ends here.
APRIL_MS = ms("2026-04-01T00:00:00+00:00")
TO_APRIL_S = (APRIL_MS - START_MS) // 1000
ADMIN_TOKEN = "admin-token-0123456789abcdef"
SERVICE_TOKEN = "service-token-0123456789abcdef"


def descriptor(
    org_id: str | None = "acme",
    metric: str | None = "pages",
    *,
    hits: int | None = None,
    request_id: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> Any:
    """A descriptor as Envoy's generic_key and request_headers actions build it."""
    entries = [(ORG, org_id), ("metric", metric), ("request_id", request_id)]
    built = ratelimit_pb2.RateLimitDescriptor(
        entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value)
            for key, value in [*entries, *extra]
            if value is not None
        ]
    )
    if hits is not None:
        built.hits_addend.CopyFrom(UInt64Value(value=hits))
    return built


ORG = "org_id"


def ask(*descriptors: Any, hits_addend: int = 0) -> Any:
    return rls_pb2.RateLimitRequest(
        domain="pagemeter", descriptors=list(descriptors), hits_addend=hits_addend
    )


def stub_of(server: RunningServer) -> Any:
    return rls_pb2_grpc.RateLimitServiceStub(server.channel)


async def should(server: RunningServer, request: Any, **kwargs: Any) -> Any:
    return await stub_of(server).ShouldRateLimit(request, timeout=10, **kwargs)


def headers(entries: Any) -> dict[str, str]:
    return {h.key: h.value for h in entries}


async def set_plan(server: RunningServer, plan: plan_pb2.Plan) -> None:
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))


async def committed(server: RunningServer, org_id: str = "acme") -> dict[str, int]:
    usage = await server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org_id))
    return {m.metric: m.committed for m in usage.metrics}


def hard_plan(org_id: str = "acme", limit: int = 10, **fields: object) -> plan_pb2.Plan:
    """pages with a hard limit and nothing else."""
    return plan_pb2.Plan(
        org_id=org_id,
        timezone="UTC",
        metrics=[metric_limits("pages", hard_limit=limit, overage_allowed=True)],
        **fields,  # type: ignore[arg-type]
    )


# -- the mapping ------------------------------------------------------------------------------


async def test_descriptors_name_org_and_metric_and_admitted_hits_are_committed(
    pagemeter_server: RunningServer,
) -> None:
    """Two descriptors of acme (pages, documents) are one decision; an admitted call's hits are committed per metric."""
    await set_plan(pagemeter_server, eagle_plan())
    answer = await should(
        pagemeter_server,
        ask(descriptor(metric="pages"), descriptor(metric="documents"), hits_addend=3),
    )
    assert answer.overall_code == Code.OK
    assert [s.code for s in answer.statuses] == [Code.OK, Code.OK]
    assert await committed(pagemeter_server) == {"pages": 3, "documents": 3}


async def test_hits_addend_of_request_and_descriptor(pagemeter_server: RunningServer) -> None:
    """A descriptor's hits_addend overrides the request's; the request's 0 means 1; a descriptor's explicit 0 counts nothing."""
    await set_plan(pagemeter_server, eagle_plan())
    await should(
        pagemeter_server,
        ask(descriptor(metric="pages", hits=5), descriptor("acme", "documents"), hits_addend=2),
    )
    assert await committed(pagemeter_server) == {"pages": 5, "documents": 2}
    await should(pagemeter_server, ask(descriptor(metric="pages")))
    assert (await committed(pagemeter_server))["pages"] == 6
    answer = await should(pagemeter_server, ask(descriptor(metric="pages", hits=0)))
    assert answer.overall_code == Code.OK
    assert (await committed(pagemeter_server))["pages"] == 6


async def test_two_descriptors_of_one_metric_add_their_hits(
    pagemeter_server: RunningServer,
) -> None:
    """Two descriptors naming the same metric count both hits, decided together: 6 + 5 against a hard limit of 10 is refused whole."""
    await set_plan(pagemeter_server, hard_plan(limit=10))
    answer = await should(pagemeter_server, ask(descriptor(hits=6), descriptor(hits=5)))
    assert answer.overall_code == Code.OVER_LIMIT
    assert await committed(pagemeter_server) == {"pages": 0}
    answer = await should(pagemeter_server, ask(descriptor(hits=6), descriptor(hits=4)))
    assert answer.overall_code == Code.OK
    assert [s.limit_remaining for s in answer.statuses] == [0, 0]
    assert await committed(pagemeter_server) == {"pages": 10}


async def test_over_limit_at_the_exact_unit(pagemeter_server: RunningServer) -> None:
    """With a hard limit of 10: 9 hits pass, the 10th passes, the 11th is OVER_LIMIT and not counted."""
    await set_plan(pagemeter_server, hard_plan(limit=10))
    first = await should(pagemeter_server, ask(descriptor(hits=9)))
    last = await should(pagemeter_server, ask(descriptor(hits=1)))
    over = await should(pagemeter_server, ask(descriptor(hits=1)))
    assert [a.overall_code for a in (first, last, over)] == [Code.OK, Code.OK, Code.OVER_LIMIT]
    assert [a.statuses[0].limit_remaining for a in (first, last, over)] == [1, 0, 0]
    assert await committed(pagemeter_server) == {"pages": 10}


async def test_a_denied_metric_denies_the_whole_call(pagemeter_server: RunningServer) -> None:
    """pages within its limit and documents over theirs: OVER_LIMIT overall, pages' status OK, nothing counted for either."""
    await set_plan(pagemeter_server, eagle_plan())
    answer = await should(
        pagemeter_server,
        ask(descriptor(metric="pages", hits=10), descriptor(metric="documents", hits=501)),
    )
    assert answer.overall_code == Code.OVER_LIMIT
    assert [s.code for s in answer.statuses] == [Code.OK, Code.OVER_LIMIT]
    assert headers(answer.response_headers_to_add)["x-pagemeter-reason"] == "quota_exceeded"
    assert await committed(pagemeter_server) == {"pages": 0, "documents": 0}


# -- the answer ---------------------------------------------------------------------------------


async def test_descriptor_status_and_headers_of_an_admitted_call(
    pagemeter_server: RunningServer,
) -> None:
    """An admitted call reports the hard limit per MONTH, the units left after it, the time to the period's end, the RateLimit-* headers and the job's id for the upstream."""
    await set_plan(pagemeter_server, hard_plan(limit=100))
    answer = await should(pagemeter_server, ask(descriptor(hits=30, request_id="req-1")))
    (status,) = answer.statuses
    assert status.code == Code.OK
    assert status.current_limit.requests_per_unit == 100
    assert status.current_limit.unit == Unit.MONTH
    assert status.current_limit.name == "pages/period"
    assert status.limit_remaining == 70
    assert status.duration_until_reset.ToSeconds() == TO_APRIL_S
    assert headers(answer.response_headers_to_add) == {
        "ratelimit-limit": "100",
        "ratelimit-remaining": "70",
        "ratelimit-reset": str(TO_APRIL_S),
    }
    assert headers(answer.request_headers_to_add) == {"x-pagemeter-request-id": "req-1"}


async def test_over_limit_says_why_and_when_to_retry(pagemeter_server: RunningServer) -> None:
    """A call over the hard limit is OVER_LIMIT with Retry-After at the period's end and x-pagemeter-reason, and no request headers."""
    await set_plan(pagemeter_server, hard_plan(limit=5))
    answer = await should(pagemeter_server, ask(descriptor(hits=6)))
    assert answer.overall_code == Code.OVER_LIMIT
    assert answer.statuses[0].code == Code.OVER_LIMIT
    assert answer.statuses[0].limit_remaining == 5
    added = headers(answer.response_headers_to_add)
    assert added["retry-after"] == str(TO_APRIL_S)
    assert added["x-pagemeter-reason"] == "hard_limit_exceeded"
    assert added["ratelimit-remaining"] == "5"
    assert list(answer.request_headers_to_add) == []


async def test_quota_with_overage_passes_the_quota_up_to_the_hard_limit(
    pagemeter_server: RunningServer,
) -> None:
    """Eagle's pages (quota 2000, overage, hard limit 2500): 2100 hits pass with 400 left of 2500; documents (quota 500, no overage) stop at 500."""
    await set_plan(pagemeter_server, eagle_plan())
    pages = await should(pagemeter_server, ask(descriptor(metric="pages", hits=2100)))
    assert pages.overall_code == Code.OK
    assert pages.statuses[0].current_limit.requests_per_unit == 2500
    assert pages.statuses[0].limit_remaining == 400
    documents = await should(pagemeter_server, ask(descriptor(metric="documents", hits=500)))
    assert documents.statuses[0].current_limit.requests_per_unit == 500
    assert documents.statuses[0].limit_remaining == 0
    over = await should(pagemeter_server, ask(descriptor(metric="documents")))
    assert over.overall_code == Code.OVER_LIMIT
    assert await committed(pagemeter_server) == {"pages": 2100, "documents": 500}


async def test_credits_extend_a_quota_without_overage(pagemeter_server: RunningServer) -> None:
    """documents (quota 500, no overage) with 20 credits granted admit 520 hits, reported as a limit of 520, and refuse the 521st."""
    await set_plan(pagemeter_server, eagle_plan())
    await pagemeter_server.admin.GrantCredits(
        admin_pb2.GrantCreditsRequest(org_id="acme", metric="documents", units=20, grant_id="g1")
    )
    answer = await should(pagemeter_server, ask(descriptor(metric="documents", hits=520)))
    assert answer.overall_code == Code.OK
    assert answer.statuses[0].current_limit.requests_per_unit == 520
    assert answer.statuses[0].limit_remaining == 0
    over = await should(pagemeter_server, ask(descriptor(metric="documents")))
    assert over.overall_code == Code.OVER_LIMIT
    assert (await committed(pagemeter_server))["documents"] == 520


async def test_api_rate_limit_is_over_limit_with_retry_after(
    pagemeter_server: RunningServer,
) -> None:
    """With api_rate_limit 1/s and a burst of 1, a second call in the same instant is OVER_LIMIT (rate_limited) with Retry-After 1 and is not counted."""
    await set_plan(pagemeter_server, hard_plan(limit=100, api_rate_limit=1, api_burst=1))
    first = await should(pagemeter_server, ask(descriptor()))
    second = await should(pagemeter_server, ask(descriptor()))
    assert first.overall_code == Code.OK
    assert second.overall_code == Code.OVER_LIMIT
    assert second.statuses[0].code == Code.OVER_LIMIT
    assert 0 < second.statuses[0].duration_until_reset.ToMilliseconds() <= 1000
    added = headers(second.response_headers_to_add)
    assert added == {"x-pagemeter-reason": "rate_limited", "retry-after": "1"}
    assert await committed(pagemeter_server) == {"pages": 1}


@pytest.mark.usefixtures("plans_migrated")
async def test_a_minute_window_reports_itself_and_its_reset(
    pagemeter_server: RunningServer,
) -> None:
    """A hard window of 3 per minute binds before a monthly limit of 100: its status is per MINUTE, and the 4th hit waits for the next minute."""
    plan = hard_plan(limit=100)
    plan.metrics[0].windows.append(plan_pb2.WindowLimit(window=plan_pb2.WINDOW_MINUTE, limit=3))
    await set_plan(pagemeter_server, plan)
    answer = await should(pagemeter_server, ask(descriptor(hits=3)))
    (status,) = answer.statuses
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (3, Unit.MINUTE)
    assert status.current_limit.name == "pages/minute"
    assert status.limit_remaining == 0
    assert status.duration_until_reset.ToSeconds() == 60  # START_MS is on a whole minute
    over = await should(pagemeter_server, ask(descriptor()))
    assert over.overall_code == Code.OVER_LIMIT
    added = headers(over.response_headers_to_add)
    assert added["x-pagemeter-reason"] == "window_limit_exceeded"
    assert added["retry-after"] == "60"


async def test_a_lifetime_gauge_never_resets(pagemeter_server: RunningServer) -> None:
    """A PERIOD_NONE metric reports no unit and no reset, and its denial carries no Retry-After (waiting does not help)."""
    plan = plan_pb2.Plan(
        org_id="acme",
        timezone="UTC",
        metrics=[metric_limits("apps", contract_quota=2, period=plan_pb2.PERIOD_NONE)],
    )
    await set_plan(pagemeter_server, plan)
    answer = await should(pagemeter_server, ask(descriptor(metric="apps", hits=2)))
    (status,) = answer.statuses
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (2, Unit.UNKNOWN)
    assert not status.HasField("duration_until_reset")
    over = await should(pagemeter_server, ask(descriptor(metric="apps")))
    assert over.overall_code == Code.OVER_LIMIT
    assert "retry-after" not in headers(over.response_headers_to_add)


async def test_unlimited_metric_has_no_current_limit(pagemeter_server: RunningServer) -> None:
    """A metric with overage and no hard limit is OK with no current_limit and no RateLimit headers."""
    plan = plan_pb2.Plan(
        org_id="acme",
        timezone="UTC",
        metrics=[metric_limits("pages", contract_quota=10, overage_allowed=True)],
    )
    await set_plan(pagemeter_server, plan)
    answer = await should(pagemeter_server, ask(descriptor(hits=50)))
    assert answer.overall_code == Code.OK
    assert not answer.statuses[0].HasField("current_limit")
    assert "ratelimit-limit" not in headers(answer.response_headers_to_add)
    assert await committed(pagemeter_server) == {"pages": 50}


async def test_no_plan_and_unknown_metric_are_over_limit(pagemeter_server: RunningServer) -> None:
    """An organization without a plan, or a metric outside its plan, is OVER_LIMIT with its reason and no Retry-After."""
    no_plan = await should(pagemeter_server, ask(descriptor("nobody")))
    assert no_plan.overall_code == Code.OVER_LIMIT
    assert headers(no_plan.response_headers_to_add) == {"x-pagemeter-reason": "no_plan"}
    await set_plan(pagemeter_server, eagle_plan())
    unknown = await should(pagemeter_server, ask(descriptor(metric="pagez")))
    assert unknown.overall_code == Code.OVER_LIMIT
    assert headers(unknown.response_headers_to_add) == {"x-pagemeter-reason": "unknown_metric"}


@pytest.mark.usefixtures("plans_migrated")
async def test_dynamic_metadata_carries_the_decision_and_shadow_verdicts(
    pagemeter_server: RunningServer,
) -> None:
    """The answer's dynamic_metadata names the org, request id and reason, and would_deny when a shadow hard limit of the plan would refuse an admitted call."""
    plan = hard_plan(limit=100)
    plan.metrics[0].shadow_hard_limit = 5
    await set_plan(pagemeter_server, plan)
    answer = await should(pagemeter_server, ask(descriptor(hits=6, request_id="meta-1")))
    assert answer.overall_code == Code.OK
    assert dict(answer.dynamic_metadata) == {
        "org_id": "acme",
        "request_id": "meta-1",
        "reason": "within_quota",
        "would_deny": True,
    }


async def test_the_access_log_names_org_request_and_code(
    pagemeter_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A ShouldRateLimit writes one access-log line with the org and request id of its descriptors and the overall code."""
    await set_plan(pagemeter_server, hard_plan(limit=1))
    with caplog.at_level(logging.INFO, logger="pagemeter.access"):
        await should(pagemeter_server, ask(descriptor(hits=2, request_id="log-1")))
    (entry,) = [r for r in caplog.records if r.name == "pagemeter.access"]
    fields = entry.fields  # type: ignore[attr-defined]
    assert (fields["rpc"], fields["code"]) == ("ShouldRateLimit", "OK")
    assert (fields["org_id"], fields["request_id"]) == ("acme", "log-1")
    assert fields["overall_code"] == "OVER_LIMIT"


# -- refused requests -------------------------------------------------------------------------


BAD_REQUESTS = [
    pytest.param(ask(), "descriptors", id="no-descriptors"),
    pytest.param(ask(descriptor(org_id=None)), "descriptors[0]", id="no-org"),
    pytest.param(ask(descriptor(metric=None)), "descriptors[0]", id="no-metric"),
    pytest.param(ask(descriptor("a b")), "descriptors[0].entries[org_id]", id="bad-org"),
    pytest.param(
        ask(descriptor(metric="Pages")), "descriptors[0].entries[metric]", id="bad-metric"
    ),
    pytest.param(
        ask(descriptor(request_id="x" * 129)), "descriptors[0].entries[request_id]", id="bad-id"
    ),
    pytest.param(
        ask(descriptor(extra=(("org", "acme"),))), "descriptors[0].entries[2]", id="unknown-key"
    ),
    pytest.param(
        ask(descriptor(extra=(("metric", "documents"),))),
        "descriptors[0].entries[2]",
        id="repeated-key",
    ),
    pytest.param(
        ask(descriptor(), descriptor("globex")), "descriptors[1].entries[org_id]", id="two-orgs"
    ),
    pytest.param(
        ask(descriptor(request_id="a"), descriptor(metric="documents", request_id="b")),
        "descriptors[1].entries[request_id]",
        id="two-ids",
    ),
    pytest.param(
        ask(
            ratelimit_pb2.RateLimitDescriptor(
                entries=descriptor().entries,
                limit=ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=5),
            )
        ),
        "descriptors[0].limit",
        id="limit-override",
    ),
    pytest.param(ask(descriptor(hits=10**9 + 1)), "hits_addend", id="too-many-hits"),
    pytest.param(ask(descriptor(hits=2**64 - 1)), "hits_addend", id="uint64-max-hits"),
    pytest.param(ask(*[descriptor()] * 33), "descriptors", id="too-many-descriptors"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_REQUESTS)
async def test_bad_descriptors_are_invalid_argument_and_change_nothing(
    pagemeter_server: RunningServer, redis_sync: redis.Redis, request_: Any, field: str
) -> None:
    """A request pagemeter cannot decide is INVALID_ARGUMENT with a BadRequest naming the descriptor, and changes nothing."""
    await set_plan(pagemeter_server, eagle_plan())
    before = snapshot(redis_sync)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await should(pagemeter_server, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)
    assert caught.value.details()
    assert snapshot(redis_sync) == before
    assert await committed(pagemeter_server) == {"pages": 0, "documents": 0}


# -- idempotency and crashes --------------------------------------------------------------------


async def test_a_retried_request_id_counts_once(pagemeter_server: RunningServer) -> None:
    """The same request with the same request_id twice is OK both times and counted once; other hits under that id are ALREADY_EXISTS."""
    await set_plan(pagemeter_server, hard_plan(limit=10))
    request = ask(descriptor(hits=4, request_id="x-req-1"))
    first = await should(pagemeter_server, request)
    again = await should(pagemeter_server, request)
    assert first.overall_code == again.overall_code == Code.OK
    assert headers(again.request_headers_to_add) == {"x-pagemeter-request-id": "x-req-1"}
    assert await committed(pagemeter_server) == {"pages": 4}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await should(pagemeter_server, ask(descriptor(hits=5, request_id="x-req-1")))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await committed(pagemeter_server) == {"pages": 4}


async def test_a_retry_after_a_crash_between_hold_and_record_commits_once(
    pagemeter_server: RunningServer,
) -> None:
    """A first attempt that held its hits and died before recording is finished by the retry: OK, counted once, hold gone."""
    await set_plan(pagemeter_server, hard_plan(limit=10))
    held = await pagemeter_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(
            org_id="acme",
            units={"pages": 3},
            request_id="crashed",
            hold=True,
            hold_ttl=Duration(seconds=10),
        )
    )
    assert held.held
    answer = await should(pagemeter_server, ask(descriptor(hits=3, request_id="crashed")))
    assert answer.overall_code == Code.OK
    usage = await pagemeter_server.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
    assert [(m.committed, m.held) for m in usage.metrics] == [(3, 0)]


async def test_a_crashed_hold_frees_its_hits_after_ten_seconds(
    pagemeter_server: RunningServer,
) -> None:
    """Hits held by a step that never recorded stop counting after the ten-second hold: the limit is whole again."""
    await set_plan(pagemeter_server, hard_plan(limit=5))
    await pagemeter_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(
            org_id="acme",
            units={"pages": 5},
            request_id="lost",
            hold=True,
            hold_ttl=Duration(seconds=10),
        )
    )
    assert (await should(pagemeter_server, ask(descriptor()))).overall_code == Code.OVER_LIMIT
    pagemeter_server.clock.advance(10.001)
    assert (await should(pagemeter_server, ask(descriptor()))).overall_code == Code.OK


async def test_an_edge_job_is_listed_and_kept_for_an_hour(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """An admitted call is a completed job in ListUsageRecords under its request_id (or a generated edge- id), and its record expires after an hour, not the 40-day retention."""
    await set_plan(pagemeter_server, hard_plan(limit=10))
    await should(pagemeter_server, ask(descriptor(hits=2, request_id="x-req-7")))
    await should(pagemeter_server, ask(descriptor()))
    listing = await pagemeter_server.reporting.ListUsageRecords(
        reporting_pb2.ListUsageRecordsRequest(org_id="acme")
    )
    ids = sorted(r.request_id for r in listing.records)
    assert ids[1] == "x-req-7" and ids[0].startswith("edge-")
    assert {r.status for r in listing.records} == {reporting_pb2.USAGE_RECORD_STATUS_COMPLETED}
    assert 0 < redis_sync.pttl("pm:{acme}:r:x-req-7") <= 3_600_000


# -- concurrency --------------------------------------------------------------------------------


async def test_fifty_concurrent_callers_against_twenty(pagemeter_server: RunningServer) -> None:
    """50 concurrent ShouldRateLimit calls of one hit against a hard limit of 20: exactly 20 are admitted and exactly 20 counted."""
    await set_plan(pagemeter_server, hard_plan(limit=20))
    answers = await asyncio.gather(
        *(should(pagemeter_server, ask(descriptor())) for _ in range(50))
    )
    admitted = [a for a in answers if a.overall_code == Code.OK]
    assert len(admitted) == 20
    assert await committed(pagemeter_server) == {"pages": 20}


@settings(
    max_examples=examples(30),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(limit=st.integers(1, 40), hits=st.lists(st.integers(1, 12), min_size=1, max_size=12))
async def test_concurrent_hits_never_pass_the_limit(
    pagemeter_server: RunningServer, limit: int, hits: list[int]
) -> None:
    """For any hard limit and any concurrent calls of random hits, the admitted hits never pass the limit and equal what is counted; a refused call did not fit."""
    org_id = f"prop-{uuid.uuid4().hex[:12]}"
    await set_plan(pagemeter_server, hard_plan(org_id, limit=limit))
    answers = await asyncio.gather(
        *(should(pagemeter_server, ask(descriptor(org_id, hits=n))) for n in hits)
    )
    admitted = sum(n for n, a in zip(hits, answers, strict=True) if a.overall_code == Code.OK)
    assert admitted <= limit
    assert await committed(pagemeter_server, org_id) == {"pages": admitted}
    # A refused call saw at most the admitted calls' hits (held or committed).
    for n, answer in zip(hits, answers, strict=True):
        if answer.overall_code != Code.OK:
            assert admitted + n > limit


# -- the store, access, and the server's other parts -----------------------------------------------


async def test_unreachable_store_is_unavailable() -> None:
    """With Redis unreachable ShouldRateLimit answers UNAVAILABLE (so Envoy's failure_mode_deny applies), never UNKNOWN."""
    dead = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_timeout_seconds=0.5,
        dev_open_access=True,
    )
    client = connect_redis(dead.redis_url, dead)
    server, port, _ = await create_server(
        dead, client, registry=CollectorRegistry(), listen="127.0.0.1:0"
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ShouldRateLimit(ask(descriptor()), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
        await client.aclose()


@pytest.fixture
async def secured(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[RunningServer]:
    """A server with admin and service tokens and no open access."""
    creds = Credentials()
    creds.add(Role.ADMIN, "ops", ADMIN_TOKEN)
    creds.add(Role.SERVICE, "gateway", SERVICE_TOKEN)
    closed = Settings(redis_url=settings.redis_url, listen="127.0.0.1:0", metrics_listen="")
    async with serving(closed, redis_client, clock, credentials=creds) as server:
        admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        await server.admin.SetPlan(
            admin_pb2.SetPlanRequest(plan=hard_plan(limit=10)), metadata=admin
        )
        yield server


async def test_calls_without_credentials_or_with_a_tenant_key_are_refused(
    secured: RunningServer,
) -> None:
    """Without credentials ShouldRateLimit is UNAUTHENTICATED; with a tenant API key PERMISSION_DENIED; neither counts."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await should(secured, ask(descriptor()))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    key = await secured.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(org_id="acme"),
        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await should(secured, ask(descriptor()), metadata=(("x-api-key", key.secret),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    usage = await secured.quota.GetUsage(
        quota_pb2.GetUsageRequest(org_id="acme"),
        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
    )
    assert [m.committed for m in usage.metrics] == [0]


async def test_a_service_token_in_initial_metadata_is_served(secured: RunningServer) -> None:
    """A service token, as Envoy's grpc_service.initial_metadata sends it, is served and its hits counted."""
    answer = await should(
        secured, ask(descriptor(hits=2)), metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),)
    )
    assert answer.overall_code == Code.OK
    assert answer.statuses[0].limit_remaining == 8


async def test_health_reflection_and_metrics_know_the_service(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """grpc.health.v1 reports the service SERVING, reflection lists it, and the gRPC and decision metrics count its calls."""
    await set_plan(pagemeter_server, hard_plan(limit=10))
    await should(pagemeter_server, ask(descriptor(hits=2)))
    health = await health_pb2_grpc.HealthStub(pagemeter_server.channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE)
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(pagemeter_server.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = [s.name async for r in replies for s in r.list_services_response.service]
    assert SERVICE in services
    labels = {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "ShouldRateLimit"}
    handled = registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"})
    assert handled == 1
    committed_units = registry.get_sample_value(
        "pagemeter_units_total", {"metric": "pages", "kind": "committed"}
    )
    assert committed_units == 2
