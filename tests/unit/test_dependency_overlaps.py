"""Packages that install the same modules: the installed copies work together."""

from __future__ import annotations


def test_the_otlp_exporter_loads_beside_envoys_protos() -> None:
    """With xds-protos installed (Envoy's rate-limit messages), opentelemetry-proto's own
    modules are the ones in place: the OTLP exporter imports (grpc/grpc#42926)."""
    from envoy.service.ratelimit.v3 import rls_pb2
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert rls_pb2.RateLimitRequest.DESCRIPTOR.full_name.startswith("envoy.")
    assert InstrumentationScope.DESCRIPTOR.name == "InstrumentationScope"
    assert OTLPSpanExporter is not None


def test_the_http_annotations_load_beside_envoys_protos() -> None:
    """google.api's http annotations (the HTTP routes) read the same whichever package
    installed google/api last."""
    from google.api import annotations_pb2

    from pagemeter.v1 import quota_pb2

    method = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].methods_by_name["GetUsage"]
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    assert rule.get == "/v1/orgs/{org_id}/usage"
