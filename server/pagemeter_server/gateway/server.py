"""The HTTP/JSON API: pagemeter's RPCs over HTTP, on aiohttp's server.

Every route comes from the contract (routes.py). A call is transcoded into the
RPC's request message and handed to the very servicer method gRPC calls,
through the very server interceptors gRPC calls run through: authentication,
authorization, validation, the rules, rate limits, the access log and tracing
are one implementation for both transports. Only the framing differs: JSON in
protobuf's canonical mapping, and failures as google.rpc.Status JSON with the
HTTP status of Google's mapping (docs/http.md).

The server runs on the process's event loop beside grpc.aio, with the gRPC
port's TLS settings, and CORS when origins are configured.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp_cors
import grpc
from aiohttp import web
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from pagemeter_server.api.transport import reset_transport, set_transport
from pagemeter_server.domain.errors import ConfigurationError
from pagemeter_server.gateway.context import HttpAbort, HttpServicerContext
from pagemeter_server.gateway.routes import Route, routes, variable_name
from pagemeter_server.gateway.transcode import (
    Refused,
    bind_path,
    http_status,
    parse_body,
    refusal,
    retry_after_seconds,
    set_query,
    status_json,
    status_of,
    to_json,
)
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.settings import Settings, split_host_port

log = logging.getLogger("pagemeter.http")

JSON = "application/json"
OPENAPI_PATH = "/openapi.json"
# Headers that never become call metadata: a cookie is no credential of pagemeter's.
_NOT_METADATA = frozenset({"cookie"})
# Headers a browser page may send and read (CORS).
CORS_REQUEST_HEADERS = ("Authorization", "X-Api-Key", "Content-Type", "traceparent", "tracestate")
CORS_EXPOSED_HEADERS = ("Retry-After",)

Interceptor = Any  # grpc.aio.ServerInterceptor; the stubs make it generic


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


def openapi_document() -> bytes:
    """The OpenAPI document generated from the contract (tools/openapi.py)."""
    return resources.files("pagemeter_server.gateway").joinpath("openapi.json").read_bytes()


@dataclass
class Gateway:
    """What an HTTP call needs: the servicers by service name, the interceptors."""

    servicers: Mapping[str, Any]
    interceptors: Sequence[Interceptor]
    metrics: ServiceMetrics
    max_in_flight: int
    max_body: int
    in_flight: int = 0
    # Each route's servicer method as a gRPC method handler, built on its first call.
    _bases: dict[str, grpc.RpcMethodHandler[Any, Any]] = field(default_factory=dict)

    async def answer(self, route: Route, request: web.Request) -> web.Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await self._answer(route, request)
            status = response.status
            return response
        finally:
            self.metrics.http_requests.labels(route.template, route.verb, str(status)).inc()
            self.metrics.http_seconds.labels(route.template, route.verb).observe(
                time.perf_counter() - started
            )

    async def _answer(self, route: Route, request: web.Request) -> web.Response:
        if self.in_flight >= self.max_in_flight:
            return failure_response(
                status_pb2.Status(
                    code=code_pb2.RESOURCE_EXHAUSTED,
                    message="too many requests in progress on this server; retry shortly",
                )
            )
        self.in_flight += 1
        try:
            message: Message | Refused = await transcoded(route, request, self.max_body)
            return await self._call(route, request, message)
        finally:
            self.in_flight -= 1

    async def _call(
        self, route: Route, request: web.Request, message: Message | Refused
    ) -> web.Response:
        metadata = tuple(
            (name.lower(), value)
            for name, value in request.headers.items()
            if name.lower() not in _NOT_METADATA
        )
        context = HttpServicerContext(metadata, f"ipv4:{request.remote or ''}")
        token = set_transport("http")
        try:
            handler = await self._intercepted(route, _CallDetails(route.full_method, metadata))
            behavior: Callable[[Any, Any], Awaitable[Message]] = handler.unary_unary  # type: ignore[assignment]
            answer = await behavior(message, context)
        except HttpAbort as abort:
            return failure_response(status_of(abort.status), getattr(message, "http_status", None))
        except Exception:
            log.exception("internal error answering %s %s", route.verb, route.template)
            return failure_response(
                status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
            )
        finally:
            reset_transport(token)
        return web.Response(body=to_json(answer), content_type=JSON)

    async def _intercepted(
        self, route: Route, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The route's handler, wrapped by each interceptor as grpc.aio would wrap it
        (per call: an interceptor may read the call's metadata, as tracing does)."""
        base = self._bases.get(route.full_method)
        if base is None:
            base = self._bases[route.full_method] = self._base_handler(route)

        async def through(index: int, call: grpc.HandlerCallDetails) -> Any:
            if index == len(self.interceptors):
                return base
            return await self.interceptors[index].intercept_service(
                lambda next_call: through(index + 1, next_call), call
            )

        return await through(0, details)  # type: ignore[no-any-return]

    def _base_handler(self, route: Route) -> grpc.RpcMethodHandler[Any, Any]:
        """The servicer method of `route`, answering a refused transcoding by aborting."""
        method = getattr(self.servicers[route.service], route.method.name)

        async def behavior(request: Message | Refused, context: HttpServicerContext) -> Message:
            if isinstance(request, Refused):
                await context.abort_with_status(rpc_status.to_status(request.status))
            return await method(request, context)  # type: ignore[no-any-return]

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=_identity, response_serializer=_identity
        )


def _identity(value: Any) -> Any:
    return value


class _TooLarge(Refused):
    http_status = 413


async def transcoded(route: Route, request: web.Request, max_body: int) -> Message | Refused:
    """The request message of a call, or why there is none (answered by the chain)."""
    message: Message = message_factory.GetMessageClass(route.method.input_type)()
    try:
        if route.body == "*":
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise _TooLarge(
                    status_pb2.Status(
                        code=code_pb2.RESOURCE_EXHAUSTED,
                        message=f"the request body is larger than {max_body} bytes",
                    )
                ) from None
            parse_body(message, body)
            if request.query:
                raise refusal(
                    code_pb2.INVALID_ARGUMENT,
                    "this route takes its parameters in the JSON body, not in the query string",
                    field=next(iter(request.query)),
                )
        bound = {name: request.match_info[variable_name(name)] for name in route.path_fields}
        bind_path(message, bound)
        if route.body != "*":
            set_query(message, request.query.items(), set(route.path_fields))
    except Refused as refused:
        return refused
    return message


def failure_response(status: status_pb2.Status, http: int | None = None) -> web.Response:
    headers = {}
    retry_after = retry_after_seconds(status)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(
        status=http or http_status(status.code),
        body=status_json(status),
        content_type=JSON,
        headers=headers,
    )


@web.middleware
async def statuses_for_unknown_routes(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A path or method no route has is answered as google.rpc.Status JSON too."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return failure_response(
            status_pb2.Status(
                code=code_pb2.NOT_FOUND,
                message=f"no route {request.method} {request.path}; see {OPENAPI_PATH}",
            )
        )
    except web.HTTPMethodNotAllowed as exc:
        response = failure_response(
            status_pb2.Status(
                code=code_pb2.UNIMPLEMENTED,
                message=f"{request.path} does not take {request.method}; it takes "
                + ", ".join(sorted(exc.allowed_methods)),
            ),
            405,
        )
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response


def build_app(gateway: Gateway, settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[statuses_for_unknown_routes], client_max_size=gateway.max_body
    )
    for route in routes():
        app.router.add_route(route.verb, route.router_path, _handler(gateway, route))
    document = openapi_document()

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type=JSON)

    app.router.add_get(OPENAPI_PATH, openapi)
    origins = cors_origins(settings.http_cors_origins)
    if origins:
        _allow_cors(app, origins)
    return app


def _handler(gateway: Gateway, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return await gateway.answer(route, request)

    return handle


def cors_origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def _allow_cors(app: web.Application, origins: list[str]) -> None:
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,  # credentials travel in headers, never in cookies
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for resource_route in list(app.router.routes()):
        cors.add(resource_route)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC port's TLS for the HTTP port: same certificate, same client CA."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_client_ca_file:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except OSError as exc:
        raise ConfigurationError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return context


@dataclass
class RunningGateway:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stop listening, wait for the calls in progress (up to the grace period)."""
        await self.runner.cleanup()


async def start_gateway(gateway: Gateway, settings: Settings, listen: str) -> RunningGateway:
    """Serve the HTTP/JSON API on `listen` (port 0 allowed) until stopped."""
    host, port = split_host_port(listen)
    app = build_app(gateway, settings)
    # No aiohttp access log: the interceptors log every call once, as for gRPC.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.grace_period_seconds,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, host, port, ssl_context=tls_context(settings), reuse_port=settings.reuse_port
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen for HTTP on {listen}: {exc.strerror or exc}") from exc
    bound = runner.addresses[0][1] if runner.addresses else port
    return RunningGateway(runner, int(bound))
