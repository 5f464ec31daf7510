"""Failures over HTTP: each answered as google.rpc.Status JSON with the HTTP status of
Google's mapping, with details, and with nothing changed by a refused call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format

from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import connect_redis
from tests.conftest import eagle_plan
from tests.http.conftest import SERVICE_TOKEN, HttpApi, closed_settings, running_api

PLAN = json_format.MessageToDict(eagle_plan("acme"))


async def committed_pages(api: HttpApi, org: str = "acme") -> str:
    usage = await api.call("GET", f"/v1/orgs/{org}/usage")
    assert usage.status == 200, usage
    pages = [m for m in usage.body["metrics"] if m["metric"] == "pages"]
    return str(pages[0]["committed"]) if pages else "0"


@pytest.fixture
async def planned(api: HttpApi) -> HttpApi:
    answer = await api.call("PUT", "/v1/orgs/acme/plan", body={"plan": PLAN})
    assert answer.status == 200
    return api


async def test_a_bad_request_is_400_with_field_violations_and_changes_nothing(
    planned: HttpApi,
) -> None:
    """Negative units, a bad metric name and an empty request id: 400 INVALID_ARGUMENT
    naming each field, and no counter moved."""
    answer = await planned.call(
        "POST",
        "/v1/orgs/acme/usage:record",
        body={"requestId": "", "units": {"pages": "-5", "bad name!": "1"}},
        token=SERVICE_TOKEN,
    )
    assert answer.status == 400
    assert answer.body["code"] == 3
    assert answer.body["message"]
    assert {"request_id"} <= set(answer.fields), answer.fields
    assert await committed_pages(planned) == "0"


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"{not json", "application/json", "not JSON"),
        (b"[1, 2]", "application/json", "JSON object"),
        (b'{"units": {"pages": 1}, "colour": "red"}', "application/json", "colour"),
        (b'{"units": {"pages": "many"}}', "application/json", "units"),
        (b'{"hold": "yes please"}', "application/json", "hold"),
        (b"units=pages", "application/x-www-form-urlencoded", "not JSON"),
    ],
    ids=["broken-json", "not-an-object", "unknown-field", "bad-number", "bad-bool", "form"],
)
async def test_a_body_that_is_not_the_message_is_400(
    planned: HttpApi, body: bytes, content_type: str, message: str
) -> None:
    """A body that is not JSON, not an object, names an unknown field or has a value of the
    wrong type is 400 INVALID_ARGUMENT with a message that says what is wrong."""
    answer = await planned.call(
        "POST",
        "/v1/orgs/acme/quota:check",
        raw=body,
        headers={"Content-Type": content_type},
        token=SERVICE_TOKEN,
    )
    assert answer.status == 400, answer
    assert answer.body["code"] == 3
    assert message in answer.body["message"], answer.body["message"]


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"colour": "red"}, "colour", "unknown parameter 'colour'"),
        ({"pageSize": "ten"}, "pageSize", "must be an integer"),
        ({"page_size": "99999999999"}, "page_size", "out of range"),
        ({"period": "yearly"}, "period", "daily, weekly, monthly"),
        ({"org_id": "other"}, "org_id", "part of the path"),
    ],
)
async def test_a_query_parameter_that_does_not_fit_is_400(
    planned: HttpApi, query: dict[str, str], field: str, message: str
) -> None:
    """An unknown query parameter, a value of the wrong type or out of range, an unknown
    enum value and a repeated path field are each 400 naming the parameter."""
    answer = await planned.call("GET", "/v1/orgs/acme/usage/statistics", params=query)
    assert answer.status == 400, answer
    assert answer.fields == [field]
    assert message in answer.body["message"], answer.body["message"]
    assert answer.reason == "INVALID_PARAMETER"


async def test_a_post_route_takes_no_query_parameters(planned: HttpApi) -> None:
    """Parameters of a POST route belong in its body: a query string is refused, not ignored."""
    answer = await planned.call(
        "POST",
        "/v1/orgs/acme/quota:check?hold=true",
        body={"units": {"pages": 1}},
        token=SERVICE_TOKEN,
    )
    assert answer.status == 400
    assert answer.fields == ["hold"]


async def test_a_path_org_that_contradicts_the_body_is_400(planned: HttpApi) -> None:
    """/v1/orgs/acme/... with "orgId": "other" in the body is refused, not silently resolved."""
    answer = await planned.call(
        "POST",
        "/v1/orgs/acme/usage:record",
        body={"orgId": "other", "requestId": "r1", "units": {"pages": 1}},
        token=SERVICE_TOKEN,
    )
    assert answer.status == 400
    assert answer.fields == ["org_id"]
    assert await committed_pages(planned) == "0"
    assert await committed_pages(planned, "other") == "0"


async def test_unknown_plan_is_404_and_missing_plan_is_400(api: HttpApi) -> None:
    """GetPlan of an org with no plan is 404 PLAN_NOT_FOUND; a check for it is 400
    FAILED_PRECONDITION (PLAN_MISSING), as Google's mapping says."""
    plan = await api.call("GET", "/v1/orgs/nobody/plan")
    assert (plan.status, plan.body["code"], plan.reason) == (404, 5, "PLAN_NOT_FOUND")
    check = await api.call(
        "POST", "/v1/orgs/nobody/quota:check", body={"units": {"pages": 1}}, token=SERVICE_TOKEN
    )
    assert check.status == 200  # a missing plan is a decision, in the answer
    assert check.body["allowed"] is False
    assert check.body["reason"] == "DECISION_REASON_NO_PLAN"


async def test_a_reused_request_id_is_409(planned: HttpApi) -> None:
    """The same request id with another payload is 409 ALREADY_EXISTS (REQUEST_ID_REUSED);
    the same payload again is 200 and marked duplicate, counted once."""
    body = {"requestId": "job-1", "units": {"pages": 3}}
    first = await planned.call("POST", "/v1/orgs/acme/usage:record", body=body, token=SERVICE_TOKEN)
    again = await planned.call("POST", "/v1/orgs/acme/usage:record", body=body, token=SERVICE_TOKEN)
    other = await planned.call(
        "POST",
        "/v1/orgs/acme/usage:record",
        body={"requestId": "job-1", "units": {"pages": 4}},
        token=SERVICE_TOKEN,
    )
    assert (first.status, again.status) == (200, 200)
    assert again.body["duplicate"] is True
    assert (other.status, other.body["code"], other.reason) == (409, 6, "REQUEST_ID_REUSED")
    assert await committed_pages(planned) == "3"


async def test_unknown_routes_and_methods_are_status_json(api: HttpApi) -> None:
    """No route is 404 NOT_FOUND, a route without that method is 405 with Allow; both JSON."""
    missing = await api.call("GET", "/v1/orgs/acme/nothing")
    assert (missing.status, missing.body["code"]) == (404, 5)
    wrong = await api.call("DELETE", "/v1/orgs/acme/usage")
    assert (wrong.status, wrong.body["code"]) == (405, 12)
    assert wrong.headers["Allow"] == "GET"


async def test_a_body_over_the_limit_is_413(planned: HttpApi) -> None:
    """A body over 4 MiB (gRPC's message limit) is 413 RESOURCE_EXHAUSTED, not read."""
    huge = b'{"requestId": "' + b"x" * (4 * 1024 * 1024 + 10) + b'"}'
    answer = await planned.call(
        "POST",
        "/v1/orgs/acme/usage:record",
        raw=huge,
        headers={"Content-Type": "application/json"},
        token=SERVICE_TOKEN,
    )
    assert (answer.status, answer.body["code"]) == (413, 8)


@pytest.fixture
async def limited_api(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[HttpApi]:
    async for running in running_api(
        closed_settings(settings, read_rate_limit=1, read_burst=2), redis_client, clock
    ):
        yield running


async def test_a_read_flood_is_429_with_retry_after(limited_api: HttpApi) -> None:
    """With 1 read/s and a burst of 2, a key's third read is 429 RATE_LIMIT_EXCEEDED with
    Retry-After and RetryInfo; a second later it reads again."""
    created = await limited_api.call("POST", "/v1/orgs/acme/apiKeys", body={"name": "k"})
    key = created.body["secret"]
    for _ in range(2):
        assert (await limited_api.call("GET", "/v1/usage", token=key)).status == 200
    flooded = await limited_api.call("GET", "/v1/usage", token=key)
    assert (flooded.status, flooded.reason) == (429, "RATE_LIMIT_EXCEEDED")
    assert flooded.headers["Retry-After"] == "1"
    retry = [d for d in flooded.body["details"] if d["@type"].endswith("RetryInfo")]
    assert retry and retry[0]["retryDelay"].endswith("s")
    limited_api.clock.advance(1)
    assert (await limited_api.call("GET", "/v1/usage", token=key)).status == 200


async def test_an_unreachable_store_is_503(settings: Settings, clock: ManualClock) -> None:
    """With Redis unreachable, every route answers 503 UNAVAILABLE (STORE_UNAVAILABLE),
    never 500."""
    dead = closed_settings(
        settings, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_seconds=0.5
    )
    client = connect_redis(dead.redis_url, dead)
    try:
        async for api in running_api(dead, client, clock):
            for verb, path, body in (
                ("POST", "/v1/orgs/acme/quota:check", {"units": {"pages": 1}}),
                ("POST", "/v1/orgs/acme/usage:record", {"requestId": "r", "units": {"pages": 1}}),
                ("GET", "/v1/orgs/acme/usage", None),
            ):
                answer = await api.call(verb, path, body=body, token=SERVICE_TOKEN)
                assert (answer.status, answer.body["code"]) == (503, 14), (path, answer)
                assert answer.reason == "STORE_UNAVAILABLE"
    finally:
        await client.aclose()


async def test_answers_never_carry_a_stack_trace(planned: HttpApi) -> None:
    """Hostile paths and bodies get JSON statuses without Python internals in them."""
    probes = [
        ("GET", "/v1/orgs/%00%ff/usage", None),
        ("GET", "/v1/orgs/" + "a" * 5000 + "/usage", None),
        ("POST", "/v1/orgs/acme/quota:check", {"units": {"pages": 1e300}}),
        ("POST", "/v1/orgs/acme/quota:check", {"units": {"pages": "9" * 40}}),
        ("POST", "/v1/orgs/acme/quota:check", {"holdTtl": "forever"}),
        ("GET", "/v1/orgs/acme/events", {"since": "yesterday"}),
    ]
    for verb, path, data in probes:
        if verb == "GET":
            answer = await planned.call(verb, path, params=data, token=SERVICE_TOKEN)
        else:
            answer = await planned.call(verb, path, body=data, token=SERVICE_TOKEN)
        assert 400 <= answer.status < 500, (path, answer)
        text = str(answer.body)
        assert "Traceback" not in text and 'File "' not in text, text
    assert await committed_pages(planned) == "0"


async def test_the_http_client_library_sees_plain_json(planned: HttpApi) -> None:
    """Every answer, success or failure, is Content-Type application/json."""
    for path in ("/v1/orgs/acme/usage", "/v1/nowhere", "/openapi.json"):
        async with planned.session.get(planned.base + path) as response:
            assert response.content_type == "application/json"
            await response.json()
