"""The HTTP/JSON API tier: a real pagemeter server (gRPC and HTTP listeners) on the
suite's Redis, reached by a real HTTP client (aiohttp's) over loopback."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from pagemeter_server.api.auth import Credentials, Role
from pagemeter_server.app import create_server, start_http_api
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings

ADMIN_TOKEN = "admin-token-0123456789abcdef"
SERVICE_TOKEN = "service-token-0123456789abcdef"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # the decoded JSON

    @property
    def reason(self) -> str:
        """The ErrorInfo reason of a google.rpc.Status answer ('' when none)."""
        for detail in self.body.get("details", []):
            if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
                return str(detail.get("reason", ""))
        return ""

    @property
    def fields(self) -> list[str]:
        """The fields a google.rpc.BadRequest in the answer names."""
        return [
            violation["field"]
            for detail in self.body.get("details", [])
            if detail.get("@type", "").endswith("google.rpc.BadRequest")
            for violation in detail.get("fieldViolations", [])
        ]


@dataclass
class HttpApi:
    base: str
    session: aiohttp.ClientSession
    clock: ManualClock
    registry: CollectorRegistry
    grpc_target: str

    async def call(
        self,
        verb: str,
        path: str,
        *,
        token: str | None = ADMIN_TOKEN,
        body: Any = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data: Any = io.BytesIO(raw) if raw is not None else None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            verb, self.base + path, data=data, params=params, headers=sent
        ) as response:
            text = await response.read()
            decoded = json.loads(text) if text else None
            return Answer(response.status, dict(response.headers), decoded)


def credentials() -> Credentials:
    creds = Credentials()
    creds.add(Role.ADMIN, "ops", ADMIN_TOKEN)
    creds.add(Role.SERVICE, "workers", SERVICE_TOKEN)
    return creds


def closed_settings(settings: Settings, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "redis_url": settings.redis_url,
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "http_listen": "127.0.0.1:0",
        "read_rate_limit": 1000,
        "read_burst": 1000,
    }
    fields.update(overrides)
    return Settings(**fields)


async def running_api(
    settings: Settings,
    client: aioredis.Redis,
    clock: ManualClock,
    tracer_provider: TracerProvider | None = None,
) -> AsyncIterator[HttpApi]:
    registry = CollectorRegistry()
    server, port, parts = await create_server(
        settings,
        client,
        clock=clock,
        registry=registry,
        credentials=credentials(),
        tracer_provider=tracer_provider,
    )
    await server.start()
    gateway = await start_http_api(settings, parts)
    scheme = "https" if settings.tls_cert_file else "http"
    async with aiohttp.ClientSession() as session:
        try:
            yield HttpApi(
                f"{scheme}://127.0.0.1:{gateway.port}",
                session,
                clock,
                registry,
                f"127.0.0.1:{port}",
            )
        finally:
            await gateway.stop()
            await server.stop(None)


@pytest.fixture
async def api(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[HttpApi]:
    """A pagemeter server with admin and service tokens (no open access) and its HTTP API."""
    async for running in running_api(closed_settings(settings), redis_client, clock):
        yield running
