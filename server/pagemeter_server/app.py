"""Assembling and running the service.

`create_server` builds a grpc.aio server on a given store (tests bind port 0 and
get the real port back). `main` is the `pagemeter-server` command: it starts the
embedded Redis server when no Redis URL is configured, serves gRPC and the
Prometheus exporter, and shuts down gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
import redis.exceptions
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from pagemeter.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    reporting_pb2,
    reporting_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from pagemeter_server.api.admin import AdminService
from pagemeter_server.api.auth import (
    Authenticator,
    Credentials,
    check_open_access,
    load_credentials,
)
from pagemeter_server.api.billing import BillingService
from pagemeter_server.api.events import EventService
from pagemeter_server.api.interceptors import ObservedRegistration, ObservedRpcs
from pagemeter_server.api.quota import QuotaService
from pagemeter_server.api.ratelimit import RateLimitService
from pagemeter_server.api.reporting import ReportingService
from pagemeter_server.api.tracing import TracedRpcs
from pagemeter_server.api.webhooks import WebhookService
from pagemeter_server.dispatch.dispatcher import Dispatcher
from pagemeter_server.dispatch.metrics import DispatchMetrics
from pagemeter_server.domain.clock import Clock, RedisClock, SystemClock
from pagemeter_server.domain.errors import ConfigurationError
from pagemeter_server.gateway.server import Gateway, RunningGateway, start_gateway
from pagemeter_server.ops.alert_sweep import sweeping
from pagemeter_server.ops.embedded import EmbeddedRedisError, RedisProcess
from pagemeter_server.ops.exporter import register_org_exporter
from pagemeter_server.ops.health import HealthReporter, watching
from pagemeter_server.ops.lifecycle import InUse, Phase
from pagemeter_server.ops.limits import (
    BoundedHealthServicer,
    return_freed_memory,
    server_options,
    start_metrics_server,
)
from pagemeter_server.ops.logs import setup_logging
from pagemeter_server.ops.metrics import ServiceMetrics
from pagemeter_server.ops.tracing import TRACER_NAME, tracing
from pagemeter_server.settings import Settings, parse_settings, split_host_port
from pagemeter_server.store.admin import AdminStore
from pagemeter_server.store.billing import BillingStore
from pagemeter_server.store.connections import close_redis, connect_redis
from pagemeter_server.store.events import EventStore
from pagemeter_server.store.plan_migration import migrate_plans, plans_migrated, summary
from pagemeter_server.store.quota import Store
from pagemeter_server.store.replica_acks import ReplicaAcks
from pagemeter_server.store.reports import ReportStore
from pagemeter_server.store.sentinel import (
    check_sentinel_access,
)
from pagemeter_server.store.webhooks import WebhookStore
from pagemeter_server.workers import supervise

log = logging.getLogger("pagemeter")

SERVICE_NAMES = (
    quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    reporting_pb2.DESCRIPTOR.services_by_name["ReportingService"].full_name,
    billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    # Envoy's rate-limit protocol on the same port (docs/envoy.md).
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def build_store(
    client: aioredis.Redis,
    settings: Settings,
    metrics: ServiceMetrics,
    tracer_provider: TracerProvider | None = None,
) -> Store:
    return Store(
        client,
        default_timezone=settings.default_timezone,
        record_retention_days=settings.record_retention_days,
        usage_retention_days=settings.usage_retention_days,
        max_records_per_org=settings.max_records_per_org,
        max_unplanned_metrics=settings.max_unplanned_metrics,
        max_document_types=settings.max_document_types,
        audit_max_events=settings.audit_max_events,
        event_max_per_org=settings.max_events_per_org,
        event_retention_days=settings.event_retention_days,
        coalesce=settings.redis_pipelining,
        observer=metrics.observe_script,
        replica_acks=(
            ReplicaAcks(
                client,
                settings.replica_acks,
                settings.replica_ack_timeout_seconds,
                settings.redis_timeout_seconds,
            )
            if settings.replica_acks
            else None
        ),
        tracer=tracer_provider.get_tracer(TRACER_NAME) if tracer_provider else None,
    )


def rpc_interceptors(
    metrics: ServiceMetrics, settings: Settings, tracer_provider: TracerProvider | None = None
) -> list[Any]:
    """The server interceptors, outermost first. gRPC calls and the HTTP gateway's
    transcoded calls both run through these same instances (for gRPC, the last,
    ObservedRpcs, wraps each handler when it is registered: decision 51).

    The tracing interceptor is outermost, so its span holds the access log line,
    and is left out when tracing is off, so that such a server pays nothing for it.
    """
    del settings  # for interceptors that are configured
    traced = [TracedRpcs(tracer_provider)] if tracer_provider is not None else []
    return [*traced, ObservedRpcs(metrics)]


@dataclass
class ServerParts:
    """What create_server built, for callers that need more than the server."""

    health: AsyncHealthServicer
    metrics: ServiceMetrics
    reporter: HealthReporter
    store: Store
    clock: Clock
    # For the HTTP/JSON API (gateway/), which calls the same servicers through
    # the same interceptors: the servicers by full service name.
    servicers: dict[str, Any]
    interceptors: list[Any]


async def create_server(
    settings: Settings,
    client: aioredis.Redis,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    listen: str | None = None,
    credentials: Credentials | None = None,
    tracer_provider: TracerProvider | None = None,
) -> tuple[grpc.aio.Server, int, ServerParts]:
    """Build (not start) a gRPC server on `client`; bind `listen` (port 0 allowed).

    Returns the server, the bound port, and its health servicer and metrics.
    With `tracer_provider`, every RPC and script call is traced (ops/tracing.py).
    Raises ConfigurationError when there are no credentials and open access is
    not allowed (see auth.check_open_access).
    """
    address = listen or settings.listen
    credentials = credentials if credentials is not None else Credentials()
    check_open_access(settings, credentials, address)
    metrics = ServiceMetrics(registry if registry is not None else CollectorRegistry())
    store = build_store(client, settings, metrics, tracer_provider)
    clock = clock or (RedisClock() if settings.clock == "redis" else SystemClock())
    health_servicer = BoundedHealthServicer(settings.max_health_watchers)
    reporter = HealthReporter(
        health_servicer,
        metrics,
        SERVICE_NAMES,
        clock=clock if isinstance(clock, RedisClock) else None,
        allow_volatile_store=settings.allow_volatile_store,
    )
    store.available = reporter.allows
    admin_store = AdminStore(store)
    auth = Authenticator(
        credentials,
        admin_store,
        clock,
        open_access=settings.dev_open_access,
        read_rate=settings.read_rate_limit,
        read_burst=settings.read_burst,
    )
    # Connection and stream limits (limits.py, docs/security.md); the memory a
    # flood leaves free in malloc is given back by one thread per process.
    return_freed_memory()
    interceptors = rpc_interceptors(metrics, settings, tracer_provider)
    # ObservedRpcs (last) is applied to each handler as it is registered, not by
    # grpc.aio on every call (api/interceptors.py, ObservedRegistration); the
    # tracing interceptor, when there is one, still wraps it per call.
    observed = interceptors[-1]
    assert isinstance(observed, ObservedRpcs)
    server = grpc.aio.server(
        interceptors=interceptors[:-1] or None,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            *server_options(settings),
        ],
    )
    reports = ReportStore(client)
    servicers: dict[str, Any] = {
        "pagemeter.v1.QuotaService": QuotaService(store, settings, clock, metrics, auth),
        "pagemeter.v1.AdminService": AdminService(store, admin_store, settings, clock, auth),
        "pagemeter.v1.ReportingService": ReportingService(store, reports, clock, auth),
        "pagemeter.v1.BillingService": BillingService(BillingStore(store, reports), clock, auth),
        "pagemeter.v1.EventService": EventService(EventStore(client), auth),
        "pagemeter.v1.WebhookService": WebhookService(WebhookStore(client), settings, clock, auth),
    }
    registration: Any = ObservedRegistration(server, observed)
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(
        servicers["pagemeter.v1.QuotaService"], registration
    )
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
        RateLimitService(servicers["pagemeter.v1.QuotaService"], auth), registration
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        servicers["pagemeter.v1.AdminService"], registration
    )
    reporting_pb2_grpc.add_ReportingServiceServicer_to_server(
        servicers["pagemeter.v1.ReportingService"], registration
    )
    billing_pb2_grpc.add_BillingServiceServicer_to_server(
        servicers["pagemeter.v1.BillingService"], registration
    )
    events_pb2_grpc.add_EventServiceServicer_to_server(
        servicers["pagemeter.v1.EventService"], registration
    )
    webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
        servicers["pagemeter.v1.WebhookService"], registration
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registration)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server_credentials = tls_server_credentials(settings)
    try:
        if server_credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials)
    except RuntimeError as exc:  # grpcio reports a port in use this way
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    # Optimistic until the first probe: serve() probes Redis before it starts.
    await reporter.set(True)
    if settings.org_exporter_max_orgs > 0 and registry is not None:
        register_org_exporter(registry, settings, clock, client)
    return (
        server,
        port,
        ServerParts(
            health=health_servicer,
            metrics=metrics,
            reporter=reporter,
            store=store,
            clock=clock,
            servicers=servicers,
            interceptors=interceptors,
        ),
    )


async def start_http_api(
    settings: Settings, parts: ServerParts, listen: str | None = None
) -> RunningGateway:
    """Serve the HTTP/JSON API (docs/http.md) for the servicers of `parts` on `listen`
    (default --http-listen; port 0 allowed)."""
    gateway = Gateway(
        servicers=parts.servicers,
        interceptors=parts.interceptors,
        metrics=parts.metrics,
        max_in_flight=settings.max_concurrent_rpcs,
        max_body=MAX_MESSAGE_BYTES,
    )
    return await start_gateway(gateway, settings, listen or settings.http_listen)


def tls_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is configured; mutual with a client CA."""
    if not settings.tls_cert_file:
        return None
    try:
        chain = Path(settings.tls_cert_file).read_bytes()
        key = Path(settings.tls_key_file).read_bytes()
        client_ca = (
            Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def set_serving(parts: ServerParts, serving: bool) -> None:
    await parts.reporter.set(serving)


@contextlib.asynccontextmanager
async def redis_for(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """The configured Redis, or the embedded one started (and stopped) here."""
    embedded: RedisProcess | None = None
    url = settings.redis_url
    if not url and settings.redis_mode == "single":
        embedded = RedisProcess(settings.data_dir)
        # Started on the event loop's (main) thread and blocking it: nothing else
        # runs yet, and no cancelled await can leave a half-started Redis behind.
        embedded.start()
        url = embedded.url
        log.info("embedded Redis started (pid %s, data in %s)", embedded.pid, settings.data_dir)
    try:
        client = connect_redis(url, settings)
        try:
            yield client
        finally:
            await close_redis(client)
    finally:
        # Also when connecting or closing the client failed: never leave it running.
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
            log.info("embedded Redis stopped")


async def serve(settings: Settings, phase: Phase | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain for the grace period and stop.

    `phase` follows the run (starting, serving, stopping), so that an error can
    be reported for what it interrupted.
    """
    phase = phase if phase is not None else Phase()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    registry = CollectorRegistry()
    # Credentials are checked before anything starts: a server that would refuse
    # to run must not leave an embedded Redis behind.
    credentials = load_credentials(settings, os.environ)
    check_open_access(settings, credentials, settings.listen)
    if settings.dev_open_access:
        log.warning(
            "OPEN ACCESS: --dev-open-access is on, every caller without credentials is "
            "served as an admin. For development on %s only; never in production.",
            settings.listen,
        )
    # Tracing first: a variable it cannot honour stops the start before Redis does.
    async with tracing() as tracer_provider, redis_for(settings) as client:
        await check_sentinel_access(client)
        server, port, parts = await create_server(
            settings,
            client,
            registry=registry,
            credentials=credentials,
            tracer_provider=tracer_provider,
        )
        http = serve_metrics(settings, registry)
        await parts.reporter.check(client, within=settings.redis_timeout_seconds)
        refuse_volatile_store(parts.reporter, settings)
        if owns_its_store(settings) and not await plans_migrated(client):
            # No server of an earlier release can share this store: migrate now.
            log.info(summary(await migrate_plans(client)))
        # HTTP first: once gRPC health answers SERVING, both listeners are up.
        http_api = await start_http_api(settings, parts) if settings.http_listen else None
        await server.start()
        phase.now = "serving"
        log.info(
            "pagemeter serving gRPC on %s (port %d, %s), HTTP/JSON on %s, metrics on %s",
            settings.listen,
            port,
            _transport(settings),
            f"{_scheme(settings)}://{settings.http_listen}" if http_api is not None else "off",
            f"http://{settings.metrics_listen}/metrics" if settings.metrics_listen else "off",
        )
        dispatching = None
        dispatch_stop = asyncio.Event()
        if settings.webhook_dispatch:
            # One webhook dispatcher in this process (make run); production runs
            # `pagemeter-server dispatch` processes (docs/webhooks.md).
            dispatcher = Dispatcher(
                client, settings, DispatchMetrics(registry), tracer_provider=tracer_provider
            )
            dispatching = asyncio.create_task(dispatcher.run(dispatch_stop))
            log.info("webhook dispatcher %s started in this process", dispatcher.owner)
        async with (
            watching(parts.reporter, client, settings.health_interval_seconds),
            sweeping(parts.store, client, parts.clock, settings.alert_sweep_seconds),
        ):
            await stop.wait()
            phase.now = "stopping"
            log.info("shutting down: draining for up to %.1fs", settings.grace_period_seconds)
            dispatch_stop.set()
            await parts.reporter.drain()
            # Both listeners drain their calls in progress for the grace period.
            await asyncio.gather(
                server.stop(settings.grace_period_seconds),
                *([http_api.stop()] if http_api is not None else []),
            )
            if dispatching is not None:
                await dispatching
        if http is not None:
            http.shutdown()
    log.info("pagemeter stopped")


def serve_metrics(settings: Settings, registry: CollectorRegistry) -> Any:
    """The Prometheus HTTP server on --metrics-listen (None when it is off)."""
    if not settings.metrics_listen:
        return None
    host, metrics_port = split_host_port(settings.metrics_listen)
    try:
        http, _thread = start_metrics_server(metrics_port, host, registry)
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {settings.metrics_listen}: {exc.strerror or exc}"
        ) from exc
    return http


def owns_its_store(settings: Settings) -> bool:
    """Whether this process starts the embedded store, which no other server shares."""
    return not settings.redis_url and settings.redis_mode == "single"


async def migrate_stored_plans(settings: Settings) -> None:
    async with redis_for(settings) as client:
        log.info(summary(await migrate_plans(client)))


def migrate_plans_main(argv: Sequence[str]) -> int:
    """`pagemeter-server migrate-plans [flags]`: the migration of stored plans.

    Run once no server of an earlier release uses the store (docs/operations.md).
    """
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    try:
        _run(migrate_stored_plans(settings))
    except (*OPERATOR_ERRORS, redis.exceptions.RedisError) as exc:
        log.error("pagemeter could not migrate the stored plans: %s", exc)
        return 1
    return 0


async def dispatch(settings: Settings, phase: Phase) -> None:
    """Deliver webhooks until SIGTERM or SIGINT (docs/webhooks.md): one of any number
    of dispatchers sharing a store; serves its metrics on --metrics-listen."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if not settings.redis_url and settings.redis_mode == "single":
        raise ConfigurationError(
            "pagemeter-server dispatch needs --redis-url (the store the servers use); with "
            "the embedded store, run the server with --webhook-dispatch instead"
        )
    registry = CollectorRegistry()
    async with tracing() as tracer_provider, redis_for(settings) as client:
        await check_sentinel_access(client)
        http = serve_metrics(settings, registry)
        dispatcher = Dispatcher(
            client, settings, DispatchMetrics(registry), tracer_provider=tracer_provider
        )
        phase.now = "serving"
        log.info(
            "pagemeter webhook dispatcher %s running, metrics on %s",
            dispatcher.owner,
            f"http://{settings.metrics_listen}/metrics" if settings.metrics_listen else "off",
        )
        await dispatcher.run(stop)
        phase.now = "stopping"
        if http is not None:
            http.shutdown()
    log.info("pagemeter webhook dispatcher stopped")


def dispatch_main(argv: Sequence[str]) -> int:
    """`pagemeter-server dispatch [flags]`: a webhook dispatcher process."""
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    phase = Phase()
    try:
        _run(dispatch(settings, phase))
    except (*OPERATOR_ERRORS, redis.exceptions.RedisError) as exc:
        log.error("%s", phase.failure(exc))
        return 1
    return 0


def refuse_volatile_store(reporter: HealthReporter, settings: Settings) -> None:
    """Refuse to start on a store that keeps no append-only file, unless accepted.

    A store pagemeter cannot reach yet is checked by every health probe instead.
    """
    if reporter.persistent is False and not settings.allow_volatile_store:
        raise ConfigurationError(
            "the Redis store keeps no append-only file (appendonly no): every acknowledged "
            "record would be lost at its next restart. Turn on appendonly yes (with "
            "appendfsync everysec or always), or pass --allow-volatile-store to accept that"
        )


def _scheme(settings: Settings) -> str:
    return "https" if settings.tls_cert_file else "http"


def _transport(settings: Settings) -> str:
    if not settings.tls_cert_file:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file else "TLS"


# Errors with a message an operator can act on: logged as one line, no traceback.
OPERATOR_ERRORS = (OSError, EmbeddedRedisError, ConfigurationError, InUse)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["migrate-plans"]:
        sys.exit(migrate_plans_main(args[1:]))
    if args[:1] == ["dispatch"]:
        sys.exit(dispatch_main(args[1:]))
    settings = parse_settings(args)
    if settings.workers > 1:
        setup_logging(settings.log_level, settings.log_format)
        phase = Phase()
        try:
            sys.exit(supervise(settings, phase))
        except OPERATOR_ERRORS as exc:
            log.error("%s", phase.failure(exc))
            sys.exit(1)
    main_with_settings(settings)


def main_with_settings(settings: Settings) -> None:
    """One server process (also each worker of --workers N)."""
    setup_logging(settings.log_level, settings.log_format)
    phase = Phase()
    try:
        _run(serve(settings, phase))
    except OPERATOR_ERRORS as exc:
        # Start-up problems are one clear line; so is a failure after the server
        # served, which must not read as a failed start (and still exits 1).
        log.error("%s", phase.failure(exc))
        sys.exit(1)


def _run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed on Linux
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


if __name__ == "__main__":
    main()
