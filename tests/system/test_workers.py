"""--workers N: several server processes on one gRPC port, sharing one Redis."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.ops.embedded import free_port
from pagemeter_server.ops.lifecycle import bound_command
from tests.conftest import eagle_plan

SERVER = Path(sys.executable).parent / "pagemeter-server"
STORE_NAMES = ("valkey-server", "redis-server")


def two_free_ports() -> int:
    """A port p with p + 1 free too (worker i serves metrics on p + i)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def handled(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    pattern = r'^grpc_server_handled_total\{[^}]*grpc_method="GetUsage"[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def serving(metrics_port: int) -> bool:
    """Whether the worker with this metrics port reports itself serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return False
    return re.search(r"^pagemeter_serving 1(\.0)?$", text, re.MULTILINE) is not None


def http_answered(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    pattern = (
        r'^pagemeter_http_requests_total\{[^}]*route="/v1/orgs/\{org_id\}/usage"[^}]*\} (\S+)$'
    )
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def test_two_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    """With --workers 2 both processes answer calls on the one gRPC port and the one HTTP
    port, each with its own metrics port, and SIGTERM stops both and the embedded Redis."""
    port, metrics, http_port = free_port(), two_free_ports(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            # Bound to this test run: a killed run takes the server along.
            bound_command(
                [
                    str(SERVER),
                    "--workers",
                    "2",
                    "--dev-open-access",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--metrics-listen",
                    f"127.0.0.1:{metrics}",
                    "--http-listen",
                    f"127.0.0.1:{http_port}",
                    "--data-dir",
                    str(tmp_path / "data"),
                ]
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
                        admin_pb2.SetPlanRequest(plan=eagle_plan()), timeout=1
                    )
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        # Both workers serve before the calls are spread: one worker may still be
        # starting when the other answers.
        for worker_metrics in (metrics, metrics + 1):
            while not serving(worker_metrics):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        family = psutil.Process(supervisor.pid).children()
        children = [" ".join(c.cmdline()) for c in family]
        assert sum(c.name() in STORE_NAMES for c in family) == 1, children
        assert sum("spawn_main" in line for line in children) == 2, children
        for _ in range(40):  # a new connection each time: the kernel spreads them
            with grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
                    quota_pb2.GetUsageRequest(org_id="acme"), timeout=5
                )
        first, second = handled(metrics), handled(metrics + 1)
        assert first + second == 40
        assert first > 0 and second > 0, (first, second)
        for _ in range(40):  # urllib opens a new connection for each request
            url = f"http://127.0.0.1:{http_port}/v1/orgs/acme/usage"
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200
        first, second = http_answered(metrics), http_answered(metrics + 1)
        assert first + second == 40
        assert first > 0 and second > 0, (first, second)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            code = supervisor.wait(20)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            pytest.fail(f"the supervisor did not stop: {log.read_text()}")
    assert code == 0, log.read_text()
    assert "embedded Redis stopped" in log.read_text()
    # The server rewrites its process title; it works in (chdirs to) its data dir.
    assert not any(
        p.info["name"] in STORE_NAMES and p.info["cwd"] == str(tmp_path / "data")
        for p in psutil.process_iter(["name", "cwd"])
    )
