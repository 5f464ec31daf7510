"""What the HTTP listener shares with gRPC: TLS (mutual too), metrics, the access log,
the rules under concurrent callers; and what only HTTP has: CORS for browsers."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import trustme
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.logs import JsonLines
from pagemeter_server.settings import Settings
from tests.conftest import eagle_plan
from tests.http.conftest import (
    ADMIN_TOKEN,
    SERVICE_TOKEN,
    HttpApi,
    closed_settings,
    running_api,
)

PLAN = json_format.MessageToDict(eagle_plan("acme"))


# -- CORS ---------------------------------------------------------------------------------


async def test_cors_is_off_by_default(api: HttpApi) -> None:
    """Without --http-cors-origins, answers carry no Access-Control-Allow-Origin and a
    preflight is not granted."""
    answer = await api.call("GET", "/v1/orgs/acme/usage", headers={"Origin": "https://x.example"})
    assert "Access-Control-Allow-Origin" not in answer.headers
    async with api.session.options(
        api.base + "/v1/orgs/acme/usage",
        headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"},
    ) as preflight:
        assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.fixture
async def cors_api(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[HttpApi]:
    configured = closed_settings(settings, http_cors_origins="https://dash.example.com")
    async for running in running_api(configured, redis_client, clock):
        yield running


async def test_cors_allows_the_configured_origin_only(cors_api: HttpApi) -> None:
    """A dashboard on a configured origin gets its preflight granted (Authorization header
    allowed) and its answers readable; another origin gets neither."""
    url = cors_api.base + "/v1/usage"
    ask = {
        "Origin": "https://dash.example.com",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with cors_api.session.options(url, headers=ask) as preflight:
        assert preflight.status == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://dash.example.com"
        assert "AUTHORIZATION" in preflight.headers["Access-Control-Allow-Headers"].upper()
    answer = await cors_api.call(
        "GET", "/v1/orgs/acme/usage", headers={"Origin": "https://dash.example.com"}
    )
    assert answer.headers["Access-Control-Allow-Origin"] == "https://dash.example.com"
    assert "Retry-After" in answer.headers.get("Access-Control-Expose-Headers", "")
    async with cors_api.session.options(
        url, headers={**ask, "Origin": "https://evil.example"}
    ) as refused:
        assert "Access-Control-Allow-Origin" not in refused.headers
    other = await cors_api.call(
        "GET", "/v1/orgs/acme/usage", headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers


def test_bad_cors_origins_are_refused_at_start_up() -> None:
    """An origin with a path or without a scheme is a configuration error, not ignored."""
    for bad in ("dash.example.com", "https://dash.example.com/app", "ftp://x.example"):
        with pytest.raises(ValueError, match="--http-cors-origins"):
            Settings(http_cors_origins=bad).validate()
    Settings(http_cors_origins="*").validate()
    Settings(http_cors_origins="https://a.example, http://localhost:3000").validate()


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("worker@example.com")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "client": tmp_path / "client.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(files["cert"]), append=True)
    server.private_key_pem.write_to_path(str(files["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return files


async def test_the_http_port_uses_the_grpc_ports_tls(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, pki: dict[str, Path]
) -> None:
    """With --tls-cert/--tls-key, the HTTP API is HTTPS with the same certificate, and a
    plaintext request does not reach it."""
    secured = closed_settings(
        settings, tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"])
    )
    async for api in running_api(secured, redis_client, clock):
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        async with aiohttp.ClientSession() as session:
            async with session.get(
                api.base + "/v1/orgs/acme/usage",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ssl=context,
            ) as response:
                assert response.status == 200
            plain = api.base.replace("https://", "http://")
            with pytest.raises(aiohttp.ClientError):
                async with session.get(plain + "/v1/orgs/acme/usage") as response:
                    await response.read()


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, pki: dict[str, Path]
) -> None:
    """With --tls-client-ca, only clients with a certificate from that CA are served."""
    mutual = closed_settings(
        settings,
        tls_cert_file=str(pki["cert"]),
        tls_key_file=str(pki["key"]),
        tls_client_ca_file=str(pki["ca"]),
    )
    async for api in running_api(mutual, redis_client, clock):
        anonymous = ssl.create_default_context(cafile=str(pki["ca"]))
        known = ssl.create_default_context(cafile=str(pki["ca"]))
        known.load_cert_chain(str(pki["client"]))
        url = api.base + "/v1/orgs/acme/usage"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url, headers=auth, ssl=anonymous) as response:
                    await response.read()
            async with session.get(url, headers=auth, ssl=known) as response:
                assert response.status == 200


# -- metrics and the access log --------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_http_calls_are_counted_as_http_not_grpc(api: HttpApi) -> None:
    """An HTTP call moves pagemeter_http_requests_total (route template, method, status)
    and the decision counters, but not the gRPC server's counters."""
    await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN})
    await api.call(
        "POST", "/v1/orgs/acme/quota:check", body={"units": {"pages": 1}}, token=SERVICE_TOKEN
    )
    await api.call("GET", "/v1/orgs/acme/usage", params={"month": "13", "year": "2026"})
    registry = api.registry
    check_route = {"route": "/v1/orgs/{org_id}/quota:check", "http_method": "POST"}
    assert sample(registry, "pagemeter_http_requests_total", **check_route, status="200") == 1
    usage_route = {"route": "/v1/orgs/{org_id}/usage", "http_method": "GET", "status": "400"}
    assert sample(registry, "pagemeter_http_requests_total", **usage_route) == 1
    assert sample(registry, "pagemeter_http_request_duration_seconds_count", **check_route) == 1
    assert (
        sample(
            registry,
            "grpc_server_started_total",
            grpc_type="UNARY",
            grpc_service="pagemeter.v1.QuotaService",
            grpc_method="CheckQuota",
        )
        == 0
    )
    decided = {"metric": "pages", "decision": "allowed", "reason": "within_quota"}
    assert sample(registry, "pagemeter_check_decisions_total", **decided) == 1


async def test_each_http_call_logs_one_access_line_without_credentials(
    api: HttpApi, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP CheckQuota logs one access line like gRPC's, marked transport=http, and no
    header value (the token) reaches it."""
    await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN})
    with caplog.at_level(logging.INFO, logger="pagemeter.access"):
        await api.call(
            "POST",
            "/v1/orgs/acme/quota:check",
            body={"units": {"pages": 3000}, "requestId": "job-9", "hold": True},
            token=SERVICE_TOKEN,
        )
    (entry,) = [r for r in caplog.records if r.name == "pagemeter.access"]
    line = json.loads(JsonLines().format(entry))
    assert (line["rpc"], line["code"], line["transport"]) == ("CheckQuota", "OK", "http")
    assert (line["org_id"], line["request_id"]) == ("acme", "job-9")
    assert (line["allowed"], line["reason"]) == (False, "HARD_LIMIT_EXCEEDED")
    assert SERVICE_TOKEN not in json.dumps(line)


async def test_a_refused_http_call_is_logged_with_its_code(
    api: HttpApi, caplog: pytest.LogCaptureFixture
) -> None:
    """A call the gateway refuses before any handler (bad JSON) is logged too, with
    INVALID_ARGUMENT, through the same interceptors."""
    with caplog.at_level(logging.INFO, logger="pagemeter.access"):
        await api.call(
            "POST",
            "/v1/orgs/acme/quota:check",
            raw=b"{oops",
            headers={"Content-Type": "application/json"},
            token=SERVICE_TOKEN,
        )
    (entry,) = [r for r in caplog.records if r.name == "pagemeter.access"]
    assert entry.fields["code"] == "INVALID_ARGUMENT"  # type: ignore[attr-defined]


# -- the rules under concurrent HTTP callers ---------------------------------------------------


async def test_concurrent_http_checks_never_over_admit(api: HttpApi) -> None:
    """60 concurrent HTTP CheckQuota calls, each holding 10 documents of a quota of 500
    without overage: exactly 50 are admitted and 500 units held, never more."""
    await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN})

    async def check(number: int) -> bool:
        answer = await api.call(
            "POST",
            "/v1/orgs/acme/quota:check",
            body={"units": {"documents": 10}, "requestId": f"job-{number}", "hold": True},
            token=SERVICE_TOKEN,
        )
        assert answer.status == 200, answer
        return bool(answer.body["allowed"])

    admitted = await asyncio.gather(*(check(n) for n in range(60)))
    assert sum(admitted) == 50
    usage = await api.call("GET", "/v1/orgs/acme/usage")
    documents = next(m for m in usage.body["metrics"] if m["metric"] == "documents")
    assert documents["held"] == "500"


async def test_concurrent_http_and_grpc_records_count_once(api: HttpApi) -> None:
    """The same 40 request ids recorded at once over HTTP and over gRPC count once each."""
    import grpc

    from pagemeter.v1 import quota_pb2, quota_pb2_grpc

    await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN})
    async with grpc.aio.insecure_channel(api.grpc_target) as channel:
        stub = quota_pb2_grpc.QuotaServiceStub(channel)
        auth = (("authorization", f"Bearer {SERVICE_TOKEN}"),)

        async def over_http(number: int) -> None:
            answer = await api.call(
                "POST",
                "/v1/orgs/acme/usage:record",
                body={"requestId": f"r{number}", "units": {"pages": 2}},
                token=SERVICE_TOKEN,
            )
            assert answer.status == 200, answer

        async def over_grpc(number: int) -> None:
            await stub.RecordUsage(
                quota_pb2.RecordUsageRequest(
                    org_id="acme", request_id=f"r{number}", units={"pages": 2}
                ),
                metadata=auth,
            )

        await asyncio.gather(*(over_http(n) for n in range(40)), *(over_grpc(n) for n in range(40)))
    usage = await api.call("GET", "/v1/orgs/acme/usage")
    pages = next(m for m in usage.body["metrics"] if m["metric"] == "pages")
    assert pages["committed"] == "80"
