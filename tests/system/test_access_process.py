"""The real `pagemeter-server` command with credentials: start-up rules and no secret in logs.

The server runs as a subprocess on free loopback ports against a Redis that
requires a password given in the Redis URL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.ops.embedded import RedisProcess, free_port
from tests.conftest import eagle_plan

SERVER = Path(sys.executable).parent / "pagemeter-server"
ADMIN_TOKEN = "adm-7f3c2a9e5b1d4c8f9a0e"
SERVICE_TOKEN = "svc-2b8e6d4f1a3c5e7b9d0f"
REDIS_PASSWORD = "redis-pw-5e1f9c3a7b2d"


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
    env.update(extra)
    return env


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    process = RedisProcess(tmp_path / "redis", password=REDIS_PASSWORD)
    process.start()
    yield process
    process.stop()


def wait_until_answering(
    channel: grpc.Channel, log: Path, process: subprocess.Popen[bytes]
) -> None:
    stub = quota_pb2_grpc.QuotaServiceStub(channel)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()}")
        try:
            stub.GetUsage(
                quota_pb2.GetUsageRequest(org_id="acme"),
                metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
                timeout=0.5,
            )
            return
        except grpc.RpcError:
            time.sleep(0.05)
    pytest.fail(f"server did not answer: {log.read_text()}")


def test_no_secret_reaches_logs_or_metrics(guarded_redis: RedisProcess, tmp_path: Path) -> None:
    """At DEBUG level, with good and bad calls, neither the tokens, a tenant key, nor the Redis password appear in the log or on /metrics."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{guarded_redis.port}/0"
    env = clean_environment(
        PAGEMETER_REDIS_URL=url,
        PAGEMETER_ADMIN_TOKENS=f"ops={ADMIN_TOKEN}",
        PAGEMETER_SERVICE_TOKENS=f"workers={SERVICE_TOKEN}",
        PAGEMETER_LOG_LEVEL="DEBUG",
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(SERVER),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--http-listen",
                "",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    secrets_seen: list[str] = [ADMIN_TOKEN, SERVICE_TOKEN, REDIS_PASSWORD]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_until_answering(channel, log, process)
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            as_admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            admin.SetPlan(admin_pb2.SetPlanRequest(plan=eagle_plan()), metadata=as_admin)
            key = admin.CreateApiKey(
                admin_pb2.CreateApiKeyRequest(org_id="acme"), metadata=as_admin
            )
            secrets_seen.append(key.secret)
            quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=(("x-api-key", key.secret),))
            for bad in (
                f"Bearer {ADMIN_TOKEN}x",
                f"Basic {SERVICE_TOKEN}",
                f"Bearer {key.secret}x",
            ):
                with contextlib.suppress(grpc.RpcError):
                    quota.GetUsage(quota_pb2.GetUsageRequest(), metadata=(("authorization", bad),))
            with contextlib.suppress(grpc.RpcError):  # a tenant calling an admin RPC
                admin.ListApiKeys(
                    admin_pb2.ListApiKeysRequest(), metadata=(("x-api-key", key.secret),)
                )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
            metrics = reply.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    text = log.read_text()
    assert "pagemeter serving gRPC" in text
    for secret in secrets_seen:
        assert secret not in text, "a secret is in the log"
        assert secret not in metrics, "a secret is on /metrics"
    assert key.secret.rsplit(".", 1)[1] not in text


def test_server_without_credentials_exits_with_instructions(tmp_path: Path) -> None:
    """pagemeter-server with no credentials and no --dev-open-access exits 1 with one line that says what to set, and starts no Redis."""
    result = subprocess.run(
        [
            str(SERVER),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            "",
            "--http-listen",
            "",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_environment(),
    )
    assert result.returncode == 1, result.stderr
    assert "PAGEMETER_ADMIN_TOKENS" in result.stderr and "--dev-open-access" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists(), "the embedded Redis was started"


def test_open_access_says_so_loudly(tmp_path: Path) -> None:
    """With --dev-open-access the server warns at start-up that every caller is an admin."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(SERVER),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--http-listen",
            "",
            "--data-dir",
            str(tmp_path / "d"),
            "--dev-open-access",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_environment(),
    )
    try:
        assert process.stdout is not None
        first_lines = [process.stdout.readline().decode() for _ in range(1)]
        assert "WARNING" in first_lines[0] and "OPEN ACCESS" in first_lines[0]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        if process.stdout:
            process.stdout.close()
