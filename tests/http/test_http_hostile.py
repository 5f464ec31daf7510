"""Hostile HTTP input: arbitrary paths, query strings and JSON bodies on every route
never get a 5xx or a non-JSON answer, and a refused call changes nothing in Redis."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagemeter_server.gateway.routes import Route, routes
from tests.conftest import examples
from tests.http.conftest import ADMIN_TOKEN, SERVICE_TOKEN, HttpApi

ROUTES = routes()
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
# Field names the requests have, so that some bodies reach the handlers' validation.
KNOWN_KEYS = st.sampled_from(
    [
        "orgId",
        "org_id",
        "units",
        "requestId",
        "hold",
        "holdTtl",
        "items",
        "plan",
        "metric",
        "year",
        "month",
        "period",
        "groupBy",
        "pageSize",
        "pageToken",
        "since",
        "types",
        "url",
        "reason",
    ]
)
BODIES = st.dictionaries(KNOWN_KEYS | st.text(max_size=8), JSON_VALUES, max_size=5)
QUERIES = st.lists(st.tuples(KNOWN_KEYS | st.text(max_size=8), st.text(max_size=20)), max_size=4)
SEGMENTS = st.text(min_size=1, max_size=40)


def snapshot(client: redis.Redis) -> dict[Any, Any]:
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


def fill(route: Route, values: list[str]) -> str:
    path = route.template
    for name, value in zip(route.path_fields, values, strict=False):
        path = path.replace("{" + name + "}", quote(value, safe=""))
    return path


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(ROUTES),
    values=st.lists(SEGMENTS, min_size=3, max_size=3),
    body=BODIES,
    query=QUERIES,
    as_service=st.booleans(),
)
async def test_hostile_calls_get_json_answers_and_refusals_change_nothing(
    api: HttpApi,
    redis_sync: redis.Redis,
    route: Route,
    values: list[str],
    body: dict[str, Any],
    query: list[tuple[str, str]],
    as_service: bool,
) -> None:
    """Any path values, query and body on any route: a JSON answer, never 5xx; when the
    answer is a refusal, Redis holds exactly what it held before."""
    before = snapshot(redis_sync)
    token = SERVICE_TOKEN if as_service else ADMIN_TOKEN
    path = fill(route, values)
    if route.body == "*":
        answer = await api.call(route.verb, path, body=body, token=token)
    else:
        answer = await api.call(route.verb, path, params=query, token=token)
    assert answer.status < 500, (route.template, answer)
    assert isinstance(answer.body, dict), answer
    if answer.status >= 400:
        assert isinstance(answer.body.get("code"), int) and answer.body["message"], answer
        assert snapshot(redis_sync) == before, (route.template, answer)
