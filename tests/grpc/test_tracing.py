"""Traces: the server span of each RPC, the script spans under it, the caller's trace
context, the trace id in the log line, OTLP export, and tracing off by default.

Spans are read from the OpenTelemetry SDK's in-memory exporter of a tracer
provider the test passes to create_server (tests/conftest.py), after real calls
over gRPC against a real Redis; the OTLP test sends them to a real OTLP/gRPC
receiver served by the test.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.api.auth import Authenticator, Credentials
from pagemeter_server.api.quota import QuotaService
from pagemeter_server.api.tracing import TracedRpcs
from pagemeter_server.api.transport import reset_transport, set_transport
from pagemeter_server.app import rpc_interceptors
from pagemeter_server.dispatch.dispatcher import Dispatcher
from pagemeter_server.dispatch.metrics import DispatchMetrics
from pagemeter_server.dispatch.sender import Sender
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.domain.events import Event
from pagemeter_server.domain.webhooks import Endpoint, SigningSecret, new_secret
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.ops.logs import JsonLines
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.ops.tracing import (
    environment_tracer_provider,
    service_resource,
    setup_tracing,
    tracing_wanted,
)
from pagemeter_server.settings import Settings
from pagemeter_server.store.admin import AdminStore
from tests.conftest import RunningServer, eagle_plan, serving

CHECK_QUOTA = "pagemeter.v1.QuotaService/CheckQuota"
RECORD_USAGE = "pagemeter.v1.QuotaService/RecordUsage"
# A W3C trace context as a caller that traces sends it (version 00, sampled).
CALLER_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


async def finished(spans: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    """The ended spans named `name` once there are `count`, or after two seconds: a
    refused call's status reaches its caller when the handler aborts, a moment
    before the server span ends."""
    deadline = time.monotonic() + 2
    while True:
        found = [span for span in spans.get_finished_spans() if span.name == name]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.005)


async def logged(written: io.StringIO) -> None:
    """Once a line is written, or after two seconds (the access line is written as
    the call ends, a moment after its answer may have reached the caller)."""
    deadline = time.monotonic() + 2
    while True:
        if written.getvalue() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.005)


def children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        span
        for span in spans.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


async def plan(server: RunningServer, spans: InMemorySpanExporter) -> None:
    """acme's plan (Eagle Doc's), its SetPlan span left out of what the test reads."""
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    await finished(spans, "pagemeter.v1.AdminService/SetPlan")
    spans.clear()


async def test_check_quota_span_carries_org_method_decision_and_transport(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """A CheckQuota makes one SERVER span with the rpc.* attributes, the organization, the decision's reason and the transport, and a child span for its check script."""
    await plan(traced_server, spans)
    await traced_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 3000})
    )
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.kind is SpanKind.SERVER
    assert dict(server_span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "pagemeter.v1.QuotaService",
        "rpc.method": "CheckQuota",
        "pagemeter.transport": "grpc",
        "pagemeter.org_id": "acme",
        "pagemeter.allowed": False,
        "pagemeter.reason": "HARD_LIMIT_EXCEEDED",
        "pagemeter.duplicate": False,
        "rpc.grpc.status_code": 0,
    }
    assert server_span.status.status_code is StatusCode.UNSET
    (script,) = children(spans, server_span)
    assert script.name == "script check"
    assert script.kind is SpanKind.CLIENT
    assert script.attributes is not None
    assert script.attributes["pagemeter.script"] == "check"
    assert script.attributes["db.system.name"] == "redis"
    assert script.context is not None and server_span.context is not None
    assert script.context.trace_id == server_span.context.trace_id


async def test_record_usage_span_carries_status_and_duplicate(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """RecordUsage's span carries its request id, status and whether it was a duplicate, and its record script is a child."""
    await plan(traced_server, spans)
    request = quota_pb2.RecordUsageRequest(
        org_id="acme", request_id="job-1", units={"pages": 5}, success=True
    )
    await traced_server.quota.RecordUsage(request)
    await traced_server.quota.RecordUsage(request)
    first, again = await finished(spans, RECORD_USAGE, 2)
    for span, duplicate in ((first, False), (again, True)):
        attributes = span.attributes or {}
        assert attributes["pagemeter.request_id"] == "job-1"
        assert attributes["pagemeter.status"] == "RECORD_STATUS_COMPLETED"
        assert attributes["pagemeter.duplicate"] is duplicate
        assert [child.name for child in children(spans, span)] == ["script record"]


async def test_traceparent_in_raw_grpc_metadata_parents_the_server_span(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """A caller's W3C traceparent in plain gRPC metadata makes the server span its child, in the caller's trace."""
    await plan(traced_server, spans)
    await traced_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}),
        metadata=(("traceparent", TRACEPARENT),),
    )
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.context is not None and server_span.parent is not None
    assert server_span.context.trace_id == CALLER_TRACE_ID
    assert server_span.parent.span_id == CALLER_SPAN_ID
    assert server_span.parent.is_remote
    (script,) = children(spans, server_span)
    assert script.context is not None and script.context.trace_id == CALLER_TRACE_ID


async def test_a_caller_that_samples_a_trace_out_gets_no_spans(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """A traceparent whose sampled flag is off is followed: neither the server span nor the script span is recorded."""
    await plan(traced_server, spans)
    not_sampled = TRACEPARENT[:-2] + "00"
    await traced_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}),
        metadata=(("traceparent", not_sampled),),
    )
    await traced_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})
    )
    (recorded,) = await finished(spans, CHECK_QUOTA)
    assert recorded.parent is None  # only the second call, which named no trace
    assert [span.name for span in spans.get_finished_spans()] == ["script check", CHECK_QUOTA]


async def test_health_checks_are_not_traced(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """grpc.health.v1 Check, which load balancers call every second or so, makes no span; the next call does."""
    health = health_pb2_grpc.HealthStub(traced_server.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    await traced_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    await finished(spans, "pagemeter.v1.AdminService/SetPlan")
    names = [span.name for span in spans.get_finished_spans()]
    assert "pagemeter.v1.AdminService/SetPlan" in names
    assert not [name for name in names if "Health" in name]


async def test_a_call_without_trace_context_starts_a_trace(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """Without a traceparent the server span is the root of a new trace."""
    await plan(traced_server, spans)
    await traced_server.quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})
    )
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.parent is None


async def test_a_refused_call_records_its_code_and_is_no_server_error(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """An INVALID_ARGUMENT answer is recorded as rpc.grpc.status_code 3 and leaves the span's status unset: the caller erred, not the server."""
    with pytest.raises(grpc.aio.AioRpcError):
        await traced_server.quota.CheckQuota(quota_pb2.CheckQuotaRequest(org_id=""))
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.attributes is not None
    assert (
        server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    assert server_span.status.status_code is StatusCode.UNSET


async def test_a_store_failure_marks_the_server_and_script_spans_as_errors(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """When the health probe finds the organization's Redis down, the UNAVAILABLE answer sets status ERROR on the server span and on the script span that failed."""
    await plan(traced_server, spans)
    traced_server.parts.store.available = lambda keys: False
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await traced_server.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1})
        )
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.attributes is not None
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert server_span.status.status_code is StatusCode.ERROR
    (script,) = children(spans, server_span)
    assert script.status.status_code is StatusCode.ERROR
    assert [event.name for event in script.events] == ["exception"]


async def test_the_access_log_line_carries_the_trace_and_span_ids(
    traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """The JSON access line of a traced call, as the server's handler writes it, names the server span's trace id and span id."""
    await plan(traced_server, spans)
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(JsonLines())
    access = logging.getLogger("pagemeter.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        await traced_server.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}),
            metadata=(("traceparent", TRACEPARENT),),
        )
        (server_span,) = await finished(spans, CHECK_QUOTA)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    (line,) = [json.loads(text) for text in written.getvalue().splitlines()]
    assert server_span.context is not None
    assert line["rpc"] == "CheckQuota"
    assert line["trace_id"] == f"{CALLER_TRACE_ID:032x}"
    assert line["span_id"] == f"{server_span.context.span_id:016x}"


# -- the HTTP gateway's way of calling ------------------------------------------------


class GatewayContext:
    """What the HTTP/JSON gateway hands a handler: only these methods of a context."""

    def __init__(self, headers: Sequence[tuple[str, str]]) -> None:
        self.headers = tuple(headers)
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.headers

    def time_remaining(self) -> float | None:
        return 5.0

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._trailing = metadata

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: Sequence[tuple[str, str]]) -> None:
        self.method = method
        self.invocation_metadata = tuple(metadata)


class Registered:
    """Collects the method handlers a generated add_*Servicer_to_server registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for method, handler in handlers.items():
            self.handlers[f"/{service}/{method}"] = handler


async def through_interceptors(
    interceptors: Sequence[Any],
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    headers: Sequence[tuple[str, str]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler as the gateway runs it: wrapped by each interceptor, outermost first."""

    async def innermost(_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    continuation: Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
    ] = innermost
    for interceptor in reversed(interceptors):

        async def wrapped(
            details: grpc.HandlerCallDetails,
            interceptor: Any = interceptor,
            inner: Any = continuation,
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return await interceptor.intercept_service(inner, details)  # type: ignore[no-any-return]

        continuation = wrapped
    return await continuation(Details(method, headers))


async def gateway_call(
    handler: grpc.RpcMethodHandler[Any, Any], request: Any, context: GatewayContext
) -> Any:
    """`await handler.unary_unary(request, context)`, as the gateway calls it."""
    # grpc.aio handlers are coroutine functions; the stubs type them as plain ones.
    behaviour: Any = handler.unary_unary
    return await behaviour(request, context)


@pytest.fixture
async def gateway_handlers(
    traced_server: RunningServer, settings: Settings, clock: ManualClock
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The real QuotaService method handlers on the traced server's store."""
    store = traced_server.parts.store
    auth = Authenticator(
        Credentials(), AdminStore(store), clock, open_access=True, read_rate=0, read_burst=1
    )
    registered = Registered()
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(
        QuotaService(store, settings, clock, traced_server.parts.metrics, auth),
        registered,  # type: ignore[arg-type]
    )
    return registered.handlers


async def test_gateway_calls_are_traced_with_their_transport_and_headers(
    traced_server: RunningServer,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    gateway_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
) -> None:
    """A call run as the HTTP gateway runs it (the same interceptors, the headers as metadata, a partial context) is traced with transport http, under the traceparent header's trace, its script span a child."""
    await plan(traced_server, spans)
    interceptors = rpc_interceptors(
        traced_server.parts.metrics, Settings(), tracer_provider=tracer_provider
    )
    assert isinstance(interceptors[0], TracedRpcs)
    headers = [("content-type", "application/json"), ("traceparent", TRACEPARENT)]
    handler = await through_interceptors(
        interceptors, gateway_handlers[f"/{CHECK_QUOTA}"], f"/{CHECK_QUOTA}", headers
    )
    token = set_transport("http")
    try:
        answer = await gateway_call(
            handler,
            quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 3}),
            GatewayContext(headers),
        )
    finally:
        reset_transport(token)
    assert answer.allowed
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.attributes is not None
    assert server_span.attributes["pagemeter.transport"] == "http"
    assert server_span.attributes["pagemeter.reason"] == "WITHIN_QUOTA"
    assert server_span.context is not None and server_span.context.trace_id == CALLER_TRACE_ID
    assert [child.name for child in children(spans, server_span)] == ["script check"]


async def test_gateway_refusals_record_the_code_its_context_was_given(
    traced_server: RunningServer,
    spans: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    gateway_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
) -> None:
    """A call the handler refuses through the gateway's context is recorded with the code it aborted with."""
    interceptors = rpc_interceptors(
        traced_server.parts.metrics, Settings(), tracer_provider=tracer_provider
    )
    handler = await through_interceptors(
        interceptors, gateway_handlers[f"/{CHECK_QUOTA}"], f"/{CHECK_QUOTA}", []
    )
    context = GatewayContext([])
    with pytest.raises(grpc.aio.AbortError):
        await gateway_call(handler, quota_pb2.CheckQuotaRequest(org_id=""), context)
    (server_span,) = await finished(spans, CHECK_QUOTA)
    assert server_span.attributes is not None
    assert (
        server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )


# -- webhook deliveries -------------------------------------------------------------------


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[list[dict[str, str]], list[int], str]]:
    """A real HTTP receiver on a loopback port: the headers of each delivery it got,
    the statuses it answers with (in turn), and its URL (with a token in the query)."""
    seen: list[dict[str, str]] = []
    answers: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=answers.pop(0) if answers else 204)

    app = web.Application()
    app.router.add_post("/hooks", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield seen, answers, f"http://127.0.0.1:{port}/hooks?token=receiver-secret"
    await runner.cleanup()


async def test_a_webhook_delivery_is_a_span_whose_context_reaches_the_receiver(
    hooks: tuple[list[dict[str, str]], list[int], str],
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
) -> None:
    """Each delivery attempt of a tracing dispatcher is a CLIENT span naming the event and endpoint (the host, never the URL's query), its traceparent reaches the receiver, and a refused delivery is an ERROR with its HTTP status."""
    seen, answers, url = hooks
    sender = Sender(5.0, 4, tracer_provider.get_tracer("test"))
    endpoint = Endpoint(
        endpoint_id="we_1",
        org_id="acme",
        url=url,
        event_types=(),
        description="",
        enabled=True,
        created_ms=0,
        updated_ms=0,
        start_ms=0,
        secrets=(SigningSecret(new_secret(), 0),),
    )
    event = Event("acme", "1700000000000-0", 1, "threshold.crossed", 1_700_000_000_000, {})
    answers.append(500)
    try:
        refused = await sender.send(endpoint, event, 1_700_000_000_000)
        delivered = await sender.send(endpoint, event, 1_700_000_000_000)
    finally:
        await sender.close()
    assert (refused.ok, delivered.ok) == (False, True)
    first, second = spans.get_finished_spans()
    for span, headers in ((first, seen[0]), (second, seen[1])):
        assert span.name == "webhook delivery" and span.kind is SpanKind.CLIENT
        assert span.context is not None
        # version 00, this span's trace and id, then the flags (sampled, and the SDK's
        # "random trace id" bit of W3C Trace Context level 2).
        assert headers["traceparent"].startswith(
            f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-"
        )
        attributes = dict(span.attributes or {})
        assert "receiver-secret" not in str(attributes)
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["pagemeter.event_id"] == "acme:1700000000000-0"
        assert attributes["pagemeter.endpoint_id"] == "we_1"
    assert first.attributes is not None and first.attributes["http.response.status_code"] == 500
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.UNSET


def test_a_dispatcher_without_tracing_sends_no_trace_context() -> None:
    """A dispatcher built without a tracer provider (tracing off) gives its sender no tracer."""
    settings = Settings(redis_url="redis://127.0.0.1:1")
    dispatcher = Dispatcher(aioredis.Redis(), settings, DispatchMetrics(CollectorRegistry()))
    assert dispatcher.sender.tracer is None


# -- off by default -------------------------------------------------------------------


async def test_tracing_is_off_by_default(
    pagemeter_server: RunningServer,
    settings: Settings,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no OTEL_* variable set no tracer provider or exporter is built, no tracing interceptor is installed, the store has no tracer, and a call carrying a traceparent is logged without a trace id."""
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    assert environment_tracer_provider() is None
    assert setup_tracing() is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    interceptors = rpc_interceptors(ServiceMetrics(CollectorRegistry()), settings)
    assert not any(isinstance(interceptor, TracedRpcs) for interceptor in interceptors)
    assert pagemeter_server.parts.store._tracer is None
    await pagemeter_server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(JsonLines())
    access = logging.getLogger("pagemeter.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        await pagemeter_server.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}),
            metadata=(("traceparent", TRACEPARENT),),
        )
        await logged(written)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    (line,) = [json.loads(text) for text in written.getvalue().splitlines()]
    assert line["rpc"] == "CheckQuota"
    assert "trace_id" not in line and "span_id" not in line
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
    ],
)
def test_which_variables_turn_tracing_on(environ: dict[str, str], wanted: bool) -> None:
    """Tracing is on only when an OTLP exporter or endpoint is named, and OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER=none turn it off."""
    assert tracing_wanted(environ) is wanted


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_variables_pagemeter_cannot_honour_stop_the_start(environ: dict[str, str]) -> None:
    """An exporter other than otlp, or an OTLP protocol other than grpc, is a configuration error rather than traces silently lost."""
    from pagemeter_server.domain.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        tracing_wanted(environ)


def test_service_name_is_pagemeter_unless_the_variables_name_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spans' service.name is "pagemeter" by default, OTEL_SERVICE_NAME's when set."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service_resource().attributes["service.name"] == "pagemeter"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "quota-eu")
    assert service_resource().attributes["service.name"] == "quota-eu"


# -- OTLP export -------------------------------------------------------------------------


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as a collector serves it: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    """A real OTLP/gRPC receiver on a loopback port (a thread-pool server: the exporter
    blocks its caller, which here is the test's event loop's thread pool)."""
    found = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield found, port
    server.stop(None)


@pytest.fixture
async def otlp_server(
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    receiver: tuple[Receiver, int],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[RunningServer, TracerProvider]]:
    """A server tracing as the OTEL_* variables say: OTLP to the receiver, service name billing-edge."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver[1]}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-edge")
    provider = environment_tracer_provider()
    assert provider is not None
    async with serving(settings, redis_client, clock, tracer_provider=provider) as running:
        yield running, provider


async def test_spans_are_exported_by_otlp_when_the_variables_say_so(
    otlp_server: tuple[RunningServer, TracerProvider], receiver: tuple[Receiver, int]
) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the server span and its script span reach an OTLP/gRPC receiver at the provider's shutdown, under OTEL_SERVICE_NAME."""
    server, provider = otlp_server
    await server.admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()))
    await server.quota.CheckQuota(quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}))
    await asyncio.to_thread(provider.shutdown)  # flushes the batch, as the process does at exit
    found, _port = receiver
    exported = [
        (resource_spans.resource, span)
        for request in found.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    names = {span.name for _resource, span in exported}
    assert {CHECK_QUOTA, "script check", "pagemeter.v1.AdminService/SetPlan"} <= names
    resource, _span = exported[0]
    service = {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"]
    assert service == "billing-edge"
