"""QuotaService and AdminService over a real gRPC channel and a real Redis server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import cast

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, plan_pb2, quota_pb2
from pagemeter_server.app import create_server
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.conftest import START_MS, RunningServer, eagle_plan, metric_limits

Q = quota_pb2


def details(error: grpc.aio.AioRpcError) -> list[object]:
    """The google.rpc details carried by an error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    found: list[object] = []
    for item in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo):
            if item.Is(kind.DESCRIPTOR):
                message = kind()
                item.Unpack(message)
                found.append(message)
    return found


def snapshot(client: redis.Redis) -> dict[str, object]:
    """Every key and value in Redis (TTL-free), to prove a refused call changed nothing."""
    dump: dict[str, object] = {}
    # decode_responses=True: the keys are str
    for key in cast(list[str], client.keys("*")):
        kind = client.type(key)
        if kind == "hash":
            dump[key] = client.hgetall(key)
        elif kind == "zset":
            dump[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            dump[key] = client.xrange(key)
        else:
            dump[key] = client.get(key)
    return dump


async def setup_eagle(server: RunningServer, **overrides: object) -> None:
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan("acme", **overrides)))


# -- the worked example of the issue --------------------------------------------------


async def test_eagle_doc_figures_after_overage(pagemeter_server: RunningServer) -> None:
    """quotaUsed, overUsage = quotaUsed - contractQuota and overUsageCost = overUsage x price hold."""
    await setup_eagle(pagemeter_server)
    check = await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 2100}, request_id="job-1", hold=True)
    )
    assert check.allowed and check.held
    assert check.reason == Q.DECISION_REASON_OVERAGE
    pages = check.metrics[0]
    assert (pages.included_units, pages.overage_units, pages.overage_cost) == (2000, 100, "2.8")
    assert pages.period_id == "2026-03" and pages.period_end.seconds > 0
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="job-1", units={"pages": 2100})
    )
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    figures = {m.metric: m for m in usage.metrics}["pages"]
    assert usage.period_id == "2026-03"
    assert figures.committed == 2100  # quotaUsed
    assert figures.contract_quota == 2000  # contractQuota
    assert figures.overage_allowed and figures.hard_limit == 2500
    assert figures.overage_units == figures.committed - figures.contract_quota == 100
    assert Decimal(figures.overage_cost) == 100 * Decimal(figures.overage_price_per_unit)
    assert figures.overage_cost == "2.8"
    assert figures.remaining == 400
    assert usage.jobs.succeeded == 1 and usage.subscription.plan_name == "Business"


async def test_without_overage_quota_used_never_passes_the_quota(
    pagemeter_server: RunningServer,
) -> None:
    """A worker that checks before each job never takes quotaUsed past contractQuota."""
    await setup_eagle(pagemeter_server)
    admitted = 0
    for i in range(30):
        check = await pagemeter_server.quota.CheckQuota(
            Q.CheckQuotaRequest(
                org_id="acme", units={"documents": 20}, request_id=f"d{i}", hold=True
            )
        )
        if check.allowed:
            admitted += 1
            await pagemeter_server.quota.RecordUsage(
                Q.RecordUsageRequest(org_id="acme", request_id=f"d{i}", units={"documents": 20})
            )
        else:
            assert check.reason == Q.DECISION_REASON_QUOTA_EXCEEDED
            assert check.metrics[0].max_admissible == 0
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    documents = {m.metric: m for m in usage.metrics}["documents"]
    assert admitted == 25
    assert documents.committed == documents.contract_quota == 500
    assert documents.overage_units == 0 and documents.usage_percent == 100.0


async def test_release_and_duplicate_record_over_grpc(pagemeter_server: RunningServer) -> None:
    """ReleaseQuota frees a hold; a repeated RecordUsage is answered as a duplicate."""
    await setup_eagle(pagemeter_server)
    quota = pagemeter_server.quota
    await quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 10}, request_id="r1", hold=True)
    )
    released = await quota.ReleaseQuota(Q.ReleaseQuotaRequest(org_id="acme", request_id="r1"))
    assert released.outcome == Q.RELEASE_OUTCOME_RELEASED
    assert dict(released.released_units) == {"pages": 10}
    request = Q.RecordUsageRequest(org_id="acme", request_id="r2", units={"pages": 3})
    first = await quota.RecordUsage(request)
    second = await quota.RecordUsage(request)
    assert not first.duplicate and second.duplicate
    assert second.metrics == first.metrics
    failed = await quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="r3", units={"pages": 9}, success=False)
    )
    assert failed.status == Q.RECORD_STATUS_FAILED
    usage = await quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    assert {m.metric: m.committed for m in usage.metrics}["pages"] == 3
    assert (usage.jobs.succeeded, usage.jobs.failed, usage.jobs.total) == (1, 1, 2)


async def test_hold_ttl_and_expiry_over_grpc(pagemeter_server: RunningServer) -> None:
    """A hold with a 30 s TTL stops counting 30 s later on the server's clock."""
    await setup_eagle(pagemeter_server)
    check = await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(
            org_id="acme",
            units={"pages": 2500},
            request_id="h1",
            hold=True,
            hold_ttl=Duration(seconds=30),
        )
    )
    assert check.hold_expires_at.ToMilliseconds() == START_MS + 30_000
    blocked = await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 1})
    )
    assert blocked.reason == Q.DECISION_REASON_HARD_LIMIT_EXCEEDED
    pagemeter_server.clock.advance(30)
    free = await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 1})
    )
    assert free.allowed and free.metrics[0].held == 0


async def test_rate_limited_answer_carries_retry_after(pagemeter_server: RunningServer) -> None:
    """Past the plan's api_rate_limit CheckQuota answers RATE_LIMITED in-band with retry_after."""
    await setup_eagle(pagemeter_server, api_rate_limit=1)
    request = Q.CheckQuotaRequest(org_id="acme", units={"pages": 1})
    assert (await pagemeter_server.quota.CheckQuota(request)).allowed
    limited = await pagemeter_server.quota.CheckQuota(request)
    assert not limited.allowed and limited.reason == Q.DECISION_REASON_RATE_LIMITED
    assert limited.retry_after.ToMilliseconds() == 1000


async def test_reading_usage_is_never_limited_and_never_counted(
    pagemeter_server: RunningServer, redis_sync: redis.Redis
) -> None:
    """GetUsage is not rate-limited and leaves every counter as it was."""
    await setup_eagle(pagemeter_server, api_rate_limit=1)
    before = snapshot(redis_sync)
    for _ in range(20):
        usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
        assert usage.has_plan
    assert snapshot(redis_sync) == before


async def test_usage_of_an_unknown_org_is_zeros(pagemeter_server: RunningServer) -> None:
    """An organization with nothing recorded reads as zeros in the current month."""
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="nobody"))
    assert not usage.has_plan
    assert (usage.year, usage.month, usage.timezone) == (2026, 3, "UTC")
    assert list(usage.metrics) == []
    assert usage.jobs.total == 0


async def test_usage_of_a_given_month(pagemeter_server: RunningServer) -> None:
    """GetUsage with year and month reads that month, and held units only count in the current one."""
    await setup_eagle(pagemeter_server)
    await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 5}, request_id="h", hold=True)
    )
    past = await pagemeter_server.quota.GetUsage(
        Q.GetUsageRequest(org_id="acme", year=2026, month=2)
    )
    assert past.period_id == "2026-02"
    # February ended before the plan was set: no terms, and no held units.
    assert not past.has_plan
    assert all(m.held == 0 for m in past.metrics)
    now = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    assert {m.metric: m.held for m in now.metrics}["pages"] == 5


async def test_plan_round_trip(pagemeter_server: RunningServer) -> None:
    """SetPlan stores the plan with a new version; GetPlan reads it back; unknown org is NOT_FOUND with ErrorInfo PLAN_NOT_FOUND."""
    first = await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=eagle_plan(timezone=""))
    )
    assert first.plan.version == 1 and first.plan.timezone == "UTC"
    second = await pagemeter_server.admin.SetPlan(
        admin_pb2.SetPlanRequest(plan=eagle_plan(api_rate_limit=5, support_level="email"))
    )
    assert second.plan.version == 2
    read = await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))
    assert read.plan == second.plan
    pages = {m.metric: m for m in read.plan.metrics}["pages"]
    assert (pages.contract_quota, pages.hard_limit, pages.overage_price_per_unit) == (
        2000,
        2500,
        "0.028",
    )
    assert not read.plan.metrics[0].HasField("hard_limit")  # documents: no hard limit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = next(d for d in details(caught.value) if isinstance(d, error_details_pb2.ErrorInfo))
    assert (info.reason, info.metadata["org_id"]) == ("PLAN_NOT_FOUND", "nobody")


async def test_grant_credits_over_grpc(pagemeter_server: RunningServer) -> None:
    """GrantCredits adds to the prepaid balance once per grant_id; without a plan it is refused."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.admin.GrantCredits(
            admin_pb2.GrantCreditsRequest(org_id="acme", metric="pages", units=5, grant_id="g1")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await setup_eagle(pagemeter_server)
    grant = admin_pb2.GrantCreditsRequest(org_id="acme", metric="pages", units=50, grant_id="g1")
    assert (await pagemeter_server.admin.GrantCredits(grant)).balance == 50
    again = await pagemeter_server.admin.GrantCredits(grant)
    assert again.duplicate and again.balance == 50
    usage = await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme"))
    assert {m.metric: m.prepaid_balance for m in usage.metrics}["pages"] == 50


# -- errors -------------------------------------------------------------------------

BAD_REQUESTS = [
    ("CheckQuota", Q.CheckQuotaRequest(org_id="", units={"pages": 1}), "org_id"),
    ("CheckQuota", Q.CheckQuotaRequest(org_id="acme", units={}), "units"),
    ("CheckQuota", Q.CheckQuotaRequest(org_id="acme", units={"pages": -1}), "units[pages]"),
    ("CheckQuota", Q.CheckQuotaRequest(org_id="acme", units={"pages": 10**9 + 1}), "units[pages]"),
    ("CheckQuota", Q.CheckQuotaRequest(org_id="acme", units={"Pages": 1}), "units[Pages]"),
    ("CheckQuota", Q.CheckQuotaRequest(org_id="acme", units={"pages": 1}, hold=True), "request_id"),
    (
        "CheckQuota",
        Q.CheckQuotaRequest(
            org_id="acme",
            units={"pages": 1},
            hold=True,
            request_id="x",
            hold_ttl=Duration(seconds=10**6),
        ),
        "hold_ttl",
    ),
    ("CheckQuota", Q.CheckQuotaRequest(org_id="a{b}", units={"pages": 1}), "org_id"),
    ("RecordUsage", Q.RecordUsageRequest(org_id="acme", units={"pages": 1}), "request_id"),
    (
        "RecordUsage",
        Q.RecordUsageRequest(org_id="acme", request_id="a b", units={"pages": 1}),
        "request_id",
    ),
    (
        "RecordUsage",
        Q.RecordUsageRequest(
            org_id="acme", request_id="r", units={"pages": 1}, document_type="in voice"
        ),
        "document_type",
    ),
    (
        "RecordUsage",
        Q.RecordUsageRequest(
            org_id="acme",
            request_id="r",
            units={"pages": 1},
            completed_at=Timestamp(seconds=START_MS // 1000 + 3600),
        ),
        "completed_at",
    ),
    (
        "RecordUsage",
        Q.RecordUsageRequest(
            org_id="acme",
            request_id="r",
            units={"pages": 1},
            completed_at=Timestamp(seconds=START_MS // 1000 - 40 * 86400),
        ),
        "completed_at",
    ),
    (
        "RecordUsage",
        Q.RecordUsageRequest(org_id="acme", request_id="r", units={"pages": -1}),
        "units[pages]",
    ),
    ("ReleaseQuota", Q.ReleaseQuotaRequest(org_id="acme", request_id=""), "request_id"),
    ("GetUsage", Q.GetUsageRequest(org_id="acme", year=2026), "year"),
    ("GetUsage", Q.GetUsageRequest(org_id="acme", year=2019, month=5), "year"),
    ("GetUsage", Q.GetUsageRequest(org_id="acme", year=2026, month=13), "month"),
]


@pytest.mark.parametrize(("rpc", "request_message", "field"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    pagemeter_server: RunningServer,
    redis_sync: redis.Redis,
    rpc: str,
    request_message: object,
    field: str,
) -> None:
    """Malformed requests get INVALID_ARGUMENT naming the field, and no key in Redis changes."""
    await setup_eagle(pagemeter_server)
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="seed", units={"pages": 4})
    )
    before = snapshot(redis_sync)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(pagemeter_server.quota, rpc)(request_message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details()
    bad_request = [d for d in details(caught.value) if isinstance(d, error_details_pb2.BadRequest)]
    assert [v.field for v in bad_request[0].field_violations] == [field]
    assert snapshot(redis_sync) == before


async def test_docutray_month_wording(pagemeter_server: RunningServer) -> None:
    """An out-of-range month is refused with DocuTray's exact message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.quota.GetUsage(Q.GetUsageRequest(org_id="acme", year=2026, month=0))
    assert caught.value.details() == "Invalid month. Must be an integer between 1 and 12."


async def test_bad_plans_are_refused_with_every_problem_named(
    pagemeter_server: RunningServer,
) -> None:
    """SetPlan names each bad field at once and stores nothing."""
    plan = plan_pb2.Plan(
        org_id="acme",
        timezone="Mars/Olympus",
        metrics=[
            metric_limits("pages", overage_price_per_unit="0,028"),
            metric_limits("pages"),
            metric_limits("documents", contract_quota=-1),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in details(caught.value)[0].field_violations]  # type: ignore[attr-defined]
    assert fields == [
        "plan.timezone",
        "plan.metrics[0].overage_price_per_unit",
        "plan.metrics[1].metric",
        "plan.metrics[2].contract_quota",
    ]
    with pytest.raises(grpc.aio.AioRpcError):
        await pagemeter_server.admin.GetPlan(admin_pb2.GetPlanRequest(org_id="acme"))


async def test_reused_request_id_is_already_exists(pagemeter_server: RunningServer) -> None:
    """A request_id reused with another payload is ALREADY_EXISTS with ErrorInfo REQUEST_ID_REUSED."""
    await setup_eagle(pagemeter_server)
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="r1", units={"pages": 4})
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pagemeter_server.quota.RecordUsage(
            Q.RecordUsageRequest(org_id="acme", request_id="r1", units={"pages": 5})
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = next(d for d in details(caught.value) if isinstance(d, error_details_pb2.ErrorInfo))
    assert (info.reason, info.domain, info.metadata["status"]) == (
        "REQUEST_ID_REUSED",
        "pagemeter",
        "completed",
    )


async def test_unreachable_store_is_unavailable_not_unknown(settings: Settings) -> None:
    """When Redis cannot be reached every RPC answers UNAVAILABLE, never UNKNOWN."""
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
            from pagemeter.v1 import quota_pb2_grpc

            stub = quota_pb2_grpc.QuotaServiceStub(channel)
            calls: list[tuple[Callable[..., Awaitable[object]], Message]] = [
                (stub.CheckQuota, Q.CheckQuotaRequest(org_id="acme", units={"pages": 1})),
                (
                    stub.RecordUsage,
                    Q.RecordUsageRequest(org_id="acme", request_id="r", units={"pages": 1}),
                ),
                (stub.GetUsage, Q.GetUsageRequest(org_id="acme")),
            ]
            for call, message in calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(message, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                info = [
                    d for d in details(caught.value) if isinstance(d, error_details_pb2.ErrorInfo)
                ]
                assert info[0].reason == "STORE_UNAVAILABLE"
    finally:
        await server.stop(None)
        await client.aclose()


async def test_metrics_count_decisions_and_records(
    pagemeter_server: RunningServer, registry: CollectorRegistry
) -> None:
    """Decisions, units and records are counted on the registry the server was given."""
    await setup_eagle(pagemeter_server)
    await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"pages": 7}, request_id="m1", hold=True)
    )
    await pagemeter_server.quota.CheckQuota(
        Q.CheckQuotaRequest(org_id="acme", units={"documents": 501})
    )
    await pagemeter_server.quota.RecordUsage(
        Q.RecordUsageRequest(org_id="acme", request_id="m1", units={"pages": 6})
    )

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert (
        value(
            "pagemeter_check_decisions_total",
            metric="pages",
            decision="allowed",
            reason="within_quota",
        )
        == 1
    )
    assert (
        value(
            "pagemeter_check_decisions_total",
            metric="documents",
            decision="denied",
            reason="quota_exceeded",
        )
        == 1
    )
    assert value("pagemeter_units_total", metric="pages", kind="held") == 7
    assert value("pagemeter_units_total", metric="pages", kind="committed") == 6
    assert value("pagemeter_records_total", status="completed", duplicate="false") == 1
    assert value("pagemeter_redis_script_seconds_count", script="check") == 2
    assert value("pagemeter_build_info", version="0.1.0") == 1
