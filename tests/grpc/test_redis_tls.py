"""pagemeter reaches Redis over TLS with a `rediss://` URL.

The redis-server the project bundles is built without TLS, so the suite puts a
TLS terminator in front of it, as a managed Redis or a stunnel sidecar would
be: a loopback proxy with a certificate from a throwaway CA (trustme) that
forwards the decrypted bytes to the plain Redis. The URL names the CA file in
redis-py's own query parameter (`ssl_ca_certs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.app import create_server
from pagemeter_server.ops.embedded import RedisProcess
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import close_redis, connect_redis
from tests.conftest import eagle_plan, exported_committed


class TlsTerminator:
    """A loopback TLS server that forwards each connection to a plain Redis."""

    def __init__(self, context: ssl.SSLContext, upstream_port: int) -> None:
        self.context = context
        self.upstream_port = upstream_port
        self.handshakes = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> TlsTerminator:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # Aborted, not closed: closing a TLS connection whose peer is gone waits for
        # its close_notify for asyncio's SSL shutdown timeout (30 s).
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        pumps = [
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)


async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        sink.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await sink.wait_closed()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def terminator(ca: trustme.CA, redis_server: RedisProcess) -> AsyncIterator[TlsTerminator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    async with TlsTerminator(context, redis_server.port) as proxy:
        yield proxy


async def test_rules_run_over_a_tls_connection_to_redis(
    ca: trustme.CA, terminator: TlsTerminator, tmp_path: Path
) -> None:
    """With a rediss:// URL and the CA that signed Redis's certificate, plans, checks, records, reads and the per-org exporter all work, over TLS only."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    url = f"rediss://127.0.0.1:{terminator.port}/0?ssl_ca_certs={ca_file}"
    settings = Settings(
        redis_url=url, listen="127.0.0.1:0", metrics_listen="", dev_open_access=True
    )
    client = connect_redis(url, settings)
    await client.flushall()
    registry = CollectorRegistry()
    server, port, _ = await create_server(settings, client, registry=registry)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                admin_pb2.SetPlanRequest(plan=eagle_plan())
            )
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            check = await quota.CheckQuota(
                quota_pb2.CheckQuotaRequest(
                    org_id="acme", units={"pages": 7}, hold=True, request_id="job-1"
                )
            )
            assert check.allowed
            await quota.RecordUsage(
                quota_pb2.RecordUsageRequest(org_id="acme", request_id="job-1", units={"pages": 7})
            )
            usage = await quota.GetUsage(quota_pb2.GetUsageRequest(org_id="acme"))
            assert {m.metric: m.committed for m in usage.metrics}["pages"] == 7
        exported = await exported_committed(registry, "acme")
        assert exported == 7, "the exporter's own client connects over TLS too"
    finally:
        await server.stop(None)
        await close_redis(client)
    assert terminator.handshakes >= 2, "the service and the exporter each made a TLS connection"


async def test_a_redis_certificate_from_another_ca_is_refused(
    terminator: TlsTerminator, tmp_path: Path
) -> None:
    """A certificate the configured CA did not sign fails the connection: no call is made in the clear or to an impostor."""
    ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    url = f"rediss://127.0.0.1:{terminator.port}/0?ssl_ca_certs={ca_file}"
    settings = Settings(redis_url=url, listen="127.0.0.1:0", metrics_listen="")
    client = connect_redis(url, settings)
    try:
        with pytest.raises(Exception, match="certificate verify failed"):
            await client.ping()
    finally:
        await close_redis(client)
