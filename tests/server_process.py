"""pagemeter-server as a real process (uvloop, health probe, settings from flags),
for tests that try it from outside: killed, restarted, or watched under faults."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagemeter_server.ops.embedded import free_port

SERVER = Path(sys.executable).parent / "pagemeter-server"


class ServerProcess:
    """One pagemeter-server on 127.0.0.1:<free port>, started with `args`."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.args = args
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEMETER_")}
        command = [str(SERVER), "--listen", self.target, "--metrics-listen", "", *self.args]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> int | None:
        """SIGTERM, as an orchestrator stops it; its exit code (None if never started)."""
        if self.process is None:
            return None
        self.process.terminate()
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer stops it; a later start() serves the same port."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def wait_until_serving(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, self.tail()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"pagemeter-server never served: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@contextlib.contextmanager
def running_servers(args: Sequence[list[str]], folder: Path) -> Iterator[list[str]]:
    """One serving pagemeter-server per argument list; yields their targets.

    At the end each is stopped with SIGTERM and must exit 0 with no traceback.
    """
    servers = [
        ServerProcess(server_args, folder / f"pagemeter-{number}.log")
        for number, server_args in enumerate(args)
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_until_serving()
        yield [server.target for server in servers]
    finally:
        codes = [(server.stop(), server.tail()) for server in servers]
    for code, log in codes:
        assert code == 0 and "Traceback" not in log, f"exit {code}: {log}"
