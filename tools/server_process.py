"""A gRPC server as a subprocess, watched from outside: `pagemeter-server` for the
tests that kill, restart or fault it, for `make bench` and for `make soak` (and
bench's empty handler).

Imported as `server_process`: tools/ is on sys.path for the tests (pytest's
`pythonpath` in pyproject.toml), for tools/soak.py (its own folder) and for
bench/run.py (which adds it).
"""

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

from pagemeter_server.ops.embedded import REDIS_SERVER_ENV, free_port
from pagemeter_server.ops.lifecycle import bound_command

SERVER = Path(sys.executable).parent / "pagemeter-server"


class NotServing(RuntimeError):
    """The server exited during start-up or did not serve in time (the log's tail included)."""


def caller_free_environment() -> dict[str, str]:
    """This process's environment without the caller's PAGEMETER_* settings (a
    token or a Redis URL would change the server under test), except the choice
    of redis-server binary."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PAGEMETER_") or name == REDIS_SERVER_ENV
    }


class ServerProcess:
    """One server process started from `command`, its output appended to `log`.

    `target` is the host:port it serves gRPC on. With `bound` (the default) the
    process gets SIGTERM when the thread that started it ends, so a killed test
    run, bench or soak takes it along (start it from a thread that lives as long
    as the run). start() again after stop() or kill() starts a new process on the
    same command and port.
    """

    def __init__(
        self,
        command: Sequence[str],
        log: Path,
        *,
        target: str,
        name: str = "pagemeter-server",
        bound: bool = True,
        cwd: Path | None = None,
    ) -> None:
        self.command = list(command)
        self.log = log
        self.target = target
        self.name = name
        self.bound = bound
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def pagemeter(
        cls, args: Sequence[str], log: Path, *, bound: bool = True, cwd: Path | None = None
    ) -> ServerProcess:
        """`pagemeter-server` on 127.0.0.1:<a free port> with no metrics endpoint,
        then `args` (a later --metrics-listen or --http-listen wins)."""
        target = f"127.0.0.1:{free_port()}"
        command = [
            str(SERVER),
            "--listen",
            target,
            "--metrics-listen",
            "",
            "--http-listen",
            "",
            *args,
        ]
        return cls(command, log, target=target, bound=bound, cwd=cwd)

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        command = bound_command(self.command) if self.bound else self.command
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=caller_free_environment(),
                cwd=self.cwd,
            )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, as an orchestrator stops it, then SIGKILL after `timeout` seconds;
        its exit code (None if it was never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer stops it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_until_serving(self, seconds: float = 30.0, *, health: bool = True) -> None:
        """Until grpc.health.v1 answers SERVING (with `health`), or until a channel
        connects (a server without the health service); NotServing if the process
        exits first or `seconds` pass."""
        deadline = time.monotonic() + seconds
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.running():
                    code = self.process.returncode if self.process is not None else None
                    raise NotServing(f"{self.name} exited ({code}):\n{self.log_tail()}")
                with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError):
                    if not health:
                        grpc.channel_ready_future(channel).result(timeout=0.5)
                        return
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.05)
        raise NotServing(f"{self.name} did not serve in {seconds:g} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().strip().splitlines()[-lines:])


@contextlib.contextmanager
def running_servers(args: Sequence[list[str]], folder: Path) -> Iterator[list[str]]:
    """One serving pagemeter-server per argument list; yields their targets.

    At the end each is stopped with SIGTERM and must exit 0 with no traceback in
    its log.
    """
    servers = [
        ServerProcess.pagemeter(server_args, folder / f"pagemeter-{number}.log")
        for number, server_args in enumerate(args)
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_until_serving()
        yield [server.target for server in servers]
    finally:
        codes = [(server.stop(), server.log_text()) for server in servers]
    for code, log in codes:
        assert code == 0, f"exit {code}: {log[-3000:]}"
        assert "Traceback" not in log, log
