"""Channel settings both clients share: retries, credentials, TLS, metadata and the stubs.

Each call's metadata also carries the caller's trace context (W3C `traceparent`
and `tracestate`), read with OpenTelemetry's API alone: an application that
traces gets pagemeter's server spans in its own traces, and one that does not
sends nothing more (docs/client.md, "Tracing").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import grpc
import grpc.aio
from opentelemetry import propagate

from pagemeter.v1 import (
    admin_pb2_grpc,
    billing_pb2_grpc,
    events_pb2_grpc,
    quota_pb2_grpc,
    reporting_pb2_grpc,
    webhooks_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0
QUOTA_SERVICE = "pagemeter.v1.QuotaService"
ADMIN_SERVICE = "pagemeter.v1.AdminService"
REPORTING_SERVICE = "pagemeter.v1.ReportingService"
# gRPC caps retryPolicy.maxAttempts at 5 whatever the config says.
MAX_ATTEMPTS_LIMIT = 5
# Calls gRPC must not retry: they are not idempotent. A CreateApiKey whose answer
# was lost has made a key; a retry would make a second one (see docs/client.md).
NOT_RETRIED = ((ADMIN_SERVICE, "CreateApiKey"),)
# Tenant API keys start with this; pagemeter takes their organization from the key.
TENANT_KEY_PREFIX = "pmk_"
# The metadata that carries a credential; the server accepts one of them per call.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})

Metadata = Sequence[tuple[str, str]]
ChannelOptions = Sequence[tuple[str, Any]]

# -- retries and channel options --------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How gRPC retries UNAVAILABLE: attempts in all and the exponential backoff between them.

    gRPC waits a random time between 0 and min(initial_backoff x multiplier^(n-1),
    max_backoff) before attempt n+1, and never past the call's deadline.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoff times and multiplier must be positive")

    def service_config(self) -> str:
        """The channel's `grpc.service_config` JSON: this policy for every pagemeter service."""
        method_config: dict[str, Any] = {
            "name": [
                {"service": QUOTA_SERVICE},
                {"service": ADMIN_SERVICE},
                {"service": REPORTING_SERVICE},
            ],
        }
        # gRPC rejects a retryPolicy with fewer than 2 attempts: one attempt means no policy.
        if self.max_attempts > 1:
            method_config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": _seconds(self.initial_backoff),
                "maxBackoff": _seconds(self.max_backoff),
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return json.dumps({"methodConfig": [method_config]})


def _seconds(value: float) -> str:
    """A protobuf JSON duration ("0.2s"), the form service configs take."""
    return f"{value:.9f}".rstrip("0").rstrip(".") + "s"


def channel_options(retry: RetryPolicy, extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """Channel options that turn on gRPC's own retries with `retry`; `extra` come last.

    The service config is `retry.service_config()` plus a method config without a
    retry policy for each NOT_RETRIED method (a method's own entry wins over its
    service's), so a lost CreateApiKey answer is reported, not retried.
    """
    config = json.loads(retry.service_config())
    config["methodConfig"].append(
        {"name": [{"service": service, "method": method} for service, method in NOT_RETRIED]}
    )
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
        *extra,
    ]


# -- credentials and TLS ----------------------------------------------------------------


def is_tenant_key(token: str | None) -> bool:
    """Whether `token` is a tenant API key (pmk_...), whose reads leave org_id empty."""
    return token is not None and token.startswith(TENANT_KEY_PREFIX)


def _call_metadata(metadata: Metadata, token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of every call: `metadata`, then the token as a Bearer credential.

    The messages of the errors raised here never contain the token.
    """
    pairs = tuple(metadata)
    if token is None:
        return pairs
    # Printable ASCII without spaces: what a metadata value and a Bearer token may be.
    if not token or not all("!" <= char <= "~" for char in token):
        raise ValueError(
            "token must be a non-empty string of printable ASCII characters without spaces"
        )
    if any(name.lower() in CREDENTIAL_HEADERS for name, _ in pairs):
        raise ValueError(
            "give the credential either as token= or as authorization/x-api-key metadata, not both"
        )
    return (*pairs, ("authorization", f"Bearer {token}"))


def _channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    *,
    tls: bool,
    root_certificates: bytes | None,
    client_certificate: bytes | None,
    client_key: bytes | None,
    tls_server_name: str | None,
) -> grpc.ChannelCredentials | None:
    """The channel's credentials: `credentials` as given, TLS built from the options, or None."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together (mutual TLS needs both)")
    if tls and credentials is not None:
        raise ValueError("give either credentials= or tls=True with its options, not both")
    if not tls:
        given = [
            name
            for name, value in (
                ("root_certificates", root_certificates),
                ("client_certificate", client_certificate),
                ("client_key", client_key),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} need tls=True")
        if tls_server_name is not None and credentials is None:
            raise ValueError("tls_server_name needs TLS (tls=True or credentials=)")
        return credentials
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=client_key,
        certificate_chain=client_certificate,
    )


def with_trace_context(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`metadata` and the current trace context, as OTEL_PROPAGATORS says (W3C
    traceparent, tracestate and baggage by default); `metadata` alone outside a
    span. A header the caller set in `metadata` is kept and not sent twice."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return metadata
    given = {name.lower() for name, _ in metadata}
    return (*metadata, *((name, value) for name, value in carrier.items() if name not in given))


class CallOptions(TypedDict):
    """What every call of a client passes besides its request."""

    timeout: float
    metadata: tuple[tuple[str, str], ...]


class _ClientConfig:
    """Settings both clients share: deadline, metadata, credentials and the channel's options.

    The token lives only in `metadata` (as `authorization: Bearer ...`); repr()
    says whether there is one, never what it is.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        max_attempts: int,
        initial_backoff: float,
        max_backoff: float,
        credentials: grpc.ChannelCredentials | None,
        metadata: Metadata,
        options: ChannelOptions,
        token: str | None,
        tls: bool,
        root_certificates: bytes | None,
        client_certificate: bytes | None,
        client_key: bytes | None,
        tls_server_name: str | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive: every call needs a deadline")
        retry = RetryPolicy(max_attempts, initial_backoff, max_backoff)
        self.retry = retry  # the channel's; coalesced calls retry their batch items by it too
        self.target = target
        self.timeout = timeout
        self.metadata = _call_metadata(metadata, token)
        self.has_token = token is not None
        self.credentials = _channel_credentials(
            credentials,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
        )
        extra = list(options)
        if tls_server_name is not None:
            # The name the server's certificate must carry, instead of the target's host.
            extra.append(("grpc.ssl_target_name_override", tls_server_name))
        self.channel_options = channel_options(retry, extra)

    def deadline(self, timeout: float | None) -> float:
        """Seconds the call may take: the per-call value, else the client's."""
        return self.timeout if timeout is None else timeout

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of one call made now: the client's, and the caller's trace context."""
        return with_trace_context(self.metadata)

    def call_options(self, timeout: float | None) -> CallOptions:
        """The deadline and metadata of one call (`**config.call_options(timeout)`)."""
        return CallOptions(timeout=self.deadline(timeout), metadata=self.call_metadata())

    def describe(self, kind: str) -> str:
        """`Kind(target=..., tls=..., token=...)` with the token hidden."""
        token = "<hidden>" if self.has_token else "None"
        tls = self.credentials is not None
        return f"{kind}(target={self.target!r}, tls={tls}, token={token})"

    def __repr__(self) -> str:
        return self.describe(type(self).__name__)


@dataclass(frozen=True)
class _AsyncChannel:
    """An open grpc.aio channel with the stubs of the pagemeter services on it."""

    channel: grpc.aio.Channel
    quota: quota_pb2_grpc.QuotaServiceAsyncStub
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    reporting: reporting_pb2_grpc.ReportingServiceAsyncStub
    billing: billing_pb2_grpc.BillingServiceAsyncStub
    events: events_pb2_grpc.EventServiceAsyncStub
    webhooks: webhooks_pb2_grpc.WebhookServiceAsyncStub

    @classmethod
    def create(cls, config: _ClientConfig, interceptors: Sequence[Any] = ()) -> _AsyncChannel:
        options, credentials = config.channel_options, config.credentials
        watchers = list(interceptors) or None
        channel = (
            grpc.aio.insecure_channel(config.target, options=options, interceptors=watchers)
            if credentials is None
            else grpc.aio.secure_channel(
                config.target, credentials, options=options, interceptors=watchers
            )
        )
        return cls(
            channel,
            quota_pb2_grpc.QuotaServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
            reporting_pb2_grpc.ReportingServiceStub(channel),
            billing_pb2_grpc.BillingServiceStub(channel),
            events_pb2_grpc.EventServiceStub(channel),
            webhooks_pb2_grpc.WebhookServiceStub(channel),
        )


class AsyncStubs:
    """The stubs of the pagemeter services on a grpc.aio channel, opened on first use.

    grpc.aio ties a channel to the event loop it is made in, and a client may be
    built before any loop runs (or in another one): the channel is made by the
    first call, in that call's loop.
    """

    def __init__(self, config: _ClientConfig, observer: Any | None) -> None:
        self._config = config
        self._interceptors = () if observer is None else (observer,)
        self._open: _AsyncChannel | None = None

    def _channel(self) -> _AsyncChannel:
        if self._open is None:
            self._open = _AsyncChannel.create(self._config, self._interceptors)
        return self._open

    @property
    def quota(self) -> quota_pb2_grpc.QuotaServiceAsyncStub:
        return self._channel().quota

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceAsyncStub:
        return self._channel().admin

    @property
    def reporting(self) -> reporting_pb2_grpc.ReportingServiceAsyncStub:
        return self._channel().reporting

    @property
    def billing(self) -> billing_pb2_grpc.BillingServiceAsyncStub:
        return self._channel().billing

    @property
    def events(self) -> events_pb2_grpc.EventServiceAsyncStub:
        return self._channel().events

    @property
    def webhooks(self) -> webhooks_pb2_grpc.WebhookServiceAsyncStub:
        return self._channel().webhooks

    async def close(self) -> None:
        """Close the channel if it was opened (a later call opens a new one)."""
        if self._open is not None:
            channel, self._open = self._open.channel, None
            await channel.close(None)


class Stubs:
    """The stubs of the pagemeter services on a grpc channel, opened at once.

    A blocking channel belongs to no event loop, and threads share it.
    """

    def __init__(
        self,
        config: _ClientConfig,
        observer: Any | None,
    ) -> None:
        options, credentials = config.channel_options, config.credentials
        self.channel = (
            grpc.insecure_channel(config.target, options=options)
            if credentials is None
            else grpc.secure_channel(config.target, credentials, options=options)
        )
        # The channel the stubs call through: intercepted only to observe answers.
        self.watched = (
            self.channel if observer is None else grpc.intercept_channel(self.channel, observer)
        )
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.watched)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.watched)
        self.reporting = reporting_pb2_grpc.ReportingServiceStub(self.watched)
        self.billing = billing_pb2_grpc.BillingServiceStub(self.watched)
        self.events = events_pb2_grpc.EventServiceStub(self.watched)
        self.webhooks = webhooks_pb2_grpc.WebhookServiceStub(self.watched)

    def close(self) -> None:
        self.channel.close()
