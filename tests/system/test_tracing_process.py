"""Tracing in a real `pagemeter-server` process: turned on by the OTEL_* variables,
exported by OTLP to a real receiver, flushed at exit, its trace ids in the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import redis
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.ops.embedded import RedisProcess
from server_process import ServerProcess
from tests.conftest import eagle_plan
from tests.grpc.test_tracing import CALLER_SPAN_ID, CALLER_TRACE_ID, TRACEPARENT, Receiver

CHECK_QUOTA = "pagemeter.v1.QuotaService/CheckQuota"


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    """A real OTLP/gRPC trace receiver on a loopback port."""
    found = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield found, port
    server.stop(None)


def test_a_server_process_exports_its_spans_at_exit_and_logs_their_ids(
    redis_server: RedisProcess,
    redis_sync: redis.Redis,
    receiver: tuple[Receiver, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """pagemeter-server with OTEL_EXPORTER_OTLP_ENDPOINT set continues a caller's traceparent, sends its spans (service "pagemeter") to the receiver by the time it has stopped, even with a batch delay longer than its life, and its JSON access line names the span."""
    found, port = receiver
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # only the exit flush sends
    server = ServerProcess.pagemeter(
        ["--redis-url", redis_server.url, "--dev-open-access"], tmp_path / "server.log"
    )
    server.start()
    try:
        server.wait_until_serving()
        with grpc.insecure_channel(server.target) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                admin_pb2.SetPlanRequest(plan=eagle_plan()), timeout=10
            )
            quota_pb2_grpc.QuotaServiceStub(channel).CheckQuota(
                quota_pb2.CheckQuotaRequest(org_id="acme", units={"pages": 1}),
                metadata=(("traceparent", TRACEPARENT),),
                timeout=10,
            )
        assert not found.requests, "spans left before the batch delay or the exit"
    finally:
        assert server.stop() == 0, server.log_tail()
    spans = {
        span.name: (resource_spans.resource, span)
        for request in found.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    }
    resource, check = spans[CHECK_QUOTA]
    assert {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"] == (
        "pagemeter"
    )
    assert check.trace_id == CALLER_TRACE_ID.to_bytes(16, "big")
    assert check.parent_span_id == CALLER_SPAN_ID.to_bytes(8, "big")
    assert "script check" in spans
    text = server.log_text()
    assert "tracing on: spans of service pagemeter exported by otlp" in text
    (line,) = [
        entry
        for entry in (json.loads(raw) for raw in text.splitlines() if raw.startswith("{"))
        if entry.get("logger") == "pagemeter.access" and entry.get("rpc") == "CheckQuota"
    ]
    assert line["trace_id"] == f"{CALLER_TRACE_ID:032x}"
    assert line["span_id"] == check.span_id.hex()
