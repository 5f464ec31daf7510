"""The server interceptor: what happens around every unary RPC, before any handler.

gRPC's services are registered with their handlers already wrapped by it
(ObservedRegistration, decision 51); the HTTP gateway runs it as an interceptor.

- gRPC server metrics with go-grpc-prometheus's names (started, handled by
  code, handling seconds, messages received and sent), for gRPC calls: the
  HTTP gateway's calls (which run through these same interceptors) are counted
  by its own HTTP metrics instead;
- one structured access-log line per call (RPC, org, request id, decision,
  code, latency, and the transport when it is HTTP), never with metadata, so
  no credential can reach the log;
- request bytes that do not decode (a corrupt message, invalid UTF-8 in a
  string) fail inside gRPC's own deserializer, before a handler or its error
  mapping runs, and grpc.aio would answer UNKNOWN with the parser's internals;
  they are answered INVALID_ARGUMENT instead.

Streaming RPCs (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pagemeter_server.api.transport import current_transport
from pagemeter_server.ops.metrics import ServiceMetrics

access_log = logging.getLogger("pagemeter.access")

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class _Undecodable:
    """Stands in for a request whose bytes could not be decoded."""


def _undecodable_status(method: str) -> grpc.Status:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="", description="the request bytes are not a valid message of this RPC"
            )
        ]
    )
    packed = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message=f"the request to {method} could not be decoded (corrupt message or invalid "
        "UTF-8 in a text field)",
    )
    packed.details.add().Pack(detail)
    return rpc_status.to_status(packed)


def _split_method(full: str) -> tuple[str, str]:
    """'/pagemeter.v1.QuotaService/CheckQuota' -> ('pagemeter.v1.QuotaService', 'CheckQuota')."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def _org_of(request: Any) -> str:
    org = getattr(request, "org_id", None)
    if org is None and hasattr(request, "plan"):
        org = request.plan.org_id
    if org is None and hasattr(request, "descriptors"):  # Envoy's RateLimitRequest
        org = _descriptor_value(request, "org_id")
    return str(org or "")


def _request_id_of(request: Any) -> str:
    if hasattr(request, "descriptors"):
        return _descriptor_value(request, "request_id")
    return str(getattr(request, "request_id", ""))


def _descriptor_value(request: Any, key: str) -> str:
    """The first value of `key` in Envoy's descriptors (docs/envoy.md)."""
    for descriptor in request.descriptors:
        for entry in descriptor.entries:
            if entry.key == key:
                return str(entry.value)
    return ""


def _decision_of(response: Any) -> dict[str, Any]:
    """The outcome worth a log field: CheckQuota's decision, RecordUsage's status,
    Envoy's overall code."""
    fields: dict[str, Any] = {}
    if response is None:
        return fields
    descriptor = response.DESCRIPTOR
    if "allowed" in descriptor.fields_by_name and "reason" in descriptor.fields_by_name:
        fields["allowed"] = response.allowed
        fields["reason"] = (
            descriptor.fields_by_name["reason"]
            .enum_type.values_by_number[response.reason]
            .name.removeprefix("DECISION_REASON_")
        )
    if "duplicate" in descriptor.fields_by_name:
        fields["duplicate"] = response.duplicate
    if "overall_code" in descriptor.fields_by_name:  # Envoy's RateLimitResponse
        codes = descriptor.fields_by_name["overall_code"].enum_type
        fields["overall_code"] = codes.values_by_number[response.overall_code].name
    if "status" in descriptor.fields_by_name and descriptor.fields_by_name["status"].enum_type:
        fields["status"] = (
            descriptor.fields_by_name["status"].enum_type.values_by_number[response.status].name
        )
    return fields


class ObservedRpcs(_ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        # Each method's observed handler, built on its first call: gRPC hands
        # the same handler object for a method every time, and building the
        # wrapper (and looking up its metric series) per call cost more than
        # a cheap handler's own work.
        # By method: (gRPC's handler, the observed one).
        self._observed: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        # None (an unknown method) passes through as None: gRPC answers UNIMPLEMENTED.
        observed: Any = self.wrap(handler_call_details.method, handler)
        return cast("grpc.RpcMethodHandler[Any, Any]", observed)

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any] | None
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """`handler` observed (unary handlers; streaming ones and None pass through),
        built once per method and handler."""
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        known = self._observed.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        observed = self._observe(method, handler)
        self._observed[method] = (handler, observed)
        return observed

    def _observe(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserialize = handler.request_deserializer
        assert deserialize is not None  # checked by the caller
        # grpc.aio handlers are coroutine functions; the stubs type them as plain ones.
        behavior: Any = handler.unary_unary
        service, method = _split_method(full_method)
        labels = ("UNARY", service, method)
        metrics = self.metrics
        started_total = metrics.grpc_started.labels(*labels)
        received_total = metrics.grpc_received.labels(*labels)
        sent_total = metrics.grpc_sent.labels(*labels)
        handled_ok = metrics.grpc_handled.labels(*labels, grpc.StatusCode.OK.name)
        seconds = metrics.grpc_seconds.labels(*labels)

        def tolerant_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                return _Undecodable()

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            over_grpc = current_transport() == "grpc"
            if over_grpc:
                started_total.inc()
                received_total.inc()
            response = None
            code = grpc.StatusCode.UNKNOWN
            try:
                if isinstance(request, _Undecodable):
                    await context.abort_with_status(_undecodable_status(full_method))  # type: ignore[attr-defined]
                response = await behavior(request, context)
                code = grpc.StatusCode.OK
                if over_grpc:
                    sent_total.inc()
                return response
            except grpc.aio.AbortError:
                # None would mean grpc set no code; never seen, but a log must not fail.
                code = cast(grpc.StatusCode | None, context.code()) or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the caller went away (deadline, cancel)
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                elapsed = time.perf_counter() - started
                if over_grpc:
                    if code is grpc.StatusCode.OK:
                        handled_ok.inc()
                    else:
                        metrics.grpc_handled.labels(*labels, code.name).inc()
                    seconds.observe(elapsed)
                if access_log.isEnabledFor(logging.INFO):
                    _log_call(method, request, response, code, elapsed, over_grpc)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=tolerant_deserialize,
            response_serializer=handler.response_serializer,
        )


class _ObservedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A service's generic handler whose unary methods come out observed."""

    def __init__(self, inner: Any, observed: ObservedRpcs) -> None:
        self._inner = inner
        self._observed = observed

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        return self._observed.wrap(handler_call_details.method, handler)


class ObservedRegistration:
    """Registers services on a grpc.aio server with their handlers already observed.

    Give it to the generated add_*Servicer_to_server functions in place of the
    server. ObservedRpcs as a gRPC server interceptor costs grpc.aio an
    interceptor pass on every call (about 35 µs of the core here, 9 % of the
    shortest handler's calls per second; docs/performance.md); wrapping each
    handler once, when it is registered, observes the same calls for nothing per
    call. The HTTP gateway still runs ObservedRpcs as an interceptor.
    """

    def __init__(self, server: grpc.aio.Server, observed: ObservedRpcs) -> None:
        self._server = server
        self._observed = observed

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_ObservedGenericHandler(handler, self._observed) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        observed = {
            name: self._observed.wrap(f"/{service}/{name}", handler)
            for name, handler in handlers.items()
        }
        self._server.add_registered_method_handlers(service, observed)  # type: ignore[attr-defined]


def _log_call(
    method: str,
    request: Any,
    response: Any,
    code: grpc.StatusCode,
    elapsed: float,
    over_grpc: bool,
) -> None:
    fields: dict[str, Any] = {"rpc": method, "code": code.name}
    if not over_grpc:
        fields["transport"] = "http"
    if hasattr(request, "DESCRIPTOR"):  # not one that could not be decoded
        org = _org_of(request)
        if org:
            fields["org_id"] = org
        request_id = _request_id_of(request)
        if request_id:
            fields["request_id"] = request_id
    fields.update(_decision_of(response))
    fields["latency_ms"] = round(elapsed * 1000, 3)
    access_log.info("%s %s", method, code.name, extra={"fields": fields})
