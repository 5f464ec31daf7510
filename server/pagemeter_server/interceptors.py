"""Server interceptors: what must happen around every RPC, before any handler.

Request bytes that do not decode (a corrupt message, invalid UTF-8 in a string)
fail inside gRPC's own deserializer, before a handler or its error mapping
runs, and grpc.aio would answer UNKNOWN with the parser's internals in the
message. This interceptor turns them into a plain INVALID_ARGUMENT instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


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


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class RefuseUndecodableRequests(_ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        # grpc.aio handlers are coroutine functions; the stubs type them as plain ones.
        behavior: Any = handler.unary_unary
        method = handler_call_details.method

        def tolerant_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                return _Undecodable()

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort_with_status(_undecodable_status(method))  # type: ignore[attr-defined]
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=tolerant_deserialize,
            response_serializer=handler.response_serializer,
        )
