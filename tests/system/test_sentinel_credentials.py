"""Sentinels that need credentials, and sentinels behind TLS.

pagemeter gives the sentinels their own username and password (an ACL user, or
the default user's `requirepass`) and TLS, from --sentinel-url, to both of its
sentinel clients: the service's and the per-organization exporter's. The
topology runs on loopback from the binary the project installs: a primary and
a replica that need a password, and three sentinels (quorum 2) that need one
too and use it among themselves (`sentinel sentinel-pass`).

The bundled valkey-server is built without TLS, so the TLS test puts a TLS
terminator (tests/grpc/test_redis_tls.py) in front of each sentinel, as a stunnel
sidecar would, and requires a client certificate there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import trustme
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.app import create_server
from pagemeter_server.domain.errors import ConfigurationError
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.settings import Settings
from pagemeter_server.store.connections import close_redis, connect_redis
from pagemeter_server.store.sentinel import check_sentinel_access
from tests.conftest import eagle_plan, exported_committed
from tests.grpc.test_redis_tls import TlsTerminator
from tests.system.failover_load import Ledger, committed_pages, record, until, worker
from tests.system.test_sentinel import Topology, run_sentinel, running_topology

MASTER = "pagemeter"
PRIMARY_PASSWORD = "primary-pw-8c41d7e2"
# The sentinels' default user (requirepass; the sentinels use it among themselves).
SENTINEL_PASSWORD = "sentinel-pw-3f9a0b6e"
# An ACL user on the sentinels with only what pagemeter asks them: SENTINEL MASTERS.
SENTINEL_USER = "pagemeter"
SENTINEL_USER_PASSWORD = "sentinel-user-pw-51e7c2a4"
SENTINEL_USER_ACL = f"user {SENTINEL_USER} on >{SENTINEL_USER_PASSWORD} -@all +sentinel|masters"
WRONG_PASSWORD = "wrong-pw-0d6b93f1"
SERVER = Path(sys.executable).parent / "pagemeter-server"


def sentinel_config(port: int, home: Path, primary_port: int, requirepass: str) -> str:
    return (
        f"port {port}\nbind 127.0.0.1\ndir {home}\n"
        f"requirepass {requirepass}\n"
        f"sentinel sentinel-pass {requirepass}\n"
        f"{SENTINEL_USER_ACL}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
        f"sentinel auth-pass {MASTER} {PRIMARY_PASSWORD}\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 3000\n"
    )


def start_sentinel(
    folder: Path, name: str, primary_port: int, requirepass: str = SENTINEL_PASSWORD
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    home = folder / name
    return run_sentinel(home, port, sentinel_config(port, home, primary_port, requirepass))


def answers(port: int, password: str) -> bool:
    with (
        contextlib.suppress(redis.exceptions.RedisError),
        redis.Redis(port=port, password=password, socket_timeout=0.5) as client,
    ):
        return bool(client.ping())
    return False


@contextlib.contextmanager
def credentialed_topology(folder: Path) -> Iterator[Topology]:
    """A password-protected primary and replica, three sentinels that need a password too."""
    with running_topology(
        folder,
        password=PRIMARY_PASSWORD,
        config=lambda port, home, primary_port: sentinel_config(
            port, home, primary_port, SENTINEL_PASSWORD
        ),
        sentinel_password=SENTINEL_PASSWORD,
    ) as topology:
        yield topology


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """One topology for the tests that leave it as it was (about 5 s to start)."""
    with credentialed_topology(tmp_path_factory.mktemp("sentinels")) as running:
        yield running


@pytest.fixture
def own_topology(tmp_path: Path) -> Iterator[Topology]:
    """A topology of the test's own, for one that kills its primary."""
    with credentialed_topology(tmp_path) as running:
        yield running


def sentinel_settings(topology: Topology, sentinel_url: str, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "redis_mode": "sentinel",
        "redis_url": f"redis://:{PRIMARY_PASSWORD}@sentinel-named/0",
        "sentinel_url": sentinel_url,
        "sentinels": topology.addresses,
        "sentinel_master": MASTER,
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "dev_open_access": True,
    }
    fields.update(overrides)
    return Settings(**fields).validate()  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
) -> AsyncIterator[tuple[quota_pb2_grpc.QuotaServiceAsyncStub, CollectorRegistry]]:
    """pagemeter on the settings, after the start-up check of the sentinels, with a plan for acme in an emptied store."""
    client = connect_redis(settings.redis_url, settings)
    try:
        await check_sentinel_access(client)
        await client.flushall()
        registry = CollectorRegistry()
        server, port, _ = await create_server(settings, client, registry=registry)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                    admin_pb2.SetPlanRequest(plan=eagle_plan())
                )
                yield quota_pb2_grpc.QuotaServiceStub(channel), registry
        finally:
            await server.stop(None)
    finally:
        await close_redis(client)


async def check_hold_and_record(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, request_id: str
) -> None:
    check = await quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(
            org_id="acme", units={"pages": 3}, hold=True, request_id=request_id
        )
    )
    assert check.allowed
    await quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id="acme", request_id=request_id, units={"pages": 3})
    )


WORKERS = 4


async def test_failover_behind_sentinels_with_an_acl_user(own_topology: Topology) -> None:
    """Sentinels that need a password, reached as an ACL user allowed only SENTINEL MASTERS, in front of a password-protected primary: pagemeter checks, holds and records; after a SIGKILL of the primary it follows the promoted replica with no restart, and so does the exporter's own synchronous client."""
    topology = own_topology
    settings = sentinel_settings(
        topology,
        f"redis://{SENTINEL_USER}:{SENTINEL_USER_PASSWORD}@",
        redis_timeout_seconds=0.5,
    )
    async with serving(settings) as (quota, registry):
        await check_hold_and_record(quota, "job-before")
        assert await exported_committed(registry, "acme") == 3
        ledger = Ledger("acme")
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(worker(quota, ledger, number, stop)) for number in range(WORKERS)
        ]
        try:
            await until(lambda: len(ledger.acked) >= 100, "load before the kill")
            topology.primary.kill()  # SIGKILL, mid-load
            ledger.acked_before_kill = len(ledger.acked)
            await until(
                lambda: len(ledger.acked) >= ledger.acked_before_kill + 100, "after failover"
            )
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert topology.current_primary_port() == topology.replica.port
        assert ledger.refused > 0, "the kill was felt: calls were refused until the promotion"
        await check_hold_and_record(quota, "job-after")
        for request_id in sorted(ledger.acked):  # what asynchronous replication lost, counted again
            await record(quota, "acme", request_id)
        total = await committed_pages(quota, "acme")
        assert total == len(ledger.acked) + 6
        assert await exported_committed(registry, "acme") == total, "the exporter followed"


async def test_the_default_user_password_works_too(topology: Topology) -> None:
    """The sentinels' `requirepass` (their default user, no username in the URL) is enough as well."""
    settings = sentinel_settings(topology, f"redis://:{SENTINEL_PASSWORD}@")
    async with serving(settings) as (quota, registry):
        await check_hold_and_record(quota, "job-1")
        assert await exported_committed(registry, "acme") == 3


@pytest.mark.parametrize(
    ("sentinel_url", "reason"),
    [
        (f"redis://:{WRONG_PASSWORD}@", "invalid username-password pair"),
        (f"redis://{SENTINEL_USER}:{WRONG_PASSWORD}@", "invalid username-password pair"),
        ("", "authenticated"),
    ],
    ids=["wrong-password", "wrong-user-password", "no-credentials"],
)
async def test_refused_credentials_stop_the_start_with_a_clear_message(
    topology: Topology, sentinel_url: str, reason: str
) -> None:
    """When every sentinel refuses pagemeter's credentials (or their absence), the start-up check says so, naming each sentinel, the reason and where credentials go, and never a password."""
    settings = sentinel_settings(topology, sentinel_url)
    client = connect_redis(settings.redis_url, settings)
    try:
        with pytest.raises(ConfigurationError) as refused:
            await check_sentinel_access(client)
    finally:
        await close_redis(client)
    message = str(refused.value)
    assert message.startswith("the sentinels refused pagemeter: "), message
    assert reason in message
    assert "PAGEMETER_SENTINEL_URL" in message
    for _, port in topology.sentinels:
        assert f"127.0.0.1:{port}" in message
    for secret in (WRONG_PASSWORD, SENTINEL_PASSWORD, SENTINEL_USER_PASSWORD, PRIMARY_PASSWORD):
        assert secret not in message


async def test_one_refusing_sentinel_is_a_warning(
    topology: Topology, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sentinel that refuses while the others accept (a password rotated one sentinel at a time) does not stop pagemeter: it starts, serves and warns, naming that sentinel only."""
    other, other_port = start_sentinel(
        tmp_path, "rotated", topology.primary.port, requirepass="rotated-pw-9e2c"
    )
    try:
        await until(lambda: answers(other_port, "rotated-pw-9e2c"), "the rotated sentinel")
        settings = sentinel_settings(
            topology,
            f"redis://:{SENTINEL_PASSWORD}@",
            sentinels=f"127.0.0.1:{other_port},{topology.addresses}",
        )
        with caplog.at_level("WARNING", logger="pagemeter_server.sentinel"):
            async with serving(settings) as (quota, _):
                await check_hold_and_record(quota, "job-1")
    finally:
        other.kill()
        other.wait()
    warnings = [r.getMessage() for r in caplog.records if r.name == "pagemeter_server.sentinel"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"1 of 4 sentinels refused pagemeter: 127.0.0.1:{other_port} (")
    assert SENTINEL_PASSWORD not in warnings[0]


def run_server(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                str(SERVER),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                "",
                "--http-listen",
                "",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def server_environment(topology: Topology, sentinel_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
    env.update(
        PAGEMETER_REDIS_MODE="sentinel",
        PAGEMETER_SENTINELS=topology.addresses,
        PAGEMETER_SENTINEL_MASTER=MASTER,
        PAGEMETER_REDIS_URL=f"redis://:{PRIMARY_PASSWORD}@sentinel-named/0",
        PAGEMETER_SENTINEL_URL=sentinel_url,
        PAGEMETER_DEV_OPEN_ACCESS="1",
        PAGEMETER_LOG_LEVEL="DEBUG",
    )
    return env


def test_pagemeter_server_with_sentinel_credentials_keeps_them_out_of_its_log(
    topology: Topology, tmp_path: Path
) -> None:
    """The real command, given the sentinels' credentials in PAGEMETER_SENTINEL_URL: with good ones it serves (logging at DEBUG without any password); with a wrong one it exits 1 with one line saying the sentinels refused it, again without any password."""
    log = tmp_path / "good.log"
    good = f"redis://{SENTINEL_USER}:{SENTINEL_USER_PASSWORD}@"
    process = run_server(server_environment(topology, good), log)
    try:
        deadline = time.monotonic() + 20
        while "pagemeter serving gRPC" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    assert process.returncode == 0, log.read_text()

    bad_log = tmp_path / "bad.log"
    bad = run_server(
        server_environment(topology, f"redis://{SENTINEL_USER}:{WRONG_PASSWORD}@"), bad_log
    )
    assert bad.wait(20) == 1
    refused = bad_log.read_text()
    assert "the sentinels refused pagemeter" in refused
    assert "invalid username-password pair" in refused
    assert "Traceback" not in refused
    for text in (log.read_text(), refused):
        for secret in (SENTINEL_USER_PASSWORD, WRONG_PASSWORD, PRIMARY_PASSWORD):
            assert secret not in text


# -- TLS -------------------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[trustme.CA, TlsFiles]:
    ca = trustme.CA()
    client = ca.issue_cert("pagemeter-client")
    files = TlsFiles(
        tmp_path / "ca.pem",
        tmp_path / "client.pem",
        tmp_path / "client.key",
        tmp_path / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    return ca, files


class QuickTlsTerminator(TlsTerminator):
    """test_redis_tls's terminator, closing TLS connections without asyncio's 30 s wait.

    The exporter's synchronous client keeps its connection until it is collected,
    and never answers the terminator's close_notify, so at the end of the test
    asyncio would wait its default SSL shutdown timeout for each.
    """

    async def __aenter__(self) -> QuickTlsTerminator:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.context, ssl_shutdown_timeout=0.5
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self


@contextlib.asynccontextmanager
async def tls_in_front(
    topology: Topology, ca: trustme.CA
) -> AsyncIterator[tuple[Topology, list[QuickTlsTerminator]]]:
    """The topology with each sentinel reachable only through a mutual-TLS terminator."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # a client certificate from the CA, or no connection
    async with contextlib.AsyncExitStack() as stack:
        terminators = [
            await stack.enter_async_context(QuickTlsTerminator(context, port))
            for _, port in topology.sentinels
        ]
        # The same sentinels as pagemeter sees them: their TLS ports.
        behind_tls = Topology(
            topology.primary,
            topology.replica,
            [
                (process, t.port)
                for (process, _), t in zip(topology.sentinels, terminators, strict=True)
            ],
            SENTINEL_PASSWORD,
        )
        yield behind_tls, terminators


async def test_sentinels_behind_mutual_tls(
    topology: Topology, tls_files: tuple[trustme.CA, TlsFiles]
) -> None:
    """Sentinels reached only over TLS that requires a client certificate, with a password: given the CA, the client certificate and key in a rediss:// --sentinel-url, the service and the exporter both discover the primary over TLS and serve."""
    ca, files = tls_files
    url = (
        f"rediss://:{SENTINEL_PASSWORD}@?ssl_ca_certs={files.ca}"
        f"&ssl_certfile={files.client_cert}&ssl_keyfile={files.client_key}"
    )
    async with tls_in_front(topology, ca) as (behind_tls, terminators):
        settings = sentinel_settings(behind_tls, url)
        async with serving(settings) as (quota, registry):
            await check_hold_and_record(quota, "job-1")
            assert await committed_pages(quota, "acme") == 3
            # The start-up check asked every sentinel, over TLS; the exporter's
            # own client opens its own connection, another TLS handshake.
            assert all(t.handshakes == 1 for t in terminators)
            assert await exported_committed(registry, "acme") == 3
            assert sum(t.handshakes for t in terminators) == 4


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        (
            "ssl_ca_certs={other_ca}&ssl_certfile={cert}&ssl_keyfile={key}",
            "certificate verify failed",
        ),
        ("ssl_ca_certs={ca}", "closed the connection before any answer"),
        ("", "closed the connection before any answer"),
    ],
    ids=["certificate-from-another-ca", "no-client-certificate", "no-tls"],
)
async def test_a_failed_tls_handshake_with_the_sentinels_stops_the_start(
    topology: Topology, tls_files: tuple[trustme.CA, TlsFiles], query: str, reason: str
) -> None:
    """A sentinel certificate the configured CA did not sign, no client certificate where the sentinels require one, or no TLS at all: the start-up check stops pagemeter and names the failure."""
    ca, files = tls_files
    url = f"rediss://:{SENTINEL_PASSWORD}@?" + query.format(
        other_ca=files.other_ca, ca=files.ca, cert=files.client_cert, key=files.client_key
    )
    if not query:
        url = f"redis://:{SENTINEL_PASSWORD}@"
    async with tls_in_front(topology, ca) as (behind_tls, _):
        settings = sentinel_settings(behind_tls, url)
        client = connect_redis(settings.redis_url, settings)
        try:
            with pytest.raises(ConfigurationError) as refused:
                await check_sentinel_access(client)
        finally:
            await close_redis(client)
    message = str(refused.value)
    assert message.startswith("the sentinels refused pagemeter: "), message
    assert reason in message
    assert SENTINEL_PASSWORD not in message


def test_an_unreadable_tls_file_is_a_configuration_error() -> None:
    """A CA file that cannot be read is named at start, before any connection."""
    settings = Settings(
        redis_mode="sentinel",
        sentinels="127.0.0.1:1",
        sentinel_url="rediss://?ssl_ca_certs=/nonexistent/ca.pem",
    ).validate()
    with pytest.raises(
        ConfigurationError, match=re.escape("ssl_ca_certs: cannot read /nonexistent/ca.pem")
    ):
        connect_redis(settings.redis_url, settings)
