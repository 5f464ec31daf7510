"""Traces of HTTP calls: the same server span as a gRPC call's (from the same
interceptor), parented by the caller's W3C traceparent header, with the Redis script
span under it, marked transport http."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from tests.conftest import eagle_plan
from tests.http.conftest import SERVICE_TOKEN, HttpApi, closed_settings, running_api

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN_ID:016x}-01"


@pytest.fixture
async def traced_api(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    tracer_provider: TracerProvider,
) -> AsyncIterator[HttpApi]:
    async for running in running_api(
        closed_settings(settings), redis_client, clock, tracer_provider
    ):
        yield running


async def ended(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The span named `name` once it has ended (the answer may arrive a moment before)."""
    deadline = time.monotonic() + 2
    while True:
        found = [span for span in spans.get_finished_spans() if span.name == name]
        if found or time.monotonic() > deadline:
            assert found, [span.name for span in spans.get_finished_spans()]
            return found[-1]
        await asyncio.sleep(0.005)


async def test_an_http_call_joins_the_callers_trace(
    traced_api: HttpApi, spans: InMemorySpanExporter
) -> None:
    """A CheckQuota over HTTP with a traceparent header is a server span of the caller's
    trace, child of the caller's span, with org, decision and transport http, and the
    check script's span is its child."""
    plan = json_format.MessageToDict(eagle_plan("acme"))
    assert (await traced_api.call("PUT", "/v1/orgs/acme/plan", body={"plan": plan})).status == 200
    spans.clear()
    answer = await traced_api.call(
        "POST",
        "/v1/orgs/acme/quota:check",
        body={"units": {"pages": 5}},
        token=SERVICE_TOKEN,
        headers={"traceparent": TRACEPARENT},
    )
    assert answer.status == 200
    server = await ended(spans, "pagemeter.v1.QuotaService/CheckQuota")
    assert server.context is not None and server.parent is not None
    assert server.context.trace_id == TRACE_ID
    assert server.parent.span_id == PARENT_SPAN_ID
    attributes = dict(server.attributes or {})
    assert attributes["pagemeter.transport"] == "http"
    assert attributes["pagemeter.org_id"] == "acme"
    assert attributes["pagemeter.reason"] == "WITHIN_QUOTA"
    scripts = [
        span
        for span in spans.get_finished_spans()
        if span.parent is not None and span.parent.span_id == server.context.span_id
    ]
    assert [span.name for span in scripts] == ["script check"]
