"""The SDK's part in traces: each call carries the caller's trace context, so the
server's spans join the caller's trace (async and blocking clients alike).

The caller's span and the server's come from one tracer provider of the test's
own, with the SDK's in-memory exporter, against a real server and Redis.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pagemeter_client import AsyncPagemeterClient
from tests.client.client_flavours import Connect
from tests.conftest import RunningServer, eagle_plan

# The async client sends check_quota in a CheckQuotaBatch (coalescing), the blocking
# client as CheckQuota: the server span is one or the other.
CHECK_QUOTA = (
    "pagemeter.v1.QuotaService/CheckQuota",
    "pagemeter.v1.QuotaService/CheckQuotaBatch",
)


async def finished(spans: InMemorySpanExporter, name: str | tuple[str, ...]) -> ReadableSpan:
    """The one ended span named `name` (or one of the names), waiting up to two seconds for it."""
    names = (name,) if isinstance(name, str) else name
    deadline = time.monotonic() + 2
    while True:
        found = [span for span in spans.get_finished_spans() if span.name in names]
        if found or time.monotonic() > deadline:
            (span,) = found
            return span
        await asyncio.sleep(0.005)


async def with_plan(client: AsyncPagemeterClient, spans: InMemorySpanExporter) -> None:
    await client.set_plan(eagle_plan())
    await finished(spans, "pagemeter.v1.AdminService/SetPlan")
    spans.clear()


async def test_sdk_calls_join_the_callers_trace(
    connect: Connect,
    traced_server: RunningServer,
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
) -> None:
    """A call made inside the caller's span carries its traceparent: one trace id from the caller's span through the server span to the script span, each the parent of the next."""
    async with connect(traced_server.target) as client:
        await with_plan(client, spans)
        tracer = tracer_provider.get_tracer("a document worker")
        with tracer.start_as_current_span("process document") as caller:
            answer = await client.check_quota("acme", {"pages": 3})
        assert answer.allowed
    server_span = await finished(spans, CHECK_QUOTA)
    script = await finished(spans, ("script check", "script check_batch"))
    caller_context = caller.get_span_context()
    assert server_span.context is not None and script.context is not None
    assert server_span.kind is SpanKind.SERVER
    assert {server_span.context.trace_id, script.context.trace_id} == {caller_context.trace_id}
    assert server_span.parent is not None and server_span.parent.is_remote
    assert server_span.parent.span_id == caller_context.span_id
    assert script.parent is not None and script.parent.span_id == server_span.context.span_id


async def test_sdk_calls_outside_a_span_send_no_trace_context(
    connect: Connect, traced_server: RunningServer, spans: InMemorySpanExporter
) -> None:
    """A call made outside any span carries no trace context: the server span starts a trace of its own."""
    async with connect(traced_server.target) as client:
        await with_plan(client, spans)
        await client.check_quota("acme", {"pages": 3})
    server_span = await finished(spans, CHECK_QUOTA)
    assert server_span.parent is None


async def test_a_traceparent_the_caller_sets_is_sent_once_and_kept(
    connect: Connect,
    traced_server: RunningServer,
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
) -> None:
    """A traceparent given in the client's metadata wins over the current span's, and is not sent twice."""
    given = f"00-{0xABC:032x}-{0xDEF:016x}-01"
    async with connect(traced_server.target, metadata=[("traceparent", given)]) as client:
        await with_plan(client, spans)
        with tracer_provider.get_tracer("worker").start_as_current_span("job"):
            await client.check_quota("acme", {"pages": 3})
    server_span = await finished(spans, CHECK_QUOTA)
    assert server_span.context is not None and server_span.parent is not None
    assert server_span.context.trace_id == 0xABC
    assert server_span.parent.span_id == 0xDEF


async def test_coalesced_calls_keep_each_callers_trace(
    traced_server: RunningServer,
    tracer_provider: TracerProvider,
    spans: InMemorySpanExporter,
) -> None:
    """Concurrent calls made in two different traces never share a batch: each server span is the child of its own caller's span; calls of one trace share one."""
    async with AsyncPagemeterClient(traced_server.target, batch_linger=0.05) as client:
        await with_plan(client, spans)
        tracer = tracer_provider.get_tracer("a document worker")

        async def job(span_name: str, calls: int) -> int:
            with tracer.start_as_current_span(span_name) as caller:
                await asyncio.gather(
                    *(client.check_quota("acme", {"pages": 1}) for _ in range(calls))
                )
            return caller.get_span_context().span_id

        callers = await asyncio.gather(job("first", 3), job("second", 2))
    deadline = time.monotonic() + 2
    while len(server_spans := [s for s in spans.get_finished_spans() if s.name in CHECK_QUOTA]) < 2:
        assert time.monotonic() < deadline, "the batches' server spans did not end"
        await asyncio.sleep(0.005)
    parents = sorted(s.parent.span_id for s in server_spans if s.parent is not None)
    assert len(server_spans) == 2
    assert parents == sorted(callers)


def test_the_client_needs_only_the_opentelemetry_api() -> None:
    """Importing the SDK and making a client loads no module of OpenTelemetry's SDK or exporters, only its API."""
    program = (
        "import sys\n"
        "from pagemeter_client import AsyncPagemeterClient, PagemeterClient\n"
        "PagemeterClient('127.0.0.1:1').close()\n"
        "AsyncPagemeterClient('127.0.0.1:1')\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert 'opentelemetry.propagate' in loaded, loaded\n"
        "heavy = [m for m in loaded if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
