"""The seed pages' usage endpoints and their query validations, over HTTP as their
callers use them: a tenant's API key, query parameters, the pages' error texts."""

from __future__ import annotations

import pytest
import redis
from google.protobuf import json_format

from tests.conftest import eagle_plan, metric_limits
from tests.http.conftest import SERVICE_TOKEN, HttpApi

SEEDED_AT = "2026-03-15T12:00:00Z"


async def docutray(api: HttpApi) -> str:
    """An org with pages and conversions recorded in March 2026; its tenant key."""
    plan = eagle_plan("acme")
    plan.metrics.append(metric_limits("conversions"))
    answer = await api.call(
        "PUT", "/v1/orgs/acme/plan", body={"plan": json_format.MessageToDict(plan)}
    )
    assert answer.status == 200, answer
    for number, pages in enumerate((1000, 234)):
        recorded = await api.call(
            "POST",
            "/v1/orgs/acme/usage:record",
            body={
                "requestId": f"job-{number}",
                "units": {"pages": pages, "conversions": 89 if number == 0 else 0},
                "completedAt": SEEDED_AT,
            },
            token=SERVICE_TOKEN,
        )
        assert recorded.status == 200, recorded
    created = await api.call("POST", "/v1/orgs/acme/apiKeys", body={"name": "docutray"})
    return str(created.body["secret"])


def docutray_body(usage: dict[str, object]) -> dict[str, object]:
    """DocuTray's GET /api/usage body from the HTTP GetUsage answer."""
    committed = {m["metric"]: int(m["committed"]) for m in usage["metrics"]}  # type: ignore[attr-defined]
    return {
        "year": usage["year"],
        "month": usage["month"],
        "successful_pages": committed.get("pages", 0),
        "successful_conversions": committed.get("conversions", 0),
    }


async def test_docutray_page_example_over_http(api: HttpApi) -> None:
    """GET /v1/usage?year=2026&month=3 with the org's key gives the page's four figures,
    and a month with nothing recorded gives zeros."""
    key = await docutray(api)
    usage = await api.call("GET", "/v1/usage", params={"year": "2026", "month": "3"}, token=key)
    assert usage.status == 200, usage
    assert docutray_body(usage.body) == {
        "year": 2026,
        "month": 3,
        "successful_pages": 1234,
        "successful_conversions": 89,
    }
    empty = await api.call("GET", "/v1/usage", params={"year": "2025", "month": "7"}, token=key)
    assert docutray_body(empty.body)["successful_pages"] == 0


MONTH = "Invalid month. Must be an integer between 1 and 12."
YEAR = "Invalid year. Must be an integer between 2020 and 2100."
TOGETHER = "year and month must be sent together (or both omitted for the current month)"


@pytest.mark.parametrize(
    ("query", "field", "text"),
    [
        ({"year": "2026", "month": "13"}, "month", MONTH),
        ({"year": "2026", "month": "0"}, "month", MONTH),
        ({"year": "2026", "month": "abc"}, "month", MONTH),
        ({"year": "2026", "month": "1.5"}, "month", MONTH),
        ({"year": "2026", "month": ""}, "month", MONTH),
        ({"year": "2019", "month": "5"}, "year", YEAR),
        ({"year": "2101", "month": "1"}, "year", YEAR),
        ({"year": "twenty", "month": "1"}, "year", YEAR),
        ({"year": "99999999999", "month": "1"}, "year", YEAR),
        ({"year": "2026"}, "year", TOGETHER),
        ({"month": "4"}, "month", TOGETHER),
    ],
)
async def test_docutray_validation_texts_over_http(
    api: HttpApi, redis_sync: redis.Redis, query: dict[str, str], field: str, text: str
) -> None:
    """Each bad year/month query is 400 whose message is DocuTray's error text exactly,
    naming the field, with nothing written to the store."""
    key = await docutray(api)
    before = {k: redis_sync.dump(k) for k in redis_sync.keys("*") if "usage" in str(k)}
    answer = await api.call("GET", "/v1/usage", params=query, token=key)
    assert answer.status == 400, answer
    assert {"error": answer.body["message"]} == {"error": text}
    assert answer.fields == [field]
    after = {k: redis_sync.dump(k) for k in redis_sync.keys("*") if "usage" in str(k)}
    assert after == before


async def test_docutray_reads_are_never_quota_blocked(api: HttpApi) -> None:
    """With the documents quota used up (checks denied), the usage read is still 200."""
    key = await docutray(api)
    spent = await api.call(
        "POST",
        "/v1/orgs/acme/usage:record",
        body={"requestId": "big", "units": {"documents": 500}},
        token=SERVICE_TOKEN,
    )
    assert spent.status == 200
    check = await api.call(
        "POST", "/v1/orgs/acme/quota:check", body={"units": {"documents": 1}}, token=SERVICE_TOKEN
    )
    assert check.body["allowed"] is False
    for _ in range(3):
        assert (await api.call("GET", "/v1/usage", token=key)).status == 200


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"period": "yearly"}, "INVALID_PARAMETER"),
        ({"groupBy": "colour"}, "INVALID_PARAMETER"),
        ({"startDate": "26/01/2024"}, "INVALID_DATE_FORMAT"),
        ({"startDate": "2024-01-26", "endDate": "2024-01-19"}, "INVALID_DATE_RANGE"),
        ({"startDate": "2023-01-01", "endDate": "2024-01-26"}, "DATE_RANGE_TOO_LARGE"),
    ],
)
async def test_docurift_error_codes_over_http(
    api: HttpApi, query: dict[str, str], code: str
) -> None:
    """DocuRift's query errors, with its camelCase parameter names, are 400 carrying the
    page's code as the ErrorInfo reason."""
    key = await docutray(api)
    answer = await api.call("GET", "/v1/usage/statistics", params=query, token=key)
    assert answer.status == 400, answer
    assert answer.reason == code
    assert answer.body["message"]


async def test_docurift_daily_statistics_over_http(api: HttpApi) -> None:
    """?period=daily&groupBy=both&startDate=&endDate= answers the page's summary and rows."""
    key = await docutray(api)
    answer = await api.call(
        "GET",
        "/v1/usage/statistics",
        params={
            "period": "daily",
            "groupBy": "both",
            "startDate": "2026-03-14",
            "endDate": "2026-03-16",
        },
        token=key,
    )
    assert answer.status == 200, answer
    assert answer.body["period"] == "STATISTICS_PERIOD_DAILY"
    rows = {row["date"]: row for row in answer.body["byPeriod"]}
    assert set(rows) == {"2026-03-14", "2026-03-15", "2026-03-16"}
    assert answer.body["summary"]["totals"]["pages"] == "1234"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "UNAUTHORIZED"),
        ({"Authorization": "Bearer pmk_bm9ib2R5.0123456789abcdef.x"}, "INVALID_API_KEY"),
    ],
)
async def test_docurift_auth_codes_over_http(
    api: HttpApi, headers: dict[str, str], reason: str
) -> None:
    """No key is 401 UNAUTHORIZED; an unknown key is 401 INVALID_API_KEY."""
    answer = await api.call("GET", "/v1/usage/statistics", token=None, headers=headers)
    assert (answer.status, answer.reason) == (401, reason)
