"""Traces exported by OTLP, when the standard OTEL_* variables ask for them.

Off by default: a server with none of the variables set builds no tracer
provider, installs no tracing interceptor and gives its store no tracer, so no
call pays for tracing (docs/performance.md). On, the process gets an SDK
tracer provider with a batching OTLP/gRPC exporter; everything else the
variables say (endpoint, headers, TLS, sampler, batch sizes, resource
attributes) is read by the OpenTelemetry SDK itself, as the specification
describes, so pagemeter adds no settings of its own (docs/operations.md,
"Tracing").

The provider is passed to create_server rather than only installed as the
global one: OpenTelemetry's global provider can be set once per process, and
tests build servers with providers of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from pagemeter_server import __version__
from pagemeter_server.domain.errors import ConfigurationError

log = logging.getLogger("pagemeter")

DEFAULT_SERVICE_NAME = "pagemeter"
# The instrumentation scope of every span pagemeter makes.
TRACER_NAME = "pagemeter_server"
_TRUE = frozenset({"true", "1", "yes"})
# The only protocol the bundled exporter speaks (opentelemetry-exporter-otlp-proto-grpc).
OTLP_PROTOCOL = "grpc"


def _otlp_exporter() -> SpanExporter:
    # Imported only when wanted: the exporter pulls in the OTLP protobuf modules.
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        # xds-protos (Envoy's protos, decision 46) ships an old copy of
        # opentelemetry-proto's modules; installed after it, it breaks the exporter
        # (grpc/grpc#42926). `make install` reinstalls opentelemetry-proto last.
        raise ConfigurationError(
            f"the OTLP exporter cannot be loaded ({exc}): the opentelemetry-proto "
            "modules were overwritten by xds-protos' older copy; reinstall them with "
            "`pip install --force-reinstall --no-deps opentelemetry-proto`"
        ) from exc

    # Its endpoint, headers, TLS, compression and timeout come from the variables.
    return OTLPSpanExporter()


# The exporters OTEL_TRACES_EXPORTER may name, by name. pagemeter ships otlp; `make
# bench` adds one that drops every span, to measure what tracing itself costs.
EXPORTERS: dict[str, Callable[[], SpanExporter]] = {"otlp": _otlp_exporter}


def _exporters(environ: Mapping[str, str]) -> set[str]:
    """The trace exporters the variables name ("none" and empty mean none).

    Unlike the specification's default of "otlp", an unset OTEL_TRACES_EXPORTER
    means none unless an OTLP endpoint is configured: a server must not start
    sending spans to localhost:4317 because nobody said otherwise.
    """
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return {"otlp"} if endpoint else set()
    return {name.strip() for name in named.split(",") if name.strip() not in ("", "none")}


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables in `environ` turn traces on.

    Raises ConfigurationError for an exporter or protocol pagemeter cannot honour,
    so that an operator who asked for traces is not silently given none.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporters = _exporters(environ)
    unknown = exporters - EXPORTERS.keys()
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={environ.get('OTEL_TRACES_EXPORTER')}: pagemeter exports "
            "traces by otlp only (or none)"
        )
    if "otlp" not in exporters:
        return bool(exporters)
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or OTLP_PROTOCOL
    )
    if protocol.strip().lower() != OTLP_PROTOCOL:
        raise ConfigurationError(
            f"OTLP protocol {protocol!r}: pagemeter's exporter speaks grpc only "
            "(OTEL_EXPORTER_OTLP_PROTOCOL=grpc, a collector's port 4317)"
        )
    return True


def service_resource() -> Resource:
    """The resource of pagemeter's spans: what OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME say, service.name "pagemeter" when neither names one."""
    detected = Resource.create({"service.version": __version__})
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def environment_tracer_provider() -> TracerProvider | None:
    """A tracer provider exporting as the process's OTEL_* variables say (by OTLP), or
    None when they leave tracing off. Not made the global one (see setup_tracing)."""
    if not tracing_wanted(os.environ):
        return None
    # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on),
    # the batching from OTEL_BSP_*.
    provider = TracerProvider(resource=service_resource())
    for name in sorted(_exporters(os.environ)):
        provider.add_span_processor(BatchSpanProcessor(EXPORTERS[name]()))
    return provider


def setup_tracing() -> TracerProvider | None:
    """The process's tracer provider exporting by OTLP, or None when tracing is off.

    The provider is also made OpenTelemetry's global one, for any library code
    that asks for it (the global can be set once per process: a server process
    calls this once); shutdown_tracing() on the way out flushes its spans.
    """
    provider = environment_tracer_provider()
    if provider is None:
        return None
    trace.set_tracer_provider(provider)
    # The endpoint is not logged: like the Redis URL, it may carry credentials.
    log.info(
        "tracing on: spans of service %s exported by %s",
        provider.resource.attributes.get(SERVICE_NAME),
        ", ".join(sorted(_exporters(os.environ))),
    )
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Export the spans still queued and stop the exporter (blocking: call in a thread)."""
    if provider is not None:
        provider.shutdown()


@contextlib.asynccontextmanager
async def tracing() -> AsyncIterator[TracerProvider | None]:
    """A process's tracing for the block (None when off); its last spans flushed at
    the end, in a thread, so the exporter's wait does not stall the event loop."""
    provider = setup_tracing()
    try:
        yield provider
    finally:
        await asyncio.to_thread(shutdown_tracing, provider)
