"""The real `pagemeter-server` command as a subprocess, with its own embedded Redis.

No Redis URL is given, so the command starts the bundled redis-server in the data
directory itself. Every port is a free loopback port; every process started here is
killed in teardown if a test left it running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, plan_pb2, quota_pb2, quota_pb2_grpc
from pagemeter_server.ops.embedded import REDIS_SERVER_ENV, append_only_files, free_port
from pagemeter_server.ops.lifecycle import bound_command

SERVER_COMMAND = Path(sys.executable).parent / "pagemeter-server"
STARTUP_DEADLINE_SECONDS = 20.0
EXIT_DEADLINE_SECONDS = 5.0
RPC_TIMEOUT_SECONDS = 5.0


class ServerProcess:
    """One `pagemeter-server` subprocess on free ports, with a log file for diagnosis."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.redis_pids: set[int] = set()
        self._channel: grpc.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        assert os.access(SERVER_COMMAND, os.X_OK), f"no {SERVER_COMMAND}: run `make install`"
        # No PAGEMETER_* setting of the caller may leak in (a Redis URL would bypass the
        # embedded store under test); only the choice of redis-server binary is kept.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PAGEMETER_") or k == REDIS_SERVER_ENV
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                # Bound to this test run: a killed run takes the server along.
                bound_command(
                    [
                        str(SERVER_COMMAND),
                        "--listen",
                        self.target,
                        "--metrics-listen",
                        f"127.0.0.1:{self.metrics_port}",
                        "--http-listen",
                        "",
                        "--data-dir",
                        str(self.data_dir),
                        "--dev-open-access",
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own process group: teardown can kill the server, and no terminal
                # signal reaches it by accident.
                start_new_session=True,
            )
        self._wait_until_serving()
        self.redis_pids |= {child.pid for child in self.redis_children()}

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
        stub = health_pb2_grpc.HealthStub(self.channel())
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(
                    f"pagemeter-server exited with {self.process.returncode} during start-up:\n"
                    f"{self.log()}"
                )
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.05)
        pytest.fail(
            f"pagemeter-server did not report SERVING within {STARTUP_DEADLINE_SECONDS}s:\n"
            f"{self.log()}"
        )

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def redis_children(self) -> list[psutil.Process]:
        """The redis-server processes the server started (its direct children)."""
        return [
            child
            for child in psutil.Process(self.pid).children()
            if child.name() in ("redis-server", "valkey-server")
        ]

    def signal_and_wait(self, signum: signal.Signals) -> int:
        """Send signum to the server process alone and wait (bounded) for it to exit."""
        assert self.process is not None
        self.close_channel()
        self.process.send_signal(signum)
        try:
            return self.process.wait(EXIT_DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"pagemeter-server did not exit within {EXIT_DEADLINE_SECONDS}s of "
                f"{signum.name}:\n{self.log()}"
            )

    def cleanup(self) -> None:
        """Kill whatever this helper started and a test left running."""
        self.close_channel()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        for pid in self.redis_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


class Launch(Protocol):
    def __call__(self, data_dir: Path | None = None) -> ServerProcess: ...


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """A factory of started servers (on tmp_path/data unless told otherwise), all cleaned up."""
    started: list[ServerProcess] = []

    def _launch(data_dir: Path | None = None) -> ServerProcess:
        server = ServerProcess(
            data_dir or tmp_path / "data", tmp_path / f"server-{len(started)}.log"
        )
        started.append(server)
        server.start()
        return server

    yield _launch
    for server in started:
        server.cleanup()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by the read-only checks of this module (each uses its own org)."""
    base = tmp_path_factory.mktemp("pagemeter-server")
    server = ServerProcess(base / "data", base / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def set_plan(server: ServerProcess, org_id: str) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(server.channel())
    plan = plan_pb2.Plan(
        org_id=org_id,
        name="Business",
        timezone="UTC",
        metrics=[
            plan_pb2.MetricLimits(
                metric="pages",
                contract_quota=2000,
                overage_allowed=True,
                hard_limit=2500,
                price_per_unit="0.03",
                overage_price_per_unit="0.028",
            )
        ],
    )
    admin.SetPlan(admin_pb2.SetPlanRequest(plan=plan), timeout=RPC_TIMEOUT_SECONDS)


def committed_pages(server: ServerProcess, org_id: str) -> int:
    quota = quota_pb2_grpc.QuotaServiceStub(server.channel())
    usage = quota.GetUsage(quota_pb2.GetUsageRequest(org_id=org_id), timeout=RPC_TIMEOUT_SECONDS)
    return {m.metric: m.committed for m in usage.metrics}["pages"]


def check_and_record(server: ServerProcess, org_id: str, request_id: str, pages: int) -> None:
    quota = quota_pb2_grpc.QuotaServiceStub(server.channel())
    check = quota.CheckQuota(
        quota_pb2.CheckQuotaRequest(
            org_id=org_id, units={"pages": pages}, request_id=request_id, hold=True
        ),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    assert check.allowed and check.held
    record = quota.RecordUsage(
        quota_pb2.RecordUsageRequest(org_id=org_id, request_id=request_id, units={"pages": pages}),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    assert record.status == quota_pb2.RECORD_STATUS_COMPLETED and not record.duplicate


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- a running server --------------------------------------------------------------------


def test_console_command_serves_quota_rpcs_on_embedded_redis(running: ServerProcess) -> None:
    """With no Redis URL the console command serves SetPlan, CheckQuota, RecordUsage and GetUsage over gRPC."""
    set_plan(running, "proc-rpcs")
    check_and_record(running, "proc-rpcs", "job-1", 120)
    quota = quota_pb2_grpc.QuotaServiceStub(running.channel())
    usage = quota.GetUsage(
        quota_pb2.GetUsageRequest(org_id="proc-rpcs"), timeout=RPC_TIMEOUT_SECONDS
    )
    pages = {m.metric: m for m in usage.metrics}["pages"]
    assert usage.has_plan and usage.subscription.plan_name == "Business"
    assert (pages.committed, pages.held, pages.contract_quota) == (120, 0, 2000)
    assert usage.jobs.succeeded == 1


def test_health_check_answers_serving(running: ServerProcess) -> None:
    """The grpc.health.v1 Health service reports SERVING overall and for both pagemeter services."""
    stub = health_pb2_grpc.HealthStub(running.channel())
    for service in ("", "pagemeter.v1.QuotaService", "pagemeter.v1.AdminService"):
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_SECONDS
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(running: ServerProcess) -> None:
    """Server reflection lists pagemeter.v1.QuotaService (and admin, health) and resolves its RPCs."""
    database = ProtoReflectionDescriptorDatabase(running.channel())
    services = set(database.get_services())
    assert {
        "pagemeter.v1.QuotaService",
        "pagemeter.v1.AdminService",
        "grpc.health.v1.Health",
    } <= services
    file_proto = database.FindFileContainingSymbol("pagemeter.v1.QuotaService")
    (service,) = [s for s in file_proto.service if s.name == "QuotaService"]
    assert {"CheckQuota", "RecordUsage", "GetUsage"} <= {m.name for m in service.method}


def test_metrics_endpoint_exports_counters(running: ServerProcess) -> None:
    """The Prometheus endpoint on --metrics-listen serves pagemeter's counters after a CheckQuota."""
    set_plan(running, "proc-metrics")
    check_and_record(running, "proc-metrics", "job-m", 3)
    with urllib.request.urlopen(running.metrics_url, timeout=5) as response:
        assert response.status == 200
        body = response.read().decode()
    for name in (
        "pagemeter_check_decisions_total",
        "pagemeter_units_total",
        "pagemeter_records_total",
        "pagemeter_redis_script_seconds_bucket",
        "pagemeter_build_info",
    ):
        assert name in body, f"{name} missing from /metrics"
    decisions = [
        line
        for line in body.splitlines()
        if line.startswith("pagemeter_check_decisions_total{") and 'metric="pages"' in line
    ]
    assert decisions and sum(float(line.rsplit(" ", 1)[1]) for line in decisions) >= 1


def test_embedded_redis_writes_append_only_file(running: ServerProcess) -> None:
    """The embedded Redis is a child of the server and persists writes to an append-only file in --data-dir."""
    assert running.redis_children(), "no redis-server child process"
    set_plan(running, "proc-aof-org")
    # appendfsync everysec: the write reaches the file within about a second.
    wait_for(
        lambda: any(
            b"proc-aof-org" in aof.read_bytes() for aof in append_only_files(running.data_dir)
        ),
        5.0,
        f"an append-only file in {running.data_dir} to contain the plan's org id",
    )


# -- stopping and restarting -------------------------------------------------------------


def test_sigterm_exits_zero_and_stops_embedded_redis(launch: Launch) -> None:
    """SIGTERM makes the server exit with code 0 within a few seconds, and its redis-server child is gone."""
    server = launch()
    (redis_child,) = server.redis_children()
    assert server.signal_and_wait(signal.SIGTERM) == 0, server.log()
    assert not psutil.pid_exists(redis_child.pid), "embedded redis-server outlived the server"
    assert "pagemeter stopped" in server.log()


def test_sigint_stops_cleanly(launch: Launch) -> None:
    """SIGINT (Ctrl-C) stops the server like SIGTERM: exit code 0 and no redis-server left behind."""
    server = launch()
    (redis_child,) = server.redis_children()
    assert server.signal_and_wait(signal.SIGINT) == 0, server.log()
    assert not psutil.pid_exists(redis_child.pid), "embedded redis-server outlived the server"
    assert "Traceback" not in server.log()


def test_recorded_usage_survives_restart(launch: Launch, tmp_path: Path) -> None:
    """Usage recorded before a SIGTERM is still committed (and its request_id still deduplicated) after a restart on the same data dir."""
    data_dir = tmp_path / "persistent"
    first = launch(data_dir)
    set_plan(first, "proc-restart")
    check_and_record(first, "proc-restart", "job-a", 700)
    check_and_record(first, "proc-restart", "job-b", 50)
    assert committed_pages(first, "proc-restart") == 750
    assert first.signal_and_wait(signal.SIGTERM) == 0, first.log()

    second = launch(data_dir)
    assert committed_pages(second, "proc-restart") == 750
    quota = quota_pb2_grpc.QuotaServiceStub(second.channel())
    again = quota.RecordUsage(
        quota_pb2.RecordUsageRequest(
            org_id="proc-restart", request_id="job-a", units={"pages": 700}
        ),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    assert again.duplicate
    assert committed_pages(second, "proc-restart") == 750


def test_metrics_port_in_use_is_a_clear_start_up_error(tmp_path: Path) -> None:
    """A metrics port already taken makes the server exit 1 with one readable line, no traceback, and its embedded Redis stopped."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                str(SERVER_COMMAND),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                f"127.0.0.1:{port}",
                "--http-listen",
                "",
                "--data-dir",
                str(tmp_path / "data"),
                "--dev-open-access",
            ],
            capture_output=True,
            text=True,
            timeout=STARTUP_DEADLINE_SECONDS,
            env={k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")},
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "embedded Redis stopped" in result.stderr
