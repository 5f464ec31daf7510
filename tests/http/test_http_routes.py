"""Every route of the HTTP/JSON API, called over loopback by a real HTTP client, by
each kind of caller (admin, service, tenant key, nobody)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from pagemeter_server.gateway.routes import routes
from tests.conftest import eagle_plan
from tests.http.conftest import SERVICE_TOKEN, HttpApi

PLAN = json_format.MessageToDict(eagle_plan("acme"))


async def tenant_key(api: HttpApi, org: str = "acme") -> str:
    created = await api.call("POST", f"/v1/orgs/{org}/apiKeys", body={"name": "billing page"})
    assert created.status == 200, created
    return str(created.body["secret"])


async def with_plan(api: HttpApi) -> None:
    answer = await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN})
    assert answer.status == 200, answer


async def webhook_endpoint(api: HttpApi) -> str:
    created = await api.call(
        "POST", "/v1/orgs/acme/webhookEndpoints", body={"url": "http://127.0.0.1:9/hook"}
    )
    assert created.status == 200, created
    return str(created.body["endpoint"]["endpointId"])


# One call per route, valid for an organization "acme" with a plan: (verb, path,
# body or query). {endpoint} and {key} are filled in by the test.
CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/orgs/acme/quota:check", {"units": {"pages": 2}}),
    ("POST", "/v1/orgs/acme/usage:record", {"requestId": "job-1", "units": {"pages": 2}}),
    ("POST", "/v1/quota:checkBatch", {"items": [{"orgId": "acme", "units": {"pages": 1}}]}),
    (
        "POST",
        "/v1/usage:recordBatch",
        {"items": [{"orgId": "acme", "requestId": "job-2", "units": {"pages": 1}}]},
    ),
    ("POST", "/v1/orgs/acme/quota:release", {"requestId": "job-3"}),
    ("GET", "/v1/orgs/acme/usage", {"year": "2026", "month": "3"}),
    ("PUT", "/v1/orgs/acme/plan", {"plan": PLAN}),
    ("GET", "/v1/orgs/acme/plan", None),
    ("POST", "/v1/orgs/acme/credits:grant", {"metric": "pages", "units": "50", "grantId": "g1"}),
    ("POST", "/v1/orgs/acme/apiKeys", {"name": "dashboard"}),
    ("GET", "/v1/orgs/acme/apiKeys", None),
    ("DELETE", "/v1/orgs/acme/apiKeys/{key}", None),
    (
        "POST",
        "/v1/orgs/acme/usage:adjust",
        {"metric": "pages", "units": "-1", "reason": "refund", "adjustmentId": "a1"},
    ),
    ("GET", "/v1/orgs/acme/auditEvents", {"page_size": "5"}),
    ("GET", "/v1/plans", None),
    ("POST", "/v1/orgs/acme/creditGrants/g1:void", {"reason": "sold by mistake"}),
    ("GET", "/v1/orgs/acme/creditGrants", None),
    ("GET", "/v1/orgs/acme/usage/history", {"months": "3"}),
    ("GET", "/v1/orgs/acme/usage/statistics", {"period": "daily"}),
    ("GET", "/v1/orgs/acme/usage/records", {"pageSize": "10"}),
    ("POST", "/v1/billingPeriods/2026-02:close", {}),
    ("GET", "/v1/billingPeriods/2026-02/export", None),
    ("GET", "/v1/orgs/acme/events", {"types": ["usage.recorded", "credits.granted"]}),
    ("GET", "/v1/eventOrganizations", None),
    ("POST", "/v1/orgs/acme/webhookEndpoints", {"url": "https://hooks.example.com/a"}),
    ("POST", "/v1/webhookEndpoints", {"url": "https://hooks.example.com/all"}),
    ("GET", "/v1/webhookEndpoints/{endpoint}", None),
    ("GET", "/v1/orgs/acme/webhookEndpoints", None),
    ("GET", "/v1/webhookEndpoints", None),
    (
        "PATCH",
        "/v1/webhookEndpoints/{endpoint}",
        {"description": "new", "updateMask": ["description"]},
    ),
    ("POST", "/v1/webhookEndpoints/{endpoint}:rotateSecret", {"overlapSeconds": 60}),
    ("GET", "/v1/webhookEndpoints/{endpoint}/deliveries", None),
    ("GET", "/v1/webhookEndpoints/{endpoint}/deadLetters", None),
    (
        "POST",
        "/v1/webhookEndpoints/{endpoint}:replay",
        {"orgId": "acme", "startTime": "2026-03-01T00:00:00Z", "endTime": "2026-03-16T00:00:00Z"},
    ),
    ("DELETE", "/v1/webhookEndpoints/{endpoint}", None),
    # The tenant's own routes, with an admin they read nothing (no org): covered below.
]
TENANT_READS = [
    ("GET", "/v1/usage", {"year": "2026", "month": "3"}),
    ("GET", "/v1/usage/history", None),
    ("GET", "/v1/usage/statistics", {"period": "weekly", "groupBy": "document_type"}),
    ("GET", "/v1/usage/records", None),
    ("GET", "/v1/events", None),
]


def test_every_route_of_the_contract_is_called_here() -> None:
    """The calls above cover every route the contract declares, so a route added later
    is untested until it is added here."""
    declared = {(r.verb, r.template) for r in routes()}
    templates = {
        "acme": "{org_id}",
        "{key}": "{key_id}",
        "{endpoint}": "{endpoint_id}",
        "g1": "{grant_id}",
        "2026-02": "{billing_month}",
    }

    def template_of(path: str) -> str:
        for value, name in templates.items():
            path = path.replace(value, name)
        return path

    called = {(verb, template_of(path)) for verb, path, _ in CALLS + TENANT_READS}
    # SetPlan's path binds the org of the plan in its body.
    called = {
        (
            verb,
            "/v1/orgs/{plan.org_id}/plan"
            if (verb, path) == ("PUT", "/v1/orgs/{org_id}/plan")
            else path,
        )
        for verb, path in called
    }
    assert declared - called == set()
    assert called - declared == set()


async def test_every_route_answers_an_admin(api: HttpApi) -> None:
    """Each route, called with valid input by an admin, answers 200 with a JSON object."""
    await with_plan(api)
    key_id = (await api.call("POST", "/v1/orgs/acme/apiKeys", body={"name": "k"})).body["key"][
        "keyId"
    ]
    endpoint = await webhook_endpoint(api)
    for verb, path, data in CALLS:
        path = path.replace("{key}", key_id).replace("{endpoint}", endpoint)
        if verb in ("GET", "DELETE"):
            answer = await api.call(verb, path, params=_query(data))
        else:
            answer = await api.call(verb, path, body=data)
        assert answer.status == 200, (verb, path, answer)
        assert isinstance(answer.body, dict)


def _query(data: dict[str, Any] | None) -> list[tuple[str, str]]:
    pairs = []
    for name, value in (data or {}).items():
        for one in value if isinstance(value, list) else [value]:
            pairs.append((name, one))
    return pairs


async def test_tenant_routes_read_the_keys_own_organization(api: HttpApi) -> None:
    """A tenant key reads its own organization's figures on /v1/usage... with no org in
    the path; the answer is the same as the admin's read of that organization."""
    await with_plan(api)
    record = await api.call(
        "POST",
        "/v1/orgs/acme/usage:record",
        body={"requestId": "job-7", "units": {"pages": 12}, "completedAt": "2026-03-15T12:00:00Z"},
        token=SERVICE_TOKEN,
    )
    assert record.status == 200, record
    key = await tenant_key(api)
    for verb, path, data in TENANT_READS:
        answer = await api.call(verb, path, params=_query(data), token=key)
        assert answer.status == 200, (path, answer)
    own = await api.call("GET", "/v1/usage", token=key)
    admin_view = await api.call("GET", "/v1/orgs/acme/usage")
    assert own.body == admin_view.body
    pages = next(m for m in own.body["metrics"] if m["metric"] == "pages")
    assert pages["committed"] == "12"


async def test_a_tenant_key_with_an_org_in_the_path_is_refused(api: HttpApi) -> None:
    """A tenant key cannot name an organization, not even its own: 403 ORG_FROM_API_KEY."""
    key = await tenant_key(api)
    for path in ("/v1/orgs/acme/usage", "/v1/orgs/other/usage"):
        answer = await api.call("GET", path, token=key)
        assert answer.status == 403, answer
        assert answer.reason == "ORG_FROM_API_KEY"


@pytest.mark.parametrize(
    ("verb", "path", "body"),
    [
        ("POST", "/v1/orgs/acme/quota:check", {"units": {"pages": 1}}),
        ("PUT", "/v1/orgs/acme/plan", {"plan": PLAN}),
        ("POST", "/v1/billingPeriods/2026-02:close", {}),
    ],
)
async def test_a_tenant_key_may_not_write(
    api: HttpApi, verb: str, path: str, body: dict[str, Any]
) -> None:
    """Tenant keys read only: a check, a plan change or a billing close is 403 and changes nothing."""
    key = await tenant_key(api)
    answer = await api.call(verb, path, body=body, token=key)
    assert answer.status == 403, answer
    assert answer.reason == "PERMISSION_DENIED"
    plan = await api.call("GET", "/v1/orgs/acme/plan")
    assert plan.status == 404  # the PUT changed nothing


async def test_a_service_may_not_call_admin_routes(api: HttpApi) -> None:
    """A service token checks, records and reads, but an admin route answers 403."""
    answer = await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN}, token=SERVICE_TOKEN)
    assert answer.status == 403
    assert answer.reason == "PERMISSION_DENIED"
    read = await api.call("GET", "/v1/orgs/acme/usage", token=SERVICE_TOKEN)
    assert read.status == 200


async def test_missing_and_wrong_credentials_are_401(api: HttpApi) -> None:
    """No credential, a wrong token, a revoked key and a malformed header all answer 401."""
    missing = await api.call("GET", "/v1/orgs/acme/usage", token=None)
    assert (missing.status, missing.reason) == (401, "UNAUTHORIZED")
    wrong = await api.call("GET", "/v1/orgs/acme/usage", token="not-a-configured-token-at-all")
    assert (wrong.status, wrong.reason) == (401, "INVALID_API_KEY")
    created = await api.call("POST", "/v1/orgs/acme/apiKeys", body={"name": "old"})
    key, key_id = created.body["secret"], created.body["key"]["keyId"]
    revoked = await api.call("DELETE", f"/v1/orgs/acme/apiKeys/{key_id}")
    assert revoked.status == 200
    after = await api.call("GET", "/v1/usage", token=key)
    assert (after.status, after.reason) == (401, "INVALID_API_KEY")
    basic = await api.call(
        "GET", "/v1/usage", token=None, headers={"Authorization": "Basic dXNlcjpwdw=="}
    )
    assert basic.status == 401


async def test_an_api_key_in_x_api_key_works_too(api: HttpApi) -> None:
    """The X-Api-Key header carries a tenant key as gRPC's x-api-key metadata does."""
    key = await tenant_key(api)
    answer = await api.call("GET", "/v1/usage", token=None, headers={"X-Api-Key": key})
    assert answer.status == 200
    assert answer.body["orgId"] == "acme"
