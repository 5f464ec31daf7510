"""Process lifecycle of the real `pagemeter-server` command: crashes, restarts, second instances.

Every process here is real: the command with its embedded Redis (and, with --workers,
its worker processes), killed with SIGKILL as a crash would. psutil finds the children
a server started; teardown kills whatever a test left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagemeter.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from pagemeter_server.ops.embedded import REDIS_SERVER_ENV, free_port
from pagemeter_server.ops.lifecycle import bound_command
from tests.conftest import eagle_plan

SERVER = Path(sys.executable).parent / "pagemeter-server"
START_SECONDS = 30.0
# A crashed supervisor's workers drain for --grace-period (1 s here), then exit;
# its Redis flushes its append-only file and exits on the parent-death SIGTERM.
GONE_SECONDS = 8.0
# A second start that must be refused answers within this (no bounded wait applies
# while the holder is alive).
REFUSED_SECONDS = 10.0


class Command:
    """One `pagemeter-server` process (own session, so teardown can kill its group)."""

    def __init__(self, args: list[str], log: Path, program: list[str] | None = None) -> None:
        self.args = args
        self.log_path = log
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PAGEMETER_") or k == REDIS_SERVER_ENV
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                # Bound to this test run: a killed run takes the server along.
                bound_command([*(program or [str(SERVER)]), *args]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.family: list[psutil.Process] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, target: str) -> None:
        """Wait until health says SERVING on target, then note every descendant."""
        deadline = time.monotonic() + START_SECONDS
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process.poll() is None, f"exited at start-up:\n{self.log()}"
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                assert time.monotonic() < deadline, f"not serving:\n{self.log()}"
                time.sleep(0.05)
        self.family = psutil.Process(self.pid).children(recursive=True)

    def crash(self) -> None:
        """SIGKILL to this process alone (not its group), and reap it."""
        self.process.kill()
        self.process.wait(5)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(5)
        for child in self.family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[Callable[[list[str]], Command]]:
    """A factory of started commands, all killed (with their children) in teardown."""
    started: list[Command] = []

    def start(args: list[str]) -> Command:
        command = Command(args, tmp_path / f"command-{len(started)}.log")
        started.append(command)
        return command

    yield start
    for command in started:
        command.cleanup()


def server_args(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        "",
        "--http-listen",
        "",
        "--data-dir",
        str(data_dir),
        "--dev-open-access",
        "--grace-period",
        "1",
        *extra,
    ]


def run_refused(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a start that must be refused; fail (and kill it) if it keeps running instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
    process = subprocess.Popen(
        [str(SERVER), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=REFUSED_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the second instance was not refused; it ran:\n{stderr}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if '"level": "ERROR"' in line]


def redis_of(data_dir: Path) -> list[psutil.Process]:
    """Every live Redis (or Valkey) server working in data_dir (the server chdirs there)."""
    found = []
    for process in psutil.process_iter(["name", "cwd", "status"]):
        if (
            process.info["name"] in ("redis-server", "valkey-server")
            and process.info["cwd"] == str(data_dir)
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


def wait_gone(processes: list[psutil.Process], what: str) -> None:
    _, alive = psutil.wait_procs(processes, timeout=GONE_SECONDS)
    assert not alive, f"{what} still running {GONE_SECONDS}s after the crash: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline())}" for p in alive
    )


def port_is_free(port: int) -> bool:
    """Nothing listens on the port (a bind without SO_REUSEPORT succeeds)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen(1)
        except OSError:
            return False
    return True


def committed(target: str, org_id: str = "acme") -> tuple[bool, int]:
    with grpc.insecure_channel(target) as channel:
        usage = quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
            quota_pb2.GetUsageRequest(org_id=org_id), timeout=5
        )
    pages = {m.metric: m.committed for m in usage.metrics}.get("pages", 0)
    return usage.has_plan, pages


def set_plan_and_record(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).SetPlan(
            admin_pb2.SetPlanRequest(plan=eagle_plan()), timeout=5
        )
        quota_pb2_grpc.QuotaServiceStub(channel).RecordUsage(
            quota_pb2.RecordUsageRequest(
                org_id="acme", request_id="before-crash", units={"pages": 7}
            ),
            timeout=5,
        )


# -- --workers N --------------------------------------------------------------------------


def test_killed_supervisor_takes_its_workers_and_redis_along(
    tmp_path: Path, commands: Callable[[list[str]], Command]
) -> None:
    """SIGKILL of a --workers 2 supervisor ends its workers and its embedded Redis within seconds and frees the port, and the same command started again serves the data acknowledged before the crash."""
    port = free_port()
    args = server_args(port, tmp_path / "data", "--workers", "2")
    target = f"127.0.0.1:{port}"
    first = commands(args)
    first.wait_serving(target)
    assert len(first.family) >= 3, first.family  # two workers and the Redis
    set_plan_and_record(target)

    first.crash()
    wait_gone(first.family, "a child of the killed supervisor")
    assert port_is_free(port), "the gRPC port is still served after the crash"

    again = commands(args)
    again.wait_serving(target)
    assert committed(target) == (True, 7)
    assert len(redis_of(tmp_path / "data")) == 1


def test_second_supervisor_on_a_served_port_is_refused_unless_reuse_port(
    tmp_path: Path, commands: Callable[[list[str]], Command]
) -> None:
    """A second --workers 2 on the port of a live one (another data dir) exits non-zero with one line naming the holder's pid and leaves nothing running; with --reuse-port it is let in."""
    port = free_port()
    first = commands(server_args(port, tmp_path / "one", "--workers", "2"))
    first.wait_serving(f"127.0.0.1:{port}")

    refused = run_refused(server_args(port, tmp_path / "two", "--workers", "2"), tmp_path)
    assert refused.returncode != 0, refused.stderr
    (line,) = error_lines(refused.stderr)
    assert f"pid {first.pid}" in line and str(port) in line and "--reuse-port" in line, line
    assert "Traceback" not in refused.stderr
    assert not redis_of(tmp_path / "two"), "the refused instance left a Redis behind"

    shared = commands(server_args(port, tmp_path / "three", "--workers", "2", "--reuse-port"))
    deadline = time.monotonic() + START_SECONDS
    while shared.log().count("pagemeter serving gRPC") < 2:
        assert shared.process.poll() is None, shared.log()
        assert time.monotonic() < deadline, shared.log()
        time.sleep(0.1)


# -- one server ---------------------------------------------------------------------------


def test_single_server_killed_three_times_leaves_no_orphan_redis(
    tmp_path: Path, commands: Callable[[list[str]], Command]
) -> None:
    """A single server SIGKILLed three times in a row, restarted each time on the same data dir, leaves no redis-server behind, and the data survives every restart."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    args = server_args(port, tmp_path / "data")
    for cycle in range(3):
        server = commands(args)
        server.wait_serving(target)
        if cycle == 0:
            set_plan_and_record(target)
        assert committed(target) == (True, 7)
        assert len(redis_of(tmp_path / "data")) == 1
        server.crash()
        wait_gone(server.family, f"the embedded Redis of crash {cycle + 1}")
    assert not redis_of(tmp_path / "data")


@pytest.fixture
def live_server(tmp_path: Path, commands: Callable[[list[str]], Command]) -> tuple[Command, int]:
    """One single server on a free port with its embedded Redis in tmp_path/data."""
    port = free_port()
    server = commands(server_args(port, tmp_path / "data"))
    server.wait_serving(f"127.0.0.1:{port}")
    return server, port


def test_second_start_on_a_live_data_dir_fails_naming_the_holder(
    tmp_path: Path, live_server: tuple[Command, int]
) -> None:
    """A second server on the data dir of a live one exits non-zero at once with one line naming the holder's pid, and starts no second Redis there."""
    server, _ = live_server
    began = time.monotonic()
    refused = run_refused(server_args(free_port(), tmp_path / "data"), tmp_path)
    assert refused.returncode != 0, refused.stderr
    assert time.monotonic() - began < REFUSED_SECONDS
    (line,) = error_lines(refused.stderr)
    assert "could not start" in line and str(tmp_path / "data") in line, line
    assert f"in use by pagemeter pid {server.pid}" in line, line
    assert "Traceback" not in refused.stderr
    assert len(redis_of(tmp_path / "data")) == 1


def test_second_plain_server_on_a_served_port_fails_in_one_line(
    tmp_path: Path, live_server: tuple[Command, int]
) -> None:
    """A second single server (no --reuse-port) on the port of a live one fails to bind, says so in one line, and stops the Redis it had started."""
    _, port = live_server
    refused = run_refused(server_args(port, tmp_path / "other"), tmp_path)
    assert refused.returncode != 0, refused.stderr
    (line,) = error_lines(refused.stderr)
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in line, line
    assert "Traceback" not in refused.stderr
    assert not redis_of(tmp_path / "other")


# -- errors after start-up ----------------------------------------------------------------

# The server command with one fault injected into its shutdown path: stopping the
# embedded Redis works, then raises OSError (as a full disk or a vanished data dir
# would make a clean-up step fail).
FAILING_SHUTDOWN = """
import sys
from pagemeter_server.ops import embedded
stop = embedded.RedisProcess.stop
def failing_stop(self, *args, **kwargs):
    stop(self, *args, **kwargs)
    raise OSError(28, "No space left on device")
embedded.RedisProcess.stop = failing_stop
from pagemeter_server.app import main
main(sys.argv[1:])
"""


def test_error_while_stopping_is_not_reported_as_a_failed_start(tmp_path: Path) -> None:
    """An OSError raised while a server that was serving shuts down is logged as a failure while stopping (not "could not start"), and the exit code is non-zero."""
    port = free_port()
    command = Command(
        server_args(port, tmp_path / "data"),
        tmp_path / "server.log",
        program=[sys.executable, "-c", FAILING_SHUTDOWN],
    )
    try:
        command.wait_serving(f"127.0.0.1:{port}")
        command.process.send_signal(signal.SIGTERM)
        code = command.process.wait(15)
    finally:
        command.cleanup()
    text = command.log()
    (line,) = error_lines(text)
    assert "could not start" not in line, line
    assert "while stopping" in line and "No space left on device" in line, line
    assert code == 1, text
