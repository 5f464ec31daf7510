"""The tracing interceptor: a server span around every unary RPC.

Installed outermost (app.rpc_interceptors) and only when tracing is on, so a
server without tracing pays nothing for it. The span continues the caller's
W3C trace context (`traceparent`, `tracestate`) from the call's metadata, which
for the HTTP/JSON gateway's transcoded calls is the HTTP request's headers;
the store's script spans (store/quota.py) become its children, and the access
log line written inside it (ObservedRpcs) carries its trace id.

The interceptor relies on nothing of the servicer context but code() and
details(): the HTTP gateway runs these same interceptor instances with a
context of its own that implements only part of grpc.aio's.

Streaming RPCs (health Watch, reflection) and health Check pass through untouched:
a load balancer's probe every second would otherwise fill the traces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from pagemeter_server import __version__
from pagemeter_server.api.interceptors import _decision_of, _org_of, _split_method
from pagemeter_server.api.transport import current_transport
from pagemeter_server.ops.tracing import TRACER_NAME

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor

# The codes of a failure on the server's side (OpenTelemetry's semantic conventions
# for gRPC servers): the span's status is ERROR. The others (a refused argument, a
# missing credential, a caller that went away) are the caller's, and leave it unset.
SERVER_FAILURES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


# Services whose calls are not traced: the probes of load balancers and orchestrators.
UNTRACED_SERVICES = frozenset({"grpc.health.v1.Health"})


class _MetadataGetter(Getter[Mapping[str, str]]):
    """Reads the propagation headers from a call's text metadata."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _MetadataGetter()


def caller_context(metadata: Iterable[tuple[str, Any]] | None) -> Context:
    """The trace context a caller sent (W3C traceparent/tracestate, and baggage, or
    whatever OTEL_PROPAGATORS names); an empty one when it sent none. Binary
    metadata (`-bin` keys) carries no trace context and is skipped."""
    carrier = {name.lower(): value for name, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier, getter=_GETTER)


def _status_code(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: OK, what the handler aborted with, CANCELLED
    when the caller went away, UNKNOWN for anything else."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    # An abort sets the context's code (also the gateway's context, whatever it raises).
    code = cast(grpc.StatusCode | None, context.code())
    return code if code is not None and code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN


def _end_attributes(span: Span, request: Any, response: Any) -> None:
    """The organization, request id and decision, as the access log has them."""
    org = _org_of(request)
    if org:
        span.set_attribute("pagemeter.org_id", org)
    request_id = getattr(request, "request_id", "")
    if isinstance(request_id, str) and request_id:
        span.set_attribute("pagemeter.request_id", request_id)
    for name, value in _decision_of(response).items():
        span.set_attribute(f"pagemeter.{name}", value)


def _record_outcome(
    span: Span, code: grpc.StatusCode, context: Any, error: BaseException | None
) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_FAILURES:
        details = context.details() if error is not None else None
        span.set_status(Status(StatusCode.ERROR, details or code.name))
        if error is not None and not isinstance(error, grpc.aio.AbortError):
            span.record_exception(error)


class TracedRpcs(_ServerInterceptor):
    """A SERVER span per unary RPC, named `<service>/<method>`, parented to the
    caller's span when its metadata carries a trace context."""

    def __init__(self, tracer_provider: TracerProvider) -> None:
        self.tracer: Tracer = tracer_provider.get_tracer(TRACER_NAME, __version__)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        if service in UNTRACED_SERVICES:
            return handler
        # grpc.aio handlers are coroutine functions; the stubs type them as plain ones.
        behavior: Any = handler.unary_unary
        parent = caller_context(handler_call_details.invocation_metadata)
        tracer = self.tracer

        async def traced(request: Any, context: Any) -> Any:
            with tracer.start_as_current_span(
                f"{service}/{method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    "pagemeter.transport": current_transport(),
                },
                # The outcome is recorded below, as a status code rather than as
                # an exception: an abort is how every refusal leaves a handler.
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                response = None
                error: BaseException | None = None
                try:
                    response = await behavior(request, context)
                    return response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    # A span the sampler left out records nothing: skip the work.
                    if span.is_recording():
                        _end_attributes(span, request, response)
                        _record_outcome(span, _status_code(context, error), context, error)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
