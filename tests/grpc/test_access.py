"""Access control over real gRPC: roles, tenant keys, read flood limit, audit trail.

The server here has real admin and service credentials and no open access; every
RPC of every service is tried with every kind of caller.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
)
from pagemeter_server.api.auth import Credentials, Role, load_credentials
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.domain.errors import ConfigurationError
from pagemeter_server.settings import Settings
from tests.conftest import START_MS, eagle_plan, serving

ADMIN_TOKEN = "admin-token-0123456789abcdef"
SERVICE_TOKEN = "service-token-0123456789abcdef"


@dataclass
class Secured:
    channel: grpc.aio.Channel
    quota: Any
    admin: Any
    reporting: Any
    clock: ManualClock
    events: Any
    ratelimit: Any

    async def call(self, stub: Any, rpc: str, request: Message, token: str | None) -> Any:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return await getattr(stub, rpc)(request, metadata=metadata)


def credentials() -> Credentials:
    creds = Credentials()
    creds.add(Role.ADMIN, "ops", ADMIN_TOKEN)
    creds.add(Role.SERVICE, "workers", SERVICE_TOKEN)
    return creds


@pytest.fixture
async def secured(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[Secured]:
    """A server with admin and service tokens configured and no open access."""
    closed = Settings(
        redis_url=settings.redis_url,
        listen="127.0.0.1:0",
        metrics_listen="",
        read_rate_limit=1000,
        read_burst=1000,
    )
    server, port, _ = await create_server(
        closed, redis_client, clock=clock, registry=CollectorRegistry(), credentials=credentials()
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Secured(
        channel,
        quota_pb2_grpc.QuotaServiceStub(channel),
        admin_pb2_grpc.AdminServiceStub(channel),
        reporting_pb2_grpc.ReportingServiceStub(channel),
        clock,
        events_pb2_grpc.EventServiceStub(channel),
        rls_pb2_grpc.RateLimitServiceStub(channel),
    )
    await channel.close(None)
    await server.stop(None)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {error}")


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# Every RPC, with a request that is valid for an organization named "acme".
WRITE_RPCS = [
    ("events", "ListEventOrganizations", events_pb2.ListEventOrganizationsRequest()),
    ("quota", "CheckQuota", quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})),
    (
        "quota",
        "RecordUsage",
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="r1", units={"pages": 1}),
    ),
    ("quota", "ReleaseQuota", quota_pb2.ReleaseQuotaRequest(org_id="acme", request_id="r1")),
    (
        "quota",
        "CheckQuotaBatch",
        quota_pb2.CheckQuotaBatchRequest(
            items=[quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})]
        ),
    ),
    (
        "quota",
        "RecordUsageBatch",
        quota_pb2.RecordUsageBatchRequest(
            items=[quota_pb2.RecordUsageRequest(org_id="acme", request_id="b1", units={"pages": 1})]
        ),
    ),
    (
        "ratelimit",
        "ShouldRateLimit",
        rls_pb2.RateLimitRequest(
            domain="edge",
            descriptors=[
                ratelimit_pb2.RateLimitDescriptor(
                    entries=[
                        ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value="acme"),
                        ratelimit_pb2.RateLimitDescriptor.Entry(key="metric", value="pages"),
                    ]
                )
            ],
        ),
    ),
]
READ_RPCS = [
    ("events", "ListEvents", events_pb2.ListEventsRequest(org_id="acme")),
    ("quota", "GetUsage", quota_pb2.GetUsageRequest(org_id="acme")),
    ("reporting", "GetUsageHistory", reporting_pb2.GetUsageHistoryRequest(org_id="acme")),
    ("reporting", "GetUsageStatistics", reporting_pb2.GetUsageStatisticsRequest(org_id="acme")),
    ("reporting", "ListUsageRecords", reporting_pb2.ListUsageRecordsRequest(org_id="acme")),
]
ADMIN_RPCS = [
    ("admin", "SetPlan", admin_pb2.SetPlanRequest(plan=eagle_plan())),
    ("admin", "GetPlan", admin_pb2.GetPlanRequest(org_id="acme")),
    (
        "admin",
        "GrantCredits",
        admin_pb2.GrantCreditsRequest(org_id="acme", metric="pages", units=5, grant_id="g1"),
    ),
    ("admin", "CreateApiKey", admin_pb2.CreateApiKeyRequest(org_id="acme", name="k")),
    ("admin", "ListApiKeys", admin_pb2.ListApiKeysRequest(org_id="acme")),
    ("admin", "RevokeApiKey", admin_pb2.RevokeApiKeyRequest(org_id="acme", key_id="abc")),
    (
        "admin",
        "AdjustUsage",
        admin_pb2.AdjustUsageRequest(
            org_id="acme", metric="pages", units=1, reason="test", adjustment_id="a1"
        ),
    ),
    ("admin", "ListAuditEvents", admin_pb2.ListAuditEventsRequest(org_id="acme")),
    ("admin", "ListPlans", admin_pb2.ListPlansRequest()),
]
ALL_RPCS = WRITE_RPCS + READ_RPCS + ADMIN_RPCS


def ids(rpcs: list[tuple[str, str, Message]]) -> list[str]:
    return [rpc for _, rpc, _ in rpcs]


def without_org(request: Message) -> Message:
    copy = type(request)()
    copy.CopyFrom(request)
    if "org_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("org_id")
    return copy


async def new_key(secured: Secured, org_id: str = "acme") -> admin_pb2.CreateApiKeyResponse:
    reply: admin_pb2.CreateApiKeyResponse = await secured.call(
        secured.admin,
        "CreateApiKey",
        admin_pb2.CreateApiKeyRequest(org_id=org_id, name="billing page"),
        ADMIN_TOKEN,
    )
    return reply


# -- authentication -------------------------------------------------------------------


@pytest.mark.parametrize(("service", "rpc", "request_"), ALL_RPCS, ids=ids(ALL_RPCS))
async def test_every_rpc_refuses_calls_without_credentials(
    secured: Secured, redis_sync: redis.Redis, service: str, rpc: str, request_: Message
) -> None:
    """Without credentials every RPC is UNAUTHENTICATED (ErrorInfo UNAUTHORIZED) and writes nothing."""
    error = await refused(secured.call(getattr(secured, service), rpc, request_, None))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(error) == "UNAUTHORIZED"
    assert redis_sync.keys("*") == []


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Bearer not-a-known-token-at-all"),),
        (("x-api-key", "not-a-known-token-at-all"),),
        (("authorization", "Bearer pmk_YWNtZQ.0123456789abcdef.forged"),),
        (("authorization", "Bearer pmk_garbage"),),
    ],
    ids=["bearer", "x-api-key", "forged-tenant-key", "malformed-tenant-key"],
)
async def test_unknown_credentials_are_refused(
    secured: Secured, metadata: tuple[tuple[str, str], ...]
) -> None:
    """An unknown token or a forged API key is UNAUTHENTICATED with ErrorInfo INVALID_API_KEY."""
    error = await refused(
        secured.quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"), metadata=metadata)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(error) == "INVALID_API_KEY"


async def test_malformed_authorization_header_is_refused(secured: Secured) -> None:
    """An authorization header that is not 'Bearer <token>' is UNAUTHENTICATED and says what is expected."""
    error = await refused(
        secured.quota.GetUsage(
            quota_pb2.GetUsageRequest(org_id="acme"),
            metadata=(("authorization", f"Basic {ADMIN_TOKEN}"),),
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (error.details() or "")


async def test_x_api_key_header_is_accepted(secured: Secured) -> None:
    """A credential in x-api-key works like one in authorization: Bearer."""
    usage = await secured.quota.GetUsage(
        quota_pb2.GetUsageRequest(org_id="acme"), metadata=(("x-api-key", SERVICE_TOKEN),)
    )
    assert usage.org_id == "acme"


async def test_health_and_reflection_need_no_credentials(secured: Secured) -> None:
    """Load balancers and grpcurl can check health and list services without credentials."""
    reply = await health_pb2_grpc.HealthStub(secured.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(secured.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = [s.name async for r in responses for s in r.list_services_response.service]
    assert "pagemeter.v1.AdminService" in services


# -- roles ------------------------------------------------------------------------------


@pytest.mark.parametrize(("service", "rpc", "request_"), ADMIN_RPCS, ids=ids(ADMIN_RPCS))
async def test_service_credentials_cannot_call_admin_rpcs(
    secured: Secured, redis_sync: redis.Redis, service: str, rpc: str, request_: Message
) -> None:
    """A service token calling any AdminService RPC is PERMISSION_DENIED and changes nothing."""
    error = await refused(secured.call(secured.admin, rpc, request_, SERVICE_TOKEN))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert redis_sync.keys("*") == []


@pytest.mark.parametrize(
    ("service", "rpc", "request_"), WRITE_RPCS + READ_RPCS, ids=ids(WRITE_RPCS + READ_RPCS)
)
async def test_service_credentials_call_quota_and_read_rpcs(
    secured: Secured, service: str, rpc: str, request_: Message
) -> None:
    """A service token may call CheckQuota, RecordUsage, ReleaseQuota and every read, for any org."""
    await secured.call(
        secured.admin, "SetPlan", admin_pb2.SetPlanRequest(plan=eagle_plan()), ADMIN_TOKEN
    )
    await secured.call(getattr(secured, service), rpc, request_, SERVICE_TOKEN)


@pytest.mark.parametrize(("service", "rpc", "request_"), ALL_RPCS, ids=ids(ALL_RPCS))
async def test_admin_credentials_call_everything(
    secured: Secured, service: str, rpc: str, request_: Message
) -> None:
    """An admin token may call every RPC (answers other than auth errors are the RPC's own)."""
    code = grpc.StatusCode.OK
    try:
        await secured.call(getattr(secured, service), rpc, request_, ADMIN_TOKEN)
    except grpc.aio.AioRpcError as error:
        code = error.code()
    assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


# -- tenant API keys --------------------------------------------------------------------------


@pytest.mark.parametrize(("service", "rpc", "request_"), READ_RPCS, ids=ids(READ_RPCS))
async def test_tenant_key_reads_its_own_org_only(
    secured: Secured, service: str, rpc: str, request_: Message
) -> None:
    """A tenant key reads its own organization with org_id left empty, and any org_id in the request (another org's or even its own) is refused."""
    key = await new_key(secured, "acme")
    stub = getattr(secured, service)
    own = await secured.call(stub, rpc, without_org(request_), key.secret)
    if hasattr(own, "org_id"):
        assert own.org_id == "acme"
    for org_id in ("globex", "acme"):
        other = type(request_)()
        other.CopyFrom(request_)
        other.org_id = org_id  # type: ignore[attr-defined]
        error = await refused(secured.call(stub, rpc, other, key.secret))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(error) == "ORG_FROM_API_KEY"


async def test_tenant_key_sees_its_own_figures(secured: Secured) -> None:
    """Usage recorded for two orgs: each org's key reads only its own committed pages."""
    for org_id, pages in (("acme", 3), ("globex", 7)):
        await secured.call(
            secured.admin,
            "SetPlan",
            admin_pb2.SetPlanRequest(plan=eagle_plan(org_id=org_id)),
            ADMIN_TOKEN,
        )
        await secured.call(
            secured.quota,
            "RecordUsage",
            quota_pb2.RecordUsageRequest(org_id=org_id, request_id="j", units={"pages": pages}),
            SERVICE_TOKEN,
        )
    for org_id, pages in (("acme", 3), ("globex", 7)):
        key = await new_key(secured, org_id)
        usage = await secured.call(
            secured.quota, "GetUsage", quota_pb2.GetUsageRequest(), key.secret
        )
        assert usage.org_id == org_id
        assert {m.metric: m.committed for m in usage.metrics}["pages"] == pages


@pytest.mark.parametrize(
    ("service", "rpc", "request_"), WRITE_RPCS + ADMIN_RPCS, ids=ids(WRITE_RPCS + ADMIN_RPCS)
)
async def test_tenant_key_cannot_write_or_administer(
    secured: Secured, service: str, rpc: str, request_: Message
) -> None:
    """A tenant key calling a quota or admin RPC is PERMISSION_DENIED."""
    key = await new_key(secured)
    error = await refused(
        secured.call(getattr(secured, service), rpc, without_org(request_), key.secret)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_revoked_key_fails_on_the_next_call(secured: Secured) -> None:
    """After RevokeApiKey the very next call with the key is UNAUTHENTICATED; revoking again says so."""
    key = await new_key(secured)
    await secured.call(secured.quota, "GetUsage", quota_pb2.GetUsageRequest(), key.secret)
    revoke = admin_pb2.RevokeApiKeyRequest(org_id="acme", key_id=key.key.key_id)
    first = await secured.call(secured.admin, "RevokeApiKey", revoke, ADMIN_TOKEN)
    assert first.key.revoked and not first.already_revoked
    error = await refused(
        secured.call(secured.quota, "GetUsage", quota_pb2.GetUsageRequest(), key.secret)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    again = await secured.call(secured.admin, "RevokeApiKey", revoke, ADMIN_TOKEN)
    assert again.already_revoked


async def test_revoking_an_unknown_key_is_not_found(secured: Secured) -> None:
    """RevokeApiKey of a key id the org does not have is NOT_FOUND."""
    error = await refused(
        secured.call(
            secured.admin,
            "RevokeApiKey",
            admin_pb2.RevokeApiKeyRequest(org_id="acme", key_id="feedfacefeedface"),
            ADMIN_TOKEN,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_keys_are_stored_only_as_digests(secured: Secured, redis_sync: redis.Redis) -> None:
    """Neither the key nor its random part appears anywhere in Redis; the listing never shows it."""
    key = await new_key(secured)
    random_part = key.secret.rsplit(".", 1)[1]
    everything = []
    for name in redis_sync.keys("*"):
        kind = redis_sync.type(name)
        if kind == "hash":
            everything.append(json.dumps(redis_sync.hgetall(name)))
        elif kind == "stream":
            everything.append(json.dumps(redis_sync.xrange(name)))
        elif kind == "zset":
            everything.append(json.dumps(redis_sync.zrange(name, 0, -1)))
        else:
            everything.append(str(redis_sync.get(name)))
    dump = "\n".join(everything)
    assert random_part not in dump and key.secret not in dump
    listing = await secured.call(
        secured.admin, "ListApiKeys", admin_pb2.ListApiKeysRequest(org_id="acme"), ADMIN_TOKEN
    )
    assert [k.key_id for k in listing.keys] == [key.key.key_id]
    assert random_part.encode() not in listing.SerializeToString()


async def test_last_used_is_recorded(secured: Secured) -> None:
    """A key's last use is recorded (at most once a minute) and shown in the listing."""
    key = await new_key(secured)
    secured.clock.advance(120)
    await secured.call(secured.quota, "GetUsage", quota_pb2.GetUsageRequest(), key.secret)
    listing = await secured.call(
        secured.admin, "ListApiKeys", admin_pb2.ListApiKeysRequest(org_id="acme"), ADMIN_TOKEN
    )
    (listed,) = listing.keys
    assert listed.last_used_at.ToMilliseconds() == secured.clock.now_ms()
    assert listed.created_at.ToMilliseconds() == secured.clock.now_ms() - 120_000


async def test_read_flood_of_one_key_is_limited(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> None:
    """With 1 read/s and a burst of 2, a key's third read at once is RESOURCE_EXHAUSTED with RetryInfo; another key is unaffected."""
    limited = Settings(
        redis_url=settings.redis_url, listen="127.0.0.1:0", read_rate_limit=1, read_burst=2
    )
    server, port, _ = await create_server(
        limited, redis_client, clock=clock, registry=CollectorRegistry(), credentials=credentials()
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            auth = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            keys = [
                await admin.CreateApiKey(
                    admin_pb2.CreateApiKeyRequest(org_id="acme"), metadata=auth
                )
                for _ in range(2)
            ]
            first = (("x-api-key", keys[0].secret),)
            for _ in range(2):
                await quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=first)
            error = await refused(quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=first))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(error) == "RATE_LIMIT_EXCEEDED"
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details)
            assert 0 < retry.retry_delay.ToMilliseconds() <= 1000
            await quota.GetUsage(
                quota_pb2.GetUsageRequest(), metadata=(("x-api-key", keys[1].secret),)
            )
            clock.advance(1)
            await quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=first)
    finally:
        await server.stop(None)


async def test_a_key_over_its_read_limit_is_refused_writes_for_its_role(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> None:
    """A tenant key over its read limit gets PERMISSION_DENIED (not RESOURCE_EXHAUSTED) from every write and admin RPC, and those refusals spend none of its reads."""
    limited = Settings(
        redis_url=settings.redis_url, listen="127.0.0.1:0", read_rate_limit=1, read_burst=2
    )
    async with serving(limited, redis_client, clock, credentials=credentials()) as server:
        stubs = {
            "quota": server.quota,
            "admin": server.admin,
            "events": events_pb2_grpc.EventServiceStub(server.channel),
            "ratelimit": rls_pb2_grpc.RateLimitServiceStub(server.channel),
        }
        key = await server.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(org_id="acme"),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        )
        tenant = (("x-api-key", key.secret),)
        # Writes first: they must not spend the key's two reads.
        for service, rpc, request in WRITE_RPCS + ADMIN_RPCS:
            error = await refused(getattr(stubs[service], rpc)(request, metadata=tenant))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, rpc
        for _ in range(2):
            await server.quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=tenant)
        # Now over the read limit: writes are still refused for the role.
        for service, rpc, request in WRITE_RPCS + ADMIN_RPCS:
            error = await refused(getattr(stubs[service], rpc)(request, metadata=tenant))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, rpc
        error = await refused(server.quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=tenant))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- audit trail and usage corrections ----------------------------------------------------------


async def test_admin_changes_are_audited_with_who_and_what(secured: Secured) -> None:
    """Plan change, credit grant, key creation and revocation, and a usage correction are listed newest first with actor, before and after."""
    call, admin = secured.call, secured.admin
    await call(admin, "SetPlan", admin_pb2.SetPlanRequest(plan=eagle_plan()), ADMIN_TOKEN)
    await call(
        admin,
        "SetPlan",
        admin_pb2.SetPlanRequest(plan=eagle_plan(name="Growth")),
        ADMIN_TOKEN,
    )
    await call(
        admin,
        "GrantCredits",
        admin_pb2.GrantCreditsRequest(
            org_id="acme", metric="pages", units=50, grant_id="g1", reason="purchase 42"
        ),
        ADMIN_TOKEN,
    )
    key = await new_key(secured)
    await call(
        admin,
        "RevokeApiKey",
        admin_pb2.RevokeApiKeyRequest(org_id="acme", key_id=key.key.key_id),
        ADMIN_TOKEN,
    )
    await call(
        secured.quota,
        "RecordUsage",
        quota_pb2.RecordUsageRequest(org_id="acme", request_id="j1", units={"pages": 10}),
        SERVICE_TOKEN,
    )
    await call(
        admin,
        "AdjustUsage",
        admin_pb2.AdjustUsageRequest(
            org_id="acme",
            metric="pages",
            units=-4,
            reason="ticket 7: blank pages",
            adjustment_id="a1",
        ),
        ADMIN_TOKEN,
    )
    trail = await call(
        admin, "ListAuditEvents", admin_pb2.ListAuditEventsRequest(org_id="acme"), ADMIN_TOKEN
    )
    actions = [(e.action, e.actor) for e in trail.events]
    assert actions == [
        ("usage.adjust", "admin:ops"),
        ("api_key.revoke", "admin:ops"),
        ("api_key.create", "admin:ops"),
        ("credits.grant", "admin:ops"),
        ("plan.set", "admin:ops"),
        ("plan.set", "admin:ops"),
    ]
    adjust, revoke, create, grant, second_plan, first_plan = trail.events
    assert (json.loads(adjust.before)["committed"], json.loads(adjust.after)["committed"]) == (
        "10",
        "6",
    )
    assert adjust.reason == "ticket 7: blank pages" and adjust.target == "pages"
    assert revoke.target == key.key.key_id == create.target
    assert key.secret not in create.after
    assert json.loads(grant.before) == {"balance": "0"}
    assert json.loads(grant.after) == {
        "balance": "50",
        "grant_id": "g1",
        "units": "50",
        "effective_ms": str(START_MS),
        "expires_ms": "0",
        "priority": "50",
    }
    assert grant.reason == "purchase 42"
    assert first_plan.before == "" and json.loads(second_plan.before)["name"] == "Business"
    assert json.loads(second_plan.after)["name"] == "Growth"
    assert adjust.at.ToMilliseconds() == secured.clock.now_ms()


async def test_audit_trail_pages(secured: Secured) -> None:
    """Pages of 2 walk the whole audit trail once, newest first."""
    for i in range(5):
        await secured.call(
            secured.admin,
            "SetPlan",
            admin_pb2.SetPlanRequest(plan=eagle_plan(name=f"v{i}")),
            ADMIN_TOKEN,
        )
    names: list[str] = []
    token = ""
    while True:
        page = await secured.call(
            secured.admin,
            "ListAuditEvents",
            admin_pb2.ListAuditEventsRequest(org_id="acme", page_size=2, page_token=token),
            ADMIN_TOKEN,
        )
        names.extend(json.loads(e.after)["name"] for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert names == ["v4", "v3", "v2", "v1", "v0"]


async def test_usage_correction_is_idempotent_and_never_negative(
    secured: Secured,
) -> None:
    """AdjustUsage applies once per adjustment_id, floors the total at zero, needs a reason, and a reused id with other figures is ALREADY_EXISTS."""
    call, admin = secured.call, secured.admin
    await call(admin, "SetPlan", admin_pb2.SetPlanRequest(plan=eagle_plan()), ADMIN_TOKEN)
    request = admin_pb2.AdjustUsageRequest(
        org_id="acme", metric="pages", units=-30, reason="refund", adjustment_id="a1"
    )
    first = await call(admin, "AdjustUsage", request, ADMIN_TOKEN)
    assert (first.committed_before, first.committed_after, first.duplicate) == (0, 0, False)
    again = await call(admin, "AdjustUsage", request, ADMIN_TOKEN)
    assert again.duplicate and again.committed_after == 0
    plus = admin_pb2.AdjustUsageRequest(
        org_id="acme",
        metric="pages",
        units=12,
        reason="missed job",
        adjustment_id="a2",
        year=2026,
        month=3,
    )
    added = await call(admin, "AdjustUsage", plus, ADMIN_TOKEN)
    assert (added.period_id, added.committed_after) == ("2026-03", 12)
    usage = await call(
        secured.quota, "GetUsage", quota_pb2.GetUsageRequest(org_id="acme"), ADMIN_TOKEN
    )
    assert {m.metric: m.committed for m in usage.metrics}["pages"] == 12
    reused = admin_pb2.AdjustUsageRequest(
        org_id="acme", metric="pages", units=5, reason="refund", adjustment_id="a1"
    )
    error = await refused(call(admin, "AdjustUsage", reused, ADMIN_TOKEN))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    no_reason = admin_pb2.AdjustUsageRequest(
        org_id="acme", metric="pages", units=5, reason=" ", adjustment_id="a3"
    )
    error = await refused(call(admin, "AdjustUsage", no_reason, ADMIN_TOKEN))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in (error.details() or "")


# -- configuration ----------------------------------------------------------------------------


async def test_server_refuses_to_start_without_credentials(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """With no credentials and no --dev-open-access, create_server refuses and says how to fix it."""
    closed = Settings(redis_url=settings.redis_url, listen="127.0.0.1:0")
    with pytest.raises(ConfigurationError, match="PAGEMETER_ADMIN_TOKENS"):
        await create_server(closed, redis_client, registry=CollectorRegistry())


async def test_open_access_only_on_loopback(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """--dev-open-access on a non-loopback address is refused."""
    open_wide = Settings(redis_url=settings.redis_url, dev_open_access=True)
    with pytest.raises(ConfigurationError, match="loopback"):
        await create_server(
            open_wide, redis_client, registry=CollectorRegistry(), listen="0.0.0.0:0"
        )


def test_credentials_from_environment_and_files(tmp_path: Any) -> None:
    """Tokens come from PAGEMETER_*_TOKENS ('name=token', commas) and files (one a line, comments allowed)."""
    tokens_file = tmp_path / "service"
    tokens_file.write_text("# workers\nbatch=service-token-batch-0123456789\n")
    creds = load_credentials(
        Settings(service_tokens_file=str(tokens_file)),
        {"PAGEMETER_ADMIN_TOKENS": "ops=admin-token-ops-0123456789, admin-token-bare-0123456789"},
    )
    ops = creds.match("admin-token-ops-0123456789")
    assert ops is not None and (ops.role, ops.actor) == (Role.ADMIN, "admin:ops")
    bare = creds.match("admin-token-bare-0123456789")
    assert bare is not None and bare.actor.startswith("admin:admin-")
    batch = creds.match("service-token-batch-0123456789")
    assert batch is not None and (batch.role, batch.actor) == (Role.SERVICE, "service:batch")
    assert creds.match("admin-token-ops-012345678") is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PAGEMETER_ADMIN_TOKENS": "short"}, "shorter than 16"),
        (
            {
                "PAGEMETER_ADMIN_TOKENS": "a=same-token-0123456789",
                "PAGEMETER_SERVICE_TOKENS": "b=same-token-0123456789",
            },
            "configured twice",
        ),
        ({"PAGEMETER_SERVICE_TOKENS": "pmk_looks-like-a-tenant-key"}, "must not start with"),
    ],
)
def test_weak_or_ambiguous_tokens_are_refused(environ: dict[str, str], message: str) -> None:
    """Short tokens, a token given two roles, and tokens shaped like tenant keys stop the server at start-up."""
    with pytest.raises(ConfigurationError, match=message):
        load_credentials(Settings(), environ)


def test_unreadable_tokens_file_is_a_clear_error(tmp_path: Any) -> None:
    """A tokens file that cannot be read names the file."""
    missing = tmp_path / "nope"
    with pytest.raises(ConfigurationError, match="nope"):
        load_credentials(Settings(admin_tokens_file=str(missing)), {})


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path: Any) -> dict[str, Any]:
    """A throwaway CA, a server certificate for localhost and a client certificate."""
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("worker.example")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    for blob in server_cert.cert_chain_pems:
        blob.write_to_path(str(files["cert"]), append=True)
    return {
        **files,
        "ca_pem": ca.cert_pem.bytes(),
        "client_cert": b"".join(b.bytes() for b in client_cert.cert_chain_pems),
        "client_key": client_cert.private_key_pem.bytes(),
        "stranger": trustme.CA().issue_cert("intruder.example"),
    }


async def tls_server(
    settings: Settings, redis_client: aioredis.Redis, certificates: dict[str, Any], mutual: bool
) -> tuple[Any, int]:
    secured_settings = Settings(
        redis_url=settings.redis_url,
        listen="127.0.0.1:0",
        tls_cert_file=str(certificates["cert"]),
        tls_key_file=str(certificates["key"]),
        tls_client_ca_file=str(certificates["ca"]) if mutual else "",
    )
    server, port, _ = await create_server(
        secured_settings, redis_client, registry=CollectorRegistry(), credentials=credentials()
    )
    await server.start()
    return server, port


async def usage_over(channel: grpc.aio.Channel) -> quota_pb2.GetUsageResponse:
    stub = quota_pb2_grpc.QuotaServiceStub(channel)
    reply: quota_pb2.GetUsageResponse = await stub.GetUsage(
        quota_pb2.GetUsageRequest(org_id="acme"),
        metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
        timeout=5,
    )
    return reply


LOCALHOST = (("grpc.ssl_target_name_override", "localhost"),)


async def test_tls_serves_only_tls_clients(
    settings: Settings, redis_client: aioredis.Redis, certificates: dict[str, Any]
) -> None:
    """With a certificate configured, a client trusting the CA is served; a plaintext client is not."""
    server, port = await tls_server(settings, redis_client, certificates, mutual=False)
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=certificates["ca_pem"])
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", trusted, options=LOCALHOST) as ch:
            assert (await usage_over(ch)).org_id == "acme"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            error = await refused(usage_over(plain))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    settings: Settings, redis_client: aioredis.Redis, certificates: dict[str, Any]
) -> None:
    """With a client CA configured, only a client presenting a certificate that CA signed gets an answer."""
    server, port = await tls_server(settings, redis_client, certificates, mutual=True)
    target = f"127.0.0.1:{port}"
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=certificates["ca_pem"],
            private_key=certificates["client_key"],
            certificate_chain=certificates["client_cert"],
        )
        async with grpc.aio.secure_channel(target, with_cert, options=LOCALHOST) as ch:
            assert (await usage_over(ch)).org_id == "acme"
        without_cert = grpc.ssl_channel_credentials(root_certificates=certificates["ca_pem"])
        async with grpc.aio.secure_channel(target, without_cert, options=LOCALHOST) as ch:
            error = await refused(usage_over(ch))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        stranger = certificates["stranger"]
        foreign = grpc.ssl_channel_credentials(
            root_certificates=certificates["ca_pem"],
            private_key=stranger.private_key_pem.bytes(),
            certificate_chain=b"".join(b.bytes() for b in stranger.cert_chain_pems),
        )
        async with grpc.aio.secure_channel(target, foreign, options=LOCALHOST) as ch:
            error = await refused(usage_over(ch))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_unreadable_certificate_is_a_configuration_error(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    """A TLS certificate file that cannot be read stops create_server with the file's name."""
    broken = Settings(
        redis_url=settings.redis_url,
        listen="127.0.0.1:0",
        tls_cert_file=str(tmp_path / "missing.pem"),
        tls_key_file=str(tmp_path / "missing.key"),
    )
    with pytest.raises(ConfigurationError, match=r"missing\.pem"):
        await create_server(
            broken, redis_client, registry=CollectorRegistry(), credentials=credentials()
        )


@pytest.mark.parametrize(("year", "month"), [(2026, 4), (2024, 12)], ids=["future", "expired"])
async def test_correction_of_a_month_outside_the_counters_is_refused(
    secured: Secured, redis_sync: redis.Redis, year: int, month: int
) -> None:
    """A correction for a month that has not begun, or whose counters are past the usage retention, is INVALID_ARGUMENT and writes nothing."""
    await secured.call(
        secured.admin, "SetPlan", admin_pb2.SetPlanRequest(plan=eagle_plan()), ADMIN_TOKEN
    )
    keys_before = sorted(redis_sync.keys("*"))
    audit_before = redis_sync.xlen("pm:{acme}:audit")
    request = admin_pb2.AdjustUsageRequest(
        org_id="acme",
        metric="pages",
        units=5,
        reason="late fix",
        adjustment_id="a1",
        year=year,
        month=month,
    )
    error = await refused(secured.call(secured.admin, "AdjustUsage", request, ADMIN_TOKEN))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "month" in (error.details() or "")
    assert sorted(redis_sync.keys("*")) == keys_before
    assert redis_sync.xlen("pm:{acme}:audit") == audit_before
